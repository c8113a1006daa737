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

from ..competitions.base import InputError
from ..config import Config, ConfigError, device_notes, ineffective_values
from ..data.transforms import TransformConfigError, build_augmentations
from ..models.backbone import check_backbone
from ..retrieval.verify import load_extractor
from ..runtime import is_main_process
from .context import Context

log = logging.getLogger("dmlkit")


def before_run(ctx: Context, stages: list[str]) -> None:
    """Every check, in order: values without effect, then members, learned extractors, outputs."""
    check_values(ctx)
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
    if is_main_process():
        for note in device_notes(ctx.cfg, ctx.device.type):
            log.warning("%s", note)


def check_members(cfg: Config) -> None:
    """Every member's backbone, augmentations and weights file, before the first one trains:
    a typo in the last member fails now, naming `members.N.key`, not after hours of the first."""
    for i, member in enumerate(cfg.members):
        where = f"{cfg.source}: members.{i} ({member.name})"
        check_backbone(member.backbone, f"{cfg.source}: key 'members.{i}.backbone'")
        try:
            build_augmentations(member.train.augment, member.image_size, f"members.{i}.train.augment")
        except TransformConfigError as exc:
            raise TransformConfigError(f"{cfg.source}: {exc}") from None
        if member.pretrained_file and not Path(member.pretrained_file).is_file():
            raise ConfigError(
                f"{where}: key 'members.{i}.pretrained_file': '{member.pretrained_file}' is not a file "
                "(nothing is downloaded for a local weights file)"
            )


def check_extractor(cfg: Config) -> None:
    """A learned local-feature extractor's weights, loaded (fetched) before anything trains."""
    verify = cfg.retrieve.verify
    if verify.enabled and verify.extractor != "sift":
        load_extractor(verify, f"{cfg.source}: retrieve.verify")


def check_outputs(ctx: Context, stages: list[str]) -> None:
    """Where the run writes a submission: images to predict and a writable folder, checked before
    anything trains (a run without test rows would end in a header-only CSV)."""
    if "submit" not in stages or not is_main_process():
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
