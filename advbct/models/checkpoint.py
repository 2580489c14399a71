"""Checkpoints: atomic saving, safe loading (``weights_only=True``), and model weights from our format,
bare / DDP state dicts, or the original AdvBCT (OpenCompatible) release format.

The original release pickles its yacs ``CfgNode`` config (and numpy scalars such as ``best_acc1``),
which ``torch.load(weights_only=True)`` refuses. We allowlist harmless stand-ins under those global
names: a CfgNode becomes an ``OrderedDict`` (turned into a plain dict afterwards) and a numpy scalar
is decoded from its raw bytes with ``struct`` into a Python number. Nothing else from the pickle can
run, and neither yacs nor numpy is imported.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Mapping

import torch

from advbct.errors import UserError
from advbct.io import atomic_path

__all__ = ["check_finite_weights", "checkpoint_embed_dim", "load_checkpoint", "load_model_weights", "save_checkpoint"]

_DDP_PREFIX = "module."
# Original release -> our parameter names (timm ResNet names equal torchvision's; see PAPER.md "Model").
_ORIGINAL_RENAMES = (
    ("convnet.", "backbone."),
    ("projection_dim.", "embedding.fc."),
    ("bn.", "embedding.bn."),
    ("projection_cls.", "classifier."),
)
# Parts of the original model that are not in RetrievalModel (training-only modules).
_ORIGINAL_DROPPED = ("discriminator.", "eboundary.")


# --------------------------------------------------------------------------------------------- saving
_PLAIN_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)
_PLAIN_MAPPINGS = (dict, OrderedDict, Counter)
_PLAIN_SEQUENCES = (list, tuple, set)


def _check_plain(obj, where: str) -> None:
    """Raise TypeError unless ``obj`` is data ``torch.load(weights_only=True)`` reads back as is."""
    kind = type(obj)
    if kind in (torch.Tensor, torch.nn.Parameter) or kind in _PLAIN_LEAVES:
        return
    if kind in _PLAIN_MAPPINGS:
        for key, value in obj.items():
            if type(key) not in _PLAIN_LEAVES and type(key) is not tuple:
                raise TypeError(f"save_checkpoint: key {key!r} in {where} has type {type(key).__qualname__}")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if kind in _PLAIN_SEQUENCES:
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"save_checkpoint: {where} has type {kind.__module__}.{kind.__qualname__}, which "
        "torch.load(weights_only=True) cannot read; store tensors and plain dict/list/str/number data"
    )


def save_checkpoint(path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically: a same-directory temp file, fsync, then ``os.replace``.

    A crash or error never leaves a half-written ``path`` (an existing one stays intact). The payload
    must be plain data (TypeError otherwise) so that it loads with ``weights_only=True``.
    """
    if type(payload) not in _PLAIN_MAPPINGS:
        raise TypeError(f"save_checkpoint: payload must be a dict, got {type(payload).__qualname__}")
    _check_plain(payload, "payload")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
        unsafe = _unsafe_globals(tmp)
        if unsafe:
            raise TypeError(f"save_checkpoint: payload references Python objects {unsafe[:5]} "
                            "that weights_only loading refuses")


def _unsafe_globals(path: str) -> list:
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    return list(finder(path)) if finder is not None else []


# ----------------------------------------------------------------------- safe stand-ins for loading
class _CfgNodeStandIn:
    """Allowlisted as ``yacs.config.CfgNode``: creating one yields an empty OrderedDict.

    The weights-only unpickler only fills exact dict/OrderedDict types and only sets state on
    allowlisted types or OrderedDict, so a dict subclass cannot be used; an OrderedDict can.
    """

    def __new__(cls, *args, **kwargs):
        return OrderedDict()


class _NumpyDtypeStandIn:
    """Allowlisted as ``numpy.dtype``: records the type code and byte order of a pickled dtype."""

    def __init__(self, code, align=False, copy=True):
        self.code = code.decode("latin1") if isinstance(code, bytes) else str(code)
        self.byteorder = "="

    def __setstate__(self, state):
        # numpy pickles dtype state as (version, byteorder, ...).
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "=", "|"):
            self.byteorder = state[1]


# numpy type code -> struct format of one scalar.
_STRUCT_CODES = {
    "f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
    "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?",
}


def _numpy_scalar_standin(dtype, data=None):
    """Allowlisted as ``numpy.core.multiarray.scalar``: raw bytes of a numeric scalar -> Python number."""
    if not isinstance(dtype, _NumpyDtypeStandIn) or dtype.code not in _STRUCT_CODES or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"unsupported numpy scalar of dtype {getattr(dtype, 'code', dtype)!r}")
    order = ">" if dtype.byteorder == ">" else "<" if dtype.byteorder == "<" else "="
    return struct.unpack(order + _STRUCT_CODES[dtype.code], data)[0]


_STAND_INS = [
    (_CfgNodeStandIn, "yacs.config.CfgNode"),
    (_NumpyDtypeStandIn, "numpy.dtype"),
    (_numpy_scalar_standin, "numpy.core.multiarray.scalar"),
    (_numpy_scalar_standin, "numpy._core.multiarray.scalar"),
]


def _stand_in_globals():
    """Context allowlisting the stand-ins (torch >= 2.6: safe_globals with (object, name) pairs)."""
    return torch.serialization.safe_globals(_STAND_INS)


def _to_plain(obj):
    """Mappings (e.g. former CfgNodes) -> dict, recursively; lists/tuples keep their type."""
    if isinstance(obj, Mapping):
        return {key: _to_plain(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_plain(v) for v in obj)
    return obj


def _refusal_reason(exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return f"it references the Python object {match.group(1)}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[0] if lines else type(exc).__name__


# ------------------------------------------------------------------------------------------ loading
def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint dict with ``torch.load(weights_only=True)``; UserError naming the file if absent,
    unreadable or not plain data. A ``config`` entry comes back as a plain dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        with _stand_in_globals():
            # memory-mapped when possible: evaluation reads a checkpoint's shapes before its weights,
            # and a mapped file is parsed again without copying the tensors again
            mmap = map_location == "cpu" and zipfile.is_zipfile(path)
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = _refusal_reason(exc)
        if "Python object" in reason:
            raise UserError(f"{path}: refusing to load: {reason} (only tensors and plain data are read)") from exc
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({reason})") from exc
    except Exception as exc:  # corrupt zip, truncated file, I/O error: all reported against the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first})") from exc
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a checkpoint dict or state dict, found {type(obj).__name__}")
    if isinstance(obj.get("config"), Mapping):
        obj["config"] = _to_plain(obj["config"])
    return obj


def _state_dict_of(ckpt: dict, path: str) -> tuple[dict, bool]:
    """(state dict, came from a container with a 'model'/'state_dict' entry)."""
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), Mapping):
            state, container = ckpt[key], True
            break
    else:
        state, container = ckpt, False
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        keys = sorted(map(str, ckpt))[:8]
        raise UserError(
            f"{path}: no model weights found (expected a 'model' entry holding a state dict, or a bare "
            f"state dict); top-level keys: {keys}"
        )
    return dict(state), container


def _normalise_keys(state: dict) -> tuple[dict, bool, bool, list]:
    """Strip a DDP ``module.`` prefix and map original-release names to ours.

    Returns (state, had DDP prefix, is original format, dropped keys).
    """
    ddp = all(k.startswith(_DDP_PREFIX) for k in state)
    if ddp:
        state = {k[len(_DDP_PREFIX):]: v for k, v in state.items()}
    original = any(k.startswith(("convnet.", "projection_dim.")) for k in state)
    dropped = []
    if original:
        renamed = {}
        for key, value in state.items():
            if key.startswith(_ORIGINAL_DROPPED):
                dropped.append(key)
                continue
            for old, new in _ORIGINAL_RENAMES:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            renamed[key] = value
        state = renamed
    return state, ddp, original, dropped


def _first(keys: list, n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return f"{keys[:n]}{more}"


def load_model_weights(model: torch.nn.Module, path, strict: bool = True, *, checkpoint: dict | None = None) -> dict:
    """Load weights into a :class:`RetrievalModel` from our checkpoints, bare or DDP state dicts, or the
    original AdvBCT release; returns info (format, config, epoch, embed_dim, num_classes, key lists).

    A DDP/DataParallel wrapper is looked through. Classifier weights are dropped when ``model`` has
    none (evaluation models). Shape mismatches, and with ``strict`` missing/unexpected keys, raise a
    UserError naming the checkpoint and the keys. ``checkpoint``: the dict :func:`load_checkpoint` already
    read from ``path`` (then the file is not read again).
    """
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    path = os.fspath(path)
    ckpt = load_checkpoint(path) if checkpoint is None else checkpoint
    state, container = _state_dict_of(ckpt, path)
    state, ddp, original, dropped = _normalise_keys(state)
    num_classes = int(state["classifier.weight"].shape[0]) if "classifier.weight" in state else 0
    if getattr(model, "classifier", None) is None:
        for key in [k for k in state if k.startswith("classifier.")]:
            dropped.append(key)
            del state[key]

    own = model.state_dict()
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise UserError(
            f"{path}: weights do not fit the model: {k} has shape {tuple(state[k].shape)} in the checkpoint "
            f"but {tuple(own[k].shape)} in the model ({len(wrong)} mismatched tensor(s); check the "
            "architecture, embedding size and number of classes)"
        )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    fmt = "original" if original else ("advbct" if container else "state_dict")
    if strict and (missing or unexpected):
        raise UserError(
            f"{path}: checkpoint ({fmt} format) does not match the model: missing {_first(missing)}, "
            f"unexpected {_first(unexpected)}"
        )
    model.load_state_dict(state, strict=False)
    config = ckpt.get("config") if container else None
    embed = state.get("embedding.fc.weight")
    return {
        "format": fmt,
        "ddp_prefix": ddp,
        "embed_dim": int(embed.shape[0]) if embed is not None else None,
        "num_classes": num_classes,
        "config": config if isinstance(config, dict) else None,
        "epoch": ckpt.get("epoch") if container else None,
        "missing": missing,
        "unexpected": unexpected,
        "dropped": dropped,
    }


def checkpoint_embed_dim(path) -> int:
    """Embedding size stored in a checkpoint (``embedding.fc.weight`` / original ``projection_dim.weight``
    rows), to refuse old/new models of different sizes before any feature extraction."""
    path = os.fspath(path)
    state, _ = _state_dict_of(load_checkpoint(path), path)
    state, _, _, _ = _normalise_keys(state)
    weight = state.get("embedding.fc.weight")
    if weight is None or weight.dim() != 2:
        raise UserError(f"{path}: no embedding layer weights found (embedding.fc.weight or projection_dim.weight)")
    return int(weight.shape[0])


def check_finite_weights(model, path, key):
    """Refuse a model whose loaded weights or buffers hold NaN or inf (a diverged training): its features
    would be NaN; one line naming the config ``key``, the file and the first bad tensor."""
    floats = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
    bad = [name for name, t in floats.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(f"{key}: {path} holds NaN or inf in {len(bad)} of {len(floats)} weight tensors "
                        f"(first: {bad[0]}); was it saved after its training diverged?")
