"""A member's networks and the state its training changes: model and heads, the objective (under
DDP when distributed), optimizer, schedule, gradient scaler and EMA."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from timm.layers import convert_sync_batchnorm
from torch import nn

from ..build import build_aux, build_member_head, build_model, build_objective, optimizer_settings
from ..config import MemberConfig, TrainConfig
from ..config.members import member_schedule
from ..data.dataset import ImageDataset
from ..inference import autocast_dtype
from ..models.backbone import EmbeddingModel
from ..models.heads import Head, MarginHead
from ..models.optim import make_optimizer, make_scheduler
from ..runtime import (
    world_size,
)
from .data import FoldData

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------- networks
def build_networks(
    member: MemberConfig, data: FoldData, device: torch.device, init_state: dict | None
) -> tuple[EmbeddingModel, Head]:
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
    return convert_sync_batchnorm(model)


# ---------------------------------------------------------------------------------- optimisation
@dataclass
class TrainingRun:
    """What changes while a member trains, and the loop's counters."""

    model: EmbeddingModel
    head: Head
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
    head: Head,
    dataset: ImageDataset,
    device: torch.device,
    aux_head: MarginHead | None = None,
) -> TrainingRun:
    per_rank_batch, lr = batch_plan(member.train, world_size())
    _log_batch_plan(member, model, per_rank_batch, lr)
    t = member.train.model_copy(update={"lr": lr})
    train_model: nn.Module = build_objective(member, model, head, aux_head)
    if world_size() > 1:
        head.persistent_grad = False  # DDP reduces the weight's gradient from its own autograd hook
        frozen_first = member.train.freeze_backbone_epochs > 0  # the frozen backbone gets no gradient
        train_model = nn.parallel.DistributedDataParallel(train_model, find_unused_parameters=frozen_first)
    # Partial FC: AdamW updates the sampled classes' rows of the head only
    rows = head.touched_rows if member.head.sample_rate < 1.0 and head.supports_partial_fc else None
    aux = list(aux_head.parameters()) if aux_head is not None else []
    settings = optimizer_settings(member.train, lr)
    optimizer = make_optimizer(settings, model, list(head.parameters()), device, head_rows=rows, aux=aux)
    steps_per_epoch = max(1, (len(dataset) // world_size()) // per_rank_batch // t.grad_accum)
    scheduler = make_scheduler(
        optimizer, steps_per_epoch * t.epochs, int(t.warmup_epochs * steps_per_epoch), member_schedule(member)
    )
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
