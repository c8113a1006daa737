"""The training objective: margin-head cross-entropy, SEE's synthetic rows and Partial FC, in one
module so that one DDP wrapper synchronises the embedding model and the head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MemberConfig
from .heads import MarginHead, sample_classes
from .see import see_expand, select_confident


class MarginModel(nn.Module):
    """Embedding model and head in one module, so one DDP wrapper synchronises both."""

    def __init__(self, model: nn.Module, head: MarginHead, member: MemberConfig):
        super().__init__()
        self.model = model
        self.head = head
        self.see = member.see
        self.matmul = member.head.matmul
        self.sample_rate = member.head.sample_rate

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, see_value: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, int]:
        """Cross-entropy on the margin logits, plus λ·CE on SEE's synthetic embeddings; (loss, #expanded)."""
        embeddings = self.model(images)
        head = self.head
        device_type = embeddings.device.type
        matmul_dtype = None
        if self.matmul == "amp" and torch.is_autocast_enabled(device_type):
            matmul_dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type=device_type, enabled=False):
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
            expanded = 0
            if self.see.enabled and self.see.weight > 0:
                synthetic_loss, expanded = self._see_loss(
                    embeddings, labels, columns, margins, subcenter_cos, factors, see_value, generator
                )
                if expanded:
                    loss = loss + self.see.weight * synthetic_loss
        return loss, expanded

    def _see_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        columns: torch.Tensor,
        margins: torch.Tensor,
        subcenter_cos: torch.Tensor,
        factors: tuple[torch.Tensor, torch.Tensor],
        see_value: float,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor | None, int]:
        """CE of SEE's synthetic embeddings of the confident samples, and how many were expanded."""
        head = self.head
        centers = head.closest_centers(embeddings, labels, subcenter_cos.detach(), columns)
        cos_to_center = (embeddings.float().detach() * centers).sum(dim=1)
        mask = select_confident(cos_to_center, self.see.schedule, see_value)
        expanded = int(mask.sum())
        if not expanded:
            return None, 0
        n = self.see.n_expansion
        synthetic = see_expand(embeddings[mask], centers[mask], n, generator).reshape(-1, embeddings.shape[1])
        synthetic_columns = columns[mask].repeat_interleave(n)
        synthetic_cos = head.subcenter_cosines(synthetic, factors)
        logits = head.margin_logits(synthetic_cos, synthetic_columns, margins[mask].repeat_interleave(n))
        return F.cross_entropy(logits, synthetic_columns), expanded
