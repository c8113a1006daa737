"""A timm backbone → GeM pooling → Linear/BatchNorm1d/PReLU neck → L2-normalised embedding."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn


class GeM(nn.Module):
    """Generalised mean pooling; p=1 is average pooling, p→∞ max pooling. Computed in fp32."""

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float().clamp(min=1.0)
        return x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def check_backbone(name: str, where: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:4]}*")[:8]
        raise ValueError(f"{where}: unknown timm backbone '{name}' (similar names: {close})")


class EmbeddingModel(nn.Module):
    def __init__(
        self,
        backbone: str,
        embedding_size: int = 512,
        in_chans: int = 3,
        pretrained_file: str | None = None,
        gem_p: float = 3.0,
        gem_learnable: bool = True,
    ):
        super().__init__()
        kwargs = {"num_classes": 0, "global_pool": "", "in_chans": in_chans}
        if pretrained_file:
            if not Path(pretrained_file).is_file():
                raise FileNotFoundError(f"pretrained_file '{pretrained_file}' not found (nothing is downloaded)")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file)})
        self.backbone = timm.create_model(backbone, **kwargs)
        with torch.no_grad():
            was_training = self.backbone.training
            self.backbone.eval()
            channels = self.backbone.forward_features(torch.zeros(1, in_chans, 64, 64)).shape[1]
            self.backbone.train(was_training)
        self.pool = GeM(gem_p, gem_learnable)
        self.neck = nn.Sequential(nn.Linear(channels, embedding_size), nn.BatchNorm1d(embedding_size), nn.PReLU())
        self.in_chans = in_chans
        self.embedding_size = embedding_size
        mean, std = self.data_config()
        # uint8 images are normalised here, batched on the model's device (not saved in checkpoints)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1) * 255.0, persistent=False)

    def data_config(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std from the backbone's own timm config (averaged for one channel)."""
        cfg = timm.data.resolve_model_data_config(self.backbone)
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        if self.in_chans == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        return mean, std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unit embeddings of uint8 images (normalised here) or of already normalised float images."""
        if images.dtype == torch.uint8:
            images = (images.float() - self.pixel_mean) / self.pixel_std
        features = self.backbone.forward_features(images)
        pooled = self.pool(features)
        with torch.autocast(device_type=images.device.type, enabled=False):
            return F.normalize(self.neck(pooled.float()), dim=1)
