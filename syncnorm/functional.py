"""The training step every synchronising layer runs, written once: custom ops, two collectives, one autograd Function.

Forward (:func:`normalize`)::

    x --ops.batch_stats--> [n, flag, sum x, sum x^2] --comm.all_reduce_sum--> global moments (fp64)
      [merged with a constant prior: CmBN's window, CBN's compensated history] [Batch Renorm's r, d: no gradient]
      --per-channel constants [k, s, h] (plain torch ops, O(C))--> ops.normalize --> y = (x - k) * s + h

Backward (:class:`_Normalize`)::

    dy --ops.backward_stats--> [sum dy, sum dy * x_hat] --comm.all_reduce_sum--> ops.backward_input --> dx
    d weight, d bias: from the local sums (DDP averages them)

``k`` is the normalising mean rounded to the accumulation dtype, so ``x - k`` is exact for data whose mean is far
larger than its spread, and the rest of the mean is folded into ``h``. Nothing is read on the host: counts and
flags stay tensors, and the checks on them go through :func:`syncnorm.stats.require`. The same code runs under
``torch.compile(fullgraph=True)``: the ops have fake implementations and the collectives become functional ones.

The public functional forms :func:`sync_batch_norm` and :func:`batch_renorm` mirror ``torch.nn.functional.batch_norm``
and update the running statistics in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import comm, ops
from .stats import Moments, accumulation_dtype, global_moments, raise_pending_errors, require

__all__ = [
    "NormInfo",
    "normalize",
    "train_step",
    "update_running_stats",
    "sync_batch_norm",
    "batch_renorm",
    "renorm_factors",
    "RenormBounds",
    "check_input",
]

_F64 = torch.float64


@dataclass
class NormInfo:
    """What one training forward of :func:`normalize` computed (all detached fp64 tensors, none read on the host).

    Attributes:
        batch: global moments of this step's batch over the process group.
        used: moments the output was normalised with (``batch`` merged with the prior, if any).
        global_count: number of values per channel in ``batch``, a 0-d tensor (identical on every rank).
        r, d: the Batch-Renorm factors applied (None without renorm).
        extra_sum: the caller's payload summed over ranks in the forward collective, or None.
        local_count: number of values per channel in this rank's input (a Python int, from its shape).
    """

    batch: Moments
    used: Moments
    global_count: torch.Tensor
    r: Optional[torch.Tensor] = None
    d: Optional[torch.Tensor] = None
    extra_sum: Optional[torch.Tensor] = None
    local_count: int = 0


def check_input(x, num_features: int, layer_name: str, min_dim: int = 2, max_dim: Optional[int] = None):
    """Return the exception describing why ``x`` is not a valid ``(N, C, *)`` input, or None when it is.

    The exception is returned, not raised, so a synchronising layer can still join the collective with an error
    flag before raising it (no rank is left hanging).
    """
    if not isinstance(x, torch.Tensor):
        return TypeError(f"{layer_name}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.is_floating_point() is False:
        return TypeError(
            f"{layer_name}: expected a floating-point input (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    if x.dim() < min_dim or (max_dim is not None and x.dim() > max_dim):
        expected = f"{min_dim}D" if max_dim == min_dim else (
            f"{min_dim}D to {max_dim}D" if max_dim is not None else f"at least {min_dim}D (N, C, *)")
        return ValueError(f"{layer_name}: expected {expected} input, got {x.dim()}D input of shape {tuple(x.shape)}")
    if x.shape[1] != num_features:
        return ValueError(
            f"{layer_name}: expected {num_features} channels in dim 1, got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    return None


def _one_value_error(layer_name: str, x) -> ValueError:
    shape = f" (input size {tuple(x.shape)} on this rank)" if isinstance(x, torch.Tensor) else ""
    return ValueError(
        f"{layer_name}: expected more than 1 value per channel when training, got 1 value per channel "
        f"across the whole process group{shape}"
    )


class _Normalize(torch.autograd.Function):
    """``y = (x - mean) * invstd * (weight * r) + (bias + weight * d)`` with constant per-channel statistics; the
    backward is BatchNorm's full input gradient for statistics global over ``group`` (one all-reduce)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, r, d, count, group):
        # mean, invstd: fp64 (C,) statistics the input is normalised with; count: their fp64 0-d count;
        # r, d: fp64 Batch-Renorm factors or None
        acc = accumulation_dtype(x.dtype)
        w_eff = _times(weight, r)  # weight * r (a missing factor counts as 1; None when both are missing)
        shift = _plus(bias, None if d is None else _times(weight, d))  # bias + weight * d
        scale = invstd if w_eff is None else w_eff.to(_F64) * invstd
        center = mean.to(acc)
        h = -(mean - center.to(_F64)) * scale
        if shift is not None:
            h = h + shift.to(_F64)
        y = ops.normalize(x, torch.stack([center.to(_F64), scale, h]).to(acc))
        ctx.save_for_backward(x, weight, center, mean, invstd, scale, r, d, count)
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        raise_pending_errors()
        x, weight, center, mean, invstd, scale, r, d, count = ctx.saved_tensors
        C = mean.shape[0]
        sums = ops.backward_stats(dy, x, center)
        sum_dy = sums[0]
        sum_dy_xhat = (sums[1] - (mean - center.to(_F64)) * sum_dy) * invstd
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # the one backward collective: [sum dy, sum dy * x_hat] over the group (2C fp64 values)
            total = comm.all_reduce_sum(torch.cat([sum_dy, sum_dy_xhat]), ctx.group)
            n = count.clamp_min(1)
            # dx = scale * (dy - (sum dy + x_hat * sum dy x_hat) / n) = dy * a + (x - k) * b + c
            b = -scale * invstd * total[C:] / n
            c = -scale * total[:C] / n - b * (mean - center.to(_F64))
            dx = ops.backward_input(dy, x, torch.stack([center.to(_F64), scale, b, c]).to(center.dtype))
        if ctx.needs_input_grad[1]:
            dw = sum_dy_xhat if r is None else sum_dy_xhat * r + sum_dy * d
            dw = dw.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            db = sum_dy.to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None, None


def _times(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None or b is None:
        return b if a is None else a
    return a.to(_F64) * b


def _plus(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None or b is None:
        return b if a is None else a
    return a.to(_F64) + b


def normalize(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    *,
    eps: float,
    num_features: Optional[int] = None,
    process_group=None,
    layer_name: str = "layer",
    prior: Optional[Moments] = None,
    renorm: Optional[Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None,
    extra: Optional[torch.Tensor] = None,
    extra_numel: Optional[int] = None,
    error: Optional[BaseException] = None,
) -> tuple[torch.Tensor, NormInfo]:
    """Normalise ``x`` with statistics that are global over ``process_group`` (the training path of every layer).

    Args:
        x: ``(N, C, *)`` input of this rank; N may be 0 (the rank still joins both collectives).
        weight, bias: per-channel affine parameters or None.
        eps: added to the variance.
        num_features: C (defaults to ``x.shape[1]``; layers pass their own so bad input sends the right size).
        process_group: group to synchronise over (None = the world; world 1 = no collective).
        layer_name: used in error messages.
        prior: constant moments merged with the batch before normalising (no gradient flows into them); the
            backward then divides by the merged count. A prior of count 0 changes nothing.
        renorm: ``f(batch_mean, batch_var_biased) -> (r, d)``, the Batch-Renorm factors (constants for autograd),
            called with the fp64 moments of the global batch.
        extra, extra_numel: payload summed over ranks in the same forward collective.
        error: invalid-input exception of this rank (see :func:`syncnorm.stats.global_moments`).

    Returns:
        ``(y, info)``: the output in ``x``'s dtype and memory format, and a :class:`NormInfo`.

    A group that holds exactly one value per channel raises ValueError on every rank (see
    :func:`syncnorm.stats.require` for when, on accelerators). Bytes moved per rank, whatever the world size:
    forward ``8 * (2C + 2 + extra)``, backward ``8 * 2C``.
    """
    raise_pending_errors()
    C = x.shape[1] if num_features is None else num_features
    if error is None and isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] != C:
        error = ValueError(f"{layer_name}: expected {C} channels in dim 1, got {x.shape[1]}")
    device = weight.device if weight is not None else (x.device if isinstance(x, torch.Tensor) else None)
    with torch.no_grad():
        batch, extra_sum = global_moments(x, C, process_group, device=device, extra=extra, extra_numel=extra_numel,
                                          error=error, layer_name=layer_name)
        used = batch if prior is None else prior.merge(batch)
        require(used.count, lambda v: v == 1, lambda t: t != 1, lambda v: _one_value_error(layer_name, x))
        r = d = None
        if renorm is not None:
            r, d = (t.to(_F64) for t in renorm(batch.mean, batch.var()))
        invstd = torch.rsqrt(used.m2 / used.count.clamp_min(1) + eps)
    if torch.is_autocast_enabled(x.device.type):
        # the statistics stay fp32 or wider: the ops see the input's own dtype, never an autocast copy
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = _Normalize.apply(x, weight, bias, used.mean, invstd, r, d, used.count, process_group)
    else:
        y = _Normalize.apply(x, weight, bias, used.mean, invstd, r, d, used.count, process_group)
    info = NormInfo(batch=batch, used=used, global_count=batch.count, r=r, d=d, extra_sum=extra_sum,
                    local_count=x.numel() // max(C, 1))
    return y, info


def train_step(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    *,
    eps: float,
    momentum: Optional[float],
    num_features: Optional[int] = None,
    process_group=None,
    layer_name: str = "layer",
    prior: Optional[Moments] = None,
    renorm: Optional[Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None,
    error: Optional[BaseException] = None,
) -> tuple[torch.Tensor, NormInfo]:
    """One training forward of a layer: :func:`normalize`, then :func:`update_running_stats` with the global batch
    moments (running buffers None: no update). Returns ``(y, info)``."""
    y, info = normalize(x, weight, bias, eps=eps, num_features=num_features, process_group=process_group,
                        layer_name=layer_name, prior=prior, renorm=renorm, error=error)
    update_running_stats(running_mean, running_var, num_batches_tracked, info.batch, momentum)
    return y, info


def update_running_stats(
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    batch: Moments,
    momentum: Optional[float],
) -> None:
    """BatchNorm's running-statistics update from global batch moments, in place, without gradient and without
    reading anything on the host.

    ``running_var`` receives the *unbiased* variance with the global count. ``momentum=None`` gives the cumulative
    moving average ``1 / num_batches_tracked``. A global count of 0 leaves every buffer untouched.
    """
    if running_mean is None:
        return
    with torch.no_grad():
        seen = batch.count > 0
        if num_batches_tracked is not None:
            num_batches_tracked.add_(seen.to(num_batches_tracked.dtype))
        if momentum is None:
            if num_batches_tracked is None:
                return
            factor = 1.0 / num_batches_tracked.clamp_min(1).to(running_mean.dtype)
        else:
            factor = momentum
        unbiased = batch.m2 / (batch.count - 1).clamp_min(1)
        for buf, target in ((running_mean, batch.mean), (running_var, unbiased)):
            buf.copy_(torch.where(seen, torch.lerp(buf, target.to(buf.dtype), factor), buf))


def sync_batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    process_group=None,
    num_batches_tracked: Optional[torch.Tensor] = None,
    layer_name: str = "sync_batch_norm",
) -> torch.Tensor:
    """``F.batch_norm`` with batch statistics that are global over ``process_group``.

    In training, mean and biased variance come from the union of every rank's batch (uneven and empty batches
    weighted by their element counts) with one O(C) all-reduce in forward and one in backward, and the running
    statistics are updated in place with the unbiased global variance. Outside training, or when
    ``running_mean`` is None outside training, it is exactly ``F.batch_norm`` with no collective.
    """
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0 if momentum is None else momentum, eps)
    err = check_input(input, input.shape[1] if isinstance(input, torch.Tensor) and input.dim() >= 2 else -1, layer_name)
    y, _ = train_step(input, weight, bias, running_mean, running_var, num_batches_tracked, eps=eps, momentum=momentum,
                      process_group=process_group, layer_name=layer_name, error=err)
    return y


def renorm_factors(
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    r_max: float,
    d_max: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-Renorm factors ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``.

    ``sigma_B = sqrt(var_B + eps)`` with the biased batch variance, ``sigma = sqrt(running_var + eps)``. Computed
    without gradient, in the promoted dtype of the inputs (the layer passes the batch statistics in the accumulation
    dtype it normalises with: fp32, or fp64 for fp64 input).
    """
    with torch.no_grad():
        # few small ops: this runs every training forward, and on small layers each op is a visible share of it
        inv_sigma = torch.rsqrt(running_var + eps)
        r = (torch.sqrt(batch_var + eps) * inv_sigma).clamp_(1.0 / r_max, r_max)
        d = ((batch_mean - running_mean) * inv_sigma).clamp_(-d_max, d_max)
    return r, d


class RenormBounds:
    """The ``renorm`` callable of :func:`normalize` for Batch Renorm: :func:`renorm_factors` against fixed running
    statistics and clip bounds.

    Calling it with the batch mean and biased variance returns ``(r, d)`` and keeps them in :attr:`last`; the running
    statistics are read at the call, i.e. before this step's update.
    """

    __slots__ = ("running_mean", "running_var", "eps", "r_max", "d_max", "last")

    def __init__(self, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float, r_max: float,
                 d_max: float) -> None:
        self.running_mean, self.running_var = running_mean, running_var
        self.eps, self.r_max, self.d_max = float(eps), float(r_max), float(d_max)
        self.last: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def __call__(self, batch_mean: torch.Tensor, batch_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.last = renorm_factors(batch_mean, batch_var, self.running_mean, self.running_var, self.eps, self.r_max,
                                   self.d_max)
        return self.last


def batch_renorm(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    r_max: float = 1.0,
    d_max: float = 0.0,
    process_group=None,
    num_batches_tracked: Optional[torch.Tensor] = None,
    layer_name: str = "batch_renorm",
) -> tuple[torch.Tensor, NormInfo | None]:
    """Batch Renormalization (Ioffe 2017) with statistics global over ``process_group``.

    Training: ``y = weight * ((x - mu_B) / sigma_B * r + d) + bias`` with ``r, d`` from :func:`renorm_factors`
    (computed from the running statistics *before* this step's update, no gradient), then the running statistics
    update as in BatchNorm. Eval: ``F.batch_norm`` with the running statistics. Returns ``(y, info)``; info is None
    in eval.
    """
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps), None
    err = check_input(input, input.shape[1] if isinstance(input, torch.Tensor) and input.dim() >= 2 else -1, layer_name)
    bounds = RenormBounds(running_mean.detach(), running_var.detach(), eps, r_max, d_max)
    return train_step(input, weight, bias, running_mean, running_var, num_batches_tracked, eps=eps, momentum=momentum,
                      process_group=process_group, layer_name=layer_name, renorm=bounds, error=err)
