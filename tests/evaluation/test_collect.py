"""Table assembly (advbct.evaluation.collect): a block's results.json files in the paper's schema, and the
compatibility criterion report (the tool around it: tests/tools/test_collect_results.py)."""

from advbct.evaluation.collect import collect_block, criterion_report
from advbct.evaluation.reporting import fill_scores, validate_table
from helpers import write_results


def test_collect_block_schema_values_and_criterion(tmp_path):
    old = {"rparis6k": 60.0, "roxford5k": 40.0, "gldv2": 10.0}
    for ds, (s, x) in {"rparis6k": (70.0, 5.0), "roxford5k": (50.0, 2.0), "gldv2": (15.0, 0.5)}.items():
        write_results(tmp_path / "ind" / ds, ds, s, x, old[ds])
    for ds, (s, x) in {"rparis6k": (69.0, 61.0), "roxford5k": (48.0, 39.0), "gldv2": (14.0, 11.0)}.items():
        write_results(tmp_path / "adv" / ds, ds, s, x, old[ds])
    table = collect_block(tmp_path / "ind", {"AdvBCT": tmp_path / "adv"})
    validate_table(table)
    block = table["blocks"]["block"]
    assert table["datasets"] == ["rparis6k", "roxford5k", "gldv2"]
    assert block["old"]["self"] == [60.0, 40.0, 10.0]                 # Medium / mAP@100 headline
    assert block["independent"] == {"self": [70.0, 50.0, 15.0], "cross": [5.0, 2.0, 0.5]}
    assert block["methods"]["AdvBCT"] == {"self": [69.0, 48.0, 14.0], "cross": [61.0, 39.0, 11.0]}
    lines, ok = criterion_report(fill_scores(table))
    assert not ok                                                      # 39 <= 40 on roxford5k
    assert "AdvBCT on rparis6k: cross-test 61.00 > old self-test 60.00 -> compatible" in lines
    assert "AdvBCT on roxford5k: cross-test 39.00 <= old self-test 40.00 -> NOT compatible" in lines


def test_a_results_file_without_a_headline_is_one_line_naming_it(tmp_path):
    import json

    import pytest

    from advbct.errors import UserError

    for ds in ("rparis6k", "roxford5k", "gldv2"):
        write_results(tmp_path / "ind" / ds, ds, 70.0, 5.0, 60.0)
    bad = tmp_path / "ind" / "gldv2" / "results.json"
    bad.write_text(json.dumps({"dataset": "gldv2", "self_test": {"recall@1": 3.0}}))
    with pytest.raises(UserError, match="no headline metric") as err:
        collect_block(tmp_path / "ind", {})
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    bad.write_text("[]")
    with pytest.raises(UserError, match="expected a JSON object") as err:
        collect_block(tmp_path / "ind", {})
    assert str(bad) in str(err.value)
