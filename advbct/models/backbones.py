"""Backbones: torchvision classification networks with the final classifier removed, or timm models
(``timm:<name>``, optional dependency, see :mod:`advbct.models.timm_backbone`).

The paper uses ImageNet-pretrained ResNet-18/50 with global average pooling (PAPER.md "Model (code)");
any torchvision classifier whose last layer is a ``Linear`` works the same way. Its pretrained weights
are read from a local file (``weights_path``) or the torch hub cache; nothing is ever downloaded (timm
models resolve theirs the timm way, downloading when online). A local
file may also be an advbct checkpoint, whose backbone is then used (the synthetic blocks start old and new
models from one backbone pretrained on disjoint landmarks, as the paper starts both from ImageNet).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from advbct.errors import UserError
from advbct.models.timm_backbone import build_timm_backbone, is_timm_arch, timm_arch_name

__all__ = ["advbct_backbone_state", "available_archs", "build_backbone", "canonical_arch", "default_weights_file",
           "register_backbone", "unregister_backbone"]

# Backbones declared by name outside torchvision and timm (register_backbone): name -> builder
_REGISTERED: dict = {}

# torchvision classifiers that do not fit "features -> final Linear": auxiliary outputs in training
# mode, or a convolutional classifier.
_UNSUPPORTED = {
    "googlenet": "returns auxiliary logits in training mode",
    "inception_v3": "returns auxiliary logits in training mode",
    "squeezenet1_0": "has a convolutional classifier",
    "squeezenet1_1": "has a convolutional classifier",
}
# Attribute names torchvision uses for the final classifier (ResNet/RegNet/ShuffleNet: fc;
# EfficientNet/MobileNet/ConvNeXt/DenseNet/VGG/MNASNet/MaxViT: classifier; Swin: head; ViT: heads).
_HEAD_ATTRS = ("fc", "classifier", "head", "heads")
# An advbct checkpoint (RetrievalModel state dict) holds its backbone under this prefix.
_MODEL_BACKBONE = "backbone."
# Old DenseNet checkpoints name layers "norm.1" where the modules are now "norm1" (torchvision's format).
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def register_backbone(name: str, builder) -> None:
    """Declare backbone ``name`` (MODEL.ARCH) built by ``builder(pretrained, weights_path,
    zero_init_residual) -> (module, out_dim)``: the module maps images (B, 3, H, W) to pooled features
    (B, out_dim). A forker's backbone is one file calling this, imported by ``advbct/models/__init__.py``."""
    key = str(name).strip().lower()
    if not key or key.startswith("timm:") or key in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"backbone name '{name}': empty, timm:-prefixed or a torchvision name")
    if key in _REGISTERED and _REGISTERED[key] is not builder:
        raise ValueError(f"backbone '{name}' is already registered")
    _REGISTERED[key] = builder


def unregister_backbone(name: str) -> None:
    """Remove a backbone declared with :func:`register_backbone` (tests, interactive use)."""
    _REGISTERED.pop(str(name).strip().lower(), None)


def available_archs() -> list[str]:
    """Names accepted by :func:`build_backbone`: torchvision's classifiers and the registered backbones
    (besides ``timm:<name>`` for timm models)."""
    names = torchvision.models.list_models(module=torchvision.models)
    return sorted([n for n in names if n not in _UNSUPPORTED] + list(_REGISTERED))


def _check_arch(arch: str) -> str:
    name = str(arch).strip().lower()
    if name in _UNSUPPORTED:
        raise UserError(f"backbone '{arch}' is not supported: it {_UNSUPPORTED[name]}")
    valid = available_archs()
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown backbone '{arch}'{hint}; valid: {', '.join(valid)}")
    return name


def default_weights_file(arch: str) -> tuple[str, str]:
    """(path in the torch hub cache, download URL) of torchvision's default ImageNet weights for ``arch``."""
    name = _check_arch(arch)
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    filename = os.path.basename(urlparse(url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename), url


def _strip_classifier(model: nn.Module, arch: str) -> tuple[int, str]:
    """Replace the final Linear classifier by Identity in place; return its input width (feature dim)
    and the state-dict prefix its parameters had (e.g. ``fc.``)."""
    for attr in _HEAD_ATTRS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features, f"{attr}."
        if isinstance(head, nn.Sequential) and len(head) > 0:
            last_name, last = list(head.named_children())[-1]
            if isinstance(last, nn.Linear):
                setattr(head, last_name, nn.Identity())
                return last.in_features, f"{attr}.{last_name}."
    raise UserError(f"backbone '{arch}': no final Linear classifier found to remove")


def canonical_arch(arch: str) -> str:
    """How a model records its arch: lower case, ``timm:<name>`` for timm models."""
    if is_timm_arch(arch):
        return f"timm:{timm_arch_name(arch)}"
    return str(arch).strip().lower()


def _tensor_state(obj: dict) -> dict | None:
    """The state dict in a loaded file (a 'state_dict'/'model' entry or the file itself, DDP prefix
    stripped); None when it is not a non-empty mapping of tensors."""
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _backbone_only(state: dict) -> dict:
    return {k[len(_MODEL_BACKBONE):]: v for k, v in state.items() if k.startswith(_MODEL_BACKBONE)}


def _read_weights(path: str) -> dict:
    # Local import: checkpoint.py does not depend on this module, so no import cycle.
    from advbct.models.checkpoint import load_checkpoint

    state = _tensor_state(load_checkpoint(path))
    if state is None:
        raise UserError(f"{path}: expected a state dict of tensors (torchvision weights file)")
    if any(k.startswith(_MODEL_BACKBONE) for k in state):  # an advbct checkpoint: its backbone only
        state = _backbone_only(state)
    return state


def advbct_backbone_state(path: str) -> dict | None:
    """The backbone tensors of the advbct checkpoint ``path`` (``backbone.`` prefix removed); None when
    ``path`` is some other file (a torchvision/timm state dict, safetensors, unreadable)."""
    from advbct.models.checkpoint import load_checkpoint

    if str(path).endswith(".safetensors"):
        return None
    try:
        state = _tensor_state(load_checkpoint(path))
    except UserError:  # not a plain torch file: whoever reads it next reports why
        return None
    if state is None or not any(k.startswith(_MODEL_BACKBONE) for k in state):
        return None
    return _backbone_only(state)


def _load_pretrained(model: nn.Module, arch: str, path: str, classifier_prefix: str) -> None:
    """Load ``path`` into ``model`` (classifier already removed): the file's classifier weights, if any,
    are ignored; every other tensor must match by name and shape."""
    state = _read_weights(path)
    if arch.startswith("densenet"):
        state = {_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(classifier_prefix)}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise UserError(
            f"{path}: weights do not match torchvision '{arch}': missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(
                f"{path}: weights do not match torchvision '{arch}': {key} has shape "
                f"{tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=True)


def build_backbone(arch: str, pretrained: bool = False, weights_path: str | None = None,
                   zero_init_residual: bool = False):
    """Build torchvision ``arch`` (or timm ``timm:<name>``, or a registered backbone) without its classifier;
    returns ``(module, out_dim)``.

    The module maps images (B, 3, H, W) to pooled features (B, out_dim). Weights: ``weights_path`` when
    given (any non-empty path is loaded, whatever ``pretrained`` says), else with ``pretrained`` the
    default ImageNet file from the torch hub cache; a missing file is a :class:`UserError`, never a
    download and never a silent random init. ``zero_init_residual`` (resnet family only) starts each residual
    branch at zero, so a deep resnet trained from scratch begins as a shallow one. timm archs: see
    :func:`advbct.models.timm_backbone.build_timm_backbone`.
    """
    if is_timm_arch(arch):
        return build_timm_backbone(arch, pretrained=pretrained, weights_path=weights_path,
                                   zero_init_residual=zero_init_residual)
    name = _check_arch(arch)
    if name in _REGISTERED:
        module, out_dim = _REGISTERED[name](pretrained=pretrained, weights_path=weights_path,
                                            zero_init_residual=zero_init_residual)
        return module, int(out_dim)
    extra = {}
    if zero_init_residual:
        if not name.startswith(("resnet", "resnext", "wide_resnet")):
            raise UserError(f"MODEL.ZERO_INIT_RESIDUAL applies to resnet backbones only, not '{arch}'")
        extra["zero_init_residual"] = True
    model = torchvision.models.get_model(name, weights=None, **extra)
    out_dim, classifier_prefix = _strip_classifier(model, name)
    path = os.fspath(weights_path) if weights_path else None
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"pretrained weights file not found: {path} (MODEL.PRETRAINED_PATH)")
        _load_pretrained(model, name, path, classifier_prefix)
    elif pretrained:
        path, url = default_weights_file(name)
        if not os.path.isfile(path):
            raise UserError(
                f"ImageNet weights for '{name}' not found: put {os.path.basename(path)} "
                f"(from {url}) at {path}, or give its path in MODEL.PRETRAINED_PATH; nothing is downloaded"
            )
        _load_pretrained(model, name, path, classifier_prefix)
    return model, out_dim
