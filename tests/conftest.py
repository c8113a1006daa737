"""Shared fixtures: tiny demo competitions and a fast config for end-to-end tests."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY_LANDMARK = {"n_classes": 12, "head_size": 10, "index_distractors": 10, "image_size": 48, "scene_size": 128}
TINY_WHALE = {"n_individuals": 20, "new_whale_train": 6, "image_size": 48}


@pytest.fixture(autouse=True)
def _cli_leaves_no_trace():
    """A test that calls `cli.main` in-process gets its environment and log handlers back: main sets
    MPLBACKEND=Agg (a later notebook kernel would draw no inline PNGs) and points the root logger at
    the test's captured stderr (closed once the test ends)."""
    import logging

    backend = os.environ.get("MPLBACKEND")
    handlers = list(logging.getLogger().handlers)
    yield
    if backend is None:
        os.environ.pop("MPLBACKEND", None)
    else:
        os.environ["MPLBACKEND"] = backend
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)


def free_port() -> int:
    """A free local TCP port for a gloo process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_tiny_config(tmp: Path, kind: str = "whale", extra: str = "", demo_params: dict | None = None) -> Path:
    """A config over a tiny generated demo with a 0.4M-parameter backbone: seconds per stage. It trains
    unaugmented (train.augment: none), so that the tests of other features do not hang on the preset's draws."""
    name, params = ("humpback-2019", TINY_WHALE) if kind == "whale" else ("landmark-recognition-2020", TINY_LANDMARK)
    params = {**params, **(demo_params or {})}
    extra_formats = "[landmark-retrieval]" if kind == "landmark" else "[]"
    text = textwrap.dedent(f"""
        experiment: tiny-{kind}
        seed: 3
        threads: 2
        competition:
          name: {name}
          root: {tmp / ("input-" + kind)}
          demo: {kind}
          demo_params: {params}
          extra_formats: {extra_formats}
        folds: {{n_splits: 3}}
        member_defaults:
          image_size: 32
          embedding_size: 32
          head: {{subcenters: 2, scale: 16.0, dynamic: glr3}}
          train: {{epochs: 2, batch_size: 16, lr: 2.0e-3, amp: "off", augment: none}}
        members:
          - {{name: m0, backbone: test_resnet, fold: 0}}
        embed: {{batch_size: 64}}
        retrieve: {{k: 20}}
    """) + textwrap.dedent(extra)
    path = tmp / f"tiny-{kind}.yaml"
    path.write_text(text)
    return path


def run_all_stages(cfg_path: Path, tmp_path: Path, overrides: list[str]):
    """Every stage of a config in-process, artifacts and submissions under tmp_path; the Context."""
    from dmlkit.config import load_config
    from dmlkit.pipeline.context import Context, ensure_demo_data
    from dmlkit.pipeline.table import STAGE_NAMES, run_stage

    cfg = load_config(cfg_path, overrides)
    ctx = Context(cfg, artifacts=tmp_path / "artifacts", submissions=tmp_path / "submissions", progress=False)
    ensure_demo_data(ctx)
    for stage in STAGE_NAMES:
        run_stage(ctx, stage)
    return ctx


@pytest.fixture
def tiny_whale_config(tmp_path: Path) -> Path:
    return write_tiny_config(tmp_path, "whale")


@pytest.fixture
def tiny_landmark_config(tmp_path: Path) -> Path:
    return write_tiny_config(tmp_path, "landmark")


def with_command(parser, func):
    """The CLI's parser with every command running `func` (to make a command fail on purpose)."""
    parser.set_defaults(func=func)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(func=func)
    return parser


# --------------------------------------------------------------------------- local-feature test images
H = np.array([[0.92, 0.12, 18.0], [-0.06, 1.05, 9.0], [1.2e-4, -0.8e-4, 1.0]])


def textured(seed: int, size: int = 320) -> np.ndarray:
    """A grey picture with detail at several scales (blobs and edges SIFT can find)."""
    rng = np.random.default_rng(seed)
    field = np.zeros((size, size), np.float32)
    for cell in (3, 8, 20):
        coarse = rng.standard_normal((size // cell + 1, size // cell + 1)).astype(np.float32)
        field += cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(128 + 40 * field, 0, 255).astype(np.uint8)


def warped(image: np.ndarray) -> np.ndarray:
    return cv2.warpPerspective(image, H, image.shape[::-1], borderMode=cv2.BORDER_REFLECT101)


@pytest.fixture
def image_files(tmp_path):
    base = textured(5)
    paths = {
        "query": tmp_path / "query.png",
        "same": tmp_path / "same.png",
        "other": tmp_path / "other.png",
        "blank": tmp_path / "blank.png",
        "corrupt": tmp_path / "corrupt.jpg",
    }
    cv2.imwrite(str(paths["query"]), base)
    cv2.imwrite(str(paths["same"]), warped(base))
    cv2.imwrite(str(paths["other"]), textured(6))
    cv2.imwrite(str(paths["blank"]), np.full((200, 200), 90, np.uint8))
    paths["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return {k: str(v) for k, v in paths.items()}
