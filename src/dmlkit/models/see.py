"""SEE — Spherical Embedding Expansion, batched, as the paper's official code trains it.

For a unit embedding z of class c with (closest sub-)center w: z = (z·w)w + r. With u1 = r/‖r‖
and random directions u2…u_{n+1} orthonormal to w and u1 (Gram–Schmidt, one vector at a time),
the n non-first Max-Mahalanobis centres in ℝ^{n+1} (a regular simplex, pairwise cosine −1/n,
first vertex e1), read as coordinates over (u1…u_{n+1}) and scaled by ‖r‖, plus (z·w)w, give n
synthetic embeddings: the same cosine to the center as z, residuals spread as far apart as possible.

Gradient (`see.gradient`): the paper's code expands *detached* embeddings, so the loss of the
synthetic rows trains the proxies / class centres only (`proxies`, the default). This project's
extension `backbone` lets the gradient flow through z·w, ‖r‖ and u1 into the backbone; the centre
and the random directions are constants either way. One QR over the whole batch builds the bases.

Selection as published: the top round(B·fraction) of the global batch (gathered across processes)
by cosine to the centre, the fraction rising along a cosine schedule at progress e/E; or a cosine
threshold falling from `start` to `end`, clamped at `lower_bound`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def simplex_vertices(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n+1, n+1) Max-Mahalanobis centres (Pang et al. 2019): unit rows with pairwise cosine −1/n,
    vertex i in span(e1…e_i), the first e1. Their lower-triangular construction is the Cholesky
    factor of the first n rows' Gram matrix; the last vertex is minus the sum of the others."""
    if n < 1:
        raise ValueError(f"SEE needs n_expansion ≥ 1, got {n}")
    gram = torch.full((n, n), -1.0 / n, dtype=torch.float64)
    gram.fill_diagonal_(1.0)
    vertices = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    vertices[:n, :n] = torch.linalg.cholesky(gram)
    vertices[n] = -vertices[:n].sum(dim=0)
    return vertices.to(dtype)


def see_expand(
    z: torch.Tensor,
    centers: torch.Tensor,
    n_expansion: int,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, n, D) synthetic unit embeddings for unit embeddings z (B, D) and unit centers (B, D).

    `noise` (B, D, n): the random directions before orthonormalisation (drawn from `generator`
    when not given). Pass `z.detach()` for the paper's proxies-only gradient."""
    batch, dim = z.shape
    if dim < n_expansion + 2:
        raise ValueError(f"SEE needs embedding size ≥ n_expansion + 2 ({n_expansion + 2}), got {dim}")
    z = z.float()
    w = centers.detach().float()
    proj = (z * w).sum(dim=1, keepdim=True)  # (B, 1)
    residual = z - proj * w
    radius = residual.norm(dim=1, keepdim=True).clamp(min=1e-12)
    u1 = residual / radius
    if noise is None:
        # Drawn on the generator's device (a CPU generator seeds the run on any device), then moved.
        noise_device = generator.device if generator is not None else z.device
        noise = torch.randn(batch, dim, n_expansion, generator=generator, device=noise_device, dtype=z.dtype)
    basis = torch.cat([w.unsqueeze(2), u1.detach().unsqueeze(2), noise.to(z.device, z.dtype)], dim=2)
    q, r = torch.linalg.qr(basis)
    # Householder QR may flip a column's sign; with R's diagonal made positive, Q is Gram–Schmidt's basis.
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)
    rest = q[:, :, 2:]  # (B, D, n): orthonormal, orthogonal to w and u1
    vertices = simplex_vertices(n_expansion).to(device=z.device, dtype=z.dtype)[1:]  # (n, n+1)
    directions = vertices[:, :1].unsqueeze(0) * u1.unsqueeze(1)  # (B, n, D) from u1
    directions = directions + torch.einsum("vj,bdj->bvd", vertices[:, 1:], rest)
    return proj.unsqueeze(1) * w.unsqueeze(1) + radius.unsqueeze(1) * directions


def schedule_value(start: float, end: float, progress: float) -> float:
    """Cosine schedule from `start` (progress 0) to `end` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0


def epoch_value(schedule: str, start: float, end: float, epoch: int, epochs: int, lower_bound: float | None) -> float:
    """The selection value of epoch `epoch` (0-based) of `epochs`, as published: progress e/E (the last
    epoch stops short of `end`); the threshold, falling from `start` to `end`, is kept ≥ `lower_bound`."""
    value = schedule_value(start, end, epoch / max(1, epochs))
    if schedule == "threshold" and lower_bound is not None:
        value = max(value, lower_bound)
    return value


def _gathered(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's `values` concatenated in rank order, and where this process's part starts."""
    world = dist.get_world_size()
    size = torch.tensor([len(values)], device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = torch.full((max(sizes),), float("-inf"), dtype=values.dtype, device=values.device)
    padded[: len(values)] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    whole = torch.cat([part[:s] for part, s in zip(parts, sizes, strict=True)])
    return whole, sum(sizes[: dist.get_rank()])


def top_fraction_mask(cos_to_center: torch.Tensor, fraction: float) -> torch.Tensor:
    """The top round(B·fraction) samples by cosine; B and the ranking over the global batch under DDP
    (the cosines are gathered, so the rows chosen do not depend on the number of processes)."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    values, offset = _gathered(cos_to_center.detach()) if distributed else (cos_to_center.detach(), 0)
    count = min(round(fraction * len(values)), len(values))
    mask = torch.zeros(len(values), dtype=torch.bool, device=values.device)
    if count > 0:
        mask[values.topk(count).indices] = True
    return mask[offset : offset + len(cos_to_center)]


def select_confident(cos_to_center: torch.Tensor, schedule: str, value: float) -> torch.Tensor:
    """Boolean mask of the samples to expand: the top `value` fraction, or cosine ≥ `value`."""
    if schedule == "top_fraction":
        return top_fraction_mask(cos_to_center, value)
    if schedule == "threshold":
        return cos_to_center >= value
    raise ValueError(f"unknown SEE schedule '{schedule}' (top_fraction, threshold)")


__all__ = ["epoch_value", "see_expand", "select_confident", "simplex_vertices", "top_fraction_mask"]
