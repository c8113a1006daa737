"""One epoch of training and the fold's validation. Per-epoch data order and augmentation are
seeded from (seed, epoch), so a resumed run on CPU ends with the same weights as an
uninterrupted one."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..build import embedding_options
from ..competitions import Adapter
from ..config import Config, MemberConfig
from ..data.crops import source_croppers
from ..data.dataset import ImageDataset
from ..errors import NonFiniteLossError
from ..evaluation import LabelledQueries, knn_validation_scores
from ..inference import embed_sharded, loader_options
from ..models.backbone import EmbeddingModel
from ..models.see import epoch_value
from ..runtime import (
    any_rank,
    broadcast_object,
    is_main_process,
    progress_bar,
    rank,
    world_size,
)
from .data import FoldData
from .setup import TrainingRun

log = logging.getLogger(__name__)


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
    data: FoldData,
    adapter: Adapter,
    device: torch.device,
    progress: bool,
    boxes: dict | None = None,
) -> dict:
    """The competition's metric on the fold: validation images against the training images. Under
    torchrun each rank embeds its share (with the loader's workers and embed.batch_size), rank 0
    scores, and every rank gets the scores."""
    train_part, val_part = data.train_part, data.val_part
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
        found = knn_validation_scores(adapter, queries, gallery, LabelledQueries.of(query_part, gallery_part))
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
        **embedding_options(cfg, member, device),
        flip=False,
        desc=desc,
        progress=progress and is_main_process(),
        skip_unreadable=not member.train.strict_images,
        croppers=croppers,
    )
    if emb is None:
        return None, part
    readable = np.isfinite(emb).all(axis=1)
    return emb[readable], part[readable]
