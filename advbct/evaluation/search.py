"""Nearest-neighbour search for retrieval: L2-normalised embeddings, inner product, faiss ``IndexFlatIP``.

Uses a faiss GPU index when faiss was built with GPU support and sees a GPU, else the CPU index.
"""

import numpy as np

from advbct.errors import UserError

# faiss GPU k-selection supports k <= 2048; larger k (e.g. full rankings) runs on the CPU index.
GPU_MAX_K = 2048


def _to_numpy(x):
    """A numpy view of ``x``; torch tensors (any device) are detached and moved to the CPU first."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def l2_normalize(x, eps=1e-12):
    """Rows of ``x`` divided by their L2 norm, as C-contiguous float32 (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("...i,...i->...", x, x))[..., None]  # no (n, dim) temporary
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=np.float32)


def _validate(query, gallery):
    """Raise :class:`UserError` unless both are non-empty, finite 2-D arrays of the same dimension."""
    for name, arr in (("query", query), ("gallery", gallery)):
        if arr.ndim != 2:
            raise UserError(f"{name} features must be a 2-D array (n, dim), got shape {arr.shape}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise UserError(f"{name} features are empty (shape {arr.shape}); expected at least one row and column")
    if query.shape[1] != gallery.shape[1]:
        raise UserError(
            f"query features {query.shape} and gallery features {gallery.shape} differ in dimension"
        )
    for name, arr in (("query", query), ("gallery", gallery)):
        if not np.issubdtype(arr.dtype, np.number) or not _all_finite(arr):
            raise UserError(f"{name} features contain NaN or inf values (or are not numeric)")


def _all_finite(arr, block=65536):
    """``np.isfinite(arr).all()`` by row blocks, without a boolean copy of a large gallery."""
    return all(np.isfinite(arr[start:start + block]).all() for start in range(0, arr.shape[0], block))


def _import_faiss():
    """The ``faiss`` module; without it one line naming the two ways to install it."""
    try:
        import faiss
    except ImportError as exc:
        raise UserError(f"faiss is not installed ({exc}): pip install -e .[cpu] (faiss-cpu), or on a machine "
                        f"with NVIDIA GPUs pip install -e .[gpu] (faiss-gpu-cu12); never both") from None
    return faiss


def faiss_gpu_available():
    """True when the installed faiss has GPU support and sees at least one GPU."""
    faiss = _import_faiss()

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def faiss_gpu_id():
    """The faiss device id of this process's GPU: torch's current device (the rank's GPU, set when the
    process group starts), numbered as faiss numbers them (both count the visible devices). Not 0: on a
    node of 8 ranks, 0 would put every rank's gallery on the first GPU."""
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _build_index(gallery, use_gpu, k, chunk_size):
    """An exact inner-product index over the L2-normalised ``gallery``; on a GPU when asked/available
    and k allows it. Rows are normalised and added chunk by chunk so no full normalised copy is made."""
    faiss = _import_faiss()

    if use_gpu == "auto":
        want_gpu = faiss_gpu_available()
    elif use_gpu is True:
        if not faiss_gpu_available():
            raise UserError("use_gpu=True but faiss has no GPU support or sees no GPU (install faiss-gpu)")
        want_gpu = True
    elif use_gpu is False:
        want_gpu = False
    else:
        raise UserError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
    index = faiss.IndexFlatIP(gallery.shape[1])
    for start in range(0, gallery.shape[0], chunk_size):
        index.add(l2_normalize(gallery[start:start + chunk_size]))
    if want_gpu and k <= GPU_MAX_K:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, faiss_gpu_id(), index)
        del index
        return gpu_index, resources  # keep the resources alive as long as the index
    return index, None


def knn_search(query, gallery, k=None, chunk_size=4096, use_gpu="auto"):
    """Top-k gallery neighbours of each query by cosine similarity; ``(scores, ranks)``.

    Both sets are L2-normalised (float32) and searched exactly with inner product. ``k=None`` gives the
    full ranking (k = n_gallery); k larger than the gallery is clipped to it. Queries are searched in
    chunks of ``chunk_size`` rows to bound faiss' working memory (the gallery is normalised in chunks
    of at least 65,536 rows). Returns float32 scores and int64
    gallery indices, both (n_query, k), best first.
    """
    query = _to_numpy(query)
    gallery = _to_numpy(gallery)
    _validate(query, gallery)
    n_gallery = gallery.shape[0]
    if k is None:
        k = n_gallery
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise UserError(f"k must be a positive integer or None (full ranking), got {k!r}")
    k = min(int(k), n_gallery)
    if int(chunk_size) < 1:
        raise UserError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk_size = int(chunk_size)

    index, _resources = _build_index(gallery, use_gpu, k, max(chunk_size, 65536))
    n_query = query.shape[0]
    scores = np.empty((n_query, k), dtype=np.float32)
    ranks = np.empty((n_query, k), dtype=np.int64)
    for start in range(0, n_query, chunk_size):
        stop = min(start + chunk_size, n_query)
        s, r = index.search(l2_normalize(query[start:stop]), k)
        scores[start:stop] = s
        ranks[start:stop] = r
    return scores, ranks
