"""Export for code competitions (GUIE 2022, Landmark Retrieval 2020): one self-contained embedding
module. Input: uint8 RGB (or gray) images (B, C, S, S) at the members' size, resized like the
pipeline resizes (OpenCV, linear). Output: the L2-normalised embedding the pipeline computes —
normalisation, backbone, pooling, neck, the configured TTA (flip, scales), the members' weighted
concatenation. Written as TorchScript (`.pt`) and, under `export.onnx` (the default), as ONNX (`.onnx`): a model
that does not export is an error naming the members, not a missing file found in the notebook.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .build import load_member
from .config import Config, MemberConfig
from .errors import ExportError
from .models.backbone import EmbeddingModel
from .models.embedder import ExportedEmbedder
from .pipeline.context import Context
from .stages.train import run_refit, run_train

log = logging.getLogger(__name__)


def export_members(
    cfg: Config,
    members: list[MemberConfig],
    models: list[EmbeddingModel],
    out: Path,
    onnx: bool = True,
    weights: list[float] | None = None,
) -> dict[str, Path]:
    """Trace the members' embedder into `out` (TorchScript) and `out` with `.onnx`; returns what was
    written. The members must share image size and channels (one input for all)."""
    sizes = {(m.image_size, m.in_chans) for m in members}
    if len(sizes) != 1:
        raise ValueError(
            f"export: members {[m.name for m in members]} take different inputs {sorted(sizes)}; "
            "export one with --member NAME"
        )
    (size, channels) = sizes.pop()
    weights = weights or [cfg.ensemble.weights.get(m.name, 1.0) for m in members]
    module = ExportedEmbedder(
        [m.eval() for m in models], weights, size, tta_flip=cfg.embed.tta_flip, tta_scales=cfg.embed.tta_scales
    ).eval()
    example = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = {}
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
        tmp = out.with_name(out.name + ".tmp")
        traced.save(str(tmp))
        tmp.replace(out)
        written["torchscript"] = out
        if onnx:
            written["onnx"] = _export_onnx(module, example, out.with_suffix(".onnx"), [m.name for m in members])
    meta = {
        "members": [m.name for m in members],
        "input": f"uint8 {'RGB' if channels == 3 else 'gray'} (B, {channels}, {size}, {size}), resized with "
        "OpenCV INTER_LINEAR",
        "image_size": size,
        "channels": channels,
        "embedding_size": int(sum(m.embedding_size for m in members)),
        "tta_flip": cfg.embed.tta_flip,
        "tta_scales": cfg.embed.tta_scales,
        "files": {k: str(v) for k, v in written.items()},
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return written


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path, names: list[str]) -> Path:
    try:
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
            dynamo=False,
        )
    except Exception as exc:  # a missing onnx package or an operator without ONNX export
        path.unlink(missing_ok=True)
        raise ExportError(
            f"export: members {names} do not export to ONNX ({type(exc).__name__}: {exc}); the TorchScript "
            "file is written: set export.onnx=false to export it alone, or export the members one by one "
            "with --member NAME to find the one that fails"
        ) from None
    return path


def run_export(ctx: Context, member_names: list[str] | None = None, out: Path | None = None) -> dict[str, Path]:
    """The members (trained, or reused from the cache) exported as one embedding module (traced on
    the CPU: the file runs on any device)."""
    names = member_names or ctx.cfg.export.members or [m.name for m in ctx.cfg.members]
    members = [ctx.cfg.member(name) for name in names]
    cpu = torch.device("cpu")
    exported, models, weights = [], [], []
    for member in members:  # the models that answer the test: a refit member's refit model (and fold model)
        weight = ctx.cfg.ensemble.weights.get(member.name, 1.0) / (2.0**0.5 if member.refit == "ensemble" else 1.0)
        arts = [] if member.refit == "replace" else [run_train(ctx, member.name)]
        arts += [run_refit(ctx, member.name)] if member.refit != "off" else []
        for art in arts:
            exported.append(member)
            models.append(load_member(art.file("best.pt"), member, cpu)[0])
            weights.append(weight)
    suffix = "" if len(names) == len(ctx.cfg.members) else "-" + "-".join(names)
    out = out or ctx.submissions / f"{ctx.cfg.experiment}{suffix}.pt"
    written = export_members(ctx.cfg, exported, models, out, ctx.cfg.export.onnx, weights)
    for kind, path in written.items():
        log.info("[export] %s: %s", kind, path)
    return written
