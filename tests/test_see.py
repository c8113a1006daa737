import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmlkit.models.see import schedule_value, see_expand, select_confident, simplex_vertices


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_simplex_vertices(n):
    v = simplex_vertices(n)
    gram = v @ v.T
    expected = torch.full((n + 1, n + 1), -1.0 / n, dtype=v.dtype)
    expected.fill_diagonal_(1.0)
    assert torch.allclose(gram, expected, atol=1e-10)
    assert torch.allclose(v[0], torch.eye(n + 1, dtype=v.dtype)[0], atol=1e-10)


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


def test_see_gradient_flows_to_source_not_center():
    z = F.normalize(torch.randn(4, 32), dim=1).requires_grad_()
    w = F.normalize(torch.randn(4, 32), dim=1).requires_grad_()
    s = see_expand(z, w, 8)
    (s * torch.randn_like(s)).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert w.grad is None  # the center is a constant


def test_see_gradient_through_projection_and_radius():
    """d/dz Σ_i s_i·w = n·w (via z·w); d/dz Σ_i s_i·u1 = n·(−1/n)·d‖r‖/dz = −u1 (via ‖r‖ and u1)."""
    torch.manual_seed(0)
    n = 6
    z = F.normalize(torch.randn(3, 24), dim=1).requires_grad_()
    w = F.normalize(torch.randn(3, 24), dim=1)
    (see_expand(z, w, n) * w[:, None]).sum().backward()
    assert torch.allclose(z.grad, n * w, atol=1e-5)
    z.grad = None
    u1 = F.normalize(z.detach() - (z.detach() * w).sum(1, keepdim=True) * w, dim=1)
    (see_expand(z, w, n) * u1[:, None]).sum().backward()
    assert torch.allclose(z.grad, -u1, atol=1e-5)


def test_see_rejects_too_small_dimension():
    with pytest.raises(ValueError, match="embedding size"):
        see_expand(torch.randn(2, 8), torch.randn(2, 8), 16)


def test_schedule_and_selection():
    assert schedule_value(0.04, 0.4, 0.0) == pytest.approx(0.04)
    assert schedule_value(0.04, 0.4, 1.0) == pytest.approx(0.4)
    assert schedule_value(0.04, 0.4, 0.5) == pytest.approx(0.22)
    cos = torch.tensor([0.1, 0.9, 0.5, 0.7])
    assert select_confident(cos, "top_fraction", 0.5).tolist() == [False, True, False, True]
    assert select_confident(cos, "threshold", 0.6).tolist() == [False, True, False, True]
    assert not select_confident(cos, "top_fraction", 0.0).any()
    assert np.isclose(schedule_value(0.9, 0.5, 2.0), 0.5)
