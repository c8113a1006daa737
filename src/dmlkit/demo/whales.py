"""The whale demo: fluke-like silhouettes, laid out like Humpback Whale Identification 2019.

Each individual has its own fluke outline (span, lobe shape, notches in the trailing edge) and
markings (white patches, scars); each image is a new photo of it in changing water, pose, crop
and colour. About 40% of the identified individuals have one training image; unidentified
animals are `new_whale`, and part of the test set shows individuals never seen in training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ..runtime import progress_bar
from .photo import blur_and_noise, finish, lighting, occlude, random_homography, warp, write_jpeg

CANVAS = 128


@dataclass(frozen=True)
class WhaleDemoParams:
    n_individuals: int = 250
    singleton_share: float = 0.4
    max_images: int = 8
    new_whale_train: int = 80
    test_share_of_known: float = 0.5  # identified individuals that get one test photo
    new_whale_test_share: float = 0.25  # of the test set: individuals never seen in training
    new_test_images: int = 1  # photos of each unseen individual in the test (>1: groups to cluster, AnimalCLEF 2026)
    image_size: int = 96
    difficulty: float = 0.7
    public_share: float = 0.5
    seed: int = 1


def individual(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "span": rng.uniform(0.36, 0.46),
        "depth": rng.uniform(0.10, 0.18),
        "sweep": rng.uniform(-0.05, 0.08),
        "tip": rng.uniform(0.02, 0.07),
        "notches": [(rng.uniform(-1, 1), rng.uniform(0.015, 0.05)) for _ in range(int(rng.integers(1, 5)))],
        "patches": [
            (
                rng.uniform(-0.9, 0.9),
                rng.uniform(0.1, 0.9),
                rng.uniform(0.05, 0.16),
                rng.uniform(0.03, 0.08),
                rng.uniform(0, 180),
            )
            for _ in range(int(rng.integers(3, 8)))
        ],
        "scars": [
            (rng.uniform(-0.9, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0, np.pi), rng.uniform(0.05, 0.2))
            for _ in range(int(rng.integers(0, 4)))
        ],
        "skin": int(rng.integers(15, 70)),
        "white": int(rng.integers(190, 250)),
    }


def _outline(ind: dict) -> np.ndarray:
    """Fluke polygon in canvas pixels: two lobes, a central notch, a notched trailing edge."""
    c = CANVAS / 2
    span, depth, sweep, tip = ind["span"] * CANVAS, ind["depth"] * CANVAS, ind["sweep"] * CANVAS, ind["tip"] * CANVAS
    xs = np.linspace(-1, 1, 61)
    leading = c - 0.25 * depth + sweep * xs**2 - depth * 0.6 * (1 - xs**2) ** 0.5  # upper edge
    trailing = c + depth * (1 - np.abs(xs)) ** 0.7 * 0.8 + tip * np.abs(xs) ** 4
    trailing[np.abs(xs) < 0.05] -= 0.35 * depth  # the central notch
    for position, size in ind["notches"]:
        trailing -= size * CANVAS * np.exp(-((xs - position) ** 2) / 0.002)
    upper = np.stack([c + xs * span, leading], 1)
    lower = np.stack([c + xs[::-1] * span, trailing[::-1]], 1)
    stem = np.array(
        [
            [c + 0.06 * span, c + depth],
            [c + 0.05 * span, CANVAS * 1.1],
            [c - 0.05 * span, CANVAS * 1.1],
            [c - 0.06 * span, c + depth],
        ]
    )
    return np.concatenate([upper, lower[:30], stem, lower[31:]]).astype(np.int32)


def render_fluke(ind: dict) -> np.ndarray:
    """The individual's fluke, BGRA on a transparent canvas."""
    img = np.zeros((CANVAS, CANVAS, 4), np.uint8)
    outline = _outline(ind)
    skin = ind["skin"]
    cv2.fillPoly(img, [outline], (skin, skin, skin + 10, 255))
    mask = img[..., 3].copy()
    marks = np.zeros((CANVAS, CANVAS, 3), np.uint8)
    c, span, depth = CANVAS / 2, ind["span"] * CANVAS, ind["depth"] * CANVAS
    for x, y, a, b, angle in ind["patches"]:
        centre = (int(c + x * span), int(c - 0.4 * depth + y * depth * 1.2))
        cv2.ellipse(marks, centre, (int(a * CANVAS), int(b * CANVAS)), angle, 0, 360, (ind["white"],) * 3, -1)
    for x, y, angle, length in ind["scars"]:
        p0 = np.array([c + x * span, c - 0.4 * depth + y * depth * 1.2])
        p1 = p0 + length * CANVAS * np.array([np.cos(angle), np.sin(angle)])
        cv2.line(marks, tuple(p0.astype(int)), tuple(p1.astype(int)), (ind["white"] - 40,) * 3, 2)
    painted = marks.max(axis=2) > 0
    img[..., :3][painted & (mask > 0)] = marks[painted & (mask > 0)]
    return img


def water(rng: np.random.Generator) -> np.ndarray:
    base = np.array([rng.uniform(90, 170), rng.uniform(70, 140), rng.uniform(30, 90)])  # BGR, blue-green
    t = np.linspace(0, 1, CANVAS)[:, None, None]
    img = base * (0.8 + 0.4 * t) + rng.normal(0, 1, (CANVAS, 1, 1)) * 12
    ripples = cv2.GaussianBlur(rng.normal(0, 25, (CANVAS, CANVAS)).astype(np.float32), (0, 0), 2.5)
    img = img + ripples[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def take_photo(fluke: np.ndarray, rng: np.random.Generator, out_size: int, difficulty: float) -> np.ndarray:
    matrix = random_homography(
        rng,
        CANVAS,
        rotate=15 * difficulty,
        scale=(1 - 0.15 * difficulty, 1 + 0.3 * difficulty),
        shift=0.08 * difficulty,
        perspective=0.1 * difficulty,
    )
    posed = warp(fluke, matrix, border=cv2.BORDER_CONSTANT)
    alpha = posed[..., 3:4].astype(np.float32) / 255.0
    img = (posed[..., :3] * alpha + water(rng) * (1 - alpha)).astype(np.uint8)
    for _ in range(int(rng.integers(0, 4 * difficulty + 1))):  # splashes
        centre = (int(rng.uniform(0, CANVAS)), int(rng.uniform(CANVAS * 0.6, CANVAS)))
        cv2.circle(img, centre, int(rng.uniform(2, 8)), (235, 235, 235), -1)
    img = lighting(rng, img, difficulty)
    img = occlude(rng, img, probability=0.2 * difficulty, max_area=0.1)
    img = blur_and_noise(rng, img, difficulty)
    return finish(img, out_size)


def _image_id(seed: int, n: int) -> str:
    return hashlib.sha1(f"whale-{seed}-{n}".encode()).hexdigest()[:12] + ".jpg"


def image_counts(params: WhaleDemoParams, rng: np.random.Generator) -> np.ndarray:
    counts = np.where(
        rng.random(params.n_individuals) < params.singleton_share,
        1,
        np.minimum(params.max_images, 2 + rng.geometric(0.55, params.n_individuals) - 1),
    )
    return counts


def generate(root: Path, params: WhaleDemoParams) -> dict:
    """Write the demo competition under root (Humpback 2019 layout); returns its statistics."""
    frame, rng = _photograph(root, params, "train", "test", species=None)
    train = frame[frame.role == "train"][["Image", "Id"]]
    test = frame[frame.role == "test"].reset_index(drop=True)
    train.to_csv(root / "train.csv", index=False)
    pd.DataFrame({"Image": test["Image"], "Id": "new_whale"}).to_csv(root / "sample_submission.csv", index=False)
    usage = _usage(rng, params, len(test))
    pd.DataFrame({"Image": test["Image"], "Id": test["Id"], "Usage": usage}).to_csv(root / "solution.csv", index=False)
    write_identities(root, test["Image"], test["identity"], usage)
    return _stats(train.rename(columns={"Id": "label"}), test.rename(columns={"Id": "label"}), "new_whale")


def write_identities(root: Path, images: pd.Series, identities: pd.Series, usage: np.ndarray) -> None:
    """identities.csv: each test image's true individual, unseen ones included (the solution calls them
    all new): the answer key of a test clustering (`./run.sh score clusters.csv identities.csv`)."""
    frame = pd.DataFrame({"image": images.to_numpy(), "identity": identities.to_numpy(), "Usage": usage})
    frame.to_csv(root / "identities.csv", index=False)


def _usage(rng: np.random.Generator, params: WhaleDemoParams, n: int) -> np.ndarray:
    """Public/Private per test row: the generator's draws after the photos' plan."""
    return np.where(rng.random(n) < params.public_share, "Public", "Private")


def _stats(train: pd.DataFrame, test: pd.DataFrame, unknown: str) -> dict:
    known = train[train.label != unknown].groupby("label").size()
    return {
        "train_images": len(train),
        "individuals": int(known.size),
        "singleton_share": float((known == 1).mean()),
        "images_per_individual_max": int(known.max()),
        "train_new_whale_share": float((train.label == unknown).mean()),
        "test_images": len(test),
        "test_new_whale_share": float((test.label == unknown).mean()),
    }


def _photograph(
    root: Path, params: WhaleDemoParams, train_folder: str, test_folder: str, species: np.ndarray | None
) -> tuple[pd.DataFrame, np.random.Generator]:
    """Every photo written: Image, Id, role (and species: `species[i]` of individual i, the unknown
    animals' drawn alike); and the plan's generator, which the Usage column continues. The draws of
    the Humpback layout are those it always made."""
    rng = np.random.default_rng(params.seed)
    counts = image_counts(params, rng)
    names = [f"w_{hashlib.sha1(f'{params.seed}-{i}'.encode()).hexdigest()[:7]}" for i in range(params.n_individuals)]
    jobs: list[tuple[str, int, str, int]] = []  # (role, individual seed, label, species index)
    ind_seeds = rng.integers(0, 2**31, params.n_individuals)
    kind = (lambda i: int(species[i])) if species is not None else (lambda i: -1)
    unknown_kind = np.random.default_rng([params.seed, 99])  # the unknown animals' species
    draw_kind = (lambda: int(unknown_kind.integers(len(SPECIES)))) if species is not None else (lambda: -1)
    for i, n in enumerate(counts):
        jobs += [("train", int(ind_seeds[i]), names[i], kind(i))] * int(n)
    for _ in range(params.new_whale_train):
        jobs.append(("train", int(rng.integers(2**31, 2**32)), UNKNOWN, draw_kind()))
    with_test = rng.random(params.n_individuals) < params.test_share_of_known
    for i in np.flatnonzero(with_test):
        jobs.append(("test", int(ind_seeds[i]), names[i], kind(i)))
    n_known_test = int(with_test.sum())
    n_new_test = int(round(n_known_test * params.new_whale_test_share / (1 - params.new_whale_test_share)))
    per_new = max(1, params.new_test_images)
    for _ in range(max(1, round(n_new_test / per_new)) if n_new_test else 0):
        jobs += [("test", int(rng.integers(2**31, 2**32)), UNKNOWN, draw_kind())] * per_new
    order = rng.permutation(len(jobs))
    jobs = [jobs[i] for i in order]

    flukes: dict[tuple[int, int], np.ndarray] = {}
    folders = {"train": train_folder, "test": test_folder}
    records = []
    for n, (role, ind_seed, label, species_index) in enumerate(progress_bar(jobs, "whale-demo", unit="img")):
        if (ind_seed, species_index) not in flukes:
            flukes[ind_seed, species_index] = render_fluke(individual_of(ind_seed, species_index))
        image_id = _image_id(params.seed, n)
        fluke, photo_rng = flukes[ind_seed, species_index], np.random.default_rng([params.seed, n])
        # the true individual (identities.csv): an unknown animal's own, which the labels do not tell
        record = {
            "Image": image_id,
            "Id": label,
            "role": role,
            "identity": label if label != UNKNOWN else f"unseen-{ind_seed:x}",
        }
        if getattr(params, "wide_shots", False):  # the Happywhale variant's wide shots, with the animal's box
            other_seed = int(ind_seeds[photo_rng.integers(len(ind_seeds))])
            other = render_fluke(individual_of(other_seed, int(photo_rng.integers(len(SPECIES)))))
            photo, record["box"], record["other_box"] = wide_photo(fluke, other, photo_rng, params)
        else:
            photo = take_photo(fluke, photo_rng, params.image_size, params.difficulty)
        write_jpeg(root / folders[role] / image_id, photo)
        if species_index >= 0:
            record["species"] = SPECIES[species_index]
        records.append(record)
    return pd.DataFrame(records), rng


UNKNOWN = "new_whale"  # the generator's unknown animal (the Happywhale layout writes new_individual)
# Happywhale-layout species, each with its look: humpback flukes carry many marks; a blue whale's
# are wider, darker and carry fewer; a beluga's are small, pale and low in contrast (hardest to tell apart).
SPECIES = ("humpback_whale", "blue_whale", "beluga")
SPECIES_SHARES = (0.5, 0.3, 0.2)


def individual_of(seed: int, species_index: int) -> dict:
    """The individual's look, changed by its species (−1: none, the Humpback demo's own)."""
    ind = individual(seed)
    if species_index < 0 or SPECIES[species_index] == "humpback_whale":
        return ind
    rng = np.random.default_rng([seed, species_index])
    if SPECIES[species_index] == "blue_whale":
        return {
            **ind,
            "span": min(0.48, ind["span"] * 1.1),
            "skin": int(rng.integers(5, 30)),
            "patches": ind["patches"][:2],
            "white": int(rng.integers(150, 190)),
        }
    return {
        **ind,
        "span": ind["span"] * 0.85,
        "depth": ind["depth"] * 1.2,
        "skin": int(rng.integers(150, 185)),
        "white": int(rng.integers(205, 230)),
        "scars": [],
    }


@dataclass(frozen=True)
class HappywhaleDemoParams(WhaleDemoParams):
    """The whale demo in the Happywhale 2022 layout, with a species column: every training image
    identified (no unknown rows), unseen individuals in the test. With `wide_shots`, each photo is a
    scene of `image_size` px where the animal covers 10–60% of the frame (a second animal in a
    fifth of them), and boxes.csv holds two detectors' boxes: `fullbody` (tight, misses 5%) and
    `fullbody2` (loose; 15% of its boxes on the wrong animal or on water, misses 10%)."""

    new_whale_train: int = 0
    wide_shots: bool = False


def _paste(scene: np.ndarray, posed: np.ndarray, side: int, x: int, y: int) -> tuple[int, int, int, int] | None:
    """The RGBA subject resized to side × side and blended in at (x, y); its visible box, or None."""
    small = cv2.resize(posed, (side, side), interpolation=cv2.INTER_AREA)
    h, w = scene.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + side), min(h, y + side)
    part = small[y0 - y : y1 - y, x0 - x : x1 - x]
    alpha = part[..., 3:4].astype(np.float32) / 255.0
    scene[y0:y1, x0:x1] = (part[..., :3] * alpha + scene[y0:y1, x0:x1] * (1 - alpha)).astype(np.uint8)
    ys, xs = np.nonzero(part[..., 3] > 127)
    return (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1) if len(xs) else None


def wide_photo(
    fluke: np.ndarray, other: np.ndarray, rng: np.random.Generator, params: WhaleDemoParams
) -> tuple[np.ndarray, tuple | None, tuple | None]:
    """A wide shot: the animal at 10–60% of the frame's area somewhere in the water (sometimes a
    second animal beside it); the photo, the animal's box and the other animal's (None: none)."""
    size, d = params.image_size, params.difficulty
    scene = cv2.resize(water(rng), (size, size), interpolation=cv2.INTER_LINEAR)
    pose = lambda: random_homography(rng, CANVAS, 15 * d, (0.9, 1.1), 0.02, 0.1 * d)  # noqa: E731
    other_box = None
    if rng.random() < 0.2:
        side = int(size * rng.uniform(0.25, 0.45))
        posed = warp(other, pose(), border=cv2.BORDER_CONSTANT)
        other_box = _paste(scene, posed, side, *rng.integers(0, size - side, 2))
    side = int(size * np.sqrt(rng.uniform(0.1, 0.6)))
    box = _paste(scene, warp(fluke, pose(), border=cv2.BORDER_CONSTANT), side, *rng.integers(0, size - side + 1, 2))
    scene = lighting(rng, scene, d)
    scene = blur_and_noise(rng, scene, d)
    return scene, box, other_box


def detector_boxes(frame: pd.DataFrame, seed: int, size: int) -> pd.DataFrame:
    """Two detectors' boxes of each photo's animal: `fullbody` tight (±3% jitter, misses 5%) and
    `fullbody2` loose (+25%, ±8% jitter; 15% wrong: the other animal or water; misses 10%)."""
    rng = np.random.default_rng([seed, 97])
    rows = []
    for image, box, other in zip(frame["Image"], frame["box"], frame["other_box"], strict=True):
        if box is None:
            continue
        x1, y1, x2, y2 = box
        w, h = x2 - x1, y2 - y1
        if rng.random() >= 0.05:
            jitter = rng.uniform(-0.03, 0.03, 4) * [w, h, w, h]
            rows.append((image, *_clip(np.array([x1, y1, x2, y2]) + jitter, size), "fullbody"))
        if rng.random() >= 0.10:
            if rng.random() < 0.15:
                wrong = other if other is not None else (*(xy := rng.uniform(0, size * 0.6, 2)), *(xy + size * 0.35))
                x1, y1, x2, y2 = wrong
                w, h = x2 - x1, y2 - y1
            loose = np.array([x1 - 0.25 * w, y1 - 0.25 * h, x2 + 0.25 * w, y2 + 0.25 * h])
            rows.append((image, *_clip(loose + rng.uniform(-0.08, 0.08, 4) * [w, h, w, h], size), "fullbody2"))
    return pd.DataFrame(rows, columns=["image", "x1", "y1", "x2", "y2", "source"])


def _clip(box, size: int) -> tuple[int, int, int, int]:
    x1, y1 = (int(np.clip(v, 0, size - 2)) for v in box[:2])
    return x1, y1, int(np.clip(box[2], x1 + 1, size)), int(np.clip(box[3], y1 + 1, size))


def generate_happywhale(root: Path, params: HappywhaleDemoParams) -> dict:
    """Write the demo competition under root (Happywhale 2022 layout); returns its statistics."""
    species = np.random.default_rng([params.seed, 98]).choice(len(SPECIES), params.n_individuals, p=SPECIES_SHARES)
    frame, rng = _photograph(root, params, "train_images", "test_images", species)
    frame["Id"] = frame["Id"].replace(UNKNOWN, "new_individual")
    train = frame[frame.role == "train"]
    test = frame[frame.role == "test"].reset_index(drop=True)
    train_csv = pd.DataFrame({"image": train["Image"], "species": train["species"], "individual_id": train["Id"]})
    train_csv.to_csv(root / "train.csv", index=False)
    sample = pd.DataFrame({"image": test["Image"], "predictions": "new_individual"})
    sample.to_csv(root / "sample_submission.csv", index=False)
    usage = _usage(rng, params, len(test))
    solution = pd.DataFrame({"image": test["Image"], "individual_id": test["Id"], "Usage": usage})
    solution.to_csv(root / "solution.csv", index=False)
    write_identities(root, test["Image"], test["identity"], usage)
    if params.wide_shots:
        detector_boxes(frame, params.seed, params.image_size).to_csv(root / "boxes.csv", index=False)
    stats = _stats(train.rename(columns={"Id": "label"}), test.rename(columns={"Id": "label"}), "new_individual")
    stats["species"] = {name: int((train["species"] == name).sum()) for name in SPECIES}
    return stats
