"""Happywhale 2022: `train.csv` (image,species,individual_id), `train_images/`, `test_images/`.

Submission `image,predictions` with 5 ids; `new_individual` is an ordinary label; metric MAP@5.
The solution holds `image,individual_id,Usage`.
"""

from __future__ import annotations

from .humpback import Humpback


class Happywhale(Humpback):
    name = "happywhale-2022"
    header = ("image", "predictions")
    solution_columns = ("image", "individual_id", "Usage")
    unknown_label = "new_individual"
    train_folder = "train_images"
    test_folder = "test_images"
    train_csv_columns = ("image", "species", "individual_id")
    image_column = "image"
    label_column = "individual_id"
