"""A timm backbone → pooling → neck (Linear/BatchNorm1d/PReLU by default) → L2-normalised embedding.

Any timm image model: CNNs give NCHW maps, Swin-like models NHWC maps, ViT/DeiT/EVA/CLIP-ViT
tokens (B, N, C). Token models are created for the member's image size (and, where timm allows,
for any size, so TTA scales work). Pooling is GeM over the map — for tokens, over the patch tokens
laid back on their grid — or the model's own rule (class token or token average: timm's
`global_pool`); by default GeM for CNN maps and the model's own for transformers.
"""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg
from torch import nn

from ..errors import PretrainedWeightsError


class GeM(nn.Module):
    """Generalised mean pooling over the last two axes; p=1 is average pooling, p→∞ max pooling.
    Computed in fp32."""

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float().clamp(min=1.0)
        return x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


NECKS = ("linear_bn_prelu", "linear_bn", "linear", "none")


def make_neck(kind: str, channels: int, embedding_size: int) -> nn.Module:
    """The layers between the pooled features and the embedding. `none`: the pooled features are the
    embedding (as OML's and PML's examples use a timm model), so `embedding_size` must be `channels`.
    The default's layer names (neck.0/1/2) are those of every checkpoint written before this option."""
    if kind == "none":
        if embedding_size != channels:
            raise ValueError(
                f"neck 'none' embeds the backbone's {channels} pooled features: set embedding_size: {channels}"
            )
        return nn.Identity()
    layers = {
        "linear_bn_prelu": [nn.BatchNorm1d(embedding_size), nn.PReLU()],
        "linear_bn": [nn.BatchNorm1d(embedding_size)],
        "linear": [],
    }
    if kind not in layers:
        raise ValueError(f"unknown neck '{kind}' (one of {NECKS})")
    return nn.Sequential(nn.Linear(channels, embedding_size), *layers[kind])


def check_backbone(name: str, where: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:4]}*")[:8]
        raise ValueError(f"{where}: unknown timm backbone '{name}' (similar names: {close})")


def model_name(backbone: str, tag: str | None) -> str:
    return f"{backbone}.{tag}" if tag else backbone


def fetch_pretrained(backbone: str, tag: str | None, where: str) -> None:
    """Get timm's hub weights into the local hub cache now (loading them once), so that a missing
    download stops the run before anything trains, not when this member's turn comes."""
    name = model_name(backbone, tag)
    try:
        timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:  # offline, unknown tag, weights not published: all end the same way
        raise PretrainedWeightsError(
            f"{where}: cannot get timm's pretrained weights for '{name}' ({type(exc).__name__}: {exc}). "
            "Offline? Run once online (they stay in the hub cache), or set pretrained_file to a local "
            ".safetensors/.pth file"
        ) from None


def save_hub_weights(backbone: str, tag: str | None, out_dir: Path, where: str) -> Path:
    """timm's hub weights of `backbone` written to `out_dir/<name>.safetensors`, for a machine that
    trains offline (`pretrained_file`) or a code competition's weights dataset."""
    fetch_pretrained(backbone, tag, where)  # the clear offline error
    model = timm.create_model(model_name(backbone, tag), pretrained=True, num_classes=0)
    path = Path(out_dir) / f"{model_name(backbone, tag)}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return path


def create_backbone(
    backbone: str,
    in_chans: int = 3,
    image_size: int | None = None,
    pretrained: bool = False,
    pretrained_tag: str | None = None,
    pretrained_file: str | None = None,
    extra: dict | None = None,
) -> nn.Module:
    """The timm model without classifier. Fixed-size models (ViT, Swin, EVA…) are built for
    `image_size`, with dynamic sizes (and padding to the patch size) where the model has them.
    Weights: timm's hub (`pretrained`, optionally `pretrained_tag`) or a local file."""
    kwargs = {"num_classes": 0, "in_chans": in_chans, **(extra or {})}
    name = model_name(backbone, pretrained_tag)
    if pretrained_file:
        if not Path(pretrained_file).is_file():
            raise FileNotFoundError(f"pretrained_file '{pretrained_file}' not found (nothing is downloaded)")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file)})
    elif pretrained:
        kwargs["pretrained"] = True
    fixed = getattr(get_pretrained_cfg(name) or get_pretrained_cfg(backbone), "fixed_input_size", False)
    if fixed and image_size:
        kwargs.setdefault("img_size", image_size)
        # any input size (TTA scales) where the model allows it; ViT/EVA also pad to the patch size
        for dynamic in ({"dynamic_img_size": True, "dynamic_img_pad": True}, {"dynamic_img_size": True}):
            try:
                return timm.create_model(name, **{**dynamic, **kwargs})
            except TypeError as exc:
                if "dynamic_img" not in str(exc):
                    raise
    return timm.create_model(name, **kwargs)


def weights_file_share(
    backbone: str, in_chans: int, image_size: int | None, weights_file: str, extra: dict | None = None
) -> float:
    """The share of the backbone's weights (by elements) that loading `weights_file` sets: timm
    loads a local file non-strictly, so another architecture's file leaves every weight at its
    random start with a log line only. Two models from one seed, with and without the file, differ
    exactly where the file was loaded (a file's weight equal to the start counts as not loaded)."""
    torch.manual_seed(0)
    plain = create_backbone(backbone, in_chans, image_size, extra=extra).state_dict()
    torch.manual_seed(0)
    loaded = create_backbone(backbone, in_chans, image_size, pretrained_file=weights_file, extra=extra).state_dict()
    total = changed = 0
    for name, start in plain.items():
        if not start.is_floating_point():
            continue
        total += start.numel()
        changed += int((loaded[name] != start).sum()) if loaded[name].shape == start.shape else start.numel()
    return changed / max(1, total)


def feature_layout(backbone: nn.Module, features: torch.Tensor) -> str:
    """'tokens' (B, N, C), 'nhwc' or 'nchw' for the output of `forward_features`."""
    if features.ndim == 3:
        return "tokens"
    if features.ndim != 4:
        raise ValueError(f"backbone features of shape {tuple(features.shape)}: expected a map or tokens")
    if str(getattr(backbone, "output_fmt", "")).upper() == "NHWC":
        return "nhwc"
    channels = getattr(backbone, "num_features", features.shape[1])
    return "nhwc" if features.shape[-1] == channels and features.shape[1] != channels else "nchw"


def reached_parameters(output: torch.Tensor) -> set[int]:
    """ids of the leaf tensors `output`'s autograd graph reads (what a backward would give a grad)."""
    reached, seen, stack = set(), set(), [output.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        variable = getattr(fn, "variable", None)  # AccumulateGrad: the leaf it writes into
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return reached


class EmbeddingModel(nn.Module):
    def __init__(  # timm-style keyword options (pooling, neck, weights source) beside the backbone name
        self,
        backbone: str,
        embedding_size: int = 512,
        in_chans: int = 3,
        pretrained_file: str | None = None,
        gem_p: float = 3.0,
        gem_learnable: bool = True,
        image_size: int = 64,
        pool: str = "auto",
        pretrained: bool = False,
        pretrained_tag: str | None = None,
        backbone_kwargs: dict | None = None,
        neck: str = "linear_bn_prelu",
    ):
        super().__init__()
        self.backbone = create_backbone(
            backbone, in_chans, image_size, pretrained, pretrained_tag, pretrained_file, backbone_kwargs
        )
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.enable_grad():  # one forward tells the layout, the channel count, the parameters used
            probe = self.backbone.forward_features(torch.zeros(1, in_chans, image_size, image_size))
        self.backbone.train(was_training)
        self.layout = feature_layout(self.backbone, probe)
        # GeM suits CNN maps (post-ReLU, non-negative). Transformers keep the pooling their hub weights
        # were trained with (class token or token average); from random init GeM over the patch grid
        # scored higher on the landmark demo (benchmarks/README.md, "Backbone families"): `pool: gem`
        self.pool_rule = pool if pool != "auto" else ("gem" if self.layout == "nchw" else "model")
        self.prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0) or 0)
        self.pool = GeM(gem_p, gem_learnable)
        with torch.no_grad():  # the model's own pooling may add layers (MobileNetV3's conv_head)
            channels = self.pooled(probe).shape[-1]
        self.neck = make_neck(neck, channels, embedding_size)
        self.unused_parameters = self._freeze_unreached(probe)
        self.in_chans = in_chans
        self.embedding_size = embedding_size
        self.backbone_frozen = False
        mean, std = self.data_config()
        # uint8 images are normalised here, batched on the model's device (not saved in checkpoints)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1) * 255.0, persistent=False)

    def _freeze_unreached(self, features: torch.Tensor) -> list[str]:
        """Parameters the embedding never reads get requires_grad=False, and their names are returned:
        ConvNeXt's `head.norm` under GeM, GeM's `p` under the model's own pooling. Under DDP a
        trainable parameter without a gradient stops training at the second step ("Expected to have
        finished reduction in the prior iteration"); single-process training is unchanged (such a
        parameter never had a gradient, so no optimizer ever moved it)."""
        was_training = self.training
        self.eval()  # BatchNorm1d on one row
        with torch.enable_grad():
            reached = reached_parameters(self.neck(self.pooled(features).float()))
        self.train(was_training)
        unused = [name for name, p in self.named_parameters() if p.requires_grad and id(p) not in reached]
        for name, param in self.named_parameters():
            if name in unused:
                param.requires_grad_(False)
        return unused

    def data_config(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std from the backbone's own timm config (averaged for one channel)."""
        cfg = timm.data.resolve_model_data_config(self.backbone)
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        if self.in_chans == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        return mean, std

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C) from the backbone's features: GeM over the map (tokens laid on their grid), or the
        model's own pooling (`forward_head` before its classifier)."""
        if self.pool_rule == "model":
            return self.backbone.forward_head(features, pre_logits=True)
        if self.layout == "tokens":
            patches = features[:, self.prefix_tokens :]
            side = math.isqrt(patches.shape[1])
            if side * side != patches.shape[1]:
                raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid for GeM pooling")
            features = patches.transpose(1, 2).reshape(len(patches), -1, side, side)
        elif self.layout == "nhwc":
            features = features.permute(0, 3, 1, 2)
        return self.pool(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unit embeddings of uint8 images (normalised here) or of already normalised float images."""
        if images.dtype == torch.uint8:
            images = (images.float() - self.pixel_mean) / self.pixel_std
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            features = self.backbone.forward_features(images)
            pooled = self.pooled(features) if self.pool_rule == "model" else None
        if pooled is None:
            pooled = self.pooled(features)  # GeM's p keeps learning while the backbone is frozen
        with torch.autocast(device_type=images.device.type, enabled=False):
            return F.normalize(self.neck(pooled.float()), dim=1)


__all__ = ["NECKS", "EmbeddingModel", "GeM", "create_backbone", "make_neck"]
