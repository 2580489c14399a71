"""Common interface of the compatibility losses and small vectorised helpers they share."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from advbct.errors import UserError
from advbct.meta import ClassMeta


class CompatibilityLoss(nn.Module):
    """A backward-compatibility term added to the new model's classification loss.

    ``forward(feat_new, feat_old, labels, *, new_classifier_weight=None, progress, epoch)`` returns
    ``{"loss": λ·term (scalar, grad), <term names>: detached scalars, <diagnostics>: detached}``.
    feat_new (B, D) un-normalised new embeddings; feat_old (B, D) frozen old embeddings of the same
    images, or None for a loss with ``needs_old_features`` False (the trainer then skips the old
    model's forward pass); labels (B,) in the new label space, old classes are ``labels < num_old_classes``;
    progress = global_step / total_steps ∈ [0, 1]; epoch 0-based. Subclasses implement ``compute``,
    which runs in float32 with autocast disabled and returns ``(term, diagnostics)``. A loss that reads more
    of the step names it in ``aux_inputs`` and gets ``aux={name: (B, ·) tensor}`` in ``compute``: "branch"
    (what the new classifier reads, advbct.models.RetrievalModel), "teacher" (the frozen embeddings of the
    method's teacher checkpoint, registry ``teacher_key``).
    """

    needs_meta: bool = False  # needs the old-class meta file (COMP_LOSS.META_PATH)
    needs_old_classifier: bool = False  # needs the old model's classifier weight (OLD_MODEL.WEIGHTS)
    needs_new_classifier: bool = False  # forward needs new_classifier_weight (the new model's classifier)
    needs_old_features: bool = True  # compute reads feat_old; False: BCT/LCE/UniBCT use class-level old data only
    aux_inputs: tuple = ()  # the extra tensors compute reads as aux (class docstring)

    def __init__(self, num_old_classes: int, weight: float = 1.0):
        super().__init__()
        self.num_old_classes = int(num_old_classes)
        self.weight = float(weight)

    def forward(self, feat_new, feat_old, labels, *, new_classifier_weight=None, progress: float,
                epoch: int, aux: dict | None = None) -> dict:
        device_type = feat_new.device.type
        no_autocast = (torch.autocast(device_type=device_type, enabled=False)
                       if torch.amp.is_autocast_available(device_type) else contextlib.nullcontext())
        with no_autocast:
            if new_classifier_weight is not None:
                new_classifier_weight = new_classifier_weight.float()
            extra = {}
            if self.aux_inputs:
                missing = [n for n in self.aux_inputs if aux is None or n not in aux]
                if missing:
                    raise ValueError(f"{type(self).__name__} needs aux inputs {missing}")
                extra["aux"] = {n: aux[n].float() for n in self.aux_inputs}
            term, diagnostics = self.compute(
                feat_new.float(), None if feat_old is None else feat_old.detach().float(), labels,
                new_classifier_weight=new_classifier_weight, progress=float(progress), epoch=int(epoch), **extra)
        out = {"loss": term * self.weight}
        out.update({k: v.detach() for k, v in diagnostics.items()})
        return out

    def compute(self, feat_new, feat_old, labels, *, new_classifier_weight, progress, epoch):
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_old_classes={self.num_old_classes}, weight={self.weight}"


def old_class_index(labels: torch.Tensor, num_old_classes: int):
    """(mask of old-class samples, labels clamped into [0, num_old_classes) so they index safely)."""
    return labels < num_old_classes, labels.clamp(max=num_old_classes - 1)


def old_rows(is_old: torch.Tensor, compact: bool | None = None) -> torch.Tensor | None:
    """Row indices of the old-class samples, or None to keep every row and mask instead.

    Compacting skips the new-class rows (~70 % of a class-split batch) in the big old-classifier
    matmuls; it is the default on CPU. On GPU (default: no compaction) boolean indexing would force
    a device→host sync, while the masked full-batch matmul is cheap.
    """
    if compact is None:
        compact = not is_old.is_cuda
    return torch.nonzero(is_old).squeeze(1) if compact else None


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (0 when the mask is empty), without a host sync."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1).to(values.dtype)


def check_meta(meta: ClassMeta | None, *, method: str, embed_dim: int, num_old_classes: int) -> ClassMeta:
    """Raise a UserError naming COMP_LOSS.META_PATH unless ``meta`` covers the old classes."""
    if meta is None:
        raise UserError(f"COMP_LOSS.TYPE '{method}' needs the old-class meta file: set COMP_LOSS.META_PATH "
                        "(written by scripts/extract_meta.sh)")
    if meta.embed_dim != embed_dim:
        raise UserError(f"COMP_LOSS.META_PATH: meta embeddings are {meta.embed_dim}-d, the model's are {embed_dim}-d")
    if meta.num_classes < num_old_classes:
        raise UserError(f"COMP_LOSS.META_PATH: meta has {meta.num_classes} classes, the old model "
                        f"{num_old_classes}; expected a meta of the old model's training set")
    return meta
