"""Adapters on small fixtures in each real layout, submission round trips, the scorer's errors."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from dmlkit.competitions import ADAPTERS, InputError, Predictions, adapter_for_header, get_adapter
from dmlkit.competitions.scoring import score_files

ROOT = Path(__file__).resolve().parents[1]


def jpg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((8, 8, 3), 128, np.uint8))


def glr_fixture(root: Path, with_index: bool = False) -> Path:
    pd.DataFrame({"id": ["abc1", "abd2", "bcd3"], "landmark_id": ["7", "7", "9"]}).to_csv(
        root / "train.csv", index=False
    )
    pd.DataFrame({"id": ["fff1", "eee2"], "landmarks": ["", ""]}).to_csv(root / "sample_submission.csv", index=False)
    for i in ["abc1", "abd2", "bcd3"]:
        jpg(root / "train" / i[0] / i[1] / i[2] / f"{i}.jpg")
    for i in ["fff1", "eee2"]:
        jpg(root / "test" / i[0] / i[1] / i[2] / f"{i}.jpg")
    if with_index:
        for i in ["aaa9", "bbb8"]:
            jpg(root / "index" / i[0] / i[1] / i[2] / f"{i}.jpg")
    return root


def test_landmark_recognition_reads_nested_layout(tmp_path):
    table = get_adapter("landmark-recognition-2020").read(glr_fixture(tmp_path, with_index=True))
    train = table[table.role == "train"]
    assert train.label.tolist() == ["7", "7", "9"] and train.known.all()
    assert train.path.iloc[0].endswith("train/a/b/c/abc1.jpg")
    assert table[table.role == "test"].id.tolist() == ["fff1", "eee2"]
    assert sorted(table[table.role == "index"].id) == ["aaa9", "bbb8"]
    assert all(Path(p).is_file() for p in table.path)


def test_humpback_new_whale_is_not_known(tmp_path):
    pd.DataFrame({"Image": ["a.jpg", "b.jpg", "c.jpg"], "Id": ["w_1", "new_whale", "w_1"]}).to_csv(
        tmp_path / "train.csv", index=False
    )
    pd.DataFrame({"Image": ["t.jpg"], "Id": ["new_whale"]}).to_csv(tmp_path / "sample_submission.csv", index=False)
    table = get_adapter("humpback-2019").read(tmp_path)
    assert table[table.role == "train"].known.tolist() == [True, False, True]
    assert table.path.iloc[0] == str(tmp_path / "train" / "a.jpg")


def test_happywhale_layout(tmp_path):
    pd.DataFrame(
        {"image": ["a.jpg", "b.jpg"], "species": ["humpback_whale", "beluga"], "individual_id": ["x1", "x2"]}
    ).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"image": ["t.jpg"], "predictions": ["x1"]}).to_csv(tmp_path / "sample_submission.csv", index=False)
    table = get_adapter("happywhale-2022").read(tmp_path)
    assert table.path.iloc[0] == str(tmp_path / "train_images" / "a.jpg")
    assert table.path.iloc[-1] == str(tmp_path / "test_images" / "t.jpg")


def test_generic_csv(tmp_path):
    pd.DataFrame(
        {"path": ["i/1.png", "i/2.png", "q/3.png"], "label": ["a", "b", ""], "split": ["train", "", "test"]}
    ).to_csv(tmp_path / "data.csv", index=False)
    adapter = get_adapter("generic-csv")
    table = adapter.read(tmp_path)
    assert table.role.tolist() == ["train", "train", "test"]
    assert adapter.submission_ids(tmp_path) == ["q/3.png"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("Image,Id\na.jpg,w1\na.jpg,w2\n", "duplicate Image"),
        ("Image\na.jpg\n", "missing column"),
        ("Image,Id\na.jpg,\n", "empty Id on line(s) [2]"),
        ("", "file is empty"),
    ],
)
def test_bad_train_csv_names_file_and_row(tmp_path, content, message):
    (tmp_path / "train.csv").write_text(content)
    (tmp_path / "sample_submission.csv").write_text("Image,Id\nt.jpg,new_whale\n")
    with pytest.raises(InputError) as err:
        get_adapter("humpback-2019").read(tmp_path)
    assert message in str(err.value) and "train.csv" in str(err.value)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["x", "x "], "leading or trailing whitespace"),
        (["x", "blue whale"], "whitespace inside"),
    ],
)
def test_labels_the_formats_cannot_carry_stop_at_load(tmp_path, labels, message):
    """Before: 'x ' became a second class; 'blue whale' trained fully, then failed at submit."""
    pd.DataFrame({"Image": ["a.jpg", "b.jpg"], "Id": labels}).to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "sample_submission.csv").write_text("Image,Id\nt.jpg,new_whale\n")
    with pytest.raises(InputError) as err:
        get_adapter("humpback-2019").read(tmp_path)
    assert message in str(err.value) and repr(labels[1]) in str(err.value) and "(image b.jpg)" in str(err.value)


def test_generic_csv_refuses_a_class_named_like_its_unknown_answer(tmp_path):
    """Before: a real class 'new' was silently treated as unknown and never trained."""
    pd.DataFrame(
        {"path": ["1.png", "2.png", "3.png"], "label": ["a", "new", ""], "split": ["train", "train", "test"]}
    ).to_csv(tmp_path / "data.csv", index=False)
    with pytest.raises(InputError, match=r"data\.csv: line 3: training label 'new'"):
        get_adapter("generic-csv").read(tmp_path)


ROUND_TRIPS = {
    "landmark-recognition-2020": Predictions(ids=["q1", "q2"], labels=[["7"], []], scores=[[0.5], []]),
    "landmark-retrieval": Predictions(ids=["q1", "q2"], neighbours=[["i1", "i2"], []]),
    "humpback-2019": Predictions(ids=["q1", "q2"], labels=[["w1", "new_whale", "w2", "w3", "w4", "w5"], ["w9"]]),
    "happywhale-2022": Predictions(ids=["q1", "q2"], labels=[["a", "new_individual"], ["b"]]),
    "generic-csv": Predictions(ids=["q1", "q2"], labels=[["a"], ["b", "new"]]),
    "image-folder": Predictions(ids=["q1", "q2"], labels=[["a/b"], ["c/d", "new"]]),
    "wildlife": Predictions(ids=["q1", "q2"], labels=[["m1", "new_individual"], ["m2"]]),
}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_submission_round_trip(tmp_path, name):
    adapter = get_adapter(name)
    if adapter.output == "clusters":  # retrieve's clusters.csv, not ranked predictions
        clusters = pd.DataFrame({"id": ["q1", "q2"], "cluster": [0, 1], "identity": ["m1", "new-1"], "answer": ""})
        frame = adapter.build_clusters_submission(clusters, ["q2", "q1"])
        assert frame["cluster"].tolist() == ["new-1", "m1"]
    else:
        frame = adapter.build_submission(ROUND_TRIPS[name], ["q2", "q1"])
    path = tmp_path / "sub.csv"
    frame.to_csv(path, index=False)
    back = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert tuple(back.columns) == adapter.header and back.iloc[:, 0].tolist() == ["q2", "q1"]
    adapter.validate_submission(back, ["q1", "q2"], str(path))
    assert adapter_for_header(list(back.columns)).header == adapter.header  # image-folder shares generic's
    if name == "humpback-2019":
        assert back.Id.iloc[1] == "w1 new_whale w2 w3 w4"  # cut to 5
    if name == "landmark-recognition-2020":
        assert back.landmarks.tolist() == ["", "7 0.500000"]


def test_build_submission_refuses_missing_ids():
    with pytest.raises(InputError, match="no prediction"):
        get_adapter("humpback-2019").build_submission(Predictions(ids=["a"], labels=[["x"]]), ["a", "b"])


def write_whale_solution(tmp_path: Path) -> Path:
    path = tmp_path / "solution.csv"
    pd.DataFrame(
        {
            "Image": ["a", "b", "c", "d"],
            "Id": ["w1", "new_whale", "w2", "w3"],
            "Usage": ["Public", "Public", "Private", "Private"],
        }
    ).to_csv(path, index=False)
    return path


def test_score_public_private(tmp_path):
    solution = write_whale_solution(tmp_path)
    sub = tmp_path / "sub.csv"
    pd.DataFrame({"Image": ["d", "c", "b", "a"], "Id": ["x w3", "w2", "new_whale", "w0 w9 w1"]}).to_csv(
        sub, index=False
    )
    result = score_files(sub, solution)
    assert result["public"] == pytest.approx((1 / 3 + 1) / 2)
    assert result["private"] == pytest.approx((1 + 1 / 2) / 2)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("Image,Label\na,w1\n", "matches no competition"),
        ("Image,Id\na,w1\nb,w1\nc,w1\n", "missing"),
        ("Image,Id\na,w1\na,w1\nb,w1\nc,w1\nd,w1\n", "duplicate id 'a' on line 3"),
        ("Image,Id\na,w1\nb,w1\nc,w1\nd,w1\ne,w1\n", "not in the expected set"),
        ("Image,Id\na,w1\nb,\nc,w1\nd,w1\n", "line 3 (id 'b'): no prediction"),
        ("Image,Id\na,1 2 3 4 5 6\nb,w\nc,w1\nd,w1\n", "line 2 (id 'a'): 6 ids"),
    ],
)
def test_scorer_rejects_malformed_submissions(tmp_path, rows, message):
    solution = write_whale_solution(tmp_path)
    sub = tmp_path / "sub.csv"
    sub.write_text(rows)
    with pytest.raises(InputError) as err:
        score_files(sub, solution)
    assert message in str(err.value)


def test_scorer_rejects_bad_landmark_cells_and_mismatched_solution(tmp_path):
    solution = tmp_path / "solution.csv"
    pd.DataFrame({"id": ["a", "b"], "landmarks": ["1", ""], "Usage": ["Public", "Private"]}).to_csv(
        solution, index=False
    )
    sub = tmp_path / "sub.csv"
    sub.write_text("id,landmarks\na,1 high\nb,\n")
    with pytest.raises(InputError, match=r"line 2 .*'high' is not a number"):
        score_files(sub, solution)
    whale_sub = tmp_path / "whale.csv"
    whale_sub.write_text("Image,Id\na,w1\n")
    with pytest.raises(InputError, match="missing column"):
        score_files(whale_sub, solution)


def test_gap_scoring_through_the_adapter(tmp_path):
    solution = tmp_path / "solution.csv"
    pd.DataFrame({"id": ["a", "b", "c"], "landmarks": ["1", "", "2"], "Usage": ["Public"] * 3}).to_csv(
        solution, index=False
    )
    sub = tmp_path / "sub.csv"
    sub.write_text("id,landmarks\na,1 0.9\nb,5 0.8\nc,2 0.1\n")
    # ranked a (right), b (wrong, non-landmark), c (right): (1 + 2/3) / 2
    assert score_files(sub, solution)["public"] == pytest.approx((1 + 2 / 3) / 2)


def test_score_cli_json_and_exit_codes(tmp_path):
    solution = write_whale_solution(tmp_path)
    sub = tmp_path / "sub.csv"
    pd.DataFrame({"Image": ["a", "b", "c", "d"], "Id": ["w1", "new_whale", "w2", "w3"]}).to_csv(sub, index=False)
    run = subprocess.run(
        [sys.executable, "-m", "dmlkit", "score", str(sub), str(solution), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    last = json.loads(run.stdout.strip().splitlines()[-1])
    # every answer right; the private half has no unknown image, so no BAUS and no geometric mean
    private = {"baks": 1.0, "baus": None, "open_set": None}
    open_set = {"public": {"baks": 1.0, "baus": 1.0, "open_set": 1.0}, "private": private}
    assert last == {"metric": "map@5", "public": 1.0, "private": 1.0, "open_set": open_set}
    sub.write_text("Image,Id\na,w1\n")
    run = subprocess.run(
        [sys.executable, "-m", "dmlkit", "score", str(sub), str(solution)], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 2 and "error:" in run.stderr and "missing" in run.stderr
