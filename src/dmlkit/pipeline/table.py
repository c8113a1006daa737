"""The stages in order: the one table the CLI, `plan`, `runs` and `clean` read. Each stage's facts
(name, code version, outputs, per member or not, what its key hashes, its runner) are declared
once, beside its runner under `dmlkit.stages`; nothing in the package imports this module back."""

from __future__ import annotations

from ..stages.embed import EMBED
from ..stages.ensemble import ENSEMBLE
from ..stages.folds import FOLDS
from ..stages.retrieve import RETRIEVE
from ..stages.submit import SUBMIT
from ..stages.train import TRAIN
from .context import Context
from .executor import Stage

STAGES: tuple[Stage, ...] = (FOLDS, TRAIN, EMBED, ENSEMBLE, RETRIEVE, SUBMIT)
STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)


def stage(name: str) -> Stage:
    for candidate in STAGES:
        if candidate.name == name:
            return candidate
    raise KeyError(f"unknown stage '{name}' (stages: {', '.join(STAGE_NAMES)})")


def run_stage(ctx: Context, name: str) -> None:
    """Run one stage (and whatever it needs upstream), for every member where it runs per member."""
    step = stage(name)
    if step.per_member:
        for member in ctx.cfg.members:
            step.run(ctx, member.name)
    else:
        step.run(ctx)
