"""The ensemble stage: the members' embeddings, each L2-normalised and weighted, concatenated
(optionally PCA-whitened) into one table per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import cache
from ..config import Config, config_slice
from ..pipeline.context import Context
from ..pipeline.executor import Stage, run_cached
from ..retrieval.ensemble import concatenate, pca_whiten
from .embed import read_views, run_embed
from .folds import load_table, run_folds


def ensemble_members(cfg: Config, table: pd.DataFrame, member_files: dict[str, Path], work: Path) -> dict:
    """The members' embeddings, each L2-normalised and weighted, concatenated (optionally PCA-whitened);
    their mirrors' (mirror.npy beside each member's embeddings) alike, whitened by the same fit."""
    weights = [cfg.ensemble.weights.get(name, 1.0) for name in member_files]
    emb = concatenate([np.load(path) for path in member_files.values()], weights)
    mirror_files = [path.with_name("mirror.npy") for path in member_files.values()]
    mirror = None
    if cfg.embed.flip_gallery:
        mirror = concatenate([np.load(path) for path in mirror_files], weights)
    if cfg.ensemble.pca_whiten:
        fit_rows = (table["role"] == "train").to_numpy()
        if mirror is None:
            emb = pca_whiten(emb, fit_rows, cfg.ensemble.pca_dim)
        else:
            emb, mirror = pca_whiten(emb, fit_rows, cfg.ensemble.pca_dim, also=mirror)
    np.save(work / "embeddings.npy", emb)
    if mirror is not None:
        np.save(work / "mirror.npy", mirror)
    return {"dim": int(emb.shape[1]), "members": list(member_files)}


def run_ensemble(ctx: Context) -> cache.Artifact:
    embed_arts = {m.name: run_embed(ctx, m.name) for m in ctx.cfg.members}
    folds_art = run_folds(ctx)
    part = {"ensemble": config_slice(ctx.cfg.ensemble), "members": list(embed_arts)}

    def compute(work: Path) -> dict:
        table, _ = load_table(folds_art)
        files = {name: art.file("embeddings.npy") for name, art in embed_arts.items()}
        return ensemble_members(ctx.cfg, table, files, work)

    upstream = {f"embed/{k}": cache.produced(a) for k, a in embed_arts.items()}
    return run_cached(ctx, ENSEMBLE, "", part, upstream, {}, compute)


def embeddings_of(art: cache.Artifact) -> np.ndarray:
    """An ensemble artifact's embeddings: (N, E), or (N, 2, E) with their mirrors (embed.flip_gallery)."""
    return read_views(art.path)


ENSEMBLE = Stage(
    name="ensemble",
    version=1,
    outputs=("*.npy",),
    per_member=False,
    hashes="the ensemble section and the member names; each member's embeddings",
    run=run_ensemble,
)
