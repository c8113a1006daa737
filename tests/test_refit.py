"""Full-data refit (members.N.refit) and the augmentation presets (train.augment, train.flip)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_all_stages, write_tiny_config
from dmlkit.competitions import Calibration, get_adapter
from dmlkit.config import ConfigError, load_config, member_slice
from dmlkit.config.checks import ineffective_values
from dmlkit.config.members import AUGMENT_PRESETS, augment_specs
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.pipeline.table import STAGE_NAMES, run_stage
from dmlkit.retrieval.ensemble import l2_normalise
from dmlkit.retrieval.validation import Scorers
from dmlkit.stages import retrieve as retrieve_stage
from dmlkit.stages.ensemble import view_parts
from dmlkit.stages.folds import load_table, run_folds
from dmlkit.stages.retrieve import EmbeddingSet, answer_test


# ------------------------------------------------------------------------------ augmentation presets
def test_presets_flip_where_the_config_allows_and_lists_pass_unchanged():
    assert augment_specs("default", flip=True) == [*AUGMENT_PRESETS["default"], {"type": "HorizontalFlip", "p": 0.5}]
    assert augment_specs("default", flip=False) == AUGMENT_PRESETS["default"]
    assert augment_specs("none", flip=True) == []
    listed = [{"type": "Affine", "rotate": [-5, 5]}]
    assert augment_specs(listed, flip=True) == listed  # a list says itself what it does


def test_a_preset_and_the_list_it_names_train_under_one_key(tmp_path: Path):
    cfg = write_tiny_config(tmp_path, "whale")
    by_name = load_config(cfg, ["member_defaults.train.augment=light"]).members[0]
    spelled = json.dumps(augment_specs("light", True))
    by_list = load_config(cfg, [f"member_defaults.train.augment={spelled}"]).members[0]
    assert member_slice(by_name) == member_slice(by_list)
    unflipped = load_config(cfg, ["member_defaults.train.augment=light", "member_defaults.train.flip=false"])
    assert member_slice(unflipped.members[0]) != member_slice(by_name)


def test_unknown_preset_and_a_flip_the_config_forbids_are_refused(tmp_path: Path):
    cfg = write_tiny_config(tmp_path, "whale")
    with pytest.raises(ConfigError, match="augment"):
        load_config(cfg, ["member_defaults.train.augment=heavy"])
    flips = json.dumps([{"type": "HorizontalFlip", "p": 0.5}])
    loaded = load_config(cfg, [f"member_defaults.train.augment={flips}", "member_defaults.train.flip=false"])
    problems = ineffective_values(loaded, "map@5")
    assert any("train.flip" in p and "HorizontalFlip" in p for p in problems)


def test_the_default_preset_trains_with_a_flip_and_a_crop():
    train = load_config("configs/landmark-demo.yaml", ["member_defaults.train.augment=default"]).members[0].train
    types = [spec["type"] for spec in augment_specs(train.augment, train.flip)]
    assert types[0] == "RandomResizedCrop" and "HorizontalFlip" in types
    base = load_config("configs/whale-demo.yaml").members[0].train
    assert base.flip is False  # a fluke's mirror is another fluke


# ------------------------------------------------------------------------------------- refit config
def test_refit_true_means_replace_and_leaves_the_fold_models_key(tmp_path: Path):
    cfg = write_tiny_config(tmp_path, "whale")
    plain = load_config(cfg).members[0]
    refit = load_config(cfg, ["members.0.refit=true"]).members[0]
    assert refit.refit == "replace"
    assert member_slice(plain) == member_slice(refit)  # the fold model is the same model: reused


def test_refit_names_and_thresholds_that_mean_nothing_are_refused(tmp_path: Path):
    cfg = write_tiny_config(tmp_path, "whale")
    clash = (
        "[{name: m0, backbone: test_resnet, fold: 0, refit: true}, {name: m0-refit, backbone: test_resnet, fold: 1}]"
    )
    with pytest.raises(ConfigError, match="m0-refit"):
        load_config(cfg, [f"members={clash}"])
    without = load_config(cfg, ["retrieve.refit_threshold=share"])
    assert any("retrieve.refit_threshold" in p for p in ineffective_values(without, "map@5"))
    beside = load_config(cfg, ["members.0.refit=true", "retrieve.refit_threshold=share", "retrieve.unknown_share=0.3"])
    assert any("unknown_share" in p for p in ineffective_values(beside, "map@5"))


def test_view_parts_weigh_a_member_answered_by_two_models_as_one(tmp_path: Path):
    cfg = load_config(
        write_tiny_config(tmp_path, "whale"),
        ['members=[{name: a, backbone: test_resnet, fold: 0, refit: ensemble}, {name: b, backbone: test_resnet, '
         'fold: 0, refit: replace}, {name: c, backbone: test_resnet, fold: 0}]', "ensemble.weights={a: 2.0}"],
    )  # fmt: skip
    fold = {n: Path(f"{n}.npy") for n in "abc"}
    refit = {n: Path(f"{n}-refit.npy") for n in "ab"}
    assert view_parts(cfg, fold) == {"a": (fold["a"], 2.0), "b": (fold["b"], 1.0), "c": (fold["c"], 1.0)}
    test = view_parts(cfg, fold, refit)
    assert list(test) == ["a", "a-refit", "b-refit", "c"]
    assert test["a"][1] == pytest.approx(2.0 / np.sqrt(2)) and test["a-refit"][1] == pytest.approx(2.0 / np.sqrt(2))
    assert test["b-refit"] == (refit["b"], 1.0) and test["c"] == (fold["c"], 1.0)


# ------------------------------------------------------------------------- which model answers what
def _synthetic(n_train: int = 40, n_test: int = 30, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(
        {
            "id": [f"t{i}" for i in range(n_train)] + [f"q{i}" for i in range(n_test)],
            "role": ["train"] * n_train + ["test"] * n_test,
        }
    )
    known_train = pd.DataFrame({"id": table["id"][:n_train], "label": [f"w{i % 10}" for i in range(n_train)]})
    fold_view = l2_normalise(rng.normal(size=(n_train + n_test, dim)).astype(np.float32))
    refit_view = l2_normalise(rng.normal(size=(n_train + n_test, dim)).astype(np.float32))
    return table, known_train, fold_view, refit_view


def test_the_refit_view_answers_the_test_with_the_fold_models_threshold(tmp_path: Path):
    cfg = load_config(write_tiny_config(tmp_path, "whale"), ["members.0.refit=true"]).retrieve
    formats = [get_adapter("humpback-2019")]
    table, known_train, fold_view, refit_view = _synthetic()
    calibration = Calibration(threshold=0.5, unknown_score="cosine")
    views = EmbeddingSet(fold_view, {}, {}, test=refit_view)
    got, _ = answer_test(cfg, formats, table, known_train, views, calibration, Scorers(), progress=False)
    direct, _ = retrieve_stage.test_predictions(
        cfg, formats, table, known_train, refit_view, calibration, Scorers(), progress=False
    )
    folds_only, _ = retrieve_stage.test_predictions(
        cfg, formats, table, known_train, fold_view, calibration, Scorers(), progress=False
    )
    assert got["humpback-2019"].labels == direct["humpback-2019"].labels
    assert got["humpback-2019"].labels != folds_only["humpback-2019"].labels
    without, _ = answer_test(cfg, formats, table, known_train, EmbeddingSet(fold_view, {}, {}), calibration, Scorers())
    assert without["humpback-2019"].labels == folds_only["humpback-2019"].labels


def test_refit_threshold_share_answers_new_first_as_often_as_the_fold_models(tmp_path: Path):
    cfg = load_config(
        write_tiny_config(tmp_path, "whale"), ["members.0.refit=true", "retrieve.refit_threshold=share"]
    ).retrieve
    formats = [get_adapter("humpback-2019")]
    table, known_train, fold_view, refit_view = _synthetic(seed=1)
    refit_view = l2_normalise(refit_view + 2.0 * fold_view)  # a model whose cosines run higher than the fold model's
    calibration = Calibration(threshold=0.55, unknown_score="cosine")

    def new_share(predictions) -> float:
        return float(np.mean([row[0] == "new_whale" for row in predictions["humpback-2019"].labels]))

    folds_only, _ = retrieve_stage.test_predictions(
        cfg, formats, table, known_train, fold_view, calibration, Scorers(), progress=False
    )
    as_cosine, _ = retrieve_stage.test_predictions(
        cfg, formats, table, known_train, refit_view, calibration, Scorers(), progress=False
    )
    views = EmbeddingSet(fold_view, {}, {}, test=refit_view)
    by_share, _ = answer_test(cfg, formats, table, known_train, views, calibration, Scorers(), progress=False)
    assert 0 < new_share(folds_only) < 1
    assert new_share(as_cosine) != pytest.approx(new_share(folds_only))  # the raw threshold does not transfer here
    assert new_share(by_share) == pytest.approx(new_share(folds_only), abs=1.5 / len(table[table.role == "test"]))


# --------------------------------------------------------------------------------------- end to end
def _run(cfg_path: Path, tmp_path: Path, overrides: list[str]) -> Context:
    return run_all_stages(cfg_path, tmp_path, overrides)


def test_a_refit_member_trains_on_every_row_and_answers_the_test_while_the_fold_model_validates(tmp_path: Path):
    cfg_path = write_tiny_config(tmp_path, "whale")
    plain = _run(cfg_path, tmp_path, [])
    refit = _run(cfg_path, tmp_path, ["members.0.refit=true"])
    assert refit.done["train/m0"].reused  # the fold model is the one trained without refit

    _, folds = load_table(run_folds(refit))
    known = folds[folds["known"]]
    refit_art = refit.done["train/m0-refit"]
    result = refit_art.manifest["result"]
    assert result["train_images"] == len(known) > refit.done["train/m0"].manifest["result"]["train_images"]
    assert result["classes"] == known["label"].nunique()
    assert "val_score" not in pd.read_csv(refit_art.file("metrics.csv")).columns  # nothing validated it

    ensemble = refit.done["ensemble"]
    fold_emb = np.load(refit.done["embed/m0"].file("embeddings.npy"))
    refit_emb = np.load(refit.done["embed/m0-refit"].file("embeddings.npy"))
    np.testing.assert_allclose(np.load(ensemble.file("embeddings.npy")), l2_normalise(fold_emb), atol=1e-6)
    np.testing.assert_allclose(np.load(ensemble.file("test-embeddings.npy")), l2_normalise(refit_emb), atol=1e-6)

    report = pd.read_csv(refit.done["retrieve"].file("report.csv"))
    pd.testing.assert_frame_equal(report, pd.read_csv(plain.done["retrieve"].file("report.csv")))
    assert refit.done["retrieve"].manifest["result"]["tuned"] == plain.done["retrieve"].manifest["result"]["tuned"]
    assert refit.done["submit"].key != plain.done["submit"].key


@pytest.mark.parametrize("mode", ["replace", "ensemble"])
def test_the_export_holds_the_models_that_answer_the_test(tmp_path: Path, mode: str):
    import torch

    from dmlkit.data.dataset import ImageDataset
    from dmlkit.data.transforms import make_pipeline
    from dmlkit.export import run_export

    overrides = ["members.0.train.epochs=1", f"members.0.refit={mode}", "export.onnx=false"]
    ctx = Context(load_config(write_tiny_config(tmp_path, "whale"), overrides), artifacts=tmp_path / "a",
                  submissions=tmp_path / "sub", progress=False)  # fmt: skip
    ensure_demo_data(ctx)
    for stage in STAGE_NAMES[:4]:  # through the ensemble: its test view is what the export must equal
        run_stage(ctx, stage)
    module = torch.jit.load(str(run_export(ctx)["torchscript"]))
    table, _ = load_table(run_folds(ctx))
    paths, size = table["path"].tolist()[:12], ctx.cfg.members[0].image_size
    dataset = ImageDataset(paths, None, make_pipeline(size), 3, size)
    with torch.no_grad():
        exported = module(torch.stack([dataset[i][0] for i in range(len(paths))])).numpy()
    answering = np.load(ctx.done["ensemble"].file("test-embeddings.npy"))[:12]
    assert (exported * answering).sum(axis=1).min() >= 0.999
    validating = np.load(ctx.done["ensemble"].file("embeddings.npy"))[:12]
    assert exported.shape != validating.shape or (exported * validating).sum(axis=1).min() < 0.99  # not the fold model
