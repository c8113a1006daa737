"""Pseudo-label rounds: which answers become training rows, that they never reach validation or
the gallery, and that each round is cached on its own, keyed by the previous round's answers."""

import numpy as np
import pandas as pd
import pytest

from conftest import write_tiny_config
from dmlkit.config import PseudoConfig, load_config
from dmlkit.pipeline import STAGES, Context, ensure_demo_data, load_table, pseudo_rounds, run_stage
from dmlkit.stages.folds import fold_parts
from dmlkit.stages.pseudo import precision, select_pseudo, with_pseudo_rows
from dmlkit.stages.train import aux_targets

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

    again = run_rounds(cfg, tmp_path, ["pseudo.rounds=1", "pseudo.min_cosine=0.5"])
    assert again.previous.done["train/m0"].reused and again.previous.done["retrieve"].reused
    assert not again.done["folds"].reused  # another bar: another round-1 key
    with pytest.raises(Exception, match=r"pseudo.min_cosine: no effect while pseudo.rounds is 0"):
        Context(load_config(cfg, ["pseudo.min_cosine=0.5"]))
