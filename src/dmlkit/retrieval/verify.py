"""Local features for the shortlists' images, cached in shards, and their verification.

The cache lives in ``artifacts/local-features/<key>/`` where the key hashes the feature config
(extractor, size, keypoints) — not the experiment, so every experiment on the same images shares
it. Each image is keyed by its path, size and mtime (a replaced file is extracted again). A shard
is a folder of four .npy files (keys, offsets, keypoints, descriptors) written under a temporary
name and renamed, so an interrupted run leaves no half shard; reading memory-maps it, so
verifying a million pairs holds only the pages the current pairs touch.

SIFT extraction and ratio-test matching run in worker processes, one OpenCV and BLAS thread each; a
learned extractor (DISK or ALIKED through kornia) and the LightGlue matcher run in this process, on
the GPU where there is one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import torch
from threadpoolctl import threadpool_limits  # scikit-learn's dependency

from ..cache import canonical_json
from ..config import VerifyConfig
from ..data.images import UnreadableImageError, decode_image, jpeg_shape, read_image_bytes
from ..runtime import progress_bar
from .learned import aliked_features, disk_features, lightglue_pairs, load_aliked, load_disk, load_lightglue
from .local import LocalFeatures, fit_long_side, homography_inliers, sift_features, unit_descriptors, verify_pair

log = logging.getLogger(__name__)

FEATURES_VERSION = 1
TASK_QUERIES = 32  # queries per verification task


def feature_key(cfg: VerifyConfig) -> str:
    """What the features depend on (not the matching or fusion settings)."""
    payload = {"extractor": cfg.extractor, "size": cfg.image_size, "keypoints": cfg.max_keypoints}
    if cfg.extractor != "sift":
        hub = {"disk": "kornia:depth", "aliked": "kornia:aliked-n16"}[cfg.extractor]
        payload["weights"] = image_key(cfg.weights_file) if cfg.weights_file else hub
    payload["version"] = FEATURES_VERSION
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def image_key(path: str) -> str:
    try:
        st = os.stat(path)
        text = f"{os.path.abspath(path)}\t{st.st_size}\t{st.st_mtime_ns}"
    except OSError:
        text = f"{os.path.abspath(path)}\tmissing"
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def read_for_features(path: str, image_size: int, channels: int) -> np.ndarray | None:
    """The image decoded (JPEGs at a reduced size where that still covers `image_size`) with its
    longer side at most `image_size`; None when the file cannot be read (counted by the caller)."""
    try:
        data = read_image_bytes(path)
        shape = jpeg_shape(data)
        min_side = int(np.ceil(image_size * min(shape) / max(shape))) if shape else None
        image = decode_image(data, path, channels=channels, min_side=min_side)
    except UnreadableImageError:
        return None
    return fit_long_side(image[..., 0] if channels == 1 else image, image_size)


def extract(path: str, image_size: int, max_keypoints: int) -> LocalFeatures | None:
    """One image's SIFT features; None when the file cannot be read."""
    gray = read_for_features(path, image_size, channels=1)
    return None if gray is None else sift_features(gray, max_keypoints)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_extractor(cfg: VerifyConfig, where: str = "retrieve.verify"):
    """The learned extractor's model on the GPU when there is one (None for SIFT); its weights
    are fetched here, so a missing download stops the run before anything trains."""
    if cfg.extractor == "sift":
        return None
    if cfg.extractor == "aliked":
        return load_aliked(cfg.weights_file, _device(), where, cfg.max_keypoints)
    return load_disk(cfg.weights_file, _device(), where)


def load_matcher(cfg: VerifyConfig, where: str = "retrieve.verify"):
    """LightGlue for the extractor's features (None for the ratio test), fetched like the extractor."""
    if cfg.matcher == "ratio":
        return None
    return load_lightglue(cfg.extractor, cfg.matcher_weights_file, _device(), where)


def _learned_parts(cfg: VerifyConfig, paths: Sequence[str], chunk: int) -> Iterator[list[LocalFeatures | None]]:
    """A learned extractor in this process (its model on the GPU where there is one)."""
    model = load_extractor(cfg)
    features = aliked_features if cfg.extractor == "aliked" else disk_features
    for part in _chunks(paths, chunk):
        images = [read_for_features(path, cfg.image_size, channels=3) for path in part]
        yield [None if image is None else features(model, image, cfg.max_keypoints) for image in images]


class FeatureStore:
    """The shards of one feature config: which image keys they hold, and each one's features."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.where: dict[str, tuple[Path, int]] = {}  # key -> (shard, position)
        self._open: dict[Path, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for shard in sorted(self.folder.glob("shard-*")):
            if shard.is_dir() and not shard.name.endswith((".partial", ".broken")):
                keys = self._keys(shard)
                self.where.update({str(k): (shard, i) for i, k in enumerate(keys)})

    @staticmethod
    def _keys(shard: Path) -> np.ndarray:
        """The shard's image keys, when its four arrays read back and agree (offsets span the
        keypoints and descriptors); a damaged shard is renamed `.broken`, with a warning naming the
        file, and its images are extracted again."""

        def load(name: str, mmap_mode: str | None = "r") -> np.ndarray:
            try:
                return np.load(shard / f"{name}.npy", mmap_mode=mmap_mode)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{shard / name}.npy: {exc}") from None

        try:
            keys = load("keys", None)
            offsets, keypoints, descriptors = (load(name) for name in ("offsets", "keypoints", "descriptors"))
            if len(offsets) != len(keys) + 1 or not int(offsets[-1]) == len(keypoints) == len(descriptors):
                raise ValueError(f"{shard / 'offsets.npy'}: offsets do not span the keypoints and descriptors")
            return keys
        except (OSError, ValueError) as exc:
            os.replace(shard, shard.with_name(f"{shard.name}.{uuid.uuid4().hex[:6]}.broken"))
            log.warning("local features: %s is damaged (%s): set aside; its images are extracted again", shard, exc)
            return np.array([], dtype=str)

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
        # SIFT's uint8 or a learned extractor's float16 (an empty entry's uint8 does not demote it)
        np.save(partial / "descriptors.npy", np.concatenate([f.descriptors for f in features]))
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
    """One thread per worker for OpenCV and for numpy's BLAS (the descriptor products): with its
    default of every core, the workers' matmuls oversubscribe the machine (measured 2.2× slower)."""
    cv2.setNumThreads(1)
    threadpool_limits(1)


def _extract_chunk(paths: list[str], image_size: int, max_keypoints: int) -> list[LocalFeatures | None]:
    return [extract(p, image_size, max_keypoints) for p in paths]


def worker_count(cfg: VerifyConfig) -> int:
    return cfg.workers or len(os.sched_getaffinity(0))


def _pool(workers: int) -> ProcessPoolExecutor | nullcontext:
    """Worker processes (none for 0). Spawned, not forked: the parent holds faiss's and torch's
    thread pools."""
    if workers == 0:
        return nullcontext()
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def ensure_features(
    store: FeatureStore,
    cfg: VerifyConfig,
    paths: Sequence[str],
    progress: bool = True,
    keys: Sequence[str] | None = None,
) -> ExtractionCounts:
    """Extract the features of the images the store lacks, a shard at a time (`keys`: the paths'
    image keys, when the caller has them)."""
    counts = ExtractionCounts()
    keys = [image_key(path) for path in paths] if keys is None else keys
    wanted = dict(zip(keys, paths, strict=True))
    todo = {key: path for key, path in wanted.items() if key not in store}
    counts.reused = len(wanted) - len(todo)
    if not todo:
        return counts
    todo_keys, missing = list(todo), list(todo.values())
    workers = min(worker_count(cfg), max(1, len(missing) // 8))
    chunk = max(1, min(64, len(missing) // (4 * workers) or 1))
    done_keys: list[str] = []
    done: list[LocalFeatures] = []
    tasks = ((part, cfg.image_size, cfg.max_keypoints) for part in _chunks(missing, chunk))
    n_tasks = -(-len(missing) // chunk)
    with _pool(workers if cfg.extractor == "sift" else 0) as pool:
        parts = (
            _in_order(pool, _extract_chunk, tasks, 4 * workers)
            if pool is not None
            else _learned_parts(cfg, missing, chunk)
        )
        label = f"local features ({cfg.extractor}, {chunk} images a step)"
        for part in progress_bar(parts, label, progress, n_tasks):
            for features in part:
                key = todo_keys[len(done_keys)]
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
    folder: str, keys: list[str], queries: np.ndarray, candidates: np.ndarray, ratio: float, threshold: float
) -> np.ndarray:
    """Inliers (len(queries), top_k) for a few queries; `queries` and `candidates` index `keys`
    (-1: no candidate)."""
    store = _STORES.get(folder) or _STORES.setdefault(folder, FeatureStore(Path(folder)))
    out = np.zeros(candidates.shape, np.int32)
    for q, (query_at, row) in enumerate(zip(queries, candidates, strict=True)):
        query = store.get(keys[query_at])
        query_root = unit_descriptors(query.descriptors)
        for j, candidate_at in enumerate(row):
            if candidate_at >= 0:
                out[q, j] = verify_pair(query, store.get(keys[candidate_at]), ratio, threshold, query_root=query_root)
    return out


def _in_order(pool: ProcessPoolExecutor, fn, tasks: Iterable[tuple], window: int) -> Iterator:
    """fn(*task) for each task, in order, at most `window` in flight: Executor.map submits every
    task at once, which for 100k queries × 100 candidates would hold all their arguments."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.submit(fn, *task))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _verify_tasks(folder: str, keys: dict[int, str], query_rows, candidate_rows, cfg: VerifyConfig) -> Iterator[tuple]:
    """One task per TASK_QUERIES queries: their keys, and positions into them."""
    for start in range(0, len(query_rows), TASK_QUERIES):
        rows = query_rows[start : start + TASK_QUERIES]
        cands = candidate_rows[start : start + TASK_QUERIES]
        flat = np.concatenate([rows, cands.ravel()])
        used = np.unique(flat[flat >= 0])
        positions = np.where(flat >= 0, np.searchsorted(used, flat), -1)
        yield (
            folder,
            [keys[int(row)] for row in used],
            positions[: len(rows)],
            positions[len(rows) :].reshape(cands.shape),
            cfg.ratio,
            cfg.ransac_threshold,
        )


def verify_shortlists(
    store: FeatureStore,
    cfg: VerifyConfig,
    paths: np.ndarray,
    query_rows: np.ndarray,
    candidate_rows: np.ndarray,
    progress: bool = True,
) -> np.ndarray:
    """Inlier counts (Q, top_k) of each query row of `paths` against its candidate rows (Q, top_k;
    -1: none), the features of those images extracted first."""
    query_rows, candidate_rows = np.asarray(query_rows, np.int64), np.asarray(candidate_rows, np.int64)
    needed = np.unique(np.concatenate([query_rows, candidate_rows[candidate_rows >= 0]]))
    keys = {int(row): image_key(str(paths[row])) for row in needed}
    counts = ensure_features(store, cfg, [str(paths[row]) for row in needed], progress, list(keys.values()))
    log.info(
        "[verify] local features: %d reused from the cache, %d extracted (%d unreadable, %d without keypoints: "
        "their pairs count 0 inliers)",
        counts.reused,
        counts.extracted,
        counts.unreadable,
        counts.featureless,
    )
    if cfg.matcher == "lightglue":
        return _lightglue_shortlists(store, cfg, keys, query_rows, candidate_rows, progress)
    out = np.zeros(candidate_rows.shape, np.int32)
    tasks = _verify_tasks(str(store.folder), keys, query_rows, candidate_rows, cfg)
    n_tasks = -(-len(query_rows) // TASK_QUERIES)
    workers = min(worker_count(cfg), n_tasks) or 1
    with _pool(workers) as pool:
        parts = progress_bar(
            _in_order(pool, _verify_chunk, tasks, 4 * workers),
            f"verify ({TASK_QUERIES} queries a step)",
            progress,
            n_tasks,
        )
        for task, part in enumerate(parts):
            out[task * TASK_QUERIES : task * TASK_QUERIES + len(part)] = part
    return out


def _lightglue_shortlists(
    store: FeatureStore, cfg: VerifyConfig, keys: dict[int, str], query_rows, candidate_rows, progress: bool
) -> np.ndarray:
    """Inliers (Q, top_k) of LightGlue's matches under MAGSAC++'s homography, pair by pair in this
    process (the matcher on the GPU where there is one)."""
    model = load_matcher(cfg)
    out = np.zeros(candidate_rows.shape, np.int32)
    for q in progress_bar(range(len(query_rows)), "verify (LightGlue, a query a step)", progress, len(query_rows)):
        query = store.get(keys[int(query_rows[q])])
        for j, row in enumerate(candidate_rows[q]):
            if row < 0:
                continue
            candidate = store.get(keys[int(row)])
            pairs = lightglue_pairs(model, query, candidate, cfg.image_size)
            if len(pairs):
                out[q, j] = homography_inliers(
                    query.keypoints[pairs[:, 0]], candidate.keypoints[pairs[:, 1]], cfg.ransac_threshold
                )
    return out
