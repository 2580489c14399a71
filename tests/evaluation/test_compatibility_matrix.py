"""AC and AM of a compatibility matrix against hand-computed values (ties, chains of 2 and 4), its markdown and
heat map, and the refusals of a matrix that is no chain."""

import numpy as np
import pytest

from advbct.errors import UserError
from advbct.evaluation.compatibility_matrix import (ac_score, am_score, check_matrix, matrix_markdown, read_matrix,
                                                    summary, summary_markdown, write_heatmap)

# C[i][j]: queries by generation i against a gallery by generation j (i >= j); above the diagonal unused
CHAIN3 = [[50.0, None, None],
          [52.0, 60.0, None],   # 52 > 50: compatible with gen1
          [50.0, 61.0, 70.0]]   # 50 == C[0][0]: a tie is not compatible; 61 > 60: compatible


def test_chain_of_three_by_hand():
    assert ac_score(CHAIN3) == pytest.approx(2 / 3)
    assert am_score(CHAIN3) == pytest.approx((50 + 52 + 60 + 50 + 61 + 70) / 6)


def test_chain_of_two_has_one_pair():
    assert ac_score([[40.0, 0.0], [40.5, 45.0]]) == 1.0
    assert ac_score([[40.0, 0.0], [39.5, 45.0]]) == 0.0
    assert ac_score([[40.0, 0.0], [40.0, 45.0]]) == 0.0  # tie
    assert am_score([[40.0, 999.0], [41.0, 45.0]]) == pytest.approx((40 + 41 + 45) / 3)  # upper triangle ignored


def test_chain_of_four_against_the_definitions():
    rng = np.random.default_rng(3)
    for _ in range(20):
        c = np.round(rng.uniform(0, 100, size=(4, 4)), 0)  # rounded: ties happen
        pairs = [(i, j) for i in range(4) for j in range(i)]
        assert len(pairs) == 6
        expected_ac = sum(c[i][j] > c[j][j] for i, j in pairs) * 2 / (4 * 3)
        expected_am = sum(c[i][j] for i in range(4) for j in range(i + 1)) * 2 / (4 * 5)
        assert ac_score(c) == pytest.approx(expected_ac)
        assert am_score(c) == pytest.approx(expected_am)


@pytest.mark.parametrize("bad", [[[50.0]], [[1.0, 2.0, 3.0]], [[1.0, None], [None, 2.0]], [[np.nan, 0], [1, 2]]])
def test_no_chain_is_refused(bad):
    with pytest.raises(UserError, match="compatibility matrix"):
        check_matrix(bad)


def _entry(matrix):
    return {"metric": "mAP medium", "matrix": matrix, "AC": ac_score(matrix), "AM": am_score(matrix)}


def test_markdown_and_heatmap(tmp_path):
    md = matrix_markdown(["a", "b", "c"], {"rparis6k": _entry(CHAIN3)})
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == "| query \\ gallery | a | b | c |"
    assert rows[1:] == ["| a | 50.00 |  |  |", "| b | 52.00 | 60.00 |  |", "| c | 50.00 | 61.00 | 70.00 |"]
    assert "AC 0.67 (2 of 3 pairs), AM 57.17" in md
    path = tmp_path / "m.png"
    assert write_heatmap(["a", "b", "c"], {"rparis6k": _entry(CHAIN3), "gldv2": _entry(CHAIN3)}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_of_two_methods(tmp_path):
    import json

    results = {}
    for label, matrix in (("AdvBCT", CHAIN3), ("BCT", [[50.0, None, None], [40.0, 60.0, None], [30.0, 55.0, 70.0]])):
        folder = tmp_path / label
        folder.mkdir()
        (folder / "matrix.json").write_text(json.dumps(
            {"generations": [{"name": n} for n in ("gen1", "gen2", "gen3")], "sets": {"rparis6k": _entry(matrix)}}))
        results[label] = read_matrix(str(folder / "matrix.json"))
    table = summary(results, "chain")
    assert table["methods"]["BCT"]["rparis6k"]["AC"] == 0.0
    assert table["methods"]["AdvBCT"]["rparis6k"]["AM"] == pytest.approx(343 / 6)
    lines = summary_markdown(table).splitlines()
    assert "| AdvBCT | 0.67 | 57.17 |" in lines and "| BCT | 0.00 | 50.83 |" in lines
    (tmp_path / "bad.json").write_text(json.dumps({"generations": [], "sets": {"x": {"metric": "m"}}}))
    with pytest.raises(UserError, match="bad.json: test set 'x' lacks"):
        read_matrix(str(tmp_path / "bad.json"))
    with pytest.raises(UserError, match="not found \\(run scripts/test_generations.sh first\\)"):
        read_matrix(str(tmp_path / "none" / "matrix.json"))
