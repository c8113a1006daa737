"""Official competition metrics, as pure functions (definitions in docs/metrics.md)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np


def _present(value: object) -> bool:
    return value is not None and value == value and str(value) != ""  # value == value: not NaN


def global_average_precision(
    query_ids: Sequence[str],
    pred_labels: Sequence[str | None],
    pred_scores: Sequence[float],
    true_labels: Sequence[str | None],
) -> float:
    """GAP (Google Landmark Recognition): one (label, score) per query, or none.

    Predictions are ranked by score descending, ties by query id ascending. Every prediction
    advances the rank (also on non-landmark queries, where it is wrong). Queries without a
    prediction are not ranked. M counts the queries that have a true landmark.
    """
    if not (len(query_ids) == len(pred_labels) == len(pred_scores) == len(true_labels)):
        raise ValueError("GAP: query_ids, pred_labels, pred_scores and true_labels differ in length")
    m = sum(1 for t in true_labels if _present(t))
    if m == 0:
        return 0.0
    ranked = sorted(
        (
            (-float(score), str(qid), str(pred), true)
            for qid, pred, score, true in zip(query_ids, pred_labels, pred_scores, true_labels, strict=True)
            if _present(pred)
        ),
    )
    correct = 0
    total = 0.0
    for i, (_, _, pred, true) in enumerate(ranked, start=1):
        if _present(true) and pred == str(true):
            correct += 1
            total += correct / i
    return total / m


def average_precision_at_k(predicted: Sequence[str], relevant: set[str], k: int = 100) -> float:
    """AP@k for one retrieval query: duplicates ignored, normalised by min(|relevant|, k)."""
    if not relevant:
        raise ValueError("average precision is undefined for a query without relevant items")
    seen: set[str] = set()
    hits = 0
    total = 0.0
    rank = 0
    for item in predicted:
        if item in seen:
            continue
        seen.add(item)
        rank += 1
        if rank > k:
            break
        if item in relevant:
            hits += 1
            total += hits / rank
    return total / min(len(relevant), k)


def mean_average_precision_at_k(
    predictions: Sequence[Sequence[str]], relevant: Sequence[set[str]], k: int = 100
) -> float:
    """mAP@k (Google Landmark Retrieval, k=100), averaged over all given queries."""
    if len(predictions) != len(relevant):
        raise ValueError("mAP@k: predictions and relevant sets differ in length")
    if not predictions:
        return 0.0
    return float(np.mean([average_precision_at_k(p, r, k) for p, r in zip(predictions, relevant, strict=True)]))


def map_at_5(predictions: Sequence[Sequence[str]], truths: Sequence[str]) -> float:
    """MAP@5 (whale identification): 1/rank of the first correct label among the first 5."""
    if len(predictions) != len(truths):
        raise ValueError("MAP@5: predictions and truths differ in length")
    if not truths:
        return 0.0
    total = 0.0
    for predicted, truth in zip(predictions, truths, strict=True):
        for rank, label in enumerate(list(predicted)[:5], start=1):
            if label == truth:
                total += 1.0 / rank
                break
    return total / len(truths)


def recall_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Share of queries whose top-k neighbours contain their own label (neighbours best first)."""
    neighbour_labels = np.asarray(neighbour_labels)
    if neighbour_labels.ndim != 2 or len(neighbour_labels) != len(query_labels):
        raise ValueError("recall@k: neighbour_labels must be (queries, k') and match query_labels")
    if len(query_labels) == 0:
        return 0.0
    hits = (neighbour_labels[:, :k] == np.asarray(query_labels)[:, None]).any(axis=1)
    return float(hits.mean())


def open_set_scores(top1: Sequence[str], truths: Sequence[str], unknown_label: str) -> dict[str, float | None]:
    """AnimalCLEF 2025's open-set identification scores from each query's first answer.

    BAKS: accuracy balanced over the known identities (each identity's share of its images answered
    with it, averaged over identities); BAUS: the share of the unknown images (truth
    `unknown_label`) answered `unknown_label`; `open_set`: their geometric mean, the leaderboard's
    score. None where a side has no images."""
    by_identity: dict[str, list[bool]] = {}
    unknown_right = []
    for answer, truth in zip(top1, truths, strict=True):
        if truth == unknown_label:
            unknown_right.append(answer == unknown_label)
        else:
            by_identity.setdefault(truth, []).append(answer == truth)
    baks = float(np.mean([np.mean(v) for v in by_identity.values()])) if by_identity else None
    baus = float(np.mean(unknown_right)) if unknown_right else None
    both = baks is not None and baus is not None
    return {"baks": baks, "baus": baus, "open_set": float(np.sqrt(baks * baus)) if both else None}


def clustering_scores(truths: Sequence[str], clusters: Sequence[object]) -> dict[str, float]:
    """AnimalCLEF 2026's clustering score (ARI, the leaderboard's) and AMI, of predicted cluster ids
    against true identities; both are label-permutation invariant, 1 for the same partition and
    about 0 for a random one (scikit-learn's definitions)."""
    from sklearn import metrics as sk  # heavy (~1 s): `score` loads it for clusters only

    if len(truths) != len(clusters):
        raise ValueError(f"clustering scores: {len(truths)} identities for {len(clusters)} cluster ids")
    truth = [str(t) for t in truths]
    predicted = [str(c) for c in clusters]
    with warnings.catch_warnings():  # many singletons read to scikit-learn like a regression target: not here
        warnings.simplefilter("ignore", UserWarning)
        return {
            "ari": float(sk.adjusted_rand_score(truth, predicted)),
            "ami": float(sk.adjusted_mutual_info_score(truth, predicted)),
        }


__all__ = [
    "average_precision_at_k",
    "clustering_scores",
    "global_average_precision",
    "map_at_5",
    "mean_average_precision_at_k",
    "open_set_scores",
    "recall_at_k",
]
