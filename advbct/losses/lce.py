"""LCE baseline (Meng et al., ICCV 2021) as benchmarked with AdvBCT (PAPER.md "Baselines")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advbct.errors import UserError
from advbct.losses.base import CompatibilityLoss, masked_mean, old_class_index
from advbct.losses.registry import Option, register_method
from advbct.meta import ClassMeta

VARIANTS = ("benchmark", "official")
_COS_EPS = 1e-7  # keeps arccos' derivative finite at cos = ±1


class LCELoss(CompatibilityLoss):
    """Boundary + alignment against the old class centers, over old-class samples.

    ``benchmark`` (the re-implementation the paper compares with, PAPER.md):
        boundary  = mean_i max(0, arccos⟨ĉ_y, f̂_n,i⟩ − θ_max,y)
        alignment = mean_i (1 − ⟨ĉ_y, Ŵ_n,y⟩)
    ``official`` (the LCE paper's cosine form of the same constraint):
        boundary  = mean_i max(0, cos θ_max,y − ⟨ĉ_y, f̂_n,i⟩)
        alignment as above.
    term = boundary + ``align_weight``·alignment (official LCE: λ_a = 100; benchmark: 1).
    ĉ = normalised old center, θ_max the largest kept angle (meta), Ŵ_n the new classifier's
    normalised rows (passed as ``new_classifier_weight``; the alignment trains them). Means are over
    old-class samples whose class keeps > 1 angle and θ_max > 0 (the original skips the rest); the
    official variant's ArcFace classification head belongs to the trainer, not to this term.
    """

    needs_meta = True
    needs_old_features = False
    needs_new_classifier = True

    def __init__(self, meta: ClassMeta, num_old_classes: int, variant: str = "benchmark",
                 align_weight: float = 1.0, weight: float = 1.0):
        super().__init__(num_old_classes, weight)
        if variant not in VARIANTS:
            raise UserError(f"COMP_LOSS.LCE_VARIANT '{variant}': expected one of {', '.join(VARIANTS)}")
        n = self.num_old_classes
        theta = meta.theta_max[:n].float()
        if not bool(torch.isfinite(theta).all()):
            raise UserError("COMP_LOSS.META_PATH: the meta has no angular radii (theta_max); regenerate it with "
                            "scripts/extract_meta.sh or import the original theta JSON as well")
        self.variant = variant
        self.align_weight = float(align_weight)
        self.register_buffer("unit_centers", F.normalize(meta.centers[:n].float(), dim=1), persistent=False)
        self.register_buffer("theta_max", theta.clone(), persistent=False)
        self.register_buffer("valid_class", (meta.n_kept[:n] > 1) & (theta > 0), persistent=False)

    def compute(self, feat_new, feat_old, labels, *, new_classifier_weight, progress, epoch):
        if new_classifier_weight is None:
            raise ValueError("LCELoss needs new_classifier_weight (the new model's classifier weight)")
        is_old, idx = old_class_index(labels, self.num_old_classes)
        valid = is_old & self.valid_class[idx]
        centers = self.unit_centers[idx]
        cos = (centers * F.normalize(feat_new, dim=1)).sum(1)
        if self.variant == "benchmark":
            gap = torch.arccos(cos.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS)) - self.theta_max[idx]
        else:
            gap = torch.cos(self.theta_max[idx]) - cos
        boundary = masked_mean(F.relu(gap), valid)
        w_new = F.normalize(new_classifier_weight[labels], dim=1)
        alignment = masked_mean(1.0 - (centers * w_new).sum(1), valid)
        term = boundary + self.align_weight * alignment
        return term, {"boundary": boundary, "alignment": alignment,
                      "violation_rate": masked_mean((gap > 0).float(), valid)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.variant}, align_weight={self.align_weight}"


register_method(
    "lce", LCELoss, label="LCE",  # needs the meta: LCELoss.needs_meta
    options=[
        Option("LCE_VARIANT", "benchmark", "lce: benchmark (angular boundary + alignment) | official",
               choices=VARIANTS),
        Option("LCE_ALIGN_WEIGHT", 1.0, "lce: weight of the alignment term (official LCE: 100)"),
    ],
    build=lambda opts, ctx: LCELoss(ctx.meta, ctx.num_old_classes, variant=opts.LCE_VARIANT,
                                    align_weight=opts.LCE_ALIGN_WEIGHT, weight=opts.WEIGHT),
)
