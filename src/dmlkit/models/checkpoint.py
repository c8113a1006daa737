"""Checkpoint files, written atomically: a member's trained weights (`best.pt`, `final.pt`: model,
head rows of the saved classes, class list, member config) and the resumable training state
(`last.pt`). Train writes them; embed, `init_from` and the benchmarks read them back."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import MemberConfig
from .backbone import EmbeddingModel
from .build import build_aux, build_member_head, build_model
from .heads import MarginHead


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = str(path) + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_weights(
    path: Path,
    model: nn.Module,
    head: MarginHead,
    classes: list[str],
    member: MemberConfig,
    aux: tuple[MarginHead, list[str]] | None = None,
) -> None:
    """Model, and the head's rows for `classes` (the first ones: rotated classes are dropped); with
    `aux`, the auxiliary head and its classes."""
    head_state = head.state_dict() if len(classes) == head.num_classes else head.classes_state(len(classes))
    member_data = member.model_dump(mode="json")
    state = {"model": model.state_dict(), "head": head_state, "classes": classes, "member": member_data}
    if aux is not None:
        state.update(aux_head=aux[0].state_dict(), aux_classes=list(aux[1]))
    _save_atomic(state, path)


def load_weights(path: Path, device: torch.device | str = "cpu") -> dict:
    """The dict `save_weights` wrote (model and head state dicts, classes, member)."""
    return torch.load(path, map_location=device, weights_only=False)


def load_member(path: Path, member: MemberConfig, device: torch.device) -> tuple[EmbeddingModel, MarginHead, list]:
    """The trained model and head (margins are irrelevant for inference) with the head's classes."""
    state = load_weights(path, device)
    model = build_model(member, weights=False).to(device)
    model.load_state_dict(state["model"])
    head = build_member_head(member, np.ones(len(state["classes"]))).to(device)
    head.load_state_dict(state["head"])
    return model.eval(), head.eval(), list(state["classes"])


def load_aux_head(path: Path, member: MemberConfig, device: torch.device) -> tuple[MarginHead, list[str]] | None:
    """The trained auxiliary head (head.aux) and its classes; None for a member without one."""
    state = load_weights(path, device)
    if member.head.aux is None or "aux_head" not in state:
        return None
    head = build_aux(member, np.ones(len(state["aux_classes"]))).to(device)
    head.load_state_dict(state["aux_head"])
    return head.eval(), list(state["aux_classes"])


def save_training_state(path: Path, state: dict) -> None:
    """The per-epoch state a crashed run resumes from (model, head, optimizer, scheduler, ...)."""
    _save_atomic(state, path)


def load_training_state(path: Path, device: torch.device) -> dict | None:
    return torch.load(path, map_location=device, weights_only=False) if path.is_file() else None
