"""The configuration reference (`docs/configuration.md`), generated from the schema so that it
cannot drift from it: every key with its type, default, allowed values and description, one table
per section. `./run.sh docs` writes it; a test fails when the committed page is not what this gives."""

from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .schema import Config

INTRO = """# Configuration reference

Generated from the schema (`src/dmlkit/config/reference.py`; `./run.sh docs` rewrites it): every
key a config may set, section by section. A config names its base (`base: base.yaml`) and overrides
what it needs; `member_defaults` holds any key of a member (the `members.N.` table) and is merged
into every entry of `members`; `--set KEY=VALUE` overrides one key on the command line. An unknown
key, a value of the wrong type and a value that would have no effect are refused before anything
runs, naming the key. The default is the schema's; where `configs/base.yaml` (which every shipped
config names as its base) sets another, that value follows it.
"""


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    type: str
    default: str
    description: str
    value: Any = None  # the default itself (None where required or a section)


def _nested(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds (directly, in a list, or as an optional), if any."""
    for outer in (annotation, *typing.get_args(annotation)):
        for inner in (outer, *typing.get_args(outer)):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def type_name(annotation: Any) -> str:
    """A reader's name for a field's type: `a` \\| `b` for choices, `or null` for optionals."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, dict):
        return f"{origin.__name__} of {', '.join(type_name(a) for a in args)}" if args else origin.__name__
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value, default=str)}`"


def schema_keys(model: type[BaseModel] = Config, section: str = "") -> Iterator[Key]:
    """Every key of `model`, depth first; a member's keys once, under `members.N`."""
    for name, field in model.model_fields.items():
        key = field.alias or name
        if model is Config and key == "source":
            continue  # set by the loader, never by a config
        nested = _nested(field.annotation)
        if nested is not None:
            inner = f"{section}{key}" + (".N" if typing.get_origin(field.annotation) is list else "")
            yield from schema_keys(nested, inner + ".")
            continue
        required = field.default is PydanticUndefined and field.default_factory is None
        value = None if required else field.get_default(call_default_factory=True)
        name = type_name(field.annotation)
        yield Key(section.rstrip("."), key, name, default_text(field), field.description or "", value)


BASE_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "base.yaml"  # in a checkout, not a wheel


def base_values(path: Path = BASE_CONFIG) -> dict[str, Any]:
    """configs/base.yaml's values by dotted key (`member_defaults.x` as `members.N.x`); none without it."""
    if not path.is_file():
        return {}
    out: dict[str, Any] = {}

    def walk(tree: dict, prefix: str) -> None:
        for name, value in tree.items():
            key = "members.N." + prefix[len("member_defaults.") :] if prefix.startswith("member_defaults.") else prefix
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")
            else:
                out[f"{key}{name}"] = value

    walk(yaml.safe_load(path.read_text()) or {}, "")
    return out


def reference_markdown() -> str:
    """The whole page: the intro, then a table per section in schema order; where configs/base.yaml
    sets a key (what every shipped config inherits), its value beside the schema's default."""
    lines, current = [INTRO], None
    base = base_values()
    for key in schema_keys():
        if key.section != current:
            current = key.section
            title = current or "top level"
            note = " (also under `member_defaults.`)" if current.startswith("members.N") else ""
            lines += ["", f"## `{title}`{note}" if current else f"## {title}", "", "| key | type | default | what |"]
            lines.append("|---|---|---|---|")
        description = key.description.replace("|", "\\|").replace("\n", " ")
        default = key.default
        dotted = f"{key.section}.{key.name}" if key.section else key.name
        if dotted in base and base[dotted] != key.value:  # 1 == 1.0: YAML's int is the schema's float
            default += f"; base.yaml: `{json.dumps(base[dotted])}`"
        lines.append(f"| `{key.name}` | {key.type} | {default} | {description} |")
    return "\n".join(lines) + "\n"


__all__ = ["Key", "reference_markdown", "schema_keys"]


def main(argv: list[str] | None = None) -> int:
    """`python -m dmlkit.config.reference [OUT]`: write the page (default docs/configuration.md)."""
    out = Path((argv if argv is not None else sys.argv[1:] or ["docs/configuration.md"])[0])
    out.write_text(reference_markdown())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
