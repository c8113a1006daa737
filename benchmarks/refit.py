"""Full-data refit against the fold member it was refit from: each config's run with refit off,
replace and ensemble (and replace with the 'share' threshold), per seed, scored on the demo's
leaderboard answers; the fold models are trained once per seed and shared by the four runs.

    ./run.sh bench refit CONFIG [--seeds 42 1 2] [--set KEY=VALUE ...]

Prints public / private score per variant and the paired private difference to refit off with a
95% t interval; writes benchmarks/results/refit-<config stem>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import RESULTS

from dmlkit.config import load_config
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.pipeline.rounds import pseudo_rounds
from dmlkit.pipeline.table import STAGE_NAMES, run_stage
from dmlkit.runtime import seed_everything, set_threads, setup_logging
from dmlkit.stages.submit import local_scores

VARIANTS = {
    "fold member (refit off)": [],
    "refit (replace, cosine)": ["member_defaults.refit=replace"],
    "refit (replace, share)": ["member_defaults.refit=replace", "retrieve.refit_threshold=share"],
    "fold + refit (ensemble)": ["member_defaults.refit=ensemble"],
}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}


def run_variant(config: str, overrides: list[str], seed: int) -> dict:
    """One pipeline run (every stage and pseudo round); the competition's first format's scores."""
    stem = Path(config).stem
    cfg = load_config(config, [*overrides, f"seed={seed}", f"experiment=refit-{stem}-{seed}", "tracking=none"])
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    ctx = Context(cfg, submissions=Path("submissions") / "bench-refit", progress=False)
    ensure_demo_data(ctx)
    ctx = pseudo_rounds(ctx)
    started = time.time()
    for stage in STAGE_NAMES:
        run_stage(ctx, stage)
    score = local_scores(ctx)[0]
    test_new = ctx.done["retrieve"].manifest["result"]["tuned"].get("validation_unknown_share")
    return {"public": score["public"], "private": score["private"], "wall_s": round(time.time() - started, 1),
            "validation_new_share": test_new}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench refit")
    parser.add_argument("config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    setup_logging(Path("logs"), f"refit-{Path(args.config).stem}")
    records = []
    for seed in args.seeds:
        for name, overrides in VARIANTS.items():
            got = run_variant(args.config, [*args.set, *overrides], seed)
            records.append({"variant": name, "seed": seed, **got})
            print(f"[bench] {name} seed {seed}: {got}", flush=True)
    results = pd.DataFrame(records)
    base = results[results["variant"] == next(iter(VARIANTS))].set_index("seed")["private"]
    rows = []
    for name, part in results.groupby("variant", sort=False):
        paired = part.set_index("seed")["private"] - base
        half = T_975.get(len(paired) - 1, np.nan) * paired.std(ddof=1) / np.sqrt(len(paired)) if len(paired) > 1 else 0
        rows.append({"variant": name, "public": f"{part['public'].mean():.3f} ± {part['public'].std(ddof=1):.3f}",
                     "private": f"{part['private'].mean():.3f} ± {part['private'].std(ddof=1):.3f}",
                     "private - fold member": f"{paired.mean():+.3f} [{paired.mean() - half:+.3f}, "
                                              f"{paired.mean() + half:+.3f}]"})  # fmt: skip
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"refit-{Path(args.config).stem}.json"
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine, "args": vars(args),
                               "records": records, "summary": rows}, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
