"""Checkpoint files, written atomically: a member's trained weights (`best.pt`, `final.pt`: model,
head rows of the saved classes, class list, the member's settings as plain data) and the resumable
training state (`last.pt`). Train writes them; embed, `init_from` and the benchmarks read them back
(`dmlkit.build.load_member` rebuilds the networks around them)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .heads import Head, MarginHead


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = str(path) + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_weights(
    path: Path,
    model: nn.Module,
    head: Head,
    classes: list[str],
    member_data: dict,
    aux: tuple[MarginHead, list[str]] | None = None,
) -> None:
    """Model, and the head's rows for `classes` (the first ones: rotated classes are dropped); with
    `aux`, the auxiliary head and its classes. `member_data`: the settings it was trained with."""
    head_state = head.state_dict() if len(classes) == head.num_classes else head.classes_state(len(classes))
    state = {"model": model.state_dict(), "head": head_state, "classes": classes, "member": member_data}
    if aux is not None:
        state.update(aux_head=aux[0].state_dict(), aux_classes=list(aux[1]))
    _save_atomic(state, path)


def load_weights(path: Path, device: torch.device | str = "cpu") -> dict:
    """The dict `save_weights` wrote (model and head state dicts, classes, member)."""
    return torch.load(path, map_location=device, weights_only=False)


def save_training_state(path: Path, state: dict) -> None:
    """The per-epoch state a crashed run resumes from (model, head, optimizer, scheduler, ...)."""
    _save_atomic(state, path)


def load_training_state(path: Path, device: torch.device) -> dict | None:
    return torch.load(path, map_location=device, weights_only=False) if path.is_file() else None
