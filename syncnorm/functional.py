"""The training step every synchronising layer runs, written once: custom ops, two collectives, one autograd Function.

Forward (:func:`normalize`)::

    x --ops.batch_stats--> [n, flag, sum x, sum x^2] --comm.all_reduce_sum--> summed vector (fp64)
      --ops.forward_epilogue (O(C), one op): global moments [merged with a constant prior: CmBN's window, CBN's
        compensated history], invstd, [Batch Renorm's r, d: no gradient], the constants [k, s, h], and the running
        statistics updated in place--> ops.normalize --> y = (x - k) * s + h

Backward (:class:`_Normalize`)::

    dy --ops.backward_reduce--> [sum dy, sum dy * x_hat] --comm.all_reduce_sum--> ops.backward_apply --> dx
    d weight, d bias: from the local sums (DDP averages them)

On CUDA that is two Triton kernels forward (the reduction: per-program partials, then their fixed-order sum), the
collective, one epilogue kernel and one normalising kernel; backward the same two-kernel reduction (its second kernel
also packs the vector and writes the weight and bias gradients), the collective and one kernel that forms dx.

``k`` is the normalising mean rounded to the accumulation dtype, so ``x - k`` is exact for data whose mean is far
larger than its spread, and the rest of the mean is folded into ``h``. Nothing is read on the host: counts and
flags stay tensors, and the checks on them go through :func:`syncnorm.stats.require`. The same code runs under
``torch.compile(fullgraph=True)``: the ops have fake implementations and the collectives become functional ones.

The public functional forms :func:`sync_batch_norm` and :func:`batch_renorm` mirror ``torch.nn.functional.batch_norm``
and update the running statistics in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import comm, ops
from .stats import (Check, Moments, PeerInputError, _peer_message, accumulation_dtype, all_reduce_stats,
                    raise_pending_errors, require_each)

__all__ = [
    "NormInfo",
    "normalize",
    "train_step",
    "sync_batch_norm",
    "batch_renorm",
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


def _one_value_message(layer_name: str, x) -> str:
    # (no shape while compiling: a dynamic size would have to be specialised to be printed)
    known = isinstance(x, torch.Tensor) and not torch.compiler.is_compiling()
    shape = f" (input size {tuple(x.shape)} on this rank)" if known else ""
    return (f"{layer_name}: expected more than 1 value per channel when training, got 1 value per channel "
            f"across the whole process group{shape}")


class _Normalize(torch.autograd.Function):
    """``y = (x - k) * s + h`` with the constant per-channel ``coef = [k, s, h]`` of :func:`syncnorm.ops.forward_epilogue`
    (``s = weight * r * invstd``, ``h = bias + weight * d - (mean - k) * s``); the backward is BatchNorm's full input
    gradient for statistics global over ``group`` (one all-reduce)."""

    @staticmethod
    def forward(ctx, x, weight, bias, coef, stats, count, renorm, group):
        # coef: (3, C) in the accumulation dtype; stats: the epilogue's fp64 (8, C) (rows ops.EPILOGUE_ROWS);
        # count: the fp64 0-d count the statistics are of; renorm: whether r and d (stats rows 6, 7) apply
        y = ops.normalize(x, coef)
        ctx.save_for_backward(x, weight, coef[0], stats, count)
        ctx.group, ctx.renorm = group, renorm
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        raise_pending_errors()
        x, weight, center, stats, count = ctx.saved_tensors
        # this rank's [sum dy, sum dy * x_hat] (2C fp64 values): the weight and bias gradients, and what the one
        # backward collective sums over the group
        weight_dtype = torch.float32 if weight is None else weight.dtype
        sums, dw, db = ops.backward_reduce(dy, x, center, stats, ctx.renorm, weight_dtype,
                                           ctx.bias_dtype or torch.float32)
        dx = None
        dw = dw if ctx.needs_input_grad[1] else None
        db = db if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[0]:
            total = comm.all_reduce_sum(sums, ctx.group)
            dx = ops.backward_apply(dy, x, total, center, stats, count)
        return dx, dw, db, None, None, None, None, None


def normalize(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    *,
    eps: float,
    num_features: Optional[int] = None,
    process_group=None,
    layer_name: str = "layer",
    prior: Optional[Moments | torch.Tensor] = None,
    renorm: Optional[tuple[float, float]] = None,
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    num_batches_tracked: Optional[torch.Tensor] = None,
    momentum: Optional[float] = 0.1,
    extra: Optional[torch.Tensor] = None,
    extra_numel: Optional[int] = None,
    error: Optional[BaseException] = None,
) -> tuple[torch.Tensor, NormInfo]:
    """Normalise ``x`` with statistics that are global over ``process_group`` (the training path of every layer).

    Args:
        x: ``(N, C, *)`` input of this rank; N may be 0 (the rank still joins both collectives).
        weight, bias: per-channel affine parameters or None.
        eps: added to the variance (and, for Batch Renorm, to the running variance).
        num_features: C (defaults to ``x.shape[1]``; layers pass their own so bad input sends the right size).
        process_group: group to synchronise over (None = the world; world 1 = no collective).
        layer_name: used in error messages.
        prior: constant moments merged with the batch before normalising (no gradient flows into them); the
            backward then divides by the merged count. A prior of count 0 changes nothing. :class:`Moments`, or
            already as the fp64 ``(3, C)`` tensor :func:`syncnorm.ops.forward_epilogue` takes.
        renorm: ``(r_max, d_max)``: Batch Renorm, with ``r`` and ``d`` (constants for autograd) from the global
            batch's moments and ``running_mean`` / ``running_var`` as they are before this step's update.
        running_mean, running_var, num_batches_tracked, momentum: running statistics, updated in place from the
            global batch's moments (not the prior's) as BatchNorm does; None: no update (``renorm`` needs them).
        extra, extra_numel: payload summed over ranks in the same forward collective.
        error: invalid-input exception of this rank (see :func:`syncnorm.stats.all_reduce_stats`).

    Returns:
        ``(y, info)``: the output in ``x``'s dtype and memory format, and a :class:`NormInfo`.

    A group that holds exactly one value per channel raises ValueError on every rank (see
    :func:`syncnorm.stats.require` for when, on accelerators). Bytes moved per rank, whatever the world size:
    forward ``8 * (2C + 2 + extra)``, backward ``8 * 2C``. Between the forward collective and the normalisation runs
    one O(C) op, :func:`syncnorm.ops.forward_epilogue`.
    """
    raise_pending_errors()
    C = x.shape[1] if num_features is None else num_features
    if error is None and isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] != C:
        error = ValueError(f"{layer_name}: expected {C} channels in dim 1, got {x.shape[1]}")
    if renorm is not None and (running_mean is None or running_var is None):
        raise ValueError(f"{layer_name}: Batch Renorm needs the running statistics (running_mean, running_var)")
    device = weight.device if weight is not None else (x.device if isinstance(x, torch.Tensor) else None)
    with torch.no_grad():
        total = all_reduce_stats(x, C, process_group, device=device, extra=extra, extra_numel=extra_numel,
                                 error=error)
        extra_sum = total[2 + 2 * C:] if extra_numel else None
        prior_t = prior
        if isinstance(prior, Moments):
            prior_t = torch.stack([prior.count.to(_F64).expand(C), prior.mean.to(_F64), prior.m2.to(_F64)])
        r_max, d_max = (1.0, 0.0) if renorm is None else (float(renorm[0]), float(renorm[1]))
        coef, stats, counts = ops.forward_epilogue(
            total[:2 + 2 * C], prior_t, weight, bias, running_mean, running_var, num_batches_tracked, float(eps),
            momentum, renorm is not None, r_max, d_max, accumulation_dtype(x.dtype))
        # one copy to the host for both checks: a peer's invalid input (the flag), one value per channel
        require_each(counts[1:], [Check(lambda v: v > 0, lambda t: t == 0, lambda v: _peer_message(layer_name, v),
                                        PeerInputError),
                                  Check(lambda v: v == 1, lambda t: t != 1, lambda v: _one_value_message(layer_name, x))])
    batch_mean, batch_m2, mean, m2, _, _, r, d = stats.unbind(0)
    if renorm is None:
        r = d = None
    args = (x, weight, bias, coef, stats, counts[2], renorm is not None, process_group)
    if torch.is_autocast_enabled(x.device.type):
        # the statistics stay fp32 or wider: the ops see the input's own dtype, never an autocast copy
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = _Normalize.apply(*args)
    else:
        y = _Normalize.apply(*args)
    batch = Moments(counts[0], batch_mean, batch_m2)
    used = batch if prior is None else Moments(counts[2], mean, m2)
    info = NormInfo(batch=batch, used=used, global_count=counts[0], r=r, d=d, extra_sum=extra_sum,
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
    renorm: Optional[tuple[float, float]] = None,
    error: Optional[BaseException] = None,
) -> tuple[torch.Tensor, NormInfo]:
    """One training forward of a layer: :func:`normalize` with the running statistics updated in place from the
    global batch moments (running buffers None: no update). Returns ``(y, info)``."""
    return normalize(x, weight, bias, eps=eps, num_features=num_features, process_group=process_group,
                     layer_name=layer_name, prior=prior, renorm=renorm, running_mean=running_mean,
                     running_var=running_var, num_batches_tracked=num_batches_tracked, momentum=momentum,
                     error=error)


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

    Training: ``y = weight * ((x - mu_B) / sigma_B * r + d) + bias`` with
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``,
    ``sigma_B = sqrt(var_B + eps)`` (biased global batch variance), ``sigma = sqrt(running_var + eps)``, ``mu`` the
    running mean: computed in fp64 from the running statistics *before* this step's update, without gradient. Then
    the running statistics update as in BatchNorm. Eval: ``F.batch_norm`` with the running statistics. Returns ``(y, info)``; info is None
    in eval.
    """
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps), None
    err = check_input(input, input.shape[1] if isinstance(input, torch.Tensor) and input.dim() >= 2 else -1, layer_name)
    return train_step(input, weight, bias, running_mean, running_var, num_batches_tracked, eps=eps, momentum=momentum,
                      process_group=process_group, layer_name=layer_name, renorm=(r_max, d_max), error=err)
