"""Evaluate two checkpoints (scripts/test.sh): load, check, embed, score, print, write results.json."""

import os

from advbct import distributed as dist
from advbct.config import save_config
from advbct.engine.builders import check_same_embedding, load_trained_model
from advbct.errors import UserError
from advbct.evaluation import feature_cache
from advbct.evaluation.protocol import DATASETS, evaluate_models, load_test_set
from advbct.evaluation.reporting import write_json_atomic


def format_result(result):
    """Human-readable lines: self/cross (and old self) E/M/H mAP, or mAP@100 for GLDv2."""
    lines = [f"== {result['dataset']} =="]
    for key, name in (("self_test", "self-test  (new/new)"), ("cross_test", "cross-test (new/old)"),
                      ("old_self_test", "old self   (old/old)")):
        if key not in result:
            continue
        m = result[key]
        if "mAP" in m:
            e, med, h = (m["mAP"][p] for p in ("easy", "medium", "hard"))
            lines.append(f"{name}: mAP E {e:6.2f}  M {med:6.2f}  H {h:6.2f}")
        else:
            lines.append(f"{name}: mAP@100 {m['mAP@100']:6.2f}")
    if "backfill" in result:
        b = result["backfill"]
        pts = "  ".join(f"{r:.2f}:{v:.2f}" for r, v in zip(b["ratios"], b["values"]))
        lines.append(f"backfill ({b['metric']}): {pts}")
    return "\n".join(lines)


def run_evaluation(cfg):
    """Everything is checked (dataset, checkpoints, embedding sizes) before the first image is embedded."""
    if cfg.EVAL.DATASET_TYPE != "landmark":
        raise UserError(f"EVAL.DATASET_TYPE: only 'landmark' is implemented, got '{cfg.EVAL.DATASET_TYPE}'")
    if cfg.EVAL.DATASET not in DATASETS:
        raise UserError(f"EVAL.DATASET: unknown test set '{cfg.EVAL.DATASET}' (expected one of {', '.join(DATASETS)})")
    test_set = load_test_set(cfg.EVAL.DATASET, cfg.EVAL.ROOT, cfg.EVAL.GLDV2_SPLIT)
    with_old = bool(cfg.OLD_MODEL.WEIGHTS)
    if with_old:
        check_same_embedding(cfg.NEW_MODEL.WEIGHTS, cfg.OLD_MODEL.WEIGHTS)
        if cfg.EVAL.OLD_FEATURES_CACHE:
            feature_cache.check_directory(cfg.EVAL.OLD_FEATURES_CACHE)
    _, _, device = dist.init_distributed()
    try:
        new = load_trained_model(cfg.NEW_MODEL.ARCH, cfg.NEW_MODEL.WEIGHTS, "NEW_MODEL.WEIGHTS", device=device)
        old = (load_trained_model(cfg.OLD_MODEL.ARCH, cfg.OLD_MODEL.WEIGHTS, "OLD_MODEL.WEIGHTS", device=device)
               if with_old else None)
        result = evaluate_models(new, old, cfg, test_set=test_set)
        result["new_model"] = {"arch": cfg.NEW_MODEL.ARCH, "weights": cfg.NEW_MODEL.WEIGHTS}
        if with_old:
            result["old_model"] = {"arch": cfg.OLD_MODEL.ARCH, "weights": cfg.OLD_MODEL.WEIGHTS}
        if dist.is_main_process():
            os.makedirs(cfg.EVAL.SAVE_DIR, exist_ok=True)
            path = os.path.join(cfg.EVAL.SAVE_DIR, "results.json")
            write_json_atomic(path, result)
            save_config(cfg, os.path.join(cfg.EVAL.SAVE_DIR, "config.yaml"))
            print(format_result(result))
            print(f"results: {path}")
        dist.finish()
        return result
    finally:
        dist.cleanup()
