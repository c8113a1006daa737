"""Local scoring: detect the competition from the submission's header, score Public and Private."""

from __future__ import annotations

from pathlib import Path

from . import adapter_for_header
from .base import InputError, read_csv_file


def score_files(submission: Path, solution: Path) -> dict:
    submission, solution = Path(submission), Path(solution)
    frame = read_csv_file(submission)
    adapter = adapter_for_header(list(frame.columns))
    answers = adapter.read_solution(solution)
    if answers.columns[0] != adapter.solution_columns[0] or answers.columns[1] != adapter.solution_columns[1]:
        raise InputError(
            f"{solution}: columns {list(answers.columns)} do not match the {adapter.name} submission "
            f"{submission} (expected {list(adapter.solution_columns)})"
        )
    result = adapter.score(frame, answers, source=str(submission))
    result["competition"] = adapter.name
    return result


def format_scores(result: dict) -> str:
    def fmt(value):
        return "n/a" if value is None else f"{value:.5f}"

    line = (
        f"{result['competition']} ({result['metric']}): public {fmt(result['public'])}  "
        f"private {fmt(result['private'])}"
    )
    for usage, scores in (result.get("open_set") or {}).items():
        if scores:
            line += f"  | {usage} BAKS {fmt(scores['baks'])} BAUS {fmt(scores['baus'])} √ {fmt(scores['open_set'])}"
    return line
