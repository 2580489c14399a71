"""P_up / P_comp / P_1: hand-computed values and the published P columns of the paper's table."""

import json
import math
import os

import pytest

from advbct.errors import UserError
from advbct.evaluation.scores import independent_p_comp, summary_scores

PAPER_TABLE = "/work/shared/data/paper_table.json"
needs_paper = pytest.mark.skipif(not os.path.isfile(PAPER_TABLE), reason=f"{PAPER_TABLE} is absent")


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_hand_computed_single_dataset():
    # s = u = 80 -> a = σ(0) = 1/2;  x = u = 80, o = 60 -> b = σ((80-60)/(80-60)) = σ(1)
    # P_1 = 100 · 2ab/(a+b)
    b = sigmoid(1.0)
    out = summary_scores([80.0], [80.0], [60.0], [80.0])
    assert out["P_up"] == pytest.approx(50.0, abs=1e-12)
    assert out["P_comp"] == pytest.approx(100 * b, abs=1e-12)  # 73.1059
    assert out["P_1"] == pytest.approx(100 * 2 * 0.5 * b / (0.5 + b), abs=1e-12)  # 59.3834


def test_hand_computed_mean_over_datasets_of_harmonic_means():
    # Dataset 1: s=40, u=20 -> a = σ(1); x=10=o -> b = 1/2.  Dataset 2: s=10, u=20 -> a = σ(-1/2);
    # x=30, o=10 -> b = σ((30-10)/(20-10)) = σ(2). P_1 averages the per-dataset harmonic means.
    a = [sigmoid(1.0), sigmoid(-0.5)]
    b = [0.5, sigmoid(2.0)]
    out = summary_scores([40, 10], [10, 30], [10, 10], [20, 20])
    assert out["P_up"] == pytest.approx(100 * sum(a) / 2, abs=1e-12)
    assert out["P_comp"] == pytest.approx(100 * sum(b) / 2, abs=1e-12)
    f1 = [2 * x * y / (x + y) for x, y in zip(a, b)]
    assert out["P_1"] == pytest.approx(100 * sum(f1) / 2, abs=1e-12)
    # The independent model's own P_comp uses its cross-test as x.
    assert independent_p_comp([0.0, 10.0], [10, 10], [20, 20]) == pytest.approx(
        100 * (sigmoid(-1.0) + 0.5) / 2, abs=1e-12
    )


def test_invalid_inputs():
    with pytest.raises(UserError, match="lengths"):
        summary_scores([1, 2], [1, 2], [1], [1, 2])
    with pytest.raises(UserError, match="undefined"):
        summary_scores([50], [40], [60], [60])  # u == o
    with pytest.raises(UserError, match="non-finite"):
        summary_scores([float("nan")], [40], [30], [60])


def paper_cells(block):
    """(label, computed, published) for every P cell of a block of the paper's table."""
    old, ind = block["old"]["self"], block["independent"]
    cells = [("independent.P_comp", independent_p_comp(ind["cross"], old, ind["self"]), ind["P_comp"])]
    for method, row in block["methods"].items():
        ours = summary_scores(row["self"], row["cross"], old, ind["self"])
        cells += [(f"{method}.{key}", ours[key], row[key]) for key in ("P_up", "P_comp", "P_1")]
    return cells


@needs_paper
@pytest.mark.parametrize("block_name", ["data", "class", "backbone-data"])
def test_reproduces_published_scores(block_name):
    with open(PAPER_TABLE) as f:
        block = json.load(f)["blocks"][block_name]
    cells = paper_cells(block)
    assert len(cells) == 1 + 3 * 5
    for label, ours, published in cells:
        if block_name == "data" and label == "LCE.P_1":
            # Known typo in the published table: it prints 53.34, the formula on its own mAPs gives
            # 53.23 (all other cells of the block agree to ±0.01).
            assert published == 53.34
            assert ours == pytest.approx(53.23, abs=0.01), label
            continue
        assert ours == pytest.approx(published, abs=0.01), f"{block_name} {label}"


@needs_paper
def test_backbone_class_block_is_close():
    # The extended-backbone (class) block does not reproduce to ±0.01: every cell is off by 0.05–0.11,
    # apparently from a different φ* run, and two P_comp cells (AdvBCT, φ*) by 0.28. No single φ*
    # self-test vector fits all 16 cells (least squares leaves residuals up to 0.1).
    with open(PAPER_TABLE) as f:
        block = json.load(f)["blocks"]["backbone-class"]
    deviations = {label: abs(ours - published) for label, ours, published in paper_cells(block)}
    large = {"AdvBCT.P_comp", "independent.P_comp"}
    for label, dev in deviations.items():
        assert dev <= (0.3 if label in large else 0.2), f"backbone-class {label}: {dev:.3f}"
    assert min(deviations[label] for label in large) > 0.2  # documents that these two really differ
