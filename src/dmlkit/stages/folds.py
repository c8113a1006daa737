"""Fold splitting: StratifiedKFold on the label over the known training images.

Classes with one image always stay in training (fold −1); unknown rows (new_whale) never
become a training class: they are spread over the folds as validation queries whose answer is
unknown. Writes `table.csv` (every row of the competition) and
`folds.csv` (the training rows with their fold).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from ..competitions import Adapter
from ..config import FoldsConfig


def assign_folds(train: pd.DataFrame, n_splits: int, seed: int) -> np.ndarray:
    """Fold per row of the training table (−1: always in training)."""
    folds = np.full(len(train), -1, dtype=int)
    known = train["known"].to_numpy(dtype=bool)
    counts = train.loc[known, "label"].map(train.loc[known, "label"].value_counts())
    eligible = np.flatnonzero(known)[counts.to_numpy() >= 2]
    if len(eligible) < n_splits:
        raise ValueError(f"folds: only {len(eligible)} images of classes with ≥2 images; n_splits={n_splits}")
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    labels = train["label"].to_numpy()[eligible]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # classes smaller than n_splits are expected
        for fold, (_, val) in enumerate(splitter.split(eligible, labels)):
            folds[eligible[val]] = fold
    unknown = np.flatnonzero(~known)  # new_whale rows: validation queries whose answer is "unknown"
    folds[unknown] = np.random.default_rng(seed).integers(0, n_splits, len(unknown))
    return folds


def fold_parts(folds: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training part, validation part) of a fold; validation rows of unseen classes get known=False."""
    train = folds[(folds["fold"] != fold) & folds["known"]].reset_index(drop=True)
    val = folds[folds["fold"] == fold].copy()
    val["known"] = val["known"] & val["label"].isin(set(train["label"]))
    return train, val.reset_index(drop=True)


def make_folds(adapter: Adapter, root: Path, cfg: FoldsConfig, work: Path) -> dict:
    """The stage: read the competition into the common table, assign folds, write both CSVs."""
    table = adapter.read(root)
    train = table[table["role"] == "train"].reset_index(drop=True)
    train["fold"] = assign_folds(train, cfg.n_splits, cfg.seed)
    table.to_csv(work / "table.csv", index=False)
    train.to_csv(work / "folds.csv", index=False)
    return {
        "rows": {role: int(n) for role, n in table["role"].value_counts().items()},
        "classes": int(train.loc[train["known"], "label"].nunique()),
    }


def read_folds(table_csv: Path, folds_csv: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The stage's two CSVs back as (table, folds): ids and labels as strings, no label → None."""
    read = {"dtype": {"id": str, "label": str}, "keep_default_na": False}
    table = pd.read_csv(table_csv, **read)
    folds = pd.read_csv(folds_csv, **read)
    table["label"] = table["label"].replace("", None)
    return table, folds
