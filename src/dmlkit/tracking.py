"""Experiment tracking: each pipeline run as one tracker run — the resolved config, every member's
per-epoch train/validation metrics (live while it trains, replayed from metrics.csv when training is
reused), the validation report, the local leaderboard and the PNGs (curves, retrieval grid).

`tracking: tensorboard` (the default) writes event files under `artifacts/<experiment>/tensorboard/`:
offline, no account, one pinned package; `tensorboard --logdir artifacts` shows them. `mlflow`
(mlflow's own default store — with mlflow 3 a sqlite `mlflow.db` in the working directory — unless
MLFLOW_TRACKING_URI says otherwise) and `wandb` (offline unless WANDB_MODE says otherwise) are used
where the user installed them (the tests pin mlflow-skinny and wandb and read both back). Only rank 0 tracks.

A run is opened by the command (`start`), and the stages report through the module-level functions,
which do nothing when no run is open (tests, notebooks, `tracking: none`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

import cv2
import pandas as pd

log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """The configured tracker cannot be used (its package is not installed)."""


class Tracker(Protocol):
    def scalars(self, group: str, values: dict[str, float], step: int) -> None: ...
    def text(self, name: str, body: str) -> None: ...
    def image(self, name: str, path: Path) -> None: ...
    def close(self) -> None: ...


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (labels, None and NaN left out)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


class TensorBoardTracker:
    def __init__(self, folder: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter  # the tracker loads only when tracking is on
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise TrackingError(f"tracking: tensorboard needs the tensorboard package ({exc})") from None
        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))
        self.text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def scalars(self, group: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{group}/{key}", value, step)

    def text(self, name: str, body: str) -> None:
        self.writer.add_text(name, body)

    def image(self, name: str, path: Path) -> None:
        pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if pixels is not None:
            self.writer.add_image(name, pixels[:, :, ::-1].copy(), dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def mlflow_name(name: str) -> str:
    """A metric name mlflow accepts (letters, digits, `_-. :/`): `map@5` → `map_at_5` (mlflow refuses
    the metrics' own names, which ended a tracked run at its validation summary)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name.replace("@", "_at_"))


class MlflowTracker:
    def __init__(self, experiment: str, run_name: str, config: dict):
        try:
            import mlflow  # optional tracker, installed by the user
        except ImportError:
            raise TrackingError("tracking: mlflow is not installed (pip install mlflow)") from None
        self.mlflow = mlflow
        mlflow.set_experiment(experiment)
        mlflow.start_run(run_name=run_name)
        mlflow.log_dict(config, "config.json")

    def scalars(self, group: str, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({mlflow_name(f"{group}/{k}"): v for k, v in values.items()}, step=step)

    def text(self, name: str, body: str) -> None:
        self.mlflow.log_text(body, f"{name}.md")

    def image(self, name: str, path: Path) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=name.rsplit("/", 1)[0])

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker:
    def __init__(self, experiment: str, run_name: str, folder: Path, config: dict):
        try:
            import wandb  # optional tracker, installed by the user
        except ImportError:
            raise TrackingError("tracking: wandb is not installed (pip install wandb)") from None
        self.wandb = wandb
        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(project=experiment, name=run_name, dir=str(folder), config=config)

    def scalars(self, group: str, values: dict[str, float], step: int) -> None:
        self.run.log({f"{group}/{k}": v for k, v in values.items()} | {f"{group}/step": step})

    def text(self, name: str, body: str) -> None:
        self.run.summary[name] = body

    def image(self, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))})

    def close(self) -> None:
        self.run.finish()


_active: Tracker | None = None
_scope = ""  # "round-<r>/" while a pseudo-label round's members train, "stage-<i>/" a train.stages stage


@contextlib.contextmanager
def scoped(prefix: str):
    """Tags under `prefix` (inside the enclosing scope's) while the block runs."""
    global _scope
    before, _scope = _scope, _scope + prefix
    try:
        yield
    finally:
        _scope = before


def start(kind: str, artifacts: Path, experiment: str, config: dict) -> Tracker | None:
    """Open the run's tracker (rank 0); `kind` 'none' opens nothing."""
    global _active
    finish()
    if kind == "none":
        return None
    run_name = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(artifacts) / experiment / kind / run_name
    if kind == "tensorboard":
        _active = TensorBoardTracker(folder, config)
    elif kind == "mlflow":
        _active = MlflowTracker(experiment, run_name, config)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        _active = WandbTracker(experiment, run_name, folder, config)
    log.info("tracking: %s run %s", kind, folder if kind == "tensorboard" else run_name)
    return _active


def finish() -> None:
    global _active
    if _active is not None:
        _active.close()
        _active = None


def epoch(member: str, row: dict[str, Any], step: int) -> None:
    """One epoch's metrics: train/<member>/loss, val/<member>/val_score, …"""
    if _active is None:
        return
    values = numeric(row)
    train = {k: v for k, v in values.items() if not k.startswith("val_")}
    _active.scalars(f"{_scope}train/{member}", train, step)
    validation = {k.removeprefix("val_"): v for k, v in values.items() if k.startswith("val_")}
    if validation:
        _active.scalars(f"{_scope}val/{member}", validation, step)


def replay(member: str, metrics_csv: Path) -> None:
    """A reused training's epochs, from its metrics.csv (so that every tracked run holds its curves)."""
    if _active is None or not metrics_csv.is_file():
        return
    for i, row in enumerate(pd.read_csv(metrics_csv).to_dict(orient="records")):
        epoch(member, row, i + 1)  # history holds every epoch from the first, as live logging numbers them


def summary(group: str, values: dict[str, Any], body: str | None = None) -> None:
    if _active is None:
        return
    _active.scalars(group, numeric(values), 0)
    if body:
        _active.text(group, body)


def image(name: str, path: Path) -> None:
    if _active is not None and Path(path).is_file():
        _active.image(name, Path(path))
