"""One run's context: the config, the artifact and submission folders, the competition's adapter
and table, the device, and (pseudo-label rounds) the round and the round before it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch

from .. import cache
from ..competitions import Adapter, get_adapter, wildlife
from ..competitions.base import check_table
from ..competitions.distractors import read_pool
from ..config import Config, ConfigError
from ..demo import build_demo
from ..runtime import barrier, default_device, is_main_process

log = logging.getLogger("dmlkit")


@dataclass
class Context:
    cfg: Config
    artifacts: Path = Path("artifacts")
    submissions: Path = Path("submissions")
    force: set[str] = field(default_factory=set)
    progress: bool = True
    done: dict[str, cache.Artifact] = field(default_factory=dict)
    pretrained_checked: bool = False
    plan: list[dict] | None = None  # planning (`./run.sh plan`): decisions collected, nothing computed
    trained: dict[str, Path] = field(default_factory=dict)  # member → packaged train artifact (offline.py)
    round: int = 0  # pseudo-label round (pipeline/rounds.py); its artifacts live under round-<r>/
    previous: Context | None = None  # the round before this one
    # pseudo-label rounds: what computes this round's folds (set by pipeline/rounds.py)
    round_folds: Callable[[Context], cache.Artifact] | None = None

    @cached_property
    def adapter(self) -> Adapter:
        return get_adapter(self.cfg.competition.name)

    @cached_property
    def formats(self) -> list[Adapter]:
        return [self.adapter, *(get_adapter(name) for name in self.cfg.competition.extra_formats)]

    @property
    def root(self) -> Path:
        return Path(self.cfg.competition.root)

    @property
    def first(self) -> Context:
        """Round 0's context (this one without pseudo-label rounds)."""
        ctx = self
        while ctx.previous is not None:
            ctx = ctx.previous
        return ctx

    @cached_property
    def unknown_classes(self) -> float:
        """The share of classes each fold holds out: as configured, else 0.2 where the metric answers
        'new' and training has no unknown rows to calibrate it on (Happywhale, generic CSV, folders)."""
        if self.cfg.folds.unknown_classes is not None:
            return self.cfg.folds.unknown_classes
        train = self.source_table[self.source_table["role"] == "train"]
        return 0.2 if self.adapter.metric == "map@5" and train["known"].all() else 0.0

    @cached_property
    def source_table(self) -> pd.DataFrame:
        """The competition's common table, with the distractor pool's rows when one is configured."""
        table = self.adapter.read(self.root)
        penalty = self.cfg.retrieve.penalty
        if penalty.pool:
            table = check_table(pd.concat([table, read_pool(penalty.pool)], ignore_index=True), penalty.pool)
        if penalty.enabled and not table["role"].isin(["index", "distractor"]).any():
            raise ConfigError(
                f"{self.cfg.source}: retrieve.penalty.enabled needs non-landmark images: {self.root} has no "
                "index/ images and retrieve.penalty.pool is not set (a folder, .zip or .csv of them)"
            )
        return table

    @cached_property
    def device(self) -> torch.device:
        return torch.device(default_device())

    @property
    def val_fold(self) -> int:
        """The fold retrieve validates on: retrieve.val_fold, else the first member's."""
        r = self.cfg.retrieve
        return r.val_fold if r.val_fold is not None else self.cfg.members[0].fold


def ensure_demo_data(ctx: Context) -> None:
    """The demo competition generated, or a wildlife-datasets dataset downloaded, where missing."""
    competition = ctx.cfg.competition
    if competition.download and competition.name != wildlife.Wildlife.name:
        raise ConfigError(f"{ctx.cfg.source}: competition.download: only the wildlife adapter downloads datasets")
    if is_main_process():
        if competition.demo:
            build_demo(competition.demo, ctx.root, competition.demo_params)
        if competition.download and not (ctx.root / wildlife.METADATA).is_file():
            ctx.root.mkdir(parents=True, exist_ok=True)
            log.info("downloading %s through wildlife-datasets into %s", competition.download, ctx.root)
            wildlife.download(competition.download, ctx.root, ctx.cfg.folds.seed)
    barrier()
