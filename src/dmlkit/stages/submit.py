"""The submit stage: submission files in each format's exact layout, in sample_submission order,
validated, copied to submissions/; and their local scores where the competition ships its answers."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from .. import cache
from ..competitions import Adapter, InputError, Predictions
from ..competitions.base import submission_name
from ..competitions.scoring import score_files
from ..pipeline.context import Context
from ..pipeline.executor import Stage, run_cached
from ..runtime import is_main_process
from .retrieve import run_retrieve

log = logging.getLogger(__name__)


def write_submissions(formats: list[Adapter], root: Path, experiment: str, predictions_dir: Path, work: Path) -> dict:
    written = {}
    for fmt in formats:
        if fmt.output == "clusters":  # retrieve.cluster's clusters.csv (required by the pre-run checks)
            if not (predictions_dir / "clusters.csv").is_file():  # retrieve warned why: nothing tuned the threshold
                raise InputError(
                    f"{fmt.name}: retrieve clustered nothing (no validation images to tune retrieve.cluster.threshold "
                    "on, see its warning): set retrieve.cluster.threshold to a cosine, or folds.unknown_classes"
                )
            clusters = pd.read_csv(predictions_dir / "clusters.csv", dtype=str, keep_default_na=False)
            frame = fmt.build_clusters_submission(clusters, fmt.submission_ids(root))
        else:
            pred = Predictions(**json.loads((predictions_dir / f"predictions-{fmt.name}.json").read_text()))
            frame = fmt.build_submission(pred, fmt.submission_ids(root))
        name = submission_name(experiment, fmt)
        frame.to_csv(work / name, index=False)
        written[fmt.name] = name
    return {"files": written}


def run_submit(ctx: Context) -> cache.Artifact:
    retrieve_art = run_retrieve(ctx)
    part = {"experiment": ctx.cfg.experiment, "formats": [f.name for f in ctx.formats]}
    fingerprints = {"sample_submission": cache.file_fingerprint(ctx.root / "sample_submission.csv")}

    def compute(work: Path) -> dict:
        return write_submissions(ctx.formats, ctx.root, ctx.cfg.experiment, retrieve_art.path, work)

    art = run_cached(ctx, SUBMIT, "", part, {"retrieve": cache.produced(retrieve_art)}, fingerprints, compute)
    if is_main_process() and ctx.plan is None:
        ctx.submissions.mkdir(parents=True, exist_ok=True)
        for fmt in ctx.formats:
            name = submission_name(ctx.cfg.experiment, fmt)
            target = ctx.submissions / name
            shutil.copyfile(art.file(name), target.with_name(name + ".tmp"))
            target.with_name(name + ".tmp").replace(target)
            log.info("[submit] wrote %s", target)
    return art


def local_scores(ctx: Context) -> list[dict]:
    """Leaderboard scores of the written submissions where the competition ships its answers (demos)."""
    results = []
    for fmt in ctx.formats:
        solution = ctx.root / fmt.solution_file
        submission = ctx.submissions / submission_name(ctx.cfg.experiment, fmt)
        if solution.is_file() and submission.is_file():
            result = score_files(submission, solution)
            result["submission"] = str(submission)
            results.append(result)
    return results


SUBMIT = Stage(
    name="submit",
    version=1,
    outputs=("*.csv",),
    per_member=False,
    hashes="the experiment name and the formats; the retrieved predictions; sample_submission.csv",
    run=run_submit,
)
