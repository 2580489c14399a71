"""The compatibility protocol: self-test, cross-test and the partial-backfilling curve.

self-test: queries and gallery embedded by the same model; cross-test: queries by the new model,
gallery by the old one (PAPER.md "Protocol"). Metrics: revisited Easy/Medium/Hard mAP and mP@k for
ROxford5k/RParis6k, mAP@100 for GLDv2.
"""

import copy

import numpy as np
import torch

from advbct import distributed as dist
from advbct.data.decoding import image_input
from advbct.data.image_list import ImageListDataset
from advbct.data.workers import resolve_num_workers
from advbct.errors import UserError, one_line
from advbct.evaluation import backfill, feature_cache, test_sets
from advbct.evaluation.backfill import backfill_gallery  # also importable from here, as before
from advbct.evaluation.features import extract_features
from advbct.evaluation.metrics import negative_flip_rate
from advbct.evaluation.test_sets import TestSet  # noqa: F401  (also importable from here, as before)
from advbct.evaluation.test_sets import headline_value  # Medium mAP (revisited) or mAP@100 (GLDv2)
from advbct.models.basis_transform import to_new_space
from advbct.models.loading import check_same_embedding
from advbct.models.transformation import map_features


def _read_test_set(name, root, gldv2_split, check_images):
    return test_sets.get(name).read(root, gldv2_split, check_images)


def load_test_set(name, root, gldv2_split="private", check_images=True):
    """Read a test set in its real format (see Dataset.md); ``check_images=False`` reads ground truth only.

    With several ranks, rank 0 reads and checks first (the existence of every image: 762k on GLDv2), its
    error raised on every rank; the others then read the ground truth without checking again.
    """
    checked = {}

    def read_on_main():
        checked["set"] = _read_test_set(name, root, gldv2_split, check_images)

    dist.run_on_main(read_on_main)
    return checked.get("set") or _read_test_set(name, root, gldv2_split, check_images=False)


def image_datasets(test_set, images, crop_query=False):
    """Query and gallery datasets read by the :class:`~advbct.data.decoding.ImageInput` ``images``; queries
    cropped to their bbx only when ``crop_query``."""
    boxes = test_set.query_boxes if (crop_query and test_set.is_revisited) else None
    return (ImageListDataset(test_set.query_paths, image_input=images, boxes=boxes),
            ImageListDataset(test_set.gallery_paths, image_input=images))


def check_features(test_set, query, gallery, source="features"):
    """Row counts, matching dimensions and finiteness, before any search."""
    nq, ng = len(test_set.query_paths), len(test_set.gallery_paths)
    for what, arr, n in (("query", query, nq), ("gallery", gallery, ng)):
        if arr.ndim != 2:
            raise UserError(f"{source}: {what} features must be 2-D (rows x dims), got shape {tuple(arr.shape)}")
        if arr.shape[0] != n:
            raise UserError(f"{source}: {what} features have {arr.shape[0]} rows but {test_set.name} has "
                            f"{n} {what} images (rows must follow the dataset's {what} order)")
        if not np.isfinite(arr).all():
            raise UserError(f"{source}: {what} features contain NaN or inf")
    if query.shape[1] != gallery.shape[1]:
        raise UserError(f"{source}: query features are {query.shape[1]}-d but gallery features "
                        f"{gallery.shape[1]}-d")


def check_model_features(test_set, query, gallery, role, weights=""):
    """:func:`check_features` on what one model embedded, the message naming that model: its ``role``
    ('new' or 'old') and the checkpoint its config key gave."""
    key = f"{role.upper()}_MODEL.WEIGHTS"
    check_features(test_set, query, gallery,
                   source=f"the {role} model ({key} {weights})" if weights else f"the {role} model")


def score(test_set, query, gallery):
    """Metrics of one query/gallery feature pair, in percent."""
    query, gallery = _numpy(query), _numpy(gallery)
    check_features(test_set, query, gallery)
    return test_set.kind.score(query, gallery, test_set.ground_truth)


def top1_hits(test_set, query, gallery):
    """``(hit, counted)`` of one query/gallery pair by the test set's metric (``Metric.top1``); None when the
    metric declares no top-1 rule."""
    top1 = test_set.kind.metric.top1
    if top1 is None:
        return None
    query, gallery = _numpy(query), _numpy(gallery)
    check_features(test_set, query, gallery)
    return top1(query, gallery, test_set.ground_truth)


def _flip_rate(test_set, reference, query, gallery):
    """Negative-flip rate (percent) of ``query`` vs ``gallery`` against the old/old ``reference`` hits."""
    old_hit, counted = reference
    new_hit, _ = top1_hits(test_set, query, gallery)
    return negative_flip_rate(old_hit, new_hit, counted)


def _curve(test_set, new_query, new_gallery, old_gallery, ratios, seed, unit, batch, reference):
    """One backfilling curve; ``reference``: the old/old ``(hit, counted)`` or None (no negative flips)."""
    backfill.check_settings(unit, batch, seed, ratios)
    kind = test_set.kind
    values, flips = [], []
    # most_changed refreshes a prefix of one order: sort the gallery once, not once per ratio
    order = backfill.change_order(old_gallery, new_gallery) if unit == "most_changed" else None
    for r in ratios:  # one mixed gallery per ratio, searched for the metric and, with a reference, the top-1
        mixed = backfill_gallery(new_gallery, old_gallery, r, seed, unit, batch, order=order)
        values.append(kind.headline(score(test_set, new_query, mixed)))
        if reference is not None:
            flips.append(_flip_rate(test_set, reference, new_query, mixed))
    curve = {"ratios": [float(r) for r in ratios], "values": values, "metric": kind.metric.name,
             **backfill.describe(unit, batch, seed)}
    if len(values):
        curve["auc"] = backfill.area_under_curve(curve["ratios"], values)
    if reference is not None:
        curve["negative_flip"] = flips
    return curve


def backfill_curve(test_set, new_query, new_gallery, old_gallery, ratios, seed=-1, unit="image", batch=16,
                   old_self=None):
    """Headline metric per refresh ratio (queries always by the new model), with the unit, batch and seed
    that chose the refreshed rows (see advbct/evaluation/backfill.py) and ``auc``, the area under the curve
    over the ratio span (:func:`advbct.evaluation.backfill.area_under_curve`, in the metric's units).

    ``old_gallery`` is the gallery the new rows are mixed into (the cross test's). With ``old_self``, the old
    model's ``(query, gallery)`` features, the curve also holds ``negative_flip``: per ratio, the percent of
    queries whose old/old top-1 is a positive and whose top-1 in the mixed gallery is not (the set's metric
    decides positives and counted queries, ``Metric.top1``)."""
    backfill.check_settings(unit, batch, seed, ratios)
    reference = None if old_self is None else top1_hits(test_set, *old_self)
    return _curve(test_set, new_query, new_gallery, old_gallery, ratios, seed, unit, batch, reference)


def _backfill_results(test_set, e, new_q, new_g, old_q, old_g, cross_g):
    """The result entries of EVAL.BACKFILL: ``backfill`` (the curve of EVAL.BACKFILL_UNIT), ``backfill_units``
    (``{unit: curve}`` of EVAL.BACKFILL_UNITS, when it names any) and ``negative_flip`` (``{"cross_test": x,
    "self_test": y}``: percent of queries whose old/old top-1 positive is lost by new/old and by new/new)."""
    reference = top1_hits(test_set, old_q, old_g)  # old/old, shared by every curve
    curves = {}
    for unit in (e.BACKFILL_UNIT, *e.BACKFILL_UNITS):
        if unit not in curves:
            curves[unit] = _curve(test_set, new_q, new_g, cross_g, e.BACKFILL_RATIOS, e.BACKFILL_SEED, unit,
                                  e.BACKFILL_BATCH, reference)
    out = {"backfill": curves[e.BACKFILL_UNIT]}
    if e.BACKFILL_UNITS:
        out["backfill_units"] = {unit: copy.deepcopy(curves[unit]) for unit in e.BACKFILL_UNITS}
    if reference is not None:
        out["negative_flip"] = {"cross_test": _flip_rate(test_set, reference, new_q, cross_g),
                                "self_test": _flip_rate(test_set, reference, new_q, new_g)}
    return out


def _numpy(x):
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)


def embed_test_set(model, test_set, cfg, progress=True, tag="model"):
    """Query and gallery features of ``model`` (sharded over ranks, gathered on rank 0), as numpy arrays
    on rank 0 and ``(None, None)`` on the other ranks."""
    device = next(model.parameters()).device
    images = image_input(cfg.EVAL.IMG_SIZE, cfg.DATA.DECODE, device)
    q_ds, g_ds = image_datasets(test_set, images, cfg.EVAL.CROP_QUERY)
    workers = resolve_num_workers(cfg.EVAL.NUM_WORKERS, "EVAL.NUM_WORKERS")
    kw = dict(batch_size=cfg.EVAL.BATCH_SIZE, num_workers=workers, amp=cfg.EVAL.AMP, progress=progress)
    q = extract_features(model, q_ds, desc=f"{tag} queries", **kw)
    g = extract_features(model, g_ds, desc=f"{tag} gallery", **kw)
    return (None, None) if q is None else (q.numpy(), g.numpy())


def embed_old_test_set(old_model, test_set, cfg, progress=True):
    """The old model's features (rank 0; ``(None, None)`` elsewhere), read from / written to
    EVAL.OLD_FEATURES_CACHE when it is set: rank 0 reads the entry and tells the others whether to embed.
    Without a checkpoint path there is nothing to key on."""
    directory, weights = cfg.EVAL.OLD_FEATURES_CACHE, cfg.OLD_MODEL.WEIGHTS
    if not (directory and weights):
        old_q, old_g = embed_test_set(old_model, test_set, cfg, progress, "old")
        dist.run_on_main(check_model_features, test_set, old_q, old_g, "old", weights)
        return old_q, old_g
    found = {}  # rank 0's key and entry

    def lookup():
        found["key"] = key = feature_cache.cache_key(weights, cfg.OLD_MODEL.ARCH, test_set, cfg.EVAL.IMG_SIZE,
                                                     cfg.EVAL.CROP_QUERY, cfg.EVAL.AMP, cfg.DATA.DECODE)
        found["hit"] = hit = feature_cache.load(directory, test_set.name, key)
        if hit is not None:
            check_features(test_set, *hit, source=feature_cache.cache_path(directory, test_set.name, key))
        return hit is not None

    if dist.run_on_main(lookup):  # every rank learns whether to embed
        return found.get("hit", (None, None))
    old_q, old_g = embed_test_set(old_model, test_set, cfg, progress, "old")

    def check_and_store():  # checked first: a NaN entry would fail every later run that reads it
        check_model_features(test_set, old_q, old_g, "old", weights)
        try:
            feature_cache.save(directory, test_set.name, found["key"], old_q, old_g)
        except OSError as exc:  # e.g. disk full: the evaluation itself is not lost
            print(f"warning: EVAL.OLD_FEATURES_CACHE: could not write an entry in {directory} "
                  f"({one_line(str(exc))}); the old model's features will be embedded again next time")

    dist.run_on_main(check_and_store)
    return old_q, old_g


def score_models(test_set, cfg, new_q, new_g, old_q=None, old_g=None, cross_g=None):
    """The result dict of one test set from its features: self-test, and with the old model's features
    cross-test, old self-test and (EVAL.BACKFILL) the backfilling curve.

    ``cross_g``: the old gallery as the new model's queries search it (default ``old_g``; a method that
    maps old embeddings into the new space passes the mapped gallery). The cross test and the backfilled
    galleries use it; the old self-test uses ``old_q`` against ``old_g`` as they are."""
    cross_g = old_g if cross_g is None else cross_g
    result = {"dataset": test_set.name, "self_test": score(test_set, new_q, new_g)}
    if old_g is not None:
        result["cross_test"] = score(test_set, new_q, cross_g)
        result["old_self_test"] = score(test_set, old_q, old_g)
        if cfg.EVAL.BACKFILL:
            backfill.check_units(cfg.EVAL.BACKFILL_UNITS)
            result.update(_backfill_results(test_set, cfg.EVAL, new_q, new_g, old_q, old_g, cross_g))
    return result


def evaluate_models(new_model, old_model, cfg, progress=True, test_set=None, old_transform=None):
    """Self-test of ``new_model`` and, with ``old_model``, cross-test, old self-test and backfilling.

    Every rank embeds its shard; rank 0 alone holds the features and searches; every rank returns its
    result (a rank 0 error is raised on every rank). The EVAL.BACKFILL_* keys are checked first.
    ``old_transform`` (advbct/models/transformation.py, EVAL.OLD_TRANSFORM) maps the old gallery into the new
    space for the cross test and backfilling (FCT); a new model with added dimensions (BT²) searches the old
    gallery zero-padded to its size. The old self-test and any feature cache keep the old model's own
    features.
    """
    backfill.check_config(cfg)
    test_set = test_set or load_test_set(cfg.EVAL.DATASET, cfg.EVAL.ROOT, cfg.EVAL.GLDV2_SPLIT)
    if old_transform is not None:  # it takes the old model's embeddings to the new model's size
        if old_model is None:
            raise UserError("EVAL.OLD_TRANSFORM is set but there is no old model (OLD_MODEL.WEIGHTS) to map")
        dims, want = (old_transform.in_dim, old_transform.out_dim), (old_model.embed_dim, new_model.embed_dim)
        if dims != want:
            raise UserError(f"EVAL.OLD_TRANSFORM {cfg.EVAL.OLD_TRANSFORM} maps {dims[0]} -> {dims[1]} dims but the "
                            f"old model embeds to {want[0]} and the new model to {want[1]}")
    elif old_model is not None:
        check_same_embedding(new_model, old_model, cfg.NEW_MODEL.WEIGHTS, cfg.OLD_MODEL.WEIGHTS)
    new_q, new_g = embed_test_set(new_model, test_set, cfg, progress, "new")
    dist.run_on_main(check_model_features, test_set, new_q, new_g, "new", cfg.NEW_MODEL.WEIGHTS)
    old_q = old_g = None
    if old_model is not None:
        old_q, old_g = embed_old_test_set(old_model, test_set, cfg, progress)

    def map_and_score():  # rank 0, the one holding the features
        cross_g = None
        if old_transform is not None:
            cross_g = map_features(old_transform, old_g, device=next(new_model.parameters()).device)
        elif old_g is not None and new_model.embed_dim != old_g.shape[1]:  # BT²: the old dims lead the new space
            cross_g = to_new_space(old_g, new_model.embed_dim)
        return score_models(test_set, cfg, new_q, new_g, old_q, old_g, cross_g=cross_g)

    return dist.run_on_main(map_and_score)


def headline(result):
    """Flat ``{"self": x, "cross": y, "old_self": z}`` of the headline metric, for logs and tables."""
    out = {}
    for key, name in (("self_test", "self"), ("cross_test", "cross"), ("old_self_test", "old_self")):
        if key in result:
            out[name] = headline_value(result[key], result.get("dataset"))
    return out
