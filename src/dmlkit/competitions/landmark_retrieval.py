"""Google Landmark Retrieval (GLDv2): the GLR layout plus `index/`; queries are `test/`.

Submission `id,images`: up to 100 index ids, best first; metric mAP@100. The solution holds
`id,images,Usage`, `images` the relevant index ids (queries without any are `Ignored`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ..metrics import mean_average_precision_at_k
from .base import Adapter, Calibration, Predictions, split_cell
from .landmark_recognition import LandmarkRecognition

_ID = re.compile(r"^[0-9A-Za-z_\-]+$")


class LandmarkRetrieval(LandmarkRecognition):
    name = "landmark-retrieval"
    metric = "map@100"
    header = ("id", "images")
    solution_columns = ("id", "images", "Usage")
    suffix = "-retrieval"
    solution_file = "retrieval_solution.csv"
    max_predictions = 100
    gallery_role = "index"

    def format_cell(self, labels: list[str], scores: list[float], neighbours: list[str]) -> str:
        return " ".join(neighbours[: self.max_predictions])

    def check_cell(self, cell: str) -> str | None:
        parts = split_cell(cell)
        if len(parts) > self.max_predictions:
            return f"{len(parts)} images, at most {self.max_predictions} allowed"
        bad = [p for p in parts if not _ID.match(p)]
        if bad:
            return f"malformed image id {bad[0]!r}"
        return None

    def parse_cell(self, cell: str) -> tuple[list[str], list[float], list[str]]:
        return [], [], split_cell(cell)

    def parse_truth(self, cell: str) -> set[str]:
        return set(split_cell(cell))

    def score_predictions(self, predictions: Predictions, truths: Sequence[set[str]]) -> float:
        return mean_average_precision_at_k(predictions.neighbours, truths, k=self.max_predictions)

    def validation_truths(
        self, query_labels: np.ndarray, query_known: np.ndarray, gallery_labels: np.ndarray
    ) -> tuple[np.ndarray, list[set[str]]]:
        """The known queries whose class the gallery holds; relevant: that class's gallery rows (as str)."""
        by_label: dict[str, set[str]] = {}
        for i, label in enumerate(gallery_labels):
            by_label.setdefault(label, set()).add(str(i))
        pairs = enumerate(zip(query_labels, query_known, strict=True))
        rows = np.array([i for i, (label, known) in pairs if known and label in by_label], dtype=int)
        return rows, [by_label[query_labels[i]] for i in rows]

    def predict(
        self, ranked: Predictions, calibration: Calibration, confidence_offset: np.ndarray | None = None
    ) -> Predictions:
        return Predictions(ids=ranked.ids, neighbours=[row[: self.max_predictions] for row in ranked.neighbours])

    calibrate = Adapter.calibrate  # nothing to tune for retrieval (not GAP's confidence forms)
