"""Gradient reversal layer and the old/new embedding discriminator of AdvBCT (PAPER.md "Adversarial")."""

from __future__ import annotations

import math

import torch
from torch import nn


class _GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by −α (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * -ctx.alpha, None


def grad_reverse(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x`` unchanged in the forward pass; gradient × (−alpha) in the backward pass."""
    return _GradReverse.apply(x, float(alpha))


def grl_alpha(progress: float, gamma: float = 10.0) -> float:
    """Reversal strength α = 2/(1 + e^{−γp}) − 1 for training progress p ∈ [0, 1] (0 at p=0, →1)."""
    return 2.0 / (1.0 + math.exp(-gamma * float(progress))) - 1.0


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse`; set ``alpha`` before each forward."""

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Discriminator(nn.Sequential):
    """Linear(D, hidden) → BatchNorm1d → ReLU → Linear(hidden, 2) → log-softmax: new (0) vs old (1)."""

    def __init__(self, embed_dim: int = 256, hidden: int = 100, num_domains: int = 2):
        super().__init__(
            nn.Linear(embed_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_domains),
            nn.LogSoftmax(dim=1),
        )
