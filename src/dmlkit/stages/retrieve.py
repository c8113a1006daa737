"""Retrieval and post-processing: kNN → α-QE/DBA → k-reciprocal re-ranking → distractor penalty →
label voting → unknown threshold / confidence calibration, each step switchable in the config.

The same chain runs on the validation fold (queries: the fold's images; gallery: the other
folds) to report the score after each step and to tune the threshold, then on the test set.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..competitions import Adapter, Calibration, Predictions
from ..config import MemberConfig, RetrieveConfig
from ..evaluation import knn_validation_scores, validation_scores
from ..retrieval.expansion import database_augmentation, query_expansion
from ..retrieval.rerank import distractor_penalty, k_reciprocal_rerank, penalised_similarity
from ..retrieval.search import knn
from ..retrieval.voting import fuse_head, head_label_scores, vote
from .folds import fold_parts

log = logging.getLogger(__name__)


@dataclass
class Neighbours:
    sims: np.ndarray
    ids: np.ndarray
    # GLR2020 1st's query-side penalty C: subtracted from each query's landmark confidence (it
    # shifts all of a query's similarities alike, so it changes no ranking, only the GAP order)
    query_offset: np.ndarray | None = None


def _search(cfg: RetrieveConfig, queries: np.ndarray, gallery: np.ndarray, k: int, progress: bool) -> Neighbours:
    sims, ids = knn(
        queries,
        gallery,
        k=k,
        kind=cfg.index,
        batch=cfg.query_batch,
        use_gpu=cfg.use_gpu,
        nlist=cfg.nlist,
        nprobe=cfg.nprobe,
        hnsw_m=cfg.hnsw_m,
        progress=progress,
    )
    return Neighbours(sims, ids)


def check_finite(name: str, array: np.ndarray) -> None:
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise FloatingPointError(
            f"{name}: {int(bad.sum())} embedding row(s) contain NaN/inf (first rows "
            f"{np.flatnonzero(bad)[:5].tolist()}); refusing to search"
        )


def run_chain(
    cfg: RetrieveConfig,
    queries: np.ndarray,
    gallery: np.ndarray,
    distractors: np.ndarray | None = None,
    on_step=None,
    progress: bool = True,
) -> Neighbours:
    """The post-processing chain for one (queries, gallery) pair; `on_step(name, neighbours)` after each."""
    check_finite("queries", queries)
    check_finite("gallery", gallery)
    k = min(len(gallery), max(cfg.k, cfg.voting.k, cfg.qe.k + 1, cfg.rerank.k1 + 1))
    result = _search(cfg, queries, gallery, k, progress)
    if on_step:
        on_step("kNN", result)
    if cfg.dba.enabled or cfg.qe.enabled:
        if cfg.dba.enabled:
            self_graph = _search(cfg, gallery, gallery, min(len(gallery), cfg.dba.k + 1), progress)
            gallery = database_augmentation(gallery, self_graph.sims, self_graph.ids, cfg.dba.alpha, cfg.dba.k)
            result = _search(cfg, queries, gallery, k, progress)
        if cfg.qe.enabled:
            queries = query_expansion(queries, gallery, result.sims, result.ids, cfg.qe.alpha, cfg.qe.k)
            result = _search(cfg, queries, gallery, k, progress)
        if on_step:
            on_step("+ QE/DBA", result)
    if cfg.rerank.enabled:
        both = np.concatenate([queries, gallery])
        # the joint graph only shapes the encoding; the re-scored candidates are each query's own
        # nearest gallery images (near-duplicate queries would fill each other's graph rows)
        graph_k = min(len(both), max(cfg.rerank.k1 + 1, cfg.rerank.k2))
        graph = _search(cfg, both, both, graph_k, progress).ids
        dist, ids = k_reciprocal_rerank(
            queries, gallery, graph, cfg.rerank.k1, cfg.rerank.k2, cfg.rerank.lambda_, result.ids, progress
        )
        result = Neighbours((1.0 - dist).astype(np.float32), ids)
        if on_step:
            on_step("+ re-ranking", result)
    if cfg.penalty.enabled and distractors is not None and len(distractors):
        gallery_pen = distractor_penalty(
            _search(cfg, gallery, distractors, cfg.penalty.k_gallery, progress).sims, cfg.penalty.k_gallery
        )
        query_pen = (
            distractor_penalty(
                _search(cfg, queries, distractors, cfg.penalty.k_query, progress).sims, cfg.penalty.k_query
            )
            if cfg.penalty.query_side
            else None
        )
        sims = penalised_similarity(result.sims, result.ids, gallery_pen)
        order = np.argsort(-sims, axis=1, kind="stable")
        result = Neighbours(
            np.take_along_axis(sims, order, 1), np.take_along_axis(result.ids, order, 1), query_offset=query_pen
        )
        if on_step:
            on_step("+ distractor penalty", result)
    return result


@dataclass
class ValidationSplit:
    """The validation fold's images (queries) against the other folds' known images (gallery), as
    rows of the table; queries of classes the gallery lacks are unknown."""

    query_rows: np.ndarray
    query_labels: np.ndarray
    query_known: np.ndarray
    gallery_rows: np.ndarray
    gallery_labels: np.ndarray


def table_rows(table: pd.DataFrame, role: str, ids: pd.Series) -> np.ndarray:
    """The table rows of `role` images with these ids."""
    row_of = {i: n for n, (r, i) in enumerate(zip(table["role"], table["id"], strict=True)) if r == role}
    return np.array([row_of[i] for i in ids], dtype=int)


def distractor_rows(table: pd.DataFrame) -> np.ndarray:
    """The penalty's non-landmark images: the configured pool, else the competition's index images."""
    pool = (table["role"] == "distractor").to_numpy()
    return np.flatnonzero(pool if pool.any() else (table["role"] == "index").to_numpy())


def validation_split(table: pd.DataFrame, folds: pd.DataFrame, val_fold: int) -> ValidationSplit:
    train_part = folds[(folds["fold"] != val_fold) & folds["known"]]
    val_part = folds[folds["fold"] == val_fold]
    return ValidationSplit(
        query_rows=table_rows(table, "train", val_part["id"]),
        query_labels=val_part["label"].to_numpy(),
        query_known=(val_part["known"] & val_part["label"].isin(set(train_part["label"]))).to_numpy(dtype=bool),
        gallery_rows=table_rows(table, "train", train_part["id"]),
        gallery_labels=train_part["label"].to_numpy(),
    )


def validation_report(
    cfg: RetrieveConfig,
    adapter: Adapter,
    split: ValidationSplit,
    embeddings: np.ndarray,
    member_embeddings: dict[str, np.ndarray],
    distractors: np.ndarray | None,
    head_scores: Callable[[np.ndarray], list[dict[str, float]]] | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, Calibration]:
    """The validation score after each step of the chain (members alone first, when several), then
    with the calibration tuned on the last step, which the test predictions use."""
    metric = adapter.metric
    fixed = None if cfg.unknown_threshold == "tune" else float(cfg.unknown_threshold)
    report: list[dict] = []

    def record(step: str, out: dict) -> dict:
        report.append({"step": step, metric: out["plain"], "recall@1": out["recall@1"]})
        return out

    def score(step: str, neighbours: Neighbours, heads: list[dict[str, float]] | None = None) -> dict:
        out = validation_scores(
            adapter,
            neighbours.sims,
            neighbours.ids,
            split.query_labels,
            split.query_known,
            split.gallery_labels,
            cfg.voting.k,
            cfg.voting.power,
            confidence_offset=neighbours.query_offset,
            unknown_threshold=fixed,
            head_scores=heads,
            head_weight=cfg.voting.head_weight,
        )
        return record(step, out)

    if len(member_embeddings) > 1:
        for name, emb in member_embeddings.items():
            queries, gallery = emb[split.query_rows], emb[split.gallery_rows]
            out = knn_validation_scores(
                adapter,
                queries,
                split.query_labels,
                split.query_known,
                gallery,
                split.gallery_labels,
                cfg.voting.k,
                cfg.voting.power,
            )
            record(f"kNN, member {name} alone", out)
    steps: list[tuple[str, Neighbours]] = []
    final = run_chain(
        cfg,
        embeddings[split.query_rows],
        embeddings[split.gallery_rows],
        distractors,
        lambda step, neighbours: steps.append((step, neighbours)),
        progress,
    )
    last: dict = {}
    for step, neighbours in steps:
        last = score(step if step != "kNN" or len(member_embeddings) == 1 else "kNN, ensemble", neighbours)
    if head_scores is not None and metric != "map@100":
        last = score(f"+ head fusion (w={cfg.voting.head_weight})", final, head_scores(split.query_rows))
    calibration = Calibration(threshold=last.get("threshold"), confidence=last.get("confidence"))
    step = calibration.step_name(adapter.unknown_label)
    if step:
        report.append({"step": step, metric: last["score"], "recall@1": last["recall@1"]})
    return pd.DataFrame(report), calibration


def test_predictions(
    cfg: RetrieveConfig,
    formats: list[Adapter],
    table: pd.DataFrame,
    gallery_rows: np.ndarray,
    gallery_labels: np.ndarray,
    embeddings: np.ndarray,
    calibration: Calibration,
    head_scores: Callable[[np.ndarray], list[dict[str, float]]] | None = None,
    progress: bool = True,
) -> dict[str, Predictions]:
    """Each format's predictions for the test images: labels voted from the labelled gallery, or
    (retrieval formats) the ranked index images."""
    test_rows = np.flatnonzero((table["role"] == "test").to_numpy())
    test_ids = table["id"].to_numpy()[test_rows].tolist()
    index_rows = np.flatnonzero((table["role"] == "index").to_numpy())
    if calibration.threshold is None:
        default = 0.0 if cfg.unknown_threshold == "tune" else float(cfg.unknown_threshold)
        calibration = Calibration(threshold=default, confidence=calibration.confidence)
    predictions: dict[str, Predictions] = {}
    for fmt in formats:
        if fmt.gallery_role == "index":
            if len(index_rows) == 0:
                raise ValueError(f"{fmt.name}: the competition has no index images to retrieve from")
            result = run_chain(cfg, embeddings[test_rows], embeddings[index_rows], progress=progress)
            index_ids = table["id"].to_numpy()[index_rows]
            neighbours = [[index_ids[j] for j in row if j >= 0] for row in result.ids]
            predictions[fmt.name] = fmt.predict(Predictions(test_ids, neighbours=neighbours), calibration)
            continue
        distractors = embeddings[distractor_rows(table)] if cfg.penalty.enabled else None
        result = run_chain(cfg, embeddings[test_rows], embeddings[gallery_rows], distractors, progress=progress)
        fill = fmt.max_predictions > 1  # every MAP@5 row carries 5 labels
        labels, scores = vote(result.sims, result.ids, gallery_labels, cfg.voting.k, cfg.voting.power, fill=fill)
        if head_scores is not None:
            labels, scores = fuse_head(labels, scores, head_scores(test_rows), cfg.voting.head_weight, cfg.voting.power)
        ranked = Predictions(test_ids, labels=labels, scores=scores)
        predictions[fmt.name] = fmt.predict(ranked, calibration, result.query_offset)
    return predictions


def retrieve(
    cfg: RetrieveConfig,
    adapter: Adapter,
    formats: list[Adapter],
    table: pd.DataFrame,
    folds: pd.DataFrame,
    embeddings: np.ndarray,
    member_embeddings: dict[str, np.ndarray],
    val_fold: int,
    progress: bool = True,
    member_heads: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[dict[str, Predictions], pd.DataFrame, dict]:
    """Validation report, tuned settings and test predictions for every submission format.

    `member_heads` maps a member to (labels, cosines), each (N, k): its head's best classes per row.
    """
    head_scores = None
    if cfg.voting.head_weight > 0 and member_heads:
        head_scores = lambda rows: head_label_scores(member_heads, rows)  # noqa: E731
    split = validation_split(table, folds, val_fold)
    if len(split.query_rows) == 0:
        log.warning("retrieve: validation fold %d is empty; no report and default thresholds", val_fold)
        report, calibration = pd.DataFrame(), Calibration()
    else:
        distractors = embeddings[distractor_rows(table)] if cfg.penalty.enabled else None
        report, calibration = validation_report(
            cfg, adapter, split, embeddings, member_embeddings, distractors, head_scores, progress
        )
    known_train = folds[folds["known"]]
    predictions = test_predictions(
        cfg,
        formats,
        table,
        table_rows(table, "train", known_train["id"]),
        known_train["label"].to_numpy(),
        embeddings,
        calibration,
        head_scores,
        progress,
    )
    return predictions, report, calibration.tuned()


def warn_leaky_members(members: list[MemberConfig], val_fold: int) -> None:
    leaky = [m.name for m in members if m.fold != val_fold]
    if leaky:
        log.warning(
            "retrieve: members %s trained on validation fold %d's images: the ensemble's validation "
            "scores (and tuned thresholds) are optimistic",
            leaky,
            val_fold,
        )


def save_retrieval_grid(
    path: Path,
    table: pd.DataFrame,
    folds: pd.DataFrame,
    embeddings: np.ndarray,
    fold: int,
    queries: int = 6,
    k: int = 5,
) -> Path | None:
    """A PNG of a few validation queries and their top-k training neighbours (right ones green)."""
    from ..data.images import read_image
    from ..plots import plot_retrieval_grid

    train, val = fold_parts(folds, fold)
    val = val[val["known"]]
    if val.empty or train.empty:
        return None
    chosen = val.iloc[np.random.default_rng(0).permutation(len(val))[:queries]]
    _, ids = knn(
        embeddings[table_rows(table, "train", chosen["id"])],
        embeddings[table_rows(table, "train", train["id"])],
        k=min(k, len(train)),
        progress=False,
    )
    labels, paths = train["label"].to_numpy(), train["path"].to_numpy()
    plot_retrieval_grid(
        chosen["path"].tolist(),
        [[paths[j] for j in row] for row in ids],
        [[labels[j] == q for j in row] for row, q in zip(ids, chosen["label"], strict=True)],
        path,
        read_image,
        f"validation fold {fold}: queries (left) and their {k} nearest training images",
    )
    return path


def write_retrieval(work: Path, predictions: dict[str, Predictions], report: pd.DataFrame) -> None:
    for name, pred in predictions.items():
        (work / f"predictions-{name}.json").write_text(json.dumps(pred.__dict__))
    report.to_csv(work / "report.csv", index=False)
