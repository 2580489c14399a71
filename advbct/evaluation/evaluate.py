"""Evaluate two checkpoints (scripts/test.sh): load, check, embed, score, print, write results.json."""

import copy
import os

from advbct import distributed as dist
from advbct.config import save_config
from advbct.errors import UserError
from advbct.evaluation import backfill, feature_cache, test_sets
from advbct.evaluation.protocol import evaluate_models, load_test_set
from advbct.io import write_json_atomic
from advbct.models import check_same_embedding, load_trained_model


def format_result(result):
    """Human-readable lines: self/cross (and old self) E/M/H mAP (revisited), else the test set's headline
    (mAP@100 for GLDv2); a model evaluated alone (no OLD_MODEL.WEIGHTS) prints a plain self-test line."""
    lines = [f"== {result['dataset']} =="]
    alone = "cross_test" not in result  # one model (scripts/test_old.sh): its self-test, not a new model's
    for key, name in (("self_test", "self-test" if alone else "self-test  (new/new)"),
                      ("cross_test", "cross-test (new/old)"), ("old_self_test", "old self   (old/old)")):
        if key not in result:
            continue
        m = result[key]
        if isinstance(m.get("mAP"), dict) and {"easy", "medium", "hard"} <= set(m["mAP"]):
            e, med, h = (m["mAP"][p] for p in ("easy", "medium", "hard"))
            lines.append(f"{name}: mAP E {e:6.2f}  M {med:6.2f}  H {h:6.2f}")
        else:  # any other metric: its headline number, by the name the test set gives it
            spec = test_sets.get(result["dataset"])
            lines.append(f"{name}: {spec.metric.name} {spec.headline(m):6.2f}")
    if "backfill" in result:
        b = result["backfill"]
        pts = "  ".join(f"{r:.2f}:{v:.2f}" for r, v in zip(b["ratios"], b["values"]))
        lines.append(f"backfill ({b['metric']}): {pts}")
    return "\n".join(lines)


def evaluation_jobs(cfg):
    """One config per test set named in EVAL.DATASET, each as that set would be given alone.

    EVAL.DATASET is one name or several separated by commas (``rparis6k,roxford5k,gldv2``): several are
    evaluated in one process, the models loaded once, each set's results.json written to
    EVAL.SAVE_DIR/<dataset>/ as soon as it is scored. EVAL.ROOT is then one root for every set or one per
    set, comma-separated in the same order.
    """
    names = [n.strip() for n in cfg.EVAL.DATASET.split(",")]
    for name in names:
        test_sets.get(name, "EVAL.DATASET", "or several of them separated by commas")
    if len(set(names)) != len(names):
        raise UserError(f"EVAL.DATASET '{cfg.EVAL.DATASET}': a test set is named twice")
    if len(names) == 1:
        return [cfg]
    roots = [r.strip() for r in cfg.EVAL.ROOT.split(",")] if "," in cfg.EVAL.ROOT else [cfg.EVAL.ROOT] * len(names)
    if len(roots) != len(names):
        raise UserError(f"EVAL.ROOT: {len(roots)} roots for the {len(names)} test sets of EVAL.DATASET "
                        f"(expected one root, or one per set separated by commas)")
    jobs = []
    for name, root in zip(names, roots):
        job = copy.deepcopy(cfg)
        job.EVAL.DATASET, job.EVAL.ROOT, job.EVAL.SAVE_DIR = name, root, os.path.join(cfg.EVAL.SAVE_DIR, name)
        jobs.append(job)
    return jobs


def run_evaluation(cfg):
    """Everything is checked (datasets, checkpoints, embedding sizes) before the first image is embedded.

    Returns the result dict of each test set of EVAL.DATASET, in order.
    """
    if cfg.EVAL.DATASET_TYPE != "landmark":
        raise UserError(f"EVAL.DATASET_TYPE: only 'landmark' is implemented, got '{cfg.EVAL.DATASET_TYPE}'")
    backfill.check_config(cfg)  # a bad EVAL.BACKFILL_* key fails here, not after the extraction
    _, _, device = dist.init_distributed()  # first: rank 0 alone checks the test sets' images
    try:
        jobs = [(job, load_test_set(job.EVAL.DATASET, job.EVAL.ROOT, job.EVAL.GLDV2_SPLIT))
                for job in evaluation_jobs(cfg)]
        with_old = bool(cfg.OLD_MODEL.WEIGHTS)
        if with_old:
            check_same_embedding(cfg.NEW_MODEL.WEIGHTS, cfg.OLD_MODEL.WEIGHTS)
            if cfg.EVAL.OLD_FEATURES_CACHE:
                feature_cache.check_directory(cfg.EVAL.OLD_FEATURES_CACHE)
        new = load_trained_model(cfg.NEW_MODEL.ARCH, cfg.NEW_MODEL.WEIGHTS, "NEW_MODEL.WEIGHTS", device=device)
        old = (load_trained_model(cfg.OLD_MODEL.ARCH, cfg.OLD_MODEL.WEIGHTS, "OLD_MODEL.WEIGHTS", device=device)
               if with_old else None)
        models = {"new_model": {"arch": cfg.NEW_MODEL.ARCH, "weights": cfg.NEW_MODEL.WEIGHTS}}
        if with_old:
            models["old_model"] = {"arch": cfg.OLD_MODEL.ARCH, "weights": cfg.OLD_MODEL.WEIGHTS}
        results = []
        for job_cfg, test_set in jobs:
            result = evaluate_models(new, old, job_cfg, test_set=test_set)
            result.update(models)
            if dist.is_main_process():
                save_dir = job_cfg.EVAL.SAVE_DIR
                os.makedirs(save_dir, exist_ok=True)
                path = os.path.join(save_dir, "results.json")
                write_json_atomic(path, result)
                save_config(job_cfg, os.path.join(save_dir, "config.yaml"))
                print(format_result(result))
                print(f"results: {path}")
            results.append(result)
        dist.finish()
        return results
    finally:
        dist.cleanup()
