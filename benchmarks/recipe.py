"""Does the recipe pay, and where? Each part of the training recipe against plain ArcFace, in the
regime it was built for, derived from Omniglot's background set, several seeds each:

  clean     the background set as it is                       ArcFace, + SEE
  longtail  each character keeps n drawings, n ~ Zipf(1) over 1–20 (median 3)
                                                               ArcFace, + sub-centers K=3, + dynamic margins
  noisy     20% of the training drawings relabelled to a random other character
                                                               ArcFace, + sub-centers K=3
  lowdim    64-d embeddings (GUIE's size)                      ArcFace, + SEE, Proxy-Anchor (PML), Proxy-Anchor + SEE
  see-64, see-128, see-64-rot (rotated characters as classes: 3,856)
            SEE's paper comparison: Proxy-Anchor, + SEE (proxies: the paper's), + SEE (backbone: extension);
            ArcFace, + SEE (proxies: extension)

Evaluation as in the Omniglot benchmark, on the evaluation set: the official 20-way one-shot task
and identification (3 drawings per character in the gallery, the rest queries; MAP@5 and Recall@1
of known characters: the comparison is about the embedding, not the unknown threshold). Each
variant is compared with its regime's first row trained with the same seeds: mean ± std, and the
mean paired difference with a 95% t-interval.

    ./run.sh bench recipe DATA_DIR [--regimes clean,noisy] [--variants 0,1] [--seeds 3] [--epochs 6]
        [--backbone resnet10t] [--image-size 28]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import RESULTS, machine
from omniglot import embedder, one_shot_accuracy, one_shot_runs, ranked_identification

from dmlkit.build import load_member
from dmlkit.competitions.image_folder import extracted, image_root, list_images
from dmlkit.config import load_config
from dmlkit.evaluation import plain_score
from dmlkit.pipeline.context import Context
from dmlkit.runtime import seed_everything, set_threads, setup_logging
from dmlkit.stages.train import run_train

ARCFACE = ["head.type=arcface", "head.subcenters=1", "head.dynamic=none", "see.enabled=false"]
SEE = ["see.enabled=true"]
SEE_PROXIES = ["see.enabled=true", "see.gradient=proxies"]
SEE_BACKBONE = ["see.enabled=true", "see.gradient=backbone"]
PROXY = ["head.type=proxy_anchor", "head.subcenters=1", "head.dynamic=none", "see.enabled=false"]
# The paper's comparison (Proxy-Anchor vs + SEE with the proxies-only gradient) and this project's
# extensions (SEE's gradient into the backbone; SEE on ArcFace), each against its own base row.
SEE_STUDY = [
    ("Proxy-Anchor", PROXY, None),
    ("Proxy-Anchor + SEE (proxies: the paper's)", [*PROXY, *SEE_PROXIES], 0),
    ("Proxy-Anchor + SEE (backbone: extension)", [*PROXY, *SEE_BACKBONE], 0),
    ("ArcFace", ARCFACE, None),
    ("ArcFace + SEE (proxies: extension)", [*ARCFACE, *SEE_PROXIES], 3),
]
# regime -> [(variant, overrides, the variant it is compared with)]
REGIMES: dict[str, list[tuple[str, list[str], int | None]]] = {
    "clean": [("ArcFace", ARCFACE, None), ("+ SEE", [*ARCFACE, *SEE], 0)],
    "longtail": [
        ("ArcFace", ARCFACE, None),
        ("+ sub-centers K=3", [*ARCFACE, "head.subcenters=3"], 0),
        ("+ dynamic margins", [*ARCFACE, "head.dynamic=glr3"], 0),
    ],
    "noisy": [("ArcFace", ARCFACE, None), ("+ sub-centers K=3", [*ARCFACE, "head.subcenters=3"], 0)],
    "lowdim": [
        ("ArcFace", ARCFACE, None),
        ("+ SEE", [*ARCFACE, *SEE], 0),
        ("Proxy-Anchor", PROXY, None),
        ("Proxy-Anchor + SEE", [*PROXY, *SEE], 2),
    ],
    "see-64": SEE_STUDY,
    "see-128": SEE_STUDY,
    "see-64-rot": SEE_STUDY,  # each character turned by 90°, 180°, 270° a class of its own: 3,856 classes
}
EMBEDDING_SIZE = {"lowdim": 64, "see-64": 64, "see-128": 128, "see-64-rot": 64}
ROTATED = {"see-64-rot"}
T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 8: 2.365, 10: 2.262}


def regime_table(images: pd.DataFrame, regime: str, seed: int = 0) -> pd.DataFrame:
    """The background set's `path, label` rows for a regime (deterministic in `seed`)."""
    rng = np.random.default_rng(seed)
    if regime == "longtail":
        n = np.arange(1, 21)
        p = 1.0 / n / (1.0 / n).sum()
        keep = []
        for _, part in images.groupby("label", sort=True):
            count = min(len(part), int(rng.choice(n, p=p)))
            keep.append(part.iloc[rng.permutation(len(part))[:count]])
        return pd.concat(keep).sort_values("path").reset_index(drop=True)
    if regime == "noisy":
        out = images.copy()
        classes = np.array(sorted(out["label"].unique()))
        flip = rng.random(len(out)) < 0.2
        for i in np.flatnonzero(flip):
            others = classes[classes != out.at[i, "label"]]
            out.at[i, "label"] = rng.choice(others)
        return out
    return images


def write_regime(images: pd.DataFrame, regime: str, root: Path) -> Path:
    """A generic-CSV competition folder (`data.csv`, absolute paths) for the regime."""
    folder = root / regime
    folder.mkdir(parents=True, exist_ok=True)
    table = regime_table(images, regime)
    data = pd.DataFrame({"path": table["path"], "label": table["label"], "split": "train"})
    path = folder / "data.csv"
    if not path.exists() or path.read_text() != data.to_csv(index=False):
        data.to_csv(path, index=False)
    return folder


def identification_known(embed, evaluation: pd.DataFrame, ctx: Context, gallery_per_class: int = 3) -> dict:
    """MAP@5 (the pipeline's voting, the adapter's metric, no unknown label) and Recall@1 of the
    evaluation characters' drawings against `gallery_per_class` drawings of each."""
    queries, _, _ = ranked_identification(embed, evaluation, gallery_per_class, set(), ctx)
    return {"map@5": plain_score(ctx.adapter, queries), "recall@1": queries.recall_at_1}


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per regime and variant: mean ± std over seeds, and the paired difference to the variant it is
    compared with (same seeds) with a 95% t-interval."""
    rows = []
    for (regime, order, variant), part in runs.groupby(["regime", "order", "variant"], sort=True):
        baseline = REGIMES[regime][order][2]
        base = runs[(runs["regime"] == regime) & (runs["order"] == baseline)].set_index("seed")
        row = {"regime": regime, "variant": variant, "seeds": len(part)}
        if baseline is not None:
            row["against"] = REGIMES[regime][baseline][0]
        for metric in ("one_shot", "ident_map@5"):
            values = part.set_index("seed")[metric]
            row[metric] = f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0:.4f}"
            if baseline is not None:
                diff = (values - base[metric].reindex(values.index)).dropna()
                half = T_975.get(len(diff), 2.0) * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.nan
                row[f"{metric} Δ (95% CI)"] = (
                    f"{diff.mean():+.4f} [{diff.mean() - half:+.4f}, {diff.mean() + half:+.4f}]"
                )
        row["train_min"] = round(part["train_s"].mean() / 60, 1)
        rows.append(row)
    return pd.DataFrame(rows)


def run_cell(args, images, evaluation, runs_data, regime: str, order: int, seed: int) -> dict:
    name, overrides, _ = REGIMES[regime][order]
    root = write_regime(images, regime, Path("input/.recipe"))
    base = [
        "competition.name=generic-csv",
        f"competition.root={root.resolve()}",
        f"experiment=recipe-{regime}",
        f"seed={seed}",
        "folds.unknown_classes=0",
        f"member_defaults.train.epochs={args.epochs}",
        f"member_defaults.train.validate_every={args.epochs}",
        "member_defaults.train.class_rotations=" + ("[90,180,270]" if regime in ROTATED else "[]"),
    ]
    if regime in EMBEDDING_SIZE:
        base.append(f"member_defaults.embedding_size={EMBEDDING_SIZE[regime]}")
    if args.backbone:
        base.append(f"members.0.backbone={args.backbone}")
    if args.image_size:
        base.append(f"member_defaults.image_size={args.image_size}")
    cfg = load_config(args.config, [*base, *(f"member_defaults.{o}" for o in overrides)])
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    ctx = Context(cfg, artifacts=Path(args.artifacts), progress=False)
    member = cfg.members[0]
    art = run_train(ctx, member.name)
    model, _, _ = load_member(art.file("best.pt"), member, ctx.device)
    embed = embedder([model], member.image_size, (1.0,), ctx.device)
    started = time.time()
    ident = identification_known(embed, evaluation, ctx)
    return {
        "regime": regime,
        "order": order,
        "variant": name,
        "seed": seed,
        "one_shot": one_shot_accuracy(embed, runs_data),
        "ident_map@5": ident["map@5"],
        "ident_recall@1": ident["recall@1"],
        "train_s": float(art.manifest.get("wall_time_s", 0.0)),
        "eval_s": time.time() - started,
        "train_images": art.manifest.get("result", {}).get("train_images"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench recipe")
    parser.add_argument(
        "data", type=Path, help="folder with images_background.zip, images_evaluation.zip, all_runs.zip"
    )
    parser.add_argument("--config", default="configs/omniglot.yaml")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--variants", default=None, help="comma-separated variant numbers within each regime")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--out", default="recipe.json", help="results file name under benchmarks/results/")
    parser.add_argument("--backbone", default=None, help="the member's timm backbone (default: the config's)")
    parser.add_argument("--image-size", type=int, default=None, help="the member's image size (default: the config's)")
    args = parser.parse_args(argv)
    setup_logging(Path("logs"), "recipe")
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown:
        raise SystemExit(f"error: unknown regime(s) {unknown}; known: {list(REGIMES)}")
    for name in ("images_background.zip", "images_evaluation.zip", "all_runs.zip"):
        if not (args.data / name).is_file():
            raise SystemExit(f"error: {args.data / name} not found")
    background = image_root(extracted(args.data / "images_background.zip"))
    images = pd.DataFrame({"path": [str(p.resolve()) for p in list_images(background)]})
    images["label"] = [str(Path(p).parent.relative_to(background.resolve())) for p in images["path"]]
    eval_root = image_root(args.data / "images_evaluation.zip")
    evaluation = pd.DataFrame({"path": [str(p) for p in list_images(eval_root)]})
    evaluation["label"] = [str(Path(p).parent.relative_to(eval_root)) for p in evaluation["path"]]
    evaluation = evaluation.sort_values("path").reset_index(drop=True)
    runs_data = one_shot_runs(args.data)
    out = RESULTS / args.out
    RESULTS.mkdir(parents=True, exist_ok=True)
    cells = []
    for regime in regimes:
        orders = range(len(REGIMES[regime]))
        if args.variants:
            chosen = {int(i) for i in args.variants.split(",") if int(i) < len(REGIMES[regime])}
            baselines = {REGIMES[regime][i][2] for i in chosen} - {None}
            orders = sorted(chosen | baselines)
        cells.extend((regime, order) for order in orders)
    started, results = time.time(), []
    # Seed by seed over every cell: a run cut short still holds paired rows for each variant.
    for seed in range(args.seeds):
        for regime, order in cells:
            results.append(run_cell(args, images, evaluation, runs_data, regime, order, 42 + seed))
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results[-1].items()}, flush=True)
            out.write_text(
                json.dumps({"runs": results, "args": vars(args), "machine": machine()}, indent=2, default=str)
            )
    table = summarise(pd.DataFrame(results))
    minutes = (time.time() - started) / 60
    print(f"\nrecipe by regime ({args.epochs} epochs each, {args.seeds} seeds, {minutes:.0f} min on this machine):")
    print(table.to_string(index=False))
    out.write_text(
        json.dumps(
            {
                "runs": results,
                "summary": table.to_dict(orient="records"),
                "minutes": minutes,
                "args": vars(args),
                "machine": machine(),
            },
            indent=2,
            default=str,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
