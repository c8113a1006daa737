"""Retrieval and post-processing: kNN → α-QE/DBA → k-reciprocal re-ranking → distractor penalty →
label voting → unknown threshold / confidence calibration, each step switchable in the config.

The same chain runs on the validation fold (queries: the fold's images; gallery: the other
folds) to report the score after each step and to tune the threshold, then on the test set.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..competitions import Adapter, Calibration, Predictions
from ..config import MemberConfig, RetrieveConfig
from ..evaluation import (
    RankedQueries,
    calibrated_scores,
    knn_validation_scores,
    plain_score,
    rank_queries,
    score_queries,
    tune_group_thresholds,
)
from ..retrieval.expansion import database_augmentation, query_expansion
from ..retrieval.label_rerank import label_aware_rerank
from ..retrieval.rerank import distractor_penalty, k_reciprocal_rerank, penalised_similarity
from ..retrieval.search import as_views, knn
from ..retrieval.voting import fuse_head, head_label_scores, label_similarities, threshold_for_share, vote
from .folds import fold_parts
from .second_stage import SecondStage, median_inliers, shortlist_verifier, tune_fusion

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
    bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    if bad.any():
        raise FloatingPointError(
            f"{name}: {int(bad.sum())} embedding row(s) contain NaN/inf (first rows "
            f"{np.flatnonzero(bad)[:5].tolist()}); refusing to search"
        )


@dataclass
class ChainState:
    """What the chain's steps read and replace: the (expanded) queries and gallery, the ranked
    neighbours, and the non-landmark pool (None without one)."""

    queries: np.ndarray
    gallery: np.ndarray
    result: Neighbours
    distractors: np.ndarray | None
    k: int


def _expand(cfg: RetrieveConfig, state: ChainState, progress: bool) -> ChainState:
    """α-QE and DBA (Radenović et al.): the gallery averaged with its neighbours, then the queries."""
    queries, gallery, result = state.queries, state.gallery, state.result
    if cfg.dba.enabled:
        self_graph = _search(cfg, gallery, gallery, min(len(gallery), cfg.dba.k + 1), progress)
        gallery = database_augmentation(gallery, self_graph.sims, self_graph.ids, cfg.dba.alpha, cfg.dba.k)
        result = _search(cfg, queries, gallery, state.k, progress)
    if cfg.qe.enabled:
        queries = query_expansion(queries, gallery, result.sims, result.ids, cfg.qe.alpha, cfg.qe.k)
        result = _search(cfg, queries, gallery, state.k, progress)
    return replace(state, queries=queries, gallery=gallery, result=result)


def _rerank(cfg: RetrieveConfig, state: ChainState, progress: bool) -> ChainState:
    """k-reciprocal re-ranking of each query's own nearest gallery images."""
    both = np.concatenate([state.queries, state.gallery])
    # the joint graph only shapes the encoding; the re-scored candidates are each query's own
    # nearest gallery images (near-duplicate queries would fill each other's graph rows)
    graph_k = min(len(both), max(cfg.rerank.k1 + 1, cfg.rerank.k2))
    graph = _search(cfg, both, both, graph_k, progress).ids
    r = cfg.rerank
    dist, ids = k_reciprocal_rerank(
        state.queries, state.gallery, graph, r.k1, r.k2, r.lambda_, state.result.ids, progress
    )
    return replace(state, result=Neighbours((1.0 - dist).astype(np.float32), ids))


def _penalise(cfg: RetrieveConfig, state: ChainState, progress: bool) -> ChainState:
    """GLR2020 1st's non-landmark penalty on the gallery side (and the query side's offset)."""
    pen = cfg.penalty
    gallery_pen = distractor_penalty(
        _search(cfg, state.gallery, state.distractors, pen.k_gallery, progress).sims, pen.k_gallery
    )
    query_pen = None
    if pen.query_side:
        query_pen = distractor_penalty(
            _search(cfg, state.queries, state.distractors, pen.k_query, progress).sims, pen.k_query
        )
    sims = penalised_similarity(state.result.sims, state.result.ids, gallery_pen)
    order = np.argsort(-sims, axis=1, kind="stable")
    ids = np.take_along_axis(state.result.ids, order, 1)
    return replace(state, result=Neighbours(np.take_along_axis(sims, order, 1), ids, query_offset=query_pen))


@dataclass(frozen=True)
class ChainStep:
    name: str  # the validation report's row
    applies: Callable[[RetrieveConfig, ChainState], bool]
    run: Callable[[RetrieveConfig, ChainState, bool], ChainState]


# The chain after the kNN search, in order; a new re-ranker is one pure function and one line here.
CHAIN: tuple[ChainStep, ...] = (
    ChainStep("+ QE/DBA", lambda cfg, state: cfg.qe.enabled or cfg.dba.enabled, _expand),
    ChainStep("+ re-ranking", lambda cfg, state: cfg.rerank.enabled, _rerank),
    ChainStep(
        "+ distractor penalty",
        lambda cfg, state: cfg.penalty.enabled and state.distractors is not None and len(state.distractors) > 0,
        _penalise,
    ),
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
    state = ChainState(queries, gallery, _search(cfg, queries, gallery, k, progress), distractors, k)
    if on_step:
        on_step("kNN", state.result)
    for step in CHAIN:
        if step.applies(cfg, state):
            state = step.run(cfg, state, progress)
            if on_step:
                on_step(step.name, state.result)
    return state.result


@dataclass
class ValidationSplit:
    """The validation fold's images (queries) against the other folds' known images (gallery), as
    rows of the table; queries of classes the gallery lacks are unknown."""

    query_rows: np.ndarray
    query_labels: np.ndarray
    query_known: np.ndarray
    gallery_rows: np.ndarray
    gallery_labels: np.ndarray
    query_groups: np.ndarray | None = None  # retrieve.unknown_per: each query's group


def table_rows(table: pd.DataFrame, role: str, ids: pd.Series) -> np.ndarray:
    """The table rows of `role` images with these ids."""
    row_of = {i: n for n, (r, i) in enumerate(zip(table["role"], table["id"], strict=True)) if r == role}
    return np.array([row_of[i] for i in ids], dtype=int)


def distractor_rows(table: pd.DataFrame) -> np.ndarray:
    """The penalty's non-landmark images: the configured pool, else the competition's index images."""
    pool = (table["role"] == "distractor").to_numpy()
    return np.flatnonzero(pool if pool.any() else (table["role"] == "index").to_numpy())


def validation_split(
    table: pd.DataFrame,
    folds: pd.DataFrame,
    val_fold: int,
    max_queries: int | None = None,
    groups: np.ndarray | None = None,
) -> ValidationSplit:
    """The fold's queries against the other folds; with `max_queries`, a random sample of that
    many queries (seeded by the fold: the same sample on every rerun). `groups`: per table row, its
    group (retrieve.unknown_per)."""
    train_part, val_part = fold_parts(folds, val_fold)
    if max_queries is not None and len(val_part) > max_queries:
        keep = np.sort(np.random.default_rng(val_fold).choice(len(val_part), max_queries, replace=False))
        val_part = val_part.iloc[keep].reset_index(drop=True)
    query_rows = table_rows(table, "train", val_part["id"])
    return ValidationSplit(
        query_rows=query_rows,
        query_labels=val_part["label"].to_numpy(),
        query_known=val_part["known"].to_numpy(dtype=bool),
        gallery_rows=table_rows(table, "train", train_part["id"]),
        gallery_labels=train_part["label"].to_numpy(),
        query_groups=None if groups is None else groups[query_rows],
    )


def fixed_calibration(cfg: RetrieveConfig) -> Calibration:
    """The calibration settings the config fixes instead of tuning."""
    return Calibration(
        threshold=None if cfg.unknown_threshold == "tune" else float(cfg.unknown_threshold),
        unknown_score=None if cfg.unknown_score == "auto" else cfg.unknown_score,
    )


def _rank(
    cfg: RetrieveConfig, adapter: Adapter, split: ValidationSplit, neighbours: Neighbours, heads=None
) -> RankedQueries:
    return rank_queries(
        adapter,
        neighbours.sims,
        neighbours.ids,
        split.query_labels,
        split.query_known,
        split.gallery_labels,
        cfg.voting.k,
        cfg.voting.power,
        neighbours.query_offset,
        heads,
        cfg.voting.head_weight,
        split.query_groups,
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
    second: SecondStage | None = None,
) -> tuple[list[dict], RankedQueries]:
    """The validation score after each step of the chain (members alone first, when several), and
    the last step's ranked queries, which calibration is tuned on. With `second`, its fusion is
    tuned here (on these queries: the row says so)."""
    metric = adapter.metric
    report: list[dict] = []
    if len(member_embeddings) > 1:
        for name, emb in member_embeddings.items():
            out = knn_validation_scores(
                adapter,
                emb[split.query_rows],
                split.query_labels,
                split.query_known,
                emb[split.gallery_rows],
                split.gallery_labels,
                cfg.voting.k,
                cfg.voting.power,
            )
            report.append({"step": f"kNN, member {name} alone", metric: out["plain"], "recall@1": out["recall@1"]})
    steps: list[tuple[str, Neighbours]] = []
    final = run_chain(
        cfg,
        embeddings[split.query_rows],
        embeddings[split.gallery_rows],
        distractors,
        lambda step, neighbours: steps.append((step, neighbours)),
        progress,
    )
    if second is not None:
        retrieval = metric == "map@100"
        inliers = second.inliers(final.ids, split.query_rows, split.gallery_rows, retrieval)
        same = same_label(split, final.ids[:, : inliers.shape[1]])

        def score(sims: np.ndarray, ids: np.ndarray) -> float:
            return plain_score(adapter, _rank(cfg, adapter, split, Neighbours(sims, ids, final.query_offset)))

        second.fusion = tune_fusion(cfg.verify, final.sims, final.ids, inliers, same, score)
        log.info(
            "validation: inliers of verified pairs of one class: median %.1f (%d pairs); of two: %.1f (%d pairs)",
            *median_inliers(inliers, same),
        )
        final = Neighbours(*second.fusion(final.sims, final.ids, inliers), final.query_offset)
        top_k = cfg.verify.top_k_for(retrieval)
        steps.append((f"+ verification, top {top_k} ({second.fusion.describe()}; tuned on these queries)", final))
    if head_scores is not None and metric != "map@100":
        steps.append((f"+ head fusion (w={cfg.voting.head_weight})", final))
    last = None
    for step, neighbours in steps:
        heads = head_scores(split.query_rows) if step.startswith("+ head fusion") else None
        last = _rank(cfg, adapter, split, neighbours, heads)
        name = step if step != "kNN" or len(member_embeddings) == 1 else "kNN, ensemble"
        report.append({"step": name, metric: plain_score(adapter, last), "recall@1": last.recall_at_1})
    return report, last


def same_label(split: ValidationSplit, ids: np.ndarray) -> np.ndarray:
    """Whether each candidate (a gallery position, -1: none) shares its query's label."""
    return (ids >= 0) & (split.gallery_labels[np.clip(ids, 0, None)] == split.query_labels[:, None])


def out_of_fold_queries(
    cfg: RetrieveConfig,
    adapter: Adapter,
    table: pd.DataFrame,
    folds: pd.DataFrame,
    fold_embeddings: dict[int, np.ndarray],
    distractors: Callable[[np.ndarray], np.ndarray | None],
    head_scores: Callable[[np.ndarray], list[dict[str, float]]] | None = None,
    progress: bool = True,
    second: SecondStage | None = None,
    groups: np.ndarray | None = None,
) -> RankedQueries:
    """Every covered fold's validation queries through the whole chain, each against the gallery
    without its fold and embedded by the members that never trained on it; pooled for calibration."""
    parts = []
    for fold, embeddings in fold_embeddings.items():
        split = validation_split(table, folds, fold, cfg.validation_queries, groups)
        if len(split.query_rows) == 0:
            continue
        result = run_chain(
            cfg, embeddings[split.query_rows], embeddings[split.gallery_rows], distractors(embeddings), None, progress
        )
        if second is not None:
            result = _second(second, result, split.query_rows, split.gallery_rows, adapter.metric == "map@100")
        heads = head_scores(split.query_rows) if head_scores is not None and adapter.metric != "map@100" else None
        parts.append(_rank(cfg, adapter, split, result, heads))
    return RankedQueries.pool(parts)


def calibrate(
    cfg: RetrieveConfig, adapter: Adapter, queries: RankedQueries, where: str
) -> tuple[Calibration, list[dict], dict]:
    """The calibration tuned on these validation queries, the report rows it adds and its figures."""
    metric = adapter.metric
    out = score_queries(adapter, queries, fixed_calibration(cfg))
    calibration = Calibration(
        threshold=out.get("threshold"), unknown_score=out.get("unknown_score"), confidence=out.get("confidence")
    )
    rows = []
    step = calibration.step_name(adapter.unknown_label)
    open_set_keys = ("baks", "baus", "open_set")  # AnimalCLEF's scores
    if step:
        open_set = {k: out[k] for k in open_set_keys if k in out}
        rows.append({"step": f"{step}{where}", metric: out["score"], "recall@1": out["recall@1"], **open_set})
    if cfg.unknown_per is not None and calibration.threshold is not None:
        calibration, out, step = _per_group(cfg, adapter, queries, calibration)
        open_set = {k: out[k] for k in open_set_keys if k in out}
        rows.append({"step": f"{step}{where}", metric: out["score"], "recall@1": out["recall@1"], **open_set})
    if "score_known" in out:
        rows.append({"step": "  · known queries", metric: out["score_known"], "recall@1": out["recall@1"]})
        rows.append({"step": f"  · unseen queries ({int(out['queries_unknown'])})", metric: out["score_unknown"]})
        log.info(
            "validation: '%s' answered first on %.1f%% of the queries: precision %.3f, recall %.3f of the unseen",
            adapter.unknown_label,
            100 * out["unknown_share"],
            out["unknown_precision"],
            out["unknown_recall"],
        )
    return calibration, rows, out


def _per_group(
    cfg: RetrieveConfig, adapter: Adapter, queries: RankedQueries, calibration: Calibration
) -> tuple[Calibration, dict, str]:
    """The calibration with per-group thresholds (retrieve.unknown_per), its scores and report step."""
    thresholds = tune_group_thresholds(adapter, queries, calibration, cfg.unknown_per_min)
    calibration = replace(calibration, group_thresholds=thresholds)
    out = calibrated_scores(adapter, queries, calibration)
    n_groups = len(set(queries.ranked.groups))
    log.info(
        "validation: per-%s unknown thresholds (%d of %d groups have ≥ %d queries; the others %.4f): %s",
        cfg.unknown_per,
        len(thresholds),
        n_groups,
        cfg.unknown_per_min,
        calibration.threshold,
        ", ".join(f"{g} {t:.4f}" for g, t in thresholds.items()) or "none",
    )
    step = f"+ per-{cfg.unknown_per} thresholds ({len(thresholds)} of {n_groups} groups, others global)"
    return calibration, out, step


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
    second: SecondStage | None = None,
    groups: np.ndarray | None = None,
) -> tuple[dict[str, Predictions], dict[str, pd.DataFrame]]:
    """Each format's predictions for the test images: labels voted from the labelled gallery, or
    (retrieval formats) the ranked index images; and per label format each test image's first
    answer with its best cosine (`first_answers`: what pseudo-labelling selects from)."""
    test_rows = np.flatnonzero((table["role"] == "test").to_numpy())
    test_ids = table["id"].to_numpy()[test_rows].tolist()
    index_rows = np.flatnonzero((table["role"] == "index").to_numpy())
    if calibration.threshold is None:
        default = 0.0 if cfg.unknown_threshold == "tune" else float(cfg.unknown_threshold)
        calibration = replace(calibration, threshold=default)
    predictions: dict[str, Predictions] = {}
    answers: dict[str, pd.DataFrame] = {}
    for fmt in formats:
        if fmt.gallery_role == "index":
            if len(index_rows) == 0:
                raise ValueError(f"{fmt.name}: the competition has no index images to retrieve from")
            result = run_chain(cfg, embeddings[test_rows], embeddings[index_rows], progress=progress)
            if second is not None:
                result = _second(second, result, test_rows, index_rows, retrieval=True)
            if cfg.label_rerank.enabled:
                result = _label_rerank(cfg, embeddings, test_rows, index_rows, gallery_rows, gallery_labels, result)
            index_ids = table["id"].to_numpy()[index_rows]
            neighbours = [[index_ids[j] for j in row if j >= 0] for row in result.ids]
            predictions[fmt.name] = fmt.predict(Predictions(test_ids, neighbours=neighbours), calibration)
            continue
        distractors = embeddings[distractor_rows(table)] if cfg.penalty.enabled else None
        result = run_chain(cfg, embeddings[test_rows], embeddings[gallery_rows], distractors, progress=progress)
        if second is not None:
            result = _second(second, result, test_rows, gallery_rows, retrieval=False)
        fill = fmt.max_predictions > 1  # every MAP@5 row carries 5 labels
        labels, scores = vote(result.sims, result.ids, gallery_labels, cfg.voting.k, cfg.voting.power, fill=fill)
        if head_scores is not None:
            labels, scores = fuse_head(labels, scores, head_scores(test_rows), cfg.voting.head_weight, cfg.voting.power)
        similarities = label_similarities(labels, result.sims, result.ids, gallery_labels)
        test_groups = [] if groups is None else [str(g) for g in groups[test_rows]]
        ranked = Predictions(test_ids, labels=labels, scores=scores, similarities=similarities, groups=test_groups)
        predictions[fmt.name] = _unknown_first(cfg, fmt, ranked, calibration, result.query_offset)
        answers[fmt.name] = first_answers(ranked, predictions[fmt.name])
    return predictions, answers


def first_answers(ranked: Predictions, final: Predictions) -> pd.DataFrame:
    """id, the first answer of the final predictions and its best cosine among the gallery's
    neighbours (NaN for an unknown answer or a label without a neighbour)."""
    cosines = []
    for labels, sims, answer in zip(ranked.labels, ranked.similarities, final.labels, strict=True):
        first = answer[0] if answer else ""
        cosines.append(sims[labels.index(first)] if first in labels else np.nan)
    return pd.DataFrame({"id": final.ids, "label": [row[0] if row else "" for row in final.labels], "cosine": cosines})


def validation_answers(adapter: Adapter, queries: RankedQueries, calibration: Calibration) -> pd.DataFrame:
    """Each validation query's first answer and its best cosine, as `first_answers` gives the test's,
    with its truth (blank for a non-landmark): pseudo-labelling measures its bar's precision on them."""
    frame = first_answers(queries.ranked, adapter.predict(queries.ranked, calibration, queries.offset))
    frame["truth"] = ["" if truth is None else str(truth) for truth in queries.truths]
    return frame


def _second(second: SecondStage, result: Neighbours, query_rows, gallery_rows, retrieval: bool) -> Neighbours:
    return Neighbours(*second.apply(result.sims, result.ids, query_rows, gallery_rows, retrieval), result.query_offset)


def predicted_labels(
    cfg: RetrieveConfig, queries: np.ndarray, gallery: np.ndarray, gallery_codes: np.ndarray
) -> np.ndarray:
    """Each row's label code by kNN voting against the labelled gallery (label_rerank.k neighbours);
    -1 where the best vote is below label_rerank.min_score."""
    k = min(len(gallery), cfg.label_rerank.k)
    found = _search(cfg, queries, gallery, k, progress=False)
    labels, scores = vote(found.sims, found.ids, gallery_codes.astype(object), k, cfg.voting.power, top=1)
    floor = cfg.label_rerank.min_score
    best = [row[0] if row and sc[0] >= floor else -1 for row, sc in zip(labels, scores, strict=True)]
    return np.array(best, np.int64)


def _label_rerank(
    cfg: RetrieveConfig,
    embeddings: np.ndarray,
    test_rows: np.ndarray,
    index_rows: np.ndarray,
    gallery_rows: np.ndarray,
    gallery_labels: np.ndarray,
    result: Neighbours,
) -> Neighbours:
    """GLR2019 retrieval 1st: index images voted into the query's landmark come first (on the
    images' own embeddings: their mirrors, under embed.flip_gallery, take no part)."""
    embeddings = as_views(embeddings)[:, 0]
    codes = pd.factorize(gallery_labels)[0]
    gallery, queries, index = embeddings[gallery_rows], embeddings[test_rows], embeddings[index_rows]
    query_labels = predicted_labels(cfg, queries, gallery, codes)
    index_labels = predicted_labels(cfg, index, gallery, codes)
    sims, ids = label_aware_rerank(result.sims, result.ids, query_labels, index_labels, queries, index, cfg.k)
    agree = (ids >= 0) & (index_labels[np.clip(ids, 0, None)] == query_labels[:, None])
    moved = int((agree & (query_labels >= 0)[:, None]).sum())
    log.info(
        "label-aware re-ranking: %d of %d queries and %d of %d index images labelled; %d results ranked first "
        "by their label",
        int((query_labels >= 0).sum()),
        len(query_labels),
        int((index_labels >= 0).sum()),
        len(index_labels),
        moved,
    )
    return Neighbours(sims, ids, result.query_offset)


def _unknown_first(
    cfg: RetrieveConfig, fmt: Adapter, ranked: Predictions, calibration: Calibration, offset: np.ndarray | None
) -> Predictions:
    """`fmt`'s predictions; with `unknown_share`, the threshold that answers unknown first on that
    share of the test. Logs the share the threshold gives on the test."""
    if fmt.unknown_label and cfg.unknown_share is not None:
        row_scores = ranked.similarities if calibration.unknown_score == "cosine" else ranked.scores
        threshold = threshold_for_share(np.array([row[0] if row else 0.0 for row in row_scores]), cfg.unknown_share)
        calibration = replace(calibration, threshold=threshold)
    predictions = fmt.predict(ranked, calibration, offset)
    if fmt.unknown_label and predictions.labels:
        share = np.mean([row[:1] == [fmt.unknown_label] for row in predictions.labels])
        log.info(
            "test: '%s' answered first on %.1f%% of the %d queries (threshold %.4f on the %s%s)",
            fmt.unknown_label,
            100 * share,
            len(predictions.labels),
            calibration.threshold,
            calibration.unknown_score or "vote",
            ", retrieve.unknown_share" if cfg.unknown_share is not None else "",
        )
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
    fold_embeddings: dict[int, np.ndarray] | None = None,
    feature_folder: Path | None = None,
    groups: np.ndarray | None = None,
) -> tuple[dict[str, Predictions], pd.DataFrame, dict, dict[str, pd.DataFrame]]:
    """Validation report, tuned settings, test predictions for every submission format and each
    label format's first answers with their cosines (see `first_answers`), plus the validation
    queries' under "validation" (see `validation_answers`).

    `member_heads` maps a member to (labels, cosines), each (N, k): its head's best classes per row.
    `fold_embeddings` (fold → the embeddings of the members trained without it), when the members
    cover several folds: calibration is tuned on all those folds' queries pooled.
    `feature_folder`: the local-feature cache retrieve.verify reads and fills.
    `groups`: per table row, its group by the members' auxiliary heads (retrieve.unknown_per).
    """
    second = None
    if cfg.verify.enabled:
        if feature_folder is None:
            raise ValueError("retrieve.verify.enabled needs a local-feature cache folder")
        verifier = shortlist_verifier(cfg.verify, table["path"].to_numpy(), feature_folder, progress)
        second = SecondStage(cfg.verify, verifier)
    head_scores = None
    if cfg.voting.head_weight > 0 and member_heads:
        head_scores = lambda rows: head_label_scores(member_heads, rows)  # noqa: E731
    pool = distractor_rows(table)
    distractors = lambda emb: emb[pool] if cfg.penalty.enabled else None  # noqa: E731
    split = validation_split(table, folds, val_fold, cfg.validation_queries, groups)
    report: list[dict] = []
    calibration, tuned_on, validation = Calibration(), {}, None
    if len(split.query_rows) == 0:
        log.warning("retrieve: validation fold %d is empty; no report and default thresholds", val_fold)
    else:
        report, queries = validation_report(
            cfg, adapter, split, embeddings, member_embeddings, distractors(embeddings), head_scores, progress, second
        )
        where = ""
        if fold_embeddings and len(fold_embeddings) > 1:
            queries = out_of_fold_queries(
                cfg, adapter, table, folds, fold_embeddings, distractors, head_scores, progress, second, groups
            )
            where = f" (out-of-fold: folds {sorted(fold_embeddings)}, {len(queries.truths)} queries)"
        calibration, rows, tuned_on = calibrate(cfg, adapter, queries, where)
        report += rows
        if adapter.gallery_role == "train":
            validation = validation_answers(adapter, queries, calibration)
    known_train = folds[folds["known"]]
    predictions, answers = test_predictions(
        cfg,
        formats,
        table,
        table_rows(table, "train", known_train["id"]),
        known_train["label"].to_numpy(),
        embeddings,
        calibration,
        head_scores,
        progress,
        second,
        groups,
    )
    if validation is not None:
        answers["validation"] = validation  # answers-validation.csv: no format is named so
    tuned = calibration.tuned()
    if second is not None and second.fusion is not None:
        tuned["verify"] = second.fusion.to_json()
    figures = ("unknown_share", "unknown_precision", "unknown_recall", "score_known", "score_unknown")
    tuned.update({f"validation_{k}": tuned_on[k] for k in figures if k in tuned_on})
    return predictions, pd.DataFrame(report), tuned, answers


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
    ids = few_queries_top_k(
        embeddings[table_rows(table, "train", chosen["id"])],
        embeddings,
        table_rows(table, "train", train["id"]),
        min(k, len(train)),
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


def few_queries_top_k(queries: np.ndarray, embeddings: np.ndarray, rows: np.ndarray, k: int, block: int = 65536):
    """Positions in `rows` of each query's k best inner products with `embeddings[rows]`, best
    first, read a block of rows at a time: for a handful of queries, no copy of the gallery and no
    index (at 1M images the copy and faiss's index held +3.1 GB for a figure)."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(rows), block):
        scores = queries @ embeddings[rows[start : start + block]].T
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_ids = np.concatenate(
            [best_ids, np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)], axis=1
        )
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_ids, keep, 1)
    return best_ids


def write_retrieval(
    work: Path, predictions: dict[str, Predictions], report: pd.DataFrame, answers: dict | None = None
) -> None:
    for name, pred in predictions.items():
        (work / f"predictions-{name}.json").write_text(json.dumps(pred.__dict__))
    for name, frame in (answers or {}).items():
        frame.to_csv(work / f"answers-{name}.csv", index=False)
    report.to_csv(work / "report.csv", index=False)
