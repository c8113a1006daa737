"""`./run.sh bench NAME [ARGS]`: run one benchmark script of this folder."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

BENCHMARKS = ["ablation"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ./run.sh bench NAME [ARGS]\nbenchmarks: " + ", ".join(BENCHMARKS))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"error: unknown benchmark '{name}'; known: {BENCHMARKS}", file=sys.stderr)
        return 2
    return importlib.import_module(name).main(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
