"""The schema of one ensemble member: its backbone, head, SEE and training (`member_defaults`
merges into every entry of `members`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .base import Strict, plain_name

# train.augment presets (albumentations specs; 'image_size' is the member's). A horizontal flip joins
# each where train.flip allows it. Measured on the demos and the peer benchmark: benchmarks/README.md
# ("Peers and presets").
_CROP = {"type": "RandomResizedCrop", "size": ["image_size", "image_size"]}
AUGMENT_PRESETS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "light": [{**_CROP, "scale": [0.8, 1.0]}],
    "default": [
        {**_CROP, "scale": [0.6, 1.0]},
        {"type": "ColorJitter", "brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.05, "p": 0.8},
    ],
    "strong": [
        {**_CROP, "scale": [0.4, 1.0]},
        {"type": "Affine", "rotate": [-15, 15], "shear": [-8, 8], "p": 0.5},
        {"type": "ColorJitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p": 0.8},
    ],
}
HORIZONTAL_FLIP = {"type": "HorizontalFlip", "p": 0.5}


def augment_specs(augment: str | list[dict[str, Any]], flip: bool) -> list[dict[str, Any]]:
    """train.augment as albumentations specs: a preset with its flip where `flip` allows it (none: no
    transform at all), or the list."""
    if augment == "none":
        return []
    if isinstance(augment, str):
        return [*AUGMENT_PRESETS[augment], *([HORIZONTAL_FLIP] if flip else [])]
    return [dict(spec) for spec in augment]


class AuxHeadConfig(Strict):
    """A second margin head on another label column of the training table (Happywhale 2022 1st:
    species, loss weights identity 0.437 and species 0.563). Rows without a value in the column
    (pseudo-labelled test images, blanks) take no part in its loss."""

    column: str = Field(description="a column of the competition's training table, e.g. species")
    weight: float = Field(0.563, ge=0.0, description="the auxiliary loss's weight")
    identity_weight: float = Field(0.437, gt=0.0, description="the identity loss's weight beside it")
    subcenters: int = Field(1, ge=1, description="sub-centers per auxiliary class")
    scale: float = Field(30.0, gt=0.0, description="the auxiliary head's logit scale s")
    margin: float = Field(0.3, ge=0.0, description="ArcFace margin of every auxiliary class")


class HeadConfig(Strict):
    type: Literal["arcface", "cosface", "none", "proxy_anchor"] = Field(
        "arcface", description="margin softmax (arcface, cosface, none) or pytorch-metric-learning's Proxy-Anchor"
    )
    proxy_margin: float = Field(0.1, description="Proxy-Anchor's margin δ")
    proxy_alpha: float = Field(32.0, gt=0, description="Proxy-Anchor's scale α")
    subcenters: int = Field(1, ge=1, description="sub-centers per class (K=3: noisy labels, Deng et al. 2020)")
    scale: float | Literal["adacos"] = Field(
        30.0, description="logit scale s; adacos: √2·log(C−1), fixed from the class count C (AdaCos)"
    )
    margin: float = Field(0.3, ge=0.0, description="fixed margin, used when dynamic is 'none'")
    dynamic: Literal["none", "glr3", "power"] = Field(
        "none", description="margins from class sizes (glr3: GLR2020 3rd, power: Humpback 2019); none: head.margin"
    )
    dynamic_a: float = Field(0.45, description="dynamic margins: the span a (glr3: m = a·t + b; power: m = a·n^λ + b)")
    dynamic_b: float = Field(0.05, description="dynamic margins: the smallest margin b")
    dynamic_lambda: float = Field(-0.25, description="power: the exponent λ on the class size n")
    matmul: Literal["amp", "fp32"] = Field(
        "amp",
        description="precision of the embeddings × sub-centers product in training: the autocast dtype "
        "(bf16/fp16, fp32 accumulation; the margin math stays fp32) or fp32",
    )
    sample_rate: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Partial FC: the share of classes in each training step's softmax (the batch's "
        "classes plus random others); 0.1 at 100k+ classes costs a tenth of the head's matmuls",
    )
    aux: AuxHeadConfig | None = Field(None, description="an auxiliary head on a second label column (species)")


class SEEConfig(Strict):
    """SEE as published is Proxy-Anchor + SEE with `gradient: proxies`; with margin heads (ArcFace,
    CosFace, sub-centers) or `gradient: backbone` it is this project's extension."""

    enabled: bool = Field(False, description="train with Spherical Embedding Expansion's synthetic rows")
    n_expansion: int = Field(
        16, ge=1, description="synthetic rows drawn around each selected embedding (a simplex's vertices)"
    )
    weight: float = Field(0.2, ge=0.0, description="the synthetic rows' loss weight beside the real rows'")
    gradient: Literal["proxies", "backbone"] = Field(
        "proxies",
        description="proxies (the paper's): the synthetic rows are built from detached embeddings, so their "
        "loss trains the head's proxies / class centres only; backbone (extension): it also reaches the backbone",
    )
    schedule: Literal["top_fraction", "threshold"] = Field(
        "top_fraction",
        description="top_fraction: the top round(B·fraction) of the global batch by cosine to the centre; "
        "threshold: every sample with cosine ≥ a threshold",
    )
    start: float = Field(
        0.04, description="fraction (top_fraction, rising) or cosine threshold (threshold, falling) at epoch 0"
    )
    end: float = Field(0.4, description="value approached at the last epoch (progress e/E, cosine schedule)")
    lower_bound: float | None = Field(None, description="threshold schedule only: the threshold never goes below it")


class TrainStage(Strict):
    """One stage of progressive resizing (GLR2020 3rd: 256 → 512 → 672 px; GLR2021 1st: 256 → 448 →
    448 px at a lower LR): the member continues from the previous stage's weights at this size."""

    image_size: int = Field(ge=16, description="this stage's training size (px)")
    epochs: int = Field(ge=1, description="this stage's epochs")
    lr: float | None = Field(None, gt=0, description="this stage's LR (default: train.lr)")
    freeze_backbone_epochs: int = Field(0, ge=0, description="GLR2021 1st: one epoch at the new size frozen")
    reinit_head: bool = Field(False, description="start this stage with a new head (the backbone continues)")


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1, description="passes over the member's training rows")
    batch_size: int = Field(64, ge=2, description="images per optimiser step (see batch_per)")
    batch_per: Literal["global", "gpu"] = Field(
        "global",
        description="what batch_size counts under torchrun: the global batch, split over the ranks (the "
        "same optimisation as one process), or each GPU's batch (the global batch grows with the GPU count)",
    )
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="with batch_per: gpu, lr (given for one process's batch) times the number of ranks "
        "(linear, Goyal et al. 2017) or its square root (sqrt, for Adam-type optimizers)",
    )
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="the optimiser (sgd: momentum 0.9, Nesterov)")
    lr: float = Field(
        1e-3, gt=0, description="peak learning rate of the backbone and neck (linear warmup, cosine decay)"
    )
    head_lr_mult: float = Field(10.0, gt=0, description="the head's learning rate as a multiple of lr")
    weight_decay: float = Field(
        1e-4,
        description="weight decay (AdamW: decoupled) on every parameter; norms and biases exempt only with layer_decay",
    )
    warmup_epochs: float = Field(1.0, ge=0, description="epochs of linear warmup before the schedule")
    schedule: Literal["auto", "cosine", "constant"] = Field(
        "auto",
        description="after the warmup: cosine decay to 1% of lr, or lr to the end (OML's and PML's examples); auto: "
        "cosine for a member that starts from trained weights (pretrained, pretrained_file, init_from), constant "
        "from random init (benchmarks/README.md, 'Peers')",
    )
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto",
        description="mixed precision: auto is bf16 where the device runs it natively, fp16 on older GPUs, else fp32",
    )

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads an unquoted `off` as false

    grad_accum: int = Field(1, ge=1, description="batches whose gradients add up to one step")
    clip_grad: float | None = Field(5.0, description="the gradients' global norm is clipped to this (null: never)")
    ema: float | None = Field(None, description="EMA decay of the weights, e.g. 0.999")
    num_workers: int = Field(0, ge=0, description="DataLoader processes decoding and augmenting images")
    channels_last: bool = Field(True, description="NHWC memory layout (faster convolutions in bf16/fp16)")
    sync_bn: bool = Field(False, description="SyncBatchNorm across GPUs under torchrun (CUDA only)")
    freeze_bn: bool = Field(False, description="BatchNorm layers use and keep their running statistics")
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="a non-finite loss stops training with the step named (stop) or its step is skipped (skip)"
    )
    strict_images: bool = Field(False, description="fail on an unreadable training image instead of skipping")
    validate_every: int = Field(1, ge=1, description="epochs between validations (the last epoch always validates)")
    freeze_backbone_epochs: int = Field(
        0, ge=0, description="head-first: the first N epochs train neck and head with the backbone frozen (BN too)"
    )
    layer_decay: float | None = Field(
        None, gt=0.0, le=1.0, description="layer-wise LR decay (timm's layer groups), e.g. 0.75 for ViTs"
    )
    class_rotations: list[Literal[90, 180, 270]] = Field(
        default_factory=list,
        description="each training class rotated by these angles becomes a class of its own (Omniglot "
        "practice, Santoro et al. 2016); the saved head keeps the original classes only",
    )
    augment: Literal["none", "light", "default", "strong"] | list[dict[str, Any]] = Field(
        "default",
        description="a preset (none | light | default | strong: AUGMENT_PRESETS in config/members.py; light, "
        "default and strong with a horizontal flip where train.flip allows it) or albumentations transforms: "
        "[{type: Affine, rotate: [-10, 10]}, ...]",
    )
    flip: bool = Field(
        True,
        description="a mirrored image shows the same identity: the augment presets flip it half the time; false "
        "where a mirror is another identity (a whale's left and right flank, a character)",
    )
    crops: dict[str, float] = Field(
        default_factory=dict,
        description="per training sample a box source drawn with these probabilities (sum 1; 'none': the "
        "whole image), e.g. {fullbody: 0.6, backfin: 0.15, none: 0.05} (Happywhale 2022 1st); needs competition.boxes",
    )
    stages: list[TrainStage] = Field(
        default_factory=list,
        description="progressive sizes: the member trains through these stages in order (each stage's "
        "image_size, epochs, lr and freeze_backbone_epochs replace the member's); the last one's size is the "
        "member's image_size",
    )


class MemberConfig(Strict):
    name: str = Field(description="the member's name: its artifacts folder and export file")
    backbone: str = Field(description="a timm model name, e.g. resnet50 or convnext_tiny")
    fold: int = Field(ge=0, description="the fold it validates on (it trains on the others)")
    image_size: int = Field(ge=16, description="training and embedding size (px, square)")
    in_chans: int = Field(3, description="input channels: 3 (RGB) or 1 (gray)")
    backbone_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="more timm.create_model arguments, e.g. {drop_path_rate: 0.1}"
    )
    pretrained: bool = Field(False, description="timm's hub weights (downloaded once into the hub cache)")
    pretrained_tag: str | None = Field(None, description="which of timm's weights, e.g. augreg_in21k_ft_in1k")
    pretrained_file: str | None = Field(None, description="local timm weights (.safetensors/.pth)")
    pool: Literal["auto", "gem", "model"] = Field(
        "auto",
        description="GeM over the feature map (tokens laid on their grid), or the model's own pooling "
        "(class token / token average); auto: GeM for CNN maps, the model's own for transformers (tokens, "
        "Swin's NHWC maps, whose LayerNorm outputs GeM's clamp would cut)",
    )
    neck: Literal["linear_bn_prelu", "linear_bn", "linear", "none"] = Field(
        "linear_bn_prelu",
        description="the layers from the pooled features to the embedding: Linear, BatchNorm1d, PReLU (default) or "
        "fewer; none: the pooled features themselves (embedding_size must be the backbone's feature count)",
    )
    embedding_size: int = Field(512, ge=8, description="the neck's output: the embedding's dimension")
    gem_p: float = Field(3.0, description="GeM pooling's starting power p (1: average, ∞: max)")
    gem_learnable: bool = Field(True, description="GeM's p is trained")
    init_from: str | None = Field(None, description="another member whose trained weights start this one")
    refit: Literal["off", "replace", "ensemble"] = Field(
        "off",
        description="full-data refit: after training on its fold, the member trains again on every training row "
        "(every fold and class) with the same schedule; the test is answered by the refit model (replace, or "
        "true) or by both models concatenated (ensemble), while validation, ensemble tuning and the 'new' "
        "threshold use the fold model (retrieve.refit_threshold says how the threshold carries over)",
    )

    @field_validator("refit", mode="before")
    @classmethod
    def _refit_bool(cls, value: Any) -> Any:
        return {True: "replace", False: "off"}.get(value, value) if isinstance(value, bool) else value

    head: HeadConfig = Field(HeadConfig(), description="the training head (margin softmax or Proxy-Anchor)")
    see: SEEConfig = Field(SEEConfig(), description="Spherical Embedding Expansion")
    train: TrainConfig = Field(TrainConfig(), description="the training schedule and its data")

    @field_validator("name")
    @classmethod
    def _plain_member_name(cls, value: str) -> str:
        return plain_name(value, "the member's artifacts folder and its export file")


def member_schedule(member: MemberConfig) -> str:
    """The member's learning-rate schedule after the warmup, `train.schedule: auto` resolved."""
    if member.train.schedule != "auto":
        return member.train.schedule
    warm_start = member.pretrained or member.pretrained_file is not None or member.init_from is not None
    return "cosine" if warm_start else "constant"
