"""Datasets over the common table's paths."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import albumentations as A
import torch
from torch.utils.data import Dataset

from .images import UnreadableImageError, read_image

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
        transform: A.Compose,
        channels: int = 3,
        image_size: int = 224,
        skip_unreadable: bool = False,
    ):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.channels = channels
        self.image_size = image_size
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, bool]:
        try:
            image = read_image(self.paths[index], self.channels)
        except UnreadableImageError:
            if not self.skip_unreadable:
                raise
            blank = torch.zeros(self.channels, self.image_size, self.image_size, dtype=torch.uint8)
            return blank, self.labels[index], index, False
        tensor = self.transform(image=image)["image"]
        return tensor, self.labels[index], index, True
