"""MixBCT: the vectorised term against a per-sample reference of the release's mixed batch, its row draw,
its options and registry facts, the head taken from the LOSS section, and (slow) a short training with the
real trainer."""

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from advbct.config import load_config
from advbct.engine.builders import build_compatibility
from advbct.engine.trainer import Trainer
from advbct.errors import UserError
from advbct.losses import build_compat_loss, get_method, needs_meta, needs_old_classifier
from advbct.losses.mixbct import MixBCTLoss, draw_rows, head_logits
from advbct.meta import ClassMeta
from advbct.models.heads import build_classifier

D, C_OLD, C_NEW, B = 8, 5, 9, 20
K = int(B * 0.3)  # rows drawn per batch at the paper's ratio


def make_meta(seed, r_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(C_OLD, D, generator=g), dim=1) * 0.6
    n_kept = torch.randint(2, 9, (C_OLD,), generator=g)
    n_kept[3] = 0  # a class of the old model without samples in the meta: no statistics, never filtered
    r_max = torch.empty(C_OLD).uniform_(0.7, 1.3, generator=g) * r_scale
    return ClassMeta(centers=centers, r_max=r_max, r_min=r_max * 0.5, counts=n_kept.clone(), n_kept=n_kept,
                     theta_max=torch.full((C_OLD,), 0.8))


def make_batch(seed, composition):
    g = torch.Generator().manual_seed(100 + seed)
    fn, fo = torch.randn(B, D, generator=g) * 3, torch.randn(B, D, generator=g) * 3
    w = torch.randn(C_NEW, D, generator=g)
    if composition == "mixed":
        labels = torch.randint(0, C_NEW, (B,), generator=g)
        labels[:3] = torch.tensor([3, 7, 1])  # a class without meta statistics, a new class, an old class
    elif composition == "no_old":
        labels = torch.randint(C_OLD, C_NEW, (B,), generator=g)
    else:  # "all_old"
        labels = torch.randint(0, C_OLD, (B,), generator=g)
    return fn, fo, w, labels


def build(meta=None, head=None, **cfg):
    """The loss from COMP_LOSS keys ``cfg``; ``head``: the new model's (classifier, scale, margin), else the
    defaults of build_compat_loss (those of the LOSS section)."""
    kw = {} if head is None else dict(zip(("classifier", "scale", "margin"), head))
    return build_compat_loss({"TYPE": "mixbct", **cfg}, embed_dim=D, num_old_classes=C_OLD, total_epochs=2,
                             meta=meta, **kw)


# ------------------------------------------------------------------------ per-sample reference
def ref_ce(kind, z, w, y, s, m):
    """CE of one embedding under the head, straight from its formula (one sample, a loop over classes)."""
    if kind == "softmax":
        logits = [torch.dot(w[c], z) for c in range(len(w))]
    else:
        cos = [torch.dot(w[c] / w[c].norm(), z / z.norm()) for c in range(len(w))]
        if kind == "arcface":
            target = torch.cos(torch.acos(cos[y].clamp(-1 + 1e-7, 1 - 1e-7)) + m)
        else:
            target = cos[y] - m
        logits = [s * (target if c == y else cos[c]) for c in range(len(w))]
    logits = torch.stack(logits)
    return torch.logsumexp(logits, 0) - logits[y]


def ref_credible(fo, labels, meta):
    """The denoising per sample: an old-class row with meta statistics is kept within r_max of its center."""
    keep = []
    for i in range(len(labels)):
        y = int(labels[i])
        if meta is None or y >= C_OLD or int(meta.n_kept[y]) == 0:
            keep.append(True)
        else:
            keep.append(float((fo[i] / fo[i].norm() - meta.centers[y]).norm()) <= float(meta.r_max[y]))
    return keep


def ref_drawn(scores, keep, k):
    """The k credible rows with the highest scores (a uniform draw without replacement), all if fewer."""
    ranked = sorted((i for i in range(len(keep)) if keep[i]), key=lambda i: -float(scores[i]))
    return ranked[:k]


def ref_term(x, fo, w, labels, drawn, kind="softmax", s=30.0, m=0.3, replace=True):
    total = 0.0
    for i in drawn:
        y = int(labels[i])
        total = total + ref_ce(kind, fo[i], w, y, s, m)
        if replace:
            total = total - ref_ce(kind, x[i], w, y, s, m)
    return total / len(labels)


def run_both(loss_fn, meta, fn, fo, w, labels, seed, **ref_kw):
    """(vectorised output, its grads) and (reference value, its grads) on the same random draw."""
    x, wv = fn.clone().requires_grad_(True), w.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = loss_fn(x, fo, labels, new_classifier_weight=wv, progress=0.5, epoch=0)
    out["loss"].backward()
    torch.manual_seed(seed)
    scores = torch.rand(len(labels))  # the draw's scores: the loss's only random numbers
    keep = ref_credible(fo, labels, meta)
    drawn = ref_drawn(scores, keep, int(len(labels) * loss_fn.ratio))
    xr, wr = fn.clone().requires_grad_(True), w.clone().requires_grad_(True)
    value = ref_term(xr, fo, wr, labels, drawn, **ref_kw)
    value.backward()
    zero = torch.zeros_like(fn)  # no gradient path at all (MIX_REPLACE false) reads as a zero gradient
    return (out, zero if x.grad is None else x.grad, wv.grad, value, zero if xr.grad is None else xr.grad,
            wr.grad, drawn, keep)


@pytest.mark.parametrize("composition", ["mixed", "no_old", "all_old"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_per_sample_reference_in_values_and_gradients(seed, composition):
    meta = make_meta(seed)
    fn, fo, w, labels = make_batch(seed, composition)
    loss_fn = build(meta)
    out, gx, gw, value, rgx, rgw, drawn, keep = run_both(loss_fn, meta, fn, fo, w, labels, seed)
    torch.testing.assert_close(out["loss"], value)
    torch.testing.assert_close(out["mixbct"], value.detach())
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gw, rgw)
    assert len(drawn) == K and sum(keep) >= K
    assert out["mixed_fraction"].item() == pytest.approx(K / B)
    assert out["credible_fraction"].item() == pytest.approx(sum(keep) / B)
    # only the drawn rows' new embeddings get a gradient (their CE is swapped out of L_cls)
    assert set(torch.nonzero(gx.abs().sum(1)).flatten().tolist()) == set(drawn)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
@pytest.mark.parametrize("replace", [True, False])
def test_margin_heads_and_the_additive_variant_match_the_reference(kind, replace):
    meta = make_meta(5)
    fn, fo, w, labels = make_batch(5, "mixed")
    loss_fn = build(meta, (kind, 16.0, 0.4), MIX_REPLACE=replace, WEIGHT=2.5)
    out, gx, gw, value, rgx, rgw, _, _ = run_both(loss_fn, meta, fn, fo, w, labels, 5, kind=kind, s=16.0, m=0.4,
                                                  replace=replace)
    torch.testing.assert_close(out["loss"], 2.5 * value)  # WEIGHT scales the term; the logged term is unweighted
    torch.testing.assert_close(out["mixbct"], value.detach())
    torch.testing.assert_close(gx, 2.5 * rgx)
    torch.testing.assert_close(gw, 2.5 * rgw)
    if not replace:
        assert gx.abs().sum() == 0  # frozen old embeddings only: the term trains the classifier alone


def test_denoising_filters_far_old_embeddings_and_fewer_candidates_draw_fewer_rows():
    meta = make_meta(3, r_scale=0.05)  # radii far below any distance: only rows without statistics stay
    fn, fo, w, labels = make_batch(3, "all_old")
    labels = labels % 3  # old classes 0..2, all with statistics
    labels[:2] = 3  # the class without meta samples: its two rows are the only candidates
    loss_fn = build(meta)
    out, gx, gw, value, rgx, rgw, drawn, keep = run_both(loss_fn, meta, fn, fo, w, labels, 3)
    assert sum(keep) == 2 and sorted(drawn) == [0, 1]
    assert out["mixed_fraction"].item() == pytest.approx(2 / B)
    torch.testing.assert_close(out["loss"], value)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gw, rgw)
    # MIX_DENOISE none: every row is a candidate, no meta needed
    out = build(None, MIX_DENOISE="none")(fn, fo, labels, new_classifier_weight=w, progress=0.0, epoch=0)
    assert out["credible_fraction"].item() == 1.0 and out["mixed_fraction"].item() == pytest.approx(K / B)


def test_with_replacement_l_cls_plus_term_is_the_released_mixed_batch_loss():
    """The trainer's L_cls through the real heads + the term = CE of the mixed batch (values and gradients)."""
    meta = make_meta(7)
    fn, fo, w, labels = make_batch(7, "mixed")
    for kind in ("softmax", "arcface", "cosface"):
        head = build_classifier(kind, D, C_NEW, scale=20.0, margin=0.35)
        with torch.no_grad():
            head.weight.copy_(w)
        loss_fn = build(meta, (kind, 20.0, 0.35))
        x = fn.clone().requires_grad_(True)
        torch.manual_seed(11)
        out = loss_fn(x, fo, labels, new_classifier_weight=head.weight, progress=0.0, epoch=0)
        (F.cross_entropy(head(x, labels), labels) + out["loss"]).backward()
        gx, gw = x.grad, head.weight.grad.clone()
        torch.manual_seed(11)
        drawn = ref_drawn(torch.rand(B), ref_credible(fo, labels, meta), K)
        head.weight.grad = None
        x2 = fn.clone().requires_grad_(True)
        swap = torch.zeros(B, 1, dtype=torch.bool)
        swap[drawn] = True
        mixed = torch.where(swap, fo, x2)
        expected = F.cross_entropy(head(mixed, labels), labels)
        expected.backward()
        total = F.cross_entropy(head(fn, labels), labels) + out["loss"].detach()
        torch.testing.assert_close(total, expected.detach())
        torch.testing.assert_close(gx, x2.grad)
        torch.testing.assert_close(gw, head.weight.grad)


@pytest.mark.parametrize("kind", ["softmax", "arcface", "cosface"])
def test_head_logits_are_the_trainer_heads(kind):
    g = torch.Generator().manual_seed(0)
    feat, labels = torch.randn(6, D, generator=g), torch.randint(0, C_NEW, (6,), generator=g)
    head = build_classifier(kind, D, C_NEW, scale=12.0, margin=0.25)
    x = feat.clone().requires_grad_(True)
    ours = head_logits(kind, x, head.weight, labels, 12.0, 0.25)
    torch.testing.assert_close(ours, head(feat, labels))
    ours.square().sum().backward()
    x2 = feat.clone().requires_grad_(True)
    grad_w = head.weight.grad.clone()
    head.weight.grad = None
    head(x2, labels).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(grad_w, head.weight.grad)


def test_draw_is_uniform_without_replacement_among_candidates():
    candidates = torch.tensor([True, False, True, True, False, True, True, False, True, False])
    counts = torch.zeros(10)
    torch.manual_seed(0)
    for _ in range(3000):
        rows, valid = draw_rows(candidates, 3)
        assert valid.all() and len(set(rows.tolist())) == 3 and candidates[rows].all()
        counts[rows] += 1
    freq = counts / 3000
    assert (freq[~candidates] == 0).all()
    assert torch.allclose(freq[candidates], torch.full((6,), 0.5), atol=0.04)  # 3 of 6: each drawn half the time
    rows, valid = draw_rows(torch.tensor([False, True, False, False]), 3)
    assert valid.sum() == 1 and rows[valid].tolist() == [1]  # fewer candidates than the draw: the rest invalid
    rows, valid = draw_rows(candidates, 0)
    assert rows.numel() == 0


# ------------------------------------------------------------------------------ options and registry
@pytest.mark.parametrize("key, value, expect", [
    ("MIX_RATIO", 0.0, "COMP_LOSS.MIX_RATIO 0.0: expected a fraction in (0, 1]"),
    ("MIX_RATIO", 1.5, "COMP_LOSS.MIX_RATIO 1.5: expected a fraction in (0, 1]"),
    ("MIX_DENOISE", "iqr", "COMP_LOSS.MIX_DENOISE 'iqr': expected one of meta, none"),
])
def test_option_values_are_checked_in_one_line(key, value, expect):
    with pytest.raises(UserError) as err:
        build(make_meta(0), **{key: value})
    assert str(err.value) == expect


def test_the_head_is_the_one_build_compat_loss_is_given():
    """The head comes from the LOSS section through build_compat_loss, not from COMP_LOSS keys."""
    meta = make_meta(4)
    fn, fo, w, labels = make_batch(4, "mixed")
    loss_fn = build_compat_loss({"TYPE": "mixbct"}, embed_dim=D, num_old_classes=C_OLD, total_epochs=2, meta=meta,
                                classifier="arcface", scale=24.0, margin=0.45)
    assert (loss_fn.head, loss_fn.scale, loss_fn.margin) == ("arcface", 24.0, 0.45)
    out, gx, gw, value, rgx, rgw, _, _ = run_both(loss_fn, meta, fn, fo, w, labels, 4, kind="arcface", s=24.0,
                                                  m=0.45)
    torch.testing.assert_close(out["loss"], value)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gw, rgw)
    # another head gives another term: the head is really read
    torch.manual_seed(4)  # the same draw
    other = build(meta, ("cosface", 24.0, 0.45))(fn, fo, labels, new_classifier_weight=w, progress=0.5, epoch=0)
    other = other["loss"]
    assert not torch.allclose(other, value)
    # without them: the LOSS section's defaults
    loss_section = load_config().LOSS
    default = build(meta)
    assert (default.head, default.scale, default.margin) == (loss_section.TYPE, loss_section.SCALE,
                                                             loss_section.MARGIN)
    with pytest.raises(UserError) as err:
        build(meta, ("sphereface", 30.0, 0.3))
    assert str(err.value) == "LOSS.TYPE 'sphereface': mixbct supports the heads softmax, arcface, cosface"
    with pytest.raises(UserError, match="^LOSS.TYPE 'sphereface'"):
        MixBCTLoss(C_OLD, meta=meta, head="sphereface")


def test_build_compatibility_passes_the_loss_section(random_checkpoint):
    """The trainer's builder hands LOSS.TYPE / SCALE / MARGIN to the method (no meta: MIX_DENOISE none)."""
    cfg = load_config(None, ["MODEL.EMB_DIM", "32", "OLD_MODEL.WEIGHTS", random_checkpoint(7, 32, 4),
                             "COMP_LOSS.TYPE", "mixbct", "COMP_LOSS.MIX_DENOISE", "none",
                             "LOSS.TYPE", "cosface", "LOSS.SCALE", "18.0", "LOSS.MARGIN", "0.25"])
    old_model, loss = build_compatibility(cfg, num_classes=6, device=torch.device("cpu"))
    assert isinstance(loss, MixBCTLoss) and old_model is not None
    assert (loss.head, loss.scale, loss.margin) == ("cosface", 18.0, 0.25)


def test_registry_facts_and_defaults():
    method = get_method("mixbct")
    assert method.label == "MixBCT" and method.paper_row is False and method.loss_class is MixBCTLoss
    defaults = {o.key: o.default for o in method.options}
    assert defaults == {"MIX_RATIO": 0.3, "MIX_DENOISE": "meta", "MIX_REPLACE": True}
    assert needs_meta({"TYPE": "mixbct"}) and not needs_meta({"TYPE": "mixbct", "MIX_DENOISE": "none"})
    assert not needs_old_classifier({"TYPE": "mixbct"})
    loss = build(make_meta(0))
    assert loss.needs_meta and loss.needs_old_features and loss.needs_new_classifier
    assert not loss.needs_old_classifier and not list(loss.parameters())  # nothing for the optimiser, no DDP
    assert loss.state_dict() == {}  # stateless: nothing to resume
    assert not build(None, MIX_DENOISE="none").needs_meta
    with pytest.raises(UserError, match="COMP_LOSS.META_PATH"):
        build(None)


# --------------------------------------------------------------------------------- a short training
@pytest.mark.slow
def test_trains_with_the_real_trainer(ddp_setup, random_checkpoint, class_meta, tmp_path):
    image_list, old = ddp_setup["data"], random_checkpoint(7, 32, 4)  # the shared old model (4 classes) and meta
    out = tmp_path / "run"
    cfg = load_config(None, [
        "OUTPUT", str(out), "DATA.TRAIN_LIST", str(image_list / "train.txt"), "DATA.ROOT", str(image_list),
        "MODEL.ARCH", "resnet18", "MODEL.EMB_DIM", "32", "MODEL.PRETRAINED", "false", "DATA.IMG_SIZE", "32",
        "DATA.NUM_WORKERS", "0", "TRAIN.BATCH_SIZE", "8", "TRAIN.EPOCHS", "1", "TRAIN.MAX_ITERS_PER_EPOCH", "1",
        "TRAIN.PRINT_FREQ", "1", "SEED", "1234", "OLD_MODEL.WEIGHTS", old, "COMP_LOSS.TYPE", "mixbct",
        "COMP_LOSS.META_PATH", class_meta(old), "COMP_LOSS.WEIGHT", "0.5"])
    trainer = Trainer(cfg)
    assert isinstance(trainer.comp_loss, MixBCTLoss) and trainer.comp_loss.needs_meta
    means = {k: float(v) for k, v in trainer.fit()[0].items()}
    assert {"cls", "comp", "total", "mixbct", "old_ce", "mixed_fraction", "credible_fraction"} <= set(means)
    assert all(math.isfinite(v) for v in means.values())
    assert means["comp"] == pytest.approx(0.5 * means["mixbct"], rel=1e-5, abs=1e-7)
    assert means["total"] == pytest.approx(means["cls"] + means["comp"], rel=1e-5)
    assert 0 < means["mixed_fraction"] <= 2 / 8 and means["old_ce"] > 0  # int(8 * 0.3) = 2 rows at most
    assert 0 < means["credible_fraction"] <= 1
    assert (out / "final.pth").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["COMP_LOSS"]["MIX_RATIO"] == 0.3
