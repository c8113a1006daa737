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


def make_images(folder: Path, n: int, size: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        image = cv2.GaussianBlur(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), (0, 0), 3)
        path = folder / f"{i}.jpg"
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(str(path))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench loader")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    n, source, size = (200, 512, 224) if args.quick else (800, 768, 384)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), n, source)

        def bound() -> float:
            start = time.perf_counter()
            for p in paths:
                cv2.resize(read_image(p), (size, size), interpolation=cv2.INTER_LINEAR)
            return n / (time.perf_counter() - start)

        pipeline = make_pipeline(size, augment=AUGMENT)
        dataset = ImageDataset(paths, [0] * n, pipeline, 3, size)

        def full() -> float:
            start = time.perf_counter()
            for i in range(n):
                dataset[i]
            return n / (time.perf_counter() - start)

        bound(), full()  # warm the page cache
        b, f = bound(), full()
        rows.append(
            {
                "images": n,
                "source_px": source,
                "out_px": size,
                "decode+resize_img_s": round(b, 1),
                "full_pipeline_img_s": round(f, 1),
                "fraction_of_bound": round(f / b, 2),
            }
        )
    report("loader", rows, {"per": "one worker (one process, one thread)", "target": "≥ 70% of the bound"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
