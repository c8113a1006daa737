"""AnimalCLEF 2026: discover individuals. The wildlife layout (`metadata.csv`: path, identity, split,
optional image_id; database/query or train/test), and a submission that clusters the test images
into individuals: `image_id,cluster`, scored by the adjusted Rand index (ARI) against their true
identities (AMI beside it).

The clusters come from `retrieve.cluster` (required): the test's pairwise cosines cut at a
threshold tuned on the validation folds' held-out classes. A cluster holding test images answered
with a known identity is named after it (the identity column of clusters.csv), so clusters of one
known animal are one cluster, as the 2026 entries anchored test images to the database's animals.
Validation and the "new" calibration are the wildlife adapter's (MAP@5 of the identity answers).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pandas as pd

from ..metrics import clustering_scores
from .base import InputError
from .wildlife import LIBRARY_UNKNOWN, METADATA, Wildlife, image_ids, usage_of


class AnimalCLEF2026(Wildlife):
    name = "animalclef-2026"
    header = ("image_id", "cluster")
    solution_columns = ("image_id", "identity", "Usage")
    suffix = "-clusters"  # beside a wildlife submission of the same experiment
    output: ClassVar[str] = "clusters"

    def build_clusters_submission(self, clusters: pd.DataFrame, expected_ids: list[str]) -> pd.DataFrame:
        """The submission from retrieve's clusters.csv (id, cluster, identity, answer), in test order."""
        by_id = dict(zip(clusters["id"].astype(str), clusters["identity"].astype(str), strict=True))
        missing = [i for i in expected_ids if i not in by_id]
        if missing:
            raise InputError(f"{self.name}: no cluster for {len(missing)} test image(s), e.g. {missing[:5]}")
        frame = pd.DataFrame({"image_id": expected_ids, "cluster": [by_id[i] for i in expected_ids]})
        self.validate_submission(frame, expected_ids, source="generated submission")
        return frame

    def check_cell(self, cell: str) -> str | None:
        return "empty cluster" if not str(cell).strip() else None

    def read_solution(self, path: Path) -> pd.DataFrame:
        """image_id, identity (true: an animal no database row holds keeps its own name), Usage; rows of
        unidentified animals (`unknown`) are not scored. From metadata.csv or a solution CSV."""
        if path.name != METADATA:
            return super(Wildlife, self).read_solution(path)
        data = self._metadata(path.parent)
        test = data[(data["split"] == "test") & (data["identity"] != LIBRARY_UNKNOWN)]
        ids = image_ids(test).tolist()
        return pd.DataFrame({"image_id": ids, "identity": test["identity"].tolist(), "Usage": map(usage_of, ids)})

    def score(self, submission: pd.DataFrame, solution: pd.DataFrame, source: str = "submission") -> dict:
        """ARI and AMI over the Public and Private images and all of them."""
        self.validate_submission(submission, submission["image_id"].tolist(), source)
        cluster_of = dict(zip(submission["image_id"], submission["cluster"], strict=True))
        missing = [i for i in solution["image_id"] if i not in cluster_of]
        if missing:
            raise InputError(f"{source}: no cluster for {len(missing)} image(s) of the solution, e.g. {missing[:5]}")
        return clusters_result(solution, cluster_of, "image_id", "identity")


def clusters_result(truth: pd.DataFrame, cluster_of: dict, image: str, identity: str) -> dict:
    """{metric: ari, public, private, all: ARI; ami: the same for AMI} of `cluster_of` (image → cluster)
    against `truth`'s identities, per Usage where the truth has one."""
    result: dict = {"metric": "ari", "ami": {}}
    for name, usage in (("public", "Public"), ("private", "Private"), ("all", None)):
        part = truth if usage is None or "Usage" not in truth.columns else truth[truth["Usage"] == usage]
        scores = clustering_scores(part[identity].tolist(), [cluster_of[i] for i in part[image]]) if len(part) else None
        result[name] = None if scores is None else scores["ari"]
        result["ami"][name] = None if scores is None else scores["ami"]
    return result
