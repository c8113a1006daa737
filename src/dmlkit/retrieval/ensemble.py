"""Multi-backbone ensembling of embeddings."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def concatenate(parts: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """L2-normalise each member's embedding, scale by its weight, concatenate, renormalise."""
    if not parts:
        raise ValueError("ensemble: no member embeddings")
    rows = {len(p) for p in parts}
    if len(rows) != 1:
        raise ValueError(f"ensemble: members embed different numbers of images: {sorted(rows)}")
    return l2_normalise(np.concatenate([l2_normalise(p) * w for p, w in zip(parts, weights, strict=True)], axis=1))


def pca_whiten(embeddings: np.ndarray, fit_rows: np.ndarray, dim: int | None = None) -> np.ndarray:
    """PCA whitening fitted on the rows in `fit_rows` (the training images), applied to all, renormalised."""
    fit = embeddings[fit_rows]
    n_components = min(dim or embeddings.shape[1], len(fit) - 1, embeddings.shape[1])
    pca = PCA(n_components=n_components, whiten=True, random_state=0).fit(fit)
    return l2_normalise(pca.transform(embeddings))
