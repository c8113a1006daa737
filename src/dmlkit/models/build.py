"""A member's config → its embedding model and margin head (what train, embed and export build)."""

from __future__ import annotations

import numpy as np

from ..config import MemberConfig
from .backbone import EmbeddingModel
from .heads import MarginHead, build_head


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
