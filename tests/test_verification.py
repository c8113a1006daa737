"""The second stage: local features, geometric verification, fusion, label-aware re-ranking."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import H, textured, warped
from dmlkit.config import VerifyConfig
from dmlkit.retrieval.fusion import (
    CalibratedFusion,
    Calibrator,
    additive_fusion,
    resort,
    tune_additive,
)
from dmlkit.retrieval.label_rerank import label_aware_rerank
from dmlkit.retrieval.local import (
    LocalFeatures,
    homography_inliers,
    ratio_matches,
    root_sift,
    sift_features,
    to_gray,
    unit_descriptors,
    verify_pair,
)
from dmlkit.retrieval.verify import FeatureStore, ensure_features, verify_shortlists


def test_homography_inliers_count_the_true_correspondences_among_outliers():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 300, (70, 2)).astype(np.float32)
    mapped = cv2.perspectiveTransform(points[None], H)[0]
    outliers = rng.uniform(0, 300, (30, 2)).astype(np.float32), rng.uniform(0, 300, (30, 2)).astype(np.float32)
    query, candidate = np.concatenate([points, outliers[0]]), np.concatenate([mapped, outliers[1]])
    assert 70 <= homography_inliers(query, candidate, threshold=3.0) <= 71


def test_degenerate_point_sets_count_zero_inliers_without_raising():
    same_point = np.full((20, 2), 5.0, np.float32)
    line = np.stack([np.arange(20), 2 * np.arange(20)], axis=1).astype(np.float32)
    assert homography_inliers(same_point, same_point + 3, 3.0) == 0
    assert homography_inliers(line, line + 1, 3.0) == 0
    assert homography_inliers(line[:3], line[:3], 3.0) == 0


def test_an_opencv_error_from_magsac_counts_zero_inliers(monkeypatch):
    """OpenCV 4.12's USAC raises `(!model.empty())` on some degenerate sets (findFundamentalMat
    does; findHomography returned None on every set tried here): either way, 0 inliers."""

    def raising(*args, **kwargs):
        raise cv2.error("OpenCV(4.12.0) usac: error: (-215:Assertion failed) !model.empty()")

    points = np.random.default_rng(0).uniform(0, 100, (10, 2)).astype(np.float32)
    monkeypatch.setattr(cv2, "findHomography", raising)
    assert homography_inliers(points, points + 1, 3.0) == 0


def test_a_pair_related_by_a_homography_verifies_and_unrelated_pairs_do_not():
    image = textured(1)
    query, same = sift_features(image, 800), sift_features(warped(image), 800)
    assert len(query) > 300
    inliers = verify_pair(query, same, ratio=0.8, threshold=5.0)
    others = [verify_pair(query, sift_features(textured(seed), 800), 0.8, 5.0) for seed in (2, 3, 4)]
    assert inliers > 150
    assert max(others) <= 10


def test_blank_and_tiny_images_have_no_features_and_zero_inliers():
    blank = sift_features(np.full((256, 256), 128, np.uint8), 500)
    tiny = sift_features(textured(1, 12), 500)
    assert len(blank) == 0 and len(tiny) == 0
    assert blank.descriptors.shape == (0, 128)
    assert verify_pair(blank, sift_features(textured(1), 500), 0.8, 5.0) == 0


def test_to_gray_shrinks_to_the_long_side_and_never_enlarges():
    assert to_gray(np.zeros((300, 600, 3), np.uint8), 200).shape == (100, 200)
    assert to_gray(np.zeros((30, 60), np.uint8), 200).shape == (30, 60)


def test_root_sift_by_hand():
    descriptors = np.zeros((1, 128), np.uint8)
    descriptors[0, :2] = [1, 3]
    out = root_sift(descriptors)
    np.testing.assert_allclose(out[0, :2], np.sqrt([0.25, 0.75]), rtol=1e-6)
    assert out[0, 2:].sum() == 0
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


def test_ratio_matches_equal_a_brute_force_lowe_test():
    rng = np.random.default_rng(3)
    a = root_sift(rng.integers(0, 255, (60, 128)).astype(np.uint8))
    b = root_sift(rng.integers(0, 255, (80, 128)).astype(np.uint8))
    # candidates ever further from their query, so distance ratios span the test's threshold
    noise = np.linspace(0.005, 0.06, 40, dtype=np.float32)[:, None]
    b[:40] = a[:40] + noise * rng.standard_normal((40, 128)).astype(np.float32)
    b[:40] /= np.linalg.norm(b[:40], axis=1, keepdims=True)
    dist = np.linalg.norm(a[:, None] - b[None], axis=2)
    order = np.argsort(dist, axis=1)
    first, second = dist[np.arange(60), order[:, 0]], dist[np.arange(60), order[:, 1]]
    ratios = first / second
    assert ((ratios > 0.64) & (ratios < 0.8)).sum() >= 3  # kept at 0.8, lost if compared squared
    assert (ratios[:40] >= 0.8).sum() >= 3  # some planted neighbours fail the test
    expected = [(i, order[i, 0]) for i in range(60) if first[i] < 0.8 * second[i]]
    got = ratio_matches(a, b, 0.8)
    assert [tuple(p) for p in got] == expected


def test_additive_fusion_by_hand():
    sims = np.array([[0.9, 0.8, 0.7]], np.float32)
    ids = np.array([[10, 11, 12]])
    inliers = np.array([[0, 40]])  # only the first two candidates were verified
    fused = additive_fusion(sims, inliers, weight=0.5, cap=20)
    np.testing.assert_allclose(fused, [[0.9, 1.3, 0.7]], rtol=1e-6)
    np.testing.assert_allclose(additive_fusion(sims, np.array([[10, 5]]), 0.5, 20), [[1.15, 0.925, 0.7]], rtol=1e-6)
    resorted_sims, resorted_ids = resort(fused, ids)
    assert resorted_ids.tolist() == [[11, 10, 12]]
    np.testing.assert_allclose(resorted_sims, [[1.3, 0.9, 0.7]], rtol=1e-6)


def test_calibrated_fusion_by_hand():
    iso = Calibrator.fit(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(iso(np.array([-5.0, 0.5, 1.5, 2.5, 9.0])), [0, 0, 0.5, 1, 1])
    sims = np.array([[0.9, 0.5], [0.6, 0.4]], np.float32)
    inliers = np.array([[2, 30], [0, 25]])
    same = np.array([[False, True], [False, True]])
    fusion = CalibratedFusion.fit(sims, inliers, same)
    # cosines: 0.9 and 0.6 are other-class, 0.5 and 0.4 same: isotonic pools all four at 0.5;
    # inliers separate them perfectly: 0 and 2 → 0, 25 and 30 → 1
    np.testing.assert_allclose(fusion(sims, inliers), [[0.25, 0.75], [0.25, 0.75]])
    # an unverified third candidate counts as 0 inliers
    wide = np.array([[0.9, 0.5, 0.45]], np.float32)
    np.testing.assert_allclose(fusion(wide, inliers[:1]), [[0.25, 0.75, 0.25]])


def test_tune_additive_keeps_weight_zero_unless_verification_helps():
    sims = np.array([[0.9, 0.8], [0.9, 0.8]], np.float32)
    ids = np.array([[0, 1], [0, 1]])

    def top1_is(right: int):
        return lambda s, i: float(np.mean(i[:, 0] == right))

    weight, _, score = tune_additive(sims, ids, np.array([[0, 50], [0, 50]]), top1_is(0))
    assert (weight, score) == (0.0, 1.0)
    weight, cap, score = tune_additive(sims, ids, np.array([[0, 50], [0, 50]]), top1_is(1), (0.0, 0.05, 0.2), (10, 70))
    # 0.05·min(50, cap)/cap stays below the 0.1 gap for either cap; 0.2 with cap 10 is the first to lift it
    assert (weight, cap, score) == (0.2, 10.0, 1.0)


def test_label_aware_rerank_by_hand():
    """Query 0 (label 0): the returned agreeing image 0 keeps its place among the agreeing ones
    (first), the missed 2 and 4 follow by cosine, then the others in the chain's order."""
    index_labels = np.array([0, 1, 0, 2, 0])
    rng = np.random.default_rng(0)
    index = rng.standard_normal((5, 4)).astype(np.float32)
    queries = rng.standard_normal((3, 4)).astype(np.float32)
    sims = np.array([[0.9, 0.8, 0.7]] * 3, np.float32)
    ids = np.array([[1, 0, 3]] * 3)
    query_labels = np.array([0, -1, 7])  # label 0; none; a label no index image has
    out_sims, out_ids = label_aware_rerank(sims, ids, query_labels, index_labels, queries, index, k=5)
    missed = np.array([2, 4])
    by_cosine = missed[np.argsort(-(index[missed] @ queries[0]))]
    assert out_ids[0].tolist() == [0, *by_cosine.tolist(), 1, 3]
    np.testing.assert_allclose(out_sims[0, :3], [0.8, *(index[by_cosine] @ queries[0])], rtol=1e-6)
    assert out_ids[1].tolist() == [1, 0, 3, -1, -1] and out_ids[2].tolist() == [1, 0, 3, -1, -1]
    assert np.isneginf(out_sims[1, 3])
    _, cut = label_aware_rerank(sims, ids, query_labels, index_labels, queries, index, k=2)
    assert cut[0].tolist() == [0, by_cosine[0]]


def test_members_by_label_groups_positions_like_a_scan_per_label():
    from dmlkit.retrieval.label_rerank import _members_by_label

    labels = np.random.default_rng(0).integers(-1, 7, 200)
    groups = _members_by_label(labels)
    assert sorted(groups) == sorted(set(labels[labels >= 0].tolist()))
    for label, positions in groups.items():
        np.testing.assert_array_equal(positions, np.flatnonzero(labels == label))


def test_label_aware_rerank_keeps_the_order_of_two_returned_agreeing_images():
    index_labels = np.array([0, 0, 1])
    index = np.eye(3, dtype=np.float32)
    queries = np.array([[1.0, 0.0, 0.0]], np.float32)  # cosine prefers 0, the chain put 1 first
    ids = np.array([[2, 1, 0]])
    sims = np.array([[0.9, 0.8, 0.7]], np.float32)
    _, out = label_aware_rerank(sims, ids, np.array([0]), index_labels, queries, index, k=3)
    assert out[0].tolist() == [1, 0, 2]


def test_features_are_cached_in_shards_and_reused_on_a_rerun(tmp_path, image_files):
    cfg = VerifyConfig(enabled=True, image_size=320, max_keypoints=600, workers=1, shard_images=2)
    folder = tmp_path / "features"
    paths = list(image_files.values())
    first = ensure_features(FeatureStore(folder), cfg, paths + paths[:2], progress=False)
    assert (first.extracted, first.reused, first.unreadable, first.featureless) == (5, 0, 1, 1)
    assert len(list(folder.glob("shard-*"))) == 3  # 5 images, 2 a shard
    assert not list(folder.glob("*.partial"))
    store = FeatureStore(folder)
    again = ensure_features(store, cfg, paths, progress=False)
    assert (again.extracted, again.reused) == (0, 5)
    from dmlkit.retrieval.verify import image_key

    cached = store.get(image_key(image_files["query"]))
    direct = sift_features(to_gray(cv2.imread(image_files["query"], cv2.IMREAD_GRAYSCALE), 320), 600)
    np.testing.assert_array_equal(cached.descriptors, direct.descriptors)
    np.testing.assert_allclose(cached.keypoints, direct.keypoints)


@pytest.mark.parametrize("task_queries", [32, 1])
def test_verify_shortlists_counts_inliers_and_zero_for_unreadable_or_missing(
    tmp_path, image_files, monkeypatch, task_queries
):
    """Rows of a path table; -1 is no candidate. With one query a task the rows are reassembled
    in their order."""
    monkeypatch.setattr("dmlkit.retrieval.verify.TASK_QUERIES", task_queries)
    cfg = VerifyConfig(enabled=True, image_size=320, max_keypoints=600, workers=2)
    store = FeatureStore(tmp_path / "features")
    names = ["query", "same", "other", "corrupt", "blank"]
    paths = np.array([image_files[name] for name in names], dtype=object)
    candidates = np.array([[1, 2, 3], [4, -1, 0], [2, 0, -1]])
    inliers = verify_shortlists(store, cfg, paths, np.array([0, 1, 0]), candidates, progress=False)
    assert inliers.shape == (3, 3)
    assert inliers[0, 0] > 100 and inliers[1, 2] > 100
    assert inliers[0, 1] <= 10 and inliers[2, 0] == inliers[0, 1]
    assert inliers[0, 2] == 0 and inliers[1, 0] == 0 and inliers[1, 1] == 0 and inliers[2, 2] == 0
    assert inliers[2, 1] > 100  # the query against itself


def test_empty_local_features_have_the_descriptor_width():
    empty = LocalFeatures.empty()
    assert len(empty) == 0 and empty.keypoints.shape == (0, 2)


# ------------------------------------------------------------------ learned features (kornia DISK)
@pytest.fixture
def disk_weights(tmp_path):
    """A randomly initialised DISK saved like kornia's checkpoint (no download here)."""
    import torch
    from kornia.feature import DISK

    torch.manual_seed(0)
    path = tmp_path / "disk-random.pth"
    torch.save({"extractor": DISK().state_dict()}, path)
    return str(path)


def test_unit_descriptors_root_sift_for_uint8_and_l2_for_learned():
    sift = np.array([[0, 4, 12], [1, 1, 2]], np.uint8)
    np.testing.assert_allclose(unit_descriptors(sift), root_sift(sift))
    learned = np.array([[3.0, 4.0, 0.0]], np.float16)
    np.testing.assert_allclose(unit_descriptors(learned), [[0.6, 0.8, 0.0]], rtol=1e-3)


def test_disk_features_from_a_local_weights_file(disk_weights):
    import torch

    from dmlkit.retrieval.learned import disk_features, load_disk

    model = load_disk(disk_weights, torch.device("cpu"), "test")
    rgb = np.repeat(textured(3, 96)[..., None], 3, axis=2)[:64]
    features = disk_features(model, rgb, max_keypoints=40)
    assert 0 < len(features) <= 40
    assert features.descriptors.dtype == np.float16 and features.descriptors.shape == (len(features), 128)
    np.testing.assert_allclose(np.linalg.norm(features.descriptors.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert (features.keypoints >= 0).all() and (features.keypoints[:, 0] < 96).all()
    assert (features.keypoints[:, 1] < 64).all()
    assert len(disk_features(model, rgb[:10, :10], 40)) == 0


def test_disk_weights_that_cannot_be_had_are_clear_errors(tmp_path, monkeypatch):
    import urllib.error

    import kornia.feature.disk.disk as kornia_disk
    import torch

    from dmlkit.retrieval.learned import ExtractorWeightsError, load_disk

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(kornia_disk, "load_state_dict_from_url", offline)
    cpu = torch.device("cpu")
    with pytest.raises(ExtractorWeightsError, match=r"cannot get kornia's DISK weights .* Offline"):
        load_disk(None, cpu, "cfg.yaml: retrieve.verify")
    with pytest.raises(ExtractorWeightsError, match=r"'missing\.pth' is not a file"):
        load_disk("missing.pth", cpu, "cfg.yaml: retrieve.verify")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ExtractorWeightsError, match="holds no DISK weights"):
        load_disk(str(wrong), cpu, "cfg.yaml: retrieve.verify")


def test_disk_features_are_cached_as_float16_and_verified(tmp_path, image_files, disk_weights):
    """The DISK path end to end in the stage: extracted in this process, a shard of float16
    descriptors equal to a direct extraction, and inlier counts with 0 for unreadable/missing."""
    import torch

    from dmlkit.retrieval.learned import disk_features, load_disk
    from dmlkit.retrieval.verify import feature_key, image_key, read_for_features

    cfg = VerifyConfig(
        enabled=True, extractor="disk", weights_file=disk_weights, image_size=96, max_keypoints=60, workers=1
    )
    assert feature_key(cfg) != feature_key(VerifyConfig(enabled=True, image_size=96, max_keypoints=60))
    store = FeatureStore(tmp_path / "features")
    names = ["query", "same", "other", "corrupt", "blank"]
    paths = np.array([image_files[name] for name in names], dtype=object)
    counts = ensure_features(store, cfg, list(paths), progress=False)
    assert (counts.extracted, counts.unreadable) == (5, 1)
    cached = FeatureStore(tmp_path / "features").get(image_key(image_files["query"]))
    model = load_disk(disk_weights, torch.device("cpu"), "test")
    direct = disk_features(model, read_for_features(image_files["query"], 96, channels=3), 60)
    assert cached.descriptors.dtype == np.float16
    np.testing.assert_array_equal(cached.descriptors, direct.descriptors)
    inliers = verify_shortlists(store, cfg, paths, np.array([0, 1]), np.array([[1, 3], [-1, 0]]), progress=False)
    assert inliers.shape == (2, 2) and inliers.dtype == np.int32
    assert inliers[0, 1] == 0 and inliers[1, 0] == 0
