"""The pipelines' plans (advbct.pipelines), in process: the steps of the demo, of a table block and of the
ablation block (order, outputs, the release's commands, the old-epoch variant, synthetic vs real roots,
the test sets), and the runner's contracts (skip when done, failure and missing-output lines, one test
process for the missing sets, the data-provenance stamps). Nothing here trains a model."""

import hashlib
import json
import os
import sys

import pytest

from advbct.cli import guarded
from advbct.config import load_config
from advbct.data.synthetic import PRESETS
from advbct.errors import UserError
from advbct.pipelines import (ABLATION_VARIANTS, EvalStep, Note, Stamp, Step, StepFailed, SyntheticList,
                              ablation_steps, block_steps, demo_steps, pretrain_step, resolve_block, run_steps,
                              stamp_outputs, table_steps)
from advbct.pipelines import blocks
from advbct.pipelines.__main__ import main
from helpers import REPO

SETS = ["rparis6k", "roxford5k", "gldv2"]
METHODS = [("bct", "BCT"), ("lce", "LCE"), ("unibct", "UniBCT"), ("hot_refresh", "HotRefresh"), ("advbct", "AdvBCT")]
# the rows after the paper's on a synthetic block: the methods published after AdvBCT that have a block config
LATER = [("mixbct", "MixBCT"), ("bt2", "BT2"), ("fct", "FCT"), ("fct_procrustes", "FCT (Procrustes)")]
LATER_STEPS = ["mixbct (r18)", "bt2 class means (r18)", "bt2 (r18)", "fct transformation (r18)",
               "fct_procrustes transformation (r18)", "test mixbct", "test bt2", "test fct", "test fct_procrustes"]
PY = "PY"


def names(plan):
    """One word per item: a step's name, 'check' / 'stamp' / 'note' for the others."""
    out = []
    for item in plan:
        if isinstance(item, (Step, EvalStep)):
            out.append(item.name)
        else:
            out.append({SyntheticList: "check", Stamp: "stamp", Note: "note"}[type(item)])
    return out


def by_name(plan, name):
    found = [item for item in plan if isinstance(item, (Step, EvalStep)) and item.name == name]
    assert len(found) == 1, name
    return found[0]


@pytest.fixture
def real_root(tmp_path, monkeypatch):
    """A repository root with the real datasets' required files (empty) and the project's configs."""
    for name in ("configs", "scripts"):
        (tmp_path / name).symlink_to(REPO / name)
    for need in ("data/GLDv2/label_81313.txt", "data/GLDv2/gldv2_private_query_gt.txt",
                 "data/ROxfordParis/gnd_roxford5k.pkl", "data/ROxfordParis/gnd_rparis6k.pkl"):
        (tmp_path / need).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / need).write_text("a.jpg 0\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


# ---------------------------------------------------------------------------------------- the demo
def test_demo_plan(repo_root):
    plan = demo_steps("tiny", python=PY)
    assert names(plan) == [
        "1/9 synthetic benchmark (tiny)", "check", "stamp",
        "2/9 pretrain backbone (r18, ./data/synthetic-tiny/pretrain)",
        "3/9 class split (30 % old)", "4/9 train old model (R18, 30 % of classes)", "5/9 old-class meta",
        "6/9 train phi* (no compatibility)", "7/9 train AdvBCT new model", "8/9 test independent",
        "8/9 test advbct", "9/9 table"]
    d, o = "./data/synthetic-tiny", "./output/demo"
    syn = ["DATA.ROOT", f"{d}/gldv2", "DATA.TRAIN_LIST", f"{d}/gldv2/gldv2_train_new_100percent_class.txt",
           "META.TRAIN_LIST", f"{d}/gldv2/gldv2_train_old_30percent_class.txt", "EVAL.ROOT", f"{d}/ROxfordParis"]
    init = ["MODEL.PRETRAINED_PATH", f"{o}/pretrain/final.pth"]
    compat = ["OLD_MODEL.WEIGHTS", f"{o}/old/final.pth", "COMP_LOSS.META_PATH", f"{o}/old/meta.pt"]
    cfg = "configs/synthetic/class_r18"
    expected = {  # name: (output, command, log) as scripts/demo.sh has always built them
        "1/9 synthetic benchmark (tiny)": (f"{d}/SYNTHETIC.json", [PY, "tools/make_synthetic.py", "--out", d,
                                                                  "--preset", "tiny"], f"{o}/logs/synthetic.log"),
        "2/9 pretrain backbone (r18, ./data/synthetic-tiny/pretrain)": (
            f"{o}/pretrain/final.pth", ["bash", "scripts/train_new.sh", "configs/synthetic/pretrain_r18.yml",
                                        "DATA.ROOT", f"{d}/pretrain", "DATA.TRAIN_LIST",
                                        f"{d}/pretrain/train_list.txt", "OUTPUT", f"{o}/pretrain"],
            f"{o}/logs/pretrain.log"),
        "3/9 class split (30 % old)": (f"{d}/gldv2/gldv2_train_new_100percent_class.txt",
                                       [PY, "tools/split_dataset.py", "--list", SyntheticList(d), "--by", "class",
                                        "--ratio", "0.3"], f"{o}/logs/split.log"),
        "4/9 train old model (R18, 30 % of classes)": (
            f"{o}/old/final.pth", ["bash", "scripts/train_old.sh", f"{cfg}/old.yml", *syn, *init, "DATA.TRAIN_LIST",
                                   f"{d}/gldv2/gldv2_train_old_30percent_class.txt", "OUTPUT", f"{o}/old"],
            f"{o}/logs/old.log"),
        "5/9 old-class meta": (f"{o}/old/meta.pt", ["bash", "scripts/extract_meta.sh", f"{cfg}/advbct.yml", *syn,
                                                    *compat], f"{o}/logs/meta.log"),
        "6/9 train phi* (no compatibility)": (
            f"{o}/independent/final.pth", ["bash", "scripts/train_new.sh", f"{cfg}/independent.yml", *syn, *init,
                                           "OUTPUT", f"{o}/independent"], f"{o}/logs/independent.log"),
        "7/9 train AdvBCT new model": (
            f"{o}/advbct/final.pth", ["bash", "scripts/train_new.sh", f"{cfg}/advbct.yml", *syn, *init, *compat,
                                      "OUTPUT", f"{o}/advbct"], f"{o}/logs/advbct.log"),
    }
    for name, (output, command, log) in expected.items():
        step = by_name(plan, name)
        assert (step.output, list(step.command), step.log, step.env) == (output, command, log, {}), name
    assert plan[1] == SyntheticList(d) and plan[2] == Stamp(f"{d}/SYNTHETIC.json", (o,))
    for model in ("independent", "advbct"):
        ev = by_name(plan, f"8/9 test {model}")
        assert (ev.new, ev.arch, ev.old, ev.eval_dir, ev.log) == (f"{o}/{model}/final.pth", "resnet18",
                                                                  f"{o}/old/final.pth", f"{o}/eval/{model}",
                                                                  f"{o}/logs/test_{model}.log")
        step = ev.step(missing=SETS)
        assert list(step.command) == [
            "bash", "scripts/test.sh", "landmark", "rparis6k,roxford5k,gldv2",
            f"{d}/ROxfordParis,{d}/ROxfordParis,{d}/gldv2", "EVAL.IMG_SIZE", "64", "EVAL.NUM_WORKERS", "1",
            "EVAL.BATCH_SIZE", "128", "EVAL.BACKFILL", "true", "EVAL.OLD_FEATURES_CACHE", f"{o}/eval/old_features",
            "EVAL.SAVE_DIR", f"{o}/eval/{model}"]
        assert step.env == {"NEW_MODEL_PATH": f"{o}/{model}/final.pth", "OLD_MODEL_PATH": f"{o}/old/final.pth",
                            "NEW_MODEL_ARCH": "resnet18"}
        assert (step.name, step.output) == (f"8/9 test {model} on rparis6k,roxford5k,gldv2",
                                            f"{o}/eval/{model}/gldv2/results.json")
    table = plan[-1]
    assert (table.output, table.log) == (None, None)
    assert list(table.command) == [
        PY, "tools/collect_results.py", "--independent", f"{o}/eval/independent", "--method", f"AdvBCT={o}/eval/advbct",
        "--block", "class", "--description", "synthetic (tiny) extended-class: old R18 on 30 % of the classes, new R18",
        "--out", f"{o}/table.json", "--markdown", f"{o}/table.md", "--criterion"]


def test_demo_plan_follows_its_data_and_output_folders(repo_root):
    plan = demo_steps("small", data="/d", out="/o")
    assert plan[0].command[0] == sys.executable and plan[0].command[2:] == ("--out", "/d", "--preset", "small")
    assert plan[2] == Stamp("/d/SYNTHETIC.json", ("/o",))
    assert by_name(plan, "8/9 test advbct").roots == ("/d/ROxfordParis", "/d/ROxfordParis", "/d/gldv2")
    assert demo_steps("small")[0].output == "./data/synthetic-small/SYNTHETIC.json"


# ------------------------------------------------------------------------------------- table blocks
def test_synthetic_table_block_plan(repo_root):
    plan = block_steps("class", "r18", preset="tiny", python=PY)
    d, o = "./data/synthetic-tiny", "./output/reproduce/class_r18_synthetic-tiny"
    old = "./output/reproduce/old_class_synthetic-tiny"
    pre = "./output/reproduce/pretrain_synthetic-tiny"
    assert names(plan) == [
        "synthetic benchmark (tiny)", "check", "stamp", "pretrain backbone (r18, ./data/synthetic-tiny/pretrain)",
        "split by class (30 % old)", "old model (R18, class allocation)", "old-class meta", "phi* (r18)",
        "bct (r18)", "lce (r18)", "unibct (r18)", "hot_refresh (r18)", "advbct (r18)",
        "test independent", "test bct", "test lce", "test unibct", "test hot_refresh", "test advbct",
        *LATER_STEPS, "table", None]
    assert plan[2] == Stamp(f"{d}/SYNTHETIC.json", (pre, old, o))
    syn = ["DATA.ROOT", f"{d}/gldv2", "DATA.TRAIN_LIST", f"{d}/gldv2/gldv2_train_new_100percent_class.txt",
           "META.TRAIN_LIST", f"{d}/gldv2/gldv2_train_old_30percent_class.txt", "EVAL.ROOT", f"{d}/ROxfordParis"]
    step = by_name(plan, "split by class (30 % old)")
    assert (step.output, list(step.command)) == (f"{d}/gldv2/gldv2_train_new_100percent_class.txt",
                                                 [PY, "tools/split_dataset.py", "--list", SyntheticList(d), "--by",
                                                  "class", "--ratio", "0.3"])
    step = by_name(plan, "old model (R18, class allocation)")
    assert (step.output, step.log) == (f"{old}/final.pth", f"{o}/logs/old.log")
    assert list(step.command) == ["bash", "scripts/train_old.sh", "configs/synthetic/class_r18/old.yml", *syn,
                                  "MODEL.PRETRAINED_PATH", f"{pre}/r18/final.pth", "DATA.TRAIN_LIST",
                                  f"{d}/gldv2/gldv2_train_old_30percent_class.txt", "OUTPUT", old]
    compat = ["OLD_MODEL.WEIGHTS", f"{old}/final.pth", "COMP_LOSS.META_PATH", f"{old}/meta.pt"]
    step = by_name(plan, "old-class meta")
    assert step.output == f"{old}/meta.pt"
    assert list(step.command) == ["bash", "scripts/extract_meta.sh", "configs/synthetic/class_r18/advbct.yml", *syn,
                                  *compat]
    step = by_name(plan, "hot_refresh (r18)")
    assert (step.output, step.log) == (f"{o}/hot_refresh/final.pth", f"{o}/logs/hot_refresh.log")
    assert list(step.command) == ["bash", "scripts/train_new.sh", "configs/synthetic/class_r18/hot_refresh.yml", *syn,
                                  "MODEL.PRETRAINED_PATH", f"{pre}/r18/final.pth", *compat,
                                  "OUTPUT", f"{o}/hot_refresh"]
    ev = by_name(plan, "test lce")
    assert (ev.test_sets, ev.roots) == (tuple(SETS), (f"{d}/ROxfordParis", f"{d}/ROxfordParis", f"{d}/gldv2"))
    assert list(ev.options) == ["EVAL.IMG_SIZE", "64", "EVAL.NUM_WORKERS", "1", "EVAL.BATCH_SIZE", "128",
                                "OLD_MODEL.ARCH", "resnet18", "EVAL.BACKFILL", "true",
                                "EVAL.BACKFILL_UNITS", "[image,batch,most_changed]",
                                "EVAL.OLD_FEATURES_CACHE", f"{o}/eval/old_features"]
    # after the paper's rows: FCT's new model is phi* (no term, no old model: not trained again); both of its
    # transformations are fitted on phi* and each row is tested with its own
    fit = by_name(plan, "fct_procrustes transformation (r18)")
    assert (fit.output, list(fit.command)) == (f"{o}/fct_procrustes/transformation.pth", [
        "bash", "scripts/train_transformation.sh", "configs/synthetic/class_r18/fct_procrustes.yml", *syn, *compat,
        "NEW_MODEL.WEIGHTS", f"{o}/independent/final.pth", "NEW_MODEL.ARCH", "resnet18", "OUTPUT",
        f"{o}/fct_procrustes"])
    ev = by_name(plan, "test fct_procrustes")
    assert (ev.new, ev.eval_dir) == (f"{o}/independent/final.pth", f"{o}/eval/fct_procrustes")
    assert list(by_name(plan, "test fct").options[-2:]) == ["EVAL.OLD_TRANSFORM", f"{o}/fct/transformation.pth"]
    assert list(ev.options[-2:]) == ["EVAL.OLD_TRANSFORM", f"{o}/fct_procrustes/transformation.pth"]
    assert "EVAL.OLD_TRANSFORM" not in by_name(plan, "test mixbct").options
    # BT²: the old model's class means over the new training list (DATA.TRAIN_LIST), then phi* as its teacher
    means = by_name(plan, "bt2 class means (r18)")
    assert (means.output, list(means.command)) == (f"{o}/bt2_meta.pt", [
        "bash", "scripts/extract_meta.sh", "configs/synthetic/class_r18/bt2.yml", *syn, *compat,
        "COMP_LOSS.META_PATH", f"{o}/bt2_meta.pt"])
    step = by_name(plan, "bt2 (r18)")
    assert list(step.command) == ["bash", "scripts/train_new.sh", "configs/synthetic/class_r18/bt2.yml", *syn,
                                  "MODEL.PRETRAINED_PATH", f"{pre}/r18/final.pth", *compat,
                                  "COMP_LOSS.META_PATH", f"{o}/bt2_meta.pt",
                                  "COMP_LOSS.BT2_TEACHER", f"{o}/independent/final.pth", "OUTPUT", f"{o}/bt2"]
    cfg = load_config("configs/synthetic/class_r18/bt2.yml", list(step.command[3:]))
    assert (cfg.COMP_LOSS.META_PATH, cfg.COMP_LOSS.BT2_TEACHER) == (f"{o}/bt2_meta.pt", f"{o}/independent/final.pth")
    ev = by_name(plan, "test bt2")
    assert (ev.new, "EVAL.OLD_TRANSFORM" in ev.options) == (f"{o}/bt2/final.pth", False)
    table, plot = plan[-2:]
    assert list(table.command) == [
        PY, "tools/collect_results.py", "--independent", f"{o}/eval/independent",
        *[a for m, label in METHODS + LATER for a in ("--method", f"{label}={o}/eval/{m}")], "--block", "class",
        "--description", "class_r18_synthetic-tiny", "--out", f"{o}/table.json", "--markdown", f"{o}/table.md",
        "--criterion"]
    assert list(plot.command) == [PY, "tools/plot_backfill.py", "--eval-dir", f"{o}/eval", "--out", f"{o}/backfill"]
    assert (plot.name, plot.output) == (None, None)


@pytest.mark.parametrize("alloc, backbone", [("data", "r18"), ("class", "r18"), ("data", "r50"), ("class", "r50")])
def test_every_method_and_test_set_appears_once(repo_root, alloc, backbone):
    plan = block_steps(alloc, backbone, preset="tiny")
    trained = [s.name for s in plan if isinstance(s, Step) and s.command[:2] == ("bash", "scripts/train_new.sh")]
    pretrains = ["pretrain backbone (r18, ./data/synthetic-tiny/pretrain)"]
    if backbone == "r50":
        pretrains.append("pretrain backbone (r50, ./data/synthetic-tiny/pretrain)")
    later = ["mixbct", "bt2"]  # FCT's rows reuse phi*
    assert trained == [*pretrains, f"phi* ({backbone})", *[f"{m} ({backbone})" for m, _ in METHODS],
                       *[f"{m} ({backbone})" for m in later]]
    tests = [s for s in plan if isinstance(s, EvalStep)]
    assert [s.name for s in tests] == ["test independent", *[f"test {m}" for m, _ in METHODS + LATER]]
    assert all(list(s.test_sets) == SETS for s in tests)
    arch = {"r18": "resnet18", "r50": "resnet50"}[backbone]
    assert {(s.arch, s.options[s.options.index("OLD_MODEL.ARCH") + 1]) for s in tests} == {(arch, "resnet18")}
    table = plan[-2].command
    labels = [table[i + 1].split("=")[0] for i, a in enumerate(table) if a == "--method"]
    assert labels == [label for _, label in METHODS + LATER]
    assert table[table.index("--block") + 1] == (alloc if backbone == "r18" else f"backbone-{alloc}")
    block = resolve_block(alloc, backbone, "tiny")
    for m, _ in METHODS:  # each row's config is the block's, against the block's old model and meta
        cfg = load_config(f"configs/synthetic/{alloc}_{backbone}/{m}.yml", list(block.compat))
        assert cfg.COMP_LOSS.TYPE == m and cfg.OLD_MODEL.WEIGHTS == block.old and cfg.COMP_LOSS.META_PATH == block.meta


def test_synthetic_r50_block_pretrains_both_backbones_and_shares_the_old_model(repo_root):
    plan = block_steps("data", "r50", preset="small", data="/bench")
    pre = "./output/reproduce/pretrain_synthetic-small"
    r18, r50 = (by_name(plan, f"pretrain backbone ({bb}, /bench/pretrain)") for bb in ("r18", "r50"))
    assert (r18.output, r50.output) == (f"{pre}/r18/final.pth", f"{pre}/r50/final.pth")
    assert r50.command[2] == "configs/synthetic/pretrain_r50.yml"
    assert r50.log == "./output/reproduce/data_r50_synthetic-small/logs/pretrain_r50.log"
    old = by_name(plan, "old model (R18, data allocation)")
    assert old.output == "./output/reproduce/old_data_synthetic-small/final.pth"
    assert old.command[2] == "configs/synthetic/data_r18/old.yml"
    assert old.command[old.command.index("MODEL.PRETRAINED_PATH") + 1] == f"{pre}/r18/final.pth"
    phi = by_name(plan, "phi* (r50)")
    assert phi.command[phi.command.index("MODEL.PRETRAINED_PATH") + 1] == f"{pre}/r50/final.pth"
    assert phi.command[2] == "configs/synthetic/data_r50/independent.yml"


def test_real_block_plan(real_root):
    plan = block_steps("data", "r50", python=PY)
    o, old = "./output/reproduce/data_r50", "./output/reproduce/old_data"
    assert names(plan)[:6] == ["stamp", "split by data (30 % old)", "old model (R18, data allocation)",
                               "old-class meta", "phi* (r50)", "bct (r50)"]
    assert plan[0] == Stamp("./data/GLDv2/label_81313.txt", (old, o))
    step = by_name(plan, "split by data (30 % old)")
    assert (step.output, list(step.command), step.log) == (
        "./data/GLDv2/gldv2_train_new_100percent_data.txt",
        [PY, "tools/split_dataset.py", "--list", "./data/GLDv2/label_81313.txt", "--by", "data", "--ratio", "0.3"],
        f"{o}/logs/split.log")
    step = by_name(plan, "old model (R18, data allocation)")
    assert list(step.command) == ["bash", "scripts/train_old.sh", "configs/gldv2/data_r18/old.yml", "DATA.TRAIN_LIST",
                                  "./data/GLDv2/gldv2_train_old_30percent_data.txt", "OUTPUT", old]
    step = by_name(plan, "advbct (r50)")
    assert list(step.command) == ["bash", "scripts/train_new.sh", "configs/gldv2/data_r50/advbct.yml",
                                  "OLD_MODEL.WEIGHTS", f"{old}/final.pth", "COMP_LOSS.META_PATH", f"{old}/meta.pt",
                                  "OUTPUT", f"{o}/advbct"]
    ev = by_name(plan, "test advbct")
    assert ev.roots == ("./data/ROxfordParis", "./data/ROxfordParis", "./data/GLDv2")
    assert (ev.arch, list(ev.options)) == ("timm:resnet50.a1_in1k", [
        "OLD_MODEL.ARCH", "timm:resnet18.tv_in1k", "EVAL.BACKFILL", "true",
        "EVAL.BACKFILL_UNITS", "[image,batch,most_changed]", "EVAL.OLD_FEATURES_CACHE", f"{o}/eval/old_features"])
    step = ev.step(missing=["gldv2"])  # one set alone: its own folder is SAVE_DIR
    assert list(step.command[3:5]) == ["gldv2", "./data/GLDv2"] and step.command[-1] == f"{o}/eval/advbct/gldv2"
    table = plan[-2].command
    assert table[table.index("--block") + 1] == "backbone-data" and "--reference" not in table
    assert table[table.index("--description") + 1] == "data_r50"


def test_real_block_compares_with_the_paper_when_its_table_is_there(real_root, tmp_path):
    (tmp_path.parent / "shared" / "data").mkdir(parents=True, exist_ok=True)
    (tmp_path.parent / "shared" / "data" / "paper_table.json").write_text("{}")
    try:
        table = table_steps(resolve_block("class", "r18"))[-2].command
        assert table[-2:] == ("--reference", "../shared/data/paper_table.json")
        # the synthetic blocks have no paper numbers to stand beside
        synthetic = table_steps(resolve_block("class", "r18", "tiny"))[-2].command
        assert "--reference" not in synthetic
    finally:
        (tmp_path.parent / "shared" / "data" / "paper_table.json").unlink()


@pytest.mark.parametrize("epoch, old, meta, out", [
    (None, "final.pth", "meta.pt", "class_r50"),
    ("30", "final.pth", "meta.pt", "class_r50"),   # the last epoch is the final model
    ("10", "epoch_10.pth", "meta_epoch10.pt", "class_r50_old-epoch10"),
])
def test_old_epoch_variant(real_root, epoch, old, meta, out):
    plan = block_steps("class", "r50", old_epoch=epoch)
    o, old_dir = f"./output/reproduce/{out}", "./output/reproduce/old_class"
    assert plan[0] == Stamp("./data/GLDv2/label_81313.txt", (old_dir, o))
    # the old model is trained once, in its shared folder, whatever epoch the block uses
    assert by_name(plan, "old model (R18, class allocation)").output == f"{old_dir}/final.pth"
    meta_step = by_name(plan, "old-class meta")
    compat = ("OLD_MODEL.WEIGHTS", f"{old_dir}/{old}", "COMP_LOSS.META_PATH", f"{old_dir}/{meta}")
    assert meta_step.output == f"{old_dir}/{meta}" and meta_step.command[-4:] == compat
    for m, _ in METHODS:
        step = by_name(plan, f"{m} (r50)")
        assert step.output == f"{o}/{m}/final.pth" and step.command[-6:-2] == compat
    assert {s.old for s in plan if isinstance(s, EvalStep)} == {f"{old_dir}/{old}"}
    assert plan[-2].command[plan[-2].command.index("--description") + 1] == "class_r50"


# ---------------------------------------------------------------------------------------- ablations
def test_ablation_variants():
    assert [n for n, _, _ in ABLATION_VARIANTS] == ["advbct", "advbct_no_adv", "advbct_no_elastic", "advbct_T0.4",
                                                    "advbct_T0.6", "advbct_T0.8", "advbct_T1.0", "advbct_T1.2"]
    for name, label, overrides in ABLATION_VARIANTS:
        assert label and "=" not in label, name  # collect_results.py's --method LABEL=FOLDER
        if name.startswith("advbct_T"):  # the row's name, label and override agree on T
            t = name[len("advbct_T"):]
            assert label == f"T {t}" and overrides == ("COMP_LOSS.THRESHOLD", t)


def test_synthetic_ablation_plan_reuses_the_blocks_advbct(repo_root):
    plan = ablation_steps(resolve_block("class", "r18", "tiny"), python=PY)
    o = "./output/reproduce/class_r18_synthetic-tiny"
    assert names(plan)[:8] == ["synthetic benchmark (tiny)", "check", "stamp",
                               "pretrain backbone (r18, ./data/synthetic-tiny/pretrain)", "split by class (30 % old)",
                               "old model (R18, class allocation)", "old-class meta", "phi* (r18)"]
    rows = names(plan)[8:]
    # the T row of the block config's own threshold is the block's AdvBCT model, neither trained nor tested again
    threshold = load_config("configs/synthetic/class_r18/advbct.yml").COMP_LOSS.THRESHOLD
    same = [n for n, _, o in ABLATION_VARIANTS if o[:1] == ("COMP_LOSS.THRESHOLD",) and float(o[1]) == threshold]
    assert len(same) == 1   # the synthetic configs' threshold is one of the ablation's
    want = []
    for name, _, _ in ABLATION_VARIANTS:
        want += ["note"] if name in same else [f"{name} (r18)", f"test {name}"]
    assert rows == want + ["test independent", "ablation table"]
    assert plan[8 + rows.index("note")] == Note(f"[same] {same[0]} (r18) is the block's AdvBCT: "
                                                f"reusing {o}/eval/advbct")
    table_plan = table_steps(resolve_block("class", "r18", "tiny"), PY)
    assert by_name(plan, "advbct (r18)") == by_name(table_plan, "advbct (r18)")
    step = by_name(plan, "advbct_no_elastic (r18)")
    assert step.command[2] == "configs/synthetic/class_r18/advbct.yml"
    assert step.command[-6:] == ("COMP_LOSS.META_PATH", "./output/reproduce/old_class_synthetic-tiny/meta.pt",
                                 "COMP_LOSS.ELASTIC", "false", "OUTPUT", f"{o}/advbct_no_elastic")
    table = plan[-1].command
    assert [table[i + 1] for i, a in enumerate(table) if a == "--method"] == [
        f"{label}={o}/eval/{'advbct' if name in same else name}" for name, label, _ in ABLATION_VARIANTS]
    assert table[table.index("--block") + 1:table.index("--block") + 4] == (
        "ablation-class_r18", "--description", "AdvBCT ablations, class_r18_synthetic-tiny")
    assert table[-5:] == ("--out", f"{o}/ablation.json", "--markdown", f"{o}/ablation.md", "--criterion")
    assert table[:4] == (PY, "tools/collect_results.py", "--independent", f"{o}/eval/independent")


def test_real_ablation_reuses_the_T_of_the_gldv2_configs(real_root):
    plan = block_steps("data", "r18", kind="ablation")
    notes = [item.text for item in plan if isinstance(item, Note)]
    assert notes == ["[same] advbct_T1.0 (r18) is the block's AdvBCT: reusing ./output/reproduce/data_r18/eval/advbct"]
    assert "advbct_T0.4 (r18)" in names(plan) and "advbct_T1.0 (r18)" not in names(plan)


# --------------------------------------------------------------------------------- block arguments
@pytest.mark.parametrize("argv, message", [
    (["foo", "r18"], "unknown allocation 'foo' (expected data or class)"),
    (["class", "r34"], "unknown backbone 'r34' (expected r18 or r50)"),
    (["foo", "r18", "--fast"], f"unknown argument '--fast'; {blocks.TABLE_USAGE}"),
    (["class", "r18", "extra"], f"unknown argument 'extra'; {blocks.TABLE_USAGE}"),
    (["class", "r18", "--synthetic"], "--synthetic needs a preset (tiny, small, medium)"),
    (["class", "r18", "--old-epoch", ""], "--old-epoch needs an epoch (e.g. 10, as the release)"),
])
def test_block_argument_errors(argv, message):
    with pytest.raises(UserError) as exc:
        blocks.parse_block_args(argv)
    assert str(exc.value) == message


def test_block_arguments():
    assert blocks.parse_block_args(["data", "r50"]) == ("data", "r50", None, None)
    assert blocks.parse_block_args(["class", "r18", "--old-epoch", "10", "--synthetic", "tiny"]) == \
        ("class", "r18", "tiny", "10")
    with pytest.raises(blocks.UsageError):
        blocks.parse_block_args(["class"])


def test_command_line_usage_and_refusals(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["table"]) == 2
    assert capsys.readouterr().err == blocks.TABLE_USAGE + "\n"
    assert main(["ablation", "class"]) == 2
    assert capsys.readouterr().err == blocks.ABLATION_USAGE + "\n"
    assert main([]) == 2 and capsys.readouterr().err.startswith("usage: python -m advbct.pipelines")
    with pytest.raises(SystemExit) as exc:
        main(["ablation", "data", "r18", "--synthetic", "tiny", "--old-epoch", "12"])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        "error: --old-epoch 12: the old model (configs/synthetic/data_r18/old.yml) keeps the checkpoints of epochs "
        "3 (TRAIN.SAVE_FREQ 100, TRAIN.EPOCHS 3)\n")
    monkeypatch.chdir(tmp_path)  # not the repository root: refused before any step
    with pytest.raises(SystemExit) as exc:
        main(["table", "class", "r18", "--synthetic", "tiny"])
    assert exc.value.code == 2 and "is not the repository root" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ running
def test_run_steps_skips_completed_and_stops_on_failure(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    first = Step("first", "out/a.txt", ["bash", "-c", "echo one >> count.txt; echo done > out/a.txt"], "logs/first.log")
    plan = [first, first,
            Step("second", "out/b.txt", ["bash", "-c", "echo boom; echo to-stderr >&2; exit 7"], "logs/second.log"),
            Step("never", "out/n.txt", ["bash", "-c", "echo never >> count.txt"], "logs/never.log")]
    with pytest.raises(SystemExit) as exc:
        guarded(run_steps)(plan)
    assert exc.value.code == 1
    out, err = capfd.readouterr()
    assert out == ("[run]  first  (log: logs/first.log)\n[done] first  (out/a.txt)\n"
                   "[run]  second  (log: logs/second.log)\nboom\nto-stderr\n")
    assert err == "error: step 'second' failed; log: logs/second.log\n"
    assert (tmp_path / "count.txt").read_text() == "one\n"        # the completed step ran once
    assert (tmp_path / "logs" / "second.log").read_text() == "boom\nto-stderr\n"  # output shown and kept
    assert (tmp_path / "out" / "a.txt").read_text() == "done\n"   # earlier output intact
    # a step that "succeeds" without writing its output is an error too
    with pytest.raises(StepFailed) as exc:
        run_steps([Step("third", "out/c.txt", ["true"], "logs/third.log")])
    assert str(exc.value) == "step 'third' ended without writing out/c.txt; log: logs/third.log"
    assert exc.value.exit_code == 1
    # a command that cannot start fails its step the same way
    with pytest.raises(StepFailed, match="^step 'fourth' failed; log: logs/fourth.log$"):
        run_steps([Step("fourth", "out/d.txt", ["./no-such-program"], "logs/fourth.log")])


def test_steps_without_output_always_run_and_notes_print(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    plan = [Note("[same] a note"),
            Step("table", None, ["bash", "-c", "echo made >> t.txt; echo $SETTING"], env={"SETTING": "on"}),
            Step(None, None, ["bash", "-c", "echo quiet"])]
    run_steps(plan)
    run_steps(plan)
    assert (tmp_path / "t.txt").read_text() == "made\nmade\n"
    assert capfd.readouterr().out == "[same] a note\n[run]  table\non\nquiet\n" * 2
    with pytest.raises(SystemExit) as exc:  # a failing final step ends the run with its exit status
        run_steps([Step("table", None, ["bash", "-c", "exit 3"]), Note("unreachable")])
    assert exc.value.code == 3 and "unreachable" not in capfd.readouterr().out


def test_eval_step_runs_only_the_missing_sets_in_one_call(tmp_path, monkeypatch, capfd):
    """The sets without results.json go to scripts/test.sh at once (one root per set, the eval folder as
    SAVE_DIR); a single missing set gets its own folder; nothing missing, no call."""
    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "scripts" / "test.sh"
    fake.parent.mkdir()
    # the stand-in records its arguments and writes the results.json files a real run would
    fake.write_text('echo "$NEW_MODEL_PATH $OLD_MODEL_PATH $NEW_MODEL_ARCH $*" >> calls.txt\n'
                    'save="${@: -1}"; IFS=, read -r -a sets <<<"$2"\n'
                    'if [[ ${#sets[@]} -eq 1 ]]; then mkdir -p "$save"; touch "$save/results.json"\n'
                    'else for s in "${sets[@]}"; do mkdir -p "$save/$s"; touch "$save/$s/results.json"; done; fi\n')
    step = EvalStep("test m", "new.pth", "resnet50", "old.pth", "ev", "logs/t.log", SETS, ["REV", "REV", "GLD"],
                    ["EVAL.BACKFILL", "true"])
    (tmp_path / "ev" / "rparis6k").mkdir(parents=True)
    (tmp_path / "ev" / "rparis6k" / "results.json").write_text("{}")
    run_steps([step])
    assert "[run]  test m on roxford5k,gldv2  (log: logs/t.log)" in capfd.readouterr().out
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls == ["new.pth old.pth resnet50 landmark roxford5k,gldv2 REV,GLD EVAL.BACKFILL true EVAL.SAVE_DIR ev"]
    (tmp_path / "ev" / "gldv2" / "results.json").unlink()
    run_steps([step])
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[1] == "new.pth old.pth resnet50 landmark gldv2 GLD EVAL.BACKFILL true EVAL.SAVE_DIR ev/gldv2"
    capfd.readouterr()
    run_steps([step])
    assert capfd.readouterr().out == "[done] test m  (ev/{rparis6k,roxford5k,gldv2}/results.json)\n"
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 2   # nothing left to run: no third call


def test_pretrain_step_takes_extra_overrides():
    step = pretrain_step("r50", "/d", "/p", "/l.log", "TRAIN.EPOCHS", "1", prefix="2/9 ")
    assert step.name == "2/9 pretrain backbone (r50, /d/pretrain)" and step.output == "/p/final.pth"
    assert list(step.command) == ["bash", "scripts/train_new.sh", "configs/synthetic/pretrain_r50.yml", "DATA.ROOT",
                                  "/d/pretrain", "DATA.TRAIN_LIST", "/d/pretrain/train_list.txt", "OUTPUT", "/p",
                                  "TRAIN.EPOCHS", "1"]


# ------------------------------------------------------------------------------ benchmark and stamps
@pytest.mark.slow
def test_synthetic_list_reads_the_benchmark_and_refuses_a_stale_one(tiny_synthetic, tmp_path, capsys):
    full_list = f"{tiny_synthetic}/gldv2/label_{PRESETS['tiny'].train_classes}.txt"
    assert SyntheticList(str(tiny_synthetic)).resolve() == full_list
    step = Step("split", "out", ["x", "--list", SyntheticList(str(tiny_synthetic))])
    assert step.argv() == ["x", "--list", full_list]
    # a benchmark of format 1 (no pretrain/) stops the run where the plan checks it, in one line
    (tmp_path / "SYNTHETIC.json").write_text(json.dumps({"format_version": 1, "preset": "small"}))
    with pytest.raises(SystemExit) as exc:
        guarded(run_steps)([SyntheticList(str(tmp_path)), Note("reached")])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "reached" not in captured.out and captured.err.count("\n") == 1
    assert "format version 1, this code needs 2" in captured.err
    assert f"make_synthetic.py --out {tmp_path} --preset small --overwrite" in captured.err


def test_stamp_outputs_keys_output_dirs_on_their_benchmark(tmp_path, monkeypatch, capsys):
    """Outputs built from one benchmark are reused with it and refused, intact, after it changed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SYNTHETIC.json").write_text('{"preset": "small", "train_classes": 2000}\n')
    digest = hashlib.sha256((tmp_path / "SYNTHETIC.json").read_bytes()).hexdigest()
    (tmp_path / "fresh" / "logs").mkdir(parents=True)          # only a log: a fresh block, no note
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "final.pth").write_text("weights")      # outputs made before stamps existed
    stamp_outputs("SYNTHETIC.json", ["fresh", "old", "new"])
    assert capsys.readouterr().out == "[note] old has no BENCHMARK.sha256: keying it on the current SYNTHETIC.json\n"
    for d in ("fresh", "old", "new"):
        assert (tmp_path / d / "BENCHMARK.sha256").read_text() == f"{digest}  SYNTHETIC.json\n"
    run_steps([Stamp("SYNTHETIC.json", ("fresh", "old", "new"))])  # same benchmark: silent reuse
    assert capsys.readouterr() == ("", "")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["BENCHMARK.sha256", "final.pth"]  # no leftovers

    (tmp_path / "SYNTHETIC.json").write_text('{"preset": "small", "train_classes": 1000}\n')
    with pytest.raises(SystemExit) as exc:
        guarded(run_steps)([Stamp("SYNTHETIC.json", ("brand_new", "fresh", "old", "new")), Note("reached")])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "reached" not in captured.out and captured.err.count("\n") == 1
    assert captured.err == (f"error: fresh was built from another SYNTHETIC.json (sha256 {digest[:12]}..., now "
                            f"{hashlib.sha256((tmp_path / 'SYNTHETIC.json').read_bytes()).hexdigest()[:12]}...): "
                            "move fresh away to rebuild it, or restore that data\n")
    assert (tmp_path / "old" / "final.pth").read_text() == "weights"
    assert (tmp_path / "old" / "BENCHMARK.sha256").read_text() == f"{digest}  SYNTHETIC.json\n"
    assert not (tmp_path / "brand_new").exists()                # a refused run stamps nothing, not even
                                                                # the new dirs listed before the stale one
    with pytest.raises(UserError) as exc:
        stamp_outputs("missing.json", ["out"])
    assert str(exc.value) == "missing.json not found: cannot key the outputs on it"
    assert not (tmp_path / "out").exists()


def test_an_empty_stamp_is_a_stale_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_text("a.jpg 0\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "BENCHMARK.sha256").write_text("")
    with pytest.raises(UserError, match=r"^d was built from another list.txt \(sha256 \.\.\., now [0-9a-f]{12}"):
        stamp_outputs("list.txt", ["d"])
    os.remove(tmp_path / "d" / "BENCHMARK.sha256")
    stamp_outputs("list.txt", ["d"])
    assert (tmp_path / "d" / "BENCHMARK.sha256").read_text().endswith("  list.txt\n")


# -------------------------------------------------------------------------------- the registries
def test_plans_follow_the_method_and_test_set_registries(repo_root):
    """A method declared as a row of the paper's table is trained, tested and tabulated by every table block
    (from <block configs>/<name>.yml); a registered test set is evaluated by every test step, from its root."""
    import dataclasses

    from advbct.evaluation import test_sets
    from advbct.losses.registry import get_method, register_method, unregister_method

    bct = get_method("bct")
    register_method("toy", bct.loss_class, label="Toy", build=bct.build)
    register_method("toy_extra", bct.loss_class, label="ToyExtra", build=bct.build, paper_row=False)
    test_sets.register(dataclasses.replace(test_sets.get("roxford5k"), name="toyset", label="Toy set",
                                           default_root="./data/Toy", synthetic_root="toy"))
    try:
        plan = block_steps("class", "r18", preset="tiny")
        step = by_name(plan, "toy (r18)")
        assert step.command[2] == "configs/synthetic/class_r18/toy.yml" and "toy_extra (r18)" not in names(plan)
        assert names(plan)[names(plan).index("advbct (r18)") + 1] == "toy (r18)"   # the table's order
        table = plan[-2].command
        rows = [a for a in table if "=./output" in a]
        assert rows[rows.index("AdvBCT=./output/reproduce/class_r18_synthetic-tiny/eval/advbct") + 1] == \
            "Toy=./output/reproduce/class_r18_synthetic-tiny/eval/toy"  # a paper row: before the later methods'
        # a later method (paper_row False) is a row of a synthetic block only where the block has its config
        assert "toy_extra (r18)" not in names(plan) and not any(a.startswith("ToyExtra=") for a in table)
        ev = by_name(plan, "test toy")
        assert ev.test_sets == (*SETS, "toyset") and ev.roots[-1] == "./data/synthetic-tiny/toy"
        assert demo_steps("tiny")[-3].test_sets == (*SETS, "toyset")
    finally:
        unregister_method("toy")
        unregister_method("toy_extra")
        test_sets.unregister("toyset")
    plan = block_steps("class", "r18", preset="tiny")
    assert "toy (r18)" not in names(plan) and by_name(plan, "test bct").test_sets == tuple(SETS)


# --------------------------------------------------------------------- training steps: resume or redo
# a stand-in for scripts/train_new.sh: records its arguments (CONFIG KEY VALUE ...: one JSON list a line in
# calls.jsonl), prints
# "attempt", then as mode.txt says: "last" leaves OUTPUT/last.pth and fails (a kill after an epoch), "none"
# fails leaving nothing (a kill before the first write), "final" completes
FAKE_TRAIN = """set -euo pipefail
"$PY" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> calls.jsonl
out=; prev=
for a in "$@"; do [[ "$prev" != OUTPUT ]] || out="$a"; prev="$a"; done
mkdir -p "$out"; echo attempt
case "$(cat mode.txt)" in
  last) echo epoch > "$out/last.pth"; exit 9 ;;
  none) exit 9 ;;
  final) echo epoch > "$out/last.pth"; echo model > "$out/final.pth" ;;
esac
"""


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    """A repository root whose scripts/train_new.sh is FAKE_TRAIN (configs/ the project's); ``mode(m)`` sets
    what its next call does, ``calls()`` the argument lists of its calls so far."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "train_new.sh").write_text(FAKE_TRAIN)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PY", sys.executable)

    class Fake:
        @staticmethod
        def mode(m):
            (tmp_path / "mode.txt").write_text(m)

        @staticmethod
        def calls():
            path = tmp_path / "calls.jsonl"
            return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return Fake


def _run(plan, capfd):
    """run_steps(plan) through guarded: (exit status, stdout, stderr)."""
    code = 0
    try:
        guarded(run_steps)(plan)
    except SystemExit as exc:
        code = exc.code
    out, err = capfd.readouterr()
    return code, out, err


def test_training_step_resumes_a_killed_run_and_redoes_one_of_other_inputs(fake_train, tmp_path, capfd):
    """A training killed part-way continues (TRAIN.RESUME auto) when its inputs are the ones recorded when it
    started; a changed config or input file, or an unrecorded run, starts it over (TRAIN.OVERWRITE true),
    named; every call of the trainer carries one of the two keys; a completed step is skipped."""
    (tmp_path / "cfg.yml").write_text("TRAIN:\n  LR: 0.1\n")
    (tmp_path / "list.txt").write_text("a.jpg 0\n")
    command = ("bash", "scripts/train_new.sh", "cfg.yml", "DATA.TRAIN_LIST", "list.txt", "OUTPUT", "o")
    step = Step("train", "o/final.pth", command, "logs/train.log")
    failed = "error: step 'train' failed; log: logs/train.log\n"
    resume, overwrite = [*command[2:], "TRAIN.RESUME", "auto"], [*command[2:], "TRAIN.OVERWRITE", "true"]

    fake_train.mode("last")   # killed after its first epoch
    assert _run([step], capfd) == (1, "[run]  train  (log: logs/train.log)\nattempt\n", failed)
    assert fake_train.calls() == [resume]
    record = json.loads((tmp_path / "o" / "INPUTS.json").read_text())
    assert record["config"]["TRAIN.LR"] == 0.1 and record["config"]["OUTPUT"] == "o" and record["env"] == {}
    assert "TRAIN.RESUME" not in record["config"] and "TRAIN.OVERWRITE" not in record["config"]
    assert record["files"] == {"DATA.TRAIN_LIST": {"path": "list.txt",
                                                   "sha256": hashlib.sha256(b"a.jpg 0\n").hexdigest()}}

    resumed = "[resume] train  (log: logs/train.log; the run in o continues from its last.pth)\n"
    assert _run([step], capfd) == (1, resumed + "attempt\n", failed)
    assert fake_train.calls()[-1] == resume
    assert (tmp_path / "logs" / "train.log").read_text() == "attempt\nattempt\n"   # continued, not replaced

    (tmp_path / "cfg.yml").write_text("TRAIN:\n  LR: 0.2\n")   # the config changed: start over
    fake_train.mode("none")   # ... killed before the trainer removed the previous run
    redo = ("[redo] train  (log: logs/train.log; o holds a run made from other inputs (TRAIN.LR changed): "
            "starting over)\n")
    assert _run([step], capfd) == (1, redo + "attempt\n", failed)
    assert fake_train.calls()[-1] == overwrite
    assert json.loads((tmp_path / "o" / "INPUTS.json").read_text())["config"]["TRAIN.LR"] == 0.2
    assert (tmp_path / "logs" / "train.log").read_text() == "attempt\n"   # a new run, a new log
    # the last.pth there is the previous run's (older than the record): still not resumed
    fake_train.mode("last")
    assert _run([step], capfd)[1] == ("[redo] train  (log: logs/train.log; o holds a run older than the record of "
                                      "its inputs (a restart of it was interrupted): starting over)\nattempt\n")
    assert fake_train.calls()[-1] == overwrite
    assert _run([step], capfd)[1] == resumed + "attempt\n"   # that restart saved an epoch: continued
    assert fake_train.calls()[-1] == resume

    (tmp_path / "list.txt").write_text("b.jpg 0\n")   # an input file changed
    assert _run([step], capfd)[1] == ("[redo] train  (log: logs/train.log; o holds a run made from other inputs "
                                      "(the file of DATA.TRAIN_LIST changed): starting over)\nattempt\n")
    (tmp_path / "o" / "INPUTS.json").unlink()   # a run made before the record existed
    assert _run([step], capfd)[1] == ("[redo] train  (log: logs/train.log; o holds a run made from inputs it has "
                                      "no record of (INPUTS.json): starting over)\nattempt\n")
    (tmp_path / "o" / "last.pth").rename(tmp_path / "o" / "epoch_1.pth")   # nothing to continue from
    assert _run([step], capfd)[1] == ("[redo] train  (log: logs/train.log; o holds a run without a last.pth to "
                                      "continue from: starting over)\nattempt\n")
    assert fake_train.calls()[-3:] == [overwrite] * 3

    fake_train.mode("final")   # (that restart saved an epoch too)
    assert _run([step], capfd) == (0, resumed + "attempt\n", "")
    assert fake_train.calls()[-1] == resume and (tmp_path / "o" / "final.pth").exists()
    n = len(fake_train.calls())
    assert _run([step], capfd) == (0, "[done] train  (o/final.pth)\n", "")
    assert len(fake_train.calls()) == n and all(c[-2:] in (["TRAIN.RESUME", "auto"], ["TRAIN.OVERWRITE", "true"])
                                                for c in fake_train.calls())


def test_a_training_step_of_a_broken_config_stops_in_one_line_before_it_runs(fake_train, tmp_path, capfd):
    step = Step("train", "o/final.pth", ("bash", "scripts/train_new.sh", "missing.yml", "OUTPUT", "o"), "l.log")
    assert _run([step], capfd) == (2, "", "error: step 'train': config file not found: missing.yml\n")
    assert fake_train.calls() == [] and not (tmp_path / "o").exists()


# ------------------------------------------------------------ paths with spaces, quotes, $ and commas
WEIRD = "d a't \"q\" $HOME `x`"


def test_plans_keep_paths_with_shell_characters_whole(repo_root):
    """Every argument naming a folder of the plan holds the whole path: nothing split or expanded."""
    data, out = f"/tmp/{WEIRD}/bench", f"/tmp/{WEIRD}/out"
    plans = [demo_steps("tiny", data, out), block_steps("class", "r50", preset="tiny", data=data),
             block_steps("data", "r18", preset="tiny", data=data, kind="ablation")]
    args = [str(a) for plan in plans for item in plan if isinstance(item, (Step, EvalStep))
            for a in (item.command if isinstance(item, Step) else item.step(missing=SETS).command)]
    pieces = ["a't", '"q"', "$HOME", "`x`"]
    touched = [a for a in args if any(p in a for p in pieces)]
    assert touched and all(WEIRD in a for a in touched)
    pretrain = by_name(plans[0], f"2/9 pretrain backbone (r18, {data}/pretrain)")
    assert list(pretrain.command[3:]) == ["DATA.ROOT", f"{data}/pretrain", "DATA.TRAIN_LIST",
                                          f"{data}/pretrain/train_list.txt", "OUTPUT", f"{out}/pretrain"]


def test_a_training_step_gets_its_paths_whole(fake_train, tmp_path, capfd):
    """The argv reaches the command as the plan built it, a path with a space, quotes, $ and backquotes as
    one argument (no shell in between), the resume key after it; the record goes into that OUTPUT."""
    data, out = tmp_path / f"data {WEIRD}", tmp_path / f"out {WEIRD}"
    (data / "pretrain").mkdir(parents=True)
    (data / "pretrain" / "train_list.txt").write_text("a.jpg 0\n")
    step = pretrain_step("r18", str(data), str(out / "pretrain"), str(out / "logs" / "pretrain.log"))
    fake_train.mode("final")
    assert _run([step], capfd)[0] == 0
    assert fake_train.calls() == [[*step.command[2:], "TRAIN.RESUME", "auto"]]
    record = json.loads((out / "pretrain" / "INPUTS.json").read_text())
    assert record["files"]["DATA.TRAIN_LIST"]["path"] == f"{data}/pretrain/train_list.txt"
    assert (out / "logs" / "pretrain.log").read_text() == "attempt\n"


def test_eval_step_tests_one_set_per_call_where_a_root_holds_a_comma(tmp_path, monkeypatch, capfd):
    """scripts/test.sh splits several roots at their commas: a root holding one goes alone, whole."""
    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "scripts" / "test.sh"
    fake.parent.mkdir()
    fake.write_text(f'"{sys.executable}" -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$@" >> calls.jsonl\n'
                    'save="${@: -1}"; mkdir -p "$save"; touch "$save/results.json"\n')
    rev, gld = f"da,ta {WEIRD}/ROxfordParis", f"da,ta {WEIRD}/gldv2"
    step = EvalStep("test m", "new.pth", "resnet18", "old.pth", "ev", "logs/t.log", SETS, [rev, rev, gld])
    run_steps([step])
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert calls == [["landmark", s, r, "EVAL.SAVE_DIR", f"ev/{s}"] for s, r in zip(SETS, [rev, rev, gld])]
    assert capfd.readouterr().out == "".join(f"[run]  test m on {s}  (log: logs/t.log)\n" for s in SETS)
    assert all((tmp_path / "ev" / s / "results.json").exists() for s in SETS)
    run_steps([step])
    assert capfd.readouterr().out == "[done] test m  (ev/{rparis6k,roxford5k,gldv2}/results.json)\n"
