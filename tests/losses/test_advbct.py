"""AdvBCT: elastic boundary, gradient reversal + discriminator, schedules; vs per-sample references."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from advbct.errors import UserError
from advbct.losses import build_compat_loss
from advbct.losses.adversarial import AdversarialLoss, adversarial_weight
from advbct.losses.elastic_boundary import ElasticBoundaryLoss
from advbct.meta import ClassMeta
from advbct.losses.discriminator import Discriminator, GradientReversal, grad_reverse, grl_alpha

D, C_OLD = 8, 6


def make_meta(seed, num_classes=C_OLD, dim=D):
    """Synthetic meta: centers inside the unit ball, r_max on both sides of T = 1, some classes ≤ 1 kept."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    centers = centers * torch.empty(num_classes, 1).uniform_(0.2, 0.8, generator=g)
    r_max = torch.empty(num_classes).uniform_(0.5, 1.4, generator=g)
    n_kept = torch.randint(2, 9, (num_classes,), generator=g)
    n_kept[1], n_kept[3] = 1, 0
    return ClassMeta(centers=centers, r_max=r_max, r_min=r_max * 0.6, counts=n_kept.clone(), n_kept=n_kept,
                     theta_max=torch.empty(num_classes).uniform_(0.3, 1.2, generator=g))


def ref_boundary(feat_new, labels, meta, w, threshold, num_old, radius_kind="elastic"):
    """Per-sample loop of the original 'bct_limit' branch (its if/else form of the elastic radius)."""
    total, count = 0.0, 0
    for i in range(len(labels)):
        y = int(labels[i])
        if y >= num_old or int(meta.n_kept[y]) <= 1:
            continue
        r_max = float(meta.r_max[y])
        if radius_kind == "elastic":
            eb = abs(r_max - threshold) * torch.sigmoid(w[y])
            radius = r_max + eb if r_max < threshold else r_max - eb
        elif radius_kind == "min":
            radius = float(meta.r_min[y])
        else:
            radius = r_max
        diff = feat_new[i] / feat_new[i].norm() - meta.centers[y]
        excess = diff.norm() - radius
        if excess > 0:
            total = total + excess
            count += 1
    return total / count if count else torch.zeros(())


def batch(seed, b=24, num_new=10):
    g = torch.Generator().manual_seed(100 + seed)
    feat_new = torch.randn(b, D, generator=g) * 3
    labels = torch.randint(0, num_new, (b,), generator=g)
    labels[:4] = torch.tensor([1, 3, 7, 0])  # a ≤1-kept class, an empty class, a new class, a valid one
    return feat_new, labels


@pytest.mark.parametrize("compact", [True, False])  # CPU row compaction / GPU masking, same numbers
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_elastic_boundary_matches_reference_value_and_grads(seed, compact):
    meta = make_meta(seed)
    torch.manual_seed(seed)
    eb = ElasticBoundaryLoss(meta, C_OLD, threshold=1.0)
    eb.compact_rows = compact
    feat_new, labels = batch(seed)
    x = feat_new.clone().requires_grad_(True)
    loss, diag = eb(x, labels)
    loss.backward()
    x_ref = feat_new.clone().requires_grad_(True)
    w_ref = eb.elastic_weight.detach().clone().requires_grad_(True)
    ref = ref_boundary(x_ref, labels, meta, w_ref, 1.0, C_OLD)
    ref.backward()
    assert int(diag["violators"]) > 0
    n_valid = sum(1 for y in labels.tolist() if y < C_OLD and int(meta.n_kept[y]) > 1)
    assert diag["violation_rate"].item() == pytest.approx(int(diag["violators"]) / n_valid)
    torch.testing.assert_close(loss, ref.float())
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(eb.elastic_weight.grad, w_ref.grad)
    # skipped classes never receive a radius gradient
    assert eb.elastic_weight.grad[[1, 3]].abs().sum() == 0


@pytest.mark.parametrize("kind", ["min", "max"])
def test_fixed_boundary_ablation_matches_reference(kind):
    meta = make_meta(5)
    eb = ElasticBoundaryLoss(meta, C_OLD, elastic=False, fixed_radius=kind)
    assert eb.elastic_weight is None and not list(eb.parameters())
    feat_new, labels = batch(5)
    x = feat_new.clone().requires_grad_(True)
    loss, _ = eb(x, labels)
    loss.backward()
    x_ref = feat_new.clone().requires_grad_(True)
    ref = ref_boundary(x_ref, labels, meta, None, 1.0, C_OLD, radius_kind=kind)
    ref.backward()
    torch.testing.assert_close(loss, ref.float())
    torch.testing.assert_close(x.grad, x_ref.grad)


def _unit_meta(r_min, n_kept, r_max=None, centers=None):
    c = len(r_min)
    return ClassMeta(centers=torch.zeros(c, 2) if centers is None else centers,
                     r_max=torch.tensor(r_max if r_max is not None else r_min), r_min=torch.tensor(r_min),
                     counts=torch.tensor(n_kept), n_kept=torch.tensor(n_kept), theta_max=torch.ones(c))


def test_violator_count_normalisation_hand_case():
    # centers at the origin: every distance is 1. Radii 0.7 / 0.9 -> excess 0.3 / 0.1; 1.5 -> none;
    # class 3 keeps one radius (skipped, radius 0 would otherwise violate); label 5 is a new class.
    meta = _unit_meta([0.7, 0.9, 1.5, 0.0], [5, 5, 5, 1])
    eb = ElasticBoundaryLoss(meta, 4, elastic=False, fixed_radius="min")
    x = torch.tensor([[3.0, 0.0], [0.0, -2.0], [1.0, 1.0], [0.5, 0.0], [0.0, 7.0]], requires_grad=True)
    loss, diag = eb(x, torch.tensor([0, 1, 2, 3, 5]))
    torch.testing.assert_close(loss, torch.tensor(0.2))  # (0.3 + 0.1) / 2 violators, not / 5 or / 3
    assert int(diag["violators"]) == 2
    torch.testing.assert_close(diag["violation_rate"], torch.tensor(2 / 3))
    loss.backward()
    # d‖x̂‖/dx = 0 along x (‖x̂‖ ≡ 1 when the center is 0): only rows' existence matters, all grads 0
    torch.testing.assert_close(x.grad, torch.zeros_like(x))


def test_elastic_radius_gradient_hand_case():
    # class 0: r_max 0.5 < T -> r̃ = 0.5 + σ(0)·0.5 = 0.75; x̂ = (1,0), center 0: excess 0.25
    # class 1: r_max 1.4 > T -> r̃ = 1.4 − σ(0)·0.4 = 1.2; center (0.5, 0), x̂ = (−1, 0): excess 0.3
    meta = _unit_meta([0.1, 0.1], [4, 4], r_max=[0.5, 1.4], centers=torch.tensor([[0.0, 0.0], [0.5, 0.0]]))
    eb = ElasticBoundaryLoss(meta, 2, threshold=1.0)
    with torch.no_grad():
        eb.elastic_weight.zero_()
    x = torch.tensor([[2.0, 0.0], [-4.0, 0.0]], requires_grad=True)
    loss, _ = eb(x, torch.tensor([0, 1]))
    torch.testing.assert_close(loss, torch.tensor((0.25 + 0.3) / 2))
    loss.backward()
    # ∂L/∂w_k = −σ'(0)(T − r_max,k) / 2 = −0.25·(0.5, −0.4) / 2
    torch.testing.assert_close(eb.elastic_weight.grad, torch.tensor([-0.0625, 0.05]))


def test_no_violators_gives_zero_loss_and_zero_grads():
    meta = make_meta(3)
    meta.r_max.fill_(5.0)  # every boundary larger than any distance (≤ 2)
    eb = ElasticBoundaryLoss(meta, C_OLD, threshold=6.0)
    x = torch.randn(16, D, requires_grad=True)
    loss, diag = eb(x, torch.randint(0, C_OLD, (16,)))
    loss.backward()
    assert loss.item() == 0.0 and int(diag["violators"]) == 0
    assert x.grad.abs().sum() == 0 and eb.elastic_weight.grad.abs().sum() == 0


def test_elastic_weight_init_uniform_and_seeded():
    meta = make_meta(0, num_classes=500)
    torch.manual_seed(7)
    a = ElasticBoundaryLoss(meta, 500).elastic_weight.detach()
    torch.manual_seed(7)
    b = ElasticBoundaryLoss(meta, 500).elastic_weight.detach()
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1 and a.min() < -0.9 and a.max() > 0.9


# ------------------------------------------------------------------------------------- adversarial
def test_alpha_schedule_values():
    assert grl_alpha(0.0) == 0.0
    assert grl_alpha(0.5) == pytest.approx(0.9866142981514305, abs=1e-12)
    assert grl_alpha(1.0) == pytest.approx(0.9999092042625951, abs=1e-12)
    assert grl_alpha(0.5, gamma=2.0) == pytest.approx(2 / (1 + math.exp(-1)) - 1)


def test_adversarial_weight_schedule():
    assert adversarial_weight(0, 30) == pytest.approx(31 / 30)
    assert adversarial_weight(29, 30) == pytest.approx(2 / 30)
    assert adversarial_weight(0, 30, "constant") == 1.0 and adversarial_weight(29, 30, "constant") == 1.0


def test_gradient_reversal_forward_identity_backward_negated():
    x = torch.randn(5, 3, requires_grad=True)
    g = torch.randn(5, 3)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    y.backward(g)
    torch.testing.assert_close(x.grad, -0.3 * g)
    layer = GradientReversal(2.0)
    x2 = torch.randn(4, requires_grad=True)
    layer(x2).sum().backward()
    torch.testing.assert_close(x2.grad, torch.full((4,), -2.0))


def ref_discriminator_logp(disc, x):
    """Straightforward re-implementation of Linear → BN (batch stats) → ReLU → Linear → log-softmax."""
    fc1, bn, _, fc2, _ = disc
    h = x @ fc1.weight.t() + fc1.bias
    mean, var = h.mean(0), h.var(0, unbiased=False)
    h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    logits = torch.relu(h) @ fc2.weight.t() + fc2.bias
    return logits - torch.logsumexp(logits, 1, keepdim=True)


@pytest.mark.parametrize("seed,progress", [(0, 0.5), (1, 0.1), (2, 1.0)])
def test_adversarial_loss_matches_reference_and_grl_sign(seed, progress):
    torch.manual_seed(seed)
    adv = AdversarialLoss(D, hidden=12)
    ref_disc = copy.deepcopy(adv.discriminator)
    fn, fo = torch.randn(10, D) * 2, torch.randn(10, D)
    x = fn.clone().requires_grad_(True)
    loss, diag, alpha = adv(x, fo, progress)
    loss.backward()
    # reference: per-sample NLL loop on the re-implemented discriminator, no gradient reversal
    x_ref = fn.clone().requires_grad_(True)
    lp_new, lp_old = ref_discriminator_logp(ref_disc, x_ref), ref_discriminator_logp(ref_disc, fo)
    ref = sum(-lp_new[i, 0] for i in range(10)) / 10 + sum(-lp_old[i, 1] for i in range(10)) / 10
    ref.backward()
    assert alpha == pytest.approx(grl_alpha(progress))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, -alpha * x_ref.grad, rtol=1e-4, atol=1e-7)  # reversed and scaled
    for p, q in zip(adv.discriminator.parameters(), ref_disc.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)  # the discriminator is not reversed
    acc = ((lp_new.argmax(1) == 0).sum() + (lp_old.argmax(1) == 1).sum()).item() / 20
    assert diag["disc_acc"].item() == pytest.approx(acc)


def test_grl_at_progress_zero_blocks_feature_gradient_only():
    torch.manual_seed(0)
    adv = AdversarialLoss(D)
    x = torch.randn(6, D, requires_grad=True)
    loss, _, alpha = adv(x, torch.randn(6, D), 0.0)
    loss.backward()
    assert alpha == 0.0 and x.grad.abs().sum() == 0
    assert adv.discriminator[0].weight.grad.abs().sum() > 0


def test_discriminator_architecture():
    disc = Discriminator(256, 100)
    shapes = [tuple(p.shape) for p in disc.parameters()]
    assert shapes == [(100, 256), (100,), (100,), (100,), (2, 100), (2,)]
    out = disc(torch.randn(5, 256))
    torch.testing.assert_close(out.exp().sum(1), torch.ones(5))


# ------------------------------------------------------------------------------------ full advbct
def _cfg(**kw):
    return {"TYPE": "advbct", "THRESHOLD": 1.0, "DISC_HIDDEN": 12, **kw}


@pytest.mark.parametrize("seed", [0, 1])
def test_advbct_total_is_boundary_plus_weighted_adversarial(seed):
    meta = make_meta(seed)
    torch.manual_seed(seed)
    loss_fn = build_compat_loss(_cfg(WEIGHT=0.5), embed_dim=D, num_old_classes=C_OLD, total_epochs=4, meta=meta)
    fn, labels = batch(seed)
    fo = torch.randn_like(fn)
    out = loss_fn(fn.clone().requires_grad_(True), fo, labels, progress=0.25, epoch=1)
    w = (4 - 1 + 1) / 4
    torch.testing.assert_close(out["loss"], 0.5 * (out["boundary"] + w * out["adversarial"]))
    assert out["adv_weight"].item() == pytest.approx(w) and out["alpha"].item() == pytest.approx(grl_alpha(0.25))
    assert set(out) >= {"loss", "boundary", "adversarial", "disc_acc", "violation_rate", "alpha", "adv_weight"}
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    # the boundary term equals the per-sample reference with the module's own w
    ref = ref_boundary(fn, labels, meta, loss_fn.boundary.elastic_weight.detach(), 1.0, C_OLD)
    torch.testing.assert_close(out["boundary"], ref.float())


def test_advbct_gradients_split_between_terms():
    meta = make_meta(4)
    torch.manual_seed(0)
    full = build_compat_loss(_cfg(), embed_dim=D, num_old_classes=C_OLD, total_epochs=3, meta=meta)
    torch.manual_seed(0)
    only_eb = build_compat_loss(_cfg(ADVERSARIAL=False), embed_dim=D, num_old_classes=C_OLD, total_epochs=3, meta=meta)
    torch.manual_seed(0)
    _ = torch.empty(C_OLD).uniform_(-1, 1)  # same RNG consumption as the boundary's w
    only_adv = build_compat_loss(_cfg(BOUNDARY=False), embed_dim=D, num_old_classes=C_OLD, total_epochs=3, meta=None)
    fn, labels = batch(4)
    fo = torch.randn_like(fn)
    grads = []
    for m in (full, only_eb, only_adv):
        x = fn.clone().requires_grad_(True)
        m(x, fo, labels, progress=0.7, epoch=2)["loss"].backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1] + grads[2])
    assert "adversarial" not in only_eb(fn, fo, labels, progress=0.7, epoch=2)
    assert "boundary" not in only_adv(fn, fo, labels, progress=0.7, epoch=2)


def test_advbct_parameters_and_state_dict():
    meta = make_meta(0)
    loss_fn = build_compat_loss(_cfg(), embed_dim=D, num_old_classes=C_OLD, total_epochs=3, meta=meta)
    names = set(dict(loss_fn.named_parameters()))
    assert "boundary.elastic_weight" in names and any(n.startswith("adversarial.discriminator") for n in names)
    keys = set(loss_fn.state_dict())
    assert "boundary.elastic_weight" in keys and not any("centers" in k or "radius" in k for k in keys)
    fixed = build_compat_loss(_cfg(ELASTIC=False, ADVERSARIAL=False), embed_dim=D, num_old_classes=C_OLD,
                              total_epochs=3, meta=meta)
    assert not list(fixed.parameters())


def test_advbct_rejects_bad_options():
    meta = make_meta(0)
    kw = dict(embed_dim=D, num_old_classes=C_OLD, total_epochs=3, meta=meta)
    with pytest.raises(UserError, match="COMP_LOSS.BOUNDARY and COMP_LOSS.ADVERSARIAL"):
        build_compat_loss(_cfg(BOUNDARY=False, ADVERSARIAL=False), **kw)
    with pytest.raises(UserError, match="COMP_LOSS.ADV_SCHEDULE"):
        build_compat_loss(_cfg(ADV_SCHEDULE="linear"), **kw)
    with pytest.raises(UserError, match="COMP_LOSS.FIXED_RADIUS"):
        build_compat_loss(_cfg(ELASTIC=False, FIXED_RADIUS="median"), **kw)
    with pytest.raises(UserError, match="COMP_LOSS.META_PATH"):
        build_compat_loss(_cfg(), embed_dim=D, num_old_classes=C_OLD, total_epochs=3, meta=None)
