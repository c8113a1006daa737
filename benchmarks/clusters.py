"""New identities (retrieve.cluster) on a demo whose unseen individuals have several test photos:
per seed, the run without clustering, with clusters whose known identity is attached to "new"
answers, and with clusters only; scored on the leaderboard answers (MAP@5) and, for the clusters,
ARI / AMI against the demo's true identities (identities.csv) — over the whole test and over the
unseen individuals' photos alone.

    ./run.sh bench clusters [CONFIG] [--seeds 42 1 2] [--set KEY=VALUE ...]

CONFIG defaults to configs/whale-demo.yaml with 3 photos per unseen individual, no pseudo round, and a
fifth of the classes held out of each fold (their photos validate together: groups to tune on).
Writes benchmarks/results/clusters-<config stem>.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from common import RESULTS
from refit import paired_summary, run_pipeline, variant_args, write_results

from dmlkit.metrics import clustering_scores
from dmlkit.stages.submit import local_scores

# its own folder: the demo with groups is another competition than configs/whale-demo.yaml's input/whale-demo
# whole classes held out of each fold: the validation queries then hold groups of one identity to tune on
DEFAULT_SETS = [
    "competition.root=input/whale-demo-groups",
    "competition.demo_params.new_test_images=3",
    "pseudo.rounds=0",
    "folds.unknown_classes=0.2",
]
VARIANTS = {
    "no clusters": [],
    "clusters, attach": ["retrieve.cluster.enabled=true", "retrieve.cluster.attach=true"],
    "clusters, no attach": ["retrieve.cluster.enabled=true", "retrieve.cluster.attach=false"],
}


def cluster_scores(clusters_csv: Path, identities_csv: Path) -> dict[str, float]:
    """ARI / AMI over every test image and over the unseen individuals' images alone."""
    truth = pd.read_csv(identities_csv)
    cluster_of = dict(pd.read_csv(clusters_csv)[["id", "cluster"]].itertuples(index=False))
    out = {}
    for part, rows in (("all", truth), ("unseen", truth[truth["identity"].str.startswith("unseen-")])):
        scores = clustering_scores(rows["identity"].tolist(), [cluster_of[i] for i in rows["image"]])
        out.update({f"{metric}_{part}": value for metric, value in scores.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    args = variant_args("clusters", argv, "configs/whale-demo.yaml")
    records = []
    for seed in args.seeds:
        for name, overrides in VARIANTS.items():
            started = time.time()
            ctx = run_pipeline(args.config, [*DEFAULT_SETS, *args.set, *overrides], seed, bench="clusters")
            score = local_scores(ctx)[0]
            record = {"variant": name, "seed": seed, "public": score["public"], "private": score["private"]}
            clusters = ctx.done["retrieve"].file("clusters.csv")
            if clusters.is_file():
                record.update(cluster_scores(clusters, Path(ctx.cfg.competition.root) / "identities.csv"))
                record["validation"] = ctx.done["retrieve"].manifest["result"]["tuned"]["cluster"]
            record["wall_s"] = round(time.time() - started, 1)
            records.append(record)
            print(f"[bench] {name} seed {seed}: {record}", flush=True)
    results = pd.DataFrame(records)
    rows = paired_summary(results, "variant", ["private", "public"], "no clusters")
    clustered = results.dropna(subset=["ari_all"])
    for row in rows:
        part = clustered[clustered["variant"] == row["variant"]]
        for metric in ("ari_all", "ami_all", "ari_unseen", "ami_unseen"):
            if len(part):
                row[metric] = f"{part[metric].mean():.3f} ± {part[metric].std(ddof=1) if len(part) > 1 else 0:.3f}"
    write_results(RESULTS / f"clusters-{Path(args.config).stem}.json", args, records, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
