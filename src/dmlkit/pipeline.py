"""The stages wired to the cache: each `run_*` returns its artifact, computing it (and whatever
upstream is missing) only when no complete artifact with the same key exists.

Which artifact does a stage read, and what invalidates it? Its key hashes its config slice, its
upstream keys and its input fingerprints (see each `run_*`); change any of them and that stage
and everything downstream recompute, nothing upstream.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from . import cache
from .competitions import Adapter, Predictions, get_adapter
from .config import Config, config_slice
from .runtime import barrier, default_device, is_main_process

log = logging.getLogger("dmlkit")

STAGES = ("folds", "train", "embed", "ensemble", "retrieve", "submit")
VERSIONS = {"folds": 1, "train": 2, "embed": 2, "ensemble": 1, "retrieve": 3, "submit": 1}


@dataclass
class Context:
    cfg: Config
    artifacts: Path = Path("artifacts")
    submissions: Path = Path("submissions")
    force: set[str] = field(default_factory=set)
    progress: bool = True
    done: dict[str, cache.Artifact] = field(default_factory=dict)

    @cached_property
    def adapter(self) -> Adapter:
        return get_adapter(self.cfg.competition.name)

    @cached_property
    def formats(self) -> list[Adapter]:
        return [self.adapter, *(get_adapter(name) for name in self.cfg.competition.extra_formats)]

    @property
    def root(self) -> Path:
        return Path(self.cfg.competition.root)

    @cached_property
    def device(self):
        import torch

        return torch.device(default_device())


def _run(
    ctx: Context,
    stage: str,
    name: str,
    config_part,
    upstream: dict[str, str],
    fingerprints: dict[str, str],
    compute: Callable[[Path], dict | None],
    resumable: bool = False,
    all_ranks: bool = False,
) -> cache.Artifact:
    """Reuse the complete artifact with this key, or compute it into a partial dir and rename it.

    Under torchrun, rank 0 alone writes; `all_ranks` stages (training) compute in lockstep on
    every rank, the others run on rank 0 while the other ranks wait.
    """
    label = f"{stage}/{name}" if name else stage
    if label in ctx.done:
        return ctx.done[label]
    key = cache.stage_key(stage, config_part, upstream, fingerprints, VERSIONS[stage])
    final = cache.artifact_dir(ctx.artifacts, ctx.cfg.experiment, stage, key)
    if name:
        final = final.parent / name / key
    forced = stage in ctx.force
    if cache.is_complete(final) and not forced:
        log.info("[%s] reused %s", label, final)
        art = cache.Artifact(stage, key, final, reused=True, manifest=cache.read_manifest(final))
    else:
        manifest = cache.build_manifest(stage, key, config_part, upstream, fingerprints)
        writer = cache.StageWriter(final, stage, key, manifest, resumable=resumable)
        log.info("[%s] computing %s%s", label, final, " (forced)" if forced else "")
        if is_main_process():
            with cache.stage_lock(final):
                work = writer.begin()
                barrier()  # the partial directory (and any checkpoint in it) is ready for every rank
                extra = compute(work)
                art = writer.commit({"result": extra} if extra else None)
        else:
            barrier()
            if all_ranks:
                compute(writer.partial)
            art = cache.Artifact(stage, key, final, reused=False)
        barrier()
        log.info("[%s] done in %.1fs → %s", label, art.manifest.get("wall_time_s", 0.0), final)
    ctx.done[label] = art
    return art


# ------------------------------------------------------------------------------------ stages
def run_folds(ctx: Context) -> cache.Artifact:
    from .stages.folds import assign_folds

    fingerprints = ctx.adapter.fingerprints(ctx.root)
    if (ctx.root / "demo_params.json").exists():  # a regenerated demo can keep identical CSVs
        fingerprints["demo_params"] = cache.file_fingerprint(ctx.root / "demo_params.json")
    part = {
        "competition": {"name": ctx.cfg.competition.name, "root": ctx.cfg.competition.root},
        "folds": config_slice(ctx.cfg.folds),
    }

    def compute(work: Path) -> dict:
        table = ctx.adapter.read(ctx.root)
        train = table[table["role"] == "train"].reset_index(drop=True)
        train["fold"] = assign_folds(train, ctx.cfg.folds.n_splits, ctx.cfg.folds.seed)
        table.to_csv(work / "table.csv", index=False)
        train.to_csv(work / "folds.csv", index=False)
        return {
            "rows": {role: int(n) for role, n in table["role"].value_counts().items()},
            "classes": int(train.loc[train["known"], "label"].nunique()),
        }

    return _run(ctx, "folds", "", part, {}, fingerprints, compute)


def load_table(folds_art: cache.Artifact) -> tuple[pd.DataFrame, pd.DataFrame]:
    read = {"dtype": {"id": str, "label": str}, "keep_default_na": False}
    table = pd.read_csv(folds_art.file("table.csv"), **read)
    folds = pd.read_csv(folds_art.file("folds.csv"), **read)
    table["label"] = table["label"].replace("", None)
    return table, folds


def run_train(ctx: Context, member_name: str) -> cache.Artifact:
    from .stages.train import train_member

    member = ctx.cfg.member(member_name)
    folds_art = run_folds(ctx)
    upstream = {"folds": folds_art.key}
    init_art = None
    if member.init_from:
        init_art = run_train(ctx, member.init_from)
        upstream["init"] = init_art.key
    part = {"member": config_slice(member), "seed": ctx.cfg.seed}

    def compute(work: Path) -> dict:
        import torch

        _, folds = load_table(folds_art)
        init_state = torch.load(init_art.file("final.pt"), map_location="cpu", weights_only=False) if init_art else None
        return train_member(
            ctx.cfg,
            member,
            folds,
            ctx.adapter.metric,
            ctx.adapter.unknown_label,
            work,
            ctx.device,
            init_state,
            ctx.progress,
        )

    art = _run(ctx, "train", member.name, part, upstream, {}, compute, resumable=True, all_ranks=True)
    if not art.reused and is_main_process():
        log.info("[train/%s] training curves: %s", member.name, art.file("curves.png"))
    return art


def run_embed(ctx: Context, member_name: str) -> cache.Artifact:
    from .inference import embed_paths, gather_rows, head_topk
    from .runtime import rank, world_size
    from .stages.train import load_member

    member = ctx.cfg.member(member_name)
    train_art = run_train(ctx, member_name)
    folds_art = run_folds(ctx)
    part = {"embed": config_slice(ctx.cfg.embed), "image_size": member.image_size, "amp": member.train.amp}

    def compute(work: Path) -> dict:
        table, _ = load_table(folds_art)
        model, head, classes = load_member(train_art.file("best.pt"), member, ctx.device)
        shard = np.arange(len(table))[rank() :: world_size()]  # under torchrun each rank embeds its share
        emb = embed_paths(
            model,
            table["path"].to_numpy()[shard].tolist(),
            member.image_size,
            ctx.cfg.embed.batch_size,
            ctx.device,
            flip=ctx.cfg.embed.tta_flip,
            scales=ctx.cfg.embed.tta_scales,
            amp=member.train.amp,
            num_workers=member.train.num_workers,
            desc=f"embed {member.name}",
            progress=ctx.progress,
        )
        emb = gather_rows(emb, shard, len(table))
        if not is_main_process():
            return {}
        top_index, top_cos = head_topk(head, emb, ctx.device)
        np.save(work / "embeddings.npy", emb)
        np.save(work / "head_topk_index.npy", top_index)
        np.save(work / "head_topk_cos.npy", top_cos)
        (work / "head_classes.json").write_text(json.dumps(classes))
        table[["id", "role"]].to_csv(work / "ids.csv", index=False)
        return {"rows": len(emb), "dim": int(emb.shape[1])}

    upstream = {"train": train_art.key, "folds": folds_art.key}
    return _run(ctx, "embed", member.name, part, upstream, {}, compute, all_ranks=True)


def member_embeddings(ctx: Context) -> dict[str, np.ndarray]:
    return {m.name: np.load(run_embed(ctx, m.name).file("embeddings.npy")) for m in ctx.cfg.members}


def member_heads(ctx: Context) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per member, (labels, cosines) of its head's best classes for every row of the table."""
    heads = {}
    for member in ctx.cfg.members:
        art = run_embed(ctx, member.name)
        classes = np.array(json.loads(art.file("head_classes.json").read_text()), dtype=object)
        heads[member.name] = (classes[np.load(art.file("head_topk_index.npy"))], np.load(art.file("head_topk_cos.npy")))
    return heads


def run_ensemble(ctx: Context) -> cache.Artifact:
    from .retrieval.ensemble import concatenate, pca_whiten

    embed_arts = {m.name: run_embed(ctx, m.name) for m in ctx.cfg.members}
    folds_art = run_folds(ctx)
    part = {"ensemble": config_slice(ctx.cfg.ensemble), "members": list(embed_arts)}

    def compute(work: Path) -> dict:
        table, _ = load_table(folds_art)
        parts = [np.load(a.file("embeddings.npy")) for a in embed_arts.values()]
        weights = [ctx.cfg.ensemble.weights.get(name, 1.0) for name in embed_arts]
        emb = concatenate(parts, weights)
        if ctx.cfg.ensemble.pca_whiten:
            emb = pca_whiten(emb, (table["role"] == "train").to_numpy(), ctx.cfg.ensemble.pca_dim)
        np.save(work / "embeddings.npy", emb)
        return {"dim": int(emb.shape[1]), "members": list(embed_arts)}

    upstream = {f"embed/{k}": a.key for k, a in embed_arts.items()}
    return _run(ctx, "ensemble", "", part, upstream, {}, compute)


def embeddings_of(art: cache.Artifact) -> np.ndarray:
    return np.load(art.file("embeddings.npy"))


def save_retrieval_grid(
    path: Path,
    table: pd.DataFrame,
    folds: pd.DataFrame,
    embeddings: np.ndarray,
    fold: int,
    queries: int = 6,
    k: int = 5,
) -> Path | None:
    """A PNG of a few validation queries and their top-k training neighbours (right ones green)."""
    from .data.images import read_image
    from .plots import plot_retrieval_grid
    from .retrieval.search import knn
    from .stages.folds import fold_parts

    train, val = fold_parts(folds, fold)
    val = val[val["known"]]
    if val.empty or train.empty:
        return None
    row_of = {i: n for n, (r, i) in enumerate(zip(table["role"], table["id"], strict=True)) if r == "train"}
    chosen = val.iloc[np.random.default_rng(0).permutation(len(val))[:queries]]
    _, ids = knn(
        embeddings[[row_of[i] for i in chosen["id"]]],
        embeddings[[row_of[i] for i in train["id"]]],
        k=min(k, len(train)),
        progress=False,
    )
    labels, paths = train["label"].to_numpy(), train["path"].to_numpy()
    plot_retrieval_grid(
        chosen["path"].tolist(),
        [[paths[j] for j in row] for row in ids],
        [[labels[j] == q for j in row] for row, q in zip(ids, chosen["label"], strict=True)],
        path,
        read_image,
        f"validation fold {fold}: queries (left) and their {k} nearest training images",
    )
    return path


def _val_fold(ctx: Context) -> int:
    return ctx.cfg.retrieve.val_fold if ctx.cfg.retrieve.val_fold is not None else ctx.cfg.members[0].fold


def run_retrieve(ctx: Context) -> cache.Artifact:
    from .stages.retrieve import retrieve

    if "retrieve" in ctx.done:  # already run (and its report logged) in this process
        return ctx.done["retrieve"]
    ensemble_art = run_ensemble(ctx)
    folds_art = run_folds(ctx)
    part = {
        "retrieve": config_slice(ctx.cfg.retrieve),
        "formats": [f.name for f in ctx.formats],
        "val_fold": _val_fold(ctx),
    }

    def compute(work: Path) -> dict:
        table, folds = load_table(folds_art)
        leaky = [m.name for m in ctx.cfg.members if m.fold != _val_fold(ctx)]
        if leaky:
            log.warning(
                "retrieve: members %s trained on validation fold %d's images: the ensemble's validation "
                "scores (and tuned thresholds) are optimistic",
                leaky,
                _val_fold(ctx),
            )
        predictions, report, tuned = retrieve(
            ctx.cfg.retrieve,
            ctx.adapter,
            ctx.formats,
            table,
            folds,
            np.load(ensemble_art.file("embeddings.npy")),
            member_embeddings(ctx),
            _val_fold(ctx),
            ctx.progress,
            member_heads(ctx) if ctx.cfg.retrieve.voting.head_weight > 0 else None,
        )
        for name, pred in predictions.items():
            (work / f"predictions-{name}.json").write_text(json.dumps(pred.__dict__))
        report.to_csv(work / "report.csv", index=False)
        grid = save_retrieval_grid(work / "retrievals.png", table, folds, embeddings_of(ensemble_art), _val_fold(ctx))
        if grid:
            log.info("[retrieve] validation queries and their neighbours: %s", grid)
        return {"tuned": tuned, "report": report.to_dict(orient="records")}

    art = _run(ctx, "retrieve", "", part, {"ensemble": ensemble_art.key, "folds": folds_art.key}, {}, compute)
    try:
        report = pd.read_csv(art.file("report.csv"))
    except pd.errors.EmptyDataError:  # no validation fold
        report = pd.DataFrame()
    if not report.empty and is_main_process():
        log.info("validation, step by step (fold %d):\n%s", _val_fold(ctx), report.to_string(index=False))
    return art


def run_submit(ctx: Context) -> cache.Artifact:
    retrieve_art = run_retrieve(ctx)
    part = {"experiment": ctx.cfg.experiment, "formats": [f.name for f in ctx.formats]}
    fingerprints = {"sample_submission": cache.file_fingerprint(ctx.root / "sample_submission.csv")}

    def compute(work: Path) -> dict:
        written = {}
        for fmt in ctx.formats:
            pred = Predictions(**json.loads(retrieve_art.file(f"predictions-{fmt.name}.json").read_text()))
            frame = fmt.build_submission(pred, fmt.submission_ids(ctx.root))
            name = f"{ctx.cfg.experiment}{fmt.suffix}.csv"
            frame.to_csv(work / name, index=False)
            written[fmt.name] = name
        return {"files": written}

    art = _run(ctx, "submit", "", part, {"retrieve": retrieve_art.key}, fingerprints, compute)
    if is_main_process():
        ctx.submissions.mkdir(parents=True, exist_ok=True)
        for fmt in ctx.formats:
            name = f"{ctx.cfg.experiment}{fmt.suffix}.csv"
            target = ctx.submissions / name
            shutil.copyfile(art.file(name), target.with_name(name + ".tmp"))
            target.with_name(name + ".tmp").replace(target)
            log.info("[submit] wrote %s", target)
    return art


def local_scores(ctx: Context) -> list[dict]:
    """Leaderboard scores of the written submissions where the competition ships its answers (demos)."""
    from .stages.score import score_files

    results = []
    for fmt in ctx.formats:
        solution = ctx.root / fmt.solution_file
        submission = ctx.submissions / f"{ctx.cfg.experiment}{fmt.suffix}.csv"
        if solution.is_file() and submission.is_file():
            result = score_files(submission, solution)
            result["submission"] = str(submission)
            results.append(result)
    return results


def run_stage(ctx: Context, stage: str) -> None:
    if stage in ("train", "embed"):
        runner = run_train if stage == "train" else run_embed
        for member in ctx.cfg.members:
            runner(ctx, member.name)
    else:
        {"folds": run_folds, "ensemble": run_ensemble, "retrieve": run_retrieve, "submit": run_submit}[stage](ctx)


def ensure_demo_data(ctx: Context) -> None:
    from .demo import build_demo

    if ctx.cfg.competition.demo and is_main_process():
        build_demo(ctx.cfg.competition.demo, ctx.root, ctx.cfg.competition.demo_params)
    barrier()
