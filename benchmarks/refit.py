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
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import RESULTS, machine

from dmlkit.config import load_config
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.pipeline.rounds import pseudo_rounds
from dmlkit.pipeline.table import STAGE_NAMES, run_stage
from dmlkit.runtime import seed_everything, set_threads, setup_logging
from dmlkit.stages.submit import local_scores

VARIANTS = {
    "fold member (refit off)": ["member_defaults.refit=off"],
    "refit (replace, cosine)": ["member_defaults.refit=replace"],
    "refit (replace, share)": ["member_defaults.refit=replace", "retrieve.refit_threshold=share"],
    "fold + refit (ensemble)": ["member_defaults.refit=ensemble"],
}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}


def run_pipeline(config: str, overrides: list[str], seed: int, bench: str = "refit") -> Context:
    """One pipeline run (every stage and pseudo round) at this seed, its submissions apart."""
    stem = Path(config).stem
    cfg = load_config(config, [*overrides, f"seed={seed}", f"experiment={bench}-{stem}-{seed}", "tracking=none"])
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    ctx = Context(cfg, submissions=Path("submissions") / f"bench-{bench}", progress=False)
    ensure_demo_data(ctx)
    ctx = pseudo_rounds(ctx)
    for stage in STAGE_NAMES:
        run_stage(ctx, stage)
    return ctx


def run_variant(config: str, overrides: list[str], seed: int) -> dict:
    """One pipeline run; the competition's first format's scores."""
    started = time.time()
    ctx = run_pipeline(config, overrides, seed)
    score = local_scores(ctx)[0]
    test_new = ctx.done["retrieve"].manifest["result"]["tuned"].get("validation_unknown_share")
    return {"public": score["public"], "private": score["private"], "wall_s": round(time.time() - started, 1),
            "validation_new_share": test_new}  # fmt: skip


def paired_summary(results: pd.DataFrame, column: str, metrics: list[str], base_name: str) -> list[dict]:
    """Mean ± sd of each metric per variant and the paired difference of the first metric to the
    first variant (same seed) with a 95% t interval."""
    base = results[results[column] == results[column].iloc[0]].set_index("seed")[metrics[0]]
    rows = []
    for name, part in results.groupby(column, sort=False):
        paired = part.set_index("seed")[metrics[0]] - base
        half = T_975.get(len(paired) - 1, np.nan) * paired.std(ddof=1) / np.sqrt(len(paired)) if len(paired) > 1 else 0
        row = {column: name}
        for metric in metrics:
            row[metric] = f"{part[metric].mean():.3f} ± {part[metric].std(ddof=1) if len(part) > 1 else 0:.3f}"
        row[f"{metrics[0]} - {base_name}"] = (
            f"{paired.mean():+.3f} [{paired.mean() - half:+.3f}, {paired.mean() + half:+.3f}]"
        )
        rows.append(row)
    return rows


def write_results(out: Path, args: argparse.Namespace, records: list[dict], rows: list[dict]) -> None:
    print(pd.DataFrame(rows).to_string(index=False))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine(), "args": vars(args),
                               "records": records, "summary": rows}, indent=2))  # fmt: skip
    print(f"wrote {out}")


def variant_args(bench: str, argv: list[str] | None, config: str | None = None) -> argparse.Namespace:
    """A variant benchmark's arguments (CONFIG, --seeds, --set), its log opened."""
    parser = argparse.ArgumentParser(prog=f"./run.sh bench {bench}")
    parser.add_argument("config", **({"nargs": "?", "default": config} if config else {}))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    setup_logging(Path("logs"), f"{bench}-{Path(args.config).stem}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = variant_args("refit", argv)
    records = []
    for seed in args.seeds:
        for name, overrides in VARIANTS.items():
            got = run_variant(args.config, [*args.set, *overrides], seed)
            records.append({"variant": name, "seed": seed, **got})
            print(f"[bench] {name} seed {seed}: {got}", flush=True)
    rows = paired_summary(pd.DataFrame(records), "variant", ["private", "public"], "fold member")
    write_results(RESULTS / f"refit-{Path(args.config).stem}.json", args, records, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
