"""Export for code competitions (GUIE 2022, Landmark Retrieval 2020): one self-contained embedding
module. Input: uint8 RGB (or gray) images (B, C, S, S) at the members' size, resized like the
pipeline resizes (OpenCV, linear). Output: the L2-normalised embedding the pipeline computes —
normalisation, backbone, pooling, neck, the configured TTA (flip, scales), the members' weighted
concatenation. Written as TorchScript (`.pt`), and as ONNX where the model exports (`.onnx`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, EmbedConfig, MemberConfig
from ..models.backbone import EmbeddingModel

log = logging.getLogger(__name__)


class ExportedEmbedder(nn.Module):
    """The members' embedding of uint8 images, TTA and ensemble included (see the module docstring)."""

    def __init__(self, models: list[EmbeddingModel], weights: list[float], embed: EmbedConfig, image_size: int):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.weights = [float(w) for w in weights]
        self.flip = embed.tta_flip
        self.sizes = [max(16, int(round(image_size * s))) for s in embed.tta_scales]
        self.image_size = image_size

    def _views(self, images: torch.Tensor) -> list[torch.Tensor]:
        views = []
        for size in self.sizes:
            view = images
            if size != self.image_size:  # bilinear, no antialiasing: as OpenCV's INTER_LINEAR
                scaled = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
                view = scaled.round().clamp(0, 255).to(torch.uint8)
            views.append(view)
            if self.flip:
                views.append(view.flip(-1))
        return views

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = self._views(images)
        parts = []
        for model, weight in zip(self.models, self.weights, strict=True):
            total = model(views[0])
            for view in views[1:]:
                total = total + model(view)
            parts.append(F.normalize(total, dim=1) * weight)
        return F.normalize(torch.cat(parts, dim=1), dim=1)


def export_members(
    cfg: Config, members: list[MemberConfig], models: list[EmbeddingModel], out: Path, onnx: bool = True
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
    weights = [cfg.ensemble.weights.get(m.name, 1.0) for m in members]
    module = ExportedEmbedder([m.eval() for m in models], weights, cfg.embed, size).eval()
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
            path = _export_onnx(module, example, out.with_suffix(".onnx"))
            if path:
                written["onnx"] = path
    meta = {
        "members": [m.name for m in members],
        "input": f"uint8 {'RGB' if channels == 3 else 'gray'} (B, {channels}, {size}, {size}), resized with "
        "OpenCV INTER_LINEAR",
        "embedding_size": int(sum(m.embedding_size for m in members)),
        "tta_flip": cfg.embed.tta_flip,
        "tta_scales": cfg.embed.tta_scales,
        "files": {k: str(v) for k, v in written.items()},
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return written


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> Path | None:
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
        log.warning("export: ONNX not written (%s: %s); the TorchScript file is complete", type(exc).__name__, exc)
        path.unlink(missing_ok=True)
        return None
    return path
