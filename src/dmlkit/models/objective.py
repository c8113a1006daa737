"""The training objective: the head's loss (margin softmax with Partial FC, or Proxy-Anchor) plus
λ × the same loss on SEE's synthetic rows, in one module so that one DDP wrapper synchronises the
embedding model and the head. Proxy-Anchor + SEE with `see.gradient: proxies` is the paper's method
(PA(real) + λ·PA(synthetic alone), same proxies, no synthetic gradient into the backbone); SEE on a
margin head, or with `see.gradient: backbone`, is this project's extension."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .heads import Head, MarginHead
from .see import see_expand, select_confident


@dataclass(frozen=True)
class SEESettings:
    """Spherical Embedding Expansion in the objective: `weight` λ of the synthetic rows' loss,
    `n_expansion` rows per expanded sample, which samples (`schedule`: top_fraction | threshold, at
    the epoch's value passed to `forward`) and where the synthetic gradient goes (`gradient`:
    proxies, the paper's, or backbone)."""

    weight: float = 0.2
    n_expansion: int = 16
    schedule: Literal["top_fraction", "threshold"] = "top_fraction"
    gradient: Literal["proxies", "backbone"] = "proxies"


@dataclass(frozen=True)
class AuxWeights:
    """head.aux: the loss is identity × the head's loss + aux × the auxiliary head's."""

    identity: float = 0.437
    aux: float = 0.563


NO_AUX = AuxWeights()


class MarginModel(nn.Module):
    """Embedding model and head in one module, so one DDP wrapper synchronises both.

    `see`: SEE's settings (None: off); `sample_rate` < 1: Partial FC; `matmul` 'amp': the head's
    product in the autocast dtype (else fp32); `aux_head`: a second margin head on another label
    column, weighted by `aux_weights`."""

    def __init__(
        self,
        model: nn.Module,
        head: Head,
        *,
        see: SEESettings | None = None,
        sample_rate: float = 1.0,
        matmul: Literal["amp", "fp32"] = "amp",
        aux_head: MarginHead | None = None,
        aux_weights: AuxWeights = NO_AUX,
    ):
        super().__init__()
        self.model = model
        self.head = head
        self.aux_head = aux_head
        self.aux_weights = aux_weights
        self.see = see if see is not None and see.weight > 0 else None
        self.matmul = matmul
        self.sample_rate = sample_rate

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
            terms = self.head.loss_terms(
                embeddings,
                labels,
                matmul_dtype=matmul_dtype,
                sample_rate=self.sample_rate,
                generator=generator,
                with_centers=self.see is not None,
            )
            loss, expanded = terms.loss, 0
            if self.see is not None:
                extra, expanded = self._see_loss(embeddings, terms.centers, terms.synthetic_loss, see_value, generator)
                if expanded:
                    loss = loss + self.see.weight * extra
            if self.aux_head is not None and aux_labels is not None:
                aux_loss = auxiliary_loss(self.aux_head, embeddings, aux_labels, matmul_dtype)
                loss = self.aux_weights.identity * loss + self.aux_weights.aux * aux_loss
        return loss, expanded

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


__all__ = ["AuxWeights", "MarginModel", "SEESettings"]
