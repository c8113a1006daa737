"""`./run.sh plan`: the stages it says would recompute are those a run recomputes, with the key part
that changed named; planning writes nothing."""

from pathlib import Path

from conftest import write_tiny_config
from dmlkit.config import load_config
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.pipeline.planning import key_changes
from dmlkit.pipeline.table import STAGE_NAMES as STAGES
from dmlkit.pipeline.table import run_stage


def context(cfg: Path, tmp_path: Path, overrides=(), force=()) -> Context:
    return Context(
        load_config(cfg, list(overrides)),
        artifacts=tmp_path / "artifacts",
        submissions=tmp_path / "submissions",
        force=set(force),
        progress=False,
    )


def plan(cfg: Path, tmp_path: Path, overrides=(), force=()) -> dict[str, dict]:
    ctx = context(cfg, tmp_path, overrides, force)
    ctx.plan = []
    for stage in STAGES:
        run_stage(ctx, stage)
    return {row["stage"]: row for row in ctx.plan}


def run(cfg: Path, tmp_path: Path, overrides=()) -> set[str]:
    """The labels a run computed (not reused)."""
    ctx = context(cfg, tmp_path, overrides)
    ensure_demo_data(ctx)
    for stage in STAGES:
        run_stage(ctx, stage)
    return {label for label, art in ctx.done.items() if not art.reused}


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_key_changes_name_the_changed_value_the_upstream_and_the_input():
    old = {"config": {"member": {"train": {"lr": 0.001, "epochs": 2}}}, "upstream": {"folds": "a1"}, "inputs": {}}
    new = {
        "config": {"member": {"train": {"lr": 0.002, "epochs": 2}, "fold": 1}},
        "upstream": {"folds": "pending:folds"},
        "inputs": {"pretrained_file": "f00d"},
    }
    assert key_changes(old, new) == [
        "config.member.fold: (unset) → 1",
        "config.member.train.lr: 0.001 → 0.002",
        "upstream folds recomputes",
        "input pretrained_file changed",
    ]
    assert key_changes(old, old) == []
    assert key_changes({"upstream": {"train": "x"}}, {"upstream": {"train": "y"}}) == [
        "upstream train produced other files"
    ]


def test_plan_predicts_what_a_run_recomputes_and_says_why(tmp_path):
    cfg = write_tiny_config(tmp_path, "whale")
    ensure_demo_data(context(cfg, tmp_path))
    first = plan(cfg, tmp_path)
    assert {row["action"] for row in first.values()} == {"recompute"}
    assert first["folds"]["reason"] == "never computed"
    assert not (tmp_path / "artifacts").exists()  # planning wrote nothing
    assert run(cfg, tmp_path) == set(first)

    before = listing(tmp_path / "artifacts")
    unchanged = plan(cfg, tmp_path)
    assert {row["action"] for row in unchanged.values()} == {"reuse"}
    assert listing(tmp_path / "artifacts") == before

    overrides = ["retrieve.voting.k=3"]
    voting = plan(cfg, tmp_path, overrides)
    assert {s for s, row in voting.items() if row["action"] == "recompute"} == {"retrieve", "submit"}
    assert voting["retrieve"]["reason"].startswith("config.retrieve.voting.k: 5 → 3 (vs ")
    assert voting["submit"]["reason"].startswith("upstream retrieve recomputes")
    assert run(cfg, tmp_path, overrides) == {"retrieve", "submit"}

    overrides = ["members.0.train.epochs=1"]
    retrain = plan(cfg, tmp_path, overrides)
    predicted = {s for s, row in retrain.items() if row["action"] == "recompute"}
    assert predicted == {"train/m0", "embed/m0", "ensemble", "retrieve", "submit"}
    assert retrain["train/m0"]["reason"].startswith("config.member.train.epochs: 2 → 1")
    assert retrain["embed/m0"]["reason"].startswith("upstream train/m0 recomputes")
    assert run(cfg, tmp_path, overrides) == predicted

    forced = plan(cfg, tmp_path, force=["embed"])
    assert forced["embed/m0"] == {**forced["embed/m0"], "action": "recompute", "reason": "forced (--force)"}
    assert forced["train/m0"]["action"] == "reuse"
