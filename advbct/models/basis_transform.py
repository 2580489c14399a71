"""BT²'s embedding head (Zhou et al., ICCV 2023): a new embedding with extra dimensions whose leading ones are
compatible with the old model, built from two learnable orthonormal basis transformations.

With x the backbone feature, D the new embedding size (MODEL.EMB_DIM), D_o the old one and K the added
dimensions (COMP_LOSS.BT2_EXTRA_DIM), the release's ResNet_ortho (models/resnet.py) computes

    z = BN(W x)                       (D + D_o dims: the release's backbone embedding layer)
    f = z[:D]                         the new branch: classified, and matched to an independently trained new model
    p = P relu(z) + b                 (K dims; the release projects to D_o and keeps the first K: the same function)
    u = [p̂, B_n(C·f̂)]                 (K + D dims; ^ = L2-normalised, B_n orthonormal D x D, C = BT2_SCALE)
    e = [B_o(u[:D_o]), u[D_o:]]        (D + K dims; B_o orthonormal D_o x D_o)

e[:D_o] is trained to match the old embedding and is what the cross test compares with the old gallery; the
other D + K − D_o dimensions carry what the new model knows beyond it. Every e has norm √(1 + C²): B_n and B_o
keep norms, so ranking by e·e' is ranking by cosine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advbct.errors import UserError

__all__ = ["BasisTransformHead", "Orthogonal", "head_from_state", "to_new_space"]


class Orthogonal(nn.Module):
    """A learnable orthonormal ``dim x dim`` matrix: ``base @ exp(S − Sᵀ)`` (the exponential of a skew-symmetric
    matrix is orthonormal; ``base`` is a fixed random orthonormal start, S starts at 0). ``forward(x)`` is
    ``x Wᵀ``, like a bias-free Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.skew = nn.Parameter(torch.zeros(dim, dim))
        q, r = torch.linalg.qr(torch.randn(dim, dim))
        self.register_buffer("base", q * torch.sign(torch.diagonal(r)))  # Haar-distributed start

    @property
    def weight(self) -> torch.Tensor:
        with torch.autocast(self.skew.device.type, enabled=False):  # orthonormal to float32 precision under AMP
            s = self.skew.float()
            return self.base.float() @ torch.linalg.matrix_exp(s - s.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.skew.shape[0]}"


class BasisTransformHead(nn.Module):
    """The BT² embedding (module docstring): ``forward`` gives e (D + K dims), ``branches`` gives (e, f)."""

    def __init__(self, in_dim: int, embed_dim: int, old_dim: int, extra_dim: int, scale: float):
        super().__init__()
        if min(in_dim, embed_dim, old_dim, extra_dim) <= 0:
            raise UserError(f"BT² head: dimensions must be positive, got backbone {in_dim}, MODEL.EMB_DIM "
                            f"{embed_dim}, old {old_dim}, COMP_LOSS.BT2_EXTRA_DIM {extra_dim}")
        if not extra_dim <= old_dim <= embed_dim + extra_dim:
            raise UserError(f"COMP_LOSS.BT2_EXTRA_DIM {extra_dim}: expected at most the old embedding size "
                            f"{old_dim}, which must not exceed MODEL.EMB_DIM {embed_dim} + BT2_EXTRA_DIM")
        self.embed_dim, self.old_dim, self.extra_dim = int(embed_dim), int(old_dim), int(extra_dim)
        self.fc = nn.Linear(in_dim, embed_dim + old_dim, bias=False)
        self.bn = nn.BatchNorm1d(embed_dim + old_dim)
        self.proj = nn.Linear(embed_dim + old_dim, extra_dim)
        self.basis_new = Orthogonal(embed_dim)
        self.basis_old = Orthogonal(old_dim)
        self.register_buffer("scale", torch.tensor(float(scale)))  # C, saved so a checkpoint rebuilds its head

    @property
    def out_dim(self) -> int:
        return self.embed_dim + self.extra_dim

    @property
    def branch_dim(self) -> int:
        return self.embed_dim

    @property
    def compatible_dim(self) -> int:
        return self.old_dim

    def branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.bn(self.fc(x))
        f = z[:, : self.embed_dim]
        p = self.proj(F.relu(z))
        u = torch.cat([F.normalize(p, dim=1), self.basis_new(self.scale.to(f.dtype) * F.normalize(f, dim=1))], dim=1)
        e = torch.cat([self.basis_old(u[:, : self.old_dim]), u[:, self.old_dim:]], dim=1)
        return e, f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branches(x)[0]

    def spec(self) -> dict:
        return {"kind": "basis_transform", "old_dim": self.old_dim, "extra_dim": self.extra_dim,
                "scale": float(self.scale)}

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, old_dim={self.old_dim}, extra_dim={self.extra_dim}"


def head_from_state(state: dict) -> dict | None:
    """``{"embed_dim", "old_dim", "extra_dim", "scale"}`` of a BT² head stored in a model state dict (keys
    without a DDP prefix), or None when the state holds the plain embedding head."""
    if "embedding.basis_old.skew" not in state:
        return None
    return {"embed_dim": int(state["embedding.basis_new.skew"].shape[0]),
            "old_dim": int(state["embedding.basis_old.skew"].shape[0]),
            "extra_dim": int(state["embedding.proj.weight"].shape[0]),
            "scale": float(state["embedding.scale"])}


def to_new_space(old_features, new_dim: int):
    """Old embeddings (N, D_o) as vectors of the new space (N, new_dim): zeros in the added dimensions.

    A new query q then scores an old gallery item g as q[:D_o]·g, the release's cross test (it cuts both sides
    to the smaller size, utils/eval_utils.py cosine_distance_matrix), and one index can hold old and
    re-embedded items side by side (backfilling). Works on numpy arrays and tensors; a no-op at equal sizes."""
    n, dim = old_features.shape
    if dim == new_dim:
        return old_features
    if dim > new_dim:
        raise ValueError(f"old embeddings of {dim} dims do not fit a {new_dim}-d space")
    if isinstance(old_features, torch.Tensor):
        return torch.cat([old_features, old_features.new_zeros(n, new_dim - dim)], dim=1)
    import numpy as np

    return np.concatenate([old_features, np.zeros((n, new_dim - dim), dtype=old_features.dtype)], axis=1)
