"""What torchrun on a GPU box needs, checked on the CPU: parameters DDP would wait for, timm's
SyncBatchNorm conversion, the process group's timeout, skip decisions agreed by every rank, and
the warning for a CUDA build that finds no GPU."""

import datetime
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, free_port, write_tiny_config
from dmlkit import runtime
from dmlkit.config import load_config
from dmlkit.models.backbone import EmbeddingModel


@pytest.mark.parametrize(
    ("backbone", "pool", "size", "unused"),
    [
        ("convnext_atto", "auto", 32, ["backbone.head.norm.weight", "backbone.head.norm.bias"]),
        ("vit_tiny_patch16_224", "model", 32, ["pool.p"]),
        ("vit_tiny_patch16_224", "gem", 32, []),
        ("resnet18", "auto", 32, []),
    ],
)
def test_every_trainable_parameter_gets_a_gradient(backbone, pool, size, unused):
    """DDP (without find_unused_parameters) stops at the second step if one trainable parameter
    gets no gradient: ConvNeXt's head norm under GeM, GeM's p under the model's own pooling."""
    model = EmbeddingModel(backbone, 16, image_size=size, pool=pool)
    assert model.unused_parameters == unused
    model(torch.randint(0, 255, (2, 3, size, size), dtype=torch.uint8)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(not p.requires_grad for name, p in model.named_parameters() if name in unused)


def test_sync_batchnorm_keeps_timm_fused_activations():
    """torch's converter turns timm's BatchNormAct2d into a SyncBatchNorm without its SiLU."""
    import timm.layers as layers

    from dmlkit.training.setup import sync_batchnorm

    model = EmbeddingModel("efficientnet_b0", 16, image_size=32)
    before = {name: type(m.act) for name, m in model.named_modules() if isinstance(m, layers.BatchNormAct2d)}
    assert torch.nn.SiLU in before.values()
    converted = dict(sync_batchnorm(model).named_modules())
    for name, act in before.items():
        assert isinstance(converted[name], layers.SyncBatchNormAct), name
        assert type(converted[name].act) is act, name
    plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(EmbeddingModel("efficientnet_b0", 16, 32))
    plain_modules = dict(plain.named_modules())
    # torch's converter keeps `act` as a child that SyncBatchNorm.forward never calls
    assert all(type(plain_modules[name]) is torch.nn.SyncBatchNorm for name in before)


def test_process_group_timeout_comes_from_the_config(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    cfg = load_config(write_tiny_config(tmp_path, "whale"))
    assert cfg.runtime.dist_timeout_min == 360  # hours, not NCCL's 10 minutes
    runtime.init_distributed(
        load_config(write_tiny_config(tmp_path), ["runtime.dist_timeout_min=90"]).runtime.dist_timeout_min
    )
    assert calls == [{"backend": "gloo", "timeout": datetime.timedelta(minutes=90)}]


@pytest.mark.parametrize(("rank", "info_shown"), [("0", True), ("1", False)])
def test_only_rank_zero_prints_info_lines(monkeypatch, capsys, rank, info_shown):
    """8 ranks run the same stages: rank 0 alone prints their INFO lines; warnings name their rank."""
    monkeypatch.setenv("RANK", rank)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        runtime.setup_logging(None)
        logging.getLogger("dmlkit.test").info("stage computed")
        logging.getLogger("dmlkit.test").warning("batch skipped")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    err = capsys.readouterr().err
    assert ("stage computed" in err) is info_shown
    assert "batch skipped" in err
    assert ("[rank 1] batch skipped" in err) is (rank == "1")


def test_a_finished_torchrun_job_exits_cleanly():
    """A process that exits with its gloo group alive aborts in the interpreter's teardown ('terminate
    called without an active exception') in ~2 of 5 runs here, and torchrun fails the finished job.
    Checked directly (the exit handlers end the group: the `check` run) and by 3 real exits."""
    script = textwrap.dedent(
        """
        import atexit, sys
        import torch
        import torch.distributed as dist
        from dmlkit import runtime

        assert runtime.init_distributed(5.0)
        tensor = torch.ones(1)
        dist.all_reduce(tensor)
        assert tensor.item() == 2.0
        if sys.argv[-1] == "check":
            atexit._run_exitfuncs()
            assert not dist.is_initialized(), "the exit handlers leave the process group alive"
        """
    )
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for mode in ("check", "exit", "exit", "exit"):
        cmd = [torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", "--no-python", sys.executable]
        done = subprocess.run([*cmd, "-c", script, mode], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{mode}: {done.stderr[-2000:]}"


def test_a_cuda_build_that_finds_no_gpu_says_why(monkeypatch, caplog):
    reason = "The NVIDIA driver on your system is too old (found version 12040)."
    monkeypatch.setattr(runtime, "_CUDA_WARNED", [])
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def fail():
        raise RuntimeError(reason)

    monkeypatch.setattr(torch.cuda, "init", fail)
    with caplog.at_level(logging.WARNING, logger="dmlkit"):
        assert runtime.default_device() == "cpu"
        assert runtime.default_device() == "cpu"
    warnings = [r.getMessage() for r in caplog.records if "finds no usable GPU" in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0] and "CUDA 13.0 build" in warnings[0]


def test_a_cpu_build_does_not_warn(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "_CUDA_WARNED", [])
    monkeypatch.setattr(torch.version, "cuda", None)
    with caplog.at_level(logging.WARNING, logger="dmlkit"):
        assert runtime.warn_unusable_cuda() is None
    assert not caplog.records


def _agree_on_rank(rank: int, port: int, flags: list[list[bool]], out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        out[rank] = [runtime.any_rank(flag) for flag in flags[rank]]
    finally:
        dist.destroy_process_group()


def test_a_skip_on_one_rank_is_taken_by_both():
    """Rank 1 alone has a reason to skip steps 1 and 2: both ranks skip both, and nothing waits."""
    flags = [[False, False, False, True], [False, True, True, False]]
    with mp.Manager() as manager:
        out = manager.dict()
        context = mp.spawn(_agree_on_rank, args=(free_port(), flags, out), nprocs=2, join=False)
        while not context.join(timeout=120):
            pass
        assert out[0] == out[1] == [False, True, True, True]


def test_a_k_over_faiss_gpu_limit_searches_on_the_cpu(monkeypatch):
    """faiss-gpu answers k ≤ 2048 only; a larger retrieve.k must not reach the GPU index."""
    import numpy as np

    from dmlkit.retrieval import search

    cloned = []
    monkeypatch.setattr(search, "gpu_usable", lambda: True)
    monkeypatch.setattr(search.faiss, "GpuMultipleClonerOptions", lambda: type("Options", (), {})(), raising=False)
    monkeypatch.setattr(
        search.faiss, "index_cpu_to_all_gpus", lambda index, co: cloned.append(index) or index, raising=False
    )
    gallery = np.random.default_rng(0).standard_normal((2100, 8)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    _, ids = search.knn(gallery[:3], gallery, k=2050, use_gpu="yes", progress=False)
    assert cloned == [] and ids.shape == (3, 2050) and (ids[:, 0] == [0, 1, 2]).all()
    search.knn(gallery[:3], gallery, k=5, use_gpu="yes", progress=False)
    assert len(cloned) == 1  # within the limit the GPU path is taken


def _accumulate_on_rank(rank: int, port: int, out: dict) -> None:
    from types import SimpleNamespace

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from dmlkit.training.loop import gradient_sync

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
        reductions = []

        def counting(state, bucket):
            reductions.append(bucket.index())
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting)
        run = SimpleNamespace(train_model=model)
        x = torch.full((2, 4), float(rank + 1))
        for micro in range(4):  # grad_accum = 4: one optimizer step
            with gradient_sync(run, sync=micro == 3):
                (model(x * (micro + 1)).sum() / 4).backward()
        out[rank] = (len(reductions), model.module.weight.grad.clone())
    finally:
        dist.destroy_process_group()


def test_gradient_accumulation_all_reduces_once_per_optimizer_step():
    """Before: every micro-batch all-reduced its gradients (4× the traffic at grad_accum=4)."""
    with mp.Manager() as manager:
        out = manager.dict()
        context = mp.spawn(_accumulate_on_rank, args=(free_port(), out), nprocs=2, join=False)
        while not context.join(timeout=120):
            pass
        (n0, g0), (n1, g1) = out[0], out[1]
    assert n0 == n1 == 1
    # the one reduction averaged the ranks' summed micro-batch gradients: d/dW sum(W·x·m)/4 = x·m/4 per row
    expected = torch.full((3, 4), (1 + 2) / 2 * (1 + 2 + 3 + 4) / 4 * 2)  # batch of 2 rows
    assert torch.allclose(g0, expected) and torch.allclose(g1, expected)


class _UnreadableFirstOnRank1:
    """Rank 1's first `count` images read as unreadable (its first batch has too few to train on)."""

    def __init__(self, dataset, count: int):
        self.dataset, self.count, self.calls = dataset, count, 0

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label, row, ok = self.dataset[index]
        self.calls += 1
        if os.environ["RANK"] == "1" and self.calls <= self.count:
            return torch.zeros_like(image), label, row, False
        return image, label, row, ok


class _NanOnRank1(torch.nn.Module):
    """The objective, with rank 1's loss made NaN at its `at`-th forward."""

    def __init__(self, inner: torch.nn.Module, at: int):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, *args):
        loss, expanded = self.inner(*args)
        self.calls += 1
        if os.environ["RANK"] == "1" and self.calls == self.at:
            loss = loss * float("nan")
        return loss, expanded


def _train_epoch_with_skips(rank: int, port: int, folder: str, out: dict) -> None:
    from types import SimpleNamespace

    import numpy as np

    from dmlkit.build import build_member_head, build_model
    from dmlkit.config import MemberConfig
    from dmlkit.data.dataset import ImageDataset
    from dmlkit.data.transforms import make_pipeline
    from dmlkit.training import loop, setup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        member = MemberConfig.model_validate(
            {
                "name": "m",
                "backbone": "test_resnet",
                "fold": 0,
                "image_size": 32,
                "embedding_size": 16,
                "train": {"epochs": 1, "batch_size": 16, "nan_policy": "skip", "amp": "off", "freeze_bn": True},
            }
        )
        paths = sorted(str(p) for p in Path(folder).glob("*.png"))
        labels = [i % 4 for i in range(len(paths))]
        dataset = _UnreadableFirstOnRank1(ImageDataset(paths, labels, make_pipeline(32), 3, 32, True), count=7)
        torch.manual_seed(0)
        model, head = build_model(member), build_member_head(member, np.bincount(labels))
        run = setup.training_run(member, model, head, dataset, torch.device("cpu"))
        run.train_model = _NanOnRank1(run.train_model, at=1)  # rank 1's first forward is batch 1
        steps = []
        run.optimizer.register_step_post_hook(lambda *_: steps.append(1))
        row = loop.train_epoch(
            SimpleNamespace(seed=0), member, run, dataset, 0, torch.device("cpu"), Path(folder) / "x.pt", False
        )
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        out[rank] = (run.nonfinite_steps, len(steps), row["loss"], weights)
    finally:
        dist.destroy_process_group()


def test_one_rank_unreadable_batch_and_nan_loss_are_skipped_by_both(tmp_path):
    """Through the training loop: rank 1 alone cannot train batch 0 (7 of its 8 images unreadable)
    and alone gets a NaN loss on batch 1. Both ranks skip both batches and take the one optimizer
    step of batch 2 together, ending with the same weights; a rank skipping alone would leave the
    other waiting in DDP's all-reduce until the 60 s timeout."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(48):  # 24 per rank: 3 batches of 8
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    with mp.Manager() as manager:
        out = manager.dict()
        context = mp.spawn(_train_epoch_with_skips, args=(free_port(), str(tmp_path), out), nprocs=2, join=False)
        while not context.join(timeout=180):
            pass
        (bad0, steps0, loss0, w0), (bad1, steps1, loss1, w1) = out[0], out[1]
    assert bad0 == bad1 == 1  # the NaN step, counted on both ranks
    assert steps0 == steps1 == 1  # batches 0 and 1 skipped, batch 2 trained
    assert np.isfinite(loss0) and np.isfinite(loss1)
    assert torch.equal(w0, w1)


@pytest.mark.parametrize(
    ("batch_per", "scaling", "world", "expected"),
    [
        ("global", "none", 8, (4, 1e-3)),  # glr2020.yaml's 32 on 8 GPUs: 4 images each, same optimisation
        ("gpu", "none", 8, (32, 1e-3)),
        ("gpu", "linear", 8, (32, 8e-3)),
        ("gpu", "sqrt", 4, (32, 2e-3)),
        ("gpu", "linear", 1, (32, 1e-3)),
    ],
)
def test_batch_per_gpu_gives_each_rank_the_batch_and_scales_the_lr(batch_per, scaling, world, expected):
    from dmlkit.config import TrainConfig
    from dmlkit.training.setup import batch_plan

    t = TrainConfig(batch_size=32, lr=1e-3, batch_per=batch_per, lr_scaling=scaling)
    per_rank, lr = batch_plan(t, world)
    assert per_rank == expected[0] and lr == pytest.approx(expected[1])


def test_cuda_flags_follow_the_runtime_config():
    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        runtime.configure_cuda(benchmark=True, tf32=False)
        assert torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
        runtime.configure_cuda(benchmark=False, tf32=True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
