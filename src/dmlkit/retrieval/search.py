"""Exact or approximate inner-product kNN with faiss; GPU when it works, CPU otherwise.

A broken faiss GPU setup can abort the whole process, so the GPU is probed once in a child
process; only when the child succeeds are GPU indexes built here. With several GPUs the index
is sharded across them. Queries go in batches so memory stays bounded by the batch.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys

import faiss
import numpy as np

from ..runtime import progress_bar

log = logging.getLogger(__name__)

_PROBE = """
import faiss, numpy as np
assert faiss.get_num_gpus() > 0
res = faiss.StandardGpuResources()
index = faiss.GpuIndexFlatIP(res, 8)
x = np.random.rand(16, 8).astype('float32')
index.add(x)
d, i = index.search(x, 2)
assert (i[:, 0] == np.arange(16)).all()
"""


GPU_MAX_K = 2048  # faiss-gpu's largest k (and IVF nprobe): a larger one fails inside the search


@functools.lru_cache(maxsize=1)
def gpu_usable() -> bool:
    """True when faiss sees a GPU and a tiny GPU search succeeds in a child process."""
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return False
    try:
        result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("faiss GPU probe could not run (%s); searching on CPU", exc)
        return False
    if result.returncode != 0:
        log.warning(
            "faiss GPU probe failed (exit %s): %s; searching on CPU",
            result.returncode,
            result.stderr.decode(errors="replace").strip().splitlines()[-1:] or "",
        )
        return False
    return True


def build_index(
    gallery: np.ndarray,
    kind: str = "flat",
    nlist: int = 1024,
    nprobe: int = 16,
    hnsw_m: int = 32,
    use_gpu: str = "auto",
) -> faiss.Index:
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    dim = gallery.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = max(1, min(nlist, len(gallery) // 39 or 1))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(gallery)
        index.nprobe = nprobe
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown index type '{kind}' (flat, ivf, hnsw)")
    want_gpu = use_gpu == "yes" or (use_gpu == "auto" and kind != "hnsw")
    if want_gpu and gpu_usable():
        try:
            options = faiss.GpuMultipleClonerOptions()
            options.shard = True
            index = faiss.index_cpu_to_all_gpus(index, co=options)
            log.info("faiss: %s index on %d GPU(s)", kind, faiss.get_num_gpus())
        except (RuntimeError, AttributeError) as exc:
            log.warning("faiss GPU index failed (%s); searching on CPU", exc)
    elif use_gpu == "yes":
        log.warning("faiss: use_gpu=yes but no usable GPU; searching on CPU")
    index.add(gallery)
    return index


def knn(  # the index kind and its faiss options as keywords, as retrieve.* names them
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    kind: str = "flat",
    batch: int = 16384,
    use_gpu: str = "auto",
    nlist: int = 1024,
    nprobe: int = 16,
    hnsw_m: int = 32,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices), each (Q, k), best first; indices -1 where fewer than k exist.

    `kind`: flat (faiss, exact), ivf or hnsw. Queries or gallery of shape (N, views, E) (each image
    and its mirror: embed.flip_gallery) are searched view by view: see `knn_over_views`."""
    options = {"kind": kind, "batch": batch, "use_gpu": use_gpu, "nlist": nlist, "nprobe": nprobe, "hnsw_m": hnsw_m}
    if queries.ndim == 3 or gallery.ndim == 3:
        return knn_over_views(queries, gallery, k, progress=progress, **options)
    k = min(k, len(gallery))
    if use_gpu != "no" and (k > GPU_MAX_K or (kind == "ivf" and nprobe > GPU_MAX_K)):
        if use_gpu == "yes" or getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
            log.info("faiss: k=%d / nprobe=%d over faiss-gpu's limit of %d; searching on CPU", k, nprobe, GPU_MAX_K)
        use_gpu = "no"
    index = build_index(gallery, kind, nlist, nprobe, hnsw_m, use_gpu)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    sims = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    starts = range(0, len(queries), batch)
    for start in progress_bar(starts, "knn", progress and len(starts) >= 4, unit="batch"):
        s, i = index.search(queries[start : start + batch], k)
        sims[start : start + batch], ids[start : start + batch] = s, i
    return sims, ids


MISSING = -np.finfo(np.float32).max  # faiss's similarity where fewer than k neighbours exist


def as_views(embeddings: np.ndarray) -> np.ndarray:
    """(N, views, E): a plain (N, E) array is one view."""
    return embeddings[:, None, :] if embeddings.ndim == 2 else embeddings


def knn_over_views(queries: np.ndarray, gallery: np.ndarray, k: int, progress: bool = True, **options):
    """kNN where a pair's similarity is the best over the query's and the gallery image's views
    (Happywhale 2022 1st: original and mirror). (similarities, gallery rows), each (Q, k).

    Each query view searches the gallery's views stacked as rows; a gallery row appears once per
    view, so k·views hits of each query view hold every row of the true top k (fewer than k rows
    beat it, each at most `views` times)."""
    queries, gallery = as_views(queries), as_views(gallery)
    n_views = gallery.shape[1]
    stacked = np.concatenate([gallery[:, v] for v in range(n_views)])  # view v of row i at v·N + i
    hits = [knn(queries[:, v], stacked, k * n_views, progress=progress, **options) for v in range(queries.shape[1])]
    sims = np.concatenate([h[0] for h in hits], axis=1)
    ids = np.concatenate([h[1] for h in hits], axis=1)
    return best_per_row(sims, ids, len(gallery), min(k, len(gallery)))


def best_per_row(sims: np.ndarray, ids: np.ndarray, n_rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, each gallery row (id modulo `n_rows`) once with its best similarity; the best k
    rows, descending (ties by row). Ids -1 (no hit) are dropped; missing places are (MISSING, -1)."""
    rows = np.where(ids >= 0, ids % n_rows, -1)
    order = np.lexsort((-sims, rows), axis=-1)  # by row, the row's best hit first
    rows = np.take_along_axis(rows, order, 1)
    sims = np.take_along_axis(sims, order, 1)
    first = np.ones_like(rows, dtype=bool)
    first[:, 1:] = rows[:, 1:] != rows[:, :-1]
    kept = np.where(first & (rows >= 0), sims, -np.inf)
    top = np.argsort(-kept, axis=1, kind="stable")[:, :k]
    out_sims = np.take_along_axis(kept, top, 1)
    out_ids = np.take_along_axis(rows, top, 1)
    missing = ~np.isfinite(out_sims)
    out_sims[missing], out_ids[missing] = MISSING, -1
    return out_sims.astype(np.float32), out_ids.astype(np.int64)


__all__ = ["build_index", "knn", "knn_over_views"]
