"""The AdvBCT compatibility term: elastic boundary + weighted adversarial loss (PAPER.md "AdvBCT loss")."""

from __future__ import annotations

from advbct.errors import UserError
from advbct.losses.adversarial import SCHEDULES, AdversarialLoss, adversarial_weight, check_schedule
from advbct.losses.base import CompatibilityLoss
from advbct.losses.elastic_boundary import FIXED_RADII, ElasticBoundaryLoss
from advbct.losses.registry import Option, register_method
from advbct.meta import ClassMeta


class AdvBCTLoss(CompatibilityLoss):
    """L_EB + w(e)·L_adv (the trainer adds L_cls); either part can be switched off for ablations.

    Owns learnable parameters (the elastic w_k and the discriminator): the trainer must optimise
    them together with the new model. Diagnostics: boundary, adversarial, violation_rate, disc_acc,
    alpha and adv_weight, every one a scalar on the features' device (the trainer reduces them over ranks
    with NCCL, which refuses CPU tensors).
    """

    def __init__(self, *, embed_dim: int, num_old_classes: int, total_epochs: int, meta: ClassMeta | None = None,
                 boundary: bool = True, adversarial: bool = True, elastic: bool = True, fixed_radius: str = "min",
                 threshold: float = 1.0, schedule: str = "decay", disc_hidden: int = 100, gamma: float = 10.0,
                 weight: float = 1.0):
        super().__init__(num_old_classes, weight)
        if not (boundary or adversarial):
            raise UserError("COMP_LOSS.BOUNDARY and COMP_LOSS.ADVERSARIAL are both False: advbct would add nothing")
        if total_epochs < 1:
            raise UserError(f"TRAIN.EPOCHS {total_epochs}: expected ≥ 1")
        self.total_epochs = int(total_epochs)
        self.schedule = check_schedule(schedule)
        self.needs_meta = bool(boundary)
        self.needs_old_features = bool(adversarial)  # only the discriminator sees old embeddings
        self.boundary = (ElasticBoundaryLoss(meta, num_old_classes, threshold=threshold, elastic=elastic,
                                             fixed_radius=fixed_radius) if boundary else None)
        self.adversarial = AdversarialLoss(embed_dim, disc_hidden, gamma) if adversarial else None

    def compute(self, feat_new, feat_old, labels, *, new_classifier_weight, progress, epoch):
        diagnostics = {}
        term = feat_new.new_zeros(())
        if self.boundary is not None:
            eb, diag = self.boundary(feat_new, labels)
            term = term + eb
            diagnostics.update(boundary=eb, **diag)
        if self.adversarial is not None:
            adv, diag, alpha = self.adversarial(feat_new, feat_old, progress)
            w = adversarial_weight(epoch, self.total_epochs, self.schedule)
            term = term + w * adv
            diagnostics.update(adversarial=adv, alpha=feat_new.new_tensor(alpha), adv_weight=feat_new.new_tensor(w), **diag)
        return term, diagnostics


def build_advbct(opts, ctx):
    return AdvBCTLoss(embed_dim=ctx.embed_dim, num_old_classes=ctx.num_old_classes, total_epochs=ctx.total_epochs,
                      meta=ctx.meta, boundary=opts.BOUNDARY, adversarial=opts.ADVERSARIAL, elastic=opts.ELASTIC,
                      fixed_radius=opts.FIXED_RADIUS, threshold=opts.THRESHOLD, schedule=opts.ADV_SCHEDULE,
                      disc_hidden=opts.DISC_HIDDEN, gamma=opts.GRL_GAMMA, weight=opts.WEIGHT)


register_method(
    "advbct", AdvBCTLoss, label="AdvBCT",
    needs_meta=lambda opts: opts.BOUNDARY,  # only the elastic boundary reads the old-class meta
    options=[
        Option("ELASTIC", True, "advbct: learnable elastic boundary (False: fixed boundary ablation)"),
        Option("FIXED_RADIUS", "min", "advbct fixed-boundary ablation radius: min (original code) | max",
               choices=FIXED_RADII),
        Option("BOUNDARY", True, "advbct: use the boundary term"),
        Option("ADVERSARIAL", True, "advbct: use the adversarial term"),
        Option("THRESHOLD", 1.0, "advbct: threshold T of the elastic radius"),
        Option("ADV_SCHEDULE", "decay", "advbct: adversarial weight (E-e+1)/E ('decay', code) or 1 ('constant')",
               choices=SCHEDULES),
        Option("DISC_HIDDEN", 100, "advbct: discriminator hidden units"),
        Option("GRL_GAMMA", 10.0, "advbct: gradient reversal alpha = 2/(1+exp(-gamma p)) - 1"),
    ],
    build=build_advbct,
)
