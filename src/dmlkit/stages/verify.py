"""Local features for the shortlists' images, cached in shards, and their verification.

The cache lives in ``artifacts/local-features/<key>/`` where the key hashes the feature config
(extractor, size, keypoints) — not the experiment, so every experiment on the same images shares
it. Each image is keyed by its path, size and mtime (a replaced file is extracted again). A shard
is a folder of four .npy files (keys, offsets, keypoints, descriptors) written under a temporary
name and renamed, so an interrupted run leaves no half shard; reading memory-maps it, so
verifying a million pairs holds only the pages the current pairs touch.

Extraction and matching run in worker processes, one OpenCV thread each.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np

from ..cache import canonical_json
from ..config import VerifyConfig
from ..data.images import UnreadableImageError, decode_image, jpeg_shape, read_image_bytes
from ..retrieval.local import LocalFeatures, root_sift, sift_features, to_gray, verify_pair
from ..runtime import progress_bar

log = logging.getLogger(__name__)

FEATURES_VERSION = 1
TASK_QUERIES = 32  # queries per verification task


def feature_key(cfg: VerifyConfig) -> str:
    """What the features depend on (not the matching or fusion settings)."""
    payload = {"extractor": cfg.extractor, "size": cfg.image_size, "keypoints": cfg.max_keypoints}
    payload["version"] = FEATURES_VERSION
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def image_key(path: str) -> str:
    try:
        st = os.stat(path)
        text = f"{os.path.abspath(path)}\t{st.st_size}\t{st.st_mtime_ns}"
    except OSError:
        text = f"{os.path.abspath(path)}\tmissing"
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def extract(path: str, image_size: int, max_keypoints: int) -> LocalFeatures | None:
    """One image's features; None when the file cannot be read (counted by the caller)."""
    try:
        data = read_image_bytes(path)
        shape = jpeg_shape(data)
        min_side = int(np.ceil(image_size * min(shape) / max(shape))) if shape else None
        image = decode_image(data, path, channels=1, min_side=min_side)
    except UnreadableImageError:
        return None
    return sift_features(to_gray(image[..., 0], image_size), max_keypoints)


class FeatureStore:
    """The shards of one feature config: which image keys they hold, and each one's features."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.where: dict[str, tuple[Path, int]] = {}  # key -> (shard, position)
        self._open: dict[Path, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for shard in sorted(self.folder.glob("shard-*")):
            if shard.is_dir() and not shard.name.endswith(".partial"):
                keys = np.load(shard / "keys.npy")
                self.where.update({str(k): (shard, i) for i, k in enumerate(keys)})

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def add(self, keys: Sequence[str], features: Sequence[LocalFeatures]) -> Path:
        """Write one shard of these images' features."""
        counts = np.array([len(f) for f in features], np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        partial = self.folder / f"shard-{uuid.uuid4().hex[:12]}.partial"
        partial.mkdir(parents=True)
        np.save(partial / "keys.npy", np.array(keys, dtype=str))
        np.save(partial / "offsets.npy", offsets)
        np.save(partial / "keypoints.npy", np.concatenate([f.keypoints for f in features]).astype(np.float32))
        np.save(partial / "descriptors.npy", np.concatenate([f.descriptors for f in features]).astype(np.uint8))
        final = partial.with_name(partial.name.removesuffix(".partial"))
        partial.rename(final)
        self.where.update({k: (final, i) for i, k in enumerate(keys)})
        return final

    def get(self, key: str) -> LocalFeatures:
        shard, position = self.where[key]
        if shard not in self._open:
            self._open[shard] = tuple(
                np.load(shard / f"{name}.npy", mmap_mode="r") for name in ("offsets", "keypoints", "descriptors")
            )
        offsets, keypoints, descriptors = self._open[shard]
        start, end = int(offsets[position]), int(offsets[position + 1])
        return LocalFeatures(np.asarray(keypoints[start:end]), np.asarray(descriptors[start:end]))


@dataclass
class ExtractionCounts:
    reused: int = 0
    extracted: int = 0
    unreadable: int = 0
    featureless: int = 0


def _worker_init() -> None:
    cv2.setNumThreads(1)


def _extract_chunk(paths: list[str], image_size: int, max_keypoints: int) -> list[LocalFeatures | None]:
    return [extract(p, image_size, max_keypoints) for p in paths]


def worker_count(cfg: VerifyConfig) -> int:
    return cfg.workers or len(os.sched_getaffinity(0))


def _pool(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: the parent holds faiss's and torch's thread pools
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def ensure_features(
    store: FeatureStore, cfg: VerifyConfig, paths: Sequence[str], progress: bool = True
) -> ExtractionCounts:
    """Extract the features of the images the store lacks, a shard at a time."""
    counts = ExtractionCounts()
    wanted = {image_key(path): path for path in paths}
    todo = {key: path for key, path in wanted.items() if key not in store}
    counts.reused = len(wanted) - len(todo)
    if not todo:
        return counts
    keys, missing = list(todo), list(todo.values())
    workers = min(worker_count(cfg), max(1, len(missing) // 8))
    chunk = max(1, min(64, len(missing) // (4 * workers) or 1))
    done_keys: list[str] = []
    done: list[LocalFeatures] = []
    tasks = list(_chunks(missing, chunk))
    with _pool(workers) as pool:
        jobs = pool.map(_extract_chunk, tasks, [cfg.image_size] * len(tasks), [cfg.max_keypoints] * len(tasks))
        for part in progress_bar(jobs, f"local features ({chunk} images a step)", progress, len(tasks)):
            for features in part:
                key = keys[len(done_keys)]
                if features is None:
                    counts.unreadable += 1
                    features = LocalFeatures.empty()
                elif len(features) == 0:
                    counts.featureless += 1
                done_keys.append(key)
                done.append(features)
                if len(done) >= cfg.shard_images:
                    store.add(done_keys[-len(done) :], done)
                    done = []
    if done:
        store.add(done_keys[-len(done) :], done)
    counts.extracted = len(done_keys)
    return counts


_STORES: dict[str, FeatureStore] = {}


def _verify_chunk(
    folder: str, queries: list[str], candidates: list[list[str | None]], ratio: float, threshold: float
) -> np.ndarray:
    """Inliers (len(queries), top_k) for a few queries' candidate lists (None: no candidate)."""
    store = _STORES.get(folder) or _STORES.setdefault(folder, FeatureStore(Path(folder)))
    width = max((len(c) for c in candidates), default=0)
    out = np.zeros((len(queries), width), np.int32)
    for q, (query_key, row) in enumerate(zip(queries, candidates, strict=True)):
        query = store.get(query_key)
        query_root = root_sift(query.descriptors)
        for j, candidate_key in enumerate(row):
            if candidate_key is not None:
                out[q, j] = verify_pair(query, store.get(candidate_key), ratio, threshold, query_root=query_root)
    return out


def verify_shortlists(
    store: FeatureStore,
    cfg: VerifyConfig,
    query_paths: Sequence[str],
    candidate_paths: Sequence[Sequence[str | None]],
    progress: bool = True,
) -> np.ndarray:
    """Inlier counts (Q, top_k) of each query against its candidates, features extracted first."""
    wanted = list(query_paths) + [p for row in candidate_paths for p in row if p is not None]
    counts = ensure_features(store, cfg, wanted, progress)
    log.info(
        "[verify] local features: %d reused from the cache, %d extracted (%d unreadable, %d without keypoints: "
        "their pairs count 0 inliers)",
        counts.reused,
        counts.extracted,
        counts.unreadable,
        counts.featureless,
    )
    query_keys = [image_key(p) for p in query_paths]
    candidate_keys = [[None if p is None else image_key(p) for p in row] for row in candidate_paths]
    width = max((len(r) for r in candidate_keys), default=0)
    out = np.zeros((len(query_keys), width), np.int32)
    starts = list(range(0, len(query_keys), TASK_QUERIES))
    workers = min(worker_count(cfg), len(starts)) or 1
    with _pool(workers) as pool:
        jobs = pool.map(
            _verify_chunk,
            [str(store.folder)] * len(starts),
            [query_keys[s : s + TASK_QUERIES] for s in starts],
            [candidate_keys[s : s + TASK_QUERIES] for s in starts],
            [cfg.ratio] * len(starts),
            [cfg.ransac_threshold] * len(starts),
        )
        steps = zip(starts, jobs, strict=True)
        for start, part in progress_bar(steps, f"verify ({TASK_QUERIES} queries a step)", progress, len(starts)):
            out[start : start + len(part), : part.shape[1]] = part
    return out
