"""Exact kNN: faiss IndexFlatIP vs the matmul bound 2·Q·N·d at the sgemm rate measured in the same run."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import best_time, peak_rss, report

from dmlkit.retrieval.search import knn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench knn")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    q_n, g_n, d, k = (2000, 20000, 512, 100) if args.quick else (10000, 100000, 512, 100)
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((q_n, d), dtype=np.float32)
    gallery = rng.standard_normal((g_n, d), dtype=np.float32)
    a = torch.from_numpy(queries[:2048])
    b = torch.from_numpy(gallery[:8192])
    sgemm = best_time(lambda: torch.mm(a, b.T), 5)
    rate = 2 * a.shape[0] * b.shape[0] * d / sgemm
    bound = 2 * q_n * g_n * d / rate
    rows = []
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)  # unit vectors, as the pipeline's embeddings
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    for batch in [4096] if args.quick else [1024, 4096, 16384]:
        with peak_rss() as mem:
            start = time.perf_counter()
            knn(queries, gallery, k=k, batch=batch, use_gpu="no", progress=False)
            took = time.perf_counter() - start
        rows.append(
            {
                "queries": q_n,
                "gallery": g_n,
                "dim": d,
                "k": k,
                "query_batch": batch,
                "method": "faiss IndexFlatIP",
                "faiss_s": round(took, 2),
                "matmul_bound_s": round(bound, 2),
                "ratio": round(took / bound, 2),
                "peak_rss_delta_mb": round(mem["peak_delta"] / 2**20),
                "gallery_mb": round(gallery.nbytes / 2**20),
                "batch_scores_mb": round(batch * g_n * 4 / 2**20),
            }
        )
    report(
        "knn",
        rows,
        {
            "sgemm_gflops": round(rate / 1e9, 1),
            "target": "faiss ≤1.3× the bound, memory bounded by the batch",
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
