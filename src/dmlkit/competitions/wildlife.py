"""Animal re-identification datasets as the `wildlife-datasets` library describes them (~60 of
them, one metadata table each): `metadata.csv` with `path` (relative to the root), `identity` and
`split` (train/test, or AnimalCLEF's database/query), optional `image_id` (then the images' name in
the table and the submission), `species`, `date`.

`unknown` (the library's name for an unidentified animal) is an ordinary training row that is not a
class, like Humpback's `new_whale`. Test rows are the queries; a test identity that no training
row holds is answered `new_individual`. Submission `image,identity` with 5 ids (MAP@5); the local
score reads the answers from `metadata.csv` itself (Public/Private by a hash of the path) and adds
BAKS / BAUS (AnimalCLEF 2025).

`competition.download: NAME` (e.g. MacaqueFaces) fetches the dataset through the library where the
user is online and writes `metadata.csv` with an open-set split (see `split_open_set`).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from .base import InputError, check_table, read_csv_checked
from .humpback import Humpback

LIBRARY_UNKNOWN = "unknown"
METADATA = "metadata.csv"
SPLIT_ALIASES = {"database": "train", "query": "test"}  # AnimalCLEF's names for the gallery and the queries


def image_ids(data: pd.DataFrame) -> pd.Series:
    """What names an image in the table and the submission: `image_id` where the table has it
    (AnimalCLEF), else its path."""
    return data["image_id"] if "image_id" in data.columns else data["path"]


class Wildlife(Humpback):
    name = "wildlife"
    header = ("image", "identity")
    solution_columns = ("image", "identity", "Usage")
    unknown_label = "new_individual"
    solution_file = METADATA

    def input_files(self, root: Path) -> list[Path]:
        return [root / METADATA]

    def _metadata(self, root: Path) -> pd.DataFrame:
        csv = root / METADATA
        data = read_csv_checked(csv, ["path", "identity", "split"], id_column="path", nonempty=("path", "split"))
        if "image_id" in data.columns:  # AnimalCLEF's tables: submissions name images by it
            bad = data["image_id"].duplicated(keep=False) | (data["image_id"].str.strip() == "")
            if bad.any():
                line = int(data.index[bad][0]) + 2
                raise InputError(f"{csv}: line {line}: image_id '{data['image_id'][bad].iloc[0]}' is empty or repeated")
        data["split"] = data["split"].replace(SPLIT_ALIASES)
        bad = ~data["split"].isin(["train", "test"])
        if bad.any():
            line = int(data.index[bad][0]) + 2
            raise InputError(
                f"{csv}: line {line}: split '{data['split'][bad].iloc[0]}' (train or test expected; database or "
                "query as AnimalCLEF names them)"
            )
        train = data["split"] == "train"
        blank = train & (data["identity"].str.strip() == "")
        if blank.any():
            raise InputError(f"{csv}: empty identity on training line(s) {[int(i) + 2 for i in data.index[blank][:5]]}")
        reserved = train & (data["identity"] == self.unknown_label)
        if reserved.any():
            raise InputError(
                f"{csv}: line {int(data.index[reserved][0]) + 2}: identity '{self.unknown_label}' is the answer for "
                "an animal no training row holds; rename it"
            )
        return data

    def read(self, root: Path) -> pd.DataFrame:
        data = self._metadata(root)
        train = data["split"] == "train"
        table = pd.DataFrame(
            {
                "id": image_ids(data),
                "path": [str(root / p) for p in data["path"]],
                "label": [i if t else None for i, t in zip(data["identity"], train, strict=True)],
                "role": data["split"],
                "known": train & (data["identity"] != LIBRARY_UNKNOWN),
            }
        )
        if "species" in data.columns:  # head.aux can train on it (training rows only: no test answer leaks)
            table["species"] = data["species"].where(train, "").to_numpy()
        return check_table(table, str(root / METADATA))

    def no_queries_reason(self, root: Path) -> str:
        return f"{root / METADATA}: no row has split=test (the images to identify)"

    def submission_ids(self, root: Path) -> list[str]:
        data = self._metadata(root)
        return image_ids(data)[data["split"] == "test"].tolist()

    def read_solution(self, path: Path) -> pd.DataFrame:
        if path.name != METADATA:
            return super().read_solution(path)
        data = self._metadata(path.parent)
        known = set(data.loc[(data["split"] == "train") & (data["identity"] != LIBRARY_UNKNOWN), "identity"])
        test = data[data["split"] == "test"]
        return pd.DataFrame(
            {
                self.solution_columns[0]: image_ids(test).tolist(),
                "identity": [i if i in known else self.unknown_label for i in test["identity"]],
                "Usage": [usage_of(p) for p in image_ids(test)],
            }
        )


def usage_of(path: str) -> str:
    """A stable Public/Private half of the test rows."""
    return "Public" if zlib.crc32(path.encode()) % 2 == 0 else "Private"


def split_open_set(
    identities: pd.Series, seed: int = 0, unknown_share: float = 0.1, test_share: float = 0.2
) -> np.ndarray:
    """train/test per row: `unknown_share` of the identities go to test whole (animals the gallery
    never saw); of each remaining identity with ≥ 2 images, `test_share` of its images (at least
    one, never all). `unknown` rows stay in training."""
    rng = np.random.default_rng(seed)
    split = np.full(len(identities), "train", dtype=object)
    names = sorted(set(identities) - {LIBRARY_UNKNOWN})
    held = set(rng.permutation(names)[: int(round(unknown_share * len(names)))].tolist())
    for name, rows in identities.groupby(identities).indices.items():
        if name == LIBRARY_UNKNOWN:
            continue
        if name in held:
            split[rows] = "test"
        elif len(rows) >= 2:
            n_test = min(len(rows) - 1, max(1, int(round(test_share * len(rows)))))
            split[rng.choice(rows, n_test, replace=False)] = "test"
    return split


def download(name: str, root: Path, seed: int = 0) -> Path:
    """The library's dataset `name` fetched into `root/<name>/` and `root/metadata.csv` written."""
    try:
        from wildlife_datasets import datasets  # optional: only competition.download needs it
    except ImportError:
        raise InputError(
            f"competition.download: {name} needs the wildlife-datasets library (pip install wildlife-datasets), "
            f"or a {METADATA} in {root} with path, identity, split"
        ) from None
    if not hasattr(datasets, name):
        raise InputError(f"competition.download: wildlife-datasets has no dataset '{name}'")
    cls = getattr(datasets, name)
    folder = root / name
    cls.get_data(str(folder))
    frame = cls(str(folder)).df
    metadata = pd.DataFrame({"path": [str(Path(name) / p) for p in frame["path"]], "identity": frame["identity"]})
    for column in ("species", "date"):
        if column in frame.columns:
            metadata[column] = frame[column].values
    metadata["split"] = split_open_set(metadata["identity"].astype(str), seed)
    metadata.to_csv(root / METADATA, index=False)
    return root / METADATA
