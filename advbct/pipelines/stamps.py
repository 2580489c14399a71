"""Data-provenance stamps: each output folder of a pipeline keyed on the data it is built from.

The first run writes SOURCE's sha256 to ``DIR/BENCHMARK.sha256`` (``<sha256>  <SOURCE>``); a later run whose
SOURCE (a synthetic benchmark's SYNTHETIC.json, the real GLDv2 train list) has changed stops in one line
instead of silently reusing models trained on the other data. Every folder is checked before any is
stamped, so a refused run writes nothing. A folder that already holds outputs but no stamp (made before
stamps existed) is adopted, with a note.
"""

from __future__ import annotations

import hashlib
import os
import re

from advbct.errors import UserError
from advbct.io import write_text_atomic

STAMP = "BENCHMARK.sha256"

__all__ = ["STAMP", "file_sha256", "read_stamp", "stamp_outputs"]


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_stamp(path: str) -> str:
    """The digest a stamp file records: the first word of its first line ('' for an empty file)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        line = f.readline().rstrip("\n")
    words = re.split(r"[ \t]+", line.strip(" \t"))
    return words[0]


def stamp_outputs(source: str, dirs) -> None:
    """Key each folder of ``dirs`` on the file ``source`` (see the module's docstring); a folder stamped
    from another content of ``source``, or a missing ``source``, is a :class:`UserError` raised before any
    folder is written."""
    if not os.path.isfile(source):
        raise UserError(f"{source} not found: cannot key the outputs on it")
    digest = file_sha256(source)
    for folder in dirs:
        stamp = f"{folder}/{STAMP}"
        if not os.path.isfile(stamp):
            continue
        have = read_stamp(stamp)
        if have != digest:
            raise UserError(f"{folder} was built from another {source} (sha256 {have[:12]}..., now "
                            f"{digest[:12]}...): move {folder} away to rebuild it, or restore that data")
    for folder in dirs:
        stamp = f"{folder}/{STAMP}"
        if os.path.isfile(stamp):
            continue
        # (a fresh block's first step has already written its log under DIR/logs: that is not an output)
        if os.path.isdir(folder) and any(name != "logs" for name in os.listdir(folder)):
            print(f"[note] {folder} has no {STAMP}: keying it on the current {source}", flush=True)
        write_text_atomic(stamp, f"{digest}  {source}\n")  # (creates the folder)
