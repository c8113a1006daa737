"""PNG plots people would rather look at than tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def plot_training_curves(history: pd.DataFrame, path: Path, title: str = "") -> None:
    """Loss and learning rate per epoch, with the validation score on a second axis."""
    if history.empty:
        return
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(history["epoch"], history["loss"], "o-", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    if "val_score" in history:
        ax_val = ax_loss.twinx()
        ax_val.plot(history["epoch"], history["val_score"], "s-", color="tab:green", label="val score")
        if "val_recall@1" in history:
            ax_val.plot(history["epoch"], history["val_recall@1"], "^--", color="tab:olive", label="val recall@1")
        ax_val.set_ylabel("validation")
        ax_val.legend(loc="lower right")
    ax_loss.legend(loc="upper right")
    ax_lr.plot(history["epoch"], history["lr"], "o-", color="tab:orange")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate (end of epoch)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_retrieval_grid(
    query_paths: list[str],
    neighbour_paths: list[list[str]],
    correct: list[list[bool]],
    path: Path,
    read_image,
    title: str = "",
) -> None:
    """Each row: a query and its top retrieved images, correct ones framed green, wrong ones red."""
    if not query_paths:
        return
    k = max(len(row) for row in neighbour_paths)
    fig, axes = plt.subplots(len(query_paths), k + 1, figsize=(1.6 * (k + 1), 1.7 * len(query_paths)), squeeze=False)
    for r, (query, row, marks) in enumerate(zip(query_paths, neighbour_paths, correct, strict=True)):
        cells = [(query, None), *zip(row, marks, strict=True)]
        for c in range(k + 1):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            image_path, mark = cells[c]
            image = read_image(image_path)
            ax.imshow(np.squeeze(image), cmap="gray" if image.shape[-1] == 1 else None)
            colour = "black" if mark is None else ("tab:green" if mark else "tab:red")
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            if c == 0:
                ax.set_title("query", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
