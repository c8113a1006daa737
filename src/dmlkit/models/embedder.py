"""The exported embedding module: uint8 images in, the pipeline's L2-normalised embedding out —
normalisation, backbone, pooling, neck, the configured TTA (flip, scales) and the members' weighted
concatenation, in one traceable `nn.Module` (written by `dmlkit/export.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import EmbeddingModel


class ExportedEmbedder(nn.Module):
    """The members' embedding of uint8 images, TTA and ensemble included (see the module docstring)."""

    def __init__(
        self,
        models: list[EmbeddingModel],
        weights: list[float],
        image_size: int,
        *,
        tta_flip: bool = False,
        tta_scales: tuple[float, ...] | list[float] = (1.0,),
    ):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.weights = [float(w) for w in weights]
        self.flip = tta_flip
        self.sizes = [max(16, int(round(image_size * s))) for s in tta_scales]
        self.image_size = image_size

    def _views(self, images: torch.Tensor) -> list[torch.Tensor]:
        views = []
        for size in self.sizes:
            view = images
            if size != self.image_size:  # bilinear, no antialiasing: as OpenCV's INTER_LINEAR
                scaled = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
                view = scaled.round().clamp(0, 255).to(torch.uint8)
            views.append(view)
            if self.flip:
                views.append(view.flip(-1))
        return views

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = self._views(images)
        parts = []
        for model, weight in zip(self.models, self.weights, strict=True):
            total = model(views[0])
            for view in views[1:]:
                total = total + model(view)
            parts.append(F.normalize(total, dim=1) * weight)
        return F.normalize(torch.cat(parts, dim=1), dim=1)
