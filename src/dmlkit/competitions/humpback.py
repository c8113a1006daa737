"""Humpback Whale Identification 2019: `train.csv` (Image,Id), `train/*.jpg`, `test/*.jpg`.

`new_whale` marks unidentified animals: an ordinary label in the submission, never a training
class. Submission `Image,Id` with 5 space-separated ids; metric MAP@5.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..metrics import map_at_5
from .base import Adapter, check_table, image_path, read_csv_checked, split_cell


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

    def score_frame(self, frame: pd.DataFrame) -> float:
        predictions = [split_cell(c) for c in frame[self.header[1]].fillna("")]
        return map_at_5(predictions, frame["truth"].tolist())
