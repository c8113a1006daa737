"""Clustering of the test's new identities (retrieval/clusters.py) and the clustering metrics, on
hand-made similarities whose right grouping is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from conftest import run_all_stages, write_tiny_config
from dmlkit import cli
from dmlkit.competitions import InputError
from dmlkit.competitions.scoring import score_files
from dmlkit.config import ConfigError, load_config
from dmlkit.config.checks import ineffective_values
from dmlkit.metrics import clustering_scores
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.retrieval.clusters import attach_known, cluster_by_similarity, tune_cluster_threshold

# Items 0-2 one identity (pairwise 0.9), 3-4 another (0.8), 5 alone; 2 and 3 are bridged at 0.6,
# the other cross pairs at 0.1: single linkage at 0.5 chains the two groups, average does not.
SIMS = np.full((6, 6), 0.1)
SIMS[np.ix_([0, 1, 2], [0, 1, 2])] = 0.9
SIMS[np.ix_([3, 4], [3, 4])] = 0.8
SIMS[2, 3] = SIMS[3, 2] = 0.6
np.fill_diagonal(SIMS, 1.0)


def test_average_linkage_separates_what_a_single_bridge_would_chain():
    assert cluster_by_similarity(SIMS, 0.5, "average").tolist() == [0, 0, 0, 1, 1, 2]
    # single linkage: the 0.6 bridge joins both groups (a connected component)
    assert cluster_by_similarity(SIMS, 0.5, "single").tolist() == [0, 0, 0, 0, 0, 1]
    # average cosine between {0,1,2} and {3,4}: (0.6 + 5 * 0.1) / 6 = 0.183 → merged at 0.15, not at 0.2
    assert cluster_by_similarity(SIMS, 0.15, "average").tolist() == [0, 0, 0, 0, 0, 1]
    assert cluster_by_similarity(SIMS, 0.2, "average").tolist() == [0, 0, 0, 1, 1, 2]
    # above every pair: each item alone; complete linkage needs every pair over the threshold
    assert cluster_by_similarity(SIMS, 0.95, "average").tolist() == [0, 1, 2, 3, 4, 5]
    assert cluster_by_similarity(SIMS, 0.5, "complete").tolist() == [0, 0, 0, 1, 1, 2]


def test_cluster_ids_follow_first_appearance_and_small_inputs_work():
    order = [5, 3, 0, 4, 1, 2]
    assert cluster_by_similarity(SIMS[np.ix_(order, order)], 0.5).tolist() == [0, 1, 2, 1, 2, 2]
    assert cluster_by_similarity(np.ones((1, 1)), 0.5).tolist() == [0]
    assert cluster_by_similarity(np.ones((0, 0)), 0.5).tolist() == []
    with pytest.raises(ValueError, match="square"):
        cluster_by_similarity(np.ones((2, 3)), 0.5)
    with pytest.raises(ValueError, match="linkage"):
        cluster_by_similarity(SIMS, 0.5, "ward")


def test_a_cluster_with_a_known_image_takes_its_identity():
    clusters = np.array([0, 0, 0, 1, 1, 2, 3])
    known = [None, "whale-a", None, None, None, "whale-b", None]
    assert attach_known(clusters, known) == ["whale-a", "whale-a", "whale-a", None, None, "whale-b", None]
    # two identities in one cluster: the majority; on a tie the one seen first
    assert attach_known(np.array([0, 0, 0, 0]), ["x", "y", "y", None]) == ["y"] * 4
    assert attach_known(np.array([0, 0]), ["x", "y"]) == ["x", "x"]
    with pytest.raises(ValueError, match="cluster ids"):
        attach_known(np.array([0]), [None, None])


def test_clustering_scores_by_hand_and_against_scikit_learn():
    truth = ["a", "a", "b", "b"]
    # the same partition under other names: 1
    assert clustering_scores(truth, [7, 7, 3, 3]) == {"ari": 1.0, "ami": 1.0}
    # the pair "a" split: agreeing pairs 1 (the b pair); truth pairs 2, predicted pairs 1, of C(4,2) = 6:
    # expected 2 * 1 / 6 = 1/3, maximum (2 + 1) / 2 → ARI = (1 - 1/3) / (3/2 - 1/3) = 4/7
    assert clustering_scores(truth, [0, 1, 2, 2])["ari"] == pytest.approx(4 / 7)
    rng = np.random.default_rng(0)
    truths = rng.integers(0, 5, 40).astype(str)
    predicted = rng.integers(0, 6, 40)
    assert clustering_scores(truths, predicted)["ari"] == pytest.approx(adjusted_rand_score(truths, predicted))
    with pytest.raises(ValueError, match="identities"):
        clustering_scores(["a"], [0, 1])


def test_the_tuned_threshold_recovers_the_true_identities():
    truth = ["p", "p", "p", "q", "q", "r"]
    threshold, ami = tune_cluster_threshold(
        SIMS, truth, [0.05, 0.15, 0.3, 0.5, 0.7, 0.95], lambda t, c: clustering_scores(t, c)["ami"]
    )
    assert ami == pytest.approx(1.0)
    assert threshold == 0.7  # the highest threshold that still joins 3-4 (0.8) and keeps 2-3 (0.6) apart


# --------------------------------------------------------------------------- the pipeline's clusters
def _run_whale(tmp_path: Path, overrides: list[str]) -> Context:
    cfg_path = write_tiny_config(tmp_path, "whale", demo_params={"new_test_images": 3})
    return run_all_stages(cfg_path, tmp_path, overrides)


def test_the_test_is_clustered_and_new_answers_take_their_clusters_known_identity(tmp_path: Path, capsys):
    # half the test answered "new" first; at cosine -1 every image joins one cluster, so every "new"
    # answer takes the identity the known answers vote for
    plain = _run_whale(tmp_path, ["retrieve.unknown_share=0.5"])
    clustered = _run_whale(
        tmp_path,
        [
            "retrieve.unknown_share=0.5",
            "retrieve.cluster.enabled=true",
            "retrieve.cluster.threshold=-1.0",
            "retrieve.cluster.attach=true",
        ],
    )
    root = Path(clustered.cfg.competition.root)
    truth = pd.read_csv(root / "identities.csv")
    unseen = truth[truth["identity"].str.startswith("unseen-")]
    assert unseen.groupby("identity").size().eq(3).all()  # the demo's unseen individuals, 3 photos each

    art = clustered.done["retrieve"]
    clusters = pd.read_csv(art.file("clusters.csv"))
    assert sorted(clusters["id"]) == sorted(truth["image"])
    before = json.loads(plain.done["retrieve"].file("predictions-humpback-2019.json").read_text())
    after = json.loads(art.file("predictions-humpback-2019.json").read_text())
    first_before = dict(zip(before["ids"], [row[0] for row in before["labels"]], strict=True))
    labels_after = dict(zip(after["ids"], after["labels"], strict=True))
    moved = 0
    for row in clusters.itertuples():
        was, labels = first_before[row.id], labels_after[row.id]
        if was == "new_whale" and not row.identity.startswith("new-"):  # its cluster holds a known answer
            assert labels[:2] == [row.identity, "new_whale"]
            moved += 1
        else:
            assert labels[0] == was
    assert moved == art.manifest["result"]["tuned"]["cluster"]["attached"]
    assert clusters["cluster"].nunique() == 1
    assert moved == sum(answer == "new_whale" for answer in first_before.values()) > 0
    report = pd.read_csv(art.file("report.csv"))
    assert report["step"].str.contains("validation images").any()
    assert report["step"].iloc[-1].startswith("  · clusters")  # an indented row: not the headline

    # the score command: ARI / AMI of clusters.csv against the true identities
    assert cli.main(["score", str(art.file("clusters.csv")), str(root / "identities.csv"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = dict(zip(clusters["id"], clusters["cluster"], strict=True))
    expected = clustering_scores(truth["identity"].tolist(), [ids[i] for i in truth["image"]])
    assert printed["all"] == pytest.approx(expected["ari"]) and printed["ami"]["all"] == pytest.approx(expected["ami"])


def test_clustering_without_attach_leaves_the_answers_and_is_refused_where_nothing_is_new(tmp_path: Path):
    plain = _run_whale(tmp_path, [])
    kept = _run_whale(tmp_path, ["retrieve.cluster.enabled=true"])  # attach is off by default
    name = "predictions-humpback-2019.json"
    assert kept.done["retrieve"].file(name).read_text() == plain.done["retrieve"].file(name).read_text()
    assert kept.done["retrieve"].file("clusters.csv").is_file()
    landmark = write_tiny_config(tmp_path, "landmark")
    problems = ineffective_values(load_config(landmark, ["retrieve.cluster.enabled=true"]), "gap")
    assert any("retrieve.cluster.enabled" in p and "identification" in p for p in problems)
    problems = ineffective_values(load_config(landmark, ["retrieve.cluster.linkage=single"]), "gap")
    assert any("retrieve.cluster.linkage: no effect while retrieve.cluster.enabled is false" in p for p in problems)


def test_a_score_file_without_every_image_is_refused(tmp_path: Path):
    (tmp_path / "clusters.csv").write_text("id,cluster\na.jpg,0\n")
    (tmp_path / "identities.csv").write_text("image,identity\na.jpg,x\nb.jpg,y\n")
    with pytest.raises(InputError, match="no cluster for 1 image"):
        score_files(tmp_path / "clusters.csv", tmp_path / "identities.csv")


def test_a_test_too_large_to_cluster_is_refused_before_training(tmp_path: Path, monkeypatch):
    from dmlkit.pipeline import checks

    cfg = load_config(write_tiny_config(tmp_path, "whale"), ["retrieve.cluster.enabled=true"])
    ctx = Context(cfg, artifacts=tmp_path / "artifacts", submissions=tmp_path / "submissions", progress=False)
    ensure_demo_data(ctx)
    checks.check_cluster_size(ctx)  # the tiny test fits
    monkeypatch.setattr(checks, "MAX_CLUSTER_IMAGES", 5)
    with pytest.raises(ConfigError, match=r"retrieve.cluster.enabled: the test holds \d+ images"):
        checks.before_run(ctx, ["train"])
    assert not (tmp_path / "artifacts").exists()


def test_attached_answers_keep_each_labels_own_scores():
    from dmlkit.competitions import Predictions
    from dmlkit.retrieval.identities import cluster_answers

    # two images of one individual (cosine 0.9); the first answered "w1", the second "new" first
    emb = np.array([[1.0, 0.0], [0.9, np.sqrt(1 - 0.81)]], dtype=np.float32)
    pred = Predictions(
        ids=["a", "b"],
        labels=[["w1", "w2", "new_whale"], ["new_whale", "w2", "w1"]],
        scores=[[0.9, 0.5, 0.0], [0.0, 0.4, 0.3]],
        similarities=[[0.9, 0.5, 0.0], [0.0, 0.45, 0.35]],
    )
    frame, out = cluster_answers(emb, pred, "new_whale", threshold=0.5, linkage="average", attach=True)
    assert frame["cluster"].tolist() == [0, 0] and frame["identity"].tolist() == ["w1", "w1"]
    assert out.labels == [["w1", "w2", "new_whale"], ["w1", "new_whale", "w2"]]
    assert out.scores[1] == [0.3, 0.0, 0.4] and out.similarities[1] == [0.35, 0.0, 0.45]
    assert pred.labels[1][0] == "new_whale"  # the input is left as it was
    # apart (threshold above their cosine): nothing to attach, new identities numbered by cluster
    frame, out = cluster_answers(emb, pred, "new_whale", threshold=0.95, linkage="average", attach=True)
    assert frame["identity"].tolist() == ["w1", "new-1"] and out.labels == pred.labels


def test_each_unknown_row_is_its_own_identity_and_singletons_are_counted():
    from dmlkit.retrieval.identities import grouped_share, identity_truths

    truth = identity_truths(["a", "new_whale", "a", "new_whale", "b"], "new_whale")
    assert truth[0] == truth[2] == "a" and len({truth[1], truth[3], "a", "b"}) == 4
    assert grouped_share(truth) == pytest.approx(2 / 5)  # only the two "a" images share an identity


def test_clusters_tune_on_the_queries_and_every_image_of_the_classes_held_out_of_the_fold():
    from dmlkit.retrieval.validation import validation_split
    from dmlkit.stages.retrieve import cluster_tuning_rows

    # class c is held out of fold 0: its images in folds 1 and 2 never train fold 0's members
    folds = pd.DataFrame(
        {
            "id": ["a1", "a2", "b1", "c1", "c2", "c3"],
            "label": ["a", "a", "b", "c", "c", "c"],
            "fold": [0, 1, 1, 0, 1, 2],
            "known": True,
            "unknown_fold": [-1, -1, -1, 0, 0, 0],
        }
    )
    table = folds[["id", "label"]].assign(role="train")
    split = validation_split(table, folds, 0)
    rows, labels = cluster_tuning_rows(table, folds, split, 0)
    assert rows.tolist() == [0, 3, 4, 5] and labels.tolist() == ["a", "c", "c", "c"]
    # without held-out classes: the fold's queries only
    rows, labels = cluster_tuning_rows(table, folds.drop(columns="unknown_fold"), split, 0)
    assert rows.tolist() == [0, 3] and labels.tolist() == ["a", "c"]


def test_a_cluster_threshold_that_is_no_cosine_is_refused_at_load(tmp_path: Path):
    cfg_path = write_tiny_config(tmp_path, "whale")
    assert load_config(cfg_path, ["retrieve.cluster.threshold=-1.0"]).retrieve.cluster.threshold == -1.0
    assert load_config(cfg_path, ["retrieve.cluster.threshold=tune"]).retrieve.cluster.threshold == "tune"
    with pytest.raises(ConfigError, match=r"retrieve\.cluster\.threshold"):
        load_config(cfg_path, ["retrieve.cluster.threshold=5"])
