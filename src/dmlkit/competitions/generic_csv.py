"""Any other dataset: `data.csv` with `path,label[,split]` (split: train/test/index, default train).

Paths are relative to the root. Ids are the paths. Submission `id,predictions` (5 labels, like
the whales); solution `id,label,Usage`; metric MAP@5.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .base import InputError, check_table, read_csv_checked, read_csv_file
from .humpback import Humpback


class GenericCSV(Humpback):
    name = "generic-csv"
    header = ("id", "predictions")
    solution_columns = ("id", "label", "Usage")
    unknown_label = "new"

    def input_files(self, root: Path) -> list[Path]:
        return [root / "data.csv"]

    def read(self, root: Path) -> pd.DataFrame:
        csv = root / "data.csv"
        data = read_csv_checked(csv, ["path", "label"], id_column="path", nonempty=("path",))
        split = data["split"] if "split" in data.columns else pd.Series(["train"] * len(data))
        split = split.replace("", "train")
        bad = ~split.isin(["train", "test", "index"])
        if bad.any():
            raise InputError(f"{csv}: line {int(data.index[bad][0]) + 2}: split must be train, test or index")
        blank = (split == "train") & (data["label"].str.strip() == "")
        if blank.any():
            raise InputError(f"{csv}: empty label on training line(s) {[int(i) + 2 for i in data.index[blank][:5]]}")
        reserved = (split == "train") & (data["label"] == self.unknown_label)
        if reserved.any():
            raise InputError(
                f"{csv}: line {int(data.index[reserved][0]) + 2}: training label '{self.unknown_label}' is the "
                "answer generic-csv submissions give for an unknown class; rename that class"
            )
        table = pd.DataFrame(
            {
                "id": data["path"],
                "path": [str(root / p) for p in data["path"]],
                "label": [lab if s == "train" else None for lab, s in zip(data["label"], split, strict=True)],
                "role": split,
                "known": [
                    s == "train" and lab != self.unknown_label for lab, s in zip(data["label"], split, strict=True)
                ],
            }
        )
        return check_table(table, str(csv))

    def no_queries_reason(self, root: Path) -> str:
        csv = root / "data.csv"
        if "split" not in read_csv_file(csv).columns:
            return (
                f"{csv}: no 'split' column, so every row is a training image; mark the images to predict "
                "with split=test"
            )
        return f"{csv}: no row has split=test (the images to predict)"

    def submission_ids(self, root: Path) -> list[str]:
        sample = root / "sample_submission.csv"
        if sample.is_file():
            return super().submission_ids(root)
        data = read_csv_checked(root / "data.csv", ["path", "label"], id_column="path")
        split = data["split"] if "split" in data.columns else pd.Series(["train"] * len(data))
        return data.loc[split == "test", "path"].tolist()
