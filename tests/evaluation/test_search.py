"""faiss search: equals a numpy brute-force cosine ranking; chunking; input validation."""

import numpy as np
import pytest
import torch

from advbct.errors import UserError
from advbct.evaluation.search import faiss_gpu_available, knn_search, l2_normalize


def brute_force(query, gallery):
    """Cosine similarities (float64) and the full ranking by decreasing similarity."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sim = q.astype(np.float64) @ g.astype(np.float64).T
    return sim, np.argsort(-sim, axis=1, kind="stable")


@pytest.fixture(scope="module")
def data():
    """Random features whose cosine similarities have no near-ties (gap > 2e-6 between neighbours in
    every query's ordering), so float32 search must reproduce the float64 ordering exactly. The first
    seed that qualifies is used, so the data are deterministic."""
    for seed in range(100):
        rng = np.random.default_rng(seed)
        # Different norms per row: the ranking must depend on the angle only.
        query = (rng.standard_normal((17, 16)) * rng.uniform(0.1, 10, (17, 1))).astype(np.float32)
        gallery = (rng.standard_normal((100, 16)) * rng.uniform(0.1, 10, (100, 1))).astype(np.float32)
        sim, order = brute_force(query, gallery)
        gaps = -np.diff(np.take_along_axis(sim, order, axis=1), axis=1)
        if gaps.min() > 2e-6:
            return query, gallery, sim, order
    raise AssertionError("no seed without near-ties")


def test_full_ranking_equals_brute_force(data):
    query, gallery, sim, order = data
    scores, ranks = knn_search(query, gallery, use_gpu=False)
    assert ranks.shape == (17, 100) and ranks.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ranks, order)
    np.testing.assert_allclose(scores, np.take_along_axis(sim, order, axis=1), atol=1e-5)


def test_top_k_and_chunking(data):
    query, gallery, sim, order = data
    scores, ranks = knn_search(query, gallery, k=10, use_gpu=False)
    np.testing.assert_array_equal(ranks, order[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(sim, order[:, :10], axis=1), atol=1e-5)
    c_scores, c_ranks = knn_search(query, gallery, k=10, chunk_size=5, use_gpu=False)  # 17 = 3·5 + 2
    np.testing.assert_array_equal(c_ranks, ranks)
    np.testing.assert_array_equal(c_scores, scores)


def test_k_larger_than_gallery_is_clipped_and_torch_input(data):
    query, gallery, _, order = data
    _, ranks = knn_search(torch.from_numpy(query), torch.from_numpy(gallery[:20]), k=100, use_gpu=False)
    _, expected = brute_force(query, gallery[:20])
    assert ranks.shape == (17, 20)
    np.testing.assert_array_equal(ranks, expected)


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    y = l2_normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], atol=1e-7)


def test_validation_errors():
    good = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(UserError, match=r"\(3, 4\).*\(5, 8\)"):
        knn_search(good, np.ones((5, 8), dtype=np.float32))
    bad = good.copy()
    bad[1, 2] = np.nan
    with pytest.raises(UserError, match="gallery features contain NaN"):
        knn_search(good, bad)
    bad[1, 2] = np.inf
    with pytest.raises(UserError, match="query features contain NaN or inf"):
        knn_search(bad, good)
    with pytest.raises(UserError, match="gallery features are empty"):
        knn_search(good, np.ones((0, 4), dtype=np.float32))
    with pytest.raises(UserError, match="query features must be a 2-D array"):
        knn_search(np.ones(4, dtype=np.float32), good)
    with pytest.raises(UserError, match="k must be a positive integer"):
        knn_search(good, good, k=0)


def test_use_gpu_true_follows_faiss_support(data):
    query, gallery, _, order = data
    if faiss_gpu_available():
        _, ranks = knn_search(query, gallery, k=10, use_gpu=True)
        np.testing.assert_array_equal(ranks, order[:, :10])
    else:
        with pytest.raises(UserError, match="faiss has no GPU support"):
            knn_search(query, gallery, k=10, use_gpu=True)


def test_gpu_index_goes_on_this_ranks_gpu(data, monkeypatch):
    """With faiss-gpu the gallery goes on the GPU torch uses in this process (local rank 2 here), never
    on GPU 0 for every rank. A stand-in faiss records the device id and searches with the CPU index."""
    import faiss

    query, gallery, _, order = data
    placed = []

    class StandInGpu:
        StandardGpuResources = object
        IndexFlatIP = faiss.IndexFlatIP

        @staticmethod
        def get_num_gpus():
            return 4

        @staticmethod
        def index_cpu_to_gpu(resources, device, index):
            placed.append(device)
            return index

    monkeypatch.setitem(__import__("sys").modules, "faiss", StandInGpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    _, ranks = knn_search(query, gallery, k=10, use_gpu=True)
    assert placed == [2]
    np.testing.assert_array_equal(ranks, order[:, :10])
