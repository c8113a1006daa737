"""Progressive sizes (train.stages, #27 item 5): one member continues through growing image sizes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import write_tiny_config
from dmlkit import cli
from dmlkit.config import ConfigError, load_config, member_slice
from dmlkit.pipeline.checks import check_values
from dmlkit.pipeline.context import Context
from dmlkit.stages import train as train_stage_module

STAGES = """
base: tiny-whale.yaml
member_defaults:
  train:
    stages:
      - {image_size: 24, epochs: 1}
      - {image_size: 32, epochs: 2, lr: 1.0e-3}
"""


def staged_config(tmp: Path) -> Path:
    """The tiny whale config with two stages (24 px, then 32 px), as a config on top of it."""
    write_tiny_config(tmp)
    path = tmp / "staged.yaml"
    path.write_text(STAGES)
    return path


def test_stage_members_take_each_stage_size_epochs_and_lr(tmp_path: Path):
    cfg = load_config(staged_config(tmp_path))
    member = cfg.members[0]
    stages = train_stage_module.stage_members(member)
    assert [(m.image_size, m.train.epochs, m.train.lr) for m in stages] == [
        (24, 1, member.train.lr),
        (32, 2, 1.0e-3),
    ]
    assert all(not m.train.stages for m in stages)
    assert "stages" in member_slice(member)["train"]
    plain = load_config(write_tiny_config(tmp_path)).members[0]
    assert "stages" not in member_slice(plain)["train"] and "aux" not in member_slice(plain)["head"]


def test_last_stage_must_train_at_the_embedding_size(tmp_path: Path):
    cfg = load_config(staged_config(tmp_path), ["member_defaults.image_size=48"])
    with pytest.raises(ConfigError, match=r"train\.stages: the last stage trains at 32 px"):
        check_values(Context(cfg))


def test_stages_continue_from_each_other_and_a_crash_resumes_at_its_stage(tmp_path: Path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    config = staged_config(tmp_path)
    real = train_stage_module.train_stage
    calls = []

    def crash_in_stage_two(job, member, work, *args, **kwargs):
        calls.append((member.image_size, work.name))
        if work.name == "stage-2" and len(calls) == 2:
            raise RuntimeError("simulated crash in stage 2")
        return real(job, member, work, *args, **kwargs)

    monkeypatch.setattr(train_stage_module, "train_stage", crash_in_stage_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main(["train", "-c", str(config)])
    capfd.readouterr()
    assert cli.main(["train", "-c", str(config)]) == 0
    log = capfd.readouterr().err
    assert calls == [(24, "stage-1"), (32, "stage-2"), (32, "stage-2")]  # stage 1 trained once
    assert "stage 1 already trained" in log
    assert "initialised model and head from stage 1" in log
    art = next((tmp_path / "artifacts" / "tiny-whale" / "train" / "m0").glob("*/manifest.json")).parent
    history = pd.read_csv(art / "metrics.csv")
    assert history["epoch"].tolist() == [1, 2, 3] and history["stage"].tolist() == [1, 2, 2]
    assert not list(art.glob("stage-*/*.pt"))  # the member's weights are the last stage's, kept once
    best = torch.load(art / "best.pt", weights_only=False)
    assert best["model"]  # loadable weights of the member
    # the embedding runs at the last stage's size
    assert cli.main(["all", "-c", str(config)]) == 0
