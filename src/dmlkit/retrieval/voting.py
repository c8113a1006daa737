"""Label prediction from neighbours, unknown-class insertion and its threshold."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..metrics import map_at_5


def vote(
    sims: np.ndarray,
    ids: np.ndarray,
    gallery_labels: np.ndarray,
    k: int,
    power: float,
    top: int = 5,
    fill: bool = False,
) -> tuple[list[list[str]], list[list[float]]]:
    """Per query, up to `top` labels ranked by Σ over its top-k neighbours with that label of
    max(sim,0)^power. With `fill`, while a row has fewer than `top`, the labels of the neighbours
    beyond k follow, nearest first, each scored by its neighbour's own max(sim,0)^power (never above
    a voted label's score: neighbours are sorted) — an empty MAP@5 slot can only lose."""
    weights = np.clip(sims, 0, None) ** power
    neighbour_labels = np.where(ids >= 0, gallery_labels[np.clip(ids, 0, None)], None)
    labels_out: list[list[str]] = []
    scores_out: list[list[float]] = []
    for row_labels, row_weights in zip(neighbour_labels, weights, strict=True):
        totals: dict[str, float] = {}
        for label, weight in zip(row_labels[:k], row_weights[:k], strict=True):
            if label is not None:
                totals[label] = totals.get(label, 0.0) + float(weight)
        ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:top]
        beyond = zip(row_labels[k:], row_weights[k:], strict=True) if fill else ()
        for label, weight in beyond:
            if len(ranked) >= top:
                break
            if label is not None and label not in totals:
                totals[label] = float(weight)
                ranked.append((label, float(weight)))
        labels_out.append([label for label, _ in ranked])
        scores_out.append([score for _, score in ranked])
    return labels_out, scores_out


def label_similarities(
    labels: list[list[str]], sims: np.ndarray, ids: np.ndarray, gallery_labels: np.ndarray
) -> list[list[float]]:
    """Per query, each ranked label's best neighbour cosine (neighbours sorted best first; 0 for a
    label no neighbour carries, e.g. one the head added)."""
    out = []
    for row_labels, row_sims, row_ids in zip(labels, sims, ids, strict=True):
        wanted, best = set(row_labels), {}
        for sim, j in zip(row_sims, row_ids, strict=True):
            if len(best) == len(wanted):
                break
            label = gallery_labels[j] if j >= 0 else None
            if label in wanted and label not in best:
                best[label] = float(sim)
        out.append([best.get(label, 0.0) for label in row_labels])
    return out


def threshold_for_share(top_scores: np.ndarray, share: float) -> float:
    """The threshold below which `share` of these top scores fall: the unknown label goes first on
    that share of the queries (Happywhale 1st fixed it at 16.5% of the test)."""
    ordered = np.sort(np.asarray(top_scores, dtype=float))
    count = int(round(share * len(ordered)))
    return float(ordered[count]) if count < len(ordered) else float("inf")


def fuse_head(
    labels: list[list[str]],
    scores: list[list[float]],
    head: list[dict[str, float]],
    weight: float,
    power: float,
    top: int = 5,
) -> tuple[list[list[str]], list[list[float]]]:
    """(1−w)·vote + w·max(cos,0)^power per label, over the union of voted and head-predicted labels."""
    out_labels, out_scores = [], []
    for row_labels, row_scores, row_head in zip(labels, scores, head, strict=True):
        fused = {label: (1 - weight) * score for label, score in zip(row_labels, row_scores, strict=True)}
        for label, cos in row_head.items():
            fused[label] = fused.get(label, 0.0) + weight * max(cos, 0.0) ** power
        ranked = sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:top]
        out_labels.append([label for label, _ in ranked])
        out_scores.append([score for _, score in ranked])
    return out_labels, out_scores


def insert_unknown(
    labels: list[list[str]], scores: list[list[float]], unknown: str, threshold: float | Sequence[float], top: int = 5
) -> list[list[str]]:
    """Put `unknown` before the first label whose score is below the threshold (whale style); a
    sequence gives each row its own threshold."""
    thresholds = [threshold] * len(labels) if np.isscalar(threshold) else list(threshold)
    out = []
    for row_labels, row_scores, bar in zip(labels, scores, thresholds, strict=True):
        position = next((i for i, s in enumerate(row_scores) if s < bar), len(row_labels))
        merged = [*row_labels[:position], unknown, *row_labels[position:]]
        out.append(merged[:top])
    return out


def threshold_grid(scores: list[list[float]]) -> np.ndarray:
    """Candidate unknown thresholds: 41 quantiles of the queries' top votes, plus 0 and +inf."""
    top_scores = np.array([s[0] for s in scores if s] or [0.0])
    return np.unique(np.concatenate([np.quantile(top_scores, np.linspace(0, 1, 41)), [0.0, np.inf]]))


def best_threshold(evaluate: Callable[[float], float], grid: Sequence[float]) -> tuple[float, float]:
    """The first threshold of the grid with the highest `evaluate(threshold)`, and that value."""
    best = (float("-inf"), -1.0)
    for threshold in grid:
        score = evaluate(float(threshold))
        if score > best[1] + 1e-12:
            best = (float(threshold), score)
    return best


def tune_unknown_threshold(
    labels: list[list[str]],
    scores: list[list[float]],
    truths: Sequence[str],
    unknown: str,
    grid: Sequence[float] | None = None,
) -> tuple[float, float]:
    """The threshold maximising MAP@5 on validation (truth `unknown` for unseen classes), and that score."""
    return best_threshold(
        lambda t: map_at_5(insert_unknown(labels, scores, unknown, t), truths),
        threshold_grid(scores) if grid is None else grid,
    )


def head_label_scores(
    member_heads: dict[str, tuple[np.ndarray, np.ndarray]], rows: np.ndarray
) -> list[dict[str, float]]:
    """Per row, each label's best head cosine over the members; `member_heads` maps a member to
    (labels, cosines), each (N, k): its head's best classes for every row of the table."""
    out: list[dict[str, float]] = [{} for _ in rows]
    for labels, cos in member_heads.values():
        for i, (row_labels, row_cos) in enumerate(zip(labels[rows], cos[rows], strict=True)):
            for label, value in zip(row_labels, row_cos, strict=True):
                out[i][label] = max(out[i].get(label, -1.0), float(value))
    return out


def landmark_confidence(labels: list[list[str]], scores: list[list[float]], form: str) -> np.ndarray:
    """One confidence per query for GAP ordering.

    vote: the top label's vote; margin: top vote minus the runner-up (clear winners first);
    share: the top vote's share of all votes times the top vote.
    """
    conf = np.zeros(len(labels))
    for i, row in enumerate(scores):
        if not row:
            continue
        if form == "vote":
            conf[i] = row[0]
        elif form == "margin":
            conf[i] = row[0] - (row[1] if len(row) > 1 else 0.0)
        elif form == "share":
            conf[i] = row[0] * row[0] / max(sum(row), 1e-12)
        else:
            raise ValueError(f"unknown confidence form '{form}'")
    return conf


CONFIDENCE_FORMS = ("vote", "margin", "share")


__all__ = ["insert_unknown", "landmark_confidence", "tune_unknown_threshold", "vote"]
