"""Who computes an artifact under torchrun: rank 0 alone writes it; the other ranks wait, or
(training) compute in lockstep into the same partial directory, and then read rank 0's manifest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .. import cache
from ..runtime import barrier, is_main_process


def compute_on_ranks(
    writer: cache.StageWriter, compute: Callable[[Path], dict | None], all_ranks: bool
) -> cache.Artifact:
    """The artifact `writer` commits after `compute(partial directory)`; every rank returns it."""
    if is_main_process():
        with cache.stage_lock(writer.final):
            work = writer.begin()
            barrier()  # the partial directory (and any checkpoint in it) is ready for every rank
            extra = compute(work)
            art = writer.commit({"result": extra} if extra else None)
    else:
        barrier()
        if all_ranks:
            compute(writer.partial)
    barrier()
    if not is_main_process():  # rank 0 has committed: every rank reads the same manifest
        art = cache.Artifact(
            writer.stage, writer.key, writer.final, reused=False, manifest=cache.read_manifest(writer.final)
        )
    return art
