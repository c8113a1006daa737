"""Runs side by side (`./run.sh runs`) and the artifacts no config needs (`./run.sh clean`).

Every pipeline run that writes a submission leaves `artifacts/<experiment>/runs/<time>-<key>.json`:
the command's config and overrides (its differences from the config file), the members and their
best validation scores, the ensemble's validation score, the local leaderboard, the wall time (and
`compute_s`: what computing every artifact it used took, reused ones included), the
artifacts it used and a copy of its submission under `submissions/runs/<experiment>-<key>.csv`
(`<key>`: the submit artifact's, so two runs with one result share the file; the experiment's CSV
stays the latest).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .competitions.base import submission_name
from .config import load_config
from .pipeline.planning import flatten

RUNS = "runs"


def config_differences(base: dict, resolved: dict) -> list[str]:
    """`key=value` for each resolved value that differs from the config file's own."""
    before, after = flatten(base), flatten(resolved)
    return [
        f"{key}={json.dumps(after.get(key), default=str)}"
        for key in sorted(set(before) | set(after))
        if key != "source" and before.get(key) != after.get(key)
    ]


def headline(report: list[dict]) -> dict:
    """The report's last full step (the submitted pipeline), not its indented per-group rows."""
    rows = [row for row in report if not str(row.get("step", "")).startswith(" ")]
    return rows[-1] if rows else {}


def run_record(ctx, config_path: str, differences: list[str], started: float, scores: list[dict]) -> dict:
    """What one finished run used and scored (from the manifests of its artifacts)."""
    members = []
    for member in ctx.cfg.members:
        art = ctx.done[f"train/{member.name}"]
        best = art.manifest.get("result", {}).get("best", {})
        members.append(
            {"name": member.name, "backbone": member.backbone, "fold": member.fold, "val_score": best.get("score")}
        )
        if member.refit != "off":  # validated by the fold model above; answers the test
            members.append(
                {"name": f"{member.name}-refit", "backbone": member.backbone, "fold": "all", "val_score": None}
            )
    final = headline(ctx.done["retrieve"].manifest.get("result", {}).get("report") or [])
    return {
        "experiment": ctx.cfg.experiment,
        "config": config_path,
        "differences": differences,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "compute_s": round(sum(art.manifest.get("wall_time_s", 0.0) for art in ctx.done.values()), 1),
        "members": members,
        "validation": {"metric": ctx.adapter.metric, **{k: v for k, v in final.items() if k != "step"}},
        "leaderboard": [{k: s[k] for k in ("competition", "metric", "public", "private")} for s in scores],
        "artifacts": {label: str(art.path) for label, art in ctx.done.items()},
        "computed": sorted(label for label, art in ctx.done.items() if not art.reused),
    }


def save_run(ctx, record: dict, submissions: list[Path]) -> Path:
    """The run's record under artifacts/<experiment>/runs/ and its submission(s) kept by key."""
    key = ctx.done["submit"].key[:8]
    kept = []
    for path in submissions:
        target = ctx.submissions / RUNS / f"{path.stem}-{key}{path.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        kept.append(str(target))
    record = {**record, "submissions": kept}
    folder = ctx.artifacts / ctx.cfg.experiment / RUNS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{key}.json"
    tmp = path.with_name(path.name + ".tmp")  # a run killed while recording leaves no half file
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)
    return path


def record_run(ctx, config_path: str, overrides: list[str], started: float, scores: list[dict]) -> Path:
    """Record a finished run (rank 0, after submit): see the module docstring."""
    written = load_config(config_path).model_dump(mode="json") if overrides else {}
    resolved = ctx.cfg.model_dump(mode="json")
    differences = config_differences(written, resolved) if overrides else []
    record = run_record(ctx, config_path, differences, started, scores)
    files = [ctx.submissions / submission_name(ctx.cfg.experiment, fmt) for fmt in ctx.formats]
    return save_run(ctx, record, [f for f in files if f.is_file()])


def read_runs(artifacts: Path) -> list[dict]:
    records = []
    for path in sorted(Path(artifacts).glob(f"*/{RUNS}/*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a run record ({exc}); remove the file") from None
        record["record"] = str(path)
        records.append(record)
    return sorted(records, key=lambda r: r["started_at"])


def _score(value: Any) -> str:
    return "" if value is None else f"{value:.4f}"


def runs_table(records: list[dict]) -> pd.DataFrame:
    """One row per run: what it changed, its members' and ensemble's validation, its leaderboard."""
    rows = []
    for r in records:
        validation = r["validation"]
        metric = validation.get("metric")
        rows.append(
            {
                "started": r["started_at"].replace("T", " "),
                "experiment": r["experiment"],
                "changes": " ".join(r["differences"]) or "(config as written)",
                "members": " ".join(f"{m['name']}:{_score(m['val_score'])}" for m in r["members"]),
                "validation": f"{metric} {_score(validation.get(metric))}" if metric in validation else "",
                "leaderboard": " ".join(
                    f"{s['metric']} {_score(s['public'])}/{_score(s['private'])}" for s in r["leaderboard"]
                ),
                "wall_s": r["wall_s"],
                "compute_s": r.get("compute_s"),
                "submission": " ".join(r.get("submissions", [])),
            }
        )
    return pd.DataFrame(rows)


def _stage_entries(experiment_dir: Path, stages: dict[str, bool]) -> list[Path]:
    """An experiment's artifact directories (complete, partial) and lock files, per stage
    (`stages`: each stage's name → whether it runs per member)."""
    entries = []
    for stage, per_member in stages.items():
        folder = experiment_dir / stage
        if not folder.is_dir():
            continue
        named = per_member  # artifacts/<experiment>/<stage>/<member>/<key>
        for child in folder.iterdir():
            entries.extend(child.iterdir() if named and child.is_dir() and not _is_key_entry(child) else [child])
    return entries


def _is_key_entry(path: Path) -> bool:
    return (path / "manifest.json").is_file() or path.name.endswith((".partial", ".lock"))


def _artifact_of(path: Path) -> Path:
    """The artifact directory a partial directory or a lock file belongs to."""
    return path.with_name(path.name.removesuffix(".partial").removesuffix(".lock"))


def removable(
    artifacts: Path, keep: set[Path], keep_experiments: set[str], stages: dict[str, bool]
) -> dict[Path, list[Path]]:
    """What `clean` removes, per artifact: its directory, partial directory and lock, for every
    artifact under `artifacts` not in `keep`, in experiments not in `keep_experiments`, and the
    local-feature caches not in `keep` (`stages`: each stage's name → whether it runs per member).
    Run records, tracker folders and submissions stay."""
    keep = {p.resolve() for p in keep}
    entries = []
    for experiment in sorted(p for p in Path(artifacts).iterdir() if p.is_dir()):
        if experiment.name == "local-features":
            entries += sorted(experiment.iterdir())
        elif experiment.name not in keep_experiments:
            entries += _stage_entries(experiment, stages)
            for round_dir in sorted(experiment.glob("round-*")):  # pseudo-label rounds
                entries += _stage_entries(round_dir, stages)
    out: dict[Path, list[Path]] = {}
    for path in entries:
        if _artifact_of(path).resolve() not in keep:
            out.setdefault(_artifact_of(path), []).append(path)
    return out


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
