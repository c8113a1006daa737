"""SEE — Spherical Embedding Expansion, batched.

For a unit embedding z of class c with (closest sub-)center w: z = (z·w)w + r. With u1 = r/‖r‖
and random directions u2…u_{n+1} orthonormal to w and u1, the n non-first vertices of a regular
simplex in ℝ^{n+1} (pairwise cosine −1/n, first vertex e1), read as coordinates over
(u1…u_{n+1}) and scaled by ‖r‖, plus (z·w)w, give n synthetic embeddings: the same cosine to the
center as z, residuals spread as far apart as possible. Gradient flows through z·w, ‖r‖ and u1;
the center and the random directions are constants. One QR over the whole batch builds the bases.
"""

from __future__ import annotations

import math

import torch


def simplex_vertices(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n+1, n+1): unit rows with pairwise cosine −1/n, the first row e1 (Max-Mahalanobis centres)."""
    eye = torch.eye(n + 1, dtype=dtype)
    centred = eye - eye.mean(dim=0, keepdim=True)
    vertices = centred / centred.norm(dim=1, keepdim=True)
    # Householder reflection taking vertex 0 to e1 (an isometry: cosines are kept).
    v = vertices[0] - eye[0]
    if v.norm() > 1e-12:
        householder = eye - 2.0 * torch.outer(v, v) / (v @ v)
        vertices = vertices @ householder.T
    return vertices


def see_expand(
    z: torch.Tensor, centers: torch.Tensor, n_expansion: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, n, D) synthetic unit embeddings for unit embeddings z (B, D) and unit centers (B, D)."""
    batch, dim = z.shape
    if dim < n_expansion + 2:
        raise ValueError(f"SEE needs embedding size ≥ n_expansion + 2 ({n_expansion + 2}), got {dim}")
    z = z.float()
    w = centers.detach().float()
    proj = (z * w).sum(dim=1, keepdim=True)  # (B, 1)
    residual = z - proj * w
    radius = residual.norm(dim=1, keepdim=True).clamp(min=1e-12)
    u1 = residual / radius
    # Random directions, orthonormalised against w and u1 (detached: constants for the gradient).
    # Drawn on the generator's device (a CPU generator seeds the run on any device), then moved.
    noise_device = generator.device if generator is not None else z.device
    noise = torch.randn(batch, dim, n_expansion, generator=generator, device=noise_device, dtype=z.dtype).to(z.device)
    basis = torch.cat([w.unsqueeze(2), u1.detach().unsqueeze(2), noise], dim=2)  # (B, D, n+2)
    q, _ = torch.linalg.qr(basis)
    rest = q[:, :, 2:]  # (B, D, n): orthonormal, orthogonal to w and u1
    vertices = simplex_vertices(n_expansion).to(device=z.device, dtype=z.dtype)[1:]  # (n, n+1)
    directions = vertices[:, :1].unsqueeze(0) * u1.unsqueeze(1)  # (B, n, D) from u1
    directions = directions + torch.einsum("vj,bdj->bvd", vertices[:, 1:], rest)
    return proj.unsqueeze(1) * w.unsqueeze(1) + radius.unsqueeze(1) * directions


def schedule_value(start: float, end: float, progress: float) -> float:
    """Cosine schedule from `start` (progress 0) to `end` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0


def select_confident(cos_to_center: torch.Tensor, schedule: str, value: float) -> torch.Tensor:
    """Boolean mask of the samples to expand: the top `value` fraction, or cosine ≥ `value`."""
    if schedule == "top_fraction":
        count = int(math.ceil(value * len(cos_to_center)))
        mask = torch.zeros_like(cos_to_center, dtype=torch.bool)
        if count > 0:
            mask[cos_to_center.topk(min(count, len(cos_to_center))).indices] = True
        return mask
    if schedule == "threshold":
        return cos_to_center >= value
    raise ValueError(f"unknown SEE schedule '{schedule}' (top_fraction, threshold)")
