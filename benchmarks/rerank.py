"""Sparse k-reciprocal re-ranking and QE/DBA given the top-k graph, on synthetic clustered embeddings:
time and peak RSS as N grows, the kNN time the graph needs, and the dense reference where it runs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from common import peak_rss, report

from dmlkit.retrieval.expansion import database_augmentation, query_expansion
from dmlkit.retrieval.rerank import k_reciprocal_rerank
from dmlkit.retrieval.search import knn

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 20), d), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench rerank")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args(argv)
    sizes = [2000, 10000] if args.quick else [10000, 100000, 1000000]
    k1, k2, candidates = 20, 6, 100
    rows = []
    for n in sizes:
        x = clustered(n, args.dim)
        n_q = n // 10
        start = time.perf_counter()
        _, graph = knn(x, x, k=k1 + candidates, batch=8192, use_gpu="no", progress=False)
        t_knn = time.perf_counter() - start
        with peak_rss() as mem:
            start = time.perf_counter()
            k_reciprocal_rerank(x[:n_q], x[n_q:], graph, k1, k2, 0.3, candidates=candidates, progress=False)
            t_rerank = time.perf_counter() - start
        with peak_rss() as mem_qe:
            start = time.perf_counter()
            sims, ids = knn(x[n_q:], x[n_q:], k=11, batch=8192, use_gpu="no", progress=False)
            t_graph = time.perf_counter() - start
            start = time.perf_counter()
            gallery = database_augmentation(x[n_q:], sims, ids, 3.0, 10)
            qs, qi = knn(x[:n_q], gallery, k=10, batch=8192, use_gpu="no", progress=False)
            query_expansion(x[:n_q], gallery, qs, qi, 3.0, 10)
            t_qe = time.perf_counter() - start
        rows.append(
            {
                "N": n,
                "dim": args.dim,
                "knn_graph_s": round(t_knn, 2),
                "rerank_s": round(t_rerank, 2),
                "rerank/knn": round(t_rerank / t_knn, 2),
                "rerank_peak_mb": round(mem["peak_delta"] / 2**20),
                "qe_dba_s": round(t_qe, 2),
                "qe_dba_graph_s": round(t_graph, 2),
                "qe_dba_peak_mb": round(mem_qe["peak_delta"] / 2**20),
            }
        )
    dense_n = 1500 if args.quick else 4000
    from test_retrieval import dense_k_reciprocal

    x = clustered(dense_n, args.dim)
    with peak_rss() as mem:
        start = time.perf_counter()
        dense_k_reciprocal(x, dense_n // 10, k1, k2, 0.3)
        t_dense = time.perf_counter() - start
    _, graph = knn(x, x, k=k1 + candidates, use_gpu="no", progress=False)
    with peak_rss() as mem_sparse:
        start = time.perf_counter()
        k_reciprocal_rerank(x[: dense_n // 10], x[dense_n // 10 :], graph, k1, k2, 0.3, candidates, progress=False)
        t_sparse = time.perf_counter() - start
    report(
        "rerank",
        rows,
        {
            f"dense reference at N={dense_n}": f"{t_dense:.1f} s, peak +{mem['peak_delta'] / 2**20:.0f} MB "
            f"(N² float64 matrices: {8 * dense_n**2 / 2**20:.0f} MB each)",
            f"sparse at N={dense_n}": f"{t_sparse:.2f} s, peak +{mem_sparse['peak_delta'] / 2**20:.0f} MB",
            "target": "memory grows as N·k (1M within 8 GB); re-ranking time ≤ the kNN time it needs",
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
