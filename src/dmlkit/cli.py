"""Command line: `python -m dmlkit COMMAND ...` (what run.sh calls). `score` and `runs` run here
without the stage machinery (they start in about a second); every other command is in
`commands.py`, loaded for it. Errors end as one line and an exit code (see `main`)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import pandas as pd

from .cache import CacheLockedError
from .competitions.base import InputError
from .competitions.scoring import format_scores, score_files
from .config import ConfigError
from .data.images import UnreadableImageError
from .errors import (
    ArtifactError,
    CheckpointError,
    ExportError,
    ExtractorWeightsError,
    NonFiniteLossError,
    PackageError,
    PretrainedWeightsError,
    TransformConfigError,
    UserError,
)
from .process import RUN_LOG, keep_freed_memory
from .runs import read_runs, runs_table

log = logging.getLogger("dmlkit")

LIGHT_COMMANDS = ("runs", "score")
OOM_HINT = (
    "lower members.N.train.batch_size and raise train.grad_accum to keep the effective batch, or lower image_size"
)
LIGHT_USAGE = (
    "usage: ./run.sh runs [--csv] | ./run.sh score SUBMISSION SOLUTION [--json] (./run.sh --help: all commands)"
)


# a write that failed for the storage's reason, not the code's: one line and exit 4
STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


# the project's own errors: the message is the whole story (file, key or row named), one line
USER_ERRORS = (
    UserError,
    ConfigError,
    CheckpointError,
    ArtifactError,
    InputError,
    UnreadableImageError,
    CacheLockedError,
    TransformConfigError,
    NonFiniteLossError,
    PretrainedWeightsError,
    ExtractorWeightsError,
    ExportError,
    PackageError,
)


# errors that are a user's as often as the code's: one line, and the traceback kept in a file
OTHER_ERRORS = (FileNotFoundError, FileExistsError, KeyError, ValueError, FloatingPointError)


def _keep_traceback(exc: BaseException) -> str:
    """The traceback of an error that may be the code's, written to the run's log file (or a file of
    its own under logs/ before there is one); says where it went."""
    text = "".join(traceback.format_exception(exc))
    log_files = [h.baseFilename for h in logging.getLogger().handlers if h.get_name() == RUN_LOG]
    path = Path(log_files[0]) if log_files else Path("logs") / f"traceback-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(text)
    except OSError:
        return "not kept (logs/ is not writable)"
    return str(path)


def cmd_runs(args) -> int:
    records = read_runs(Path(args.artifacts))
    if not records:
        print(f"no recorded runs under {args.artifacts}/ (a run that writes a submission records itself)")
        return 0
    table = runs_table(records)
    if args.csv:
        table.to_csv(sys.stdout, index=False)
        return 0
    with pd.option_context("display.max_colwidth", 60, "display.width", 250):
        print(table.drop(columns=["submission"]).to_string(index=False))
    print("\nsubmissions kept per run:")
    for row in table.itertuples():
        print(f"  {row.started}  {row.experiment}: {row.submission}")
    return 0


def cmd_score(args) -> int:
    result = score_files(Path(args.submission), Path(args.solution))
    print(format_scores(result))
    if args.json:
        keys = ("metric", "public", "private", "open_set", "all", "ami")
        print(json.dumps({k: result[k] for k in keys if k in result}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("MPLBACKEND", "Agg")  # plots are files; never open a window
    try:
        keep_freed_memory()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    debug = "--debug" in argv or os.environ.get("DMLKIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in LIGHT_COMMANDS:
        parser, usage = light_parser(), LIGHT_USAGE
    else:
        from . import commands  # heavy: the stages load torch, timm and faiss (~10 s); score and runs skip it

        if not argv or argv[0] in ("-h", "--help", "help"):
            print(commands.HELP)
            return 0
        parser, usage = commands.build_parser(), commands.HELP
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        print(usage, file=sys.stderr)
        return int(exc.code or 2)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OTHER_ERRORS as exc:
        if debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {message}", file=sys.stderr)
        print(
            f"  ({type(exc).__name__}; its traceback: {_keep_traceback(exc)}; --debug shows it here)", file=sys.stderr
        )
        return 2
    except OSError as exc:
        if exc.errno not in STORAGE_ERRORS:
            raise
        what = "disk full" if exc.errno == errno.ENOSPC else "cannot write"
        print(
            f"error: {what} ({exc}); the stage's partial artifact is not marked complete and will be "
            "redone on the next run; free space (or make the folder writable) and rerun",
            file=sys.stderr,
        )
        return 4
    except KeyboardInterrupt:
        print("interrupted; completed artifacts are kept, partial ones will be redone", file=sys.stderr)
        return 130
    except Exception as exc:  # torch OOM gets a hint; anything else keeps its traceback
        if type(exc).__name__ != "OutOfMemoryError":
            raise
        print(f"error: out of memory: {exc}\nhint: {OOM_HINT}", file=sys.stderr)
        return 3


def light_parser() -> argparse.ArgumentParser:
    """The parser of the commands that need no stage: `runs` and `score`."""
    parser = argparse.ArgumentParser(prog="./run.sh", add_help=False)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("runs", add_help=False)
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser("score", add_help=False)
    p.add_argument("submission")
    p.add_argument("solution")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_score)
    return parser
