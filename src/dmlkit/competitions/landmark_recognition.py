"""Google Landmark Recognition 2020: `train.csv` (id,landmark_id), images nested by id prefix.

Submission `id,landmarks`, one cell `landmark_id score` or empty; metric GAP. The solution holds
`id,landmarks,Usage` with an empty `landmarks` for non-landmark images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics import global_average_precision
from ..retrieval.voting import CONFIDENCE_FORMS, landmark_confidence
from .base import Adapter, Calibration, Predictions, check_table, image_path, read_csv_checked, split_cell


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

    def parse_cell(self, cell: str) -> tuple[list[str], list[float], list[str]]:
        parts = split_cell(cell)
        return (parts[:1], [float(parts[1])], []) if parts else ([], [], [])

    def parse_truth(self, cell: str) -> str | None:
        return cell if cell.strip() else None

    def score_predictions(self, predictions: Predictions, truths: Sequence[str | None]) -> float:
        return global_average_precision(
            predictions.ids,
            [row[0] if row else None for row in predictions.labels],
            [row[0] if row else 0.0 for row in predictions.scores],
            truths,
        )

    def validation_truths(
        self, query_labels: np.ndarray, query_known: np.ndarray, gallery_labels: np.ndarray
    ) -> tuple[np.ndarray, list[str | None]]:
        """Every query; unknown ones are non-landmarks (every prediction on them is wrong)."""
        truths = [lab if kn else None for lab, kn in zip(query_labels, query_known, strict=True)]
        return np.arange(len(query_labels)), truths

    def predict(
        self, ranked: Predictions, calibration: Calibration, confidence_offset: np.ndarray | None = None
    ) -> Predictions:
        """The top voted label with its confidence (minus the query-side penalty, when given)."""
        confidence = landmark_confidence(ranked.labels, ranked.scores, calibration.confidence or "vote")
        if confidence_offset is not None:
            confidence = confidence - confidence_offset
        top_scores = [[float(c)] if row else [] for row, c in zip(ranked.labels, confidence, strict=True)]
        return Predictions(ids=ranked.ids, labels=[row[:1] for row in ranked.labels], scores=top_scores)

    def calibrate(
        self, score: Callable[[Calibration], float], ranked: Predictions, fixed: Calibration
    ) -> tuple[Calibration, float]:
        """The confidence form that orders GAP best."""
        best, form = max((score(Calibration(confidence=form)), form) for form in CONFIDENCE_FORMS)
        return Calibration(confidence=form), best
