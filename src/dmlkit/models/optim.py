"""The optimizer and learning-rate schedule of a member's training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from timm.optim._param_groups import param_groups_layer_decay
from torch import nn


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW or Nesterov SGD at `lr` (the head at `head_lr_mult` × it); `layer_decay`: the
    backbone's layers at lr·decay^depth (None: one rate)."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    head_lr_mult: float = 10.0
    layer_decay: float | None = None


def model_groups(t: OptimizerSettings, model: nn.Module | list) -> list[dict]:
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


def make_optimizer(
    t: OptimizerSettings,
    model: nn.Module | list,
    head: list,
    device: torch.device,
    head_rows=None,
    aux: list | None = None,
) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD; the head's LR is `head_lr_mult` × the backbone's. Fused kernels where
    torch has them for the device: one pass over the (possibly 100M-parameter) head per step.
    `model`: the embedding model (or a list of its parameters). With `head_rows` (Partial FC: the
    rows of the head's one weight that took part in the step), AdamW updates only those rows. `aux`:
    an auxiliary head's parameters, at the head's LR."""
    groups = model_groups(t, model)
    if aux:  # head.aux's parameters: a dense group at the head's LR
        groups.append({"params": aux, "lr": t.lr * t.head_lr_mult})
    if head_rows is not None and t.optimizer == "adamw" and len(head) == 1:
        return PartialFCAdamW(groups, head[0], t.lr * t.head_lr_mult, t.weight_decay, head_rows)
    if head:
        groups.append({"params": head, "lr": t.lr * t.head_lr_mult})
    if t.optimizer == "adamw":
        try:
            return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, fused=True)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, foreach=True)
    return torch.optim.SGD(groups, lr=t.lr, momentum=0.9, nesterov=True, weight_decay=t.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine") -> float:
    """Linear warmup, then cosine decay to 1% of the peak (`cosine`) or the peak to the end (`constant`)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str = "cosine"):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, schedule))


class PartialFCAdamW(torch.optim.Optimizer):
    """AdamW for the embedding model (torch's, fused) and, for the Partial FC head's weight, AdamW on
    the rows that took part in this step only, each row with its own step count: rows not sampled
    keep their weights, moments and weight decay untouched (insightface's Partial FC kept the sampled
    rows' weights and momentum apart). The per-step work on a 100M-parameter head becomes the
    sampled tenth of it. `rows()` gives the rows to update (the head knows which it handed out)."""

    def __init__(self, dense_groups: list[dict], head_weight: nn.Parameter, head_lr: float, weight_decay: float, rows):
        try:
            self.dense = torch.optim.AdamW(dense_groups, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError):
            self.dense = torch.optim.AdamW(dense_groups, weight_decay=weight_decay, foreach=True)
        self.rows = rows
        head_group = {"params": [head_weight], "lr": head_lr, "weight_decay": weight_decay, "row_sparse": True}
        defaults = {"lr": head_lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay}
        # the same group dicts as the dense optimizer's: an LR scheduler on this one drives both
        super().__init__([*self.dense.param_groups, head_group], defaults)

    @torch.no_grad()
    def step(self, closure=None):
        self.dense.step()
        group = self.param_groups[-1]
        (weight,) = group["params"]
        if weight.grad is None:
            return None
        rows = self.rows()
        if len(rows) == 0:
            return None
        state = self.state[weight]
        if not state:
            state["exp_avg"] = torch.zeros_like(weight)
            state["exp_avg_sq"] = torch.zeros_like(weight)
            state["row_steps"] = torch.zeros(len(weight), dtype=torch.int32, device=weight.device)
        beta1, beta2 = group["betas"]
        steps = state["row_steps"][rows] + 1
        state["row_steps"][rows] = steps
        steps = steps.to(torch.float32).unsqueeze(1)
        # in place on the gathered rows: each new (rows × D) tensor costs a pass over fresh memory
        grad = weight.grad.index_select(0, rows).float()
        exp_avg = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        # w ← w·(1 − lr·wd) − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε), per row t
        denom = exp_avg_sq.sqrt_().mul_((1 - beta2**steps).rsqrt()).add_(group["eps"])
        step_size = group["lr"] / (1 - beta1**steps)
        rows_now = weight.index_select(0, rows).float().mul_(1 - group["lr"] * group["weight_decay"])
        rows_now.addcdiv_(exp_avg.mul_(step_size), denom, value=-1.0)
        weight.index_copy_(0, rows, rows_now.to(weight.dtype))
        return None

    def state_dict(self) -> dict:
        head = self.state.get(self.param_groups[-1]["params"][0], {})
        return {"dense": self.dense.state_dict(), "head": dict(head), "head_lr": self.param_groups[-1]["lr"]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.dense.load_state_dict(state_dict["dense"])
        weight = self.param_groups[-1]["params"][0]
        self.state[weight] = {k: v.to(weight.device) for k, v in state_dict["head"].items()}
        self.param_groups[-1]["lr"] = state_dict["head_lr"]
