"""The one adapter between the config and the library: a member's `MemberConfig` → its embedding
model, heads, training objective, optimizer settings and trained networks. Everything under
`dmlkit.models` takes plain arguments; train, embed, export and the benchmarks build through here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import Config, HeadConfig, MemberConfig, TrainConfig
from .models.backbone import EmbeddingModel
from .models.checkpoint import load_weights
from .models.heads import Head, MarginHead, create_head, head_options
from .models.objective import AuxWeights, MarginModel, SEESettings
from .models.optim import OptimizerSettings


def build_model(member: MemberConfig, weights: bool = True) -> EmbeddingModel:
    """The member's embedding model; `weights=False` skips its pretrained weights (a checkpoint follows)."""
    return EmbeddingModel(
        member.backbone,
        member.embedding_size,
        member.in_chans,
        member.pretrained_file if weights else None,
        member.gem_p,
        member.gem_learnable,
        image_size=member.image_size,
        pool=member.pool,
        pretrained=member.pretrained and weights,
        pretrained_tag=member.pretrained_tag,
        backbone_kwargs=member.backbone_kwargs,
        neck=member.neck,
    )


def head_arguments(head: HeadConfig) -> dict:
    """The head section's values that its registered head type takes (`head_options`)."""
    return {name: getattr(head, name) for name in head_options(head.type)}


def build_member_head(member: MemberConfig, class_counts: np.ndarray) -> Head:
    return create_head(member.head.type, member.embedding_size, class_counts, **head_arguments(member.head))


def build_aux(member: MemberConfig, class_counts: np.ndarray) -> MarginHead:
    """head.aux's ArcFace head: a fixed margin for every class of the auxiliary column."""
    aux = member.head.aux
    return create_head(
        "arcface", member.embedding_size, class_counts, scale=aux.scale, subcenters=aux.subcenters, margin=aux.margin
    )


def build_objective(
    member: MemberConfig, model: nn.Module, head: Head, aux_head: MarginHead | None = None
) -> MarginModel:
    """The training loss module of the member's model and heads, with its SEE and Partial FC settings."""
    see = member.see
    settings = None
    if see.enabled:
        settings = SEESettings(
            weight=see.weight, n_expansion=see.n_expansion, schedule=see.schedule, gradient=see.gradient
        )
    aux = member.head.aux
    weights = AuxWeights(identity=aux.identity_weight, aux=aux.weight) if aux is not None else AuxWeights()
    return MarginModel(
        model,
        head,
        see=settings,
        sample_rate=member.head.sample_rate,
        matmul=member.head.matmul,
        aux_head=aux_head,
        aux_weights=weights,
    )


def optimizer_settings(t: TrainConfig, lr: float | None = None) -> OptimizerSettings:
    """The train section's optimizer values (`lr`: the rate after the multi-GPU scaling)."""
    return OptimizerSettings(
        optimizer=t.optimizer,
        lr=t.lr if lr is None else lr,
        weight_decay=t.weight_decay,
        head_lr_mult=t.head_lr_mult,
        layer_decay=t.layer_decay,
    )


def embedding_options(cfg: Config, member: MemberConfig, device: torch.device) -> dict:
    """The member's options of an embedding pass (`inference.embed_paths`), as both the embed stage
    and training's validation run it: its size, precision, loader and memory layout."""
    return {
        "image_size": member.image_size,
        "batch_size": cfg.embed.batch_size,
        "device": device,
        "amp": member.train.amp,
        "num_workers": member.train.num_workers,
        "channels_last": member.train.channels_last,
    }


def member_data(member: MemberConfig) -> dict:
    """The member's settings as plain data, stored in its checkpoints."""
    return member.model_dump(mode="json")


def load_member(path: Path, member: MemberConfig, device: torch.device) -> tuple[EmbeddingModel, Head, list]:
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
