"""End to end on the tiny synthetic benchmark, through the user-facing bash scripts (one process each).

split by class (make_allocation) -> scripts/train_old.sh -> scripts/extract_meta.sh -> scripts/train_new.sh
for every method (bct, lce, unibct, hot_refresh, advbct, l2 and phi* without COMP_LOSS) ->
scripts/test.sh on roxford5k; a BCT chain of three generations from that old model (the plan of
scripts/reproduce_generations.sh); then the same scripts with a timm backbone (timm:convnext_atto). Tiny on purpose
(32 px, 32-d embedding, 2 iterations of 8 images per epoch): the assertions are about the pipeline's contracts
and the logged values, not about accuracy.
"""

import json
import math
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from advbct.data.decoding import ImageInput
from advbct.data.image_list import read_image_list
from advbct.data.splits import make_allocation
from advbct.data.synthetic import PRESETS
from advbct.evaluation.features import extract_features
from advbct.evaluation.protocol import image_datasets, load_test_set, score
from advbct.meta import load_meta
from advbct.models import load_trained_model
from advbct.pipelines.generations import generation_steps, parse_chain, resolve_chain
from advbct.pipelines.steps import run_steps
from helpers import REPO, run_pipeline_steps

EMB = 32
OLD_RATIO = 0.3
ONE_CORE = {"OMP_NUM_THREADS": "1"}   # the environment of the scripts the pool runs side by side

pytestmark = pytest.mark.slow

COMMON_YAML = """\
SEED: 1234
MODEL:
  ARCH: {arch}
  EMB_DIM: {emb}
  PRETRAINED: false
OLD_MODEL:
  ARCH: {arch}
DATA:
  ROOT: {root}
  IMG_SIZE: 32
  NUM_WORKERS: 0
TRAIN:
  EPOCHS: 1
  BATCH_SIZE: 8
  MAX_ITERS_PER_EPOCH: 2
  PRINT_FREQ: 1
EVAL:
  IMG_SIZE: 32
  BATCH_SIZE: 64
  NUM_WORKERS: 0
"""

# method -> the loss terms its training log must report, besides cls and total
METHOD_TERMS = {
    "bct": ("comp", "bct"),
    "lce": ("comp", "boundary", "alignment"),
    "unibct": ("comp", "unibct"),
    "hot_refresh": ("comp", "hot_refresh"),
    "advbct": ("comp", "boundary", "adversarial", "adv_weight"),
    "l2": ("comp", "l2"),
    "": (),
}


def run_script(script, *args, env_extra=None):
    """``bash scripts/<script> args...`` on one process; fail with the tail of its output."""
    env = dict(os.environ, NGPUS="1", **(env_extra or {}))
    proc = subprocess.run(["bash", str(REPO / "scripts" / script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    return proc


def epoch_means(out):
    """{term: value} of the last 'epoch k/N (...s): term value ...' line of OUT/log.txt."""
    lines = [ln for ln in (out / "log.txt").read_text().splitlines() if re.search(r"epoch \d+/\d+ \(", ln)]
    assert lines, f"no epoch line in {out / 'log.txt'}"
    fields = lines[-1].split("): ", 1)[1].split()
    return {k: float(v) for k, v in zip(fields[::2], fields[1::2])}


@pytest.fixture(scope="module")
def pool():
    """Runs two independent scripts at a time, one core each (ONE_CORE): their time goes mostly to starting
    Python and importing torch."""
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


@pytest.fixture(scope="module")
def base(request, selected, tiny_synthetic, tmp_path_factory, pool):
    """Class allocation, the old model (1 short epoch) and its meta file, made by the scripts. Where the timm
    pipeline's test is selected too, its scripts start first, in the pool, beside these."""
    if f"{request.node.nodeid}::test_convnext_old_meta_advbct_new_and_test_sh" in selected:
        request.getfixturevalue("convnext_chain")
    gld = Path(tiny_synthetic) / "gldv2"
    full_list = next(gld.glob("label_*.txt"))
    work = tmp_path_factory.mktemp("pipeline")
    split = make_allocation(str(full_list), "class", OLD_RATIO, out_dir=str(work / "lists"))
    cfg = work / "common.yml"
    cfg.write_text(COMMON_YAML.format(arch="resnet18", emb=EMB, root=gld))
    # the synthetic stand-in for ImageNet weights: the scripts' pretraining step (configs/synthetic/
    # pretrain_r18.yml on pretrain/, shrunk to the sizes above), then the old model from it
    pretrain = work / "pretrain"
    shrink = ["DATA.IMG_SIZE", "32", "MODEL.EMB_DIM", str(EMB), "TRAIN.EPOCHS", "1", "TRAIN.MAX_ITERS_PER_EPOCH", "2",
              "TRAIN.BATCH_SIZE", "8", "DATA.NUM_WORKERS", "0"]
    step = (f"pretrain_step('r18', {str(tiny_synthetic)!r}, {str(pretrain)!r}, {str(work / 'pretrain.log')!r}, "
            f"*{shrink!r})")
    proc = run_pipeline_steps(f"[{step}]", REPO, env=dict(os.environ, NGPUS="1", **ONE_CORE), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"[run]  pretrain backbone (r18, {tiny_synthetic}/pretrain)" in proc.stdout
    old_out = work / "old"
    run_script("train_old.sh", cfg, "DATA.TRAIN_LIST", split["files"]["old"], "OUTPUT", old_out,
               "MODEL.PRETRAINED_PATH", pretrain / "final.pth", env_extra=ONE_CORE)
    meta = work / "meta.pt"
    meta_run = pool.submit(run_script, "extract_meta.sh", cfg, "OLD_MODEL.WEIGHTS", old_out / "final.pth",
                           "META.TRAIN_LIST", split["files"]["old"], "COMP_LOSS.META_PATH", meta, env_extra=ONE_CORE)
    # the release's name for the step, with the same arguments
    feat_run = pool.submit(run_script, "extract_feat.sh", cfg, "OLD_MODEL.WEIGHTS", old_out / "final.pth",
                           "META.TRAIN_LIST", split["files"]["old"], "COMP_LOSS.META_PATH", work / "meta_feat.pt",
                           env_extra=ONE_CORE)
    proc = meta_run.result()
    feat_run.result()
    return {"work": work, "cfg": cfg, "split": split, "old": old_out, "pretrain": pretrain, "meta": meta,
            "meta_stdout": proc.stdout, "revisited": Path(tiny_synthetic) / "ROxfordParis"}


def train_new(base, method):
    """scripts/train_new.sh for ``method`` ('' = phi*); returns its OUTPUT folder."""
    out = base["work"] / f"new_{method or 'independent'}"
    comp = []
    if method:
        comp = ["COMP_LOSS.TYPE", method, "OLD_MODEL.WEIGHTS", base["old"] / "final.pth",
                "COMP_LOSS.META_PATH", base["meta"]]
    run_script("train_new.sh", base["cfg"], "DATA.TRAIN_LIST", base["split"]["files"]["new"], "OUTPUT", out, *comp,
               env_extra=ONE_CORE)
    return out


@pytest.fixture(scope="module")
def trained(base, pool):
    """Every method's new model, trained once per module, two at a time: ``{method: future of its OUTPUT
    folder}`` (``.result()`` raises what its run raised)."""
    return {method: pool.submit(train_new, base, method) for method in METHOD_TERMS}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_allocation_old_model_and_meta(base):
    split = base["split"]
    _, old_labels = read_image_list(split["files"]["old"])
    _, new_labels = read_image_list(split["files"]["new"])
    n_old, n_new = split["old_classes"], split["new_classes"]
    assert n_old == int(n_new * OLD_RATIO) and n_old > 1
    assert sorted(set(old_labels.tolist())) == list(range(n_old))  # old labels 0..n_old-1
    assert sorted(set(new_labels.tolist())) == list(range(n_new))
    old_state = load(base["old"] / "final.pth")
    assert old_state["num_classes"] == n_old
    # scripts/extract_feat.sh (the release's command) wrote the same meta as scripts/extract_meta.sh
    meta, meta_feat = load(base["meta"]), load(base["work"] / "meta_feat.pt")
    assert meta.keys() == meta_feat.keys() and len(meta) > 1
    for key, value in meta.items():
        assert torch.equal(value, meta_feat[key]) if torch.is_tensor(value) else value == meta_feat[key], key
    # the old model started from the pretrained backbone: two short steps away from it, not from a fresh init
    pre_state = load(base["pretrain"] / "final.pth")
    assert pre_state["num_classes"] == PRESETS["tiny"].pretrain_classes
    assert pre_state["config"]["OUTPUT"] == str(base["pretrain"])
    assert pre_state["config"]["MODEL"]["PRETRAINED"] is False  # from scratch, as pretrain_r18.yml says
    key = "backbone.layer1.0.conv1.weight"
    fresh = torchvision.models.resnet18().layer1[0].conv1.weight.detach()
    moved = (old_state["model"][key] - pre_state["model"][key]).norm()
    assert moved < 0.1 * (fresh - pre_state["model"][key]).norm()
    assert tuple(old_state["model"]["classifier.weight"].shape) == (n_old, EMB)
    meta = load_meta(base["meta"])
    assert meta.num_classes == n_old and meta.embed_dim == EMB
    assert meta.counts.tolist() == torch.bincount(torch.as_tensor(old_labels), minlength=n_old).tolist()
    assert torch.isfinite(meta.centers).all() and (meta.r_max >= meta.r_min).all()
    assert f"meta: {n_old} classes" in base["meta_stdout"]


@pytest.mark.parametrize("method", list(METHOD_TERMS), ids=[m or "independent" for m in METHOD_TERMS])
def test_train_new_method(base, trained, method):
    out = trained[method].result()
    means = epoch_means(out)
    expected = {"cls", "total", *METHOD_TERMS[method]}
    assert expected <= means.keys(), f"{method}: logged {sorted(means)}"
    if not method:
        assert "comp" not in means
    assert all(math.isfinite(v) for v in means.values()), means
    # the logged terms add up (4-decimal log): total = cls + comp, comp = the method's weighted parts
    assert means["total"] == pytest.approx(means["cls"] + means.get("comp", 0.0), abs=3e-4)
    parts = {"bct": lambda m: m["bct"], "unibct": lambda m: m["unibct"], "hot_refresh": lambda m: m["hot_refresh"],
             "l2": lambda m: m["l2"], "lce": lambda m: m["boundary"] + m["alignment"],
             "advbct": lambda m: m["boundary"] + m["adv_weight"] * m["adversarial"]}
    if method:
        assert means["comp"] == pytest.approx(parts[method](means), abs=5e-4)
    if method == "advbct":
        assert means["adv_weight"] == pytest.approx(2.0)  # (E - e + 1)/E with E = 1 epoch, e = 0 (0-based)
    final = load(out / "final.pth")
    assert final["num_classes"] == base["split"]["new_classes"]
    assert tuple(final["model"]["embedding.fc.weight"].shape)[0] == EMB
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())


def test_evaluate_roxford(base, trained):
    """scripts/test.sh: self-test, cross-test and the old model's self-test, each E/M/H in [0, 100]."""
    new = trained["advbct"].result()
    save = base["work"] / "eval"
    proc = run_script("test.sh", "landmark", "roxford5k", base["revisited"], "EVAL.IMG_SIZE", "32",
                      "EVAL.NUM_WORKERS", "0", "EVAL.SAVE_DIR", save,
                      env_extra={"NEW_MODEL_PATH": str(new / "final.pth"),
                                 "OLD_MODEL_PATH": str(base["old"] / "final.pth")})
    result = json.loads((save / "results.json").read_text())
    assert result["dataset"] == "roxford5k"
    for key in ("self_test", "cross_test", "old_self_test"):
        maps = result[key]["mAP"]
        assert set(maps) >= {"easy", "medium", "hard"}
        assert all(0.0 <= maps[p] <= 100.0 for p in ("easy", "medium", "hard")), (key, maps)
    assert "cross-test" in proc.stdout and str(save / "results.json") in proc.stdout


# --------------------------------------------------------------------------------- a timm backbone end to end


CHAIN_SHRINK = ("DATA.IMG_SIZE", "32", "EVAL.IMG_SIZE", "32", "MODEL.EMB_DIM", str(EMB), "TRAIN.EPOCHS", "1",
                "TRAIN.MAX_ITERS_PER_EPOCH", "2", "TRAIN.BATCH_SIZE", "8", "DATA.NUM_WORKERS", "0",
                "EVAL.NUM_WORKERS", "0")


def _writable_copy(tiny, data):
    """DATA with its own gldv2/ folder (the chain's lists are written there), everything else linked."""
    data.mkdir()
    for entry in Path(tiny).iterdir():
        if entry.name == "gldv2":
            (data / "gldv2").mkdir()
            for item in entry.iterdir():
                (data / "gldv2" / item.name).symlink_to(item)
        elif entry.is_file():
            shutil.copy(entry, data / entry.name)
        else:
            (data / entry.name).symlink_to(entry)


def test_a_chain_of_three_bct_generations(base, tiny_synthetic, tmp_path, monkeypatch, capsys):
    """The plan of scripts/reproduce_generations.sh (r18 0.3 -> 0.6 -> 1.0, BCT), its gen1 the old model above
    (trained on the 30 % class list, which is the chain's first list to the byte): what each later generation
    trained on and against, and the matrix (every pair, in the chain's order) with its AC and AM. (The meta steps
    of a method that reads one: tests/pipelines/test_generations_plan.py.)"""
    data, out, pretrain = tmp_path / "data", tmp_path / "out", tmp_path / "pretrain"
    _writable_copy(tiny_synthetic, data)
    (pretrain / "r18").mkdir(parents=True)
    shutil.copy(base["pretrain"] / "final.pth", pretrain / "r18" / "final.pth")
    (out / "gen1").mkdir(parents=True)
    shutil.copy(base["old"] / "final.pth", out / "gen1" / "final.pth")
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("NGPUS", "1")
    chain = resolve_chain("class", ["bct"], parse_chain("r18:0.3,r18:0.6,r18:1.0"), "tiny", str(data),
                          out=str(out), pretrain_root=str(pretrain))
    run_steps(generation_steps(chain, extra=CHAIN_SHRINK))
    console = capsys.readouterr().out
    assert f"[done] gen1 (r18, 0.3 of the class)  ({out}/gen1/final.pth)" in console
    lists = [data / "gldv2" / f"gldv2_train_chain_{s}_class.txt" for s in ("30", "30-60", "30-60-100")]
    assert lists[0].read_text() == Path(base["split"]["files"]["old"]).read_text()

    # what each later generation trained on and against (classes: 12, 24, 40 of tiny's 40)
    runs = [out / "gen1", out / "bct" / "gen2", out / "bct" / "gen3"]
    for k in (1, 2):
        state = load(runs[k] / "final.pth")
        assert state["num_classes"] == (24, 40)[k - 1] and state["config"]["DATA"]["TRAIN_LIST"] == str(lists[k])
        assert state["config"]["OLD_MODEL"]["WEIGHTS"] == str(runs[k - 1] / "final.pth")

    # the matrix of the chain's checkpoints in order, its AC and AM recomputed from its entries
    result = json.loads((out / "bct" / "matrix" / "matrix.json").read_text())
    assert [g["weights"] for g in result["generations"]] == [str(r / "final.pth") for r in runs]
    assert list(result["sets"]) == ["rparis6k", "roxford5k", "gldv2"]
    for entry in result["sets"].values():
        c = entry["matrix"]
        pairs = [(i, j) for i in range(3) for j in range(i)]
        assert all(c[i][j] is None for i in range(3) for j in range(i + 1, 3))
        assert entry["AC"] == pytest.approx(sum(c[i][j] > c[j][j] for i, j in pairs) / 3)
        assert entry["AM"] == pytest.approx(np.mean([c[i][j] for i in range(3) for j in range(i + 1)]))
        assert [(p["query"], p["gallery"]) for p in entry["pairs"]] == [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)]
    summary = json.loads((out / "generations.json").read_text())
    assert summary["methods"]["BCT"]["gldv2"]["AC"] == result["sets"]["gldv2"]["AC"]
    assert os.path.getsize(out / "bct" / "matrix" / "matrix.png") > 0

def run_script_offline(script, *args, env_extra=None):
    """run_script with HF_HUB_OFFLINE=1 (a timm backbone built from random init looks nothing up), on one core."""
    env = dict(os.environ, NGPUS="1", HF_HUB_OFFLINE="1", **ONE_CORE, **(env_extra or {}))
    proc = subprocess.run(["bash", str(REPO / "scripts" / script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    return proc


def run_convnext_chain(tiny_synthetic, tmp_path):
    """timm:convnext_atto from random init through train_old -> extract_meta -> AdvBCT train_new -> test.sh, in
    ``tmp_path``: the class split and the old, new, meta and eval paths."""
    gld = Path(tiny_synthetic) / "gldv2"
    split = make_allocation(str(next(gld.glob("label_*.txt"))), "class", 0.3, out_dir=str(tmp_path / "lists"))
    cfg = tmp_path / "timm.yml"
    cfg.write_text(COMMON_YAML.format(arch="timm:convnext_atto", emb=EMB, root=gld))
    old, new, meta_path, save = tmp_path / "old", tmp_path / "new", tmp_path / "meta.pt", tmp_path / "eval"
    run_script_offline("train_old.sh", cfg, "DATA.TRAIN_LIST", split["files"]["old"], "OUTPUT", old)
    run_script_offline("extract_meta.sh", cfg, "OLD_MODEL.WEIGHTS", old / "final.pth",
                       "META.TRAIN_LIST", split["files"]["old"], "COMP_LOSS.META_PATH", meta_path)
    run_script_offline("train_new.sh", cfg, "DATA.TRAIN_LIST", split["files"]["new"], "OUTPUT", new,
                       "COMP_LOSS.TYPE", "advbct", "OLD_MODEL.WEIGHTS", old / "final.pth",
                       "COMP_LOSS.META_PATH", meta_path)
    arch = {"NEW_MODEL_ARCH": "timm:convnext_atto", "OLD_MODEL_ARCH": "timm:convnext_atto"}
    run_script_offline("test.sh", "landmark", "roxford5k", Path(tiny_synthetic) / "ROxfordParis",
                       "EVAL.IMG_SIZE", "32", "EVAL.NUM_WORKERS", "0", "EVAL.SAVE_DIR", save,
                       env_extra={"NEW_MODEL_PATH": str(new / "final.pth"), "OLD_MODEL_PATH": str(old / "final.pth"),
                                  **arch})
    return {"split": split, "old": old, "new": new, "meta": meta_path, "eval": save}


@pytest.fixture(scope="module")
def convnext_chain(tiny_synthetic, tmp_path_factory, pool):
    """The timm pipeline's scripts as one job of the pool (started by ``base`` where both are selected): the
    future of run_convnext_chain's paths."""
    return pool.submit(run_convnext_chain, tiny_synthetic, tmp_path_factory.mktemp("convnext"))


def test_convnext_old_meta_advbct_new_and_test_sh(tiny_synthetic, convnext_chain):
    """timm:convnext_atto from random init through train_old -> extract_meta -> AdvBCT train_new -> test.sh;
    the cross-test equals the library's recomputation from the two checkpoints."""
    run = convnext_chain.result()
    split, old, new, meta_path, save = run["split"], run["old"], run["new"], run["meta"], run["eval"]
    n_old, n_new = split["old_classes"], split["new_classes"]
    for out, classes in ((old, n_old), (new, n_new)):
        final = torch.load(out / "final.pth", map_location="cpu", weights_only=True)
        assert final["config"]["MODEL"]["ARCH"] == "timm:convnext_atto" and final["num_classes"] == classes
        state = final["model"]
        assert tuple(state["backbone.stem.0.weight"].shape) == (40, 3, 4, 4)  # convnext's 4x4 patchify stem
        assert tuple(state["embedding.fc.weight"].shape) == (EMB, 320)
        assert tuple(state["classifier.weight"].shape) == (classes, EMB)
    meta = load_meta(meta_path)
    _, old_labels = read_image_list(split["files"]["old"])
    assert meta.num_classes == n_old and meta.embed_dim == EMB
    assert meta.counts.tolist() == torch.bincount(torch.as_tensor(old_labels), minlength=n_old).tolist()
    log = [ln for ln in (new / "log.txt").read_text().splitlines() if re.search(r"epoch \d+/\d+ \(", ln)][-1]
    fields = log.split("): ", 1)[1].split()
    terms = {k: float(v) for k, v in zip(fields[::2], fields[1::2])}
    assert {"cls", "comp", "boundary", "adversarial"} <= terms.keys()
    assert all(math.isfinite(v) for v in terms.values())

    result = json.loads((save / "results.json").read_text())
    assert result["new_model"]["arch"] == result["old_model"]["arch"] == "timm:convnext_atto"
    for key in ("self_test", "cross_test", "old_self_test"):
        assert all(0.0 <= result[key]["mAP"][p] <= 100.0 for p in ("easy", "medium", "hard")), result[key]
    test_set = load_test_set("roxford5k", str(Path(tiny_synthetic) / "ROxfordParis"))
    q_ds, g_ds = image_datasets(test_set, ImageInput(32))
    feats = {}
    for name, out in (("new", new), ("old", old)):
        model = load_trained_model("timm:convnext_atto", str(out / "final.pth"), name)
        feats[name] = [extract_features(model, ds, batch_size=64, num_workers=0, progress=False).numpy()
                       for ds in (q_ds, g_ds)]
    for key, (q, g) in (("cross_test", ("new", "old")), ("old_self_test", ("old", "old"))):
        want = score(test_set, feats[q][0], feats[g][1])["mAP"]
        for p in ("easy", "medium", "hard"):
            assert result[key]["mAP"][p] == pytest.approx(want[p], abs=1e-6), (key, p)
