"""The config's schema: one pydantic model per section, each value checked as the config loads
(types, ranges, allowed values) with the relations between members; the rules for values that
would have no effect are in `checks.py`."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- schema
class CompetitionConfig(Strict):
    name: str = Field(description="adapter name, see dmlkit.competitions.ADAPTERS")
    root: str = Field(description="folder holding the competition's files")
    extra_formats: list[str] = Field(
        default_factory=list, description="more submissions from the same data, e.g. landmark-retrieval"
    )
    demo: str | None = Field(None, description="demo generator that builds `root` when it is missing")
    demo_params: dict[str, Any] = Field(default_factory=dict)
    download: str | None = Field(
        None, description="wildlife: a wildlife-datasets dataset (MacaqueFaces, ...) fetched if metadata.csv is missing"
    )
    boxes: str | None = Field(
        None,
        description="detector boxes, a CSV in root (image, x1, y1, x2, y2, source): what train.crops and "
        "embed.crops cut out",
    )
    box_margin: float = Field(0.1, ge=0.0, description="each box grown by this share of its size on every side")


class FoldsConfig(Strict):
    n_splits: int = Field(5, ge=2)
    check_images: Literal["decode", "header", "off"] = Field(
        "decode",
        description="how the folds stage checks every image before training: decode it (catches truncated "
        "files), read its header (exists, non-empty, a size: for millions of images), or not at all",
    )
    seed: int = Field(42, ge=0, lt=2**32, description="the split's seed (numpy and scikit-learn take 0 … 2³²−1)")
    fingerprint: Literal["stat", "content"] = Field(
        "stat",
        description="what tells a changed image from the cached one: its size and mtime (stat: cheap, what "
        "copies and replacements change) or a hash of its bytes (content: for images edited in place that keep "
        "their size and mtime; reads every image on each run)",
    )
    unknown_classes: float | None = Field(
        None,
        ge=0.0,
        le=0.5,
        description="share of the classes each fold holds out entirely (validation queries of unseen "
        "classes, to calibrate 'new'); default 0.2 for MAP@5 competitions whose training has no unknown "
        "rows, else 0",
    )


class AuxHeadConfig(Strict):
    """A second margin head on another label column of the training table (Happywhale 2022 1st:
    species, loss weights identity 0.437 and species 0.563). Rows without a value in the column
    (pseudo-labelled test images, blanks) take no part in its loss."""

    column: str = Field(description="a column of the competition's training table, e.g. species")
    weight: float = Field(0.563, ge=0.0, description="the auxiliary loss's weight")
    identity_weight: float = Field(0.437, gt=0.0, description="the identity loss's weight beside it")
    subcenters: int = Field(1, ge=1)
    scale: float = Field(30.0, gt=0.0)
    margin: float = Field(0.3, ge=0.0, description="ArcFace margin of every auxiliary class")


class HeadConfig(Strict):
    type: Literal["arcface", "cosface", "none", "proxy_anchor"] = Field(
        "arcface", description="margin softmax (arcface, cosface, none) or pytorch-metric-learning's Proxy-Anchor"
    )
    proxy_margin: float = Field(0.1, description="Proxy-Anchor's margin δ")
    proxy_alpha: float = Field(32.0, gt=0, description="Proxy-Anchor's scale α")
    subcenters: int = Field(1, ge=1, description="sub-centers per class (K=3: noisy labels, Deng et al. 2020)")
    scale: float | Literal["adacos"] = 30.0
    margin: float = Field(0.3, ge=0.0, description="fixed margin, used when dynamic is 'none'")
    dynamic: Literal["none", "glr3", "power"] = Field(
        "none", description="margins from class sizes (glr3: GLR2020 3rd, power: Humpback 2019); none: head.margin"
    )
    dynamic_a: float = 0.45
    dynamic_b: float = 0.05
    dynamic_lambda: float = -0.25
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

    enabled: bool = False
    n_expansion: int = Field(16, ge=1)
    weight: float = Field(0.2, ge=0.0)
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

    image_size: int = Field(ge=16)
    epochs: int = Field(ge=1)
    lr: float | None = Field(None, gt=0, description="this stage's LR (default: train.lr)")
    freeze_backbone_epochs: int = Field(0, ge=0, description="GLR2021 1st: one epoch at the new size frozen")
    reinit_head: bool = Field(False, description="start this stage with a new head (the backbone continues)")


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)
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
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    head_lr_mult: float = Field(10.0, gt=0)
    weight_decay: float = 1e-4
    warmup_epochs: float = Field(1.0, ge=0)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads an unquoted `off` as false

    grad_accum: int = Field(1, ge=1)
    clip_grad: float | None = 5.0
    ema: float | None = Field(None, description="EMA decay of the weights, e.g. 0.999")
    num_workers: int = Field(0, ge=0)
    channels_last: bool = True
    sync_bn: bool = Field(False, description="SyncBatchNorm across GPUs under torchrun (CUDA only)")
    freeze_bn: bool = Field(False, description="BatchNorm layers use and keep their running statistics")
    nan_policy: Literal["stop", "skip"] = "stop"
    strict_images: bool = Field(False, description="fail on an unreadable training image instead of skipping")
    validate_every: int = Field(1, ge=1)
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
    augment: list[dict[str, Any]] = Field(
        default_factory=list, description="albumentations transforms: [{type: HorizontalFlip, p: 0.5}, ...]"
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


def plain_name(value: str, names: str) -> str:
    """A name that becomes one path component (``names`` says which files it names)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        raise ValueError(f"'{value}' is not a plain name (letters, digits, '.', '_', '-'): it names {names}")
    return value


class MemberConfig(Strict):
    name: str
    backbone: str
    fold: int = Field(ge=0)
    image_size: int = Field(ge=16)
    in_chans: int = 3
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
    embedding_size: int = Field(512, ge=8)
    gem_p: float = 3.0
    gem_learnable: bool = True
    init_from: str | None = Field(None, description="another member whose trained weights start this one")
    head: HeadConfig = HeadConfig()
    see: SEEConfig = SEEConfig()
    train: TrainConfig = TrainConfig()

    @field_validator("name")
    @classmethod
    def _plain_member_name(cls, value: str) -> str:
        return plain_name(value, "the member's artifacts folder and its export file")


class EmbedConfig(Strict):
    batch_size: int = Field(128, ge=1)
    tta_flip: bool = True
    crops: list[str] = Field(
        default_factory=list,
        description="box sources whose crops' embeddings are averaged ('none': the whole image), e.g. "
        "[fullbody, fullbody2] (Happywhale 2022 1st); needs competition.boxes",
    )
    flip_gallery: bool = Field(
        False,
        description="embed each image's mirror too; a pair's kNN similarity is the best over the query's and "
        "the gallery image's views (Happywhale 2022 1st). Needs tta_flip false",
    )
    tta_scales: list[Annotated[float, Field(gt=0.0)]] = Field(
        default_factory=lambda: [1.0], min_length=1, description="image-size factors averaged at test time"
    )


class EnsembleConfig(Strict):
    weights: dict[str, float] = Field(default_factory=dict, description="member name -> weight (default 1)")
    pca_whiten: bool = False
    pca_dim: int | None = None


class ExpansionConfig(Strict):
    enabled: bool = False
    alpha: float = 3.0
    k: int = Field(5, ge=1)


class RerankConfig(Strict):
    enabled: bool = False
    k1: int = Field(20, ge=1)
    k2: int = Field(6, ge=1)
    lambda_: float = Field(0.3, alias="lambda", ge=0, le=1)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PenaltyConfig(Strict):
    enabled: bool = False
    pool: str | None = Field(
        None,
        description="folder, .zip or .csv (column `path`) of non-landmark images; default: the competition's "
        "index/ images where it has them",
    )
    k_gallery: int = Field(5, ge=1)
    k_query: int = Field(10, ge=1)
    query_side: bool = False


class VotingConfig(Strict):
    k: int = Field(5, ge=1)
    power: float = 3.0
    head_weight: float = Field(0.0, ge=0, le=1, description="weight of the head's class cosines in the fusion")


class VerifyConfig(Strict):
    """Second stage: local features on each query's shortlist, verified by a homography."""

    enabled: bool = False
    extractor: Literal["sift", "disk"] = Field(
        "sift", description="sift: OpenCV SIFT + RootSIFT (no weights); disk: kornia's DISK (a GPU extractor)"
    )
    weights_file: str | None = Field(
        None, description="disk: a local weights file; null: kornia's 'depth' checkpoint, fetched before anything runs"
    )
    image_size: int = Field(512, ge=64, description="longer side the features are extracted at (px)")
    max_keypoints: int = Field(1000, ge=8, description="the strongest keypoints kept per image")
    top_k: int | None = Field(
        None, ge=1, description="candidates verified per query; default 10 for labels, 100 for retrieval"
    )
    ratio: float = Field(0.8, gt=0.0, le=1.0, description="Lowe's ratio test on RootSIFT distances")
    ransac_threshold: float = Field(5.0, gt=0.0, description="MAGSAC++ reprojection threshold, px at image_size")
    fusion: Literal["additive", "calibrated"] = Field(
        "additive",
        description="additive: score + weight·min(inliers, cap)/cap; calibrated: isotonic P(same) of the "
        "cosine and of the inliers, averaged (WildFusion)",
    )
    weight: float | Literal["tune"] = Field("tune", description="additive fusion's weight, or tuned on validation")
    cap: int | Literal["tune"] = Field("tune", description="additive fusion's inlier cap, or tuned on validation")
    workers: int = Field(0, ge=0, description="processes extracting and matching; 0: every core")
    shard_images: int = Field(1024, ge=1, description="images per feature-cache shard")

    def top_k_for(self, retrieval: bool) -> int:
        return self.top_k if self.top_k is not None else (100 if retrieval else 10)


class LabelRerankConfig(Strict):
    enabled: bool = False
    k: int = Field(5, ge=1, description="neighbours voting each query's and index image's label")
    min_score: float = Field(
        0.0, ge=0.0, description="a predicted label below this vote counts as none (not moved ahead)"
    )


class RetrieveConfig(Strict):
    index: Literal["flat", "ivf", "hnsw"] = "flat"

    @field_validator("index", mode="before")
    @classmethod
    def _removed_index(cls, value: Any) -> Any:
        if value == "flat_bf16":
            raise ValueError(
                "'flat_bf16' was removed: it measured slower than faiss 'flat' on every CPU (0.8× on an Intel "
                "with AMX, 0.67× on an AMD Zen 4) for the same exact result; use 'flat'"
            )
        return value

    nlist: int = 1024
    nprobe: int = 16
    hnsw_m: int = 32
    k: int = Field(100, ge=1)
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    query_batch: int = Field(16384, ge=1)
    val_fold: int | None = Field(None, description="validation fold (default: the first member's)")
    validation_queries: int | None = Field(
        None,
        ge=1,
        description="at most this many validation queries per fold (a seeded random sample) for the report, "
        "the tuning and the verification; null: the whole fold",
    )
    qe: ExpansionConfig = ExpansionConfig()
    dba: ExpansionConfig = ExpansionConfig()
    rerank: RerankConfig = RerankConfig()
    penalty: PenaltyConfig = PenaltyConfig()
    voting: VotingConfig = VotingConfig()
    verify: VerifyConfig = VerifyConfig()
    label_rerank: LabelRerankConfig = LabelRerankConfig()
    unknown_threshold: float | Literal["tune"] = "tune"
    unknown_score: Literal["auto", "vote", "cosine"] = Field(
        "auto",
        description="what the unknown threshold compares: a label's vote, or its best neighbour's cosine; "
        "auto: whichever scores higher on validation",
    )
    unknown_share: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="instead of the tuned threshold, answer unknown first on this share of the test "
        "(Happywhale 1st: 0.165)",
    )
    unknown_per: str | None = Field(
        None,
        description="tune the unknown threshold per group of a label column, each query grouped by the "
        "members' head.aux on that column (Happywhale 2nd/4th: per species)",
    )
    unknown_per_min: int = Field(
        20, ge=1, description="validation queries a group needs for its own threshold (smaller: the global one)"
    )


class PseudoConfig(Strict):
    """Pseudo-label rounds (Happywhale 2022 1st/2nd, Humpback 2019 2nd): after a round's retrieval,
    the test images whose first answer is a known label with a high enough cosine train the next
    round's members as rows of that label. They never enter validation or the search gallery."""

    rounds: int = Field(0, ge=0, le=10, description="rounds after the first (0: off); the last one submits")
    min_cosine: float = Field(
        0.65, gt=-1.0, le=1.0, description="a test image's best cosine to its first answer's gallery images"
    )
    top_share: float | None = Field(
        None, gt=0.0, le=1.0, description="instead of min_cosine: the share of test images with the highest cosine"
    )
    min_precision: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="instead of min_cosine: the lowest cosine at which the previous round's validation queries "
        "answered at or above it are at least this share right (a bar measured, not guessed)",
    )


class RuntimeConfig(Strict):
    cudnn_benchmark: bool = Field(
        True, description="cuDNN picks the fastest convolution per input shape (fixed image sizes: faster)"
    )
    tf32: bool = Field(True, description="fp32 matmuls and convolutions on TF32 tensor cores (Ampere and newer)")
    dist_timeout_min: float = Field(
        360.0,
        gt=0,
        description="under torchrun, how long a rank waits in a collective (rank 0 alone runs folds, "
        "retrieve and submit while the others wait; NCCL's own default, 10 min, ends a GLDv2-size run)",
    )


class ExportConfig(Strict):
    enabled: bool = Field(
        False, description="`all` ends by exporting the members as one embedding module (code competitions)"
    )
    members: list[str] = Field(default_factory=list, description="the members to export (default: all)")
    onnx: bool = Field(True, description="an ONNX file too, where the model exports")


class Config(Strict):
    experiment: str
    seed: int = 42
    threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads for torch/OpenMP/faiss (default: all cores; at most 1024)"
    )
    competition: CompetitionConfig
    folds: FoldsConfig = FoldsConfig()
    members: list[MemberConfig] = Field(min_length=1)
    embed: EmbedConfig = EmbedConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    retrieve: RetrieveConfig = RetrieveConfig()
    export: ExportConfig = ExportConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    pseudo: PseudoConfig = PseudoConfig()
    tracking: Literal["none", "tensorboard", "mlflow", "wandb"] = Field(
        "tensorboard", description="experiment tracker of each run (tensorboard: offline, no account)"
    )
    source: str = Field("", description="the file this config was loaded from (set by the loader)")

    @field_validator("experiment")
    @classmethod
    def _plain_experiment_name(cls, value: str) -> str:
        return plain_name(value, "the artifacts folder, the log and the submission file")

    @model_validator(mode="after")
    def _check_members(self) -> Config:
        names = [m.name for m in self.members]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"members: duplicate member name '{name}'")
        for member in self.members:
            if member.fold >= self.folds.n_splits:
                raise ValueError(
                    f"members: member '{member.name}' uses fold {member.fold} but folds.n_splits is "
                    f"{self.folds.n_splits}"
                )
            if member.init_from is not None and member.init_from not in names:
                raise ValueError(f"members: member '{member.name}' init_from unknown member '{member.init_from}'")
            if member.init_from == member.name:
                raise ValueError(f"members: member '{member.name}' cannot init_from itself")
            if member.init_from is not None:
                source = next(m for m in self.members if m.name == member.init_from)
                for key in ("backbone", "in_chans", "embedding_size"):
                    if getattr(source, key) != getattr(member, key):
                        raise ValueError(
                            f"members: member '{member.name}' init_from '{source.name}' needs the same {key} "
                            f"({getattr(member, key)} vs {getattr(source, key)}): its weights would not load"
                        )
        for key in self.ensemble.weights:
            if key not in names:
                raise ValueError(f"ensemble.weights: unknown member '{key}' (members: {names})")
        for key in self.export.members:
            if key not in names:
                raise ValueError(f"export.members: unknown member '{key}' (members: {names})")
        return self

    def member(self, name: str) -> MemberConfig:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(f"no member named '{name}' in {self.source}")
