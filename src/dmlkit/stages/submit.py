"""Submission files in each format's exact layout, in sample_submission order, validated."""

from __future__ import annotations

import json
from pathlib import Path

from ..competitions import Adapter, Predictions


def write_submissions(formats: list[Adapter], root: Path, experiment: str, predictions_dir: Path, work: Path) -> dict:
    written = {}
    for fmt in formats:
        pred = Predictions(**json.loads((predictions_dir / f"predictions-{fmt.name}.json").read_text()))
        frame = fmt.build_submission(pred, fmt.submission_ids(root))
        name = submission_name(experiment, fmt)
        frame.to_csv(work / name, index=False)
        written[fmt.name] = name
    return {"files": written}


def submission_name(experiment: str, fmt: Adapter) -> str:
    return f"{experiment}{fmt.suffix}.csv"
