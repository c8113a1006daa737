"""The config's schema: one pydantic model per section (a member's in `members.py`), each value
checked as the config loads (types, ranges, allowed values) with the relations between members;
the rules for values that would have no effect are in `checks.py`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from .base import ConfigError, Strict, plain_name
from .members import MemberConfig

__all__ = ["Config", "ConfigError"]  # ConfigError: also importable from here, as before


class CompetitionConfig(Strict):
    name: str = Field(description="adapter name, see dmlkit.competitions.ADAPTERS")
    root: str = Field(description="folder holding the competition's files")
    extra_formats: list[str] = Field(
        default_factory=list, description="more submissions from the same data, e.g. landmark-retrieval"
    )
    demo: str | None = Field(None, description="demo generator that builds `root` when it is missing")
    demo_params: dict[str, Any] = Field(
        default_factory=dict,
        description="the demo generator's parameters (its dataclass in dmlkit/demo), e.g. {n_individuals: 40}",
    )
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
    n_splits: int = Field(
        5, ge=2, description="folds the training images are split into (a member validates on its fold)"
    )
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


class EmbedConfig(Strict):
    batch_size: int = Field(128, ge=1, description="images per embedding batch")
    tta_flip: bool = Field(
        True, description="average each image's embedding with its mirror's (off where a mirror is another identity)"
    )
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
    pca_whiten: bool = Field(
        False, description="PCA whitening of the concatenated embeddings, fitted on the training images"
    )
    pca_dim: int | None = Field(None, ge=1, description="components kept by the whitening (default: all)")


class ExpansionConfig(Strict):
    """α-weighted query expansion (qe) or database-side augmentation (dba): an embedding replaced by
    the mean of itself and its top-k neighbours, each weighted by max(cos, 0)^α."""

    enabled: bool = Field(False, description="switch it on")
    alpha: float = Field(3.0, description="the weight's power on each neighbour's cosine")
    k: int = Field(5, ge=1, description="neighbours averaged in")


class RerankConfig(Strict):
    """k-reciprocal re-ranking (Zhong et al. 2017), sparse over the kNN lists."""

    enabled: bool = Field(False, description="re-rank the kNN lists by k-reciprocal (Jaccard) distance")
    k1: int = Field(20, ge=1, description="the k-reciprocal neighbourhood's size")
    k2: int = Field(6, ge=1, description="neighbours whose sets are averaged (local query expansion)")
    lambda_: float = Field(
        0.3, alias="lambda", ge=0, le=1, description="weight of the original distance beside the Jaccard distance"
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PenaltyConfig(Strict):
    """GLR2020 1st's non-landmark penalty: each gallery image's similarity lowered by its mean top-k
    similarity to a pool of non-landmark images."""

    enabled: bool = Field(False, description="lower the gallery images that look like non-landmarks")
    pool: str | None = Field(
        None,
        description="folder, .zip or .csv (column `path`) of non-landmark images; default: the competition's "
        "index/ images where it has them",
    )
    k_gallery: int = Field(5, ge=1, description="distractor neighbours averaged into a gallery image's penalty")
    k_query: int = Field(10, ge=1, description="distractor neighbours averaged into a query's penalty")
    query_side: bool = Field(False, description="penalise the queries too")


class VotingConfig(Strict):
    k: int = Field(5, ge=1, description="neighbours whose labels vote")
    power: float = Field(3.0, description="a neighbour's vote: max(cos, 0) to this power")
    head_weight: float = Field(0.0, ge=0, le=1, description="weight of the head's class cosines in the fusion")


class VerifyConfig(Strict):
    """Second stage: local features on each query's shortlist, verified by a homography."""

    enabled: bool = Field(False, description="verify each query's shortlist and fuse the inliers with the cosine")
    extractor: Literal["sift", "disk", "aliked"] = Field(
        "sift",
        description="sift: OpenCV SIFT + RootSIFT (no weights); disk or aliked: kornia's DISK or ALIKED-n16 "
        "(GPU extractors)",
    )
    weights_file: str | None = Field(
        None,
        description="disk/aliked: a local weights file; null: kornia's checkpoint, fetched before anything runs",
    )
    matcher: Literal["ratio", "lightglue"] = Field(
        "ratio",
        description="ratio: mutual nearest descriptors under Lowe's ratio; lightglue: kornia's LightGlue for the "
        "extractor's features (disk or aliked); both then count MAGSAC++ homography inliers",
    )
    matcher_weights_file: str | None = Field(
        None, description="lightglue: a local weights file; null: kornia's hub weights, fetched before anything runs"
    )
    image_size: int = Field(512, ge=64, description="longer side the features are extracted at (px)")
    max_keypoints: int = Field(1000, ge=8, description="the strongest keypoints kept per image")
    top_k: int | None = Field(
        None, ge=1, description="candidates verified per query; default 10 for labels, 100 for retrieval"
    )
    ratio: float = Field(0.8, gt=0.0, le=1.0, description="Lowe's ratio test on RootSIFT distances")
    ransac_threshold: float = Field(5.0, gt=0.0, description="MAGSAC++ reprojection threshold, px at image_size")
    fusion: Literal["additive", "calibrated", "stacked"] = Field(
        "additive",
        description="additive: score + weight·min(inliers, cap)/cap; calibrated: isotonic P(same) of the "
        "cosine and of the inliers, averaged (WildFusion); stacked: gradient-boosted P(same) over the pair's "
        "cosine, rank, gap to the best and inliers (a pair classifier)",
    )
    weight: float | Literal["tune"] = Field("tune", description="additive fusion's weight, or tuned on validation")
    cap: int | Literal["tune"] = Field("tune", description="additive fusion's inlier cap, or tuned on validation")
    workers: int = Field(0, ge=0, description="processes extracting and matching; 0: every core")
    shard_images: int = Field(1024, ge=1, description="images per feature-cache shard")

    def top_k_for(self, retrieval: bool) -> int:
        return self.top_k if self.top_k is not None else (100 if retrieval else 10)


class LabelRerankConfig(Strict):
    """Label-aware retrieval (GLR2019): index images whose predicted label is the query's move ahead."""

    enabled: bool = Field(
        False, description="move index images of the query's predicted label ahead (retrieval formats)"
    )
    k: int = Field(5, ge=1, description="neighbours voting each query's and index image's label")
    min_score: float = Field(
        0.0, ge=0.0, description="a predicted label below this vote counts as none (not moved ahead)"
    )


class ClusterConfig(Strict):
    """New identities (retrieval/clusters.py): the test images grouped by their pairwise cosines
    into individuals (AnimalCLEF 2026), written to clusters.csv."""

    enabled: bool = Field(
        False, description="cluster the test (clusters.csv) and attach known identities to 'new' answers"
    )
    linkage: Literal["average", "single", "complete"] = Field(
        "average",
        description="a group's cosine to another: the mean of their pairs' (average), the best pair's "
        "(single: graph components) or the worst's (complete)",
    )
    threshold: Annotated[float, Field(ge=-1.0, le=1.0)] | Literal["tune"] = Field(
        "tune",
        description="the cosine under which groups stay apart; tune: the best on the validation fold's "
        "queries (their identities known, unseen classes included) by tune_on",
    )
    tune_on: Literal["ami", "ari"] = Field(
        "ami", description="what the threshold is tuned for (AnimalCLEF 2026 9th: tuning on ARI over-merged)"
    )
    attach: bool = Field(
        False,
        description="a test image answered 'new' first whose cluster holds test images answered with a known "
        "identity takes that identity first ('new' second); off by default: on the whale demo it cost private "
        "MAP@5 (benchmarks/README.md, 'New identities')",
    )


class RetrieveConfig(Strict):
    index: Literal["flat", "ivf", "hnsw"] = Field(
        "flat", description="faiss index: exact inner product (flat), or approximate (ivf, hnsw) for millions of images"
    )

    @field_validator("index", mode="before")
    @classmethod
    def _removed_index(cls, value: Any) -> Any:
        if value == "flat_bf16":
            raise ValueError(
                "'flat_bf16' was removed: it measured slower than faiss 'flat' on every CPU (0.8× on an Intel "
                "with AMX, 0.67× on an AMD Zen 4) for the same exact result; use 'flat'"
            )
        return value

    nlist: int = Field(1024, ge=1, description="ivf: the coarse quantiser's cells")
    nprobe: int = Field(16, ge=1, description="ivf: cells searched per query")
    hnsw_m: int = Field(32, ge=2, description="hnsw: links per node")
    k: int = Field(100, ge=1, description="neighbours searched per query (the re-ranking chain's shortlist)")
    use_gpu: Literal["auto", "yes", "no"] = Field("auto", description="faiss on the GPU (auto: where one is present)")
    query_batch: int = Field(16384, ge=1, description="queries searched per batch (bounds the memory of the results)")
    val_fold: int | None = Field(None, description="validation fold (default: the first member's)")
    validation_queries: int | None = Field(
        None,
        ge=1,
        description="at most this many validation queries per fold (a seeded random sample) for the report, "
        "the tuning and the verification; null: the whole fold",
    )
    qe: ExpansionConfig = Field(ExpansionConfig(), description="query expansion (αQE)")
    dba: ExpansionConfig = Field(ExpansionConfig(), description="database-side augmentation of the gallery")
    rerank: RerankConfig = Field(RerankConfig(), description="k-reciprocal re-ranking")
    penalty: PenaltyConfig = Field(PenaltyConfig(), description="the non-landmark distractor penalty")
    voting: VotingConfig = Field(VotingConfig(), description="labels voted from the neighbours")
    verify: VerifyConfig = Field(VerifyConfig(), description="local-feature verification of the shortlists")
    label_rerank: LabelRerankConfig = Field(LabelRerankConfig(), description="label-aware retrieval")
    cluster: ClusterConfig = Field(ClusterConfig(), description="the test clustered into new identities")
    unknown_threshold: float | Literal["tune"] = Field(
        "tune", description="the score under which 'new' is answered before a label; tune: on the validation fold"
    )
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
    refit_threshold: Literal["cosine", "share"] = Field(
        "cosine",
        description="members with refit: the fold models' tuned threshold applied to the refit models' scores "
        "as it is (cosine), or moved to answer 'new' first on the share of the test the fold models answer so "
        "(share)",
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
    experiment: str = Field(description="the run's name: its artifacts folder, log and submission file")
    seed: int = Field(42, description="seed of training and sampling (torch, numpy, python)")
    threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads for torch/OpenMP/faiss (default: all cores; at most 1024)"
    )
    competition: CompetitionConfig = Field(description="the data: which adapter reads which folder")
    folds: FoldsConfig = Field(FoldsConfig(), description="the fold split")
    members: list[MemberConfig] = Field(
        min_length=1, description="the models: each a backbone trained on one fold (member_defaults merged in)"
    )
    embed: EmbedConfig = Field(EmbedConfig(), description="embedding extraction and TTA")
    ensemble: EnsembleConfig = Field(EnsembleConfig(), description="how the members' embeddings are combined")
    retrieve: RetrieveConfig = Field(RetrieveConfig(), description="search, re-ranking, voting and 'new'")
    export: ExportConfig = Field(ExportConfig(), description="the exported embedding module")
    runtime: RuntimeConfig = Field(RuntimeConfig(), description="device and distributed settings")
    pseudo: PseudoConfig = Field(PseudoConfig(), description="pseudo-label rounds")
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
            if member.refit != "off" and f"{member.name}-refit" in names:
                raise ValueError(
                    f"members: '{member.name}-refit' names the refit model of member '{member.name}'; rename it"
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
