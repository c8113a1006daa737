"""Pseudo-label selection: the folds of round r are round 0's plus the test images that round r−1
answered with a known label confidently enough, as training rows of that label.

Pseudo rows get `fold = -1` and `unknown_fold = -1`: every member trains on them, no fold validates
on them (`fold_parts`), and their ids (`pseudo:<id>`) match no training row of the table, so the
search gallery never holds them: validation stays honest and a test image never finds itself.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .cache import file_fingerprint, files_fingerprint, stage_key
from .config import PseudoConfig

PREFIX = "pseudo:"


def known_answers(answers: pd.DataFrame, unknown_label: str | None) -> pd.DataFrame:
    """The answers that could train: a known label (not blank, not the unknown label) with a cosine."""
    return answers[(answers["label"] != "") & (answers["label"] != unknown_label) & answers["cosine"].notna()]


def precision_bar(validation: pd.DataFrame, unknown_label: str | None, min_precision: float) -> float:
    """The lowest cosine at which the validation answers (id, label, cosine, truth) at or above it are
    at least `min_precision` right: the bar that admits the most answers at that precision. A bar
    never splits answers of equal cosine. `inf` (nothing passes) when no bar reaches it."""
    known = known_answers(validation, unknown_label).sort_values("cosine", ascending=False, kind="stable")
    cosines = known["cosine"].to_numpy(dtype=float)
    if len(cosines) == 0:
        return math.inf
    right = (known["label"] == known["truth"]).to_numpy()
    precision_above = np.cumsum(right) / np.arange(1, len(right) + 1)
    run_ends = np.r_[cosines[1:] != cosines[:-1], True]
    passing = np.flatnonzero((precision_above >= min_precision) & run_ends)
    return float(cosines[passing[-1]]) if len(passing) else math.inf


def validation_precision(validation: pd.DataFrame, unknown_label: str | None, bar: float) -> tuple[int, float | None]:
    """How many validation queries' first answers would pass `bar` as pseudo-labels, and the share
    of them that is right (None when none passes): the precision to expect of the test's rows."""
    known = known_answers(validation, unknown_label)
    above = known[known["cosine"] >= bar]
    return len(above), float((above["label"] == above["truth"]).mean()) if len(above) else None


def bar_source(pseudo: PseudoConfig) -> str:
    """The setting that picks the rows: top_share, min_precision or min_cosine."""
    return "top_share" if pseudo.top_share is not None else "min_precision" if pseudo.min_precision else "min_cosine"


def cosine_bar(pseudo: PseudoConfig, validation: pd.DataFrame | None, unknown_label: str | None) -> float | None:
    """The cosine a test image's first answer must reach: `min_cosine`, or the bar `min_precision`
    measures on the validation answers; None where `top_share` picks by rank instead."""
    if pseudo.top_share is not None:
        return None
    if pseudo.min_precision is None:
        return pseudo.min_cosine
    if validation is None:
        raise ValueError("pseudo.min_precision: the previous round has no validation answers to measure the bar on")
    return precision_bar(validation, unknown_label, pseudo.min_precision)


def select_pseudo(
    answers: pd.DataFrame, unknown_label: str | None, pseudo: PseudoConfig, bar: float | None = None
) -> pd.DataFrame:
    """The answers (id, label, cosine) that become training rows: a known first answer whose cosine
    reaches `bar` (default `min_cosine`), or the `top_share` of the test images with the highest
    cosine among them."""
    known = known_answers(answers, unknown_label)
    if pseudo.top_share is not None:
        n = int(round(pseudo.top_share * len(answers)))
        chosen = known.sort_values(["cosine", "id"], ascending=[False, True], kind="stable").head(n)
    else:
        chosen = known[known["cosine"] >= (pseudo.min_cosine if bar is None else bar)]
    return chosen.sort_values("id", kind="stable").reset_index(drop=True)


def with_pseudo_rows(folds: pd.DataFrame, table: pd.DataFrame, chosen: pd.DataFrame) -> pd.DataFrame:
    """`folds` plus one training row per chosen test image (see the module docstring). The table's
    other columns (a species, a date) come from the test image's row, blank where the test has none:
    an auxiliary head then leaves such a row out of its loss."""
    test = table.loc[table["role"] == "test"].set_index("id")
    missing = sorted(set(chosen["id"]) - set(test.index))
    if missing:
        raise ValueError(f"pseudo-labels: answers for ids that are not test images, e.g. {missing[:5]}")
    rows = pd.DataFrame(
        {
            "id": PREFIX + chosen["id"],
            "label": chosen["label"].to_numpy(),
            "role": "train",
            "known": True,
            "fold": -1,
            "unknown_fold": -1,
        }
    )
    for column in folds.columns.difference(rows.columns):
        rows[column] = test[column].reindex(chosen["id"]).to_numpy() if column in test.columns else None
    return pd.concat([folds, rows[folds.columns]], ignore_index=True)


def without_pseudo_rows(folds: pd.DataFrame) -> pd.DataFrame:
    """The folds retrieval searches and validates on: the training images of the table."""
    return folds[~folds["id"].str.startswith(PREFIX)].reset_index(drop=True)


def precision(chosen: pd.DataFrame, truths: dict[str, str]) -> float | None:
    """The share of the chosen rows whose label is the answer, where the competition ships answers."""
    judged = [label == truths[i] for i, label in zip(chosen["id"], chosen["label"], strict=True) if i in truths]
    return float(np.mean(judged)) if judged else None


def write_round_folds(base: Path, work: Path, folds: pd.DataFrame, chosen: pd.DataFrame) -> str:
    """Round r's folds artifact: round 0's files, folds.csv with the pseudo rows, pseudo.csv; returns
    the `train_data` key (what training reads: folds.csv and its images)."""
    for name in ("table.csv", "unreadable.csv", "images.fingerprint"):
        if (base / name).is_file():
            shutil.copyfile(base / name, work / name)
    folds.to_csv(work / "folds.csv", index=False)
    chosen.to_csv(work / "pseudo.csv", index=False)
    train = folds[folds["role"] == "train"]
    inputs = {"folds.csv": file_fingerprint(work / "folds.csv"), "images": files_fingerprint(train["path"])}
    return stage_key("train-data", {}, {}, inputs)
