"""The optimizer and learning-rate schedule of a member's training."""

from __future__ import annotations

import math

import torch
from timm.optim._param_groups import param_groups_layer_decay
from torch import nn

from ..config import TrainConfig


def model_groups(t: TrainConfig, model: nn.Module | list) -> list[dict]:
    """The embedding model's parameter groups: one at `lr`, or with `layer_decay` the backbone's
    layers at lr·decay^depth (timm's layer grouping; norms and biases without weight decay) and the
    pooling and neck at `lr`."""
    if isinstance(model, list) or not t.layer_decay:
        params = model if isinstance(model, list) else list(model.parameters())
        return [{"params": [p for p in params if p.requires_grad], "lr": t.lr}]
    groups = [
        {"params": g["params"], "lr": t.lr * g["lr_scale"], "weight_decay": g["weight_decay"]}
        for g in param_groups_layer_decay(model.backbone, weight_decay=t.weight_decay, layer_decay=t.layer_decay)
    ]
    rest = [p for name, p in model.named_parameters() if not name.startswith("backbone.") and p.requires_grad]
    return [*groups, {"params": rest, "lr": t.lr}]


def make_optimizer(t: TrainConfig, model: nn.Module | list, head: list, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD; the head's LR is `head_lr_mult` × the backbone's. Fused kernels where
    torch has them for the device: one pass over the (possibly 100M-parameter) head per step.
    `model`: the embedding model (or a list of its parameters)."""
    groups = model_groups(t, model)
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


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps))
