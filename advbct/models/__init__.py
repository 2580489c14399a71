"""Models: torchvision and timm backbones, embedding/classifier heads, the retrieval model and checkpoints."""

from advbct.models.backbones import available_archs, build_backbone, canonical_arch, default_weights_file
from advbct.models.checkpoint import checkpoint_embed_dim, load_checkpoint, load_model_weights, save_checkpoint
from advbct.models.heads import (
    CLASSIFIERS,
    ArcFaceClassifier,
    CosFaceClassifier,
    EmbeddingHead,
    LinearClassifier,
    build_classifier,
)
from advbct.models.network import RetrievalModel, build_model

__all__ = [
    "CLASSIFIERS",
    "ArcFaceClassifier",
    "CosFaceClassifier",
    "EmbeddingHead",
    "LinearClassifier",
    "RetrievalModel",
    "available_archs",
    "build_backbone",
    "build_classifier",
    "build_model",
    "canonical_arch",
    "checkpoint_embed_dim",
    "default_weights_file",
    "load_checkpoint",
    "load_model_weights",
    "save_checkpoint",
]
