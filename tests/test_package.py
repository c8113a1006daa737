"""`./run.sh package`: in a fresh virtual environment that holds only what a Kaggle image holds
(the libraries, not this project) plus the package's wheels, with the network refused, predict.py
writes the pipeline's submission byte for byte."""

import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import write_tiny_config
from dmlkit.config import config_tree, load_config
from dmlkit.offline import write_package
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.pipeline.table import STAGE_NAMES as STAGES
from dmlkit.pipeline.table import run_stage

NO_NETWORK = """import socket

def _refuse(*args, **kwargs):
    raise OSError("the network is refused in this environment")

socket.socket.connect = _refuse
socket.create_connection = _refuse
"""


def kaggle_like_venv(folder: Path) -> Path:
    """A new venv that sees this environment's libraries as an image's preinstalled ones (a path
    line, so their .pth files, this project's editable install among them, are not run) and
    refuses the network."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "image.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (Path(site) / "sitecustomize.py").write_text(NO_NETWORK)
    return python


def test_package_predicts_the_pipelines_submission_offline_in_a_fresh_environment(tmp_path):
    cfg = write_tiny_config(tmp_path, "whale")
    ctx = Context(load_config(cfg), artifacts=tmp_path / "a", submissions=tmp_path / "sub", progress=False)
    ensure_demo_data(ctx)
    for stage in STAGES:
        run_stage(ctx, stage)
    expected = (tmp_path / "sub" / "tiny-whale.csv").read_bytes()
    info = write_package(ctx, config_tree(cfg, []), tmp_path / "pkg", wheels=())
    assert [w.split("-")[0] for w in info["wheels"]] == ["dmlkit"]

    python = kaggle_like_venv(tmp_path / "venv")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    probe = [python, "-c", "import dmlkit"]
    assert subprocess.run(probe, capture_output=True, env=env, cwd=tmp_path).returncode != 0  # not installed yet
    command = [python, str(tmp_path / "pkg" / "predict.py"), "--install", "--input", str(ctx.root), "--out"]
    run = subprocess.run([*command, str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    where = [python, "-c", "import dmlkit; print(dmlkit.__file__)"]
    where = subprocess.run(where, capture_output=True, text=True, env=env)
    assert where.stdout.startswith(str(tmp_path / "venv"))  # the wheel's copy, not the checkout
    assert (tmp_path / "out" / "submission.csv").read_bytes() == expected
    assert (tmp_path / "out" / "tiny-whale.csv").read_bytes() == expected
    assert not (tmp_path / "out" / "dmlkit-artifacts" / "tiny-whale" / "train").exists()  # nothing trains there
