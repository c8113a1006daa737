"""Command line: `python -m dmlkit COMMAND ...` (what run.sh calls)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

from .pipeline import STAGES
from .runtime import keep_freed_memory

log = logging.getLogger("dmlkit")

DEMO_CONFIGS = ("configs/landmark-demo.yaml", "configs/whale-demo.yaml")

HELP = f"""\
usage: ./run.sh [COMMAND] ...

  ./run.sh                              set up, build the demo data, run every stage on each demo config
  ./run.sh test [PYTEST ARGS]           set up with the test tools, lint, run the tests
  ./run.sh STAGE -c CONFIG [key=value ...] [--force]
                                        run one stage (and whatever it needs that is not cached yet)
                                        stages: {", ".join(STAGES)}, all
  ./run.sh data [-c CONFIG ...]         build the demo competitions (default: both) and print their statistics
  ./run.sh export -c CONFIG [--member NAME ...] [--out FILE]
                                        the trained members as one TorchScript (+ ONNX) embedding module,
                                        uint8 images in, L2-normalised embeddings out (default submissions/)
  ./run.sh score SUBMISSION SOLUTION [--json]
                                        score a submission like the leaderboard (public / private)
  ./run.sh bench [--quick]              every hot-path benchmark (benchmarks/), a table each
  ./run.sh bench NAME [ARGS]            one benchmark: train_step see head_memory knn rerank loader
                                        end_to_end ablation omniglot recipe

options for stages:
  -c, --config FILE     YAML config (may name a `base`); overrides as dotted.key=value
  --force               recompute the named stage even if a cached artifact exists
  --artifacts DIR       artifact root (default: artifacts)
  --no-progress         no progress bars
"""


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from .cache import CacheLockedError
    from .competitions.base import InputError
    from .config import ConfigError
    from .data.images import UnreadableImageError
    from .data.transforms import TransformConfigError
    from .models.backbone import PretrainedWeightsError
    from .retrieval.learned import ExtractorWeightsError
    from .stages.train import NonFiniteLossError

    return (
        UserError,
        ConfigError,
        InputError,
        UnreadableImageError,
        CacheLockedError,
        TransformConfigError,
        NonFiniteLossError,
        PretrainedWeightsError,
        ExtractorWeightsError,
        FileNotFoundError,
        FileExistsError,
        KeyError,
        ValueError,
        FloatingPointError,
    )


def _setup(cfg_path: str | None, overrides: list[str], experiment_hint: str = "run"):
    from .config import load_config
    from .runtime import configure_cuda, init_distributed, seed_everything, set_threads, setup_logging

    cfg = load_config(cfg_path, overrides) if cfg_path else None
    log_file = setup_logging(Path("logs"), cfg.experiment if cfg else experiment_hint)
    if cfg is not None:
        init_distributed(cfg.runtime.dist_timeout_min)
        configure_cuda(cfg.runtime.cudnn_benchmark, cfg.runtime.tf32)
        threads = set_threads(cfg.threads)
        seed_everything(cfg.seed)
        log.info("config %s (experiment '%s'), %d thread(s), log %s", cfg_path, cfg.experiment, threads, log_file)
    return cfg


def _context(cfg, args):
    from .pipeline import Context

    return Context(cfg, artifacts=Path(args.artifacts), force=set(args.force_stages), progress=not args.no_progress)


def cmd_stage(args) -> int:
    from .pipeline import (
        check_extractor,
        check_members,
        check_outputs,
        ensure_demo_data,
        local_scores,
        run_export,
        run_stage,
    )
    from .stages.score import format_scores

    cfg = _setup(args.config, args.overrides)
    check_members(cfg)
    check_extractor(cfg)
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    args.force_stages = stages if args.force else []
    ctx = _context(cfg, args)
    ensure_demo_data(ctx)
    check_outputs(ctx, stages)
    for stage in stages:
        run_stage(ctx, stage)
    if args.stage == "all" and cfg.export.enabled:
        run_export(ctx)
    if "submit" in stages:
        for result in local_scores(ctx):
            print(f"local leaderboard  {format_scores(result)}")
    return 0


def cmd_demo(args) -> int:
    from .config import load_config
    from .pipeline import Context, check_members, check_outputs, ensure_demo_data, local_scores, run_stage
    from .stages.score import format_scores

    started = time.time()
    _setup(None, [], "demo")
    summary = []
    for path in DEMO_CONFIGS:
        from .runtime import seed_everything, set_threads

        cfg = load_config(path)
        set_threads(cfg.threads)
        seed_everything(cfg.seed)
        check_members(cfg)
        ctx = Context(cfg, artifacts=Path(args.artifacts), progress=not args.no_progress)
        ensure_demo_data(ctx)
        check_outputs(ctx, list(STAGES))
        for stage in STAGES:
            run_stage(ctx, stage)
        summary += local_scores(ctx)
    print("\nlocal leaderboard (demo competitions):")
    for result in summary:
        print(f"  {format_scores(result)}  ← {result['submission']}")
    print(f"finished in {time.time() - started:.0f}s")
    return 0


def cmd_data(args) -> int:
    from .config import load_config
    from .demo import build_demo

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


def cmd_export(args) -> int:
    from .pipeline import check_members, ensure_demo_data, run_export

    cfg = _setup(args.config, args.overrides)
    check_members(cfg)
    args.force_stages = []
    ctx = _context(cfg, args)
    ensure_demo_data(ctx)
    run_export(ctx, args.member or None, Path(args.out) if args.out else None)
    return 0


def cmd_score(args) -> int:
    from .stages.score import format_scores, score_files

    result = score_files(Path(args.submission), Path(args.solution))
    print(format_scores(result))
    if args.json:
        print(json.dumps({"metric": result["metric"], "public": result["public"], "private": result["private"]}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="./run.sh", add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    sub = parser.add_subparsers(dest="command")
    for stage in (*STAGES, "all"):
        p = sub.add_parser(stage, add_help=False)
        p.add_argument("-c", "--config", required=True)
        p.add_argument("overrides", nargs="*")
        p.add_argument("--force", action="store_true")
        p.add_argument("--artifacts", default="artifacts")
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(func=cmd_stage, stage=stage)
    p = sub.add_parser("demo", add_help=False)
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("data", add_help=False)
    p.add_argument("-c", "--config", dest="configs", action="append")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("export", add_help=False)
    p.add_argument("-c", "--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--member", action="append")
    p.add_argument("--out")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("score", add_help=False)
    p.add_argument("submission")
    p.add_argument("solution")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("MPLBACKEND", "Agg")  # plots are files; never open a window
    try:
        keep_freed_memory()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        print(HELP, file=sys.stderr)
        return int(exc.code or 2)
    try:
        return args.func(args)
    except _known_errors() as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            print(
                f"error: disk full ({exc}); the stage's partial artifact is not marked complete and will be "
                "redone on the next run; free space and rerun",
                file=sys.stderr,
            )
            return 4
        raise
    except KeyboardInterrupt:
        print("interrupted; completed artifacts are kept, partial ones will be redone", file=sys.stderr)
        return 130
    except Exception as exc:  # torch OOM gets a hint; anything else keeps its traceback
        if type(exc).__name__ == "OutOfMemoryError":
            print(
                f"error: out of memory: {exc}\nhint: lower members.N.train.batch_size and raise "
                "train.grad_accum to keep the effective batch, or lower image_size",
                file=sys.stderr,
            )
            return 3
        raise
