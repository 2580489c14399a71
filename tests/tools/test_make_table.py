"""tools/make_table.py and advbct.evaluation.reporting: filled P values, markdown layout, input errors."""

import json
import math
import os
import subprocess
import sys

import pytest

from advbct.errors import UserError
from advbct.evaluation.reporting import fill_scores, load_table, render_markdown, write_json_atomic
from helpers import REPO

ROOT = str(REPO)
PAPER_TABLE = "/work/shared/data/paper_table.json"
needs_paper = pytest.mark.skipif(not os.path.isfile(PAPER_TABLE), reason=f"{PAPER_TABLE} is absent")


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def make_table(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "make_table.py"), *map(str, args)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def small_table():
    """One block, two datasets, values chosen so the scores are simple by hand."""
    return {
        "datasets": ["roxford5k", "mytest"],
        "blocks": {
            "toy": {
                "description": "hand-made",
                "old": {"self": [60.0, 10.0]},
                "independent": {"self": [80.0, 20.0], "cross": [60.0, 0.0]},
                "methods": {"M": {"self": [80.0, 40.0], "cross": [80.0, 10.0]}},
            }
        },
    }


def test_small_table_end_to_end(tmp_path):
    # Method M: roxford5k a = σ(0) = 1/2, b = σ((80-60)/(80-60)) = σ(1);
    #           mytest    a = σ((40-20)/20) = σ(1), b = σ((10-10)/(20-10)) = 1/2.
    # φ*: b = σ((60-60)/20) = 1/2 and σ((0-10)/10) = σ(-1); P_comp = 100·(1/2 + σ(-1))/2 = 38.45.
    src = tmp_path / "t.json"
    src.write_text(json.dumps(small_table()))
    out_json, out_md = tmp_path / "out" / "filled.json", tmp_path / "out" / "table.md"
    proc = make_table("--from-json", src, "--json", out_json, "--markdown", out_md)
    assert proc.returncode == 0, proc.stderr
    filled = json.loads(out_json.read_text())
    m = filled["blocks"]["toy"]["methods"]["M"]
    s1 = sigmoid(1.0)
    assert m["P_up"] == pytest.approx(100 * (0.5 + s1) / 2, abs=1e-9)
    assert m["P_comp"] == pytest.approx(100 * (s1 + 0.5) / 2, abs=1e-9)
    assert m["P_1"] == pytest.approx(100 * 2 * 0.5 * s1 / (0.5 + s1), abs=1e-9)
    ind = filled["blocks"]["toy"]["independent"]
    assert ind["P_comp"] == pytest.approx(100 * (0.5 + sigmoid(-1.0)) / 2, abs=1e-9)
    assert "P_up" not in ind and "P_1" not in ind
    assert filled["blocks"]["toy"]["old"] == {"self": [60.0, 10.0]}
    md = out_md.read_text()
    assert proc.stdout == md
    assert "| model | ROxford self / cross | mytest self / cross | P_up | P_comp | P_1 |" in md
    assert "| φ_old (self only) | 60.00 | 10.00 | – | – | – |" in md
    # P_up = P_comp = 100·(1/2 + σ(1))/2 = 61.55; P_1 = 100·σ(1)/(1/2 + σ(1)) = 59.38
    assert "| M | 80.00 / 80.00 | 40.00 / 10.00 | 61.55 | 61.55 | 59.38 |" in md
    assert "| φ* (independent) | 80.00 / 60.00 | 20.00 / 0.00 | – | 38.45 | – |" in md


@needs_paper
def test_paper_table(tmp_path):
    out_json = tmp_path / "filled.json"
    proc = make_table("--from-json", PAPER_TABLE, "--json", out_json, "--reference", PAPER_TABLE)
    assert proc.returncode == 0, proc.stderr
    with open(PAPER_TABLE) as f:
        paper = json.load(f)
    filled = json.loads(out_json.read_text())
    assert filled["datasets"] == paper["datasets"] and filled["blocks"].keys() == paper["blocks"].keys()
    for name in ("data", "class", "backbone-data"):
        for method, row in paper["blocks"][name]["methods"].items():
            ours = filled["blocks"][name]["methods"][method]
            assert ours["self"] == row["self"] and ours["cross"] == row["cross"]
            for key in ("P_up", "P_comp", "P_1"):
                expected = 53.23 if (name, method, key) == ("data", "LCE", "P_1") else row[key]  # known typo
                assert ours[key] == pytest.approx(expected, abs=0.01), (name, method, key)
        ind = filled["blocks"][name]["independent"]
        assert ind["P_comp"] == pytest.approx(paper["blocks"][name]["independent"]["P_comp"], abs=0.01)
    # "ours (paper)" cells, including the typo cell where they differ.
    out = proc.stdout
    assert "### data — extended-data (old R18 on 30% of images, new R18)" in out
    assert "| φ_old (self only) | 75.45 (75.45) | 49.15 (49.15) | 10.03 (10.03) | – | – | – |" in out
    assert ("| LCE | 81.57 / 77.83 (81.57 / 77.83) | 60.85 / 51.35 (60.85 / 51.35) | "
            "16.48 / 12.17 (16.48 / 12.17) | 49.65 (49.65) | 57.41 (57.41) | 53.23 (53.34) |") in out
    assert "| – | 7.19 (7.19) | – |" in out
    assert out.count("| AdvBCT |") == 4


def test_broken_json_gives_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    proc = make_table("--from-json", bad)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert str(bad) in proc.stderr and "not valid JSON" in proc.stderr

    table = small_table()
    del table["blocks"]["toy"]["methods"]["M"]["cross"][1]
    bad.write_text(json.dumps(table))
    proc = make_table("--from-json", bad)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"error: {bad}: 'blocks.toy.methods.M.cross' must be a list of 2 finite numbers (one mAP per "
        "dataset in 'datasets'), got 1 values: [80.0]"
    )


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.pop("blocks"), "missing key 'blocks'"),
        (lambda t: t.pop("datasets"), "missing key 'datasets'"),
        (lambda t: t["blocks"]["toy"].pop("old"), "missing key 'blocks.toy.old'"),
        (lambda t: t["blocks"]["toy"]["old"].pop("self"), "missing key 'blocks.toy.old.self'"),
        (lambda t: t["blocks"]["toy"].pop("independent"), "missing key 'blocks.toy.independent'"),
        (lambda t: t["blocks"]["toy"]["independent"]["self"].append(1.0), "'blocks.toy.independent.self' must be a list of 2"),
        (lambda t: t["blocks"]["toy"]["methods"]["M"].pop("self"), "missing key 'blocks.toy.methods.M.self'"),
        (lambda t: t["blocks"]["toy"]["old"]["self"].__setitem__(0, "x"), "'blocks.toy.old.self' must be a list"),
    ],
)
def test_schema_errors_name_file_and_key(tmp_path, mutate, message):
    table = small_table()
    mutate(table)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    with pytest.raises(UserError) as info:
        load_table(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_undefined_scores(tmp_path):
    with pytest.raises(UserError, match="nope.json: table file not found"):
        load_table(tmp_path / "nope.json")
    table = small_table()
    table["blocks"]["toy"]["independent"]["self"] = [60.0, 20.0]  # equals the old model on roxford5k
    with pytest.raises(UserError, match="'blocks.toy.methods.M'.*undefined"):
        fill_scores(table, source="t.json")


def test_render_without_scores_and_reference_alignment():
    table = small_table()
    md = render_markdown(table)  # P values not filled: dashes
    assert "| M | 80.00 / 80.00 | 40.00 / 10.00 | – | – | – |" in md
    # A reference with only one of our datasets (in another order) and no row M.
    reference = {"datasets": ["gldv2", "roxford5k"], "blocks": {"toy": {
        "old": {"self": [5.0, 61.0]}, "independent": {"self": [7.0, 81.0], "cross": [0.1, 1.5]}}}}
    md = render_markdown(fill_scores(table), reference)
    assert "| φ_old (self only) | 60.00 (61.00) | 10.00 | – | – | – |" in md
    assert "| φ* (independent) | 80.00 / 60.00 (81.00 / 1.50) | 20.00 / 0.00 | – | 38.45 (–) | – |" in md
    assert "| M | 80.00 / 80.00 | 40.00 / 10.00 | 61.55 | 61.55 | 59.38 |" in md


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": [1.5, "φ"]})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": [1.5, "φ"]}
    assert sorted(os.listdir(path.parent)) == ["r.json"]  # no temporary file left behind
