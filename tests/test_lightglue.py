"""Learned local features and matching (retrieve.verify.extractor: aliked, matcher: lightglue), with
weights saved from random models to files (nothing is downloaded): the extractor's output, the
matcher's plumbing against the ratio path as the oracle, the weights' errors, the config's rules and
a run on the landmark demo."""

import urllib.error

import kornia.feature.aliked.aliked as kornia_aliked
import kornia.feature.lightglue as kornia_lightglue
import numpy as np
import pytest
import torch
from kornia.feature import ALIKED, LightGlue

from conftest import run_all_stages, textured, write_tiny_config
from dmlkit.config import ConfigError, VerifyConfig, load_config
from dmlkit.errors import ExtractorWeightsError
from dmlkit.pipeline.checks import before_run, check_values
from dmlkit.pipeline.context import Context
from dmlkit.pipeline.table import STAGE_NAMES
from dmlkit.retrieval import verify
from dmlkit.retrieval.learned import aliked_features, lightglue_pairs, load_aliked, load_lightglue
from dmlkit.retrieval.local import ratio_matches, unit_descriptors
from dmlkit.retrieval.verify import FeatureStore, verify_shortlists

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    paths = {"aliked": str(folder / "aliked-random.pth"), "lightglue": str(folder / "lightglue-aliked-random.pth")}
    torch.save(ALIKED(model_name="aliked-n16").state_dict(), paths["aliked"])
    torch.save(LightGlue(None, input_dim=128).state_dict(), paths["lightglue"])
    return paths


def test_aliked_features_from_a_local_weights_file(weights):
    model = load_aliked(weights["aliked"], CPU, "test", max_keypoints=50)
    rgb = np.repeat(textured(3, 96)[..., None], 3, axis=2)[:64]
    features = aliked_features(model, rgb, max_keypoints=40)
    assert 0 < len(features) <= 40
    assert features.descriptors.dtype == np.float16 and features.descriptors.shape == (len(features), 128)
    np.testing.assert_allclose(np.linalg.norm(features.descriptors.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert (features.keypoints >= 0).all() and (features.keypoints[:, 0] <= 95).all()
    assert (features.keypoints[:, 1] <= 63).all()
    assert len(aliked_features(model, rgb[:10, :10], 40)) == 0


def test_learned_weights_that_cannot_be_had_are_clear_errors(tmp_path, monkeypatch, weights):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(kornia_aliked, "load_state_dict_from_url", offline)
    monkeypatch.setattr(kornia_lightglue, "load_state_dict_from_url", offline)
    with pytest.raises(ExtractorWeightsError, match=r"cannot get kornia's ALIKED weights .* Offline"):
        load_aliked(None, CPU, "cfg.yaml: retrieve.verify", 100)
    with pytest.raises(ExtractorWeightsError, match=r"LightGlue \(aliked\) weights .*Offline.*verify\.matcher_weights"):
        load_lightglue("aliked", None, CPU, "cfg.yaml: retrieve.verify")
    with pytest.raises(ExtractorWeightsError, match=r"matcher_weights_file 'missing\.pth' is not a file"):
        load_lightglue("aliked", "missing.pth", CPU, "cfg.yaml: retrieve.verify")
    # another model's weights: DISK's LightGlue has the same shapes, ALIKED's file has none of its names
    with pytest.raises(ExtractorWeightsError, match=r"holds no LightGlue weights: \d+ parameters missing"):
        load_lightglue("aliked", weights["aliked"], CPU, "cfg.yaml: retrieve.verify")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ExtractorWeightsError, match="holds no ALIKED weights"):
        load_aliked(str(garbage), CPU, "cfg.yaml: retrieve.verify", 100)


def test_lightglue_pairs_pass_both_images_in_one_frame_and_return_its_matches(weights):
    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))  # where the inputs go

        def forward(self, data):
            seen.update(data)
            return {"matches": [torch.tensor([[0, 1], [2, 0]])]}

    features = verify.LocalFeatures(np.float32([[3, 4], [60.2, 10], [20, 30]]), np.ones((3, 128), np.float16))
    small = verify.LocalFeatures(np.float32([[1, 1], [8, 20]]), np.ones((2, 128), np.float16))
    assert lightglue_pairs(Recorder(), features, small, 100).tolist() == [[0, 1], [2, 0]]
    # each image in its own frame, its keypoints' extent (at least 16 px, at most the fitted size)
    assert seen["image0"]["image_size"].tolist() == [[62.0, 62.0]]
    assert seen["image1"]["image_size"].tolist() == [[21.0, 21.0]]
    lightglue_pairs(Recorder(), features, features, 50)
    assert seen["image0"]["image_size"].tolist() == [[50.0, 50.0]]  # a keypoint beyond the fitted size
    assert seen["image1"]["descriptors"].dtype == torch.float32 and seen["image1"]["keypoints"].shape == (1, 3, 2)
    empty = verify.LocalFeatures.empty()
    assert lightglue_pairs(Recorder(), features, empty, 100).shape == (0, 2)
    # the real network (random weights): index pairs into both images
    model = load_lightglue("aliked", weights["lightglue"], CPU, "test")
    pairs = lightglue_pairs(model, features, features, 100)
    assert pairs.dtype == np.int64 and pairs.shape[1] == 2 and (pairs < 3).all()


def test_lightglue_shortlists_count_the_homography_inliers_of_its_matches(tmp_path, image_files, monkeypatch):
    """With a matcher that answers the ratio test's matches, the LightGlue path's inlier counts are
    the ratio path's, pair for pair (unreadable, missing and -1 candidates 0 alike)."""
    names = ["query", "same", "other", "corrupt", "blank"]
    paths = np.array([image_files[name] for name in names], dtype=object)
    queries, candidates = np.array([0, 1, 0]), np.array([[1, 2, 3], [4, -1, 0], [2, 0, -1]])
    ratio = VerifyConfig(enabled=True, image_size=320, max_keypoints=600, workers=1)
    expected = verify_shortlists(FeatureStore(tmp_path / "f"), ratio, paths, queries, candidates, progress=False)

    def ratio_as_lightglue(model, query, candidate, size):
        return ratio_matches(unit_descriptors(query.descriptors), unit_descriptors(candidate.descriptors), 0.8)

    monkeypatch.setattr(verify, "load_matcher", lambda cfg: "matcher")
    monkeypatch.setattr(verify, "lightglue_pairs", ratio_as_lightglue)
    glue = ratio.model_copy(update={"matcher": "lightglue"})
    got = verify_shortlists(FeatureStore(tmp_path / "f"), glue, paths, queries, candidates, progress=False)
    np.testing.assert_array_equal(got, expected)
    assert expected[0, 0] > 100  # the pair that matches does


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["retrieve.verify.matcher=lightglue"], "retrieve.verify.matcher: LightGlue's SIFT model"),
        (
            ["retrieve.verify.extractor=aliked", "retrieve.verify.matcher=lightglue", "retrieve.verify.ratio=0.7"],
            "retrieve.verify.ratio: LightGlue decides its own matches",
        ),
        (["retrieve.verify.matcher_weights_file=x.pth"], "retrieve.verify.matcher_weights_file: the ratio test"),
    ],
)
def test_matcher_values_without_effect_are_refused(tmp_path, overrides, message):
    cfg = write_tiny_config(tmp_path, "landmark")
    ctx = Context(load_config(cfg, ["retrieve.verify.enabled=true", *overrides]), artifacts=tmp_path / "a")
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_values(ctx)


def test_lightglue_without_its_weights_offline_stops_before_training(tmp_path, monkeypatch, weights):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(kornia_lightglue, "load_state_dict_from_url", offline)
    glue = ["retrieve.verify.enabled=true", "retrieve.verify.extractor=aliked", "retrieve.verify.matcher=lightglue"]
    overrides = [*glue, f"retrieve.verify.weights_file={weights['aliked']}"]
    ctx = Context(load_config(write_tiny_config(tmp_path, "landmark"), overrides), artifacts=tmp_path / "a")
    with pytest.raises(ExtractorWeightsError, match=r"retrieve\.verify: cannot get kornia's LightGlue .* Offline"):
        before_run(ctx, list(STAGE_NAMES))
    assert not (tmp_path / "a").exists() or not list((tmp_path / "a").rglob("final.pt"))


def test_aliked_and_lightglue_run_end_to_end_on_the_landmark_demo(tmp_path, weights):
    photos = {"image_size": 128, "scene_size": 160, "texture": 0.2}
    cfg = write_tiny_config(tmp_path, "landmark", demo_params=photos)
    overrides = [
        "retrieve.verify.enabled=true",
        "retrieve.verify.extractor=aliked",
        f"retrieve.verify.weights_file={weights['aliked']}",
        "retrieve.verify.matcher=lightglue",
        f"retrieve.verify.matcher_weights_file={weights['lightglue']}",
        "retrieve.verify.image_size=128",
        "retrieve.verify.max_keypoints=128",
        "retrieve.verify.top_k=3",
    ]
    ctx = run_all_stages(cfg, tmp_path, overrides)
    report = ctx.done["retrieve"].file("report.csv").read_text()
    assert "+ verification, top 3" in report
    for name in ("tiny-landmark.csv", "tiny-landmark-retrieval.csv"):
        assert (tmp_path / "submissions" / name).is_file()
    assert ctx.done["retrieve"].manifest["result"]["tuned"]["verify"]["fusion"] == "additive"
