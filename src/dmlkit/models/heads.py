"""Margin heads: cosine logits to K sub-centers per class, a per-class margin on the target.

The heads share everything but `apply_margin` (template method): ArcFace adds the margin to the
angle, CosFace subtracts it from the cosine, `none` leaves the cosine alone. Everything runs in
fp32 even under autocast, which keeps bf16/fp16 training free of NaN.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def dynamic_margins(
    counts: np.ndarray, form: str, a: float = 0.45, b: float = 0.05, lam: float = -0.25, fixed: float = 0.3
) -> np.ndarray:
    """Per-class margins from class sizes; rare classes get larger margins.

    glr3 (GLR2020 3rd): t = n^(-1/4), min-max normalised, m = a·t + b (so m ∈ [b, a+b]).
    power (Happywhale 1st): m = a·n^λ + b. none: every class gets `fixed`.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if (counts <= 0).any():
        raise ValueError("dynamic margins need a positive image count for every class")
    if form == "none":
        return np.full(counts.shape, fixed)
    if form == "glr3":
        t = counts**-0.25
        span = t.max() - t.min()
        t = (t - t.min()) / span if span > 0 else np.full_like(t, 0.5)
        return a * t + b
    if form == "power":
        return a * counts**lam + b
    raise ValueError(f"unknown dynamic margin form '{form}' (glr3, power, none)")


def sample_classes(
    labels: torch.Tensor, num_classes: int, rate: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial FC (An et al. 2021): the classes whose centers take part in this step's softmax.

    Every class in `labels` plus uniformly drawn others, ⌈rate·C⌉ in all (more when the batch holds
    more classes); returns (sorted class ids, labels as positions in them). `generator` is a CPU
    generator (per-epoch seeding keeps resumed runs identical); the ids move to the labels' device.
    """
    count = max(1, min(num_classes, math.ceil(rate * num_classes)))
    priority = torch.rand(num_classes, generator=generator).to(labels.device)
    priority[labels] = 2.0  # positives first
    positives = int(torch.unique(labels).numel())
    classes = priority.topk(max(count, positives), sorted=False).indices.sort().values
    return classes, torch.searchsorted(classes, labels)


def adacos_scale(num_classes: int) -> float:
    """The fixed AdaCos scale √2·ln(C−1)."""
    return math.sqrt(2.0) * math.log(max(num_classes - 1, 2))


class _GatherIntoGradient(torch.autograd.Function):
    """Rows `classes` of `view` (the weight as (C, K, D)), in fp32; backward adds their gradient into
    `grad` (the weight's persistent gradient, same shape) and hands autograd nothing for the weight."""

    @staticmethod
    def forward(ctx, view: torch.Tensor, classes: torch.Tensor, grad: torch.Tensor):
        ctx.save_for_backward(classes)
        ctx.grad = grad
        return view[classes].float()

    @staticmethod
    def backward(ctx, rows_grad: torch.Tensor):
        (classes,) = ctx.saved_tensors
        ctx.grad.index_add_(0, classes, rows_grad.to(ctx.grad.dtype))
        return None, None, None


@dataclass
class LossTerms:
    """A head's training loss on a batch, each sample's unit class center (what SEE expands around;
    None when not asked for) and the loss of synthetic rows built from real rows `rows`."""

    loss: torch.Tensor
    centers: torch.Tensor | None
    synthetic_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MarginHead(nn.Module):
    """Sub-center cosine classifier; subclasses define how the margin modifies the target cosine."""

    supports_partial_fc = True  # its rows can be sampled (sample_classes) and updated sparsely

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margins: torch.Tensor | np.ndarray,
        scale: float,
        subcenters: int = 1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.subcenters = subcenters
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, embedding_size))
        # Unit-variance init (as pytorch-metric-learning): Adam moves each element by ~lr per step, so
        # sub-centers with a small norm would be turned around by every step.
        nn.init.normal_(self.weight, std=1.0)
        self.register_buffer("margins", torch.as_tensor(np.asarray(margins), dtype=torch.float32))
        if self.margins.shape != (num_classes,):
            raise ValueError(f"margins: expected ({num_classes},), got {tuple(self.margins.shape)}")
        # Partial FC: where the sampled rows' gradient accumulates (see sampled_rows).
        self.persistent_grad = True
        self._grad_buffer: torch.Tensor | None = None
        self._touched: torch.Tensor | None = None  # (C,) bool: classes with gradient in the buffer

    def sampled_rows(self, classes: torch.Tensor) -> torch.Tensor:
        """(n·K, D) fp32 rows of the sampled `classes`; their gradient lands in `weight.grad`.

        With `persistent_grad` their gradient is added into a gradient buffer kept across steps,
        and only the classes touched since the optimizer last dropped the gradient are zeroed
        again. Autograd's gather would allocate and zero a whole weight-sized gradient every step —
        at 81k classes × 3 × 512 that page-faulted 500 MB and cost more than the head's matmuls.
        The optimizer sees the same dense gradient either way. Off under DDP, whose reducer
        needs the parameter's own autograd hook.
        """
        view = self.weight.view(self.num_classes, self.subcenters, -1)
        if not (self.persistent_grad and torch.is_grad_enabled() and self.weight.requires_grad):
            return view.float()[classes].flatten(0, 1)
        if self.weight.grad is None:  # a new accumulation (the optimizer dropped the gradient)
            buffer = self._grad_buffer
            if buffer is None or buffer.shape != self.weight.shape or buffer.dtype != self.weight.dtype:
                buffer = torch.zeros_like(self.weight)
                self._touched = torch.zeros(self.num_classes, dtype=torch.bool, device=buffer.device)
            else:
                buffer.view_as(view).index_fill_(0, self._touched.nonzero().flatten(), 0.0)
                self._touched.zero_()
            self._grad_buffer = buffer
            self.weight.grad = buffer
        grad = self.weight.grad.view_as(view)
        if self.weight.grad is self._grad_buffer:
            self._touched[classes] = True
        return _GatherIntoGradient.apply(view, classes, grad).flatten(0, 1)

    def touched_rows(self) -> torch.Tensor:
        """Rows of the weight with gradient in this accumulation: the sampled classes' sub-centers
        (from the persistent gradient buffer's bookkeeping; under DDP, the rows with a nonzero gradient)."""
        if self.weight.grad is not None and self.weight.grad is self._grad_buffer and self._touched is not None:
            classes = self._touched.nonzero().flatten()
            offsets = torch.arange(self.subcenters, device=classes.device)
            return (classes.unsqueeze(1) * self.subcenters + offsets).flatten()
        if self.weight.grad is None:
            return torch.zeros(0, dtype=torch.long, device=self.weight.device)
        return self.weight.grad.abs().sum(dim=1).nonzero().flatten()

    def center_factors(
        self, dtype: torch.dtype | None = None, classes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight in the matmul dtype, fp32 1/‖row‖): cosines are (e·w)·(1/‖w‖).

        `classes` (sorted ids, from sample_classes) restricts the centers to those classes' rows
        (Partial FC); their gradient lands in the same rows of the full weight.

        No normalised copy of the (possibly 100M-parameter) weight is made: F.normalize's backward
        (a broadcast division over the whole weight) cost more than the backbone's convolutions in
        a profile of the GLR2020-sized step. Compute once per step and share between the real and
        the synthetic (SEE) rows; a bf16/fp16 weight makes the product run at the low-precision
        matmul rate (fp32 accumulation).
        """
        weight = self.weight.float() if classes is None else self.sampled_rows(classes)
        inverse_norm = torch.linalg.vector_norm(weight, dim=1).clamp(min=1e-12).reciprocal()
        return (weight if dtype is None else weight.to(dtype)), inverse_norm

    def subcenter_cosines(
        self, embeddings: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """(B, C, K) fp32 cosines between embeddings and every sub-center (or the C sampled classes of
        `factors`, from center_factors)."""
        weight, inverse_norm = self.center_factors() if factors is None else factors
        emb = F.normalize(embeddings.float(), dim=1).to(weight.dtype)
        return (F.linear(emb, weight).float() * inverse_norm).view(len(emb), -1, self.subcenters)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C) class cosines: the max over each class's sub-centers."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.subcenter_cosines(embeddings).amax(dim=2)

    def closest_centers(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        subcenter_cos: torch.Tensor | None = None,
        columns: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, E) unit vector of each sample's own-class sub-center closest to it (a constant for the
        gradient). `subcenter_cos`: the (B, C, K) cosines when the caller already has them, with
        `columns` the labels' positions in them when they cover sampled classes only."""
        with torch.no_grad():
            if subcenter_cos is None:
                subcenter_cos = self.subcenter_cosines(embeddings)
            column = labels if columns is None else columns
            best = subcenter_cos[torch.arange(len(labels), device=labels.device), column].argmax(dim=1)
            rows = labels * self.subcenters + best
            return F.normalize(self.weight.float()[rows], dim=1)

    @classmethod
    def from_counts(  # keyword-only options, one per head.* key of the config
        cls,
        embedding_size: int,
        class_counts: np.ndarray,
        *,
        scale: float | str = 30.0,
        subcenters: int = 1,
        margin: float = 0.3,
        dynamic: str = "none",
        dynamic_a: float = 0.45,
        dynamic_b: float = 0.05,
        dynamic_lambda: float = -0.25,
    ) -> MarginHead:
        """The head over `len(class_counts)` classes, each class's margin from its image count
        (`dynamic_margins`; `margin` for every class under `dynamic='none'`); `scale` 'adacos' is
        AdaCos's fixed scale for that many classes."""
        margins = dynamic_margins(class_counts, dynamic, dynamic_a, dynamic_b, dynamic_lambda, margin)
        s = adacos_scale(len(class_counts)) if scale == "adacos" else float(scale)
        return cls(embedding_size, len(class_counts), margins, s, subcenters)

    def apply_margin(self, cos: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_terms(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        *,
        matmul_dtype: torch.dtype | None = None,
        sample_rate: float = 1.0,
        generator: torch.Generator | None = None,
        with_centers: bool = False,
    ) -> LossTerms:
        """CE on the margin logits; with `with_centers`, each sample's closest own-class sub-center
        (for SEE); and the loss of synthetic rows (expanded from real rows `rows`) against the same
        sub-centers. `sample_rate` < 1: Partial FC, only the sampled classes' centers (the batch's
        among them) enter the softmax."""
        classes, columns = None, labels
        if sample_rate < 1.0:
            classes, columns = sample_classes(labels, self.num_classes, sample_rate, generator)
        margins = self.margins[labels]
        # The sub-center norms are computed once per step and shared by the real and synthetic rows;
        # the real rows' cosines also pick each sample's closest sub-center for SEE.
        factors = self.center_factors(matmul_dtype, classes)
        subcenter_cos = self.subcenter_cosines(embeddings, factors)
        loss = F.cross_entropy(self.margin_logits(subcenter_cos, columns, margins), columns)
        centers = self.closest_centers(embeddings, labels, subcenter_cos.detach(), columns) if with_centers else None

        def synthetic_loss(synthetic: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            cos = self.subcenter_cosines(synthetic, factors)
            return F.cross_entropy(self.margin_logits(cos, columns[rows], margins[rows]), columns[rows])

        return LossTerms(loss, centers, synthetic_loss)

    def classes_state(self, n: int) -> dict:
        """The state of the first `n` classes' sub-centers and margins (rotated classes are dropped)."""
        return {
            "weight": self.weight.detach()[: n * self.subcenters].clone(),
            "margins": self.margins[:n].clone(),
        }

    def margin_logits(
        self, subcenter_cos: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scaled logits from (B, C, K) sub-center cosines, the margin applied to each target (fp32).

        `labels` index the columns; with sampled classes pass each sample's `margins` (by class id)."""
        cos = subcenter_cos.amax(dim=2)
        index = labels.view(-1, 1)
        target = cos.gather(1, index).squeeze(1)
        modified = self.apply_margin(target, self.margins[labels] if margins is None else margins)
        logits = cos.scatter(1, index, modified.unsqueeze(1))
        return logits * self.scale

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits with the margin applied to each sample's target class (fp32)."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.margin_logits(self.subcenter_cosines(embeddings), labels)


class ArcFaceHead(MarginHead):
    """cos(θ + m); beyond θ + m > π (where it stops decreasing) the guard cos θ − m·sin m."""

    def apply_margin(self, cos: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        cos = cos.clamp(-1.0, 1.0)
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=1e-12))
        shifted = cos * torch.cos(margin) - sin * torch.sin(margin)
        threshold = torch.cos(math.pi - margin)
        return torch.where(cos > threshold, shifted, cos - margin * torch.sin(margin))


class CosFaceHead(MarginHead):
    def apply_margin(self, cos: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        return cos - margin


class NoMarginHead(MarginHead):
    def apply_margin(self, cos: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        return cos


class ProxyAnchorHead(nn.Module):
    """Proxy-Anchor (Kim et al. 2020), pytorch-metric-learning's `ProxyAnchorLoss`: one proxy per
    class; per proxy, the batch's positives are pulled in and its negatives pushed out (margin δ,
    scale α). Not a softmax over classes, so no margins, sub-centers or Partial FC; SEE's synthetic
    rows go through the same loss (around their class proxy)."""

    subcenters = 1
    supports_partial_fc = False

    def __init__(self, embedding_size: int, num_classes: int, margin: float = 0.1, alpha: float = 32.0):
        from pytorch_metric_learning.losses import ProxyAnchorLoss  # heavy (~1.5 s): only this head loads it

        super().__init__()
        self.num_classes = num_classes
        self.loss = ProxyAnchorLoss(num_classes, embedding_size, margin=margin, alpha=alpha)

    @classmethod
    def from_counts(
        cls, embedding_size: int, class_counts: np.ndarray, *, proxy_margin: float = 0.1, proxy_alpha: float = 32.0
    ) -> ProxyAnchorHead:
        return cls(embedding_size, len(class_counts), proxy_margin, proxy_alpha)

    def class_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings.float(), labels)

    def loss_terms(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        *,
        matmul_dtype: torch.dtype | None = None,
        sample_rate: float = 1.0,
        generator: torch.Generator | None = None,
        with_centers: bool = False,
    ) -> LossTerms:
        """The Proxy-Anchor loss, the proxies of the labels' classes (SEE's centers) and the same loss
        on synthetic rows; a softmax's matmul precision and Partial FC do not apply."""
        centers = self.centers(labels) if with_centers else None
        return LossTerms(
            self.class_loss(embeddings, labels),
            centers,
            lambda synthetic, rows: self.class_loss(synthetic, labels[rows]),
        )

    def centers(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, E) unit proxies of the labels' classes (constants for the gradient)."""
        return F.normalize(self.loss.proxies.detach().float()[labels], dim=1)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C) cosines to the class proxies."""
        proxies = F.normalize(self.loss.proxies.float(), dim=1)
        return F.normalize(embeddings.float(), dim=1) @ proxies.T

    def classes_state(self, n: int) -> dict:
        """The state of the first `n` classes' proxies (rotated classes are dropped when saving)."""
        return {"loss.proxies": self.loss.proxies.detach()[:n].clone()}


Head = MarginHead | ProxyAnchorHead

HEADS: dict[str, type[MarginHead] | type[ProxyAnchorHead]] = {
    "arcface": ArcFaceHead,
    "cosface": CosFaceHead,
    "none": NoMarginHead,
    "proxy_anchor": ProxyAnchorHead,
}


def head_options(name: str) -> tuple[str, ...]:
    """The keyword options `create_head(name, ...)` takes (beyond the size and the class counts)."""
    if name not in HEADS:
        raise ValueError(f"unknown head type '{name}'; known: {sorted(HEADS)}")
    parameters = inspect.signature(HEADS[name].from_counts).parameters.values()
    return tuple(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)


def create_head(name: str, embedding_size: int, class_counts: np.ndarray, **options) -> Head:
    """The head registered as `name` over `len(class_counts)` classes (as timm's `create_model`):
    margin heads take scale, subcenters, margin and the dynamic-margin options (`dynamic_margins`),
    Proxy-Anchor proxy_margin and proxy_alpha (`head_options(name)` lists them)."""
    unknown = set(options) - set(head_options(name))
    if unknown:
        raise TypeError(f"head '{name}' takes no option(s) {sorted(unknown)}; it takes {list(head_options(name))}")
    return HEADS[name].from_counts(embedding_size, np.asarray(class_counts), **options)


__all__ = [
    "HEADS",
    "ArcFaceHead",
    "CosFaceHead",
    "LossTerms",
    "MarginHead",
    "NoMarginHead",
    "ProxyAnchorHead",
    "adacos_scale",
    "create_head",
    "dynamic_margins",
    "head_options",
    "sample_classes",
]
