"""Pseudo-label rounds: round r's folds are round 0's plus round r−1's confident test answers as
training rows (`dmlkit.pseudo` selects them); every later stage of round r runs under
`artifacts/<experiment>/round-<r>/`, each round cached on its own."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .. import cache
from ..config import config_slice
from ..pseudo import (
    bar_source,
    cosine_bar,
    precision,
    select_pseudo,
    validation_precision,
    with_pseudo_rows,
    write_round_folds,
)
from ..runs import headline
from ..runtime import is_main_process
from ..stages.folds import FOLDS, load_table, run_folds
from ..stages.retrieve import run_retrieve
from .context import Context
from .executor import run_cached

log = logging.getLogger("dmlkit")


def pseudo_rounds(ctx: Context) -> Context:
    """The context of the last pseudo-label round (`ctx` itself without rounds): running its stages
    runs every earlier round's retrieval first, each round cached on its own."""
    current = ctx
    for r in range(1, ctx.cfg.pseudo.rounds + 1):
        current = Context(
            ctx.cfg,
            artifacts=ctx.artifacts,
            submissions=ctx.submissions,
            force=ctx.force,
            progress=ctx.progress,
            plan=ctx.plan,
            round=r,
            previous=current,
            round_folds=run_round_folds,
        )
    return current


def run_round_folds(ctx: Context) -> cache.Artifact:
    """Round r's folds: round 0's plus round r−1's confident test answers as training rows."""
    base, previous = run_folds(ctx.first), run_retrieve(ctx.previous)
    part = {"pseudo": config_slice(ctx.cfg.pseudo), "round": ctx.round, "format": ctx.adapter.name}
    upstream = {"folds": cache.produced(base), "previous_retrieve": cache.produced(previous)}

    def compute(work: Path) -> dict:
        table, folds = load_table(base)
        chosen, figures = _pseudo_answers(ctx, previous)
        result = dict(base.manifest.get("result", {}))
        result["train_data"] = write_round_folds(base.path, work, with_pseudo_rows(folds, table, chosen), chosen)
        result["pseudo"] = figures
        return result

    art = run_cached(ctx, FOLDS, "", part, upstream, {}, compute)
    if ctx.plan is None and is_main_process():
        _log_pseudo_round(ctx.round, art.manifest.get("result", {}).get("pseudo", {}))
    return art


def _pseudo_answers(ctx: Context, previous: cache.Artifact) -> tuple[pd.DataFrame, dict]:
    """The previous round's test answers that become training rows, and the figures on them: the
    bar, the precision validation queries reach at it, and where the competition ships its answers
    (the demos) the share of the rows that is right."""
    read = {"dtype": {"id": str, "label": str, "truth": str}, "keep_default_na": False}
    answers = pd.read_csv(previous.file(f"answers-{ctx.adapter.name}.csv"), **read)
    answers["cosine"] = pd.to_numeric(answers["cosine"])
    validation = None
    if previous.file("answers-validation.csv").is_file():
        validation = pd.read_csv(previous.file("answers-validation.csv"), **read)
        validation["cosine"] = pd.to_numeric(validation["cosine"])
    unknown = ctx.adapter.unknown_label
    bar = cosine_bar(ctx.cfg.pseudo, validation, unknown)
    chosen = select_pseudo(answers, unknown, ctx.cfg.pseudo, bar)
    if bar is None:  # top_share: the lowest cosine it took
        bar = float(chosen["cosine"].min()) if len(chosen) else np.inf
    above, right = validation_precision(validation, unknown, bar) if validation is not None else (0, None)
    solution = ctx.root / ctx.adapter.solution_file
    truths = {}
    if solution.is_file():
        frame = ctx.adapter.read_solution(solution)
        truths = dict(zip(frame.iloc[:, 0].astype(str), frame.iloc[:, 1].astype(str), strict=True))
    report = previous.manifest.get("result", {}).get("report") or []
    figures = {
        "rows": len(chosen),
        "of_test_images": len(answers),
        "cosine_bar": bar if np.isfinite(bar) else None,
        "bar_from": bar_source(ctx.cfg.pseudo),
        "validation_above_bar": above,
        "validation_precision": right,
        "precision_against_answers": precision(chosen, truths),
        "previous_round_validation": {k: v for k, v in headline(report).items() if k != "step"},
    }
    return chosen, figures


def _log_pseudo_round(round_: int, info: dict) -> None:
    scored, right, bar = info.get("precision_against_answers"), info.get("validation_precision"), info.get("cosine_bar")
    log.info(
        "[pseudo round %d] %d of %d test images train as their first answer (%s; round %d's validation: %s); "
        "validation queries at that bar: %d, %s right%s",
        round_,
        info.get("rows", 0),
        info.get("of_test_images", 0),
        f"no answer passes pseudo.{info.get('bar_from')}" if bar is None else f"cosine ≥ {bar:.4f}",
        round_ - 1,
        ", ".join(f"{k} {v:.4f}" for k, v in info.get("previous_round_validation", {}).items() if v == v),
        info.get("validation_above_bar", 0),
        "–" if right is None else f"{right:.3f}",
        f"; {scored:.3f} of the rows right by the shipped answers" if scored is not None else "",
    )
    if right is not None and right < 0.5:
        log.warning(
            "[pseudo round %d] most validation answers at this bar are wrong (%.3f right): the rows it adds "
            "likely teach wrong labels; set pseudo.min_precision (e.g. 0.9) or raise pseudo.min_cosine",
            round_,
            right,
        )
    if bar is None and info.get("bar_from") == "min_precision":
        log.warning("[pseudo round %d] no cosine bar reaches pseudo.min_precision on validation: no rows added", round_)
