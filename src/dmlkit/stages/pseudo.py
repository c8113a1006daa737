"""Pseudo-label rounds: the folds of round r are round 0's plus the test images that round r−1
answered with a known label confidently enough, as training rows of that label.

Pseudo rows get `fold = -1` and `unknown_fold = -1`: every member trains on them, no fold validates
on them (`fold_parts`), and their ids (`pseudo:<id>`) match no training row of the table, so the
search gallery never holds them: validation stays honest and a test image never finds itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ..cache import file_fingerprint, files_fingerprint, stage_key
from ..config import PseudoConfig

PREFIX = "pseudo:"


def select_pseudo(answers: pd.DataFrame, unknown_label: str | None, pseudo: PseudoConfig) -> pd.DataFrame:
    """The answers (id, label, cosine) that become training rows: a known first answer whose cosine
    reaches `min_cosine`, or the `top_share` of the test images with the highest cosine among them."""
    known = answers[(answers["label"] != "") & (answers["label"] != unknown_label) & answers["cosine"].notna()]
    if pseudo.top_share is not None:
        n = int(round(pseudo.top_share * len(answers)))
        chosen = known.sort_values(["cosine", "id"], ascending=[False, True], kind="stable").head(n)
    else:
        chosen = known[known["cosine"] >= pseudo.min_cosine]
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
