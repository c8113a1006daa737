"""What torchrun on a GPU box needs, checked on the CPU: parameters DDP would wait for, timm's
SyncBatchNorm conversion, the process group's timeout, skip decisions agreed by every rank, and
the warning for a CUDA build that finds no GPU."""

import datetime
import logging
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port, write_tiny_config
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

    from dmlkit.stages.train import sync_batchnorm

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

    from dmlkit.stages.train import gradient_sync

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
