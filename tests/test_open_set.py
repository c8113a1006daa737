"""Open-set identification: class-disjoint validation folds, calibration of 'new' on them, the
score it applies to, a fixed share of the test, out-of-fold pooling, the unknown report."""

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import write_tiny_config
from dmlkit.competitions import Calibration, Predictions, get_adapter
from dmlkit.competitions.scoring import score_files
from dmlkit.config import load_config
from dmlkit.data.folds import fold_parts, held_out_classes
from dmlkit.demo import build_demo
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.pipeline.table import STAGE_NAMES as STAGES
from dmlkit.pipeline.table import run_stage
from dmlkit.retrieval.voting import label_similarities, threshold_for_share
from dmlkit.stages.folds import load_table, run_folds


def test_held_out_classes_are_disjoint_whole_classes_stratified_by_size():
    rng = np.random.default_rng(0)
    sizes = np.repeat([1, 2, 4, 8], 25)  # 100 classes
    labels = np.concatenate([[f"c{i}"] * n for i, n in enumerate(sizes)])
    train = pd.DataFrame({"label": labels, "known": True, "fold": rng.integers(0, 5, len(labels))})
    train["unknown_fold"] = held_out_classes(train, 0.2, 5, seed=1)
    per_class = train.groupby("label")["unknown_fold"].nunique()
    assert (per_class == 1).all()  # a class is held out by one fold at most, with all its images
    class_fold = train.drop_duplicates("label").set_index("label")["unknown_fold"]
    assert class_fold.value_counts().to_dict() == {f: 20 for f in range(5)}
    size_of = dict(zip([f"c{i}" for i in range(100)], sizes, strict=True))
    train.loc[train["label"].map(size_of) == 1, "fold"] = -1  # singletons always train, as assign_folds does
    for fold in range(5):  # each fold holds out 5 classes of each size
        held = class_fold[class_fold == fold].index
        assert sorted(size_of[c] for c in held) == sorted(np.repeat([1, 2, 4, 8], 5))
        part_train, part_val = fold_parts(train, fold)
        assert not set(held) & set(part_train["label"])
        unseen = part_val[part_val["label"].isin(held)]
        assert not unseen["known"].any()
        # the held-out classes' images of this fold, and held-out singletons, are the unseen queries
        expected = train[train["label"].isin(held) & ((train["fold"] == fold) | (train["fold"] == -1))]
        assert len(unseen) == len(expected)
        assert {size_of[c] for c in unseen["label"]} >= {1}
    assert (held_out_classes(train, 0.2, 3, seed=1) < 3).all()  # folds 3, 4 of the stride: none
    assert (held_out_classes(train, 0.0, 5, seed=1) == -1).all()


@pytest.mark.parametrize(("kind", "expected"), [("whale", 0.0), ("open", 0.2)])
def test_unknown_classes_default_on_without_unknown_training_rows(tmp_path, kind, expected):
    """Humpback 2019 trains with new_whale rows: no held-out classes. Training without unknown rows
    (here the whale demo as a generic CSV, new_whale dropped): 20% of the classes per fold."""
    if kind == "whale":
        cfg = load_config(write_tiny_config(tmp_path, "whale"))
    else:
        cfg = load_config(_open_set_config(tmp_path, "whale"))
    ctx = Context(cfg, artifacts=tmp_path / "a", progress=False)
    ensure_demo_data(ctx)
    assert ctx.unknown_classes == expected
    _, folds = load_table(run_folds(ctx))
    held = folds.loc[folds["unknown_fold"] >= 0, "label"].nunique()
    assert (held > 0) == (expected > 0)
    if expected:
        classes = folds.loc[folds["known"], "label"].nunique()
        assert held == pytest.approx(3 * expected * classes, abs=3)  # folds 0-2 of 3


def test_threshold_for_share_and_label_similarities():
    top = np.array([0.9, 0.2, 0.5, 0.7, 0.1, 0.3, 0.8, 0.6, 0.4, 0.05])
    for share in (0.1, 0.3, 0.5):
        assert (top < threshold_for_share(top, share)).mean() == pytest.approx(share)
    assert threshold_for_share(top, 0.99) == np.inf
    sims = np.array([[0.9, 0.8, 0.7, 0.6]])
    ids = np.array([[2, 0, 1, -1]])
    assert label_similarities([["b", "a", "z"]], sims, ids, np.array(["a", "b", "a"])) == [[0.7, 0.9, 0.0]]


def test_calibration_picks_the_score_that_separates_unknowns():
    """Votes cannot tell these unknown queries apart (many weak neighbours sum up), the best cosine can."""
    adapter = get_adapter("generic-csv")
    ranked = Predictions(
        ids=["0", "1", "2", "3"],
        labels=[["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]],
        scores=[[0.9, 0.1], [0.9, 0.1], [0.5, 0.1], [0.5, 0.1]],
        similarities=[[0.95, 0.3], [0.4, 0.3], [0.9, 0.3], [0.3, 0.2]],
    )
    truths = ["a", "new", "e", "new"]

    def score(calibration: Calibration) -> float:
        return adapter.score_predictions(adapter.predict(ranked, calibration), truths)

    calibration, best = adapter.calibrate(score, ranked, Calibration())
    assert calibration.unknown_score == "cosine" and best == 1.0
    assert 0.4 < calibration.threshold <= 0.9
    fixed, value = adapter.calibrate(score, ranked, Calibration(unknown_score="vote"))
    assert fixed.unknown_score == "vote" and value < 1.0
    report = adapter.unknown_report(adapter.predict(ranked, calibration), truths)
    assert report["unknown_precision"] == 1.0 and report["unknown_recall"] == 1.0
    assert report["score_known"] == 1.0 and report["score_unknown"] == 1.0


def _open_set_data(tmp_path: Path, kind: str = "landmark") -> Path:
    """A generic-CSV identification set whose training has no unknown rows and whose test holds
    ~25% unseen classes: from the landmark demo (easier scenes), or the whale demo without new_whale."""
    source = tmp_path / f"source-{kind}"
    root = tmp_path / f"open-{kind}"
    rng = np.random.default_rng(0)
    if kind == "landmark":
        build_demo(
            "landmark",
            source,
            {"n_classes": 32, "head_size": 12, "tail_exponent": 0.5, "difficulty": 0.5, "image_size": 48},
        )
        train = get_adapter("landmark-recognition-2020").read(source)
    else:
        build_demo("whale", source, {"n_individuals": 20, "new_whale_train": 6, "image_size": 48})
        train = get_adapter("humpback-2019").read(source)
    train = train[(train["role"] == "train") & train["known"]]
    classes = sorted(train["label"].unique())
    unseen = set(rng.choice(classes, len(classes) // 4, replace=False))
    rows, truths = [], []
    for label, part in train.groupby("label"):
        paths = part["path"].tolist()
        if label in unseen:
            rows += [(p, label, "test") for p in paths]
            truths += ["new"] * len(paths)
        else:
            test = paths[:1] if len(paths) >= 3 else []
            rows += [(p, label, "test") for p in test] + [(p, label, "train") for p in paths[len(test) :]]
            truths += [label] * len(test)
    data = pd.DataFrame(rows, columns=["path", "label", "split"])
    data["path"] = [str(Path(p).resolve()) for p in data["path"]]
    root.mkdir()
    data.to_csv(root / "data.csv", index=False)
    test = data[data["split"] == "test"]
    usage = np.where(np.arange(len(test)) % 2, "Private", "Public")
    pd.DataFrame({"id": test["path"], "label": truths, "Usage": usage}).to_csv(root / "solution.csv", index=False)
    return root


def _open_set_config(tmp_path: Path, kind: str = "landmark", extra: str = "") -> Path:
    root = _open_set_data(tmp_path, kind)
    path = tmp_path / f"open-{kind}.yaml"
    path.write_text(
        textwrap.dedent(f"""
        experiment: open-{kind}
        seed: 3
        threads: 2
        competition: {{name: generic-csv, root: {root}}}
        folds: {{n_splits: 3}}
        member_defaults:
          image_size: 32
          embedding_size: 32
          head: {{subcenters: 1, scale: 16.0, dynamic: none}}
          train: {{epochs: 40, batch_size: 16, lr: 2.0e-3, amp: "off", augment: none}}
        members:
          - {{name: m0, backbone: test_resnet, fold: 0}}
        embed: {{batch_size: 64, tta_flip: false}}
        retrieve: {{k: 20}}
        """)
        + textwrap.dedent(extra)
    )
    return path


def _run(cfg: Path, tmp_path: Path, overrides=(), name: str = "sub") -> tuple[Context, dict]:
    config = load_config(cfg, list(overrides))
    ctx = Context(config, artifacts=tmp_path / "art", submissions=tmp_path / name, progress=False)
    for stage in STAGES:
        run_stage(ctx, stage)
    submission = tmp_path / name / f"{ctx.cfg.experiment}.csv"
    return ctx, {"score": score_files(submission, Path(ctx.cfg.competition.root) / "solution.csv"), "sub": submission}


def test_calibrated_run_answers_unseen_queries_new_and_beats_threshold_zero(tmp_path):
    cfg = _open_set_config(tmp_path)
    ctx, calibrated = _run(cfg, tmp_path)
    _, never = _run(cfg, tmp_path, ["retrieve.unknown_threshold=0.0"], name="never")
    tuned = ctx.done["retrieve"].manifest["result"]["tuned"]
    assert tuned["threshold"] > 0 and tuned["validation_unknown_recall"] > 0.5
    solution = pd.read_csv(Path(ctx.cfg.competition.root) / "solution.csv")
    submission = pd.read_csv(calibrated["sub"]).set_index("id").loc[solution["id"]]
    first = submission["predictions"].str.split().str[0].to_numpy()
    unseen = (solution["label"] == "new").to_numpy()
    assert (first[unseen] == "new").mean() > 0.5  # most unseen queries answered "new" first
    mean = lambda r: (r["public"] + r["private"]) / 2  # noqa: E731
    assert mean(calibrated["score"]) > mean(never["score"]) + 0.1
    report = pd.read_csv(ctx.done["retrieve"].file("report.csv"))
    assert any(report.step.str.contains("unseen queries")) and any(report.step.str.contains("known queries"))


def test_unknown_share_sets_the_test_share_and_folds_pool_out_of_fold(tmp_path):
    extra = """
    members:
      - {name: m0, backbone: test_resnet, fold: 0, train: {epochs: 2}}
      - {name: m1, backbone: test_resnet, fold: 1, train: {epochs: 2}}
    """
    cfg = _open_set_config(tmp_path, extra=extra)
    ctx, result = _run(cfg, tmp_path, ["retrieve.unknown_share=0.3"])
    first = pd.read_csv(result["sub"])["predictions"].str.split().str[0]
    assert (first == "new").mean() == pytest.approx(0.3, abs=0.02)
    report = pd.read_csv(ctx.done["retrieve"].file("report.csv"))
    assert any(report.step.str.contains(r"out-of-fold: folds \[0, 1\]"))
