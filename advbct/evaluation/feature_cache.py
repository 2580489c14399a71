"""On-disk cache of the old model's test-set features (``EVAL.OLD_FEATURES_CACHE``).

The old gallery is fixed: in deployment its embeddings already exist, and in a table block every new
model is tested against the same old model. Embedding it once per test set instead of once per new
model saves the old model's share of every later test (on GLDv2 its 761k index images). An entry is
keyed by the old checkpoint's *content*, the image lists and every setting that changes a feature, so a
retrained old model or another image size never reuses a stale entry.
"""

import hashlib
import os
import zipfile
import zlib

import numpy as np

from advbct.errors import UserError, one_line
from advbct.io import atomic_open

_CHUNK = 1 << 20


def _file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(weights_path, arch, test_set, img_size, crop_query, amp, decode="pil"):
    """sha256 over the old checkpoint's bytes, its arch, the test set's images and the eval settings
    (the decoding mode changes the pixels; 'pil' adds nothing, so entries of before it stay valid)."""
    h = hashlib.sha256()
    boxes = test_set.query_boxes if (crop_query and test_set.is_revisited) else None
    parts = [_file_digest(weights_path), arch, test_set.name, repr(img_size), repr(bool(amp)),
             repr(None if boxes is None else np.asarray(boxes).tolist())]
    if decode != "pil":
        parts.append(f"decode={decode}")
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    for paths in (test_set.query_paths, test_set.gallery_paths):
        h.update("\n".join(os.path.abspath(p) for p in paths).encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_path(directory, dataset, key):
    return os.path.join(directory, f"{dataset}-{key[:16]}.npz")


# what reading a damaged entry raises: a cut or overwritten .npz is no zip (BadZipFile), a cut member
# ends early (EOFError, ValueError), a compressed one fails to inflate (zlib.error)
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def load(directory, dataset, key):
    """``(query, gallery)`` float32 arrays of a matching entry, else None (missing, stale or unreadable:
    a warning, and the caller embeds again and rewrites the entry)."""
    path = cache_path(directory, dataset, key)
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return np.asarray(z["query"], np.float32), np.asarray(z["gallery"], np.float32)
    except _UNREADABLE as exc:
        print(f"warning: EVAL.OLD_FEATURES_CACHE entry {path} is unreadable ({one_line(str(exc))}); "
              f"re-embedding with the old model and rewriting it")
        return None


def check_directory(directory):
    """Fail before any embedding when DIRECTORY cannot hold cache entries (a file, or not writable)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError(f"EVAL.OLD_FEATURES_CACHE: {directory} is a file, expected a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise UserError(f"EVAL.OLD_FEATURES_CACHE: cannot create {directory} ({one_line(str(exc))})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"EVAL.OLD_FEATURES_CACHE: {directory} is not writable")


def save(directory, dataset, key, query, gallery):
    """Write an entry atomically; the path written."""
    path = cache_path(directory, dataset, key)
    with atomic_open(path, "wb") as f:
        np.savez(f, key=np.array(key), query=np.asarray(query, np.float32), gallery=np.asarray(gallery, np.float32))
    return path
