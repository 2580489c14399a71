"""Benchmark: one compatibility-loss step (forward + backward), vectorised vs the original's per-sample loops.

The references below re-enact the ORIGINAL release's per-sample code paths (meta as a dict of lists
keyed by the class id string, a tensor built per sample with ``torch.tensor(...)``, per-sample
Python comparisons on tensors) on the same inputs and parameters, so that each pair computes the
same value (checked before timing). Shapes follow the paper: B = 256, D = 256, 24,393 old and
81,313 new classes (extended-class), about 30 % of the batch from old classes. ``advbct_boundary``
times the elastic-boundary term alone and ``advbct_adversarial`` the adversarial term alone: the
discriminator is the same module, with the same matrix products, in both columns, so the full
``advbct`` ratio can be at most reference(advbct) / reference(advbct_adversarial) (Amdahl).

    python tools/benchmark.py losses [--device cpu] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from advbct.errors import UserError
from advbct.losses import build_compat_loss
from advbct.meta import ClassMeta
from advbct.losses.discriminator import grad_reverse, grl_alpha
from benchmarks.timing import timed_calls

METHODS = ("advbct", "advbct_boundary", "advbct_adversarial", "lce", "unibct", "bct")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--old-classes", type=int, default=24393)
    parser.add_argument("--new-classes", type=int, default=81313)
    parser.add_argument("--old-fraction", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 is steadier on a shared machine")


# ----------------------------------------------------------------------------------- synthetic data
def synthetic_meta(num_classes: int, dim: int, gen: torch.Generator) -> ClassMeta:
    centers = F.normalize(torch.randn(num_classes, dim, generator=gen), dim=1)
    centers = centers * torch.empty(num_classes, 1).uniform_(0.3, 0.9, generator=gen)
    n_kept = torch.randint(1, 8, (num_classes,), generator=gen)
    r_max = torch.empty(num_classes).uniform_(0.5, 1.4, generator=gen)
    theta_max = torch.empty(num_classes).uniform_(0.3, 1.2, generator=gen)
    return ClassMeta(centers=centers, r_max=r_max, r_min=0.5 * r_max, counts=n_kept.clone(), n_kept=n_kept,
                     theta_max=theta_max)


def original_json_dicts(meta: ClassMeta):
    """The original's two meta JSONs as loaded by ``json.load``: radius file and theta file."""
    centers = meta.centers.tolist()
    radius, theta = {}, {}
    for k in range(meta.num_classes):
        n = int(meta.n_kept[k])
        r = torch.linspace(float(meta.r_min[k]), float(meta.r_max[k]), n).tolist()
        t = torch.linspace(0.5 * float(meta.theta_max[k]), float(meta.theta_max[k]), n).tolist()
        radius[str(k)] = {"center": centers[k], "radius": r}
        theta[str(k)] = {"center": centers[k], "radius": t}
    return radius, theta


# ------------------------------------------------------------------- the original's per-sample code
def reference_boundary(feat, labels, meta_json, eb_weight, threshold):
    """Original trainer's elastic boundary: radius_eb filled per sample, then the 'bct_limit' loop."""
    device = feat.device
    radius_eb = torch.zeros(eb_weight.shape[0])
    for j in range(len(labels)):
        if str(labels[j].item()) in meta_json:
            radius_max = meta_json[str(labels[j].item())]["radius"][-1]
            radius_eb[labels[j].item()] = abs(radius_max - threshold)
        else:
            radius_eb[labels[j].item()] = 0
    radius_eb = radius_eb.to(device) * torch.sigmoid(eb_weight)  # the original's ElasticBoundary module
    feat = F.normalize(feat)
    limit_loss, cnt = 0.0, 0
    for j in range(len(feat)):
        key = str(labels[j].item())
        if key in meta_json:
            diff = feat[j] - torch.tensor(meta_json[key]["center"])[None, :].to(device)
            r_max = meta_json[key]["radius"][-1]
            radius = r_max + radius_eb[labels[j].item()] if r_max < threshold else r_max - radius_eb[labels[j].item()]
            if len(meta_json[key]["radius"]) <= 1:
                continue
            tmp = max(torch.norm(diff, p=2) - radius, 0)
            if tmp > 0.0:
                limit_loss += tmp
                cnt += 1
    if cnt:
        limit_loss /= cnt
    return limit_loss


def reference_adversarial(feat, feat_old, disc, alpha, adv_w):
    """Original trainer's adversarial part: the discriminator on GRL(f_n) (label 0) and f_o (label 1)."""
    device = feat.device
    out_new, out_old = disc(grad_reverse(feat, alpha)), disc(feat_old)
    model_loss = F.nll_loss(out_new, torch.zeros(len(feat)).long().to(device)) + F.nll_loss(
        out_old, torch.ones(len(feat)).long().to(device))
    return model_loss * adv_w


def reference_advbct(feat, feat_old, labels, meta_json, eb_weight, disc, threshold, alpha, adv_w):
    """Original trainer's AdvBCT step: the boundary above + the adversarial part."""
    return (reference_boundary(feat, labels, meta_json, eb_weight, threshold)
            + reference_adversarial(feat, feat_old, disc, alpha, adv_w))


def reference_lce(feat, labels, meta_json, theta_json, new_weight):
    """Original trainer's LCE branch: per-sample center/theta lookup, boundary and alignment loops."""
    device = feat.device
    center_olds = torch.zeros([len(labels), feat.shape[1]]).to(device)
    theta_olds = torch.zeros([len(labels)]).to(device)
    with torch.no_grad():
        for j in range(len(labels)):
            if str(labels[j].item()) in meta_json:
                center_olds[j] = torch.tensor(meta_json[str(labels[j].item())]["center"]).to(device)
                radius = theta_json[str(labels[j].item())]["radius"]
                theta_olds[j] = radius[-1] if len(radius) > 1 else 0
    center_olds = F.normalize(center_olds)
    feat = F.normalize(feat)
    boundary, cnt = 0, 0
    for j in range(len(center_olds)):
        if theta_olds[j] == 0:
            continue
        boundary += max(torch.acos(torch.dot(center_olds[j], feat[j])) - theta_olds[j], 0)
        cnt += 1
    boundary /= cnt
    alignment, cnt = 0, 0
    for i, j in enumerate(labels):
        if theta_olds[i] == 0:
            continue
        alignment += 1 - torch.dot(center_olds[i], F.normalize(new_weight[j, :][None, :])[0])
        cnt += 1
    return boundary + alignment / cnt


def _old_rows(feat, labels, num_old):
    """The original's per-sample torch.cat gathering of old-class rows and their label list."""
    labels_bct, feats_bct, counter = [], None, 0
    for j in range(len(labels)):
        if labels[j].item() < num_old:
            feats_bct = feat[j][None, ] if counter == 0 else torch.cat((feats_bct, feat[j][None, :]), 0)
            labels_bct.append(labels[j].item())
            counter += 1
    return feats_bct, labels_bct


def reference_unibct(feat, labels, old_centers_cpu, num_old, scale, margin):
    """Original 'uni_bct' branch: row gathering loop, centers moved to the device each step, ArcFace
    (the original's in-place acos_/+= m/cos_ chain, written out of place)."""
    feats_bct, labels_bct = _old_rows(feat, labels, num_old)
    labels_bct = torch.tensor(labels_bct).to(feat.device)
    cosine = F.linear(F.normalize(feats_bct), F.normalize(old_centers_cpu).to(feat.device))
    m_hot = torch.zeros(cosine.shape, device=cosine.device).scatter_(1, labels_bct[:, None], margin)
    logits = torch.cos(torch.acos(cosine) + m_hot) * scale
    return F.cross_entropy(logits, labels_bct)


def reference_bct(feat, labels, old_weight, num_old):
    """Original 'bct' branch: row gathering loop, old classifier, CE on a per-step label tensor."""
    feats_bct, labels_bct = _old_rows(feat, labels, num_old)
    return F.cross_entropy(F.linear(feats_bct, old_weight), torch.tensor(labels_bct).long().to(feat.device))


# --------------------------------------------------------------------------------------------- timing
def _time_ms(step, device: torch.device, repeats: int, warmup: int):
    """Median milliseconds of ``repeats`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    return statistics.median(timed_calls(step, repeats, device)) * 1000.0


def _forward_backward(fn, leaves):
    def step():
        for leaf in leaves:
            leaf.grad = None
        value = fn()
        value.backward()
        return value
    return step


def run(args) -> dict:
    """Median forward+backward time per method, vectorised vs original-style reference, in ms."""
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    b, d, n_old, n_new = args.batch, args.dim, args.old_classes, args.new_classes
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise UserError(f"--methods: unknown {unknown}; expected a subset of {','.join(METHODS)}")
    meta = synthetic_meta(n_old, d, gen)
    meta_json, theta_json = original_json_dicts(meta)
    is_old = torch.rand(b, generator=gen) < args.old_fraction
    labels = torch.where(is_old, torch.randint(0, n_old, (b,), generator=gen),
                         torch.randint(n_old, n_new, (b,), generator=gen)).to(device)
    feat = (torch.randn(b, d, generator=gen) * 2).to(device).requires_grad_(True)
    feat_old = torch.randn(b, d, generator=gen).to(device)
    new_weight = (torch.randn(n_new, d, generator=gen) * 0.01).to(device).requires_grad_(True)
    old_weight = (torch.randn(n_old, d, generator=gen) * 0.01).to(device)
    total_epochs, epoch, progress = 30, 0, 0.1
    common = dict(embed_dim=d, num_old_classes=n_old, total_epochs=total_epochs, meta=meta)

    results = {}
    for method in methods:
        if method.startswith("advbct"):
            part = method.partition("_")[2]  # "", "boundary" or "adversarial"
            cfg = {"TYPE": "advbct", "BOUNDARY": part != "adversarial", "ADVERSARIAL": part != "boundary"}
            loss = build_compat_loss(cfg, **common).to(device)
            if loss.boundary is not None:  # the original's ElasticBoundary weight spans all new classes
                eb_weight = torch.zeros(n_new, device=device)
                eb_weight[:n_old] = loss.boundary.elastic_weight.detach()
                eb_weight.requires_grad_(True)
            alpha = grl_alpha(progress)
            adv_w = (total_epochs - epoch + 1) / total_epochs
            leaves = [feat, *loss.parameters()]
            vec = lambda: loss(feat, feat_old, labels, progress=progress, epoch=epoch)["loss"]  # noqa: E731
            if part == "boundary":
                ref = lambda: reference_boundary(feat, labels, meta_json, eb_weight, 1.0)  # noqa: E731
                leaves_ref = [feat, eb_weight]
            elif part == "adversarial":
                ref = lambda: reference_adversarial(feat, feat_old, loss.adversarial.discriminator,  # noqa: E731
                                                    alpha, adv_w)
                leaves_ref = [feat, *loss.parameters()]
            else:
                ref = lambda: reference_advbct(feat, feat_old, labels, meta_json, eb_weight,  # noqa: E731
                                               loss.adversarial.discriminator, 1.0, alpha, adv_w)
                leaves_ref = [feat, eb_weight, *loss.parameters()]
        elif method == "lce":
            loss = build_compat_loss({"TYPE": "lce"}, **common).to(device)
            leaves = leaves_ref = [feat, new_weight]
            vec = lambda: loss(feat, feat_old, labels, new_classifier_weight=new_weight,  # noqa: E731
                               progress=progress, epoch=epoch)["loss"]
            ref = lambda: reference_lce(feat, labels, meta_json, theta_json, new_weight)  # noqa: E731
        elif method == "unibct":
            loss = build_compat_loss({"TYPE": "unibct"}, **common).to(device)
            leaves = leaves_ref = [feat]
            vec = lambda: loss(feat, feat_old, labels, progress=progress, epoch=epoch)["loss"]  # noqa: E731
            ref = lambda: reference_unibct(feat, labels, meta.centers, n_old, 30.0, 0.3)  # noqa: E731
        else:
            loss = build_compat_loss({"TYPE": "bct"}, **common, old_classifier_weight=old_weight).to(device)
            leaves = leaves_ref = [feat]
            vec = lambda: loss(feat, feat_old, labels, progress=progress, epoch=epoch)["loss"]  # noqa: E731
            ref = lambda: reference_bct(feat, labels, old_weight, n_old)  # noqa: E731
        v_value, r_value = float(vec().detach()), float(torch.as_tensor(ref()).detach())
        if abs(v_value - r_value) > 1e-3 * max(1.0, abs(r_value)):
            raise RuntimeError(f"{method}: vectorised loss {v_value} != reference {r_value}")
        vec_ms = _time_ms(_forward_backward(vec, leaves), device, args.repeats, args.warmup)
        ref_ms = _time_ms(_forward_backward(ref, leaves_ref), device, args.repeats, args.warmup)
        results[method] = {"vectorised_ms": round(vec_ms, 3), "reference_ms": round(ref_ms, 3),
                           "speedup": round(ref_ms / vec_ms, 2)}
    return results
