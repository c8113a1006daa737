"""`./run.sh plan`: which stages a config would reuse or recompute, and why — read from the
manifests of the artifacts already on disk, nothing computed.

A stage recomputes when no complete artifact has its key. The reason is found by comparing what
the key hashes (config slice, upstream outputs, input fingerprints) with the same fields of the
newest complete artifact of that stage in the experiment's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import cache

MAX_CHANGES = 4


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys (lists stay whole values)."""
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def key_changes(old: dict, new: dict) -> list[str]:
    """What differs between two manifests' key parts, as readable lines: a changed config value
    (`config member.train.lr: 0.001 → 0.002`), an upstream stage that recomputes or produced other
    files, a changed input file."""
    changes = []
    for part in ("config", "upstream", "inputs"):
        before, after = (flatten(m[part], part) if m.get(part) else {} for m in (old, new))
        for name in sorted(set(before) | set(after)):
            if before.get(name) == after.get(name):
                continue
            value = after.get(name)
            if part == "upstream" and isinstance(value, str) and value.startswith("pending:"):
                changes.append(f"upstream {value.removeprefix('pending:')} recomputes")
            elif part == "upstream":
                changes.append(f"upstream {name.removeprefix('upstream.')} produced other files")
            elif part == "inputs":
                changes.append(f"input {name.removeprefix('inputs.')} changed")
            else:
                shown = "(unset)" if name not in before else _show(before[name])
                changes.append(f"{name}: {shown} → {'(unset)' if name not in after else _show(value)}")
    return changes


def latest_complete(folder: Path, exclude: str) -> Path | None:
    """The most recently finished complete artifact in a stage folder, other than `exclude`."""
    done = [p for p in folder.glob("*") if p.is_dir() and p.name != exclude and cache.is_complete(p)]
    return max(done, key=lambda p: (p / cache.MANIFEST).stat().st_mtime, default=None)


def recompute_reason(final: Path, new: dict) -> str:
    partial = final.with_name(final.name + ".partial")
    resumes = " (resumes its interrupted run)" if (partial / "last.pt").is_file() else ""
    previous = latest_complete(final.parent, final.name)
    if previous is None:
        return "never computed" + resumes
    old = cache.read_manifest(previous)
    if old.get("version") is not None and old.get("version") != new.get("version"):
        return f"stage code changed (version {old['version']} → {new['version']})" + resumes
    changes = key_changes(old, new)
    if not changes:
        return f"stage code changed since {previous.name}" + resumes
    more = f"; and {len(changes) - MAX_CHANGES} more" if len(changes) > MAX_CHANGES else ""
    return "; ".join(changes[:MAX_CHANGES]) + more + f" (vs {previous.name})" + resumes


def format_plan(plan: list[dict]) -> str:
    width = max(len(row["stage"]) for row in plan)
    lines = []
    for row in plan:
        detail = row["path"] if row["action"] == "reuse" else row["reason"]
        lines.append(f"  {row['stage']:<{width}}  {row['action']:<9}  {detail}")
    recomputed = sum(row["action"] == "recompute" for row in plan)
    lines.append(f"{recomputed} of {len(plan)} artifact(s) would be computed")
    return "\n".join(lines)


def planned(
    plan: list[dict], stage: str, shown: str, label: str, final: Path, forced: bool, new: dict
) -> cache.Artifact:
    """Plan mode: the artifact the executor would reuse, or a pending one whose output downstream
    keys hash as `pending:<label>`; the decision and its reason go to `plan` (`new`: what the key
    hashes, as a manifest holds it)."""
    key = final.name
    if cache.is_complete(final) and not forced:
        plan.append({"stage": shown, "action": "reuse", "path": str(final), "reason": ""})
        return cache.Artifact(stage, key, final, reused=True, manifest=cache.read_manifest(final))
    reason = "forced (--force)" if forced else recompute_reason(final, new)
    plan.append({"stage": shown, "action": "recompute", "path": str(final), "reason": reason})
    return cache.Artifact(stage, key, final, reused=False, manifest={"output": f"pending:{label}"})
