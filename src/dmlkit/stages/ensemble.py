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
from .embed import read_views, run_embed, run_embed_refit
from .folds import load_table, run_folds
from .train import refit_name


def ensemble_members(
    cfg: Config, table: pd.DataFrame, parts: dict[str, tuple[Path, float]], work: Path, prefix: str = ""
) -> dict:
    """The parts' embeddings (name → (embeddings.npy, weight)), each L2-normalised and weighted,
    concatenated (optionally PCA-whitened); their mirrors' (mirror.npy beside each) alike, whitened by
    the same fit. Written as `<prefix>embeddings.npy` (and `<prefix>mirror.npy`)."""
    weights = [weight for _, weight in parts.values()]
    emb = concatenate([np.load(path) for path, _ in parts.values()], weights)
    mirror = None
    if cfg.embed.flip_gallery:
        mirror = concatenate([np.load(path.with_name("mirror.npy")) for path, _ in parts.values()], weights)
    if cfg.ensemble.pca_whiten:
        fit_rows = (table["role"] == "train").to_numpy()
        if mirror is None:
            emb = pca_whiten(emb, fit_rows, cfg.ensemble.pca_dim)
        else:
            emb, mirror = pca_whiten(emb, fit_rows, cfg.ensemble.pca_dim, also=mirror)
    np.save(work / f"{prefix}embeddings.npy", emb)
    if mirror is not None:
        np.save(work / f"{prefix}mirror.npy", mirror)
    return {"dim": int(emb.shape[1]), "members": list(parts)}


def view_parts(cfg: Config, fold_files: dict[str, Path], refit_files: dict[str, Path] | None = None) -> dict:
    """name → (embeddings file, weight) of each model in a view: the fold models (validation), or the
    models that answer the test (`refit_files` given): per member its fold model, its refit model
    (refit: replace) or both (refit: ensemble, each with the member's weight over √2, so the member
    weighs as much as one model)."""
    parts = {}
    for member in cfg.members:
        weight = cfg.ensemble.weights.get(member.name, 1.0)
        mode = "off" if refit_files is None else member.refit
        if mode == "ensemble":
            weight /= np.sqrt(2.0)
        if mode in ("off", "ensemble"):
            parts[member.name] = (fold_files[member.name], weight)
        if mode in ("replace", "ensemble"):
            parts[refit_name(member.name)] = (refit_files[member.name], weight)
    return parts


def run_ensemble(ctx: Context) -> cache.Artifact:
    embed_arts = {m.name: run_embed(ctx, m.name) for m in ctx.cfg.members}
    refit_arts = {m.name: run_embed_refit(ctx, m.name) for m in ctx.cfg.members if m.refit != "off"}
    folds_art = run_folds(ctx)
    part = {"ensemble": config_slice(ctx.cfg.ensemble), "members": list(embed_arts)}
    if refit_arts:
        part["refit"] = {m.name: m.refit for m in ctx.cfg.members if m.refit != "off"}

    def compute(work: Path) -> dict:
        table, _ = load_table(folds_art)
        files = {name: art.file("embeddings.npy") for name, art in embed_arts.items()}
        result = ensemble_members(ctx.cfg, table, view_parts(ctx.cfg, files), work)
        if refit_arts:
            refit_files = {name: art.file("embeddings.npy") for name, art in refit_arts.items()}
            test = ensemble_members(ctx.cfg, table, view_parts(ctx.cfg, files, refit_files), work, "test-")
            result["test_members"] = test["members"]
        return result

    upstream = {f"embed/{k}": cache.produced(a) for k, a in embed_arts.items()}
    upstream.update({f"embed/{refit_name(k)}": cache.produced(a) for k, a in refit_arts.items()})
    return run_cached(ctx, ENSEMBLE, "", part, upstream, {}, compute)


def embeddings_of(art: cache.Artifact) -> np.ndarray:
    """An ensemble artifact's embeddings: (N, E), or (N, 2, E) with their mirrors (embed.flip_gallery)."""
    return read_views(art.path)


def test_embeddings_of(art: cache.Artifact) -> np.ndarray | None:
    """The embeddings that answer the test where members refit (their refit models'), else None."""
    return read_views(art.path, "test-") if art.file("test-embeddings.npy").is_file() else None


ENSEMBLE = Stage(
    name="ensemble",
    version=1,
    outputs=("*.npy",),
    per_member=False,
    hashes="the ensemble section and the member names; each member's embeddings",
    run=run_ensemble,
)
