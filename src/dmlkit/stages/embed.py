"""Embedding every image of the table with one trained member (TTA), with its head's best classes;
and the ensemble of the members' embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import Config, MemberConfig
from ..inference import embed_sharded, head_topk
from ..models.checkpoint import load_member
from ..retrieval.ensemble import concatenate, pca_whiten
from ..runtime import is_main_process


def embed_member(
    cfg: Config,
    member: MemberConfig,
    table: pd.DataFrame,
    weights: Path,
    device: torch.device,
    work: Path,
    progress: bool = True,
) -> dict:
    """embeddings.npy (one row per table row), head_topk_{index,cos}.npy, head_classes.json, ids.csv."""
    model, head, classes = load_member(weights, member, device)
    emb = embed_sharded(  # under torchrun each rank embeds its share
        model,
        table["path"].tolist(),
        image_size=member.image_size,
        batch_size=cfg.embed.batch_size,
        device=device,
        flip=cfg.embed.tta_flip,
        scales=cfg.embed.tta_scales,
        amp=member.train.amp,
        num_workers=member.train.num_workers,
        desc=f"embed {member.name}",
        progress=progress,
        channels_last=member.train.channels_last,
    )
    if not is_main_process():
        return {}
    top_index, top_cos = head_topk(head, emb, device)
    np.save(work / "embeddings.npy", emb)
    np.save(work / "head_topk_index.npy", top_index)
    np.save(work / "head_topk_cos.npy", top_cos)
    (work / "head_classes.json").write_text(json.dumps(classes))
    table[["id", "role"]].to_csv(work / "ids.csv", index=False)
    return {"rows": len(emb), "dim": int(emb.shape[1])}


def read_head_topk(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, cosines), each (N, k): a member's head's best classes for every row of the table."""
    classes = np.array(json.loads((folder / "head_classes.json").read_text()), dtype=object)
    return classes[np.load(folder / "head_topk_index.npy")], np.load(folder / "head_topk_cos.npy")


def ensemble_members(cfg: Config, table: pd.DataFrame, member_files: dict[str, Path], work: Path) -> dict:
    """The members' embeddings, each L2-normalised and weighted, concatenated (optionally PCA-whitened)."""
    parts = [np.load(path) for path in member_files.values()]
    weights = [cfg.ensemble.weights.get(name, 1.0) for name in member_files]
    emb = concatenate(parts, weights)
    if cfg.ensemble.pca_whiten:
        emb = pca_whiten(emb, (table["role"] == "train").to_numpy(), cfg.ensemble.pca_dim)
    np.save(work / "embeddings.npy", emb)
    return {"dim": int(emb.shape[1]), "members": list(member_files)}
