"""Any timm image model as a member's backbone: CNN maps, Swin's NHWC maps, ViT/EVA tokens; hub and
local weights; head-first training; layer-wise LR decay; the exported embedding module."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, write_tiny_config
from dmlkit.build import build_member_head, build_model, build_objective
from dmlkit.config import ConfigError, MemberConfig, load_config, member_slice
from dmlkit.export import run_export
from dmlkit.inference import embed_paths
from dmlkit.models.optim import OptimizerSettings, make_optimizer
from dmlkit.pipeline.checks import check_members
from dmlkit.pipeline.context import Context, ensure_demo_data
from dmlkit.stages.embed import run_embed

TINY = {  # random-init, a few layers: seconds on a CPU
    "vit": ("vit_tiny_patch16_224", {"depth": 2, "embed_dim": 32, "num_heads": 2}, "tokens"),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "window_size": 4},
        "nhwc",
    ),
    "eva": ("eva02_tiny_patch14_224", {"depth": 2, "embed_dim": 32, "num_heads": 2}, "tokens"),
    "cnn": ("resnet18", {}, "nchw"),
}


def member(kind: str, **extra) -> MemberConfig:
    backbone, kwargs, _ = TINY[kind]
    fields = {"name": kind, "backbone": backbone, "fold": 0, "image_size": 48, "embedding_size": 16}
    fields = {**fields, "backbone_kwargs": kwargs, "head": {"subcenters": 2}, **extra}
    return MemberConfig.model_validate(fields)


def images(tmp_path: Path, n: int = 6) -> list[str]:
    import cv2

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (40 + 7 * i, 60, 3), dtype=np.uint8))
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("pool", ["auto", "gem"])
def test_any_timm_family_builds_trains_a_step_and_embeds_at_a_non_native_size(tmp_path, kind, pool):
    m = member(kind, pool=pool, see={"enabled": True, "n_expansion": 4}, head={"sample_rate": 0.5})
    model = build_model(m)
    assert model.layout == TINY[kind][2]
    assert model.pool_rule == (("gem" if model.layout == "nchw" else "model") if pool == "auto" else pool)
    head = build_member_head(m, np.array([3, 2, 4, 1]))
    objective = build_objective(m, model, head)
    optimizer = make_optimizer(OptimizerSettings(), model, list(head.parameters()), torch.device("cpu"))
    before = [p.detach().clone() for p in model.backbone.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision, Partial FC and SEE as in training
        loss, _ = objective(torch.randint(0, 255, (4, 3, 48, 48), dtype=torch.uint8), torch.tensor([0, 1, 2, 0]), 1.0)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.backbone.parameters(), strict=True))
    emb = embed_paths(model, images(tmp_path), 48, 4, torch.device("cpu"), flip=True, scales=(1.0, 1.5), progress=False)
    assert emb.shape == (6, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_pretrained_file_is_loaded(tmp_path):
    import timm

    backbone, kwargs, _ = TINY["vit"]
    source = timm.create_model(backbone, num_classes=0, img_size=48, **kwargs)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = build_model(member("vit", pretrained_file=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(value, model.backbone.state_dict()[key]), key


def test_hub_weights_offline_stop_before_anything_trains(tmp_path):
    """pretrained: true without the weights in the hub cache and no network: a clear error at once."""
    cfg = write_tiny_config(tmp_path, "whale")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "dmlkit", "train", "-c", str(cfg), "members.0.backbone=resnet10t"]
    cmd += ["members.0.pretrained=true", "--artifacts", str(tmp_path / "art"), "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "cannot get timm's pretrained weights for 'resnet10t'" in run.stderr and "pretrained_file" in run.stderr
    assert not list((tmp_path / "art").glob("*/train"))


def test_head_first_epochs_freeze_the_backbone_then_train_it(tmp_path):
    """Epoch 1 of 2 with freeze_backbone_epochs=1: the backbone's weights and BatchNorm statistics stay,
    the neck and head learn; epoch 2 trains the backbone."""
    from dmlkit.stages.folds import load_table, run_folds
    from dmlkit.training import data, loop, setup

    cfg = write_tiny_config(tmp_path, "whale")
    overrides = ["members.0.train.epochs=2", "members.0.train.freeze_backbone_epochs=1", "members.0.train.batch_size=8"]
    ctx = Context(load_config(cfg, overrides), artifacts=tmp_path / "a", progress=False)
    ensure_demo_data(ctx)
    m = ctx.cfg.members[0]
    fold = data.fold_data(m, load_table(run_folds(ctx))[1])
    model, head = setup.build_networks(m, fold, ctx.device, None)
    dataset = data.training_dataset(m, fold)
    run = setup.training_run(m, model, head, dataset, ctx.device)

    def snapshot() -> dict:
        return {k: v.clone() for k, v in model.state_dict().items()}

    start = snapshot()
    loop.train_epoch(ctx.cfg, m, run, dataset, 0, ctx.device, tmp_path / "last.pt", False)
    frozen = snapshot()
    backbone = [k for k in start if k.startswith("backbone.")]
    assert all(torch.equal(start[k], frozen[k]) for k in backbone)  # weights and running statistics
    assert not torch.equal(start["neck.0.weight"], frozen["neck.0.weight"])
    loop.train_epoch(ctx.cfg, m, run, dataset, 1, ctx.device, tmp_path / "last.pt", False)
    assert any(not torch.equal(frozen[k], model.state_dict()[k]) for k in backbone)


def test_layer_decay_scales_the_transformer_blocks_learning_rates():
    model = build_model(member("vit"))
    t = OptimizerSettings(lr=1e-3, layer_decay=0.5)
    optimizer = make_optimizer(t, model, [], torch.device("cpu"))
    rates = sorted({round(g["lr"], 8) for g in optimizer.param_groups})
    # timm's layer ids: the patch embedding with block 0's depth, then each block, the final norm at lr
    assert rates == pytest.approx([1e-3 * 0.25, 1e-3 * 0.5, 1e-3])
    neck = {id(p) for p in model.neck.parameters()}
    assert all(g["lr"] == pytest.approx(1e-3) for g in optimizer.param_groups if {id(p) for p in g["params"]} & neck)
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n_params == len([p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("backbone", ["test_resnet", "vit"])
def test_exported_module_equals_the_pipeline_embeddings(tmp_path, backbone):
    extra = []
    if backbone == "vit":
        extra = [
            "members.0.backbone=vit_tiny_patch16_224",
            "members.0.backbone_kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
        ]
    cfg = write_tiny_config(tmp_path, "whale")
    overrides = ["members.0.train.epochs=1", "members.0.train.amp=off", "embed.tta_flip=true", *extra]
    ctx = Context(load_config(cfg, overrides), artifacts=tmp_path / "a", submissions=tmp_path / "sub", progress=False)
    ensure_demo_data(ctx)
    written = run_export(ctx)
    module = torch.jit.load(str(written["torchscript"]))
    from dmlkit.data.dataset import ImageDataset
    from dmlkit.data.transforms import make_pipeline
    from dmlkit.stages.folds import load_table, run_folds

    table, _ = load_table(run_folds(ctx))
    paths = table["path"].tolist()[:12]
    size = ctx.cfg.members[0].image_size
    dataset = ImageDataset(paths, None, make_pipeline(size), 3, size)
    batch = torch.stack([dataset[i][0] for i in range(len(paths))])  # resized with OpenCV, like a user would
    with torch.no_grad():
        exported = module(batch).numpy()
    pipeline = np.load(run_embed(ctx, "m0").file("embeddings.npy"))[:12]
    assert (exported * pipeline).sum(axis=1).min() >= 0.999
    # the ONNX file (onnx is a requirement: before, export.onnx's default wrote nothing) runs in onnxruntime
    import onnxruntime

    assert "onnx" in written, written
    session = onnxruntime.InferenceSession(str(written["onnx"]), providers=["CPUExecutionProvider"])
    (from_onnx,) = session.run(None, {"images": batch.numpy()})
    assert from_onnx.shape == exported.shape and np.abs(from_onnx - exported).max() < 1e-4


def test_flip_tta_is_the_mean_over_the_image_and_its_mirror(tmp_path):
    """The mirrored view is flipped on the device from the one decode: the same embedding as
    embedding mirrored copies of the files (32 px files at 32 px: no resize to differ)."""
    import cv2

    from dmlkit.models.backbone import EmbeddingModel

    rng = np.random.default_rng(1)
    originals, mirrors = [], []
    for i in range(5):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        for name, pixels, paths in (("a", image, originals), ("b", image[:, ::-1], mirrors)):
            cv2.imwrite(str(tmp_path / f"{name}{i}.png"), np.ascontiguousarray(pixels))
            paths.append(str(tmp_path / f"{name}{i}.png"))
    torch.manual_seed(0)
    model = EmbeddingModel("resnet18", 16, image_size=32)
    kwargs = {"image_size": 32, "batch_size": 2, "device": torch.device("cpu"), "amp": "off", "progress": False}
    both = embed_paths(model, originals, flip=True, **kwargs)
    plain = embed_paths(model, originals, flip=False, **kwargs)
    mirrored = embed_paths(model, mirrors, flip=False, **kwargs)
    expected = (plain + mirrored) / np.linalg.norm(plain + mirrored, axis=1, keepdims=True)
    assert np.abs(both - expected).max() < 1e-5
    assert np.abs(plain - mirrored).max() > 1e-2  # the mirror is a different view


def test_an_onnx_export_that_fails_is_an_error_naming_the_members(tmp_path, monkeypatch):
    """export.onnx: true promises an .onnx file: a model that does not export stops the export
    (naming the members) instead of a warning and a missing file found in the offline notebook."""
    from dmlkit.export import ExportError

    cfg = write_tiny_config(tmp_path, "whale")

    def context(*extra: str) -> Context:
        overrides = ["members.0.train.epochs=1", *extra]
        return Context(
            load_config(cfg, overrides), artifacts=tmp_path / "a", submissions=tmp_path / "s", progress=False
        )

    ctx = context()
    ensure_demo_data(ctx)

    def unsupported(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(ExportError, match=r"members \['m0'\] do not export to ONNX .*operator foo.*export\.onnx=false"):
        run_export(ctx)
    assert not (tmp_path / "s" / f"{ctx.cfg.experiment}.onnx").exists()
    assert set(run_export(context("export.onnx=false"))) == {"torchscript"}  # the switch the error names


def test_weights_command_saves_the_hub_weights_a_pretrained_file_then_loads(tmp_path, monkeypatch, capsys):
    """`./run.sh weights` writes what timm's hub gives as a .safetensors file and prints the override
    that loads it (the hub is a local file here: nothing can be downloaded on this machine)."""
    import timm

    from dmlkit import cli
    from dmlkit.models import backbone as backbone_module

    source = timm.create_model("resnet10t", num_classes=0)
    hub_file = tmp_path / "hub.pth"
    torch.save(source.state_dict(), hub_file)
    create = timm.create_model

    def from_local_hub(name, pretrained=False, **kwargs):
        if pretrained and "pretrained_cfg_overlay" not in kwargs:
            kwargs["pretrained_cfg_overlay"] = {"file": str(hub_file)}
        return create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(backbone_module.timm, "create_model", from_local_hub)
    cfg = write_tiny_config(tmp_path, "whale")
    out = tmp_path / "weights"
    args = ["weights", "-c", str(cfg), "members.0.backbone=resnet10t", "members.0.pretrained=true", "--out", str(out)]
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert f"members.0.pretrained=false members.0.pretrained_file={out / 'resnet10t.safetensors'}" in printed
    model = build_model(member("cnn", backbone="resnet10t", pretrained_file=str(out / "resnet10t.safetensors")))
    for key, value in source.state_dict().items():
        assert torch.equal(value, model.backbone.state_dict()[key]), key
    assert cli.main(["weights", "-c", str(cfg), "--out", str(out)]) == 2  # no hub member: says so
    assert "no member has pretrained: true" in capsys.readouterr().err


@pytest.mark.parametrize("neck", ["linear_bn_prelu", "linear_bn", "linear", "none"])
def test_each_neck_gives_its_layers_and_none_embeds_the_pooled_features(neck):
    torch.manual_seed(0)
    size = 512 if neck == "none" else 16  # resnet18's pooled features: 512
    model = build_model(member("cnn", neck=neck, embedding_size=size)).eval()
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    with torch.no_grad():
        emb = model(images)
        pooled = model.pooled(model.backbone.forward_features((images.float() - model.pixel_mean) / model.pixel_std))
    assert emb.shape == (3, size)
    layers = [type(layer).__name__ for layer in model.neck.children()]
    assert layers == {"linear_bn_prelu": ["Linear", "BatchNorm1d", "PReLU"], "linear_bn": ["Linear", "BatchNorm1d"],
                      "linear": ["Linear"], "none": []}[neck]  # fmt: skip
    if neck == "none":
        torch.testing.assert_close(emb, torch.nn.functional.normalize(pooled, dim=1))


def test_the_default_neck_keeps_its_checkpoint_names_and_training_key():
    default, plain = member("cnn"), member("cnn", neck="linear")
    assert [k for k in build_model(default).state_dict() if k.startswith("neck.")] == [
        "neck.0.weight", "neck.0.bias", "neck.1.weight", "neck.1.bias", "neck.1.running_mean",
        "neck.1.running_var", "neck.1.num_batches_tracked", "neck.2.weight",
    ]  # fmt: skip
    assert "neck" not in member_slice(default) and member_slice(plain)["neck"] == "linear"


def test_neck_none_with_another_embedding_size_stops_before_training(tmp_path):
    cfg = load_config(write_tiny_config(tmp_path), ["member_defaults.neck=none"])  # its embedding_size: 32
    with pytest.raises(ConfigError, match=r"members\.0\.embedding_size.*set embedding_size: \d+"):
        check_members(cfg)
