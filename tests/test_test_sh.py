"""scripts/test.sh end to end on the tiny synthetic sets, checked against an in-process recomputation,
and its answers to bad input (exit 2, one line on stderr, no traceback, the culprit named)."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from advbct.config import load_config
from advbct.engine.builders import load_trained_model
from advbct.evaluation.features import extract_features
from advbct.evaluation.protocol import image_datasets, load_test_set
from advbct.models import build_model, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "test.sh"
IMG, BATCH = 32, 64
FAST = ["EVAL.IMG_SIZE", str(IMG), "EVAL.NUM_WORKERS", "0", "EVAL.BATCH_SIZE", str(BATCH)]
SECTIONS = ("self_test", "cross_test", "old_self_test")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Random ResNet-18 models: ``new`` and ``old`` embed to 32 dims (different seeds), ``d16`` to 16."""
    d = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for name, seed, dim in (("new", 0, 32), ("old", 1, 32), ("d16", 2, 16)):
        torch.manual_seed(seed)
        model = build_model("resnet18", embed_dim=dim, pretrained=False)
        paths[name] = str(d / f"{name}.pth")
        save_checkpoint(paths[name], {"model": model.state_dict()})
    return paths


def run_test_sh(dataset, root, new, old, save_dir, *extra, cwd, ngpus=None, script=SCRIPT):
    """scripts/test.sh (or ``script``) with a clean environment (PATH and HOME only, no PYTHONPATH) from
    ``cwd``; ``new`` None leaves NEW_MODEL_PATH unset."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", str(cwd)),
           "OLD_MODEL_PATH": str(old)}
    if new is not None:
        env["NEW_MODEL_PATH"] = str(new)
    if ngpus:
        env["NGPUS"] = str(ngpus)
        env["CUDA_VISIBLE_DEVICES"] = ""  # several CPU processes (gloo), whatever GPUs the machine has
    cmd = ["bash", str(script), "landmark", dataset, str(root), *FAST, "EVAL.SAVE_DIR", str(save_dir), *extra]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=300)
    # decoded by hand: text=True would turn the progress bars' carriage returns into newlines
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def visible_lines(text):
    """What a terminal shows: per line the text after the last carriage return (progress bars that
    tqdm erases leave nothing), blank lines dropped."""
    return [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1].strip()]


def evaluate_saved(dataset, root, query, gallery, tmp_path, tag):
    """Metrics of ``tools/evaluate_features.py`` on features saved as .npy."""
    spec = importlib.util.spec_from_file_location("evaluate_features_tool", REPO / "tools" / "evaluate_features.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    qp, gp, out = (str(tmp_path / f"{tag}_{n}") for n in ("q.npy", "g.npy", "m.json"))
    np.save(qp, query)
    np.save(gp, gallery)
    tool.main(["--dataset", dataset, "--root", str(root), "--query", qp, "--gallery", gp, "--json", out])
    return json.loads(Path(out).read_text())


def recompute(dataset, root, ckpts, tmp_path):
    """Self, cross and old self-test recomputed here: our own extraction, then evaluate_features.py."""
    ts = load_test_set(dataset, str(root))
    q_ds, g_ds = image_datasets(ts, IMG)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the device test.sh uses
    feats = {}
    for name in ("new", "old"):
        model = load_trained_model("resnet18", ckpts[name], name, device=device)
        feats[name] = [extract_features(model, ds, batch_size=BATCH, num_workers=0, progress=False).numpy()
                       for ds in (q_ds, g_ds)]
    return {"self_test": evaluate_saved(dataset, root, feats["new"][0], feats["new"][1], tmp_path, "self"),
            "cross_test": evaluate_saved(dataset, root, feats["new"][0], feats["old"][1], tmp_path, "cross"),
            "old_self_test": evaluate_saved(dataset, root, feats["old"][0], feats["old"][1], tmp_path, "old")}


def flat(metrics):
    """``{"mAP.medium": x, "mP@k.easy.5": y, ...}`` of the numbers evaluate_features.py reports."""
    out = {}
    for key, value in metrics.items():
        if key in ("mAP", "mP@k", "mAP@100"):
            if isinstance(value, dict):
                for k, v in value.items():
                    if isinstance(v, dict):
                        out.update({f"{key}.{k}.{kk}": vv for kk, vv in v.items()})
                    else:
                        out[f"{key}.{k}"] = v
            else:
                out[key] = value
    return out


# ------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("dataset, sub", [("roxford5k", "ROxfordParis"), ("gldv2", "gldv2")])
def test_results_equal_independent_recomputation(tiny_synthetic, ckpts, tmp_path, dataset, sub):
    root = tiny_synthetic / sub
    proc = run_test_sh(dataset, root, ckpts["new"], ckpts["old"], tmp_path / "eval", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["dataset"] == dataset and set(SECTIONS) <= set(result)
    expected = recompute(dataset, root, ckpts, tmp_path)
    for section in SECTIONS:
        got, want = flat(result[section]), flat(expected[section])
        assert set(got) == set(want) and want
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-6), (section, key)
    # the two random models are not the same embedding: cross-test differs from self-test
    assert flat(result["cross_test"]) != pytest.approx(flat(result["self_test"]), abs=1e-3)

    out = proc.stdout
    if dataset == "gldv2":
        for section, label in (("self_test", "self-test"), ("cross_test", "cross-test")):
            assert f"{label}" in out and f"mAP@100 {result[section]['mAP@100']:6.2f}" in out
    else:
        for section, label in (("self_test", "self-test"), ("cross_test", "cross-test")):
            m = result[section]["mAP"]
            line = next(ln for ln in out.splitlines() if ln.startswith(label))
            assert f"E {m['easy']:6.2f}  M {m['medium']:6.2f}  H {m['hard']:6.2f}" in line
    assert f"results: {tmp_path / 'eval' / 'results.json'}" in out


def test_same_checkpoint_gives_cross_equal_self(tiny_synthetic, ckpts, tmp_path):
    proc = run_test_sh("roxford5k", tiny_synthetic / "ROxfordParis", ckpts["new"], ckpts["new"],
                       tmp_path / "eval", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["cross_test"] == result["self_test"] == result["old_self_test"]
    assert 0.0 < result["self_test"]["mAP"]["medium"] <= 100.0


def test_old_sh_prints_the_old_self_test_of_test_sh(tiny_synthetic, ckpts, tmp_path):
    """scripts/test_old.sh (the release's old-model self-test) gives test.sh's "old self" numbers."""
    root = tiny_synthetic / "ROxfordParis"
    both = run_test_sh("roxford5k", root, ckpts["new"], ckpts["old"], tmp_path / "both", cwd=tmp_path)
    alone = run_test_sh("roxford5k", root, None, ckpts["old"], tmp_path / "old", cwd=tmp_path,
                        script=REPO / "scripts" / "test_old.sh")
    assert both.returncode == 0 and alone.returncode == 0, (both.stderr[-2000:], alone.stderr[-2000:])
    full = json.loads((tmp_path / "both" / "results.json").read_text())
    old = json.loads((tmp_path / "old" / "results.json").read_text())
    assert set(SECTIONS) & set(old) == {"self_test"} and old["new_model"]["weights"] == ckpts["old"]
    assert old["self_test"] == full["old_self_test"] and old["self_test"] != full["self_test"]
    numbers = re.compile(r"mAP E +[\d.]+ +M +[\d.]+ +H +[\d.]+")
    old_line = next(ln for ln in both.stdout.splitlines() if ln.startswith("old self"))
    alone_lines = [ln for ln in alone.stdout.splitlines() if numbers.search(ln)]
    assert len(alone_lines) == 1 and numbers.search(alone_lines[0])[0] == numbers.search(old_line)[0]


# -------------------------------------------------------------------------------------- bad input


def assert_user_error(proc, *fragments, dataset_doc=False):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    lines = visible_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0]
    if dataset_doc:
        assert "Dataset.md" in lines[0]
    return lines[0]


@pytest.fixture
def rox_copy(tiny_synthetic, tmp_path):
    """A private copy of the tiny ROxfordParis folder, free to damage."""
    root = tmp_path / "ROxfordParis"
    shutil.copytree(tiny_synthetic / "ROxfordParis", root)
    return root


def test_missing_root(ckpts, tmp_path):
    root = tmp_path / "no_such_root"
    assert_user_error(run_test_sh("roxford5k", root, ckpts["new"], ckpts["old"], tmp_path / "e", cwd=tmp_path),
                      root, dataset_doc=True)


def test_missing_gnd_file(ckpts, tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    assert_user_error(run_test_sh("roxford5k", root, ckpts["new"], ckpts["old"], tmp_path / "e", cwd=tmp_path),
                      root / "gnd_roxford5k.pkl", dataset_doc=True)


def test_missing_image(rox_copy, ckpts, tmp_path):
    victim = Path(load_test_set("roxford5k", str(rox_copy)).gallery_paths[10])
    victim.unlink()
    proc = run_test_sh("roxford5k", rox_copy, ckpts["new"], ckpts["old"], tmp_path / "e", cwd=tmp_path)
    assert_user_error(proc, victim, "image not found", dataset_doc=True)
    assert not (tmp_path / "e" / "results.json").exists()


def test_unreadable_image(rox_copy, ckpts, tmp_path):
    # a gallery image of the second batch, read by a DataLoader worker (its error must stay one line)
    victim = Path(load_test_set("roxford5k", str(rox_copy)).gallery_paths[BATCH + 3])
    victim.write_bytes(b"this is not a jpeg" * 20)
    proc = run_test_sh("roxford5k", rox_copy, ckpts["new"], ckpts["old"], tmp_path / "e",
                       "EVAL.NUM_WORKERS", "1", cwd=tmp_path)
    assert_user_error(proc, victim, "unreadable or corrupt image")
    assert not (tmp_path / "e" / "results.json").exists()


def test_unknown_config_key_names_closest(tiny_synthetic, ckpts, tmp_path):
    proc = run_test_sh("roxford5k", tiny_synthetic / "ROxfordParis", ckpts["new"], ckpts["old"], tmp_path / "e",
                       "EVAL.IMG_SIZ", "32", cwd=tmp_path)
    assert_user_error(proc, "'EVAL.IMG_SIZ'", "EVAL.IMG_SIZE")


def test_embedding_size_mismatch_fails_before_extraction(tiny_synthetic, ckpts, tmp_path):
    proc = run_test_sh("roxford5k", tiny_synthetic / "ROxfordParis", ckpts["new"], ckpts["d16"], tmp_path / "e",
                       cwd=tmp_path)
    assert_user_error(proc, ckpts["new"], ckpts["d16"], "32 dims", "to 16")
    assert "queries" not in proc.stderr and "gallery" not in proc.stderr  # no progress bar: nothing embedded
    assert not (tmp_path / "e").exists()


def test_old_features_cache_on_a_file_fails_before_extraction(tiny_synthetic, ckpts, tmp_path):
    blocker = tmp_path / "cache_is_a_file"
    blocker.write_text("x")
    proc = run_test_sh("roxford5k", tiny_synthetic / "ROxfordParis", ckpts["new"], ckpts["old"], tmp_path / "e",
                       "EVAL.OLD_FEATURES_CACHE", str(blocker), cwd=tmp_path)
    assert_user_error(proc, "EVAL.OLD_FEATURES_CACHE", blocker, "expected a directory")
    assert "queries" not in proc.stderr and "gallery" not in proc.stderr  # nothing embedded
    assert not (tmp_path / "e").exists() and blocker.read_text() == "x"


def test_missing_checkpoint(tiny_synthetic, ckpts, tmp_path):
    absent = tmp_path / "absent.pth"
    proc = run_test_sh("roxford5k", tiny_synthetic / "ROxfordParis", ckpts["new"], absent, tmp_path / "e",
                       cwd=tmp_path)
    assert_user_error(proc, absent, "OLD_MODEL.WEIGHTS")


def test_two_processes_one_line_when_only_rank1_fails(rox_copy, ckpts, tmp_path):
    """NGPUS=2 (torchrun, gloo on CPU): the last gallery image, in rank 1's shard only, is corrupt.
    Both ranks stop, the user sees rank 1's message once, the exit status is 2 (not torchrun's 1)."""
    victim = Path(load_test_set("roxford5k", str(rox_copy)).gallery_paths[-1])
    victim.write_bytes(b"junk" * 50)
    proc = run_test_sh("roxford5k", rox_copy, ckpts["new"], ckpts["old"], tmp_path / "e", cwd=tmp_path,
                       ngpus=2)
    assert_user_error(proc, victim, "unreadable or corrupt image")


# ---------------------------------------------------------------------------- several sets, one process


def test_several_sets_in_one_process_equal_one_run_each(tiny_synthetic, ckpts, tmp_path):
    """``EVAL.DATASET rparis6k,roxford5k,gldv2`` writes, per set, the results.json (and a config.yaml of that
    set alone) that a run on the set alone writes; the models are loaded once."""
    rev, gld = tiny_synthetic / "ROxfordParis", tiny_synthetic / "gldv2"
    extra = ["EVAL.BACKFILL", "true"]
    proc = run_test_sh("rparis6k,roxford5k,gldv2", f"{rev},{rev},{gld}", ckpts["new"], ckpts["old"],
                       tmp_path / "all", *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for dataset, root in (("rparis6k", rev), ("roxford5k", rev), ("gldv2", gld)):
        alone = run_test_sh(dataset, root, ckpts["new"], ckpts["old"], tmp_path / dataset, *extra, cwd=tmp_path)
        assert alone.returncode == 0, alone.stderr[-3000:]
        want = json.loads((tmp_path / dataset / "results.json").read_text())
        got = json.loads((tmp_path / "all" / dataset / "results.json").read_text())
        assert got == want and got["dataset"] == dataset and "backfill" in got
        saved = load_config(str(tmp_path / "all" / dataset / "config.yaml"))
        assert (saved.EVAL.DATASET, saved.EVAL.ROOT) == (dataset, str(root))
        assert saved.EVAL.SAVE_DIR == str(tmp_path / "all" / dataset)
        assert f"results: {tmp_path / 'all' / dataset / 'results.json'}" in proc.stdout
    assert not (tmp_path / "all" / "results.json").exists()


@pytest.mark.parametrize("datasets, roots, fragments", [
    ("rparis6k,oxford", "{rev}", ["EVAL.DATASET", "'oxford'"]),
    ("rparis6k,rparis6k", "{rev}", ["EVAL.DATASET", "named twice"]),
    ("rparis6k,roxford5k,gldv2", "{rev},{gld}", ["EVAL.ROOT", "2 roots for the 3 test sets"]),
    ("rparis6k,gldv2", "{rev},{rev}", ["{rev}", "gldv2"]),     # the second set's root is wrong
])
def test_several_sets_bad_input_fails_before_any_set_is_scored(tiny_synthetic, ckpts, tmp_path, datasets,
                                                               roots, fragments):
    rev, gld = tiny_synthetic / "ROxfordParis", tiny_synthetic / "gldv2"
    fill = {"rev": rev, "gld": gld}
    proc = run_test_sh(datasets, roots.format(**fill), ckpts["new"], ckpts["old"], tmp_path / "e", cwd=tmp_path)
    assert_user_error(proc, *(f.format(**fill) for f in fragments))
    assert "queries" not in proc.stderr and not (tmp_path / "e").exists()   # nothing embedded, nothing written
