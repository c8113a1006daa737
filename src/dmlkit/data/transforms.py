"""Albumentations pipelines built from the config (uint8 in, uint8 CHW tensors out)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from ..errors import TransformConfigError


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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                transforms.append(getattr(A, name)(**kwargs))
            except (TypeError, ValueError) as exc:
                raise TransformConfigError(f"{where}.{i}: {name}({kwargs}) failed: {exc}") from exc
        ignored = [str(w.message) for w in caught if "not valid for transform" in str(w.message)]
        if ignored:  # albumentations only warns, and drops the misspelt argument
            raise TransformConfigError(f"{where}.{i}: {name}: {ignored[0]}")
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
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


@dataclass(frozen=True)
class CropPlan:
    """A sample's RandomResizedCrop drawn before decoding, on the source's full-resolution shape."""

    box: tuple[int, int, int, int]  # x_min, y_min, x_max, y_max at full resolution
    shape: tuple[int, int]  # the full-resolution (height, width) it was drawn on
    min_side: int  # the source's shorter side that keeps the crop at least its output size

    def box_at(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The box on the same image decoded at (height, width)."""
        sy, sx = height / self.shape[0], width / self.shape[1]
        x0, y0, x1, y1 = self.box
        x0, y0 = min(int(x0 * sx), width - 1), min(int(y0 * sy), height - 1)
        return x0, y0, max(x0 + 1, min(width, round(x1 * sx))), max(y0 + 1, min(height, round(y1 * sy)))


class ImagePipeline:
    """Augmentations (an albumentations Compose), then resize to ``image_size`` when the image is
    not that size already, then a uint8 CHW tensor; called like a Compose: ``pipeline(image=...)``.

    The last two steps are plain cv2/torch calls: as albumentations transforms they cost 0.27 ms per
    image (mostly per-transform dispatch, and a resize even when the size already matches), a third
    of the 384 px training pipeline's cost beyond decoding.

    A leading RandomResizedCrop can be drawn before decoding (`plan`), from the JPEG header's shape:
    the crop alone decides how far the JPEG may be reduced, not the smallest crop the scale range allows.
    """

    def __init__(self, augmentations: list, image_size: int):
        first = augmentations[0] if augmentations else None
        self.crop = first if isinstance(first, A.RandomResizedCrop) and first.p >= 1.0 else None
        rest = augmentations[1:] if self.crop is not None else augmentations
        self.augment = A.Compose(rest) if rest else None
        self.image_size = image_size
        self.source_side = source_side(augmentations, image_size)
        # what the crop must keep of the source so that nothing after it upsamples: its output × zoom
        self._crop_needs = [source_side(rest, side) for side in self.crop.size] if self.crop is not None else None

    def set_random_seed(self, seed: int | None) -> None:
        """Seeds the augmentations (albumentations gives every transform the same seed, so the draws
        do not depend on the steps that follow them)."""
        if self.crop is not None:
            self.crop.set_random_seed(seed)
        if self.augment is not None:
            self.augment.set_random_seed(seed)

    def plan(self, shape: tuple[int, int] | None) -> CropPlan | None:
        """Draws this sample's crop on a source of full-resolution `shape` (height, width) before it is
        decoded; pass the plan to the call. None without a leading crop or a known shape."""
        if self.crop is None or shape is None:
            return None
        box = self.crop.get_params_dependent_on_data({"shape": shape}, {})["crop_coords"]
        crop_h, crop_w = box[3] - box[1], box[2] - box[0]
        ratio = max(self._crop_needs[0] / crop_h, self._crop_needs[1] / crop_w)
        return CropPlan(tuple(int(v) for v in box), tuple(shape), int(np.ceil(min(shape) * ratio)))

    def __call__(self, *, image: np.ndarray, plan: CropPlan | None = None) -> dict[str, torch.Tensor]:
        if self.crop is not None:
            if plan is None:
                image = self.crop(image=image)["image"]
            else:
                image = self.crop.apply(image, crop_coords=plan.box_at(*image.shape[:2]))
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
