"""The stages wired to the cache: each `run_*` returns its artifact, computing it (and whatever
upstream is missing) only when no complete artifact with the same key exists.

Which artifact does a stage read, and what invalidates it? Its key hashes its config slice, what
its upstream stages produced (their manifests' output digests, over the files in `OUTPUTS`) and
its input fingerprints (see each `run_*`); change any of them and that stage recomputes, nothing
upstream. A forced stage that produces other bytes so invalidates everything after it; one that
reproduces its files exactly leaves them cached.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from . import cache, tracking
from .competitions import Adapter, get_adapter
from .config import Config, ConfigError, MemberConfig, config_slice, device_notes, ineffective_values, member_slice
from .data.images import UnreadableImageError
from .runtime import barrier, default_device, is_main_process

log = logging.getLogger("dmlkit")

STAGES = ("folds", "train", "embed", "ensemble", "retrieve", "submit")
VERSIONS = {"folds": 3, "train": 4, "embed": 3, "ensemble": 1, "retrieve": 7, "submit": 1}
# The files of each stage that later stages read: their digest is the manifest's `output`.
OUTPUTS = {
    "folds": ("table.csv", "folds.csv", "unreadable.csv", "images.fingerprint"),
    "train": ("best.pt", "final.pt"),
    "embed": ("*.npy", "head_classes.json", "ids.csv"),
    "ensemble": ("*.npy",),
    "retrieve": ("predictions-*.json", "answers-*.csv", "report.csv"),
    "submit": ("*.csv",),
}


@dataclass
class Context:
    cfg: Config
    artifacts: Path = Path("artifacts")
    submissions: Path = Path("submissions")
    force: set[str] = field(default_factory=set)
    progress: bool = True
    done: dict[str, cache.Artifact] = field(default_factory=dict)
    pretrained_checked: bool = False
    plan: list[dict] | None = None  # planning (`./run.sh plan`): decisions collected, nothing computed
    trained: dict[str, Path] = field(default_factory=dict)  # member → packaged train artifact (offline.py)
    round: int = 0  # pseudo-label round (stages/pseudo.py); its artifacts live under round-<r>/
    previous: Context | None = None  # the round before this one

    def __post_init__(self) -> None:
        """Refuse values that would have no effect, before anything runs; note device differences."""
        ranks_index = any(fmt.gallery_role == "index" for fmt in self.formats)
        problems = ineffective_values(self.cfg, self.adapter.metric, ranks_index)
        if problems:
            where = self.cfg.source or "config"
            raise ConfigError(f"{where}: value(s) without effect in this config:\n  " + "\n  ".join(problems))
        if is_main_process():
            for note in device_notes(self.cfg, self.device.type):
                log.warning("%s", note)

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
    def unknown_classes(self) -> float:
        """The share of classes each fold holds out: as configured, else 0.2 where the metric answers
        'new' and training has no unknown rows to calibrate it on (Happywhale, generic CSV, folders)."""
        if self.cfg.folds.unknown_classes is not None:
            return self.cfg.folds.unknown_classes
        train = self.source_table[self.source_table["role"] == "train"]
        return 0.2 if self.adapter.metric == "map@5" and train["known"].all() else 0.0

    @cached_property
    def source_table(self) -> pd.DataFrame:
        """The competition's common table, with the distractor pool's rows when one is configured."""
        from .competitions.base import check_table
        from .competitions.distractors import read_pool

        table = self.adapter.read(self.root)
        penalty = self.cfg.retrieve.penalty
        if penalty.pool:
            table = check_table(pd.concat([table, read_pool(penalty.pool)], ignore_index=True), penalty.pool)
        if penalty.enabled and not table["role"].isin(["index", "distractor"]).any():
            raise ConfigError(
                f"{self.cfg.source}: retrieve.penalty.enabled needs non-landmark images: {self.root} has no "
                "index/ images and retrieve.penalty.pool is not set (a folder, .zip or .csv of them)"
            )
        return table

    @cached_property
    def device(self):
        import torch

        return torch.device(default_device())


def _artifact_path(ctx: Context, stage: str, name: str, key: str) -> Path:
    """artifacts/<experiment>/[round-<r>/]<stage>/[<name>/]<key>. An earlier round's complete artifact
    with the same key stands for this round's: a pseudo round that added no rows has the same inputs
    as the round before, and retraining every member would reproduce it."""

    def in_round(r: int) -> Path:
        experiment = f"{ctx.cfg.experiment}/round-{r}" if r else ctx.cfg.experiment
        final = cache.artifact_dir(ctx.artifacts, experiment, stage, key)
        return final.parent / name / key if name else final

    paths = [in_round(r) for r in range(ctx.round, -1, -1)]
    return next((path for path in paths if cache.is_complete(path)), paths[0])


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
    on_computed: Callable[[cache.Artifact], None] | None = None,
) -> cache.Artifact:
    """Reuse the complete artifact with this key, or compute it into a partial dir and rename it.

    Under torchrun, rank 0 alone writes; `all_ranks` stages (training) compute in lockstep on
    every rank, the others run on rank 0 while the other ranks wait. `on_computed(artifact)` runs
    once, on rank 0, after a computed artifact is in place (to log its final paths).
    """
    label = f"{stage}/{name}" if name else stage
    if label in ctx.done:
        return ctx.done[label]
    key = cache.stage_key(stage, config_part, upstream, fingerprints, VERSIONS[stage])
    final = _artifact_path(ctx, stage, name, key)
    forced = stage in ctx.force
    if ctx.plan is not None:
        ctx.done[label] = _planned(ctx, label, final, forced, config_part, upstream, fingerprints)
        return ctx.done[label]
    if cache.is_complete(final) and not forced:
        log.info("[%s] reused %s", label, final)
        art = cache.Artifact(stage, key, final, reused=True, manifest=cache.read_manifest(final))
    else:
        manifest = cache.build_manifest(stage, key, config_part, upstream, fingerprints, VERSIONS[stage])
        writer = cache.StageWriter(final, stage, key, manifest, resumable=resumable, outputs=OUTPUTS[stage])
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
        barrier()
        if not is_main_process():  # rank 0 has committed: every rank reads the same manifest
            art = cache.Artifact(stage, key, final, reused=False, manifest=cache.read_manifest(final))
        log.info("[%s] done in %.1fs → %s", label, art.manifest.get("wall_time_s", 0.0), final)
        if on_computed is not None and is_main_process():
            on_computed(art)
    ctx.done[label] = art
    return art


def _planned(
    ctx: Context, label: str, final: Path, forced: bool, config_part, upstream, fingerprints
) -> cache.Artifact:
    """Plan mode: the artifact `_run` would reuse, or a pending one whose output downstream keys
    hash as `pending:<key>`; the decision and its reason go to `ctx.plan`."""
    from .planning import recompute_reason

    stage, key = stage_of(label), final.name
    shown = f"round-{ctx.round}/{label}" if ctx.round else label
    if cache.is_complete(final) and not forced:
        ctx.plan.append({"stage": shown, "action": "reuse", "path": str(final), "reason": ""})
        return cache.Artifact(stage, key, final, reused=True, manifest=cache.read_manifest(final))
    new = {"config": config_part, "upstream": upstream, "inputs": fingerprints, "version": VERSIONS[stage]}
    reason = "forced (--force)" if forced else recompute_reason(final, new)
    ctx.plan.append({"stage": shown, "action": "recompute", "path": str(final), "reason": reason})
    return cache.Artifact(stage, key, final, reused=False, manifest={"output": f"pending:{label}"})


def stage_of(label: str) -> str:
    return label.split("/", 1)[0]


# ------------------------------------------------------------------------------------ stages
def run_folds(ctx: Context) -> cache.Artifact:
    from .stages.folds import make_folds

    if "folds" in ctx.done:
        return ctx.done["folds"]
    if ctx.round:
        return run_pseudo_folds(ctx)
    table = ctx.source_table
    fingerprints = ctx.adapter.fingerprints(ctx.root)
    if (ctx.root / "demo_params.json").exists():  # a regenerated demo can keep identical CSVs
        fingerprints["demo_params"] = cache.file_fingerprint(ctx.root / "demo_params.json")
    fingerprints["images"] = cache.files_fingerprint(table["path"])  # a replaced image redoes the check
    share = ctx.unknown_classes
    part = {
        "competition": {"name": ctx.cfg.competition.name, "root": ctx.cfg.competition.root},
        "folds": config_slice(ctx.cfg.folds),
        "unknown_classes": share,
        "distractor_pool": ctx.cfg.retrieve.penalty.pool,
    }
    threads = ctx.cfg.threads or len(os.sched_getaffinity(0))

    def compute(work: Path) -> dict:
        # The images' size/mtime fingerprint is part of what folds hands on: embed must redo a
        # replaced image even where table.csv, which lists paths, is unchanged.
        (work / "images.fingerprint").write_text(fingerprints["images"] + "\n")
        return make_folds(table, ctx.cfg.folds, work, threads, ctx.progress, share)

    art = _run(ctx, "folds", "", part, {}, fingerprints, compute)
    if ctx.plan is None:
        _report_unreadable(ctx, art)
    return art


def pseudo_rounds(ctx: Context) -> Context:
    """The context of the last pseudo-label round (`ctx` itself without rounds): running its stages
    runs every earlier round's retrieval first, each round cached on its own."""
    current = ctx
    for r in range(1, ctx.cfg.pseudo.rounds + 1):
        current = Context(
            ctx.cfg,
            artifacts=ctx.artifacts,
            submissions=ctx.submissions,
            force=ctx.force,
            progress=ctx.progress,
            plan=ctx.plan,
            round=r,
            previous=current,
        )
    return current


def run_pseudo_folds(ctx: Context) -> cache.Artifact:
    """Round r's folds: round 0's plus round r−1's confident test answers as training rows."""
    from .stages.pseudo import with_pseudo_rows, write_round_folds

    first = ctx
    while first.previous is not None:
        first = first.previous
    base, previous = run_folds(first), run_retrieve(ctx.previous)
    part = {"pseudo": config_slice(ctx.cfg.pseudo), "round": ctx.round, "format": ctx.adapter.name}
    upstream = {"folds": cache.produced(base), "previous_retrieve": cache.produced(previous)}

    def compute(work: Path) -> dict:
        table, folds = load_table(base)
        chosen, figures = _pseudo_answers(ctx, previous)
        result = dict(base.manifest.get("result", {}))
        result["train_data"] = write_round_folds(base.path, work, with_pseudo_rows(folds, table, chosen), chosen)
        result["pseudo"] = figures
        return result

    art = _run(ctx, "folds", "", part, upstream, {}, compute)
    if ctx.plan is None and is_main_process():
        _log_pseudo_round(ctx.round, art.manifest.get("result", {}).get("pseudo", {}))
    return art


def _pseudo_answers(ctx: Context, previous: cache.Artifact) -> tuple[pd.DataFrame, dict]:
    """The previous round's test answers that become training rows, and the figures on them: the
    bar, the precision validation queries reach at it, and where the competition ships its answers
    (the demos) the share of the rows that is right."""
    from .runs import headline
    from .stages.pseudo import bar_source, cosine_bar, precision, select_pseudo, validation_precision

    read = {"dtype": {"id": str, "label": str, "truth": str}, "keep_default_na": False}
    answers = pd.read_csv(previous.file(f"answers-{ctx.adapter.name}.csv"), **read)
    answers["cosine"] = pd.to_numeric(answers["cosine"])
    validation = None
    if previous.file("answers-validation.csv").is_file():
        validation = pd.read_csv(previous.file("answers-validation.csv"), **read)
        validation["cosine"] = pd.to_numeric(validation["cosine"])
    unknown = ctx.adapter.unknown_label
    bar = cosine_bar(ctx.cfg.pseudo, validation, unknown)
    chosen = select_pseudo(answers, unknown, ctx.cfg.pseudo, bar)
    if bar is None:  # top_share: the lowest cosine it took
        bar = float(chosen["cosine"].min()) if len(chosen) else np.inf
    above, right = validation_precision(validation, unknown, bar) if validation is not None else (0, None)
    solution = ctx.root / ctx.adapter.solution_file
    truths = {}
    if solution.is_file():
        frame = ctx.adapter.read_solution(solution)
        truths = dict(zip(frame.iloc[:, 0].astype(str), frame.iloc[:, 1].astype(str), strict=True))
    report = previous.manifest.get("result", {}).get("report") or []
    figures = {
        "rows": len(chosen),
        "of_test_images": len(answers),
        "cosine_bar": bar if np.isfinite(bar) else None,
        "bar_from": bar_source(ctx.cfg.pseudo),
        "validation_above_bar": above,
        "validation_precision": right,
        "precision_against_answers": precision(chosen, truths),
        "previous_round_validation": {k: v for k, v in headline(report).items() if k != "step"},
    }
    return chosen, figures


def _log_pseudo_round(round_: int, info: dict) -> None:
    scored, right, bar = info.get("precision_against_answers"), info.get("validation_precision"), info.get("cosine_bar")
    log.info(
        "[pseudo round %d] %d of %d test images train as their first answer (%s; round %d's validation: %s); "
        "validation queries at that bar: %d, %s right%s",
        round_,
        info.get("rows", 0),
        info.get("of_test_images", 0),
        f"no answer passes pseudo.{info.get('bar_from')}" if bar is None else f"cosine ≥ {bar:.4f}",
        round_ - 1,
        ", ".join(f"{k} {v:.4f}" for k, v in info.get("previous_round_validation", {}).items() if v == v),
        info.get("validation_above_bar", 0),
        "–" if right is None else f"{right:.3f}",
        f"; {scored:.3f} of the rows right by the shipped answers" if scored is not None else "",
    )
    if right is not None and right < 0.5:
        log.warning(
            "[pseudo round %d] most validation answers at this bar are wrong (%.3f right): the rows it adds "
            "likely teach wrong labels; set pseudo.min_precision (e.g. 0.9) or raise pseudo.min_cosine",
            round_,
            right,
        )
    if bar is None and info.get("bar_from") == "min_precision":
        log.warning("[pseudo round %d] no cosine bar reaches pseudo.min_precision on validation: no rows added", round_)


def _report_unreadable(ctx: Context, art: cache.Artifact) -> None:
    """Name the dropped training images (once per run); under train.strict_images stop instead."""
    result = art.manifest.get("result", {})
    if not result.get("unreadable_train"):
        return
    message = (
        f"{result['unreadable_train']} training image(s) cannot be read (all in {art.file('unreadable.csv')}): "
        f"{result['unreadable_train_first'][:10]}"
    )
    strict = [m.name for m in ctx.cfg.members if m.train.strict_images]
    if strict:
        raise UnreadableImageError(f"train.strict_images (members {strict}): {message}")
    if is_main_process():
        log.warning("[folds] dropped from training and the gallery: %s", message)


def load_table(folds_art: cache.Artifact) -> tuple[pd.DataFrame, pd.DataFrame]:
    from .stages.folds import read_folds

    return read_folds(folds_art.file("table.csv"), folds_art.file("folds.csv"))


def _train_inputs(ctx: Context, member: MemberConfig) -> tuple[dict, dict, dict]:
    """(config part, upstream keys, fingerprints) of a member's training."""
    folds = run_folds(ctx)
    # folds.csv and its images; a folds artifact still pending in `plan` stands for itself
    upstream = {"train_data": folds.manifest.get("result", {}).get("train_data", cache.produced(folds))}
    if member.init_from:
        upstream["init"] = _trained_output(ctx, ctx.cfg.member(member.init_from))
    part = {"member": member_slice(member), "seed": ctx.cfg.seed}
    weights = {"pretrained_file": cache.file_fingerprint(member.pretrained_file)} if member.pretrained_file else {}
    if member.train.crops or ctx.cfg.embed.crops:  # what it crops (training, and its validation's embedding)
        weights.update(_box_inputs(ctx))
        part["embed_crops"] = ctx.cfg.embed.crops
    return part, upstream, weights


def _box_inputs(ctx: Context) -> dict:
    """The boxes file's fingerprint and the margin, for the stages that crop."""
    from .competitions.base import InputError

    if not (ctx.root / ctx.cfg.competition.boxes).is_file():
        raise InputError(f"{ctx.root / ctx.cfg.competition.boxes}: competition.boxes file not found")
    return {
        "boxes": cache.file_fingerprint(ctx.root / ctx.cfg.competition.boxes),
        "box_margin": str(ctx.cfg.competition.box_margin),
    }


def _train_key(ctx: Context, member: MemberConfig) -> str:
    part, upstream, weights = _train_inputs(ctx, member)
    return cache.stage_key("train", part, upstream, weights, VERSIONS["train"])


def _trained_output(ctx: Context, member: MemberConfig) -> str:
    """The output digest of the member's trained weights, or a placeholder while it is untrained
    (then whatever starts from it is untrained too)."""
    key = _train_key(ctx, member)
    path = _artifact_path(ctx, "train", member.name, key)
    if not cache.is_complete(path):
        return f"untrained:{key}"
    return cache.produced(cache.Artifact("train", key, path, reused=True, manifest=cache.read_manifest(path)))


def ensure_pretrained(ctx: Context) -> None:
    """timm's hub weights of every member that still has to train, fetched before anything trains."""
    from .models.backbone import fetch_pretrained

    if ctx.pretrained_checked or ctx.plan is not None:
        return
    for i, member in enumerate(ctx.cfg.members):
        trained = cache.is_complete(_artifact_path(ctx, "train", member.name, _train_key(ctx, member)))
        if member.pretrained and not trained:
            fetch_pretrained(member.backbone, member.pretrained_tag, f"{ctx.cfg.source}: members.{i} ({member.name})")
    ctx.pretrained_checked = True


def run_train(ctx: Context, member_name: str) -> cache.Artifact:
    from .models.checkpoint import load_weights
    from .stages.train import train_member

    if f"train/{member_name}" in ctx.done:
        return ctx.done[f"train/{member_name}"]
    if member_name in ctx.trained:  # an offline package's member stands in for training
        path = ctx.trained[member_name]
        manifest = cache.read_manifest(path)
        ctx.done[f"train/{member_name}"] = cache.Artifact("train", manifest["key"], path, True, manifest)
        return ctx.done[f"train/{member_name}"]
    member = ctx.cfg.member(member_name)
    folds_art = run_folds(ctx)
    ensure_pretrained(ctx)
    init_art = run_train(ctx, member.init_from) if member.init_from else None
    part, upstream, weights = _train_inputs(ctx, member)

    def compute(work: Path) -> dict:
        _, folds = load_table(folds_art)
        init_state = load_weights(init_art.file("final.pt")) if init_art else None
        return train_member(ctx.cfg, member, folds, ctx.adapter, work, ctx.device, init_state, ctx.progress)

    def log_curves(art: cache.Artifact) -> None:
        log.info("[train/%s] training curves: %s", member.name, art.file("curves.png"))

    scope = f"round-{ctx.round}/" if ctx.round else ""
    with tracking.scoped(scope):
        flags = {"resumable": True, "all_ranks": True, "on_computed": log_curves}
        art = _run(ctx, "train", member.name, part, upstream, weights, compute, **flags)
        if ctx.plan is None and is_main_process():
            if art.reused:  # computed: its epochs were tracked live
                tracking.replay(member.name, art.file("metrics.csv"))
            tracking.image(f"{scope}train/{member.name}/curves", art.file("curves.png"))
    return art


def run_embed(ctx: Context, member_name: str) -> cache.Artifact:
    from .stages.embed import embed_member

    member = ctx.cfg.member(member_name)
    train_art = run_train(ctx, member_name)
    folds_art = run_folds(ctx)
    part = {"embed": config_slice(ctx.cfg.embed), "image_size": member.image_size, "amp": member.train.amp}

    def compute(work: Path) -> dict:
        table, _ = load_table(folds_art)
        return embed_member(ctx.cfg, member, table, train_art.file("best.pt"), ctx.device, work, ctx.progress)

    upstream = {"train": cache.produced(train_art), "folds": cache.produced(folds_art)}
    boxes = _box_inputs(ctx) if ctx.cfg.embed.crops else {}
    return _run(ctx, "embed", member.name, part, upstream, boxes, compute, all_ranks=True)


def member_embeddings(ctx: Context) -> dict[str, np.ndarray]:
    """Per member, its embeddings: (N, E), or (N, 2, E) with their mirrors (embed.flip_gallery)."""
    from .stages.embed import read_views

    return {m.name: read_views(run_embed(ctx, m.name).path) for m in ctx.cfg.members}


def member_heads(ctx: Context) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per member, (labels, cosines) of its head's best classes for every row of the table."""
    from .stages.embed import read_head_topk

    return {m.name: read_head_topk(run_embed(ctx, m.name).path) for m in ctx.cfg.members}


def query_groups(ctx: Context) -> np.ndarray | None:
    """retrieve.unknown_per: per table row, its group by the members' auxiliary heads on that column."""
    from .stages.embed import read_aux_groups

    column = ctx.cfg.retrieve.unknown_per
    if column is None:
        return None
    groups = read_aux_groups([run_embed(ctx, m.name).path for m in ctx.cfg.members], column)
    if groups is None:  # the config check requires such a member; its checkpoint must hold the head
        raise ConfigError(f"{ctx.cfg.source}: retrieve.unknown_per '{column}': no member's embeddings hold that head")
    table, folds = load_table(run_folds(ctx))
    val = folds[(folds["fold"] == _val_fold(ctx)) & (folds[column].fillna("").astype(str) != "")]
    if len(val):
        from .stages.retrieve import table_rows

        truth = val[column].astype(str).to_numpy()
        right = float(np.mean(groups[table_rows(table, "train", val["id"])] == truth))
        majority = float(pd.Series(truth).value_counts(normalize=True).iloc[0])
        log.info(
            "retrieve.unknown_per: %s by the members' auxiliary heads, right on %.1f%% of validation fold %d's "
            "%d images (the most frequent %s: %.1f%%)",
            column,
            100 * right,
            _val_fold(ctx),
            len(val),
            column,
            100 * majority,
        )
    return groups


def run_ensemble(ctx: Context) -> cache.Artifact:
    from .stages.embed import ensemble_members

    embed_arts = {m.name: run_embed(ctx, m.name) for m in ctx.cfg.members}
    folds_art = run_folds(ctx)
    part = {"ensemble": config_slice(ctx.cfg.ensemble), "members": list(embed_arts)}

    def compute(work: Path) -> dict:
        table, _ = load_table(folds_art)
        files = {name: art.file("embeddings.npy") for name, art in embed_arts.items()}
        return ensemble_members(ctx.cfg, table, files, work)

    upstream = {f"embed/{k}": cache.produced(a) for k, a in embed_arts.items()}
    return _run(ctx, "ensemble", "", part, upstream, {}, compute)


def embeddings_of(art: cache.Artifact) -> np.ndarray:
    """The ensemble's embeddings: (N, E), or (N, 2, E) with their mirrors (embed.flip_gallery)."""
    from .stages.embed import read_views

    return read_views(art.path)


def fold_ensembles(cfg: Config, members: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Per fold the members cover, the ensemble of the members trained without it."""
    from .retrieval.ensemble import concatenate_views

    out = {}
    for fold in sorted({m.fold for m in cfg.members}):
        names = [m.name for m in cfg.members if m.fold == fold]
        weights = [cfg.ensemble.weights.get(n, 1.0) for n in names]
        out[fold] = concatenate_views([members[n] for n in names], weights)
    return out


def _val_fold(ctx: Context) -> int:
    return ctx.cfg.retrieve.val_fold if ctx.cfg.retrieve.val_fold is not None else ctx.cfg.members[0].fold


def local_feature_folder(ctx: Context) -> Path:
    """artifacts/local-features/<feature config key>: shared by the experiments (see stages/verify.py)."""
    from .stages.verify import feature_key

    return ctx.artifacts / "local-features" / feature_key(ctx.cfg.retrieve.verify)


def run_retrieve(ctx: Context) -> cache.Artifact:
    from .retrieval.search import as_views
    from .runs import headline
    from .stages.retrieve import retrieve, save_retrieval_grid, warn_leaky_members, write_retrieval

    if "retrieve" in ctx.done:  # already run (and its report logged) in this process
        return ctx.done["retrieve"]
    ensemble_art = run_ensemble(ctx)
    folds_art = run_folds(ctx)
    val_fold = _val_fold(ctx)
    part = {
        "retrieve": config_slice(ctx.cfg.retrieve),
        "formats": [f.name for f in ctx.formats],
        "val_fold": val_fold,
    }

    def compute(work: Path) -> dict:
        from .stages.pseudo import without_pseudo_rows

        table, folds = load_table(folds_art)
        folds = without_pseudo_rows(folds)  # a round's pseudo rows train; the gallery is the training images
        warn_leaky_members(ctx.cfg.members, val_fold)
        embeddings = embeddings_of(ensemble_art)
        heads = member_heads(ctx) if ctx.cfg.retrieve.voting.head_weight > 0 else None
        members = member_embeddings(ctx)
        groups = query_groups(ctx)
        predictions, report, tuned, answers = retrieve(
            ctx.cfg.retrieve,
            ctx.adapter,
            ctx.formats,
            table,
            folds,
            embeddings,
            members,
            val_fold,
            ctx.progress,
            heads,
            fold_ensembles(ctx.cfg, members),
            local_feature_folder(ctx),
            groups,
        )
        write_retrieval(work, predictions, report, answers)
        save_retrieval_grid(work / "retrievals.png", table, folds, as_views(embeddings)[:, 0], val_fold)
        return {"tuned": tuned, "report": report.to_dict(orient="records")}

    def log_grid(art: cache.Artifact) -> None:
        if art.file("retrievals.png").is_file():
            log.info("[retrieve] validation queries and their neighbours: %s", art.file("retrievals.png"))

    upstream = {"ensemble": cache.produced(ensemble_art), "folds": cache.produced(folds_art)}
    # retrieve also reads each member's embeddings and head classes
    upstream.update({f"embed/{m.name}": cache.produced(run_embed(ctx, m.name)) for m in ctx.cfg.members})
    art = _run(ctx, "retrieve", "", part, upstream, {}, compute, on_computed=log_grid)
    if ctx.plan is not None:
        return art
    try:
        report = pd.read_csv(art.file("report.csv"))
    except pd.errors.EmptyDataError:  # no validation fold
        report = pd.DataFrame()
    if not report.empty and is_main_process():
        log.info("validation, step by step (fold %d):\n%s", val_fold, report.to_string(index=False))
        final = headline(report.to_dict(orient="records"))
        tracking.summary("validation", final, f"```\n{report.to_string(index=False)}\n```")
    if is_main_process():
        tracking.image("retrieve/validation-neighbours", art.file("retrievals.png"))
    return art


def run_submit(ctx: Context) -> cache.Artifact:
    from .stages.submit import submission_name, write_submissions

    retrieve_art = run_retrieve(ctx)
    part = {"experiment": ctx.cfg.experiment, "formats": [f.name for f in ctx.formats]}
    fingerprints = {"sample_submission": cache.file_fingerprint(ctx.root / "sample_submission.csv")}

    def compute(work: Path) -> dict:
        return write_submissions(ctx.formats, ctx.root, ctx.cfg.experiment, retrieve_art.path, work)

    art = _run(ctx, "submit", "", part, {"retrieve": cache.produced(retrieve_art)}, fingerprints, compute)
    if is_main_process() and ctx.plan is None:
        ctx.submissions.mkdir(parents=True, exist_ok=True)
        for fmt in ctx.formats:
            name = submission_name(ctx.cfg.experiment, fmt)
            target = ctx.submissions / name
            shutil.copyfile(art.file(name), target.with_name(name + ".tmp"))
            target.with_name(name + ".tmp").replace(target)
            log.info("[submit] wrote %s", target)
    return art


def run_export(ctx: Context, member_names: list[str] | None = None, out: Path | None = None) -> dict[str, Path]:
    """The members (trained, or reused from the cache) exported as one embedding module (traced on
    the CPU: the file runs on any device)."""
    import torch

    from .models.checkpoint import load_member
    from .stages.export import export_members

    names = member_names or ctx.cfg.export.members or [m.name for m in ctx.cfg.members]
    members = [ctx.cfg.member(name) for name in names]
    cpu = torch.device("cpu")
    models = [load_member(run_train(ctx, m.name).file("best.pt"), m, cpu)[0] for m in members]
    suffix = "" if len(names) == len(ctx.cfg.members) else "-" + "-".join(names)
    out = out or ctx.submissions / f"{ctx.cfg.experiment}{suffix}.pt"
    written = export_members(ctx.cfg, members, models, out, ctx.cfg.export.onnx)
    for kind, path in written.items():
        log.info("[export] %s: %s", kind, path)
    return written


def local_scores(ctx: Context) -> list[dict]:
    """Leaderboard scores of the written submissions where the competition ships its answers (demos)."""
    from .stages.score import score_files
    from .stages.submit import submission_name

    results = []
    for fmt in ctx.formats:
        solution = ctx.root / fmt.solution_file
        submission = ctx.submissions / submission_name(ctx.cfg.experiment, fmt)
        if solution.is_file() and submission.is_file():
            result = score_files(submission, solution)
            result["submission"] = str(submission)
            results.append(result)
    return results


# ------------------------------------------------------------------------------------ checks
def check_members(cfg: Config) -> None:
    """Every member's backbone, augmentations and weights file, before the first one trains:
    a typo in the last member fails now, naming `members.N.key`, not after hours of the first."""
    from .data.transforms import TransformConfigError, build_augmentations
    from .models.backbone import check_backbone

    for i, member in enumerate(cfg.members):
        where = f"{cfg.source}: members.{i} ({member.name})"
        check_backbone(member.backbone, f"{cfg.source}: key 'members.{i}.backbone'")
        try:
            build_augmentations(member.train.augment, member.image_size, f"members.{i}.train.augment")
        except TransformConfigError as exc:
            raise TransformConfigError(f"{cfg.source}: {exc}") from None
        if member.pretrained_file and not Path(member.pretrained_file).is_file():
            raise ConfigError(
                f"{where}: key 'members.{i}.pretrained_file': '{member.pretrained_file}' is not a file "
                "(nothing is downloaded for a local weights file)"
            )


def check_extractor(cfg: Config) -> None:
    """A learned local-feature extractor's weights, loaded (fetched) before anything trains."""
    verify = cfg.retrieve.verify
    if verify.enabled and verify.extractor != "sift":
        from .stages.verify import load_extractor

        load_extractor(verify, f"{cfg.source}: retrieve.verify")


def check_outputs(ctx: Context, stages: list[str]) -> None:
    """Where the run writes a submission: images to predict and a writable folder, checked before
    anything trains (a run without test rows would end in a header-only CSV)."""
    from .competitions.base import InputError

    if "submit" not in stages or not is_main_process():
        return
    if not (ctx.source_table["role"] == "test").any():
        raise InputError(ctx.adapter.no_queries_reason(ctx.root))
    try:
        ctx.submissions.mkdir(parents=True, exist_ok=True)
        probe = ctx.submissions / f".write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(
            f"submissions folder {ctx.submissions}: cannot write there ({exc.strerror or exc}); "
            "the run would end without its CSV"
        ) from None


def run_stage(ctx: Context, stage: str) -> None:
    if stage in ("train", "embed"):
        runner = run_train if stage == "train" else run_embed
        for member in ctx.cfg.members:
            runner(ctx, member.name)
    else:
        {"folds": run_folds, "ensemble": run_ensemble, "retrieve": run_retrieve, "submit": run_submit}[stage](ctx)


def ensure_demo_data(ctx: Context) -> None:
    """The demo competition generated, or a wildlife-datasets dataset downloaded, where missing."""
    from .competitions import wildlife
    from .demo import build_demo

    competition = ctx.cfg.competition
    if competition.download and competition.name != wildlife.Wildlife.name:
        raise ConfigError(f"{ctx.cfg.source}: competition.download: only the wildlife adapter downloads datasets")
    if is_main_process():
        if competition.demo:
            build_demo(competition.demo, ctx.root, competition.demo_params)
        if competition.download and not (ctx.root / wildlife.METADATA).is_file():
            ctx.root.mkdir(parents=True, exist_ok=True)
            log.info("downloading %s through wildlife-datasets into %s", competition.download, ctx.root)
            wildlife.download(competition.download, ctx.root, ctx.cfg.folds.seed)
    barrier()
