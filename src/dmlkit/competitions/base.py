"""What every competition adapter shares: the common table, CSV checks, submission validation.

An adapter turns a competition's files into one table with the columns
``id, path, label, role, known`` (role: train/test/index, or distractor for a penalty pool;
known: the label is a real class, not ``new_whale``) and turns predictions into its exact
submission format. Scoring reads the solution file with the same adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ..cache import file_fingerprint

TABLE_COLUMNS = ["id", "path", "label", "role", "known"]
USAGES = ("Public", "Private", "Ignored")


class InputError(ValueError):
    """Bad competition input; the message names the file and the row or column."""


@dataclass
class Predictions:
    """Ranked predictions per query: labels with scores (votes), each label's best neighbour cosine
    (`similarities`, for the unknown threshold), and (for retrieval) gallery ids."""

    ids: list[str]
    labels: list[list[str]] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)
    neighbours: list[list[str]] = field(default_factory=list)
    similarities: list[list[float]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # retrieve.unknown_per: each query's group


@dataclass(frozen=True)
class Calibration:
    """What validation tunes for a competition's predictions: the score below which the unknown
    label is inserted (identification) and which score that is (`vote`: the label's vote; `cosine`:
    its best neighbour's cosine), or the confidence form that orders GAP (recognition)."""

    threshold: float | None = None
    unknown_score: str | None = None
    confidence: str | None = None
    group_thresholds: dict[str, float] | None = None  # retrieve.unknown_per: a group's own threshold

    def thresholds_for(self, ranked: Predictions) -> float | list[float]:
        """The threshold, or per query its group's (the global one where its group has none)."""
        if not self.group_thresholds or not ranked.groups:
            return self.threshold
        return [self.group_thresholds.get(group, self.threshold) for group in ranked.groups]

    def tuned(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def step_name(self, unknown_label: str | None) -> str | None:
        """The validation report's row for this calibration (None: nothing was calibrated)."""
        if self.threshold is not None:
            return f"+ {unknown_label} threshold {self.threshold:.4f} on the {self.unknown_score or 'vote'}"
        if self.confidence is not None:
            return f"+ confidence '{self.confidence}'"
        return None


def read_csv_file(path: Path) -> pd.DataFrame:
    """A CSV as strings (nothing parsed as NaN), or an InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV: {exc}") from exc


def read_csv_checked(
    path: Path, required: list[str], id_column: str | None = None, nonempty: tuple[str, ...] = ()
) -> pd.DataFrame:
    """Read a CSV as strings, failing with the file and row on missing columns, duplicates, blanks."""
    df = read_csv_file(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; found {list(df.columns)}, expected {required}")
    if id_column is not None:
        dup = df[id_column].duplicated(keep=False)
        if dup.any():
            rows = [int(i) + 2 for i in df.index[dup][:5]]  # +2: header line and 1-based lines
            raise InputError(
                f"{path}: duplicate {id_column} values {df.loc[dup, id_column].unique()[:5].tolist()} (lines {rows})"
            )
    for column in nonempty:
        blank = df[column].str.strip() == ""
        if blank.any():
            rows = [int(i) + 2 for i in df.index[blank][:5]]
            raise InputError(f"{path}: empty {column} on line(s) {rows}")
    return df


def check_table(table: pd.DataFrame, source: str) -> pd.DataFrame:
    """Invariants of the common table: columns, roles, unique ids per role, labels on train rows."""
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{source}: adapter produced a table without {missing}")
    bad_roles = set(table["role"]) - {"train", "test", "index", "distractor"}
    if bad_roles:
        raise InputError(f"{source}: unknown role(s) {sorted(bad_roles)}")
    for role, part in table.groupby("role"):
        dup = part["id"].duplicated()
        if dup.any():
            raise InputError(f"{source}: duplicate {role} id(s) {part.loc[dup, 'id'].tolist()[:5]}")
    train = table[table["role"] == "train"]
    if train.empty:
        raise InputError(f"{source}: no training images")
    check_labels(train, source)
    return table.reset_index(drop=True)


def check_labels(train: pd.DataFrame, source: str) -> None:
    """Labels the submission formats cannot carry: every cell is a space-separated list, so a label
    with a space inside would split into two, and `"x "` would silently be a class apart from `"x"`."""
    labels = train["label"].astype(str)
    for problem, bad in (
        (
            "leading or trailing whitespace (a class apart from the stripped label; strip it in the file)",
            labels != labels.str.strip(),
        ),
        (
            "whitespace inside (submission cells are space-separated lists; replace it, e.g. with '_')",
            labels.str.strip().str.contains(r"\s", regex=True),
        ),
    ):
        if bad.any():
            first = train.loc[bad]
            raise InputError(
                f"{source}: {int(bad.sum())} training label(s) with {problem}: first "
                f"{first['label'].iloc[0]!r} (image {first['id'].iloc[0]})"
            )


class Adapter(ABC):
    """One competition: reading its files, writing and scoring its submission."""

    name: ClassVar[str]
    metric: ClassVar[str]  # gap | map@100 | map@5
    header: ClassVar[tuple[str, str]]
    solution_columns: ClassVar[tuple[str, ...]]
    suffix: ClassVar[str] = ""  # appended to the experiment name in the submission's file name
    unknown_label: ClassVar[str | None] = None
    max_predictions: ClassVar[int] = 5
    solution_file: ClassVar[str] = "solution.csv"  # the answers, where a competition ships them (demos)
    gallery_role: ClassVar[str] = "train"  # test queries search the labelled training images, or `index`
    output: ClassVar[str] = "predictions"  # what the submission is built from: the ranked answers, or `clusters`

    @abstractmethod
    def read(self, root: Path) -> pd.DataFrame:
        """The common table for this competition's files under root."""

    @abstractmethod
    def input_files(self, root: Path) -> list[Path]:
        """The CSV files `read` depends on (fingerprinted by the cache)."""

    def no_queries_reason(self, root: Path) -> str:
        """The error for a table without test rows (a run that writes a submission needs some)."""
        files = ", ".join(str(f) for f in self.input_files(root)) or str(root)
        return f"{files}: no test images to predict ({self.name} reads them from its test files)"

    def fingerprints(self, root: Path) -> dict[str, str]:
        """What the cache hashes for this competition's inputs: the CSVs' contents by default."""
        return {str(p): file_fingerprint(p) for p in self.input_files(root) if p.exists()}

    @abstractmethod
    def format_cell(self, labels: list[str], scores: list[float], neighbours: list[str]) -> str:
        """The prediction cell of one submission row."""

    @abstractmethod
    def check_cell(self, cell: str) -> str | None:
        """None when the cell is valid, else what is wrong with it."""

    @abstractmethod
    def parse_cell(self, cell: str) -> tuple[list[str], list[float], list[str]]:
        """(labels, scores, neighbours) of one submission cell: the inverse of `format_cell`."""

    @abstractmethod
    def parse_truth(self, cell: str) -> Any:
        """One solution cell as `score_predictions` takes it."""

    @abstractmethod
    def score_predictions(self, predictions: Predictions, truths: Sequence[Any]) -> float:
        """The competition's metric: the one scoring path of `score`, the leaderboard and validation."""

    @abstractmethod
    def validation_truths(
        self, query_labels: np.ndarray, query_known: np.ndarray, gallery_labels: np.ndarray
    ) -> tuple[np.ndarray, list]:
        """(scored query rows, their truths) when validation queries search a labelled gallery."""

    @abstractmethod
    def predict(
        self, ranked: Predictions, calibration: Calibration, confidence_offset: np.ndarray | None = None
    ) -> Predictions:
        """This competition's predictions from `ranked`: voted labels with their votes, best first, or
        ranked gallery ids (`neighbours`); `confidence_offset` is subtracted from GAP confidences."""

    def calibrate(
        self, score: Callable[[Calibration], float], ranked: Predictions, fixed: Calibration
    ) -> tuple[Calibration, float]:
        """The calibration maximising `score` on validation queries `ranked` (the settings in `fixed`
        kept as the config fixes them), and that score. Nothing to tune by default."""
        return Calibration(), score(Calibration())

    def unknown_report(self, predictions: Predictions, truths: Sequence[Any]) -> dict[str, float]:
        """How well the unknown answer is placed (identification competitions); nothing by default."""
        return {}

    # ---------------------------------------------------------------- shared behaviour
    def submission_ids(self, root: Path) -> list[str]:
        sample = read_csv_checked(root / "sample_submission.csv", [self.header[0]], id_column=self.header[0])
        return sample[self.header[0]].tolist()

    def build_submission(self, predictions: Predictions, expected_ids: list[str]) -> pd.DataFrame:
        """The submission frame, in sample_submission order, validated before anyone writes it."""
        by_id = {}
        for i, qid in enumerate(predictions.ids):
            labels = predictions.labels[i] if predictions.labels else []
            scores = predictions.scores[i] if predictions.scores else []
            neighbours = predictions.neighbours[i] if predictions.neighbours else []
            by_id[qid] = self.format_cell(labels, scores, neighbours)
        extra = sorted(set(by_id) - set(expected_ids))
        if extra:
            raise InputError(
                f"{self.name}: {len(extra)} predicted id(s) are not in sample_submission.csv, e.g. {extra[:5]}"
            )
        missing = [i for i in expected_ids if i not in by_id]
        if missing:
            raise InputError(
                f"{self.name}: no prediction for {len(missing)} id(s) of sample_submission.csv, e.g. {missing[:5]}"
            )
        frame = pd.DataFrame({self.header[0]: expected_ids, self.header[1]: [by_id[i] for i in expected_ids]})
        self.validate_submission(frame, expected_ids, source="generated submission")
        return frame

    def validate_submission(self, frame: pd.DataFrame, expected_ids: list[str], source: str) -> None:
        if tuple(frame.columns) != self.header:
            raise InputError(f"{source}: header {list(frame.columns)} but {self.name} expects {list(self.header)}")
        id_col, cell_col = self.header
        dup = frame[id_col].duplicated()
        if dup.any():
            line = int(frame.index[dup][0]) + 2
            raise InputError(f"{source}: duplicate id '{frame.loc[dup, id_col].iloc[0]}' on line {line}")
        expected = set(expected_ids)
        got = set(frame[id_col])
        if got - expected:
            extra = sorted(got - expected)[:5]
            raise InputError(f"{source}: {len(got - expected)} id(s) not in the expected set, e.g. {extra}")
        if expected - got:
            missing = sorted(expected - got)[:5]
            raise InputError(f"{source}: {len(expected - got)} expected id(s) missing, e.g. {missing}")
        for i, cell in enumerate(frame[cell_col].tolist()):
            problem = self.check_cell(cell)
            if problem:
                raise InputError(f"{source}: line {i + 2} (id '{frame[id_col].iloc[i]}'): {problem}")

    def read_solution(self, path: Path) -> pd.DataFrame:
        solution = read_csv_checked(path, list(self.solution_columns), id_column=self.solution_columns[0])
        bad = ~solution["Usage"].isin(USAGES)
        if bad.any():
            line = int(solution.index[bad][0]) + 2
            raise InputError(f"{path}: line {line}: Usage must be one of {USAGES}")
        return solution

    def frame_predictions(self, frame: pd.DataFrame) -> tuple[Predictions, list]:
        """The predictions and truths of rows holding the submission's columns plus the solution's `truth`."""
        cells = [self.parse_cell(c) for c in frame[self.header[1]].fillna("")]
        predictions = Predictions(
            ids=frame[self.header[0]].tolist(),
            labels=[c[0] for c in cells],
            scores=[c[1] for c in cells],
            neighbours=[c[2] for c in cells],
        )
        return predictions, [self.parse_truth(t) for t in frame["truth"].fillna("")]

    def score_frame(self, frame: pd.DataFrame) -> float:
        """The metric over rows holding the submission's columns plus the solution's `truth`."""
        return self.score_predictions(*self.frame_predictions(frame))

    def open_set_scores(self, predictions: Predictions, truths: Sequence[Any]) -> dict | None:
        """BAKS / BAUS where the format answers 'new' (identification); None elsewhere."""
        return None

    def score(self, submission: pd.DataFrame, solution: pd.DataFrame, source: str = "submission") -> dict:
        """Public and private scores, as the leaderboard shows them."""
        id_col = self.header[0]
        sol_id = self.solution_columns[0]
        self.validate_submission(submission, solution[sol_id].tolist(), source)
        truth = solution[[sol_id, self.solution_columns[1], "Usage"]].rename(
            columns={sol_id: id_col, self.solution_columns[1]: "truth"}
        )
        merged = truth.merge(submission, on=id_col, how="left")
        result: dict = {"metric": self.metric}
        open_set = {}
        for usage in ("Public", "Private"):
            part = merged[merged["Usage"] == usage]
            result[usage.lower()] = float(self.score_frame(part)) if len(part) else None
            open_set[usage.lower()] = self.open_set_scores(*self.frame_predictions(part)) if len(part) else None
        if any(open_set.values()):
            result["open_set"] = open_set
        return result


def split_cell(cell: str) -> list[str]:
    return str(cell).split()


def image_path(root: Path, folder: str, image_id: str, nested: bool, ext: str = ".jpg") -> str:
    """GLR layout nests images by the first three characters of their id."""
    if nested:
        return str(root / folder / image_id[0] / image_id[1] / image_id[2] / f"{image_id}{ext}")
    return str(root / folder / image_id)


def submission_name(experiment: str, fmt: Adapter) -> str:
    """The file an experiment's submission in this format is written to."""
    return f"{experiment}{fmt.suffix}.csv"
