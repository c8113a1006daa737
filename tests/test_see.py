"""SEE as its paper's official code trains it: geometry, the proxies-only gradient, the loss against
an independent per-sample port of the published algorithm, and selection (round, e/E, global batch)."""

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from conftest import free_port
from dmlkit.models.heads import ArcFaceHead, ProxyAnchorHead
from dmlkit.models.objective import MarginModel, SEESettings
from dmlkit.models.see import epoch_value, schedule_value, see_expand, select_confident, simplex_vertices


def mmc_centres(n: int) -> np.ndarray:
    """Pang et al.'s Max-Mahalanobis centres, their iterative construction (one coordinate at a time)."""
    means = np.zeros((n + 1, n + 1))
    means[0, 0] = 1.0
    for i in range(1, n + 1):
        for j in range(i):
            means[i, j] = -(1.0 / n + means[i] @ means[j]) / means[j, j]
        means[i, i] = math.sqrt(abs(1.0 - means[i] @ means[i]))
    return means


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_simplex_vertices(n):
    v = simplex_vertices(n)
    gram = v @ v.T
    expected = torch.full((n + 1, n + 1), -1.0 / n, dtype=v.dtype)
    expected.fill_diagonal_(1.0)
    assert torch.allclose(gram, expected, atol=1e-10)
    assert torch.allclose(v[0], torch.eye(n + 1, dtype=v.dtype)[0], atol=1e-10)
    assert np.allclose(v.numpy(), mmc_centres(n), atol=1e-7)


def test_see_geometry():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(32, 64, generator=g), dim=1)
    w = F.normalize(torch.randn(32, 64, generator=g), dim=1)
    n = 16
    s = see_expand(z, w, n, generator=g)
    assert s.shape == (32, n, 64)
    assert torch.allclose(s.norm(dim=2), torch.ones(32, n), atol=1e-5)
    cos_src = (z * w).sum(1, keepdim=True)
    assert torch.allclose((s * w[:, None]).sum(2), cos_src.expand(-1, n), atol=1e-5)
    residual = F.normalize(s - (s * w[:, None]).sum(2, keepdim=True) * w[:, None], dim=2)
    gram = residual @ residual.transpose(1, 2)
    off = ~torch.eye(n, dtype=torch.bool)
    assert torch.allclose(gram[:, off], torch.full_like(gram[:, off], -1.0 / n), atol=1e-5)
    # the source residual is the simplex's first vertex: each synthetic residual is at cos −1/n to it
    u1 = F.normalize(z - cos_src * w, dim=1)
    assert torch.allclose((residual * u1[:, None]).sum(2), torch.full((32, n), -1.0 / n), atol=1e-5)


def test_see_gradient_through_projection_and_radius():
    """Undetached (the backbone extension): d/dz Σ_i s_i·w = n·w (via z·w); d/dz Σ_i s_i·u1 = −u1."""
    torch.manual_seed(0)
    n = 6
    z = F.normalize(torch.randn(3, 24), dim=1).requires_grad_()
    w = F.normalize(torch.randn(3, 24), dim=1).requires_grad_()
    (see_expand(z, w, n) * w.detach()[:, None]).sum().backward()
    assert torch.allclose(z.grad, n * w.detach(), atol=1e-5)
    assert w.grad is None  # the center is a constant
    z.grad = None
    u1 = F.normalize(z.detach() - (z.detach() * w.detach()).sum(1, keepdim=True) * w.detach(), dim=1)
    (see_expand(z, w, n) * u1[:, None]).sum().backward()
    assert torch.allclose(z.grad, -u1, atol=1e-5)


def test_see_rejects_too_small_dimension():
    with pytest.raises(ValueError, match="embedding size"):
        see_expand(torch.randn(2, 8), torch.randn(2, 8), 16)


# ------------------------------------------------------------------ the published algorithm, by hand
def port_see_points(z: torch.Tensor, w: torch.Tensor, noise: torch.Tensor, n: int) -> torch.Tensor:
    """One sample at a time, the basis one Gram–Schmidt step at a time, Pang et al.'s centres."""
    centres = torch.as_tensor(mmc_centres(n), dtype=torch.float64)
    points = []
    for i in range(len(z)):
        zi, wi = z[i].double(), w[i].double()
        proj = zi @ wi
        r = zi - proj * wi
        basis = [r / r.norm()]
        for j in range(n):
            v = noise[i, :, j].double()
            v = v - (v @ wi) * wi
            for u in basis:
                v = v - (v @ u) * u
            basis.append(v / v.norm())
        u = torch.stack(basis)  # (n+1, D)
        for k in range(1, n + 1):
            points.append((proj * wi + r.norm() * (centres[k] @ u)).float())
    return torch.stack(points)


def port_proxy_anchor(x: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, delta=0.1, alpha=32.0):
    """Kim et al. 2020: positives pulled per proxy with positives, negatives pushed per proxy."""
    cos = F.normalize(x.double(), dim=1) @ F.normalize(proxies.double(), dim=1).T
    pos_classes = sorted(set(labels.tolist()))
    pos = sum(torch.log1p(torch.exp(-alpha * (cos[labels == c, c] - delta)).sum()) for c in pos_classes)
    neg = sum(torch.log1p(torch.exp(alpha * (cos[labels != c, c] + delta)).sum()) for c in range(proxies.shape[0]))
    return pos / len(pos_classes) + neg / proxies.shape[0]


def test_loss_equals_a_port_of_the_published_algorithm():
    """PA(real) + λ·PA(synthetic alone): top round(24·0.3) = 7 rows expanded (ceil would take 8)."""
    torch.manual_seed(5)
    batch, dim, classes, n, frac, lam = 24, 32, 6, 8, 0.3, 0.2
    x = F.normalize(torch.randn(batch, dim), dim=1)  # the embedding model's output is unit length
    labels = torch.arange(batch) % classes
    head = ProxyAnchorHead(dim, classes)
    model = MarginModel(nn.Identity(), head, see=SEESettings(n_expansion=n, weight=lam))
    loss, expanded = model(x, labels, frac, torch.Generator().manual_seed(9))
    assert expanded == 7

    proxies = head.loss.proxies.detach()
    z, w = x, F.normalize(proxies[labels], dim=1)
    cos = (z * w).sum(1)
    chosen = sorted(range(batch), key=lambda i: -float(cos[i]))[:7]
    rows = torch.tensor(sorted(chosen))
    noise = torch.randn(len(rows), dim, n, generator=torch.Generator().manual_seed(9))
    synthetic = port_see_points(z[rows], w[rows], noise, n)
    expected = port_proxy_anchor(x, labels, proxies) + lam * port_proxy_anchor(
        synthetic, labels[rows].repeat_interleave(n), proxies
    )
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-6)


# ------------------------------------------------------------------------------- the gradient path
class UnitLinear(nn.Linear):
    def forward(self, x):
        return F.normalize(super().forward(x), dim=1)


def gradients(head: nn.Module, backbone: nn.Module, x, labels, **see) -> tuple[torch.Tensor, torch.Tensor]:
    model = MarginModel(backbone, head, see=SEESettings(n_expansion=4, **see))
    model.zero_grad(set_to_none=True)
    loss, expanded = model(x, labels, 0.5, torch.Generator().manual_seed(1))
    assert see.get("weight", 0.2) == 0 or expanded == len(x) // 2
    loss.backward()
    head_param = next(p for p in head.parameters())
    return backbone.weight.grad.clone(), head_param.grad.clone()


@pytest.mark.parametrize("head_kind", ["proxy_anchor", "arcface"])
def test_proxies_mode_moves_the_proxies_only(head_kind):
    torch.manual_seed(0)
    dim, classes = 16, 5
    backbone = UnitLinear(12, dim)
    if head_kind == "proxy_anchor":
        head = ProxyAnchorHead(dim, classes)
    else:
        head = ArcFaceHead(dim, classes, np.full(classes, 0.3), 16.0)
        head.persistent_grad = False
    x, labels = torch.randn(20, 12), torch.arange(20) % classes
    off_backbone, off_head = gradients(head, backbone, x, labels, weight=0.0)
    on_backbone, on_head = gradients(head, backbone, x, labels, weight=0.2, gradient="proxies")
    assert torch.equal(on_backbone, off_backbone)
    assert (on_head - off_head).norm() > 1e-3 * off_head.norm()
    ext_backbone, _ = gradients(head, backbone, x, labels, weight=0.2, gradient="backbone")
    assert (ext_backbone - off_backbone).norm() > 1e-3 * off_backbone.norm()


# ---------------------------------------------------------------------------------------- selection
def test_selection_counts_and_schedules_as_published():
    cos = torch.linspace(-1, 1, 180)
    assert int(select_confident(cos, "top_fraction", 0.04).sum()) == 7  # round(7.2); ceil gave 8
    assert int(select_confident(cos[:32], "top_fraction", 0.04).sum()) == 1  # round(1.28); ceil gave 2
    assert select_confident(cos, "top_fraction", 0.04)[-7:].all()
    small = torch.tensor([0.1, 0.9, 0.5, 0.7])
    assert select_confident(small, "threshold", 0.6).tolist() == [False, True, False, True]
    assert not select_confident(small, "top_fraction", 0.0).any()
    # top fraction rises from start to end at progress e/E: epoch 0 → start, never end itself
    assert epoch_value("top_fraction", 0.04, 0.4, 0, 4, None) == pytest.approx(0.04)
    assert epoch_value("top_fraction", 0.04, 0.4, 2, 4, None) == pytest.approx(0.22)
    assert epoch_value("top_fraction", 0.04, 0.4, 3, 4, None) == pytest.approx(0.4 - 0.36 * (1 - 0.5**0.5) / 2)
    # the threshold falls from start to end, clamped at the lower bound
    assert epoch_value("threshold", 0.9, 0.5, 0, 4, 0.6) == pytest.approx(0.9)
    assert epoch_value("threshold", 0.9, 0.5, 2, 4, 0.6) == pytest.approx(0.7)
    assert epoch_value("threshold", 0.9, 0.5, 3, 4, 0.6) == pytest.approx(0.6)
    assert epoch_value("threshold", 0.9, 0.5, 3, 4, None) == pytest.approx(0.5 + 0.4 * (1 - 0.5**0.5) / 2)
    assert np.isclose(schedule_value(0.9, 0.5, 2.0), 0.5)


def _select_on_rank(rank: int, world: int, port: int, parts: list[torch.Tensor], out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = select_confident(parts[rank], "top_fraction", 0.3).tolist()
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_select_the_rows_one_process_selects():
    """The fraction is of the global batch: the rows chosen do not depend on the number of processes
    (unequal per-rank batches included)."""
    cos = torch.rand(37, generator=torch.Generator().manual_seed(3))
    parts = [cos[:20], cos[20:]]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_select_on_rank, args=(2, free_port(), parts, out), nprocs=2, join=True)
        chosen = out[0] + out[1]
    single = select_confident(cos, "top_fraction", 0.3).tolist()
    assert chosen == single and sum(single) == round(0.3 * 37)
    # per rank, as before, would choose round(0.3·20) + round(0.3·17) rows of each part's own top
    assert chosen != [
        *select_confident(parts[0], "top_fraction", 0.3).tolist(),
        *select_confident(parts[1], "top_fraction", 0.3).tolist(),
    ]
