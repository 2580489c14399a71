"""Backbones from timm, an optional dependency: ``MODEL.ARCH timm:<name>[.<pretrained tag>]``.

The original release builds its ResNets with ``timm.create_model(name, pretrained=True, num_classes=0)``
(timm 0.6.7: resnet18 = torchvision's weights, ``resnet18.tv_in1k`` today; resnet50 = ``resnet50.a1_in1k``).
The same call gives any timm model as a module mapping images to pooled features. timm is imported only
when a ``timm:`` arch is built, so torchvision backbones never need it.
"""

from __future__ import annotations

import difflib
import os
import re

from torch import nn

from advbct.errors import UserError

__all__ = ["TIMM_PREFIX", "build_timm_backbone", "is_timm_arch", "timm_arch_name"]

TIMM_PREFIX = "timm:"
_INSTALL = "pip install 'timm>=1.0' (or pip install -e '.[timm]')"


def is_timm_arch(arch) -> bool:
    """Whether ``arch`` names a timm model (``timm:<name>``, prefix in any case)."""
    return str(arch).strip().lower().startswith(TIMM_PREFIX)


def timm_arch_name(arch) -> str:
    """The timm model name of a ``timm:`` arch, lower case as timm spells every name."""
    name = str(arch).strip()[len(TIMM_PREFIX):].strip().lower()
    if not name:
        raise UserError(f"backbone '{arch}': give a timm model name after 'timm:' (e.g. timm:resnet50.a1_in1k)")
    return name


def _import_timm(arch):
    try:
        import timm
    except ImportError as exc:
        raise UserError(f"backbone '{arch}' (MODEL.ARCH) needs timm: {_INSTALL}") from exc
    return timm


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's text on one line (load_state_dict errors span several), shortened to ``limit``."""
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _check_name(timm, arch: str, name: str) -> None:
    """UserError with the closest valid spelling for an unknown model or pretrained tag."""
    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=1)
        hint = f" (did you mean 'timm:{close[0]}'?)" if close else ""
        raise UserError(f"backbone '{arch}': unknown timm model '{base}'{hint}; "
                        f"timm.list_models() lists the valid names")
    if tag:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{base}.*")]
        if tag not in tags:
            close = difflib.get_close_matches(tag, tags, n=1)
            hint = f" (did you mean 'timm:{base}.{close[0]}'?)" if close else ""
            raise UserError(f"backbone '{arch}': timm has no pretrained tag '{tag}' for '{base}'{hint}; "
                            f"valid: {', '.join(tags) or 'none'}")


def _feature_dim(model: nn.Module) -> int:
    """Width of what the headless model returns: the pre-logits width where timm has a hidden head layer
    (MobileNetV3: 1024 after pooling 576 channels), else ``num_features``."""
    hidden = getattr(model, "head_hidden_size", None)
    return int(hidden or model.num_features)


def _load_backbone_state(model: nn.Module, state: dict, arch: str, path: str) -> None:
    """Strict load of an advbct checkpoint's backbone tensors (names and shapes must all match)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise UserError(f"{path}: its backbone does not match '{arch}' (MODEL.PRETRAINED_PATH): missing "
                        f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    model.load_state_dict(state, strict=True)


def _without_classifier(timm, name: str, state: dict) -> dict:
    """``state`` without the tensors of the classifier(s) timm's config names for ``name`` (``fc``,
    ``head.fc``, ...): the backbone is built with ``num_classes=0`` and has none."""
    cfg = timm.models.get_pretrained_cfg(name)  # None for a model timm has no pretrained config for
    classifier = getattr(cfg, "classifier", None) or ()
    prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    return {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}


def _from_file(timm, arch: str, name: str, path: str) -> nn.Module:
    """The model with the weights of ``path``: an advbct checkpoint's backbone, or a timm / torch file."""
    # Local import: backbones.py imports this module.
    from advbct.models.backbones import advbct_backbone_state

    backbone = advbct_backbone_state(path)
    if backbone is not None:
        model = timm.create_model(name, pretrained=False, num_classes=0)
        _load_backbone_state(model, backbone, arch, path)
        return model
    try:
        state = timm.models.load_state_dict(path)  # .pth/.safetensors; a 'state_dict'/'model' entry; EMA first
    except Exception as exc:  # unreadable or refused by weights-only loading: reported against the file
        raise UserError(f"{path}: not a readable weights file for '{arch}' (MODEL.PRETRAINED_PATH): "
                        f"{_one_line(exc)}") from exc
    # Handed to timm as a state dict, not as file=path: timm then applies the model's own key filter but
    # loads strictly (with file=path and a dropped classifier it would skip missing tensors silently).
    overlay = dict(state_dict=_without_classifier(timm, name, state), num_classes=0, label_offset=0)
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # missing/unexpected keys, wrong shapes, a filter that does not fit the file
        raise UserError(f"{path}: weights do not match timm '{name}' (MODEL.PRETRAINED_PATH): "
                        f"{_one_line(exc)}") from exc
    model.pretrained_cfg.pop("state_dict", None)  # timm keeps its config on the model: not a weights copy
    return model


def _from_timm_cache(timm, arch: str, name: str) -> nn.Module:
    """The model with timm's own pretrained weights (Hugging Face cache; downloaded when online)."""
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:  # offline without a cache, no weights for this name, a corrupt cache entry
        raise UserError(
            f"backbone '{arch}': timm could not load its pretrained weights ({_one_line(exc, 160)}); cache "
            f"them once online (python -c \"import timm; timm.create_model('{name}', pretrained=True)\", same "
            "HF_HOME; then HF_HUB_OFFLINE=1 reads the cache), or give a local weights file in "
            "MODEL.PRETRAINED_PATH, or set MODEL.PRETRAINED false"
        ) from exc


def build_timm_backbone(arch: str, pretrained: bool = False, weights_path: str | None = None,
                        zero_init_residual: bool = False):
    """timm model ``arch`` (``timm:<name>``) without its classifier; returns ``(module, out_dim)``.

    Weights: ``weights_path`` when given (an advbct checkpoint's backbone, or a timm/torch state dict
    loaded through timm), else with ``pretrained`` timm's own weights, else timm's random init.
    """
    timm = _import_timm(arch)
    name = timm_arch_name(arch)
    _check_name(timm, arch, name)
    if zero_init_residual:
        # timm keeps its own init: its ResNets already zero the last BN of each block (zero_init_last)
        raise UserError(f"MODEL.ZERO_INIT_RESIDUAL applies to torchvision resnets only, not '{arch}' "
                        "(timm ResNets already zero-init the last BN of each block): set it false")
    path = os.fspath(weights_path) if weights_path else None
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"pretrained weights file not found: {path} (MODEL.PRETRAINED_PATH)")
        model = _from_file(timm, arch, name, path)
    elif pretrained:
        model = _from_timm_cache(timm, arch, name)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    return model, _feature_dim(model)
