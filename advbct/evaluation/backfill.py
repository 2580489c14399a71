"""Which gallery rows partial backfilling re-embeds with the new model, the mixed gallery itself, and the
area under a backfilling curve.

Three units (EVAL.BACKFILL_UNIT; EVAL.BACKFILL_UNITS computes several side by side):

* ``image`` (ours, the default): one seeded numpy permutation of the gallery images, the first
  ``round(ratio * n)`` refreshed, so the refreshed sets are nested as the ratio grows.
* ``batch`` (the original release): the gallery is cut, in gallery order, into batches of
  EVAL.BACKFILL_BATCH images (the last one partial), and ``int(ratio * n_batches)`` whole batches are
  drawn as ``random.seed(seed); random.sample(range(n_batches), k)`` draws them, afresh for each ratio.
* ``most_changed``: the images whose embedding moved most first: decreasing L2 distance between the
  L2-normalised old and new embedding of each gallery image (ties by gallery index), the first
  ``round(ratio * n)`` refreshed (nested). It needs both galleries; no seed.

EVAL.BACKFILL_SEED -1 stands for the unit's default seed: 0 for image, 100 for batch (the release's).
"""

import random

import numpy as np

from advbct.errors import UserError

UNITS = ("image", "batch", "most_changed")
DEFAULT_SEEDS = {"image": 0, "batch": 100}
CHUNK = 65536  # gallery rows per block when measuring how far each embedding moved


def _expected_units():
    return f"expected {', '.join(UNITS[:-1])} or {UNITS[-1]}"


def _is_whole(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_ratio(ratio):
    """One refresh ratio: a number in [0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.number)) or not 0.0 <= ratio <= 1.0:
        raise UserError(f"EVAL.BACKFILL_RATIOS: ratio {ratio} is outside [0, 1]")


def check_settings(unit="image", batch=16, seed=-1, ratios=()):
    """Raise a one-line UserError naming the first bad EVAL.BACKFILL_* setting."""
    if unit not in UNITS:
        raise UserError(f"EVAL.BACKFILL_UNIT {unit!r}: {_expected_units()}")
    if not _is_whole(batch) or batch < 1:
        raise UserError(f"EVAL.BACKFILL_BATCH {batch!r}: expected a whole number of images >= 1")
    if not _is_whole(seed) or seed < -1:
        raise UserError(f"EVAL.BACKFILL_SEED {seed!r}: expected -1 (the unit's default: 0 for image, 100 for "
                        f"batch) or a seed >= 0")
    for ratio in ratios:
        check_ratio(ratio)


def check_units(units):
    """EVAL.BACKFILL_UNITS: known units, each named once."""
    seen = set()
    for unit in units:
        if not isinstance(unit, str) or unit not in UNITS:
            raise UserError(f"EVAL.BACKFILL_UNITS {unit!r}: {_expected_units()}")
        if unit in seen:
            raise UserError(f"EVAL.BACKFILL_UNITS: {unit!r} is named twice (each unit's curve is computed once)")
        seen.add(unit)


def check_config(cfg):
    """The EVAL.BACKFILL_* keys of ``cfg`` when EVAL.BACKFILL asks for the curve; called before any
    image is embedded, so that a typo costs seconds, not an extraction."""
    e = cfg.EVAL
    if e.BACKFILL:
        check_settings(e.BACKFILL_UNIT, e.BACKFILL_BATCH, e.BACKFILL_SEED, e.BACKFILL_RATIOS)
        check_units(e.BACKFILL_UNITS)


def resolve_seed(unit, seed):
    """The seed actually used: ``seed`` itself, or the unit's default for -1; None for most_changed."""
    if unit not in DEFAULT_SEEDS:
        return None
    return DEFAULT_SEEDS[unit] if seed == -1 else int(seed)


def _image_rows(n, ratio, seed):
    order = np.random.default_rng(seed).permutation(n)
    return order[: int(round(ratio * n))]


def _batch_rows(n, ratio, batch, seed):
    n_batches = -(-n // batch)  # ceil: the last batch may be partial
    # int(), not round(): the release truncates (0.5 of 7 batches is 3). A private Random leaves the
    # global stream alone and draws what random.seed(seed) + random.sample would.
    chosen = random.Random(seed).sample(range(n_batches), int(float(ratio) * n_batches))
    picked = np.zeros(n_batches, dtype=bool)
    picked[chosen] = True
    return np.flatnonzero(np.repeat(picked, batch)[:n])


def change_order(old_gallery, new_gallery):
    """Gallery rows by decreasing L2 distance between their L2-normalised old and new embeddings; equal
    distances keep gallery order (a stable sort), so the order never depends on the sort's internals."""
    from advbct.evaluation.search import l2_normalize  # numpy only; keeps this module import-light

    old, new = np.asarray(old_gallery), np.asarray(new_gallery)
    if old.ndim != 2 or old.shape != new.shape:
        raise ValueError(f"old gallery {old.shape} and new gallery {new.shape} must be 2-D of one shape")
    distance = np.empty(old.shape[0], dtype=np.float64)
    for start in range(0, old.shape[0], CHUNK):  # row blocks: no full normalised copy of a large gallery
        diff = (l2_normalize(old[start:start + CHUNK]) - l2_normalize(new[start:start + CHUNK])).astype(np.float64)
        distance[start:start + CHUNK] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return np.argsort(-distance, kind="stable")


def _most_changed_rows(n, ratio, galleries, order):
    if order is None:
        if galleries is None:
            raise ValueError("unit most_changed needs galleries=(old_gallery, new_gallery) or their change_order")
        order = change_order(*galleries)
    if order.shape[0] != n:
        raise ValueError(f"galleries have {order.shape[0]} rows, expected {n}")
    return order[: int(round(ratio * n))]


def refreshed_indices(n, ratio, unit="image", batch=16, seed=-1, galleries=None, order=None):
    """Sorted int64 indices of the gallery rows re-embedded by the new model at ``ratio``.

    ``galleries``: ``(old_gallery, new_gallery)``, or ``order``: their :func:`change_order` computed once for
    every ratio of a curve; needed by (and only read for) unit most_changed."""
    check_settings(unit, batch, seed, [ratio])
    seed = resolve_seed(unit, seed)
    if unit == "image":
        rows = _image_rows(n, ratio, seed)
    elif unit == "batch":
        rows = _batch_rows(n, ratio, batch, seed)
    else:
        rows = _most_changed_rows(n, ratio, galleries, order)
    return np.sort(rows).astype(np.int64)


def backfill_gallery(new_gallery, old_gallery, ratio, seed=-1, unit="image", batch=16, order=None):
    """The old gallery with the rows of :func:`refreshed_indices` taken from the new gallery; ratio 0 is the
    old gallery, ratio 1 the new one. ``order``: unit most_changed's :func:`change_order` of these galleries,
    when the caller computed it already."""
    rows = refreshed_indices(old_gallery.shape[0], ratio, unit, batch, seed, order=order,
                             galleries=(old_gallery, new_gallery) if unit == "most_changed" else None)
    mixed = np.array(old_gallery, dtype=np.float32, copy=True)
    mixed[rows] = np.asarray(new_gallery, dtype=np.float32)[rows]
    return mixed


def describe(unit, batch, seed):
    """The fields results.json records next to a curve, so that it is never read as the other unit's:
    the unit, its seed (image, batch) and its batch size (batch)."""
    out = {"unit": unit}
    if unit in DEFAULT_SEEDS:
        out["seed"] = resolve_seed(unit, seed)
    if unit == "batch":
        out["batch"] = int(batch)
    return out


def area_under_curve(ratios, values):
    """Area under a backfilling curve divided by the span of its ratios, in the metric's own units (a
    percentage): the trapezoid rule over the points sorted by ratio, / (max ratio - min ratio). Over ratios
    0..1 it is the plain area, i.e. the metric averaged over refresh shares; one ratio (or all equal): the
    mean of its values."""
    r = np.asarray(ratios, dtype=np.float64).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if r.size == 0 or r.size != v.size:
        raise ValueError(f"area_under_curve needs as many values as ratios (>= 1), got {r.size} and {v.size}")
    order = np.argsort(r, kind="stable")
    r, v = r[order], v[order]
    span = r[-1] - r[0]
    if span == 0:
        return float(v.mean())
    return float(np.sum((v[1:] + v[:-1]) / 2.0 * np.diff(r)) / span)
