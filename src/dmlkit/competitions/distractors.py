"""A distractor pool for the GLR2020 1st-place penalty: images known to show no landmark, from a
folder (searched recursively), a `.zip` of one, or a CSV with a `path` column (relative to the CSV's
folder). They join the common table with role `distractor` and are embedded like any other row."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .base import InputError, read_csv_checked
from .image_folder import image_root, list_images


def read_pool(source: str | Path) -> pd.DataFrame:
    """The pool's rows of the common table (`id`: the path relative to the pool)."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        frame = read_csv_checked(source, ["path"], id_column="path", nonempty=("path",))
        ids, paths = frame["path"].tolist(), [str(source.parent / p) for p in frame["path"]]
    else:
        if not source.exists():
            raise InputError(f"{source}: distractor pool not found (retrieve.penalty.pool: a folder, .zip or .csv)")
        folder = image_root(source)
        images = list_images(folder)
        ids, paths = [str(p.relative_to(folder)) for p in images], [str(p) for p in images]
    if not ids:
        raise InputError(f"{source}: the distractor pool (retrieve.penalty.pool) holds no images")
    return pd.DataFrame({"id": ids, "path": paths, "label": None, "role": "distractor", "known": False})
