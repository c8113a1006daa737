"""The peer benchmark's one evaluation function and its split (benchmarks/peers.py), on hand-made cases."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
peers = pytest.importorskip("peers")


def test_new_goes_before_the_first_class_under_the_threshold():
    labels = np.array([["A", "B", "C"]], dtype=object)
    cosines = np.array([[0.9, 0.4, 0.1]])
    assert peers._open_ap(labels, cosines, np.array(["new"]), 0.5)[0] == pytest.approx(1 / 2)  # A, new, …
    assert peers._open_ap(labels, cosines, np.array(["A"]), 0.95)[0] == pytest.approx(1 / 2)  # new, A, …
    assert peers._open_ap(labels, cosines, np.array(["B"]), 0.0)[0] == pytest.approx(1 / 2)  # A, B, C, new
    assert peers._open_ap(labels, cosines, np.array(["D"]), 0.0)[0] == 0.0


def test_closed_set_scores_rank_classes_by_their_best_image():
    # gallery: A at 0°, A at 60°, B at 90°; queries: a known A at 80° (B is nearer, A second) and a known B at 88°
    angles = np.radians([0, 60, 90, 80, 88])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    split = pd.DataFrame(
        {
            "path": list("abcde"),
            "label": ["A", "A", "B", "A", "B"],
            "role": ["train", "train", "train", "query", "query"],
            "known": True,
        }
    )
    got = peers.evaluate(emb, split)
    assert got["closed_top1"] == pytest.approx(0.5)
    assert got["closed_map5"] == pytest.approx((1 / 2 + 1) / 2)


def test_the_split_holds_out_a_fifth_of_the_classes_and_a_quarter_of_the_rest():
    rows = pd.DataFrame(
        {
            "path": [f"{c}/{i}.png" for c in range(20) for i in range(8)],
            "label": [str(c) for c in range(20) for _ in range(8)],
        }
    )
    split = peers.bench_split(rows)
    unknown = split[~split["known"]]
    assert unknown["label"].nunique() == 4 and (unknown["role"] == "query").all()
    known = split[split["known"]]
    per_class = known.groupby("label")["role"].apply(lambda r: (r == "query").sum())
    assert (per_class == 2).all()  # a quarter of 8
    assert peers.bench_split(rows)["role"].tolist() == split["role"].tolist()  # seeded: the same split again
