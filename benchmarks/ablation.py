"""Ablation of the training recipe on a demo config: ArcFace → + sub-centers → + dynamic margins → + SEE,
and SEE's gain at a low embedding size. Prints a table and writes JSON next to this file.

    ./run.sh bench ablation -c configs/whale-demo.yaml [--backbone resnet10t] [--seeds 1]

Every variant is a cached training artifact (same pipeline as `./run.sh train`), so a rerun only
trains what is missing. Scores are the best per-epoch validation score on fold 0.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from dmlkit.config import load_config
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.runtime import seed_everything, set_threads, setup_logging
from dmlkit.stages.train import run_train

VARIANTS = [
    ("ArcFace", ["head.subcenters=1", "head.dynamic=none", "see.enabled=false"]),
    ("+ sub-centers (K=3)", ["head.subcenters=3", "head.dynamic=none", "see.enabled=false"]),
    ("+ dynamic margins", ["head.subcenters=3", "head.dynamic=glr3", "see.enabled=false"]),
    ("+ SEE", ["head.subcenters=3", "head.dynamic=glr3", "see.enabled=true"]),
]


def untrained_score(ctx: Context) -> dict:
    """Validation score of the randomly initialised backbone + neck (the floor training must beat)."""
    from dmlkit.build import build_model
    from dmlkit.data.folds import fold_parts
    from dmlkit.evaluation import LabelledQueries, knn_validation_scores
    from dmlkit.inference import embed_paths
    from dmlkit.stages.folds import load_table, run_folds

    member = ctx.cfg.members[0]
    _, folds = load_table(run_folds(ctx))
    train, val = fold_parts(folds, member.fold)
    model = build_model(member).to(ctx.device)
    embed = {"image_size": member.image_size, "batch_size": 128, "device": ctx.device, "flip": False, "progress": False}
    gallery = embed_paths(model, train["path"].tolist(), **embed)
    queries = embed_paths(model, val["path"].tolist(), **embed)
    return knn_validation_scores(ctx.adapter, queries, gallery, LabelledQueries.of(val, train))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench ablation")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--low-dim", type=int, default=64)
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup_logging(Path("logs"), "ablation")
    runs = [(name, [*ov, "embedding_size=default"]) for name, ov in VARIANTS]
    runs += [(f"{name} @ {args.low_dim}-d", [*ov, f"embedding_size={args.low_dim}"]) for name, ov in VARIANTS[2:]]
    rows = []
    for seed in range(args.seeds):
        member = {"name": "ablation", "backbone": args.backbone, "fold": 0}
        cfg = load_config(args.config, [f"members=[{json.dumps(member)}]", f"seed={42 + seed}"])
        seed_everything(cfg.seed)
        ctx = Context(cfg, artifacts=Path(args.artifacts), progress=False)
        ensure_demo_data(ctx)
        floor = untrained_score(ctx)
        rows.append(
            {
                "variant": "untrained backbone (no training)",
                "seed": cfg.seed,
                "embedding": cfg.members[0].embedding_size,
                "val_score": round(float(floor["score"]), 4),
                "val_recall@1": round(float(floor["recall@1"]), 4),
                "best_epoch": 0,
                "train_s": 0.0,
                "artifact": "",
            }
        )
        for name, overrides in runs:
            member = {"name": "ablation", "backbone": args.backbone, "fold": 0}
            cli = [f"members=[{json.dumps(member)}]", f"seed={42 + seed}"]
            for item in overrides:
                key, value = item.split("=", 1)
                if key == "embedding_size" and value == "default":
                    continue
                cli.append(f"member_defaults.{key}={value}")
            cfg = load_config(args.config, cli)
            set_threads(cfg.threads)
            seed_everything(cfg.seed)
            ctx = Context(cfg, artifacts=Path(args.artifacts), progress=False)
            ensure_demo_data(ctx)
            started = time.time()
            art = run_train(ctx, "ablation")
            history = pd.read_csv(art.file("metrics.csv"))
            best = history.loc[history["val_score"].idxmax()]
            rows.append(
                {
                    "variant": name,
                    "seed": cfg.seed,
                    "embedding": cfg.members[0].embedding_size,
                    "val_score": round(float(best["val_score"]), 4),
                    "val_recall@1": round(float(best["val_recall@1"]), 4),
                    "best_epoch": int(best["epoch"]),
                    "train_s": round(float(art.manifest.get("wall_time_s", time.time() - started)), 1),
                    "artifact": str(art.path),
                }
            )
    table = pd.DataFrame(rows)
    summary = table.groupby("variant", sort=False)[["val_score", "val_recall@1", "train_s"]].mean().round(4)
    metric = load_config(args.config).competition.name
    print(f"\nablation on {args.config} ({metric}, backbone {args.backbone}, {args.seeds} seed(s), fold 0):")
    print(summary.to_string())
    out = Path(args.out or Path(__file__).parent / "results" / f"ablation-{Path(args.config).stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "config": args.config,
                "backbone": args.backbone,
                "runs": rows,
                "summary": summary.reset_index().to_dict(orient="records"),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
