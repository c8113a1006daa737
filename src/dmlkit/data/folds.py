"""Folds of the training table: which fold validates each row, which classes each fold holds out
(unseen-class queries for calibrating 'new'), and a fold's training and validation parts.

Classes with one image always stay in training (fold −1); unknown rows (new_whale) never become a
training class: they are spread over the folds as validation queries whose answer is unknown.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

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
