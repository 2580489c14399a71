"""Trained models from checkpoints: their stored shapes, a model built to fit them, the cross-test size check.

Shared by evaluation (scripts/test.sh) and the engine (old model of compatible training, meta
extraction); it lives with the models so that evaluation never needs the engine.
"""

import os

import torch

from advbct.errors import UserError
from advbct.models.basis_transform import head_from_state
from advbct.models.checkpoint import check_finite_weights, load_checkpoint, load_model_weights
from advbct.models.network import build_model

__all__ = ["check_finite_weights", "check_same_embedding", "checkpoint_shapes", "load_trained_model",
           "read_checkpoint"]


def read_checkpoint(path, key) -> dict:
    """The checkpoint dict at ``path``; UserError naming config ``key`` when it is empty or absent."""
    if not path:
        raise UserError(f"{key} is empty: give the checkpoint path")
    if not os.path.isfile(path):
        raise UserError(f"{key}: checkpoint not found: {path}")
    return load_checkpoint(path)


def _layout(state, path, key) -> tuple[int, int, dict | None]:
    """(embedding size, classes, BT² head spec or None) of a checkpoint's state."""
    weights = state.get("model", state)
    if not isinstance(weights, dict):
        raise UserError(f"{key}: {path} holds no state dict")
    weights = {k[7:] if k.startswith("module.") else k: v for k, v in weights.items()}
    emb = weights.get("embedding.fc.weight", weights.get("projection_dim.weight"))
    cls = weights.get("classifier.weight", weights.get("projection_cls.weight"))
    if emb is None:
        raise UserError(f"{key}: {path} has no embedding layer (embedding.fc.weight / projection_dim.weight)")
    classes = int(cls.shape[0]) if cls is not None else 0
    try:
        head = head_from_state(weights)
    except KeyError as missing:  # a BT² head without one of its tensors: a truncated or edited file
        raise UserError(f"{key}: {path} holds a BT² embedding head without {missing}") from None
    if head is not None:
        return head["embed_dim"] + head["extra_dim"], classes, head
    return int(emb.shape[0]), classes, None


def _shapes(state, path, key) -> tuple[int, int]:
    return _layout(state, path, key)[:2]


def checkpoint_shapes(path, key, *, checkpoint=None):
    """``(embed_dim, num_classes)`` stored in a checkpoint (ours or the original release's format); the
    embedding size is the model's output (BT²: its new size plus the added dimensions).

    ``key`` is the config key that named the file, for the error message; ``checkpoint``: its dict, already
    read by :func:`read_checkpoint` (then the file is not read again).
    """
    return _shapes(read_checkpoint(path, key) if checkpoint is None else checkpoint, path, key)


def load_trained_model(arch, path, key, *, with_classifier=False, device="cpu", checkpoint=None):
    """Build ``arch`` with the embedding size (and classifier) found in checkpoint ``path`` and load it
    (the file is read once, for its shapes and its weights; ``checkpoint``: its dict, already read by
    :func:`read_checkpoint`)."""
    ckpt = read_checkpoint(path, key) if checkpoint is None else checkpoint
    embed_dim, num_classes, bt2 = _layout(ckpt, path, key)
    head = None
    if bt2 is not None:  # BT²'s head: its sizes and scale are read from the weights
        embed_dim = bt2.pop("embed_dim")
        head = {"kind": "basis_transform", **bt2}
    model = build_model(arch, embed_dim=embed_dim,
                        num_classes=num_classes if with_classifier else 0, pretrained=False, head=head)
    load_model_weights(model, path, checkpoint=ckpt)
    check_finite_weights(model, path, key)
    return model.to(device)


def check_same_embedding(new_model, old_model, new_path, old_path):
    """Cross-test needs one embedding space: refuse loaded models whose sizes do not fit before any extraction
    (their sizes are read from the models, so neither checkpoint is read again). The old size must be the
    new model's compatible size: its whole embedding, or BT²'s leading old dimensions."""
    new_dim, old_dim = new_model.compatible_dim, old_model.embed_dim
    if new_dim != old_dim:
        what = "embeds to" if new_dim == new_model.embed_dim else "is compatible on its first"
        new, old = (f"new model {new_path}" if new_path else "the new model",
                    f"old model {old_path}" if old_path else "the old model")
        raise UserError(f"{new} {what} {new_dim} dims but {old} embeds to "
                        f"{old_dim}: cross-test needs the same embedding size (MODEL.EMB_DIM)")
    return new_dim

