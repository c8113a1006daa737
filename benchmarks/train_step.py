"""Full training step (backbone, GeM, neck, sub-center ArcFace with dynamic margins, SEE, loss, AdamW)
vs the backbone-only step on the same batch, with a GLR2020-sized head and with the demo config."""

from __future__ import annotations

import argparse
import functools

import numpy as np
import torch
from common import interleaved_best, report

from dmlkit.config import HeadConfig, MemberConfig, SEEConfig, TrainConfig
from dmlkit.inference import autocast_dtype
from dmlkit.models.build import build_member_head, build_model
from dmlkit.models.objective import MarginModel
from dmlkit.models.optim import make_optimizer


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
) -> list[dict]:
    member = MemberConfig(
        name="bench",
        backbone=backbone,
        fold=0,
        image_size=size,
        head=HeadConfig(subcenters=3, dynamic="glr3", sample_rate=sample_rates[0]),
        see=SEEConfig(enabled=see),
        train=TrainConfig(batch_size=batch),
    )
    torch.manual_seed(0)
    model = build_model(member).to(device)
    counts = np.random.default_rng(0).zipf(1.5, classes).clip(1, 1000)
    head = build_member_head(member, counts).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), device=device)
    dtype = autocast_dtype(device, "auto")
    full = MarginModel(model, head, member)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    opt_backbone = make_optimizer(member.train, list(model.parameters()), [], device)

    def backbone_step():
        with torch.autocast(device.type, dtype=dtype):
            loss = model(images).float().pow(2).mean()
        loss.backward()
        opt_backbone.step()
        opt_backbone.zero_grad(set_to_none=True)
        sync()

    opt_full = make_optimizer(member.train, list(model.parameters()), list(head.parameters()), device)
    generator = torch.Generator().manual_seed(0)

    def full_step(rate: float) -> None:
        full.sample_rate = rate
        with torch.autocast(device.type, dtype=dtype):
            loss, _ = full(images, labels, 0.4, generator)
        loss.backward()
        opt_full.step()
        opt_full.zero_grad(set_to_none=True)
        sync()

    steps = [backbone_step] + [functools.partial(full_step, rate) for rate in sample_rates]
    t_backbone, *t_full = interleaved_best(steps, repeats)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            full_step(sample_rates[-1])
        print(f"\nprofile of one full step ({backbone}, {classes} classes, sample rate {sample_rates[-1]}):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile))
    rows = [
        {
            "setting": f"{backbone} {size}px b{batch}, {classes} classes ×3, SEE={see}",
            "variant": "backbone only",
            "step_s": round(t_backbone, 3),
            "overhead_%": 0.0,
        }
    ]
    for rate, seconds in zip(sample_rates, t_full, strict=True):
        softmax = "full softmax" if rate >= 1 else f"Partial FC {rate:g}"
        rows.append(
            {
                "setting": "",
                "variant": f"full step (dmlkit, {softmax})",
                "step_s": round(seconds, 3),
                "overhead_%": round(100 * (seconds / t_backbone - 1), 1),
            }
        )
    if with_pml:
        from pytorch_metric_learning.losses import SubCenterArcFaceLoss

        pml = SubCenterArcFaceLoss(num_classes=classes, embedding_size=member.embedding_size, sub_centers=3).to(device)
        opt_pml = torch.optim.AdamW([{"params": model.parameters()}, {"params": pml.parameters(), "lr": 1e-2}], lr=1e-3)

        def pml_step():
            with torch.autocast(device.type, dtype=dtype):
                emb = model(images)
            loss = pml(emb.float(), labels)
            loss.backward()
            opt_pml.step()
            opt_pml.zero_grad(set_to_none=True)
            sync()

        (t_pml,) = interleaved_best([pml_step], repeats)
        rows.append(
            {
                "setting": "",
                "variant": "PML SubCenterArcFaceLoss + AdamW",
                "step_s": round(t_pml, 3),
                "overhead_%": round(100 * (t_pml / t_backbone - 1), 1),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench train_step")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print a torch.profiler table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    try:
        import pytorch_metric_learning  # noqa: F401

        with_pml = True
    except ImportError:
        with_pml = False
    repeats = 2 if args.quick else 5
    # GLR2020 (81k classes): the full softmax and Partial FC at the paper's rate 0.1 (configs/glr2020.yaml).
    rows = measure("resnet50", 224, 32, 81313, True, repeats, device, with_pml, args.profile, (1.0, 0.1))
    rows += measure("resnet18", 64, 32, 250, True, repeats * 2, device, False)
    report("train_step", rows, {"target": "overhead ≤ 10% with resnet50 at 224 px, batch 32, GLR2020 head"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
