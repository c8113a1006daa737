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
import torch

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


def bf16_product_error(norms: torch.Tensor, rough: torch.Tensor, dim: int) -> torch.Tensor:
    """Bound on |bf16 product − exact inner product| for vectors whose norms multiply to at most
    `norms`, given the bf16 result `rough`: each input rounded to bf16 (unit roundoff u = 2⁻⁸) errs by
    at most (2u + u²)·Σ|qᵢgᵢ| ≤ (2u + u²)·|q|·|g|, the fp32 accumulation by dim·2⁻²⁴·|q|·|g|, and
    the bf16 output rounding by u·|exact| ≤ u·(|rough| + the rest)."""
    inputs = (2.0**-7 + 2.0**-16 + dim * 2.0**-24) * norms
    return inputs + 2.0**-8 * (rough.abs() + inputs)


def flat_bf16_knn(
    queries: np.ndarray, gallery: np.ndarray, k: int, batch: int = 2048, candidates: int | None = None, progress=True
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: bf16 products over the gallery pick each query's `candidates`
    (default 2k) best, which are re-scored in fp32; the top k of those, best first.

    A bf16 product is within `bf16_product_error` of the exact one. A neighbour outside the
    candidates scores at most the last candidate's bf16 score plus that bound; where this reaches
    the k-th exact score (near-duplicates crowding the boundary) the query is searched in fp32
    instead, so the result is exact either way. Memory: the gallery once
    more in bf16, and batch × N bf16 scores."""
    k = min(k, len(gallery))
    wanted = min(len(gallery), max(k, candidates or 2 * k))
    exact = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32))
    low = exact.to(torch.bfloat16)
    largest = float(exact.norm(dim=1).max())
    sims = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    starts = range(0, len(queries), batch)
    for start in progress_bar(starts, "knn (bf16)", progress and len(starts) >= 4, unit="batch"):
        q = torch.from_numpy(np.ascontiguousarray(queries[start : start + batch], dtype=np.float32))
        rough, picked = (q.to(torch.bfloat16) @ low.T).topk(wanted, dim=1, sorted=False)
        scores = torch.empty(picked.shape, dtype=torch.float32)
        for row in range(0, len(q), 256):  # fp32 re-scoring, a few hundred MB at a time
            block = picked[row : row + 256]
            scores[row : row + 256] = torch.einsum("qd,qkd->qk", q[row : row + 256], exact[block])
        best, order = scores.topk(k, dim=1)
        found = picked.gather(1, order)
        if wanted < len(gallery):
            last = rough.float().min(dim=1).values
            bound = bf16_product_error(q.norm(dim=1) * largest, last, q.shape[1])
            unsure = (last + bound >= best[:, -1]).nonzero().flatten()
            if len(unsure):
                best[unsure], found[unsure] = (q[unsure] @ exact.T).topk(k, dim=1)
        sims[start : start + batch] = best.numpy()
        ids[start : start + batch] = found.numpy()
    return sims, ids


def knn(
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

    `kind`: flat (faiss, exact), flat_bf16 (exact top-k from bf16 candidates, fp32 scores; CPU; slower
    than faiss on the 2-core CPU measured, see the README), ivf or hnsw."""
    k = min(k, len(gallery))
    if kind == "flat_bf16":
        return flat_bf16_knn(queries, gallery, k, min(batch, 2048), progress=progress)
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
