"""UniBCT baseline (Zhang et al., IJCAI 2022) as benchmarked with AdvBCT (PAPER.md "Baselines")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from advbct.losses.base import CompatibilityLoss, masked_mean, old_class_index, old_rows
from advbct.losses.registry import Option, register_method
from advbct.meta import ClassMeta


def arcface_logits(cos: torch.Tensor, target: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """s·cos with the target column replaced by s·cos(θ_y + m) (ArcFace, no easy-margin, as the original).

    cos(θ + m) = cos θ cos m − sin θ sin m with sin θ = √(1 − cos²θ) ≥ 0 for θ ∈ [0, π]; the tiny
    floor under the square root keeps its derivative finite at cos = ±1.
    """
    c = cos.gather(1, target[:, None]).clamp(-1.0, 1.0)
    sin = (1.0 - c * c).clamp(min=1e-12).sqrt()
    c_margin = c * math.cos(margin) - sin * math.sin(margin)
    return cos.scatter(1, target[:, None], c_margin) * scale


class UniBCTLoss(CompatibilityLoss):
    """ArcFace(s, m) CE of normalised new embeddings against the normalised old class centers.

    Only old-class samples count (mean over them); the classifier is the fixed matrix of all
    ``num_old_classes`` normalised centers from the meta (classes without samples have a zero row).
    """

    needs_meta = True
    needs_old_features = False

    def __init__(self, meta: ClassMeta, num_old_classes: int, scale: float = 30.0, margin: float = 0.3,
                 weight: float = 1.0):
        super().__init__(num_old_classes, weight)
        self.scale, self.margin = float(scale), float(margin)
        n = self.num_old_classes
        self.register_buffer("unit_centers", F.normalize(meta.centers[:n].float(), dim=1), persistent=False)

    compact_rows: bool | None = None  # None: compact on CPU, mask on GPU (see base.old_rows)

    def compute(self, feat_new, feat_old, labels, *, new_classifier_weight, progress, epoch):
        is_old, idx = old_class_index(labels, self.num_old_classes)
        rows = old_rows(is_old, self.compact_rows)
        if rows is not None:
            feat_new, idx = feat_new[rows], labels[rows]
        cos = F.normalize(feat_new, dim=1) @ self.unit_centers.t()
        ce = F.cross_entropy(arcface_logits(cos, idx, self.scale, self.margin), idx, reduction="none")
        term = masked_mean(ce, is_old) if rows is None else ce.sum() / max(rows.numel(), 1)
        return term, {"unibct": term, "old_fraction": is_old.float().mean()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, margin={self.margin}"


register_method(
    "unibct", UniBCTLoss, label="UniBCT",  # needs the meta: UniBCTLoss.needs_meta
    options=[
        Option("ARC_SCALE", 30.0, "unibct: ArcFace scale s"),
        Option("ARC_MARGIN", 0.3, "unibct: ArcFace margin m"),
    ],
    build=lambda opts, ctx: UniBCTLoss(ctx.meta, ctx.num_old_classes, scale=opts.ARC_SCALE,
                                       margin=opts.ARC_MARGIN, weight=opts.WEIGHT),
)
