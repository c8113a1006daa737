"""Training: resume after SIGKILL gives the same weights; two gloo processes match one process."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, write_tiny_config
from dmlkit.config import load_config
from dmlkit.pipeline import Context, ensure_demo_data
from dmlkit.stages.train import lr_factor


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train_cmd(cfg: Path, artifacts: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dmlkit",
        "train",
        "-c",
        str(cfg),
        *overrides,
        "--artifacts",
        str(artifacts),
        "--no-progress",
    ]


def _final_weights(artifacts: Path) -> dict:
    (path,) = artifacts.glob("*/train/m0/*/final.pt")
    return torch.load(path, map_location="cpu", weights_only=False)


def _prepare(tmp_path: Path, extra: str = "") -> Path:
    cfg = write_tiny_config(tmp_path, "whale", extra)
    ensure_demo_data(Context(load_config(cfg)))
    return cfg


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10) == pytest.approx(0.01)


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    cfg = _prepare(tmp_path)
    overrides = ("members.0.train.epochs=6", "members.0.train.validate_every=3")
    reference = subprocess.run(
        _train_cmd(cfg, tmp_path / "ref", *overrides), env=_env(), capture_output=True, text=True, cwd=tmp_path
    )
    assert reference.returncode == 0, reference.stderr[-2000:]

    artifacts = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(cfg, artifacts, *overrides),
        env=_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list(artifacts.glob("*/train/m0/*.partial/last.pt")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(artifacts.glob("*/train/m0/*.partial/last.pt")), "no checkpoint appeared before the kill"
    assert not list(artifacts.glob("*/train/m0/*/manifest.json")), "training finished before it was killed"

    resumed = subprocess.run(
        _train_cmd(cfg, artifacts, *overrides), env=_env(), capture_output=True, text=True, cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch" in resumed.stderr
    a, b = _final_weights(tmp_path / "ref"), _final_weights(artifacts)
    for part in ("model", "head"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key} differs after resume"


def test_two_gloo_processes_match_one_process(tmp_path):
    cfg = _prepare(tmp_path, "")
    overrides = (
        "members.0.train.freeze_bn=true",
        "members.0.train.augment=[]",
        "members.0.train.epochs=2",
        "members.0.train.batch_size=16",
        "members.0.train.optimizer=sgd",  # Adam's normalised steps amplify float-order noise in ~0 gradients
    )
    single = subprocess.run(
        _train_cmd(cfg, tmp_path / "one", *overrides), env=_env(), capture_output=True, text=True, cwd=tmp_path
    )
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [
        torchrun,
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "dmlkit",
        *_train_cmd(cfg, tmp_path / "two", *overrides)[3:],
    ]
    double = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    a, b = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    worst = max((a[p][k].float() - b[p][k].float()).abs().max().item() for p in ("model", "head") for k in a[p])
    assert worst < 1e-4, f"largest weight difference between 1 and 2 processes: {worst}"
