"""Benchmark of faiss retrieval at GLDv2-test scale: 1,129 queries × 761,757 gallery × 256-d, top-100."""

import resource
import sys
import time

import numpy as np

from advbct.evaluation.search import faiss_gpu_available, knn_search

GLDV2_QUERIES = 1129
GLDV2_GALLERY = 761757


def add_arguments(parser):
    """Options of this benchmark."""
    parser.add_argument("--queries", type=int, default=GLDV2_QUERIES, help="number of queries")
    parser.add_argument("--gallery-size", type=int, default=GLDV2_GALLERY,
                        help="gallery size (scale down for a quick run)")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
    parser.add_argument("--topk", type=int, default=100, help="neighbours per query")
    parser.add_argument("--chunk-size", type=int, default=4096, help="queries per faiss search call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features")
    return parser


def _peak_rss_mb():
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _random_features(rng, n, dim, block=65536):
    """Standard-normal float32 features, generated block by block (no float64 temporary of full size)."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        out[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    return out


def run(args):
    """Seconds and peak-RSS growth of one ``knn_search`` (exact inner product, L2-normalised)."""
    n_query = int(getattr(args, "queries", GLDV2_QUERIES))
    n_gallery = int(getattr(args, "gallery_size", GLDV2_GALLERY))
    dim = int(getattr(args, "dim", 256))
    topk = int(getattr(args, "topk", 100))
    chunk = int(getattr(args, "chunk_size", 4096))
    rng = np.random.default_rng(int(getattr(args, "seed", 0)))

    start = time.perf_counter()
    gallery = _random_features(rng, n_gallery, dim)
    query = _random_features(rng, n_query, dim)
    generate_s = time.perf_counter() - start

    peak_before = _peak_rss_mb()
    start = time.perf_counter()
    scores, ranks = knn_search(query, gallery, k=topk, chunk_size=chunk)
    search_s = time.perf_counter() - start
    peak_after = _peak_rss_mb()
    assert ranks.shape == (n_query, min(topk, n_gallery)) and (ranks >= 0).all()
    return {
        "benchmark": "knn_search (faiss IndexFlatIP, L2-normalised)",
        "queries": n_query,
        "gallery": n_gallery,
        "dim": dim,
        "topk": topk,
        "device": "gpu" if faiss_gpu_available() else "cpu",
        "features_mb": round((gallery.nbytes + query.nbytes) / 2**20, 1),
        "generate_s": round(generate_s, 3),
        "search_s": round(search_s, 3),
        "peak_rss_before_mb": round(peak_before, 1),
        "peak_rss_after_mb": round(peak_after, 1),
        "peak_rss_delta_mb": round(peak_after - peak_before, 1),
    }


if __name__ == "__main__":
    import argparse
    import json

    print(json.dumps(run(add_arguments(argparse.ArgumentParser(description=__doc__)).parse_args()), indent=1))
