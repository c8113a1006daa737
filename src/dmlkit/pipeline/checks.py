"""Every check made before anything runs, in one place: a misread setting, a typo in the last
member's backbone, missing weights or an unwritable submissions folder cost no training.

The schema validates each value and the relations between members as the config loads
(`config/schema.py`); `config/checks.py` holds the rules for values that would have no effect.
`before_run` runs those and the checks that need the competition, the files and the network.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..build import build_model
from ..competitions.base import InputError
from ..config import Config, ConfigError, MemberConfig, device_notes, ineffective_values
from ..config.members import augment_specs
from ..data.transforms import TransformConfigError, build_augmentations
from ..models.backbone import check_backbone, weights_file_share
from ..retrieval.verify import load_extractor, load_matcher
from ..runtime import is_main_process
from .context import Context

log = logging.getLogger("dmlkit")

MIN_LOADED_SHARE = 0.5  # of a backbone's weights a pretrained_file must set (an adapted stem or head is fine)


def before_run(ctx: Context, stages: list[str]) -> None:
    """Every check, in order: values without effect, then members, learned extractors, outputs."""
    check_values(ctx)
    check_cluster_size(ctx)
    check_members(ctx.cfg)
    check_extractor(ctx.cfg)
    check_outputs(ctx, stages)


def check_values(ctx: Context) -> None:
    """Refuse values that would have no effect for this competition; note device differences."""
    ranks_index = any(fmt.gallery_role == "index" for fmt in ctx.formats)
    problems = ineffective_values(ctx.cfg, ctx.adapter.metric, ranks_index)
    if problems:
        where = ctx.cfg.source or "config"
        raise ConfigError(f"{where}: value(s) without effect in this config:\n  " + "\n  ".join(problems))
    clustered = [fmt.name for fmt in ctx.formats if fmt.output == "clusters"]
    if clustered and not ctx.cfg.retrieve.cluster.enabled:
        raise ConfigError(
            f"{ctx.cfg.source}: {clustered[0]} submits the test's clusters: set retrieve.cluster.enabled: true"
        )
    if is_main_process():
        for note in device_notes(ctx.cfg, ctx.device.type):
            log.warning("%s", note)


MAX_CLUSTER_IMAGES = 20_000  # retrieve.cluster's cosine matrix, distances and merge tree: ~16 bytes × N²


def check_cluster_size(ctx: Context) -> None:
    """retrieve.cluster holds the test's pairwise cosines in memory: refuse a test too large for it
    before anything trains."""
    if not ctx.cfg.retrieve.cluster.enabled:
        return
    n = int((ctx.source_table["role"] == "test").sum())
    if n > MAX_CLUSTER_IMAGES:
        raise ConfigError(
            f"{ctx.cfg.source}: retrieve.cluster.enabled: the test holds {n:,} images; clustering keeps their "
            f"{n * (n - 1) // 2:,} pairs in memory (~{n * n * 16 / 2**30:.0f} GiB), at most {MAX_CLUSTER_IMAGES:,} "
            "images are supported"
        )


def check_members(cfg: Config) -> None:
    """Every member's backbone, augmentations and weights file, before the first one trains:
    a typo in the last member fails now, naming `members.N.key`, not after hours of the first."""
    for i, member in enumerate(cfg.members):
        where = f"{cfg.source}: members.{i} ({member.name})"
        check_backbone(member.backbone, f"{cfg.source}: key 'members.{i}.backbone'")
        try:
            specs = augment_specs(member.train.augment, member.train.flip)
            build_augmentations(specs, member.image_size, f"members.{i}.train.augment")
        except TransformConfigError as exc:
            raise TransformConfigError(f"{cfg.source}: {exc}") from None
        if member.pretrained_file:
            check_weights_file(member, f"{where}: key 'members.{i}.pretrained_file'")
        if member.neck == "none":
            check_neck_size(member, f"{where}: key 'members.{i}.embedding_size'")


def check_neck_size(member: MemberConfig, where: str) -> None:
    """With neck none the embedding is the pooled features: embedding_size must be their count. The
    model is built on the meta device (shapes only, no memory, no weights)."""
    try:
        with torch.device("meta"):
            build_model(member, weights=False)
    except ValueError as exc:
        if "neck 'none'" in str(exc):
            raise ConfigError(f"{where}: {exc}") from None
        raise


def check_weights_file(member: MemberConfig, where: str) -> None:
    """The member's pretrained_file exists and loads into its backbone (most of its weights, by name
    and shape), so a garbage or another architecture's file stops the run now, not after the
    members before it trained (or never: timm loads a mismatched file with a warning only)."""
    path = Path(member.pretrained_file)
    if not path.is_file():
        raise ConfigError(f"{where}: '{path}' is not a file (nothing is downloaded for a local weights file)")
    try:
        share = weights_file_share(
            member.backbone, member.in_chans, member.image_size, str(path), member.backbone_kwargs
        )
    except Exception as exc:  # timm, torch and safetensors each raise their own kind for a bad file
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: '{path}' does not load into {member.backbone}: {reason}") from None
    if share < MIN_LOADED_SHARE:
        raise ConfigError(
            f"{where}: '{path}' does not load into {member.backbone}: it sets {100 * share:.0f}% of the "
            "backbone's weights (its names or shapes are another model's)"
        )


def check_extractor(cfg: Config) -> None:
    """A learned local-feature extractor's and matcher's weights, loaded (fetched) before anything trains."""
    verify = cfg.retrieve.verify
    if verify.enabled and verify.extractor != "sift":
        load_extractor(verify, f"{cfg.source}: retrieve.verify")
    if verify.enabled and verify.matcher != "ratio":
        load_matcher(verify, f"{cfg.source}: retrieve.verify")


def check_outputs(ctx: Context, stages: list[str]) -> None:
    """Where the run writes a submission or trains on its own test answers (pseudo-label rounds):
    images to predict and a writable folder, checked before anything trains (a run without test
    rows would end in a header-only CSV)."""
    predicts = "submit" in stages or (ctx.cfg.pseudo.rounds > 0 and set(stages) != {"folds"})
    if not predicts or not is_main_process():
        return
    if not (ctx.source_table["role"] == "test").any():
        raise InputError(ctx.adapter.no_queries_reason(ctx.root))
    try:
        ctx.submissions.mkdir(parents=True, exist_ok=True)
        probe = ctx.submissions / f".write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(
            f"submissions folder {ctx.submissions}: cannot write there ({exc.strerror or exc}); "
            "the run would end without its CSV"
        ) from None
