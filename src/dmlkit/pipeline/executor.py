"""The cache protocol every stage runs through: reuse the complete artifact whose key matches, or
compute it into a partial directory and rename it into place.

Which artifact does a stage read, and what invalidates it? Its key hashes its config slice, what
its upstream stages produced (their manifests' output digests, over the files in its `Stage`'s
`outputs`) and its input fingerprints (see each stage's runner); change any of them and that stage
recomputes, nothing upstream. A forced stage that produces other bytes so invalidates everything
after it; one that reproduces its files exactly leaves them cached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import cache
from ..errors import ArtifactError
from ..runtime import barrier, is_main_process
from .context import Context
from .planning import planned
from .ranks import compute_on_ranks

log = logging.getLogger("dmlkit")


@dataclass(frozen=True)
class Stage:
    """One stage's facts, declared once beside its runner (the table in `pipeline/table.py` lists
    them in order). `version`: bumped when its code changes what it writes; `outputs`: the files
    later stages read, whose digest is the manifest's `output`; `per_member`: one artifact per
    member under `<stage>/<member>/`; `hashes`: what its key covers, for people; `run`: its runner,
    `run(ctx)` or `run(ctx, member_name)`."""

    name: str
    version: int
    outputs: tuple[str, ...]
    per_member: bool
    hashes: str
    run: Callable[..., cache.Artifact]


def artifact_path(ctx: Context, stage: Stage, name: str, key: str) -> Path:
    """artifacts/<experiment>/[round-<r>/]<stage>/[<name>/]<key>. An earlier round's complete artifact
    with the same key stands for this round's: a pseudo round that added no rows has the same inputs
    as the round before, and retraining every member would reproduce it."""

    def in_round(r: int) -> Path:
        experiment = f"{ctx.cfg.experiment}/round-{r}" if r else ctx.cfg.experiment
        final = cache.artifact_dir(ctx.artifacts, experiment, stage.name, key)
        return final.parent / name / key if name else final

    paths = [in_round(r) for r in range(ctx.round, -1, -1)]
    return next((path for path in paths if cache.is_complete(path)), paths[0])


def _intact_manifest(label: str, final: Path, stage: Stage) -> dict | None:
    """The manifest of a complete artifact whose files are as it recorded them; a damaged one (a
    file changed, truncated or gone, an unreadable manifest) is moved aside with a warning naming
    what differs, and None says: compute it again."""
    try:
        manifest = cache.read_manifest(final)
        problem = cache.damage(final, manifest, stage.outputs)
    except (ArtifactError, OSError) as exc:
        problem = str(exc)
    if problem is None:
        return manifest
    if is_main_process():
        aside = cache.move_aside(final)
        log.warning("[%s] %s is damaged (%s): moved to %s and computed again", label, final, problem, aside.name)
    barrier()
    return None


def stage_key(stage: Stage, config_part: Any, upstream: dict[str, str], fingerprints: dict[str, str]) -> str:
    return cache.stage_key(stage.name, config_part, upstream, fingerprints, stage.version)


def run_cached(  # what the key hashes (3), how to compute (1) and three executor flags
    ctx: Context,
    stage: Stage,
    name: str,
    config_part: Any,
    upstream: dict[str, str],
    fingerprints: dict[str, str],
    compute: Callable[[Path], dict | None],
    resumable: bool = False,
    all_ranks: bool = False,
    on_computed: Callable[[cache.Artifact], None] | None = None,
) -> cache.Artifact:
    """Reuse the complete artifact with this key, or compute it into a partial dir and rename it.

    `resumable`: an interrupted run's partial directory is kept (training resumes from it);
    `all_ranks`: under torchrun every rank computes in lockstep (training), else rank 0 alone;
    `on_computed(artifact)` runs once, on rank 0, after a computed artifact is in place.
    """
    label = f"{stage.name}/{name}" if name else stage.name
    if label in ctx.done:
        return ctx.done[label]
    key = stage_key(stage, config_part, upstream, fingerprints)
    final = artifact_path(ctx, stage, name, key)
    forced = stage.name in ctx.force
    if ctx.plan is not None:
        new = {"config": config_part, "upstream": upstream, "inputs": fingerprints, "version": stage.version}
        shown = f"round-{ctx.round}/{label}" if ctx.round else label
        ctx.done[label] = planned(ctx.plan, stage.name, shown, label, final, forced, new)
        return ctx.done[label]
    manifest = _intact_manifest(label, final, stage) if cache.is_complete(final) and not forced else None
    if manifest is not None:
        log.info("[%s] reused %s", label, final)
        art = cache.Artifact(stage.name, key, final, reused=True, manifest=manifest)
    else:
        manifest = cache.build_manifest(stage.name, key, config_part, upstream, fingerprints, stage.version)
        writer = cache.StageWriter(final, stage.name, key, manifest, resumable=resumable, outputs=stage.outputs)
        log.info("[%s] computing %s%s", label, final, " (forced)" if forced else "")
        art = compute_on_ranks(writer, compute, all_ranks)
        log.info("[%s] done in %.1fs → %s", label, art.manifest.get("wall_time_s", 0.0), final)
        if on_computed is not None and is_main_process():
            on_computed(art)
    ctx.done[label] = art
    return art
