"""The landmark demo: procedurally generated places, laid out like Google Landmark Recognition 2020.

Each class is a fixed scene (sky, ground, buildings with window textures, roofs, domes, towers,
arches, stripes); each image is a new photo of it. Test images are photos of train classes and a
majority of distractors (scenes of no class); the index holds photos of some classes plus
distractors, for the retrieval variant.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ..runtime import progress_bar
from .photo import blur_and_noise, lighting, occlude, random_homography, write_jpeg

CANVAS = 128


@dataclass(frozen=True)
class LandmarkDemoParams:
    n_classes: int = 120
    head_size: int = 40  # images of the largest class
    tail_exponent: float = 1.3  # class size ~ head_size * rank^-exponent, at least 2
    test_per_class: float = 0.9  # mean extra photos per class in test (only some classes get them)
    test_class_share: float = 0.6
    distractor_share: float = 0.6  # of the test set
    index_class_share: float = 0.4
    index_per_class: int = 3
    index_distractors: int = 150
    image_size: int = 384  # stored size: GLDv2 photos are 300-800 px, and local features need pixels
    scene_size: int = 512  # the scene is drawn at 128 px, enlarged to this and given its texture
    texture: float = 0.05  # contrast of the scene's own fine texture (stone, brick, foliage)
    difficulty: float = 1.0
    public_share: float = 0.5
    seed: int = 0


def _colour(rng: np.random.Generator, dark: bool = False) -> tuple[int, int, int]:
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(60, 255), rng.integers(40 if dark else 90, 255)]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def render_scene(seed: int) -> np.ndarray:
    """The canonical view of one place, deterministic in its seed."""
    rng = np.random.default_rng(seed)
    img = np.zeros((CANVAS, CANVAS, 3), np.uint8)
    horizon = int(rng.uniform(0.55, 0.8) * CANVAS)
    top, bottom = np.array(_colour(rng)), np.array(_colour(rng))
    t = np.linspace(0, 1, horizon)[:, None, None]
    img[:horizon] = (top * (1 - t) + bottom * t).astype(np.uint8)
    img[horizon:] = _colour(rng, dark=True)
    if rng.random() < 0.5:  # a sun or moon
        cv2.circle(img, (int(rng.uniform(10, 118)), int(rng.uniform(8, 40))), int(rng.uniform(5, 12)), _colour(rng), -1)
    for _ in range(int(rng.integers(3, 7))):
        kind = rng.choice(["building", "tower", "dome", "roof", "arch", "stripes"])
        colour, accent = _colour(rng), _colour(rng)
        x = int(rng.uniform(0, CANVAS - 20))
        w = int(rng.uniform(14, 50))
        h = int(rng.uniform(20, horizon - 5))
        y0 = horizon - h
        if kind in ("building", "stripes"):
            cv2.rectangle(img, (x, y0), (x + w, horizon), colour, -1)
            if kind == "building":
                step_x, step_y = int(rng.integers(4, 9)), int(rng.integers(5, 10))
                for wy in range(y0 + 3, horizon - 4, step_y):
                    for wx in range(x + 2, x + w - 3, step_x):
                        cv2.rectangle(img, (wx, wy), (wx + step_x // 2, wy + step_y // 2), accent, -1)
            else:
                step = int(rng.integers(3, 7))
                for sx in range(x, x + w, 2 * step):
                    cv2.rectangle(img, (sx, y0), (min(sx + step, x + w), horizon), accent, -1)
        elif kind == "tower":
            tw = max(6, w // 3)
            cv2.rectangle(img, (x, y0), (x + tw, horizon), colour, -1)
            cv2.fillPoly(
                img, [np.int32([[x - 3, y0], [x + tw + 3, y0], [x + tw // 2, y0 - int(rng.uniform(8, 25))]])], accent
            )
        elif kind == "dome":
            cv2.rectangle(img, (x, horizon - h // 2), (x + w, horizon), colour, -1)
            cv2.ellipse(
                img, (x + w // 2, horizon - h // 2), (w // 2, int(w * rng.uniform(0.3, 0.7))), 0, 180, 360, accent, -1
            )
        elif kind == "roof":
            cv2.fillPoly(img, [np.int32([[x, horizon], [x + w, horizon], [x + w // 2, y0]])], colour)
            cv2.line(img, (x + w // 2, y0), (x + w // 2, horizon), accent, 2)
        else:  # arch
            cv2.rectangle(img, (x, y0), (x + w, horizon), colour, -1)
            cv2.ellipse(img, (x + w // 2, horizon), (max(3, w // 3), max(4, h // 2)), 0, 180, 360, accent, -1)
    return img


def textured(scene: np.ndarray, seed: int, size: int, strength: float) -> np.ndarray:
    """The 128-px scene enlarged to `size` and multiplied by a fixed texture of its own: noise at
    three scales (2-12 px blobs), so that each place has the fine, repeatable detail local
    features match on, as a real facade has. Deterministic in the seed."""
    rng = np.random.default_rng([seed, 7])
    big = cv2.resize(scene, (size, size), interpolation=cv2.INTER_NEAREST)
    field = np.zeros((size, size), np.float32)
    for cell, weight in ((2, 0.3), (5, 0.4), (12, 0.3)):
        coarse = rng.standard_normal((size // cell + 1, size // cell + 1)).astype(np.float32)
        field += weight * cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    field /= field.std() + 1e-6
    factor = np.clip(1.0 + strength * field, 0.3, 1.7)[..., None]
    return np.clip(big.astype(np.float32) * factor, 0, 255).astype(np.uint8)


def take_photo(scene: np.ndarray, rng: np.random.Generator, out_size: int, difficulty: float) -> np.ndarray:
    """One photo: the scene under a random homography, drawn straight at `out_size` px."""
    matrix = random_homography(
        rng,
        scene.shape[0],
        rotate=12 * difficulty,
        scale=(1 - 0.2 * difficulty, 1 + 0.35 * difficulty),
        shift=0.1 * difficulty,
        perspective=0.08 * difficulty,
    )
    to_output = np.diag([out_size / scene.shape[1], out_size / scene.shape[0], 1.0])
    img = cv2.warpPerspective(
        scene, to_output @ matrix, (out_size, out_size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT101
    )
    img = lighting(rng, img, difficulty)
    img = occlude(rng, img, probability=0.5 * difficulty, max_area=0.2)
    return blur_and_noise(rng, img, difficulty)


def _image_id(seed: int, kind: str, n: int) -> str:
    return hashlib.sha1(f"{seed}-{kind}-{n}".encode()).hexdigest()[:16]


def class_sizes(params: LandmarkDemoParams, rng: np.random.Generator) -> np.ndarray:
    ranks = np.arange(1, params.n_classes + 1)
    sizes = np.maximum(2, np.round(params.head_size * ranks**-params.tail_exponent)).astype(int)
    sizes += (rng.random(params.n_classes) < 0.5) * rng.integers(0, 4, params.n_classes) * (sizes < 6)
    return sizes


def generate(root: Path, params: LandmarkDemoParams) -> dict:
    """Write the demo competition under root (which must not exist yet); returns its statistics."""
    rng = np.random.default_rng(params.seed)
    sizes = class_sizes(params, rng)
    labels = [str(1000 + 7 * c) for c in range(params.n_classes)]
    scene_seeds = rng.integers(0, 2**31, params.n_classes)
    jobs: list[tuple[str, str, int | None, str]] = []  # (role, id, class index or None, distractor seed)
    counter = 0

    def add(role: str, cls: int | None, seed_text: str = "") -> None:
        nonlocal counter
        counter += 1
        jobs.append((role, _image_id(params.seed, role, counter), cls, seed_text))

    for c, n in enumerate(sizes):
        for _ in range(n):
            add("train", c)
    test_classes = rng.choice(params.n_classes, int(params.test_class_share * params.n_classes), replace=False)
    for c in test_classes:
        for _ in range(max(1, rng.poisson(params.test_per_class / params.test_class_share))):
            add("test", int(c))
    n_landmark_test = sum(1 for j in jobs if j[0] == "test")
    n_distractors = int(round(n_landmark_test * params.distractor_share / (1 - params.distractor_share)))
    for _ in range(n_distractors):
        add("test", None)
    index_classes = rng.choice(params.n_classes, int(params.index_class_share * params.n_classes), replace=False)
    for c in index_classes:
        for _ in range(params.index_per_class):
            add("index", int(c))
    for _ in range(params.index_distractors):
        add("index", None)

    scenes = {}
    records = []
    for role, image_id, cls, _ in progress_bar(jobs, "landmark-demo", unit="img"):
        photo_rng = np.random.default_rng([params.seed, int(image_id, 16) % (2**32)])
        if cls is None:
            distractor_seed = int(photo_rng.integers(2**31, 2**32))  # a place of no class
            scene = textured(render_scene(distractor_seed), distractor_seed, params.scene_size, params.texture)
        else:
            if cls not in scenes:
                seed = int(scene_seeds[cls])
                scenes[cls] = textured(render_scene(seed), seed, params.scene_size, params.texture)
            scene = scenes[cls]
        image = take_photo(scene, photo_rng, params.image_size, params.difficulty)
        write_jpeg(root / role / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg", image)
        records.append({"id": image_id, "role": role, "label": labels[cls] if cls is not None else ""})

    return write_tables(root, pd.DataFrame(records), rng, params)


def write_tables(root: Path, frame: pd.DataFrame, rng: np.random.Generator, params: LandmarkDemoParams) -> dict:
    """train.csv, sample_submission.csv and both solutions of the written images (`frame`: id, role,
    label); returns the competition's statistics. `rng` draws each test image's Public/Private usage."""
    train = frame[frame.role == "train"]
    test = frame[frame.role == "test"].reset_index(drop=True)
    index = frame[frame.role == "index"]
    train[["id", "label"]].rename(columns={"label": "landmark_id"}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": test["id"], "landmarks": ""}).to_csv(root / "sample_submission.csv", index=False)
    usage = np.where(rng.random(len(test)) < params.public_share, "Public", "Private")
    pd.DataFrame({"id": test["id"], "landmarks": test["label"], "Usage": usage}).to_csv(
        root / "solution.csv", index=False
    )
    index_by_label = index[index.label != ""].groupby("label")["id"].apply(lambda s: " ".join(sorted(s)))
    relevant = test["label"].map(index_by_label).fillna("")
    retrieval_usage = np.where(relevant == "", "Ignored", usage)
    pd.DataFrame({"id": test["id"], "images": relevant, "Usage": retrieval_usage}).to_csv(
        root / "retrieval_solution.csv", index=False
    )

    counts = train.groupby("label").size()
    return {
        "train_images": len(train),
        "classes": int(counts.size),
        "class_size_max": int(counts.max()),
        "class_size_median": float(counts.median()),
        "classes_with_2_to_5": float(((counts >= 2) & (counts <= 5)).mean()),
        "test_images": len(test),
        "test_distractor_share": float((test.label == "").mean()),
        "index_images": len(index),
        "index_distractor_share": float((index.label == "").mean()),
        "retrieval_scored_queries": int((relevant != "").sum()),
    }
