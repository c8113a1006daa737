"""α-query expansion and database-side augmentation over a precomputed kNN graph."""

from __future__ import annotations

import numpy as np


def weighted_neighbour_mean(
    vectors: np.ndarray,
    own: np.ndarray,
    sims: np.ndarray,
    ids: np.ndarray,
    alpha: float,
    k: int,
    rows_per_chunk: int | None = None,
) -> np.ndarray:
    """normalise(own + Σ_{j<k} max(sim_j,0)^α · vectors[ids_j]) for each row (neighbours best first).

    `own` is each row's own vector (weight 1); for DBA over the gallery pass the gallery itself and
    a graph whose first neighbour is the row itself, which is skipped.
    """
    ids = ids[:, :k]
    weights = np.clip(sims[:, :k], 0, None) ** alpha
    weights = np.where(ids >= 0, weights, 0.0).astype(np.float32)
    out = np.array(own, dtype=np.float32, copy=True)
    # the (rows, k, D) gather stays ~64 MB: memory grows with N·k, not N·k·D
    step = rows_per_chunk or max(1, (1 << 24) // max(1, k * vectors.shape[1]))
    for start in range(0, len(out), step):
        gathered = vectors[np.clip(ids[start : start + step], 0, None)]  # (rows, k, D)
        out[start : start + step] += np.einsum("qk,qkd->qd", weights[start : start + step], gathered)
    return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12)


def query_expansion(
    queries: np.ndarray, gallery: np.ndarray, sims: np.ndarray, ids: np.ndarray, alpha: float, k: int
) -> np.ndarray:
    """α-QE: each query becomes the weighted mean of itself and its top-k gallery neighbours."""
    return weighted_neighbour_mean(gallery, queries, sims, ids, alpha, k)


def database_augmentation(
    gallery: np.ndarray, self_sims: np.ndarray, self_ids: np.ndarray, alpha: float, k: int
) -> np.ndarray:
    """DBA: each gallery vector becomes the weighted mean of itself and its top-k other gallery vectors.

    `self_sims/self_ids` is the gallery's kNN graph against itself, the row itself first.
    """
    return weighted_neighbour_mean(gallery, gallery, self_sims[:, 1:], self_ids[:, 1:], alpha, k)


__all__ = ["database_augmentation", "query_expansion", "weighted_neighbour_mean"]
