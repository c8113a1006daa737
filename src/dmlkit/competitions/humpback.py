"""Humpback Whale Identification 2019: `train.csv` (Image,Id), `train/*.jpg`, `test/*.jpg`.

`new_whale` marks unidentified animals: an ordinary label in the submission, never a training
class. Submission `Image,Id` with 5 space-separated ids; metric MAP@5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics import map_at_5, open_set_scores
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
        for column in self.train_csv_columns:  # Happywhale's species: head.aux can train on it
            if column not in (image_col, label_col):
                for row, value in zip(rows, train[column], strict=True):
                    row[column] = value
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
        """The voted labels with the unknown label before the first label whose score (vote or best
        cosine, as calibrated) is below the threshold (the query's group's, with per-group thresholds)."""
        if calibration.threshold is None:
            return Predictions(ids=ranked.ids, labels=[row[: self.max_predictions] for row in ranked.labels])
        scores = ranked.similarities if calibration.unknown_score == "cosine" else ranked.scores
        threshold = calibration.thresholds_for(ranked)
        labels = insert_unknown(ranked.labels, scores, self.unknown_label, threshold, self.max_predictions)
        return Predictions(ids=ranked.ids, labels=labels)

    def calibrate(
        self, score: Callable[[Calibration], float], ranked: Predictions, fixed: Calibration
    ) -> tuple[Calibration, float]:
        """The unknown threshold maximising MAP@5, on the vote or on the best cosine (whichever scores
        higher; the vote on a tie), or the threshold / score kind the config fixes."""
        best: tuple[Calibration, float] | None = None
        for kind in [fixed.unknown_score] if fixed.unknown_score else ["vote", "cosine"]:
            if fixed.threshold is not None:
                candidate = Calibration(threshold=fixed.threshold, unknown_score=kind)
                value = score(candidate)
            else:
                row_scores = ranked.similarities if kind == "cosine" else ranked.scores
                evaluate = lambda t, kind=kind: score(Calibration(threshold=t, unknown_score=kind))  # noqa: E731
                threshold, value = best_threshold(evaluate, threshold_grid(row_scores))
                candidate = Calibration(threshold=threshold, unknown_score=kind)
            if best is None or value > best[1] + 1e-12:
                best = (candidate, value)
        return best

    def open_set_scores(self, predictions: Predictions, truths: Sequence[str]) -> dict:
        top1 = [row[0] if row else "" for row in predictions.labels]
        return open_set_scores(top1, list(truths), self.unknown_label)

    def unknown_report(self, predictions: Predictions, truths: Sequence[str]) -> dict[str, float]:
        """'unknown first': precision, recall and share of the queries; MAP@5 of known and unknown
        queries apart; BAKS, BAUS and their geometric mean (AnimalCLEF 2025)."""
        first = np.array([row[:1] == [self.unknown_label] for row in predictions.labels], dtype=bool)
        unknown = np.array([t == self.unknown_label for t in truths], dtype=bool)

        def subset(mask: np.ndarray) -> float:
            rows = np.flatnonzero(mask)
            return map_at_5([predictions.labels[i] for i in rows], [truths[i] for i in rows]) if len(rows) else 0.0

        return {
            "unknown_share": float(first.mean()) if len(first) else 0.0,
            "unknown_precision": float((first & unknown).sum() / max(1, first.sum())),
            "unknown_recall": float((first & unknown).sum() / max(1, unknown.sum())),
            "score_known": subset(~unknown),
            "score_unknown": subset(unknown),
            "queries_unknown": float(unknown.sum()),
            **{k: v for k, v in self.open_set_scores(predictions, truths).items() if v is not None},
        }
