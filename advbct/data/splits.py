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


def _class_order(num_classes, seed=SEED):
    """The release's seeded class order: the first int(C * ratio) classes are the old ones."""
    order = np.arange(num_classes)
    np.random.RandomState(seed).shuffle(order)  # == np.random.seed(666); np.random.shuffle (legacy)
    return order


def split_by_class(labels, ratio=0.3, seed=SEED):
    """Return ``(old_mask over images, old_labels, new_labels)`` (old_labels valid where old_mask)."""
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = int(labels.max()) + 1
    order = _class_order(num_classes, seed)
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


def _check_by(by):
    if by not in ("class", "data"):
        raise UserError(f"--by must be 'class' or 'data', got '{by}'")


def _read_full_list(list_path, out_dir):
    """The full train list's ``(paths, labels)`` as arrays (an empty list refused) and the output folder
    (default: the list's own), created."""
    paths, labels = read_image_list(list_path)
    if len(labels) == 0:
        raise UserError(f"{list_path}: the list is empty")
    out_dir = out_dir or os.path.dirname(os.path.abspath(list_path))
    os.makedirs(out_dir, exist_ok=True)
    return np.asarray(paths, dtype=str), np.asarray(labels, dtype=np.int64), out_dir


def make_allocation(list_path, by, ratio=0.3, out_dir=None, dataset="gldv2"):
    """Write the old and new lists for ``by`` in {class, data}; return a summary dict with the paths."""
    _check_by(by)
    if not 0.0 < ratio < 1.0:
        raise UserError(f"--ratio must be in (0, 1), got {ratio}")
    paths, labels, out_dir = _read_full_list(list_path, out_dir)
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


def _class_generations(labels, ratios, seed=SEED):
    """Per class, the first generation (0-based) that trains on it: the seeded class order of
    :func:`split_by_class`, its first ``int(C * ratio_k)`` classes in generation k (nested prefixes)."""
    num_classes = int(labels.max()) + 1
    order = _class_order(num_classes, seed)
    first = np.full(num_classes, len(ratios) - 1, dtype=np.int64)
    for k in reversed(range(len(ratios))):
        first[order[: int(num_classes * ratios[k])]] = k
    return first


def chain_labels(labels, ratios, seed=SEED):
    """Class allocation of a chain of generations: ``(generation of each image, chain label of each image)``.

    Classes are numbered by (the generation that first trains on them, original id), so every generation's
    classes are labels 0..N_k-1 and its predecessor's classes keep their labels: the old classes of
    generation k are exactly ``label < N_(k-1)``, which the compatibility losses rely on. For two
    generations (ratios [r, 1]) this is :func:`split_by_class`'s numbering."""
    labels = np.asarray(labels, dtype=np.int64)
    first = _class_generations(labels, ratios, seed)
    classes = np.lexsort((np.arange(len(first)), first))  # by generation, then original id
    renumber = np.empty(len(first), dtype=np.int64)
    renumber[classes] = np.arange(len(first))
    return first[labels], renumber[labels]


def data_generations(labels, ratios, seed=SEED):
    """Data allocation of a chain: the generation (0-based) that first trains on each image. Generation k
    holds the images :func:`split_by_data` gives the old model at ``ratios[k]`` (the same per-class seeded
    order, so the sets are nested; a class of 1-3 images has its first image in every generation), every
    image at ratio 1."""
    labels = np.asarray(labels, dtype=np.int64)
    first = np.full(len(labels), len(ratios) - 1, dtype=np.int64)
    for k in reversed(range(len(ratios))):
        if ratios[k] < 1.0:
            first[split_by_data(labels, ratios[k], seed)] = k
        else:
            first[:] = k
    return first


def check_chain_ratios(ratios, what=None):
    """The chain's training shares: at least two, increasing, in (0, 1]; ``what`` names them in the one-line
    error (default ``--chain <shares>``)."""
    ratios = [float(r) for r in ratios]
    what = what or f"--chain {','.join(f'{r:g}' for r in ratios)}"
    if len(ratios) < 2:
        raise UserError(f"{what}: a chain needs at least two generations (an old model and a new one), "
                        f"got {len(ratios)}")
    if any(not 0.0 < r <= 1.0 for r in ratios) or any(b <= a for a, b in zip(ratios, ratios[1:])):
        raise UserError(f"{what}: expected increasing shares in (0, 1], e.g. 0.3,0.6,1.0")
    return ratios


def chain_list_name(ratios, by, dataset="gldv2"):
    """File name of the train list of the last generation of ``ratios``: ``<dataset>_train_chain_30-60_class.txt``
    (the numbering of a class list depends on every earlier generation, so the name carries them all)."""
    return f"{dataset}_train_chain_{'-'.join(str(round(100 * r)) for r in ratios)}_{by}.txt"


def make_chain_allocation(list_path, by, ratios, out_dir=None, dataset="gldv2"):
    """Write one train list per generation of a chain (``ratios``: each generation's share of the classes or
    of every class's images, increasing); return a summary with the paths, oldest first."""
    _check_by(by)
    ratios = check_chain_ratios(ratios)
    paths, labels, out_dir = _read_full_list(list_path, out_dir)
    if by == "class":
        generation, chain = chain_labels(labels, ratios)
    else:
        generation, chain = data_generations(labels, ratios), labels
    order = np.argsort(labels, kind="stable")  # grouped by class in increasing original id, as make_allocation
    files, summary = [], []
    for k in range(len(ratios)):  # nested: only the first generation can be empty, before anything is written
        idx = order[generation[order] <= k]
        if len(idx) == 0:
            raise UserError(f"--chain: generation {k + 1} (share {ratios[k]}) gets no image of {list_path}")
        path = os.path.join(out_dir, chain_list_name(ratios[: k + 1], by, dataset))
        _write_list(path, paths[idx], chain[idx])
        files.append(path)
        summary.append({"ratio": ratios[k], "images": int(len(idx)), "classes": int(len(np.unique(chain[idx]))),
                        "list": path})
    return {"by": by, "ratios": ratios, "files": files, "generations": summary}
