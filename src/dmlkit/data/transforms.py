"""Albumentations pipelines built from the config (uint8 in, uint8 CHW tensors out)."""

from __future__ import annotations

from typing import Any

import albumentations as A
from albumentations.pytorch import ToTensorV2


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


def make_pipeline(image_size: int, augment: list[dict[str, Any]] | None = None, flip: bool = False) -> A.Compose:
    """Augmentations (train) or none (eval), then resize to a uint8 CHW tensor.

    Normalisation (mean/std from timm's data config) happens inside the model, batched and on the
    device: done per image on the CPU it cost about as much as the augmentations themselves.
    """
    steps = build_augmentations(augment or [], image_size)
    if flip:
        steps.append(A.HorizontalFlip(p=1.0))
    steps += [A.Resize(image_size, image_size), ToTensorV2()]
    return A.Compose(steps)
