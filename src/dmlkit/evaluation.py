"""Validation scoring: neighbours → votes → the competition's own predictions → its metric.

The predictions and the score come from the adapter (`predict`, `score_predictions`), the same
code that writes and scores submissions, so validation, `score` and the local leaderboard share
one scoring path. Calibration (the unknown threshold, the GAP confidence form) is tuned here.
"""

from __future__ import annotations

import numpy as np

from .competitions import Adapter, Calibration, Predictions
from .metrics import recall_at_k
from .retrieval.search import knn
from .retrieval.voting import fuse_head, vote


def validation_scores(
    adapter: Adapter,
    sims: np.ndarray,
    ids: np.ndarray,
    query_labels: np.ndarray,
    query_known: np.ndarray,
    gallery_labels: np.ndarray,
    k: int = 5,
    power: float = 3.0,
    confidence_offset: np.ndarray | None = None,
    unknown_threshold: float | None = None,
    head_scores: list[dict[str, float]] | None = None,
    head_weight: float = 0.0,
) -> dict:
    """The competition's metric on a validation split from its kNN result `(sims, ids)` (best first),
    plus Recall@1 on the known queries.

    `plain` is the score before calibration (no unknown label; the raw vote as GAP confidence),
    `score` the calibrated one (with `unknown_threshold` when given, else the tuned threshold), and
    the calibration's fields (`threshold` or `confidence`).
    """
    labels, scores = vote(sims, ids, gallery_labels, k, power, fill=adapter.max_predictions > 1)
    if head_scores is not None and head_weight > 0:
        labels, scores = fuse_head(labels, scores, head_scores, head_weight, power)
    known = np.asarray(query_known, dtype=bool)
    out: dict = {
        "recall@1": recall_at_k(gallery_labels[ids[known, :1]], query_labels[known], 1) if known.any() else 0.0
    }
    rows, truths = adapter.validation_truths(query_labels, known, gallery_labels)
    ranked = Predictions(
        ids=[str(i) for i in rows],
        labels=[labels[i] for i in rows],
        scores=[scores[i] for i in rows],
        neighbours=[[str(j) for j in ids[i] if j >= 0] for i in rows],
    )
    offset = None if confidence_offset is None else confidence_offset[rows]

    def score(calibration: Calibration) -> float:
        return adapter.score_predictions(adapter.predict(ranked, calibration, offset), truths)

    calibration, calibrated = adapter.calibrate(score, ranked.scores, unknown_threshold)
    out["score"] = calibrated
    out.update(calibration.tuned())
    out["plain"] = score(Calibration())
    return out


def knn_validation_scores(
    adapter: Adapter,
    queries: np.ndarray,
    query_labels: np.ndarray,
    query_known: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    k: int = 5,
    power: float = 3.0,
) -> dict:
    """`validation_scores` after an exact kNN search of the queries in the gallery."""
    sims, ids = knn(queries, gallery, k=min(len(gallery), max(100, k)), progress=False)
    return validation_scores(adapter, sims, ids, query_labels, query_known, gallery_labels, k, power)
