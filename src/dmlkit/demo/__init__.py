"""Demo competitions: deterministic generators laid out exactly like the real competitions."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from . import landmarks, whales

log = logging.getLogger(__name__)

GENERATORS = {
    "landmark": (landmarks.LandmarkDemoParams, landmarks.generate),
    "whale": (whales.WhaleDemoParams, whales.generate),
    "happywhale": (whales.HappywhaleDemoParams, whales.generate_happywhale),
}
PARAMS_FILE = "demo_params.json"
STATS_FILE = "demo_stats.json"


def build_demo(kind: str, root: Path, overrides: dict[str, Any] | None = None, force: bool = False) -> dict:
    """Generate demo `kind` into root unless an identical one is there; returns its statistics.

    Written into `<root>.partial` and renamed at the end, so an interrupted build leaves nothing
    that looks complete.
    """
    if kind not in GENERATORS:
        raise KeyError(f"unknown demo '{kind}'; known: {sorted(GENERATORS)}")
    params_cls, generate = GENERATORS[kind]
    fields = {f.name for f in dataclasses.fields(params_cls)}
    unknown = set(overrides or {}) - fields
    if unknown:
        raise KeyError(
            f"competition.demo_params: unknown key(s) {sorted(unknown)} for demo '{kind}'; known: {sorted(fields)}"
        )
    params = params_cls(**(overrides or {}))
    wanted = {"kind": kind, **dataclasses.asdict(params)}
    root = Path(root)
    if (root / PARAMS_FILE).is_file() and not force:
        if json.loads((root / PARAMS_FILE).read_text()) == wanted:
            return json.loads((root / STATS_FILE).read_text())
        log.info("%s: demo parameters changed, regenerating", root)
    elif root.exists() and not (root / PARAMS_FILE).is_file() and any(root.iterdir()):
        raise FileExistsError(f"{root}: exists and is not a generated demo; refusing to overwrite it")
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    stats = generate(partial, params)
    (partial / STATS_FILE).write_text(json.dumps(stats, indent=2))
    (partial / PARAMS_FILE).write_text(json.dumps(wanted, indent=2))
    if root.exists():
        shutil.rmtree(root)
    os.replace(partial, root)
    log.info("%s: generated demo '%s': %s", root, kind, stats)
    return stats
