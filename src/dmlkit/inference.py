"""Embedding images with a trained model (TTA), gathering shards, the head's best classes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .data.crops import Cropper
from .data.dataset import ImageDataset
from .data.transforms import make_pipeline
from .models.backbone import EmbeddingModel
from .runtime import progress_bar, rank, world_size

log = logging.getLogger(__name__)


_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 BF16 / AMX; Arm's FEAT_BF16


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 in hardware (from /proc/cpuinfo's flags; False where unknown).

    Measured (resnet18 64 px b32 train step, oneDNN limited with ONEDNN_MAX_CPU_ISA on an AMD Zen 4):
    native bf16 0.135 s vs fp32 0.218 s; emulated on AVX-512 without BF16 0.408 vs 0.207 s; on AVX2
    2.79 vs 0.31 s (9× slower). So `amp: auto` uses bf16 on the CPU only where it is native.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and _NATIVE_BF16_FLAGS & set(value.split()):
            return True
    return False


@functools.cache
def _cpu_auto_dtype() -> torch.dtype | None:
    if cpu_has_native_bf16():
        return torch.bfloat16
    log.info("amp auto: fp32 on this CPU (no native bf16; emulated bf16 measured 2–9× slower than fp32)")
    return None


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    # bf16 runs matmuls 2.4× (AMD Zen 4) to 4.7× (Intel AMX) faster than fp32 where it is native
    return _cpu_auto_dtype() if amp == "auto" else torch.bfloat16


def loader_options(device: torch.device, num_workers: int) -> dict:
    """DataLoader arguments for feeding `device`: pinned host memory for a GPU (without it
    `non_blocking` copies are synchronous). Workers are not kept between epochs (persistent_workers):
    each epoch's loader seeds its workers from (seed, epoch), which keeps a resumed run exact."""
    return {"num_workers": num_workers, "pin_memory": device.type == "cuda"}


@torch.no_grad()
def embed_paths(  # one pass's options as keywords (TTA, crops, precision, loader): callers pass a subset
    model: EmbeddingModel,
    paths: Sequence[str],
    image_size: int,
    batch_size: int,
    device: torch.device,
    flip: bool = True,
    scales: Sequence[float] = (1.0,),
    amp: str = "auto",
    num_workers: int = 0,
    desc: str = "embed",
    progress: bool = True,
    skip_unreadable: bool = False,
    channels_last: bool = False,
    mirror: bool = False,
    croppers: Sequence[Cropper | None] = (None,),
) -> np.ndarray:
    """(N, E) L2-normalised embeddings, averaged over the TTA views (flip × scales). Each scale is
    decoded once; the mirrored view is the batch flipped on the device.

    With `mirror` (embed.flip_gallery; not beside `flip`), (N, 2, E): each image's embedding and
    its mirror's, from the same decoded batch. `croppers` (embed.crops): the views of each detector
    source are averaged too. With `skip_unreadable`, rows of unreadable images are NaN instead of
    an error.
    """
    if mirror and flip:
        raise ValueError("embed_paths: mirror views need flip=False (flip TTA averages an image with its mirror)")
    model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = autocast_dtype(device, amp)
    total = None
    for cropper, scale in [(c, s) for c in croppers for s in scales]:
        size = max(16, int(round(image_size * scale)))
        dataset = ImageDataset(
            paths, None, make_pipeline(size), model.in_chans, size, skip_unreadable=skip_unreadable, cropper=cropper
        )
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **loader_options(device, num_workers))
        chunks = []
        for images, _, _, ok in progress_bar(
            loader, f"{desc} {size}px{' +flip' if flip else ''}", progress, unit="batch"
        ):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(images).float()
                if flip:
                    out = out + model(images.flip(-1)).float()
                if mirror:
                    out = torch.stack([out, model(images.flip(-1)).float()], dim=1)
            out = out.cpu()
            out[~ok] = float("nan")
            chunks.append(out)
        empty = (0, 2, model.embedding_size) if mirror else (0, model.embedding_size)
        view = torch.cat(chunks) if chunks else torch.zeros(empty)
        total = view if total is None else total + view
    return torch.nn.functional.normalize(total, dim=-1).numpy().astype(np.float32)


def embed_sharded(model: EmbeddingModel, paths: Sequence[str], **options) -> np.ndarray | None:
    """embed_paths (with these options) over this rank's share of `paths` — every world_size-th,
    from its rank — gathered in order on rank 0; None on the other ranks. One process: all of them."""
    shard = np.arange(len(paths))[rank() :: world_size()]
    if "croppers" in options:
        options["croppers"] = [c.subset(shard) if c is not None else None for c in options["croppers"]]
    return gather_rows(embed_paths(model, [paths[i] for i in shard], **options), shard, len(paths))


def gather_rows(part: np.ndarray, rows: np.ndarray, total: int) -> np.ndarray | None:
    """Reassemble per-rank shards (rows[i] is the global row of part[i]) on rank 0, which alone
    writes and searches them; the other ranks get None. Without torchrun, `part` itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return part
    main = dist.get_rank() == 0
    pieces: list | None = [None] * dist.get_world_size() if main else None
    dist.gather_object((rows, part), pieces, dst=0)
    if not main:
        return None
    out = np.zeros((total, *part.shape[1:]), dtype=part.dtype)
    for piece_rows, piece in pieces:
        out[piece_rows] = piece
    return out


@torch.no_grad()
def head_topk(head, embeddings: np.ndarray, device: torch.device, k: int = 20, batch: int = 4096):
    """(index, cosine) of each embedding's k best head classes, for fusing the head with kNN votes."""
    k = min(k, head.num_classes)
    index = np.zeros((len(embeddings), k), np.int32)
    cos = np.zeros((len(embeddings), k), np.float32)
    for start in range(0, len(embeddings), batch):
        chunk = torch.from_numpy(embeddings[start : start + batch]).to(device)
        values, ids = head.cosine(chunk).topk(k, dim=1)
        index[start : start + batch] = ids.cpu().numpy()
        cos[start : start + batch] = values.cpu().numpy()
    return index, cos


@torch.no_grad()
def head_cosines(head, embeddings: np.ndarray, device: torch.device, batch: int = 4096) -> np.ndarray:
    """(N, C) float32 class cosines of a (small) head, e.g. head.aux's species."""
    parts = [
        head.cosine(torch.from_numpy(embeddings[start : start + batch]).to(device)).cpu().numpy()
        for start in range(0, len(embeddings), batch)
    ]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, head.num_classes), np.float32)
