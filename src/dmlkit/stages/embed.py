"""The embed stage: every image of the table embedded by one trained member (TTA), with its
head's best classes (and the auxiliary head's cosines), cached per member."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import cache
from ..build import embedding_options, load_aux_head, load_member
from ..config import Config, MemberConfig, config_slice
from ..data.crops import Cropper, missing_boxes, read_boxes, source_croppers
from ..inference import embed_sharded, head_cosines, head_topk
from ..pipeline.context import Context
from ..pipeline.executor import Stage, run_cached
from ..runtime import is_main_process
from .folds import load_table, run_folds
from .train import box_inputs, refit_name, run_refit, run_train

log = logging.getLogger(__name__)


def embed_member(
    cfg: Config,
    member: MemberConfig,
    table: pd.DataFrame,
    weights: Path,
    device: torch.device,
    work: Path,
    progress: bool = True,
) -> dict:
    """embeddings.npy (one row per table row), head_topk_{index,cos}.npy, head_classes.json, ids.csv;
    with embed.flip_gallery also mirror.npy, the mirrored images' embeddings; with head.aux
    aux_cos.npy (every row's cosines to the auxiliary classes) and aux_classes.json."""
    model, head, classes = load_member(weights, member, device)
    emb = embed_sharded(  # under torchrun each rank embeds its share
        model,
        table["path"].tolist(),
        **embedding_options(cfg, member, device),
        flip=cfg.embed.tta_flip,
        mirror=cfg.embed.flip_gallery,
        scales=cfg.embed.tta_scales,
        desc=f"embed {member.name}",
        progress=progress,
        croppers=embed_croppers(cfg, table),
    )
    if not is_main_process():
        return {}
    if cfg.embed.flip_gallery:  # (N, 2, E): the images and their mirrors
        emb, mirror = emb[:, 0], emb[:, 1]
        np.save(work / "mirror.npy", np.ascontiguousarray(mirror))
    emb = np.ascontiguousarray(emb)
    top_index, top_cos = head_topk(head, emb, device)
    np.save(work / "embeddings.npy", emb)
    np.save(work / "head_topk_index.npy", top_index)
    np.save(work / "head_topk_cos.npy", top_cos)
    (work / "head_classes.json").write_text(json.dumps(classes))
    aux = load_aux_head(weights, member, device)
    if aux is not None:  # head.aux: every row's cosines to the auxiliary classes
        aux_head, aux_classes = aux
        np.save(work / "aux_cos.npy", head_cosines(aux_head, emb, device))
        (work / "aux_classes.json").write_text(json.dumps({"column": member.head.aux.column, "classes": aux_classes}))
    table[["id", "role"]].to_csv(work / "ids.csv", index=False)
    return {"rows": len(emb), "dim": int(emb.shape[1])}


def embed_croppers(cfg: Config, table: pd.DataFrame) -> list[Cropper | None]:
    """embed.crops: one cropper per source over the table's rows (logged: rows without a box of
    each source, embedded whole); [None] (the whole images) without."""
    if not cfg.embed.crops:
        return [None]
    path = Path(cfg.competition.root) / cfg.competition.boxes
    ids = table["id"].astype(str).tolist()
    boxes = read_boxes(path, set(ids))
    croppers = source_croppers(boxes, ids, cfg.embed.crops, cfg.competition.box_margin)
    missing = missing_boxes(croppers[0].boxes, cfg.embed.crops, "embed.crops")
    log.info(
        "embed.crops %s averaged; without a box (embedded whole): %s of %d images (%s)",
        cfg.embed.crops,
        ", ".join(f"{source} {n}" for source, n in missing.items()) or "-",
        len(ids),
        path,
    )
    return croppers


def read_head_topk(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, cosines), each (N, k): a member's head's best classes for every row of the table."""
    classes = np.array(json.loads((folder / "head_classes.json").read_text()), dtype=object)
    return classes[np.load(folder / "head_topk_index.npy")], np.load(folder / "head_topk_cos.npy")


def read_views(folder: Path, prefix: str = "") -> np.ndarray:
    """A stage folder's embeddings.npy: (N, E), or with its mirror.npy (embed.flip_gallery) (N, 2, E)."""
    emb = np.load(folder / f"{prefix}embeddings.npy")
    if not (folder / f"{prefix}mirror.npy").is_file():
        return emb
    return np.stack([emb, np.load(folder / f"{prefix}mirror.npy")], axis=1)


def read_aux_groups(folders: list[Path], column: str) -> np.ndarray | None:
    """Per table row, its auxiliary class by the members' heads on `column` (their cosines averaged
    per class name): what retrieve.unknown_per groups the queries by. None: no member has that head."""
    totals: dict[str, np.ndarray] = {}
    for folder in folders:
        meta_file = folder / "aux_classes.json"
        if not meta_file.is_file():
            continue
        meta = json.loads(meta_file.read_text())
        if meta["column"] != column:
            continue
        cos = np.load(folder / "aux_cos.npy")
        for j, name in enumerate(meta["classes"]):
            totals[name] = totals.get(name, 0.0) + cos[:, j]
    if not totals:
        return None
    names = sorted(totals)
    return np.array(names, dtype=object)[np.argmax(np.stack([totals[n] for n in names], axis=1), axis=1)]


def run_embed(ctx: Context, member_name: str) -> cache.Artifact:
    """The member's embeddings of every image by its fold model; a member with refit has its refit
    model's next (`run_embed_refit`)."""
    art = _run_embed(ctx, member_name, run_train(ctx, member_name), member_name)
    if ctx.cfg.member(member_name).refit != "off":
        run_embed_refit(ctx, member_name)
    return art


def run_embed_refit(ctx: Context, member_name: str) -> cache.Artifact:
    """Every image embedded by the member's refit model (member.refit), cached as embed/<member>-refit."""
    return _run_embed(ctx, member_name, run_refit(ctx, member_name), refit_name(member_name))


def _run_embed(ctx: Context, member_name: str, train_art: cache.Artifact, name: str) -> cache.Artifact:
    member = ctx.cfg.member(member_name)
    folds_art = run_folds(ctx)
    part = {"embed": config_slice(ctx.cfg.embed), "image_size": member.image_size, "amp": member.train.amp}

    def compute(work: Path) -> dict:
        table, _ = load_table(folds_art)
        return embed_member(ctx.cfg, member, table, train_art.file("best.pt"), ctx.device, work, ctx.progress)

    upstream = {"train": cache.produced(train_art), "folds": cache.produced(folds_art)}
    boxes = box_inputs(ctx) if ctx.cfg.embed.crops else {}
    return run_cached(ctx, EMBED, name, part, upstream, boxes, compute, all_ranks=True)


EMBED = Stage(
    name="embed",
    version=3,
    outputs=("*.npy", "head_classes.json", "ids.csv"),
    per_member=True,
    hashes="the embed section, the member's image size and amp; its trained weights; table.csv; boxes where it crops",
    run=run_embed,
)
