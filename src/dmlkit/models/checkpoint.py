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
from .build import build_member_head, build_model
from .heads import MarginHead


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = str(path) + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_weights(path: Path, model: nn.Module, head: MarginHead, classes: list[str], member: MemberConfig) -> None:
    """Model, and the head's rows for `classes` (the first ones: rotated classes are dropped)."""
    head_state = head.state_dict() if len(classes) == head.num_classes else head.classes_state(len(classes))
    _save_atomic(
        {"model": model.state_dict(), "head": head_state, "classes": classes, "member": member.model_dump(mode="json")},
        path,
    )


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


def save_training_state(path: Path, state: dict) -> None:
    """The per-epoch state a crashed run resumes from (model, head, optimizer, scheduler, ...)."""
    _save_atomic(state, path)


def load_training_state(path: Path, device: torch.device) -> dict | None:
    return torch.load(path, map_location=device, weights_only=False) if path.is_file() else None
