"""An image folder: `root/<class>/<image>` (class paths may nest: `root/<alphabet>/<character>/x.png`),
from a folder or a `.zip` of one. Every image is a training image; the class is its folder path.

A zip is extracted once, atomically, under `input/.extracted/<name>-<hash>/`. Submissions use the
generic `id,predictions` format (the folder has no test images of its own).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pandas as pd

from ..cache import file_fingerprint, listing_fingerprint
from .base import InputError, check_table
from .generic_csv import GenericCSV

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
EXTRACT_ROOT = Path("input/.extracted")


def extracted(archive: Path, into: Path = EXTRACT_ROOT) -> Path:
    """The folder a zip unpacks to (unpacked on first use; a half-finished unpacking is redone)."""
    digest = file_fingerprint(archive)
    target = into / f"{archive.stem}-{digest}"
    if target.is_dir():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(partial)
    except zipfile.BadZipFile as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise InputError(f"{archive}: not a readable zip file: {exc}") from exc
    os.replace(partial, target)
    return target


def image_root(root: Path) -> Path:
    """The folder whose sub-folders are the classes (a zip's single top folder is stepped into)."""
    if root.suffix == ".zip":
        if not root.is_file():
            raise InputError(f"{root}: zip file not found")
        root = extracted(root)
        entries = [p for p in root.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        if len(entries) == 1 and entries[0].is_dir():
            root = entries[0]
    if not root.is_dir():
        raise InputError(f"{root}: image folder not found")
    return root


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class ImageFolder(GenericCSV):
    name = "image-folder"

    def input_files(self, root: Path) -> list[Path]:
        return [root] if root.suffix == ".zip" else []

    def fingerprints(self, root: Path) -> dict[str, str]:
        if root.suffix == ".zip":
            return {str(root): file_fingerprint(root)}
        folder = image_root(root)
        return {str(root): listing_fingerprint([str(p.relative_to(folder)) for p in list_images(folder)])}

    def read(self, root: Path) -> pd.DataFrame:
        folder = image_root(root)
        images = list_images(folder)
        if not images:
            raise InputError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) below {folder}")
        loose = [p for p in images if p.parent == folder]
        if loose:
            raise InputError(f"{root}: image {loose[0].name} is not inside a class folder (root/<class>/<image>)")
        table = pd.DataFrame(
            {
                "id": [str(p.relative_to(folder)) for p in images],
                "path": [str(p) for p in images],
                "label": [str(p.parent.relative_to(folder)) for p in images],
                "role": "train",
                "known": True,
            }
        )
        return check_table(table, str(root))

    def submission_ids(self, root: Path) -> list[str]:
        return []

    def no_queries_reason(self, root: Path) -> str:
        return (
            f"{root}: an image folder holds training images only, so there is nothing to submit; "
            "`./run.sh retrieve` gives the validation report, `./run.sh export` the model "
            "(or list the images to predict in a generic-csv data.csv with split=test)"
        )
