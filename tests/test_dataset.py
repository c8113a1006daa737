"""Training rows: rotated copies of classes become classes of their own."""

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from albumentations.pytorch import ToTensorV2

from dmlkit.data.dataset import ImageDataset, with_rotated_classes
from dmlkit.data.transforms import make_pipeline


def test_rotated_classes_are_new_classes_after_the_originals():
    table = pd.DataFrame({"path": ["a1", "a2", "b1"], "label": ["b", "b", "a"]})
    rows, classes = with_rotated_classes(table, [90, 270])
    assert classes == ["a", "b", "a@rot90", "b@rot90", "a@rot270", "b@rot270"]
    assert len(rows) == 9
    rotated = ["b@rot90", "b@rot90", "a@rot90", "b@rot270", "b@rot270", "a@rot270"]
    assert rows["label"].tolist() == ["b", "b", "a", *rotated]
    assert rows["quarter_turns"].tolist() == [0, 0, 0, 1, 1, 1, 3, 3, 3]
    assert rows["path"].tolist() == ["a1", "a2", "b1"] * 3
    same, classes = with_rotated_classes(table, [])
    assert classes == ["a", "b"] and same["quarter_turns"].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="45"):
        with_rotated_classes(table, [45])


def test_dataset_rotates_by_quarter_turns(tmp_path):
    image = np.zeros((6, 6), np.uint8)
    image[0, :3] = 255  # a bar in the top-left corner's row
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), image)
    identity = A.Compose([A.ToTensorV2()])
    dataset = ImageDataset([str(path)] * 3, [0, 1, 2], identity, channels=1, image_size=6, quarter_turns=[0, 1, 2])
    for turns in range(3):
        tensor, label, _, ok = dataset[turns]
        assert ok and label == turns
        assert np.array_equal(tensor[0].numpy(), np.rot90(image, turns))
    assert np.array_equal(dataset[1][0][0].numpy()[3:, 0], [255, 255, 255])  # counter-clockwise: row 0 → column 0


def test_pipeline_matches_albumentations_resize_and_to_tensor():
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    reference = A.Compose([A.HorizontalFlip(p=1.0), A.Resize(24, 24), ToTensorV2()])(image=colour)["image"]
    ours = make_pipeline(24, flip=True)(image=colour)["image"]
    assert ours.dtype == torch.uint8 and torch.equal(ours, reference)
    # Already the right size: returned as is (no resize), as CHW.
    square = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    assert torch.equal(make_pipeline(24)(image=square)["image"], torch.from_numpy(square).permute(2, 0, 1))
    # Grayscale keeps its channel axis through the resize; a negative-stride view is accepted.
    gray = rng.integers(0, 256, (40, 30, 1), dtype=np.uint8)
    assert tuple(make_pipeline(16)(image=gray)["image"].shape) == (1, 16, 16)
    flipped_view = square[:, ::-1]
    expected = torch.from_numpy(flipped_view.copy()).permute(2, 0, 1)
    assert torch.equal(make_pipeline(24)(image=flipped_view)["image"], expected)


def test_large_jpegs_decode_at_reduced_scale_close_to_the_full_decode(tmp_path):
    """A 1024×768 JPEG for a 256 px eval pipeline decodes at 1/2 scale (768 // 2 ≥ 256... up to 1/2:
    768 // 4 = 192 < 256); the pipeline's output stays within a few grey levels of full decode + resize."""
    import cv2
    import numpy as np

    from dmlkit.data.images import jpeg_reduction, jpeg_size, read_image
    from dmlkit.data.transforms import make_pipeline

    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8), (0, 0), 4)
    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    data = path.read_bytes()
    assert jpeg_size(data) == (768, 1024)
    assert jpeg_reduction(data, 256) == 2 and jpeg_reduction(data, 90) == 8 and jpeg_reduction(data, 500) == 1
    from PIL import Image

    Image.fromarray(image[:300, :200]).save(tmp_path / "progressive.jpg", progressive=True)
    assert jpeg_size((tmp_path / "progressive.jpg").read_bytes()) == (300, 200)
    pipeline = make_pipeline(256)
    assert pipeline.source_side == 256
    for channels in (3, 1):
        reduced = read_image(path, channels, pipeline.source_side)
        full = read_image(path, channels)
        assert reduced.shape[:2] == (384, 512) and full.shape[:2] == (768, 1024)
        a = pipeline(image=reduced)["image"].float()
        b = pipeline(image=full)["image"].float()
        assert a.shape == b.shape == (channels, 256, 256)
        assert (a - b).abs().mean() < 2.0
    crops = [{"type": "RandomResizedCrop", "size": ["image_size", "image_size"], "scale": [0.25, 1.0]}]
    assert make_pipeline(256, augment=crops).source_side == 512  # a quarter-area crop needs twice the side
    png = tmp_path / "big.png"
    cv2.imwrite(str(png), image)
    assert read_image(png, 3, 100).shape[:2] == (768, 1024)  # other formats decode in full


@pytest.mark.parametrize("turns", [0, 1])
def test_training_crops_drawn_before_decoding_match_the_full_decode(tmp_path, turns):
    """With a leading RandomResizedCrop the crop is drawn from the JPEG header's shape, so a 1280×960
    photo for 384 px training decodes at 1/2 scale whenever that crop keeps ≥ 384 px per side (most
    crops of scale 0.5–1), in full otherwise; the samples equal full decode + the same crop within a
    few grey levels, also for a copy rotated by a quarter turn (a rotated class)."""
    from dmlkit.data.images import jpeg_reduction, read_image

    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (960, 1280, 3), dtype=np.uint8), (0, 0), 4)
    path = tmp_path / "photo.jpg"
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    augment = [
        {"type": "RandomResizedCrop", "size": ["image_size", "image_size"], "scale": [0.5, 1.0]},
        {"type": "HorizontalFlip", "p": 0.5},
    ]
    planned, reference = make_pipeline(384, augment=augment), make_pipeline(384, augment=augment)
    planned.set_random_seed(7)
    reference.set_random_seed(7)
    dataset = ImageDataset([str(path)], [0], planned, 3, 384, quarter_turns=[turns])
    full = np.ascontiguousarray(np.rot90(read_image(path), turns))
    data = path.read_bytes()
    reductions = []
    for _ in range(12):
        probe = make_pipeline(384, augment=augment)
        probe.crop.py_random.setstate(planned.crop.py_random.getstate())
        plan = probe.plan((960, 1280)[:: -1 if turns else 1])
        reductions.append(jpeg_reduction(data, plan.min_side))
        x0, y0, x1, y1 = plan.box
        assert (reductions[-1] == 2) == (min(x1 - x0, y1 - y0) >= 768)  # 1/2 scale only when the crop keeps 384 px
        sample = dataset[0][0].float()
        expected = reference(image=full)["image"].float()
        assert sample.shape == expected.shape == (3, 384, 384)
        assert (sample - expected).abs().mean() < 3.0
    assert 2 in reductions and 1 in reductions
