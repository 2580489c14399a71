"""Evaluate a chain of model generations (scripts/test_generations.sh): every model embeds each test set once,
then every pair i >= j is scored into the compatibility matrix with its AC and AM
(:mod:`advbct.evaluation.compatibility_matrix`); writes matrix.json, matrix.md and matrix.png in EVAL.SAVE_DIR.

The models are GENERATIONS.WEIGHTS, oldest first, each of the architecture GENERATIONS.ARCHS gives it (one
name for all, or one per model); the test sets, roots and extraction settings are the EVAL keys of
scripts/test.sh.
"""

import os

from advbct import distributed as dist
from advbct.config import save_config
from advbct.errors import UserError
from advbct.evaluation import compatibility_matrix as cm
from advbct.evaluation.evaluate import SaveDirLock, evaluation_jobs
from advbct.evaluation.protocol import check_features, embed_test_set, load_test_set, score
from advbct.io import atomic_open, write_json_atomic
from advbct.models import load_trained_model

__all__ = ["MATRIX_FILES", "generation_specs", "run_generations", "score_chain"]

MATRIX_FILES = ("matrix.json", "matrix.md", "matrix.png")


def generation_specs(cfg):
    """``[(name, arch, weights)]`` of GENERATIONS, oldest first, checked: at least two models, one architecture
    for all or one per model, one name per model (default phi1, phi2, ...), no name twice."""
    g = cfg.GENERATIONS
    weights = [str(w) for w in g.WEIGHTS]
    if len(weights) < 2:
        raise UserError(f"GENERATIONS.WEIGHTS: a chain needs at least two checkpoints, oldest first "
                        f"(e.g. [old.pth,new.pth]), got {len(weights)}")
    archs = [str(a) for a in g.ARCHS] or ["resnet18"]
    if len(archs) == 1:
        archs = archs * len(weights)
    if len(archs) != len(weights):
        raise UserError(f"GENERATIONS.ARCHS: {len(archs)} architectures for the {len(weights)} checkpoints of "
                        f"GENERATIONS.WEIGHTS (expected one for all, or one per checkpoint)")
    names = [str(n) for n in g.NAMES] or [f"phi{k}" for k in range(1, len(weights) + 1)]
    if len(names) != len(weights) or len(set(names)) != len(names) or not all(names):
        raise UserError(f"GENERATIONS.NAMES {names}: expected {len(weights)} distinct, non-empty names, one per "
                        f"checkpoint of GENERATIONS.WEIGHTS")
    return list(zip(names, archs, weights))


def score_chain(test_set, features):
    """The matrix entry of one test set: ``features`` is ``[(query, gallery)]`` per generation, oldest first.
    Returns ``{"metric", "matrix" (None above the diagonal), "AC", "AM", "pairs": [{query, gallery, metrics}]}``."""
    kind = test_set.kind
    t = len(features)
    matrix = [[None] * t for _ in range(t)]
    pairs = []
    for i in range(t):
        for j in range(i + 1):
            metrics = score(test_set, features[i][0], features[j][1])
            matrix[i][j] = kind.headline(metrics)
            pairs.append({"query": i + 1, "gallery": j + 1, "metrics": metrics})
    return {"metric": kind.metric.name, "matrix": matrix, "AC": cm.ac_score(matrix), "AM": cm.am_score(matrix),
            "pairs": pairs}


def _write(save_dir, cfg, result):
    """config.yaml, matrix.md, matrix.png, then matrix.json (last: it marks a finished evaluation), each atomic."""
    names = [g["name"] for g in result["generations"]]
    for name in MATRIX_FILES:
        path = os.path.join(save_dir, name)
        if os.path.exists(path):
            os.remove(path)  # a crash in between leaves no matrix.json beside another run's files
    save_config(cfg, os.path.join(save_dir, "config.yaml"))
    with atomic_open(os.path.join(save_dir, "matrix.md")) as f:
        f.write(cm.matrix_markdown(names, result["sets"]))
    cm.write_heatmap(names, result["sets"], os.path.join(save_dir, "matrix.png"),
                     title=" -> ".join(f"{g['name']} ({g['arch']})" for g in result["generations"]))
    write_json_atomic(os.path.join(save_dir, "matrix.json"), result)
    return os.path.join(save_dir, "matrix.json")


def run_generations(cfg):
    """Check everything (chain, test sets, checkpoints, embedding sizes) before the first image is embedded;
    return the result dict written to EVAL.SAVE_DIR/matrix.json."""
    if cfg.EVAL.DATASET_TYPE != "landmark":
        raise UserError(f"EVAL.DATASET_TYPE: only 'landmark' is implemented, got '{cfg.EVAL.DATASET_TYPE}'")
    specs = generation_specs(cfg)
    _, _, device = dist.init_distributed()
    lock = SaveDirLock([cfg.EVAL.SAVE_DIR])
    try:
        dist.run_on_main(lock.acquire)  # rank 0 writes the results, so rank 0 holds the lock
        jobs = [(job, load_test_set(job.EVAL.DATASET, job.EVAL.ROOT, job.EVAL.GLDV2_SPLIT))
                for job in evaluation_jobs(cfg)]
        models = [load_trained_model(arch, weights, f"GENERATIONS.WEIGHTS[{k}]", device=device)
                  for k, (_, arch, weights) in enumerate(specs)]
        for k, model in enumerate(models[1:], 1):
            if model.embed_dim != models[0].embed_dim:
                raise UserError(f"GENERATIONS.WEIGHTS[{k}] {specs[k][2]} embeds to {model.embed_dim} dims but "
                                f"GENERATIONS.WEIGHTS[0] {specs[0][2]} to {models[0].embed_dim}: every pair of a "
                                f"chain is cross-tested, which needs one embedding size")
        result = {"generations": [{"name": n, "arch": a, "weights": w} for n, a, w in specs], "sets": {}}
        for job, test_set in jobs:
            features = []
            for k, ((name, _, weights), model) in enumerate(zip(specs, models)):
                q, g = embed_test_set(model, test_set, job, tag=name)
                dist.run_on_main(check_features, test_set, q, g,
                                 source=f"{name} (GENERATIONS.WEIGHTS[{k}] {weights})")
                features.append((q, g))
            result["sets"][test_set.name] = dist.run_on_main(score_chain, test_set, features)
        path = dist.run_on_main(_write, cfg.EVAL.SAVE_DIR, cfg, result)
        if dist.is_main_process():
            names = [n for n, _, _ in specs]
            print(cm.matrix_markdown(names, result["sets"]))
            print(f"results: {path}")
        return result
    finally:
        lock.release()  # (nothing held on the other ranks)
