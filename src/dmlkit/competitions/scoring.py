"""Local scoring: detect the competition from the submission's header, score Public and Private."""

from __future__ import annotations

from pathlib import Path

from . import ADAPTERS, adapter_for_header
from .animalclef import clusters_result
from .base import InputError, read_csv_file


def score_files(submission: Path, solution: Path) -> dict:
    submission, solution = Path(submission), Path(solution)
    frame = read_csv_file(submission)
    if "cluster" in frame.columns and tuple(frame.columns) not in {cls.header for cls in ADAPTERS.values()}:
        return score_clusters(frame, submission, solution)
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


def score_clusters(frame, submission: Path, truth_file: Path) -> dict:
    """ARI (AnimalCLEF 2026's score) and AMI of a clustering (first column the image, a `cluster`
    column; retrieve.cluster's clusters.csv) against the true identities (first column the image,
    second its identity, an optional Usage: scored per usage as well)."""
    truth = read_csv_file(truth_file)
    if len(truth.columns) < 2:
        raise InputError(f"{truth_file}: needs the image and its identity as its first two columns")
    image, identity = truth.columns[:2]
    clusters = dict(zip(frame[frame.columns[0]], frame["cluster"], strict=True))
    missing = [i for i in truth[image] if i not in clusters]
    if missing:
        raise InputError(f"{submission}: no cluster for {len(missing)} image(s) of {truth_file}, e.g. {missing[0]}")
    return {"competition": "clusters", **clusters_result(truth, clusters, image, identity)}


def format_scores(result: dict) -> str:
    def fmt(value):
        return "n/a" if value is None else f"{value:.5f}"

    if result["metric"] == "ari":
        ari = "  ".join(f"{k} {fmt(result[k])}" for k in ("public", "private", "all"))
        ami = "  ".join(f"{k} {fmt(v)}" for k, v in result["ami"].items())
        return f"{result['competition']} (ARI): {ari}  | AMI: {ami}"

    line = (
        f"{result['competition']} ({result['metric']}): public {fmt(result['public'])}  "
        f"private {fmt(result['private'])}"
    )
    for usage, scores in (result.get("open_set") or {}).items():
        if scores:
            line += f"  | {usage} BAKS {fmt(scores['baks'])} BAUS {fmt(scores['baus'])} √ {fmt(scores['open_set'])}"
    return line
