"""Fusion of the global similarity with local-feature inlier counts, as functions over arrays.

Each query's first `top_k` candidates carry an inlier count; the rest were not verified.
- additive (GLR2019 3rd, the GLR2020 DELG baseline): score + w·min(inliers, cap)/cap;
- calibrated (WildFusion): the global cosine and the inlier count each mapped to P(same class)
  by an isotonic regression fitted on validation pairs, the two probabilities averaged;
- stacked (AnimalCLEF 2025 2nd/7th, bestfitting GLR2020): P(same class) from gradient-boosted trees
  over each pair's signals together (`PAIR_FEATURES`), fitted on validation pairs; its validation
  score is cross-fitted (no query is scored by trees that saw its pairs).
Both keep a row's unverified candidates in their global order, below or among the verified ones
by their fused score, and return rows re-sorted best first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.isotonic import IsotonicRegression


def resort(sims: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's candidates ordered by score, best first (ties keep their order)."""
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def _padded(inliers: np.ndarray, width: int) -> np.ndarray:
    """Inlier counts widened to every candidate column (0 where not verified)."""
    out = np.zeros((len(inliers), width), np.float32)
    out[:, : inliers.shape[1]] = inliers[:, :width]
    return out


def additive_fusion(sims: np.ndarray, inliers: np.ndarray, weight: float, cap: float) -> np.ndarray:
    """score + weight·min(inliers, cap)/cap, column for column (unverified columns unchanged)."""
    bonus = np.minimum(_padded(inliers, sims.shape[1]), cap) / cap
    return (sims + weight * bonus).astype(np.float32)


@dataclass(frozen=True)
class Calibrator:
    """A monotone map from a score to P(same class), as the breakpoints of an isotonic fit
    (linear in between, clipped outside: what IsotonicRegression.predict does)."""

    x: np.ndarray
    y: np.ndarray

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return np.interp(values, self.x, self.y).astype(np.float32)

    @staticmethod
    def fit(values: np.ndarray, same: np.ndarray) -> Calibrator:
        if len(values) == 0:
            raise ValueError("calibration needs at least one validation pair")
        model = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0.0, y_max=1.0)
        model.fit(np.asarray(values, np.float64), np.asarray(same, np.float64))
        return Calibrator(np.asarray(model.X_thresholds_, np.float64), np.asarray(model.y_thresholds_, np.float64))

    def to_json(self) -> dict:
        return {"x": self.x.tolist(), "y": self.y.tolist()}


@dataclass(frozen=True)
class CalibratedFusion:
    global_score: Calibrator
    inliers: Calibrator

    @staticmethod
    def fit(sims: np.ndarray, inliers: np.ndarray, same: np.ndarray) -> CalibratedFusion:
        """Fitted on the verified (query, candidate) pairs: sims and inliers (Q, top_k), `same`
        true where the candidate's label is the query's."""
        width = inliers.shape[1]
        return CalibratedFusion(
            Calibrator.fit(sims[:, :width].ravel(), same[:, :width].ravel()),
            Calibrator.fit(inliers.ravel(), same[:, :width].ravel()),
        )

    def __call__(self, sims: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        """The average of the two probabilities; an unverified candidate counts as 0 inliers."""
        return 0.5 * (self.global_score(sims) + self.inliers(_padded(inliers, sims.shape[1])))

    def to_json(self) -> dict:
        return {"global": self.global_score.to_json(), "inliers": self.inliers.to_json()}


PAIR_FEATURES = ("cosine", "rank", "cosine - the row's best", "inliers", "inliers / the row's most", "verified")
STACK_FOLDS = 5


def pair_features(sims: np.ndarray, inliers: np.ndarray) -> np.ndarray:
    """(Q, K, len(PAIR_FEATURES)) per candidate: its signals alone and against its row's."""
    q, k = sims.shape
    counts = _padded(inliers, k)
    most = np.maximum(counts.max(axis=1, keepdims=True), 1.0)
    verified = np.zeros((q, k), np.float32)
    verified[:, : inliers.shape[1]] = 1.0
    rank = np.broadcast_to(np.arange(k, dtype=np.float32), (q, k))
    parts = (sims, rank, sims - sims[:, :1], counts, counts / most, verified)
    return np.stack([np.asarray(p, np.float32) for p in parts], axis=2)


@dataclass(frozen=True)
class StackedFusion:
    """scikit-learn's HistGradientBoostingClassifier over `pair_features`: P(same class) per pair."""

    model: object

    @staticmethod
    def fit(sims: np.ndarray, inliers: np.ndarray, same: np.ndarray, seed: int = 0) -> StackedFusion:
        """Fitted on the verified pairs (the first inliers.shape[1] columns) of these rows."""
        from sklearn.ensemble import HistGradientBoostingClassifier  # loads only for fusion: stacked

        width = inliers.shape[1]
        x = pair_features(sims, inliers)[:, :width].reshape(-1, len(PAIR_FEATURES))
        y = np.asarray(same[:, :width]).ravel().astype(int)
        if len(np.unique(y)) < 2:
            raise ValueError("stacked fusion needs validation pairs of one class and of two")
        model = HistGradientBoostingClassifier(
            max_iter=200, max_leaf_nodes=15, l2_regularization=1.0, random_state=seed
        )
        return StackedFusion(model.fit(x, y))

    def __call__(self, sims: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        x = pair_features(sims, inliers).reshape(-1, len(PAIR_FEATURES))
        return self.model.predict_proba(x)[:, 1].reshape(sims.shape).astype(np.float32)

    def to_json(self) -> dict:
        return {"features": list(PAIR_FEATURES), "iterations": int(self.model.n_iter_)}


def cross_fitted(sims: np.ndarray, inliers: np.ndarray, same: np.ndarray, folds: int = STACK_FOLDS) -> np.ndarray:
    """P(same) of every pair from trees fitted on the other folds' rows (queries dealt round-robin)."""
    out = np.zeros(sims.shape, np.float32)
    part = np.arange(len(sims)) % folds
    width = inliers.shape[1]
    for fold in range(min(folds, len(sims))):
        held = part == fold
        rest = np.asarray(same[~held][:, :width])
        if rest.all() or not rest.any():  # the other folds hold one kind of pair: its rate is all they say
            out[held] = float(rest.mean()) if rest.size else 0.0
            continue
        model = StackedFusion.fit(sims[~held], inliers[~held], same[~held], seed=fold)
        out[held] = model(sims[held], inliers[held])
    return out


ADDITIVE_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
ADDITIVE_CAPS = (5, 10, 20, 40, 70)


def tune_additive(
    sims: np.ndarray,
    ids: np.ndarray,
    inliers: np.ndarray,
    score: Callable[[np.ndarray, np.ndarray], float],
    weights: Sequence[float] = ADDITIVE_WEIGHTS,
    caps: Sequence[float] = ADDITIVE_CAPS,
) -> tuple[float, float, float]:
    """(weight, cap, score) of the grid point whose fused, re-sorted rows `score` best (the first
    such in grid order, so weight 0 — no change — wins ties)."""
    best = (0.0, float(caps[0]), -np.inf)
    for weight in weights:
        for cap in caps if weight > 0 else caps[:1]:
            value = score(*resort(additive_fusion(sims, inliers, weight, cap), ids))
            if value > best[2]:
                best = (float(weight), float(cap), float(value))
    return best


__all__ = [
    "PAIR_FEATURES",
    "CalibratedFusion",
    "Calibrator",
    "StackedFusion",
    "additive_fusion",
    "cross_fitted",
    "pair_features",
    "resort",
    "tune_additive",
]
