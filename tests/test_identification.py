"""Happywhale-style identification pieces (#27): the flipped gallery, the auxiliary head and
per-group unknown thresholds."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import write_tiny_config
from dmlkit import cli
from dmlkit.config import ConfigError, load_config
from dmlkit.inference import embed_paths
from dmlkit.models.backbone import EmbeddingModel
from dmlkit.pipeline import Context
from dmlkit.retrieval.search import MISSING, best_per_row, knn
from dmlkit.stages.embed import read_views


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------- flipped gallery
def test_search_over_mirrored_views_equals_the_best_of_the_four_dense_products():
    rng = np.random.default_rng(0)
    queries, gallery = _unit(rng.normal(size=(25, 2, 8))), _unit(rng.normal(size=(40, 2, 8)))
    k = 7
    sims, ids = knn(queries, gallery, k, progress=False)
    dense = np.einsum("qve,gwe->qgvw", queries, gallery).reshape(25, 40, 4).max(axis=2)
    want_ids = np.argsort(-dense, axis=1)[:, :k]
    assert (ids == want_ids).all()
    np.testing.assert_allclose(sims, np.take_along_axis(dense, want_ids, 1), atol=1e-5)
    # a plain query against the mirrored gallery: the best over the gallery's two views
    sims, ids = knn(queries[:, 0], gallery, k, progress=False)
    dense = np.einsum("qe,gwe->qgw", queries[:, 0], gallery).max(axis=2)
    assert (ids == np.argsort(-dense, axis=1)[:, :k]).all()


def test_best_per_row_keeps_each_row_once_at_its_best_and_pads_missing_places():
    # a gallery of 3 rows held twice (row r at r and 3 + r); hits of two query views side by side
    sims = np.array([[0.9, 0.8, 0.7, 0.6, MISSING, 0.95]], np.float32)
    ids = np.array([[1, 4, 0, 3, -1, 3]])  # rows 1, 1, 0, 0, none, 0
    out_sims, out_ids = best_per_row(sims, ids, n_rows=3, k=3)
    assert out_ids.tolist() == [[0, 1, -1]]
    np.testing.assert_allclose(out_sims[0, :2], [0.95, 0.9])
    assert out_sims[0, 2] == MISSING


def _write_images(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(1)
    folder.mkdir()
    paths = []
    for i in range(n):
        image = rng.integers(0, 255, size=(32, 40, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"{i}.png"), image)
        cv2.imwrite(str(folder / f"{i}-mirror.png"), image[:, ::-1])
        paths.append(str(folder / f"{i}.png"))
    return paths


def test_mirror_views_are_the_embeddings_of_the_mirrored_files(tmp_path: Path):
    torch.manual_seed(0)
    model = EmbeddingModel("test_resnet", 16, image_size=32)
    paths = _write_images(tmp_path / "images", 5)
    options = {"image_size": 32, "batch_size": 2, "device": torch.device("cpu"), "flip": False, "progress": False}
    views = embed_paths(model, paths, mirror=True, **options)
    assert views.shape == (5, 2, 16)
    np.testing.assert_allclose(views[:, 0], embed_paths(model, paths, **options), atol=1e-5)
    mirrored = [p.replace(".png", "-mirror.png") for p in paths]
    np.testing.assert_allclose(views[:, 1], embed_paths(model, mirrored, **options), atol=1e-5)
    assert not np.allclose(views[:, 0], views[:, 1], atol=1e-3)  # the model is not mirror-invariant
    with pytest.raises(ValueError, match="flip=False"):
        embed_paths(model, paths, mirror=True, **{**options, "flip": True})


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (["embed.flip_gallery=true"], "embed.tta_flip"),
        (["embed.flip_gallery=true", "embed.tta_flip=false", "retrieve.rerank.enabled=true"], "retrieve.rerank"),
        (["embed.flip_gallery=true", "embed.tta_flip=false", "retrieve.qe.enabled=true"], "retrieve.qe"),
    ],
)
def test_flip_gallery_refuses_what_it_has_no_meaning_with(tmp_path: Path, overrides, refused):
    cfg = load_config(write_tiny_config(tmp_path), overrides)  # the schema accepts it ...
    with pytest.raises(ConfigError, match=refused.replace(".", r"\.")):  # ... the context names the conflict
        Context(cfg)


def test_flip_gallery_end_to_end_searches_the_mirrors(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_tiny_config(tmp_path)
    overrides = ["embed.flip_gallery=true", "embed.tta_flip=false"]
    assert cli.main(["all", "-c", str(config), *overrides]) == 0
    ensemble = next((tmp_path / "artifacts" / "tiny-whale" / "ensemble").glob("*/mirror.npy")).parent
    views = read_views(ensemble)
    member = read_views(next((tmp_path / "artifacts" / "tiny-whale" / "embed" / "m0").glob("*/mirror.npy")).parent)
    assert views.shape[1:] == (2, 32) and member.shape == views.shape
    np.testing.assert_allclose(np.linalg.norm(views, axis=-1), 1.0, atol=1e-5)
    assert (tmp_path / "submissions" / "tiny-whale.csv").is_file()
    # switching it off recomputes the embeddings without mirrors
    assert cli.main(["all", "-c", str(config), "embed.tta_flip=false"]) == 0
    assert len(list((tmp_path / "artifacts" / "tiny-whale" / "embed" / "m0").glob("*/embeddings.npy"))) == 2
