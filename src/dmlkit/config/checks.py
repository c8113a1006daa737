"""Values the loaded config sets but nothing would use (or that cannot mean what they say), each
refused with its reason before anything runs, so a misread setting costs no training.

The rules are data: one `Rule` per refusal — the key it names, the condition, the reason (a
format string over the section `s`, the config `cfg`, the competition's `metric`) — in the table
of its section. A new option adds its rule beside its section's others. A few rules check every
item of a list (each of train.stages, each key of a disabled section); they are small functions
that yield their messages, listed in the same tables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .members import MemberConfig
from .schema import Config


@dataclass(frozen=True)
class Where:
    """What a rule may read beside its section: the config, the competition's metric, whether a
    submission format ranks index images, and for a member's rules its index (`members.<i>`)."""

    cfg: Config
    metric: str
    ranks_index: bool
    member: int | None = None

    @property
    def prefix(self) -> str:
        return "" if self.member is None else f"members.{self.member}."


@dataclass(frozen=True)
class Rule:
    """`key` (under the rule's table's prefix) is refused for `why` where `when(s, where)` holds;
    `why` is a format string over `s` (the section), `cfg` and `metric`, or `why(s, where)` the message."""

    key: str
    when: Callable[[Any, Where], bool]
    why: str | Callable[[Any, Where], str]

    def problems(self, section: Any, where: Where) -> Iterator[str]:
        if self.when(section, where):
            key = where.prefix + self.key
            if callable(self.why):
                yield f"{key}: {self.why(section, where)}"
            else:
                yield f"{key}: " + self.why.format(s=section, cfg=where.cfg, metric=where.metric)


Check = Rule | Callable[[Any, Where], Iterable[str]]


def _set(section: Any, *names: str) -> bool:
    """Whether the config sets any of these keys of the section itself (not left at the default)."""
    return bool(set(names) & section.model_fields_set)


# --------------------------------------------------------------------------------- the members
def _each_stage(m: MemberConfig, where: Where) -> Iterator[str]:
    for i, stage in enumerate(m.train.stages):
        if stage.freeze_backbone_epochs >= stage.epochs:
            yield f"{where.prefix}train.stages.{i}.freeze_backbone_epochs: the backbone would never train"


def _see_ranges(m: MemberConfig, where: Where) -> Iterator[str]:
    """SEE's schedule values: fractions of the batch, or cosine thresholds, as the schedule reads them."""
    see = m.see
    if not see.enabled:
        return
    if see.schedule == "top_fraction":
        for name in ("start", "end"):
            if not 0.0 <= getattr(see, name) <= 1.0:
                yield f"{where.prefix}see.{name}: a fraction of the batch in [0, 1], got {getattr(see, name)}"
        return
    for name in ("start", "end", "lower_bound"):
        value = getattr(see, name)
        if value is not None and not -1.0 <= value <= 1.0:
            yield f"{where.prefix}see.{name}: a cosine threshold in [-1, 1], got {value}"


def _proxy_anchor_softmax_keys(m: MemberConfig, where: Where) -> Iterator[str]:
    head = m.head
    if head.type != "proxy_anchor":
        return
    for name, unset in (("subcenters", 1), ("sample_rate", 1.0), ("margin", None)):
        if _set(head, name) and getattr(head, name) != unset:
            yield f"{where.prefix}head.{name}: Proxy-Anchor has one proxy per class, no softmax margin or Partial FC"


def _margin_unused(m: MemberConfig, where: Where) -> bool:
    return _set(m.head, "margin") and (m.head.dynamic != "none" or m.head.type == "none")


def _margin_why(m: MemberConfig) -> str:
    return "head.type is 'none'" if m.head.type == "none" else f"head.dynamic is '{m.head.dynamic}'"


MEMBER_RULES: list[Check] = [
    # head
    _proxy_anchor_softmax_keys,
    Rule(
        "head.proxy_margin/proxy_alpha",
        lambda m, w: m.head.type != "proxy_anchor" and _set(m.head, "proxy_margin", "proxy_alpha"),
        "only head.type 'proxy_anchor' uses them",
    ),
    Rule(
        "head.margin",
        _margin_unused,
        lambda m, w: f"no effect while {_margin_why(m)} (a fixed margin needs head.dynamic: none)",
    ),
    Rule(
        "head.dynamic_lambda",
        lambda m, w: _set(m.head, "dynamic_lambda") and m.head.dynamic != "power",
        "only head.dynamic 'power' uses it (got '{s.head.dynamic}')",
    ),
    # weights
    Rule(
        "pretrained",
        lambda m, w: m.pretrained and bool(m.pretrained_file),
        "no effect next to pretrained_file (the local file is loaded)",
    ),
    Rule(
        "pretrained_tag",
        lambda m, w: bool(m.pretrained_tag) and not m.pretrained,
        "no effect while pretrained is false",
    ),
    # train
    Rule(
        "train.stages",
        lambda m, w: bool(m.train.stages) and m.train.stages[-1].image_size != m.image_size,
        lambda m, w: f"the last stage trains at {m.train.stages[-1].image_size} px but the member embeds at "
        f"image_size {m.image_size}; make them equal",
    ),
    _each_stage,
    Rule(
        "train.freeze_backbone_epochs",
        lambda m, w: bool(m.train.stages) and bool(m.train.freeze_backbone_epochs),
        "no effect under train.stages (each stage sets its own)",
    ),
    Rule(
        "train.freeze_backbone_epochs",
        lambda m, w: m.train.freeze_backbone_epochs >= m.train.epochs and not m.train.stages,
        "the backbone would never train (epochs {s.train.epochs})",
    ),
    Rule(
        "train.flip",
        lambda m, w: not m.train.flip
        and isinstance(m.train.augment, list)
        and any(spec.get("type") == "HorizontalFlip" for spec in m.train.augment),
        "false says a mirror is another identity, but train.augment lists a HorizontalFlip",
    ),
    Rule(
        "train.lr_scaling",
        lambda m, w: m.train.lr_scaling != "none" and m.train.batch_per == "global",
        "no effect while train.batch_per is 'global' (the global batch does not change with the GPU count)",
    ),
    Rule(
        "train.crops",
        lambda m, w: bool(m.train.crops) and w.cfg.competition.boxes is None,
        "no boxes to crop (set competition.boxes to the detector's CSV)",
    ),
    Rule(
        "train.crops",
        lambda m, w: bool(m.train.crops)
        and (any(p < 0 for p in m.train.crops.values()) or abs(sum(m.train.crops.values()) - 1.0) > 1e-6),
        "probabilities {s.train.crops} must be ≥ 0 and sum to 1",
    ),
    # SEE
    Rule(
        "see.n_expansion",
        lambda m, w: m.see.enabled and m.embedding_size < m.see.n_expansion + 2,
        lambda m, w: f"SEE needs embedding_size ≥ n_expansion + 2 ({m.see.n_expansion + 2}), got {m.embedding_size}",
    ),
    _see_ranges,
    Rule(
        "see.lower_bound",
        lambda m, w: m.see.enabled and m.see.schedule == "top_fraction" and m.see.lower_bound is not None,
        "only see.schedule 'threshold' uses it",
    ),
    Rule(
        "see.start/end",
        lambda m, w: m.see.enabled and m.see.schedule == "threshold" and m.see.start < m.see.end,
        "the threshold falls from see.start to see.end as published (got {s.see.start} → {s.see.end}; "
        "e.g. start 0.9, end 0.5)",
    ),
]


# --------------------------------------------------------------------------------- the sections
def _unset_pseudo_keys(pseudo: Any, where: Where) -> Iterator[str]:
    if pseudo.rounds == 0:
        for key in ("min_cosine", "top_share", "min_precision"):
            if _set(pseudo, key):
                yield f"pseudo.{key}: no effect while pseudo.rounds is 0"


PSEUDO_RULES: list[Check] = [
    _unset_pseudo_keys,
    Rule(
        "pseudo.rounds",
        lambda p, w: p.rounds > 0 and w.metric == "map@100",
        "pseudo-labels need a labelled answer per test image (not a retrieval competition)",
    ),
    Rule(
        "pseudo.min_precision",
        lambda p, w: p.rounds > 0 and p.top_share is not None and p.min_precision is not None,
        "set next to pseudo.top_share; choose one way to pick the images",
    ),
    Rule(
        "pseudo.min_cosine",
        lambda p, w: p.rounds > 0 and p.top_share is not None and _set(p, "min_cosine"),
        "no effect next to pseudo.top_share (the share picks the images)",
    ),
    Rule(
        "pseudo.min_cosine",
        lambda p, w: p.rounds > 0 and p.min_precision is not None and _set(p, "min_cosine"),
        "no effect next to pseudo.min_precision (validation sets the bar)",
    ),
]

EMBED_RULES: list[Check] = [
    Rule(
        "embed.tta_flip",
        lambda e, w: e.flip_gallery and e.tta_flip,
        "averages each image with its mirror, so under embed.flip_gallery the mirror views would equal the "
        "images; set embed.tta_flip=false",
    ),
    *(
        Rule(
            f"retrieve.{name}.enabled",
            lambda e, w, name=name: e.flip_gallery and getattr(w.cfg.retrieve, name).enabled,
            "not defined over mirrored views (embed.flip_gallery); use one of the two",
        )
        for name in ("qe", "dba", "rerank")
    ),
    Rule(
        "embed.crops",
        lambda e, w: bool(e.crops) and w.cfg.competition.boxes is None,
        "no boxes to crop (set competition.boxes to the detector's CSV)",
    ),
    Rule(
        "competition.boxes",
        lambda e, w: w.cfg.competition.boxes is not None
        and not e.crops
        and not any(m.train.crops for m in w.cfg.members),
        "no effect without train.crops or embed.crops",
    ),
]

ENSEMBLE_RULES: list[Check] = [
    Rule(
        "ensemble.pca_dim",
        lambda e, w: _set(e, "pca_dim") and bool(e.pca_dim) and not e.pca_whiten,
        "no effect while ensemble.pca_whiten is false",
    ),
]


def _unknown_per_problem(r: Any, where: Where) -> str | None:
    """retrieve.unknown_per needs a tuned threshold and a member whose auxiliary head predicts the groups."""
    columns = sorted({m.head.aux.column for m in where.cfg.members if m.head.aux is not None})
    if r.unknown_per not in columns:
        return (
            f"'{r.unknown_per}' needs a member with head.aux.column '{r.unknown_per}' to group the queries "
            f"(members' auxiliary columns: {columns or 'none'})"
        )
    if r.unknown_share is not None or r.unknown_threshold != "tune":
        return "per-group thresholds are tuned, and retrieve.unknown_threshold / unknown_share fix one"
    return None


def _disabled_section_keys(r: Any, where: Where) -> Iterator[str]:
    """Keys of a switched-off second-stage section set to other than their defaults."""
    for section, name in ((r.verify, "verify"), (r.label_rerank, "label_rerank"), (r.cluster, "cluster")):
        if section.enabled:
            continue
        default = type(section)()
        for key in type(section).model_fields:
            if key != "enabled" and getattr(section, key) != getattr(default, key):
                yield f"retrieve.{name}.{key}: no effect while retrieve.{name}.enabled is false"


RETRIEVE_RULES: list[Check] = [
    Rule(
        "retrieve.cluster.enabled",
        lambda r, w: r.cluster.enabled and w.metric != "map@5",
        "only identification competitions (MAP@5, answering 'new') have new identities to cluster (metric: {metric})",
    ),
    Rule(
        "retrieve.refit_threshold",
        lambda r, w: _set(r, "refit_threshold") and all(m.refit == "off" for m in w.cfg.members),
        "no member refits (members.N.refit), so the fold models answer the test with their own threshold",
    ),
    Rule(
        "retrieve.refit_threshold",
        lambda r, w: r.refit_threshold == "share" and r.unknown_share is not None,
        "no effect next to retrieve.unknown_share (that share is answered 'new' first)",
    ),
    *(
        Rule(
            f"retrieve.{name}",
            lambda r, w, name=name, index=index: _set(r, name) and r.index != index,
            f"only retrieve.index '{index}' uses it (got '{{s.index}}')",
        )
        for name, index in (("nlist", "ivf"), ("nprobe", "ivf"), ("hnsw_m", "hnsw"))
    ),
    *(
        Rule(
            f"retrieve.{key}",
            lambda r, w, key=key, unset=unset: w.metric != "map@5" and getattr(r, key) != unset,
            "only MAP@5 competitions answer 'unknown' (metric: {metric})",
        )
        for key, unset in (
            ("unknown_threshold", "tune"),
            ("unknown_score", "auto"),
            ("unknown_share", None),
            ("unknown_per", None),
        )
    ),
    Rule(
        "retrieve.unknown_per_min",
        lambda r, w: r.unknown_per is None and _set(r, "unknown_per_min"),
        "no effect while retrieve.unknown_per is unset",
    ),
    Rule(
        "retrieve.unknown_per",
        lambda r, w: r.unknown_per is not None and w.metric == "map@5" and _unknown_per_problem(r, w) is not None,
        lambda r, w: _unknown_per_problem(r, w),
    ),
    Rule(
        "retrieve.unknown_threshold",
        lambda r, w: r.unknown_share is not None and r.unknown_threshold != "tune",
        "no effect while retrieve.unknown_share sets the threshold",
    ),
    Rule(
        "folds.unknown_classes",
        lambda r, w: bool(w.cfg.folds.unknown_classes) and w.metric == "map@100",
        "retrieval validation scores known queries only",
    ),
    Rule(
        "retrieve.voting.head_weight",
        lambda r, w: r.voting.head_weight > 0 and w.metric == "map@100",
        "retrieval ranks index images; no labels are voted",
    ),
    Rule(
        "retrieve.penalty.pool",
        lambda r, w: bool(r.penalty.pool) and not r.penalty.enabled,
        "no effect while retrieve.penalty.enabled is false",
    ),
    Rule(
        "retrieve.penalty.enabled",
        lambda r, w: r.penalty.enabled and w.metric == "map@100",
        "the distractor penalty applies to label votes, not to retrieval",
    ),
    # the second stage
    *(
        Rule(
            f"retrieve.verify.{name}",
            lambda r, w, name=name: _set(r.verify, name) and r.verify.fusion != "additive",
            "only retrieve.verify.fusion 'additive' uses it (got '{s.verify.fusion}')",
        )
        for name in ("weight", "cap")
    ),
    Rule(
        "retrieve.verify.top_k",
        lambda r, w: r.verify.enabled and r.verify.top_k is not None and r.verify.top_k > r.k,
        "{s.verify.top_k} candidates, but the search keeps retrieve.k = {s.k} per query",
    ),
    Rule(
        "retrieve.verify.weights_file",
        lambda r, w: r.verify.weights_file is not None and r.verify.extractor == "sift",
        "SIFT has no weights (only retrieve.verify.extractor 'disk' or 'aliked')",
    ),
    Rule(
        "retrieve.verify.matcher",
        lambda r, w: r.verify.matcher == "lightglue" and r.verify.extractor == "sift",
        "LightGlue's SIFT model reads each keypoint's scale and orientation, which the SIFT cache does not keep: "
        "set retrieve.verify.extractor to disk or aliked",
    ),
    Rule(
        "retrieve.verify.ratio",
        lambda r, w: _set(r.verify, "ratio") and r.verify.matcher == "lightglue",
        "LightGlue decides its own matches (only retrieve.verify.matcher 'ratio' uses it)",
    ),
    Rule(
        "retrieve.verify.matcher_weights_file",
        lambda r, w: r.verify.matcher_weights_file is not None and r.verify.matcher == "ratio",
        "the ratio test has no weights (only retrieve.verify.matcher 'lightglue')",
    ),
    _disabled_section_keys,
    Rule(
        "retrieve.label_rerank.enabled",
        lambda r, w: r.label_rerank.enabled and not w.ranks_index,
        "it re-ranks index images, and no submission format here retrieves from an index",
    ),
]


def _problems(checks: list[Check], section: Any, where: Where) -> list[str]:
    out: list[str] = []
    for check in checks:
        out += check.problems(section, where) if isinstance(check, Rule) else check(section, where)
    return out


def ineffective_values(cfg: Config, metric: str, ranks_index: bool | None = None) -> list[str]:
    """Keys whose value the loaded config sets but nothing would use, each with the reason. `metric`
    is the competition's; `ranks_index`: whether one of its submission formats ranks index images
    (None: by the metric)."""
    where = Where(cfg, metric, metric == "map@100" if ranks_index is None else ranks_index)
    problems = _problems(PSEUDO_RULES, cfg.pseudo, where)
    for i, member in enumerate(cfg.members):
        problems += _problems(MEMBER_RULES, member, Where(cfg, metric, where.ranks_index, i))
    problems += _problems(EMBED_RULES, cfg.embed, where) + _problems(ENSEMBLE_RULES, cfg.ensemble, where)
    return problems + _problems(RETRIEVE_RULES, cfg.retrieve, where)


def device_notes(cfg: Config, device_type: str) -> list[str]:
    """Settings this device runs differently from what they say (one warning line each)."""
    notes = []
    if device_type == "cpu":
        for i, member in enumerate(cfg.members):
            if member.train.amp == "fp16":
                notes.append(f"members.{i}.train.amp: fp16 runs as bf16 on the CPU (no fp16 autocast here)")
    return notes
