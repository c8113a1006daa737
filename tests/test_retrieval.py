from dataclasses import replace

import numpy as np
import pytest

from dmlkit.retrieval import search
from dmlkit.retrieval.chain import Neighbours
from dmlkit.retrieval.ensemble import concatenate, pca_whiten
from dmlkit.retrieval.expansion import database_augmentation, query_expansion, weighted_neighbour_mean
from dmlkit.retrieval.rerank import distractor_penalty, k_reciprocal_rerank, penalised_similarity
from dmlkit.retrieval.voting import (
    fuse_head,
    head_label_scores,
    insert_unknown,
    landmark_confidence,
    tune_unknown_threshold,
    vote,
)


def unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng, n, d, clusters):
    centres = unit(rng, clusters, d)
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_faiss_against_brute_force(kind):
    rng = np.random.default_rng(0)
    q, g = unit(rng, 50, 16), unit(rng, 400, 16)
    sims, ids = search.knn(q, g, k=10, kind=kind, nlist=4, nprobe=4, batch=7, progress=False)
    dense = q @ g.T
    expected = np.argsort(-dense, axis=1)[:, :10]
    if kind == "flat":
        assert (ids == expected).all()
        assert np.allclose(sims, np.take_along_axis(dense, expected, 1), atol=1e-5)
    else:  # approximate: high recall of the true top-10
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, expected, strict=True)])
        assert recall > 0.9


def test_gpu_failure_falls_back_to_cpu(monkeypatch):
    """A GPU that faiss sees but that fails the child-process probe must not be used."""
    search.gpu_usable.cache_clear()
    monkeypatch.setattr(search.faiss, "get_num_gpus", lambda: 1)

    class Failed:
        returncode = -6  # SIGABRT, as a broken faiss GPU build does
        stderr = b"Faiss assertion failed: no kernel image for this device"

    monkeypatch.setattr(search.subprocess, "run", lambda *a, **k: Failed())
    try:
        assert search.gpu_usable() is False
        rng = np.random.default_rng(1)
        q, g = unit(rng, 5, 8), unit(rng, 30, 8)
        _, ids = search.knn(q, g, k=3, use_gpu="yes", progress=False)
        assert (ids == np.argsort(-(q @ g.T), axis=1)[:, :3]).all()
    finally:
        search.gpu_usable.cache_clear()


def test_real_probe_without_gpu_is_false():
    if search.faiss.get_num_gpus() > 0:
        pytest.skip("this machine has a GPU: the probe's no-GPU answer cannot be checked here")
    search.gpu_usable.cache_clear()
    assert search.gpu_usable() is False


def dense_alpha_qe(queries, gallery, alpha, k):
    out = []
    for q in queries:
        s = gallery @ q
        top = np.argsort(-s)[:k]
        v = q + sum(max(s[j], 0) ** alpha * gallery[j] for j in top)
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def test_query_expansion_and_dba_against_dense_reference():
    rng = np.random.default_rng(2)
    q, g = clustered(rng, 20, 8, 4), clustered(rng, 60, 8, 4)
    sims, ids = search.knn(q, g, k=5, progress=False)
    assert np.allclose(query_expansion(q, g, sims, ids, 3.0, 5), dense_alpha_qe(q, g, 3.0, 5), atol=1e-5)
    gs, gi = search.knn(g, g, k=6, progress=False)
    expected = []
    for i, x in enumerate(g):
        s = g @ x
        order = [j for j in np.argsort(-s) if j != i][:5]
        v = x + sum(max(s[j], 0) ** 3.0 * g[j] for j in order)
        expected.append(v / np.linalg.norm(v))
    assert np.allclose(database_augmentation(g, gs, gi, 3.0, 5), np.array(expected), atol=1e-5)
    chunked = weighted_neighbour_mean(g, q, sims, ids, 3.0, 5, rows_per_chunk=7)  # 20 rows: 3 chunks
    assert np.allclose(chunked, dense_alpha_qe(q, g, 3.0, 5), atol=1e-5)


def dense_k_reciprocal(x, n_queries, k1, k2, lam):
    """Zhong et al.'s reference algorithm, dense N×N, with d = 2 − 2·cos (no column normalisation)."""
    original = 2.0 - 2.0 * (x @ x.T).astype(np.float64)
    n = len(x)
    rank = np.argsort(original, axis=1, kind="stable")
    v = np.zeros((n, n))
    for i in range(n):
        forward = rank[i, : k1 + 1]
        backward = rank[forward, : k1 + 1]
        recip = forward[np.where(backward == i)[0]]
        expansion = recip
        for candidate in recip:
            cf = rank[candidate, : int(np.around(k1 / 2)) + 1]
            cb = rank[cf, : int(np.around(k1 / 2)) + 1]
            crecip = cf[np.where(cb == candidate)[0]]
            if len(np.intersect1d(crecip, recip)) > 2 / 3 * len(crecip):
                expansion = np.append(expansion, crecip)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        v[i, expansion] = weight / weight.sum()
    if k2 != 1:
        v = np.array([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.zeros((n_queries, n))
    for i in range(n_queries):
        smin = np.minimum(v[i][None, :], v).sum(axis=1)
        jaccard[i] = 1 - smin / (2 - smin)
    return ((1 - lam) * jaccard + lam * original[:n_queries])[:, n_queries:]


@pytest.mark.parametrize(("k1", "k2"), [(6, 3), (5, 1), (10, 4)])
def test_sparse_k_reciprocal_equals_dense_reference(k1, k2):
    rng = np.random.default_rng(3)
    x = clustered(rng, 90, 12, 6)
    n_queries = 15
    dense = dense_k_reciprocal(x, n_queries, k1, k2, 0.3)
    graph = np.argsort(-(x @ x.T), axis=1, kind="stable")[:, : k1 + 1]
    candidates = np.argsort(-(x[:n_queries] @ x[n_queries:].T), axis=1, kind="stable")[:, :25]
    dist, ids = k_reciprocal_rerank(x[:n_queries], x[n_queries:], graph, k1, k2, 0.3, candidates, progress=False)
    assert sorted(ids[0]) == sorted(candidates[0])
    expected = np.take_along_axis(dense, ids, axis=1)
    assert np.allclose(dist, expected, atol=1e-5)
    assert (np.diff(dist, axis=1) >= -1e-12).all()  # best first
    # the dense reference ranks the same candidates in the same order
    assert (np.argsort(expected, axis=1, kind="stable") == np.arange(ids.shape[1])).all()


def test_k_reciprocal_keeps_every_query_candidates_among_near_duplicate_queries():
    """30 near-duplicate queries fill each other's rows of a K=26 joint graph: the queries still get
    their own nearest gallery images, re-scored as the dense reference scores them."""
    rng = np.random.default_rng(5)
    gallery = clustered(rng, 200, 16, 8)
    anchor = unit(rng, 1, 16)
    duplicates = anchor + 0.01 * rng.normal(size=(30, 16)).astype(np.float32)
    queries = np.concatenate(
        [duplicates / np.linalg.norm(duplicates, axis=1, keepdims=True), clustered(rng, 30, 16, 8)]
    )
    x = np.concatenate([queries, gallery])
    graph = np.argsort(-(x @ x.T), axis=1, kind="stable")[:, :26]
    assert (graph[:30] < 60).all()  # the duplicates' graph rows hold no gallery image at all
    candidates = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :20]
    dist, ids = k_reciprocal_rerank(queries, gallery, graph, 20, 6, 0.3, candidates, progress=False)
    assert ids.shape == (60, 20) and (ids >= 0).all() and np.isfinite(dist).all()
    assert all(set(ids[i]) == set(candidates[i]) for i in range(60))
    dense = dense_k_reciprocal(x, 60, 20, 6, 0.3)
    assert np.allclose(dist, np.take_along_axis(dense, ids, axis=1), atol=1e-5)


def test_k_reciprocal_pads_missing_candidates_last():
    rng = np.random.default_rng(6)
    x = clustered(rng, 40, 8, 4)
    graph = np.argsort(-(x @ x.T), axis=1, kind="stable")[:, :8]
    candidates = np.array([[3, -1, 5], [-1, -1, 0]])
    dist, ids = k_reciprocal_rerank(x[:2], x[2:], graph, 6, 2, 0.3, candidates, progress=False)
    assert sorted(ids[0][:2]) == [3, 5] and ids[0][2] == -1 and np.isinf(dist[0][2])
    assert ids[1].tolist() == [0, -1, -1] and np.isinf(dist[1][1:]).all()


def test_k_reciprocal_needs_enough_neighbours():
    x = unit(np.random.default_rng(0), 10, 4)
    with pytest.raises(ValueError, match="k1"):
        k_reciprocal_rerank(x[:2], x[2:], np.argsort(-(x @ x.T), axis=1)[:, :3], k1=5, k2=2, lam=0.3)


def test_distractor_penalty():
    to_distractors = np.array([[0.9, 0.8, 0.1], [0.2, 0.1, 0.0]])
    b = distractor_penalty(to_distractors, 2)
    assert b.tolist() == pytest.approx([0.85, 0.15])
    sims = np.array([[0.9, -0.2]])
    out = penalised_similarity(sims, np.array([[1, 0]]), b, np.array([0.1]))
    assert out.tolist()[0] == pytest.approx([0.9 - 0.15 - 0.1, 0.0 - 0.85 - 0.1])


def test_vote_sums_powered_similarities_per_label():
    sims = np.array([[0.9, 0.8, 0.7, 0.1]])
    ids = np.array([[0, 1, 2, 3]])
    labels = np.array(["a", "b", "b", "a"])
    ranked, scores = vote(sims, ids, labels, k=3, power=2.0)
    assert ranked == [["b", "a"]]
    assert scores[0] == pytest.approx([0.8**2 + 0.7**2, 0.81])
    assert vote(sims, ids, labels, k=1, power=2.0)[0] == [["a"]]
    ranked, scores = vote(sims, ids, labels, k=1, power=2.0, fill=True)
    assert ranked == [["a", "b"]]  # the vote of one neighbour, then the next neighbours' labels
    assert scores[0] == pytest.approx([0.81, 0.64])


def test_vote_fills_five_distinct_labels_from_the_neighbours_beyond_k():
    sims = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]])
    ids = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, -1, -1, -1, -1, -1]])
    labels = np.array(["a", "a", "b", "a", "c", "c", "d", "e"])
    ranked, scores = vote(sims, ids, labels, k=3, power=1.0, fill=True)
    assert ranked[0] == ["a", "b", "c", "d", "e"]  # c from neighbour 4, d 6, e 7: distinct, nearest first
    assert scores[0] == pytest.approx([1.7, 0.7, 0.5, 0.3, 0.2])
    assert ranked[1] == ["a"]  # the gallery offers no other label


def test_insert_unknown_and_tune_threshold():
    labels = [["a", "b"], ["c", "d"], ["e"]]
    scores = [[0.9, 0.2], [0.3, 0.1], [0.5]]
    assert insert_unknown(labels, scores, "new", 0.4) == [["a", "new", "b"], ["new", "c", "d"], ["e", "new"]]
    truths = ["a", "new", "new"]
    threshold, score = tune_unknown_threshold(labels, scores, truths, "new", grid=[0.0, 0.4, 0.6, 1.0])
    # 0.6: [a new b] → 1, [new c d] → 1, [new e] → 1
    assert threshold == pytest.approx(0.6) and score == pytest.approx(1.0)


def test_landmark_confidence_forms():
    scores = [[0.9, 0.3], [0.5], []]
    labels = [["a", "b"], ["c"], []]
    assert landmark_confidence(labels, scores, "vote").tolist() == pytest.approx([0.9, 0.5, 0.0])
    assert landmark_confidence(labels, scores, "margin").tolist() == pytest.approx([0.6, 0.5, 0.0])
    assert landmark_confidence(labels, scores, "share").tolist() == pytest.approx([0.81 / 1.2, 0.5, 0.0])


def test_ensemble_concatenation_and_whitening():
    rng = np.random.default_rng(4)
    a, b = unit(rng, 10, 4) * 3, unit(rng, 10, 6)
    out = concatenate([a, b], [1.0, 2.0])
    assert out.shape == (10, 10) and np.allclose(np.linalg.norm(out, axis=1), 1)
    assert np.allclose(out[:, :4] * np.sqrt(5), a / 3, atol=1e-6)  # each part normalised, weighted 1 : 2
    with pytest.raises(ValueError, match="different numbers"):
        concatenate([a, b[:5]], [1, 1])
    blocked = concatenate([a, b], [1.0, 2.0], block=3)  # written 3 rows at a time: row 9 is a block alone
    assert np.array_equal(blocked, out)
    data = clustered(rng, 50, 8, 3).astype(np.float64)
    fit = np.arange(50) < 40
    white = pca_whiten(data, fit, dim=4)
    # the reference: centre on the fit rows, project on their covariance's top 4 eigenvectors, divide
    # by the square roots of the eigenvalues (unit variance), renormalise; a component's sign is free
    values, vectors = np.linalg.eigh(np.cov(data[fit], rowvar=False))
    top = np.argsort(values)[::-1][:4]
    expected = (data - data[fit].mean(axis=0)) @ vectors[:, top] / np.sqrt(values[top])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert white.shape == (50, 4)
    assert np.allclose(white @ white.T, expected @ expected.T, atol=1e-4)  # the same up to signs
    assert np.allclose(np.abs(white), np.abs(expected), atol=1e-4)


def test_head_fusion_hand_computed():
    """(1−w)·vote + w·max(cos,0)^p over the union of voted and head labels; w=0.4, p=2."""
    labels, scores = fuse_head([["a", "b"]], [[0.5, 0.2]], [{"b": 0.9, "c": 0.5, "d": -0.3}], 0.4, 2.0)
    # a: 0.6·0.5 = 0.3; b: 0.6·0.2 + 0.4·0.81 = 0.444; c: 0.4·0.25 = 0.1; d: 0.4·0 = 0
    assert labels == [["b", "a", "c", "d"]]
    assert scores[0] == pytest.approx([0.444, 0.3, 0.1, 0.0])


def test_head_label_scores_take_each_label_best_over_members():
    heads = {
        "m1": (np.array([["a", "b"], ["c", "a"]], dtype=object), np.array([[0.9, 0.2], [0.5, 0.4]])),
        "m2": (np.array([["b", "a"], ["a", "d"]], dtype=object), np.array([[0.7, 0.3], [0.6, 0.1]])),
    }
    assert head_label_scores(heads, np.array([1, 0])) == [
        {"c": 0.5, "a": 0.6, "d": 0.1},
        {"a": 0.9, "b": 0.7},
    ]


def test_few_queries_top_k_matches_the_dense_argsort_over_the_chosen_rows():
    from dmlkit.stages.retrieve import few_queries_top_k

    rng = np.random.default_rng(7)
    emb = unit(rng, 300, 8)
    rows = rng.permutation(300)[:170]  # the gallery is a subset of the table's rows, in any order
    queries = emb[:4]
    expected = np.argsort(-(queries @ emb[rows].T), axis=1, kind="stable")[:, :10]
    assert np.array_equal(few_queries_top_k(queries, emb, rows, 10, block=32), expected)
    assert np.array_equal(few_queries_top_k(queries, emb, rows, 10), expected)


def test_validation_queries_cap_samples_the_fold_the_same_way_every_time():
    import pandas as pd

    from dmlkit.retrieval.validation import validation_split

    ids = [f"img{n}" for n in range(30)]
    labels = [f"c{n % 6}" for n in range(30)]
    table = pd.DataFrame({"id": ids, "role": "train", "label": labels})
    folds = pd.DataFrame({"id": ids, "label": labels, "fold": [n % 3 for n in range(30)], "known": True})
    full = validation_split(table, folds, 1)
    capped = validation_split(table, folds, 1, max_queries=4)
    assert len(full.query_rows) == 10 and len(capped.query_rows) == 4
    assert set(capped.query_rows) <= set(full.query_rows)
    assert [labels[r] for r in capped.query_rows] == capped.query_labels.tolist()
    np.testing.assert_array_equal(capped.gallery_rows, full.gallery_rows)
    np.testing.assert_array_equal(validation_split(table, folds, 1, max_queries=4).query_rows, capped.query_rows)
    np.testing.assert_array_equal(validation_split(table, folds, 1, max_queries=50).query_rows, full.query_rows)


def test_a_new_reranking_step_is_one_function_and_one_line_and_runs_after_verification():
    """The chain's extension point: a toy step (reverse each shortlist) appended to the chain runs
    after verification, sees the verified ranking, and its result is what the chain returns."""
    from dmlkit.config import RetrieveConfig, VerifyConfig
    from dmlkit.retrieval.chain import CHAIN, ChainInputs, ChainStep, run_chain
    from dmlkit.retrieval.second_stage import SecondStage

    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((12, 8)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[:3] + 0.05 * rng.standard_normal((3, 8)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    # verification: gallery image 11 has 100 inliers with every query, the others none
    verifier = SecondStage(
        VerifyConfig(enabled=True, top_k=12, weight=5.0, cap=100),
        lambda q_rows, g_rows, ids: np.where(ids == 11, 100, 0),
    )
    seen = []

    def reverse(cfg, state, progress):
        seen.append(state.result.ids.copy())
        return replace(state, result=Neighbours(state.result.sims[:, ::-1], state.result.ids[:, ::-1]))

    steps = [*CHAIN, ChainStep("+ reversed", lambda cfg, inputs: True, reverse)]  # the one line
    cfg = RetrieveConfig(k=12)
    inputs = ChainInputs(queries, gallery, np.arange(3), np.arange(3, 15), retrieval=True, verifier=verifier)
    rows = []
    final = run_chain(cfg, inputs, lambda name, n: rows.append(name), progress=False, steps=steps)
    assert rows[0] == "kNN" and rows[1].startswith("+ verification") and rows[2] == "+ reversed"
    assert (seen[0][:, 0] == 11).all()  # the toy step ran on the verified shortlists (image 11 first)
    assert (final.ids[:, -1] == 11).all() and final.ids.shape == (3, 12)
