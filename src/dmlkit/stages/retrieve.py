"""Retrieval and post-processing: kNN → α-QE/DBA → k-reciprocal re-ranking → distractor penalty →
label voting → unknown threshold / confidence calibration, each step switchable in the config.

The same chain runs on the validation fold (queries: the fold's images; gallery: the other
folds) to report the score after each step and to tune the threshold, then on the test set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..competitions import Adapter, Predictions
from ..config import RetrieveConfig
from ..inference import validation_scores
from ..retrieval.expansion import database_augmentation, query_expansion
from ..retrieval.rerank import distractor_penalty, k_reciprocal_rerank, penalised_similarity
from ..retrieval.search import knn
from ..retrieval.voting import fuse_head, insert_unknown, landmark_confidence, vote

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
        graph_k = min(len(both), max(cfg.rerank.k1 + 1, k + cfg.rerank.k1))
        graph = _search(cfg, both, both, graph_k, progress).ids
        dist, ids = k_reciprocal_rerank(
            queries, gallery, graph, cfg.rerank.k1, cfg.rerank.k2, cfg.rerank.lambda_, candidates=k, progress=progress
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
    fuse = cfg.voting.head_weight > 0 and bool(member_heads)

    def head_scores(rows: np.ndarray) -> list[dict[str, float]]:
        """Per row, each label's best head cosine over the members."""
        out: list[dict[str, float]] = [{} for _ in rows]
        for labels, cos in (member_heads or {}).values():
            for i, (row_labels, row_cos) in enumerate(zip(labels[rows], cos[rows], strict=True)):
                for label, value in zip(row_labels, row_cos, strict=True):
                    out[i][label] = max(out[i].get(label, -1.0), float(value))
        return out

    row_of = {(r, i): n for n, (r, i) in enumerate(zip(table["role"], table["id"], strict=True))}
    folds = folds.copy()
    folds["row"] = [row_of[("train", i)] for i in folds["id"]]
    train_part = folds[(folds["fold"] != val_fold) & folds["known"]]
    val_part = folds[folds["fold"] == val_fold].copy()
    val_part["known"] = val_part["known"] & val_part["label"].isin(set(train_part["label"]))
    distractor_rows = np.flatnonzero((table["role"] == "index").to_numpy())
    metric = adapter.metric
    unknown = adapter.unknown_label
    report: list[dict] = []
    tuned: dict = {}

    def score(
        step: str, neighbours: Neighbours | None = None, source: np.ndarray | None = None, heads: bool = False
    ) -> dict:
        q_labels = val_part["label"].to_numpy()
        g_labels = train_part["label"].to_numpy()
        if neighbours is None:
            q, g = source[val_part["row"].to_numpy()], source[train_part["row"].to_numpy()]
            out = validation_scores(
                metric, q, q_labels, val_part["known"].to_numpy(), g, g_labels, unknown, cfg.voting.k, cfg.voting.power
            )
        else:
            out = validation_scores(
                metric,
                np.zeros((len(val_part), 1)),
                q_labels,
                val_part["known"].to_numpy(),
                np.zeros((len(train_part), 1)),
                g_labels,
                unknown,
                cfg.voting.k,
                cfg.voting.power,
                sims_ids=(neighbours.sims, neighbours.ids),
                confidence_offset=neighbours.query_offset,
                unknown_threshold=None if cfg.unknown_threshold == "tune" else float(cfg.unknown_threshold),
                head_scores=head_scores(val_part["row"].to_numpy()) if heads else None,
                head_weight=cfg.voting.head_weight,
            )
        report.append({"step": step, metric: out["plain"], "recall@1": out["recall@1"]})
        return out

    if val_part.empty:
        log.warning("retrieve: validation fold %d is empty; no report and default thresholds", val_fold)
    else:
        if len(member_embeddings) > 1:
            for name, emb in member_embeddings.items():
                score(f"kNN, member {name} alone", source=emb)
        last: dict = {}

        def on_step(step: str, neighbours: Neighbours) -> None:
            nonlocal last
            last = score(step if step != "kNN" or len(member_embeddings) == 1 else "kNN, ensemble", neighbours)

        final = run_chain(
            cfg,
            embeddings[val_part["row"].to_numpy()],
            embeddings[train_part["row"].to_numpy()],
            embeddings[distractor_rows] if cfg.penalty.enabled else None,
            on_step,
            progress,
        )
        if fuse and metric != "map@100":
            last = score(f"+ head fusion (w={cfg.voting.head_weight})", final, heads=True)
        if metric == "map@5":
            tuned["threshold"] = last["threshold"] if cfg.unknown_threshold == "tune" else float(cfg.unknown_threshold)
            report.append(
                {
                    "step": f"+ {unknown} threshold {tuned['threshold']:.4f}",
                    metric: last["score"],
                    "recall@1": last["recall@1"],
                }
            )
        elif metric == "gap":
            tuned["confidence"] = last["confidence"]
            report.append(
                {"step": f"+ confidence '{last['confidence']}'", metric: last["score"], "recall@1": last["recall@1"]}
            )

    predictions: dict[str, Predictions] = {}
    test_rows = np.flatnonzero((table["role"] == "test").to_numpy())
    test_ids = table["id"].to_numpy()[test_rows].tolist()
    known_train = folds[folds["known"]]
    for fmt in formats:
        if fmt.metric == "map@100":
            gallery_rows = np.flatnonzero((table["role"] == "index").to_numpy())
            if len(gallery_rows) == 0:
                raise ValueError(f"{fmt.name}: the competition has no index images to retrieve from")
            result = run_chain(cfg, embeddings[test_rows], embeddings[gallery_rows], progress=progress)
            index_ids = table["id"].to_numpy()[gallery_rows]
            neighbours = [[index_ids[j] for j in row if j >= 0][: fmt.max_predictions] for row in result.ids]
            predictions[fmt.name] = Predictions(ids=test_ids, neighbours=neighbours)
            continue
        gallery_rows = known_train["row"].to_numpy()
        result = run_chain(
            cfg,
            embeddings[test_rows],
            embeddings[gallery_rows],
            embeddings[distractor_rows] if cfg.penalty.enabled else None,
            progress=progress,
        )
        labels, scores = vote(result.sims, result.ids, known_train["label"].to_numpy(), cfg.voting.k, cfg.voting.power)
        if fuse:
            labels, scores = fuse_head(labels, scores, head_scores(test_rows), cfg.voting.head_weight, cfg.voting.power)
        if fmt.metric == "gap":
            conf = landmark_confidence(labels, scores, tuned.get("confidence", "vote"))
            if result.query_offset is not None:
                conf = conf - result.query_offset
            top_scores = [[float(c)] if r else [] for r, c in zip(labels, conf, strict=True)]
            predictions[fmt.name] = Predictions(ids=test_ids, labels=[r[:1] for r in labels], scores=top_scores)
        else:
            threshold = tuned.get("threshold", 0.0 if cfg.unknown_threshold == "tune" else cfg.unknown_threshold)
            ranked = insert_unknown(labels, scores, fmt.unknown_label or "new", float(threshold))
            predictions[fmt.name] = Predictions(ids=test_ids, labels=ranked)
    return predictions, pd.DataFrame(report), tuned
