"""Benchmark of the revisited-protocol metrics on full random rankings shaped like ROxford5k and RParis6k."""

import os
import time

import numpy as np

from advbct.data.safe_pickle import safe_load_pickle
from advbct.errors import UserError
from advbct.evaluation.metrics import revisited_ranking_metrics

# (name, n_query, n_gallery) of the revisited datasets.
SHAPES = (("roxford5k", 70, 4993), ("rparis6k", 70, 6322))


def add_arguments(parser):
    """Options of this benchmark."""
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per dataset (median reported)")
    parser.add_argument("--gnd-dir", default="data/revisited",
                        help="folder with gnd_roxford5k.pkl / gnd_rparis6k.pkl (or <name>/gnd_<name>.pkl); "
                             "random ground truth when absent")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random rankings")
    return parser


def _load_gnd(gnd_dir, name, n_query, n_gallery):
    """The real ground truth of ``name`` when found under ``gnd_dir`` and shaped as expected, read with the
    restricted unpickler (a tampered file is refused, nothing in it runs)."""
    for path in (os.path.join(gnd_dir, f"gnd_{name}.pkl"), os.path.join(gnd_dir, name, f"gnd_{name}.pkl")):
        if os.path.isfile(path):
            data = safe_load_pickle(path)
            if not isinstance(data, dict) or not isinstance(data.get("gnd"), list):
                raise UserError(f"{path}: expected a dict with a 'gnd' list (see Dataset.md)")
            gnd = data["gnd"]
            if len(gnd) == n_query:
                return gnd, path
    return None, None


def _random_gnd(rng, n_query, n_gallery):
    """Per-query easy/hard/junk lists of sizes like ROxford's (disjoint, random gallery ids)."""
    gnd = []
    for _ in range(n_query):
        ids = rng.choice(n_gallery, size=int(rng.integers(20, 200)), replace=False)
        a, b = sorted(rng.choice(np.arange(1, ids.size), size=2, replace=False))
        gnd.append({"easy": ids[:a].tolist(), "hard": ids[a:b].tolist(), "junk": ids[b:].tolist()})
    return gnd


def run(args):
    """Median wall time (ms) of ``revisited_ranking_metrics`` (all 3 protocols, k = 1, 5, 10) per dataset."""
    repeats = max(1, int(getattr(args, "repeats", 7)))
    gnd_dir = getattr(args, "gnd_dir", "data/revisited")
    rng = np.random.default_rng(int(getattr(args, "seed", 0)))
    results = {}
    for name, n_query, n_gallery in SHAPES:
        gnd, source = _load_gnd(gnd_dir, name, n_query, n_gallery)
        if gnd is None:
            gnd, source = _random_gnd(rng, n_query, n_gallery), "random"
        ranks = np.argsort(rng.random((n_query, n_gallery)), axis=1)
        revisited_ranking_metrics(ranks, gnd)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            revisited_ranking_metrics(ranks, gnd)
            times.append(time.perf_counter() - start)
        results[name] = {
            "n_query": n_query,
            "n_gallery": n_gallery,
            "gnd": source,
            "repeats": repeats,
            "median_ms": round(1000.0 * float(np.median(times)), 3),
            "min_ms": round(1000.0 * float(np.min(times)), 3),
        }
    return {"benchmark": "revisited_ranking_metrics (easy/medium/hard, mP@1,5,10)", "results": results}


if __name__ == "__main__":
    import argparse
    import json

    print(json.dumps(run(add_arguments(argparse.ArgumentParser(description=__doc__)).parse_args()), indent=1))
