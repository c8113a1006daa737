"""Local features and geometric verification, as functions over arrays (no I/O).

SIFT keypoints with RootSIFT descriptors (Arandjelović & Zisserman 2012: L1-normalise, square
root, so that the Euclidean distance compares Hellinger kernels); ratio-test matching; the
inliers of a homography fitted by MAGSAC++ (``cv2.USAC_MAGSAC``). A pair without enough
features or matches, or one MAGSAC finds degenerate, has zero inliers: never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DESCRIPTOR_SIZE = 128
MIN_HOMOGRAPHY_MATCHES = 4


@dataclass(frozen=True)
class LocalFeatures:
    """One image's keypoints (n, 2) float32 in pixels of the extracted image, and descriptors
    (n, 128): SIFT's uint8 (OpenCV's values are integers in 0..255: stored exactly), or a learned
    extractor's float16."""

    keypoints: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.keypoints)

    @staticmethod
    def empty() -> LocalFeatures:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, DESCRIPTOR_SIZE), np.uint8))


def fit_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """The image resized (area-averaged) so that its longer side is `long_side`; never enlarged."""
    scale = long_side / max(image.shape[:2])
    if scale < 1.0:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def to_gray(image: np.ndarray, long_side: int) -> np.ndarray:
    """uint8 grey image whose longer side is at most `long_side` (see fit_long_side)."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return fit_long_side(gray, long_side)


def sift_features(gray: np.ndarray, max_keypoints: int) -> LocalFeatures:
    """The `max_keypoints` strongest SIFT keypoints of a grey image (none for a blank or tiny one)."""
    if gray.size == 0 or min(gray.shape[:2]) < 16:
        return LocalFeatures.empty()
    keypoints, descriptors = cv2.SIFT_create(nfeatures=max_keypoints).detectAndCompute(gray, None)
    if descriptors is None or not keypoints:
        return LocalFeatures.empty()
    points = np.array([kp.pt for kp in keypoints], np.float32).reshape(-1, 2)
    return LocalFeatures(points[:max_keypoints], np.clip(descriptors[:max_keypoints], 0, 255).astype(np.uint8))


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT: each descriptor L1-normalised then square-rooted (unit L2 norm), float32."""
    values = descriptors.astype(np.float32)
    values /= np.maximum(values.sum(axis=1, keepdims=True), 1e-7)
    return np.sqrt(values)


def unit_descriptors(descriptors: np.ndarray) -> np.ndarray:
    """The float32 unit vectors matching compares: RootSIFT of SIFT's uint8 descriptors, the
    learned (float) ones L2-normalised."""
    if descriptors.dtype == np.uint8:
        return root_sift(descriptors)
    values = descriptors.astype(np.float32)
    return values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-7)


def ratio_matches(query: np.ndarray, candidate: np.ndarray, ratio: float) -> np.ndarray:
    """(m, 2) index pairs (query row, candidate row) whose nearest candidate descriptor is closer
    than `ratio` × the second nearest (Lowe's test), on unit-norm descriptors (RootSIFT)."""
    if len(query) == 0 or len(candidate) < 2:
        return np.zeros((0, 2), np.int64)
    sims = query @ candidate.T
    rows = np.arange(len(sims))
    nearest = sims.argmax(axis=1)
    best = sims[rows, nearest]
    sims[rows, nearest] = -np.inf  # sims is ours: the runner-up is the row's maximum without it
    second = sims.max(axis=1)
    # squared distances of unit vectors: 2 - 2·cos
    keep = np.maximum(2 - 2 * best, 0) < (ratio**2) * np.maximum(2 - 2 * second, 0)
    rows = np.flatnonzero(keep)
    return np.stack([rows, nearest[rows]], axis=1).astype(np.int64)


def homography_inliers(
    query_points: np.ndarray, candidate_points: np.ndarray, threshold: float, max_iters: int = 2000
) -> int:
    """Inliers of the homography MAGSAC++ fits to these matched points; 0 where it finds none.

    OpenCV 4.12's USAC raises ``cv2.error (!model.empty())`` on degenerate point sets (all
    matches on one point or line) instead of returning no model: that is counted as 0."""
    if len(query_points) < MIN_HOMOGRAPHY_MATCHES:
        return 0
    try:
        model, mask = cv2.findHomography(
            query_points, candidate_points, cv2.USAC_MAGSAC, threshold, maxIters=max_iters, confidence=0.999
        )
    except cv2.error:
        return 0
    if model is None or mask is None:
        return 0
    return int(mask.sum())


def verify_pair(
    query: LocalFeatures,
    candidate: LocalFeatures,
    ratio: float,
    threshold: float,
    query_root: np.ndarray | None = None,
    candidate_root: np.ndarray | None = None,
) -> int:
    """The number of geometrically consistent matches between two images' features."""
    if len(query) < MIN_HOMOGRAPHY_MATCHES or len(candidate) < MIN_HOMOGRAPHY_MATCHES:
        return 0
    query_root = unit_descriptors(query.descriptors) if query_root is None else query_root
    candidate_root = unit_descriptors(candidate.descriptors) if candidate_root is None else candidate_root
    pairs = ratio_matches(query_root, candidate_root, ratio)
    if len(pairs) < MIN_HOMOGRAPHY_MATCHES:
        return 0
    return homography_inliers(query.keypoints[pairs[:, 0]], candidate.keypoints[pairs[:, 1]], threshold)
