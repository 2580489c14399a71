"""BT² (Zhou et al., ICCV 2023, arXiv 2211.03989; code github.com/YifeiZhou02/BT-2): backward-compatible training
with a basis transformation, whose new embedding has dimensions the old one lacks.

The new model's head is BT²'s (advbct/models/basis_transform.py): e = [b, extra] with b = e[:D_o] compared with
old embeddings, and f, the new branch its classifier reads. The release's transfer trainer
(trainers/transfer_trainer.py, train_feature_transfer.py) adds to the classification loss on f, per batch of B:

    λ2 · 1/B Σ_i CE(b̂_i Pᵀ, y_i)        P: per-class mean of the old model's normalised embeddings over the new
                                        training set, every class (the "pseudo classifier": BCT's influence loss
                                        with the old classifier synthesised from class means)
  + λ3 · (1 − 1/B Σ_i ⟨ô_i, b̂_i⟩)       o_i: the old model's embedding of the image
  + λ1 · (1 − 1/B Σ_i ⟨t̂_i, f̂_i⟩)       t_i: the embedding of an independently trained new model φ'_new (φ*)

(^ = L2-normalised), with the release's λ1 = 1, λ2 = 10, λ3 = 5 (configs/cifar100_transfer.yaml and
imagenet_transfer.yaml). P is the class meta's centers over DATA.TRAIN_LIST (``meta_classes="train"``:
scripts/extract_meta.sh embeds the new training list when COMP_LOSS.TYPE is bt2), which is what the release
computes before training. Differences from the release are in docs/DEVIATIONS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advbct.losses.base import CompatibilityLoss
from advbct.losses.registry import Option, register_method
from advbct.meta import ClassMeta


class BT2Loss(CompatibilityLoss):
    """The three BT² terms above, weighted; ``feat_new`` is the head's e, ``aux["branch"]`` its f and
    ``aux["teacher"]`` φ'_new's embedding of the batch. Diagnostics: each unweighted term."""

    needs_meta = True
    aux_inputs = ("branch", "teacher")

    def __init__(self, meta: ClassMeta, num_old_classes: int, match_new: float = 1.0, influence: float = 10.0,
                 match_old: float = 5.0, weight: float = 1.0):
        super().__init__(num_old_classes, weight)
        self.match_new, self.influence, self.match_old = float(match_new), float(influence), float(match_old)
        # frozen, moved with the module, not saved in checkpoints (it lives in the meta file)
        self.register_buffer("pseudo_classifier", meta.centers.detach().float().clone(), persistent=False)

    def compute(self, feat_new, feat_old, labels, *, new_classifier_weight, progress, epoch, aux):
        old_dim = self.pseudo_classifier.shape[1]
        b = F.normalize(feat_new[:, :old_dim], dim=1)
        influence = F.cross_entropy(b @ self.pseudo_classifier.t(), labels)
        match_old = 1.0 - (F.normalize(feat_old, dim=1) * b).sum(1).mean()
        match_new = 1.0 - (F.normalize(aux["teacher"], dim=1) * F.normalize(aux["branch"], dim=1)).sum(1).mean()
        term = self.influence * influence + self.match_old * match_old + self.match_new * match_new
        return term, {"bt2": term, "bt2_influence": influence, "bt2_match_old": match_old,
                      "bt2_match_new": match_new}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, match_new={self.match_new}, influence={self.influence}, "
                f"match_old={self.match_old}, classes={self.pseudo_classifier.shape[0]}")


def _non_negative(x):
    return x >= 0


register_method(
    "bt2", BT2Loss, label="BT2", paper_row=False,  # published after AdvBCT: not a row of its table
    meta_classes="train",  # the pseudo classifier covers every class the new model trains on
    teacher_key="BT2_TEACHER",
    new_head=lambda opts: {"kind": "basis_transform", "extra_dim": opts.BT2_EXTRA_DIM, "scale": opts.BT2_SCALE},
    options=[
        Option("BT2_EXTRA_DIM", 32, "bt2: dimensions added to the new embedding (the release: 32, with 128-d ones)",
               valid=lambda k: k > 0, expect="a positive number of dimensions"),
        Option("BT2_SCALE", 2.0, "bt2: C, the new branch's weight against the projected dims in the basis "
               "transformation (the release: 2)", valid=lambda c: c > 0, expect="a positive number"),
        Option("BT2_TEACHER", "", "bt2: checkpoint of the independently trained new model phi* (MODEL.ARCH) "
               "whose embeddings the new branch is matched to"),
        Option("BT2_MATCH_NEW", 1.0, "bt2: lambda_1, weight of 1 - cos(new branch, phi* embedding)",
               valid=_non_negative, expect="a weight >= 0"),
        Option("BT2_INFLUENCE", 10.0, "bt2: lambda_2, weight of the CE of the old-size dims through the old "
               "model's class means", valid=_non_negative, expect="a weight >= 0"),
        Option("BT2_MATCH_OLD", 5.0, "bt2: lambda_3, weight of 1 - cos(old-size dims, old embedding)",
               valid=_non_negative, expect="a weight >= 0"),
    ],
    build=lambda opts, ctx: BT2Loss(ctx.meta, ctx.num_old_classes, match_new=opts.BT2_MATCH_NEW,
                                    influence=opts.BT2_INFLUENCE, match_old=opts.BT2_MATCH_OLD, weight=opts.WEIGHT),
)
