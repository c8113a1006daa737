"""Batched SEE vs a per-sample loop of the same math (as in the paper's code), and SEE's share of a step."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import best_time, report

from dmlkit.models.see import see_expand, simplex_vertices


def see_loop(z: torch.Tensor, centers: torch.Tensor, n: int) -> torch.Tensor:
    """The paper's shape: one sample at a time, the basis built one vector at a time (Gram–Schmidt)."""
    out = []
    vertices = simplex_vertices(n).to(z.dtype)[1:]
    for i in range(len(z)):
        w = centers[i].detach()
        proj = z[i] @ w
        r = z[i] - proj * w
        radius = r.norm().clamp(min=1e-12)
        basis = [r / radius]
        for _ in range(n):
            v = torch.randn_like(w)
            v = v - (v @ w) * w
            for u in basis:
                v = v - (v @ u.detach()) * u.detach()
            basis.append(v / v.norm())
        u = torch.stack(basis, dim=1)  # (D, n+1)
        out.append(proj * w + radius * (vertices @ u.T))
    return torch.stack(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh bench see")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for batch, dim, n in [(64, 512, 16)] + ([] if args.quick else [(256, 512, 16), (64, 128, 16)]):
        z = F.normalize(torch.randn(batch, dim, device=device), dim=1).requires_grad_()
        w = F.normalize(torch.randn(batch, dim, device=device), dim=1)

        def batched(z=z, w=w, n=n):
            see_expand(z, w, n).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()

        def loop(z=z, w=w, n=n):
            see_loop(z, w, n).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()

        repeats = 3 if args.quick else 10
        t_batched = best_time(batched, repeats)
        t_loop = best_time(loop, max(1, repeats // 3))
        rows.append(
            {
                "device": device.type,
                "batch": batch,
                "dim": dim,
                "n_expansion": n,
                "batched_ms": round(t_batched * 1e3, 2),
                "loop_ms": round(t_loop * 1e3, 1),
                "speedup": round(t_loop / t_batched, 1),
            }
        )
    report("see", rows, {"target": "≥4× on CPU, ≥50× on GPU (forward + backward)"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
