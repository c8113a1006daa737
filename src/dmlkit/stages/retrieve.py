"""The retrieve stage: the re-ranking chain (`retrieval.chain`) on the validation fold — the score
after each step, the calibration tuned there (`retrieval.validation`) — then on the test images:
labels voted from the labelled gallery, or the ranked index images, per submission format.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .. import cache, tracking
from ..competitions import Adapter, Calibration, Predictions
from ..config import Config, ConfigError, MemberConfig, RetrieveConfig, config_slice
from ..data.folds import fold_parts
from ..data.images import read_image
from ..pipeline.context import Context
from ..pipeline.executor import Stage, run_cached
from ..plots import plot_retrieval_grid
from ..pseudo import without_pseudo_rows
from ..retrieval.chain import ChainInputs, LabelledGallery, run_chain
from ..retrieval.ensemble import concatenate_views
from ..retrieval.identities import cluster_test
from ..retrieval.search import as_views
from ..retrieval.second_stage import SecondStage, shortlist_verifier
from ..retrieval.validation import (
    Scorers,
    ValidationSplit,
    calibrate,
    distractor_rows,
    first_answers,
    out_of_fold_queries,
    table_rows,
    validation_answers,
    validation_report,
    validation_split,
)
from ..retrieval.verify import feature_key
from ..retrieval.voting import fuse_head, head_label_scores, label_similarities, threshold_for_share, vote
from ..runs import headline
from ..runtime import is_main_process
from .embed import read_aux_groups, read_head_topk, read_views, run_embed
from .ensemble import embeddings_of, run_ensemble, test_embeddings_of
from .folds import load_table, run_folds

log = logging.getLogger(__name__)
MIN_GROUPED_SHARE = (
    0.2  # of the validation queries sharing an identity, below which a tuned cluster threshold is doubtful
)


@dataclass
class EmbeddingSet:
    """The embeddings retrieve ranks with: the ensemble's, each member's, and per fold the members
    cover the ensemble of the members trained without it (each (N, E), or (N, 2, E) with mirrors)."""

    ensemble: np.ndarray
    members: dict[str, np.ndarray]
    folds: dict[int, np.ndarray]
    test: np.ndarray | None = None  # what answers the test where members refit (their refit models')


def test_predictions(
    cfg: RetrieveConfig,
    formats: list[Adapter],
    table: pd.DataFrame,
    known_train: pd.DataFrame,
    embeddings: np.ndarray,
    calibration: Calibration,
    scorers: Scorers,
    progress: bool = True,
) -> tuple[dict[str, Predictions], dict[str, pd.DataFrame]]:
    """Each format's predictions for the test images: labels voted from the labelled gallery (the
    known training rows), or (retrieval formats) the ranked index images; and per label format each
    test image's first answer with its best cosine (`first_answers`: what pseudo-labelling selects from)."""
    test_rows = np.flatnonzero((table["role"] == "test").to_numpy())
    test_ids = table["id"].to_numpy()[test_rows].tolist()
    gallery_rows = table_rows(table, "train", known_train["id"])
    gallery_labels = known_train["label"].to_numpy()
    if calibration.threshold is None:
        default = 0.0 if cfg.unknown_threshold == "tune" else float(cfg.unknown_threshold)
        calibration = replace(calibration, threshold=default)
    predictions: dict[str, Predictions] = {}
    answers: dict[str, pd.DataFrame] = {}
    for fmt in formats:
        if fmt.gallery_role == "index":
            labelled = (gallery_rows, gallery_labels)
            neighbours = _ranked_index(cfg, fmt, table, embeddings, test_rows, labelled, scorers, progress)
            predictions[fmt.name] = fmt.predict(Predictions(test_ids, neighbours=neighbours), calibration)
            continue
        inputs = ChainInputs(
            embeddings[test_rows],
            embeddings[gallery_rows],
            test_rows,
            gallery_rows,
            scorers.distractors(embeddings),
            retrieval=False,
            verifier=scorers.verifier,
        )
        result = run_chain(cfg, inputs, progress=progress)
        fill = fmt.max_predictions > 1  # every MAP@5 row carries 5 labels
        labels, scores = vote(result.sims, result.ids, gallery_labels, cfg.voting.k, cfg.voting.power, fill=fill)
        if scorers.head_scores is not None:
            head = scorers.head_scores(test_rows)
            labels, scores = fuse_head(labels, scores, head, cfg.voting.head_weight, cfg.voting.power)
        similarities = label_similarities(labels, result.sims, result.ids, gallery_labels)
        test_groups = [] if scorers.groups is None else [str(g) for g in scorers.groups[test_rows]]
        ranked = Predictions(test_ids, labels=labels, scores=scores, similarities=similarities, groups=test_groups)
        predictions[fmt.name] = _unknown_first(cfg, fmt, ranked, calibration, result.query_offset)
        answers[fmt.name] = first_answers(ranked, predictions[fmt.name])
    return predictions, answers


def answer_test(  # test_predictions' arguments, with the embedding set instead of one table
    cfg: RetrieveConfig,
    formats: list[Adapter],
    table: pd.DataFrame,
    known_train: pd.DataFrame,
    embeddings: EmbeddingSet,
    calibration: Calibration,
    scorers: Scorers,
    progress: bool = True,
) -> tuple[dict[str, Predictions], dict[str, pd.DataFrame]]:
    """The test's predictions by the models that answer it: the ensemble, or where members refit their
    refit models, whose "new" threshold is the fold models' (refit_threshold: cosine) or answers "new"
    first on the share of the test the fold models answer so (share)."""
    if embeddings.test is None:
        return test_predictions(cfg, formats, table, known_train, embeddings.ensemble, calibration, scorers, progress)
    adapter = formats[0]
    if cfg.refit_threshold == "share" and adapter.unknown_label and cfg.unknown_share is None:
        folds_view, _ = test_predictions(
            cfg, formats[:1], table, known_train, embeddings.ensemble, calibration, scorers, progress
        )
        labels = folds_view[adapter.name].labels
        share = float(np.mean([row[:1] == [adapter.unknown_label] for row in labels])) if labels else 0.0
        log.info("refit: the fold models answer '%s' first on %.1f%% of the test", adapter.unknown_label, 100 * share)
        if 0.0 < share < 1.0:
            cfg = cfg.model_copy(update={"unknown_share": share})
    else:
        log.info("refit: the refit models answer the test with the threshold the fold models tuned on validation")
    return test_predictions(cfg, formats, table, known_train, embeddings.test, calibration, scorers, progress)


def _ranked_index(
    cfg: RetrieveConfig,
    fmt: Adapter,
    table: pd.DataFrame,
    embeddings: np.ndarray,
    test_rows: np.ndarray,
    labelled: tuple[np.ndarray, np.ndarray],
    scorers: Scorers,
    progress: bool,
) -> list[list[str]]:
    """A retrieval format's answer: each test image's ranked index image ids after the chain
    (`labelled`: the known training rows and labels, for label-aware re-ranking)."""
    index_rows = np.flatnonzero((table["role"] == "index").to_numpy())
    if len(index_rows) == 0:
        raise ValueError(f"{fmt.name}: the competition has no index images to retrieve from")
    gallery_rows, gallery_labels = labelled
    inputs = ChainInputs(
        embeddings[test_rows],
        embeddings[index_rows],
        test_rows,
        index_rows,
        retrieval=True,
        verifier=scorers.verifier,
        labelled=LabelledGallery(embeddings[gallery_rows], gallery_labels),
    )
    result = run_chain(cfg, inputs, progress=progress)
    index_ids = table["id"].to_numpy()[index_rows]
    return [[index_ids[j] for j in row if j >= 0] for row in result.ids]


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
    for name, frame in (answers or {}).items():  # retrieve.cluster's test clusters: clusters.csv
        frame.to_csv(work / ("clusters.csv" if name == "clusters" else f"answers-{name}.csv"), index=False)
    report.to_csv(work / "report.csv", index=False)


def retrieve(
    cfg: RetrieveConfig,
    formats: list[Adapter],
    table: pd.DataFrame,
    folds: pd.DataFrame,
    embeddings: EmbeddingSet,
    val_fold: int,
    scorers: Scorers,
    progress: bool = True,
) -> tuple[dict[str, Predictions], pd.DataFrame, dict, dict[str, pd.DataFrame]]:
    """Validation report, tuned settings, test predictions for every submission format (the first
    is the competition's own) and each label format's first answers with their cosines (see
    `first_answers`), plus the validation queries' under "validation" (see `validation_answers`).
    When the members cover several folds, calibration is tuned on all those folds' queries pooled."""
    adapter = formats[0]
    split = validation_split(table, folds, val_fold, cfg.validation_queries, scorers.groups)
    report: list[dict] = []
    calibration, tuned_on, validation = Calibration(), {}, None
    if len(split.query_rows) == 0:
        log.warning("retrieve: validation fold %d is empty; no report and default thresholds", val_fold)
    else:
        report, queries = validation_report(
            cfg, adapter, split, embeddings.ensemble, embeddings.members, scorers, progress
        )
        where = ""
        if len(embeddings.folds) > 1:
            queries = out_of_fold_queries(cfg, adapter, table, folds, embeddings.folds, scorers, progress)
            where = f" (out-of-fold: folds {sorted(embeddings.folds)}, {len(queries.truths)} queries)"
        calibration, rows, tuned_on = calibrate(cfg, adapter, queries, where)
        report += rows
        if adapter.gallery_role == "train":
            validation = validation_answers(adapter, queries, calibration)
    known_train = folds[folds["known"]]
    predictions, answers = {}, {}
    if (table["role"] == "test").any():
        predictions, answers = answer_test(cfg, formats, table, known_train, embeddings, calibration, scorers, progress)
    else:  # an image folder, a generic CSV without split=test: the validation report is the result
        log.warning("retrieve: the competition has no test images; validation report only, nothing to submit")
    if validation is not None:
        answers["validation"] = validation  # answers-validation.csv: no format is named so
    clustered = None
    if cfg.cluster.enabled and adapter.name in predictions:  # the members that never saw the fold tune it
        validation_view = embeddings.folds.get(val_fold, embeddings.ensemble)
        test = embeddings.ensemble if embeddings.test is None else embeddings.test
        test_view = test[np.flatnonzero((table["role"] == "test").to_numpy())]
        rows, labels = cluster_tuning_rows(table, folds, split, val_fold)
        clustered = cluster_test(
            cfg.cluster, adapter.unknown_label, rows, labels, validation_view, test_view, predictions[adapter.name]
        )
    if clustered is not None:
        row, answers["clusters"], predictions[adapter.name], summary = clustered
        report.append(row)
    tuned = calibration.tuned()
    if scorers.verifier is not None and scorers.verifier.fusion is not None:
        tuned["verify"] = scorers.verifier.fusion.to_json()
    figures = ("unknown_share", "unknown_precision", "unknown_recall", "score_known", "score_unknown")
    tuned.update({f"validation_{k}": tuned_on[k] for k in figures if k in tuned_on})
    if clustered is not None:
        tuned["cluster"] = summary
    return predictions, pd.DataFrame(report), tuned, answers


def cluster_tuning_rows(
    table: pd.DataFrame, folds: pd.DataFrame, split: ValidationSplit, val_fold: int
) -> tuple[np.ndarray, np.ndarray]:
    """What retrieve.cluster tunes on (table rows, labels): the validation queries and every image of
    the classes held out of this fold (folds.unknown_classes), which its members never saw — the
    groups of one unseen identity that the test holds (a held-out class has one image per fold)."""
    held = folds[folds["unknown_fold"] == val_fold] if "unknown_fold" in folds else folds.iloc[:0]
    rows = np.concatenate([split.query_rows, table_rows(table, "train", held["id"])])
    labels = np.concatenate([split.query_labels, held["label"].to_numpy()])
    rows, first = np.unique(rows, return_index=True)
    return rows, labels[first]


# ------------------------------------------------------------------------------------ the stage
def member_heads(ctx: Context) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per member, (labels, cosines) of its head's best classes for every row of the table."""
    return {m.name: read_head_topk(run_embed(ctx, m.name).path) for m in ctx.cfg.members}


def query_groups(ctx: Context) -> np.ndarray | None:
    """retrieve.unknown_per: per table row, its group by the members' auxiliary heads on that column."""
    column = ctx.cfg.retrieve.unknown_per
    if column is None:
        return None
    groups = read_aux_groups([run_embed(ctx, m.name).path for m in ctx.cfg.members], column)
    if groups is None:  # the config check requires such a member; its checkpoint must hold the head
        raise ConfigError(f"{ctx.cfg.source}: retrieve.unknown_per '{column}': no member's embeddings hold that head")
    table, folds = load_table(run_folds(ctx))
    val = folds[(folds["fold"] == ctx.val_fold) & (folds[column].fillna("").astype(str) != "")]
    if len(val):
        truth = val[column].astype(str).to_numpy()
        right = float(np.mean(groups[table_rows(table, "train", val["id"])] == truth))
        majority = float(pd.Series(truth).value_counts(normalize=True).iloc[0])
        log.info(
            "retrieve.unknown_per: %s by the members' auxiliary heads, right on %.1f%% of validation fold %d's "
            "%d images (the most frequent %s: %.1f%%)",
            column,
            100 * right,
            ctx.val_fold,
            len(val),
            column,
            100 * majority,
        )
    return groups


def fold_ensembles(cfg: Config, members: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Per fold the members cover, the ensemble of the members trained without it."""
    out = {}
    for fold in sorted({m.fold for m in cfg.members}):
        names = [m.name for m in cfg.members if m.fold == fold]
        weights = [cfg.ensemble.weights.get(n, 1.0) for n in names]
        out[fold] = concatenate_views([members[n] for n in names], weights)
    return out


def local_feature_folder(ctx: Context) -> Path:
    """artifacts/local-features/<feature config key>: shared by the experiments (see retrieval/verify.py)."""
    return ctx.artifacts / "local-features" / feature_key(ctx.cfg.retrieve.verify)


def make_scorers(ctx: Context, table: pd.DataFrame) -> Scorers:
    """The retrieval's optional scorers as the config switches them on."""
    r = ctx.cfg.retrieve
    scorers = Scorers(groups=query_groups(ctx))
    if r.verify.enabled:
        verifier = shortlist_verifier(r.verify, table["path"].to_numpy(), local_feature_folder(ctx), ctx.progress)
        scorers.verifier = SecondStage(r.verify, verifier)
    if r.voting.head_weight > 0:
        heads = member_heads(ctx)
        scorers.head_scores = lambda rows: head_label_scores(heads, rows)
    if r.penalty.enabled:
        scorers.distractor_rows = distractor_rows(table)
    return scorers


def retrieve_key(cfg: Config) -> dict:
    """The retrieve section as the stage's key hashes it: options added later are left out where
    they do nothing (their defaults), so results computed before them stand."""
    key = config_slice(cfg.retrieve)
    if all(m.refit == "off" for m in cfg.members):  # read only where members refit
        key.pop("refit_threshold")
    if not cfg.retrieve.cluster.enabled:
        key.pop("cluster")
    if cfg.retrieve.verify.matcher == "ratio":
        key["verify"].pop("matcher")
        key["verify"].pop("matcher_weights_file")
    return key


def run_retrieve(ctx: Context) -> cache.Artifact:
    if "retrieve" in ctx.done:  # already run (and its report logged) in this process
        return ctx.done["retrieve"]
    ensemble_art = run_ensemble(ctx)
    folds_art = run_folds(ctx)
    val_fold = ctx.val_fold
    part = {"retrieve": retrieve_key(ctx.cfg), "formats": [f.name for f in ctx.formats], "val_fold": val_fold}

    def compute(work: Path) -> dict:
        table, folds = load_table(folds_art)
        folds = without_pseudo_rows(folds)  # a round's pseudo rows train; the gallery is the training images
        warn_leaky_members(ctx.cfg.members, val_fold)
        ensemble = embeddings_of(ensemble_art)
        members = {m.name: read_views(run_embed(ctx, m.name).path) for m in ctx.cfg.members}
        embeddings = EmbeddingSet(ensemble, members, fold_ensembles(ctx.cfg, members), test_embeddings_of(ensemble_art))
        scorers = make_scorers(ctx, table)
        predictions, report, tuned, answers = retrieve(
            ctx.cfg.retrieve, ctx.formats, table, folds, embeddings, val_fold, scorers, ctx.progress
        )
        write_retrieval(work, predictions, report, answers)
        save_retrieval_grid(work / "retrievals.png", table, folds, as_views(ensemble)[:, 0], val_fold)
        return {"tuned": tuned, "report": report.to_dict(orient="records")}

    def log_grid(art: cache.Artifact) -> None:
        if art.file("retrievals.png").is_file():
            log.info("[retrieve] validation queries and their neighbours: %s", art.file("retrievals.png"))

    upstream = {"ensemble": cache.produced(ensemble_art), "folds": cache.produced(folds_art)}
    # retrieve also reads each member's embeddings and head classes
    upstream.update({f"embed/{m.name}": cache.produced(run_embed(ctx, m.name)) for m in ctx.cfg.members})
    art = run_cached(ctx, RETRIEVE, "", part, upstream, {}, compute, on_computed=log_grid)
    if ctx.plan is None:
        _log_report(ctx, art)
    return art


def _log_report(ctx: Context, art: cache.Artifact) -> None:
    try:
        report = pd.read_csv(art.file("report.csv"))
    except pd.errors.EmptyDataError:  # no validation fold
        report = pd.DataFrame()
    if not report.empty and is_main_process():
        log.info("validation, step by step (fold %d):\n%s", ctx.val_fold, report.to_string(index=False))
        final = headline(report.to_dict(orient="records"))
        tracking.summary("validation", final, f"```\n{report.to_string(index=False)}\n```")
    if is_main_process():
        tracking.image("retrieve/validation-neighbours", art.file("retrievals.png"))


RETRIEVE = Stage(
    name="retrieve",
    version=8,
    outputs=("predictions-*.json", "answers-*.csv", "report.csv", "clusters.csv"),
    per_member=False,
    hashes="the retrieve section, the submission formats and the validation fold; the ensemble's and each "
    "member's embeddings; table.csv and folds.csv",
    run=run_retrieve,
)
