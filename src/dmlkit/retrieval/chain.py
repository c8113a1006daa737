"""The re-ranking chain: kNN search, then each enabled step in order — α-QE/DBA → k-reciprocal
re-ranking → distractor penalty → local-feature verification → label-aware re-ranking.

Every step reads one bundle (`ChainInputs`: the embeddings, the table rows they came from, the
non-landmark pool, and the optional scorers: the verifier, the labelled gallery) and replaces the
ranked neighbours. A new re-ranker is one function `(cfg, state, progress) -> state` and one line
in `CHAIN`; the validation report shows a row after each step that ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from ..config import RetrieveConfig
from .expansion import database_augmentation, query_expansion
from .label_rerank import label_aware_rerank
from .rerank import distractor_penalty, k_reciprocal_rerank, penalised_similarity
from .search import as_views, knn
from .second_stage import SecondStage, median_inliers, tune_fusion
from .voting import vote

log = logging.getLogger(__name__)


@dataclass
class Neighbours:
    sims: np.ndarray
    ids: np.ndarray
    # GLR2020 1st's query-side penalty C: subtracted from each query's landmark confidence (it
    # shifts all of a query's similarities alike, so it changes no ranking, only the GAP order)
    query_offset: np.ndarray | None = None


@dataclass
class Tuning:
    """Validation queries a step may tune on: whether each candidate shares its query's label
    (`same(ids)`) and the metric of re-sorted shortlists (`score(sims, ids, offset)`)."""

    same: Callable[[np.ndarray], np.ndarray]
    score: Callable[[np.ndarray, np.ndarray, np.ndarray | None], float]


@dataclass
class LabelledGallery:
    """Label-aware re-ranking's reference: the labelled training images' embeddings and labels."""

    embeddings: np.ndarray
    labels: np.ndarray


@dataclass
class ChainInputs:
    """What the chain ranks and what its steps may read: `queries`/`gallery` embeddings ((N, E),
    or (N, 2, E) with mirrors), their table rows (image-level steps), the non-landmark pool, whether
    the gallery is an index to rank (retrieval) rather than labels to vote, and the optional scorers."""

    queries: np.ndarray
    gallery: np.ndarray
    query_rows: np.ndarray | None = None
    gallery_rows: np.ndarray | None = None
    distractors: np.ndarray | None = None
    retrieval: bool = False
    verifier: SecondStage | None = None
    labelled: LabelledGallery | None = None
    tuning: Tuning | None = None  # validation: steps with settings to tune tune them here


@dataclass
class ChainState:
    """The bundle, the (expanded) queries and gallery, the ranked neighbours, the search depth, and
    the report row of the last step (`label`)."""

    inputs: ChainInputs
    queries: np.ndarray
    gallery: np.ndarray
    result: Neighbours
    k: int
    label: str = ""


def search(cfg: RetrieveConfig, queries: np.ndarray, gallery: np.ndarray, k: int, progress: bool) -> Neighbours:
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


# ------------------------------------------------------------------------------------ the steps
def expand(cfg: RetrieveConfig, state: ChainState, progress: bool) -> ChainState:
    """α-QE and DBA (Radenović et al.): the gallery averaged with its neighbours, then the queries."""
    queries, gallery, result = state.queries, state.gallery, state.result
    if cfg.dba.enabled:
        self_graph = search(cfg, gallery, gallery, min(len(gallery), cfg.dba.k + 1), progress)
        gallery = database_augmentation(gallery, self_graph.sims, self_graph.ids, cfg.dba.alpha, cfg.dba.k)
        result = search(cfg, queries, gallery, state.k, progress)
    if cfg.qe.enabled:
        queries = query_expansion(queries, gallery, result.sims, result.ids, cfg.qe.alpha, cfg.qe.k)
        result = search(cfg, queries, gallery, state.k, progress)
    return replace(state, queries=queries, gallery=gallery, result=result)


def k_reciprocal(cfg: RetrieveConfig, state: ChainState, progress: bool) -> ChainState:
    """k-reciprocal re-ranking of each query's own nearest gallery images."""
    both = np.concatenate([state.queries, state.gallery])
    # the joint graph only shapes the encoding; the re-scored candidates are each query's own
    # nearest gallery images (near-duplicate queries would fill each other's graph rows)
    graph_k = min(len(both), max(cfg.rerank.k1 + 1, cfg.rerank.k2))
    graph = search(cfg, both, both, graph_k, progress).ids
    r = cfg.rerank
    dist, ids = k_reciprocal_rerank(
        state.queries, state.gallery, graph, r.k1, r.k2, r.lambda_, state.result.ids, progress
    )
    return replace(state, result=Neighbours((1.0 - dist).astype(np.float32), ids))


def penalise(cfg: RetrieveConfig, state: ChainState, progress: bool) -> ChainState:
    """GLR2020 1st's non-landmark penalty on the gallery side (and the query side's offset)."""
    pen, distractors = cfg.penalty, state.inputs.distractors
    gallery_pen = distractor_penalty(
        search(cfg, state.gallery, distractors, pen.k_gallery, progress).sims, pen.k_gallery
    )
    query_pen = None
    if pen.query_side:
        query_pen = distractor_penalty(search(cfg, state.queries, distractors, pen.k_query, progress).sims, pen.k_query)
    sims = penalised_similarity(state.result.sims, state.result.ids, gallery_pen)
    order = np.argsort(-sims, axis=1, kind="stable")
    ids = np.take_along_axis(state.result.ids, order, 1)
    return replace(state, result=Neighbours(np.take_along_axis(sims, order, 1), ids, query_offset=query_pen))


def verify(cfg: RetrieveConfig, state: ChainState, progress: bool) -> ChainState:
    """Local-feature verification of each query's shortlist, fused with the global similarity; on
    validation queries (`tuning`) the fusion is tuned first, and the test applies what was tuned."""
    inputs, result = state.inputs, state.result
    second = inputs.verifier
    label = f"+ verification, top {cfg.verify.top_k_for(inputs.retrieval)}"
    if inputs.tuning is not None and second.fusion is None:
        inliers = second.inliers(result.ids, inputs.query_rows, inputs.gallery_rows, inputs.retrieval)
        same = inputs.tuning.same(result.ids[:, : inliers.shape[1]])
        offset = result.query_offset
        score = lambda sims, ids: inputs.tuning.score(sims, ids, offset)  # noqa: E731
        second.fusion = tune_fusion(cfg.verify, result.sims, result.ids, inliers, same, score)
        log.info(
            "validation: inliers of verified pairs of one class: median %.1f (%d pairs); of two: %.1f (%d pairs)",
            *median_inliers(inliers, same),
        )
        fused = second.fusion.on_validation(result.sims, result.ids, inliers, same)
        label += f" ({second.fusion.describe()}; {second.fusion.tuned_on()})"
    else:
        fused = second.apply(result.sims, result.ids, inputs.query_rows, inputs.gallery_rows, inputs.retrieval)
        label += f" ({second.fusion.describe()})"
    return replace(state, result=Neighbours(*fused, result.query_offset), label=label)


def predicted_labels(
    cfg: RetrieveConfig, queries: np.ndarray, gallery: np.ndarray, gallery_codes: np.ndarray
) -> np.ndarray:
    """Each row's label code by kNN voting against the labelled gallery (label_rerank.k neighbours);
    -1 where the best vote is below label_rerank.min_score."""
    k = min(len(gallery), cfg.label_rerank.k)
    found = search(cfg, queries, gallery, k, progress=False)
    labels, scores = vote(found.sims, found.ids, gallery_codes.astype(object), k, cfg.voting.power, top=1)
    floor = cfg.label_rerank.min_score
    best = [row[0] if row and sc[0] >= floor else -1 for row, sc in zip(labels, scores, strict=True)]
    return np.array(best, np.int64)


def label_rerank(cfg: RetrieveConfig, state: ChainState, progress: bool) -> ChainState:
    """GLR2019 retrieval 1st: index images voted into the query's landmark come first (on the
    images' own embeddings: their mirrors, under embed.flip_gallery, take no part)."""
    labelled, result = state.inputs.labelled, state.result
    codes = pd.factorize(labelled.labels)[0]
    gallery = as_views(labelled.embeddings)[:, 0]
    queries, index = as_views(state.inputs.queries)[:, 0], as_views(state.inputs.gallery)[:, 0]
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
    return replace(state, result=Neighbours(sims, ids, result.query_offset))


@dataclass(frozen=True)
class ChainStep:
    name: str  # the validation report's row (a step may give a fuller one in `state.label`)
    applies: Callable[[RetrieveConfig, ChainInputs], bool]
    run: Callable[[RetrieveConfig, ChainState, bool], ChainState]


def _has_distractors(cfg: RetrieveConfig, inputs: ChainInputs) -> bool:
    return cfg.penalty.enabled and inputs.distractors is not None and len(inputs.distractors) > 0


# The chain after the kNN search, in order.
CHAIN: list[ChainStep] = [
    ChainStep("+ QE/DBA", lambda cfg, inputs: cfg.qe.enabled or cfg.dba.enabled, expand),
    ChainStep("+ re-ranking", lambda cfg, inputs: cfg.rerank.enabled, k_reciprocal),
    ChainStep("+ distractor penalty", _has_distractors, penalise),
    ChainStep("+ verification", lambda cfg, inputs: inputs.verifier is not None, verify),
    ChainStep(
        "+ label-aware re-ranking",
        lambda cfg, inputs: cfg.label_rerank.enabled and inputs.retrieval and inputs.labelled is not None,
        label_rerank,
    ),
]


def run_chain(
    cfg: RetrieveConfig,
    inputs: ChainInputs,
    on_step: Callable[[str, Neighbours], None] | None = None,
    progress: bool = True,
    steps: Sequence[ChainStep] | None = None,
) -> Neighbours:
    """The ranked neighbours of `inputs.queries` in `inputs.gallery` after every step that applies
    (`steps`: `CHAIN` by default); `on_step(report row, neighbours)` after the search and each step."""
    check_finite("queries", inputs.queries)
    check_finite("gallery", inputs.gallery)
    k = min(len(inputs.gallery), max(cfg.k, cfg.voting.k, cfg.qe.k + 1, cfg.rerank.k1 + 1))
    state = ChainState(
        inputs, inputs.queries, inputs.gallery, search(cfg, inputs.queries, inputs.gallery, k, progress), k
    )
    if on_step:
        on_step("kNN", state.result)
    for step in CHAIN if steps is None else steps:
        if step.applies(cfg, inputs):
            state = step.run(cfg, replace(state, label=""), progress)
            if on_step:
                on_step(state.label or step.name, state.result)
    return state.result


__all__ = ["CHAIN", "ChainInputs", "ChainStep", "Neighbours", "run_chain"]
