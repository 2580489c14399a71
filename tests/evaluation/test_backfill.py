"""Partial backfilling by image (ours) and by gallery batch (the original release), with hand-computed sets."""

import random

import numpy as np
import pytest

from advbct.config import load_config
from advbct.errors import UserError
from advbct.evaluation import backfill
from advbct.evaluation.backfill import backfill_gallery, refreshed_indices
from advbct.evaluation.backfill_report import _axis_and_labels, gather_curves, refresh_mode
from advbct.evaluation.evaluate import run_evaluation
from advbct.evaluation.protocol import TestSet as RetrievalSet  # aliased: pytest would collect Test*
from advbct.evaluation.protocol import backfill_curve, evaluate_models, headline_value, score
from advbct.evaluation.reporting import write_json_atomic

RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)


def release_refresh(n, ratio, batch, seed):
    """The release's loop, transcribed: a sequential loader of ``batch`` images, ``random.seed`` then
    ``random.sample`` of ``int(ratio * n_batches)`` batch numbers, batch i refreshed iff ``i in list``.
    The global ``random`` state is put back afterwards."""
    state = random.getstate()
    try:
        starts = list(range(0, n, batch))
        refresh_list = []
        if ratio != 0:
            random.seed(seed)
            refresh_list = random.sample(range(0, len(starts)), int(ratio * len(starts)))
    finally:
        random.setstate(state)
    rows = []
    for i, start in enumerate(starts):
        if ratio != 0 and i in refresh_list:
            rows.extend(range(start, min(start + batch, n)))
    return rows


def block(lo, hi):
    return list(range(lo, hi))


# ------------------------------------------------------------------------------------ batch mode


# 50 images in batches of 16: batches 0-15, 16-31, 32-47 and the partial 48-49. random.seed(100) then
# random.sample(range(4), k) draws [1], [1, 3], [1, 3, 2], [1, 3, 2, 0] for k = 1..4.
BATCH_50 = {
    0.0: [],
    0.25: block(16, 32),
    0.5: block(16, 32) + [48, 49],
    0.75: block(16, 50),
    1.0: block(0, 50),
}


@pytest.mark.parametrize("ratio", sorted(BATCH_50))
def test_batch_mode_hand_computed_sets_of_50_images(ratio):
    got = refreshed_indices(50, ratio, unit="batch", batch=16, seed=100)
    assert got.tolist() == BATCH_50[ratio]
    assert got.tolist() == release_refresh(50, ratio, 16, 100)
    assert refreshed_indices(50, ratio, unit="batch", batch=16, seed=-1).tolist() == BATCH_50[ratio]  # -1 = 100


@pytest.mark.parametrize("n,batch,seed", [(50, 16, 100), (7, 1, 100), (1000, 16, 100), (761, 16, 3),
                                          (33, 5, 0), (5, 16, 100)])
def test_batch_mode_equals_the_release_loop(n, batch, seed):
    for ratio in RATIOS + (0.1, 0.29, 0.6, 0.9):
        assert refreshed_indices(n, ratio, "batch", batch, seed).tolist() == release_refresh(n, ratio, batch, seed)


def test_batch_mode_truncates_the_batch_count():
    # 7 batches of 1 image: int(0.5 * 7) = 3 batches (round() would give 4); seed 100 draws [1, 3, 5].
    assert refreshed_indices(7, 0.5, "batch", 1, 100).tolist() == [1, 3, 5]
    # 0.29 * 100 is 28.999999999999996 in floating point: the release's int() keeps 28 batches.
    assert len(refreshed_indices(100, 0.29, "batch", 1, 100)) == 28


def test_batch_mode_refreshes_the_last_partial_batch_whole():
    # 50 images, batch 16: at ratio 0.5 the draw includes batch 3, the 2 images 48 and 49, and nothing else
    # past the third full batch.
    got = set(refreshed_indices(50, 0.5, "batch", 16, 100).tolist())
    assert {48, 49} <= got and not got & set(range(32, 48))
    # a gallery smaller than one batch: one partial batch, refreshed whole or not at all
    assert refreshed_indices(5, 0.99, "batch", 16, 100).tolist() == []  # int(0.99 * 1) = 0
    assert refreshed_indices(5, 1.0, "batch", 16, 100).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("unit", ["image", "batch"])
def test_end_points_and_the_global_random_stream_is_left_alone(unit):
    random.seed(12345)
    want = random.random()
    random.seed(12345)
    assert refreshed_indices(40, 0.0, unit, 16).tolist() == []
    assert refreshed_indices(40, 1.0, unit, 16).tolist() == block(0, 40)
    refreshed_indices(40, 0.5, unit, 16)
    assert random.random() == want


# ------------------------------------------------------------------------------------ image mode


# np.random.default_rng(0).permutation(10) = [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]; round(2.5) = 2 and
# round(7.5) = 8 (round half to even), the first that many refreshed.
IMAGE_10 = {0.0: [], 0.25: [4, 6], 0.5: [2, 3, 4, 6, 7], 0.75: [0, 2, 3, 4, 5, 6, 7, 9], 1.0: block(0, 10)}


@pytest.mark.parametrize("ratio", sorted(IMAGE_10))
def test_image_mode_default_seed_is_the_previous_seed_0(ratio):
    assert refreshed_indices(10, ratio).tolist() == IMAGE_10[ratio]
    assert refreshed_indices(10, ratio, "image", 16, -1).tolist() == IMAGE_10[ratio]
    assert refreshed_indices(10, ratio, "image", 16, 0).tolist() == IMAGE_10[ratio]
    # the batch size plays no part in image mode
    assert refreshed_indices(10, ratio, "image", 3, -1).tolist() == IMAGE_10[ratio]


def test_backfill_gallery_takes_exactly_the_refreshed_rows():
    old = np.zeros((50, 2), np.float32)
    new = np.arange(100, dtype=np.float32).reshape(50, 2) + 1
    mixed = backfill_gallery(new, old, 0.5, unit="batch", batch=16)
    from_new = np.flatnonzero((mixed == new).all(axis=1)).tolist()
    assert from_new == BATCH_50[0.5]
    assert (mixed[[i for i in range(50) if i not in from_new]] == 0).all()


# ------------------------------------------------------------------------------- the curve by hand


def hand_case():
    """One query, 5 gallery images in batches of 2 (0-1, 2-3, 4); the positives are images 0 and 1.
    New model: positives cos 1, negatives cos 0. Old model: positives cos -1, negatives cos 0.71."""
    ts = RetrievalSet("roxford5k", ["q.jpg"], [f"g{i}.jpg" for i in range(5)],
                      [{"easy": np.array([0, 1]), "hard": np.array([], np.int64), "junk": np.array([], np.int64)}])
    query = np.array([[1.0, 0.0]], np.float32)
    new_g = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 1]], np.float32)
    old_g = np.array([[-1, 0], [-1, 0], [1, 1], [1, 1], [1, 1]], np.float32)
    return ts, query, new_g, old_g


def test_backfill_curve_batch_mode_scores_the_hand_built_galleries():
    ts, query, new_g, old_g = hand_case()
    curve = backfill_curve(ts, query, new_g, old_g, RATIOS, seed=-1, unit="batch", batch=2)
    # 3 batches; int(ratio * 3) = 0, 0, 1, 2, 3 batches; random.seed(100) draws [0] then [0, 1]
    refreshed = {0.0: [], 0.25: [], 0.5: [0, 1], 0.75: [0, 1, 2, 3], 1.0: [0, 1, 2, 3, 4]}
    for value, ratio in zip(curve["values"], RATIOS):
        mixed = old_g.copy()
        mixed[refreshed[ratio]] = new_g[refreshed[ratio]]
        assert value == pytest.approx(headline_value(score(ts, query, mixed)), abs=1e-12)
    # revisitop AP (trapezoid): positives at ranks 4, 5 -> (1/4 / 2 + (1/4 + 2/5) / 2) / 2 = 22.5 %;
    # at ranks 1, 2 -> 100 %
    assert curve["values"] == pytest.approx([22.5, 22.5, 100.0, 100.0, 100.0], abs=1e-9)
    assert {k: curve[k] for k in ("unit", "batch", "seed", "metric")} == {
        "unit": "batch", "batch": 2, "seed": 100, "metric": "mAP medium"}


def test_backfill_curve_image_mode_differs_and_records_its_seed():
    ts, query, new_g, old_g = hand_case()
    curve = backfill_curve(ts, query, new_g, old_g, RATIOS)
    # permutation(5) with seed 0 = [2, 4, 3, 0, 1]: 0.5 -> {2, 4} (positives still last), 0.75 -> {0, 2, 3, 4}
    # (positive 0 first, positive 1 last: (1 + (1/4 + 2/5) / 2) / 2 = 66.25 %)
    assert curve["values"] == pytest.approx([22.5, 22.5, 22.5, 66.25, 100.0], abs=1e-9)
    assert curve["unit"] == "image" and curve["seed"] == 0 and "batch" not in curve
    assert backfill_curve(ts, query, new_g, old_g, [0.5], seed=7)["seed"] == 7


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("key,value,match", [
    ("EVAL.BACKFILL_UNIT", "foo", "EVAL.BACKFILL_UNIT 'foo': expected image, batch or most_changed"),
    ("EVAL.BACKFILL_UNITS", "[image, foo]", "^EVAL.BACKFILL_UNITS 'foo': expected image, batch or most_changed$"),
    ("EVAL.BACKFILL_UNITS", "[batch, image, batch]", "^EVAL.BACKFILL_UNITS: 'batch' is named twice"),
    ("EVAL.BACKFILL_UNIT", "Batch", "EVAL.BACKFILL_UNIT 'Batch'"),
    ("EVAL.BACKFILL_BATCH", "0", "EVAL.BACKFILL_BATCH 0: expected"),
    ("EVAL.BACKFILL_BATCH", "-16", "EVAL.BACKFILL_BATCH -16: expected"),
    ("EVAL.BACKFILL_SEED", "-2", "EVAL.BACKFILL_SEED -2: expected"),
    ("EVAL.BACKFILL_RATIOS", "[0, 1.5]", "EVAL.BACKFILL_RATIOS: ratio 1.5 is outside"),
])
def test_bad_settings_fail_before_anything_is_embedded(key, value, match):
    cfg = load_config(overrides=["EVAL.BACKFILL", "true", key, value])
    untouchable = object()  # any use of a model or the test set would raise AttributeError instead
    with pytest.raises(UserError, match=match) as info:
        evaluate_models(untouchable, untouchable, cfg, progress=False, test_set=untouchable)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=match):
        run_evaluation(cfg)  # before the process group, the test sets and the checkpoints


def test_settings_are_only_checked_when_the_curve_is_asked_for():
    cfg = load_config(overrides=["EVAL.BACKFILL_UNIT", "foo"])
    backfill.check_config(cfg)  # EVAL.BACKFILL false: nothing to refresh, nothing to check
    cfg.EVAL.BACKFILL = True
    with pytest.raises(UserError, match="BACKFILL_UNIT"):
        backfill.check_config(cfg)


@pytest.mark.parametrize("kw,match", [
    (dict(unit="images"), "BACKFILL_UNIT"),
    (dict(batch=0), "BACKFILL_BATCH"),
    (dict(batch=2.0), "BACKFILL_BATCH"),
    (dict(seed=-5), "BACKFILL_SEED"),
])
def test_direct_calls_check_their_arguments(kw, match):
    with pytest.raises(UserError, match=match):
        refreshed_indices(10, 0.5, **kw)


def test_curve_checks_every_ratio_before_scoring():
    ts, query, new_g, old_g = hand_case()
    with pytest.raises(UserError, match="ratio -0.1 is outside"):
        backfill_curve(ts, query, new_g, old_g, [0.0, -0.1], unit="batch", batch=2)


# --------------------------------------------------------------------------------------- reports


def test_report_reads_old_and_new_entries_and_labels_the_mode(tmp_path):
    old_entry = {"ratios": [0.0, 1.0], "values": [1.0, 2.0], "metric": "mAP medium"}
    new_entry = dict(old_entry, unit="batch", batch=16, seed=100)
    for model, entry in (("bct", old_entry), ("advbct", new_entry)):
        write_json_atomic(str(tmp_path / model / "roxford5k" / "results.json"),
                          {"dataset": "roxford5k", "backfill": entry})
    curves = gather_curves(str(tmp_path))
    assert curves == {"roxford5k": {"bct": old_entry, "advbct": new_entry}}
    assert refresh_mode(new_entry) == "batches of 16, seed 100" and refresh_mode(old_entry) is None
    assert refresh_mode(dict(old_entry, unit="image", seed=0)) == "images, seed 0"
    xlabel, labels = _axis_and_labels(curves["roxford5k"])
    assert labels == {"bct": "BCT (unit not recorded)", "advbct": "AdvBCT (batches of 16, seed 100)"}
    xlabel, labels = _axis_and_labels({"advbct": new_entry, "lce": new_entry})
    assert xlabel.endswith("(batches of 16, seed 100)") and labels == {"advbct": "AdvBCT", "lce": "LCE"}
