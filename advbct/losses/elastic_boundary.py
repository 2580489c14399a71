"""AdvBCT's elastic boundary term L_EB (PAPER.md "AdvBCT loss", "Elastic boundary")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advbct.errors import UserError
from advbct.losses.base import old_class_index, old_rows
from advbct.meta import ClassMeta

FIXED_RADII = ("min", "max")


class ElasticBoundaryLoss(nn.Module):
    """Penalise new embeddings of old-class samples that leave their class's (elastic) old boundary.

    Elastic: r̃_k = r_max,k + σ(w_k)·(T − r_max,k) with one learnable w_k ~ U(−1, 1) per old class,
    i.e. r_max + |r_max − T|σ(w) below T and r_max − |r_max − T|σ(w) above it. Fixed ablation:
    r̃_k = r_min,k (original code) or r_max,k. With d_i = ‖f̂_n,i − c_{y_i}‖ (c not re-normalised),
    violators are old-class samples with d_i > r̃_{y_i} whose class keeps > 1 radius, and
    L_EB = Σ_violators (d_i − r̃_{y_i}) / #violators (0 when there is none), as the original code.
    """

    def __init__(self, meta: ClassMeta, num_old_classes: int, threshold: float = 1.0, elastic: bool = True,
                 fixed_radius: str = "min"):
        super().__init__()
        if fixed_radius not in FIXED_RADII:
            raise UserError(f"COMP_LOSS.FIXED_RADIUS '{fixed_radius}': expected one of {', '.join(FIXED_RADII)}")
        n = int(num_old_classes)
        self.num_old_classes = n
        self.threshold = float(threshold)
        self.elastic = bool(elastic)
        self.fixed_radius = fixed_radius
        self.compact_rows = None  # None: compact the rows on CPU, mask on GPU (see old_rows); True/False force it
        self.register_buffer("centers", meta.centers[:n].float().clone(), persistent=False)
        base = meta.r_max if (elastic or fixed_radius == "max") else meta.r_min
        # per class (base radius, T − base radius): one gather per batch gives both
        base = base[:n].float()
        self.register_buffer("radius_table", torch.stack([base, self.threshold - base], 1), persistent=False)
        self.register_buffer("valid_class", meta.n_kept[:n] > 1, persistent=False)
        # w_k ~ U(-1, 1) from the global torch RNG (the original's ElasticBoundary init)
        self.elastic_weight = nn.Parameter(torch.empty(n).uniform_(-1.0, 1.0)) if elastic else None

    def radius(self, idx: torch.Tensor) -> torch.Tensor:
        """Boundary radius r̃ of classes ``idx`` (differentiable in w when elastic)."""
        base, to_threshold = self.radius_table[idx].unbind(1)
        if not self.elastic:
            return base
        return base + torch.sigmoid(self.elastic_weight[idx]) * to_threshold

    def forward(self, feat_new: torch.Tensor, labels: torch.Tensor):
        """Return (L_EB, diagnostics {violation_rate, violators}) for a batch."""
        is_old, idx = old_class_index(labels, self.num_old_classes)
        valid = is_old & self.valid_class[idx]
        # CPU: keep only the valid rows (~30 % of a class-split batch); GPU: mask (no host sync)
        rows = old_rows(valid, self.compact_rows)
        if rows is not None:
            feat_new, idx = feat_new[rows], idx[rows]
        dist = torch.linalg.vector_norm(F.normalize(feat_new, dim=1) - self.centers[idx], dim=1)
        excess = dist - self.radius(idx)
        violator = excess > 0 if rows is not None else valid & (excess > 0)
        n_viol = violator.sum()
        loss = (excess * violator).sum() / n_viol.clamp(min=1)
        return loss, {"violation_rate": n_viol / valid.sum().clamp(min=1), "violators": n_viol}

    def extra_repr(self) -> str:
        mode = f"elastic, T={self.threshold}" if self.elastic else f"fixed r_{self.fixed_radius}"
        return f"num_old_classes={self.num_old_classes}, {mode}"
