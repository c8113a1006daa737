"""Camera effects shared by the demo generators: one 'photo' of a rendered subject."""

from __future__ import annotations

import cv2
import numpy as np


def random_homography(
    rng: np.random.Generator, size: int, rotate: float, scale: tuple[float, float], shift: float, perspective: float
) -> np.ndarray:
    """Rotation, scale, translation and corner jitter, as one 3×3 matrix on a size×size canvas."""
    centre = size / 2
    angle = rng.uniform(-rotate, rotate)
    s = rng.uniform(*scale)
    affine = cv2.getRotationMatrix2D((centre, centre), angle, s)
    affine[:, 2] += rng.uniform(-shift, shift, size=2) * size
    h = np.vstack([affine, [0, 0, 1]])
    src = np.float32([[0, 0], [size, 0], [size, size], [0, size]])
    dst = src + rng.uniform(-perspective, perspective, size=(4, 2)).astype(np.float32) * size
    return cv2.getPerspectiveTransform(src, dst) @ h


def warp(
    image: np.ndarray, matrix: np.ndarray, border: int = cv2.BORDER_REFLECT101, value: tuple = (0, 0, 0, 0)
) -> np.ndarray:
    size = image.shape[1], image.shape[0]
    return cv2.warpPerspective(image, matrix, size, flags=cv2.INTER_LINEAR, borderMode=border, borderValue=value)


def lighting(rng: np.random.Generator, image: np.ndarray, strength: float) -> np.ndarray:
    """Brightness, contrast, per-channel colour cast, gamma and a soft light gradient."""
    img = image.astype(np.float32) / 255.0
    contrast = 1 + rng.uniform(-0.35, 0.35) * strength
    brightness = rng.uniform(-0.2, 0.2) * strength
    cast = 1 + rng.uniform(-0.15, 0.15, size=3) * strength
    img = (img - 0.5) * contrast + 0.5 + brightness
    img = img * cast
    h, w = img.shape[:2]
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-9
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xx / w - 0.5) * direction[0] + (yy / h - 0.5) * direction[1]) * rng.uniform(0, 0.4) * strength
    img = img + ramp[..., None]
    gamma = np.exp(rng.uniform(-0.3, 0.3) * strength)
    img = np.clip(img, 0, 1) ** gamma
    return (img * 255).astype(np.uint8)


def blur_and_noise(rng: np.random.Generator, image: np.ndarray, strength: float) -> np.ndarray:
    sigma = rng.uniform(0, 1.4) * strength
    if sigma > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    noise = rng.normal(0, rng.uniform(0, 10) * strength, size=image.shape)
    return np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def occlude(rng: np.random.Generator, image: np.ndarray, probability: float, max_area: float) -> np.ndarray:
    """A random opaque blob (a passer-by, a branch) over part of the picture."""
    if rng.random() >= probability:
        return image
    h, w = image.shape[:2]
    area = rng.uniform(0.03, max_area) * h * w
    bh = int(np.clip(np.sqrt(area * rng.uniform(0.5, 2)), 4, h - 1))
    bw = int(np.clip(area / bh, 4, w - 1))
    y, x = rng.integers(0, h - bh), rng.integers(0, w - bw)
    out = image.copy()
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    if rng.random() < 0.5:
        cv2.rectangle(out, (x, y), (x + bw, y + bh), colour, -1)
    else:
        cv2.ellipse(out, (x + bw // 2, y + bh // 2), (bw // 2, bh // 2), rng.uniform(0, 180), 0, 360, colour, -1)
    return out


def finish(image: np.ndarray, out_size: int) -> np.ndarray:
    return cv2.resize(image, (out_size, out_size), interpolation=cv2.INTER_AREA)


def write_jpeg(path, image: np.ndarray, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - encoding a valid uint8 array does not fail
        raise RuntimeError(f"could not encode {path}")
    path.write_bytes(buffer.tobytes())
