"""Backfilling curves you can plan: area under the curve, negative-flip rates, the most_changed order, the
EVAL.BACKFILL_UNITS key and the units report; hand-computed cases and brute-force references."""

import json

import numpy as np
import pytest

from advbct.config import load_config
from advbct.errors import UserError
from advbct.evaluation import backfill
from advbct.evaluation.backfill import area_under_curve, backfill_gallery, change_order, refreshed_indices
from advbct.evaluation.backfill_report import gather_unit_curves, unit_legend_labels, write_backfill_report
from advbct.evaluation.metrics import negative_flip_rate
from advbct.evaluation.protocol import TestSet as RetrievalSet  # aliased: pytest would collect Test*
from advbct.evaluation.protocol import backfill_curve, evaluate_models, headline_value, score, score_models, \
    top1_hits
from advbct.io import write_json_atomic


def revisited(gnd, n_gallery, name="roxford5k"):
    return RetrievalSet(name, [f"q{i}.jpg" for i in range(len(gnd))], [f"g{i}.jpg" for i in range(n_gallery)],
                        gnd)


def entry(easy=(), hard=(), junk=()):
    return {k: np.array(v, np.int64) for k, v in (("easy", easy), ("hard", hard), ("junk", junk))}


# ------------------------------------------------------------------------------------- area under curve


def test_auc_hand_computed():
    # trapezoids 0.5 * (10 + 30) / 2 + 0.5 * (30 + 20) / 2 = 10 + 12.5 over a span of 1
    assert area_under_curve([0.0, 0.5, 1.0], [10.0, 30.0, 20.0]) == pytest.approx(22.5, abs=1e-12)
    # unsorted: (0.25, 20), (0.5, 60), (0.75, 40) -> 0.25 * 40 + 0.25 * 50 = 22.5, over a span of 0.5 -> 45
    assert area_under_curve([0.25, 0.75, 0.5], [20.0, 40.0, 60.0]) == pytest.approx(45.0, abs=1e-12)
    assert area_under_curve([0.3], [7.0]) == 7.0  # a single ratio: its value
    with pytest.raises(ValueError):
        area_under_curve([0.0, 1.0], [1.0])


def test_auc_equals_numpy_trapezoid_on_random_unsorted_curves():
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 12):
        ratios = rng.permutation(np.round(rng.uniform(0, 1, n), 3))
        values = rng.uniform(0, 100, n)
        order = np.argsort(ratios)
        want = trapezoid(values[order], ratios[order]) / (ratios.max() - ratios.min())
        assert area_under_curve(ratios.tolist(), values.tolist()) == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------ negative flips by hand

# One-hot galleries: the similarity of a query to gallery image i is the query's i-th entry (up to the norm),
# so each ranking is read off the query rows. 6 images, 4 queries:
#   q0: easy 0, hard 1, junk 2;  q1: easy 3;  q2: junk 4 only (no positive: not counted);  q3: easy 5, junk 0, 1
REV_GND = [entry([0], [1], [2]), entry([3]), entry(junk=[4]), entry([5], [], [0, 1])]
OLD_Q = np.array([[0.8, 0.1, 0.9, 0.2, 0.3, 0.4],    # 2 (junk), then 0: positive
                  [0.1, 0.2, 0.3, 0.5, 0.9, 0.4],    # 4: not a positive
                  [0.9, 0.2, 0.3, 0.4, 0.5, 0.6],    # not counted
                  [0.9, 0.8, 0.1, 0.2, 0.3, 0.7]],   # 0, 1 (junk), then 5: positive
                 np.float32)
NEW_Q = np.array([[0.1, 0.2, 0.9, 0.3, 0.8, 0.4],
                  [0.1, 0.2, 0.3, 0.9, 0.4, 0.5],
                  [0.5, 0.6, 0.1, 0.2, 0.3, 0.4],
                  [0.3, 0.9, 0.2, 0.1, 0.4, 0.8]], np.float32)
OLD_G = np.eye(6, dtype=np.float32)
NEW_G = np.eye(6, dtype=np.float32)[[5, 1, 2, 3, 4, 0]]  # images 0 and 5 swap directions


def test_revisited_top1_skips_junk_and_counts_queries_with_positives():
    ts = revisited(REV_GND, 6)
    hit, counted = top1_hits(ts, OLD_Q, OLD_G)
    assert counted.tolist() == [True, True, False, True]
    assert hit[counted].tolist() == [True, False, True]
    # new/old: q0 -> 2 (junk), 4 miss; q1 -> 3 hit; q3 -> 1 (junk), 5 hit
    assert top1_hits(ts, NEW_Q, OLD_G)[0][counted].tolist() == [False, True, True]
    # new/new: q3 sees image 0 at 0.8 (junk) and image 5 at 0.3: 1, 0 (junk), then 4 (0.4): miss
    assert top1_hits(ts, NEW_Q, NEW_G)[0][counted].tolist() == [False, True, False]


def test_revisited_negative_flip_hand_computed():
    ts = revisited(REV_GND, 6)
    # old hits q0, q3 (q1 missed: its new hit is a positive flip, not counted); cross loses q0: 1 of 3;
    # new/new loses q0 and q3: 2 of 3. most_changed refreshes images 0 and 5 (distance sqrt 2) first, then
    # ties by index (image 1, whose embedding did not move): at 0.5 the gallery ranks as the new one.
    curve = backfill_curve(ts, NEW_Q, NEW_G, OLD_G, [0.0, 0.5, 1.0], unit="most_changed", old_self=(OLD_Q, OLD_G))
    assert curve["negative_flip"] == pytest.approx([100 / 3, 200 / 3, 200 / 3], abs=1e-9)
    assert curve["unit"] == "most_changed" and "seed" not in curve and "batch" not in curve
    assert curve["auc"] == pytest.approx(area_under_curve([0.0, 0.5, 1.0], curve["values"]), abs=1e-12)


def test_most_changed_sorts_the_gallery_once_per_curve(monkeypatch):
    """The order does not depend on the ratio: one change_order per curve, and the curve is the one of the
    mixed galleries made ratio by ratio from the galleries themselves."""
    ts, ratios = revisited(REV_GND, 6), [0.0, 0.25, 0.5, 0.75, 1.0]
    want = [headline_value(score(ts, NEW_Q, backfill_gallery(NEW_G, OLD_G, r, unit="most_changed")))
            for r in ratios]
    calls = []
    real = backfill.change_order
    monkeypatch.setattr(backfill, "change_order", lambda *a: calls.append(1) or real(*a))
    curve = backfill_curve(ts, NEW_Q, NEW_G, OLD_G, ratios, unit="most_changed", old_self=(OLD_Q, OLD_G))
    assert len(calls) == 1 and curve["values"] == want


def test_gldv2_negative_flip_hand_computed():
    # 5 one-hot gallery images; q0 relevant {1}, q1 {2, 3}, q2 none (not counted), q3 {4}
    gt = [np.array([1]), np.array([2, 3]), np.array([], np.int64), np.array([4])]
    ts = RetrievalSet("gldv2", [f"q{i}" for i in range(4)], [f"g{i}" for i in range(5)], gt)
    gallery = np.eye(5, dtype=np.float32)
    old_q = np.array([[.1, .9, .2, .3, .4], [.9, .1, .2, .3, .4], [.1, .2, .3, .4, .9], [.1, .2, .3, .4, .9]],
                     np.float32)   # top-1: 1 (hit), 0 (miss), -, 4 (hit)
    new_q = np.array([[.9, .8, .2, .3, .4], [.1, .2, .3, .9, .4], [.9, .2, .3, .4, .1], [.1, .2, .3, .4, .9]],
                     np.float32)   # top-1: 0 (miss: a flip), 3 (hit), -, 4 (hit)
    old_hit, counted = top1_hits(ts, old_q, gallery)
    new_hit, _ = top1_hits(ts, new_q, gallery)
    assert counted.tolist() == [True, True, False, True]
    assert negative_flip_rate(old_hit, new_hit, counted) == pytest.approx(100 / 3, abs=1e-9)
    curve = backfill_curve(ts, new_q, gallery, gallery, [0.0, 1.0], old_self=(old_q, gallery))
    assert curve["negative_flip"] == pytest.approx([100 / 3, 100 / 3], abs=1e-9)
    assert negative_flip_rate([True], [False], [False]) != negative_flip_rate([True], [False], [False])  # NaN


# --------------------------------------------------------------------------- brute-force reference


def brute_top1(query, gallery, positives, junk):
    """Per query, by a plain loop: cosine similarities in float64, the best non-junk image, in positives?"""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    hits = []
    for i in range(len(q)):
        order = np.argsort(-(g.astype(np.float64) @ q[i].astype(np.float64)), kind="stable")
        top = next(int(j) for j in order if int(j) not in junk[i])
        hits.append(top in positives[i])
    return hits


def brute_flip(old_hits, new_hits, positives):
    counted = [i for i, p in enumerate(positives) if p]
    return 100.0 * sum(old_hits[i] and not new_hits[i] for i in counted) / len(counted)


def random_case(rng, kind, n_query=12, n_gallery=40, dim=8):
    """A random set of ``kind``, its per-query positives and junk as Python sets, and old/new features."""
    gnd, positives, junk = [], [], []
    for i in range(n_query):
        ids = rng.permutation(n_gallery)
        n_pos = 0 if i % 5 == 0 else int(rng.integers(1, 5))  # every fifth query has no positive
        if kind == "revisited":
            e = entry(ids[:n_pos // 2], ids[n_pos // 2:n_pos], ids[n_pos:n_pos + int(rng.integers(0, 6))])
            gnd.append(e)
            positives.append(set(e["easy"].tolist()) | set(e["hard"].tolist()))
            junk.append(set(e["junk"].tolist()))
        else:
            gnd.append(ids[:n_pos].astype(np.int64))
            positives.append(set(gnd[-1].tolist()))
            junk.append(set())
    ts = (revisited(gnd, n_gallery) if kind == "revisited" else
          RetrievalSet("gldv2", [f"q{i}" for i in range(n_query)], [f"g{i}" for i in range(n_gallery)], gnd))
    # queries near one of their positives (or a random image), each model with its own noise: some old/old
    # top-1 hits, some of them lost by the new queries, so that there are flips to count
    base = rng.standard_normal((n_gallery, dim))
    near = [rng.choice(sorted(p)) if p else rng.integers(n_gallery) for p in positives]
    noisy = lambda x, s: (x + s * rng.standard_normal(x.shape)).astype(np.float32)  # noqa: E731
    feats = [noisy(base[near], 0.9), noisy(base, 0.4), noisy(base[near], 0.9), noisy(base, 0.4)]
    return ts, positives, junk, feats


@pytest.mark.parametrize("kind", ["revisited", "gldv2"])
def test_negative_flip_matches_a_brute_force_reference(kind):
    rng = np.random.default_rng(7 if kind == "revisited" else 8)
    ts, positives, junk, (new_q, new_g, old_q, old_g) = random_case(rng, kind)
    ratios = [0.0, 0.3, 0.6, 1.0]
    old_hits = brute_top1(old_q, old_g, positives, junk)
    for unit in ("image", "most_changed"):
        curve = backfill_curve(ts, new_q, new_g, old_g, ratios, unit=unit, old_self=(old_q, old_g))
        want = [brute_flip(old_hits, brute_top1(new_q, backfill_gallery(new_g, old_g, r, unit=unit), positives,
                                                junk), positives) for r in ratios]
        assert curve["negative_flip"] == pytest.approx(want, abs=1e-9)
        assert 0 < max(want)  # the case has flips to count


# ------------------------------------------------------------------------------------ most_changed


def test_most_changed_order_hand_computed_with_ties_by_index():
    old = np.eye(4, dtype=np.float32)
    new = old.copy()
    new[1], new[3] = [0, 0, 1, 0], [1, 0, 0, 0]     # rows 1 and 3: distance sqrt 2 (a tie)
    new[2] = [0, 0, 1, 1]                           # row 2: distance sqrt(2 - sqrt 2)
    assert change_order(old, 3 * new).tolist() == [1, 3, 2, 0]  # scale does not matter: L2-normalised
    assert refreshed_indices(4, 0.25, "most_changed", galleries=(old, new)).tolist() == [1]
    assert refreshed_indices(4, 0.5, "most_changed", galleries=(old, new)).tolist() == [1, 3]
    with pytest.raises(ValueError, match="most_changed needs galleries"):
        refreshed_indices(4, 0.5, "most_changed")


def test_most_changed_takes_the_largest_distances_nested():
    rng = np.random.default_rng(3)
    n = 50
    old, new = rng.standard_normal((n, 6)), rng.standard_normal((n, 6))
    new[::4] = 2 * old[::4] + 1e-3 * rng.standard_normal((len(new[::4]), 6))  # barely moved rows
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    distance = np.linalg.norm(unit(old) - unit(new), axis=1)
    before = set()
    for ratio in np.linspace(0, 1, 11):
        rows = refreshed_indices(n, ratio, "most_changed", galleries=(old, new))
        k = int(round(ratio * n))
        assert set(rows.tolist()) == set(np.argsort(-distance)[:k].tolist())
        assert len(rows) == k and before <= set(rows.tolist())
        before = set(rows.tolist())
    old32, new32 = old.astype(np.float32), new.astype(np.float32)
    np.testing.assert_array_equal(backfill_gallery(new32, old32, 0.0, unit="most_changed"), old32)
    np.testing.assert_array_equal(backfill_gallery(new32, old32, 1.0, unit="most_changed"), new32)


# ------------------------------------------------------------------------- EVAL.BACKFILL_UNITS


@pytest.mark.parametrize("units,match", [
    ("[image, foo]", "EVAL.BACKFILL_UNITS 'foo': expected image, batch or most_changed"),
    ("[most_changed, image, most_changed]",
     "EVAL.BACKFILL_UNITS: 'most_changed' is named twice (each unit's curve is computed once)"),
])
def test_units_key_errors_are_one_line_before_anything_is_embedded(units, match):
    cfg = load_config(overrides=["EVAL.BACKFILL", "true", "EVAL.BACKFILL_UNITS", units])
    with pytest.raises(UserError) as info:
        backfill.check_config(cfg)
    assert str(info.value) == match
    untouchable = object()  # any use of a model or the test set would raise AttributeError instead
    with pytest.raises(UserError) as info:
        evaluate_models(untouchable, untouchable, cfg, progress=False, test_set=untouchable)
    assert str(info.value) == match


def old_curve(ts, new_q, new_g, cross_g, ratios, unit, batch, seed=-1):
    """The curve as it was computed before auc and negative flips: headline per mixed gallery."""
    values = [headline_value(score(ts, new_q, backfill_gallery(new_g, cross_g, r, seed, unit, batch)))
              for r in ratios]
    return {"ratios": list(ratios), "values": values, "metric": ts.kind.metric.name,
            **backfill.describe(unit, batch, seed)}


def test_score_models_adds_unit_curves_and_leaves_backfill_as_it_was():
    rng = np.random.default_rng(11)
    ts, positives, junk, (new_q, new_g, old_q, old_g) = random_case(rng, "revisited", n_gallery=30)
    cross_g = old_g + 0.5 * rng.standard_normal(old_g.shape).astype(np.float32)  # e.g. a mapped old gallery
    ratios = [0.0, 0.5, 1.0]
    cfg = load_config(overrides=["EVAL.BACKFILL", "true", "EVAL.BACKFILL_UNIT", "batch", "EVAL.BACKFILL_BATCH", "4",
                                 "EVAL.BACKFILL_RATIOS", "[0.0, 0.5, 1.0]",
                                 "EVAL.BACKFILL_UNITS", "[most_changed, batch, image]"])
    result = score_models(ts, cfg, new_q, new_g, old_q, old_g, cross_g=cross_g)
    before = old_curve(ts, new_q, new_g, cross_g, ratios, "batch", 4)
    assert {k: v for k, v in result["backfill"].items() if k not in ("auc", "negative_flip")} == before
    assert list(result["backfill_units"]) == ["most_changed", "batch", "image"]
    assert result["backfill_units"]["batch"] == result["backfill"]
    old_hits = brute_top1(old_q, old_g, positives, junk)  # old/old: old_q against old_g, not cross_g
    for unit, curve in result["backfill_units"].items():
        want = old_curve(ts, new_q, new_g, cross_g, ratios, unit, 4)
        assert {k: curve[k] for k in want} == want
        assert curve["auc"] == pytest.approx(area_under_curve(ratios, want["values"]), abs=1e-12)
        flips = [brute_flip(old_hits, brute_top1(new_q, backfill_gallery(new_g, cross_g, r, -1, unit, 4),
                                                 positives, junk), positives) for r in ratios]
        assert curve["negative_flip"] == pytest.approx(flips, abs=1e-9)
    assert result["negative_flip"] == pytest.approx({
        "cross_test": brute_flip(old_hits, brute_top1(new_q, cross_g, positives, junk), positives),
        "self_test": brute_flip(old_hits, brute_top1(new_q, new_g, positives, junk), positives)}, abs=1e-9)
    cfg.EVAL.BACKFILL_UNITS = []
    assert "backfill_units" not in score_models(ts, cfg, new_q, new_g, old_q, old_g, cross_g=cross_g)


# ---------------------------------------------------------------------------------------- report


def curve(unit, values, **extra):
    return {"ratios": [0.0, 0.5, 1.0], "values": values, "metric": "mAP medium", "unit": unit, **extra}


def test_units_report_two_models_two_units(tmp_path):
    units = {"advbct": {"image": curve("image", [10.0, 20.0, 40.0], seed=0, auc=22.5),
                        "most_changed": curve("most_changed", [10.0, 30.0, 40.0])},   # auc to be filled in: 27.5
             "bct": {"image": curve("image", [5.0, 6.0, 7.0], seed=0, auc=6.0),
                     "most_changed": curve("most_changed", [5.0, 7.0, 7.0], auc=6.5)}}
    for model, per_unit in units.items():
        write_json_atomic(str(tmp_path / "eval" / model / "roxford5k" / "results.json"),
                          {"dataset": "roxford5k", "backfill": per_unit["image"], "backfill_units": per_unit})
    write_json_atomic(str(tmp_path / "eval" / "lce" / "roxford5k" / "results.json"),  # no units: not in them
                      {"dataset": "roxford5k", "backfill": units["bct"]["image"]})
    out = str(tmp_path / "report" / "backfill")
    written = write_backfill_report(str(tmp_path / "eval"), out)
    got = json.loads((tmp_path / "report" / "backfill_units.json").read_text())
    want = {"roxford5k": {m: {u: dict(c, auc=c.get("auc", 27.5)) for u, c in per.items()}
                          for m, per in units.items()}}
    assert got == want and got == gather_unit_curves(str(tmp_path / "eval"))
    plain = json.loads((tmp_path / "report" / "backfill.json").read_text())
    assert plain == {"roxford5k": {"advbct": units["advbct"]["image"], "bct": units["bct"]["image"],
                                   "lce": units["bct"]["image"]}}
    assert unit_legend_labels(got) == {"image": "image: images, seed 0",
                                       "most_changed": "most_changed: most changed images first"}
    pytest.importorskip("matplotlib")
    assert written == [out + ".json", out + "_units.json", out + ".png", out + "_units.png"]
    png = (tmp_path / "report" / "backfill_units.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_no_unit_curves_no_units_files(tmp_path):
    write_json_atomic(str(tmp_path / "m" / "gldv2" / "results.json"),
                      {"dataset": "gldv2", "backfill": curve("image", [1.0, 2.0, 3.0], seed=0)})
    written = write_backfill_report(str(tmp_path), str(tmp_path / "b"))
    assert [w for w in written if w.endswith(".json")] == [str(tmp_path / "b.json")]
    assert not (tmp_path / "b_units.json").exists() and not (tmp_path / "b_units.png").exists()


def test_each_results_file_is_read_once(tmp_path, monkeypatch):
    from advbct.evaluation import backfill_report

    write_json_atomic(str(tmp_path / "m" / "gldv2" / "results.json"),
                      {"dataset": "gldv2", "backfill": curve("image", [1.0, 2.0, 3.0], seed=0),
                       "backfill_units": {"most_changed": curve("most_changed", [1.0, 2.5, 3.0])}})
    reads = []
    real = backfill_report.read_results
    monkeypatch.setattr(backfill_report, "read_results", lambda p: reads.append(p) or real(p))
    write_backfill_report(str(tmp_path), str(tmp_path / "b"))
    assert reads == [str(tmp_path / "m" / "gldv2" / "results.json")]


@pytest.mark.parametrize("entries, expect", [
    ({"backfill_units": ["image"]}, "backfill_units: expected a mapping of refresh unit -> curve, got list"),
    ({"backfill_units": {"image": {"values": [1.0]}}},
     "backfill_units['image']: expected a curve with lists 'ratios' and 'values' of one length"),
    ({"backfill_units": {"image": {"ratios": [0.0, 1.0], "values": [1.0]}}},
     "backfill_units['image']: expected a curve with lists 'ratios' and 'values' of one length"),
    ({"backfill_units": {"batch": {"ratios": [0.0], "values": [1.0], "seed": 100}}},
     "backfill_units['batch']: a batch curve records its batch"),
    ({"backfill": {"ratios": [0.0], "values": [1.0, 2.0]}},
     "backfill: expected a curve with lists 'ratios' and 'values' of one length"),
])
def test_a_malformed_results_file_is_refused_in_one_line(tmp_path, entries, expect):
    """A hand-edited or truncated results.json: one line naming the file and its entry, nothing written."""
    path = tmp_path / "eval" / "m" / "gldv2" / "results.json"
    write_json_atomic(str(path), {"dataset": "gldv2", "backfill": curve("image", [1.0, 2.0, 3.0], seed=0),
                                  **entries})
    with pytest.raises(UserError) as err:
        write_backfill_report(str(tmp_path / "eval"), str(tmp_path / "b"))
    assert str(err.value) == f"{path}: {expect}"
    assert not list(tmp_path.glob("b*"))


def test_a_metric_without_a_top1_rule_records_no_flips():
    from advbct.evaluation.test_sets import GLDV2_MAP, Metric, TestSetSpec, get

    plain = Metric(GLDV2_MAP.name, GLDV2_MAP.headline_key, GLDV2_MAP.compute)  # no top1 declared
    spec = TestSetSpec(**{**get("gldv2").__dict__, "name": "plain-lists", "metric": plain})
    rng = np.random.default_rng(5)
    gt = [rng.choice(20, 2, replace=False) for _ in range(4)]
    ts = RetrievalSet("plain-lists", list("abcd"), [f"g{i}" for i in range(20)], gt, spec=spec)
    new_q, new_g, old_q, old_g = (rng.standard_normal((n, 4)).astype(np.float32) for n in (4, 20, 4, 20))
    cfg = load_config(overrides=["EVAL.BACKFILL", "true", "EVAL.BACKFILL_UNITS", "[image]"])
    result = score_models(ts, cfg, new_q, new_g, old_q, old_g)
    assert "negative_flip" not in result and "negative_flip" not in result["backfill"]
    assert result["backfill"]["auc"] == pytest.approx(area_under_curve(result["backfill"]["ratios"],
                                                                       result["backfill"]["values"]))
