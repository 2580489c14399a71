"""The test sets, one object each: name, table label, loader, metric and headline number, root layout.

In the spirit of cnnimageretrieval-pytorch's ``configdataset`` (one description per test set), every place
that names or dispatches on a test set reads this registry: ``EVAL.DATASET`` (advbct.evaluation.evaluate),
loading and scoring (advbct.evaluation.protocol), the tables' column labels (advbct.evaluation.reporting),
the collected table's columns (advbct.evaluation.collect, tools/collect_results.py),
tools/evaluate_features.py and tools/gpu_check.py. The registry keeps the paper's table order (RParis,
ROxford, GLDv2): a set registered later becomes the last column.

Adding a test set is one ``register(TestSetSpec(...))`` (plus its loader in advbct/data/ when its format
is new); see docs/extending.md. Importing this module does not import torch: the loaders and metrics
import what they need when called.
"""

import os
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable

from advbct.errors import UserError

GLDV2_TOPK = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class TestSet:
    """Query and gallery image paths with their ground truth, whatever the on-disk format."""

    __test__ = False  # not a pytest test class

    name: str
    query_paths: list
    gallery_paths: list
    ground_truth: list          # revisited: per-query gnd dicts; gldv2: per-query index arrays
    query_boxes: object = None  # (n_query, 4) bbx for revisited queries
    spec: object = None         # the TestSetSpec that read it; None: the one registered under ``name``

    @property
    def kind(self):
        """Its TestSetSpec (looked up by name for a TestSet built by hand)."""
        return self.spec if self.spec is not None else get(self.name)

    @property
    def is_revisited(self):
        """Scored by the revisited protocol (Easy/Medium/Hard, query boxes)."""
        return self.kind.metric is REVISITED_MAP


@dataclass(frozen=True)
class Metric:
    """How a test set is scored: ``compute(query, gallery, ground_truth)`` -> metrics dict in percent, and
    where its headline number (the one the paper's table prints) lies in that dict.

    ``top1(query, gallery, ground_truth)`` -> ``(hit, counted)``, boolean arrays (n_query,): whether each
    query's top-1 is a positive under this metric's own rules, and which queries the metric counts; the
    negative-flip rates of backfilling read it. None: the set records no negative flips."""

    name: str            # the headline's name, e.g. the "metric" of a backfilling curve
    headline_key: tuple  # path of the headline number in the metrics dict
    compute: Callable
    top1: Callable = None

    def headline(self, metrics):
        value = metrics
        for key in self.headline_key:
            value = value[key]
        return value

    def has_headline(self, metrics):
        value = metrics
        for key in self.headline_key:
            if not isinstance(value, dict) or key not in value:
                return False
            value = value[key]
        return True


def _revisited_metrics(query, gallery, gnd):
    """Revisited Easy/Medium/Hard mAP and mP@k over the full ranking (advbct.evaluation.metrics)."""
    from advbct.evaluation.metrics import revisited_ranking_metrics
    from advbct.evaluation.search import knn_search

    _, ranks = knn_search(query, gallery, k=None)
    metrics = revisited_ranking_metrics(ranks, gnd)
    metrics.pop("per_query_ap", None)
    return metrics


def _revisited_top1(query, gallery, gnd):
    """Top-1 positives of the Medium protocol (junk skipped): the search goes one image deeper than the
    longest junk list, so every query's first non-junk image is in reach without a full ranking."""
    import numpy as np

    from advbct.evaluation.metrics import revisited_top1_positive
    from advbct.evaluation.search import knn_search

    n = gallery.shape[0]
    longest_junk = max((np.asarray(g.get("junk", ()) if isinstance(g, dict) else ()).size for g in gnd),
                       default=0)
    _, ranks = knn_search(query, gallery, k=min(n, longest_junk + 1))
    return revisited_top1_positive(ranks, gnd, n)


def _gldv2_top1(query, gallery, ground_truth):
    """Top-1 positives against per-query lists of relevant gallery indices."""
    from advbct.evaluation.metrics import gldv2_top1_positive
    from advbct.evaluation.search import knn_search

    _, ranks = knn_search(query, gallery, k=1)
    return gldv2_top1_positive(ranks, ground_truth)


def _map_at_k(k, query, gallery, ground_truth):
    """The GLDv2 retrieval metric (Kaggle mAP@k) over the top-k neighbours."""
    from advbct.evaluation.metrics import gldv2_map_at_k
    from advbct.evaluation.search import knn_search

    _, ranks = knn_search(query, gallery, k=min(k, gallery.shape[0]))
    return {f"mAP@{k}": gldv2_map_at_k(ranks, ground_truth, k=k)}


def map_at_k(k):
    """mAP@k against per-query lists of relevant gallery indices; headline ``metrics["mAP@<k>"]``."""
    return Metric(f"mAP@{k}", (f"mAP@{k}",), partial(_map_at_k, k), top1=_gldv2_top1)


REVISITED_MAP = Metric("mAP medium", ("mAP", "medium"), _revisited_metrics, top1=_revisited_top1)
GLDV2_MAP = map_at_k(GLDV2_TOPK)


def read_revisited(name, root, split, check_images):
    """ROxford5k / RParis6k (advbct.data.revisited); ``split`` is not used."""
    from advbct.data.revisited import load_revisited

    ds = load_revisited(root, name, check_images=check_images)
    return list(ds.query_paths), list(ds.gallery_paths), ds.gnd, ds.query_bbx


def read_gldv2(root, split, check_images):
    """The GLDv2 retrieval test set of ``split`` (EVAL.GLDV2_SPLIT; advbct.data.gldv2)."""
    from advbct.data.gldv2 import load_gldv2_test

    ds = load_gldv2_test(root, split=split, check_images=check_images)
    return ds.query_paths.tolist(), ds.gallery_paths.tolist(), ds.gt, None


@dataclass(frozen=True)
class TestSetSpec:
    """One test set.

    ``load(root, split, check_images)`` returns ``(query_paths, gallery_paths, ground_truth, query_boxes)``
    (``split`` is EVAL.GLDV2_SPLIT; ``check_images=False`` reads the ground truth only). ``root_files``
    are the files that must exist under the root (Dataset.md); an entry is a path relative to the root,
    or a tuple of paths of which one must exist (the first is the documented layout), and ``{split}``
    stands for the split. ``synthetic_root`` is the set's folder in a synthetic benchmark
    (tools/make_synthetic.py), ``default_root`` its root in the real layout.
    """

    __test__ = False  # not a pytest test class

    name: str             # EVAL.DATASET value and results folder: <SAVE_DIR>/<name>/results.json
    label: str            # column label in the tables ("ROxford self / cross")
    load: Callable
    metric: Metric
    root_files: tuple
    default_root: str
    synthetic_root: str

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"test set name {self.name!r}: letters, digits, '_', '.', '-' only (it names a "
                             f"results folder and is listed in comma-separated EVAL.DATASET)")

    def read(self, root, split="private", check_images=True):
        """The TestSet under ``root``."""
        query_paths, gallery_paths, ground_truth, query_boxes = self.load(root, split, check_images)
        return TestSet(self.name, query_paths, gallery_paths, ground_truth, query_boxes, spec=self)

    def score(self, query, gallery, ground_truth):
        """Metrics of one query/gallery feature pair (numpy float32), in percent."""
        return self.metric.compute(query, gallery, ground_truth)

    def headline(self, metrics):
        """The number the paper's table reports (Medium mAP, mAP@100)."""
        return self.metric.headline(metrics)

    def missing_files(self, root, split="private"):
        """Paths under ``root`` of the ``root_files`` entries none of whose alternatives exist."""
        missing = []
        for entry in self.root_files:
            options = (entry,) if isinstance(entry, str) else tuple(entry)
            paths = [os.path.join(root, p.format(split=split)) for p in options]
            if not any(os.path.exists(p) for p in paths):
                missing.append(paths[0])
        return missing


def revisited_spec(name, label):
    """ROxford5k / RParis6k: gnd_<name>.pkl and <name>/jpg/ under one root (Dataset.md)."""
    return TestSetSpec(name=name, label=label, load=partial(read_revisited, name), metric=REVISITED_MAP,
                       root_files=((f"gnd_{name}.pkl", f"{name}/gnd_{name}.pkl"),),
                       default_root="./data/ROxfordParis", synthetic_root="ROxfordParis")


_REGISTRY = {}


def register(spec):
    """Add ``spec`` as the last column; returns it. A name already registered is a ValueError."""
    if not isinstance(spec, TestSetSpec):
        raise TypeError(f"register expects a TestSetSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY:
        raise ValueError(f"test set '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name):
    """Remove and return the test set ``name`` (KeyError if it is not registered)."""
    return _REGISTRY.pop(name)


def names():
    """Registered test set names, in the paper's table order."""
    return tuple(_REGISTRY)


def specs():
    """Registered TestSetSpecs, in the paper's table order."""
    return tuple(_REGISTRY.values())


def get(name, where="EVAL.DATASET", alternatives=""):
    """The TestSetSpec ``name``; an unknown name is a one-line UserError prefixed by ``where`` that lists
    the known names (and ``alternatives``, e.g. "or several of them separated by commas")."""
    spec = _REGISTRY.get(name)
    if spec is None:
        extra = f", {alternatives}" if alternatives else ""
        raise UserError(f"{where}: unknown test set '{name}' (expected one of {', '.join(_REGISTRY)}{extra})")
    return spec


def label(name):
    """The table label of ``name`` ("ROxford"); an unregistered name is its own label."""
    spec = _REGISTRY.get(name)
    return spec.label if spec is not None else name


def headline_value(metrics, name=None):
    """The headline number of a metrics dict: by the metric of test set ``name`` when it is registered,
    else by the first registered metric whose headline is in the dict."""
    if name in _REGISTRY:
        return _REGISTRY[name].headline(metrics)
    for spec in _REGISTRY.values():
        if spec.metric.has_headline(metrics):
            return spec.headline(metrics)
    raise KeyError(f"no headline metric in {sorted(metrics)} (expected one of "
                   f"{', '.join(sorted({'/'.join(s.metric.headline_key) for s in _REGISTRY.values()}))})")


register(revisited_spec("rparis6k", "RParis"))
register(revisited_spec("roxford5k", "ROxford"))
register(TestSetSpec(name="gldv2", label="GLDv2", load=read_gldv2, metric=GLDV2_MAP,
                     root_files=("gldv2_gallery_list.txt", "gldv2_{split}_query_list.txt",
                                 "gldv2_{split}_query_gt.txt"),
                     default_root="./data/GLDv2", synthetic_root="gldv2"))
