"""Pseudo-label rounds: which answers become training rows, that they never reach validation or
the gallery, and that each round is cached on its own, keyed by the previous round's answers."""

import math

import numpy as np
import pandas as pd
import pytest

from conftest import write_tiny_config
from dmlkit.config import PseudoConfig, load_config
from dmlkit.data.folds import fold_parts
from dmlkit.pipeline.checks import check_values
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.pipeline.rounds import pseudo_rounds
from dmlkit.pipeline.table import STAGE_NAMES as STAGES
from dmlkit.pipeline.table import run_stage
from dmlkit.pseudo import (
    cosine_bar,
    precision,
    precision_bar,
    select_pseudo,
    validation_precision,
    with_pseudo_rows,
)
from dmlkit.stages.folds import load_table
from dmlkit.training.data import aux_targets

ANSWERS = pd.DataFrame(
    {
        "id": ["t1", "t2", "t3", "t4", "t5"],
        "label": ["a", "new_whale", "b", "a", "c"],
        "cosine": [0.9, np.nan, 0.5, 0.7, np.nan],  # t5: a label without a neighbour's cosine
    }
)


def test_select_takes_known_answers_above_the_bar_or_the_top_share():
    by_cosine = select_pseudo(ANSWERS, "new_whale", PseudoConfig(rounds=1, min_cosine=0.6))
    assert by_cosine["id"].tolist() == ["t1", "t4"]
    by_share = select_pseudo(ANSWERS, "new_whale", PseudoConfig(rounds=1, top_share=0.6))  # 3 of 5 test images
    assert by_share["id"].tolist() == ["t1", "t3", "t4"]
    assert precision(by_cosine, {"t1": "a", "t4": "b"}) == pytest.approx(0.5)
    assert precision(by_cosine, {}) is None


# validation first answers, best first by cosine: right, right, wrong, right, wrong, wrong; an unknown
# answer and a label without a cosine never count
VALIDATION = pd.DataFrame(
    {
        "id": [str(i) for i in range(8)],
        "label": ["a", "b", "c", "d", "e", "f", "new_whale", "g"],
        "cosine": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.95, np.nan],
        "truth": ["a", "b", "x", "d", "x", "x", "new_whale", "g"],
    }
)


@pytest.mark.parametrize(
    ("min_precision", "bar"),
    # precision of the answers at or above each cosine: 1, 1, 2/3, 3/4, 3/5, 1/2
    [(1.0, 0.8), (0.8, 0.8), (0.75, 0.6), (0.7, 0.6), (0.5, 0.4)],
)
def test_the_precision_bar_is_the_lowest_cosine_that_keeps_the_precision(min_precision, bar):
    assert precision_bar(VALIDATION, "new_whale", min_precision) == pytest.approx(bar)


def test_the_precision_bar_never_splits_equal_cosines_and_may_admit_nothing():
    tied = VALIDATION.assign(cosine=[0.9, 0.8, 0.8, 0.6, 0.5, 0.4, 0.95, np.nan])  # 0.8: one right, one wrong
    assert precision_bar(tied, "new_whale", 0.9) == pytest.approx(0.9)  # 0.8 would admit both: 2/3
    wrong = VALIDATION.assign(truth="x")
    assert precision_bar(wrong, "new_whale", 0.1) == math.inf
    assert select_pseudo(ANSWERS, "new_whale", PseudoConfig(rounds=1), math.inf).empty


def test_validation_precision_at_a_bar_and_where_the_bar_comes_from():
    assert validation_precision(VALIDATION, "new_whale", 0.6) == (4, pytest.approx(0.75))
    assert validation_precision(VALIDATION, "new_whale", 0.99) == (0, None)
    assert cosine_bar(PseudoConfig(rounds=1), VALIDATION, "new_whale") == 0.65  # min_cosine's default
    assert cosine_bar(PseudoConfig(rounds=1, top_share=0.2), VALIDATION, "new_whale") is None
    by_precision = PseudoConfig(rounds=1, min_precision=0.75)
    assert cosine_bar(by_precision, VALIDATION, "new_whale") == pytest.approx(0.6)
    with pytest.raises(ValueError, match="no validation answers"):
        cosine_bar(by_precision, None, "new_whale")
    assert select_pseudo(ANSWERS, "new_whale", by_precision, 0.6)["id"].tolist() == ["t1", "t4"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pseudo.min_precision=0.9"], "pseudo.min_precision: no effect while pseudo.rounds is 0"),
        (["pseudo.rounds=1", "pseudo.min_precision=0.9", "pseudo.top_share=0.2"], "choose one way"),
        (["pseudo.rounds=1", "pseudo.min_precision=0.9", "pseudo.min_cosine=0.5"], "validation sets the bar"),
    ],
)
def test_pseudo_settings_that_contradict_each_other_fail_at_load(tmp_path, overrides, message):
    cfg = write_tiny_config(tmp_path, "whale")
    with pytest.raises(Exception, match=message):
        check_values(Context(load_config(cfg, overrides)))


def test_pseudo_rows_train_every_fold_and_validate_none():
    folds = pd.DataFrame(
        {
            "id": ["x1", "x2", "x3", "x4"],
            "path": ["p1", "p2", "p3", "p4"],
            "label": ["a", "a", "b", "b"],
            "role": "train",
            "known": True,
            "fold": [0, 1, 0, 1],
            "unknown_fold": -1,
        }
    )
    table = pd.DataFrame({"id": ["t1", "t4"], "path": ["q1", "q4"], "role": "test"})
    chosen = select_pseudo(ANSWERS, "new_whale", PseudoConfig(rounds=1, min_cosine=0.6))
    augmented = with_pseudo_rows(folds, table, chosen)
    assert augmented.tail(2)[["id", "path", "label", "fold"]].values.tolist() == [
        ["pseudo:t1", "q1", "a", -1],
        ["pseudo:t4", "q4", "a", -1],
    ]
    for fold in (0, 1):
        train, val = fold_parts(augmented, fold)
        assert {"pseudo:t1", "pseudo:t4"} <= set(train["id"])
        assert not val["id"].str.startswith("pseudo:").any()
    with pytest.raises(ValueError, match="not test images"):
        with_pseudo_rows(folds, table.head(1), chosen)


def test_pseudo_rows_keep_the_tables_other_columns_blank_where_the_test_has_none():
    # Happywhale: the training rows have a species, the test rows none; a wildlife table may give both
    folds = pd.DataFrame(
        {
            "id": ["x1", "x2"],
            "path": ["p1", "p2"],
            "label": ["a", "b"],
            "species": ["beluga", "blue_whale"],
            "date": ["2020-01-01", "2020-01-02"],
            "role": "train",
            "known": True,
            "fold": [0, 1],
            "unknown_fold": -1,
        }
    )
    table = pd.DataFrame({"id": ["t1", "t4"], "path": ["q1", "q4"], "role": "test", "species": [None, "beluga"]})
    chosen = select_pseudo(ANSWERS, "new_whale", PseudoConfig(rounds=1, min_cosine=0.6))
    augmented = with_pseudo_rows(folds, table, chosen)
    assert list(augmented.columns) == list(folds.columns)
    pseudo = augmented.tail(2)
    assert pseudo["path"].tolist() == ["q1", "q4"]
    assert pseudo["species"].tolist()[1] == "beluga" and pd.isna(pseudo["species"].tolist()[0])
    assert pseudo["date"].isna().all()
    classes, targets = aux_targets(augmented, "species", "m0")
    assert classes == ["beluga", "blue_whale"]
    assert targets.tolist() == [0, 1, -1, 0]  # the blank pseudo row takes no part in the species loss


def run_rounds(cfg, tmp_path, overrides=()) -> Context:
    ctx = Context(
        load_config(cfg, list(overrides)), artifacts=tmp_path / "a", submissions=tmp_path / "s", progress=False
    )
    ensure_demo_data(ctx)
    last = pseudo_rounds(ctx)
    for stage in STAGES:
        run_stage(last, stage)
    return last


def test_a_round_trains_on_the_previous_answers_and_is_cached_on_its_own(tmp_path):
    cfg = write_tiny_config(tmp_path, "whale")
    last = run_rounds(cfg, tmp_path, ["pseudo.rounds=1", "pseudo.min_cosine=-0.99"])
    first = last.previous
    assert last.round == 1 and first.round == 0
    answers = pd.read_csv(first.done["retrieve"].file("answers-humpback-2019.csv"), keep_default_na=False)
    known = answers[(answers["label"] != "new_whale") & (answers["cosine"] != "")]
    _, folds = load_table(last.done["folds"])
    pseudo = folds[folds["id"].str.startswith("pseudo:")]
    assert sorted(pseudo["id"].str.removeprefix("pseudo:")) == sorted(known["id"]) and len(pseudo) > 0
    assert last.done["train/m0"].key != first.done["train/m0"].key  # the round retrains
    assert "round-1" in str(last.done["submit"].path)  # the last round submits
    assert (tmp_path / "s" / "tiny-whale.csv").is_file()
    result = last.done["folds"].manifest["result"]["pseudo"]
    assert result["rows"] == len(pseudo) and result["precision_against_answers"] is not None
    # the validation fold's queries, each with its first answer and truth: the bar's precision is measured there
    validation = pd.read_csv(first.done["retrieve"].file("answers-validation.csv"), keep_default_na=False)
    _, val_part = fold_parts(load_table(first.done["folds"])[1], 0)
    expected = np.where(val_part["known"], val_part["label"], "new_whale")
    assert sorted(validation["truth"]) == sorted(expected)
    scored = validation[(validation["label"] != "new_whale") & (validation["cosine"] != "")]
    assert result["cosine_bar"] == -0.99 and result["validation_above_bar"] == len(scored) > 0
    assert result["validation_precision"] == pytest.approx((scored["label"] == scored["truth"]).mean())

    # a bar measured on those answers: the test rows are exactly the answers at or above it
    measured = run_rounds(cfg, tmp_path, ["pseudo.rounds=1", "pseudo.min_precision=0.5"])
    assert measured.previous.done["retrieve"].reused
    validation["cosine"] = pd.to_numeric(validation["cosine"])
    bar = precision_bar(validation, "new_whale", 0.5)
    result = measured.done["folds"].manifest["result"]["pseudo"]
    assert result["bar_from"] == "min_precision"
    if math.isinf(bar):  # no answer right enough: no rows, and round 0's members stand for round 1's
        assert result["cosine_bar"] is None and result["rows"] == 0
        assert measured.done["train/m0"].reused and measured.done["train/m0"].path == first.done["train/m0"].path
    else:
        assert result["cosine_bar"] == pytest.approx(bar) and result["validation_precision"] >= 0.5
        answers["cosine"] = pd.to_numeric(answers["cosine"])
        assert result["rows"] == ((answers["cosine"] >= bar) & (answers["label"] != "new_whale")).sum()

    again = run_rounds(cfg, tmp_path, ["pseudo.rounds=1", "pseudo.min_cosine=0.5"])
    assert again.previous.done["train/m0"].reused and again.previous.done["retrieve"].reused
    assert not again.done["folds"].reused  # another bar: another round-1 key
    with pytest.raises(Exception, match=r"pseudo.min_cosine: no effect while pseudo.rounds is 0"):
        check_values(Context(load_config(cfg, ["pseudo.min_cosine=0.5"])))
