"""FCT (Ramanujan et al., CVPR 2022): the new model trains with no compatibility term; compatibility comes
after training, from a transformation of the old embeddings into the new space (advbct/models/transformation.py,
fitted by scripts/train_transformation.sh, applied by EVAL.OLD_TRANSFORM)."""

from __future__ import annotations

from advbct.losses.base import CompatibilityLoss
from advbct.losses.registry import register_method


class FCTTraining(CompatibilityLoss):
    """Declares FCT's needs; never built: COMP_LOSS.TYPE fct trains the new model as phi* (no old model, no
    term), and its saved config (COMP_LOSS.TYPE fct) marks the checkpoint as needing a transformation."""

    needs_transformation = True
    needs_old_features = False

    def compute(self, feat_new, feat_old, labels, *, new_classifier_weight, progress, epoch):
        raise RuntimeError("FCT adds no term to the new model's training: build_compat_loss returns None for it")


register_method(
    "fct", FCTTraining, label="FCT", paper_row=False,  # not a row of the paper's table
    build=lambda opts, ctx: None,  # the trainer adds no term (advbct.losses.build.build_compat_loss)
)
