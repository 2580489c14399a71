"""Build the COMP_LOSS section's method from the registry: one generic path for every method."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from advbct.errors import UserError
from advbct.losses.base import CompatibilityLoss, check_meta
from advbct.losses.registry import BuildContext, get_method, is_registered
from advbct.meta import ClassMeta


def _configured(comp_cfg: Mapping):
    """(method declaration, its resolved options) of COMP_LOSS.TYPE, or None for '' or an unknown TYPE."""
    kind = comp_cfg.get("TYPE", "")
    if not is_registered(kind):
        return None
    method = get_method(kind)
    return method, method.resolve(comp_cfg)


def needs_meta(comp_cfg: Mapping) -> bool:
    """Whether the configured method reads the old-class meta (COMP_LOSS.META_PATH)."""
    found = _configured(comp_cfg)
    return found is not None and found[0].requires_meta(found[1])


def needs_old_classifier(comp_cfg: Mapping) -> bool:
    """Whether the configured method needs the old model's classifier weight (OLD_MODEL.WEIGHTS)."""
    found = _configured(comp_cfg)
    return found is not None and found[0].requires_old_classifier(found[1])


def needs_transformation(comp_cfg: Mapping) -> bool:
    """Whether the configured method trains its new model alone and maps old embeddings afterwards (FCT): no
    old model in training, EVAL.OLD_TRANSFORM in the cross test. A TYPE this registry does not know: False."""
    found = _configured(comp_cfg)
    return found is not None and found[0].requires_transformation(found[1])


def new_model_head(comp_cfg: Mapping, old_dim: int) -> dict | None:
    """The embedding head the configured method gives the new model (BT²'s), with the old embedding size
    ``old_dim``; None for the plain head."""
    found = _configured(comp_cfg)
    if found is None or found[0].new_head is None:
        return None
    method, opts = found
    method.checked(comp_cfg)  # a bad option fails here, before the model is built
    return {**method.new_head(opts), "old_dim": int(old_dim)}


def teacher_checkpoint(comp_cfg: Mapping) -> tuple[str, str] | None:
    """``(config key, checkpoint path)`` of the frozen model whose batch embeddings the configured method reads
    (BT²'s independently trained new model); None when it reads none."""
    found = _configured(comp_cfg)
    if found is None or found[0].teacher_key is None:
        return None
    found[0].checked(comp_cfg)  # the first builder the trainer calls: a bad option fails here
    key = found[0].teacher_key
    return f"COMP_LOSS.{key}", str(found[1][key])


def meta_classes(comp_cfg: Mapping) -> str:
    """Which classes the configured method's COMP_LOSS.META_PATH covers: "old" (META.TRAIN_LIST, the old model's
    training list) or "train" (DATA.TRAIN_LIST, every class the new model trains on)."""
    found = _configured(comp_cfg)
    return "old" if found is None else found[0].meta_classes


def build_compat_loss(comp_cfg: Mapping, *, embed_dim: int, num_old_classes: int, total_epochs: int,
                      meta: ClassMeta | None = None,
                      old_classifier_weight: torch.Tensor | None = None, classifier: str = "softmax",
                      scale: float = 30.0, margin: float = 0.3) -> CompatibilityLoss | None:
    """Build the COMP_LOSS section's method; ``None`` when TYPE is '' (independent training φ*) or names a
    method that needs a transformation (its new model trains as φ* does).

    ``classifier`` / ``scale`` / ``margin``: the new model's classification head, the config's LOSS.TYPE /
    LOSS.SCALE / LOSS.MARGIN (the defaults are theirs), for the methods that go through it (mixbct).

    An unknown TYPE, a bad option value, or missing meta / old classifier for a method that needs them
    raise a UserError naming the config key, here, before the first training step.
    """
    kind = comp_cfg.get("TYPE", "")
    if kind in ("", None):
        return None
    method = get_method(kind)
    opts = method.checked(comp_cfg)
    if method.requires_transformation(opts):
        return None
    if method.requires_meta(opts):
        meta = check_meta(meta, method=kind, embed_dim=embed_dim, num_old_classes=num_old_classes)
    if method.requires_old_classifier(opts):
        if old_classifier_weight is None:
            raise UserError(f"COMP_LOSS.TYPE '{kind}' needs the old model's classifier: set OLD_MODEL.WEIGHTS to a "
                            "checkpoint with a classifier")
        if tuple(old_classifier_weight.shape) != (num_old_classes, embed_dim):
            raise UserError(f"OLD_MODEL.WEIGHTS: old classifier weight is {tuple(old_classifier_weight.shape)}, "
                            f"expected ({num_old_classes}, {embed_dim})")
    ctx = BuildContext(embed_dim=embed_dim, num_old_classes=num_old_classes, total_epochs=total_epochs, meta=meta,
                       old_classifier_weight=old_classifier_weight, classifier=classifier, scale=float(scale),
                       margin=float(margin))
    return method.build(opts, ctx)
