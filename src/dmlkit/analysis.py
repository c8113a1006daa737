"""What the notebooks show, as functions over a run's artifacts (no pipeline code in notebooks).

`open_run(config)` returns the run's table, folds and cached artifacts (computing what is missing
through the normal cached stages); the other functions turn them into frames and figures.
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from .cache import Artifact
from .config import load_config
from .data.folds import fold_parts
from .data.images import read_image
from .pipeline.checks import check_values
from .pipeline.context import Context, ensure_demo_data
from .plots import plot_retrieval_grid
from .retrieval.search import knn
from .retrieval.voting import vote
from .stages.ensemble import run_ensemble
from .stages.folds import load_table, run_folds
from .stages.retrieve import run_retrieve


@dataclass
class Run:
    ctx: Context
    table: pd.DataFrame
    folds: pd.DataFrame


def open_run(config: str | Path, artifacts: str | Path = "artifacts", overrides: list[str] | None = None) -> Run:
    """The run of a config: its table and folds (the cached `folds` stage; demo data built if missing)."""
    ctx = Context(load_config(config, overrides or []), artifacts=Path(artifacts), progress=False)
    check_values(ctx)
    ensure_demo_data(ctx)
    table, folds = load_table(run_folds(ctx))
    return Run(ctx, table, folds)


# ------------------------------------------------------------------------------------------ EDA
def class_sizes(run: Run) -> pd.Series:
    train = run.table[run.table["role"] == "train"]
    return train.loc[train["known"].astype(bool), "label"].value_counts()


def unknown_shares(run: Run) -> pd.DataFrame:
    """Share of unknown rows (new_whale / unlabeled) per role, and of singleton classes."""
    rows = []
    for role, part in run.table.groupby("role"):
        rows.append(
            {"role": role, "images": len(part), "unknown_or_unlabeled": float((~part["known"].astype(bool)).mean())}
        )
    sizes = class_sizes(run)
    rows.append(
        {
            "role": "classes with one training image",
            "images": int(sizes.size),
            "unknown_or_unlabeled": float((sizes == 1).mean()),
        }
    )
    return pd.DataFrame(rows)


def plot_class_sizes(run: Run):
    sizes = class_sizes(run)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.hist(sizes, bins=np.logspace(0, np.log10(max(2, sizes.max())) + 0.01, 20))
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("images per class")
    left.set_ylabel("classes")
    right.plot(np.arange(1, len(sizes) + 1), sizes.to_numpy(), ".")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("class rank")
    right.set_ylabel("images")
    fig.suptitle(f"{run.ctx.cfg.experiment}: {len(sizes)} classes, {int(sizes.sum())} training images")
    fig.tight_layout()
    return fig


def image_size_stats(run: Run, sample: int = 300, seed: int = 0) -> pd.DataFrame:
    """Height/width statistics per role over a sample of images."""
    rng = np.random.default_rng(seed)
    rows = []
    for role, part in run.table.groupby("role"):
        chosen = part.iloc[rng.permutation(len(part))[:sample]]
        for path in chosen["path"]:
            try:
                h, w = read_image(path).shape[:2]
            except OSError:
                continue
            rows.append({"role": role, "height": h, "width": w})
    return pd.DataFrame(rows).groupby("role").describe().round(1)


def plot_sample_grid(run: Run, classes: int = 6, per_class: int = 6, seed: int = 0):
    """Rows of training images, one class per row (the largest classes first)."""
    sizes = class_sizes(run)
    train = run.table[run.table["role"] == "train"]
    chosen = sizes.index[:classes]
    fig, axes = plt.subplots(len(chosen), per_class, figsize=(1.6 * per_class, 1.7 * len(chosen)), squeeze=False)
    for r, label in enumerate(chosen):
        paths = train.loc[train["label"] == label, "path"].tolist()[:per_class]
        for c in range(per_class):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(paths):
                image = read_image(paths[c])
                ax.imshow(np.squeeze(image), cmap="gray" if image.shape[-1] == 1 else None)
        axes[r, 0].set_title(f"class {label} ({sizes[label]})", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- validation analysis
@dataclass
class Validation:
    queries: pd.DataFrame  # val rows: id, path, label, known
    gallery: pd.DataFrame  # training part rows
    sims: np.ndarray
    ids: np.ndarray
    predicted: list[list[str]]
    scores: list[list[float]]


def validation(run: Run, k: int = 10) -> Validation:
    """kNN of the validation fold's images against the training part, with the run's ensemble."""
    ensemble: Artifact = run_ensemble(run.ctx)
    embeddings = np.load(ensemble.file("embeddings.npy"))
    fold = run.ctx.cfg.retrieve.val_fold if run.ctx.cfg.retrieve.val_fold is not None else run.ctx.cfg.members[0].fold
    train, val = fold_parts(run.folds, fold)
    row_of = {i: n for n, (r, i) in enumerate(zip(run.table["role"], run.table["id"], strict=True)) if r == "train"}
    q = embeddings[[row_of[i] for i in val["id"]]]
    g = embeddings[[row_of[i] for i in train["id"]]]
    sims, ids = knn(q, g, k=min(k, len(g)), progress=False)
    voting = run.ctx.cfg.retrieve.voting
    predicted, scores = vote(sims, ids, train["label"].to_numpy(), voting.k, voting.power)
    return Validation(val, train, sims, ids, predicted, scores)


def plot_retrievals(v: Validation, queries: int = 6, k: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(v.queries))[:queries]
    labels = v.gallery["label"].to_numpy()
    paths = v.gallery["path"].to_numpy()
    grid_paths = [[paths[j] for j in v.ids[r, :k]] for r in rows]
    correct = [[labels[j] == v.queries["label"].iloc[r] for j in v.ids[r, :k]] for r in rows]
    out = Path(tempfile.mkdtemp(prefix="dmlkit-")) / "retrievals.png"
    plot_retrieval_grid(
        v.queries["path"].to_numpy()[rows].tolist(),
        grid_paths,
        correct,
        out,
        read_image,
        "validation queries (left) and their neighbours: green right, red wrong",
    )
    return out


def score_by_frequency(v: Validation, bins: tuple[int, ...] = (1, 2, 4, 8, 16, 10**9)) -> pd.DataFrame:
    """Recall@1 and top-1 accuracy of the vote by how many training images the query's class has."""
    counts = v.gallery["label"].value_counts()
    n = v.queries["label"].map(counts).fillna(0).astype(int).to_numpy()
    top1 = np.array([p[0] if p else None for p in v.predicted], dtype=object)
    hit = top1 == v.queries["label"].to_numpy()
    nn = v.gallery["label"].to_numpy()[v.ids[:, 0]] == v.queries["label"].to_numpy()
    rows = []
    edges = [0, *bins]
    for lo, hi in itertools.pairwise(edges):
        mask = (n >= lo) & (n < hi) if lo else n == 0
        if mask.any():
            name = (
                "unseen (0)" if not lo else (f"{lo}" if hi == lo + 1 else f"{lo}–{hi - 1}" if hi < 10**9 else f"≥{lo}")
            )
            rows.append(
                {
                    "training images of the class": name,
                    "queries": int(mask.sum()),
                    "recall@1": float(nn[mask].mean()),
                    "vote top-1": float(hit[mask].mean()),
                }
            )
    return pd.DataFrame(rows)


def plot_similarity_histograms(v: Validation, threshold: float | None = None):
    """Top vote score (Σ over the top-k neighbours of sim^p) of queries whose voted label is right,
    wrong, or whose class is unseen in training — the quantity the unknown threshold cuts."""
    known = v.queries["known"].astype(bool).to_numpy()
    top1 = np.array([p[0] if p else None for p in v.predicted], dtype=object)
    right = top1 == v.queries["label"].to_numpy()
    top = np.array([s[0] if s else 0.0 for s in v.scores])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(top.min(), top.max() + 1e-9, 30)
    for mask, name in ((known & right, "correct"), (known & ~right, "wrong"), (~known, "unknown class")):
        if mask.any():
            ax.hist(top[mask], bins=bins, alpha=0.5, label=f"{name} ({int(mask.sum())})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", label=f"unknown threshold {threshold:.3f}")
    ax.set_xlabel("top vote score of the validation query")
    ax.set_ylabel("validation queries")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_projection(run: Run, method: str = "pca", classes: int = 12, seed: int = 0):
    """2-D projection (PCA or t-SNE) of the training embeddings of the largest classes."""
    embeddings = np.load(run_ensemble(run.ctx).file("embeddings.npy"))
    train_rows = np.flatnonzero((run.table["role"] == "train").to_numpy() & run.table["known"].astype(bool).to_numpy())
    labels = run.table["label"].to_numpy()[train_rows]
    top = class_sizes(run).index[:classes]
    keep = np.isin(labels, top)
    x, y = embeddings[train_rows[keep]], labels[keep]
    if method == "tsne":
        points = TSNE(2, perplexity=min(30, max(2, len(x) // 4)), random_state=seed, init="pca").fit_transform(x)
    else:
        points = PCA(2, random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(6, 5))
    for label in top:
        mask = y == label
        ax.scatter(points[mask, 0], points[mask, 1], s=12, label=str(label))
    ax.legend(fontsize=7, ncol=2, title="class")
    ax.set_title(f"{method.upper()} of the ensemble embeddings, {len(top)} largest classes")
    fig.tight_layout()
    return fig


def step_table(run: Run) -> pd.DataFrame:
    """The retrieve stage's validation score after each post-processing step."""
    art = run_retrieve(run.ctx)
    try:
        return pd.read_csv(art.file("report.csv"))
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def tuned_threshold(run: Run) -> float | None:
    art = run_retrieve(run.ctx)
    return art.manifest.get("result", {}).get("tuned", {}).get("threshold")
