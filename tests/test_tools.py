"""The tools around the stages: tracking (the default tracker offline, read back), the runs table
with each run's submission kept, and `clean`."""

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from conftest import write_tiny_config
from dmlkit.commands import cmd_clean, run_pipeline
from dmlkit.config import load_config
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.pipeline.table import STAGE_NAMES as STAGES
from dmlkit.runs import config_differences, read_runs, runs_table


def tracked_run(cfg: Path, tmp_path: Path, overrides=()) -> tuple[Context, list[dict]]:
    ctx = Context(
        load_config(cfg, list(overrides)),
        artifacts=tmp_path / "artifacts",
        submissions=tmp_path / "submissions",
        progress=False,
    )
    ensure_demo_data(ctx)
    return ctx, run_pipeline(ctx, list(STAGES), str(cfg), list(overrides))


def read_events(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    texts = {
        tag.removesuffix("/text_summary"): events.Tensors(tag)[0].tensor_proto.string_val[0].decode()
        for tag in events.Tags()["tensors"]
    }
    return scalars, texts


def test_default_tracker_logs_config_curves_report_and_leaderboard_offline(tmp_path):
    cfg = write_tiny_config(tmp_path, "whale")
    ctx, scores = tracked_run(cfg, tmp_path)
    assert ctx.cfg.tracking == "tensorboard"
    (first,) = sorted((tmp_path / "artifacts" / "tiny-whale" / "tensorboard").iterdir())
    scalars, texts = read_events(first)
    metrics = pd.read_csv(ctx.done["train/m0"].file("metrics.csv"))
    assert scalars["train/m0/loss"] == [(i + 1, pytest.approx(v, rel=1e-6)) for i, v in enumerate(metrics["loss"])]
    validated = metrics.dropna(subset=["val_score"])
    assert [v for _, v in scalars["val/m0/score"]] == pytest.approx(validated["val_score"].tolist(), rel=1e-6)
    report = pd.read_csv(ctx.done["retrieve"].file("report.csv"))
    submitted = report[~report["step"].str.startswith(" ")].iloc[-1]  # not the per-group rows under it
    assert submitted["step"].startswith("+ new_whale threshold")
    assert submitted["open_set"] == pytest.approx((submitted["baks"] * submitted["baus"]) ** 0.5)  # beside MAP@5
    assert scalars["validation/map@5"][0][1] == pytest.approx(submitted["map@5"], rel=1e-6)
    (score,) = scores
    assert scalars["leaderboard/humpback-2019/public"][0][1] == pytest.approx(score["public"], rel=1e-6)
    assert json.loads(texts["config"].strip("`\n"))["experiment"] == "tiny-whale"
    assert submitted["step"] in texts["validation"]

    tracked_run(cfg, tmp_path)  # everything reused: the new tracker run still holds the curves
    runs = sorted((tmp_path / "artifacts" / "tiny-whale" / "tensorboard").iterdir())
    assert len(runs) == 2
    replayed, _ = read_events(runs[1])
    assert replayed["train/m0/loss"] == scalars["train/m0/loss"]


def test_config_differences_are_the_overridden_values():
    base = {"seed": 1, "retrieve": {"voting": {"k": 10, "power": 3.0}}, "source": "a.yaml"}
    resolved = {"seed": 1, "retrieve": {"voting": {"k": 3, "power": 3.0}}, "source": "b.yaml"}
    assert config_differences(base, resolved) == ["retrieve.voting.k=3"]


def test_runs_table_keeps_each_runs_submission_and_clean_removes_what_nothing_uses(tmp_path, capsys):
    cfg = write_tiny_config(tmp_path, "whale", extra="tracking: none\n")
    subs = tmp_path / "submissions"
    first, first_scores = tracked_run(cfg, tmp_path)
    first_csv = (subs / "tiny-whale.csv").read_bytes()
    second, second_scores = tracked_run(cfg, tmp_path, ["retrieve.voting.k=3"])
    records = read_runs(tmp_path / "artifacts")
    table = runs_table(records)
    assert table["changes"].tolist() == ["(config as written)", "retrieve.voting.k=3"]
    for record, scores in zip(records, (first_scores, second_scores), strict=True):
        assert record["leaderboard"][0]["public"] == scores[0]["public"]
    kept = [Path(r["submissions"][0]) for r in records]
    assert kept[0].read_bytes() == first_csv  # the first run's file, though the second overwrote the CSV
    assert kept[1].read_bytes() == (subs / "tiny-whale.csv").read_bytes() and kept[0] != kept[1]
    best = first.done["train/m0"].manifest["result"]["best"]["score"]
    assert table["members"].iloc[0] == f"m0:{best:.4f}"

    def clean(*flags: str) -> str:
        args = SimpleNamespace(
            artifacts=str(tmp_path / "artifacts"),
            configs=[str(cfg)],
            keep_current="--keep-current" in flags,
            dry_run="--dry-run" in flags,
        )
        assert cmd_clean(args) == 0
        return capsys.readouterr().out

    second_only = {second.done["retrieve"].path, second.done["submit"].path}
    assert "0 artifact(s)" in clean()  # both recorded runs' artifacts are kept
    dry = clean("--keep-current", "--dry-run")
    assert "2 artifact(s), would free" in dry and all(p.exists() for p in second_only)
    assert "2 artifact(s), freed" in clean("--keep-current")
    assert not any(p.exists() for p in second_only)
    assert all(art.path.exists() for art in first.done.values())  # the current config's artifacts


def test_a_rounds_curves_get_their_own_tags_and_a_broken_run_record_is_named(tmp_path):
    from dmlkit import tracking

    tracking.start("tensorboard", tmp_path, "exp", {"experiment": "exp"})
    tracking.epoch("m0", {"loss": 2.0}, 1)
    with tracking.scoped("round-1/"):
        tracking.epoch("m0", {"loss": 1.0, "val_score": 0.5}, 1)
    tracking.finish()
    (folder,) = (tmp_path / "exp" / "tensorboard").iterdir()
    scalars, _ = read_events(folder)
    assert scalars["train/m0/loss"] == [(1, 2.0)]
    assert scalars["round-1/train/m0/loss"] == [(1, 1.0)] and scalars["round-1/val/m0/score"] == [(1, 0.5)]

    (tmp_path / "exp" / "runs").mkdir()
    (tmp_path / "exp" / "runs" / "x.json").write_text("{half")
    with pytest.raises(ValueError, match=r"x\.json: not a run record"):
        read_runs(tmp_path)
