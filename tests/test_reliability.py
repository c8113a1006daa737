"""Bad input, numerical faults, resources and concurrency: refused or reported, never half-written."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, with_command, write_tiny_config
from dmlkit import cache, cli, commands
from dmlkit.config import load_config
from dmlkit.data.dataset import ImageDataset
from dmlkit.data.images import UnreadableImageError, image_problem, read_image
from dmlkit.data.transforms import make_pipeline
from dmlkit.models.objective import MarginModel
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.retrieval.chain import check_finite
from dmlkit.stages.embed import run_embed
from dmlkit.stages.folds import load_table, run_folds
from dmlkit.stages.train import run_train
from dmlkit.training import loop as train_loop


def _png(path: Path, array: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), array)
    return path


def test_unreadable_images_name_the_file(tmp_path):
    with pytest.raises(UnreadableImageError, match="not found"):
        read_image(tmp_path / "missing.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(UnreadableImageError, match="empty"):
        read_image(tmp_path / "empty.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(UnreadableImageError, match=r"text\.jpg: not a decodable"):
        read_image(tmp_path / "text.jpg")
    good = cv2.imencode(".jpg", np.full((64, 64, 3), 200, np.uint8))[1].tobytes()
    (tmp_path / "truncated.jpg").write_bytes(good[:40])
    with pytest.raises(UnreadableImageError):
        read_image(tmp_path / "truncated.jpg")


def test_convertible_images_are_converted(tmp_path):
    gray = read_image(_png(tmp_path / "gray.png", np.full((10, 12), 77, np.uint8)))
    assert gray.shape == (10, 12, 3) and (gray == 77).all()
    deep = read_image(_png(tmp_path / "deep.png", np.full((5, 5, 3), 65535, np.uint16)))
    assert deep.dtype == np.uint8 and (deep == 255).all()
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 2] = 255  # red in BGR(A)
    rgba[:2, ..., 3] = 255  # top half opaque, bottom transparent → white
    out = read_image(_png(tmp_path / "alpha.png", rgba))
    assert out.shape == (4, 4, 3) and out[0, 0].tolist() == [255, 0, 0] and out[3, 3].tolist() == [255, 255, 255]
    one = read_image(_png(tmp_path / "color.png", np.full((3, 3, 3), 100, np.uint8)), channels=1)
    assert one.shape == (3, 3, 1)
    from PIL import Image

    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    cmyk = read_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (6, 6, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60


def test_16_bit_images_scale_by_the_type_not_by_each_image(tmp_path):
    """A dark 16-bit image stays dark and 12-bit data (scaled up to 16 bits, as PNG stores it)
    keeps its brightness: one scale, 255/65535, for every 16-bit image."""
    dark = read_image(_png(tmp_path / "dark.png", np.full((4, 4), 200, np.uint16)))
    assert (dark == 1).all()  # 200/65535·255 = 0.78 → 1; the per-image guess gave 200
    twelve = np.full((4, 4), 2048 << 4, np.uint16)  # mid-grey 12-bit sample in a 16-bit PNG
    assert (read_image(_png(tmp_path / "twelve.png", twelve)) == 128).all()
    bright = read_image(_png(tmp_path / "bright.png", np.full((4, 4), 65535, np.uint16)))
    assert (bright == 255).all()
    from dmlkit.data.images import to_uint8

    assert to_uint8(np.array([[0.0, 0.5, 1.0]], np.float32)).tolist() == [[0, 128, 255]]  # float 0..1
    assert to_uint8(np.array([[0.0, 127.6, 255.0]], np.float32)).tolist() == [[0, 128, 255]]  # float 0..255


def test_image_smaller_than_the_crop_is_resized(tmp_path):
    path = _png(tmp_path / "tiny.png", np.full((5, 3, 3), 9, np.uint8))
    pipeline = make_pipeline(
        32,
        augment=[{"type": "RandomResizedCrop", "size": ["image_size", "image_size"]}],
    )
    tensor, *_ = ImageDataset([str(path)], [0], pipeline, 3, 32)[0]
    assert tuple(tensor.shape) == (3, 32, 32)


def _with_orientation(jpeg: bytes, orientation: int, order: str = "big") -> bytes:
    """The JPEG with an EXIF APP1 segment holding one tag, orientation (0x0112, SHORT)."""
    mark = b"MM" if order == "big" else b"II"
    entry = (0x0112).to_bytes(2, order) + (3).to_bytes(2, order) + (1).to_bytes(4, order)
    entry += orientation.to_bytes(2, order) + b"\x00\x00"
    tiff = mark + (42).to_bytes(2, order) + (8).to_bytes(4, order) + (1).to_bytes(2, order) + entry + bytes(4)
    return jpeg[:2] + b"\xff\xe1" + (8 + len(tiff)).to_bytes(2, "big") + b"Exif\x00\x00" + tiff + jpeg[2:]


@pytest.mark.parametrize("order", ["big", "little"])
def test_exif_orientation_is_applied_as_opencv_imread_does(tmp_path, order):
    """A phone photo stored sideways with EXIF orientation 6 is shown upright: each of the 8
    orientations decodes to OpenCV's own oriented decode of the same bytes, in full and at 1/2 scale."""
    from dmlkit.data.images import decode_image, jpeg_orientation, oriented_jpeg_shape

    y, x = np.mgrid[0:48, 0:80]
    pixels = np.stack([x * 3, y * 5, (x + y) % 256], axis=2).astype(np.uint8)  # no symmetry
    stored = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    for orientation in range(1, 9):
        data = _with_orientation(stored, orientation, order)
        assert jpeg_orientation(data) == orientation
        buffer = np.frombuffer(data, np.uint8)
        for min_side, flag in ((None, cv2.IMREAD_COLOR), (24, cv2.IMREAD_REDUCED_COLOR_2)):
            expected = cv2.cvtColor(cv2.imdecode(buffer, flag), cv2.COLOR_BGR2RGB)
            got = decode_image(data, "x.jpg", 3, min_side)
            assert got.shape == expected.shape and np.array_equal(got, expected), (orientation, min_side)
        assert oriented_jpeg_shape(data) == ((80, 48) if orientation >= 5 else (48, 80))
    assert jpeg_orientation(stored) == 1 and jpeg_orientation(b"\x89PNG") == 1


def _check_cases(folder: Path) -> list[Path]:
    good = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))[1].tobytes()
    files = {"empty.jpg": b"", "text.jpg": b"not an image", "head.jpg": good[:600]}
    files.update({f"cut{n}.jpg": good[: len(good) * n // 10] for n in (3, 9)})
    files["good.jpg"] = good
    # an APP2 segment of 10 kB before the frame header (as large EXIF/ICC data puts it past the first read)
    files["late-frame.jpg"] = good[:2] + b"\xff\xe2" + (10002).to_bytes(2, "big") + bytes(10000) + good[2:]
    files["appended.jpg"] = good + b"ftypmp42" + bytes(5000)  # a motion photo's video after the image
    sof = good.index(b"\xff\xc0")
    files["zero-width.jpg"] = good[: sof + 7] + b"\x00\x00" + good[sof + 9 :]
    png = cv2.imencode(".png", np.full((7, 9, 3), 40, np.uint8))[1].tobytes()
    files.update({"good.png": png, "cut.png": png[: len(png) - 20], "text.png": b"\x89PNG\r\n\x1a\n garbage"})
    for name, data in files.items():
        (folder / name).write_bytes(data)
    _png(folder / "deep.png", np.full((5, 5, 3), 65535, np.uint16))
    _png(folder / "gray.png", np.full((5, 6), 9, np.uint8))
    return [*sorted(folder.iterdir()), folder / "missing.jpg"]


def test_image_check_agrees_with_the_decoder(tmp_path):
    """The folds stage's check (1/8-scale decode) refuses exactly what read_image refuses."""
    for path in _check_cases(tmp_path):
        try:
            read_image(path)
            expected = None
        except UnreadableImageError as exc:
            expected = str(exc)
        assert image_problem(path) == expected, path.name


def test_header_check_refuses_what_the_decoder_refuses(tmp_path):
    """check_images: header reads a header and the end marker, not the pixels: the same verdict as
    decoding on empty, missing, truncated and non-image files, a frame header 10 kB in and a video
    appended after the image."""
    from dmlkit.data.images import image_header_problem

    verdicts = {}
    for path in _check_cases(tmp_path):
        problem = image_header_problem(path)
        verdicts[path.name] = problem is None
        assert (problem is None) == (image_problem(path) is None), (path.name, problem)
        assert problem is None or str(path) in problem
    assert verdicts["late-frame.jpg"] and verdicts["appended.jpg"] and verdicts["good.png"]
    assert not verdicts["cut9.jpg"] and not verdicts["cut.png"] and not verdicts["zero-width.jpg"]


def test_check_images_off_and_header_modes_in_the_folds_stage(tmp_path):
    from dmlkit.stages.folds import find_unreadable

    paths = _check_cases(tmp_path)
    table = pd.DataFrame({"id": [p.name for p in paths], "role": "train", "path": [str(p) for p in paths]})
    decoded = find_unreadable(table, 2, progress=False, mode="decode")
    header = find_unreadable(table, 2, progress=False, mode="header")
    assert header["id"].tolist() == decoded["id"].tolist() and len(decoded) >= 8
    assert find_unreadable(table, 2, progress=False, mode="off").empty


def _corrupt_demo(tmp_path: Path, role_folder: str, *overrides: str) -> tuple[Context, Path]:
    cfg_path = write_tiny_config(tmp_path, "whale")
    ctx = Context(
        load_config(cfg_path, ["members.0.train.epochs=1", *overrides]), artifacts=tmp_path / "a", progress=False
    )
    ensure_demo_data(ctx)
    victim = sorted((tmp_path / "input-whale" / role_folder).glob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated
    return ctx, victim


def test_unreadable_training_image_is_dropped_early_and_the_run_ends_with_its_submission(tmp_path, caplog):
    from dmlkit.pipeline.table import STAGE_NAMES as STAGES
    from dmlkit.pipeline.table import run_stage

    ctx, victim = _corrupt_demo(tmp_path, "train")
    with caplog.at_level("WARNING"):
        for stage in STAGES:
            run_stage(ctx, stage)
    folds = ctx.done["folds"]
    assert folds.manifest["result"]["unreadable_train"] == 1
    assert folds.manifest["result"]["unreadable_train_first"] == [str(victim)]
    assert "dropped from training and the gallery: 1 training image(s) cannot be read" in caplog.text
    assert victim.name in caplog.text
    table, train_rows = load_table(folds)
    assert victim.name not in set(table["id"]) and victim.name not in set(train_rows["id"])
    assert ctx.done["train/m0"].manifest["result"]["skipped_images"] == []  # never reached the loader
    assert (ctx.submissions / "tiny-whale.csv").is_file()


def test_strict_images_stops_before_training_naming_the_file(tmp_path):
    ctx, victim = _corrupt_demo(tmp_path, "train", "members.0.train.strict_images=true")
    with pytest.raises(UnreadableImageError, match=f"(?s)strict_images.*{victim.name}"):
        run_train(ctx, "m0")
    assert not list((tmp_path / "a").glob("*/train"))


def test_unreadable_test_image_stops_the_run_before_training_naming_it(tmp_path):
    ctx, victim = _corrupt_demo(tmp_path, "test")
    with pytest.raises(UnreadableImageError, match=f"(?s)1 test/index image.*{victim.name}"):
        run_embed(ctx, "m0")
    assert not list((tmp_path / "a").glob("*/train"))  # refused before anything trained
    assert not list((tmp_path / "a").glob("*/folds/*/manifest.json"))


def test_nan_loss_stops_with_step_or_is_skipped(tmp_path, monkeypatch):
    cfg_path = write_tiny_config(tmp_path, "whale")
    original = MarginModel.forward
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        loss, expanded = original(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), expanded

    monkeypatch.setattr(MarginModel, "forward", flaky)
    ctx = Context(load_config(cfg_path, ["members.0.train.epochs=3"]), artifacts=tmp_path / "a", progress=False)
    ensure_demo_data(ctx)
    with pytest.raises(train_loop.NonFiniteLossError, match=r"non-finite loss .* at epoch \d+, batch \d+"):
        run_train(ctx, "m0")
    assert not list((tmp_path / "a").glob("*/train/m0/*/manifest.json"))
    calls["n"] = 0
    skip = Context(
        load_config(cfg_path, ["members.0.train.epochs=3", "members.0.train.nan_policy=skip"]),
        artifacts=tmp_path / "b",
        progress=False,
    )
    art = run_train(skip, "m0")
    assert art.manifest["result"]["nonfinite_steps"] == 1


def test_nan_embeddings_are_refused_before_search():
    emb = np.ones((4, 3), np.float32)
    emb[2, 1] = np.nan
    with pytest.raises(FloatingPointError, match=r"1 embedding row\(s\) contain NaN.*\[2\]"):
        check_finite("gallery", emb)


def test_out_of_memory_suggests_the_config_change(monkeypatch, capsys):
    def boom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    parser_func = commands.build_parser
    monkeypatch.setattr(commands, "build_parser", lambda: with_command(parser_func(), boom))
    assert cli.main(["train", "-c", "x.yaml"]) == 3
    err = capsys.readouterr().err
    assert "out of memory" in err and "batch_size" in err and "grad_accum" in err


def test_full_disk_leaves_no_complete_artifact(tmp_path, monkeypatch, capsys):
    cfg_path = write_tiny_config(tmp_path, "whale")
    ctx = Context(load_config(cfg_path), artifacts=tmp_path / "a", progress=False)
    ensure_demo_data(ctx)
    real_to_csv = pd.DataFrame.to_csv

    def full(self, path=None, *args, **kwargs):
        if path is not None and str(path).endswith("folds.csv"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_to_csv(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(OSError):
        run_folds(ctx)
    assert not list((tmp_path / "a").glob("*/folds/*/manifest.json"))
    monkeypatch.setattr(pd.DataFrame, "to_csv", real_to_csv)
    art = run_folds(Context(load_config(cfg_path), artifacts=tmp_path / "a", progress=False))
    assert cache.is_complete(art.path) and not art.reused


def test_concurrent_run_of_the_same_stage_is_refused(tmp_path):
    cfg_path = write_tiny_config(tmp_path, "whale")
    ctx = Context(load_config(cfg_path), artifacts=tmp_path / "a", progress=False)
    ensure_demo_data(ctx)
    key_dir = None
    # find the folds artifact path this config will use, then hold its lock as another run would
    art = run_folds(ctx)
    key_dir = art.path
    import shutil

    shutil.rmtree(key_dir)
    with cache.stage_lock(key_dir):
        run = subprocess.run(
            [sys.executable, "-m", "dmlkit", "folds", "-c", str(cfg_path), "--artifacts", str(tmp_path / "a")],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
    assert run.returncode == 2 and "another run is computing this artifact" in run.stderr
    assert not cache.is_complete(key_dir)


def test_unknown_backbone_fails_early_naming_the_key(tmp_path):
    cfg_path = write_tiny_config(tmp_path, "whale")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dmlkit",
            "train",
            "-c",
            str(cfg_path),
            "members.0.backbone=resnet19x",
            "--artifacts",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert run.returncode == 2
    assert "members.0.backbone" in run.stderr and "unknown timm backbone 'resnet19x'" in run.stderr
    assert not (tmp_path / "a").exists()


def test_killed_embedding_is_redone_to_the_same_result(tmp_path):
    cfg_path = write_tiny_config(tmp_path, "landmark")
    overrides = ["members.0.train.epochs=1", "embed.tta_scales=[1.0,2.0,3.0,4.0]"]  # seconds of embedding
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "dmlkit", "embed", "-c", str(cfg_path), *overrides, "--no-progress", "--artifacts"]
    ref = subprocess.run([*cmd, str(tmp_path / "ref")], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = tmp_path / "killed"
    # train first (cached), so that the kill lands in the embedding stage
    subprocess.run(
        [sys.executable, "-m", "dmlkit", "train", "-c", str(cfg_path), *overrides, "--artifacts", str(killed)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
        env=env,
    )
    proc = subprocess.Popen(
        [*cmd, str(killed)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(killed.glob("*/embed/m0/*.partial")):
        time.sleep(0.01)
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(killed.glob("*/embed/m0/*/manifest.json")), "embedding finished before the kill"
    again = subprocess.run([*cmd, str(killed)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    (a,) = (tmp_path / "ref").glob("*/embed/m0/*/embeddings.npy")
    (b,) = killed.glob("*/embed/m0/*/embeddings.npy")
    assert np.array_equal(np.load(a), np.load(b))


_RSS_AFTER_FREE = """
import os, numpy as np
from dmlkit.process import keep_freed_memory
set_ = keep_freed_memory()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
block = np.ones(200 * 2**20, dtype=np.uint8)  # 200 MB, over glibc's 32 MB mmap ceiling
before = rss()
del block
print(set_, (before - rss()) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("setting", ["", "system"])
def test_freed_memory_is_kept_for_reuse_unless_turned_off(setting):
    """keep_freed_memory stops glibc from unmapping large freed blocks (which the next allocation of
    that size page-faults again); DMLKIT_MALLOC=system leaves the allocator alone."""
    env = {**os.environ, "DMLKIT_MALLOC": setting}
    out = subprocess.run([sys.executable, "-c", _RSS_AFTER_FREE], env=env, capture_output=True, text=True, check=True)
    applied, returned_mb = out.stdout.split()
    if setting == "system":
        assert applied == "False" and float(returned_mb) > 190  # unmapped on free
    else:
        assert applied == "True" and float(returned_mb) < 10  # kept in the heap


def test_a_misspelt_allocator_setting_stops_with_the_variable_named():
    env = {**os.environ, "DMLKIT_MALLOC": "sytem"}
    out = subprocess.run([sys.executable, "-m", "dmlkit", "folds"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "DMLKIT_MALLOC='sytem'" in out.stderr


def test_folds_for_a_set_whose_classes_all_have_four_images():
    """Before: StratifiedKFold's raw 'n_splits=5 cannot be greater than the number of members'."""
    from dmlkit.data.folds import assign_folds

    labels = np.repeat([f"c{i}" for i in range(30)], 4)
    train = pd.DataFrame({"label": labels, "known": True})
    folds = assign_folds(train, 5, seed=1)
    assert (folds >= 0).all()  # every image validates in one fold
    for _, part in pd.Series(folds).groupby(labels):
        assert part.nunique() == 4  # a class's 4 images in 4 different folds: 3 train while one validates
    assert np.bincount(folds, minlength=5).min() > 0
    assert np.array_equal(folds, assign_folds(train, 5, seed=1))


def _two_member_config(tmp_path: Path, second: str) -> Path:
    cfg = write_tiny_config(tmp_path, "whale")
    first = "  - {name: m0, backbone: test_resnet, fold: 0}\n"
    text = cfg.read_text().replace(first, first + f"  - {{name: m1, backbone: test_resnet, fold: 1, {second}}}\n")
    cfg.write_text(text)
    return cfg


@pytest.mark.parametrize(
    ("second", "named"),
    [
        ("train: {augment: [{type: HorizontalFlipp}]}", "members.1.train.augment.0: unknown albumentations"),
        ("pretrained_file: nowhere/weights.pth", "key 'members.1.pretrained_file': 'nowhere/weights.pth'"),
        ("train: {augment: [{type: Rotate, limitt: 10}]}", "members.1.train.augment.0: Rotate"),
    ],
)
def test_every_member_is_checked_before_the_first_trains(tmp_path, monkeypatch, capsys, second, named):
    """Before: members.1's typo failed after member 0 had trained, without naming members.1."""
    cfg = _two_member_config(tmp_path, second)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["all", "-c", str(cfg), "--artifacts", str(tmp_path / "a"), "--no-progress"]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "a" / "tiny-whale" / "train").exists()  # nothing trained


def _generic_csv(root: Path, with_split: bool, test_rows: int) -> Path:
    root.mkdir(parents=True)
    rows = []
    for i in range(12):
        _png(root / f"{i}.png", np.full((8, 8), i * 20, np.uint8))
        split = "test" if i < test_rows else "train"
        rows.append({"path": f"{i}.png", "label": f"c{i % 3}", **({"split": split} if with_split else {})})
    pd.DataFrame(rows).to_csv(root / "data.csv", index=False)
    return root / "data.csv"


@pytest.mark.parametrize(("with_split", "message"), [(False, "no 'split' column"), (True, "no row has split=test")])
def test_a_run_without_test_rows_stops_before_training(tmp_path, monkeypatch, capsys, with_split, message):
    """Before: exit 0 and a header-only submission."""
    csv = _generic_csv(tmp_path / "set", with_split, test_rows=0)
    cfg = write_tiny_config(tmp_path, "whale")
    monkeypatch.chdir(tmp_path)
    overrides = ["competition.name=generic-csv", f"competition.root={csv.parent}", "competition.demo=null"]
    code = cli.main(["all", "-c", str(cfg), *overrides, "--artifacts", str(tmp_path / "a"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{csv}: {message}" in err
    assert not (tmp_path / "a" / "tiny-whale" / "train").exists()
    assert cli.main(["folds", "-c", str(cfg), *overrides, "--artifacts", str(tmp_path / "a"), "--no-progress"]) == 0


def test_an_unwritable_submissions_folder_stops_before_training(tmp_path, monkeypatch, capsys):
    """Before: a PermissionError traceback at the very end. (A file where the folder should be
    stands in for a read-only folder: this suite may run as root, which writes anywhere.)"""
    cfg = write_tiny_config(tmp_path, "whale")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "submissions").write_text("not a folder")
    assert cli.main(["all", "-c", str(cfg), "--artifacts", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "submissions folder submissions: cannot write there" in err
    assert not (tmp_path / "a" / "tiny-whale" / "train").exists()


def test_a_read_only_submissions_folder_is_named(tmp_path, monkeypatch):
    from dmlkit.competitions.base import InputError
    from dmlkit.pipeline.checks import check_outputs

    cfg = write_tiny_config(tmp_path, "whale")
    ctx = Context(load_config(cfg), artifacts=tmp_path / "a", submissions=tmp_path / "subs", progress=False)
    ensure_demo_data(ctx)
    real_write = Path.write_bytes

    def refuse(self, data):
        if self.parent == tmp_path / "subs":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(InputError, match=r"subs: cannot write there \(Permission denied\)"):
        check_outputs(ctx, ["folds", "submit"])
    check_outputs(ctx, ["folds", "train"])  # a run that writes no submission does not care


def test_experiment_and_member_names_must_be_one_path_component(tmp_path):
    from dmlkit.config import ConfigError

    cfg = write_tiny_config(tmp_path, "whale")
    with pytest.raises(ConfigError, match=r"key 'experiment': .*'team/run1' is not a plain name"):
        load_config(cfg, ["experiment=team/run1"])
    with pytest.raises(ConfigError, match=r"key 'members.0.name': .*'\.\./m0' is not a plain name"):
        load_config(cfg, ["members.0.name=../m0"])
    assert load_config(cfg, ["experiment=team-run1.v2_b"]).experiment == "team-run1.v2_b"
