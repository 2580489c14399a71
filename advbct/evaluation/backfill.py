"""Which gallery rows partial backfilling re-embeds with the new model, and the mixed gallery itself.

Two units (EVAL.BACKFILL_UNIT):

* ``image`` (ours, the default): one seeded numpy permutation of the gallery images, the first
  ``round(ratio * n)`` refreshed, so the refreshed sets are nested as the ratio grows.
* ``batch`` (the original release): the gallery is cut, in gallery order, into batches of
  EVAL.BACKFILL_BATCH images (the last one partial), and ``int(ratio * n_batches)`` whole batches are
  drawn as ``random.seed(seed); random.sample(range(n_batches), k)`` draws them, afresh for each ratio.

EVAL.BACKFILL_SEED -1 stands for the unit's default seed: 0 for image, 100 for batch (the release's).
"""

import random

import numpy as np

from advbct.errors import UserError

UNITS = ("image", "batch")
DEFAULT_SEEDS = {"image": 0, "batch": 100}


def _is_whole(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_ratio(ratio):
    """One refresh ratio: a number in [0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.number)) or not 0.0 <= ratio <= 1.0:
        raise UserError(f"EVAL.BACKFILL_RATIOS: ratio {ratio} is outside [0, 1]")


def check_settings(unit="image", batch=16, seed=-1, ratios=()):
    """Raise a one-line UserError naming the first bad EVAL.BACKFILL_* setting."""
    if unit not in UNITS:
        raise UserError(f"EVAL.BACKFILL_UNIT {unit!r}: expected image or batch")
    if not _is_whole(batch) or batch < 1:
        raise UserError(f"EVAL.BACKFILL_BATCH {batch!r}: expected a whole number of images >= 1")
    if not _is_whole(seed) or seed < -1:
        raise UserError(f"EVAL.BACKFILL_SEED {seed!r}: expected -1 (the unit's default: 0 for image, 100 for "
                        f"batch) or a seed >= 0")
    for ratio in ratios:
        check_ratio(ratio)


def check_config(cfg):
    """The EVAL.BACKFILL_* keys of ``cfg`` when EVAL.BACKFILL asks for the curve; called before any
    image is embedded, so that a typo costs seconds, not an extraction."""
    e = cfg.EVAL
    if e.BACKFILL:
        check_settings(e.BACKFILL_UNIT, e.BACKFILL_BATCH, e.BACKFILL_SEED, e.BACKFILL_RATIOS)


def resolve_seed(unit, seed):
    """The seed actually used: ``seed`` itself, or the unit's default for -1."""
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


def refreshed_indices(n, ratio, unit="image", batch=16, seed=-1):
    """Sorted int64 indices of the gallery rows re-embedded by the new model at ``ratio``."""
    check_settings(unit, batch, seed, [ratio])
    seed = resolve_seed(unit, seed)
    rows = _image_rows(n, ratio, seed) if unit == "image" else _batch_rows(n, ratio, batch, seed)
    return np.sort(rows).astype(np.int64)


def backfill_gallery(new_gallery, old_gallery, ratio, seed=-1, unit="image", batch=16):
    """The old gallery with the rows of :func:`refreshed_indices` taken from the new gallery; ratio 0 is the
    old gallery, ratio 1 the new one."""
    rows = refreshed_indices(old_gallery.shape[0], ratio, unit, batch, seed)
    mixed = np.array(old_gallery, dtype=np.float32, copy=True)
    mixed[rows] = np.asarray(new_gallery, dtype=np.float32)[rows]
    return mixed


def describe(unit, batch, seed):
    """The fields results.json records next to a curve, so that it is never read as the other unit's."""
    out = {"unit": unit, "seed": resolve_seed(unit, seed)}
    if unit == "batch":
        out["batch"] = int(batch)
    return out
