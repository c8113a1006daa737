"""The GPU path in one short run (#31), for a machine with CUDA: what CPU CI cannot check.

1. the whale demo, one process, a few epochs (AMP under `amp: auto`): wall time, device, scores;
2. with two or more GPUs (or `--ddp-on-cpu`): `torchrun --nproc_per_node=2` trains ConvNeXt-atto
   on it (`sync_bn` on CUDA, `freeze_bn` on CPU), then embeds under torchrun;
3. faiss: exact kNN on random unit vectors, on the GPU against the CPU (same neighbours), and a
   k above faiss-gpu's 2048 (searched on the CPU instead of failing).

On a CPU-only machine parts 1 and 3 run on the CPU: a dry run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, report

from dmlkit.retrieval.search import GPU_MAX_K, gpu_usable, knn

ROOT = Path(__file__).resolve().parents[1]


def dmlkit_command(stage: str, overrides: list[str], scratch: Path, world: int = 1) -> list[str]:
    """`python -m dmlkit STAGE -c whale-demo.yaml OVERRIDES... --artifacts ...` (overrides together: argparse)."""
    launcher = [sys.executable]
    if world > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={world}"]
    config = ["-c", str(ROOT / "configs/whale-demo.yaml"), f"competition.root={scratch}/whale-demo", *overrides]
    return [*launcher, "-m", "dmlkit", stage, *config, "--artifacts", f"{scratch}/artifacts", "--no-progress"]


def timed(cmd: list[str], scratch: Path, log_name: str) -> dict:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=scratch)
    (scratch / log_name).write_text(done.stdout + done.stderr)
    last_line = ((done.stdout + done.stderr).strip().splitlines() or [""])[-1][-200:]
    return {"rc": done.returncode, "wall_s": round(time.perf_counter() - start, 1), "last_line": last_line}


def single_process(scratch: Path, epochs: int) -> dict:
    row = timed(dmlkit_command("all", [f"member_defaults.train.epochs={epochs}"], scratch), scratch, "single.log")
    runs = sorted((scratch / "artifacts/whale-demo/runs").glob("*.json"))
    if runs:
        record = json.loads(runs[-1].read_text())
        row["validation_map@5"] = record["validation"].get("map@5")
        row["private_map@5"] = record["leaderboard"][0]["private"] if record["leaderboard"] else None
    return {"part": f"whale demo, 1 process, {epochs} epochs", **row}


def two_processes(scratch: Path, cuda: bool) -> list[dict]:
    norm = "member_defaults.train.sync_bn=true" if cuda else "member_defaults.train.freeze_bn=true"
    overrides = ["members.0.backbone=convnext_atto", "member_defaults.train.epochs=2", norm, "experiment=ddp"]
    rows = []
    for stage in ("train", "embed"):
        row = timed(dmlkit_command(stage, overrides, scratch, 2), scratch, f"ddp-{stage}.log")
        rows.append({"part": f"torchrun 2 processes: {stage} (convnext_atto, {norm.split('.')[-1]})", **row})
    return rows


def faiss_search(n_gallery: int, n_queries: int, dim: int = 512) -> list[dict]:
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((n_gallery, dim), dtype=np.float32)
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    rows, found = [], {}
    places = ["no", "yes"] if gpu_usable() else ["no"]
    for k in (100, GPU_MAX_K + 952):
        for place in places:
            start = time.perf_counter()
            _, ids = knn(queries, gallery, k=k, use_gpu=place, progress=False)
            took = time.perf_counter() - start
            found[place, k] = ids
            same = float((found["no", k][:, :10] == ids[:, :10]).mean())
            rows.append(
                {
                    "part": f"faiss flat {n_queries}×{n_gallery}×{dim}, k={k}",
                    "gpu": place,
                    "wall_s": round(took, 2),
                    "top10_same_as_cpu": same,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench gpu")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--gallery", type=int, default=200_000)
    parser.add_argument("--ddp-on-cpu", action="store_true", help="run the torchrun part with gloo on the CPU")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        rows.append(single_process(scratch, args.epochs))
        if (cuda and torch.cuda.device_count() >= 2) or args.ddp_on_cpu:
            rows += two_processes(scratch, cuda)
        rows += faiss_search(args.gallery, 10_000)
        RESULTS.mkdir(parents=True, exist_ok=True)
        for log in scratch.glob("*.log"):  # the runs' own logs beside the JSON, for what went wrong
            (RESULTS / f"gpu-{log.name}").write_text(log.read_text())
    notes = {
        "cuda": cuda,
        "gpus": torch.cuda.device_count(),
        "faiss_gpu": gpu_usable(),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    report("gpu", rows, notes)
    return 0 if all(row.get("rc", 0) == 0 for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
