"""Feature-regression baseline: pull the new embedding onto the old one of the same image."""

from __future__ import annotations

import torch.nn.functional as F

from advbct.losses.base import CompatibilityLoss
from advbct.losses.registry import register_method


class L2Loss(CompatibilityLoss):
    """mean_i ‖f̂_n,i − f̂_o,i‖² over the batch (L2-normalised embeddings, every sample).

    A simple feature-regression baseline. The original's ``l2`` option used ``MSELoss``, i.e. the
    same quantity divided by the embedding dimension D.
    """

    def compute(self, feat_new, feat_old, labels, *, new_classifier_weight, progress, epoch):
        diff = F.normalize(feat_new, dim=1) - F.normalize(feat_old, dim=1)
        term = diff.pow(2).sum(1).mean()
        return term, {"l2": term}


register_method(
    "l2", L2Loss, label="L2", paper_row=False,  # not a row of the paper's table
    build=lambda opts, ctx: L2Loss(ctx.num_old_classes, weight=opts.WEIGHT),
)
