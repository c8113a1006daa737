"""The pipeline's stages other than training and embedding at Google-Landmarks size.

A synthetic landmark-recognition competition (GLR2020's files and nesting) at N training images:
N small JPEGs written once under `--scratch` and reused across runs, N/20 classes of long-tailed
sizes, N/10 test images (half of them non-landmarks). Then the stages as the pipeline runs them:
the adapter reading the table, folds (with `check_images: header` and the image fingerprint),
the ensemble of two members' embeddings, retrieve (validation report, calibration, voting, test
predictions, the retrieval grid) and submit, on synthetic 512-d embeddings clustered by class.
faiss's search inside retrieve is timed apart (`search_s`); `retrieve_s` is the rest of the stage.
Per stage: wall time, peak RSS above the start, and the growth exponent between sizes.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from common import peak_rss, report

from dmlkit import cache
from dmlkit.competitions import get_adapter
from dmlkit.config import FoldsConfig, RetrieveConfig
from dmlkit.retrieval import chain
from dmlkit.retrieval.ensemble import concatenate
from dmlkit.retrieval.validation import Scorers
from dmlkit.runtime import set_threads
from dmlkit.stages import retrieve as retrieve_stage
from dmlkit.stages.folds import make_folds, read_folds
from dmlkit.stages.submit import write_submissions

DIM = 512


def image_id(i: int) -> str:
    return f"{i * 2654435761 % 2**32:08x}{i:08x}"  # hex ids spread over the 16³ nested folders


def write_competition(root: Path, n_train: int, seed: int = 0) -> None:
    """train.csv, sample_submission.csv and every image file (one small JPEG's bytes), once."""
    done = root / ".complete"
    if done.exists():
        return
    rng = np.random.default_rng(seed)
    n_classes = max(2, n_train // 20)
    labels = np.minimum((n_classes * rng.random(n_train) ** 2).astype(int), n_classes - 1)  # long tail
    train_ids = [image_id(i) for i in range(n_train)]
    test_ids = [image_id(n_train + i) for i in range(max(1, n_train // 10))]
    jpeg = cv2.imencode(".jpg", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))[1].tobytes()
    for folder, ids in (("train", train_ids), ("test", test_ids)):
        for n, i in enumerate(ids):
            path = root / folder / i[0] / i[1] / i[2] / f"{i}.jpg"
            if n == 0 or not path.parent.is_dir():
                path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg)
    pd.DataFrame({"id": train_ids, "landmark_id": labels}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": test_ids, "landmarks": ""}).to_csv(root / "sample_submission.csv", index=False)
    done.write_text("ok")


def synthetic_embeddings(table: pd.DataFrame, dim: int, seed: int = 1) -> np.ndarray:
    """Unit vectors around a random centre per class; test rows half from training classes, half
    random (non-landmarks)."""
    rng = np.random.default_rng(seed)
    labels = table["label"].to_numpy()
    train = (table["role"] == "train").to_numpy()
    classes, codes = np.unique(labels[train].astype(str), return_inverse=True)
    centres = rng.standard_normal((len(classes), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rows = np.empty(len(table), dtype=np.int64)
    rows[train] = codes
    test = np.flatnonzero(~train)
    rows[test] = rng.integers(0, len(classes), len(test))
    emb = np.empty((len(table), dim), np.float32)
    for start in range(0, len(table), 100_000):  # bounded temporaries
        block = slice(start, start + 100_000)
        emb[block] = centres[rows[block]] + 0.06 * rng.standard_normal((len(emb[block]), dim), dtype=np.float32)
    emb[test[: len(test) // 2]] = rng.standard_normal((len(test) // 2, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb


class SearchClock:
    """faiss searches inside the retrieve stage, timed apart from the rest of it."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        self.inner = chain.knn

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1


def timed(rows: list[dict], size: dict, stage: str, fn):
    with peak_rss() as mem:
        started = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - started
    rows.append({**size, "stage": stage, "seconds": round(seconds, 2), "peak_mb": round(mem["peak_delta"] / 2**20)})
    print(f"  {stage}: {seconds:.2f} s, peak +{mem['peak_delta'] / 2**20:.0f} MB", flush=True)
    return out


def index_for(gallery: int) -> dict:
    """What a user would pick: exact search up to a few hundred thousand images, IVF beyond."""
    if gallery <= 300_000:
        return {"index": "flat"}
    return {"index": "ivf", "nlist": 1024, "nprobe": 16}


def run_size(n_train: int, scratch: Path, rows: list[dict]) -> None:
    root = scratch / f"glr-{n_train}"
    started = time.perf_counter()
    write_competition(root, n_train)
    print(f"N={n_train}: competition files ready ({time.perf_counter() - started:.0f} s)", flush=True)
    adapter = get_adapter("landmark-recognition-2020")
    size = {"train_images": n_train, "test_images": max(1, n_train // 10)}
    work = Path(tempfile.mkdtemp(prefix=f"scale-{n_train}-", dir=scratch))
    table = timed(rows, size, "read table", lambda: adapter.read(root))
    folds_cfg = FoldsConfig(check_images="header")
    timed(rows, size, "folds (check_images: header)", lambda: make_folds(table, folds_cfg, work, 2, False))
    table, folds = timed(rows, size, "read folds", lambda: read_folds(work / "table.csv", work / "folds.csv"))
    emb = synthetic_embeddings(table, DIM)
    halves = [np.ascontiguousarray(emb[:, : DIM // 2]), np.ascontiguousarray(emb[:, DIM // 2 :])]
    del emb
    ensembled = timed(rows, size, "ensemble (2 members)", lambda: concatenate(halves, [1.0, 1.0]))
    halves.clear()
    np.save(work / "embeddings.npy", ensembled)
    timed(rows, size, "read embeddings.npy back", lambda: np.load(work / "embeddings.npy"))
    # what reusing the artifact costs on top: its size and CRC-32 against the manifest (cache.damage)
    timed(rows, size, "check embeddings.npy for reuse", lambda: cache.file_check(work / "embeddings.npy"))
    cfg = RetrieveConfig(k=100, **index_for(n_train))
    clock = SearchClock()
    chain.knn = clock
    try:
        embeddings = retrieve_stage.EmbeddingSet(ensembled, {"e": ensembled}, {})
        predictions, report_frame, _, _ = timed(
            rows,
            size,
            "retrieve (all)",
            lambda: retrieve_stage.retrieve(cfg, [adapter], table, folds, embeddings, 0, Scorers(), False),
        )
        timed(rows, size, "write retrieval", lambda: retrieve_stage.write_retrieval(work, predictions, report_frame))
        timed(
            rows,
            size,
            "retrieval grid",
            lambda: retrieve_stage.save_retrieval_grid(work / "grid.png", table, folds, ensembled, 0),
        )
    finally:
        chain.knn = clock.inner
    total = next(r for r in reversed(rows) if r["stage"] == "retrieve (all)")
    print(f"  retrieve: {clock.seconds:.2f} s in {clock.calls} faiss searches ({cfg.index})", flush=True)
    rows.append(
        {**size, "stage": f"  search ({clock.calls} faiss calls, {cfg.index})", "seconds": round(clock.seconds, 2)}
    )
    rows.append({**size, "stage": "  retrieve without search", "seconds": round(total["seconds"] - clock.seconds, 2)})
    timed(rows, size, "submit", lambda: write_submissions([adapter], root, "scale", work, work))


def growth(rows: list[dict]) -> list[dict]:
    """Each stage's log-log slope of time against N between consecutive sizes."""
    frame = pd.DataFrame(rows)
    out = []
    for stage, part in frame.groupby("stage", sort=False):
        part = part.sort_values("train_images")
        for (n1, t1), (n2, t2) in zip(
            part[["train_images", "seconds"]].values[:-1], part[["train_images", "seconds"]].values[1:], strict=True
        ):
            if t1 > 0.05 and t2 > 0:
                out.append(
                    {
                        "stage": stage,
                        "from": int(n1),
                        "to": int(n2),
                        "exponent": round(math.log(t2 / t1) / math.log(n2 / n1), 2),
                    }
                )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench scale")
    parser.add_argument("--scratch", required=True, type=Path, help="where the synthetic images are written once")
    parser.add_argument("--sizes", default="10000,100000,1000000", help="training images per run, comma-separated")
    parser.add_argument("--out", default="scale", help="results/<out>.json")
    args = parser.parse_args(argv)
    set_threads(None)
    args.scratch.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for n in [int(s) for s in args.sizes.split(",")]:
        run_size(n, args.scratch, rows)
    slopes = growth(rows)
    report(args.out, rows, {"growth": slopes, "dim": DIM, "k": 100, "check_images": "header"})
    print(pd.DataFrame(slopes).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
