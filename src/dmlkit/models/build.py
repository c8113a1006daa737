"""A member's config → its embedding model and margin head (what train, embed and export build)."""

from __future__ import annotations

import numpy as np

from ..config import MemberConfig
from .backbone import EmbeddingModel
from .heads import MarginHead, ProxyAnchorHead, build_head


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
    )


def build_member_head(member: MemberConfig, class_counts: np.ndarray) -> MarginHead | ProxyAnchorHead:
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
        h.proxy_margin,
        h.proxy_alpha,
    )


def build_aux(member: MemberConfig, class_counts: np.ndarray) -> MarginHead:
    """head.aux's ArcFace head: a fixed margin for every class of the auxiliary column."""
    aux = member.head.aux
    size, margin = member.embedding_size, aux.margin
    return build_head("arcface", size, class_counts, aux.scale, aux.subcenters, "none", 0, 0, 0, margin)
