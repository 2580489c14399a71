"""Hot-refresh / RACT baseline (Zhang et al., ICLR 2022; PAPER.md "Baselines")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advbct.distributed import all_gather_with_grad
from advbct.losses.base import CompatibilityLoss
from advbct.losses.registry import Option, register_method


class HotRefreshLoss(CompatibilityLoss):
    """InfoNCE pulling f̂_n,i onto f̂_o,i against new-to-old and new-to-new negatives of other classes.

    Row i of the logits is [⟨f̂_n,i, f̂_o,i⟩, ⟨f̂_n,i, f̂_o,j⟩_j, ⟨f̂_n,i, f̂_n,j⟩_j] / τ with j over
    the GLOBAL batch (gathered over ranks); pairs with y_j = y_i (including j = i) are masked to −∞;
    with ``topk_neg`` = k > 0 only the k largest negatives of each kind are kept (the release: 10, so
    21 logits a row). The loss is the CE toward the positive, averaged over the LOCAL rows.

    Gradient: the query f̂_n,i always carries it. The new-to-new keys f̂_n,j carry it too unless
    ``detach_keys`` (the release gathers its keys without gradient, on one GPU as on several). Under
    DDP the gather's backward sums the gradients all ranks computed for a shard, so in both modes the
    update after DDP's gradient averaging equals that of the single-process loss on the global batch.
    """

    def __init__(self, num_old_classes: int, temperature: float = 0.01, topk_neg: int = 0,
                 detach_keys: bool = False, weight: float = 1.0):
        super().__init__(num_old_classes, weight)
        self.temperature = float(temperature)
        self.topk_neg = int(topk_neg)
        self.detach_keys = bool(detach_keys)

    def compute(self, feat_new, feat_old, labels, *, new_classifier_weight, progress, epoch):
        fn = F.normalize(feat_new, dim=1)
        fo = F.normalize(feat_old, dim=1)
        fn_all = all_gather_with_grad(fn.detach() if self.detach_keys else fn)
        fo_all = all_gather_with_grad(fo)
        y_all = all_gather_with_grad(labels)
        same = labels[:, None] == y_all[None, :]  # (B, B_global): positives and same-class pairs
        pos = (fn * fo).sum(1, keepdim=True)
        n2o = (fn @ fo_all.t()).masked_fill(same, float("-inf"))
        n2n = (fn @ fn_all.t()).masked_fill(same, float("-inf"))
        if self.topk_neg > 0:
            k = min(self.topk_neg, n2o.shape[1])
            n2o = n2o.topk(k, dim=1).values
            n2n = n2n.topk(k, dim=1).values
        logits = torch.cat([pos, n2o, n2n], dim=1) / self.temperature
        target = torch.zeros_like(labels)
        term = F.cross_entropy(logits, target)
        return term, {"hot_refresh": term}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, temperature={self.temperature}, topk_neg={self.topk_neg}, "
                f"detach_keys={self.detach_keys}")


register_method(
    "hot_refresh", HotRefreshLoss, label="HotRefresh", plot_label="Hot-refresh",
    options=[
        Option("TEMPERATURE", 0.01, "hot_refresh: InfoNCE temperature", valid=lambda t: t > 0, expect="> 0"),
        Option("TOPK_NEG", 0, "hot_refresh: keep the k hardest negatives of each kind; 0 = all (the release: 10)",
               valid=lambda k: k >= 0, expect="0 (all negatives) or a positive count"),
        Option("DETACH_KEYS", False, "hot_refresh: no gradient through the gathered new-to-new keys (the release "
               "gathers them without gradient); false = gradient through every key"),
    ],
    build=lambda opts, ctx: HotRefreshLoss(ctx.num_old_classes, temperature=opts.TEMPERATURE,
                                           topk_neg=opts.TOPK_NEG, detach_keys=opts.DETACH_KEYS, weight=opts.WEIGHT),
)
