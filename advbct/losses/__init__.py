"""Compatibility losses: the one registry mapping COMP_LOSS.TYPE to a loss class, and its builder."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from advbct.errors import UserError
from advbct.losses.advbct import AdvBCTLoss
from advbct.losses.base import CompatibilityLoss, check_meta
from advbct.losses.bct import BCTLoss
from advbct.losses.hot_refresh import HotRefreshLoss
from advbct.losses.l2 import L2Loss
from advbct.losses.lce import LCELoss
from advbct.losses.unibct import UniBCTLoss
from advbct.meta import ClassMeta

LOSSES = {
    "bct": BCTLoss,
    "lce": LCELoss,
    "unibct": UniBCTLoss,
    "hot_refresh": HotRefreshLoss,
    "advbct": AdvBCTLoss,
    "l2": L2Loss,
}

# COMP_LOSS keys read here and their defaults (the config layer owns the authoritative table)
DEFAULTS = {
    "TYPE": "", "WEIGHT": 1.0, "META_PATH": "", "ELASTIC": True, "FIXED_RADIUS": "min", "BOUNDARY": True,
    "ADVERSARIAL": True, "THRESHOLD": 1.0, "ADV_SCHEDULE": "decay", "DISC_HIDDEN": 100, "GRL_GAMMA": 10.0,
    "LCE_VARIANT": "benchmark", "LCE_ALIGN_WEIGHT": 1.0, "ARC_SCALE": 30.0, "ARC_MARGIN": 0.3,
    "TEMPERATURE": 0.01, "TOPK_NEG": 0, "DETACH_KEYS": False,
}

__all__ = ["LOSSES", "CompatibilityLoss", "build_compat_loss", "needs_meta", "needs_old_classifier"]


def _get(cfg: Mapping, key: str):
    return cfg.get(key, DEFAULTS[key])


def needs_meta(comp_cfg: Mapping) -> bool:
    """Whether the configured method reads the old-class meta (COMP_LOSS.META_PATH)."""
    kind = _get(comp_cfg, "TYPE")
    if kind == "advbct":
        return bool(_get(comp_cfg, "BOUNDARY"))
    return kind in LOSSES and LOSSES[kind].needs_meta


def needs_old_classifier(comp_cfg: Mapping) -> bool:
    """Whether the configured method needs the old model's classifier weight (OLD_MODEL.WEIGHTS)."""
    kind = _get(comp_cfg, "TYPE")
    return kind in LOSSES and LOSSES[kind].needs_old_classifier


def build_compat_loss(comp_cfg: Mapping, *, embed_dim: int, num_old_classes: int, total_epochs: int,
                      meta: ClassMeta | None = None,
                      old_classifier_weight: torch.Tensor | None = None) -> CompatibilityLoss | None:
    """Build the COMP_LOSS section's method; ``None`` when TYPE is '' (independent training φ*).

    Missing meta / old classifier for a method that needs them, an unknown TYPE or a bad option
    value raise a UserError naming the config key, here, before the first training step.
    """
    kind = _get(comp_cfg, "TYPE")
    if kind in ("", None):
        return None
    if kind not in LOSSES:
        raise UserError(f"COMP_LOSS.TYPE '{kind}': expected '' (none) or one of {', '.join(LOSSES)}")
    weight = float(_get(comp_cfg, "WEIGHT"))
    if needs_meta(comp_cfg):
        meta = check_meta(meta, method=kind, embed_dim=embed_dim, num_old_classes=num_old_classes)
    if kind == "bct":
        if old_classifier_weight is None:
            raise UserError("COMP_LOSS.TYPE 'bct' needs the old model's classifier: set OLD_MODEL.WEIGHTS to a "
                            "checkpoint with a classifier")
        if tuple(old_classifier_weight.shape) != (num_old_classes, embed_dim):
            raise UserError(f"OLD_MODEL.WEIGHTS: old classifier weight is {tuple(old_classifier_weight.shape)}, "
                            f"expected ({num_old_classes}, {embed_dim})")
        return BCTLoss(old_classifier_weight, num_old_classes, weight=weight)
    if kind == "lce":
        return LCELoss(meta, num_old_classes, variant=_get(comp_cfg, "LCE_VARIANT"),
                       align_weight=float(_get(comp_cfg, "LCE_ALIGN_WEIGHT")), weight=weight)
    if kind == "unibct":
        return UniBCTLoss(meta, num_old_classes, scale=float(_get(comp_cfg, "ARC_SCALE")),
                          margin=float(_get(comp_cfg, "ARC_MARGIN")), weight=weight)
    if kind == "hot_refresh":
        temperature, topk = float(_get(comp_cfg, "TEMPERATURE")), int(_get(comp_cfg, "TOPK_NEG"))
        if temperature <= 0:
            raise UserError(f"COMP_LOSS.TEMPERATURE {temperature}: expected > 0")
        if topk < 0:
            raise UserError(f"COMP_LOSS.TOPK_NEG {topk}: expected 0 (all negatives) or a positive count")
        return HotRefreshLoss(num_old_classes, temperature=temperature, topk_neg=topk,
                              detach_keys=bool(_get(comp_cfg, "DETACH_KEYS")), weight=weight)
    if kind == "advbct":
        return AdvBCTLoss(embed_dim=embed_dim, num_old_classes=num_old_classes, total_epochs=total_epochs,
                          meta=meta, boundary=bool(_get(comp_cfg, "BOUNDARY")),
                          adversarial=bool(_get(comp_cfg, "ADVERSARIAL")), elastic=bool(_get(comp_cfg, "ELASTIC")),
                          fixed_radius=_get(comp_cfg, "FIXED_RADIUS"), threshold=float(_get(comp_cfg, "THRESHOLD")),
                          schedule=_get(comp_cfg, "ADV_SCHEDULE"), disc_hidden=int(_get(comp_cfg, "DISC_HIDDEN")),
                          gamma=float(_get(comp_cfg, "GRL_GAMMA")), weight=weight)
    return L2Loss(num_old_classes, weight=weight)
