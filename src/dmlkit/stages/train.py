"""Training one member on its fold: the loop, split by phase (data, networks, optimisation, epoch,
validation, checkpoint). The objective (margin loss, SEE, Partial FC) is `models.objective`; the
model and head builders `models.build`; the checkpoint files `models.checkpoint`.

A checkpoint is written every epoch into the artifact's partial directory; a rerun after a crash
resumes from it. Per-epoch data order and augmentation are seeded from (seed, epoch), so a
resumed run on CPU ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import tracking
from ..competitions import Adapter
from ..config import Config, MemberConfig, TrainConfig
from ..data.crops import Cropper, box_id, missing_boxes, read_boxes, rows_boxes, source_croppers
from ..data.dataset import ImageDataset, with_rotated_classes
from ..data.transforms import make_pipeline
from ..evaluation import knn_validation_scores
from ..inference import autocast_dtype, embed_sharded, loader_options
from ..models.backbone import EmbeddingModel
from ..models.build import build_aux, build_member_head, build_model
from ..models.checkpoint import load_training_state, load_weights, save_training_state, save_weights
from ..models.heads import MarginHead
from ..models.objective import MarginModel
from ..models.optim import make_optimizer, make_scheduler
from ..models.see import epoch_value
from ..runtime import (
    any_rank,
    barrier,
    broadcast_object,
    is_main_process,
    progress_bar,
    rank,
    seed_everything,
    world_size,
)
from .folds import fold_parts

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    pass


# ------------------------------------------------------------------------------------------ data
@dataclass
class FoldData:
    """A member's fold: training rows (with rotated copies), the head's classes and the targets."""

    train_part: pd.DataFrame
    val_part: pd.DataFrame
    train_rows: pd.DataFrame
    head_classes: list[str]  # the original classes first, then rotated ones
    classes: list[str]  # what the saved head keeps
    counts: np.ndarray
    targets: np.ndarray
    aux_classes: list[str] = field(default_factory=list)  # head.aux: the auxiliary column's classes
    aux_targets: np.ndarray | None = None  # per training row, its auxiliary class (−1: none)


def fold_data(member: MemberConfig, folds: pd.DataFrame) -> FoldData:
    train_part, val_part = fold_parts(folds, member.fold)
    train_rows, head_classes = with_rotated_classes(train_part, member.train.class_rotations)
    class_index = {c: i for i, c in enumerate(head_classes)}
    data = FoldData(
        train_part,
        val_part,
        train_rows,
        head_classes,
        head_classes[: train_part["label"].nunique()],
        train_rows["label"].value_counts().reindex(head_classes).to_numpy(),
        train_rows["label"].map(class_index).to_numpy(),
    )
    if member.head.aux is not None:
        data.aux_classes, data.aux_targets = aux_targets(train_rows, member.head.aux.column, member.name)
    return data


def aux_targets(rows: pd.DataFrame, column: str, member_name: str) -> tuple[list[str], np.ndarray]:
    """(classes, per row its class index or −1 where the column is blank) of an auxiliary column."""
    if column not in rows.columns:
        extra = sorted(set(rows.columns) - {"id", "path", "label", "role", "known", "fold", "unknown_fold"})
        raise ValueError(
            f"{member_name}: head.aux.column '{column}' is not a column of the training table "
            f"(its extra columns: {extra or 'none'})"
        )
    values = rows[column].fillna("").astype(str).str.strip()
    classes = sorted(set(values) - {""})
    if len(classes) < 2:
        raise ValueError(f"{member_name}: head.aux.column '{column}' has {len(classes)} class(es); a head needs 2")
    index = {c: i for i, c in enumerate(classes)}
    return classes, values.map(lambda v: index.get(v, -1)).to_numpy(np.int64)


def competition_boxes(cfg: Config, ids: list[str]) -> dict | None:
    """competition.boxes read for these row ids (None without a boxes file)."""
    if cfg.competition.boxes is None:
        return None
    return read_boxes(Path(cfg.competition.root) / cfg.competition.boxes, {box_id(str(i)) for i in ids})


def training_cropper(cfg: Config, member: MemberConfig, data: FoldData, boxes: dict | None) -> Cropper | None:
    """train.crops over the training rows, with how many rows lack each source's box (used whole)."""
    if not member.train.crops or boxes is None:
        return None
    rows = rows_boxes(data.train_rows["id"].tolist(), boxes)
    missing = missing_boxes(rows, list(member.train.crops), f"{member.name}: train.crops")
    log.info(
        "%s: train.crops %s; without a box (trained whole when drawn): %s of %d rows",
        member.name,
        member.train.crops,
        ", ".join(f"{source} {n}" for source, n in missing.items()) or "-",
        len(rows),
    )
    return Cropper(rows, member.train.crops, cfg.competition.box_margin)


def training_dataset(member: MemberConfig, data: FoldData, cropper: Cropper | None = None) -> ImageDataset:
    t = member.train
    targets = data.targets.tolist()
    if data.aux_targets is not None:  # (identity, auxiliary) per row: batches of (B, 2) labels
        targets = list(np.stack([data.targets, data.aux_targets], axis=1).astype(np.int64))
    return ImageDataset(
        data.train_rows["path"].tolist(),
        targets,
        make_pipeline(member.image_size, augment=t.augment),
        member.in_chans,
        member.image_size,
        skip_unreadable=not t.strict_images,
        quarter_turns=data.train_rows["quarter_turns"].tolist(),
        cropper=cropper,
    )


# -------------------------------------------------------------------------------------- networks
def build_networks(
    member: MemberConfig, data: FoldData, device: torch.device, init_state: dict | None
) -> tuple[EmbeddingModel, MarginHead]:
    """The member's model and head, started from `init_from`'s weights when given."""
    model = build_model(member, weights=init_state is None).to(device)  # init_from: its weights replace them
    head = build_member_head(member, data.counts).to(device)
    if init_state is not None:
        source = init_state.get("source") or member.init_from  # train.stages: the previous stage
        model.load_state_dict(init_state["model"])
        if "head" in init_state and init_state.get("classes") == data.head_classes:
            head.load_state_dict(init_state["head"])
            log.info("%s: initialised model and head from %s", member.name, source)
        else:
            why = "class set differs" if "head" in init_state else "train.stages reinit_head"
            log.info("%s: initialised backbone from %s; head re-initialised (%s)", member.name, source, why)
    if member.train.channels_last:  # faster convolutions with bf16/fp16, on CPUs (oneDNN) and GPUs alike
        model = model.to(memory_format=torch.channels_last)
    if member.train.sync_bn and world_size() > 1:
        if device.type == "cuda":
            model = sync_batchnorm(model)
        else:
            log.warning("%s: train.sync_bn needs GPUs (torch's SyncBatchNorm is CUDA-only); ignored", member.name)
    return model, head


def build_aux_head(
    member: MemberConfig, data: FoldData, device: torch.device, init_state: dict | None = None
) -> MarginHead | None:
    """head.aux's ArcFace head over the auxiliary column's classes (None without head.aux); it
    continues from `init_state`'s where that holds one over the same classes (an earlier stage)."""
    if member.head.aux is None:
        return None
    counts = np.bincount(data.aux_targets[data.aux_targets >= 0], minlength=len(data.aux_classes))
    head = build_aux(member, counts).to(device)
    if init_state is not None and "head" in init_state and init_state.get("aux_classes") == data.aux_classes:
        head.load_state_dict(init_state["aux_head"])
    return head


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """SyncBatchNorm for every BatchNorm, by timm's converter: torch's turns timm's `BatchNormAct2d`
    (EfficientNet, NFNet, ...) into a plain SyncBatchNorm whose forward drops the fused activation."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


# ---------------------------------------------------------------------------------- optimisation
@dataclass
class TrainingRun:
    """What changes while a member trains, and the loop's counters."""

    model: EmbeddingModel
    head: MarginHead
    train_model: nn.Module  # the objective, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel | None
    dtype: torch.dtype | None
    per_rank_batch: int
    drop_last: bool
    skipped_images: set[str] = field(default_factory=set)
    nonfinite_steps: int = 0
    aux_head: MarginHead | None = None

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


def batch_plan(t: TrainConfig, world: int) -> tuple[int, float]:
    """(each rank's batch, the learning rate) for `world` processes: batch_per global splits the
    batch over the ranks (the single-process optimisation); batch_per gpu gives each rank the whole
    batch and scales the lr by lr_scaling."""
    if t.batch_per == "gpu":
        factor = {"none": 1.0, "linear": float(world), "sqrt": math.sqrt(world)}[t.lr_scaling]
        return t.batch_size, t.lr * factor
    return max(2, t.batch_size // world), t.lr


def _log_batch_plan(member: MemberConfig, model: nn.Module, per_rank_batch: int, lr: float) -> None:
    if world_size() <= 1:
        return
    t = member.train
    log.info(
        "%s: %d ranks × %d images = global batch %d (train.batch_per: %s), lr %.3g",
        member.name,
        world_size(),
        per_rank_batch,
        per_rank_batch * world_size(),
        t.batch_per,
        lr,
    )
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and per_rank_batch < 16 and not (t.freeze_bn or t.sync_bn):
        log.warning(
            "%s: BatchNorm sees %d images per rank: train.batch_per: gpu (each GPU gets batch_size "
            "images), train.sync_bn or train.freeze_bn",
            member.name,
            per_rank_batch,
        )


def training_run(
    member: MemberConfig,
    model: EmbeddingModel,
    head: MarginHead,
    dataset: ImageDataset,
    device: torch.device,
    aux_head: MarginHead | None = None,
) -> TrainingRun:
    per_rank_batch, lr = batch_plan(member.train, world_size())
    _log_batch_plan(member, model, per_rank_batch, lr)
    t = member.train.model_copy(update={"lr": lr})
    train_model: nn.Module = MarginModel(model, head, member, aux_head)
    if world_size() > 1:
        head.persistent_grad = False  # DDP reduces the weight's gradient from its own autograd hook
        frozen_first = member.train.freeze_backbone_epochs > 0  # the frozen backbone gets no gradient
        train_model = nn.parallel.DistributedDataParallel(train_model, find_unused_parameters=frozen_first)
    # Partial FC: AdamW updates the sampled classes' rows of the head only
    rows = head.touched_rows if member.head.sample_rate < 1.0 and isinstance(head, MarginHead) else None
    aux = list(aux_head.parameters()) if aux_head is not None else []
    optimizer = make_optimizer(t, model, list(head.parameters()), device, head_rows=rows, aux=aux)
    steps_per_epoch = max(1, (len(dataset) // world_size()) // per_rank_batch // t.grad_accum)
    scheduler = make_scheduler(optimizer, steps_per_epoch * t.epochs, int(t.warmup_epochs * steps_per_epoch))
    dtype = autocast_dtype(device, t.amp)
    ema = None
    if t.ema:  # buffers too: BatchNorm's running statistics follow training like the weights
        ema_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(t.ema)
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_fn, use_buffers=True)
    return TrainingRun(
        model,
        head,
        train_model,
        optimizer,
        scheduler,
        torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        ema,
        dtype,
        per_rank_batch,
        drop_last=len(dataset) // world_size() > per_rank_batch,
        aux_head=aux_head,
    )


# ----------------------------------------------------------------------------------------- epoch
def _seed_worker(transform, base: int, worker_id: int) -> None:
    transform.set_random_seed(base + worker_id)


def _set_epoch_seed(seed: int, epoch: int, transform) -> torch.Generator:
    torch.manual_seed(seed * 1000 + epoch)
    np.random.seed((seed * 1000 + epoch) % (2**32))
    random.seed(seed * 1000 + epoch)
    transform.set_random_seed(seed * 1000 + epoch)
    generator = torch.Generator()
    generator.manual_seed(seed * 1000 + epoch)
    return generator


def epoch_loader(cfg: Config, member: MemberConfig, run: TrainingRun, dataset: ImageDataset, epoch: int) -> DataLoader:
    # One sampler for one or many processes: the union of the ranks' batch j is the
    # single-process batch j, so N processes train on the same global batches as one.
    sampler = DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=cfg.seed, drop_last=world_size() > 1
    )
    sampler.set_epoch(epoch)
    worker_seed = cfg.seed * 1000 + epoch * 97 + rank() * 7919
    return DataLoader(
        dataset,
        batch_size=run.per_rank_batch,
        sampler=sampler,
        drop_last=run.drop_last,
        **loader_options(next(run.model.parameters()).device, member.train.num_workers),
        worker_init_fn=functools.partial(_seed_worker, dataset.transform, worker_seed),
    )


def _set_train_mode(member: MemberConfig, run: TrainingRun, epoch: int) -> None:
    """Train mode; frozen BatchNorm (freeze_bn) and, for the head-first epochs, a frozen backbone
    (no gradient, its BatchNorm statistics kept)."""
    run.model.train()
    run.head.train()
    frozen = epoch < member.train.freeze_backbone_epochs
    run.model.backbone_frozen = frozen
    for name, module in run.model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if member.train.freeze_bn or (frozen and name.startswith("backbone.")):
                module.eval()


def _optimizer_step(member: MemberConfig, run: TrainingRun) -> None:
    t = member.train
    if t.clip_grad:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_([*run.model.parameters(), *run.head.parameters()], t.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update_parameters(run.model)


def train_epoch(
    cfg: Config,
    member: MemberConfig,
    run: TrainingRun,
    dataset: ImageDataset,
    epoch: int,
    device: torch.device,
    checkpoint_path: Path,
    progress: bool,
) -> dict:
    """One pass over the member's training images; the epoch's row of metrics.csv (without validation)."""
    t = member.train
    generator = _set_epoch_seed(cfg.seed, epoch, dataset.transform)
    loader = epoch_loader(cfg, member, run, dataset, epoch)
    see = member.see
    see_value = epoch_value(see.schedule, see.start, see.end, epoch, t.epochs, see.lower_bound)
    _set_train_mode(member, run, epoch)
    if 0 < epoch == t.freeze_backbone_epochs:
        log.info("%s: backbone unfrozen from epoch %d", member.name, epoch + 1)
    running, n_batches, n_expanded = 0.0, 0, 0
    bar = progress_bar(
        loader, f"{member.name} epoch {epoch + 1}/{t.epochs}", progress and is_main_process(), unit="batch"
    )
    run.optimizer.zero_grad(set_to_none=True)
    for batch_index, (images, labels, rows, ok) in enumerate(bar):
        if not ok.all():
            run.skipped_images.update(dataset.paths[int(r)] for r in rows[~ok])
            images, labels = images[ok], labels[ok]
        if any_rank(len(images) < 2, device):  # every rank skips, or none (DDP steps in lockstep)
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        dtype = run.dtype
        steps = (batch_index + 1) % t.grad_accum == 0
        with gradient_sync(run, steps):
            with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, expanded = run.train_model(images, labels, see_value, generator)
            loss_value = float(loss.detach())  # the step's one wait for the device
            finite = not any_rank(not math.isfinite(loss_value), device)
            if finite:
                run.scaler.scale(loss / t.grad_accum).backward()
        if not finite:
            _non_finite(member, run, loss_value, epoch, batch_index, checkpoint_path)
            continue
        if steps:
            _optimizer_step(member, run)
        running += loss_value
        n_batches += 1
        n_expanded += expanded
        bar.set_postfix(loss=f"{running / n_batches:.3f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
    return {
        "epoch": epoch + 1,
        "loss": running / max(1, n_batches),
        "lr": run.scheduler.get_last_lr()[0],
        "see_expanded": n_expanded,
    }


def gradient_sync(run: TrainingRun, sync: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch's forward and backward: under DDP its gradients are all-reduced only
    when `sync` (the micro-batch before an optimizer step), not once per micro-batch. The forward
    belongs inside: DDP decides there whether the backward reduces."""
    if sync or not isinstance(run.train_model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return run.train_model.no_sync()


def _non_finite(
    member: MemberConfig, run: TrainingRun, loss: float, epoch: int, batch_index: int, checkpoint_path: Path
) -> None:
    """Stop with the step's coordinates, or (nan_policy=skip) drop the step's gradient and go on."""
    run.nonfinite_steps += 1
    value = f"({loss})" if not math.isfinite(loss) else f"on another rank (here {loss:.4f})"
    message = (
        f"{member.name}: non-finite loss {value} at epoch {epoch + 1}, batch {batch_index}; "
        f"the last good checkpoint is {checkpoint_path if checkpoint_path.exists() else 'none'}"
    )
    if member.train.nan_policy == "stop":
        raise NonFiniteLossError(message + " (train.nan_policy=skip skips such steps)")
    log.warning("%s; skipped", message)
    run.optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------ validation
def validate(
    cfg: Config,
    member: MemberConfig,
    model: EmbeddingModel,
    train_part: pd.DataFrame,
    val_part: pd.DataFrame,
    adapter: Adapter,
    device: torch.device,
    progress: bool,
    boxes: dict | None = None,
) -> dict:
    """The competition's metric on the fold: validation images against the training images. Under
    torchrun each rank embeds its share (with the loader's workers and embed.batch_size), rank 0
    scores, and every rank gets the scores."""
    if val_part.empty:
        return {}
    if world_size() > 1:
        log.info(
            "%s: sharded validation: %d ranks, each embeds ≤%d of %d gallery and ≤%d of %d query images",
            member.name,
            world_size(),
            -(-len(train_part) // world_size()),
            len(train_part),
            -(-len(val_part) // world_size()),
            len(val_part),
        )
    gallery, gallery_part = _embed_part(cfg, member, model, train_part, device, "val gallery", progress, boxes)
    queries, query_part = _embed_part(cfg, member, model, val_part, device, "val queries", progress, boxes)
    scores = {}
    if is_main_process():
        found = knn_validation_scores(
            adapter,
            queries,
            query_part["label"].to_numpy(),
            query_part["known"].to_numpy(),
            gallery,
            gallery_part["label"].to_numpy(),
        )
        scores = {f"val_{k}": v for k, v in found.items() if isinstance(v, float)}
    return broadcast_object(scores)


def _embed_part(
    cfg: Config,
    member: MemberConfig,
    model: EmbeddingModel,
    part: pd.DataFrame,
    device: torch.device,
    desc: str,
    progress: bool,
    boxes: dict | None = None,
) -> tuple[np.ndarray | None, pd.DataFrame]:
    """Embeddings of a part's readable images and their rows, on rank 0 (None elsewhere), of the
    embed.crops sources as the embed stage takes them; unreadable images are skipped here and
    reported by training."""
    croppers: list = [None]
    if cfg.embed.crops and boxes is not None:
        croppers = source_croppers(boxes, part["id"].tolist(), cfg.embed.crops, cfg.competition.box_margin)
    emb = embed_sharded(
        model,
        part["path"].tolist(),
        image_size=member.image_size,
        batch_size=cfg.embed.batch_size,
        device=device,
        flip=False,
        amp=member.train.amp,
        num_workers=member.train.num_workers,
        desc=desc,
        progress=progress and is_main_process(),
        skip_unreadable=not member.train.strict_images,
        channels_last=member.train.channels_last,
        croppers=croppers,
    )
    if emb is None:
        return None, part
    readable = np.isfinite(emb).all(axis=1)
    return emb[readable], part[readable]


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
        save_weights(work / "best.pt", run.eval_model, run.head, data.classes, member, _aux(run, data))
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
    from ..plots import plot_training_curves

    save_weights(work / "final.pt", run.eval_model, run.head, data.classes, member, _aux(run, data))
    if not (work / "best.pt").exists():
        save_weights(work / "best.pt", run.eval_model, run.head, data.classes, member, _aux(run, data))
    pd.DataFrame(history).to_csv(work / "metrics.csv", index=False)
    plot_training_curves(pd.DataFrame(history), work / "curves.png", title=member.name)
    (work / "last.pt").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ loop
def train_member(
    cfg: Config,
    member: MemberConfig,
    folds: pd.DataFrame,
    adapter: Adapter,
    work: Path,
    device: torch.device,
    init_state: dict | None = None,
    progress: bool = True,
) -> dict:
    """Train `member` on its fold; writes best.pt, final.pt, metrics.csv and curves.png into `work`.
    With train.stages, each stage trains in `work/stage-<i>/` from the previous stage's final weights;
    the last stage's files are the member's, metrics.csv holds every stage's epochs."""
    if not member.train.stages:
        return train_stage(cfg, member, folds, adapter, work, device, init_state, progress)
    results, histories, previous = [], [], None
    for i, (stage, stage_member) in enumerate(zip(member.train.stages, stage_members(member), strict=True)):
        folder = work / f"stage-{i + 1}"
        folder.mkdir(exist_ok=True)
        if (folder / "result.json").is_file():  # a resumed run: this stage finished before the crash
            log.info("%s: stage %d already trained (%s)", member.name, i + 1, folder)
            result = json.loads((folder / "result.json").read_text())
        else:
            if previous is not None:  # the previous stage's final weights (only read when this one trains)
                init_state = {**load_weights(previous / "final.pt", device), "source": f"stage {i}"}
            if stage.reinit_head and init_state is not None:
                init_state = {"model": init_state["model"], "source": init_state.get("source")}
            log.info("%s: stage %d/%d at %d px", member.name, i + 1, len(member.train.stages), stage.image_size)
            with tracking.scoped(f"stage-{i + 1}/"):
                result = train_stage(cfg, stage_member, folds, adapter, folder, device, init_state, progress)
            if is_main_process():
                (folder / "result.json").write_text(json.dumps(result))
            barrier()
        previous = folder
        results.append(result)
        histories.append(pd.read_csv(folder / "metrics.csv").assign(stage=i + 1))
    return finish_stages(member, work, results, histories) if is_main_process() else results[-1]


def finish_stages(member: MemberConfig, work: Path, results: list[dict], histories: list[pd.DataFrame]) -> dict:
    """The last stage's weights as the member's; metrics.csv and curves.png over every stage."""
    from ..plots import plot_training_curves

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


def train_stage(
    cfg: Config,
    member: MemberConfig,
    folds: pd.DataFrame,
    adapter: Adapter,
    work: Path,
    device: torch.device,
    init_state: dict | None = None,
    progress: bool = True,
) -> dict:
    """Train `member` (one stage) on its fold; writes best.pt, final.pt, metrics.csv and curves.png."""
    t = member.train
    # The initial weights depend on the seed and the member only, not on what this process did before
    # (a member trained after a cached one would otherwise start elsewhere than in a fresh run).
    seed_everything(zlib.crc32(f"{cfg.seed}:{member.name}".encode()))
    data = fold_data(member, folds)
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
        if (epoch + 1) % t.validate_every == 0 or epoch + 1 == t.epochs:
            validation_started = time.time()
            parts = (data.train_part, data.val_part)
            row.update(validate(cfg, member, run.eval_model, *parts, adapter, device, progress, boxes))
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
