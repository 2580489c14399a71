"""The test-set registry (advbct.evaluation.test_sets): order, labels, headline numbers, root layouts, and a
set registered from here evaluated, named in EVAL.DATASET and tabulated like the built-in ones."""

import dataclasses
import json

import numpy as np
import pytest

from advbct.config import load_config
from advbct.errors import UserError
from advbct.evaluation import test_sets
from advbct.evaluation.collect import collect_block
from advbct.evaluation.evaluate import evaluation_jobs
from advbct.evaluation.metrics import gldv2_map_at_k, revisited_ranking_metrics
from advbct.evaluation.protocol import backfill_curve, headline, headline_value, load_test_set, score
from advbct.evaluation.reporting import render_markdown
from advbct.evaluation.search import knn_search

BUILT_IN = ("rparis6k", "roxford5k", "gldv2")


def revisited_metrics(easy, medium, hard):
    return {"mAP": {"easy": easy, "medium": medium, "hard": hard},
            "mP@k": {p: {"1": 0.0, "5": 0.0, "10": 0.0} for p in ("easy", "medium", "hard")},
            "n_queries": {"easy": 3, "medium": 3, "hard": 2}}


def metrics_of(name, value):
    """Hand-made metrics of test set ``name`` whose headline number is ``value``."""
    if name == "gldv2":
        return {"mAP@100": value}
    if name == "gldv2-top10":
        return {"mAP@10": value}
    return revisited_metrics(value + 10, value, value - 10)


def features(n, seed, dim=8):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


# ---------------------------------------------------------------------------------------- registry


def test_registry_is_in_the_papers_table_order_with_the_tables_labels():
    assert test_sets.names() == BUILT_IN
    assert [s.name for s in test_sets.specs()] == list(BUILT_IN)
    assert [test_sets.label(n) for n in BUILT_IN] == ["RParis", "ROxford", "GLDv2"]
    assert test_sets.label("mytest") == "mytest"  # an unregistered column keeps its name
    rox, gld = test_sets.get("roxford5k"), test_sets.get("gldv2")
    assert (rox.default_root, rox.synthetic_root) == ("./data/ROxfordParis", "ROxfordParis")
    assert (gld.default_root, gld.synthetic_root) == ("./data/GLDv2", "gldv2")
    assert [s.metric.name for s in test_sets.specs()] == ["mAP medium", "mAP medium", "mAP@100"]
    assert test_sets.get("rparis6k").root_files == (("gnd_rparis6k.pkl", "rparis6k/gnd_rparis6k.pkl"),)
    assert gld.root_files == ("gldv2_gallery_list.txt", "gldv2_{split}_query_list.txt",
                              "gldv2_{split}_query_gt.txt")


def test_unknown_name_is_one_line_error_listing_the_registered_sets():
    with pytest.raises(UserError) as exc:
        test_sets.get("oxford")
    assert str(exc.value) == "EVAL.DATASET: unknown test set 'oxford' (expected one of rparis6k, roxford5k, gldv2)"
    with pytest.raises(UserError) as exc:
        test_sets.get("paris", "--dataset", "or several of them separated by commas")
    assert str(exc.value) == ("--dataset: unknown test set 'paris' (expected one of rparis6k, roxford5k, gldv2, "
                              "or several of them separated by commas)")
    with pytest.raises(UserError) as exc:  # the same message from evaluation_jobs and load_test_set
        evaluation_jobs(load_config(None, ["EVAL.DATASET", "rparis6k,oxford"]))
    assert str(exc.value) == ("EVAL.DATASET: unknown test set 'oxford' (expected one of rparis6k, roxford5k, "
                              "gldv2, or several of them separated by commas)")
    with pytest.raises(UserError, match=r"^EVAL.DATASET: unknown test set 'oxford' \(expected one of rparis6k, "
                                        r"roxford5k, gldv2\)$"):
        load_test_set("oxford", "/nonexistent")


def test_register_refuses_a_taken_name_and_a_name_unfit_for_eval_dataset():
    rox = test_sets.get("roxford5k")
    with pytest.raises(ValueError, match="'roxford5k' is already registered"):
        test_sets.register(rox)
    for bad in ("a,b", "", "x/y", " rox"):
        with pytest.raises(ValueError, match="letters, digits"):
            dataclasses.replace(rox, name=bad)
    with pytest.raises(TypeError):
        test_sets.register({"name": "dict"})
    assert test_sets.names() == BUILT_IN


# ---------------------------------------------------------------------------------- headline numbers


def test_headline_is_medium_map_or_map_at_100_on_hand_made_metrics():
    rev, gld = revisited_metrics(71.5, 52.25, 30.0), {"mAP@100": 12.75}
    assert test_sets.get("roxford5k").headline(rev) == 52.25
    assert test_sets.get("rparis6k").headline(rev) == 52.25
    assert test_sets.get("gldv2").headline(gld) == 12.75
    # by the set's name, or by the headline the dict holds
    assert headline_value(rev) == headline_value(rev, "rparis6k") == 52.25
    assert headline_value(gld) == headline_value(gld, "gldv2") == 12.75
    assert headline_value(gld, "not-registered") == 12.75
    with pytest.raises(KeyError, match="no headline metric"):
        headline_value({"recall@1": 3.0})
    with pytest.raises(KeyError):
        headline_value(gld, "roxford5k")  # a revisited set's results hold E/M/H mAP
    result = {"dataset": "gldv2", "self_test": {"mAP@100": 40.0}, "cross_test": {"mAP@100": 30.5},
              "old_self_test": {"mAP@100": 20.0}}
    assert headline(result) == {"self": 40.0, "cross": 30.5, "old_self": 20.0}
    result = {"dataset": "roxford5k", "self_test": revisited_metrics(80.0, 60.0, 40.0)}
    assert headline(result) == {"self": 60.0}


# --------------------------------------------------------------------------------------- root layouts


@pytest.mark.slow
def test_missing_files_follow_the_documented_layouts(tiny_synthetic, tmp_path):
    for spec in test_sets.specs():
        root = tiny_synthetic / spec.synthetic_root
        for split in ("private", "public"):
            assert spec.missing_files(str(root), split) == []
    empty = str(tmp_path)
    assert test_sets.get("roxford5k").missing_files(empty) == [f"{empty}/gnd_roxford5k.pkl"]
    assert test_sets.get("gldv2").missing_files(empty, "public") == [
        f"{empty}/gldv2_gallery_list.txt", f"{empty}/gldv2_public_query_list.txt",
        f"{empty}/gldv2_public_query_gt.txt"]
    (tmp_path / "rparis6k").mkdir()
    (tmp_path / "rparis6k" / "gnd_rparis6k.pkl").write_bytes(b"")  # the revisitop download layout
    assert test_sets.get("rparis6k").missing_files(empty) == []


# ----------------------------------------------------------------------------- a registered test set


@pytest.fixture
def toy_sets():
    """Two sets registered for one test: roxford5k's object under another name and label, and the GLDv2
    loader scored with mAP@10; both unregistered afterwards."""
    toy = dataclasses.replace(test_sets.get("roxford5k"), name="toyoxford", label="ToyOx")
    top10 = dataclasses.replace(test_sets.get("gldv2"), name="gldv2-top10", label="GLDv2@10",
                                metric=test_sets.map_at_k(10))
    test_sets.register(toy)
    test_sets.register(top10)
    try:
        yield toy, top10
    finally:
        test_sets.unregister("toyoxford")
        test_sets.unregister("gldv2-top10")


@pytest.mark.slow
def test_registered_copy_of_roxford_gives_roxfords_numbers(toy_sets, tiny_synthetic):
    root = str(tiny_synthetic / "ROxfordParis")
    assert test_sets.names() == BUILT_IN + ("toyoxford", "gldv2-top10")  # new sets are the last columns
    rox, toy = load_test_set("roxford5k", root), load_test_set("toyoxford", root)
    assert (toy.name, toy.spec) == ("toyoxford", toy_sets[0]) and toy.is_revisited
    assert toy.query_paths == rox.query_paths and toy.gallery_paths == rox.gallery_paths
    np.testing.assert_array_equal(toy.query_boxes, rox.query_boxes)
    nq, ng = len(rox.query_paths), len(rox.gallery_paths)
    new_q, new_g, old_g = features(nq, 0), features(ng, 1), features(ng, 2)
    got = score(toy, new_q, new_g)
    assert got == score(rox, new_q, new_g)
    _, ranks = knn_search(new_q, new_g, k=None)  # the revisited protocol, computed directly
    want = revisited_ranking_metrics(ranks, rox.ground_truth)
    del want["per_query_ap"]
    assert got == want
    assert 0 < got["mAP"]["medium"] < 100
    curve = backfill_curve(toy, new_q, new_g, old_g, (0.0, 0.5, 1.0), seed=0)
    assert curve == backfill_curve(rox, new_q, new_g, old_g, (0.0, 0.5, 1.0), seed=0)
    assert curve["metric"] == "mAP medium" and curve["values"][-1] == got["mAP"]["medium"]


@pytest.mark.slow
def test_registered_set_with_its_own_metric(toy_sets, tiny_synthetic):
    root = str(tiny_synthetic / "gldv2")
    gld, top10 = load_test_set("gldv2", root, check_images=False), load_test_set("gldv2-top10", root)
    assert not top10.is_revisited and top10.query_boxes is None
    q, g = features(len(gld.query_paths), 3), features(len(gld.gallery_paths), 4)
    got = score(top10, q, g)
    _, ranks = knn_search(q, g, k=10)
    assert got == {"mAP@10": gldv2_map_at_k(ranks, gld.ground_truth, k=10)}
    assert headline_value(got) == headline_value(got, "gldv2-top10") == got["mAP@10"]
    assert score(gld, q, g)["mAP@100"] != got["mAP@10"]
    assert backfill_curve(top10, q, g, g, (1.0,), seed=0)["metric"] == "mAP@10"


def test_registered_set_is_accepted_by_eval_dataset_and_tabulated_with_its_label(toy_sets, tmp_path):
    cfg = load_config(None, ["EVAL.DATASET", "rparis6k,toyoxford", "EVAL.ROOT", "/r",
                             "EVAL.SAVE_DIR", str(tmp_path)])
    assert [(j.EVAL.DATASET, j.EVAL.SAVE_DIR) for j in evaluation_jobs(cfg)] == [
        ("rparis6k", str(tmp_path / "rparis6k")), ("toyoxford", str(tmp_path / "toyoxford"))]
    for model, cross in (("ind", 5.0), ("adv", 45.0)):
        for name in test_sets.names():
            folder = tmp_path / model / name
            folder.mkdir(parents=True)
            (folder / "results.json").write_text(json.dumps(
                {"dataset": name, "self_test": metrics_of(name, 50.0), "cross_test": metrics_of(name, cross),
                 "old_self_test": metrics_of(name, 40.0)}))
    table = collect_block(tmp_path / "ind", {"AdvBCT": tmp_path / "adv"})
    assert table["datasets"] == ["rparis6k", "roxford5k", "gldv2", "toyoxford", "gldv2-top10"]
    block = table["blocks"]["block"]
    assert block["old"]["self"] == [40.0] * 5
    assert block["independent"] == {"self": [50.0] * 5, "cross": [5.0] * 5}
    assert block["methods"]["AdvBCT"] == {"self": [50.0] * 5, "cross": [45.0] * 5}
    header = render_markdown(table).splitlines()[2]
    assert header == ("| model | RParis self / cross | ROxford self / cross | GLDv2 self / cross | "
                      "ToyOx self / cross | GLDv2@10 self / cross | P_up | P_comp | P_1 |")


def test_registered_sets_are_gone_afterwards():
    assert test_sets.names() == BUILT_IN
    with pytest.raises(UserError, match="unknown test set 'toyoxford'"):
        test_sets.get("toyoxford")
    assert test_sets.label("toyoxford") == "toyoxford"
