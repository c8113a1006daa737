"""The commands that run stages (every command but `score` and `runs`): they load the stage
machinery — torch, timm, faiss — which `cli.py` imports only for them."""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from . import tracking
from .competitions.base import InputError
from .competitions.scoring import format_scores
from .config import ConfigError, config_tree, load_config
from .demo import build_demo
from .errors import ArtifactError, CheckpointError, UserError
from .export import run_export
from .models.backbone import save_hub_weights
from .offline import DEFAULT_WHEELS, write_package
from .pipeline.checks import before_run, check_members, check_values
from .pipeline.context import Context, ensure_demo_data
from .pipeline.planning import format_plan
from .pipeline.rounds import pseudo_rounds
from .pipeline.table import STAGE_NAMES, STAGES, run_stage
from .runs import read_runs, record_run, removable, size_of
from .runtime import (
    configure_cuda,
    init_distributed,
    is_main_process,
    seed_everything,
    set_threads,
    setup_logging,
)
from .stages.retrieve import local_feature_folder
from .stages.submit import local_scores

log = logging.getLogger("dmlkit")

# what keeps `clean` from planning a config (that experiment is then kept whole)
PLAN_ERRORS = (ConfigError, InputError, ArtifactError, CheckpointError, UserError, OSError, KeyError, ValueError)


DEMO_CONFIGS = ("configs/landmark-demo.yaml", "configs/whale-demo.yaml")


HELP = f"""\
usage: ./run.sh [COMMAND] ...

  ./run.sh                              set up, build the demo data, run every stage on each demo config
  ./run.sh test [PYTEST ARGS]           set up with the test tools, lint, run the tests
  ./run.sh STAGE -c CONFIG [key=value ...] [--force]
                                        run one stage (and whatever it needs that is not cached yet)
                                        stages: {", ".join(STAGE_NAMES)}, all
  ./run.sh plan -c CONFIG [key=value ...] [--force STAGE ...]
                                        per stage: reuse or recompute, and why (which key part changed); runs nothing
  ./run.sh runs [--csv]                 every recorded run: its changes, members' and ensemble's validation,
                                        local leaderboard, wall time, the submission kept for it
  ./run.sh clean [--keep-current] [--dry-run] [-c CONFIG ...]
                                        remove artifacts that neither the configs (default configs/*.yaml) nor
                                        the recorded runs use; --keep-current keeps only what the configs use
  ./run.sh data [-c CONFIG ...]         build the demo competitions (default: both) and print their statistics
  ./run.sh export -c CONFIG [--member NAME ...] [--out FILE]
                                        the trained members as one TorchScript (+ ONNX) embedding module,
                                        uint8 images in, L2-normalised embeddings out (default submissions/)
  ./run.sh package -c CONFIG --out DIR [--wheels NAME ...]
                                        an offline package for a code competition's notebook: the trained
                                        members, the config, the project's wheel and pinned wheels
                                        (default faiss-gpu timm albumentations albucore), predict.py
  ./run.sh weights -c CONFIG [--out DIR]
                                        save each hub-weights member's timm weights as DIR/<backbone>.safetensors
                                        (default weights/) and print the pretrained_file overrides that use them
  ./run.sh score SUBMISSION SOLUTION [--json]
                                        score a submission like the leaderboard (public / private)
  ./run.sh bench [--quick]              every hot-path benchmark (benchmarks/), a table each
  ./run.sh bench NAME [ARGS]            one benchmark: train_step see head_memory knn rerank loader
                                        verify end_to_end ablation omniglot recipe scale gpu

options for stages:
  -c, --config FILE     YAML config (may name a `base`); overrides as dotted.key=value
  --force               recompute the named stage even if a cached artifact exists
  --artifacts DIR       artifact root (default: artifacts)
  --no-progress         no progress bars
  --debug               show the traceback of an error that is not a config or input problem
                        (without it, the traceback goes to the run's log file); also DMLKIT_DEBUG=1
"""


def _setup(cfg_path: str | None, overrides: list[str], experiment_hint: str = "run"):
    cfg = load_config(cfg_path, overrides) if cfg_path else None
    log_file = setup_logging(Path("logs"), cfg.experiment if cfg else experiment_hint)
    if cfg is not None:
        init_distributed(cfg.runtime.dist_timeout_min)
        configure_cuda(cfg.runtime.cudnn_benchmark, cfg.runtime.tf32)
        threads = set_threads(cfg.threads)
        seed_everything(cfg.seed)
        log.info("config %s (experiment '%s'), %d thread(s), log %s", cfg_path, cfg.experiment, threads, log_file)
    return cfg


def _context(cfg, args, plan: list | None = None):
    """The run's context: the last pseudo-label round's where the config has rounds."""

    ctx = Context(cfg, artifacts=Path(args.artifacts), force=set(args.force_stages), progress=not args.no_progress)
    ctx.plan = plan
    return pseudo_rounds(ctx)


def run_pipeline(ctx, stages: list[str], config_path: str, overrides: list[str], export: bool = False) -> list[dict]:
    """Run the stages as one tracked run; where it submits, score locally and record the run."""

    started = time.time()
    if is_main_process():
        tracking.start(ctx.cfg.tracking, ctx.artifacts, ctx.cfg.experiment, ctx.cfg.model_dump(mode="json"))
    try:
        for stage in stages:
            run_stage(ctx, stage)
        if export:
            run_export(ctx)
        if "submit" not in stages or not is_main_process():
            return []
        scores = local_scores(ctx)
        for score in scores:
            tracking.summary(
                f"leaderboard/{score['competition']}", {"public": score["public"], "private": score["private"]}
            )
        log.info("run recorded: %s", record_run(ctx, config_path, overrides, started, scores))
        return scores
    finally:
        tracking.finish()


def cmd_stage(args) -> int:
    cfg = _setup(args.config, args.overrides)
    stages = list(STAGE_NAMES) if args.stage == "all" else [args.stage]
    args.force_stages = stages if args.force else []
    ctx = _context(cfg, args)
    ensure_demo_data(ctx)
    before_run(ctx, stages)
    export = args.stage == "all" and cfg.export.enabled
    for result in run_pipeline(ctx, stages, args.config, args.overrides, export):
        print(f"local leaderboard  {format_scores(result)}")
    return 0


def cmd_plan(args) -> int:
    cfg = _setup(args.config, args.overrides)
    args.force_stages = args.force or []
    ctx = _context(cfg, args, plan=[])
    check_values(ctx)
    check_members(cfg)
    for stage in STAGE_NAMES:
        run_stage(ctx, stage)
    print(f"plan for {args.config} (experiment '{cfg.experiment}', artifacts {args.artifacts}):")
    print(format_plan(ctx.plan))
    return 0


def _needed_artifacts(config_paths: list[str], artifacts: Path) -> tuple[set[Path], set[str], list[str]]:
    """What the configs would reuse or resume (their plans), the experiments that could not be
    planned (kept whole), and notes saying why."""

    keep, whole, notes = set(), set(), []
    for path in config_paths:
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            notes.append(f"{path}: not a runnable config, skipped ({str(exc).splitlines()[0][:120]})")
            continue
        ctx = Context(cfg, artifacts=artifacts, progress=False)
        ctx.plan = []
        ctx = pseudo_rounds(ctx)
        try:
            check_values(ctx)
            for stage in STAGE_NAMES:
                run_stage(ctx, stage)
        except PLAN_ERRORS as exc:
            whole.add(cfg.experiment)
            notes.append(f"{path}: cannot be planned ({str(exc)[:120]}); experiment '{cfg.experiment}' kept whole")
            continue
        keep |= {Path(row["path"]) for row in ctx.plan}
        if cfg.retrieve.verify.enabled:
            keep.add(local_feature_folder(ctx))
    return keep, whole, notes


def cmd_clean(args) -> int:
    _setup(None, [], "clean")
    artifacts = Path(args.artifacts)
    if not artifacts.is_dir():
        print(f"nothing to clean: {artifacts}/ does not exist")
        return 0
    configs = args.configs or sorted(str(p) for p in Path("configs").glob("*.yaml"))
    keep, whole, notes = _needed_artifacts(configs, artifacts)
    if not args.keep_current:  # the recorded runs' artifacts stay (their rows in `runs` stay true)
        keep |= {Path(p) for record in read_runs(artifacts) for p in record["artifacts"].values()}
    for note in notes:
        print(note)
    doomed = removable(artifacts, keep, whole, {stage.name: stage.per_member for stage in STAGES})
    total = 0
    for artifact, paths in doomed.items():
        size = sum(size_of(path) for path in paths)
        total += size
        print(f"  {'would remove' if args.dry_run else 'removing'} {artifact} ({size / 2**20:.1f} MiB)")
        for path in paths if not args.dry_run else []:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    kept = "the current configs'" + ("" if args.keep_current else " and the recorded runs'")
    verb = "would free" if args.dry_run else "freed"
    print(f"{len(doomed)} artifact(s), {verb} {total / 2**20:.1f} MiB; kept {kept} artifacts")
    return 0


def cmd_demo(args) -> int:
    started = time.time()
    _setup(None, [], "demo")
    summary = []
    for path in DEMO_CONFIGS:
        cfg = load_config(path)
        set_threads(cfg.threads)
        seed_everything(cfg.seed)
        ctx = pseudo_rounds(Context(cfg, artifacts=Path(args.artifacts), progress=not args.no_progress))
        ensure_demo_data(ctx)
        before_run(ctx, list(STAGE_NAMES))
        summary += run_pipeline(ctx, list(STAGE_NAMES), path, [])
    print("\nlocal leaderboard (demo competitions):")
    for result in summary:
        print(f"  {format_scores(result)}  ← {result['submission']}")
    print(f"finished in {time.time() - started:.0f}s")
    return 0


def cmd_data(args) -> int:
    _setup(None, [], "data")
    for path in args.configs or DEMO_CONFIGS:
        cfg = load_config(path)
        if not cfg.competition.demo:
            raise UserError(f"{path}: competition.demo is not set; only demo competitions are generated")
        stats = build_demo(
            cfg.competition.demo, Path(cfg.competition.root), cfg.competition.demo_params, force=args.force
        )
        print(f"{cfg.competition.root}:")
        for key, value in stats.items():
            print(f"  {key:28s} {value:.3f}" if isinstance(value, float) else f"  {key:28s} {value}")
    return 0


def _members_context(args):
    """The context of a command that reads the trained members (training them where not cached)."""
    cfg = _setup(args.config, args.overrides)
    args.force_stages = []
    ctx = _context(cfg, args)
    ensure_demo_data(ctx)
    before_run(ctx, ["train"])
    return ctx


def cmd_export(args) -> int:
    ctx = _members_context(args)
    run_export(ctx, args.member or None, Path(args.out) if args.out else None)
    return 0


def cmd_weights(args) -> int:
    cfg = _setup(args.config, args.overrides)
    hub = [(i, m) for i, m in enumerate(cfg.members) if m.pretrained]
    if not hub:
        raise UserError(f"{cfg.source}: no member has pretrained: true (nothing to fetch)")
    saved = {}
    for i, member in hub:
        key = (member.backbone, member.pretrained_tag)
        if key not in saved:
            saved[key] = save_hub_weights(*key, Path(args.out), f"{cfg.source}: members.{i} ({member.name})")
            print(f"wrote {saved[key]}")
    print("offline, train with:")
    for i, member in hub:
        path = saved[member.backbone, member.pretrained_tag]
        print(f"  members.{i}.pretrained=false members.{i}.pretrained_file={path}")
    return 0


def cmd_package(args) -> int:
    ctx = _members_context(args)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; name a new folder for the package")
    wheels = DEFAULT_WHEELS if args.wheels is None else tuple(args.wheels)
    info = write_package(ctx, config_tree(args.config, args.overrides), out, wheels)
    print(f"wrote {out}/: members {list(info['members'])}, wheels {info['wheels']}")
    print("upload it as a Kaggle dataset; the notebook runs: python predict.py --install --input <competition> --out .")
    return 0


def _command(sub, name: str, func, config: bool = True, run: bool = True) -> argparse.ArgumentParser:
    """A subcommand; `config`: it takes -c CONFIG and key=value overrides; `run`: it runs stages
    (an artifacts folder, progress bars)."""
    p = sub.add_parser(name, add_help=False)
    if config:
        p.add_argument("-c", "--config", required=True)
        p.add_argument("overrides", nargs="*")
    if run:
        p.add_argument("--artifacts", default="artifacts")
        p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="./run.sh", add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    sub = parser.add_subparsers(dest="command")
    for stage in (*STAGE_NAMES, "all"):
        _command(sub, stage, cmd_stage).add_argument("--force", action="store_true")
        sub.choices[stage].set_defaults(stage=stage)
    _command(sub, "plan", cmd_plan).add_argument("--force", nargs="+", choices=STAGE_NAMES, metavar="STAGE")
    p = _command(sub, "clean", cmd_clean, config=False, run=False)
    p.add_argument("-c", "--config", dest="configs", action="append")
    p.add_argument("--keep-current", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--artifacts", default="artifacts")
    _command(sub, "demo", cmd_demo, config=False)
    p = _command(sub, "data", cmd_data, config=False, run=False)
    p.add_argument("-c", "--config", dest="configs", action="append")
    p.add_argument("--force", action="store_true")
    p = _command(sub, "export", cmd_export)
    p.add_argument("--member", action="append")
    p.add_argument("--out")
    _command(sub, "weights", cmd_weights, run=False).add_argument("--out", default="weights")
    p = _command(sub, "package", cmd_package)
    p.add_argument("--out", required=True)
    p.add_argument("--wheels", nargs="*")
    return parser
