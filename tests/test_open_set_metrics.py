"""BAKS, BAUS and their geometric mean (AnimalCLEF 2025) against hand-computed values, in the
validation report and in `./run.sh score` for identification formats."""

import math

import pandas as pd
import pytest

from dmlkit.competitions import Predictions, get_adapter
from dmlkit.metrics import open_set_scores

NEW = "new_whale"


def test_baks_balances_known_identities_and_baus_counts_unknowns_answered_new():
    # identity a: 3 images, 2 right (2/3); identity b: 1 image, right (1); c: 1 image, wrong (0)
    # BAKS = (2/3 + 1 + 0) / 3 = 5/9 (plain accuracy would be 3/5); unknowns: 2 of 3 answered new
    top1 = ["a", "a", "b", "b", "x", NEW, NEW, "a"]
    truths = ["a", "a", "a", "b", "c", NEW, NEW, NEW]
    scores = open_set_scores(top1, truths, NEW)
    assert scores["baks"] == pytest.approx(5 / 9)
    assert scores["baus"] == pytest.approx(2 / 3)
    assert scores["open_set"] == pytest.approx(math.sqrt(5 / 9 * 2 / 3))
    # a known image answered "new" is wrong for BAKS; no unknowns: BAUS undefined, the mean too
    none_unknown = open_set_scores(["a", NEW], ["a", "b"], NEW)
    assert none_unknown["baks"] == pytest.approx(0.5) and none_unknown["baus"] is None
    assert none_unknown["open_set"] is None


def test_identification_reports_and_scores_carry_open_set_metrics(tmp_path):
    adapter = get_adapter("humpback-2019")
    predictions = Predictions(ids=["q0", "q1", "q2", "q3"], labels=[["a", "b"], [NEW, "a"], ["b"], [NEW]])
    truths = ["a", "a", "b", NEW]
    report = adapter.unknown_report(predictions, truths)
    assert report["baks"] == pytest.approx((0.5 + 1.0) / 2)  # a: 1 of 2; b: 1 of 1
    assert report["baus"] == pytest.approx(1.0)
    assert report["open_set"] == pytest.approx(math.sqrt(0.75))

    submission = pd.DataFrame({"Image": ["q0", "q1", "q2", "q3"], "Id": ["a b", "new_whale a", "b", "new_whale"]})
    solution = pd.DataFrame({"Image": ["q0", "q1", "q2", "q3"], "Id": truths, "Usage": ["Public"] * 4})
    result = adapter.score(submission, solution)
    assert result["open_set"]["public"] == {"baks": 0.75, "baus": 1.0, "open_set": pytest.approx(math.sqrt(0.75))}
    assert result["open_set"]["private"] is None
