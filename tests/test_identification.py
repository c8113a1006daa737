"""Happywhale-style identification pieces (#27): the flipped gallery, the auxiliary head and
per-group unknown thresholds."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_tiny_config
from dmlkit import cli
from dmlkit.config import ConfigError, load_config
from dmlkit.inference import embed_paths
from dmlkit.models.backbone import EmbeddingModel
from dmlkit.pipeline.checks import check_values
from dmlkit.pipeline.context import Context
from dmlkit.retrieval.search import MISSING, best_per_row, knn
from dmlkit.stages.embed import read_views
from dmlkit.stages.folds import read_folds


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
        check_values(Context(cfg))


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
    # each test answer's cosine is the best of the four products (image, mirror) × (image, mirror)
    # over its label's training images: the search really went over the mirrors
    folds_art = next((tmp_path / "artifacts" / "tiny-whale" / "folds").glob("*/manifest.json")).parent
    table, folds = read_folds(folds_art / "table.csv", folds_art / "folds.csv")
    answers = pd.read_csv(
        next((tmp_path / "artifacts" / "tiny-whale" / "retrieve").glob("*/answers-humpback-2019.csv"))
    )
    answers = answers[answers["cosine"].notna()]
    assert len(answers) > 0
    known = folds[folds["known"]]
    rows = {i: n for n, (r, i) in enumerate(zip(table["role"], table["id"], strict=True))}
    for image, label, cosine in zip(answers["id"], answers["label"], answers["cosine"], strict=True):
        query = views[rows[image]]
        gallery = views[[rows[i] for i in known.loc[known["label"] == label, "id"]]]
        dense = np.einsum("ae,gbe->gab", query, gallery).max()
        assert cosine == pytest.approx(float(dense), abs=1e-5), image
    # switching it off recomputes the embeddings without mirrors
    assert cli.main(["all", "-c", str(config), "embed.tta_flip=false"]) == 0
    assert len(list((tmp_path / "artifacts" / "tiny-whale" / "embed" / "m0").glob("*/embeddings.npy"))) == 2


# --------------------------------------------------------------------------- auxiliary head
def _arcface_ce(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float, margin: float):
    """Per-row ArcFace cross-entropy written out: s·cos(θ + m) at the target, s·cos θ elsewhere."""
    cos = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(weight, dim=1).T
    target = cos[torch.arange(len(labels)), labels]
    logits = cos.clone()
    logits[torch.arange(len(labels)), labels] = torch.cos(torch.arccos(target) + margin)
    return -torch.log_softmax(scale * logits, dim=1)[torch.arange(len(labels)), labels]


def test_aux_head_loss_is_the_weighted_sum_of_the_identity_and_auxiliary_losses():
    from dmlkit.build import build_aux, build_member_head, build_objective
    from dmlkit.config import MemberConfig

    aux = {"column": "species", "weight": 0.563, "identity_weight": 0.437, "scale": 10.0, "margin": 0.2}
    member = MemberConfig(
        name="m", backbone="test_resnet", fold=0, image_size=32, embedding_size=16, head={"scale": 20.0, "aux": aux}
    )
    torch.manual_seed(0)
    model = EmbeddingModel("test_resnet", 16, image_size=32).eval()  # eval: two forwards give one embedding
    head, aux_head = build_member_head(member, np.ones(5)), build_aux(member, np.ones(3))
    objective = build_objective(member, model, head, aux_head)
    images = torch.rand(6, 3, 32, 32)
    labels = torch.tensor([[0, 2], [1, 0], [4, -1], [2, 1], [3, -1], [0, 0]])  # two rows without a species
    loss, _ = objective(images, labels, see_value=0.0)
    with torch.no_grad():
        emb = model(images)
        identity = _arcface_ce(emb, head.weight, labels[:, 0], 20.0, 0.3).mean()
        known = labels[:, 1] >= 0
        species = _arcface_ce(emb[known], aux_head.weight, labels[known, 1], 10.0, 0.2).mean()
    assert float(loss.detach()) == pytest.approx(float(0.437 * identity + 0.563 * species), rel=1e-5)
    loss.backward()
    assert aux_head.weight.grad is not None and aux_head.weight.grad.abs().sum() > 0
    # one-column labels: the identity loss alone
    plain, _ = objective(images, labels[:, 0], see_value=0.0)
    assert float(plain.detach()) == pytest.approx(float(identity), rel=1e-5)


def test_aux_column_missing_or_single_valued_is_refused_before_training():
    import pandas as pd

    from dmlkit.training.data import aux_targets

    rows = pd.DataFrame({"id": ["a", "b", "c"], "label": ["x", "y", "x"], "species": ["s1", "", "s2"]})
    classes, targets = aux_targets(rows, "species", "m")
    assert classes == ["s1", "s2"] and targets.tolist() == [0, -1, 1]
    with pytest.raises(ValueError, match=r"'kind' is not a column.*species"):
        aux_targets(rows, "kind", "m")
    with pytest.raises(ValueError, match="1 class"):
        aux_targets(rows.assign(species="s1"), "species", "m")


# --------------------------------------------------------------------------- per-group thresholds
def _queries(rows: list[tuple[str, float, str]]):
    """Validation queries (group, top vote, truth): each ranks label x (vote s), then z (s / 10)."""
    from dmlkit.competitions import Predictions
    from dmlkit.evaluation import RankedQueries

    ranked = Predictions(
        ids=[str(i) for i in range(len(rows))],
        labels=[["x", "z"] for _ in rows],
        scores=[[s, s / 10] for _, s, _ in rows],
        similarities=[[s, s / 10] for _, s, _ in rows],
        groups=[g for g, _, _ in rows],
    )
    return RankedQueries(ranked, [t for _, _, t in rows], None, 1.0, len(rows))


def test_per_group_thresholds_against_a_hand_made_case():
    from dmlkit.competitions import Calibration, get_adapter
    from dmlkit.evaluation import calibrated_scores, score_queries, tune_group_thresholds

    adapter = get_adapter("humpback-2019")
    # group a needs new_whale below 0.9 (and above 0.8); group b below 0.5 (above 0.4): no one
    # threshold serves both; group c has one query, under the minimum of 2
    queries = _queries(
        [
            ("a", 0.9, "x"),
            ("a", 0.8, "new_whale"),
            ("a", 0.7, "new_whale"),
            ("b", 0.5, "x"),
            ("b", 0.4, "new_whale"),
            ("c", 0.95, "x"),
        ]
    )
    single = score_queries(adapter, queries, Calibration(unknown_score="vote"))
    assert single["score"] < 1.0  # the best single threshold misses a query
    calibration = Calibration(threshold=single["threshold"], unknown_score="vote")
    thresholds = tune_group_thresholds(adapter, queries, calibration, min_queries=2)
    assert set(thresholds) == {"a", "b"}  # c keeps the global threshold
    assert 0.8 < thresholds["a"] <= 0.9 and 0.4 < thresholds["b"] <= 0.5
    grouped = Calibration(threshold=single["threshold"], unknown_score="vote", group_thresholds=thresholds)
    assert calibrated_scores(adapter, queries, grouped)["score"] == pytest.approx(
        1.0 if single["threshold"] <= 0.95 else 5 / 6
    )
    # at test, each query takes its group's threshold, an unseen group the global one
    answers = adapter.predict(_queries([("a", 0.75, "?"), ("b", 0.75, "?"), ("zz", 0.75, "?")]).ranked, grouped)
    assert [row[0] for row in answers.labels] == ["new_whale", "x", "x" if single["threshold"] <= 0.75 else "new_whale"]


def _tiny_happywhale_config(
    tmp: Path, extra: str = "", retrieve: str = "{k: 20, unknown_per: species, unknown_per_min: 5}"
) -> Path:
    text = f"""
experiment: tiny-hw
seed: 3
threads: 2
competition:
  name: happywhale-2022
  root: {tmp / "input-hw"}
  demo: happywhale
  demo_params: {{n_individuals: 30, image_size: 48}}
folds: {{n_splits: 3}}
member_defaults:
  image_size: 32
  embedding_size: 32
  head: {{scale: 16.0, aux: {{column: species, scale: 16.0}}}}
  train: {{epochs: 2, batch_size: 16, lr: 2.0e-3, amp: "off"}}
members:
  - {{name: m0, backbone: test_resnet, fold: 0}}
embed: {{batch_size: 64}}
retrieve: {retrieve}
"""
    path = tmp / "tiny-hw.yaml"
    path.write_text(text + extra)
    return path


def test_species_head_and_per_species_thresholds_end_to_end(tmp_path: Path, monkeypatch):
    import json

    import pandas as pd

    monkeypatch.chdir(tmp_path)
    config = _tiny_happywhale_config(tmp_path)
    assert cli.main(["all", "-c", str(config)]) == 0
    art = tmp_path / "artifacts" / "tiny-hw"
    weights = torch.load(next((art / "train" / "m0").glob("*/best.pt")), weights_only=False)
    assert weights["aux_classes"] == ["beluga", "blue_whale", "humpback_whale"]
    embed = next((art / "embed" / "m0").glob("*/aux_cos.npy")).parent
    table = pd.read_csv(next((art / "folds").glob("*/table.csv")))
    assert np.load(embed / "aux_cos.npy").shape == (len(table), 3)
    assert json.loads((embed / "aux_classes.json").read_text())["column"] == "species"
    retrieve = next((art / "retrieve").glob("*/manifest.json"))
    result = json.loads(retrieve.read_text())["result"]
    assert any(row["step"].startswith("+ per-species thresholds") for row in result["report"])
    assert isinstance(result["tuned"]["group_thresholds"], dict)
    submission = pd.read_csv(tmp_path / "submissions" / "tiny-hw.csv")
    assert list(submission.columns) == ["image", "predictions"] and len(submission) == (table["role"] == "test").sum()
    # a pseudo-label round on top: its rows have no species (Happywhale's test has none), so the
    # species head leaves them out; before, round 1 stopped at its folds ("['species'] not in index")
    # (round 0's training reused; a fixed threshold below every cosine, as the tiny model answers "new"
    # first everywhere otherwise)
    config = _tiny_happywhale_config(tmp_path, retrieve="{k: 20, unknown_threshold: -1.0}")
    assert cli.main(["all", "-c", str(config), "pseudo.rounds=1", "pseudo.min_cosine=-0.99"]) == 0
    round_folds = pd.read_csv(next((art / "round-1" / "folds").glob("*/folds.csv")))
    pseudo = round_folds[round_folds["id"].str.startswith("pseudo:")]
    assert len(pseudo) > 0 and pseudo["species"].isna().all()
    assert round_folds.loc[~round_folds["id"].str.startswith("pseudo:"), "species"].notna().all()
    assert list((art / "round-1" / "train" / "m0").glob("*/best.pt"))


def test_per_species_thresholds_need_a_member_with_that_head(tmp_path: Path):
    config = _tiny_happywhale_config(tmp_path)
    cfg = load_config(config, ["member_defaults.head.aux=null"])
    with pytest.raises(ConfigError, match=r"retrieve\.unknown_per: 'species' needs a member with head\.aux\.column"):
        check_values(Context(cfg))
    with pytest.raises(ConfigError, match=r"retrieve\.unknown_per: per-group thresholds are tuned"):
        check_values(Context(load_config(config, ["retrieve.unknown_threshold=0.5"])))
