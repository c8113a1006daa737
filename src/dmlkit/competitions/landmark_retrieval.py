"""Google Landmark Retrieval (GLDv2): the GLR layout plus `index/`; queries are `test/`.

Submission `id,images`: up to 100 index ids, best first; metric mAP@100. The solution holds
`id,images,Usage`, `images` the relevant index ids (queries without any are `Ignored`).
"""

from __future__ import annotations

import re

import pandas as pd

from ..metrics import mean_average_precision_at_k
from .base import split_cell
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

    def score_frame(self, frame: pd.DataFrame) -> float:
        predictions = [split_cell(c) for c in frame["images"].fillna("")]
        relevant = [set(split_cell(c)) for c in frame["truth"].fillna("")]
        return mean_average_precision_at_k(predictions, relevant, k=100)
