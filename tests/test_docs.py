"""The documentation: the configuration reference is the schema's, every Python example in the README
and the docs runs as written, and the site builds with no broken link (`mkdocs build --strict`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import ROOT
from dmlkit.config import Config, MemberConfig
from dmlkit.config.reference import reference_markdown, schema_keys
from dmlkit.export import export_members
from dmlkit.models.backbone import EmbeddingModel

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks() -> list[tuple[str, int, str]]:
    """(page, line, code) of every ```python block of the README and the docs."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            found.append((page.name, text[: match.start()].count("\n") + 1, match.group(1)))
    return found


def test_the_configuration_page_is_the_schemas():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == reference_markdown(), "docs/configuration.md is stale: run ./run.sh docs"
    keys = list(schema_keys())
    assert len(keys) > 150
    for key in keys:  # every key of the schema, in its section's table
        assert f"| `{key.name}` |" in page and key.description, key
    assert "| `refit` |" in page and "| `matcher` |" in page


@pytest.fixture
def example_files(tmp_path: Path) -> Path:
    """What the examples read: an exported model (a random resnet10t member, as `./run.sh export`
    writes it) and a photo."""
    member = MemberConfig(name="m", backbone="resnet10t", fold=0, image_size=48, embedding_size=32)
    cfg = Config.model_validate(
        {"experiment": "landmark-demo", "competition": {"name": "generic-csv", "root": "x"}, "members": [member]}
    )
    torch.manual_seed(0)
    model = EmbeddingModel("resnet10t", 32, image_size=48)
    export_members(cfg, [member], [model], tmp_path / "submissions" / "landmark-demo.pt")
    cv2.imwrite(str(tmp_path / "photo.jpg"), np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8))
    return tmp_path


@pytest.mark.parametrize(("page", "line", "code"), python_blocks(), ids=lambda v: str(v)[:24])
def test_each_python_example_runs_as_written(page, line, code, example_files):
    done = subprocess.run([sys.executable, "-c", code], cwd=example_files, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{page}:{line}: the example fails:\n{done.stderr[-3000:]}"


def test_there_are_examples_of_each_library_use():
    code = "\n".join(block for _, _, block in python_blocks())
    for use in ("create_head", "k_reciprocal_rerank", "query_expansion", "map_at_5", "InferenceSession"):
        assert use in code, use


def test_the_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is a test requirement (requirements-test.txt): ./run.sh test installs it"
    done = subprocess.run(
        [mkdocs, "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()
