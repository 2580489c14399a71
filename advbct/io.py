"""Atomic file writes: every output of the package (configs, checkpoints, class meta, split lists, results,
tables, feature caches, figures, benchmark reports) is written through here.

The data goes to a fresh temporary file in the destination's folder (so the same file system), is
fsynced, then ``os.replace``-d onto the destination, and the folder is fsynced so that the rename
survives a crash. A reader sees the old file or the complete new one, never part of one. When the
writer raises (or the process is interrupted), the temporary file is removed and the destination is
left as it was.

Imports nothing from the rest of the package, so that every layer may use it.
"""

import contextlib
import json
import os
import re
import secrets

__all__ = ["atomic_open", "atomic_path", "write_json_atomic", "write_text_atomic"]


def _fsync_file(path):
    # a read-only handle is enough for fsync on POSIX; Windows needs one that may write
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")  # what _create_temp names


def is_temporary(name):
    """Whether the file name ``name`` is one of this module's temporaries (left behind by a killed writer)."""
    return bool(_TEMPORARY.match(name))


def _create_temp(directory, name):
    """Create an empty, new temporary file for ``name`` in ``directory``; its path.

    Hidden and ending in ``.tmp``, so that no ``*.json`` / ``*.pth`` listing of the folder picks it
    up; unique per call (process id and a random token), so that concurrent writers never share one.
    Created with mode 0666 less the umask, like a file opened with ``open(path, "w")``.
    """
    while True:
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


@contextlib.contextmanager
def atomic_path(path, *, fsync=True, makedirs=True):
    """Context manager yielding a temporary path that becomes ``path`` when the block ends normally.

    Write the file at the yielded path (by name, or by opening it; any checks on the written file
    may run inside the block too). On a normal exit the file is fsynced (``fsync``), moved onto
    ``path`` with ``os.replace`` and the folder fsynced. On any exception the temporary file is
    removed, ``path`` is untouched, and the exception propagates. ``makedirs`` creates the parent
    folder first.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if makedirs:
        os.makedirs(directory, exist_ok=True)
    tmp = _create_temp(directory, os.path.basename(path))
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if fsync:
        _fsync_dir(directory)


@contextlib.contextmanager
def atomic_open(path, mode="w", *, encoding="utf-8", errors=None, fsync=True, makedirs=True):
    """Context manager yielding a file opened for writing (``mode`` ``"w"`` text, ``"wb"`` bytes) whose
    content replaces ``path`` atomically when the block ends normally (see :func:`atomic_path`).

    Text is written with ``encoding`` and ``errors`` as :func:`open` takes them (newlines as ``"w"`` gives).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    text = {} if mode == "wb" else {"encoding": encoding, "errors": errors}
    with atomic_path(path, fsync=fsync, makedirs=makedirs) as tmp:
        with open(tmp, mode, **text) as handle:
            yield handle


def write_text_atomic(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path) as handle:
        handle.write(text)


def write_json_atomic(path, obj):
    """Write ``obj`` as JSON indented by 1, non-ASCII kept (UTF-8), with a final newline, atomically."""
    with atomic_open(path) as handle:
        json.dump(obj, handle, indent=1, ensure_ascii=False)
        handle.write("\n")
