"""A member's fold as training data: its rows (with rotated copies), the head's classes and
targets, the auxiliary column's classes, the crops and the dataset."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import Config, MemberConfig
from ..config.members import augment_specs
from ..data.crops import Cropper, box_id, missing_boxes, read_boxes, rows_boxes
from ..data.dataset import ImageDataset, with_rotated_classes
from ..data.folds import fold_parts
from ..data.transforms import make_pipeline

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ data
@dataclass
class FoldData:
    """A member's fold: training rows (with rotated copies), the head's classes and the targets."""

    train_part: pd.DataFrame
    val_part: pd.DataFrame
    train_rows: pd.DataFrame
    head_classes: list[str]  # the original classes first, then rotated ones
    classes: list[str]  # what the saved head keeps
    counts: np.ndarray
    targets: np.ndarray
    aux_classes: list[str] = field(default_factory=list)  # head.aux: the auxiliary column's classes
    aux_targets: np.ndarray | None = None  # per training row, its auxiliary class (−1: none)


def fold_data(member: MemberConfig, folds: pd.DataFrame, refit: bool = False) -> FoldData:
    """The member's fold; `refit`: every known training row trains (every fold and class), none validates."""
    if refit:
        train_part, val_part = folds[folds["known"]].reset_index(drop=True), folds.iloc[:0].copy()
    else:
        train_part, val_part = fold_parts(folds, member.fold)
    train_rows, head_classes = with_rotated_classes(train_part, member.train.class_rotations)
    class_index = {c: i for i, c in enumerate(head_classes)}
    data = FoldData(
        train_part,
        val_part,
        train_rows,
        head_classes,
        head_classes[: train_part["label"].nunique()],
        train_rows["label"].value_counts().reindex(head_classes).to_numpy(),
        train_rows["label"].map(class_index).to_numpy(),
    )
    if member.head.aux is not None:
        data.aux_classes, data.aux_targets = aux_targets(train_rows, member.head.aux.column, member.name)
    return data


def aux_targets(rows: pd.DataFrame, column: str, member_name: str) -> tuple[list[str], np.ndarray]:
    """(classes, per row its class index or −1 where the column is blank) of an auxiliary column."""
    if column not in rows.columns:
        extra = sorted(set(rows.columns) - {"id", "path", "label", "role", "known", "fold", "unknown_fold"})
        raise ValueError(
            f"{member_name}: head.aux.column '{column}' is not a column of the training table "
            f"(its extra columns: {extra or 'none'})"
        )
    values = rows[column].fillna("").astype(str).str.strip()
    classes = sorted(set(values) - {""})
    if len(classes) < 2:
        raise ValueError(f"{member_name}: head.aux.column '{column}' has {len(classes)} class(es); a head needs 2")
    index = {c: i for i, c in enumerate(classes)}
    return classes, values.map(lambda v: index.get(v, -1)).to_numpy(np.int64)


def competition_boxes(cfg: Config, ids: list[str]) -> dict | None:
    """competition.boxes read for these row ids (None without a boxes file)."""
    if cfg.competition.boxes is None:
        return None
    return read_boxes(Path(cfg.competition.root) / cfg.competition.boxes, {box_id(str(i)) for i in ids})


def training_cropper(cfg: Config, member: MemberConfig, data: FoldData, boxes: dict | None) -> Cropper | None:
    """train.crops over the training rows, with how many rows lack each source's box (used whole)."""
    if not member.train.crops or boxes is None:
        return None
    rows = rows_boxes(data.train_rows["id"].tolist(), boxes)
    missing = missing_boxes(rows, list(member.train.crops), f"{member.name}: train.crops")
    log.info(
        "%s: train.crops %s; without a box (trained whole when drawn): %s of %d rows",
        member.name,
        member.train.crops,
        ", ".join(f"{source} {n}" for source, n in missing.items()) or "-",
        len(rows),
    )
    return Cropper(rows, member.train.crops, cfg.competition.box_margin)


def training_dataset(member: MemberConfig, data: FoldData, cropper: Cropper | None = None) -> ImageDataset:
    t = member.train
    targets = data.targets.tolist()
    if data.aux_targets is not None:  # (identity, auxiliary) per row: batches of (B, 2) labels
        targets = list(np.stack([data.targets, data.aux_targets], axis=1).astype(np.int64))
    return ImageDataset(
        data.train_rows["path"].tolist(),
        targets,
        make_pipeline(member.image_size, augment=augment_specs(t.augment, t.flip)),
        member.in_chans,
        member.image_size,
        skip_unreadable=not t.strict_images,
        quarter_turns=data.train_rows["quarter_turns"].tolist(),
        cropper=cropper,
    )
