"""The image-folder adapter on generated images in Omniglot's layout (folder and zip)."""

import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from dmlkit.competitions import InputError, get_adapter
from dmlkit.competitions.image_folder import extracted


def omniglot_like(root: Path) -> Path:
    for alphabet in ("Greek", "Latin"):
        for character in ("character01", "character02"):
            folder = root / "images_background" / alphabet / character
            folder.mkdir(parents=True)
            for drawing in range(3):
                image = np.full((105, 105), 255, np.uint8)
                cv2.line(image, (10, 10 + drawing), (90, 80), 0, 3)
                cv2.imwrite(str(folder / f"{drawing:02d}.png"), image)
    return root / "images_background"


def test_nested_class_folders(tmp_path):
    table = get_adapter("image-folder").read(omniglot_like(tmp_path))
    assert len(table) == 12 and (table.role == "train").all() and table.known.all()
    assert sorted(table.label.unique()) == [
        "Greek/character01",
        "Greek/character02",
        "Latin/character01",
        "Latin/character02",
    ]
    assert table.id.iloc[0] == "Greek/character01/00.png"


def test_zip_is_extracted_once_and_read_the_same(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = omniglot_like(tmp_path / "src")
    archive = tmp_path / "images_background.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in folder.rglob("*.png"):
            handle.write(path, path.relative_to(folder.parent))
    adapter = get_adapter("image-folder")
    table = adapter.read(archive)
    assert sorted(table.label.unique()) == sorted(adapter.read(folder).label.unique())
    target = extracted(archive)
    stamp = target.stat().st_mtime_ns
    adapter.read(archive)
    assert extracted(archive).stat().st_mtime_ns == stamp  # not unpacked again
    assert set(adapter.fingerprints(archive)) == {str(archive)}


def test_bad_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="not found"):
        get_adapter("image-folder").read(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    cv2.imwrite(str(tmp_path / "flat" / "a.png"), np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match="not inside a class folder"):
        get_adapter("image-folder").read(tmp_path / "flat")
    (tmp_path / "bad.zip").write_text("not a zip")
    with pytest.raises(InputError, match="not a readable zip"):
        get_adapter("image-folder").read(tmp_path / "bad.zip")
