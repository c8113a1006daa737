"""Albumentations pipelines built from the config (uint8 in, uint8 CHW tensors out)."""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch


class TransformConfigError(ValueError):
    pass


def _substitute(value: Any, image_size: int) -> Any:
    if value == "image_size":
        return image_size
    if isinstance(value, list):
        return [_substitute(v, image_size) for v in value]
    return value


def build_augmentations(specs: list[dict[str, Any]], image_size: int, where: str = "train.augment") -> list:
    """[{type: Name, **kwargs}] → albumentations transforms; the string 'image_size' is substituted."""
    transforms = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        name = spec.pop("type", None)
        if name is None or not hasattr(A, name):
            raise TransformConfigError(f"{where}.{i}: unknown albumentations transform {name!r}")
        kwargs = {k: _substitute(v, image_size) for k, v in spec.items()}
        if "size" in kwargs and isinstance(kwargs["size"], list):
            kwargs["size"] = tuple(kwargs["size"])
        try:
            transforms.append(getattr(A, name)(**kwargs))
        except (TypeError, ValueError) as exc:
            raise TransformConfigError(f"{where}.{i}: {name}({kwargs}) failed: {exc}") from exc
    return transforms


def source_side(augmentations: list, image_size: int) -> int:
    """The shorter side a source image needs so that no step upsamples it: `image_size`, divided by
    √(smallest crop area) of a RandomResizedCrop, times the largest zoom of an Affine. Images at
    least twice this size can be decoded at reduced scale."""
    side = float(image_size)
    for t in augmentations:
        if isinstance(t, A.RandomResizedCrop):
            side /= max(1e-3, float(t.scale[0])) ** 0.5
        elif isinstance(t, A.Affine):
            scale = getattr(t, "scale", None)
            values = [v for axis in scale.values() for v in axis] if isinstance(scale, dict) else [1.0]
            side *= max(1.0, *values)
    return int(np.ceil(side))


class ImagePipeline:
    """Augmentations (an albumentations Compose), then resize to ``image_size`` when the image is
    not that size already, then a uint8 CHW tensor; called like a Compose: ``pipeline(image=...)``.

    The last two steps are plain cv2/torch calls: as albumentations transforms they cost 0.27 ms per
    image (mostly per-transform dispatch, and a resize even when the size already matches), a third
    of the 384 px training pipeline's cost beyond decoding.
    """

    def __init__(self, augmentations: list, image_size: int):
        self.augment = A.Compose(augmentations) if augmentations else None
        self.image_size = image_size
        self.source_side = source_side(augmentations, image_size)

    def set_random_seed(self, seed: int | None) -> None:
        """Seeds the augmentations (albumentations gives every transform the same seed, so the draws
        do not depend on the steps that follow them)."""
        if self.augment is not None:
            self.augment.set_random_seed(seed)

    def __call__(self, *, image: np.ndarray) -> dict[str, torch.Tensor]:
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        if image.shape[:2] != (self.image_size, self.image_size):
            channels = image.shape[2]
            image = cv2.resize(image, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)
            image = image.reshape(self.image_size, self.image_size, channels)
        if any(stride < 0 for stride in image.strides):  # torch cannot view negative strides
            image = np.ascontiguousarray(image)
        return {"image": torch.from_numpy(image.transpose(2, 0, 1))}


def make_pipeline(image_size: int, augment: list[dict[str, Any]] | None = None, flip: bool = False) -> ImagePipeline:
    """Augmentations (train) or none (eval), then resize to a uint8 CHW tensor.

    Normalisation (mean/std from timm's data config) happens inside the model, batched and on the
    device: done per image on the CPU it cost about as much as the augmentations themselves.
    """
    steps = build_augmentations(augment or [], image_size)
    if flip:
        steps.append(A.HorizontalFlip(p=1.0))
    return ImagePipeline(steps, image_size)
