import numpy as np
import pytest

from dmlkit.metrics import (
    average_precision_at_k,
    global_average_precision,
    map_at_5,
    mean_average_precision_at_k,
    recall_at_k,
)


def test_gap_hand_computed():
    # ranked by score: q1 (right), q3 (wrong: non-landmark), q2 (right); q4 has no prediction.
    ids = ["q1", "q2", "q3", "q4"]
    pred = ["a", "b", "c", None]
    score = [0.9, 0.5, 0.7, 0.0]
    truth = ["a", "b", None, "d"]
    # P(1)=1, P(3)=2/3; M = 3 queries with a landmark
    assert global_average_precision(ids, pred, score, truth) == pytest.approx((1 + 2 / 3) / 3)


def test_gap_ties_break_by_id_ascending():
    ids = ["b", "a"]
    # equal scores: 'a' ranks first. a is wrong, b right → P(2)=1/2
    assert global_average_precision(ids, ["x", "z"], [0.5, 0.5], ["x", "y"]) == pytest.approx(0.5 / 2)
    assert global_average_precision(["a", "b"], ["y", "z"], [0.5, 0.5], ["y", "q"]) == pytest.approx(1 / 2)


def test_gap_no_landmark_queries_is_zero_and_empty_string_is_no_prediction():
    assert global_average_precision(["a"], ["x"], [1.0], [None]) == 0.0
    assert global_average_precision(["a", "b"], ["", "y"], [9.0, 1.0], ["x", "y"]) == pytest.approx(1 / 2)


def test_map100_duplicates_ignored_and_normalised_by_min_relevant():
    # duplicates removed: [a, b, c] → hits at 1 and 3: (1 + 2/3) / min(2, 100)
    assert average_precision_at_k(["a", "a", "b", "c"], {"a", "c"}) == pytest.approx((1 + 2 / 3) / 2)
    # relevant beyond k counts with AP 0
    assert average_precision_at_k(["x", "y"], {"z"}, k=1) == 0.0
    assert mean_average_precision_at_k([["a"], ["q"]], [{"a"}, {"b"}]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        average_precision_at_k(["a"], set())


def test_map5_first_correct_and_unseen_labels():
    preds = [["a", "b"], ["x", "y", "z", "w", "v", "t"], ["new_whale"], ["b", "b", "a"]]
    truths = ["b", "t", "new_whale", "a"]
    assert map_at_5(preds, truths) == pytest.approx((1 / 2 + 0 + 1 + 1 / 3) / 4)


def test_recall_at_k():
    neigh = np.array([["a", "b"], ["c", "d"], ["e", "f"]])
    assert recall_at_k(neigh, np.array(["b", "c", "x"]), 1) == pytest.approx(1 / 3)
    assert recall_at_k(neigh, np.array(["b", "c", "x"]), 2) == pytest.approx(2 / 3)
