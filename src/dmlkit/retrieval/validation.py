"""The chain on validation queries: the score after each step (and each member alone), the
queries of several folds pooled out of fold, and the calibration tuned on them (the unknown
threshold, per-group thresholds, the GAP confidence form).

The validation fold's images are the queries and the other folds' known images the gallery, as
rows of the table; queries of classes the gallery lacks are unknown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from ..competitions import Adapter, Calibration, Predictions
from ..config import RetrieveConfig
from ..data.folds import fold_parts
from ..evaluation import (
    LabelledQueries,
    RankedQueries,
    Voting,
    calibrated_scores,
    knn_validation_scores,
    plain_score,
    rank_queries,
    score_queries,
    tune_group_thresholds,
)
from .chain import ChainInputs, Neighbours, Tuning, run_chain
from .second_stage import SecondStage

log = logging.getLogger(__name__)


@dataclass
class Scorers:
    """What a retrieval may use beside the embeddings, each optional: the verifier of shortlists
    (retrieve.verify), the members' head votes of table rows, the penalty's non-landmark rows (None:
    penalty off), and each table row's group (retrieve.unknown_per)."""

    verifier: SecondStage | None = None
    head_scores: Callable[[np.ndarray], list[dict[str, float]]] | None = None
    distractor_rows: np.ndarray | None = None
    groups: np.ndarray | None = None

    def distractors(self, embeddings: np.ndarray) -> np.ndarray | None:
        return None if self.distractor_rows is None else embeddings[self.distractor_rows]


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

    @property
    def labels(self) -> LabelledQueries:
        return LabelledQueries(self.query_labels, self.query_known, self.gallery_labels, self.query_groups)


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
        adapter, neighbours.sims, neighbours.ids, split.labels, voting(cfg), neighbours.query_offset, heads
    )


def voting(cfg: RetrieveConfig) -> Voting:
    return Voting(cfg.voting.k, cfg.voting.power, cfg.voting.head_weight)


def validation_report(
    cfg: RetrieveConfig,
    adapter: Adapter,
    split: ValidationSplit,
    embeddings: np.ndarray,
    member_embeddings: dict[str, np.ndarray],
    scorers: Scorers,
    progress: bool = True,
) -> tuple[list[dict], RankedQueries]:
    """The validation score after each step of the chain (members alone first, when several), and
    the last step's ranked queries, which calibration is tuned on. Steps with settings to tune
    (the verifier's fusion) tune them on these queries (their row says so)."""
    metric = adapter.metric
    report: list[dict] = []
    if len(member_embeddings) > 1:
        for name, emb in member_embeddings.items():
            plain = Voting(cfg.voting.k, cfg.voting.power)
            out = knn_validation_scores(adapter, emb[split.query_rows], emb[split.gallery_rows], split.labels, plain)
            report.append({"step": f"kNN, member {name} alone", metric: out["plain"], "recall@1": out["recall@1"]})
    steps: list[tuple[str, Neighbours]] = []

    def score(sims: np.ndarray, ids: np.ndarray, offset: np.ndarray | None) -> float:
        return plain_score(adapter, _rank(cfg, adapter, split, Neighbours(sims, ids, offset)))

    inputs = chain_inputs(cfg, adapter, split, embeddings, scorers)
    inputs.tuning = Tuning(same=lambda ids: same_label(split, ids), score=score)
    final = run_chain(cfg, inputs, lambda step, neighbours: steps.append((step, neighbours)), progress)
    if scorers.head_scores is not None and metric != "map@100":
        steps.append((f"+ head fusion (w={cfg.voting.head_weight})", final))
    last = None
    for step, neighbours in steps:
        heads = scorers.head_scores(split.query_rows) if step.startswith("+ head fusion") else None
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
    scorers: Scorers,
    progress: bool = True,
) -> RankedQueries:
    """Every covered fold's validation queries through the whole chain, each against the gallery
    without its fold and embedded by the members that never trained on it; pooled for calibration."""
    parts = []
    for fold, embeddings in fold_embeddings.items():
        split = validation_split(table, folds, fold, cfg.validation_queries, scorers.groups)
        if len(split.query_rows) == 0:
            continue
        result = run_chain(cfg, chain_inputs(cfg, adapter, split, embeddings, scorers), None, progress)
        heads = scorers.head_scores(split.query_rows) if scorers.head_scores and adapter.metric != "map@100" else None
        parts.append(_rank(cfg, adapter, split, result, heads))
    return RankedQueries.pool(parts)


def chain_inputs(
    cfg: RetrieveConfig, adapter: Adapter, split: ValidationSplit, embeddings: np.ndarray, scorers: Scorers
) -> ChainInputs:
    """The chain's bundle for a validation split: its queries against its gallery, by table row."""
    return ChainInputs(
        queries=embeddings[split.query_rows],
        gallery=embeddings[split.gallery_rows],
        query_rows=split.query_rows,
        gallery_rows=split.gallery_rows,
        distractors=scorers.distractors(embeddings),
        retrieval=adapter.metric == "map@100",
        verifier=scorers.verifier,
    )


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
