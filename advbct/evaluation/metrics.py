"""Retrieval metrics: revisited ROxford5k/RParis6k mAP and mP@k (Easy/Medium/Hard), GLDv2 mAP@100.

Both follow the reference protocols exactly (PAPER.md "Metrics"): the revisitop code of Radenovic et al.
(CVPR 2018) and the GLDv2 Kaggle metric. Everything is vectorised over queries with numpy.
"""

import numpy as np

from advbct.errors import UserError

PROTOCOLS = ("easy", "medium", "hard")


def _check_ranks(ranks, name="ranks"):
    """Return ``ranks`` as a 2-D int64 array or raise ``ValueError``."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (n_query, n), got shape {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"{name} must hold integer gallery indices, got dtype {ranks.dtype}")
    return ranks.astype(np.int64, copy=False)


def _inverse_ranking(ranks, n_gallery):
    """``position[q, g]``: 0-based place of gallery image g in query q's ranking.

    Also checks that ``ranks`` is a full ranking (every gallery index exactly once per row), which the
    revisitop protocol assumes: a positive missing from the ranking would silently change the AP.
    """
    n_query = ranks.shape[0]
    if ranks.shape[1] != n_gallery or ranks.min() < 0 or ranks.max() >= n_gallery:
        raise ValueError(
            f"ranks must be a full ranking: every row a permutation of 0..{n_gallery - 1}, got shape "
            f"{ranks.shape} with values in [{ranks.min()}, {ranks.max()}]"
        )
    position = np.full((n_query, n_gallery), -1, dtype=np.int64)
    position[np.arange(n_query)[:, None], ranks] = np.arange(n_gallery)
    if (position < 0).any():
        raise ValueError("ranks must be a full ranking: some row repeats a gallery index")
    return position


def _sorted_unique(x):
    """Sorted distinct values of a 1-D int array (faster than ``np.unique`` for these small arrays)."""
    x = np.sort(x)
    return x[np.concatenate(([True], x[1:] != x[:-1]))] if x.size else x


def _ap_and_precision(q_pos, t_pos, q_junk, t_junk, n_query, n_gallery, kappas):
    """Core of the revisitop metrics on sparse (query, ranking position) pairs of positives and junk.

    Positives and junk are given as 0-based positions in each query's full ranking; duplicates are
    ignored. Returns per-query AP and precision@k as fractions, NaN for queries without positives.
    """
    # One sortable key per (query, position): rows ascending, positions ascending within a row.
    pos_keys = _sorted_unique(q_pos * n_gallery + t_pos)
    junk_keys = _sorted_unique(q_junk * n_gallery + t_junk)
    q, t = np.divmod(pos_keys, n_gallery)
    # Junk images of the same query ranked strictly above each positive; removing them shifts the
    # positive up by that many places (revisitop: pos[ip] -= #junk with junk < pos[ip]).
    junk_before = np.searchsorted(junk_keys, pos_keys) - np.searchsorted(junk_keys, q * n_gallery)
    r = (t - junk_before).astype(np.float64)  # r_j, 0-based rank after junk removal
    n_pos = np.bincount(q, minlength=n_query)
    row_start = np.concatenate(([0], np.cumsum(n_pos)[:-1]))
    j = (np.arange(q.size) - row_start[q]).astype(np.float64)  # j, 0-based index of the positive

    # Trapezoid rule (PAPER.md "Metrics"): P0_j = j / r_j (1 when r_j = 0), P1_j = (j + 1) / (r_j + 1),
    # AP = sum_j (P0_j + P1_j) / 2 / n_pos.
    p0 = np.divide(j, r, out=np.ones_like(r), where=r > 0)
    p1 = (j + 1.0) / (r + 1.0)
    area = np.bincount(q, weights=(p0 + p1) / 2.0, minlength=n_query)
    valid = n_pos > 0
    ap = np.full(n_query, np.nan)
    ap[valid] = area[valid] / n_pos[valid]

    # mP@k on 1-based ranks, k clipped to the rank of the last positive: kq = min(max(pos), k).
    pos1 = r + 1.0
    last = np.zeros(n_query)
    last[valid] = pos1[(row_start + n_pos - 1)[valid]]  # positives are sorted within each query
    prec = np.full((n_query, len(kappas)), np.nan)
    for c, k in enumerate(kappas):  # a handful of kappas; vectorised over queries and positives
        kq = np.minimum(last, k)
        hits = np.bincount(q, weights=(pos1 <= kq[q]).astype(np.float64), minlength=n_query)
        prec[valid, c] = hits[valid] / kq[valid]
    return ap, prec


def _check_kappas(kappas):
    kappas = [int(k) for k in kappas]
    if any(k < 1 for k in kappas):
        raise ValueError(f"kappas must be positive integers, got {kappas}")
    return kappas


def average_precision_and_precision_at_k(ranks, positive_mask, junk_mask, kappas=(1, 5, 10)):
    """Per-query AP and precision@k (fractions in [0, 1]) of full rankings, revisitop style.

    ``ranks`` (n_query, n_gallery): gallery indices by decreasing similarity, every index once per row.
    ``positive_mask`` / ``junk_mask`` (n_query, n_gallery) booleans indexed by gallery id. Junk images
    are dropped from the ranking before ranks are counted. Returns ``(ap, prec)`` with shapes
    (n_query,) and (n_query, len(kappas)); queries without any positive get NaN in both.
    """
    ranks = _check_ranks(ranks)
    positive_mask = np.asarray(positive_mask, dtype=bool)
    junk_mask = np.asarray(junk_mask, dtype=bool)
    if positive_mask.shape != ranks.shape or junk_mask.shape != ranks.shape:
        raise ValueError(
            f"positive_mask {positive_mask.shape} and junk_mask {junk_mask.shape} must have the "
            f"shape of ranks {ranks.shape}"
        )
    n_query, n_gallery = ranks.shape
    position = _inverse_ranking(ranks, n_gallery)
    q_pos, g_pos = np.nonzero(positive_mask)
    q_junk, g_junk = np.nonzero(junk_mask)
    return _ap_and_precision(q_pos, position[q_pos, g_pos], q_junk, position[q_junk, g_junk],
                             n_query, n_gallery, _check_kappas(kappas))


def _gnd_pairs(gnd, n_gallery):
    """``{key: (query ids, gallery ids)}`` of the ``easy``, ``hard`` and ``junk`` lists of ``gnd``."""
    pairs = {}
    for key in ("easy", "hard", "junk"):
        rows, cols = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for i, entry in enumerate(gnd):
            if not isinstance(entry, dict) or key not in entry:
                raise UserError(f"ground truth entry {i} has no key '{key}' (expected dicts with easy/hard/junk)")
            idx = np.asarray(entry[key], dtype=np.int64).reshape(-1)
            rows.append(np.full(idx.size, i, dtype=np.int64))
            cols.append(idx)
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        if cols.size and (cols.min() < 0 or cols.max() >= n_gallery):
            bad = cols[(cols < 0) | (cols >= n_gallery)][0]
            raise UserError(
                f"ground truth '{key}' holds gallery index {bad}, outside 0..{n_gallery - 1} "
                f"(the gallery has {n_gallery} images)"
            )
        pairs[key] = (rows, cols)
    return pairs


def _union(*pairs):
    return tuple(np.concatenate(parts) for parts in zip(*pairs))


def protocol_pairs(gnd, n_gallery):
    """``{protocol: ((q, g) positives, (q, g) junk)}`` for Easy, Medium, Hard (Radenovic et al. 2018).

    Easy: positives easy, ignore junk + hard. Medium: positives easy + hard, ignore junk.
    Hard: positives hard, ignore junk + easy.
    """
    p = _gnd_pairs(gnd, n_gallery)
    return {
        "easy": (p["easy"], _union(p["junk"], p["hard"])),
        "medium": (_union(p["easy"], p["hard"]), p["junk"]),
        "hard": (p["hard"], _union(p["junk"], p["easy"])),
    }


def _nanmean_percent(values):
    """Mean over non-NaN entries in percent; NaN when every entry is NaN (no query has a positive)."""
    valid = ~np.isnan(values)
    if not valid.any():
        return float("nan")
    return float(100.0 * values[valid].mean())


def revisited_ranking_metrics(ranks, gnd, kappas=(1, 5, 10)):
    """mAP and mP@k (percent) of full rankings under the revisited Easy/Medium/Hard protocols.

    ``ranks`` (n_query, n_gallery): gallery indices ordered by decreasing similarity, query-major (the
    transpose of revisitop's layout), every gallery image ranked. ``gnd``: per-query dicts with lists
    ``easy``, ``hard``, ``junk`` of gallery indices (``bbx`` ignored). Queries without positives under a
    protocol are excluded from its means. Returns ``{"mAP": {p: x}, "mP@k": {p: {"1": x, ...}},
    "per_query_ap": {p: [x or NaN, ...]}, "n_queries": {p: number of queries counted}}``.
    """
    ranks = _check_ranks(ranks)
    if len(gnd) != ranks.shape[0]:
        raise UserError(f"ground truth has {len(gnd)} queries but the ranking has {ranks.shape[0]} rows")
    kappas = _check_kappas(kappas)
    n_query, n_gallery = ranks.shape
    position = _inverse_ranking(ranks, n_gallery)  # shared by the three protocols
    out = {"mAP": {}, "mP@k": {}, "per_query_ap": {}, "n_queries": {}}
    for protocol, ((q_pos, g_pos), (q_junk, g_junk)) in protocol_pairs(gnd, n_gallery).items():
        ap, prec = _ap_and_precision(q_pos, position[q_pos, g_pos], q_junk, position[q_junk, g_junk],
                                     n_query, n_gallery, kappas)
        out["mAP"][protocol] = _nanmean_percent(ap)
        out["mP@k"][protocol] = {str(k): _nanmean_percent(prec[:, c]) for c, k in enumerate(kappas)}
        out["per_query_ap"][protocol] = (100.0 * ap).tolist()
        out["n_queries"][protocol] = int((~np.isnan(ap)).sum())
    return out


def gldv2_map_at_k(ranks, ground_truth, k=100):
    """GLDv2 retrieval mAP@k in percent (the Kaggle metric; k = 100 in the paper).

    mAP@k = mean_q 1/min(m_q, k) · Σ_{i≤k} P_q(i)·rel_q(i), m_q the number of relevant index images of
    query q. ``ranks`` (n_query, n): predicted gallery indices best first (only the first k columns are
    used; fewer than k columns is allowed, negative entries count as misses). ``ground_truth``: one int
    array of relevant gallery indices per query; queries with an empty array are excluded.
    """
    ranks = _check_ranks(ranks)
    if len(ground_truth) != ranks.shape[0]:
        raise UserError(
            f"GLDv2 ground truth has {len(ground_truth)} queries but the ranking has {ranks.shape[0]} rows"
        )
    if int(k) < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    top = ranks[:, : int(k)]
    n_query = top.shape[0]
    gt = [np.unique(np.asarray(g, dtype=np.int64).reshape(-1)) for g in ground_truth]
    m = np.array([g.size for g in gt], dtype=np.int64)
    valid = m > 0
    if not valid.any():
        return float("nan")

    # Membership rel_q(i) without a per-query loop: encode (query, gallery id) pairs as one integer.
    width = int(max(top.max(initial=0), max((g.max() for g in gt if g.size), default=0))) + 1
    gt_keys = np.concatenate([q * width + g for q, g in enumerate(gt)])
    top_keys = np.arange(n_query, dtype=np.int64)[:, None] * width + top
    rel = np.isin(top_keys, gt_keys) & (top >= 0)
    # A repeated prediction counts once (as in the Kaggle metric): keep only its first occurrence.
    srt = np.sort(top, axis=1)
    if (srt[:, 1:] == srt[:, :-1]).any():
        order = np.argsort(top, axis=1, kind="stable")
        s = np.take_along_axis(top, order, axis=1)
        dup_sorted = np.concatenate([np.zeros((n_query, 1), bool), s[:, 1:] == s[:, :-1]], axis=1)
        dup = np.zeros_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        rel &= ~dup

    precision = np.cumsum(rel, axis=1) / np.arange(1, top.shape[1] + 1)  # P_q(i)
    ap = (precision * rel).sum(axis=1)[valid] / np.minimum(m[valid], int(k))
    return float(100.0 * ap.mean())


# ------------------------------------------------------------------------- top-1 and negative flips


def _pair_keys(rows, cols, width):
    """(query, gallery) pairs as one sortable integer each, for vectorised membership tests."""
    return np.asarray(rows, np.int64) * width + np.asarray(cols, np.int64)


def revisited_top1_positive(ranks, gnd, n_gallery):
    """Per query, whether its top-1 is a positive of the revisited Medium protocol (easy + hard), junk
    images skipped (the top-1 is the first non-junk image of the ranking); and which queries count: those
    with at least one Medium positive, as in the Medium mAP. Returns two boolean arrays (n_query,).

    ``ranks`` (n_query, k): gallery indices best first; k must exceed the longest junk list (or be the full
    ranking), so that every row holds a non-junk image.
    """
    ranks = _check_ranks(ranks)
    if len(gnd) != ranks.shape[0]:
        raise UserError(f"ground truth has {len(gnd)} queries but the ranking has {ranks.shape[0]} rows")
    n_query = ranks.shape[0]
    (q_pos, g_pos), (q_junk, g_junk) = protocol_pairs(gnd, n_gallery)["medium"]
    query_col = np.arange(n_query, dtype=np.int64)[:, None]
    junk = np.isin(_pair_keys(query_col, ranks, n_gallery), _pair_keys(q_junk, g_junk, n_gallery))
    clean = ~junk
    if not clean.any(axis=1).all() and ranks.shape[1] < n_gallery:
        raise ValueError("revisited_top1_positive: a row of ranks holds only junk images; search deeper "
                         "(k larger than the longest junk list)")
    first = np.argmax(clean, axis=1)  # first non-junk column of each row
    top1 = ranks[np.arange(n_query), first]
    hit = np.isin(_pair_keys(np.arange(n_query), top1, n_gallery), _pair_keys(q_pos, g_pos, n_gallery))
    hit &= clean.any(axis=1)
    counted = np.bincount(q_pos, minlength=n_query) > 0
    return hit, counted


def gldv2_top1_positive(ranks, ground_truth):
    """Per query, whether its top-1 gallery image is one of its relevant index images; and which queries
    count: those with ground truth, as in mAP@100. Returns two boolean arrays (n_query,)."""
    ranks = _check_ranks(ranks)
    if len(ground_truth) != ranks.shape[0]:
        raise UserError(
            f"GLDv2 ground truth has {len(ground_truth)} queries but the ranking has {ranks.shape[0]} rows"
        )
    n_query = ranks.shape[0]
    gt = [np.asarray(g, dtype=np.int64).reshape(-1) for g in ground_truth]
    rows = np.repeat(np.arange(n_query, dtype=np.int64), [g.size for g in gt])
    cols = np.concatenate([np.zeros(0, np.int64)] + gt)
    top1 = ranks[:, 0]
    width = int(max(top1.max(initial=0), cols.max(initial=0))) + 1
    hit = np.isin(_pair_keys(np.arange(n_query), top1, width), _pair_keys(rows, cols, width)) & (top1 >= 0)
    counted = np.bincount(rows, minlength=n_query) > 0
    return hit, counted


def negative_flip_rate(old_hit, new_hit, counted):
    """Percent of the counted queries whose top-1 was a positive for the old model and is not for the new
    one (a retrieval negative flip); NaN when no query counts."""
    old_hit, new_hit, counted = (np.asarray(a, dtype=bool) for a in (old_hit, new_hit, counted))
    if not counted.any():
        return float("nan")
    return float(100.0 * (old_hit & ~new_hit)[counted].mean())
