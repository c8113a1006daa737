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
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from ..cache import file_fingerprint, files_fingerprint, stage_key
from ..config import FoldsConfig
from ..data.images import UnreadableImageError, image_header_problem, image_problem
from ..runtime import progress_bar

log = logging.getLogger(__name__)


def assign_folds(train: pd.DataFrame, n_splits: int, seed: int) -> np.ndarray:
    """Fold per row of the training table (−1: always in training).

    StratifiedKFold over the classes with ≥ 2 images. It refuses a set whose classes are all smaller
    than n_splits (Stanford Online Products has ~5 per class): there each class's images take
    different folds drawn at random, so each validates once and trains in the other folds."""
    folds = np.full(len(train), -1, dtype=int)
    known = train["known"].to_numpy(dtype=bool)
    counts = train.loc[known, "label"].map(train.loc[known, "label"].value_counts()).to_numpy()
    eligible = np.flatnonzero(known)[counts >= 2]
    if len(eligible) < n_splits:
        raise ValueError(f"folds: only {len(eligible)} images of classes with ≥2 images; n_splits={n_splits}")
    labels = train["label"].to_numpy()[eligible]
    if counts.max() >= n_splits:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # classes smaller than n_splits are expected
            for fold, (_, val) in enumerate(splitter.split(eligible, labels)):
                folds[eligible[val]] = fold
    else:
        rng = np.random.default_rng(seed)
        groups = pd.Series(np.arange(len(eligible))).groupby(labels, sort=True).groups.values()
        for rows in groups:
            members = eligible[np.asarray(rows)]
            folds[members] = rng.permutation(n_splits)[: len(members)]
        log.info(
            "folds: every class is smaller than n_splits=%d (largest %d images): each of a class's images "
            "validates in a fold of its own (%d classes)",
            n_splits,
            int(counts.max()),
            len(groups),
        )
    unknown = np.flatnonzero(~known)  # new_whale rows: validation queries whose answer is "unknown"
    folds[unknown] = np.random.default_rng(seed).integers(0, n_splits, len(unknown))
    return folds


def held_out_classes(train: pd.DataFrame, share: float, n_splits: int, seed: int) -> np.ndarray:
    """Per row, the fold whose members never see its class (−1: none): for each fold about `share`
    of the known classes, disjoint between folds, stratified by class size (classes sorted by size,
    each run of round(1/share) consecutive classes spread over the folds in a random order). With
    n_splits > round(1/share) the later folds get none."""
    out = np.full(len(train), -1, dtype=int)
    if share <= 0:
        return out
    known = train["known"].to_numpy(dtype=bool)
    sizes = train.loc[known, "label"].value_counts()
    rng = np.random.default_rng(seed + 7)
    ordered = sizes.index.to_numpy()[np.lexsort((rng.random(len(sizes)), sizes.to_numpy()))]
    stride = max(2, round(1 / share))
    slots = np.concatenate([rng.permutation(stride) for _ in range(len(ordered) // stride + 1)])[: len(ordered)]
    class_fold = {label: int(slot) if slot < n_splits else -1 for label, slot in zip(ordered, slots, strict=True)}
    out[known] = train.loc[known, "label"].map(class_fold).to_numpy()
    return out


def fold_parts(folds: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training part, validation part) of a fold; validation rows of unseen classes get known=False.

    No image of a class held out for this fold (`unknown_fold`) trains; its images of this fold (and
    a held-out singleton's image) are validation queries. So about `unknown_classes` of the queries
    are unseen classes — the share the threshold is tuned for, as expected on the test."""
    held_out = folds["unknown_fold"] == fold if "unknown_fold" in folds else pd.Series(False, index=folds.index)
    train = folds[(folds["fold"] != fold) & folds["known"] & ~held_out].reset_index(drop=True)
    val = folds[(folds["fold"] == fold) | (held_out & (folds["fold"] == -1))].copy()
    val["known"] = val["known"] & val["label"].isin(set(train["label"]))
    return train, val.reset_index(drop=True)


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


def make_folds(
    table: pd.DataFrame,
    cfg: FoldsConfig,
    work: Path,
    threads: int = 1,
    progress: bool = True,
    unknown_classes: float = 0.0,
) -> dict:
    """The stage: check every image of the common table, drop unreadable training (and distractor)
    images, assign folds, write table.csv, folds.csv and unreadable.csv. `train_data` keys what
    training reads: folds.csv and its images (a changed test image does not retrain)."""
    unreadable = find_unreadable(table, threads, progress, cfg.check_images)
    refuse_unreadable(unreadable)
    unreadable.to_csv(work / "unreadable.csv", index=False)
    table = table.drop(index=unreadable.index).reset_index(drop=True)
    train = table[table["role"] == "train"].reset_index(drop=True)
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
