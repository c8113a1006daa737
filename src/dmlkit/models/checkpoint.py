"""Checkpoint files, written atomically: a member's trained weights (`best.pt`, `final.pt`: model,
head rows of the saved classes, class list, the member's settings as plain data) and the resumable
training state (`last.pt`). Train writes them; embed, `init_from` and the benchmarks read them back
(`dmlkit.build.load_member` rebuilds the networks around them).

They hold tensors and plain data only (numbers, strings, lists, dicts) and are read with torch's
`weights_only` loader: a file that would run code when unpickled (a crafted `best.pt` in someone
else's artifacts or weights dataset) is refused, naming the file, before anything of it runs.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .heads import Head, MarginHead


def _save_atomic(obj: dict, path: Path) -> None:
    """torch.save into `path`.tmp, then renamed: a crash leaves the previous file whole. A failed
    write (disk full, read-only, quota) is an OSError naming the file: torch raises a RuntimeError
    from its zip writer, which says neither."""
    tmp = str(path) + ".tmp"
    try:
        torch.save(obj, tmp)
    except RuntimeError as exc:
        Path(tmp).unlink(missing_ok=True)
        full = shutil.disk_usage(Path(tmp).parent).free < (1 << 20)
        code = errno.ENOSPC if full else errno.EIO
        raise OSError(code, f"cannot write {path} ({str(exc).splitlines()[0]})") from None
    os.replace(tmp, path)


def plain(value: Any) -> Any:
    """Numbers, strings, lists and dicts as JSON has them (numpy scalars become floats and ints):
    what the weights-only loader reads back."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint's dict, read without unpickling code; CheckpointError naming the file otherwise."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"{path}: refused: it holds Python objects beyond tensors and plain data, which loading would run "
            f"({reason}). Only load checkpoints you trust; this pipeline writes plain ones."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc).strip()[:200]}); "
            "delete its artifact folder to recompute it"
        ) from None


def save_weights(
    path: Path,
    model: nn.Module,
    head: Head,
    classes: list[str],
    member_data: dict,
    aux: tuple[MarginHead, list[str]] | None = None,
) -> None:
    """Model, and the head's rows for `classes` (the first ones: rotated classes are dropped); with
    `aux`, the auxiliary head and its classes. `member_data`: the settings it was trained with."""
    head_state = head.state_dict() if len(classes) == head.num_classes else head.classes_state(len(classes))
    state = {
        "model": model.state_dict(),
        "head": head_state,
        "classes": [str(c) for c in classes],
        "member": plain(member_data),
    }
    if aux is not None:
        state.update(aux_head=aux[0].state_dict(), aux_classes=[str(c) for c in aux[1]])
    _save_atomic(state, path)


def load_weights(path: Path, device: torch.device | str = "cpu") -> dict:
    """The dict `save_weights` wrote (model and head state dicts, classes, member)."""
    return load_checkpoint(path, device)


def save_training_state(path: Path, state: dict) -> None:
    """The per-epoch state a crashed run resumes from (model, head, optimizer, scheduler, ...); its
    history and best score as plain data."""
    _save_atomic({**state, "history": plain(state["history"]), "best": plain(state["best"])}, path)


def load_training_state(path: Path, device: torch.device) -> dict | None:
    return load_checkpoint(path, device) if path.is_file() else None
