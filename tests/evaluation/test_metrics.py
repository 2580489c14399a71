"""Revisited (ROxford5k / RParis6k) mAP and mP@k, and GLDv2 mAP@100: hand cases and a loop reference."""

import math
import os
import pickle

import numpy as np
import pytest

from advbct.errors import UserError
from advbct.evaluation.metrics import (
    average_precision_and_precision_at_k,
    gldv2_map_at_k,
    revisited_ranking_metrics,
)

GND_DIR = "/work/shared/data/revisited"


def masks(n_gallery, rows):
    """Boolean (len(rows), n_gallery) mask with True at the gallery ids listed per row."""
    m = np.zeros((len(rows), n_gallery), dtype=bool)
    for i, ids in enumerate(rows):
        m[i, list(ids)] = True
    return m


# ---------------------------------------------------------------------------------------------
# Hand-computed revisited cases
# ---------------------------------------------------------------------------------------------


def test_junk_removal_shifts_ranks():
    # Ranking 0 1 2 3 4 5; positives {0, 2}, junk {1}. With junk removed the ranking is 0 2 3 4 5,
    # so the positives sit at r = 0 and r = 1:
    #   j=0, r=0: P0 = 1, P1 = 1/1 = 1;   j=1, r=1: P0 = 1/1, P1 = 2/2  ->  AP = (1 + 1) / 2 = 1.
    # (Keeping the junk would put image 2 at r = 2 and give AP = (1 + (1/2 + 2/3)/2)/2 = 0.79.)
    ranks = np.arange(6)[None]
    ap, prec = average_precision_and_precision_at_k(ranks, masks(6, [{0, 2}]), masks(6, [{1}]), (1, 2))
    assert ap[0] == pytest.approx(1.0, abs=1e-12)
    # 1-based positive ranks [1, 2]: k=1 -> 1/1; k=2 -> 2/2.
    np.testing.assert_allclose(prec[0], [1.0, 1.0], atol=1e-12)


def test_trapezoid_rule_and_k_clipping():
    # Positives {1, 3} in ranking 0 1 2 3 4 5, no junk: r = 1 and r = 3.
    #   j=0, r=1: P0 = 0/1 = 0,  P1 = 1/2  -> area 1/4
    #   j=1, r=3: P0 = 1/3,      P1 = 2/4  -> area 5/12
    #   AP = (1/4 + 5/12) / 2 = 1/3
    # mP@k on 1-based ranks [2, 4], k clipped to the last positive's rank 4:
    #   k=1 -> kq=1: 0/1;  k=3 -> kq=3: 1/3;  k=5 -> kq=4: 2/4;  k=10 -> kq=4: 2/4.
    ranks = np.arange(6)[None]
    ap, prec = average_precision_and_precision_at_k(ranks, masks(6, [{1, 3}]), masks(6, [set()]), (1, 3, 5, 10))
    assert ap[0] == pytest.approx(1.0 / 3.0, abs=1e-12)
    np.testing.assert_allclose(prec[0], [0.0, 1.0 / 3.0, 0.5, 0.5], atol=1e-12)


def test_k_clipping_when_all_positives_come_first():
    # Positives at 1-based ranks 1, 2 of 10: P@5 = 2 / min(2, 5) = 1 (not 2/5); AP = 1.
    ranks = np.arange(10)[None]
    ap, prec = average_precision_and_precision_at_k(ranks, masks(10, [{0, 1}]), masks(10, [set()]), (1, 5))
    assert ap[0] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(prec[0], [1.0, 1.0], atol=1e-12)


def test_query_major_ranking_is_read_per_row():
    # Row 0 ranks image 0 first (AP 1); row 1 ranks it last of 4: r=3, P0 = 0/3, P1 = 1/4 -> AP 1/8.
    ranks = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    ap, _ = average_precision_and_precision_at_k(ranks, masks(4, [{0}, {0}]), masks(4, [set(), set()]))
    np.testing.assert_allclose(ap, [1.0, 0.125], atol=1e-12)


def test_easy_medium_hard_protocols_by_hand():
    # Gallery 0..7 ranked in order; easy = {1, 4}, hard = {0, 6}, junk = {2}.
    # Easy: positives {1,4}, ignore {2,0,6}: kept ranking 1 3 4 5 7 -> r = 0, 2
    #   AP = (1 + (1/2 + 2/3)/2) / 2 = 19/24;  1-based ranks [1, 3]: P@1 = 1, P@5 = 2/3, P@10 = 2/3
    # Medium: positives {0,1,4,6}, ignore {2}: kept 0 1 3 4 5 6 7 -> r = 0, 1, 3, 5
    #   areas 1, 1, (2/3 + 3/4)/2 = 17/24, (3/5 + 4/6)/2 = 19/30 -> AP = 401/480
    #   1-based ranks [1, 2, 4, 6]: P@1 = 1, P@5 = 3/5, P@10 = 4/6
    # Hard: positives {0,6}, ignore {2,1,4}: kept 0 3 5 6 7 -> r = 0, 3
    #   AP = (1 + (1/3 + 2/4)/2) / 2 = 17/24;  ranks [1, 4]: P@1 = 1, P@5 = 2/4, P@10 = 2/4
    gnd = [{"easy": [1, 4], "hard": [0, 6], "junk": [2], "bbx": [0, 0, 1, 1]}]
    out = revisited_ranking_metrics(np.arange(8)[None], gnd)
    assert out["mAP"]["easy"] == pytest.approx(100 * 19 / 24, abs=1e-9)
    assert out["mAP"]["medium"] == pytest.approx(100 * 401 / 480, abs=1e-9)
    assert out["mAP"]["hard"] == pytest.approx(100 * 17 / 24, abs=1e-9)
    expected_mp = {"easy": [1, 2 / 3, 2 / 3], "medium": [1, 3 / 5, 4 / 6], "hard": [1, 2 / 4, 2 / 4]}
    for protocol, values in expected_mp.items():
        got = [out["mP@k"][protocol][k] for k in ("1", "5", "10")]
        np.testing.assert_allclose(got, 100 * np.array(values), atol=1e-9)


def test_query_without_positives_is_excluded():
    # Query 0: the trapezoid case above (AP 1/3). Query 1 has hard positives only, so under Easy it has
    # none and is excluded: Easy mAP = 1/3, not (1/3 + 0)/2. Under Hard query 0 has none.
    gnd = [
        {"easy": [1, 3], "hard": [], "junk": []},
        {"easy": [], "hard": [0], "junk": [5]},
    ]
    ranks = np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    out = revisited_ranking_metrics(ranks, gnd)
    assert out["mAP"]["easy"] == pytest.approx(100 / 3, abs=1e-9)
    assert out["n_queries"] == {"easy": 1, "medium": 2, "hard": 1}
    assert out["per_query_ap"]["easy"][0] == pytest.approx(100 / 3, abs=1e-9)
    assert math.isnan(out["per_query_ap"]["easy"][1])
    # Hard, query 1: ranking 5 4 3 2 1 0 minus junk {5} leaves 4 3 2 1 0, image 0 at r = 4:
    #   j=0, r=4: P0 = 0/4 = 0, P1 = 1/5 -> AP = 1/10.  P@1: kq = 1 -> 0; P@10: kq = 5 -> 1/5.
    assert out["mAP"]["hard"] == pytest.approx(10.0, abs=1e-9)
    assert out["mP@k"]["hard"]["1"] == pytest.approx(0.0, abs=1e-9)
    assert out["mP@k"]["hard"]["10"] == pytest.approx(20.0, abs=1e-9)
    # Medium averages both: (1/3 + 1/10) / 2.
    assert out["mAP"]["medium"] == pytest.approx(100 * (1 / 3 + 1 / 10) / 2, abs=1e-9)


def test_invalid_inputs():
    gnd = [{"easy": [0], "hard": [], "junk": []}]
    with pytest.raises(ValueError, match="full ranking"):
        revisited_ranking_metrics(np.array([[0, 0, 1]]), gnd)  # repeats an index, misses 2
    with pytest.raises(UserError, match="outside 0..2"):
        revisited_ranking_metrics(np.array([[0, 1, 2]]), [{"easy": [3], "hard": [], "junk": []}])
    with pytest.raises(UserError, match="no key 'junk'"):
        revisited_ranking_metrics(np.array([[0, 1, 2]]), [{"easy": [0], "hard": []}])
    with pytest.raises(UserError, match="2 queries"):
        revisited_ranking_metrics(np.array([[0, 1, 2]]), gnd * 2)


# ---------------------------------------------------------------------------------------------
# Reference implementation on the real ground truth
# ---------------------------------------------------------------------------------------------


def reference_query(ranking, positives, junk, kappas):
    """Plain reading of the revisitop protocol for one query: (AP, [P@k...]) or None without positives.

    Junk images are skipped (an image listed both as positive and junk stays a positive, as in
    revisitop); r is the 0-based rank among the remaining images.
    """
    if not positives:
        return None
    kept = [g for g in ranking if g in positives or g not in junk]
    pos_ranks = [r for r, g in enumerate(kept) if g in positives]
    ap = 0.0
    for j, r in enumerate(pos_ranks):
        p0 = 1.0 if r == 0 else j / r
        p1 = (j + 1) / (r + 1)
        ap += (p0 + p1) / 2
    ap /= len(positives)
    one_based = [r + 1 for r in pos_ranks]
    precs = []
    for k in kappas:
        kq = min(max(one_based), k)
        precs.append(sum(1 for p in one_based if p <= kq) / kq)
    return ap, precs


def reference_metrics(ranks, gnd, kappas=(1, 5, 10)):
    out = {"mAP": {}, "mP@k": {}}
    for protocol in ("easy", "medium", "hard"):
        aps, precs = [], []
        for q, entry in enumerate(gnd):
            easy, hard, junk = set(entry["easy"]), set(entry["hard"]), set(entry["junk"])
            if protocol == "easy":
                positives, ignore = easy, junk | hard
            elif protocol == "medium":
                positives, ignore = easy | hard, junk
            else:
                positives, ignore = hard, junk | easy
            res = reference_query(ranks[q].tolist(), positives, ignore, kappas)
            if res is not None:
                aps.append(res[0])
                precs.append(res[1])
        out["mAP"][protocol] = 100 * sum(aps) / len(aps)
        out["mP@k"][protocol] = {str(k): 100 * sum(p[c] for p in precs) / len(precs) for c, k in enumerate(kappas)}
    return out


@pytest.mark.skipif(not os.path.isdir(GND_DIR), reason=f"{GND_DIR} (real revisited ground truth) is absent")
@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_matches_reference_on_real_ground_truth(name):
    with open(os.path.join(GND_DIR, f"gnd_{name}.pkl"), "rb") as f:
        data = pickle.load(f)
    gnd, n_gallery = data["gnd"], len(data["imlist"])
    assert len(gnd) == len(data["qimlist"]) == 70
    rng = np.random.default_rng(7)
    # A random ranking (positives scattered) and one where Medium positives are pushed up (AP far from
    # 0, junk interleaved with positives near the top, so the junk shift and k clipping matter).
    boosted = rng.random((len(gnd), n_gallery))
    for q, entry in enumerate(gnd):
        boosted[q, entry["easy"] + entry["hard"]] += 0.7
        boosted[q, entry["junk"]] += 0.7
    for scores in (rng.random((len(gnd), n_gallery)), boosted):
        ranks = np.argsort(-scores, axis=1)
        ours = revisited_ranking_metrics(ranks, gnd)
        ref = reference_metrics(ranks, gnd)
        for protocol in ("easy", "medium", "hard"):
            assert ours["mAP"][protocol] == pytest.approx(ref["mAP"][protocol], abs=1e-9)
            for k in ("1", "5", "10"):
                assert ours["mP@k"][protocol][k] == pytest.approx(ref["mP@k"][protocol][k], abs=1e-9)
    assert ours["mAP"]["medium"] > 20  # the boosted ranking is informative


# ---------------------------------------------------------------------------------------------
# GLDv2 mAP@100
# ---------------------------------------------------------------------------------------------


def ranking_with(n_cols, placed, filler):
    """A ranking of ``n_cols`` ids: ``placed`` maps 1-based positions to ids, the rest from ``filler``."""
    row, fill = [], iter(filler)
    for pos in range(1, n_cols + 1):
        row.append(placed[pos] if pos in placed else next(fill))
    return row


def test_gldv2_hand_cases():
    filler = range(10_000, 20_000)  # never relevant
    # Query 0, m_q = 3 < 100: relevant {10, 20, 30} at positions 1, 3 and 150 (beyond the cut-off).
    #   AP = (1/1 + 2/3) / min(3, 100) = 5/9
    q0 = ranking_with(200, {1: 10, 3: 20, 150: 30}, filler)
    # Query 1, m_q = 150 > 100: relevant 1000..1149, 50 of them at positions 1..50, one at 101.
    #   AP = (sum_{i<=50} i/i) / min(150, 100) = 50/100
    q1 = ranking_with(200, {**{i: 1000 + i for i in range(1, 51)}, 101: 1100}, filler)
    # Query 2: its only relevant image is at position 101 -> AP = 0.
    q2 = ranking_with(200, {101: 7}, filler)
    # Query 3: no ground truth -> excluded from the mean.
    q3 = ranking_with(200, {}, filler)
    ranks = np.array([q0, q1, q2, q3])
    gt = [np.array([10, 20, 30]), np.arange(1000, 1150), np.array([7]), np.array([], dtype=int)]
    assert gldv2_map_at_k(ranks, gt, k=100) == pytest.approx(100 * (5 / 9 + 0.5 + 0) / 3, abs=1e-9)
    # k = 3: query 0 -> (1 + 2/3)/3; query 1 -> (1 + 1 + 1)/3; query 2 -> 0.
    assert gldv2_map_at_k(ranks, gt, k=3) == pytest.approx(100 * (5 / 9 + 1 + 0) / 3, abs=1e-9)


def reference_gldv2(ranks, gt, k=100):
    """The Kaggle GLDv2 retrieval metric read literally, one query at a time."""
    total, count = 0.0, 0
    for row, relevant in zip(ranks.tolist(), gt):
        relevant = set(int(x) for x in relevant)
        if not relevant:
            continue
        hits, ap, seen = 0, 0.0, set()
        for i, g in enumerate(row[:k]):
            if g in seen:
                continue
            seen.add(g)
            if g in relevant:
                hits += 1
                ap += hits / (i + 1)
        total += ap / min(len(relevant), k)
        count += 1
    return 100 * total / count


def test_gldv2_matches_reference_on_random_data():
    rng = np.random.default_rng(3)
    n_query, n_gallery = 40, 3000
    ranks = np.argsort(rng.random((n_query, n_gallery)), axis=1)[:, :100]
    ranks, gt = np.empty((n_query, 100), dtype=np.int64), []
    for q in range(n_query):
        m = int(rng.choice([0, 1, 5, 60, 150]))
        g = rng.choice(n_gallery, size=m, replace=False)
        others = rng.permutation(np.setdiff1d(np.arange(n_gallery), g))
        ranks[q] = others[:100]
        shown = min(m, 20)  # some relevant images in the top 100, the rest ranked beyond it
        ranks[q, rng.choice(100, size=shown, replace=False)] = g[:shown]
        gt.append(g)
    # A duplicated relevant prediction counts once (Kaggle metric): repeat a hit at the last position.
    q = next(q for q in range(n_query) if np.isin(ranks[q, :99], gt[q]).any())
    ranks[q, 99] = ranks[q, np.flatnonzero(np.isin(ranks[q, :99], gt[q]))[0]]
    assert gldv2_map_at_k(ranks, gt) == pytest.approx(reference_gldv2(ranks, gt), abs=1e-9)
    assert gldv2_map_at_k(ranks, gt) > 5


def test_gldv2_shorter_ranking_than_k_and_errors():
    # Only 2 predictions; relevant {4, 9}: position 2 hit -> AP = (1/2) / min(2, 100) = 1/4.
    assert gldv2_map_at_k(np.array([[3, 9]]), [np.array([4, 9])]) == pytest.approx(25.0, abs=1e-9)
    with pytest.raises(UserError, match="2 queries"):
        gldv2_map_at_k(np.array([[3, 9]]), [np.array([4]), np.array([9])])
