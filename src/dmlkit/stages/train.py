"""The train stage: each member trained on its fold (with train.stages, stage by stage), cached
per member. The training itself is `dmlkit.training` (data, setup, loop, checkpoints); the
objective (margin loss, SEE, Partial FC) is `models.objective`, built through `dmlkit.build`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import cache, tracking
from ..competitions import Adapter
from ..competitions.base import InputError
from ..config import Config, MemberConfig, member_slice
from ..errors import ArtifactError
from ..models.backbone import fetch_pretrained
from ..models.checkpoint import load_weights
from ..pipeline.context import Context
from ..pipeline.executor import Stage, artifact_path, run_cached, stage_key
from ..plots import plot_training_curves
from ..runtime import (
    barrier,
    is_main_process,
    seed_everything,
)
from ..training.checkpoints import end_of_epoch, finish, resume
from ..training.data import competition_boxes, fold_data, training_cropper, training_dataset
from ..training.loop import train_epoch, validate
from ..training.setup import build_aux_head, build_networks, training_run
from .folds import load_table, run_folds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """What every member's training in a run shares: the config, the training rows with their folds,
    the competition (its metric validates), the device and whether to show progress."""

    cfg: Config
    folds: pd.DataFrame
    adapter: Adapter
    device: torch.device
    progress: bool = True
    refit: bool = False  # train on every training row, validate on none (member.refit)


def train_member(job: TrainJob, member: MemberConfig, work: Path, init_state: dict | None = None) -> dict:
    """Train `member` on its fold; writes best.pt, final.pt, metrics.csv and curves.png into `work`.
    With train.stages, each stage trains in `work/stage-<i>/` from the previous stage's final weights;
    the last stage's files are the member's, metrics.csv holds every stage's epochs."""
    if not member.train.stages:
        return train_stage(job, member, work, init_state)
    results, histories, previous = [], [], None
    for i, (stage, stage_member) in enumerate(zip(member.train.stages, stage_members(member), strict=True)):
        folder = work / f"stage-{i + 1}"
        folder.mkdir(exist_ok=True)
        if (folder / "result.json").is_file():  # a resumed run: this stage finished before the crash
            log.info("%s: stage %d already trained (%s)", member.name, i + 1, folder)
            result = json.loads((folder / "result.json").read_text())
        else:
            if previous is not None:  # the previous stage's final weights (only read when this one trains)
                init_state = {**load_weights(previous / "final.pt", job.device), "source": f"stage {i}"}
            if stage.reinit_head and init_state is not None:
                init_state = {"model": init_state["model"], "source": init_state.get("source")}
            log.info("%s: stage %d/%d at %d px", member.name, i + 1, len(member.train.stages), stage.image_size)
            with tracking.scoped(f"stage-{i + 1}/"):
                result = train_stage(job, stage_member, folder, init_state)
            if is_main_process():
                (folder / "result.json").write_text(json.dumps(result))
            barrier()
        previous = folder
        results.append(result)
        histories.append(pd.read_csv(folder / "metrics.csv").assign(stage=i + 1))
    return finish_stages(member, work, results, histories) if is_main_process() else results[-1]


def finish_stages(member: MemberConfig, work: Path, results: list[dict], histories: list[pd.DataFrame]) -> dict:
    """The last stage's weights as the member's; metrics.csv and curves.png over every stage."""
    last = work / f"stage-{len(results)}"
    for name in ("best.pt", "final.pt"):
        if (last / name).is_file():  # (a rerun after a crash right here finds them moved already)
            os.replace(last / name, work / name)
    for weights in work.glob("stage-*/*.pt"):  # the earlier stages' weights: only a resume needed them
        weights.unlink()
    history = pd.concat(histories, ignore_index=True)
    history["stage_epoch"] = history["epoch"]
    history["epoch"] = np.arange(1, len(history) + 1)
    history.to_csv(work / "metrics.csv", index=False)
    plot_training_curves(history, work / "curves.png", title=f"{member.name} ({len(results)} stages)")
    stages = [{"image_size": st.image_size, **r} for st, r in zip(member.train.stages, results, strict=True)]
    return {**results[-1], "stages": stages}


def stage_members(member: MemberConfig) -> list[MemberConfig]:
    """The member as each of its train.stages trains it: the stage's size, epochs, LR and frozen epochs."""
    out = []
    for stage in member.train.stages:
        train = member.train.model_copy(
            update={
                "epochs": stage.epochs,
                "lr": stage.lr if stage.lr is not None else member.train.lr,
                "freeze_backbone_epochs": stage.freeze_backbone_epochs,
                "stages": [],
            }
        )
        out.append(member.model_copy(update={"image_size": stage.image_size, "train": train}))
    return out


def train_stage(job: TrainJob, member: MemberConfig, work: Path, init_state: dict | None = None) -> dict:
    """Train `member` (one stage) on its fold; writes best.pt, final.pt, metrics.csv and curves.png."""
    cfg, folds, adapter, device, progress = job.cfg, job.folds, job.adapter, job.device, job.progress
    t = member.train
    # The initial weights depend on the seed and the member only, not on what this process did before
    # (a member trained after a cached one would otherwise start elsewhere than in a fresh run).
    seed_everything(zlib.crc32(f"{cfg.seed}:{member.name}".encode()))
    data = fold_data(member, folds, job.refit)
    model, head = build_networks(member, data, device, init_state)
    boxes = competition_boxes(cfg, folds["id"].tolist()) if member.train.crops or cfg.embed.crops else None
    dataset = training_dataset(member, data, training_cropper(cfg, member, data, boxes))
    run = training_run(member, model, head, dataset, device, build_aux_head(member, data, device, init_state))
    start_epoch, history, best = resume(run, work / "last.pt", device, member.name)
    started = time.time()
    for epoch in range(start_epoch, t.epochs):
        epoch_started = time.time()
        row = train_epoch(cfg, member, run, dataset, epoch, device, work / "last.pt", progress)
        row["train_s"] = round(time.time() - epoch_started, 1)
        row["elapsed_s"] = round(time.time() - started, 1)
        if not job.refit and ((epoch + 1) % t.validate_every == 0 or epoch + 1 == t.epochs):
            validation_started = time.time()
            row.update(validate(cfg, member, run.eval_model, data, adapter, device, progress, boxes))
            row["val_s"] = round(time.time() - validation_started, 1)
        history.append(row)
        log.info(
            "%s: %s",
            member.name,
            " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
        )
        if is_main_process():
            best = end_of_epoch(run, member, data, work, epoch, history, best)
            tracking.epoch(member.name, row, epoch + 1)
    if run.skipped_images:
        log.warning(
            "%s: skipped %d unreadable training image(s): %s",
            member.name,
            len(run.skipped_images),
            sorted(run.skipped_images)[:10],
        )
    if is_main_process():
        finish(run, member, data, work, history)
    return {
        "best": best,
        "classes": len(data.classes),
        "trained_classes": len(data.head_classes),
        "aux_classes": len(data.aux_classes),
        "train_images": len(dataset),
        "skipped_images": sorted(run.skipped_images),
        "nonfinite_steps": run.nonfinite_steps,
        "final_val_score": history[-1].get("val_score") if history else None,
    }


# ------------------------------------------------------------------------------------ the stage
def _train_inputs(ctx: Context, member: MemberConfig, refit: bool = False) -> tuple[dict, dict, dict]:
    """(config part, upstream keys, fingerprints) of a member's training (`refit`: its refit model's)."""
    folds = run_folds(ctx)
    # folds.csv and its images; a folds artifact still pending in `plan` stands for itself
    upstream = {"train_data": folds.manifest.get("result", {}).get("train_data", cache.produced(folds))}
    if member.init_from:
        upstream["init"] = _trained_output(ctx, ctx.cfg.member(member.init_from))
    part = {"member": member_slice(member), "seed": ctx.cfg.seed, **({"refit": True} if refit else {})}
    weights = {"pretrained_file": cache.file_fingerprint(member.pretrained_file)} if member.pretrained_file else {}
    if member.train.crops or ctx.cfg.embed.crops:  # what it crops (training, and its validation's embedding)
        weights.update(box_inputs(ctx))
        part["embed_crops"] = ctx.cfg.embed.crops
    return part, upstream, weights


def box_inputs(ctx: Context) -> dict:
    """The boxes file's fingerprint and the margin, for the stages that crop."""
    if not (ctx.root / ctx.cfg.competition.boxes).is_file():
        raise InputError(f"{ctx.root / ctx.cfg.competition.boxes}: competition.boxes file not found")
    return {
        "boxes": cache.file_fingerprint(ctx.root / ctx.cfg.competition.boxes),
        "box_margin": str(ctx.cfg.competition.box_margin),
    }


def _trained_path(ctx: Context, member: MemberConfig) -> Path:
    """Where the member's trained artifact is (or will be) for the current inputs."""
    key = stage_key(TRAIN, *_train_inputs(ctx, member))
    return artifact_path(ctx, TRAIN, member.name, key)


def _trained_output(ctx: Context, member: MemberConfig) -> str:
    """The output digest of the member's trained weights, or a placeholder while it is untrained
    (then whatever starts from it is untrained too)."""
    path = _trained_path(ctx, member)
    try:
        manifest = cache.read_manifest(path) if cache.is_complete(path) else None
    except ArtifactError:  # damaged: its own run moves it aside and trains it again
        manifest = None
    if manifest is None:
        return f"untrained:{path.name}"
    return cache.produced(cache.Artifact("train", path.name, path, reused=True, manifest=manifest))


def ensure_pretrained(ctx: Context) -> None:
    """timm's hub weights of every member that still has to train, fetched before anything trains."""
    if ctx.pretrained_checked or ctx.plan is not None:
        return
    for i, member in enumerate(ctx.cfg.members):
        if member.pretrained and not cache.is_complete(_trained_path(ctx, member)):
            fetch_pretrained(member.backbone, member.pretrained_tag, f"{ctx.cfg.source}: members.{i} ({member.name})")
    ctx.pretrained_checked = True


def refit_name(member_name: str) -> str:
    """The artifacts name of a member's refit model (member.refit)."""
    return f"{member_name}-refit"


def run_train(ctx: Context, member_name: str) -> cache.Artifact:
    """The member's trained weights (an offline package's member stands in for training); a member
    with refit trains its refit model next (`run_refit`)."""
    art = _run_train(ctx, member_name)
    if ctx.cfg.member(member_name).refit != "off":
        run_refit(ctx, member_name)
    return art


def _packaged(ctx: Context, name: str) -> cache.Artifact:
    """An offline package's trained model (`ctx.trained[name]`) as the train artifact."""
    manifest = cache.read_manifest(ctx.trained[name])
    ctx.done[f"train/{name}"] = cache.Artifact("train", manifest["key"], ctx.trained[name], True, manifest)
    return ctx.done[f"train/{name}"]


def run_refit(ctx: Context, member_name: str) -> cache.Artifact:
    """The member trained again on every training row with its fold model's schedule (member.refit);
    cached as train/<member>-refit."""
    member = ctx.cfg.member(member_name)
    if f"train/{refit_name(member_name)}" in ctx.done:
        return ctx.done[f"train/{refit_name(member_name)}"]
    if refit_name(member_name) in ctx.trained:
        return _packaged(ctx, refit_name(member_name))
    folds_art = run_folds(ctx)
    init_art = run_train(ctx, member.init_from) if member.init_from else None
    part, upstream, weights = _train_inputs(ctx, member, refit=True)

    def compute(work: Path) -> dict:
        _, folds = load_table(folds_art)
        init_state = load_weights(init_art.file("final.pt")) if init_art else None
        job = TrainJob(ctx.cfg, folds, ctx.adapter, ctx.device, ctx.progress, refit=True)
        return train_member(job, member, work, init_state)

    flags = {"resumable": True, "all_ranks": True}
    return run_cached(ctx, TRAIN, refit_name(member.name), part, upstream, weights, compute, **flags)


def _run_train(ctx: Context, member_name: str) -> cache.Artifact:
    if f"train/{member_name}" in ctx.done:
        return ctx.done[f"train/{member_name}"]
    if member_name in ctx.trained:
        return _packaged(ctx, member_name)
    member = ctx.cfg.member(member_name)
    folds_art = run_folds(ctx)
    ensure_pretrained(ctx)
    init_art = run_train(ctx, member.init_from) if member.init_from else None
    part, upstream, weights = _train_inputs(ctx, member)

    def compute(work: Path) -> dict:
        _, folds = load_table(folds_art)
        init_state = load_weights(init_art.file("final.pt")) if init_art else None
        job = TrainJob(ctx.cfg, folds, ctx.adapter, ctx.device, ctx.progress)
        return train_member(job, member, work, init_state)

    def log_curves(art: cache.Artifact) -> None:
        log.info("[train/%s] training curves: %s", member.name, art.file("curves.png"))

    scope = f"round-{ctx.round}/" if ctx.round else ""
    with tracking.scoped(scope):
        flags = {"resumable": True, "all_ranks": True, "on_computed": log_curves}
        art = run_cached(ctx, TRAIN, member.name, part, upstream, weights, compute, **flags)
        if ctx.plan is None and is_main_process():
            if art.reused:  # computed: its epochs were tracked live
                tracking.replay(member.name, art.file("metrics.csv"))
            tracking.image(f"{scope}train/{member.name}/curves", art.file("curves.png"))
    return art


TRAIN = Stage(
    name="train",
    version=4,
    outputs=("best.pt", "final.pt"),
    per_member=True,
    hashes="the member's config slice and the seed; folds.csv and its images; init_from's weights; "
    "pretrained_file; boxes and margin where it crops",
    run=run_train,
)
