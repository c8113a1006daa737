"""Humpback Whale Identification 2019: `train.csv` (Image,Id), `train/*.jpg`, `test/*.jpg`.

`new_whale` marks unidentified animals: an ordinary label in the submission, never a training
class. Submission `Image,Id` with 5 space-separated ids; metric MAP@5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics import map_at_5
from ..retrieval.voting import best_threshold, insert_unknown, threshold_grid
from .base import Adapter, Calibration, Predictions, check_table, image_path, read_csv_checked, split_cell


class Humpback(Adapter):
    name = "humpback-2019"
    metric = "map@5"
    header: tuple[str, str] = ("Image", "Id")
    solution_columns: tuple[str, ...] = ("Image", "Id", "Usage")
    unknown_label = "new_whale"
    train_csv_columns: tuple[str, ...] = ("Image", "Id")  # required in train.csv
    image_column = "Image"
    label_column = "Id"
    train_folder = "train"
    test_folder = "test"

    def input_files(self, root: Path) -> list[Path]:
        return [root / "train.csv", root / "sample_submission.csv"]

    def read(self, root: Path) -> pd.DataFrame:
        image_col, label_col = self.image_column, self.label_column
        train = read_csv_checked(
            root / "train.csv", list(self.train_csv_columns), id_column=image_col, nonempty=(image_col, label_col)
        )
        rows = [
            {
                "id": i,
                "path": image_path(root, self.train_folder, i, nested=False),
                "label": lab,
                "role": "train",
                "known": lab != self.unknown_label,
            }
            for i, lab in zip(train[image_col], train[label_col], strict=True)
        ]
        rows += [
            {
                "id": i,
                "path": image_path(root, self.test_folder, i, nested=False),
                "label": None,
                "role": "test",
                "known": False,
            }
            for i in self.submission_ids(root)
        ]
        return check_table(pd.DataFrame(rows), str(root))

    def format_cell(self, labels: list[str], scores: list[float], neighbours: list[str]) -> str:
        return " ".join(labels[: self.max_predictions])

    def check_cell(self, cell: str) -> str | None:
        parts = split_cell(cell)
        if not parts:
            return "no prediction (5 ids expected)"
        if len(parts) > self.max_predictions:
            return f"{len(parts)} ids, at most {self.max_predictions} allowed"
        return None

    def parse_cell(self, cell: str) -> tuple[list[str], list[float], list[str]]:
        return split_cell(cell), [], []

    def parse_truth(self, cell: str) -> str:
        return cell

    def score_predictions(self, predictions: Predictions, truths: Sequence[str]) -> float:
        return map_at_5(predictions.labels, truths)

    def validation_truths(
        self, query_labels: np.ndarray, query_known: np.ndarray, gallery_labels: np.ndarray
    ) -> tuple[np.ndarray, list[str]]:
        """Every query; unknown ones (unseen classes, new_whale) are answered by the unknown label."""
        truths = [lab if kn else self.unknown_label for lab, kn in zip(query_labels, query_known, strict=True)]
        return np.arange(len(query_labels)), truths

    def predict(
        self, ranked: Predictions, calibration: Calibration, confidence_offset: np.ndarray | None = None
    ) -> Predictions:
        """The voted labels with the unknown label before the first vote below the threshold."""
        if calibration.threshold is None:
            return Predictions(ids=ranked.ids, labels=[row[: self.max_predictions] for row in ranked.labels])
        labels = insert_unknown(
            ranked.labels, ranked.scores, self.unknown_label, calibration.threshold, self.max_predictions
        )
        return Predictions(ids=ranked.ids, labels=labels)

    def calibrate(
        self, score: Callable[[Calibration], float], scores: list[list[float]], fixed_threshold: float | None
    ) -> tuple[Calibration, float]:
        """The unknown threshold maximising MAP@5 (or the configured one)."""
        if fixed_threshold is not None:
            calibration = Calibration(threshold=float(fixed_threshold))
            return calibration, score(calibration)
        threshold, best = best_threshold(lambda t: score(Calibration(threshold=t)), threshold_grid(scores))
        return Calibration(threshold=threshold), best
