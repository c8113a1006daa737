"""Datasets over the common table's paths."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .crops import Cropper, enlarge
from .images import UnreadableImageError, decode_image, oriented_jpeg_shape, read_image_bytes
from .transforms import CropPlan

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """(image tensor, label index, row index, ok) for each path.

    With ``skip_unreadable`` an unreadable image yields ok=False and a zero tensor, and the
    training loop drops, counts and names it; otherwise it raises naming the file.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | None,
        transform: Callable[..., dict],
        channels: int = 3,
        image_size: int = 224,
        skip_unreadable: bool = False,
        quarter_turns: Sequence[int] | None = None,
        cropper: Cropper | None = None,
    ):
        """`quarter_turns`: per image, how many times to rotate it by 90° counter-clockwise first;
        `cropper`: per image a detector box to cut out first (before the turns and augmentations)."""
        self.cropper = cropper
        self.paths = list(paths)
        self.quarter_turns = list(quarter_turns) if quarter_turns is not None else None
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.channels = channels
        self.image_size = image_size
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, bool]:
        turns = self.quarter_turns[index] % 4 if self.quarter_turns is not None else 0
        try:
            data = read_image_bytes(self.paths[index])
            box = self.cropper.box(index) if self.cropper is not None else None
            full = oriented_jpeg_shape(data) if box is not None or hasattr(self.transform, "plan") else None
            image, region = None, None
            if box is not None and full is None:  # not a JPEG: no size in a header read, no reduced decoding
                image = decode_image(data, self.paths[index], self.channels)
                full = image.shape[:2]
            if box is not None:  # the box grown by the margin, on the full-resolution image as displayed
                region = enlarge(box, self.cropper.margin, *full)
            plan, min_side = self._plan(full, turns, region)
            if image is None:
                image = decode_image(data, self.paths[index], self.channels, min_side)
            if region is not None:
                image = cut(image, region, full)
        except UnreadableImageError:
            if not self.skip_unreadable:
                raise
            blank = torch.zeros(self.channels, self.image_size, self.image_size, dtype=torch.uint8)
            return blank, self.labels[index], index, False
        if turns:
            image = np.ascontiguousarray(np.rot90(image, turns))
        tensor = (self.transform(image=image, plan=plan) if plan is not None else self.transform(image=image))["image"]
        return tensor, self.labels[index], index, True

    def _plan(
        self, full: tuple[int, int] | None, turns: int, region: tuple[int, int, int, int] | None
    ) -> tuple[CropPlan | None, int | None]:
        """The sample's crop drawn from the JPEG header's shape `full` (of the detector region when
        there is one, as rotated) when the transform can, and the shorter side of the whole image
        to decode at: what the crop (or the transform) needs of the region, scaled to the image."""
        planner = getattr(self.transform, "plan", None)
        shape = full
        if region is not None and full is not None:
            shape = (region[3] - region[1], region[2] - region[0])
        if shape is not None and turns % 2:
            shape = shape[::-1]
        plan = planner(shape) if planner is not None and shape is not None else None
        need = plan.min_side if plan is not None else getattr(self.transform, "source_side", None)
        if need is None or region is None or full is None:
            return plan, need
        return plan, int(np.ceil(need * min(full) / min(shape)))


def cut(image: np.ndarray, region: tuple[int, int, int, int], full: tuple[int, int] | None) -> np.ndarray:
    """The region (in full-resolution pixels of shape `full`) of the image as decoded (maybe reduced)."""
    sy, sx = (image.shape[0] / full[0], image.shape[1] / full[1]) if full is not None else (1.0, 1.0)
    x1, y1, x2, y2 = region
    top, left = min(int(y1 * sy), image.shape[0] - 1), min(int(x1 * sx), image.shape[1] - 1)
    bottom, right = max(top + 1, round(y2 * sy)), max(left + 1, round(x2 * sx))
    return np.ascontiguousarray(image[top:bottom, left:right])


def with_rotated_classes(table: pd.DataFrame, rotations: Sequence[int]) -> tuple[pd.DataFrame, list[str]]:
    """The training rows plus one copy per rotation whose label is `<label>@rot<angle>`, with a
    `quarter_turns` column; and the class list: the original classes (sorted) first, then the
    rotated ones, so the original classes keep the head's first rows."""
    classes = sorted(table["label"].unique())
    parts = [table.assign(quarter_turns=0)]
    for angle in rotations:
        if angle % 90 or not 0 < angle < 360:
            raise ValueError(f"class rotation {angle}: expected 90, 180 or 270")
        parts.append(table.assign(label=table["label"].astype(str) + f"@rot{angle}", quarter_turns=angle // 90))
    rotated = [f"{c}@rot{angle}" for angle in rotations for c in classes]
    return pd.concat(parts, ignore_index=True), classes + rotated
