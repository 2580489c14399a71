"""Old/new training allocations of a full train list, with the original release's exact rules.

- by class (extended-class): ``np.random.seed(666)``-shuffled class ids, the first ``int(C * ratio)`` are
  old; old labels are renumbered 0..N_old-1 in increasing original id, and the new list keeps those ids
  for the old classes and numbers the other classes N_old.. in increasing original id.
- by data (extended-data): per class, a legacy ``RandomState(666 + class)`` shuffle of its images and
  the first ``int(n * ratio)`` are old; a class with one image gives it to old; a class with 2-3 images
  gives its first image to old. Labels are unchanged. The new model trains on ALL images (PAPER.md);
  the original code's 70 % complement is written too, for reference.
Lines are written grouped by class in increasing class id, file order within a class, as the original.
"""

import os

import numpy as np

from advbct.data.image_list import read_image_list
from advbct.errors import UserError
from advbct.io import atomic_open

SEED = 666


def split_by_class(labels, ratio=0.3, seed=SEED):
    """Return ``(old_mask over images, old_labels, new_labels)`` (old_labels valid where old_mask)."""
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = int(labels.max()) + 1
    order = np.arange(num_classes)
    np.random.RandomState(seed).shuffle(order)  # == np.random.seed(666); np.random.shuffle (legacy)
    is_old = np.zeros(num_classes, dtype=bool)
    is_old[order[: int(num_classes * ratio)]] = True
    n_old = int(is_old.sum())
    remap = np.empty(num_classes, dtype=np.int64)
    remap[is_old] = np.arange(n_old)
    remap[~is_old] = n_old + np.arange(num_classes - n_old)
    return is_old[labels], remap[labels], remap[labels]


def split_by_data(labels, ratio=0.3, seed=SEED):
    """Return a boolean mask of the images allocated to the old model."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")          # images grouped by class, file order kept
    sorted_labels = labels[order]
    classes, starts, counts = np.unique(sorted_labels, return_index=True, return_counts=True)
    old_sorted = np.zeros(len(labels), dtype=bool)
    old_sorted[starts[counts < 4]] = True             # 1 image: old (and new); 2-3: first image
    # classes with >= 4 images: the original reseeds per class, so this one loop is over classes, not
    # samples; it reproduces the legacy RandomState stream exactly (1.58 M images in a few seconds)
    for cls, start, n in zip(classes[counts >= 4], starts[counts >= 4], counts[counts >= 4]):
        perm = np.arange(n)
        np.random.RandomState(seed + int(cls)).shuffle(perm)
        old_sorted[start + perm[: int(n * ratio)]] = True
    old = np.zeros(len(labels), dtype=bool)
    old[order] = old_sorted
    return old


def _write_list(path, paths, labels):
    with atomic_open(path) as f:  # UTF-8, as read_image_list decodes
        f.write("".join(f"{p} {int(l)}\n" for p, l in zip(paths, labels)))


def make_allocation(list_path, by, ratio=0.3, out_dir=None, dataset="gldv2"):
    """Write the old and new lists for ``by`` in {class, data}; return a summary dict with the paths."""
    if by not in ("class", "data"):
        raise UserError(f"--by must be 'class' or 'data', got '{by}'")
    if not 0.0 < ratio < 1.0:
        raise UserError(f"--ratio must be in (0, 1), got {ratio}")
    paths, labels = read_image_list(list_path)
    if len(labels) == 0:
        raise UserError(f"{list_path}: the list is empty")
    out_dir = out_dir or os.path.dirname(os.path.abspath(list_path))
    os.makedirs(out_dir, exist_ok=True)
    paths = np.asarray(paths, dtype=str)
    order = np.argsort(labels, kind="stable")
    pct = int(ratio * 100)
    if by == "class":
        old_mask, old_labels, new_labels = split_by_class(labels, ratio)
    else:
        old_mask = split_by_data(labels, ratio)
        old_labels = new_labels = labels
    old_idx = order[old_mask[order]]
    files = {"old": os.path.join(out_dir, f"{dataset}_train_old_{pct}percent_{by}.txt"),
             "new": os.path.join(out_dir, f"{dataset}_train_new_100percent_{by}.txt")}
    _write_list(files["old"], paths[old_idx], old_labels[old_idx])
    _write_list(files["new"], paths[order], new_labels[order])
    if by == "data":  # the original release's "new" list: images not given to old (1-image classes in both)
        counts = np.bincount(labels)
        rest = order[(~old_mask | (counts[labels] == 1))[order]]
        files["rest"] = os.path.join(out_dir, f"{dataset}_train_new_{100 - pct}percent_data.txt")
        _write_list(files["rest"], paths[rest], labels[rest])
    return {"by": by, "ratio": ratio, "files": files,
            "old_images": int(len(old_idx)), "old_classes": int(len(np.unique(old_labels[old_idx]))),
            "new_images": int(len(labels)), "new_classes": int(len(np.unique(labels)))}
