"""What every part of the config schema shares: the strict base model, the loading error and the
rule for names that become paths."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def plain_name(value: str, names: str) -> str:
    """A name that becomes one path component (``names`` says which files it names)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        raise ValueError(f"'{value}' is not a plain name (letters, digits, '.', '_', '-'): it names {names}")
    return value
