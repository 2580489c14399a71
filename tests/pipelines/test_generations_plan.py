"""The plan of scripts/reproduce_generations.sh (advbct.pipelines.generations), in process: its arguments and
their one-line refusals, the chain's train lists, which model each generation trains against, the shared phi1
and its meta, the backbones' configs and the matrix step. Nothing here trains a model."""

import pytest

from advbct.errors import UserError
from advbct.pipelines.__main__ import main
from advbct.pipelines.generations import (DEFAULT_CHAIN, generation_steps, parse_chain, parse_generations_args,
                                          resolve_chain)
from advbct.pipelines.steps import Stamp, Step, SyntheticList


def test_defaults():
    alloc, methods, chain, preset, against = parse_generations_args(["class"])
    assert (alloc, methods, preset, against) == ("class", ["advbct", "bct"], None, "previous")
    assert chain == [("r18", 0.3), ("r18", 0.6), ("r50", 1.0)] == parse_chain(DEFAULT_CHAIN)


@pytest.mark.parametrize("argv, message", [
    (["class", "--chain", "r18:1.0"], "--chain r18:1.0: a chain needs at least two generations"),
    (["class", "--chain", "r18:0.6,r18:0.3"], "expected increasing shares in \\(0, 1\\]"),
    (["class", "--chain", "r34:0.3,r18:1.0"], "backbone 'r34' \\(expected r18 or r50\\)"),
    (["class", "--chain", "r18-0.3,r18:1.0"], "expected BACKBONE:SHARE per generation"),
    (["class", "--methods", "advbct,nope"], "COMP_LOSS.TYPE 'nope': expected '' \\(none\\) or one of"),
    (["class", "--methods", "bct,bct"], "--methods bct,bct: expected distinct method names"),
    (["class", "--methods", "advbct,fct"], "--methods fct: its cross test maps the old gallery"),
    (["class", "--methods", "bt2"], "--methods bt2: its new model has another embedding size than its old one"),
    (["class", "--methods"], "--methods needs a value"),
    (["class", "--synthetic", "huge"], "--synthetic huge: expected one of"),
    (["both"], "unknown allocation 'both'"),
    (["class", "--epochs", "3"], "unknown argument '--epochs'"),
    (["class", "--against", "first"], "--against first: expected previous or all"),
])
def test_refusals(argv, message):
    with pytest.raises(UserError, match=message):
        parse_generations_args(argv)


def test_usage_line_alone_without_arguments(capsys):
    assert main(["generations"]) == 2
    assert capsys.readouterr().err.startswith("usage: bash scripts/reproduce_generations.sh {data,class}")


def _argv(step):
    return list(step.command)


def _value(argv, key):
    """The value of the last ``key`` in a command's KEY VALUE pairs (later pairs override earlier ones)."""
    return argv[len(argv) - 1 - argv[::-1].index(key) + 1]


def test_plan_of_a_synthetic_chain(tmp_path):
    chain = resolve_chain("class", ["advbct", "bct"], parse_chain(DEFAULT_CHAIN), "tiny", "D", out="O",
                          pretrain_root="P")
    plan = generation_steps(chain, python="PY", extra=("TRAIN.EPOCHS", "1"))
    steps = {item.name: item for item in plan if isinstance(item, Step) and item.name}
    assert isinstance(plan[1], SyntheticList) and isinstance(plan[2], Stamp) and plan[2].dirs == ("P", "O")
    assert [n for n in steps] == [
        "synthetic benchmark (tiny)", "pretrain backbone (r18, D/pretrain)", "pretrain backbone (r50, D/pretrain)",
        "chain split by class (0.3,0.6,1)", "gen1 (r18, 0.3 of the class)",
        "gen1 class meta (shared)", "advbct gen2 (r18, against gen1)", "gen2 class meta (advbct)",
        "advbct gen3 (r50, against gen2)", "advbct compatibility matrix",
        "bct gen2 (r18, against gen1)", "bct gen3 (r50, against gen2)", "bct compatibility matrix",
        "generations table"]
    lists = ["D/gldv2/gldv2_train_chain_30_class.txt", "D/gldv2/gldv2_train_chain_30-60_class.txt",
             "D/gldv2/gldv2_train_chain_30-60-100_class.txt"]
    split = steps["chain split by class (0.3,0.6,1)"]
    assert split.output == lists[2] and _argv(split)[-2:] == ["--chain", "0.3,0.6,1"]
    gen1 = _argv(steps["gen1 (r18, 0.3 of the class)"])
    assert gen1[:3] == ["bash", "scripts/train_old.sh", "configs/synthetic/class_r18/old.yml"]
    assert _value(gen1, "DATA.TRAIN_LIST") == lists[0] and _value(gen1, "OUTPUT") == "O/gen1"
    assert _value(gen1, "MODEL.PRETRAINED_PATH") == "P/r18/final.pth" and _value(gen1, "TRAIN.EPOCHS") == "1"
    meta1 = _argv(steps["gen1 class meta (shared)"])
    assert meta1[1] == "scripts/extract_meta.sh" and steps["gen1 class meta (shared)"].output == "O/gen1/meta.pt"
    assert _value(meta1, "META.TRAIN_LIST") == lists[0] and _value(meta1, "OLD_MODEL.WEIGHTS") == "O/gen1/final.pth"
    adv3 = _argv(steps["advbct gen3 (r50, against gen2)"])
    assert adv3[2] == "configs/synthetic/class_r50/advbct.yml"
    assert {k: _value(adv3, k) for k in ("OLD_MODEL.WEIGHTS", "OLD_MODEL.ARCH", "COMP_LOSS.META_PATH",
                                         "DATA.TRAIN_LIST", "OUTPUT", "MODEL.PRETRAINED_PATH")} == {
        "OLD_MODEL.WEIGHTS": "O/advbct/gen2/final.pth", "OLD_MODEL.ARCH": "resnet18",
        "COMP_LOSS.META_PATH": "O/advbct/gen2/meta.pt", "DATA.TRAIN_LIST": lists[2], "OUTPUT": "O/advbct/gen3",
        "MODEL.PRETRAINED_PATH": "P/r50/final.pth"}
    meta2 = _argv(steps["gen2 class meta (advbct)"])
    assert _value(meta2, "META.TRAIN_LIST") == lists[1] and _value(meta2, "OLD_MODEL.WEIGHTS") == "O/advbct/gen2/final.pth"
    bct2 = _argv(steps["bct gen2 (r18, against gen1)"])
    assert "COMP_LOSS.META_PATH" not in bct2 and _value(bct2, "OLD_MODEL.WEIGHTS") == "O/gen1/final.pth"
    matrix = _argv(steps["bct compatibility matrix"])
    assert matrix[:5] == ["bash", "scripts/test_generations.sh", "landmark", "rparis6k,roxford5k,gldv2",
                          "D/ROxfordParis,D/ROxfordParis,D/gldv2"]
    assert _value(matrix, "GENERATIONS.WEIGHTS") == "[O/gen1/final.pth,O/bct/gen2/final.pth,O/bct/gen3/final.pth]"
    assert _value(matrix, "GENERATIONS.ARCHS") == "[resnet18,resnet18,resnet50]"
    assert steps["bct compatibility matrix"].output == "O/bct/matrix/matrix.json"
    table = plan[-1]
    assert table.output is None and _argv(table)[:2] == ["PY", "tools/collect_generations.py"]
    assert _argv(table)[2:6] == ["--method", "AdvBCT=O/advbct/matrix", "--method", "BCT=O/bct/matrix"]


def test_against_all_trains_each_generation_against_every_earlier_one():
    """gen3 against gen2 (OLD_MODEL) and gen1 (OLD_MODEL.EARLIER_*, with gen1's meta for AdvBCT); gen2 has no
    earlier model; the chain gets its own folder."""
    assert parse_generations_args(["class", "--against", "all"])[4] == "all"
    chain = resolve_chain("class", ["advbct", "bct"], parse_chain("r18:0.3,r18:0.6,r50:0.8,r50:1.0"), "tiny", "D",
                          pretrain_root="P", against="all")
    assert chain.out == "./output/generations/class_r18-30_r18-60_r50-80_r50-100_against-all_synthetic-tiny"
    o = chain.out
    steps = {item.name: item for item in generation_steps(chain, python="PY") if isinstance(item, Step) and item.name}
    assert [n for n in steps if " gen" in n and "meta" not in n] == [
        "advbct gen2 (r18, against gen1)", "advbct gen3 (r50, against gen1-gen2)", "advbct gen4 (r50, against gen1-gen3)",
        "bct gen2 (r18, against gen1)", "bct gen3 (r50, against gen1-gen2)", "bct gen4 (r50, against gen1-gen3)"]
    assert "OLD_MODEL.EARLIER_WEIGHTS" not in _argv(steps["advbct gen2 (r18, against gen1)"])
    adv4 = _argv(steps["advbct gen4 (r50, against gen1-gen3)"])
    assert {k: _value(adv4, k) for k in ("OLD_MODEL.WEIGHTS", "OLD_MODEL.EARLIER_WEIGHTS", "OLD_MODEL.EARLIER_ARCHS",
                                         "OLD_MODEL.EARLIER_META_PATHS", "COMP_LOSS.META_PATH")} == {
        "OLD_MODEL.WEIGHTS": f"{o}/advbct/gen3/final.pth",
        "OLD_MODEL.EARLIER_WEIGHTS": f"[{o}/gen1/final.pth,{o}/advbct/gen2/final.pth]",
        "OLD_MODEL.EARLIER_ARCHS": "[resnet18,resnet18]",
        "OLD_MODEL.EARLIER_META_PATHS": f"[{o}/gen1/meta.pt,{o}/advbct/gen2/meta.pt]",
        "COMP_LOSS.META_PATH": f"{o}/advbct/gen3/meta.pt"}
    for meta in (f"{o}/gen1/meta.pt", f"{o}/advbct/gen2/meta.pt", f"{o}/advbct/gen3/meta.pt"):  # each made before
        assert [s.output for s in steps.values()].index(meta) < list(steps).index("advbct gen4 (r50, against gen1-gen3)")
    bct3 = _argv(steps["bct gen3 (r50, against gen1-gen2)"])
    assert _value(bct3, "OLD_MODEL.EARLIER_WEIGHTS") == f"[{o}/gen1/final.pth]"
    assert "OLD_MODEL.EARLIER_META_PATHS" not in bct3  # BCT reads no meta
    table = _argv(generation_steps(chain, python="PY")[-1])
    assert table[table.index("--description") + 1].endswith("each against every earlier generation_synthetic-tiny")


def test_real_route_needs_the_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="not found: lay out the datasets as in Dataset.md"):
        resolve_chain("data", ["bct"], parse_chain(DEFAULT_CHAIN))
