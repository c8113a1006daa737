"""Fold splitting: StratifiedKFold on the label over the known training images.

Classes with one image always stay in training (fold −1); unknown rows (new_whale) never
become a training class: they are spread over the folds as validation queries whose answer is
unknown. Every image is checked first (`folds.check_images`: decoded, or its header read for millions
of images): unreadable training (and distractor) images are dropped
and listed, an unreadable test or index image stops the run. Writes `table.csv` (every readable
row of the competition), `folds.csv` (the training rows with their fold) and `unreadable.csv`.
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from .. import cache
from ..cache import file_fingerprint, files_fingerprint, stage_key
from ..competitions.base import InputError
from ..config import FoldsConfig, config_slice
from ..data.folds import assign_folds, held_out_classes
from ..data.images import UnreadableImageError, image_header_problem, image_problem
from ..pipeline.context import Context
from ..pipeline.executor import Stage, run_cached
from ..runtime import is_main_process, progress_bar

log = logging.getLogger(__name__)


def _check_all(check, paths: list[str]) -> list[str | None]:
    return [check(path) for path in paths]


def find_unreadable(table: pd.DataFrame, threads: int, progress: bool = True, mode: str = "decode") -> pd.DataFrame:
    """The rows whose image is missing, empty or does not decode (mode decode), or whose header
    gives no image size (mode header): `id, role, path, problem`. Mode off checks nothing.

    Decoding runs on `threads` threads (OpenCV decodes without the GIL), 256 images per task (one
    future per image cost more than the header check itself); the header check is Python work that
    threads only slow down (measured: 23 µs per image in one thread, 40 µs on two), so it runs in one."""
    paths = table["path"].tolist() if mode != "off" else []
    problems: list[str | None] = []
    check = image_header_problem if mode == "header" else image_problem
    chunk, task = 4096, 256
    with ThreadPoolExecutor(max_workers=max(1, threads if mode == "decode" else 1)) as pool:
        for start in progress_bar(range(0, len(paths), chunk), f"checking images ({mode})", progress, unit="chunk"):
            block = paths[start : start + chunk]
            tasks = [block[i : i + task] for i in range(0, len(block), task)]
            for found in pool.map(functools.partial(_check_all, check), tasks):
                problems.extend(found)
    bad = [i for i, problem in enumerate(problems) if problem]
    return table.iloc[bad][["id", "role", "path"]].assign(problem=[problems[i] for i in bad])


def refuse_unreadable(unreadable: pd.DataFrame) -> None:
    """Test and index images are submission rows: a missing one stops the run before training."""
    refused = unreadable[unreadable["role"].isin(["test", "index"])]
    if len(refused):
        shown = refused["problem"].tolist()[:20]
        more = f"\n  … and {len(refused) - 20} more" if len(refused) > 20 else ""
        raise UnreadableImageError(
            f"{len(refused)} test/index image(s) cannot be read; replace them (nothing was trained):\n  "
            + "\n  ".join(shown)
            + more
        )


def duplicate_labels(train: pd.DataFrame, threads: int = 1) -> pd.DataFrame:
    """Pairs of training images with identical bytes and different labels: `path_a, label_a, path_b,
    label_b`. Only files whose size another image of another label shares are read and hashed."""
    known = train[train["known"]]
    sizes = pd.Series([os.stat(p).st_size for p in known["path"]], index=known.index)
    candidates = known[sizes.map(sizes.value_counts()) > 1]
    candidates = candidates[candidates.groupby(sizes[candidates.index])["label"].transform("nunique") > 1]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        digests = list(pool.map(file_fingerprint, candidates["path"], chunksize=64))
    pairs = []
    for _, group in candidates.assign(digest=digests).groupby("digest"):
        rows = list(group[["path", "label"]].itertuples(index=False))
        pairs += [(*a, *b) for i, a in enumerate(rows) for b in rows[i + 1 :] if a.label != b.label]
    return pd.DataFrame(pairs, columns=["path_a", "label_a", "path_b", "label_b"])


def make_folds(
    table: pd.DataFrame,
    cfg: FoldsConfig,
    work: Path,
    threads: int = 1,
    progress: bool = True,
    unknown_classes: float = 0.0,
) -> dict:
    """The stage: check every image of the common table, drop unreadable training (and distractor)
    images, refuse a single class, list identical training images under different labels
    (duplicates.csv), assign folds, write table.csv, folds.csv and unreadable.csv. `train_data` keys what
    training reads: folds.csv and its images (a changed test image does not retrain)."""
    unreadable = find_unreadable(table, threads, progress, cfg.check_images)
    refuse_unreadable(unreadable)
    unreadable.to_csv(work / "unreadable.csv", index=False)
    table = table.drop(index=unreadable.index).reset_index(drop=True)
    train = table[table["role"] == "train"].reset_index(drop=True)
    classes = train.loc[train["known"], "label"].nunique()
    if classes < 2:
        raise InputError(
            f"training holds {classes} class(es) after the unreadable images are dropped: metric learning needs "
            "at least 2 (one class trains to loss 0 and validates at 1.0, meaning nothing)"
        )
    duplicates = duplicate_labels(train, threads)
    duplicates.to_csv(work / "duplicates.csv", index=False)
    train["fold"] = assign_folds(train, cfg.n_splits, cfg.seed)
    train["unknown_fold"] = held_out_classes(train, unknown_classes, cfg.n_splits, cfg.seed)
    table.to_csv(work / "table.csv", index=False)
    train.to_csv(work / "folds.csv", index=False)
    dropped = unreadable.loc[unreadable["role"] == "train", "path"].tolist()
    return {
        "rows": {role: int(n) for role, n in table["role"].value_counts().items()},
        "classes": int(train.loc[train["known"], "label"].nunique()),
        "held_out_classes": {
            int(f): int(n) for f, n in train.drop_duplicates("label")["unknown_fold"].value_counts().items() if f >= 0
        },
        "unreadable_train": len(dropped),
        "unreadable_train_first": dropped[:100],
        "unreadable_other": int((unreadable["role"] != "train").sum()),
        "duplicate_pairs": len(duplicates),
        "duplicate_pairs_first": [
            f"{r.path_a} ({r.label_a}) = {r.path_b} ({r.label_b})" for r in duplicates.head(5).itertuples()
        ],
        "train_data": stage_key(
            "train-data",
            {},
            {},
            {"folds.csv": file_fingerprint(work / "folds.csv"), "images": files_fingerprint(train["path"])},
        ),
    }


def read_folds(table_csv: Path, folds_csv: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The stage's two CSVs back as (table, folds): ids and labels as strings, no label → None."""
    read = {"dtype": {"id": str, "label": str}, "keep_default_na": False}
    table = pd.read_csv(table_csv, **read)
    folds = pd.read_csv(folds_csv, **read)
    table["label"] = table["label"].replace("", None)
    return table, folds


def load_table(folds_art: cache.Artifact) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, folds) of a folds artifact."""
    return read_folds(folds_art.file("table.csv"), folds_art.file("folds.csv"))


def run_folds(ctx: Context) -> cache.Artifact:
    """The folds artifact (a pseudo-label round's: round 0's plus the round's training rows)."""
    if "folds" in ctx.done:
        return ctx.done["folds"]
    if ctx.round_folds is not None:
        return ctx.round_folds(ctx)
    table = ctx.source_table
    fingerprints = ctx.adapter.fingerprints(ctx.root)
    if (ctx.root / "demo_params.json").exists():  # a regenerated demo can keep identical CSVs
        fingerprints["demo_params"] = cache.file_fingerprint(ctx.root / "demo_params.json")
    threads = ctx.cfg.threads or len(os.sched_getaffinity(0))
    if ctx.cfg.folds.fingerprint == "content":  # images edited in place: their bytes, not size and mtime
        fingerprints["images"] = cache.files_content_fingerprint(table["path"], threads)
    else:  # a replaced image redoes the check
        fingerprints["images"] = cache.files_fingerprint(table["path"])
    share = ctx.unknown_classes
    part = {
        "competition": {"name": ctx.cfg.competition.name, "root": ctx.cfg.competition.root},
        "folds": config_slice(ctx.cfg.folds),
        "unknown_classes": share,
        "distractor_pool": ctx.cfg.retrieve.penalty.pool,
    }

    def compute(work: Path) -> dict:
        # The images' size/mtime fingerprint is part of what folds hands on: embed must redo a
        # replaced image even where table.csv, which lists paths, is unchanged.
        (work / "images.fingerprint").write_text(fingerprints["images"] + "\n")
        return make_folds(table, ctx.cfg.folds, work, threads, ctx.progress, share)

    art = run_cached(ctx, FOLDS, "", part, {}, fingerprints, compute)
    if ctx.plan is None:
        _report_unreadable(ctx, art)
        _report_duplicates(art)
    return art


def _report_duplicates(art: cache.Artifact) -> None:
    """Warn (once per run) of identical training images under different labels, naming a few."""
    result = art.manifest.get("result", {})
    if result.get("duplicate_pairs") and is_main_process():
        log.warning(
            "[folds] %d pair(s) of identical training images carry different labels (all in %s): %s; "
            "one label is likely wrong, or the two classes are one",
            result["duplicate_pairs"],
            art.file("duplicates.csv"),
            "; ".join(result["duplicate_pairs_first"]),
        )


def _report_unreadable(ctx: Context, art: cache.Artifact) -> None:
    """Name the dropped training images (once per run); under train.strict_images stop instead."""
    result = art.manifest.get("result", {})
    if not result.get("unreadable_train"):
        return
    message = (
        f"{result['unreadable_train']} training image(s) cannot be read (all in {art.file('unreadable.csv')}): "
        f"{result['unreadable_train_first'][:10]}"
    )
    strict = [m.name for m in ctx.cfg.members if m.train.strict_images]
    if strict:
        raise UnreadableImageError(f"train.strict_images (members {strict}): {message}")
    if is_main_process():
        log.warning("[folds] dropped from training and the gallery: %s", message)


FOLDS = Stage(
    name="folds",
    version=4,
    outputs=("table.csv", "folds.csv", "unreadable.csv", "images.fingerprint"),
    per_member=False,
    hashes="competition files and every image's size/mtime; folds section; unknown-class share; distractor pool",
    run=run_folds,
)
