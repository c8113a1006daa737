"""Detector crops (Happywhale 2022 1st): boxes per image from `competition.boxes` (image, x1, y1,
x2, y2, source), a source drawn per training sample with configured probabilities, the box
enlarged by a margin; at test the embedding is averaged over the configured sources. An image
without a box of the drawn source is used whole (`none` is the whole image by name)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..competitions.base import InputError, read_csv_checked

WHOLE = "none"  # the source name of the uncropped image
Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the image as displayed


def read_boxes(path: Path, ids: set[str]) -> dict[str, dict[str, Box]]:
    """image id → source → box, from a boxes file; a row with an impossible box stops with its
    line. Rows of images not in `ids` are left out (a detector run over more images)."""
    frame = read_csv_checked(path, ["image", "x1", "y1", "x2", "y2", "source"], nonempty=("image", "source"))
    try:
        coords = frame[["x1", "y1", "x2", "y2"]].astype(float).to_numpy()
    except ValueError as exc:
        raise InputError(f"{path}: a box coordinate is not a number: {exc}") from None
    bad = ~np.isfinite(coords).all(axis=1) | (coords[:, 2] <= coords[:, 0]) | (coords[:, 3] <= coords[:, 1])
    bad |= (coords[:, :2] < 0).any(axis=1)
    if bad.any():
        line = int(np.flatnonzero(bad)[0]) + 2
        raise InputError(f"{path}: line {line}: box {coords[bad][0].tolist()} needs 0 <= x1 < x2 and 0 <= y1 < y2")
    if (frame["source"] == WHOLE).any():
        raise InputError(f"{path}: source '{WHOLE}' is reserved for the uncropped image")
    dup = frame.duplicated(["image", "source"])
    if dup.any():
        line = int(np.flatnonzero(dup)[0]) + 2
        raise InputError(f"{path}: line {line}: a second '{frame['source'][dup].iloc[0]}' box for one image")
    boxes: dict[str, dict[str, Box]] = {}
    for image, source, box in zip(frame["image"], frame["source"], coords, strict=True):
        if image in ids:
            boxes.setdefault(image, {})[source] = tuple(float(v) for v in box)
    return boxes


def enlarge(box: Box, margin: float, height: int, width: int) -> tuple[int, int, int, int]:
    """The box grown by `margin` × its size on every side, clipped to the image, in whole pixels."""
    x1, y1, x2, y2 = box
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    left, top = max(0, int(np.floor(x1 - dx))), max(0, int(np.floor(y1 - dy)))
    right, bottom = min(width, int(np.ceil(x2 + dx))), min(height, int(np.ceil(y2 + dy)))
    return left, top, max(left + 1, right), max(top + 1, bottom)


def draw_source(probabilities: Mapping[str, float], u: float) -> str:
    """The source whose cumulative probability first exceeds `u` in [0, 1) (sources in order)."""
    total = 0.0
    names = list(probabilities)
    for name in names:
        total += probabilities[name]
        if u < total:
            return name
    return names[-1]


@dataclass(frozen=True)
class Cropper:
    """Per dataset row its boxes; `sources` drawn per sample (training) or one fixed source (embedding)."""

    boxes: Sequence[Mapping[str, Box]]
    sources: Mapping[str, float]
    margin: float = 0.1

    def subset(self, rows: Sequence[int]) -> Cropper:
        """The cropper of these rows (a rank's shard)."""
        return Cropper([self.boxes[i] for i in rows], self.sources, self.margin)

    def box(self, index: int) -> Box | None:
        """This sample's box (None: the whole image), the source drawn from torch's RNG (seeded per
        epoch and per loader worker, so a rerun draws the same)."""
        source = next(iter(self.sources)) if len(self.sources) == 1 else None
        if source is None:
            source = draw_source(self.sources, float(torch.rand(())))
        return None if source == WHOLE else self.boxes[index].get(source)


def missing_boxes(boxes: Sequence[Mapping[str, Box]], sources: Sequence[str], key: str) -> dict[str, int]:
    """Per source (not `none`), how many rows have no box of it (they are used whole); a source
    with no box at all is a misspelt name (`key` names the setting in the error)."""
    missing = {s: sum(s not in row for row in boxes) for s in sources if s != WHOLE}
    absent = [s for s, n in missing.items() if boxes and n == len(boxes)]
    if absent:
        found = sorted({s for row in boxes for s in row})
        raise InputError(f"{key}: no image has a box of source(s) {absent} (the boxes file's sources: {found})")
    return missing


def rows_boxes(ids: Sequence[str], boxes: Mapping[str, Mapping[str, Box]]) -> list[Mapping[str, Box]]:
    """Per row id its boxes ({} where the file has none)."""
    return [boxes.get(box_id(str(i)), {}) for i in ids]


def source_croppers(
    boxes: Mapping[str, Mapping[str, Box]], ids: Sequence[str], sources: Sequence[str], margin: float
) -> list[Cropper]:
    """One fixed-source cropper per source, over these row ids (embed.crops)."""
    rows = rows_boxes(ids, boxes)
    return [Cropper(rows, {source: 1.0}, margin) for source in sources]


def box_id(row_id: str) -> str:
    """The image id a table row's boxes are filed under (a pseudo-label row is its test image)."""
    return row_id.removeprefix("pseudo:")
