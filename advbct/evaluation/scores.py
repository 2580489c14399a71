"""The paper's summary scores P_up, P_comp and P_1 (PAPER.md "The paper's summary scores").

For each test set d (mAP in %): s_d self-test of φ_n, x_d cross-test φ_n→φ_o, o_d self-test of φ_o,
u_d self-test of the independently trained φ*:
    a_d = σ((s_d − u_d) / u_d)          how close φ_n's own accuracy gets to φ*'s
    b_d = σ((x_d − o_d) / (u_d − o_d))  how much the cross-test gains over φ_o, relative to φ*'s gain
    P_up = 100·mean a_d,  P_comp = 100·mean b_d,  P_1 = 100·mean 2·a_d·b_d / (a_d + b_d)
"""

import numpy as np

from advbct.errors import UserError


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _as_vectors(**named):
    """The named per-dataset sequences as float arrays of one common, non-zero length, all finite."""
    arrays = {name: np.asarray(values, dtype=np.float64).reshape(-1) for name, values in named.items()}
    lengths = {name: a.size for name, a in arrays.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise UserError(f"summary scores need one mAP per test set in every argument, got lengths {lengths}")
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            raise UserError(f"summary scores: {name} contains a non-finite mAP: {a.tolist()}")
    return arrays


def _compatibility_terms(cross_new, self_old, self_independent):
    """b_d = σ((x_d − o_d) / (u_d − o_d)) per test set."""
    x, o, u = cross_new, self_old, self_independent
    if np.any(u == o):
        raise UserError(
            f"summary scores: the independent model's self-test {u.tolist()} equals the old model's "
            f"{o.tolist()} on some test set, so P_comp is undefined (division by u_d - o_d)"
        )
    return _sigmoid((x - o) / (u - o))


def summary_scores(self_new, cross_new, self_old, self_independent):
    """``{"P_up", "P_comp", "P_1"}`` (percent) of a new model, from per-test-set mAPs in percent."""
    v = _as_vectors(self_new=self_new, cross_new=cross_new, self_old=self_old, self_independent=self_independent)
    s, u = v["self_new"], v["self_independent"]
    if np.any(u == 0):
        raise UserError(f"summary scores: the independent model's self-test mAP is 0 on some test set: {u.tolist()}")
    a = _sigmoid((s - u) / u)  # a_d
    b = _compatibility_terms(v["cross_new"], v["self_old"], u)  # b_d
    f1 = 2.0 * a * b / (a + b)  # per-test-set harmonic mean, averaged afterwards (not F1 of the means)
    return {"P_up": float(100.0 * a.mean()), "P_comp": float(100.0 * b.mean()), "P_1": float(100.0 * f1.mean())}


def independent_p_comp(cross_independent, self_old, self_independent):
    """P_comp of the independent model φ* itself (its only score: its P_up would be 50 by definition)."""
    v = _as_vectors(cross_independent=cross_independent, self_old=self_old, self_independent=self_independent)
    b = _compatibility_terms(v["cross_independent"], v["self_old"], v["self_independent"])
    return float(100.0 * b.mean())
