"""retrieve.cluster on the pipeline's arrays: the threshold tuned on the validation fold's queries
(whose identities, unseen classes included, are known), the test clustered with it, and a cluster's
known identity attached to its images answered "new". No I/O."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..competitions import Predictions
from ..config.schema import ClusterConfig
from ..metrics import clustering_scores
from .clusters import attach_known, cluster_by_similarity, tune_cluster_threshold
from .search import as_views

log = logging.getLogger(__name__)
THRESHOLD_GRID = np.round(np.arange(-0.2, 1.0, 0.02), 3)
MIN_GROUPED_SHARE = 0.2  # of the tuning images sharing an identity, below which a tuned threshold is doubtful


def pair_similarities(embeddings: np.ndarray) -> np.ndarray:
    """(N, N) cosine of every pair of rows, the best over their views (original and mirror)."""
    views = as_views(np.asarray(embeddings, dtype=np.float32))
    best = np.full((len(views), len(views)), -np.inf, dtype=np.float32)
    for a in range(views.shape[1]):
        for b in range(views.shape[1]):
            np.maximum(best, views[:, a] @ views[:, b].T, out=best)
    return best


def identity_truths(labels: Sequence[str], unknown_label: str | None) -> list[str]:
    """Each image's identity for clustering scores: its label, or for an image labelled the
    competition's unknown class (new_whale), one of its own (each is another individual)."""
    return [f"{unknown_label}#{i}" if label == unknown_label else str(label) for i, label in enumerate(labels)]


def grouped_share(truth: Sequence[str]) -> float:
    """The share of items whose identity another item shares: a threshold tuned where this is near 0
    learns to keep everything apart."""
    counts = pd.Series(list(truth)).value_counts()
    return float(counts[counts > 1].sum() / max(1, len(truth)))


def tune_clusters(
    embeddings: np.ndarray, truth: Sequence[str], tune_on: str, linkage: str, threshold: float | str = "tune"
) -> dict[str, float]:
    """The threshold (tuned on `truth` by `tune_on` unless fixed) and the ARI / AMI it gives; in-sample
    figures where tuned (the same queries choose and score it)."""
    sims = pair_similarities(embeddings)
    if threshold == "tune":
        threshold, _ = tune_cluster_threshold(
            sims, truth, THRESHOLD_GRID, lambda t, c: clustering_scores(t, c)[tune_on], linkage
        )
    clusters = cluster_by_similarity(sims, float(threshold), linkage)
    return {"threshold": float(threshold), **clustering_scores(truth, clusters), "clusters": int(len(set(clusters)))}


def cluster_answers(
    embeddings: np.ndarray,
    predictions: Predictions,
    unknown_label: str,
    threshold: float,
    linkage: str,
    attach: bool,
) -> tuple[pd.DataFrame, Predictions]:
    """Clusters the test images; (clusters: id, cluster, identity, answer) and the predictions where,
    with `attach`, an image answered "new" first whose cluster holds images answered with a known
    identity takes the identity first and "new" second. `identity` is the cluster's known identity,
    or new-<cluster> where it has none."""
    sims = pair_similarities(embeddings)
    clusters = cluster_by_similarity(sims, threshold, linkage)
    first = [row[0] if row else unknown_label for row in predictions.labels]
    known = [None if answer == unknown_label else answer for answer in first]
    attached = attach_known(clusters, known)
    out = Predictions(**{**predictions.__dict__})
    out.labels, out.scores, out.similarities = (
        [list(r) for r in predictions.labels],
        list(out.scores),
        list(out.similarities),
    )
    moved = 0
    for i, identity in enumerate(attached if attach else []):
        if first[i] == unknown_label and identity is not None:
            old = out.labels[i]
            rest = [label for label in old if label not in (identity, unknown_label)]
            out.labels[i] = [identity, unknown_label, *rest][: max(len(old), 2)]
            for field in ("scores", "similarities"):  # each label keeps its own score
                values = getattr(out, field)
                if i < len(values) and len(values[i]) == len(old):
                    by_label = dict(zip(old, values[i], strict=True))
                    values[i] = [by_label.get(label, 0.0) for label in out.labels[i]]
            moved += 1
    frame = pd.DataFrame(
        {
            "id": predictions.ids,
            "cluster": clusters,
            "identity": [a if a is not None else f"new-{c}" for a, c in zip(attached, clusters.tolist(), strict=True)],
            "answer": [row[0] if row else "" for row in out.labels],
        }
    )
    frame.attrs["attached"] = moved
    return frame, out


def cluster_test(  # the tuning rows and labels, then the views that embed them and the test
    c: ClusterConfig,
    unknown_label: str,
    tune_rows: np.ndarray,
    tune_labels: np.ndarray,
    validation_view: np.ndarray,
    test_view: np.ndarray,
    predictions: Predictions,
) -> tuple[dict, pd.DataFrame, Predictions, dict] | None:
    """retrieve.cluster: the threshold from labelled images the members never saw (`tune_rows` of
    `validation_view`: the validation fold's queries and its held-out classes; fixed where configured;
    their ARI / AMI in the report row), the test's clusters (`test_view`: the test rows' embeddings),
    its predictions with known identities attached and a summary for the manifest; None where nothing
    can tune it."""
    row: dict = {"step": "  · clusters of the validation images"}
    threshold = c.threshold
    if len(tune_rows) > 1:
        truth = identity_truths(tune_labels, unknown_label)
        if c.threshold == "tune" and grouped_share(truth) < MIN_GROUPED_SHARE:
            log.warning(
                "retrieve.cluster: only %.0f%% of the validation images share their identity with another one: the "
                "tuned threshold learns to keep images apart. Hold whole classes out (folds.unknown_classes: 0.2) or "
                "set retrieve.cluster.threshold", 100 * grouped_share(truth),
            )  # fmt: skip
        got = tune_clusters(validation_view[tune_rows], truth, c.tune_on, c.linkage, c.threshold)
        threshold = got["threshold"]
        tuned = f"tuned on {c.tune_on.upper()}, in-sample" if c.threshold == "tune" else "fixed"
        row = {"step": f"  · clusters of {len(tune_rows)} validation images (cosine {threshold:.2f}, {tuned})", **got}
        log.info("retrieve.cluster: %s", row)
    elif threshold == "tune":  # found after training: a warning, not an error that loses the run
        log.warning("retrieve.cluster: no validation queries to tune the threshold on; set retrieve.cluster.threshold")
        return None
    clusters, predictions = cluster_answers(
        test_view, predictions, unknown_label, float(threshold), c.linkage, c.attach
    )
    summary = {
        "threshold": float(threshold),
        "attached": clusters.attrs["attached"],
        "clusters": int(clusters["cluster"].nunique()),
    }
    log.info(
        "retrieve.cluster: %d test images in %d clusters; %d answered '%s' took their cluster's known identity",
        len(clusters), summary["clusters"], summary["attached"], unknown_label,
    )  # fmt: skip
    return row, clusters, predictions, summary
