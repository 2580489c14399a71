"""The compatibility protocol: partial backfilling, score() on hand-made features, feature checks."""

import numpy as np
import pytest

from advbct.errors import UserError
from advbct.evaluation.protocol import TestSet as RetrievalSet  # aliased: pytest would collect Test*
from advbct.evaluation.protocol import (
    backfill_curve,
    backfill_gallery,
    check_features,
    headline_value,
    score,
)

RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)


def revisited_set(gnd, n_gallery, name="roxford5k"):
    """A revisited TestSet whose ground truth is ``gnd`` (images are never opened by score())."""
    return RetrievalSet(name, [f"q{i}.jpg" for i in range(len(gnd))], [f"g{i}.jpg" for i in range(n_gallery)],
                   [{k: np.asarray(g.get(k, []), dtype=np.int64) for k in ("easy", "hard", "junk")}
                    for g in gnd])


def gldv2_set(gt, n_gallery):
    return RetrievalSet("gldv2", [f"q{i}.jpg" for i in range(len(gt))], [f"g{i}.jpg" for i in range(n_gallery)],
                   [np.asarray(g, dtype=np.int64) for g in gt])


def refreshed_rows(mixed, new, old):
    """Indices of the rows taken from ``new``; every row must be exactly one of old/new."""
    from_new = (mixed == new).all(axis=1)
    from_old = (mixed == old).all(axis=1)
    assert (from_new ^ from_old).all(), "a backfilled row is neither the old nor the new embedding"
    return set(np.flatnonzero(from_new).tolist())


# ------------------------------------------------------------------------------------- backfilling


@pytest.mark.parametrize("n", [7, 12, 13])
def test_backfill_gallery_end_points_counts_and_nesting(n):
    rng = np.random.default_rng(n)
    old = rng.standard_normal((n, 5)).astype(np.float32)
    new = rng.standard_normal((n, 5)).astype(np.float32)  # differs from old in every row
    old_copy, new_copy = old.copy(), new.copy()

    np.testing.assert_array_equal(backfill_gallery(new, old, 0.0), old)
    np.testing.assert_array_equal(backfill_gallery(new, old, 1.0), new)
    previous = set()
    for r in RATIOS:
        rows = refreshed_rows(backfill_gallery(new, old, r, seed=3), new, old)
        assert len(rows) == round(r * n)  # exact count of refreshed images
        assert previous <= rows           # a larger ratio refreshes a superset (one permutation)
        previous = rows
    assert previous == set(range(n))
    # the inputs are not modified
    np.testing.assert_array_equal(old, old_copy)
    np.testing.assert_array_equal(new, new_copy)


def test_backfill_gallery_seed_decides_the_subset():
    rng = np.random.default_rng(0)
    old, new = rng.standard_normal((2, 40, 4)).astype(np.float32)
    a = refreshed_rows(backfill_gallery(new, old, 0.5, seed=0), new, old)
    b = refreshed_rows(backfill_gallery(new, old, 0.5, seed=0), new, old)
    c = refreshed_rows(backfill_gallery(new, old, 0.5, seed=1), new, old)
    assert a == b and len(a) == 20
    assert a != c  # a random subset, not always the first rows
    assert a != set(range(20))


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_backfill_gallery_rejects_ratio_outside_unit_interval(ratio):
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(UserError, match="BACKFILL_RATIOS.*outside"):
        backfill_gallery(x, x, ratio)


def random_revisited_case(seed=0, n_query=6, n_gallery=30, dim=8):
    rng = np.random.default_rng(seed)
    gnd = []
    for _ in range(n_query):
        ids = rng.permutation(n_gallery)
        gnd.append({"easy": ids[:3], "hard": ids[3:5], "junk": ids[5:6]})
    feats = [rng.standard_normal((n, dim)).astype(np.float32) for n in (n_query, n_gallery, n_gallery)]
    return revisited_set(gnd, n_gallery), feats


def test_backfill_curve_end_points_are_cross_and_self_test():
    ts, (new_q, new_g, old_g) = random_revisited_case()
    curve = backfill_curve(ts, new_q, new_g, old_g, RATIOS, seed=0)
    cross = headline_value(score(ts, new_q, old_g))
    self_ = headline_value(score(ts, new_q, new_g))
    assert cross != pytest.approx(self_)  # the end points can be told apart
    assert curve["ratios"] == list(RATIOS) and curve["metric"] == "mAP medium"
    assert curve["values"][0] == pytest.approx(cross, abs=1e-12)
    assert curve["values"][-1] == pytest.approx(self_, abs=1e-12)
    mid = headline_value(score(ts, new_q, backfill_gallery(new_g, old_g, 0.5, seed=0)))
    assert curve["values"][2] == pytest.approx(mid, abs=1e-12)


def test_backfill_curve_gldv2_uses_map_at_100():
    rng = np.random.default_rng(1)
    ts = gldv2_set([rng.choice(40, 3, replace=False) for _ in range(5)], 40)
    new_q, new_g, old_g = (rng.standard_normal((n, 6)).astype(np.float32) for n in (5, 40, 40))
    curve = backfill_curve(ts, new_q, new_g, old_g, [0.0, 1.0])
    assert curve["metric"] == "mAP@100"
    assert curve["values"] == [pytest.approx(score(ts, new_q, old_g)["mAP@100"], abs=1e-12),
                               pytest.approx(score(ts, new_q, new_g)["mAP@100"], abs=1e-12)]


# ------------------------------------------------------------------------------------ score by hand


def one_hot_case():
    """4 classes, 12 gallery images (class i % 4) embedded as one-hot class vectors; query q of class
    q equals a positive. Every positive ranks above every negative, so every metric is 100."""
    n_classes, n_gallery = 4, 12
    cls = np.arange(n_gallery) % n_classes
    gallery = np.eye(n_classes, dtype=np.float32)[cls] * np.linspace(1, 3, n_gallery, dtype=np.float32)[:, None]
    query = np.eye(n_classes, dtype=np.float32)
    gnd = [{"easy": np.flatnonzero(cls == c)[:2], "hard": np.flatnonzero(cls == c)[2:]} for c in range(n_classes)]
    return query, gallery, gnd, cls


def test_score_revisited_one_hot_is_perfect():
    query, gallery, gnd, _ = one_hot_case()
    m = score(revisited_set(gnd, len(gallery)), query, gallery)
    for p in ("easy", "medium", "hard"):
        assert m["mAP"][p] == pytest.approx(100.0, abs=1e-9)
        assert m["mP@k"][p] == {"1": pytest.approx(100.0), "5": pytest.approx(100.0), "10": pytest.approx(100.0)}
    assert "per_query_ap" not in m


def test_score_revisited_hand_computed_ranking():
    # Query at angle 0; gallery images at angles 0, 10, 20, 30 degrees rank g0, g1, g2, g3.
    # gnd: easy {g1}, hard {g3}, junk {g0}.
    #  Easy   (ignore junk+hard): ranking g1 g2      -> positive at r=0               AP = 1
    #  Medium (ignore junk):      ranking g1 g2 g3   -> r = 0, 2: (1 + (1/2 + 2/3)/2) / 2 = 19/24
    #  Hard   (ignore junk+easy): ranking g2 g3      -> r = 1: (0/1 + 1/2)/2            = 1/4
    # mP@k, k clipped to the 1-based rank of the last positive: Medium [1, 3] -> @1 1, @5 2/3, @10 2/3;
    # Hard [2] -> @1 0, @5 1/2, @10 1/2.
    angles = np.deg2rad([0, 10, 20, 30])
    gallery = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32) * [[1], [5], [0.2], [3]]
    query = np.array([[2.0, 0.0]], np.float32)
    m = score(revisited_set([{"easy": [1], "hard": [3], "junk": [0]}], 4), query, gallery)
    assert m["mAP"] == pytest.approx({"easy": 100.0, "medium": 100 * 19 / 24, "hard": 25.0}, abs=1e-9)
    assert m["mP@k"]["easy"] == pytest.approx({"1": 100.0, "5": 100.0, "10": 100.0})
    assert m["mP@k"]["medium"] == pytest.approx({"1": 100.0, "5": 200 / 3, "10": 200 / 3})
    assert m["mP@k"]["hard"] == pytest.approx({"1": 0.0, "5": 50.0, "10": 50.0})
    assert headline_value(m) == pytest.approx(100 * 19 / 24)


def test_score_gldv2_one_hot_and_hand_case():
    query, gallery, _, cls = one_hot_case()
    perfect = score(gldv2_set([np.flatnonzero(cls == c) for c in range(4)], len(gallery)), query, gallery)
    assert perfect == {"mAP@100": pytest.approx(100.0, abs=1e-9)}
    # Gallery along angles 0..50 degrees ranks g0..g5. Query 0: relevant {g1}        -> P(2) = 1/2.
    # Query 1 (same direction): relevant {g0, g2}  -> (1/1 + 2/3) / 2 = 5/6.  mAP@100 = (1/2 + 5/6)/2.
    angles = np.deg2rad(np.arange(6) * 10.0)
    gallery = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    query = np.array([[1.0, 0.0], [4.0, 0.0]], np.float32)
    m = score(gldv2_set([[1], [0, 2]], 6), query, gallery)
    assert m["mAP@100"] == pytest.approx(100 * (0.5 + 5 / 6) / 2, abs=1e-9)
    assert headline_value(m) == m["mAP@100"]


# ----------------------------------------------------------------------------------- check_features


@pytest.mark.parametrize("query_shape, gallery_shape, bad, pattern", [
    ((3, 8), (10, 8), None, None),
    ((2, 8), (10, 8), None, r"query features have 2 rows but roxford5k has 3 query images"),
    ((3, 8), (11, 8), None, r"gallery features have 11 rows but roxford5k has 10 gallery images"),
    ((3, 8), (10, 6), None, r"query features are 8-d but gallery features 6-d"),
    ((3, 8), (10, 8), ("query", np.nan), r"query features contain NaN"),
    ((3, 8), (10, 8), ("gallery", np.inf), r"gallery features contain NaN or inf"),
    ((24,), (10, 8), None, r"query features must be 2-D.*\(24,\)"),
])
def test_check_features_names_the_problem(query_shape, gallery_shape, bad, pattern):
    ts = revisited_set([{"easy": [0]}] * 3, 10)
    query, gallery = np.ones(query_shape, np.float32), np.ones(gallery_shape, np.float32)
    if bad is not None:
        (query if bad[0] == "query" else gallery)[1, 2] = bad[1]
    if pattern is None:
        check_features(ts, query, gallery, source="feats")  # consistent input passes
        return
    with pytest.raises(UserError, match=pattern) as info:
        check_features(ts, query, gallery, source="feats.npy")
    assert str(info.value).startswith("feats.npy: ") and "\n" not in str(info.value)
    with pytest.raises(UserError, match=pattern):
        score(ts, query, gallery)  # score() refuses the same input before searching


# ------------------------------------------------------------------------------------- image decoding
@pytest.mark.slow
def test_evaluation_decodes_the_data_decode_way(tiny_synthetic, random_checkpoint):
    """DATA.DECODE reaches the test-set embedding: pil_draft features are those of a pil_draft dataset, differ
    from pil's (64 px JPEGs at 24 px: decoded at half size), and nvjpeg on a CPU is refused in one line."""
    from advbct.config import load_config
    from advbct.data.decoding import ImageInput
    from advbct.evaluation.features import extract_features
    from advbct.evaluation.protocol import embed_test_set, image_datasets, load_test_set
    from advbct.models import load_trained_model

    model = load_trained_model("resnet18", random_checkpoint(0, 16), "new", device="cpu")
    ts = load_test_set("roxford5k", str(tiny_synthetic / "ROxfordParis"))

    def cfg(mode):
        return load_config(None, ["EVAL.IMG_SIZE", "24", "EVAL.NUM_WORKERS", "0", "DATA.DECODE", mode])

    q_draft, g_draft = embed_test_set(model, ts, cfg("pil_draft"), progress=False)
    _, g_ds = image_datasets(ts, ImageInput(24, "pil_draft"))
    direct = extract_features(model, g_ds, num_workers=0, progress=False).numpy()
    assert np.array_equal(g_draft, direct)
    _, g_pil = embed_test_set(model, ts, cfg("pil"), progress=False)
    assert np.abs(g_pil - g_draft).max() > 1e-3
    with pytest.raises(UserError, match="DATA.DECODE nvjpeg decodes on a CUDA GPU"):
        embed_test_set(model, ts, cfg("nvjpeg"), progress=False)
    assert q_draft.shape == (len(ts.query_paths), 16)
