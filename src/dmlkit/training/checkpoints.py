"""A training run's files: the per-epoch resumable state (`last.pt`, written into the artifact's
partial directory: a rerun after a crash resumes from it), best.pt when validation improves, and
at the end final.pt, metrics.csv and curves.png."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
import torch

from ..build import member_data
from ..config import MemberConfig
from ..models.checkpoint import load_training_state, save_training_state, save_weights
from ..models.heads import MarginHead
from ..plots import plot_training_curves
from .data import FoldData
from .setup import TrainingRun

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ checkpoint
def resume(run: TrainingRun, path: Path, device: torch.device, name: str) -> tuple[int, list[dict], dict]:
    """(first epoch to train, history, best) from the last epoch's checkpoint, if a crashed run left one."""
    state = load_training_state(path, device)
    if state is None:
        return 0, [], {"score": -math.inf, "epoch": -1}
    run.model.load_state_dict(state["model"])
    run.head.load_state_dict(state["head"])
    if run.aux_head is not None:
        run.aux_head.load_state_dict(state["aux_head"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    log.info("%s: resuming after epoch %d from %s", name, state["epoch"] + 1, path)  # saved 0-based
    return state["epoch"] + 1, state["history"], state["best"]


def end_of_epoch(
    run: TrainingRun, member: MemberConfig, data: FoldData, work: Path, epoch: int, history: list[dict], best: dict
) -> dict:
    """Save best.pt when the validation score improved, and the resumable state; returns the best."""
    row = history[-1]
    if "val_score" in row and row["val_score"] > best["score"]:
        best = {"score": row["val_score"], "epoch": epoch + 1}
        save_weights(work / "best.pt", run.eval_model, run.head, data.classes, member_data(member), _aux(run, data))
    state = {
        "model": run.model.state_dict(),
        "head": run.head.state_dict(),
        "aux_head": run.aux_head.state_dict() if run.aux_head is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "epoch": epoch,
        "history": history,
        "best": best,
    }
    save_training_state(work / "last.pt", state)
    return best


def _aux(run: TrainingRun, data: FoldData) -> tuple[MarginHead, list[str]] | None:
    return (run.aux_head, data.aux_classes) if run.aux_head is not None else None


def finish(run: TrainingRun, member: MemberConfig, data: FoldData, work: Path, history: list[dict]) -> None:
    """final.pt (best.pt too when nothing was validated), metrics.csv, curves.png; drop last.pt."""
    save_weights(work / "final.pt", run.eval_model, run.head, data.classes, member_data(member), _aux(run, data))
    if not (work / "best.pt").exists():
        save_weights(work / "best.pt", run.eval_model, run.head, data.classes, member_data(member), _aux(run, data))
    pd.DataFrame(history).to_csv(work / "metrics.csv", index=False)
    plot_training_curves(pd.DataFrame(history), work / "curves.png", title=member.name)
    (work / "last.pt").unlink(missing_ok=True)
