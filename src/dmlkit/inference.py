"""Embedding images with a trained model (TTA) and scoring a validation split by kNN."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data.dataset import ImageDataset
from .data.transforms import make_pipeline
from .metrics import global_average_precision, map_at_5, mean_average_precision_at_k, recall_at_k
from .models.backbone import EmbeddingModel
from .retrieval.search import knn
from .retrieval.voting import (
    CONFIDENCE_FORMS,
    fuse_head,
    insert_unknown,
    landmark_confidence,
    tune_unknown_threshold,
    vote,
)


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    return torch.bfloat16  # CPUs here run bf16 matmuls ~4× faster than fp32 (AMX)


@torch.no_grad()
def embed_paths(
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
) -> np.ndarray:
    """(N, E) L2-normalised embeddings, averaged over the TTA views (flip × scales).

    With `skip_unreadable`, rows of unreadable images are NaN instead of an error.
    """
    model.eval()
    dtype = autocast_dtype(device, amp)
    total = None
    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    for scale, flipped in views:
        size = max(16, int(round(image_size * scale)))
        pipeline = make_pipeline(size, flip=flipped)
        dataset = ImageDataset(paths, None, pipeline, model.in_chans, size, skip_unreadable=skip_unreadable)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        chunks = []
        for images, _, _, ok in tqdm(
            loader, desc=f"{desc} {size}px{' flip' if flipped else ''}", unit="batch", leave=False, disable=not progress
        ):
            images = images.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(images).float().cpu()
            out[~ok] = float("nan")
            chunks.append(out)
        view = torch.cat(chunks) if chunks else torch.zeros(0, model.embedding_size)
        total = view if total is None else total + view
    return torch.nn.functional.normalize(total, dim=1).numpy().astype(np.float32)


def gather_rows(part: np.ndarray, rows: np.ndarray, total: int) -> np.ndarray:
    """Reassemble per-rank shards (rows[i] is the global row of part[i]) on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return part
    pieces: list = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, (rows, part))
    out = np.zeros((total, part.shape[1]), dtype=part.dtype)
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


def validation_scores(
    metric: str,
    queries: np.ndarray,
    query_labels: np.ndarray,
    query_known: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    unknown_label: str | None,
    k: int = 5,
    power: float = 3.0,
    sims_ids: tuple[np.ndarray, np.ndarray] | None = None,
    confidence_offset: np.ndarray | None = None,
    unknown_threshold: float | None = None,
    head_scores: list[dict[str, float]] | None = None,
    head_weight: float = 0.0,
) -> dict:
    """The competition's metric on a validation split, plus Recall@1 on the known queries.

    Unknown queries (unseen classes, new_whale) are answered `unknown_label` for MAP@5 (with the
    threshold tuned here) and count as non-landmarks for GAP. `plain` is the score before that
    calibration (no unknown label; the raw vote as GAP confidence), `score` the calibrated one
    (with `unknown_threshold` when given, else the tuned threshold).
    """
    if sims_ids is None:
        sims_ids = knn(queries, gallery, k=min(len(gallery), max(100, k)), progress=False)
    sims, ids = sims_ids
    labels, scores = vote(sims, ids, gallery_labels, k, power)
    if head_scores is not None and head_weight > 0:
        labels, scores = fuse_head(labels, scores, head_scores, head_weight, power)
    known = np.asarray(query_known, dtype=bool)
    out: dict = {
        "recall@1": recall_at_k(gallery_labels[ids[known, :1]], query_labels[known], 1) if known.any() else 0.0
    }
    if metric == "gap":
        truths = [lab if kn else None for lab, kn in zip(query_labels, known, strict=True)]
        best = max(
            (
                global_average_precision(
                    [str(i) for i in range(len(labels))],
                    [r[0] if r else None for r in labels],
                    landmark_confidence(labels, scores, form) - (0 if confidence_offset is None else confidence_offset),
                    truths,
                ),
                form,
            )
            for form in CONFIDENCE_FORMS
        )
        plain = global_average_precision(
            [str(i) for i in range(len(labels))],
            [r[0] if r else None for r in labels],
            landmark_confidence(labels, scores, "vote") - (0 if confidence_offset is None else confidence_offset),
            truths,
        )
        out.update(score=best[0], confidence=best[1], plain=plain)
    elif metric == "map@5":
        truths = [lab if kn else (unknown_label or "new") for lab, kn in zip(query_labels, known, strict=True)]
        if unknown_threshold is None:
            threshold, score = tune_unknown_threshold(labels, scores, truths, unknown_label or "new")
        else:
            threshold = unknown_threshold
            score = map_at_5(insert_unknown(labels, scores, unknown_label or "new", threshold), truths)
        out.update(
            score=score,
            threshold=threshold,
            plain=map_at_5(insert_unknown(labels, scores, "", -np.inf), truths),
        )
    elif metric == "map@100":
        by_label: dict[str, set[str]] = {}
        for i, lab in enumerate(gallery_labels):
            by_label.setdefault(lab, set()).add(str(i))
        rows = [i for i in range(len(queries)) if known[i] and query_labels[i] in by_label]
        preds = [[str(j) for j in ids[i] if j >= 0] for i in rows]
        value = mean_average_precision_at_k(preds, [by_label[query_labels[i]] for i in rows], 100)
        out.update(score=value, plain=value)
    else:
        raise ValueError(f"unknown metric '{metric}'")
    return out
