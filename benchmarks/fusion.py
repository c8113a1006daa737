"""The second stage's fusions side by side (retrieve.verify.fusion: additive | calibrated | stacked), and
the global chain without verification, per seed on a demo: the validation report's verification
row (additive and calibrated tuned in-sample, stacked cross-fitted) and every submission's
leaderboard scores. Every variant of a seed shares its trained members and cached local features.

    ./run.sh bench fusion [CONFIG] [--seeds 42 1 2] [--set KEY=VALUE ...]

CONFIG defaults to configs/landmark-demo.yaml with verification at the demo photos' 384 px.
Writes benchmarks/results/fusion-<config stem>.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from common import RESULTS
from refit import paired_summary, run_pipeline, variant_args, write_results

from dmlkit.stages.submit import local_scores

VERIFY = ["retrieve.verify.enabled=true", "retrieve.verify.image_size=384"]
VARIANTS = {  # the first is the one the others are paired with
    "additive": [*VERIFY, "retrieve.verify.fusion=additive"],
    "no verification": [],
    "calibrated": [*VERIFY, "retrieve.verify.fusion=calibrated"],
    "stacked": [*VERIFY, "retrieve.verify.fusion=stacked"],
}


def scores(ctx) -> dict[str, float]:
    """Public / private of every submission format, and the verification row's validation score."""
    out = {}
    for result in local_scores(ctx):
        out[f"{result['metric']}_public"] = result["public"]
        out[f"{result['metric']}_private"] = result["private"]
    report = pd.read_csv(ctx.done["retrieve"].file("report.csv"))
    rows = report[report["step"].str.startswith("+ verification")]
    out["validation"] = float(rows.iloc[0, 1]) if len(rows) else float(report.iloc[-1, 1])
    return out


def main(argv: list[str] | None = None) -> int:
    args = variant_args("fusion", argv, "configs/landmark-demo.yaml")
    records = []
    for seed in args.seeds:
        for name, overrides in VARIANTS.items():
            started = time.time()
            ctx = run_pipeline(args.config, [*args.set, *overrides], seed, bench="fusion")
            record = {"variant": name, "seed": seed, **scores(ctx), "wall_s": round(time.time() - started, 1)}
            records.append(record)
            print(f"[bench] {name} seed {seed}: {record}", flush=True)
    results = pd.DataFrame(records)
    metrics = [c for c in results.columns if c.endswith(("_private", "_public"))] + ["validation"]
    metrics.sort(key=lambda c: not c.endswith("_private"))  # the paired difference is on the first private score
    rows = paired_summary(results, "variant", metrics, "additive")
    write_results(RESULTS / f"fusion-{Path(args.config).stem}.json", args, records, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
