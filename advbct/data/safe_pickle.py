"""Unpickling of ground-truth files (``gnd_*.pkl``) that cannot run code.

A pickle may name any importable callable (``os.system`` ...) and have it called while loading. A gnd
file only needs builtin containers (handled by pickle opcodes, no globals) and, when it was written with
numpy arrays, numpy's array/dtype/scalar reconstructors. Everything else is refused before it is looked
up, so nothing is imported or executed.
"""

import importlib
import pickle

from advbct.errors import UserError

# (module, name) pairs a gnd file may reference. numpy >= 2 writes ``numpy._core``, older numpy
# ``numpy.core``; both spellings resolve to the same object. ``_frombuffer`` is what numpy uses for
# arrays pickled with protocol 5; ``_codecs.encode`` is how protocols 0-2 store an array's raw bytes
# (it only converts a str to bytes with a codec from the ``encodings`` package), and protocol 2 writes an
# empty bytes object as a call of ``bytes`` (``__builtin__`` is its Python 2 spelling).
_NUMPY_CORE_NAMES = {
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),
}
ALLOWED_GLOBALS = frozenset(
    {(f"numpy.{core}.{sub}", name) for core in ("core", "_core") for sub, name in _NUMPY_CORE_NAMES}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    | {("builtins", "bytes"), ("__builtin__", "bytes")}
)


def _resolve(module, name):
    """Import an allowed global, preferring ``numpy._core`` (``numpy.core`` is a deprecated alias)."""
    if module.startswith("numpy.core.") or module.startswith("numpy._core."):
        tail = module.split(".", 2)[2]
        for prefix in ("numpy._core.", "numpy.core."):
            try:
                return getattr(importlib.import_module(prefix + tail), name)
            except (ImportError, AttributeError):
                continue
        raise ImportError(f"{module}.{name}")
    return getattr(importlib.import_module("builtins" if module == "__builtin__" else module), name)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` admits only :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file, source):
        super().__init__(file)
        self._source = source

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UserError(
                f"{self._source}: refused to unpickle global '{module}.{name}' "
                "(a ground-truth file may only contain lists, dicts, numbers, strings and numpy arrays)"
            )
        return _resolve(module, name)


def safe_load_pickle(path):
    """Load the pickle at ``path`` allowing only builtin containers and numpy arrays; else UserError."""
    path = str(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (see Dataset.md)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot open ({exc.strerror})") from None
    with handle:
        try:
            return _RestrictedUnpickler(handle, path).load()
        except UserError:
            raise
        except Exception as exc:  # truncated/corrupt data: any unpickling error is the file's fault
            raise UserError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
