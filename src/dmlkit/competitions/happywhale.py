"""Happywhale 2022: `train.csv` (image,species,individual_id), `train_images/`, `test_images/`.

Submission `image,predictions` with 5 ids; `new_individual` is an ordinary label; metric MAP@5.
The solution holds `image,individual_id,Usage`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .base import check_table, image_path, read_csv_checked
from .humpback import Humpback


class Happywhale(Humpback):
    name = "happywhale-2022"
    header = ("image", "predictions")
    solution_columns = ("image", "individual_id", "Usage")
    unknown_label = "new_individual"
    train_folder = "train_images"
    test_folder = "test_images"

    def read(self, root: Path) -> pd.DataFrame:
        train = read_csv_checked(
            root / "train.csv",
            ["image", "species", "individual_id"],
            id_column="image",
            nonempty=("image", "individual_id"),
        )
        rows = [
            {
                "id": i,
                "path": image_path(root, self.train_folder, i, nested=False),
                "label": lab,
                "role": "train",
                "known": True,
            }
            for i, lab in zip(train["image"], train["individual_id"], strict=True)
        ]
        rows += [
            {
                "id": i,
                "path": image_path(root, self.test_folder, i, nested=False),
                "label": None,
                "role": "test",
                "known": False,
            }
            for i in self.submission_ids(root)
        ]
        return check_table(pd.DataFrame(rows), str(root))
