"""Both notebooks execute headless on a (tiny) demo run, reading artifacts through the package."""

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, write_tiny_config
from dmlkit.config import load_config
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.pipeline.table import STAGE_NAMES as STAGES
from dmlkit.pipeline.table import run_stage


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nb")
    cfg = write_tiny_config(tmp, "whale")
    ctx = Context(load_config(cfg), artifacts=tmp / "artifacts", submissions=tmp / "submissions", progress=False)
    ensure_demo_data(ctx)
    for stage in STAGES:
        run_stage(ctx, stage)
    return cfg, tmp / "artifacts", ctx


@pytest.mark.parametrize("name", ["01_eda.ipynb", "02_validation_analysis.ipynb"])
def test_notebook_executes(demo_run, name, monkeypatch):
    cfg, artifacts, _ = demo_run
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "stored with outputs"
    monkeypatch.setenv("DMLKIT_CONFIG", str(cfg))
    monkeypatch.setenv("DMLKIT_ARTIFACTS", str(artifacts))
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_retrieve_stage_saves_a_retrieval_grid(demo_run):
    """6 queries × (query + 5 neighbours), each neighbour framed green (right) or red (wrong)."""
    import cv2
    import numpy as np

    *_, ctx = demo_run
    image = cv2.imread(str(ctx.done["retrieve"].path / "retrievals.png"))[..., ::-1]
    height, width = image.shape[:2]
    assert abs(width / height - (1.6 * 6) / (1.7 * 6)) < 0.05
    green = np.all(np.abs(image.astype(int) - (44, 160, 44)) <= 8, axis=-1).sum()
    red = np.all(np.abs(image.astype(int) - (214, 39, 40)) <= 8, axis=-1).sum()
    assert green + red > 30 * 4 * 6  # frames around the 30 neighbour cells (3 px wide at least)
