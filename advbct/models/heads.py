"""Embedding head (Linear without bias -> BatchNorm1d) and classifier heads (softmax / ArcFace / CosFace).

PAPER.md "Model (code)": embedding = BN(Linear(d_backbone -> 256, no bias)); classifier
Linear(256 -> C, no bias) on the un-normalised embedding with softmax cross-entropy; ArcFace and
CosFace are options (normalised weights and features, scale s, additive margin m on the target).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from advbct.errors import UserError

__all__ = [
    "ArcFaceClassifier",
    "CLASSIFIERS",
    "CosFaceClassifier",
    "EmbeddingHead",
    "LinearClassifier",
    "build_classifier",
]

# acos has an infinite derivative at +-1; clamp cosines this far inside [-1, 1] before it.
_ACOS_EPS = 1e-7


class EmbeddingHead(nn.Module):
    """``bn(fc(x))`` with ``fc`` a bias-free Linear: the retrieval embedding (PAPER.md "Model (code)")."""

    def __init__(self, in_dim: int, embed_dim: int = 256):
        super().__init__()
        if in_dim <= 0 or embed_dim <= 0:
            raise UserError(f"embedding dimensions must be positive, got in_dim={in_dim}, embed_dim={embed_dim}")
        self.fc = nn.Linear(in_dim, embed_dim, bias=False)
        self.bn = nn.BatchNorm1d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))

    def branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(retrieval embedding, what the classifier reads): one tensor here (BT²'s head has two)."""
        e = self.forward(x)
        return e, e

    @property
    def out_dim(self) -> int:
        return self.fc.out_features

    branch_dim = out_dim  # the classifier's input size
    compatible_dim = out_dim  # the leading dimensions an old model's embeddings are compared with

    def spec(self) -> dict:
        return {"kind": "linear_bn"}


def _init_weight(num_classes: int, embed_dim: int) -> nn.Parameter:
    # Same initialisation as nn.Linear (the original code's classifier is a plain nn.Linear).
    weight = nn.Parameter(torch.empty(num_classes, embed_dim))
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


class LinearClassifier(nn.Module):
    """Softmax classifier: logits = f W^T on the un-normalised embedding f, no bias; labels unused."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.weight = _init_weight(num_classes, embed_dim)

    def forward(self, feat: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(feat, self.weight)


class _MarginClassifier(nn.Module):
    """Cosine classifier: logits = s * cos(f, w_k); with labels a margin is applied to the target class.

    Labels < 0 get no margin (as the original ``label != -1`` convention).
    """

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.3):
        super().__init__()
        self.weight = _init_weight(num_classes, embed_dim)
        self.scale = float(scale)
        self.margin = float(margin)

    def cosine(self, feat: torch.Tensor) -> torch.Tensor:
        """cos between L2-normalised features and class weights, (B, C), in float32."""
        return F.linear(F.normalize(feat), F.normalize(self.weight)).float()

    def _target_margin(self, cos_target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, feat: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(feat)
        if labels is None:
            return self.scale * cos
        labels = labels.to(device=cos.device, dtype=torch.long).view(-1, 1)
        valid = labels >= 0
        index = labels.clamp(min=0)
        target = cos.gather(1, index)
        # Only the (B, 1) target column changes: O(B) work instead of a margin over all C classes.
        target = torch.where(valid, self._target_margin(target), target)
        return self.scale * cos.scatter(1, index, target)

    def extra_repr(self) -> str:
        c, d = self.weight.shape
        return f"embed_dim={d}, num_classes={c}, scale={self.scale}, margin={self.margin}"


class ArcFaceClassifier(_MarginClassifier):
    """ArcFace: target logit s * cos(theta + m), theta = arccos of the target cosine (additive angle)."""

    def _target_margin(self, cos_target: torch.Tensor) -> torch.Tensor:
        theta = torch.acos(cos_target.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
        return torch.cos(theta + self.margin)


class CosFaceClassifier(_MarginClassifier):
    """CosFace: target logit s * (cos - m) (additive cosine margin)."""

    def _target_margin(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.margin


CLASSIFIERS = {"softmax": LinearClassifier, "arcface": ArcFaceClassifier, "cosface": CosFaceClassifier}


def build_classifier(kind: str, embed_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.3):
    """Classifier head by name: ``softmax`` (scale/margin unused), ``arcface`` or ``cosface``."""
    name = str(kind).strip().lower()
    if name not in CLASSIFIERS:
        raise UserError(f"unknown classifier '{kind}'; valid: {', '.join(sorted(CLASSIFIERS))}")
    if num_classes <= 0:
        raise UserError(f"classifier '{name}' needs num_classes > 0, got {num_classes}")
    if name == "softmax":
        return LinearClassifier(embed_dim, num_classes)
    return CLASSIFIERS[name](embed_dim, num_classes, scale=scale, margin=margin)
