"""Process-wide setup done once per run: logging, thread counts, seeds, device, distributed rank."""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import faiss
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .process import RUN_LOG

log = logging.getLogger("dmlkit")

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def setup_logging(log_dir: Path | None = None, name: str = "run", level: int = logging.INFO) -> Path | None:
    """Console plus (when log_dir is given) a log file per run; returns the file's path.

    Under torchrun only rank 0 writes INFO lines: the ranks run the same stages, and 8 GPUs would
    print every line 8 times. The other ranks print warnings and errors, marked with their rank."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level)
    where = "" if is_main_process() else f"[rank {rank()}] "
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {where}%(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    if not is_main_process():
        console.setLevel(max(level, logging.WARNING))
    root.addHandler(console)
    path = None
    if log_dir is not None and is_main_process():
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        file_handler = logging.FileHandler(path)
        file_handler.set_name(RUN_LOG)
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    for noisy in ("PIL", "matplotlib", "timm", "faiss", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path


def set_threads(threads: int | None) -> int:
    """Set torch, OpenMP and faiss thread counts once, explicitly (they interfere otherwise)."""
    n = threads or len(os.sched_getaffinity(0))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and torch.device(default_device()).type == "cpu":
        n = max(1, n // world)
    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    cv2.setNumThreads(1)  # decode runs per sample inside loader workers
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def default_device() -> str:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return f"cuda:{local}"
    warn_unusable_cuda()
    return "cpu"


_CUDA_WARNED: list[str] = []


def warn_unusable_cuda() -> str | None:
    """A CUDA build of torch that finds no usable GPU (driver too old for the build, no driver,
    CUDA_VISIBLE_DEVICES empty) runs on the CPU; say so once, with CUDA's own reason."""
    if torch.version.cuda is None or _CUDA_WARNED:
        return _CUDA_WARNED[0] if _CUDA_WARNED else None
    try:
        torch.cuda.init()
        reason = "torch.cuda.is_available() is False"
    except Exception as exc:  # CUDA's own message is the reason shown to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    message = (
        f"torch {torch.__version__} is a CUDA {torch.version.cuda} build but finds no usable GPU ({reason}): "
        "running on the CPU"
    )
    log.warning("%s", message)
    _CUDA_WARNED.append(message)
    return message


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def init_distributed(timeout_min: float = 360.0) -> bool:
    """Join the process group when launched by torchrun; returns True when distributed.

    `timeout_min` bounds every collective, the barriers where ranks wait for rank 0's single-process
    stages included (NCCL's default, 10 min, is shorter than GLDv2's retrieval)."""
    if world_size() <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min))
    if backend == "nccl":  # flags travel between CPUs: agreeing on a skip does not wait for the GPU
        _FLAG_GROUP.append(dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_min)))
    atexit.register(shutdown_distributed)
    log.info("distributed: rank %d of %d (%s, timeout %g min)", rank(), world_size(), backend, timeout_min)
    return True


def shutdown_distributed() -> None:
    """Leave the process group (every group) while the interpreter is still whole.

    A process that exits with the group alive can abort after its work is done: gloo's worker threads
    are torn down in the interpreter's finalisation ('terminate called without an active exception',
    SIGABRT), and torchrun then fails the whole job for a run that finished."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _FLAG_GROUP.clear()


_FLAG_GROUP: list = []  # a gloo group beside NCCL's, for flags held by the CPU


def any_rank(flag: bool, device=None) -> bool:
    """Whether `flag` holds on any rank. Every rank calls it at the same point, so a decision to skip
    a step (too few readable images, a non-finite loss on one rank) is taken by all ranks together:
    one rank skipping alone leaves the others waiting in DDP's all-reduce until the timeout. Under
    NCCL the flag goes through a gloo group on the CPU (no device tensor, no wait for the GPU's queue);
    `device` is used only where the process group is NCCL's alone."""
    if world_size() <= 1 or not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    group = _FLAG_GROUP[0] if _FLAG_GROUP else None
    value = torch.tensor([1 if flag else 0], device="cpu" if group is not None or device is None else device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def broadcast_object(value):
    """Rank 0's `value` on every rank (itself without torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def configure_cuda(benchmark: bool, tf32: bool) -> None:
    """cuDNN's per-shape algorithm search and TF32 for fp32 matmuls/convolutions (no effect off CUDA)."""
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class _LoggedProgress:
    """Progress for a log file or CI: one log line per 10% of the loop, only once it has run 30 s."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None, quiet_s: float = 30.0):
        self.iterable = iterable
        self.desc = desc
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.quiet_s = quiet_s
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def __iter__(self) -> Iterator:
        started, next_share = time.time(), 0.1
        for n, item in enumerate(self.iterable, start=1):
            yield item
            if self.total and n / self.total >= next_share:
                if time.time() - started >= self.quiet_s:
                    log.info("%s: %d%% (%d/%d) %s", self.desc, int(100 * n / self.total), n, self.total, self.postfix)
                while next_share <= n / self.total:
                    next_share += 0.1


class _Silent:
    def __init__(self, iterable: Iterable):
        self.iterable = iterable

    def set_postfix(self, **values) -> None:
        pass

    def __iter__(self) -> Iterator:
        return iter(self.iterable)


def progress_bar(iterable: Iterable, desc: str, enabled: bool = True, total: int | None = None, unit: str = "it"):
    """A tqdm bar on a terminal; a log line per 10% of long loops when stderr is a file or CI log
    (tqdm's carriage-return frames made ~430 KB there for one demo run); nothing when disabled.
    Each has `set_postfix`."""
    if not enabled:
        return _Silent(iterable)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False)
    return _LoggedProgress(iterable, desc, total)
