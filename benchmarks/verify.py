"""Local-feature verification (retrieve.verify): SIFT features per second per core, verified pairs
per second per core, feature cache bytes per image, and the GLDv2 test extrapolated to 16 cores.

The photos are perspective views of scikit-learn's two bundled sample photos (640×427, no
download), written as JPEGs at `--photo-size`: two views of one photo are a matching pair, views
of the two photos an unrelated one. Per-core figures run in this process with one OpenCV thread;
the pool figures run the stage's own code (`ensure_features`, `verify_shortlists`) on every core,
process start-up included.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from common import report
from threadpoolctl import threadpool_limits

from dmlkit.config import VerifyConfig
from dmlkit.retrieval.learned import aliked_features, lightglue_pairs, load_aliked, load_lightglue
from dmlkit.retrieval.local import homography_inliers, root_sift, verify_pair
from dmlkit.retrieval.verify import (
    FeatureStore,
    ensure_features,
    extract,
    read_for_features,
    verify_shortlists,
    worker_count,
)

GLDV2_TEST_QUERIES = 117_577  # GLDv2 recognition test images
GLDV2_TOP_K = 10


def sample_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [cv2.cvtColor(image, cv2.COLOR_RGB2BGR) for image in load_sample_images().images]


def perspective_view(photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """The photo seen from another place: corners moved by up to 12%, a turn of up to 15°, output `size` (w, h)."""
    h, w = photo.shape[:2]
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    moved = corners + rng.uniform(-0.12, 0.12, (4, 2)).astype(np.float32) * np.float32([w, h])
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-15, 15)), 1.0)
    moved = cv2.transform(moved[None], turn)[0]
    target = np.float32([[0, 0], [size[0], 0], [size[0], size[1]], [0, size[1]]])
    homography = cv2.getPerspectiveTransform(moved.astype(np.float32), target)
    return cv2.warpPerspective(photo, homography, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def write_views(folder: Path, count: int, photo_size: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """`count` JPEG views alternating between the sample photos; their paths and source photo."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    size = (photo_size, round(photo_size * 3 / 4))
    paths, source = [], np.arange(count) % len(photos)
    for i in range(count):
        path = folder / f"view-{i:04d}.jpg"
        cv2.imwrite(str(path), perspective_view(photos[source[i]], size, rng), [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(str(path))
    return paths, source


def per_core_extraction(paths: list[str], cfg: VerifyConfig) -> tuple[float, list, float]:
    """Images per second of decode + resize + SIFT on one core, the features, the mean keypoints."""
    cv2.setNumThreads(1)
    extract(paths[0], cfg.image_size, cfg.max_keypoints)  # warm-up
    start = time.perf_counter()
    features = [extract(path, cfg.image_size, cfg.max_keypoints) for path in paths]
    rate = len(paths) / (time.perf_counter() - start)
    return rate, features, float(np.mean([len(f) for f in features]))


def per_core_pairs(features: list, source: np.ndarray, cfg: VerifyConfig, pairs: int) -> dict[str, float]:
    """Pairs per second of ratio matching + MAGSAC on one core, for matching and unrelated pairs,
    and the inliers each gets (median)."""
    cv2.setNumThreads(1)
    rng = np.random.default_rng(1)
    out = {}
    for kind, same in (("matching", True), ("unrelated", False)):
        chosen = []
        while len(chosen) < pairs:
            a, b = rng.integers(0, len(features), 2)
            if a != b and (source[a] == source[b]) == same:
                chosen.append((a, b))
        roots = {i: root_sift(features[i].descriptors) for pair in chosen for i in pair}
        start = time.perf_counter()
        inliers = [
            verify_pair(features[a], features[b], cfg.ratio, cfg.ransac_threshold, roots[a], roots[b])
            for a, b in chosen
        ]
        out[f"{kind}_pairs_per_s"] = pairs / (time.perf_counter() - start)
        out[f"{kind}_median_inliers"] = float(np.median(inliers))
    return out


def pool_throughput(paths: list[str], cfg: VerifyConfig, folder: Path) -> dict[str, float]:
    """The stage's code on every core: images/s of ensure_features, pairs/s of verify_shortlists
    (every image a query against 40 others: enough tasks to spread), and the cache bytes per image
    it wrote. Both include the worker processes' start-up."""
    store = FeatureStore(folder)
    start = time.perf_counter()
    ensure_features(store, cfg, paths, progress=False)
    extract_s = time.perf_counter() - start
    rows = np.arange(len(paths))
    candidates = (rows[:, None] + np.arange(1, min(40, len(paths) - 1) + 1)[None, :]) % len(paths)
    start = time.perf_counter()
    verify_shortlists(store, cfg, np.array(paths, dtype=object), rows, candidates, progress=False)
    verify_s = time.perf_counter() - start
    cache = sum(f.stat().st_size for f in folder.rglob("*.npy"))
    return {
        "pool_images_per_s": len(paths) / extract_s,
        "pool_pairs_per_s": candidates.size / verify_s,
        "cache_bytes_per_image": cache / len(paths),
    }


def learned_speed(paths: list[str], source: np.ndarray, args: argparse.Namespace, folder: Path) -> dict:
    """ALIKED features and LightGlue matching (+ MAGSAC) on one core (torch on one thread), with weights
    saved from random models (no download here). Random LightGlue weights never stop early (its
    confidence heads are untrained), so every pair runs all 9 layers: the slowest case."""
    from kornia.feature import ALIKED, LightGlue  # kornia only for this mode

    torch.manual_seed(0)
    torch.save(ALIKED(model_name="aliked-n16").state_dict(), folder / "aliked.pth")
    torch.save(LightGlue(None, input_dim=128).state_dict(), folder / "lightglue.pth")
    torch.set_num_threads(1)
    extractor = load_aliked(str(folder / "aliked.pth"), torch.device("cpu"), "bench", args.max_keypoints)
    matcher = load_lightglue("aliked", str(folder / "lightglue.pth"), torch.device("cpu"), "bench")
    images = [read_for_features(path, args.image_size, channels=3) for path in paths]
    aliked_features(extractor, images[0], args.max_keypoints)  # warm-up
    start = time.perf_counter()
    features = [aliked_features(extractor, image, args.max_keypoints) for image in images]
    rate = len(images) / (time.perf_counter() - start)
    rng = np.random.default_rng(1)
    chosen = [tuple(rng.choice(len(features), 2, replace=False)) for _ in range(args.learned_pairs)]
    start = time.perf_counter()
    for a, b in chosen:
        pairs = lightglue_pairs(matcher, features[a], features[b], args.image_size)
        if len(pairs):
            homography_inliers(features[a].keypoints[pairs[:, 0]], features[b].keypoints[pairs[:, 1]], 5.0)
    pair_rate = len(chosen) / (time.perf_counter() - start)
    return {
        "extractor": "aliked-n16 (random weights)",
        "matcher": "lightglue (random weights)",
        "image_size": args.image_size,
        "max_keypoints": args.max_keypoints,
        "mean_keypoints": round(float(np.mean([len(f) for f in features]))),
        "images_per_s_per_core": round(rate, 2),
        "pairs_per_s_per_core": round(pair_rate, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench verify")
    parser.add_argument("--quick", action="store_true", help="fewer photos and pairs")
    parser.add_argument("--photo-size", type=int, default=800, help="stored width of the photos (px)")
    parser.add_argument("--image-size", type=int, default=512, help="retrieve.verify.image_size")
    parser.add_argument("--max-keypoints", type=int, default=1000)
    parser.add_argument("--learned", action="store_true", help="ALIKED + LightGlue instead of SIFT + ratio test")
    parser.add_argument("--learned-pairs", type=int, default=40, help="LightGlue pairs timed (--learned)")
    args = parser.parse_args(argv)
    count, pairs = (24, 40) if args.quick else (96, 200)
    if args.learned:
        with tempfile.TemporaryDirectory() as tmp:
            paths, source = write_views(Path(tmp), min(count, 24), args.photo_size)
            row = learned_speed(paths, source, args, Path(tmp))
        report("verify-learned", [row], {"photos": f"{len(paths)} perspective views, JPEG {args.photo_size} px wide"})
        return 0
    cfg = VerifyConfig(enabled=True, image_size=args.image_size, max_keypoints=args.max_keypoints)
    with tempfile.TemporaryDirectory() as tmp:
        paths, source = write_views(Path(tmp), count, args.photo_size)
        with threadpool_limits(1):  # numpy's BLAS on one core too, as in the stage's workers
            rate, features, keypoints = per_core_extraction(paths, cfg)
            pair_rates = per_core_pairs(features, source, cfg, pairs)
        pool = pool_throughput(paths, cfg, Path(tmp) / "cache")
    cores = worker_count(cfg)
    # a shortlist of 10 holds mostly unrelated candidates: time it as 1 matching + 9 unrelated
    mixed = 10 / (1 / pair_rates["matching_pairs_per_s"] + 9 / pair_rates["unrelated_pairs_per_s"])
    row = {
        "image_size": args.image_size,
        "max_keypoints": args.max_keypoints,
        "mean_keypoints": round(keypoints),
        "images_per_s_per_core": round(rate, 1),
        "matching_pairs_per_s_per_core": round(pair_rates["matching_pairs_per_s"], 1),
        "unrelated_pairs_per_s_per_core": round(pair_rates["unrelated_pairs_per_s"], 1),
        "shortlist_pairs_per_s_per_core": round(mixed, 1),
        "median_inliers_matching": pair_rates["matching_median_inliers"],
        "median_inliers_unrelated": pair_rates["unrelated_median_inliers"],
        f"pool_images_per_s_{cores}_cores": round(pool["pool_images_per_s"], 1),
        f"pool_pairs_per_s_{cores}_cores": round(pool["pool_pairs_per_s"], 1),
        "cache_kb_per_image": round(pool["cache_bytes_per_image"] / 1024, 1),
    }
    images = GLDV2_TEST_QUERIES * (1 + GLDV2_TOP_K)  # an upper bound: every candidate a distinct image
    pairs_total = GLDV2_TEST_QUERIES * GLDV2_TOP_K
    extract_h = images / (16 * rate) / 3600
    verify_h = pairs_total / (16 * mixed) / 3600
    notes = {
        "photos": f"{count} perspective views of sklearn's 2 sample photos, JPEG {args.photo_size} px wide",
        "shortlist_pairs_per_s_per_core": "1 matching + 9 unrelated candidates, the harmonic mix",
        "GLDv2 test on 16 cores (per-core rates × 16)": (
            f"{GLDV2_TEST_QUERIES:,} queries × top {GLDV2_TOP_K}: features of ≤ {images:,} images "
            f"{extract_h:.2f} h + {pairs_total:,} pairs {verify_h:.2f} h = {extract_h + verify_h:.2f} h; "
            f"cache ≤ {images * pool['cache_bytes_per_image'] / 2**30:.1f} GiB"
        ),
        "targets": "≥ 20 images/s per core at 512 px with 1,000 keypoints; ≥ 150 verified pairs/s per core",
    }
    report("verify", [row], notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
