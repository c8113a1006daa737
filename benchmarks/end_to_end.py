"""Wall time of `./run.sh` on the demos: cold (demo data and artifacts removed, environment kept) and warm."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import RESULTS, report

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench end_to_end")
    parser.add_argument("--quick", action="store_true", help="one demo with 2 epochs, in a scratch copy")
    args = parser.parse_args(argv)
    rows = []
    if args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                str(ROOT / ".venv/bin/python"),
                "-m",
                "dmlkit",
                "all",
                "-c",
                str(ROOT / "configs/whale-demo.yaml"),
                "member_defaults.train.epochs=2",
                f"competition.root={tmp}/whale-demo",
                "--artifacts",
                f"{tmp}/artifacts",
                "--no-progress",
            ]
            for label in ("cold", "warm"):
                start = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True, cwd=tmp)
                rows.append({"run": f"whale-demo, 2 epochs, {label}", "wall_s": round(time.perf_counter() - start, 1)})
    else:
        for folder in ("input/landmark-demo", "input/whale-demo", "artifacts"):
            shutil.rmtree(ROOT / folder, ignore_errors=True)
        for label in ("cold", "warm"):
            start = time.perf_counter()
            done = subprocess.run([str(ROOT / "run.sh")], check=True, capture_output=True, text=True, cwd=ROOT)
            rows.append({"run": f"./run.sh (both demos), {label}", "wall_s": round(time.perf_counter() - start, 1)})
            # The cold run's log holds the validation step tables and the leaderboard the README quotes.
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"end_to_end_{label}.log").write_text(done.stdout + done.stderr)
    report("end_to_end", rows, {"target": "cold ≤ 10 min on 2 cores; warm ≤ 1 min"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
