"""The pair classifier of the second stage (retrieve.verify.fusion: stacked): its features by hand,
that it learns a rule the additive and calibrated fusions cannot express, that its validation score
is cross-fitted (no query scored by trees that saw its pairs), and a run on the landmark demo."""

import numpy as np
import pandas as pd
import pytest

from conftest import run_all_stages, write_tiny_config
from dmlkit.config import ConfigError, VerifyConfig, load_config
from dmlkit.pipeline.checks import check_values
from dmlkit.pipeline.context import Context
from dmlkit.retrieval.fusion import PAIR_FEATURES, StackedFusion, cross_fitted, pair_features
from dmlkit.retrieval.second_stage import tune_fusion


def test_pair_features_by_hand():
    sims = np.array([[0.9, 0.7, 0.4], [0.5, 0.5, 0.2]], np.float32)
    inliers = np.array([[10, 40], [0, 0]])  # two verified columns; the third is not
    got = pair_features(sims, inliers)
    assert got.shape == (2, 3, len(PAIR_FEATURES))
    np.testing.assert_allclose(got[0, :, 0], [0.9, 0.7, 0.4])  # cosine
    np.testing.assert_allclose(got[1, :, 1], [0, 1, 2])  # rank
    np.testing.assert_allclose(got[0, :, 2], [0.0, -0.2, -0.5], atol=1e-6)  # gap to the row's best
    np.testing.assert_allclose(got[0, :, 3], [10, 40, 0])  # inliers (0 where not verified)
    np.testing.assert_allclose(got[0, :, 4], [0.25, 1.0, 0.0])  # share of the row's most
    np.testing.assert_allclose(got[1, :, 4], [0.0, 0.0, 0.0])  # a row without inliers: no division by 0
    np.testing.assert_allclose(got[:, :, 5], [[1, 1, 0], [1, 1, 0]])  # verified


def synthetic_shortlists(seed: int, rows: int = 300, k: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of one class have inliers in a band (15–30) that neither end shares: repeated structures
    give the wrong pairs of this set the most inliers (40–60), unrelated pairs few (0–8); the cosine
    says nothing. A monotone map of the inliers (calibrated) or a bonus growing with them (additive)
    cannot rank the band first; trees can."""
    rng = np.random.default_rng(seed)
    same = rng.random((rows, k)) < 0.3
    repeated = ~same & (rng.random((rows, k)) < 0.4)
    inliers = np.where(same, rng.integers(15, 31, (rows, k)), rng.integers(0, 9, (rows, k)))
    inliers = np.where(repeated, rng.integers(40, 61, (rows, k)), inliers)
    sims = -np.sort(-rng.uniform(0.3, 0.9, (rows, k)), axis=1).astype(np.float32)
    return sims, inliers, same


def top1_precision(sims: np.ndarray, ids: np.ndarray, same: np.ndarray) -> float:
    rows = np.arange(len(ids))
    return float(same[rows, ids[:, 0]].mean())


def test_stacked_fusion_ranks_what_a_monotone_fusion_cannot():
    sims, inliers, same = synthetic_shortlists(0)
    ids = np.broadcast_to(np.arange(sims.shape[1]), sims.shape).copy()
    score = lambda s, i: top1_precision(s, i, same)  # noqa: E731
    test_sims, test_inliers, test_same = synthetic_shortlists(1)
    results = {}
    for fusion in ("additive", "calibrated", "stacked"):
        tuned = tune_fusion(VerifyConfig(enabled=True, fusion=fusion), sims, ids, inliers, same, score)
        fused, order = tuned(test_sims, ids, test_inliers)
        results[fusion] = top1_precision(fused, order, test_same)
    best = float(test_same.any(axis=1).mean())  # a row without a pair of one class has none to put first
    assert results["stacked"] >= best - 0.02, results  # the band comes first on unseen rows
    assert results["stacked"] > max(results["additive"], results["calibrated"]) + 0.3, results


def test_stacked_validation_scores_are_cross_fitted():
    sims, inliers, same = synthetic_shortlists(2, rows=100)
    got = cross_fitted(sims, inliers, same, folds=5)
    held = np.arange(100) % 5 == 0
    model = StackedFusion.fit(sims[~held], inliers[~held], same[~held], seed=0)
    np.testing.assert_allclose(got[held], model(sims[held], inliers[held]), rtol=1e-6)
    in_sample = StackedFusion.fit(sims, inliers, same)(sims, inliers)
    assert not np.allclose(got, in_sample)  # the report does not score trees on their own pairs
    with pytest.raises(ValueError, match="pairs of one class and of two"):
        StackedFusion.fit(sims, inliers, np.zeros_like(same))


def test_validation_pairs_of_one_kind_fall_back_instead_of_failing_after_training(caplog):
    sims, inliers, same = synthetic_shortlists(3, rows=20)
    ids = np.broadcast_to(np.arange(sims.shape[1]), sims.shape).copy()
    score = lambda s, i: top1_precision(s, i, same)  # noqa: E731
    none_same = np.zeros_like(same)
    with caplog.at_level("WARNING"):
        tuned = tune_fusion(VerifyConfig(enabled=True, fusion="stacked"), sims, ids, inliers, none_same, score)
    assert tuned.kind == "additive" and "all of one kind" in caplog.text
    one_positive = np.zeros_like(same)
    one_positive[0, 0] = True  # only the first query (fold 0) has a pair of one class
    got = cross_fitted(sims, inliers, one_positive, folds=5)
    assert np.all(got[np.arange(20) % 5 == 0] == 0.0)  # the other folds hold negatives only: rate 0


def test_additive_settings_with_the_stacked_fusion_are_refused(tmp_path):
    overrides = ["retrieve.verify.enabled=true", "retrieve.verify.fusion=stacked", "retrieve.verify.weight=0.5"]
    ctx = Context(load_config(write_tiny_config(tmp_path, "landmark"), overrides), artifacts=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"retrieve\.verify\.weight: only retrieve\.verify\.fusion 'additive'"):
        check_values(ctx)


def test_stacked_fusion_runs_on_the_landmark_demo_with_a_cross_fitted_row(tmp_path):
    photos = {"image_size": 192, "scene_size": 256, "texture": 0.2}
    cfg = write_tiny_config(tmp_path, "landmark", demo_params=photos)
    verify = ["retrieve.verify.enabled=true", "retrieve.verify.image_size=192", "retrieve.verify.workers=2"]
    ctx = run_all_stages(cfg, tmp_path, [*verify, "retrieve.verify.fusion=stacked"])
    report = pd.read_csv(ctx.done["retrieve"].file("report.csv"))
    (row,) = report.step[report.step.str.startswith("+ verification")].tolist()
    assert "stacked" in row and "cross-fitted on these queries, 5 folds" in row
    tuned = ctx.done["retrieve"].manifest["result"]["tuned"]["verify"]
    assert tuned["fusion"] == "stacked" and tuned["features"] == list(PAIR_FEATURES)
    for name in ("tiny-landmark.csv", "tiny-landmark-retrieval.csv"):
        assert (tmp_path / "submissions" / name).is_file()
