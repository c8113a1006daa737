"""Full training step (backbone, GeM, neck, sub-center ArcFace with dynamic margins, SEE, loss, AdamW)
vs the pipeline's backbone-only step and the bare timm backbone (bf16 + channels_last: the bound) on
the same batch: with a GLR2020-sized head (full softmax and Partial FC 0.1), the demo member and
Omniglot's member. `share_of_bare` = bare step time / pipeline step time."""

from __future__ import annotations

import argparse
import functools

import numpy as np
import timm
import torch
from common import interleaved_best, report

from dmlkit.build import build_member_head, build_model, build_objective, optimizer_settings
from dmlkit.config import HeadConfig, MemberConfig, SEEConfig, TrainConfig
from dmlkit.inference import autocast_dtype
from dmlkit.models.optim import make_optimizer
from dmlkit.process import keep_freed_memory


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The pipeline's autocast: off where `amp: auto` trains in fp32 (a CPU without native bf16)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def measure(
    backbone: str,
    size: int,
    batch: int,
    classes: int,
    see: bool,
    repeats: int,
    device: torch.device,
    with_pml: bool,
    profile: int = 0,
    sample_rates: tuple[float, ...] = (1.0,),
    in_chans: int = 3,
    subcenters: int = 3,
    dynamic: str = "glr3",
) -> list[dict]:
    """Times, on one batch: the bare timm backbone (the pipeline's autocast + channels_last, the bound), the
    pipeline's backbone-only step, and the pipeline's full step at each Partial FC sample rate."""
    member = MemberConfig(
        name="bench",
        backbone=backbone,
        fold=0,
        image_size=size,
        in_chans=in_chans,
        head=HeadConfig(subcenters=subcenters, dynamic=dynamic, sample_rate=sample_rates[0]),
        see=SEEConfig(enabled=see),
        train=TrainConfig(batch_size=batch),
    )
    torch.manual_seed(0)
    model = build_model(member).to(device).to(memory_format=torch.channels_last)
    counts = np.random.default_rng(0).zipf(1.5, classes).clip(1, 1000)
    head = build_member_head(member, counts).to(device)
    images = torch.randint(0, 256, (batch, in_chans, size, size), dtype=torch.uint8, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    floats = ((images.float() - model.pixel_mean) / model.pixel_std).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), device=device)
    dtype = autocast_dtype(device, "auto")
    full = build_objective(member, model, head)
    bare = timm.create_model(backbone, num_classes=0, in_chans=in_chans).to(device)
    bare = bare.to(memory_format=torch.channels_last)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    opt_bare = make_optimizer(optimizer_settings(member.train), list(bare.parameters()), [], device)

    def bare_step():
        with autocast(device, dtype):
            loss = bare(floats).float().pow(2).mean()
        loss.backward()
        opt_bare.step()
        opt_bare.zero_grad(set_to_none=True)
        sync()

    opt_backbone = make_optimizer(optimizer_settings(member.train), list(model.parameters()), [], device)

    def backbone_step():
        with autocast(device, dtype):
            loss = model(images).float().pow(2).mean()
        loss.backward()
        opt_backbone.step()
        opt_backbone.zero_grad(set_to_none=True)
        sync()

    generator = torch.Generator().manual_seed(0)
    optimizers = {
        rate: make_optimizer(
            optimizer_settings(member.train),
            model,
            list(head.parameters()),
            device,
            head.touched_rows if rate < 1 else None,
        )
        for rate in sample_rates
    }

    def full_step(rate: float) -> None:
        full.sample_rate = rate
        with autocast(device, dtype):
            loss, _ = full(images, labels, 0.4, generator)
        loss.backward()
        optimizers[rate].step()
        optimizers[rate].zero_grad(set_to_none=True)
        sync()

    head_step = head_alone_step(head, member, batch, labels, dtype, device, sample_rates[-1], sync)
    steps = [bare_step, backbone_step, head_step] + [functools.partial(full_step, rate) for rate in sample_rates]
    t_bare, t_backbone, t_head, *t_full = interleaved_best(steps, repeats)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            full_step(sample_rates[-1])
        print(f"\nprofile of one full step ({backbone}, {classes} classes, sample rate {sample_rates[-1]}):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile))
    one_channel = " 1-ch" if in_chans == 1 else ""
    precision = "fp32" if dtype is None else str(dtype).removeprefix("torch.")
    setting = f"{backbone} {size}px b{batch}{one_channel}, {classes} classes ×{subcenters} ({dynamic}), SEE={see}"
    rows = [
        {
            "setting": setting,
            "variant": f"bare timm backbone, {precision} + channels_last (bound)",
            "step_s": round(t_bare, 3),
        },
        {
            "setting": "",
            "variant": "pipeline backbone only (uint8 in, GeM, neck)",
            "step_s": round(t_backbone, 3),
            "overhead_%": 0.0,
            "share_of_bare": round(t_bare / t_backbone, 3),
        },
    ]
    for rate, seconds in zip(sample_rates, t_full, strict=True):
        softmax = "full softmax" if rate >= 1 else f"Partial FC {rate:g}"
        rows.append(
            {
                "setting": "",
                "variant": f"pipeline full step ({softmax})",
                "step_s": round(seconds, 3),
                "overhead_%": round(100 * (seconds / t_backbone - 1), 1),
                "share_of_bare": round(t_bare / seconds, 3),
            }
        )
    softmax = "full softmax" if sample_rates[-1] >= 1 else f"Partial FC {sample_rates[-1]:g}"
    rows.append(
        {
            "setting": "",
            "variant": f"head + loss + optimizer alone, from fixed embeddings ({softmax})",
            "step_s": round(t_head, 3),
            "overhead_%": round(100 * t_head / t_backbone, 1),
        }
    )
    if with_pml:
        rows.append(pml_row(model, member, classes, images, labels, dtype, device, t_backbone, repeats, sync))
    return rows


class _Fixed(torch.nn.Module):
    """Stands in for the embedding model: the same leaf embeddings every step."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = torch.nn.Parameter(embeddings)

    def forward(self, images) -> torch.Tensor:
        return self.embeddings * 1.0


def head_alone_step(head, member, batch, labels, dtype, device, rate, sync):
    """The head's own step (margin loss, SEE, backward, optimizer) from fixed embeddings: its share of
    the step without the backbone's run-to-run swing in a difference of two step times."""
    fixed = _Fixed(torch.randn(batch, member.embedding_size, device=device))
    objective = build_objective(member, fixed, head)
    objective.sample_rate = rate
    rows = head.touched_rows if rate < 1 else None
    optimizer = make_optimizer(optimizer_settings(member.train), fixed, list(head.parameters()), device, rows)
    generator = torch.Generator().manual_seed(1)

    def step() -> None:
        with autocast(device, dtype):
            loss, _ = objective(None, labels, 0.4, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    return step


def pml_row(model, member, classes, images, labels, dtype, device, t_backbone, repeats, sync) -> dict:
    from pytorch_metric_learning.losses import SubCenterArcFaceLoss

    pml = SubCenterArcFaceLoss(num_classes=classes, embedding_size=member.embedding_size, sub_centers=3).to(device)
    opt_pml = torch.optim.AdamW([{"params": model.parameters()}, {"params": pml.parameters(), "lr": 1e-2}], lr=1e-3)

    def pml_step():
        with autocast(device, dtype):
            emb = model(images)
        loss = pml(emb.float(), labels)
        loss.backward()
        opt_pml.step()
        opt_pml.zero_grad(set_to_none=True)
        sync()

    (t_pml,) = interleaved_best([pml_step], repeats)
    return {
        "setting": "",
        "variant": "PML SubCenterArcFaceLoss + AdamW",
        "step_s": round(t_pml, 3),
        "overhead_%": round(100 * (t_pml / t_backbone - 1), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench train_step")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print a torch.profiler table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    keep_freed_memory()  # as the pipeline's CLI does
    try:
        import pytorch_metric_learning  # noqa: F401

        with_pml = True
    except ImportError:
        with_pml = False
    repeats = 2 if args.quick else 5
    # GLR2020 (81k classes): the full softmax and Partial FC at the paper's rate 0.1 (configs/glr2020.yaml).
    rows = measure("resnet50", 224, 32, 81313, True, repeats, device, with_pml, args.profile, (1.0, 0.1))
    # the demo members and Omniglot's (771 characters trained, each also rotated 3 ways), with their
    # configs' head (plain ArcFace); Omniglot's also with the sub-center head the configs had before
    plain = {"subcenters": 1, "dynamic": "none"}
    rows += measure("resnet18", 64, 32, 250, False, repeats * 2, device, False, **plain)
    rows += measure("resnet10t", 48, 128, 3084, False, repeats * 2, device, False, in_chans=1, **plain)
    rows += measure("resnet10t", 48, 128, 3084, False, repeats * 2, device, False, in_chans=1)
    report(
        "train_step",
        rows,
        {
            "targets": "Partial FC full step (and the head alone) ≤ 10% over the backbone-only step "
            "(resnet50 224 px b32, GLR2020 head); "
            "every pipeline step ≥ 90% of the bare backbone step (share_of_bare ≥ 0.9)"
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
