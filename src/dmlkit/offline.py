"""The offline package for code competitions (GLR2020/2021 recognition, GUIE, Happywhale notebooks):
`./run.sh package -c CONFIG --out DIR` writes what the competition's notebook needs, uploaded as a
Kaggle dataset, and `predict.py` in it writes the submission there without the network.

The package holds the trained members (their `best.pt` and manifest), the config as the run
resolved it (bases and overrides merged, the demo generator dropped), the project's wheel and the
pinned wheels of the libraries named (those a Kaggle image lacks or holds in another version), and
`predict.py` + `predict.ipynb`. Predicting runs this pipeline's own stages — folds, embed, ensemble,
retrieve, submit — over the competition's input folder with the packaged members standing in for
training, so the submission is the one `./run.sh all` writes from the same images.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

from .competitions.base import submission_name
from .config import load_config
from .errors import PackageError
from .pipeline.checks import check_outputs, check_values
from .pipeline.context import Context
from .pipeline.table import STAGE_NAMES, run_stage
from .runtime import seed_everything, set_threads, setup_logging
from .stages.train import refit_name, run_refit, run_train

DEFAULT_WHEELS = ("faiss-gpu", "timm", "albumentations", "albucore")
MEMBER_FILES = ("best.pt", "manifest.json", "metrics.csv")

PREDICT = '''"""Offline inference from this package (written by `./run.sh package`).

    python predict.py --input /kaggle/input/<competition> --out /kaggle/working [--install]

--install first installs the package's wheels (no index, no dependencies resolved: nothing is
downloaded). The submission is written to OUT/submission.csv (and OUT/<experiment>.csv).
"""

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def install() -> None:
    wheels = sorted(str(p) for p in (HERE / "wheels").glob("*.whl"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--force-reinstall"]
    subprocess.check_call([*command, *wheels])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", required=True, help="the competition's input folder")
    parser.add_argument("--out", default=".", help="where the submission and the work files go")
    parser.add_argument("--install", action="store_true", help="install the package's wheels first")
    args = parser.parse_args()
    if args.install:
        install()
    from dmlkit.offline import predict

    for path in predict(HERE, Path(args.input), Path(args.out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
'''


def _notebook(package_name: str) -> dict:
    source = (
        f"# the package uploaded as a dataset named {package_name}; nothing here uses the network\n"
        f"!python /kaggle/input/{package_name}/predict.py --install "
        "--input /kaggle/input/<competition> --out /kaggle/working"
    )
    cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}
    return {
        "cells": [cell],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def project_root() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise PackageError(f"{root}: no pyproject.toml: packaging needs the project's source checkout")
    return root


def build_wheels(out: Path, names: tuple[str, ...]) -> list[Path]:
    """The project's wheel (built here, offline) and the installed versions of `names` (downloaded
    once, as binary wheels without dependencies) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    root = project_root()
    leftover = not (root / "build").exists()  # setuptools' build/ folder, removed when it made one
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(root)], check=True)
    if leftover:
        shutil.rmtree(root / "build", ignore_errors=True)
    for name in names:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise PackageError(f"package: '{name}' is not installed here, so its pinned version is unknown") from None
        command = [*pip, "download", "--no-deps", "--only-binary=:all:", "-d", str(out), f"{name}=={version}"]
        if subprocess.run(command).returncode != 0:
            raise PackageError(f"package: cannot download the wheel of {name}=={version} (offline?)")
    return sorted(out.glob("*.whl"))


def write_package(ctx, tree: dict, out: Path, wheels: tuple[str, ...]) -> dict:
    """The package for the trained members of `ctx` (trained now where not cached) into `out`."""
    if ctx.cfg.pseudo.rounds:
        raise PackageError(
            "package: pseudo.rounds trains on the test images it predicts; a code competition's hidden test "
            "is not there to train on: package with pseudo.rounds=0"
        )
    out.mkdir(parents=True, exist_ok=True)
    members = {}
    for member in ctx.cfg.members:
        arts = {member.name: run_train(ctx, member.name)}
        if member.refit != "off":  # the refit model answers the test; the fold model still calibrates
            arts[refit_name(member.name)] = run_refit(ctx, member.name)
        for name, art in arts.items():
            folder = out / "members" / name
            folder.mkdir(parents=True, exist_ok=True)
            for file in MEMBER_FILES:
                if art.file(file).is_file():
                    shutil.copyfile(art.file(file), folder / file)
            members[name] = art.key
    tree = json.loads(json.dumps(tree))
    for key in ("demo", "demo_params"):
        tree.get("competition", {}).pop(key, None)
    (out / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    files = build_wheels(out / "wheels", wheels)
    (out / "predict.py").write_text(PREDICT)
    (out / "predict.ipynb").write_text(json.dumps(_notebook(out.name), indent=1))
    info = {"experiment": ctx.cfg.experiment, "members": members, "wheels": [p.name for p in files]}
    (out / "package.json").write_text(json.dumps(info, indent=2))
    return info


def predict(package: Path, input_dir: Path, out: Path) -> list[Path]:
    """The submission(s) of the packaged members over `input_dir` (see the module docstring)."""
    setup_logging(None, "predict")  # each stage's lines on the notebook's output
    out.mkdir(parents=True, exist_ok=True)
    tree = yaml.safe_load((package / "config.yaml").read_text())
    tree["competition"]["root"] = str(input_dir)
    config = out / "dmlkit-config.yaml"
    config.write_text(yaml.safe_dump(tree, sort_keys=False))
    cfg = load_config(config)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    trained = {m.name: package / "members" / m.name for m in cfg.members}
    trained.update(
        {refit_name(m.name): package / "members" / refit_name(m.name) for m in cfg.members if m.refit != "off"}
    )
    ctx = Context(cfg, artifacts=out / "dmlkit-artifacts", submissions=out, trained=trained)
    check_values(ctx)
    check_outputs(ctx, list(STAGE_NAMES))
    for stage in STAGE_NAMES:
        run_stage(ctx, stage)
    written = [out / submission_name(cfg.experiment, fmt) for fmt in ctx.formats]
    shutil.copyfile(written[0], out / "submission.csv")
    return [out / "submission.csv", *written]
