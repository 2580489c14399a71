"""BCT influence loss (Shen et al., CVPR 2020; PAPER.md "Baselines")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advbct.losses.base import CompatibilityLoss, masked_mean, old_class_index, old_rows
from advbct.losses.registry import register_method


class BCTLoss(CompatibilityLoss):
    """Softmax CE of the new embeddings of old-class samples through the frozen old classifier.

    Like the original, the old classifier is a bias-free linear softmax head applied to the
    un-normalised embedding; new-class samples are ignored and the mean is over old-class samples.
    """

    needs_old_classifier = True
    needs_old_features = False

    def __init__(self, old_classifier_weight: torch.Tensor, num_old_classes: int, weight: float = 1.0):
        super().__init__(num_old_classes, weight)
        # frozen, moved with the module, not saved in checkpoints (it lives in the old checkpoint)
        self.register_buffer("old_weight", old_classifier_weight.detach().float().clone(), persistent=False)

    compact_rows: bool | None = None  # None: compact on CPU, mask on GPU (see base.old_rows)

    def compute(self, feat_new, feat_old, labels, *, new_classifier_weight, progress, epoch):
        is_old, idx = old_class_index(labels, self.num_old_classes)
        rows = old_rows(is_old, self.compact_rows)
        if rows is None:
            term = masked_mean(F.cross_entropy(feat_new @ self.old_weight.t(), idx, reduction="none"), is_old)
        else:
            ce = F.cross_entropy(feat_new[rows] @ self.old_weight.t(), labels[rows], reduction="sum")
            term = ce / max(rows.numel(), 1)
        return term, {"bct": term, "old_fraction": is_old.float().mean()}


register_method(
    "bct", BCTLoss, label="BCT",  # needs the old classifier: BCTLoss.needs_old_classifier
    build=lambda opts, ctx: BCTLoss(ctx.old_classifier_weight, ctx.num_old_classes, weight=opts.WEIGHT),
)
