"""The wildlife adapter on hand-made metadata tables: roles, unknowns, the answers it scores
against, the open-set split, the download's offline error and a whole run with BAKS/BAUS."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from conftest import write_tiny_config
from dmlkit.competitions import InputError, get_adapter
from dmlkit.competitions.scoring import format_scores, score_files
from dmlkit.competitions.wildlife import download, split_open_set, usage_of
from dmlkit.config import ConfigError, load_config
from dmlkit.pipeline.checks import before_run
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.pipeline.table import STAGE_NAMES as STAGES
from dmlkit.pipeline.table import run_stage
from dmlkit.stages.submit import local_scores, write_submissions


def write_metadata(root: Path, rows: list[tuple[str, str, str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["path", "identity", "split"]).assign(species="macaque").to_csv(
        root / "metadata.csv", index=False
    )


def test_table_roles_unknown_rows_and_the_answers_scored_against(tmp_path):
    rows = [
        ("img/a1.jpg", "a", "train"),
        ("img/a2.jpg", "a", "train"),
        ("img/u1.jpg", "unknown", "train"),  # the library's unidentified animal: a row, not a class
        ("img/b1.jpg", "b", "train"),
        ("img/a3.jpg", "a", "test"),
        ("img/c1.jpg", "c", "test"),  # an animal no training row holds
        ("img/x1.jpg", "unknown", "test"),
    ]
    write_metadata(tmp_path, rows)
    adapter = get_adapter("wildlife")
    table = adapter.read(tmp_path)
    assert table["role"].tolist() == ["train"] * 4 + ["test"] * 3
    assert table["known"].tolist() == [True, True, False, True, False, False, False]
    assert table["path"].iloc[0] == str(tmp_path / "img/a1.jpg")
    assert table.loc[table.role == "test", "label"].isna().all()  # test identities never reach training
    assert adapter.submission_ids(tmp_path) == ["img/a3.jpg", "img/c1.jpg", "img/x1.jpg"]
    solution = adapter.read_solution(tmp_path / "metadata.csv")
    assert solution["identity"].tolist() == ["a", "new_individual", "new_individual"]
    assert solution["Usage"].tolist() == [usage_of(p) for p in ["img/a3.jpg", "img/c1.jpg", "img/x1.jpg"]]

    write_metadata(tmp_path, [("img/a1.jpg", "a", "val")])
    with pytest.raises(InputError, match=r"metadata.csv: line 2: split 'val'"):
        adapter.read(tmp_path)
    write_metadata(tmp_path, [("img/a1.jpg", "new_individual", "train")])
    with pytest.raises(InputError, match=r"line 2: identity 'new_individual' is the answer"):
        adapter.read(tmp_path)


def test_open_set_split_holds_out_whole_identities_and_keeps_one_image_of_the_rest():
    identities = pd.Series([f"id{i}" for i in range(20) for _ in range(i % 4 + 1)] + ["unknown"] * 3)
    split = split_open_set(identities, seed=3, unknown_share=0.1, test_share=0.5)
    frame = pd.DataFrame({"identity": identities, "split": split})
    per_identity = frame[frame.identity != "unknown"].groupby("identity")["split"].agg(set)
    held = [name for name, splits in per_identity.items() if splits == {"test"}]
    assert len(held) == 2  # round(0.1 × 20) identities held out whole
    for name, splits in per_identity.items():
        if name not in held:
            assert "train" in splits  # every other identity keeps a gallery image
    assert (frame.loc[frame.identity == "unknown", "split"] == "train").all()
    assert np.array_equal(split, split_open_set(identities, seed=3, unknown_share=0.1, test_share=0.5))


def test_download_without_the_library_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wildlife_datasets", None)  # not installed (nor downloadable here)
    with pytest.raises(InputError, match=r"pip install wildlife-datasets.*metadata\.csv"):
        download("MacaqueFaces", tmp_path)


def wildlife_config(tmp_path: Path, name: str = "wildlife", extra: str = "") -> tuple[Path, pd.DataFrame]:
    """The tiny whale demo's training images as a wildlife table (a fifth of the animals held out
    whole into the test), and a config for competition `name` over it."""
    whale = write_tiny_config(tmp_path, "whale", extra)
    ensure_demo_data(Context(load_config(whale), artifacts=tmp_path / "a", progress=False))
    train = pd.read_csv(tmp_path / "input-whale" / "train.csv")
    metadata = pd.DataFrame(
        {
            "path": ["../input-whale/train/" + i for i in train["Image"]],
            "identity": train["Id"].replace("new_whale", "unknown"),
        }
    )
    metadata["split"] = split_open_set(metadata["identity"], seed=0, unknown_share=0.2)
    (tmp_path / "wild").mkdir()
    metadata.to_csv(tmp_path / "wild" / "metadata.csv", index=False)
    text = (
        whale.read_text()
        .replace("name: humpback-2019", f"name: {name}")
        .replace(str(tmp_path / "input-whale"), str(tmp_path / "wild"))
    )
    text = "\n".join(line for line in text.splitlines() if "demo" not in line)
    cfg = tmp_path / "wild.yaml"
    cfg.write_text(text)
    return cfg, metadata


def test_a_wildlife_table_runs_end_to_end_with_open_set_scores(tmp_path):
    cfg, metadata = wildlife_config(tmp_path)
    ctx = Context(load_config(cfg), artifacts=tmp_path / "a", submissions=tmp_path / "s", progress=False)
    for stage in STAGES:
        run_stage(ctx, stage)
    submission = pd.read_csv(tmp_path / "s" / "tiny-whale.csv")
    assert list(submission.columns) == ["image", "identity"]
    assert submission["image"].tolist() == metadata.loc[metadata.split == "test", "path"].tolist()
    (score,) = local_scores(ctx)
    assert score["competition"] == "wildlife" and set(score["open_set"]) == {"public", "private"}
    public = score["open_set"]["public"]
    assert public["open_set"] == pytest.approx((public["baks"] * public["baus"]) ** 0.5)


# --------------------------------------------------------------------------- AnimalCLEF 2026: clusters
def test_animalclef_tables_name_images_by_image_id_and_score_clusters_by_ari(tmp_path):
    rows = [
        ("i1", "img/a1.jpg", "a", "database"),
        ("i2", "img/b1.jpg", "b", "database"),
        ("q1", "img/a2.jpg", "a", "query"),
        ("q2", "img/a3.jpg", "a", "query"),
        ("q3", "img/c1.jpg", "c", "query"),  # an animal the database never saw
        ("q4", "img/c2.jpg", "c", "query"),
        ("q5", "img/x1.jpg", "unknown", "query"),  # unidentified: not scored
    ]
    pd.DataFrame(rows, columns=["image_id", "path", "identity", "split"]).to_csv(tmp_path / "metadata.csv", index=False)
    adapter = get_adapter("animalclef-2026")
    table = adapter.read(tmp_path)
    assert table["id"].tolist() == ["i1", "i2", "q1", "q2", "q3", "q4", "q5"]
    assert table["role"].tolist() == ["train"] * 2 + ["test"] * 5  # database / query
    assert adapter.submission_ids(tmp_path) == ["q1", "q2", "q3", "q4", "q5"]
    solution = adapter.read_solution(tmp_path / "metadata.csv")
    assert solution["identity"].tolist() == ["a", "a", "c", "c"]  # true identities, the new animal's too
    (tmp_path / "bad").mkdir()
    dup = [("i1", "img/z.jpg", "a", "database"), *rows]  # image_id i1 twice
    pd.DataFrame(dup, columns=["image_id", "path", "identity", "split"]).to_csv(
        tmp_path / "bad" / "metadata.csv", index=False
    )
    with pytest.raises(InputError, match=r"metadata\.csv: line 2: image_id 'i1' is empty or repeated"):
        adapter.read(tmp_path / "bad")

    clusters = pd.DataFrame({"id": ["q1", "q2", "q3", "q4", "q5"], "cluster": [0, 1, 1, 2, 3],
                             "identity": ["a", "new-1", "new-1", "new-2", "new-3"]})  # fmt: skip
    frame = adapter.build_clusters_submission(clusters, adapter.submission_ids(tmp_path))
    assert frame.columns.tolist() == ["image_id", "cluster"]
    frame.to_csv(tmp_path / "sub.csv", index=False)
    result = score_files(tmp_path / "sub.csv", tmp_path / "metadata.csv")
    truth, got = ["a", "a", "c", "c"], ["a", "new-1", "new-1", "new-2"]
    assert result["competition"] == "animalclef-2026"
    assert result["all"] == pytest.approx(adjusted_rand_score(truth, got))
    # by hand: no pair together in both; 2 pairs together in the truth, 1 in the clusters, of 6:
    # expected 2 · 1 / 6, max (2 + 1) / 2, ARI = (0 − 1/3) / (3/2 − 1/3) = −2/7
    assert result["all"] == pytest.approx(-2 / 7)
    assert "ARI" in format_scores(result)

    pd.DataFrame({"image_id": ["q1", "q2"], "cluster": ["a", "a"]}).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(InputError, match=r"no cluster for 2 image\(s\)"):
        score_files(tmp_path / "short.csv", tmp_path / "metadata.csv")
    with pytest.raises(InputError, match=r"no cluster for 1 test image"):
        adapter.build_clusters_submission(clusters.iloc[:4], adapter.submission_ids(tmp_path))


def test_animalclef_needs_clusters_then_submits_them_end_to_end(tmp_path):
    cfg, metadata = wildlife_config(tmp_path, "animalclef-2026")
    ctx = Context(load_config(cfg), artifacts=tmp_path / "a", submissions=tmp_path / "s", progress=False)
    with pytest.raises(ConfigError, match=r"animalclef-2026 submits the test's clusters: set retrieve\.cluster"):
        before_run(ctx, list(STAGES))
    overrides = ["retrieve.cluster.enabled=true", "competition.extra_formats=[wildlife]", "folds.unknown_classes=0.2"]
    ctx = Context(load_config(cfg, overrides), artifacts=tmp_path / "a", submissions=tmp_path / "s", progress=False)
    before_run(ctx, list(STAGES))
    for stage in STAGES:
        run_stage(ctx, stage)
    submission = pd.read_csv(tmp_path / "s" / "tiny-whale-clusters.csv", dtype=str)
    test_paths = metadata.loc[metadata.split == "test", "path"].tolist()
    assert submission.columns.tolist() == ["image_id", "cluster"] and submission["image_id"].tolist() == test_paths
    clusters = pd.read_csv(ctx.done["retrieve"].file("clusters.csv"), dtype=str)
    named = dict(zip(clusters["id"], clusters["identity"], strict=True))  # a known animal's name, or new-<cluster>
    assert submission["cluster"].tolist() == [named[i] for i in submission["image_id"]]
    assert (tmp_path / "s" / "tiny-whale.csv").is_file()  # the wildlife format beside it
    scores = {s["competition"]: s for s in local_scores(ctx)}
    truth = metadata[(metadata.split == "test") & (metadata.identity != "unknown")]
    expected = adjusted_rand_score(truth["identity"], submission.set_index("image_id").loc[truth["path"], "cluster"])
    assert scores["animalclef-2026"]["all"] == pytest.approx(expected)
    assert "map@5" == scores["wildlife"]["metric"]


def test_a_clusters_submission_without_clusters_says_why(tmp_path):
    write_metadata(tmp_path / "root", [("img/a1.jpg", "a", "train"), ("img/a2.jpg", "a", "test")])
    (tmp_path / "retrieved").mkdir()  # retrieve ran, but nothing tuned the cluster threshold: no clusters.csv
    with pytest.raises(
        InputError, match=r"animalclef-2026: retrieve clustered nothing .* retrieve\.cluster\.threshold"
    ):
        write_submissions([get_adapter("animalclef-2026")], tmp_path / "root", "e", tmp_path / "retrieved", tmp_path)
