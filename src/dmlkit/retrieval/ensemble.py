"""Multi-backbone ensembling of embeddings."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def concatenate(parts: list[np.ndarray], weights: list[float], block: int = 65536) -> np.ndarray:
    """L2-normalise each member's embedding, scale by its weight, concatenate, renormalise.

    Written into the output `block` rows at a time: memory is the output plus one block (at 1.1M
    rows × 512-d the whole-array version peaked at +6.4 GB for a 2.25 GB result)."""
    if not parts:
        raise ValueError("ensemble: no member embeddings")
    rows = {len(p) for p in parts}
    if len(rows) != 1:
        raise ValueError(f"ensemble: members embed different numbers of images: {sorted(rows)}")
    out = np.empty((rows.pop(), sum(p.shape[1] for p in parts)), np.float32)
    for start in range(0, len(out), block):
        column = 0
        for part, weight in zip(parts, weights, strict=True):
            width = part.shape[1]
            out[start : start + block, column : column + width] = l2_normalise(part[start : start + block]) * weight
            column += width
        out[start : start + block] = l2_normalise(out[start : start + block])
    return out


def concatenate_views(parts: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """`concatenate`, view by view where the parts are (N, views, E) (an image and its mirror)."""
    if parts and parts[0].ndim == 3:
        return np.stack([concatenate([p[:, v] for p in parts], weights) for v in range(parts[0].shape[1])], axis=1)
    return concatenate(parts, weights)


def pca_whiten(
    embeddings: np.ndarray, fit_rows: np.ndarray, dim: int | None = None, also: np.ndarray | None = None
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """PCA whitening fitted on the rows in `fit_rows` (the training images), applied to all, renormalised.
    With `also` (the mirrors' embeddings), that array whitened by the same fit too: (embeddings, also)."""
    fit = embeddings[fit_rows]
    n_components = min(dim or embeddings.shape[1], len(fit) - 1, embeddings.shape[1])
    pca = PCA(n_components=n_components, whiten=True, random_state=0).fit(fit)
    whitened = l2_normalise(pca.transform(embeddings))
    return whitened if also is None else (whitened, l2_normalise(pca.transform(also)))
