"""Models: torchvision and timm backbones, embedding/classifier heads, the retrieval model, checkpoints and
trained models loaded from them."""

from advbct.models.backbones import (
    available_archs,
    build_backbone,
    canonical_arch,
    default_weights_file,
    register_backbone,
    unregister_backbone,
)
from advbct.models.checkpoint import checkpoint_embed_dim, load_checkpoint, load_model_weights, save_checkpoint
from advbct.models.heads import (
    CLASSIFIERS,
    ArcFaceClassifier,
    CosFaceClassifier,
    EmbeddingHead,
    LinearClassifier,
    build_classifier,
)
from advbct.models.loading import (
    check_same_embedding,
    checkpoint_shapes,
    load_trained_model,
    read_checkpoint,
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
    "check_same_embedding",
    "checkpoint_embed_dim",
    "checkpoint_shapes",
    "default_weights_file",
    "load_checkpoint",
    "load_model_weights",
    "load_trained_model",
    "read_checkpoint",
    "register_backbone",
    "save_checkpoint",
    "unregister_backbone",
]
