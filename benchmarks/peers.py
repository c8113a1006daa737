"""This pipeline against what a user would try instead, on the same rows, backbone, image size,
epochs and batch, 3 seeds, one evaluation function for every system.

    ./run.sh bench peers CONFIG [--epochs N] [--seeds 42 1 2] [--classes N] [--system NAME=K=V,K=V]

CONFIG names the data (its competition); its training rows are split once (seed 0): a fifth of the
classes are unknown (all their images are queries), and of every other class with two or more images
a quarter (at least one) are known queries; the rest trains every system. Peers (OML's triplet
recipe and ArcFace, PML's ArcFace and SubCenterArcFace; `peer_train.py`) run in .venv-bench
(requirements-bench.txt, created here on first use); the pipeline runs with `configs/base.yaml`'s
defaults on a generic-csv copy of the training rows (`dmlkit`), and with each --system's overrides.

Evaluation (`evaluate`): the training rows are the gallery, a class scores its best cosine.
Closed set: top-1 and MAP@5 of the known queries. Open set: "new" is inserted before the first class
under a threshold; the threshold is cross-calibrated (tuned for MAP@5 on the queries of one half of
the classes, applied to the other half, and back), so every system's embeddings are thresholded the
same way and no system sees its own test answers. BAKS / BAUS: top-1 accuracy of the known queries
(mean over classes) and the share of unknown queries answered "new" first (mean over classes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from common import RESULTS, machine

from dmlkit.config import load_config
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.pipeline.table import run_stage
from dmlkit.runtime import seed_everything, set_threads, setup_logging
from dmlkit.stages.ensemble import embeddings_of, test_embeddings_of
from dmlkit.stages.folds import load_table

PEERS = ("oml-triplet", "oml-arcface", "pml-arcface", "pml-subcenter")
BENCH_VENV = Path(".venv-bench")
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t, two-sided 95%


def labelled_rows(config: str, overrides: list[str], classes: int | None, per_class: int | None) -> pd.DataFrame:
    """The config's known training rows (path, label), optionally cut to the first `classes` classes
    (sorted by name) and `per_class` images each."""
    cfg = load_config(config, overrides)
    ctx = Context(cfg, progress=False)
    ensure_demo_data(ctx)  # a demo config's data is generated on first use
    table = ctx.adapter.read(Path(cfg.competition.root))
    rows = table[(table["role"] == "train") & table["known"]][["path", "label"]].sort_values("path")
    if classes:
        rows = rows[rows["label"].isin(sorted(rows["label"].unique())[:classes])]
    if per_class:
        rows = rows.groupby("label", group_keys=False).head(per_class)
    return rows.reset_index(drop=True)


def bench_split(rows: pd.DataFrame, unknown_share: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """Adds role (train / query) and known: a share of classes unknown, a quarter of each other
    class with two or more images held out as known queries."""
    rng = np.random.default_rng(seed)
    labels = sorted(rows["label"].unique())
    unknown = set(rng.choice(labels, int(round(unknown_share * len(labels))), replace=False).tolist())
    role = np.array(["train"] * len(rows), dtype=object)
    for label, part in rows.groupby("label"):
        index = rng.permutation(part.index.to_numpy())
        if label in unknown:
            role[index] = "query"
        elif len(index) >= 2:
            role[index[: max(1, len(index) // 4)]] = "query"
    out = rows.assign(role=role, known=~rows["label"].isin(unknown))
    return out


def _class_scores(emb: np.ndarray, split: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: the gallery classes sorted by best cosine (labels, cosines) and the query rows."""
    train = np.flatnonzero(split["role"].to_numpy() == "train")
    query = np.flatnonzero(split["role"].to_numpy() == "query")
    g_labels = split["label"].to_numpy()[train]
    classes, inverse = np.unique(g_labels, return_inverse=True)
    sims = emb[query] @ emb[train].T
    best = np.full((len(query), len(classes)), -np.inf, dtype=np.float32)
    for c in range(len(classes)):
        best[:, c] = sims[:, inverse == c].max(axis=1)
    order = np.argsort(-best, axis=1, kind="stable")[:, :5]
    return classes[order], np.take_along_axis(best, order, axis=1), query


def _open_ap(labels: np.ndarray, cosines: np.ndarray, truth: np.ndarray, threshold: float) -> np.ndarray:
    """Average precision at 5 of each query's answer list with "new" inserted before the first class
    whose cosine is under the threshold (truth "new" for unknown queries)."""
    ap = np.zeros(len(truth))
    for i in range(len(truth)):
        answers = list(labels[i])
        cut = int(np.sum(cosines[i] >= threshold))
        answers = [*answers[:cut], "new", *answers[cut:]][:5]
        if truth[i] in answers:
            ap[i] = 1.0 / (answers.index(truth[i]) + 1)
    return ap


def evaluate(emb: np.ndarray, split: pd.DataFrame) -> dict[str, float]:
    """Every system's one evaluation: closed-set top-1 / MAP@5, open-set MAP@5 with a cross-calibrated
    threshold, BAKS / BAUS."""
    labels, cosines, query = _class_scores(emb, split)
    known = split["known"].to_numpy()[query]
    truth = np.where(known, split["label"].to_numpy()[query], "new")
    hits = labels == truth[:, None]
    closed_ap = (hits / np.arange(1, hits.shape[1] + 1)).max(axis=1)
    halves = np.array([hash_half(lab) for lab in split["label"].to_numpy()[query]])
    open_ap = np.zeros(len(query))
    for half in (0, 1):
        tune, apply = halves == half, halves != half
        if not tune.any():  # every query's class in one half: tuned on all of them
            tune = np.ones_like(tune)
        candidates = np.unique(np.round(cosines[tune, 0], 4))
        scores = [_open_ap(labels[tune], cosines[tune], truth[tune], t).mean() for t in candidates]
        threshold = float(candidates[int(np.argmax(scores))])
        open_ap[apply] = _open_ap(labels[apply], cosines[apply], truth[apply], threshold)
    first_new = open_ap == 1.0  # for an unknown query, AP 1 means "new" came first
    q_labels = split["label"].to_numpy()[query]
    baks = pd.Series(open_ap[known] == 1.0).groupby(q_labels[known]).mean().mean()
    baus = pd.Series(first_new[~known]).groupby(q_labels[~known]).mean().mean() if (~known).any() else np.nan
    return {
        "closed_top1": float(hits[known, 0].mean()),
        "closed_map5": float(closed_ap[known].mean()),
        "open_map5": float(open_ap.mean()),
        "baks": float(baks),
        "baus": float(baus),
    }


def hash_half(label: str) -> int:
    """A class's calibration half, stable across runs and Python processes."""
    return sum(label.encode()) % 2


def ensure_bench_env() -> Path:
    python = BENCH_VENV / "bin" / "python"
    stamp = BENCH_VENV / ".requirements"
    want = Path("requirements-bench.txt").read_text()
    if not (stamp.is_file() and stamp.read_text() == want):
        uv = Path(".venv/bin/uv")
        print("[bench] creating .venv-bench from requirements-bench.txt", flush=True)
        subprocess.run([str(uv), "venv", "-q", "--python", sys.executable, str(BENCH_VENV)], check=True)
        subprocess.run(
            [str(uv), "pip", "install", "-q", "--python", str(python), "-r", "requirements-bench.txt"], check=True
        )
        stamp.write_text(want)
    return python


def run_peer(system: str, seed: int, split_csv: Path, out: Path, args: argparse.Namespace) -> dict:
    if not out.with_suffix(".json").is_file():
        python = ensure_bench_env()
        command = [
            str(python), str(Path(__file__).with_name("peer_train.py")), str(split_csv), system, str(out),
            "--seed", str(seed), "--epochs", str(args.epochs), "--backbone", args.backbone,
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--lr", str(args.peer_lr),
        ]  # fmt: skip
        subprocess.run(command, check=True)
    info = json.loads(out.with_suffix(".json").read_text())
    return {"train_s": info["train_s"], "embeddings": {"": f"{out}.npy", " + flip TTA": f"{out}-flip.npy"}}


def pipeline_config(work: Path, split: pd.DataFrame, seed: int, args: argparse.Namespace) -> Path:
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    table = split.assign(path=[str(Path(p).resolve()) for p in split["path"]])
    table = table.assign(split=np.where(table["role"] == "train", "train", "test"))
    table.loc[table["split"] == "test", "label"] = ""
    table[["path", "label", "split"]].to_csv(data / "data.csv", index=False)
    config = {
        "base": str(Path("configs/base.yaml").resolve()),
        "experiment": f"bench-{seed}",
        "seed": seed,
        "tracking": "none",
        "competition": {"name": "generic-csv", "root": str(data.resolve())},
        "member_defaults": {
            "image_size": args.image_size,
            "train": {"epochs": args.epochs, "batch_size": args.batch_size},
        },
        "members": [{"name": "m", "backbone": args.backbone, "fold": 0}],
    }
    path = work / f"config-{seed}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_pipeline(overrides: list[str], seed: int, split: pd.DataFrame, work: Path, args) -> dict:
    """Trains the pipeline on the training rows and returns its embeddings of every row as it would
    answer a test: the ensemble's (the refit models' where members refit), in the split's order."""
    cfg = load_config(str(pipeline_config(work.parent, split, seed, args)), overrides)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    ctx = Context(cfg, artifacts=work.parent / "artifacts", progress=False)  # systems share what they can
    for stage in ("folds", "train", "embed", "ensemble"):
        run_stage(ctx, stage)
    ensemble = ctx.done["ensemble"]
    emb = test_embeddings_of(ensemble)
    emb = embeddings_of(ensemble) if emb is None else emb
    table, _ = load_table(ctx.done["folds"])
    order = pd.Series(np.arange(len(table)), index=table["id"].astype(str))
    rows = order.loc[[str(Path(p).resolve()) for p in split["path"]]].to_numpy()
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"emb-{seed}-{ensemble.key[:16]}.npy"
    np.save(out, emb[rows])
    train_s = sum(art.manifest.get("wall_time_s", 0.0) for label, art in ctx.done.items() if label.startswith("train/"))
    return {"train_s": round(train_s, 1), "embeddings": {"": str(out)}}


def summary(results: pd.DataFrame, baseline: str, metrics: list[str]) -> pd.DataFrame:
    """Mean ± sd per system, and the paired difference to `baseline` (same seed) with a 95% t interval."""
    rows = []
    base = results[results["system"] == baseline].set_index("seed")
    for system, part in results.groupby("system", sort=False):
        row = {"system": system, "seeds": len(part), "train_s": round(part["train_s"].mean(), 1)}
        for metric in metrics:
            row[metric] = f"{part[metric].mean():.3f} ± {part[metric].std(ddof=1) if len(part) > 1 else 0:.3f}"
        paired = part.set_index("seed")[metrics[1]] - base[metrics[1]]
        paired = paired.dropna()
        if system != baseline and len(paired) > 1:
            half = T_975.get(len(paired) - 1, 2.0) * paired.std(ddof=1) / np.sqrt(len(paired))
            row[f"{metrics[1]} - {baseline}"] = (
                f"{paired.mean():+.3f} [{paired.mean() - half:+.3f}, {paired.mean() + half:+.3f}]"
            )
        rows.append(row)
    return pd.DataFrame(rows)


def merged_records(path: Path, records: list[dict]) -> pd.DataFrame:
    """This run's records over the earlier runs' of the same tag (a system and seed measured again
    replaces its old record), so variants can be added one command at a time."""
    new = pd.DataFrame(records)
    if not path.is_file():
        return new
    old = pd.DataFrame(json.loads(path.read_text())["records"])
    if new.empty:
        return old
    keep = ~old.set_index(["system", "seed"]).index.isin(new.set_index(["system", "seed"]).index)
    return pd.concat([old[keep], new], ignore_index=True)


def save_results(out: Path, records: list[dict], args: argparse.Namespace, echo: bool = False) -> None:
    """Writes this run's records merged over the file's earlier ones, with the summary table."""
    results = merged_records(out, records)
    metrics = ["closed_top1", "closed_map5", "open_map5", "baks", "baus"]
    table = summary(results, "dmlkit", metrics) if not results.empty else pd.DataFrame()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine(), "args": vars(args),
                               "records": results.to_dict("records"), "summary": table.to_dict("records")},
                              indent=2))  # fmt: skip
    if echo:
        print(table.to_string(index=False))
        print(f"wrote {out}")


def parse_systems(specs: list[str]) -> dict[str, list[str]]:
    systems = {"dmlkit": []}
    for spec in specs:
        name, _, overrides = spec.partition("=")
        systems[name] = [o for o in overrides.split(",") if o]
    return systems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench peers")
    parser.add_argument("config", help="the config whose competition holds the data (configs/whale-demo.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for reading the data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--peer-lr", type=float, default=1e-3, help="Adam's learning rate in the peers' loops")
    parser.add_argument("--classes", type=int, default=None, help="only the first N classes (by name)")
    parser.add_argument("--per-class", type=int, default=None, help="at most N images per class")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers to run ('' for none)")
    parser.add_argument(
        "--system", action="append", default=[], metavar="NAME=K=V,K=V", help="another pipeline variant"
    )
    parser.add_argument("--tag", default=None, help="results name (default: the config's stem)")
    args = parser.parse_args(argv)
    tag = args.tag or Path(args.config).stem
    setup_logging(Path("logs"), f"peers-{tag}")
    work = Path("artifacts") / "bench-peers" / tag
    work.mkdir(parents=True, exist_ok=True)
    split = bench_split(labelled_rows(args.config, args.set, args.classes, args.per_class))
    split_csv = work / "split.csv"
    if split_csv.is_file() and pd.read_csv(split_csv, dtype=str)["path"].tolist() != split["path"].tolist():
        raise SystemExit(f"error: {split_csv} holds another split: remove {work} or pass --tag")
    split.to_csv(split_csv, index=False)
    n_query = int((split["role"] == "query").sum())
    print(
        f"[bench] {tag}: {int((split['role'] == 'train').sum())} training rows in "
        f"{split.loc[split['role'] == 'train', 'label'].nunique()} classes, {n_query} queries "
        f"({int((split['role'] == 'query').sum() - split.loc[split['role'] == 'query', 'known'].sum())} unknown)",
        flush=True,
    )
    peers = [p for p in args.peers.split(",") if p]
    out = RESULTS / f"peers-{tag}.json"
    records: list[dict] = []
    for seed in args.seeds:
        for system in peers:
            started = time.time()
            got = run_peer(system, seed, split_csv, work / f"{system}-{seed}", args)
            for suffix, file in got["embeddings"].items():
                records.append({"system": system + suffix, "seed": seed, "train_s": got["train_s"],
                                **evaluate(np.load(file), split)})  # fmt: skip
            print(f"[bench] {system} seed {seed}: {records[-1]} ({time.time() - started:.0f} s)", flush=True)
            save_results(out, records, args)  # each result kept as it comes: a long run may be cut off
        for name, overrides in parse_systems(args.system).items():
            got = run_pipeline(overrides, seed, split, work / name, args)
            records.append({"system": name, "seed": seed, "train_s": got["train_s"],
                            **evaluate(np.load(got["embeddings"][""]), split)})  # fmt: skip
            print(f"[bench] {name} seed {seed}: {records[-1]}", flush=True)
            save_results(out, records, args)
    save_results(RESULTS / f"peers-{tag}.json", records, args, echo=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
