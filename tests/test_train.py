"""Training: resume after SIGKILL gives the same weights; two gloo processes match one process."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, free_port, write_tiny_config
from dmlkit.config import MemberConfig, load_config, member_slice
from dmlkit.config.members import member_schedule
from dmlkit.models.optim import lr_factor
from dmlkit.pipeline.context import Context, ensure_demo_data


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
    assert lr_factor(55, 100, 10) == pytest.approx(0.01 + 0.99 * 0.5)  # half way through the decay
    assert lr_factor(0, 100, 10, "constant") == pytest.approx(0.1)  # the same warmup
    assert [lr_factor(s, 100, 10, "constant") for s in (10, 55, 100)] == [1.0, 1.0, 1.0]


def test_schedule_auto_is_constant_from_random_init_and_cosine_from_trained_weights():
    base = {"name": "m", "backbone": "resnet18", "fold": 0, "image_size": 32, "train": {"schedule": "auto"}}
    assert member_schedule(MemberConfig.model_validate(base)) == "constant"
    for start in ({"pretrained": True}, {"pretrained_file": "w.pth"}, {"init_from": "other"}):
        assert member_schedule(MemberConfig.model_validate({**base, **start})) == "cosine"
    fixed = MemberConfig.model_validate({**base, "train": {"schedule": "cosine"}})
    assert member_schedule(fixed) == "cosine" and "schedule" not in member_slice(fixed)["train"]  # keys as before
    assert member_slice(MemberConfig.model_validate(base))["train"]["schedule"] == "constant"  # auto as resolved
    plain = MemberConfig.model_validate({k: v for k, v in base.items() if k != "train"})
    assert plain.train.schedule == "auto" and member_schedule(plain) == "constant"  # the default


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

    saved = torch.load(next(artifacts.glob("*/train/m0/*.partial/last.pt")), weights_only=False)
    resumed = subprocess.run(
        _train_cmd(cfg, artifacts, *overrides), env=_env(), capture_output=True, text=True, cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # the epochs finished, counted from 1 (the checkpoint keeps the 0-based index of the last one)
    assert f"resuming after epoch {len(saved['history'])} " in resumed.stderr
    a, b = _final_weights(tmp_path / "ref"), _final_weights(artifacts)
    for part in ("model", "head"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key} differs after resume"


@pytest.mark.parametrize(
    ("backbone", "epochs", "model_overrides"),
    [
        ("test_resnet", 2, ()),
        # ConvNeXt's head norm gets no gradient under GeM: DDP stopped at the second step before
        ("convnext_atto", 1, ()),
        # under the model's own pooling GeM's p gets no gradient: left trainable, DDP never reduces the
        # bucket it shares (the weights part after the first step) and stops at the second
        (
            "vit_tiny_patch16_224",
            2,
            ("members.0.pool=model", "members.0.backbone_kwargs={depth: 1, embed_dim: 32, num_heads: 2}"),
        ),
    ],
)
def test_two_gloo_processes_match_one_process(tmp_path, backbone, epochs, model_overrides):
    cfg = _prepare(tmp_path, "")
    overrides = (
        f"members.0.backbone={backbone}",
        *model_overrides,
        "members.0.train.freeze_bn=true",
        "members.0.train.augment=[]",
        f"members.0.train.epochs={epochs}",
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
        f"--master_port={free_port()}",
        "-m",
        "dmlkit",
        *_train_cmd(cfg, tmp_path / "two", *overrides)[3:],
    ]
    double = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    a, b = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    worst = max((a[p][k].float() - b[p][k].float()).abs().max().item() for p in ("model", "head") for k in a[p])
    assert worst < 1e-4, f"largest weight difference between 1 and 2 processes: {worst}"
    # validation is sharded over the ranks (each embeds half, rank 0 scores): the same scores as one process
    one, two = (_metrics(tmp_path / name) for name in ("one", "two"))
    val_columns = [c for c in one.columns if c.startswith("val_") and c != "val_s"]
    assert "val_score" in val_columns and list(two.columns) == list(one.columns)
    for column in val_columns:
        assert two[column].tolist() == pytest.approx(one[column].tolist(), abs=1e-6), column
    assert "sharded validation: 2 ranks" in double.stderr


def _metrics(artifacts: Path):
    import pandas as pd

    (path,) = artifacts.glob("*/train/m0/*/metrics.csv")
    return pd.read_csv(path)


def _margin_model(matmul: str, see: bool, sample_rate: float = 1.0):
    import numpy as np

    from dmlkit.build import build_objective
    from dmlkit.config import MemberConfig
    from dmlkit.models.heads import create_head

    member = MemberConfig.model_validate(
        {
            "name": "m",
            "backbone": "resnet18",
            "fold": 0,
            "image_size": 32,
            "embedding_size": 24,
            "head": {"subcenters": 3, "dynamic": "glr3", "matmul": matmul, "sample_rate": sample_rate},
            "see": {"enabled": see, "n_expansion": 4, "weight": 0.2, "schedule": "top_fraction"},
        }
    )

    class UnitLinear(torch.nn.Linear):
        def forward(self, x):
            return torch.nn.functional.normalize(super().forward(x), dim=1)

    torch.manual_seed(0)
    embed = UnitLinear(10, 24)
    head = create_head("arcface", 24, np.arange(1, 8), scale=30.0, subcenters=3, dynamic="glr3")
    return build_objective(member, embed, head), embed, head


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_margin_model_loss_matches_head_and_see_computed_separately(sample_rate):
    """The shared-centers step equals CE(head(z)) + λ·CE(head(SEE(z, closest center))) done step by step,
    with Partial FC the full head's logits restricted to the sampled classes."""
    import torch.nn.functional as F

    from dmlkit.models.heads import sample_classes
    from dmlkit.models.see import see_expand

    model, embed, head = _margin_model("fp32", see=True, sample_rate=sample_rate)
    x = torch.randn(12, 10)
    labels = torch.randint(0, 3, (12,))  # 3 of 7 classes: at rate 0.5 one negative is drawn
    loss, expanded = model(x, labels, 0.5, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    classes, columns = torch.arange(7), labels
    if sample_rate < 1:
        classes, columns = sample_classes(labels, 7, sample_rate, generator)
        assert len(classes) == 4
    z = embed(x)
    expected = F.cross_entropy(head(z, labels)[:, classes], columns)
    centers = head.closest_centers(z, labels)
    cos = (z.detach() * centers).sum(dim=1)
    mask = torch.zeros(12, dtype=torch.bool)
    mask[cos.argsort(descending=True)[:6]] = True
    synthetic = see_expand(z[mask], centers[mask], 4, generator).reshape(-1, 24)
    synthetic_labels = labels[mask].repeat_interleave(4)
    synthetic_columns = columns[mask].repeat_interleave(4)
    expected = expected + 0.2 * F.cross_entropy(head(synthetic, synthetic_labels)[:, classes], synthetic_columns)
    assert expanded == 6
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_low_precision_head_matmul_stays_close_to_fp32():
    x = torch.randn(64, 10)
    labels = torch.randint(0, 7, (64,))
    losses, grads = [], []
    for matmul in ("fp32", "amp"):
        model, _, head = _margin_model(matmul, see=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model(x, labels, 0.0)
        loss.backward()
        losses.append(loss.item())
        grads.append(head.weight.grad.clone())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    assert torch.nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0) > 0.99


def test_rotated_classes_and_partial_fc_train_and_save_the_original_classes(tmp_path):
    cfg = _prepare(tmp_path)
    overrides = (
        "members.0.train.class_rotations=[90,180,270]",
        "members.0.head.sample_rate=0.5",
        "members.0.see.enabled=true",
    )
    run = subprocess.run(
        _train_cmd(cfg, tmp_path / "art", *overrides), env=_env(), capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-2000:]
    saved = _final_weights(tmp_path / "art")
    (manifest,) = (tmp_path / "art").glob("*/train/m0/*/manifest.json")
    result = json.loads(manifest.read_text())["result"]
    classes = saved["classes"]
    assert classes and not any("@rot" in str(c) for c in classes)
    assert result["classes"] == len(classes) and result["trained_classes"] == 4 * len(classes)
    assert saved["head"]["weight"].shape[0] == len(classes) * 2  # two sub-centers per original class
    assert saved["head"]["margins"].shape[0] == len(classes)


def test_ema_model_averages_batchnorm_statistics(tmp_path):
    """Under train.ema the averaged model (what validates and is saved) carries BatchNorm statistics
    averaged like its weights: they follow training (not the initial mean 0) and are not a copy of the
    raw model's last statistics (what torch's AveragedModel keeps without use_buffers)."""
    from dmlkit.stages.folds import load_table, run_folds
    from dmlkit.training import data, loop, setup

    cfg = _prepare(tmp_path)
    overrides = ["members.0.train.ema=0.5", "members.0.train.batch_size=8"]  # several updates in an epoch
    ctx = Context(load_config(cfg, overrides), artifacts=tmp_path / "a", progress=False)
    member = ctx.cfg.members[0]
    fold = data.fold_data(member, load_table(run_folds(ctx))[1])
    model, head = setup.build_networks(member, fold, ctx.device, None)
    dataset = data.training_dataset(member, fold)
    run = setup.training_run(member, model, head, dataset, ctx.device)
    loop.train_epoch(ctx.cfg, member, run, dataset, 0, ctx.device, tmp_path / "last.pt", False)
    averaged, raw = run.eval_model.state_dict(), run.model.state_dict()
    keys = [k for k in raw if k.endswith("running_mean")]
    assert keys and run.eval_model is not run.model
    for key in keys:
        assert averaged[key].abs().max() > 1e-3, key  # moved from the statistics it was built with
        assert (averaged[key] - raw[key]).abs().max() > 1e-4, key  # averaged, not copied


def _final_state(tmp_path: Path, cfg: Path, *overrides: str, member: str = "m0") -> dict:
    from dmlkit.stages.train import run_train

    ctx = Context(load_config(cfg, list(overrides)), artifacts=tmp_path / "art", progress=False)
    return torch.load(run_train(ctx, member).file("final.pt"), map_location="cpu", weights_only=False)


def _assert_same_weights(a: dict, b: dict, atol: float) -> None:
    for part in ("model", "head"):
        for key, value in a[part].items():
            assert torch.allclose(value.float(), b[part][key].float(), atol=atol), f"{part}.{key}"


def test_initial_weights_do_not_depend_on_what_the_process_trained_before(tmp_path):
    cfg = _prepare(tmp_path)
    first = _final_state(tmp_path / "one", cfg, "members.0.train.epochs=1")
    _final_state(tmp_path / "two", cfg, "members.0.train.epochs=2")  # consumes random numbers
    _assert_same_weights(first, _final_state(tmp_path / "two", cfg, "members.0.train.epochs=1"), atol=0)


def test_grad_accum_two_half_batches_equal_one_full_batch(tmp_path):
    """grad_accum=2 at batch 8 takes the same steps as batch 16 (BatchNorm frozen: no batch statistics)."""
    cfg = _prepare(tmp_path)
    same = ("members.0.train.freeze_bn=true", "members.0.train.augment=[]", "members.0.train.optimizer=sgd")
    full = _final_state(tmp_path, cfg, *same, "members.0.train.batch_size=16")
    accumulated = _final_state(tmp_path, cfg, *same, "members.0.train.batch_size=8", "members.0.train.grad_accum=2")
    moved = max((full["model"][k].float() - v.float()).abs().max() for k, v in _initial_model(cfg).items())
    assert moved > 1e-3  # the runs did train
    _assert_same_weights(full, accumulated, atol=1e-5)


def _initial_model(cfg: Path) -> dict:
    from dmlkit.build import build_model

    return build_model(load_config(cfg).members[0]).state_dict()  # another random draw


def test_init_from_starts_from_the_other_members_weights(tmp_path):
    """Member b (same fold and classes), trained at a vanishing LR with frozen BatchNorm, ends where a ended:
    it started from a's weights, head included."""
    extra = """
members:
  - {name: a, backbone: test_resnet, fold: 0}
  - {name: b, backbone: test_resnet, fold: 0, init_from: a, train: {lr: 1.0e-12, freeze_bn: true, warmup_epochs: 0}}
"""
    cfg = _prepare(tmp_path, extra)
    cfg.write_text(cfg.read_text().replace("members:\n  - {name: m0, backbone: test_resnet, fold: 0}\n", "", 1))
    a = _final_state(tmp_path, cfg, member="a")
    b = _final_state(tmp_path, cfg, member="b")
    _assert_same_weights(a, b, atol=1e-6)
    fresh = _initial_model(cfg)
    assert max((a["model"][k].float() - v.float()).abs().max() for k, v in fresh.items()) > 1e-3


def test_proxy_anchor_objective_is_pml_loss_plus_see_rows_through_it():
    """head.type proxy_anchor: pytorch-metric-learning's ProxyAnchorLoss on the batch, plus λ × the same
    loss on SEE's synthetic rows expanded around each sample's class proxy, computed step by step."""
    import numpy as np
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    from dmlkit.build import build_member_head, build_objective
    from dmlkit.config import MemberConfig
    from dmlkit.models.see import see_expand

    member = MemberConfig.model_validate(
        {
            "name": "m",
            "backbone": "resnet18",
            "fold": 0,
            "image_size": 32,
            "embedding_size": 24,
            "head": {"type": "proxy_anchor", "subcenters": 1, "proxy_margin": 0.1, "proxy_alpha": 32.0},
            "see": {"enabled": True, "n_expansion": 4, "weight": 0.2, "schedule": "top_fraction"},
        }
    )
    torch.manual_seed(0)
    embed = torch.nn.Linear(10, 24)
    head = build_member_head(member, np.ones(7))
    model = build_objective(member, lambda x: torch.nn.functional.normalize(embed(x), dim=1), head)
    x, labels = torch.randn(12, 10), torch.randint(0, 7, (12,))
    loss, expanded = model(x, labels, 0.5, torch.Generator().manual_seed(3))

    reference = ProxyAnchorLoss(7, 24, margin=0.1, alpha=32.0)
    reference.proxies.data.copy_(head.loss.proxies.data)
    z = torch.nn.functional.normalize(embed(x), dim=1)
    proxies = torch.nn.functional.normalize(reference.proxies.detach()[labels], dim=1)
    mask = torch.zeros(12, dtype=torch.bool)
    mask[(z.detach() * proxies).sum(dim=1).argsort(descending=True)[:6]] = True
    synthetic = see_expand(z[mask], proxies[mask], 4, torch.Generator().manual_seed(3)).reshape(-1, 24)
    expected = reference(z, labels) + 0.2 * reference(synthetic, labels[mask].repeat_interleave(4))
    assert expanded == 6
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert head.loss.proxies.grad is not None and embed.weight.grad is not None
