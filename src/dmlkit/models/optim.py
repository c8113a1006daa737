"""The optimizer and learning-rate schedule of a member's training."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig


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


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps))
