"""Training data pipeline throughput (OpenCV decode + albumentations) per worker vs decode + resize alone."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from common import report

from dmlkit.data.dataset import ImageDataset
from dmlkit.data.images import read_image
from dmlkit.data.transforms import make_pipeline

AUGMENT = [
    {"type": "RandomResizedCrop", "size": ["image_size", "image_size"], "scale": [0.5, 1.0]},
    {"type": "HorizontalFlip", "p": 0.5},
    {"type": "ColorJitter", "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02, "p": 0.5},
]


def make_images(folder: Path, n: int, shape: tuple[int, int]) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        image = cv2.GaussianBlur(rng.integers(0, 255, (*shape, 3), dtype=np.uint8), (0, 0), 3)
        path = folder / f"{i}.jpg"
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(str(path))
    return paths


def bound(paths: list[str], size: int) -> float:
    """Images per second of full decode + resize alone."""
    start = time.perf_counter()
    for p in paths:
        cv2.resize(read_image(p), (size, size), interpolation=cv2.INTER_LINEAR)
    return len(paths) / (time.perf_counter() - start)


def throughput(paths: list[str], size: int, augment: list | None, decode: str) -> float:
    """Images per second through the dataset (decode, augmentations, resize, tensor), one thread.
    `decode`: full (as before reduced-size decoding), fixed (one reduction for the smallest crop the
    scale range allows) or per_crop (the pipeline's: each sample's crop drawn from the header first)."""
    pipeline = make_pipeline(size, augment=augment)
    if decode == "full":
        pipeline.source_side = None
    if decode != "per_crop":
        pipeline.plan = lambda shape: None
    dataset = ImageDataset(paths, [0] * len(paths), pipeline, 3, size)
    start = time.perf_counter()
    for i in range(len(paths)):
        dataset[i]
    return len(paths) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench loader")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    n = 150 if args.quick else 400
    settings = [
        ((768, 768), 384, "train"),
        ((1024, 1024), 384, "train"),
        ((1024, 1024), 384, "eval"),
        ((1024, 1024), 256, "train"),
        ((1536, 2048), 384, "train"),
    ]
    if args.quick:
        settings = [((512, 512), 224, "train"), ((1024, 1024), 384, "eval")]
    rows = []
    for shape, size, kind in settings:
        with tempfile.TemporaryDirectory() as tmp:
            paths = make_images(Path(tmp), n, shape)
            augment = AUGMENT if kind == "train" else None

            bound(paths, size), throughput(paths, size, augment, "per_crop")  # warm the page cache
            b = bound(paths, size)
            rates = {mode: throughput(paths, size, augment, mode) for mode in ("full", "fixed", "per_crop")}
            side = make_pipeline(size, augment=augment).source_side
            rows.append(
                {
                    "source_px": f"{shape[1]}×{shape[0]}",
                    "out_px": size,
                    "pipeline": f"{kind} (needs {side} px)",
                    "decode+resize_img_s": round(b, 1),
                    "full_decode_img_s": round(rates["full"], 1),
                    "fixed_reduction_img_s": round(rates["fixed"], 1),
                    "per_crop_img_s": round(rates["per_crop"], 1),
                    "speedup": round(rates["per_crop"] / rates["full"], 2),
                    "fraction_of_bound": round(rates["per_crop"] / b, 2),
                }
            )
    report(
        "loader",
        rows,
        {
            "per": "one worker (one process, one thread)",
            "train": "RandomResizedCrop(scale 0.5–1), flip, ColorJitter; eval: resize only",
            "bound": "full decode + resize alone",
            "target": "≥ 70% of the bound; 1024 → 384 px ≥ 1.5× the full-decode pipeline",
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
