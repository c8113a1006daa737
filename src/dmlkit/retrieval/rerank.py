"""Re-ranking: k-reciprocal (Zhong et al. 2017) on a sparse kNN graph, and the distractor penalty.

k-reciprocal re-ranking as in the reference code, with d = 2 − 2·cos (squared distance of unit
vectors, not column-normalised), but built from the top-K graph of all N = queries + gallery
points: every matrix is sparse with O(k1²) entries per row, so memory grows with N·k, not N².
Distances the graph lacks (expansion members beyond a point's own top-K) come from the vectors.
Only each query's own top gallery candidates (from the query→gallery search) are re-scored.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..runtime import progress_bar


def _reciprocal(neighbours: np.ndarray) -> np.ndarray:
    """Mask (N, k): neighbour j of i is k-reciprocal (i is among j's first k)."""
    n = len(neighbours)
    mask = np.zeros(neighbours.shape, dtype=bool)
    for start in range(0, n, 65536):
        block = neighbours[start : start + 65536]
        back = neighbours[block]  # (b, k, k)
        mask[start : start + 65536] = (back == np.arange(start, start + len(block))[:, None, None]).any(axis=2)
    return mask


def _row_dots(vectors: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """vectors[rows[i]] · vectors[cols[i, j]] for a (n, w) column array (entries < 0 → 0)."""
    gathered = vectors[np.clip(cols, 0, None)]
    return np.einsum("nd,nwd->nw", vectors[rows], gathered)


def k_reciprocal_encoding(
    vectors: np.ndarray, graph: np.ndarray, k1: int, k2: int, progress: bool = True
) -> sp.csr_matrix:
    """The (N, N) sparse V of the reference code, after the k2 local query expansion."""
    n = len(vectors)
    if graph.shape[1] < k1 + 1:
        raise ValueError(
            f"k-reciprocal re-ranking needs a kNN graph of at least k1+1={k1 + 1} neighbours, got {graph.shape[1]}"
        )
    half = int(np.around(k1 / 2))
    forward = graph[:, : k1 + 1]
    forward_half = graph[:, : half + 1]
    recip = np.where(_reciprocal(forward), forward, -1)  # R(i), padded with -1
    recip_half = np.where(_reciprocal(forward_half), forward_half, -1)
    half_sizes = (recip_half >= 0).sum(axis=1)

    width = (k1 + 1) * (half + 2)
    chunk = max(1, min(8192, (1 << 26) // (width * max(vectors.shape[1], k1 + 1))))
    counts_out, cols_out, vals_out = [], [], []
    for start in progress_bar(range(0, n, chunk), "k-reciprocal", progress, unit="chunk"):
        stop = min(n, start + chunk)
        r = recip[start:stop]  # (b, k1+1)
        valid_j = r >= 0
        cand = recip_half[np.clip(r, 0, None)]  # (b, k1+1, half+1)
        in_r = (cand[..., None] == r[:, None, None, :]) & (cand[..., None] >= 0)
        overlap = in_r.any(axis=3).sum(axis=2)
        accepted = valid_j & (overlap > (2.0 / 3.0) * half_sizes[np.clip(r, 0, None)])
        members = np.concatenate([r, np.where(accepted[..., None], cand, -1).reshape(len(r), -1)], axis=1)
        members.sort(axis=1)
        duplicate = np.zeros_like(members, dtype=bool)
        duplicate[:, 1:] = members[:, 1:] == members[:, :-1]
        keep = (members >= 0) & ~duplicate
        kept = keep.sum(axis=1)
        # compact: the kept members first, so that only about as many vectors as kept are gathered
        order = np.argsort(~keep, axis=1, kind="stable")[:, : max(1, int(kept.max()))]
        members = np.take_along_axis(members, order, axis=1)
        keep = np.take_along_axis(keep, order, axis=1)
        dist = 2.0 - 2.0 * _row_dots(vectors, np.arange(start, stop), members)
        weight = np.where(keep, np.exp(-dist), 0.0)
        weight /= weight.sum(axis=1, keepdims=True)
        # CSR pieces straight away (rows are in order): int32 indices and float32 weights keep the
        # matrices at ~8 bytes per entry, which is what bounds memory at a million points
        counts_out.append(kept)
        cols_out.append(members[keep].astype(np.int32))
        vals_out.append(weight[keep].astype(np.float32))
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts_out))]).astype(np.int64)
    v = sp.csr_matrix((np.concatenate(vals_out), np.concatenate(cols_out), indptr), shape=(n, n))
    del cols_out, vals_out
    if k2 > 1:
        local = graph[:, :k2].astype(np.int32)
        expand = sp.csr_matrix(
            (np.full(local.size, 1.0 / k2, np.float32), local.ravel(), np.arange(0, local.size + 1, k2)), shape=(n, n)
        )
        v = (expand @ v).tocsr()
    return v


def jaccard_distance(v: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """1 − Σmin/Σmax between rows of V for each (rows[i], cols[i]) pair; V's rows sum to 1."""
    out = np.empty(len(rows))
    step = 1 << 16
    for start in range(0, len(rows), step):
        a = v[rows[start : start + step]]
        b = v[cols[start : start + step]]
        l1 = np.asarray(abs(a - b).sum(axis=1)).ravel()
        smin = (np.asarray(a.sum(axis=1)).ravel() + np.asarray(b.sum(axis=1)).ravel() - l1) / 2.0
        out[start : start + step] = 1.0 - smin / (2.0 - smin)
    return out


def k_reciprocal_rerank(
    queries: np.ndarray,
    gallery: np.ndarray,
    graph: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lam: float = 0.3,
    candidates: np.ndarray | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-ranked (distances, gallery indices), each (Q, C), best first; -1 (distance inf) pads.

    `graph` is the (N, K ≥ k1+1) kNN graph of all points [queries; gallery] against themselves,
    each row starting with the point itself: it shapes the k-reciprocal encoding only. The re-scored
    gallery images are `candidates` (Q, C), each query's own nearest gallery images from the
    query→gallery search (-1 padded) — not the gallery points of its graph row, which near-duplicate
    queries can fill with each other. Default: each query's gallery points among its graph row.
    """
    n_queries = len(queries)
    vectors = np.concatenate([queries, gallery]).astype(np.float32)
    v = k_reciprocal_encoding(vectors, graph, k1, k2, progress)
    if candidates is None:
        candidates = gallery_candidates(graph, n_queries, graph.shape[1])
    candidates = np.asarray(candidates)
    valid = candidates >= 0
    columns = np.where(valid, candidates + n_queries, 0)
    rows = np.repeat(np.arange(n_queries), candidates.shape[1])
    jaccard = jaccard_distance(v, rows, columns.ravel()).reshape(candidates.shape)
    original = 2.0 - 2.0 * _row_dots(vectors, np.arange(n_queries), columns)
    final = np.where(valid, (1.0 - lam) * jaccard + lam * original, np.inf)
    best = np.argsort(final, axis=1, kind="stable")
    ids = np.where(np.take_along_axis(valid, best, axis=1), np.take_along_axis(candidates, best, axis=1), -1)
    return np.take_along_axis(final, best, axis=1), ids


def gallery_candidates(graph: np.ndarray, n_queries: int, width: int) -> np.ndarray:
    """(Q, width) gallery indices among each query's graph row, in graph order, -1 padded."""
    rows = graph[:n_queries]
    is_gallery = rows >= n_queries
    order = np.argsort(~is_gallery, axis=1, kind="stable")[:, :width]
    picked = np.take_along_axis(rows, order, axis=1)
    return np.where(np.take_along_axis(is_gallery, order, axis=1), picked - n_queries, -1)


def distractor_penalty(gallery_to_distractors: np.ndarray, k: int) -> np.ndarray:
    """GLR2020 1st: per gallery (or query) image, the mean of its top-k similarities to distractors."""
    return np.asarray(gallery_to_distractors)[:, :k].mean(axis=1)


def penalised_similarity(
    sims: np.ndarray, ids: np.ndarray, gallery_penalty: np.ndarray, query_penalty: np.ndarray | None = None
) -> np.ndarray:
    """clamp(cos, 0, 1) − B[gallery] (− C[query]) for each (query, neighbour) of a kNN result."""
    out = np.clip(sims, 0.0, 1.0) - gallery_penalty[np.clip(ids, 0, None)]
    if query_penalty is not None:
        out = out - query_penalty[:, None]
    return np.where(ids >= 0, out, -np.inf)  # padding (-1) stays last


__all__ = [
    "distractor_penalty",
    "jaccard_distance",
    "k_reciprocal_encoding",
    "k_reciprocal_rerank",
    "penalised_similarity",
]
