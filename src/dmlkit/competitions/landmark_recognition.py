"""Google Landmark Recognition 2020: `train.csv` (id,landmark_id), images nested by id prefix.

Submission `id,landmarks`, one cell `landmark_id score` or empty; metric GAP. The solution holds
`id,landmarks,Usage` with an empty `landmarks` for non-landmark images.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..metrics import global_average_precision
from .base import Adapter, check_table, image_path, read_csv_checked, split_cell


class LandmarkRecognition(Adapter):
    name = "landmark-recognition-2020"
    metric = "gap"
    header = ("id", "landmarks")
    solution_columns = ("id", "landmarks", "Usage")
    max_predictions = 1

    def input_files(self, root: Path) -> list[Path]:
        return [root / "train.csv", root / "sample_submission.csv"]

    def read(self, root: Path) -> pd.DataFrame:
        train = read_csv_checked(
            root / "train.csv", ["id", "landmark_id"], id_column="id", nonempty=("id", "landmark_id")
        )
        rows = [
            {"id": i, "path": image_path(root, "train", i, nested=True), "label": lab, "role": "train", "known": True}
            for i, lab in zip(train["id"], train["landmark_id"], strict=True)
        ]
        rows += [
            {"id": i, "path": image_path(root, "test", i, nested=True), "label": None, "role": "test", "known": False}
            for i in self.submission_ids(root)
        ]
        rows += (
            [
                {"id": p.stem, "path": str(p), "label": None, "role": "index", "known": False}
                for p in sorted((root / "index").rglob("*.jpg"))
            ]
            if (root / "index").is_dir()
            else []
        )
        return check_table(pd.DataFrame(rows), str(root))

    def format_cell(self, labels: list[str], scores: list[float], neighbours: list[str]) -> str:
        if not labels:
            return ""
        return f"{labels[0]} {float(scores[0]):.6f}"

    def check_cell(self, cell: str) -> str | None:
        parts = split_cell(cell)
        if not parts:
            return None
        if len(parts) != 2:
            return f"landmarks must be 'landmark_id score' or empty, got {cell!r}"
        try:
            score = float(parts[1])
        except ValueError:
            return f"score {parts[1]!r} is not a number"
        if not math.isfinite(score):
            return f"score {parts[1]!r} is not finite"
        return None

    def score_frame(self, frame: pd.DataFrame) -> float:
        labels, scores = [], []
        for cell in frame["landmarks"].fillna(""):
            parts = split_cell(cell)
            labels.append(parts[0] if parts else None)
            scores.append(float(parts[1]) if parts else 0.0)
        truths = [t if t.strip() else None for t in frame["truth"].fillna("")]
        return global_average_precision(frame["id"].tolist(), labels, scores, truths)
