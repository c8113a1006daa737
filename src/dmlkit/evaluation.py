"""Validation scoring: neighbours → votes → the competition's own predictions → its metric.

The predictions and the score come from the adapter (`predict`, `score_predictions`), the same
code that writes and scores submissions, so validation, `score` and the local leaderboard share
one scoring path. Calibration (the unknown threshold and the score it applies to, the GAP
confidence form) is tuned here, on one fold or on several folds' queries pooled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .competitions import Adapter, Calibration, Predictions
from .metrics import recall_at_k
from .retrieval.search import knn
from .retrieval.voting import fuse_head, label_similarities, vote


@dataclass
class RankedQueries:
    """Validation queries ready to be calibrated and scored: their ranked labels (votes and best
    cosines) or neighbours, their truths as the adapter scores them, and Recall@1."""

    ranked: Predictions
    truths: list
    offset: np.ndarray | None
    recall_at_1: float
    known: int

    @staticmethod
    def pool(parts: list[RankedQueries]) -> RankedQueries:
        """Several folds' queries as one set (ids renumbered; Recall@1 weighted by known queries)."""
        known = sum(p.known for p in parts)
        offsets = [p.offset if p.offset is not None else np.zeros(len(p.truths)) for p in parts]
        joined = Predictions(
            ids=[str(i) for i in range(sum(len(p.truths) for p in parts))],
            labels=[row for p in parts for row in p.ranked.labels],
            scores=[row for p in parts for row in p.ranked.scores],
            neighbours=[row for p in parts for row in p.ranked.neighbours],
            similarities=[row for p in parts for row in p.ranked.similarities],
            groups=[g for p in parts for g in p.ranked.groups],
        )
        return RankedQueries(
            joined,
            [t for p in parts for t in p.truths],
            np.concatenate(offsets) if any(p.offset is not None for p in parts) else None,
            sum(p.recall_at_1 * p.known for p in parts) / max(1, known),
            known,
        )


@dataclass(frozen=True)
class LabelledQueries:
    """Validation queries' labels and whether the gallery holds their class (`query_known`), the
    gallery's labels, and (per-group thresholds) each query's group."""

    query_labels: np.ndarray
    query_known: np.ndarray
    gallery_labels: np.ndarray
    query_groups: np.ndarray | None = None

    @staticmethod
    def of(queries: pd.DataFrame, gallery: pd.DataFrame) -> LabelledQueries:
        """From a fold's validation and training rows (their `label` and `known` columns)."""
        return LabelledQueries(
            queries["label"].to_numpy(), queries["known"].to_numpy(dtype=bool), gallery["label"].to_numpy()
        )


@dataclass(frozen=True)
class Voting:
    """Label voting over the k nearest neighbours, each with weight similarity^power; with
    `head_weight`, the members' head classes fused into the votes."""

    k: int = 5
    power: float = 3.0
    head_weight: float = 0.0


PLAIN_VOTING = Voting()


def rank_queries(
    adapter: Adapter,
    sims: np.ndarray,
    ids: np.ndarray,
    labels: LabelledQueries,
    voting: Voting = PLAIN_VOTING,
    confidence_offset: np.ndarray | None = None,
    head_scores: list[dict[str, float]] | None = None,
) -> RankedQueries:
    """Votes of each query's kNN result `(sims, ids)` (best first), restricted to the queries the
    adapter scores, with their truths (and their groups, for per-group thresholds)."""
    gallery_labels, query_labels, query_groups = labels.gallery_labels, labels.query_labels, labels.query_groups
    labels_, scores = vote(sims, ids, gallery_labels, voting.k, voting.power, fill=adapter.max_predictions > 1)
    if head_scores is not None and voting.head_weight > 0:
        labels_, scores = fuse_head(labels_, scores, head_scores, voting.head_weight, voting.power)
    known = np.asarray(labels.query_known, dtype=bool)
    recall = recall_at_k(gallery_labels[ids[known, :1]], query_labels[known], 1) if known.any() else 0.0
    rows, truths = adapter.validation_truths(query_labels, known, gallery_labels)
    similarities = label_similarities(labels_, sims, ids, gallery_labels)
    ranked = Predictions(
        ids=[str(i) for i in rows],
        labels=[labels_[i] for i in rows],
        scores=[scores[i] for i in rows],
        neighbours=[[str(j) for j in ids[i] if j >= 0] for i in rows],
        similarities=[similarities[i] for i in rows],
        groups=[] if query_groups is None else [str(query_groups[i]) for i in rows],
    )
    offset = None if confidence_offset is None else confidence_offset[rows]
    return RankedQueries(ranked, truths, offset, recall, int(known.sum()))


def plain_score(adapter: Adapter, queries: RankedQueries) -> float:
    """The score before calibration: no unknown label, the raw vote as GAP confidence."""
    return adapter.score_predictions(adapter.predict(queries.ranked, Calibration(), queries.offset), queries.truths)


def score_queries(adapter: Adapter, queries: RankedQueries, fixed: Calibration | None = None) -> dict:
    """Recall@1, the calibrated `score` with the calibration's fields, `plain` (no unknown label,
    the raw vote as GAP confidence), and for identification the unknown-detection figures."""

    def score(calibration: Calibration) -> float:
        predictions = adapter.predict(queries.ranked, calibration, queries.offset)
        return adapter.score_predictions(predictions, queries.truths)

    calibration, calibrated = adapter.calibrate(score, queries.ranked, fixed or Calibration())
    out: dict = {"recall@1": queries.recall_at_1, "score": calibrated}
    out.update(calibration.tuned())
    out["plain"] = plain_score(adapter, queries)
    final = adapter.predict(queries.ranked, calibration, queries.offset)
    out.update(adapter.unknown_report(final, queries.truths))
    return out


def calibrated_scores(adapter: Adapter, queries: RankedQueries, calibration: Calibration) -> dict:
    """Recall@1, the score and the unknown-detection figures under this calibration as it stands."""
    predictions = adapter.predict(queries.ranked, calibration, queries.offset)
    score = adapter.score_predictions(predictions, queries.truths)
    return {"recall@1": queries.recall_at_1, "score": score, **adapter.unknown_report(predictions, queries.truths)}


def subset(queries: RankedQueries, rows: np.ndarray) -> RankedQueries:
    """These rows of the validation queries (Recall@1 kept: it is not tuned on)."""
    r = queries.ranked
    pick = lambda values: [values[i] for i in rows] if values else []  # noqa: E731
    ranked = Predictions(
        pick(r.ids), pick(r.labels), pick(r.scores), pick(r.neighbours), pick(r.similarities), pick(r.groups)
    )
    offset = None if queries.offset is None else queries.offset[rows]
    return RankedQueries(ranked, pick(queries.truths), offset, queries.recall_at_1, queries.known)


def tune_group_thresholds(
    adapter: Adapter, queries: RankedQueries, calibration: Calibration, min_queries: int
) -> dict[str, float]:
    """Per group with at least `min_queries` validation queries, the unknown threshold that scores
    best on its queries alone (on the score kind the global calibration chose). MAP@5 is a mean over
    queries, so each group's best threshold is the best for the whole set; smaller groups keep the
    global threshold."""
    groups = np.array(queries.ranked.groups, dtype=object)
    out: dict[str, float] = {}
    for group in sorted(set(groups)):
        rows = np.flatnonzero(groups == group)
        if len(rows) < min_queries:
            continue
        part = subset(queries, rows)

        def score(c: Calibration, part: RankedQueries = part) -> float:
            return adapter.score_predictions(adapter.predict(part.ranked, c, part.offset), part.truths)

        tuned, _ = adapter.calibrate(score, part.ranked, Calibration(unknown_score=calibration.unknown_score))
        out[str(group)] = float(tuned.threshold)
    return out


def knn_validation_scores(
    adapter: Adapter,
    queries: np.ndarray,
    gallery: np.ndarray,
    labels: LabelledQueries,
    voting: Voting = PLAIN_VOTING,
) -> dict:
    """The competition's metric on one validation split after an exact kNN search of the queries
    in the gallery (see `score_queries`: Recall@1, the tuned `score`, the `plain` one, ...)."""
    sims, ids = knn(queries, gallery, k=min(len(gallery), max(100, voting.k)), progress=False)
    return score_queries(adapter, rank_queries(adapter, sims, ids, labels, voting))
