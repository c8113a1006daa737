"""YAML configs with inheritance and dotted overrides, validated into typed objects.

A config file may name its parent(s) with ``base: other.yaml`` (a path relative to the file, or
a list of them; later ones win). Dicts merge recursively, everything else is replaced. Command
line overrides are ``key.sub=value`` (``members.0.train.epochs=3``), the value parsed as YAML.
Each member of ``members`` is ``member_defaults`` deep-merged with the member's own keys, so a
member only states what differs. Errors name the file, the dotted key and what was expected.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .base import ConfigError
from .schema import Config


def deep_merge(base: Any, override: Any) -> Any:
    """Dicts merge recursively (override wins); anything else is replaced by the override."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def _record_sources(tree: Any, source: str, prefix: str, sources: dict[str, str]) -> None:
    sources[prefix] = source
    if isinstance(tree, dict):
        for key, value in tree.items():
            _record_sources(value, source, f"{prefix}.{key}" if prefix else str(key), sources)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            _record_sources(value, source, f"{prefix}.{i}", sources)


def _read_yaml(path: Path, sources: dict[str, str], seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base' chain: {' -> '.join(str(p) for p in (*seen, path))}")
    if not path.is_file():
        where = f" (named as base by {seen[-1]})" if seen else ""
        raise ConfigError(f"{path}: config file not found{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict = {}
    for base in bases:
        merged = deep_merge(merged, _read_yaml(path.parent / base, sources, (*seen, path)))
    _record_sources(data, str(path), "", sources)
    return deep_merge(merged, data)


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place; list items are addressed by index."""
    if "=" not in assignment:
        raise ConfigError(f"command line: override '{assignment}' is not of the form key.sub=value")
    dotted, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"command line: override '{assignment}': value is not valid YAML: {exc}") from exc
    parts = dotted.strip().split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"command line: override '{dotted}': '{'.'.join(parts[:i])}' is a list of {len(node)} "
                    f"items; '{part}' is not a valid index"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"command line: override '{dotted}': '{'.'.join(parts[:i])}' is not a mapping")


def _format_validation_error(exc: ValidationError, sources: dict[str, str]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        origin = "defaults"
        probe = key
        while probe:
            if probe in sources:
                origin = sources[probe]
                break
            probe = probe.rpartition(".")[0]
        kind = err["type"]
        if kind == "extra_forbidden":
            what = "unknown key (check the spelling; see the schema in dmlkit/config/schema.py)"
        elif kind == "missing":
            what = "required value is missing"
        else:
            what = f"{err['msg']} (got {err.get('input')!r})"
        lines.append(f"{origin}: key '{key or '<top>'}': {what}")
    return "invalid config:\n  " + "\n  ".join(lines)


def config_tree(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The config as one YAML tree: its bases merged and the overrides applied, before validation
    (so that a file holding it loads to the same config, with the same keys set)."""
    tree = _read_yaml(Path(path), {})
    for assignment in overrides:
        apply_override(tree, assignment)
    return tree


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config with its bases, apply overrides, merge member defaults, validate."""
    sources: dict[str, str] = {}
    tree = _read_yaml(Path(path), sources)
    for assignment in overrides:
        apply_override(tree, assignment)
        sources[assignment.split("=", 1)[0].strip()] = "command line"
    defaults = tree.pop("member_defaults", {}) or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{sources.get('member_defaults', path)}: key 'member_defaults' must be a mapping")
    members = tree.get("members")
    if isinstance(members, list):
        merged_members = []
        for i, member in enumerate(members):
            if not isinstance(member, dict):
                raise ConfigError(f"{sources.get(f'members.{i}', path)}: key 'members.{i}' must be a mapping")
            merged_members.append(deep_merge(defaults, member))
            for key in _leaf_keys(defaults):
                sources.setdefault(f"members.{i}.{key}", sources.get(f"member_defaults.{key}", str(path)))
        tree["members"] = merged_members
    tree["source"] = str(Path(path))
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, sources)) from None


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(_leaf_keys(value, dotted))
    return keys
