import pandas as pd
import pytest

from conftest import TINY_LANDMARK, TINY_WHALE
from dmlkit.competitions import get_adapter
from dmlkit.competitions.scoring import score_files
from dmlkit.demo import build_demo


def test_landmark_demo_layout_and_statistics(tmp_path):
    root = tmp_path / "landmark"
    stats = build_demo("landmark", root, TINY_LANDMARK)
    table = get_adapter("landmark-recognition-2020").read(root)
    assert (table.role == "train").sum() == stats["train_images"]
    assert stats["classes"] == TINY_LANDMARK["n_classes"]
    assert stats["test_distractor_share"] == pytest.approx(0.6, abs=0.1)
    assert stats["class_size_max"] == TINY_LANDMARK["head_size"]
    assert stats["classes_with_2_to_5"] > 0.5  # long tail: most classes have 2–5 images
    solution = pd.read_csv(root / "solution.csv", dtype=str, keep_default_na=False)
    assert set(solution.Usage) == {"Public", "Private"}
    retrieval = pd.read_csv(root / "retrieval_solution.csv", dtype=str, keep_default_na=False)
    assert (retrieval.Usage == "Ignored").sum() == (retrieval.images == "").sum()
    assert all(__import__("pathlib").Path(p).is_file() for p in table.path)


def test_whale_demo_statistics_and_determinism(tmp_path):
    stats = build_demo("whale", tmp_path / "a", TINY_WHALE)
    again = build_demo("whale", tmp_path / "b", TINY_WHALE)
    assert stats == again
    assert (tmp_path / "a" / "train.csv").read_text() == (tmp_path / "b" / "train.csv").read_text()
    assert 0.2 <= stats["singleton_share"] <= 0.6
    assert stats["test_new_whale_share"] == pytest.approx(0.25, abs=0.15)
    assert stats["train_new_whale_share"] > 0


def test_default_demo_statistics_match_the_real_competitions(tmp_path):
    stats = build_demo("whale", tmp_path / "w")
    assert stats["singleton_share"] == pytest.approx(0.4, abs=0.05)  # ~40% singletons, as in Humpback 2019
    assert stats["test_new_whale_share"] == pytest.approx(0.25, abs=0.03)
    stats = build_demo("landmark", tmp_path / "l")
    assert stats["test_distractor_share"] == pytest.approx(0.6, abs=0.02)  # mostly non-landmarks, as GLR2020
    assert stats["classes_with_2_to_5"] > 0.8


def test_perfect_submission_scores_one(tmp_path):
    root = tmp_path / "w"
    build_demo("whale", root, TINY_WHALE)
    solution = pd.read_csv(root / "solution.csv", dtype=str)
    solution[["Image", "Id"]].to_csv(tmp_path / "perfect.csv", index=False)
    result = score_files(tmp_path / "perfect.csv", root / "solution.csv")
    assert result["public"] == 1.0 and result["private"] == 1.0


def test_demo_reuse_and_refusal(tmp_path):
    root = tmp_path / "w"
    build_demo("whale", root, TINY_WHALE)
    stamp = (root / "train.csv").stat().st_mtime_ns
    build_demo("whale", root, TINY_WHALE)
    assert (root / "train.csv").stat().st_mtime_ns == stamp  # same parameters: reused
    with pytest.raises(KeyError, match="unknown key"):
        build_demo("whale", root, {"n_whales": 3})
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a generated demo"):
        build_demo("whale", other, TINY_WHALE)
