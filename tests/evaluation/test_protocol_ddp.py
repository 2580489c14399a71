"""Evaluation on 2 gloo processes: the same result as one process, with the work done once.

Both ranks embed their shard; rank 0 alone checks the test set's images, holds the gathered features and
searches; both ranks return rank 0's result.
"""

import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from advbct.config import load_config
from advbct.models import build_model
from helpers import free_port

WORLD, IMG = 2, 32


def _models():
    torch.manual_seed(0)
    new, old = (build_model("resnet18", embed_dim=16, pretrained=False).eval() for _ in range(2))
    return new, old


def _cfg(root):
    return load_config(None, ["EVAL.ROOT", str(root), "EVAL.DATASET", "roxford5k", "EVAL.IMG_SIZE", str(IMG),
                              "EVAL.NUM_WORKERS", "0", "EVAL.BATCH_SIZE", "8", "EVAL.BACKFILL", "true"])


def _evaluate(root, counts):
    """load_test_set + evaluate_models, counting the searches and the image-existence checks."""
    import advbct.data.revisited as revisited
    import advbct.evaluation.protocol as protocol
    import advbct.evaluation.search as search  # the test sets' metrics search through it

    real_search, real_missing = search.knn_search, revisited.missing_files

    def counting_search(*args, **kwargs):
        counts["searches"] += 1
        return real_search(*args, **kwargs)

    def counting_missing(paths):
        counts["checked_images"] += len(paths)
        return real_missing(paths)

    search.knn_search, revisited.missing_files = counting_search, counting_missing
    try:
        test_set = protocol.load_test_set("roxford5k", str(root))
        new, old = _models()
        return protocol.evaluate_models(new, old, _cfg(root), progress=False, test_set=test_set)
    finally:
        search.knn_search, revisited.missing_files = real_search, real_missing


def _worker(rank, port, root, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    from advbct.distributed import cleanup, init_distributed

    init_distributed()
    try:
        counts = {"searches": 0, "checked_images": 0}
        result = _evaluate(root, counts)
        torch.save({"result": result, "counts": counts}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup()



@pytest.mark.slow
@pytest.mark.skipif(not tdist.is_gloo_available(), reason="torch.distributed without gloo")
def test_two_ranks_evaluate_once_and_agree_with_one(tiny_synthetic, tmp_path):
    root = tiny_synthetic / "ROxfordParis"
    mp.spawn(_worker, args=(free_port(), str(root), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    counts = {"searches": 0, "checked_images": 0}
    single = _evaluate(root, counts)
    n_images = counts["checked_images"]
    # self, cross, old self and 5 backfill ratios, then the negative flips' top-1 searches (old/old, the 5
    # backfilled galleries, cross and self): 16 searches, all on rank 0; every image checked once, there
    assert counts["searches"] == 16 and n_images > 0
    assert ranks[0]["counts"] == {"searches": 16, "checked_images": n_images}
    assert ranks[1]["counts"] == {"searches": 0, "checked_images": 0}
    for r in ranks:
        assert r["result"] == single  # every metric and the backfilling curve
    assert single["self_test"]["mAP"]["medium"] != single["cross_test"]["mAP"]["medium"]  # not a constant
