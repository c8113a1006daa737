"""New identities from the test itself: images grouped by their pairwise cosines, and a group that
holds a confidently known image takes that identity (AnimalCLEF 2026's best entry attached confident
test images to known individuals and graph-clustered the rest; its 9th place used average linkage
tuned on AMI, because tuning on ARI over-merged). Pure functions over arrays."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

LINKAGES = ("average", "single", "complete")


def merge_tree(sims: np.ndarray, method: str = "average") -> np.ndarray:
    """The agglomeration tree (scipy's linkage matrix) of n items from their (n, n) cosine matrix,
    merging by cosine distance 1 - cos; built once, cut at any threshold by `cut_tree`. average: a
    group's cosine to another is the mean of their pairs'; single: the best pair's (the connected
    components of the pairs at or above a threshold); complete: the worst pair's."""
    n = len(sims)
    if sims.shape != (n, n):
        raise ValueError(f"cluster_by_similarity needs a square similarity matrix, got {sims.shape}")
    if method not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {method!r}")
    distance = 1.0 - np.clip((sims + sims.T) / 2, -1.0, 1.0).astype(np.float64)
    np.fill_diagonal(distance, 0.0)
    return linkage(squareform(distance, checks=False), method=method)


def cut_tree(tree: np.ndarray, n: int, threshold: float) -> np.ndarray:
    """Cluster ids (0..c-1, by first appearance) where merges stop at cosine `threshold`: groups
    whose linkage cosine is at or above it are joined."""
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    return _first_appearance(fcluster(tree, t=1.0 - threshold + 1e-9, criterion="distance"))


def cluster_by_similarity(sims: np.ndarray, threshold: float, linkage: str = "average") -> np.ndarray:
    """Cluster ids (0..c-1, in order of first appearance) of n items from their (n, n) cosine matrix,
    agglomerated (see `merge_tree`) until the linkage's cosine between groups falls under `threshold`."""
    tree = merge_tree(sims, linkage) if len(sims) >= 2 else np.zeros((0, 4))
    return cut_tree(tree, len(sims), threshold)


def _first_appearance(ids: np.ndarray) -> np.ndarray:
    """Renumbers cluster ids 0, 1, ... in the order the items first show them (stable output)."""
    _, first = np.unique(ids, return_index=True)
    order = np.argsort(np.argsort(first))
    remap = dict(zip(np.unique(ids).tolist(), order.tolist(), strict=True))
    return np.array([remap[i] for i in ids.tolist()], dtype=np.int64)


def attach_known(clusters: np.ndarray, known: Sequence[str | None]) -> list[str | None]:
    """Per item, the identity its cluster takes: the most frequent confidently known identity among
    its members (ties: the one seen first), None where the cluster holds none."""
    if len(clusters) != len(known):
        raise ValueError(f"{len(clusters)} cluster ids for {len(known)} known answers")
    votes: dict[int, Counter] = {}
    for cluster, label in zip(clusters.tolist(), known, strict=True):
        if label is not None:
            votes.setdefault(cluster, Counter())[label] += 1
    winner = {cluster: count.most_common(1)[0][0] for cluster, count in votes.items()}
    return [winner.get(cluster) for cluster in clusters.tolist()]


def tune_cluster_threshold(
    sims: np.ndarray,
    truth: Sequence[str],
    grid: Sequence[float],
    score: Callable[[Sequence[str], np.ndarray], float],
    linkage: str = "average",
) -> tuple[float, float]:
    """The threshold of `grid` whose clustering of items with known identities `truth` scores best
    (`score(truth, clusters)`, e.g. AMI), with that score; ties go to the higher threshold."""
    tree = merge_tree(sims, linkage) if len(sims) >= 2 else np.zeros((0, 4))
    best = (float(grid[0]), -np.inf)
    for threshold in sorted(grid, reverse=True):
        value = score(truth, cut_tree(tree, len(sims), float(threshold)))
        if value > best[1]:
            best = (float(threshold), float(value))
    return best


__all__ = ["LINKAGES", "attach_known", "cluster_by_similarity", "cut_tree", "merge_tree", "tune_cluster_threshold"]
