"""The training objective: the head's loss (margin softmax with Partial FC, or Proxy-Anchor) plus
λ × the same loss on SEE's synthetic rows, in one module so that one DDP wrapper synchronises the
embedding model and the head. Proxy-Anchor + SEE with `see.gradient: proxies` is the paper's method
(PA(real) + λ·PA(synthetic alone), same proxies, no synthetic gradient into the backbone); SEE on a
margin head, or with `see.gradient: backbone`, is this project's extension."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MemberConfig
from .heads import MarginHead, ProxyAnchorHead, sample_classes
from .see import see_expand, select_confident


class MarginModel(nn.Module):
    """Embedding model and head in one module, so one DDP wrapper synchronises both."""

    def __init__(
        self,
        model: nn.Module,
        head: MarginHead | ProxyAnchorHead,
        member: MemberConfig,
        aux_head: MarginHead | None = None,
    ):
        super().__init__()
        self.model = model
        self.head = head
        self.aux_head = aux_head  # head.aux: a second margin head on another label column
        self.aux = member.head.aux
        self.see = member.see
        self.matmul = member.head.matmul
        self.sample_rate = member.head.sample_rate

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, see_value: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, int]:
        """The head's loss, plus λ·(the same loss) on SEE's synthetic embeddings; (loss, #expanded).

        `labels`: (B,) identity classes, or (B, 2) with the auxiliary head's class in column 1 (−1:
        none); then the loss is identity_weight × that loss + weight × the auxiliary head's."""
        aux_labels = None
        if labels.ndim == 2:
            labels, aux_labels = labels[:, 0], labels[:, 1]
        embeddings = self.model(images)
        device_type = embeddings.device.type
        matmul_dtype = None
        if self.matmul == "amp" and torch.is_autocast_enabled(device_type):
            matmul_dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type=device_type, enabled=False):
            if isinstance(self.head, ProxyAnchorHead):
                loss = self.head.class_loss(embeddings, labels)
                centers = self.head.centers(labels)
                synthetic_loss = lambda synthetic, rows: self.head.class_loss(synthetic, labels[rows])  # noqa: E731
            else:
                loss, centers, synthetic_loss = self._margin_loss(embeddings, labels, matmul_dtype, generator)
            expanded = 0
            if self.see.enabled and self.see.weight > 0:
                extra, expanded = self._see_loss(embeddings, centers, synthetic_loss, see_value, generator)
                if expanded:
                    loss = loss + self.see.weight * extra
            if self.aux_head is not None and aux_labels is not None:
                aux_loss = auxiliary_loss(self.aux_head, embeddings, aux_labels, matmul_dtype)
                loss = self.aux.identity_weight * loss + self.aux.weight * aux_loss
        return loss, expanded

    def _margin_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        matmul_dtype: torch.dtype | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Callable]:
        """CE on the margin logits; each sample's closest own-class sub-center (for SEE); and the
        loss of synthetic rows (expanded from real rows `rows`) against the same sub-centers."""
        head = self.head
        # Partial FC: only the sampled classes' centers (the batch's among them) enter the softmax.
        classes, columns = None, labels
        if self.sample_rate < 1.0:
            classes, columns = sample_classes(labels, head.num_classes, self.sample_rate, generator)
        margins = head.margins[labels]
        # The sub-center norms are computed once per step and shared by the real and synthetic rows;
        # the real rows' cosines also pick each sample's closest sub-center for SEE.
        factors = head.center_factors(matmul_dtype, classes)
        subcenter_cos = head.subcenter_cosines(embeddings, factors)
        loss = F.cross_entropy(head.margin_logits(subcenter_cos, columns, margins), columns)
        centers = None
        if self.see.enabled and self.see.weight > 0:
            centers = head.closest_centers(embeddings, labels, subcenter_cos.detach(), columns)

        def synthetic_loss(synthetic: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            cos = head.subcenter_cosines(synthetic, factors)
            return F.cross_entropy(head.margin_logits(cos, columns[rows], margins[rows]), columns[rows])

        return loss, centers, synthetic_loss

    def _see_loss(
        self,
        embeddings: torch.Tensor,
        centers: torch.Tensor,
        synthetic_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        see_value: float,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor | None, int]:
        """The loss of SEE's synthetic embeddings of the confident samples, and how many were expanded."""
        cos_to_center = (embeddings.float().detach() * centers).sum(dim=1)
        mask = select_confident(cos_to_center, self.see.schedule, see_value)
        expanded = int(mask.sum())
        if not expanded:
            return None, 0
        n = self.see.n_expansion
        # The paper's code expands detached embeddings: the synthetic loss trains the proxies only.
        source = embeddings if self.see.gradient == "backbone" else embeddings.detach()
        synthetic = see_expand(source[mask], centers[mask], n, generator).reshape(-1, embeddings.shape[1])
        rows = mask.nonzero().flatten().repeat_interleave(n)  # each synthetic row's source row
        return synthetic_loss(synthetic, rows), expanded


def auxiliary_loss(
    head: MarginHead, embeddings: torch.Tensor, labels: torch.Tensor, matmul_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The margin head's cross-entropy over the rows with a class (label ≥ 0); every row passes
    through the head, so under DDP it gets a gradient even in a batch without any class (loss 0)."""
    known = labels >= 0
    targets = labels.clamp(min=0)
    logits = head.margin_logits(head.subcenter_cosines(embeddings, head.center_factors(matmul_dtype)), targets)
    losses = F.cross_entropy(logits, targets, reduction="none")
    return (losses * known).sum() / known.sum().clamp(min=1)
