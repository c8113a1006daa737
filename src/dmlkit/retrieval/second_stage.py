"""The second stage on each query's shortlist: local-feature verification and its fusion with
the global similarity, tuned on the validation queries and applied to the test shortlists.

Arrays in, arrays out: ``retrieve`` hands over the chain's ranked (sims, ids) and the table rows
of the queries and of the gallery; the inliers come from ``verify`` (the cached local features).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import VerifyConfig
from .fusion import (
    ADDITIVE_CAPS,
    ADDITIVE_WEIGHTS,
    STACK_FOLDS,
    CalibratedFusion,
    StackedFusion,
    additive_fusion,
    cross_fitted,
    resort,
    tune_additive,
)
from .verify import FeatureStore, verify_shortlists

log = logging.getLogger(__name__)

Verifier = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""(query rows, gallery rows, candidate ids (Q, top_k) into the gallery rows, -1: none) -> inliers (Q, top_k)."""


def shortlist_verifier(cfg: VerifyConfig, paths: np.ndarray, feature_folder: Path, progress: bool) -> Verifier:
    """Inlier counts of shortlisted pairs of these image paths, from the features cached in `feature_folder`."""
    store = FeatureStore(feature_folder)

    def verifier(query_rows: np.ndarray, gallery_rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        candidate_rows = np.where(ids >= 0, np.asarray(gallery_rows)[np.clip(ids, 0, None)], -1)
        return verify_shortlists(store, cfg, paths, np.asarray(query_rows), candidate_rows, progress)

    return verifier


@dataclass
class Fusion:
    """The global + local fusion tuned on validation, applied to the test shortlists."""

    kind: str
    weight: float = 0.0
    cap: float = 1.0
    calibrated: CalibratedFusion | StackedFusion | None = None
    gain: float | None = None  # the tuned grid point's validation score

    def __call__(self, sims: np.ndarray, ids: np.ndarray, inliers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The fused shortlists, re-sorted (sims, ids)."""
        if self.calibrated is not None:
            fused = self.calibrated(sims, inliers)
        else:
            fused = additive_fusion(sims, inliers, self.weight, self.cap)
        return resort(fused, ids)

    def on_validation(self, sims, ids, inliers, same) -> tuple[np.ndarray, np.ndarray]:
        """The fused validation shortlists the report scores: cross-fitted for the stacked trees
        (fitted on the very pairs they would score, they would report their own memory)."""
        if self.kind == "stacked":
            return resort(cross_fitted(sims, inliers, same), ids)
        return self(sims, ids, inliers)

    def describe(self) -> str:
        if self.kind == "stacked":
            return "stacked: gradient-boosted P(same) over cosine, rank, gap and inliers"
        if self.calibrated is not None:
            return "calibrated: isotonic P(same) of the cosine and of the inliers, averaged"
        return f"additive: w={self.weight:g}, cap={self.cap:g}"

    def tuned_on(self) -> str:
        if self.kind == "stacked":
            return f"cross-fitted on these queries, {STACK_FOLDS} folds"
        return "tuned on these queries"

    def to_json(self) -> dict:
        if self.calibrated is not None:
            return {"fusion": self.kind, **self.calibrated.to_json()}
        return {"fusion": self.kind, "weight": self.weight, "cap": self.cap, "validation_score": self.gain}


@dataclass
class SecondStage:
    """Verification of each query's shortlist and the fusion tuned on validation (None before)."""

    cfg: VerifyConfig
    verifier: Verifier
    fusion: Fusion | None = None

    def inliers(self, ids: np.ndarray, query_rows, gallery_rows, retrieval: bool) -> np.ndarray:
        return self.verifier(query_rows, gallery_rows, ids[:, : self.cfg.top_k_for(retrieval)])

    def apply(self, sims, ids, query_rows, gallery_rows, retrieval: bool) -> tuple[np.ndarray, np.ndarray]:
        if self.fusion is None:
            self.fusion = untuned_fusion(self.cfg)
        return self.fusion(sims, ids, self.inliers(ids, query_rows, gallery_rows, retrieval))


def untuned_fusion(cfg: VerifyConfig) -> Fusion:
    """Without validation queries: the configured additive fusion, else GLR2019 3rd's (w 1, cap 70)."""
    if cfg.fusion != "additive":
        raise ValueError(f"retrieve.verify.fusion '{cfg.fusion}' is fitted on validation pairs, and there are none")
    weight = 1.0 if cfg.weight == "tune" else float(cfg.weight)
    cap = 70.0 if cfg.cap == "tune" else float(cfg.cap)
    log.warning("retrieve: no validation queries to tune the fusion on; additive w=%g, cap=%g", weight, cap)
    return Fusion("additive", weight, cap)


def tune_fusion(
    cfg: VerifyConfig,
    sims: np.ndarray,
    ids: np.ndarray,
    inliers: np.ndarray,
    same: np.ndarray,
    score: Callable[[np.ndarray, np.ndarray], float],
) -> Fusion:
    """The fusion for these validation shortlists: the additive grid point whose re-sorted
    shortlists `score` best, or the isotonic calibrations fitted on the pairs (`same`: one class)."""
    if cfg.fusion == "calibrated":
        return Fusion("calibrated", calibrated=CalibratedFusion.fit(sims, inliers, same))
    verified = np.asarray(same)[:, : inliers.shape[1]]
    if cfg.fusion == "stacked" and verified.any() and not verified.all():
        return Fusion("stacked", calibrated=StackedFusion.fit(sims, inliers, same))
    if cfg.fusion == "stacked":  # found after training: a warning and the additive fusion, not a lost run
        log.warning("retrieve.verify.fusion 'stacked': the validation pairs are all of one kind; additive instead")
    weights = ADDITIVE_WEIGHTS if cfg.weight == "tune" else (float(cfg.weight),)
    caps = ADDITIVE_CAPS if cfg.cap == "tune" else (float(cfg.cap),)
    if cfg.weight != "tune" and float(cfg.weight) == 0.0:
        caps = caps[:1]
    weight, cap, value = tune_additive(sims, ids, inliers, score, weights, caps)
    return Fusion("additive", weight, cap, gain=value)


def median_inliers(inliers: np.ndarray, same: np.ndarray) -> tuple:
    """For the log: the median inliers of one-class pairs, their count, and the same for the others."""
    pos, neg = inliers[same], inliers[~same]
    return (np.median(pos) if len(pos) else np.nan), len(pos), (np.median(neg) if len(neg) else np.nan), len(neg)
