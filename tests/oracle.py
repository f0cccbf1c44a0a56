"""The float64 reference every layer is checked against: nn.BatchNorm on the concatenated batch."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def make_batches(sizes: Sequence[int], channels: int, spatial: Sequence[int], seed: int,
                 loc: float = 0.5, scale: float = 2.0, dtype=torch.float64) -> list[torch.Tensor]:
    """Per-rank input slices with the given batch sizes (same data on every rank for the same seed)."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn((sum(sizes), channels, *spatial), generator=g, dtype=torch.float64) * scale + loc
    # per-channel offsets so channels differ
    full = full + torch.linspace(-3, 3, channels, dtype=torch.float64).view(1, channels, *([1] * len(spatial)))
    return [t.to(dtype) for t in torch.split(full, list(sizes))]


def grad_weights(sizes: Sequence[int], channels: int, spatial: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Fixed upstream gradients so that the loss is sum(y * g)."""
    g = torch.Generator().manual_seed(seed + 1000)
    full = torch.randn((sum(sizes), channels, *spatial), generator=g, dtype=torch.float64)
    return list(torch.split(full, list(sizes)))


def reference_bn(x_full: torch.Tensor, g_full: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
                 momentum: Optional[float] = 0.1, eps: float = 1e-5, steps: int = 1):
    """float64 nn.BatchNorm training forward/backward on the whole batch; returns a dict of results."""
    x = x_full.detach().double().clone().requires_grad_(True)
    w = weight.detach().double().clone().requires_grad_(True)
    b = bias.detach().double().clone().requires_grad_(True)
    C = x.shape[1]
    rm = torch.zeros(C, dtype=torch.float64) if running_mean is None else running_mean.detach().double().clone()
    rv = torch.ones(C, dtype=torch.float64) if running_var is None else running_var.detach().double().clone()
    ys = []
    nbt = 0
    for i in range(steps):
        nbt += 1
        mom = (1.0 / nbt) if momentum is None else momentum
        y = F.batch_norm(x, rm, rv, w, b, True, mom, eps)
        ys.append(y)
    (ys[-1] * g_full.double()).sum().backward()
    return {"y": ys[-1].detach(), "dx": x.grad.detach(), "dw": w.grad.detach(), "db": b.grad.detach(),
            "running_mean": rm, "running_var": rv, "num_batches_tracked": nbt}


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> Optional[str]:
    """None if ``|actual - expected| <= atol + rtol * |expected|`` everywhere (shapes equal), else a message naming
    the check and the worst element. (torch.testing.assert_close would import DTensor in every spawned rank.)"""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        return f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if a.numel() == 0:
        return None
    diff = (a - e).abs()
    bad = ~(diff <= atol + rtol * e.abs())  # NaN counts as bad
    if not bool(bad.any()):
        return None
    excess = torch.where(bad, diff - rtol * e.abs(), torch.zeros_like(diff)).nan_to_num(float("inf"))
    idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), a.shape))
    return (f"{name}: {int(bad.sum())}/{a.numel()} elements not close (rtol={rtol}, atol={atol}); worst at {idx}: "
            f"actual {a[idx].item():.10g} vs expected {e[idx].item():.10g}")
