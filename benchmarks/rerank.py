"""Sparse k-reciprocal re-ranking and QE/DBA given the top-k graph, on synthetic clustered embeddings:
time and peak RSS as N grows, the exact kNN time the graph needs, and the dense reference where it runs.

The exact kNN time of the N×N graph is measured on a sample of queries and scaled by N/sample
(exact search costs the same per query). The graph itself is exact up to `--exact-up-to` points;
beyond, it comes from a faiss IVF index (approximate: the re-ranking's cost does not depend on it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from common import peak_rss, report

from dmlkit.retrieval.expansion import database_augmentation, query_expansion
from dmlkit.retrieval.rerank import gallery_candidates, k_reciprocal_rerank
from dmlkit.retrieval.search import knn

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 20), d), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_knn_seconds(x: np.ndarray, k: int, sample: int) -> float:
    """Seconds for the exact (N, k) graph of x against itself: a query sample, scaled by N/sample."""
    sample = min(sample, len(x))
    start = time.perf_counter()
    knn(x[:sample], x, k=k, batch=8192, use_gpu="no", progress=False)
    return (time.perf_counter() - start) * len(x) / sample


def graph_of(x: np.ndarray, k: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    if exact:
        return knn(x, x, k=k, batch=8192, use_gpu="no", progress=False)
    nlist = int(np.sqrt(len(x)))
    return knn(x, x, k=k, kind="ivf", nlist=nlist, nprobe=8, batch=65536, use_gpu="no", progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench rerank")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--sizes", default=None, help="comma-separated N (default 2000,10000 quick; 10k,100k,1M)")
    parser.add_argument("--exact-up-to", type=int, default=200_000)
    args = parser.parse_args(argv)
    sizes = [2000, 10000] if args.quick else [10_000, 100_000, 1_000_000]
    if args.sizes:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    k1, k2, candidates, k_qe = 20, 6, 100, 10
    rows = []
    for n in sizes:
        x = clustered(n, args.dim)
        n_q = n // 10
        t_knn = exact_knn_seconds(x, k1 + candidates, 10_000)
        exact = n <= args.exact_up_to
        start = time.perf_counter()
        sims, graph = graph_of(x, k1 + candidates, exact)
        t_graph = time.perf_counter() - start
        with peak_rss() as mem:
            start = time.perf_counter()
            cand = gallery_candidates(graph, n_q, candidates)
            k_reciprocal_rerank(x[:n_q], x[n_q:], graph, k1, k2, 0.3, cand, progress=False)
            t_rerank = time.perf_counter() - start
        # QE/DBA from the same graph: DBA over the gallery (its own rows of the graph), QE of the queries.
        gallery_rows = graph[n_q:, : k_qe + 1] - n_q
        gallery_sims = np.where(gallery_rows >= 0, sims[n_q:, : k_qe + 1], 0.0)
        with peak_rss() as mem_qe:
            start = time.perf_counter()
            gallery = database_augmentation(
                x[n_q:], gallery_sims, np.where(gallery_rows >= 0, gallery_rows, -1), 3.0, k_qe
            )
            query_rows = graph[:n_q, 1 : k_qe + 1] - n_q
            query_expansion(
                x[:n_q], gallery, sims[:n_q, 1 : k_qe + 1], np.where(query_rows >= 0, query_rows, -1), 3.0, k_qe
            )
            t_qe = time.perf_counter() - start
        rows.append(
            {
                "N": n,
                "dim": args.dim,
                "exact_knn_s": round(t_knn, 2),
                "graph": "exact" if exact else "IVF",
                "graph_s": round(t_graph, 2),
                "rerank_s": round(t_rerank, 2),
                "rerank/exact_knn": round(t_rerank / t_knn, 2),
                "rerank_peak_mb": round(mem["peak_delta"] / 2**20),
                "qe_dba_s": round(t_qe, 2),
                "qe_dba_peak_mb": round(mem_qe["peak_delta"] / 2**20),
                "graph_mb": round((graph.nbytes + sims.nbytes) / 2**20),
            }
        )
        done = rows[-1]  # progress line: the full mode takes minutes per size
        ratio = done["rerank/exact_knn"]
        print(f"  N={done['N']:,}: re-ranking {done['rerank_s']} s, {ratio}× the exact kNN", flush=True)
        del x, sims, graph, gallery
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
        cand = gallery_candidates(graph, dense_n // 10, candidates)
        k_reciprocal_rerank(x[: dense_n // 10], x[dense_n // 10 :], graph, k1, k2, 0.3, cand, progress=False)
        t_sparse = time.perf_counter() - start
    report(
        "rerank",
        rows,
        {
            "settings": f"k1={k1}, k2={k2}, {candidates} candidates per query, queries = N/10; QE/DBA α=3, k={k_qe}",
            "exact_knn_s": "exact N×N kNN graph, measured on 10,000 queries and scaled by N/10,000",
            f"dense reference at N={dense_n}": f"{t_dense:.1f} s, peak +{mem['peak_delta'] / 2**20:.0f} MB "
            f"(N² float64 matrices: {8 * dense_n**2 / 2**20:.0f} MB each)",
            f"sparse at N={dense_n}": f"{t_sparse:.2f} s, peak +{mem_sparse['peak_delta'] / 2**20:.0f} MB",
            "target": "memory grows as N·k (1M within 8 GB); re-ranking time ≤ the kNN time it needs",
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
