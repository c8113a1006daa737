"""Shared helpers: timing, peak RSS, tables and JSON next to the scripts."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss():
    """Samples the process RSS every 5 ms; yields a dict whose 'peak_delta' is set on exit."""
    box = {"start": rss_bytes(), "peak": rss_bytes()}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            box["peak"] = max(box["peak"], rss_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        stop.set()
        thread.join()
        box["peak"] = max(box["peak"], rss_bytes())
        box["peak_delta"] = box["peak"] - box["start"]


def best_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_best(fns: list, repeats: int, warmup: int = 1) -> list[float]:
    """Best time of each function, the functions alternating (A B A B …) so that a machine whose
    speed drifts (other jobs, thermal) affects them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def machine() -> dict:
    import torch

    from dmlkit.inference import cpu_has_native_bf16

    info = {
        "cpu": cpu_model() or platform.processor() or platform.machine(),
        "native_bf16": cpu_has_native_bf16(),  # the figures differ several-fold with it (benchmarks/README.md)
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def report(name: str, rows: list[dict], notes: dict | None = None) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    print(f"\n== {name} ({machine()['cores']} cores{', ' + machine()['gpu'] if 'gpu' in machine() else ''})")
    print(frame.to_string(index=False))
    for key, value in (notes or {}).items():
        print(f"   {key}: {value}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"machine": machine(), "rows": rows, "notes": notes or {}}, indent=2, default=str)
    )
    return frame
