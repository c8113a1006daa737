"""YAML configs with inheritance and dotted overrides, validated into typed objects.

A config file may name its parent(s) with ``base: other.yaml`` (a path relative to the file, or
a list of them; later ones win). Dicts merge recursively, everything else is replaced. Command
line overrides are ``key.sub=value`` (``members.0.train.epochs=3``), the value parsed as YAML.
Each member of ``members`` is ``member_defaults`` deep-merged with the member's own keys, so a
member only states what differs. Errors name the file, the dotted key and what was expected.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


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
    threads: int | None = Field(None, ge=1, description="CPU threads for torch/OpenMP/faiss (default: all cores)")
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


# --------------------------------------------------------------------------- loading
def deep_merge(base: Any, override: Any) -> Any:
    """Dicts merge recursively (override wins); anything else is replaced by the override."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def _record_sources(tree: Any, source: str, prefix: str, sources: dict[str, str]) -> None:
    sources[prefix] = source
    if isinstance(tree, dict):
        for key, value in tree.items():
            _record_sources(value, source, f"{prefix}.{key}" if prefix else str(key), sources)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            _record_sources(value, source, f"{prefix}.{i}", sources)


def _read_yaml(path: Path, sources: dict[str, str], seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base' chain: {' -> '.join(str(p) for p in (*seen, path))}")
    if not path.is_file():
        where = f" (named as base by {seen[-1]})" if seen else ""
        raise ConfigError(f"{path}: config file not found{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict = {}
    for base in bases:
        merged = deep_merge(merged, _read_yaml(path.parent / base, sources, (*seen, path)))
    _record_sources(data, str(path), "", sources)
    return deep_merge(merged, data)


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place; list items are addressed by index."""
    if "=" not in assignment:
        raise ConfigError(f"command line: override '{assignment}' is not of the form key.sub=value")
    dotted, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"command line: override '{assignment}': value is not valid YAML: {exc}") from exc
    parts = dotted.strip().split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"command line: override '{dotted}': '{'.'.join(parts[:i])}' is a list of {len(node)} "
                    f"items; '{part}' is not a valid index"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"command line: override '{dotted}': '{'.'.join(parts[:i])}' is not a mapping")


def _format_validation_error(exc: ValidationError, sources: dict[str, str]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        origin = "defaults"
        probe = key
        while probe:
            if probe in sources:
                origin = sources[probe]
                break
            probe = probe.rpartition(".")[0]
        kind = err["type"]
        if kind == "extra_forbidden":
            what = "unknown key (check the spelling; see the schema in dmlkit/config.py)"
        elif kind == "missing":
            what = "required value is missing"
        else:
            what = f"{err['msg']} (got {err.get('input')!r})"
        lines.append(f"{origin}: key '{key or '<top>'}': {what}")
    return "invalid config:\n  " + "\n  ".join(lines)


def config_tree(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The config as one YAML tree: its bases merged and the overrides applied, before validation
    (so that a file holding it loads to the same config, with the same keys set)."""
    tree = _read_yaml(Path(path), {})
    for assignment in overrides:
        apply_override(tree, assignment)
    return tree


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config with its bases, apply overrides, merge member defaults, validate."""
    sources: dict[str, str] = {}
    tree = _read_yaml(Path(path), sources)
    for assignment in overrides:
        apply_override(tree, assignment)
        sources[assignment.split("=", 1)[0].strip()] = "command line"
    defaults = tree.pop("member_defaults", {}) or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{sources.get('member_defaults', path)}: key 'member_defaults' must be a mapping")
    members = tree.get("members")
    if isinstance(members, list):
        merged_members = []
        for i, member in enumerate(members):
            if not isinstance(member, dict):
                raise ConfigError(f"{sources.get(f'members.{i}', path)}: key 'members.{i}' must be a mapping")
            merged_members.append(deep_merge(defaults, member))
            for key in _leaf_keys(defaults):
                sources.setdefault(f"members.{i}.{key}", sources.get(f"member_defaults.{key}", str(path)))
        tree["members"] = merged_members
    tree["source"] = str(Path(path))
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, sources)) from None


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(_leaf_keys(value, dotted))
    return keys


def member_slice(member: MemberConfig) -> dict:
    """The member's config as its training key hashes it: `head.aux` and `train.stages` only where
    they are set (members trained before those existed keep their keys)."""
    data = config_slice(member)
    if data["head"].get("aux") is None:
        data["head"].pop("aux", None)
    for key in ("stages", "crops"):
        if not data["train"].get(key):
            data["train"].pop(key, None)
    return data


def config_slice(model: BaseModel | list | dict | Any) -> Any:
    """Plain JSON-able data of a config object (for hashing and manifests)."""
    if isinstance(model, BaseModel):
        return model.model_dump(mode="json", by_alias=True)
    if isinstance(model, list):
        return [config_slice(m) for m in model]
    return model


# --------------------------------------------------------------------------- values without effect
def _pseudo_problems(pseudo: PseudoConfig, metric: str) -> list[str]:
    if pseudo.rounds == 0:
        return [
            f"pseudo.{k}: no effect while pseudo.rounds is 0"
            for k in ("min_cosine", "top_share", "min_precision")
            if k in pseudo.model_fields_set
        ]
    if metric == "map@100":
        return ["pseudo.rounds: pseudo-labels need a labelled answer per test image (not a retrieval competition)"]
    if pseudo.top_share is not None and pseudo.min_precision is not None:
        return ["pseudo.min_precision: set next to pseudo.top_share; choose one way to pick the images"]
    if pseudo.top_share is not None and "min_cosine" in pseudo.model_fields_set:
        return ["pseudo.min_cosine: no effect next to pseudo.top_share (the share picks the images)"]
    if pseudo.min_precision is not None and "min_cosine" in pseudo.model_fields_set:
        return ["pseudo.min_cosine: no effect next to pseudo.min_precision (validation sets the bar)"]
    return []


def ineffective_values(cfg: Config, metric: str, ranks_index: bool | None = None) -> list[str]:
    """Keys whose value the loaded config sets but nothing would use, each with the reason; checked
    before anything runs, so a misread setting costs no training. `metric` is the competition's;
    `ranks_index`: whether one of its submission formats ranks index images (None: by the metric)."""
    problems = _pseudo_problems(cfg.pseudo, metric)
    for i, member in enumerate(cfg.members):
        head, key = member.head, f"members.{i}"
        if head.type == "proxy_anchor":
            for name, unset in (("subcenters", 1), ("sample_rate", 1.0), ("margin", None)):
                if name in head.model_fields_set and getattr(head, name) != unset:
                    problems.append(
                        f"{key}.head.{name}: Proxy-Anchor has one proxy per class, no softmax margin or Partial FC"
                    )
        elif {"proxy_margin", "proxy_alpha"} & head.model_fields_set:
            problems.append(f"{key}.head.proxy_margin/proxy_alpha: only head.type 'proxy_anchor' uses them")
        if member.pretrained and member.pretrained_file:
            problems.append(f"{key}.pretrained: no effect next to pretrained_file (the local file is loaded)")
        if member.pretrained_tag and not member.pretrained:
            problems.append(f"{key}.pretrained_tag: no effect while pretrained is false")
        problems += _stage_problems(member, key)
        if member.train.freeze_backbone_epochs >= member.train.epochs and not member.train.stages:
            problems.append(
                f"{key}.train.freeze_backbone_epochs: the backbone would never train (epochs {member.train.epochs})"
            )
        if member.train.lr_scaling != "none" and member.train.batch_per == "global":
            problems.append(
                f"{key}.train.lr_scaling: no effect while train.batch_per is 'global' (the global batch "
                "does not change with the GPU count)"
            )
        if "margin" in head.model_fields_set and (head.dynamic != "none" or head.type == "none"):
            why = "head.type is 'none'" if head.type == "none" else f"head.dynamic is '{head.dynamic}'"
            problems.append(f"{key}.head.margin: no effect while {why} (a fixed margin needs head.dynamic: none)")
        if "dynamic_lambda" in head.model_fields_set and head.dynamic != "power":
            problems.append(f"{key}.head.dynamic_lambda: only head.dynamic 'power' uses it (got '{head.dynamic}')")
        if member.see.enabled:
            problems.extend(_see_problems(member, key))
    problems += _flip_gallery_problems(cfg) + _crop_problems(cfg)
    if "pca_dim" in cfg.ensemble.model_fields_set and cfg.ensemble.pca_dim and not cfg.ensemble.pca_whiten:
        problems.append("ensemble.pca_dim: no effect while ensemble.pca_whiten is false")
    r = cfg.retrieve
    for name, index in (("nlist", "ivf"), ("nprobe", "ivf"), ("hnsw_m", "hnsw")):
        if name in r.model_fields_set and r.index != index:
            problems.append(f"retrieve.{name}: only retrieve.index '{index}' uses it (got '{r.index}')")
    if metric != "map@5":
        unknown_keys = (("unknown_threshold", "tune"), ("unknown_score", "auto"), ("unknown_share", None))
        for key, unset in (*unknown_keys, ("unknown_per", None)):
            if getattr(r, key) != unset:
                problems.append(f"retrieve.{key}: only MAP@5 competitions answer 'unknown' (metric: {metric})")
    problems += _unknown_per_problems(cfg, metric)
    if r.unknown_share is not None and r.unknown_threshold != "tune":
        problems.append("retrieve.unknown_threshold: no effect while retrieve.unknown_share sets the threshold")
    if cfg.folds.unknown_classes and metric == "map@100":
        problems.append("folds.unknown_classes: retrieval validation scores known queries only")
    if r.voting.head_weight > 0 and metric == "map@100":
        problems.append("retrieve.voting.head_weight: retrieval ranks index images; no labels are voted")
    if r.penalty.pool and not r.penalty.enabled:
        problems.append("retrieve.penalty.pool: no effect while retrieve.penalty.enabled is false")
    if r.penalty.enabled and metric == "map@100":
        problems.append("retrieve.penalty.enabled: the distractor penalty applies to label votes, not to retrieval")
    return problems + _second_stage_problems(r, metric == "map@100" if ranks_index is None else ranks_index)


def _stage_problems(member: MemberConfig, key: str) -> list[str]:
    """train.stages that cannot mean what they say."""
    stages, problems = member.train.stages, []
    if stages and stages[-1].image_size != member.image_size:
        problems.append(
            f"{key}.train.stages: the last stage trains at {stages[-1].image_size} px but the member embeds at "
            f"image_size {member.image_size}; make them equal"
        )
    for i, stage in enumerate(stages):
        if stage.freeze_backbone_epochs >= stage.epochs:
            problems.append(f"{key}.train.stages.{i}.freeze_backbone_epochs: the backbone would never train")
    if stages and member.train.freeze_backbone_epochs:
        problems.append(f"{key}.train.freeze_backbone_epochs: no effect under train.stages (each stage sets its own)")
    return problems


def _unknown_per_problems(cfg: Config, metric: str) -> list[str]:
    """retrieve.unknown_per needs a tuned threshold and a member whose auxiliary head predicts the groups."""
    r = cfg.retrieve
    if r.unknown_per is None:
        if "unknown_per_min" in r.model_fields_set:
            return ["retrieve.unknown_per_min: no effect while retrieve.unknown_per is unset"]
        return []
    if metric != "map@5":
        return []  # said by the metric check
    columns = sorted({m.head.aux.column for m in cfg.members if m.head.aux is not None})
    if r.unknown_per not in columns:
        return [
            f"retrieve.unknown_per: '{r.unknown_per}' needs a member with head.aux.column '{r.unknown_per}' "
            f"to group the queries (members' auxiliary columns: {columns or 'none'})"
        ]
    if r.unknown_share is not None or r.unknown_threshold != "tune":
        return [
            "retrieve.unknown_per: per-group thresholds are tuned, and retrieve.unknown_threshold / "
            "unknown_share fix one"
        ]
    return []


def _crop_problems(cfg: Config) -> list[str]:
    """Crops without boxes, and crop probabilities that are not a distribution."""
    problems = []
    wanting = [f"members.{i}.train.crops" for i, m in enumerate(cfg.members) if m.train.crops]
    wanting += ["embed.crops"] if cfg.embed.crops else []
    if wanting and cfg.competition.boxes is None:
        problems += [f"{key}: no boxes to crop (set competition.boxes to the detector's CSV)" for key in wanting]
    for i, member in enumerate(cfg.members):
        crops = member.train.crops
        if crops and (any(p < 0 for p in crops.values()) or abs(sum(crops.values()) - 1.0) > 1e-6):
            problems.append(f"members.{i}.train.crops: probabilities {crops} must be ≥ 0 and sum to 1")
    if cfg.competition.boxes is not None and not wanting:
        problems.append("competition.boxes: no effect without train.crops or embed.crops")
    return problems


def _flip_gallery_problems(cfg: Config) -> list[str]:
    """embed.flip_gallery beside the settings it has no meaning with."""
    if not cfg.embed.flip_gallery:
        return []
    r, problems = cfg.retrieve, []
    if cfg.embed.tta_flip:
        problems.append(
            "embed.tta_flip: averages each image with its mirror, so under embed.flip_gallery the mirror views "
            "would equal the images; set embed.tta_flip=false"
        )
    for key, on in (("qe", r.qe.enabled), ("dba", r.dba.enabled), ("rerank", r.rerank.enabled)):
        if on:
            problems.append(
                f"retrieve.{key}.enabled: not defined over mirrored views (embed.flip_gallery); use one of the two"
            )
    return problems


def _second_stage_problems(r: RetrieveConfig, ranks_index: bool) -> list[str]:
    problems = [
        f"retrieve.verify.{name}: only retrieve.verify.fusion 'additive' uses it (got 'calibrated')"
        for name in ("weight", "cap")
        if name in r.verify.model_fields_set and r.verify.fusion == "calibrated"
    ]
    if r.verify.enabled and r.verify.top_k is not None and r.verify.top_k > r.k:
        problems.append(
            f"retrieve.verify.top_k: {r.verify.top_k} candidates, but the search keeps retrieve.k = {r.k} per query"
        )
    if r.verify.weights_file is not None and r.verify.extractor == "sift":
        problems.append("retrieve.verify.weights_file: SIFT has no weights (only retrieve.verify.extractor 'disk')")
    for section, name in ((r.verify, "verify"), (r.label_rerank, "label_rerank")):
        default = type(section)()
        problems += [
            f"retrieve.{name}.{key}: no effect while retrieve.{name}.enabled is false"
            for key in type(section).model_fields
            if key != "enabled" and not section.enabled and getattr(section, key) != getattr(default, key)
        ]
    if r.label_rerank.enabled and not ranks_index:
        problems.append(
            "retrieve.label_rerank.enabled: it re-ranks index images, and no submission format here retrieves "
            "from an index"
        )
    return problems


def _see_problems(member: MemberConfig, key: str) -> list[str]:
    """SEE values that cannot be what the user meant (the schedule runs as published)."""
    see, problems = member.see, []
    if member.embedding_size < see.n_expansion + 2:
        problems.append(
            f"{key}.see.n_expansion: SEE needs embedding_size ≥ n_expansion + 2 "
            f"({see.n_expansion + 2}), got {member.embedding_size}"
        )
    if see.schedule == "top_fraction":
        for name in ("start", "end"):
            if not 0.0 <= getattr(see, name) <= 1.0:
                problems.append(f"{key}.see.{name}: a fraction of the batch in [0, 1], got {getattr(see, name)}")
        if see.lower_bound is not None:
            problems.append(f"{key}.see.lower_bound: only see.schedule 'threshold' uses it")
    else:
        for name in ("start", "end", "lower_bound"):
            value = getattr(see, name)
            if value is not None and not -1.0 <= value <= 1.0:
                problems.append(f"{key}.see.{name}: a cosine threshold in [-1, 1], got {value}")
        if see.start < see.end:
            problems.append(
                f"{key}.see.start/end: the threshold falls from see.start to see.end as published "
                f"(got {see.start} → {see.end}; e.g. start 0.9, end 0.5)"
            )
    return problems


def device_notes(cfg: Config, device_type: str) -> list[str]:
    """Settings this device runs differently from what they say (one warning line each)."""
    notes = []
    if device_type == "cpu":
        for i, member in enumerate(cfg.members):
            if member.train.amp == "fp16":
                notes.append(f"members.{i}.train.amp: fp16 runs as bf16 on the CPU (no fp16 autocast here)")
    return notes
