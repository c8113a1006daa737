"""`./run.sh bench NAME [ARGS]`: run one benchmark script of this folder."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

HOT_PATHS = ["train_step", "see", "head_memory", "knn", "rerank", "loader", "verify", "end_to_end"]
BENCHMARKS = [*HOT_PATHS, "ablation", "clusters", "fusion", "omniglot", "peers", "recipe", "refit", "scale", "gpu"]


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(
            "usage: ./run.sh bench [--quick]          every hot-path benchmark\n"
            "       ./run.sh bench NAME [ARGS]        one of: " + ", ".join(BENCHMARKS)
        )
        return 0
    if not argv or argv[0] == "--quick":
        failed = []
        for name in HOT_PATHS:
            try:
                importlib.import_module(name).main(argv[:1])
            except Exception as exc:  # one broken benchmark must not hide the others' tables
                print(f"benchmark {name} failed: {exc!r}", file=sys.stderr)
                failed.append(name)
        return 1 if failed else 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"error: unknown benchmark '{name}'; known: {BENCHMARKS}", file=sys.stderr)
        return 2
    from dmlkit.competitions.base import InputError
    from dmlkit.config import ConfigError

    try:
        return importlib.import_module(name).main(rest)
    except (ConfigError, InputError) as exc:  # bad config or data: the message names the key or file
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
