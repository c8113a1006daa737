"""The parts of the config a stage's cache key hashes, as plain JSON-able data."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .members import MemberConfig, augment_specs, member_schedule


def member_slice(member: MemberConfig) -> dict:
    """The member's config as its training key hashes it: `head.aux` and `train.stages` only where
    they are set (members trained before those existed keep their keys); train.augment as the
    transforms it names (a preset and its list are one key; train.flip acts through them); refit
    not at all (it trains a second model, keyed apart); neck and train.schedule only where not default."""
    data = config_slice(member)
    data["train"]["augment"] = augment_specs(member.train.augment, member.train.flip)
    data["train"].pop("flip", None)
    data.pop("refit", None)
    if data.get("neck") == "linear_bn_prelu":  # keys of members trained before the option stay
        data.pop("neck")
    data["train"]["schedule"] = member_schedule(member)  # auto as it resolves for this member
    if data["train"]["schedule"] == "cosine":  # the only schedule before the option: those keys stand
        data["train"].pop("schedule")
    if data["head"].get("aux") is None:
        data["head"].pop("aux", None)
    for key in ("stages", "crops"):
        if not data["train"].get(key):
            data["train"].pop(key, None)
    return data


def config_slice(model: BaseModel | list | dict | Any) -> Any:
    """Plain JSON-able data of a config object (for hashing and manifests)."""
    if isinstance(model, BaseModel):
        return model.model_dump(mode="json", by_alias=True)
    if isinstance(model, list):
        return [config_slice(m) for m in model]
    return model
