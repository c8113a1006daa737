"""Detector crops (#27 item 2): boxes read and checked, sources drawn with their probabilities,
boxes enlarged and cut before augmentation (reduced decoding still applied), test embeddings
averaged over the sources, missing boxes used whole."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from dmlkit import cli
from dmlkit.competitions.base import InputError
from dmlkit.config import ConfigError, load_config
from dmlkit.data.crops import Cropper, draw_source, enlarge, missing_boxes, read_boxes, source_croppers
from dmlkit.data.dataset import ImageDataset
from dmlkit.data.transforms import make_pipeline
from dmlkit.inference import embed_paths
from dmlkit.models.backbone import EmbeddingModel
from dmlkit.pipeline.checks import check_values
from dmlkit.pipeline.context import Context


def test_enlarge_grows_each_side_by_the_margin_and_clips_to_the_image():
    assert enlarge((10, 8, 30, 24), 0.1, height=100, width=100) == (8, 6, 32, 26)  # dx 2, dy 1.6, outward
    assert enlarge((0, 0, 50, 40), 0.5, height=45, width=60) == (0, 0, 60, 45)


def test_sources_are_drawn_with_the_configured_frequencies():
    probabilities = {"fullbody": 0.6, "backfin": 0.15, "fullbody2": 0.2, "none": 0.05}
    boxes = {"fullbody": (0, 0, 1, 1), "backfin": (0, 0, 2, 2), "fullbody2": (0, 0, 3, 3)}
    cropper = Cropper([boxes], probabilities)
    torch.manual_seed(0)
    drawn = [cropper.box(0) for _ in range(10_000)]
    by_box = {None: "none", **{box: source for source, box in boxes.items()}}
    counts = [sum(by_box[b] == source for b in drawn) for source in probabilities]
    result = chisquare(counts, [10_000 * p for p in probabilities.values()])
    assert result.pvalue > 0.001, (counts, result)
    assert draw_source(probabilities, 0.0) == "fullbody" and draw_source(probabilities, 0.99) == "none"


def test_boxes_file_errors_name_the_line(tmp_path: Path):
    path = tmp_path / "boxes.csv"
    path.write_text("image,x1,y1,x2,y2,source\na.jpg,1,1,5,5,fullbody\nb.jpg,5,1,3,5,fullbody\n")
    with pytest.raises(InputError, match=r"boxes\.csv: line 3: box"):
        read_boxes(path, {"a.jpg", "b.jpg"})
    path.write_text("image,x1,y1,x2,y2,source\na.jpg,1,1,5,5,fullbody\na.jpg,1,1,6,6,fullbody\n")
    with pytest.raises(InputError, match="line 3: a second 'fullbody' box"):
        read_boxes(path, {"a.jpg"})
    path.write_text("image,x1,y1,x2,y2,source\na.jpg,1,1,5,5,fullbody\nz.jpg,1,1,5,5,fullbody\n")
    boxes = read_boxes(path, {"a.jpg", "c.jpg"})  # z.jpg is not in the competition: left out
    assert boxes == {"a.jpg": {"fullbody": (1.0, 1.0, 5.0, 5.0)}}
    rows = [boxes.get(i, {}) for i in ("a.jpg", "c.jpg")]
    assert missing_boxes(rows, ["fullbody", "none"], "embed.crops") == {"fullbody": 1}
    with pytest.raises(InputError, match=r"embed\.crops: no image has a box of source\(s\) \['backfin'\]"):
        missing_boxes(rows, ["backfin"], "embed.crops")


def _scenes(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(2)
    folder.mkdir()
    paths = []
    for i in range(n):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 255, size=(60, 80, 3), dtype=np.uint8))
        paths.append(str(folder / f"{i}.png"))
    return paths


def test_test_embedding_is_the_mean_over_the_sources_and_a_missing_box_is_the_whole_image(tmp_path: Path):
    torch.manual_seed(0)
    model = EmbeddingModel("test_resnet", 16, image_size=32)
    paths = _scenes(tmp_path / "scenes", 4)
    boxes = {
        "0": {"a": (10, 8, 30, 24), "b": (40, 20, 70, 50)},
        "1": {"a": (0, 0, 40, 30), "b": (20, 10, 60, 55)},
        "2": {"a": (5, 5, 75, 55)},  # no b: embedded whole for source b
        "3": {"a": (30, 30, 50, 50), "b": (1, 2, 20, 40)},
    }
    croppers = source_croppers(boxes, ["0", "1", "2", "3"], ["a", "b"], margin=0.1)
    options = {"image_size": 32, "batch_size": 2, "device": torch.device("cpu"), "flip": False, "progress": False}
    averaged = embed_paths(model, paths, croppers=croppers, **options)

    def cut_files(source: str) -> list[str]:
        out = []
        for i, path in enumerate(paths):
            image = cv2.imread(path)
            box = boxes[str(i)].get(source)
            if box is not None:
                x1, y1, x2, y2 = box
                dx, dy = 0.1 * (x2 - x1), 0.1 * (y2 - y1)  # the margin, written out
                image = image[
                    max(0, int(np.floor(y1 - dy))) : min(60, int(np.ceil(y2 + dy))),
                    max(0, int(np.floor(x1 - dx))) : min(80, int(np.ceil(x2 + dx))),
                ]
            out.append(str(tmp_path / f"{source}-{i}.png"))
            cv2.imwrite(out[-1], image)
        return out

    a, b = (embed_paths(model, cut_files(s), **options) for s in ("a", "b"))
    expected = (a + b) / np.linalg.norm(a + b, axis=1, keepdims=True)
    np.testing.assert_allclose(averaged, expected, atol=1e-5)
    whole = embed_paths(model, paths, **options)
    np.testing.assert_allclose(b[2], whole[2], atol=1e-5)  # the missing box: the whole image


def test_a_crop_still_decodes_the_jpeg_reduced_as_far_as_the_crop_allows(tmp_path: Path):
    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), dtype=np.uint8))
    cropper = Cropper([{"a": (400, 300, 800, 600)}], {"a": 1.0}, margin=0.0)
    dataset = ImageDataset([str(path)], None, make_pipeline(64), image_size=64, cropper=cropper)
    # the 400×300 region must keep ≥ 64 px on its short side: the image's short side may fall to 64·1200/300
    assert dataset._plan((1200, 1600), 0, (400, 300, 800, 600)) == (None, 256)
    image, _, _, ok = dataset[0]
    assert ok and tuple(image.shape) == (3, 64, 64)


def test_crops_without_boxes_or_not_summing_to_one_are_refused(tmp_path: Path):
    from conftest import write_tiny_config

    config = write_tiny_config(tmp_path)
    with pytest.raises(ConfigError, match=r"train\.crops: no boxes to crop"):
        check_values(Context(load_config(config, ["member_defaults.train.crops={fullbody: 1.0}"])))
    cfg = load_config(config, ["member_defaults.train.crops={fullbody: 0.5, none: 0.4}", "competition.boxes=b.csv"])
    with pytest.raises(ConfigError, match="must be ≥ 0 and sum to 1"):
        check_values(Context(cfg))


def test_wide_shot_demo_trains_on_crops_and_embeds_their_mean(tmp_path: Path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "wide.yaml"
    config.write_text(f"""
experiment: tiny-wide
seed: 3
threads: 2
competition:
  name: happywhale-2022
  root: {tmp_path / "input-wide"}
  demo: happywhale
  demo_params: {{n_individuals: 30, image_size: 96, wide_shots: true}}
  boxes: boxes.csv
folds: {{n_splits: 3}}
member_defaults:
  image_size: 32
  embedding_size: 32
  head: {{scale: 16.0}}
  train: {{epochs: 2, batch_size: 16, lr: 2.0e-3, amp: "off", crops: {{fullbody: 0.6, fullbody2: 0.3, none: 0.1}}}}
members:
  - {{name: m0, backbone: test_resnet, fold: 0}}
embed: {{batch_size: 64, crops: [fullbody, fullbody2]}}
retrieve: {{k: 20}}
""")
    assert cli.main(["all", "-c", str(config)]) == 0
    log = capfd.readouterr().err
    assert "m0: train.crops" in log and "without a box (trained whole when drawn): fullbody " in log
    assert "embed.crops ['fullbody', 'fullbody2'] averaged" in log
    assert (tmp_path / "submissions" / "tiny-wide.csv").is_file()
    # a changed boxes file re-trains and re-embeds (both read it)
    boxes = tmp_path / "input-wide" / "boxes.csv"
    boxes.write_text(boxes.read_text().replace(",fullbody2\n", ",fullbody2\n", 1) + "\n")
    plan = cli.main(["plan", "-c", str(config)])
    assert plan == 0
    assert "boxes" in capfd.readouterr().out


def test_a_png_with_a_box_is_decoded_once_and_cut_to_its_box(tmp_path: Path, monkeypatch):
    import dmlkit.data.dataset as dataset_module

    pixels = np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "scene.png"), pixels)
    calls = []
    real_decode = dataset_module.decode_image
    monkeypatch.setattr(dataset_module, "decode_image", lambda *a, **k: calls.append(a[1]) or real_decode(*a, **k))
    cropper = Cropper([{"a": (10, 5, 50, 45)}], {"a": 1.0}, margin=0.0)
    dataset = ImageDataset([str(tmp_path / "scene.png")], None, make_pipeline(40), image_size=40, cropper=cropper)
    image, _, _, ok = dataset[0]
    assert ok and len(calls) == 1  # the size comes from the one decode (PNG has no reduced decoding)
    expected = make_pipeline(40)(image=cv2.cvtColor(pixels[5:45, 10:50], cv2.COLOR_BGR2RGB))["image"]
    assert torch.equal(image, expected)  # the 40×40 box itself, at the model's size: nothing resized
