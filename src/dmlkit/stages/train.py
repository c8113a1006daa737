"""Training one member: backbone + GeM + neck, margin head, optional SEE, on one fold.

A checkpoint is written every epoch into the artifact's partial directory; a rerun after a crash
resumes from it. Per-epoch data order and augmentation are seeded from (seed, epoch), so a
resumed run on CPU ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..config import Config, MemberConfig, TrainConfig
from ..data.dataset import ImageDataset, with_rotated_classes
from ..data.transforms import make_pipeline
from ..inference import autocast_dtype, embed_paths, validation_scores
from ..models.backbone import EmbeddingModel
from ..models.heads import MarginHead, build_head, sample_classes
from ..models.see import schedule_value, see_expand, select_confident
from ..runtime import is_main_process, rank, world_size
from .folds import fold_parts

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    pass


def build_model(member: MemberConfig) -> EmbeddingModel:
    return EmbeddingModel(
        member.backbone,
        member.embedding_size,
        member.in_chans,
        member.pretrained_file,
        member.gem_p,
        member.gem_learnable,
    )


def build_member_head(member: MemberConfig, class_counts: np.ndarray) -> MarginHead:
    h = member.head
    return build_head(
        h.type,
        member.embedding_size,
        class_counts,
        h.scale,
        h.subcenters,
        h.dynamic,
        h.dynamic_a,
        h.dynamic_b,
        h.dynamic_lambda,
        h.margin,
    )


def make_optimizer(t: TrainConfig, backbone: list, head: list, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD; the head's LR is `head_lr_mult` × the backbone's. Fused kernels where
    torch has them for the device: one pass over the (possibly 100M-parameter) head per step."""
    groups = [{"params": [p for p in backbone if p.requires_grad], "lr": t.lr}]
    if head:
        groups.append({"params": head, "lr": t.lr * t.head_lr_mult})
    if t.optimizer == "adamw":
        try:
            return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, fused=True)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, foreach=True)
    return torch.optim.SGD(groups, lr=t.lr, momentum=0.9, nesterov=True, weight_decay=t.weight_decay)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 1% of the peak."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class MarginModel(nn.Module):
    """Embedding model and head in one module, so one DDP wrapper synchronises both."""

    def __init__(self, model: EmbeddingModel, head: MarginHead, member: MemberConfig):
        super().__init__()
        self.model = model
        self.head = head
        self.see = member.see
        self.matmul = member.head.matmul
        self.sample_rate = member.head.sample_rate

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, see_value: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, int]:
        """Cross-entropy on the margin logits, plus λ·CE on SEE's synthetic embeddings; (loss, #expanded)."""
        embeddings = self.model(images)
        head = self.head
        device_type = embeddings.device.type
        matmul_dtype = None
        if self.matmul == "amp" and torch.is_autocast_enabled(device_type):
            matmul_dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type=device_type, enabled=False):
            # Partial FC: only the sampled classes' centers (the batch's among them) enter the softmax.
            classes, columns = None, labels
            if self.sample_rate < 1.0:
                classes, columns = sample_classes(labels, head.num_classes, self.sample_rate, generator)
            margins = head.margins[labels]
            # The sub-center norms are computed once per step and shared by the real and synthetic rows;
            # the real rows' cosines also pick each sample's closest sub-center for SEE.
            factors = head.center_factors(matmul_dtype, classes)
            subcenter_cos = head.subcenter_cosines(embeddings, factors)
            loss = F.cross_entropy(head.margin_logits(subcenter_cos, columns, margins), columns)
            expanded = 0
            if self.see.enabled and self.see.weight > 0:
                centers = head.closest_centers(embeddings, labels, subcenter_cos.detach(), columns)
                cos_to_center = (embeddings.float().detach() * centers).sum(dim=1)
                mask = select_confident(cos_to_center, self.see.schedule, see_value)
                expanded = int(mask.sum())
                if expanded:
                    n = self.see.n_expansion
                    synthetic = see_expand(embeddings[mask], centers[mask], n, generator)
                    synthetic = synthetic.reshape(-1, embeddings.shape[1])
                    synthetic_columns = columns[mask].repeat_interleave(n)
                    synthetic_cos = head.subcenter_cosines(synthetic, factors)
                    synthetic_logits = head.margin_logits(
                        synthetic_cos, synthetic_columns, margins[mask].repeat_interleave(n)
                    )
                    loss = loss + self.see.weight * F.cross_entropy(synthetic_logits, synthetic_columns)
        return loss, expanded


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


def train_member(
    cfg: Config,
    member: MemberConfig,
    folds: pd.DataFrame,
    metric: str,
    unknown_label: str | None,
    work: Path,
    device: torch.device,
    init_state: dict | None = None,
    progress: bool = True,
) -> dict:
    """Train `member` on its fold; writes best.pt, metrics.csv and curves.png into `work`."""
    from tqdm import tqdm

    from ..plots import plot_training_curves

    t = member.train
    train_part, val_part = fold_parts(folds, member.fold)
    # With class rotations the head trains on more classes than it is saved with (the originals first).
    train_rows, head_classes = with_rotated_classes(train_part, t.class_rotations)
    classes = head_classes[: train_part["label"].nunique()]
    class_index = {c: i for i, c in enumerate(head_classes)}
    counts = train_rows["label"].value_counts().reindex(head_classes).to_numpy()
    targets = train_rows["label"].map(class_index).to_numpy()

    model = build_model(member).to(device)
    head = build_member_head(member, counts).to(device)
    if init_state is not None:
        model.load_state_dict(init_state["model"])
        if init_state.get("classes") == head_classes:
            head.load_state_dict(init_state["head"])
            log.info("%s: initialised model and head from %s", member.name, member.init_from)
        else:
            log.info(
                "%s: initialised backbone from %s; head re-initialised (class set differs)",
                member.name,
                member.init_from,
            )
    if t.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if t.sync_bn and world_size() > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.warning("%s: train.sync_bn needs GPUs (torch's SyncBatchNorm is CUDA-only); ignored", member.name)
    transform = make_pipeline(member.image_size, augment=t.augment)
    dataset = ImageDataset(
        train_rows["path"].tolist(),
        targets.tolist(),
        transform,
        member.in_chans,
        member.image_size,
        skip_unreadable=not t.strict_images,
        quarter_turns=train_rows["quarter_turns"].tolist(),
    )
    distributed = world_size() > 1
    train_model: nn.Module = MarginModel(model, head, member)
    if distributed:
        head.persistent_grad = False  # DDP reduces the weight's gradient from its own autograd hook
        train_model = nn.parallel.DistributedDataParallel(train_model)
    optimizer = make_optimizer(t, list(model.parameters()), list(head.parameters()), device)
    per_rank_batch = max(2, t.batch_size // world_size())
    drop_last = len(dataset) // world_size() > per_rank_batch
    steps_per_epoch = max(1, (len(dataset) // world_size()) // per_rank_batch // t.grad_accum)
    total_steps = steps_per_epoch * t.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, int(t.warmup_epochs * steps_per_epoch))
    )
    dtype = autocast_dtype(device, t.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = (
        torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t.ema))
        if t.ema
        else None
    )

    checkpoint_path = work / "last.pt"
    start_epoch, history, best = 0, [], {"score": -math.inf, "epoch": -1}
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, history, best = state["epoch"] + 1, state["history"], state["best"]
        log.info("%s: resuming after epoch %d from %s", member.name, state["epoch"], checkpoint_path)

    skipped_images: set[str] = set()
    nonfinite_steps = 0
    started = time.time()
    for epoch in range(start_epoch, t.epochs):
        generator = _set_epoch_seed(cfg.seed, epoch, transform)
        # One sampler for one or many processes: the union of the ranks' batch j is the
        # single-process batch j, so N processes train on the same global batches as one.
        sampler = DistributedSampler(
            dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=cfg.seed, drop_last=distributed
        )
        sampler.set_epoch(epoch)
        worker_seed = cfg.seed * 1000 + epoch * 97 + rank() * 7919
        loader = DataLoader(
            dataset,
            batch_size=per_rank_batch,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=t.num_workers,
            worker_init_fn=functools.partial(_seed_worker, transform, worker_seed),
        )
        see_value = schedule_value(member.see.start, member.see.end, epoch / max(1, t.epochs - 1))
        model.train()
        head.train()
        if t.freeze_bn:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        running, n_batches, n_expanded = 0.0, 0, 0
        bar = tqdm(
            loader,
            desc=f"{member.name} epoch {epoch + 1}/{t.epochs}",
            unit="batch",
            leave=False,
            disable=not progress or not is_main_process(),
        )
        optimizer.zero_grad(set_to_none=True)
        for batch_index, (images, labels, rows, ok) in enumerate(bar):
            if not ok.all():
                skipped_images.update(dataset.paths[int(r)] for r in rows[~ok])
                images, labels = images[ok], labels[ok]
                if len(images) < 2:
                    continue
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if t.channels_last and device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, expanded = train_model(images, labels, see_value, generator)
            if not torch.isfinite(loss):
                nonfinite_steps += 1
                message = (
                    f"{member.name}: non-finite loss ({loss.item()}) at epoch {epoch + 1}, batch {batch_index}; "
                    f"the last good checkpoint is {checkpoint_path if checkpoint_path.exists() else 'none'}"
                )
                if t.nan_policy == "stop":
                    raise NonFiniteLossError(message + " (train.nan_policy=skip skips such steps)")
                log.warning("%s; skipped", message)
                optimizer.zero_grad(set_to_none=True)
                continue
            scaler.scale(loss / t.grad_accum).backward()
            if (batch_index + 1) % t.grad_accum == 0:
                if t.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([*model.parameters(), *head.parameters()], t.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
            running += float(loss.detach())
            n_batches += 1
            n_expanded += expanded
            bar.set_postfix(loss=f"{running / n_batches:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        row = {
            "epoch": epoch + 1,
            "loss": running / max(1, n_batches),
            "lr": scheduler.get_last_lr()[0],
            "see_expanded": n_expanded,
            "elapsed_s": round(time.time() - started, 1),
        }
        eval_model = ema.module if ema is not None else model
        if (epoch + 1) % t.validate_every == 0 or epoch + 1 == t.epochs:
            row.update(validate(member, eval_model, train_part, val_part, metric, unknown_label, device, progress))
        history.append(row)
        log.info(
            "%s: %s",
            member.name,
            " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
        )
        if is_main_process():
            if "val_score" in row and row["val_score"] > best["score"]:
                best = {"score": row["val_score"], "epoch": epoch + 1}
                _save_weights(work / "best.pt", eval_model, head, classes, member)
            torch.save(
                {
                    "model": model.state_dict(),
                    "head": head.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "epoch": epoch,
                    "history": history,
                    "best": best,
                },
                str(checkpoint_path) + ".tmp",
            )
            os.replace(str(checkpoint_path) + ".tmp", checkpoint_path)
    if skipped_images:
        log.warning(
            "%s: skipped %d unreadable training image(s): %s",
            member.name,
            len(skipped_images),
            sorted(skipped_images)[:10],
        )
    if is_main_process():
        _save_weights(work / "final.pt", ema.module if ema is not None else model, head, classes, member)
        if not (work / "best.pt").exists():
            _save_weights(work / "best.pt", ema.module if ema is not None else model, head, classes, member)
        pd.DataFrame(history).to_csv(work / "metrics.csv", index=False)
        plot_training_curves(pd.DataFrame(history), work / "curves.png", title=member.name)
        checkpoint_path.unlink(missing_ok=True)
    return {
        "best": best,
        "classes": len(classes),
        "trained_classes": len(head_classes),
        "train_images": len(dataset),
        "skipped_images": sorted(skipped_images),
        "nonfinite_steps": nonfinite_steps,
        "final_val_score": history[-1].get("val_score") if history else None,
    }


def validate(
    member: MemberConfig,
    model: EmbeddingModel,
    train_part: pd.DataFrame,
    val_part: pd.DataFrame,
    metric: str,
    unknown_label: str | None,
    device: torch.device,
    progress: bool,
) -> dict:
    if val_part.empty:
        return {}

    def embed(part: pd.DataFrame, desc: str) -> tuple[np.ndarray, pd.DataFrame]:
        """Embeddings of a part's readable images (unreadable ones are skipped and reported by training)."""
        emb = embed_paths(
            model,
            part["path"].tolist(),
            member.image_size,
            128,
            device,
            flip=False,
            amp=member.train.amp,
            desc=desc,
            progress=progress,
            skip_unreadable=not member.train.strict_images,
        )
        readable = np.isfinite(emb).all(axis=1)
        return emb[readable], part[readable]

    gallery, train_part = embed(train_part, "val gallery")
    queries, val_part = embed(val_part, "val queries")
    scores = validation_scores(
        metric,
        queries,
        val_part["label"].to_numpy(),
        val_part["known"].to_numpy(),
        gallery,
        train_part["label"].to_numpy(),
        unknown_label,
    )
    return {f"val_{k}": v for k, v in scores.items() if isinstance(v, float)}


def _save_weights(path: Path, model: nn.Module, head: MarginHead, classes: list[str], member: MemberConfig) -> None:
    """Model, and the head's rows for `classes` (the first ones: rotated classes are dropped)."""
    head_state = head.state_dict()
    if len(classes) < head.num_classes:
        head_state = {
            "weight": head_state["weight"][: len(classes) * head.subcenters].clone(),
            "margins": head_state["margins"][: len(classes)].clone(),
        }
    tmp = str(path) + ".tmp"
    torch.save(
        {
            "model": model.state_dict(),
            "head": head_state,
            "classes": classes,
            "member": member.model_dump(mode="json"),
        },
        tmp,
    )
    os.replace(tmp, path)


def load_member(path: Path, member: MemberConfig, device: torch.device) -> tuple[EmbeddingModel, MarginHead, list]:
    """The trained model and head (margins are irrelevant for inference) with the head's classes."""
    state = torch.load(path, map_location=device, weights_only=False)
    model = build_model(member).to(device)
    model.load_state_dict(state["model"])
    head = build_member_head(member, np.ones(len(state["classes"]))).to(device)
    head.load_state_dict(state["head"])
    return model.eval(), head.eval(), list(state["classes"])
