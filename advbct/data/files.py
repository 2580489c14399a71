"""Existence checks of many image files at once: one directory listing per folder instead of one stat per file.

GLDv2's 761,757 index images sit in 4,096 folders (``index/a/b/c/``); on a network filesystem a stat per
image takes minutes, a listing per folder (several in flight) seconds.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

LISTING_THREADS = 16  # folders listed concurrently (network filesystems answer several requests at once)


def _files_in(folder):
    """Names of the regular files (or links to them) in ``folder``; empty when it is missing or unreadable."""
    try:
        with os.scandir(folder or ".") as entries:
            return {e.name for e in entries if e.is_file()}
    except OSError:
        return set()


def missing_files(paths):
    """Boolean mask of the entries of ``paths`` that are not existing files, in order."""
    paths = [os.fspath(p) for p in paths]
    folders = {}
    for path in paths:
        folders.setdefault(os.path.dirname(path), None)
    with ThreadPoolExecutor(min(LISTING_THREADS, max(1, len(folders)))) as pool:
        for folder, names in zip(folders, pool.map(_files_in, folders)):
            folders[folder] = names
    return np.fromiter((os.path.basename(p) not in folders[os.path.dirname(p)] for p in paths),
                       dtype=bool, count=len(paths))
