"""Trust in what is on disk: cached artifacts are checked against their manifests before reuse,
checkpoints are read without unpickling code, and a failed write ends with the documented message."""

import errno
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml

from conftest import with_command, write_tiny_config
from dmlkit import cache, cli, tracking
from dmlkit.build import load_member
from dmlkit.competitions.base import InputError
from dmlkit.config import ConfigError, config_tree, load_config
from dmlkit.errors import CheckpointError
from dmlkit.models import checkpoint
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.pipeline.table import STAGE_NAMES, run_stage


def run_all(cfg_path: Path, artifacts: Path, submissions: Path) -> Context:
    ctx = Context(load_config(cfg_path), artifacts=artifacts, submissions=submissions, progress=False)
    ensure_demo_data(ctx)
    for stage in STAGE_NAMES:
        run_stage(ctx, stage)
    return ctx


@pytest.fixture(scope="module")
def trained_whale(tmp_path_factory):
    """A tiny whale run, all stages, with its submission (shared: tests copy what they damage)."""
    tmp = tmp_path_factory.mktemp("whale")
    cfg = write_tiny_config(tmp, "whale", "members: [{name: m0, backbone: test_resnet, fold: 0}]\n")
    ctx = run_all(cfg, tmp / "artifacts", tmp / "submissions")
    return cfg, tmp, ctx


class Payload:
    """What a crafted checkpoint carries: unpickling it writes a file (code run on load)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_same_shape_garbage_in_a_cached_artifact_is_found_moved_aside_and_recomputed(trained_whale, caplog):
    cfg, tmp, ctx = trained_whale
    before = (tmp / "submissions" / "tiny-whale.csv").read_bytes()
    embed = ctx.done["embed/m0"].path
    emb = np.load(embed / "embeddings.npy")
    np.save(embed / "embeddings.npy", np.random.default_rng(0).standard_normal(emb.shape).astype(emb.dtype))
    (tmp / "submissions" / "tiny-whale.csv").unlink()
    with caplog.at_level("WARNING"):
        again = run_all(cfg, tmp / "artifacts", tmp / "submissions")
    assert "embeddings.npy: its bytes differ from those its manifest recorded" in caplog.text
    assert not again.done["embed/m0"].reused
    assert (embed.parent / f"{embed.name}.broken-1" / "embeddings.npy").is_file()  # kept, not deleted
    assert np.array_equal(np.load(again.done["embed/m0"].file("embeddings.npy")), emb)
    assert (tmp / "submissions" / "tiny-whale.csv").read_bytes() == before


def test_a_truncated_file_or_a_broken_manifest_is_named_and_recomputed(trained_whale, caplog):
    cfg, tmp, ctx = trained_whale
    ensemble = run_all(cfg, tmp / "artifacts", tmp / "submissions").done["ensemble"].path
    data = (ensemble / "embeddings.npy").read_bytes()
    (ensemble / "embeddings.npy").write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        run_all(cfg, tmp / "artifacts", tmp / "submissions")
    assert f"embeddings.npy has {len(data) // 2} bytes, its manifest {len(data)}" in caplog.text
    folds = ctx.done["folds"].path
    text = (folds / "manifest.json").read_text()
    (folds / "manifest.json").write_text(text[: len(text) // 2])
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = run_all(cfg, tmp / "artifacts", tmp / "submissions")
    assert f"{folds / 'manifest.json'}: unreadable manifest" in caplog.text
    assert not again.done["folds"].reused and cache.is_complete(folds)


def test_artifacts_written_before_per_file_checks_are_checked_by_their_output_digest(tmp_path):
    folder = tmp_path / "key"
    folder.mkdir()
    np.save(folder / "embeddings.npy", np.ones((3, 2), np.float32))
    manifest = {"output": cache.output_digest(folder, ("*.npy",))}
    assert cache.damage(folder, manifest, ("*.npy",)) is None
    np.save(folder / "embeddings.npy", np.zeros((3, 2), np.float32))
    assert "differ from its manifest's output digest" in cache.damage(folder, manifest, ("*.npy",))
    assert cache.damage(folder, {}, ("*.npy",)) is None  # written before digests: taken as is


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(trained_whale, tmp_path):
    _, _, ctx = trained_whale
    member = ctx.cfg.members[0]
    good = torch.load(ctx.done["train/m0"].file("best.pt"), weights_only=True)  # plain data: loads as is
    marker = tmp_path / "ran.txt"
    crafted = tmp_path / "best.pt"
    torch.save({**good, "member": Payload(marker)}, crafted)
    with pytest.raises(CheckpointError, match=r"best\.pt: refused: it holds Python objects"):
        load_member(crafted, member, torch.device("cpu"))
    with pytest.raises(CheckpointError, match="refused"):
        checkpoint.load_training_state(crafted, torch.device("cpu"))
    assert not marker.exists()
    crafted.write_bytes(crafted.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"best\.pt: unreadable checkpoint"):
        load_member(crafted, member, torch.device("cpu"))


def test_a_crafted_checkpoint_in_an_offline_package_is_refused(trained_whale, tmp_path, monkeypatch, capsys):
    """predict() over a package whose member file was replaced: one error line naming the file."""
    from dmlkit.offline import predict

    cfg, _, ctx = trained_whale
    package = tmp_path / "package"
    (package / "members" / "m0").mkdir(parents=True)
    train_art = ctx.done["train/m0"]
    for name in ("manifest.json", "metrics.csv"):
        (package / "members" / "m0" / name).write_bytes(train_art.file(name).read_bytes())
    marker = tmp_path / "ran.txt"
    torch.save({"model": {}, "member": Payload(marker)}, package / "members" / "m0" / "best.pt")
    tree = config_tree(cfg)  # as `package` writes it: the YAML as written, the demo generator dropped
    for key in ("demo", "demo_params"):
        tree["competition"].pop(key)
    (package / "config.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(CheckpointError, match=r"members/m0/best\.pt: refused"):
        predict(package, Path(ctx.cfg.competition.root), tmp_path / "out")
    assert not marker.exists()


def test_checkpoints_hold_plain_data_only(tmp_path):
    """What the weights-only loader reads: numpy numbers in the history become plain floats."""
    state = {"model": {"w": torch.ones(2)}, "history": [{"loss": np.float64(0.5), "epoch": np.int64(1)}]}
    checkpoint.save_training_state(tmp_path / "last.pt", {**state, "best": {"score": -np.inf, "epoch": -1}})
    back = checkpoint.load_training_state(tmp_path / "last.pt", torch.device("cpu"))
    assert back["history"] == [{"loss": 0.5, "epoch": 1}] and back["best"]["score"] == -np.inf


def test_a_failed_checkpoint_write_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    def refuse(obj, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", refuse)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(total=1, used=1, free=0))
    with pytest.raises(OSError) as info:
        checkpoint.save_training_state(tmp_path / "last.pt", {"history": [], "best": {}})
    assert info.value.errno == errno.ENOSPC and "last.pt" in str(info.value)
    assert not (tmp_path / "last.pt.tmp").exists()


def test_disk_full_while_training_ends_with_the_documented_message_and_a_rerun_is_identical(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    cfg = write_tiny_config(tmp_path, "whale", "members: [{name: m0, backbone: test_resnet, fold: 0}]\n")
    real = torch.save
    calls = []

    def full_at_second_epoch(obj, path, *args, **kwargs):
        calls.append(str(path))
        if str(path).endswith("last.pt.tmp") and len([c for c in calls if c.endswith("last.pt.tmp")]) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_at_second_epoch)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(total=1, used=1, free=0))
    assert cli.main(["train", "-c", str(cfg), "--no-progress"]) == 4
    assert "error: disk full" in capsys.readouterr().err
    assert list((tmp_path / "artifacts").glob("tiny-whale/train/m0/*.partial"))
    assert not list((tmp_path / "artifacts").glob("tiny-whale/train/m0/*/manifest.json"))
    monkeypatch.setattr(checkpoint.torch, "save", real)
    assert cli.main(["all", "-c", str(cfg), "--no-progress"]) == 0
    resumed = pd.read_csv(tmp_path / "submissions" / "tiny-whale.csv")
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    monkeypatch.chdir(fresh_dir)
    assert cli.main(["all", "-c", str(cfg), "--no-progress"]) == 0
    assert resumed.equals(pd.read_csv(fresh_dir / "submissions" / "tiny-whale.csv"))


def test_a_read_only_artifacts_folder_ends_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = write_tiny_config(tmp_path, "whale")
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if "artifacts" in str(self):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert cli.main(["folds", "-c", str(cfg), "--no-progress"]) == 4
    err = capsys.readouterr().err
    assert "error: cannot write" in err and "Read-only file system" in err and "Traceback" not in err


def test_manifests_record_each_output_file(trained_whale):
    _, _, ctx = trained_whale
    manifest = json.loads((ctx.done["embed/m0"].path / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"embeddings.npy", "head_classes.json", "ids.csv"}
    npy = ctx.done["embed/m0"].file("embeddings.npy")
    assert manifest["files"]["embeddings.npy"] == {"bytes": npy.stat().st_size, "crc32": cache.file_check(npy)["crc32"]}


@pytest.mark.parametrize("kind", ["garbage", "other architecture"])
def test_a_later_members_bad_weights_file_stops_the_run_before_anything_trains(tmp_path, monkeypatch, capsys, kind):
    """Before: member 0 trained, then member 1's file failed with a raw traceback."""
    from safetensors.torch import save_file

    weights = tmp_path / "weights.safetensors"
    if kind == "garbage":
        weights.write_bytes(os.urandom(4096))
    else:
        other = timm.create_model("test_vit", num_classes=0)
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    cfg = write_tiny_config(tmp_path, "whale")
    first = "  - {name: m0, backbone: test_resnet, fold: 0}\n"
    second = f"  - {{name: m1, backbone: test_resnet, fold: 1, pretrained_file: {weights}}}\n"
    cfg.write_text(cfg.read_text().replace(first, first + second))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["all", "-c", str(cfg), "--artifacts", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"key 'members.1.pretrained_file': '{weights}' does not load into test_resnet" in err
    assert "Traceback" not in err and not (tmp_path / "a" / "tiny-whale" / "train").exists()


def test_retrieve_without_test_images_gives_the_validation_report_and_submit_stops_early(tmp_path, monkeypatch):
    """An image folder (or a CSV without split=test): `retrieve` reports on validation (before: a
    reshape error after training); `all` stops before training, saying why."""
    root = tmp_path / "folder"
    for c in range(4):
        for i in range(6):
            path = root / f"class{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.random.default_rng(c * 10 + i).integers(0, 255, (24, 24, 3), np.uint8))
    cfg = write_tiny_config(tmp_path, "whale")
    overrides = ["competition.name=image-folder", f"competition.root={root}", "competition.demo=null"]
    monkeypatch.chdir(tmp_path)
    args = ["-c", str(cfg), *overrides, "--artifacts", str(tmp_path / "a"), "--no-progress"]
    assert cli.main(["all", *args]) == 2
    assert not (tmp_path / "a" / "tiny-whale" / "train").exists()
    assert cli.main(["retrieve", *args]) == 0
    (report,) = (tmp_path / "a" / "tiny-whale" / "retrieve").glob("*/report.csv")
    assert pd.read_csv(report)["step"].iloc[0].startswith("kNN") and not list(report.parent.glob("predictions-*"))


def test_threads_are_bounded(tmp_path):
    """Before: threads=100000 died with a MemoryError inside faiss's OpenMP start."""
    with pytest.raises(ConfigError, match=r"key 'threads': Input should be less than or equal to 1024"):
        load_config(write_tiny_config(tmp_path, "whale"), ["threads=100000"])


def _png_set(root: Path, labels: list[str]) -> Path:
    """A generic-csv set: one distinct 16-px PNG per row, every row a training image."""
    root.mkdir(parents=True)
    for i, _ in enumerate(labels):
        cv2.imwrite(str(root / f"{i}.png"), np.random.default_rng(i).integers(0, 255, (16, 16, 3), np.uint8))
    pd.DataFrame({"path": [f"{i}.png" for i in range(len(labels))], "label": labels}).to_csv(root / "data.csv")
    return root


def _generic(tmp_path: Path, root: Path, extra: list[str] = ()) -> Context:
    cfg = write_tiny_config(tmp_path, "whale")
    overrides = ["competition.name=generic-csv", f"competition.root={root}", "competition.demo=null", *extra]
    return Context(load_config(cfg, overrides), artifacts=tmp_path / "a", progress=False)


def test_identical_images_under_two_labels_are_listed_with_a_warning(tmp_path, caplog):
    from dmlkit.stages.folds import run_folds

    root = _png_set(tmp_path / "set", [f"c{i % 4}" for i in range(16)])
    (root / "3.png").write_bytes((root / "0.png").read_bytes())  # c3's image is c0's
    (root / "4.png").write_bytes((root / "0.png").read_bytes())  # c0 twice: a duplicate, same label
    with caplog.at_level("WARNING"):
        art = run_folds(_generic(tmp_path, root))
    pairs = pd.read_csv(art.file("duplicates.csv"))
    assert len(pairs) == 2  # 0~3 and 3~4 (c0 vs c3); 0~4 share the label
    assert {(a, b) for a, b in zip(pairs["label_a"], pairs["label_b"], strict=True)} == {("c0", "c3"), ("c3", "c0")}
    assert "2 pair(s) of identical training images carry different labels" in caplog.text


def test_a_single_class_stops_at_the_folds_stage(tmp_path):
    from dmlkit.stages.folds import run_folds

    root = _png_set(tmp_path / "set", ["only"] * 8)
    with pytest.raises(InputError, match=r"training holds 1 class\(es\).*at least 2"):
        run_folds(_generic(tmp_path, root))


def test_content_fingerprints_see_an_image_edited_in_place(tmp_path):
    """Size and mtime kept, bytes changed: `folds.fingerprint: content` recomputes, `stat` cannot see it."""
    from dmlkit.stages.folds import run_folds

    root = _png_set(tmp_path / "set", [f"c{i % 4}" for i in range(16)])
    for mode, recomputed in (("stat", False), ("content", True)):
        run_folds(_generic(tmp_path, root, [f"folds.fingerprint={mode}"]))
        image = root / "5.png"
        stat = image.stat()
        data = bytearray(image.read_bytes())
        data[-20] ^= 0xFF  # the same size; restored mtime below
        image.write_bytes(bytes(data))
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        again = run_folds(_generic(tmp_path, root, [f"folds.fingerprint={mode}"]))
        assert again.reused is not recomputed, mode


def _png_with_exif_orientation(path: Path, image: np.ndarray, orientation: int) -> None:
    """A PNG whose eXIf chunk (before IDAT) holds a little-endian TIFF block with tag 0x0112."""
    import struct
    import zlib

    ok, encoded = cv2.imencode(".png", image)
    assert ok
    data = encoded.tobytes()
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    at = data.index(b"IDAT") - 4  # the IDAT chunk's length field
    path.write_bytes(data[:at] + chunk + data[at:])


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_pngs_exif_orientation_is_applied_like_a_jpegs(tmp_path, orientation):
    from dmlkit.data.images import apply_orientation, read_image

    stored = np.random.default_rng(orientation).integers(0, 255, (12, 20, 3), np.uint8)  # BGR as written
    _png_with_exif_orientation(tmp_path / "x.png", stored, orientation)
    shown = read_image(tmp_path / "x.png")
    rgb = cv2.cvtColor(stored, cv2.COLOR_BGR2RGB)
    expected = {3: rgb[::-1, ::-1], 6: np.rot90(rgb, k=-1), 8: np.rot90(rgb, k=1)}[orientation]
    assert np.array_equal(shown, expected)
    assert np.array_equal(apply_orientation(rgb, orientation), expected)  # the JPEG path's own turn


def test_float_images_are_scaled_by_their_range_not_taken_as_0_to_1(tmp_path, caplog):
    """Before: a float TIFF holding 0..255 decoded all white."""
    from dmlkit.data import images

    ramp = np.tile(np.linspace(0, 255, 16, dtype=np.float32), (8, 1))
    assert cv2.imwrite(str(tmp_path / "bytes.tiff"), ramp)
    assert cv2.imwrite(str(tmp_path / "unit.tiff"), ramp / 255.0)
    assert cv2.imwrite(str(tmp_path / "wide.tiff"), ramp * 10 - 500)
    images._FLOAT_WARNED.clear()
    with caplog.at_level("WARNING"):
        as_bytes = images.read_image(tmp_path / "bytes.tiff", channels=1)[..., 0]
    assert np.array_equal(as_bytes, np.rint(ramp).astype(np.uint8)) and as_bytes.max() == 255 and as_bytes.min() == 0
    assert "bytes.tiff: a float image with values in [0, 255], not 0..1: taken as 0..255" in caplog.text
    unit = images.read_image(tmp_path / "unit.tiff", channels=1)[..., 0]
    assert np.abs(unit.astype(int) - np.rint(ramp).astype(int)).max() <= 1
    wide = images.read_image(tmp_path / "wide.tiff", channels=1)[..., 0]
    assert wide.min() == 0 and wide.max() == 255 and np.all(np.diff(wide[0].astype(int)) > 0)


def _raising(parser, error):
    def boom(args):
        raise error

    return with_command(parser, boom)


def test_the_cli_keeps_the_traceback_of_an_error_that_may_be_the_codes(tmp_path, monkeypatch, capsys):
    """A ValueError from a bug: one line and where its traceback went (--debug raises it); the
    project's own errors: one line, no traceback."""
    monkeypatch.chdir(tmp_path)
    parser = cli.light_parser  # `runs` parses without the stage machinery
    monkeypatch.setattr(cli, "light_parser", lambda: _raising(parser(), ValueError("operands could not be broadcast")))
    assert cli.main(["runs"]) == 2
    err = capsys.readouterr().err
    (kept,) = (tmp_path / "logs").glob("traceback-*.txt")
    assert "error: operands could not be broadcast" in err and str(kept.relative_to(tmp_path)) in err
    assert "Traceback (most recent call last)" in kept.read_text() and "boom" in kept.read_text()
    with pytest.raises(ValueError, match="broadcast"):
        cli.main(["runs", "--debug"])
    monkeypatch.setattr(cli, "light_parser", lambda: _raising(parser(), ConfigError("x.yaml: key 'seed': bad")))
    assert cli.main(["runs"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: x.yaml: key 'seed': bad"


def test_a_damaged_local_feature_shard_is_set_aside_and_its_images_extracted_again(tmp_path, caplog):
    """Before: `mmap length is greater than file size` from numpy, naming no file, on every rerun."""
    from dmlkit.retrieval.local import LocalFeatures
    from dmlkit.retrieval.verify import FeatureStore

    features = LocalFeatures(np.ones((5, 2), np.float32), np.ones((5, 128), np.uint8))
    shard = FeatureStore(tmp_path).add(["a", "b"], [features, features])
    data = (shard / "descriptors.npy").read_bytes()
    (shard / "descriptors.npy").write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        store = FeatureStore(tmp_path)
    assert "a" not in store and "b" not in store
    assert f"{shard} is damaged" in caplog.text and "descriptors.npy" in caplog.text
    assert list(tmp_path.glob("shard-*.broken")) and not shard.exists()
    fresh = store.add(["a"], [features])
    assert np.array_equal(FeatureStore(tmp_path).get("a").keypoints, features.keypoints) and fresh.exists()


def test_reuse_reads_a_files_bytes_only_when_its_size_or_mtime_moved(tmp_path, monkeypatch):
    """Checked once, an untouched file costs a stat on each reuse; a rewritten one is read again."""
    folder = tmp_path / "key"
    folder.mkdir()
    np.save(folder / "embeddings.npy", np.ones((3, 2), np.float32))
    manifest = {"files": {"embeddings.npy": cache.file_check(folder / "embeddings.npy")}}
    old = time.time_ns() - 10 * cache.RACY_NS  # as if written a while ago
    os.utime(folder / "embeddings.npy", ns=(old, old))
    reads = []
    real = cache.file_check
    monkeypatch.setattr(cache, "file_check", lambda path: reads.append(path) or real(path))
    assert cache.damage(folder, manifest, ("*.npy",)) is None and len(reads) == 1
    assert cache.damage(folder, manifest, ("*.npy",)) is None and len(reads) == 1  # a stat only
    np.save(folder / "embeddings.npy", np.zeros((3, 2), np.float32))  # same size, new bytes
    assert "its bytes differ" in cache.damage(folder, manifest, ("*.npy",)) and len(reads) == 2


def _track_a_run(kind: str, artifacts: Path, png: Path) -> None:
    """What a pipeline run reports: the config, two epochs of a member, a summary with its text, a PNG."""
    tracking.start(kind, artifacts, "exp", {"seed": 3, "members": [{"name": "m0"}]})
    tracking.epoch("m0", {"epoch": 1, "loss": 2.5, "val_score": 0.25, "note": "x"}, 1)
    tracking.epoch("m0", {"epoch": 2, "loss": 1.5, "val_score": 0.5}, 2)
    tracking.summary("validation", {"map@5": 0.625, "step": "kNN"}, "| step | map@5 |")
    tracking.image("retrieve/grid", png)
    tracking.finish()


def test_mlflow_tracking_is_written_and_reads_back(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"file://{tmp_path / 'mlruns'}"  # mlflow-skinny (the test pin) has no sqlite store: a file store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    png = tmp_path / "grid.png"
    cv2.imwrite(str(png), np.zeros((8, 8, 3), np.uint8))
    _track_a_run("mlflow", tmp_path / "artifacts", png)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    loss = client.get_metric_history(run.info.run_id, "train/m0/loss")
    assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == [(1, 2.5), (2, 1.5)]
    assert run.data.metrics["val/m0/score"] == 0.5 and run.data.metrics["validation/map_at_5"] == 0.625
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "validation.md", "retrieve"} <= names
    assert (
        json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read_text())["seed"]
        == 3
    )


def wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file (wandb 0.31 ships no Python reader): a
    7-byte header, then LevelDB-style log blocks of 32 KiB whose chunks carry a 7-byte header (crc,
    length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_tracking_runs_offline_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    png = tmp_path / "grid.png"
    cv2.imwrite(str(png), np.zeros((8, 8, 3), np.uint8))
    _track_a_run("wandb", tmp_path / "artifacts", png)
    (log_file,) = (tmp_path / "artifacts" / "exp" / "wandb").glob("*/wandb/offline-run-*/run-*.wandb")
    history, summary, config = [], {}, {}

    def items(entries) -> dict:
        return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}

    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(items(record.history.item))
        elif kind == "summary":
            summary.update(items(record.summary.update))
        elif kind == "run":
            config.update(items(record.run.config.update))
    train = [(row["train/m0/step"], row["train/m0/loss"]) for row in history if "train/m0/loss" in row]
    assert train == [(1, 2.5), (2, 1.5)]
    assert any(row.get("validation/map@5") == 0.625 for row in history)
    assert summary["validation"] == "| step | map@5 |" and config["seed"] == 3
