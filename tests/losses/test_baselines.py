"""BCT, LCE, UniBCT, hot-refresh and L2: vectorised losses vs per-sample reference loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from advbct.losses import build_compat_loss
from advbct.meta import ClassMeta
from helpers import ref_hot_refresh

D, C_OLD, C_NEW = 8, 6, 10


def make_meta(seed, num_classes=C_OLD, dim=D):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    centers = centers * torch.empty(num_classes, 1).uniform_(0.3, 0.9, generator=g)
    n_kept = torch.randint(2, 9, (num_classes,), generator=g)
    n_kept[1] = 1
    r_max = torch.empty(num_classes).uniform_(0.5, 1.4, generator=g)
    return ClassMeta(centers=centers, r_max=r_max, r_min=r_max * 0.5, counts=n_kept.clone(), n_kept=n_kept,
                     theta_max=torch.empty(num_classes).uniform_(0.5, 1.3, generator=g))


def batch(seed, b=20):
    g = torch.Generator().manual_seed(1000 + seed)
    fn = torch.randn(b, D, generator=g) * 2
    fo = torch.randn(b, D, generator=g)
    labels = torch.randint(0, C_NEW, (b,), generator=g)
    labels[:3] = torch.tensor([1, 8, 2])  # a ≤1-kept class, a new class, an old class
    return fn, fo, labels


def build(kind, meta=None, old_w=None, **cfg):
    return build_compat_loss({"TYPE": kind, **cfg}, embed_dim=D, num_old_classes=C_OLD, total_epochs=5, meta=meta,
                             old_classifier_weight=old_w)


def run(loss_fn, fn, fo, labels, **kw):
    x = fn.clone().requires_grad_(True)
    out = loss_fn(x, fo, labels, progress=0.3, epoch=1, **kw)
    out["loss"].backward()
    return out, x.grad


def ref_grad(fn, ref_fn):
    x = fn.clone().requires_grad_(True)
    value = ref_fn(x)
    value.backward()
    return value, x.grad


# -------------------------------------------------------------------------------------------- BCT
def ref_bct(x, labels, w_old):
    total, count = 0.0, 0
    for i in range(len(labels)):
        y = int(labels[i])
        if y < C_OLD:
            logits = w_old @ x[i]
            total = total + torch.logsumexp(logits, 0) - logits[y]
            count += 1
    return total / count


@pytest.mark.parametrize("seed,compact", [(0, True), (1, True), (2, False), (3, False)])
def test_bct_matches_reference(seed, compact):
    fn, fo, labels = batch(seed)
    w_old = torch.randn(C_OLD, D, generator=torch.Generator().manual_seed(seed))
    loss_fn = build("bct", old_w=w_old)
    loss_fn.compact_rows = compact  # both the CPU (row-compacting) and the GPU (masking) paths
    out, grad = run(loss_fn, fn, fo, labels)
    value, ref = ref_grad(fn, lambda x: ref_bct(x, labels, w_old))
    torch.testing.assert_close(out["loss"], value)
    torch.testing.assert_close(grad, ref)
    assert int(labels[1]) >= C_OLD and grad[1].abs().sum() == 0  # new-class rows get no gradient
    assert out["old_fraction"].item() == pytest.approx((labels < C_OLD).float().mean().item())


@pytest.mark.parametrize("kind,compact", [("bct", True), ("bct", False), ("unibct", True), ("unibct", False)])
def test_no_old_sample_is_zero(kind, compact):
    fn, fo, _ = batch(0)
    loss_fn = build(kind, make_meta(0), old_w=torch.randn(C_OLD, D))
    loss_fn.compact_rows = compact
    out, grad = run(loss_fn, fn, fo, torch.full((20,), C_OLD + 1))
    assert out["loss"].item() == 0.0 and grad.abs().sum() == 0


# -------------------------------------------------------------------------------------------- LCE
def ref_lce(x, w_new, labels, meta, variant, align_weight):
    boundary, alignment, count = 0.0, 0.0, 0
    for i in range(len(labels)):
        y = int(labels[i])
        if y >= C_OLD or int(meta.n_kept[y]) <= 1 or float(meta.theta_max[y]) == 0:
            continue
        c = meta.centers[y] / meta.centers[y].norm()
        cos = torch.dot(c, x[i] / x[i].norm())
        if variant == "benchmark":
            gap = torch.acos(cos) - meta.theta_max[y]
        else:
            gap = torch.cos(meta.theta_max[y]) - cos
        boundary = boundary + torch.clamp(gap, min=0)
        alignment = alignment + 1 - torch.dot(c, w_new[y] / w_new[y].norm())
        count += 1
    return boundary / count + align_weight * alignment / count


@pytest.mark.parametrize("seed,variant,align", [(0, "benchmark", 1.0), (1, "benchmark", 1.0), (2, "official", 100.0)])
def test_lce_matches_reference(seed, variant, align):
    meta = make_meta(seed)
    fn, fo, labels = batch(seed)
    w_new0 = torch.randn(C_NEW, D, generator=torch.Generator().manual_seed(seed))
    loss_fn = build("lce", meta, LCE_VARIANT=variant, LCE_ALIGN_WEIGHT=align)
    assert loss_fn.needs_new_classifier
    w_new = w_new0.clone().requires_grad_(True)
    out, grad = run(loss_fn, fn, fo, labels, new_classifier_weight=w_new)
    x = fn.clone().requires_grad_(True)
    w_ref = w_new0.clone().requires_grad_(True)
    ref = ref_lce(x, w_ref, labels, meta, variant, align)
    ref.backward()
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["boundary"] + align * out["alignment"], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_new.grad, w_ref.grad, rtol=1e-4, atol=1e-6)
    assert out["boundary"] > 0


def test_lce_cosine_and_angle_boundaries_agree_on_violation():
    # a sample at angle 60° from the center with θ_max = 45°: benchmark gap = π/12, official cos45 − cos60
    meta = ClassMeta(centers=torch.tensor([[0.5, 0.0]]), r_max=torch.ones(1), r_min=torch.ones(1),
                     counts=torch.tensor([5]), n_kept=torch.tensor([5]), theta_max=torch.tensor([math.pi / 4]))
    x = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3)]])
    w = torch.tensor([[1.0, 0.0]])  # aligned classifier: alignment 0
    kw = dict(embed_dim=2, num_old_classes=1, total_epochs=1, meta=meta)
    bench = build_compat_loss({"TYPE": "lce"}, **kw)(x, x, torch.tensor([0]), new_classifier_weight=w,
                                                      progress=0, epoch=0)
    off = build_compat_loss({"TYPE": "lce", "LCE_VARIANT": "official"}, **kw)(
        x, x, torch.tensor([0]), new_classifier_weight=w, progress=0, epoch=0)
    assert bench["boundary"].item() == pytest.approx(math.pi / 12, abs=1e-5)
    assert off["boundary"].item() == pytest.approx(math.cos(math.pi / 4) - 0.5, abs=1e-6)
    assert bench["alignment"].item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------- UniBCT
def ref_unibct(x, labels, meta, s, m):
    total, count = 0.0, 0
    centers = meta.centers / meta.centers.norm(dim=1, keepdim=True)
    for i in range(len(labels)):
        y = int(labels[i])
        if y >= C_OLD:
            continue
        cos = centers @ (x[i] / x[i].norm())
        target = torch.cos(torch.acos(cos[y]) + m)
        logits = torch.cat([cos[:y], target[None], cos[y + 1:]]) * s
        total = total + torch.logsumexp(logits, 0) - logits[y]
        count += 1
    return total / count


@pytest.mark.parametrize("seed,s,m,compact", [(0, 30.0, 0.3, True), (1, 30.0, 0.3, False), (2, 10.0, 0.5, True),
                                              (3, 10.0, 0.5, False)])
def test_unibct_matches_reference(seed, s, m, compact):
    meta = make_meta(seed)
    fn, fo, labels = batch(seed)
    loss_fn = build("unibct", meta, ARC_SCALE=s, ARC_MARGIN=m)
    loss_fn.compact_rows = compact
    out, grad = run(loss_fn, fn, fo, labels)
    value, ref = ref_grad(fn, lambda x: ref_unibct(x, labels, meta, s, m))
    torch.testing.assert_close(out["loss"], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ hot-refresh
@pytest.mark.parametrize("seed,tau,k,detach", [(0, 0.01, 0, False), (1, 0.1, 0, False), (2, 0.1, 3, False),
                                               (3, 0.05, 100, False), (4, 0.01, 10, True), (5, 0.1, 3, True),
                                               (6, 0.1, 0, True)])
def test_hot_refresh_matches_reference(seed, tau, k, detach):
    fn, fo, labels = batch(seed, b=24)
    labels[5:8] = labels[8]  # several same-class pairs to mask
    loss_fn = build("hot_refresh", TEMPERATURE=tau, TOPK_NEG=k, DETACH_KEYS=detach)
    out, grad = run(loss_fn, fn, fo, labels)
    value, ref = ref_grad(fn, lambda x: ref_hot_refresh(x, fo, labels, tau, k, detach))
    torch.testing.assert_close(out["loss"], value, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, ref, rtol=1e-3, atol=1e-4)


def test_hot_refresh_release_objective_has_21_logits_and_no_key_gradient():
    # the release's GLDv2 objective: TOPK_NEG 10, keys gathered without gradient. Same value as with
    # gradient through the keys, another gradient; every row keeps 1 + 10 + 10 logits
    fn, fo, labels = batch(7, b=40)
    kw = dict(TEMPERATURE=0.01, TOPK_NEG=10)
    out_d, grad_d = run(build("hot_refresh", DETACH_KEYS=True, **kw), fn, fo, labels)
    out_g, grad_g = run(build("hot_refresh", **kw), fn, fo, labels)
    torch.testing.assert_close(out_d["loss"], out_g["loss"])
    assert (grad_d - grad_g).abs().max() > 1e-3
    assert all(int((labels != y).sum()) >= 10 for y in labels)  # so every row has 10 real negatives
    fn_hat, fo_hat = F.normalize(fn, dim=1), F.normalize(fo, dim=1)
    same = labels[:, None] == labels[None, :]
    n2o = (fn_hat @ fo_hat.t()).masked_fill(same, float("-inf")).topk(10, dim=1).values
    n2n = (fn_hat @ fn_hat.t()).masked_fill(same, float("-inf")).topk(10, dim=1).values
    logits = torch.cat([(fn_hat * fo_hat).sum(1, keepdim=True), n2o, n2n], dim=1) / 0.01
    assert logits.shape == (40, 21) and torch.isfinite(logits).all()
    torch.testing.assert_close(out_d["loss"], F.cross_entropy(logits, torch.zeros(40, dtype=torch.long)))


def test_hot_refresh_same_class_pairs_are_masked():
    # moving a sample of the same class as row 0 must not change row 0's terms; the loss with
    # everything in one class has only the positive: exactly 0
    fn, fo, _ = batch(4, b=6)
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    loss_fn = build("hot_refresh", TEMPERATURE=0.1)
    moved = fn.clone()
    moved[1] = fo[0] * 10  # a same-class new embedding on top of row 0's positive
    fo_moved = fo.clone()
    fo_moved[1] = fn[0]  # and a same-class old embedding equal to row 0's query
    kw = dict(progress=0.0, epoch=0)
    ref0 = ref_hot_refresh(fn, fo, labels, 0.1, 0)
    ref1 = ref_hot_refresh(moved, fo_moved, labels, 0.1, 0)
    torch.testing.assert_close(loss_fn(fn, fo, labels, **kw)["loss"], ref0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_fn(moved, fo_moved, labels, **kw)["loss"], ref1, rtol=1e-5, atol=1e-5)
    one_class = torch.zeros(6, dtype=torch.long)
    out, grad = run(loss_fn, fn, fo, one_class)
    assert out["loss"].item() == 0.0 and grad.abs().sum() == 0


def test_hot_refresh_topk_keeps_hardest():
    # 1-D embeddings: every dot product is ±1, so with k = 1 each kind contributes its max (+1 or −1)
    fn = torch.tensor([[1.0], [1.0], [-1.0]])
    fo = torch.tensor([[1.0], [-1.0], [-1.0]])
    labels = torch.tensor([0, 1, 2])
    out = build("hot_refresh", TEMPERATURE=1.0, TOPK_NEG=1)(fn, fo, labels, progress=0, epoch=0)
    # row 0: pos 1, n2o max(−1, −1) = −1, n2n max(1, −1) = 1; row 1: pos −1, n2o max(1, −1) = 1,
    # n2n max(1, −1) = 1; row 2: pos 1, n2o max(−1, 1) = 1, n2n max(−1, −1) = −1
    rows = [(1, -1, 1), (-1, 1, 1), (1, 1, -1)]
    expected = sum(math.log(sum(math.exp(v) for v in r)) - r[0] for r in rows) / 3
    assert out["loss"].item() == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------------------------- L2
def test_l2_matches_reference():
    fn, fo, labels = batch(0)
    out, grad = run(build("l2"), fn, fo, labels)

    def ref(x):
        return sum(((x[i] / x[i].norm() - fo[i] / fo[i].norm()) ** 2).sum() for i in range(len(x))) / len(x)

    value, g = ref_grad(fn, ref)
    torch.testing.assert_close(out["loss"], value)
    torch.testing.assert_close(grad, g)


def test_weight_multiplies_the_term_and_autocast_is_disabled():
    fn, fo, labels = batch(1)
    base = build("l2")(fn, fo, labels, progress=0, epoch=0)["loss"]
    heavy = build("l2", WEIGHT=2.5)(fn, fo, labels, progress=0, epoch=0)
    torch.testing.assert_close(heavy["loss"], 2.5 * base)
    torch.testing.assert_close(heavy["l2"], base)  # terms are reported unweighted
    fn16, fo16 = fn.bfloat16(), fo.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = build("hot_refresh")(fn16, fo16, labels, progress=0, epoch=0)
    assert out["loss"].dtype == torch.float32
    ref = build("hot_refresh")(fn16.float(), fo16.float(), labels, progress=0, epoch=0)["loss"]
    torch.testing.assert_close(out["loss"], ref)
