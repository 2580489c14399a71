"""Maps from the old embedding space into the new one (forward-compatible transformations): the FCT network
and the orthogonal Procrustes map, one checkpoint format for both.

FCT (Ramanujan et al., CVPR 2022, "Forward Compatible Training for Large-Scale Embedding Retrieval Systems")
trains the new model freely, then a small network h with h(phi_old(x)) ~ phi_new(x); the cross test searches
new queries against h(old gallery). The Procrustes map is the training-free variant: the orthogonal W that
minimises ||X_old W - X_new||_F.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from advbct.errors import UserError
from advbct.models.checkpoint import check_finite_weights, load_checkpoint, save_checkpoint

__all__ = ["FCTTransformation", "KINDS", "ProcrustesMap", "build_transformation", "load_transformation",
           "map_features", "orthogonal_procrustes", "save_transformation"]

FORMAT = "advbct-transformation"
VERSION = 1
KINDS = ("fct", "procrustes")


def _block(dim_in, dim_out):
    """Linear -> BatchNorm -> ReLU: the paper code's 1x1 ConvBlock on (N, C, 1, 1) features, written for
    (N, C) rows (a 1x1 convolution there is a linear map; its bias is dropped before the BatchNorm)."""
    return nn.Sequential(nn.Linear(dim_in, dim_out, bias=False), nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True))


class FCTTransformation(nn.Module):
    """FCT's transformation h without side-information (apple/ml-fct, MLP_BN_SIDE_PROJECTION).

    The paper's h has two input branches, old embedding and side-information, each projected by two blocks to
    2 x new_dim, concatenated (4 x new_dim) and mixed by ``depth`` blocks of ``width`` and a linear output
    layer. Here the side-information branch is dropped: the old-embedding branch alone (2 x new_dim) feeds
    the mixer. Defaults are the paper's (width 2048, two mixer blocks).
    """

    kind = "fct"

    def __init__(self, in_dim: int, out_dim: int, width: int = 2048, depth: int = 2):
        super().__init__()
        self.in_dim, self.out_dim, self.width, self.depth = int(in_dim), int(out_dim), int(width), int(depth)
        self.project = nn.Sequential(_block(in_dim, 2 * in_dim), _block(2 * in_dim, 2 * out_dim))
        mixer = [_block(2 * out_dim, width)] + [_block(width, width) for _ in range(depth - 1)]
        self.mixer = nn.Sequential(*mixer, nn.Linear(width, out_dim))  # last layer: no norm, no activation

    def forward(self, old_features: torch.Tensor) -> torch.Tensor:
        return self.mixer(self.project(old_features))

    def spec(self) -> dict:
        return {"width": self.width, "depth": self.depth}


class ProcrustesMap(nn.Module):
    """x -> x W with a fixed (semi-)orthogonal W of shape (in_dim, out_dim), fitted in closed form."""

    kind = "procrustes"

    def __init__(self, in_dim: int, out_dim: int, weight: torch.Tensor | None = None):
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        w = torch.eye(in_dim, out_dim) if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        self.register_buffer("weight", w.clone())

    def forward(self, old_features: torch.Tensor) -> torch.Tensor:
        return old_features @ self.weight

    def spec(self) -> dict:
        return {}


def orthogonal_procrustes(x_old: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
    """argmin over W with orthonormal rows or columns of ||x_old W - x_new||_F, i.e. U V^T of the thin SVD
    U S V^T of x_old^T x_new (Schönemann 1966), computed in float64; (d_old, d_new) float32."""
    m = x_old.double().T @ x_new.double()
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return (u @ vh).float()


def build_transformation(kind: str, in_dim: int, out_dim: int, width: int = 2048, depth: int = 2) -> nn.Module:
    """An untrained FCT network or an identity-initialised Procrustes map (``kind`` in :data:`KINDS`)."""
    if kind == "fct":
        return FCTTransformation(in_dim, out_dim, width, depth)
    if kind == "procrustes":
        return ProcrustesMap(in_dim, out_dim)
    raise UserError(f"TRANSFORM.TYPE '{kind}': expected one of {', '.join(KINDS)}")


def save_transformation(path, module: nn.Module, provenance: dict | None = None) -> None:
    """Write ``module`` atomically: kind, dims, architecture, weights (CPU) and where it came from."""
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    save_checkpoint(path, {"format": FORMAT, "version": VERSION, "kind": module.kind, "in_dim": module.in_dim,
                           "out_dim": module.out_dim, "arch": module.spec(), "state": state,
                           "provenance": dict(provenance or {})})


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def load_transformation(path, key: str = "EVAL.OLD_TRANSFORM", device="cpu") -> nn.Module:
    """The transformation saved at ``path``, in eval mode on ``device``. A missing, unreadable or corrupt
    file, one that is not a transformation, or weights that do not fit its declared kind and dims are
    refused in one line naming ``key`` and the file."""
    path = os.fspath(path)
    if not path:
        raise UserError(f"{key} is empty: give the transformation file (scripts/train_transformation.sh)")
    if not os.path.isfile(path):
        raise UserError(f"{key}: transformation file not found: {path}")
    try:
        ckpt = load_checkpoint(path)
    except UserError as exc:
        raise UserError(f"{key}: {exc}") from None
    if ckpt.get("format") != FORMAT:
        raise UserError(f"{key}: {path} is not a transformation file (written by scripts/train_transformation.sh)")
    kind, in_dim, out_dim, arch = ckpt.get("kind"), ckpt.get("in_dim"), ckpt.get("out_dim"), ckpt.get("arch")
    if kind not in KINDS or not (_positive_int(in_dim) and _positive_int(out_dim)) or not isinstance(arch, dict) \
            or not isinstance(ckpt.get("state"), dict):
        raise UserError(f"{key}: {path}: corrupt transformation header (kind {kind!r}, dims {in_dim!r} -> "
                        f"{out_dim!r}); expected kind {' or '.join(KINDS)} and positive dims")
    try:
        module = build_transformation(kind, in_dim, out_dim, **arch)
        module.load_state_dict(ckpt["state"], strict=True)
    except (TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{key}: {path}: weights do not fit a {kind} transformation {in_dim} -> {out_dim} "
                        f"({first})") from None
    check_finite_weights(module, path, key)
    return module.eval().to(device)


@torch.no_grad()
def map_features(module: nn.Module, features, batch: int = 65536, device=None) -> np.ndarray:
    """``module`` applied to ``features`` (numpy or tensor rows) in eval mode, ``batch`` rows at a time on
    ``device`` (default: the module's); float32 numpy rows."""
    device = torch.device(device) if device is not None else next(iter(module.state_dict().values())).device
    was_training = module.training
    module.eval().to(device)
    x = torch.as_tensor(np.asarray(features, dtype=np.float32) if not torch.is_tensor(features) else features)
    try:
        chunks = [module(x[i:i + batch].to(device).float()).cpu() for i in range(0, len(x), batch)]
    finally:
        module.train(was_training)
    out = torch.cat(chunks) if chunks else torch.zeros(0, module.out_dim)
    return out.numpy().astype(np.float32, copy=False)
