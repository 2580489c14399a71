"""The retrieval model: backbone -> embedding head (-> optional classifier), built from a few names."""

from __future__ import annotations

import torch
from torch import nn

from advbct.errors import UserError
from advbct.models.backbones import build_backbone, canonical_arch
from advbct.models.basis_transform import BasisTransformHead
from advbct.models.heads import EmbeddingHead, build_classifier

__all__ = ["RetrievalModel", "build_model"]


class RetrievalModel(nn.Module):
    """Backbone features -> 256-d embedding (-> class logits while training).

    ``forward`` returns a dict so one call touches every parameter used in training (what DDP needs):
    ``feat`` is the un-normalised embedding (B, D); ``branch`` what the classifier reads (``feat`` itself but
    for BT²'s head, advbct/models/basis_transform.py); ``logits`` (B, C) is present when a classifier exists.
    """

    def __init__(self, backbone: nn.Module, embedding_head: EmbeddingHead, classifier: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.embedding = embedding_head
        self.classifier = classifier
        # Plain description of how the model was built (set by build_model), for checkpoint configs.
        self.spec: dict = {}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Un-normalised embedding only (feature extraction; skips the classifier)."""
        return self.embedding(self.backbone(images))

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        feat, branch = self.embedding.branches(self.backbone(images))
        out = {"feat": feat, "branch": branch}
        if self.classifier is not None:
            out["logits"] = self.classifier(branch, labels)
        return out

    @property
    def embed_dim(self) -> int:
        return self.embedding.out_dim

    @property
    def compatible_dim(self) -> int:
        """How many leading dimensions of the embedding are compared with an old model's (all but for BT²)."""
        return self.embedding.compatible_dim

    @property
    def num_classes(self) -> int:
        return 0 if self.classifier is None else int(self.classifier.weight.shape[0])


def build_model(
    arch: str,
    embed_dim: int = 256,
    num_classes: int = 0,
    classifier: str = "softmax",
    pretrained: bool = False,
    weights_path: str | None = None,
    scale: float = 30.0,
    margin: float = 0.3,
    zero_init_residual: bool = False,
    head: dict | None = None,
) -> RetrievalModel:
    """Backbone ``arch`` (torchvision name or ``timm:<name>``) + EmbeddingHead(embed_dim) + classifier head
    (none when ``num_classes`` is 0). ``head``: None or ``{"kind": "linear_bn"}`` for that embedding head,
    ``{"kind": "basis_transform", "old_dim", "extra_dim", "scale"}`` for BT²'s (whose classifier reads its
    ``embed_dim``-d new branch)."""
    backbone, out_dim = build_backbone(arch, pretrained=pretrained, weights_path=weights_path,
                                      zero_init_residual=zero_init_residual)
    head = dict(head or {"kind": "linear_bn"})
    kind = head.pop("kind", "linear_bn")
    if kind == "linear_bn" and not head:
        embedding = EmbeddingHead(out_dim, embed_dim)
    elif kind == "basis_transform" and set(head) == {"old_dim", "extra_dim", "scale"}:
        embedding = BasisTransformHead(out_dim, embed_dim, **head)
    else:
        raise UserError(f"embedding head {kind!r} with {sorted(head)}: expected linear_bn, or basis_transform "
                        "with old_dim, extra_dim and scale")
    cls = build_classifier(classifier, embedding.branch_dim, num_classes, scale=scale,
                           margin=margin) if num_classes else None
    model = RetrievalModel(backbone, embedding, cls)
    model.spec = {
        "arch": canonical_arch(arch),
        "embed_dim": int(embed_dim),
        "num_classes": int(num_classes),
        "classifier": str(classifier).strip().lower() if num_classes else None,
        "scale": float(scale),
        "margin": float(margin),
        "backbone_dim": int(out_dim),
        "head": embedding.spec(),
    }
    return model
