"""Functional forms of syncnorm's normalisations and the autograd Function they share.

:func:`normalize` is the single fused training path of every layer: global moments with one collective
(:func:`syncnorm.stats.global_moments`), optional constant *prior* moments merged in (CmBN's earlier micro-batches,
CBN's compensated history), optional Batch-Renorm correction ``r, d`` (no gradient), then
``y = x * scale + shift`` per channel. Its backward reduces ``(sum dy, sum dy * x_hat)`` locally, all-reduces that
``2C`` vector once, and forms ``dx``; ``d weight`` and ``d bias`` stay local (DDP averages them).

The public functional forms :func:`sync_batch_norm` and :func:`batch_renorm` mirror ``torch.nn.functional.batch_norm``
and update the running statistics in place.

On CPU, when the C++ kernels are available (:mod:`syncnorm._ext`), :func:`normalize` and :func:`train_step` hand the
same computation to one C++ autograd node (and :func:`train_step` the whole training forward to one C++ call); the
collectives still go through :mod:`syncnorm.comm` (its same-host shared-memory channel, which the kernels use without
a call back into Python, or the group's backend). Custom ``renorm`` callables other than :class:`RenormBounds` and
other devices use the Python path below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _ext, comm
from .stats import Moments, _peer_error, accumulation_dtype, global_moments

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


@dataclass(slots=True)
class NormInfo:
    """What one training forward of :func:`normalize` computed (all detached, fp64 unless stated).

    Attributes:
        batch: global moments of this step's batch over the process group.
        used: moments the output was normalised with (``batch`` merged with the prior, if any).
        global_count: number of values per channel in ``batch`` (a Python int, identical on every rank).
        r, d: the Batch-Renorm factors applied, in fp64 (None without renorm). The Python path computes them in
            the accumulation dtype (their fp64 copies here are exact), the CPU kernels in fp64.
        extra_sum: the caller's payload summed over ranks in the forward collective, or None.
        local_count: number of values per channel in this rank's input.
    """

    batch: Moments
    used: Moments
    global_count: int
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


def _view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view([1, -1] + [1] * (ndim - 2))


class _GlobalStatsNorm(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * (weight * r) + (bias + weight * d), with mean/var global over ranks."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec: "_Spec"):
        # a non-tensor x (spec.error says so) still reaches global_moments, which joins the collective with the
        # error flag before raising, so that the peers do not wait
        if isinstance(x, torch.Tensor) and _autocast_on(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return _forward(ctx, x, weight, bias, spec)
        return _forward(ctx, x, weight, bias, spec)

    @staticmethod
    @once_differentiable  # the backward's collective has no graph: a second differentiation raises, never drops terms
    def backward(ctx, grad_out):
        if _autocast_on(grad_out.device.type):
            with torch.autocast(device_type=grad_out.device.type, enabled=False):
                return _backward(ctx, grad_out)
        return _backward(ctx, grad_out)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device_type argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


@dataclass
class _Spec:
    num_features: int
    eps: float
    process_group: object
    layer_name: str
    prior: Optional[Moments]
    renorm: Optional[Callable]
    extra: Optional[torch.Tensor]
    extra_numel: Optional[int]
    error: Optional[BaseException]
    device: object
    info: Optional[NormInfo] = None


# Above this |mean| / std, x * scale + shift (what F.batch_norm computes) loses digits to cancellation, so the
# input is centred on the fp32-rounded mean first (exact subtraction) and the rounding residue folded into shift.
_CENTER_ABOVE = 64.0


def _forward(ctx, x, weight, bias, spec: _Spec):
    batch, global_count, extra_sum, mean_to_std = global_moments(
        x, spec.num_features, spec.process_group, device=spec.device, extra=spec.extra,
        extra_numel=spec.extra_numel, error=spec.error, layer_name=spec.layer_name, eps=spec.eps,
    )
    spec.extra = None  # ctx keeps spec until backward: do not keep the caller's payload alive with it
    used, total = _with_prior(spec, batch, global_count, x)
    acc = accumulation_dtype(x.dtype)
    center_on = mean_to_std > _CENTER_ABOVE and x.numel() > 0
    mean, var, center, w_eff, b_eff, r, d = _prepare(weight, bias, spec, batch, used, global_count, total,
                                                     center_on, acc)
    if total == 0:
        y = x.clone()  # empty on every rank: nothing to normalise
    else:
        y = F.batch_norm(_centered(x, center, acc), mean, var, w_eff, b_eff, training=False, momentum=0.0,
                         eps=spec.eps)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
    ctx.save_for_backward(x, weight, mean, var, w_eff, center)
    ctx.r, ctx.d = r, d
    spec.info = NormInfo(batch=batch, used=used, global_count=global_count,
                         r=None if r is None else r.double(), d=None if d is None else d.double(),
                         extra_sum=extra_sum, local_count=x.numel() // max(x.shape[1], 1))
    ctx.spec = spec
    ctx.total = total
    ctx.in_dtype = x.dtype
    return y


def _with_prior(spec: _Spec, batch: Moments, global_count: int, x: torch.Tensor) -> tuple[Moments, int]:
    # the moments to normalise with (the batch, merged with the constant prior if any) and their count
    used = batch if spec.prior is None else spec.prior.merge(batch)
    total = global_count + (0 if spec.prior is None else int(round(float(spec.prior.count))))
    if total == 1:
        raise _one_value_error(spec.layer_name, x)
    return used, total


def _one_value_error(layer_name: str, x: torch.Tensor) -> ValueError:
    return ValueError(
        f"{layer_name}: expected more than 1 value per channel when training, got 1 value per channel "
        f"across the whole process group (input size {tuple(x.shape)} on this rank)"
    )


def _prepare(weight, bias, spec: _Spec, batch: Moments, used: Moments, global_count: int, total: int,
             center_on: bool, acc: torch.dtype):
    # the mean/var to normalise with (accumulation dtype), the optional centre, the effective affine, and r, d
    center = None
    if center_on:
        center = used.mean.to(acc)
        mean = (used.mean - center.to(used.mean.dtype)).to(acc)
    else:
        mean = used.mean.to(acc)
    var = (used.m2 / max(total, 1)).to(acc)
    r = d = None
    # in the statistics' dtype: F.batch_norm takes fp16/bf16 input with fp32 parameters, not the reverse (a
    # module converted with .half() has fp16 parameters; nn.BatchNorm accepts that)
    w_eff = None if weight is None else _cast(weight, acc)
    b_eff = None if bias is None else _cast(bias, acc)
    if spec.renorm is not None:
        if spec.prior is None:  # used is batch: reuse the statistics already cast for normalising
            r, d = spec.renorm(mean if center is None else center, var)
        else:
            r, d = spec.renorm(batch.mean, batch.m2 / max(global_count, 1))
        r, d = _cast(r, acc), _cast(d, acc)
        w = None if weight is None else _cast(weight, acc)
        w_eff = r if w is None else w * r
        if bias is None:
            b_eff = d if w is None else w * d
        else:
            b_eff = _cast(bias, acc) + d if w is None else torch.addcmul(_cast(bias, acc), w, d)
    return mean, var, center, w_eff, b_eff, r, d


def _backward(ctx, grad_out):
    x, weight, mean, var, w_eff, center = ctx.saved_tensors
    spec: _Spec = ctx.spec
    acc = mean.dtype
    C = spec.num_features
    x = _centered(x, center, acc)
    if x.dtype != acc:
        x = x.to(acc)
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    if x.numel() > 0:
        dy = _cast(grad_out, acc).contiguous(memory_format=_memory_format(x))
        # eval-mode native backward used as a fused reduction: sum(dy * (x - mean) * invstd) and sum(dy)
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, None, mean, var, None, None, False, spec.eps, [False, True, True]
        )
        sum_dy_xhat, sum_dy = _cast(sum_dy_xhat, acc), _cast(sum_dy, acc)
    else:
        dy = None
        sum_dy_xhat = torch.zeros(C, dtype=acc, device=mean.device)
        sum_dy = torch.zeros_like(sum_dy_xhat)
    dx = None
    if need_dx:
        # the one backward collective: [sum dy, sum dy * x_hat] over the group (2C values)
        packed = comm.all_reduce_sum(torch.cat([sum_dy, sum_dy_xhat]), spec.process_group)
        if x.numel() > 0:
            g_dy, g_dy_xhat = packed[:C], packed[C:]
            invstd = torch.rsqrt(var + spec.eps)
            scale = invstd if w_eff is None else _cast(w_eff, acc) * invstd
            # dx = scale * (dy - (sum dy + x_hat * sum dy*x_hat) / N) = dy * scale + x * B + Cc per channel
            B = scale * invstd * g_dy_xhat * (-1.0 / ctx.total)
            Cc = scale * g_dy * (-1.0 / ctx.total) - B * mean
            # x * B + Cc through eval-mode batch_norm (one vectorised pass; torch.addcmul with a broadcast first
            # operand is about twice as slow on CPU), then + dy * scale in place
            ones = torch.ones_like(B)
            dx = F.batch_norm(x, torch.zeros_like(B), ones, B, Cc, False, 0.0, 0.0)
            dx.addcmul_(dy, _view(scale, x.dim()))
            if dx.dtype != ctx.in_dtype:
                dx = dx.to(ctx.in_dtype)
            dx = dx.contiguous(memory_format=_memory_format(x))
        else:
            dx = torch.zeros_like(x, dtype=ctx.in_dtype)
    return (dx,) + _affine_grads(ctx, weight, sum_dy, sum_dy_xhat, acc) + (None,)


def _affine_grads(ctx, weight, sum_dy, sum_dy_xhat, acc):
    # local gradients of weight and bias (DDP averages them): y = x_hat * (w r) + (b + w d)
    need_dw, need_db = ctx.needs_input_grad[1:3]
    dw = db = None
    if need_dw:
        r, d = ctx.r, ctx.d
        if r is not None and r.dtype != sum_dy.dtype:
            r, d = r.to(sum_dy.dtype), d.to(sum_dy.dtype)
        dw = sum_dy_xhat if r is None else torch.addcmul(sum_dy_xhat * r, sum_dy, d)
        dw = _cast(dw, weight.dtype)
    if need_db:
        db = _cast(sum_dy, weight.dtype if weight is not None else acc)
    return dw, db


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # .to() is a no-op for the same dtype but still costs a dispatch; this path runs twice per layer per step
    return t if t.dtype == dtype else t.to(dtype)


def _centered(x: torch.Tensor, center: Optional[torch.Tensor], acc: torch.dtype) -> torch.Tensor:
    if center is None:
        return x
    return x.to(acc) - _view(center, x.dim())


def _memory_format(x: torch.Tensor):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


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
    """Normalise ``x`` with statistics that are global over ``process_group`` (the shared training path).

    Args:
        x: ``(N, C, *)`` input of this rank; N may be 0 (the rank still joins both collectives).
        weight, bias: per-channel affine parameters or None.
        eps: added to the variance.
        num_features: C (defaults to ``x.shape[1]``; layers pass their own so bad input packs the right size).
        process_group: group to synchronise over (None = the world; world 1 = no collective).
        layer_name: used in error messages.
        prior: constant moments merged with the batch before normalising (no gradient flows into them); the
            backward then divides by the merged count.
        renorm: ``f(batch_mean, batch_var_biased) -> (r, d)`` giving Batch-Renorm factors (treated as constants);
            the statistics come in the accumulation dtype (fp32, fp64 for fp64 input).
        extra, extra_numel: payload summed over ranks in the same forward collective.
        error: invalid-input exception of this rank (see :func:`syncnorm.stats.global_moments`).

    Returns:
        ``(y, info)``: the output in ``x``'s dtype and memory format, and a :class:`NormInfo`.

    Bytes moved: forward ``8 * (2C + 2 + extra)``, backward ``2C`` values of the accumulation dtype (4 or 8 bytes),
    per rank, whatever the world size.
    """
    C = x.shape[1] if num_features is None else num_features
    if error is None and isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] != C:
        error = ValueError(f"{layer_name}: expected {C} channels in dim 1, got {x.shape[1]}")
    device = weight.device if weight is not None else (x.device if isinstance(x, torch.Tensor) else None)
    spec = _Spec(C, eps, process_group, layer_name, prior, renorm, extra, extra_numel, error, device)
    if error is None and isinstance(x, torch.Tensor) and (
            renorm is None or (type(renorm) is RenormBounds and prior is None and renorm.eps == float(eps))):
        # (a RenormBounds with a prior or another eps keeps the Python path, whose r and d follow its own rules)
        fast = _ext.ops_for(x)
        if fast is not None and (weight is None or weight.is_cpu):
            return _normalize_cpu(fast, x, weight, bias, spec)
    y = _GlobalStatsNorm.apply(x, weight, bias, spec)
    return y, spec.info


def _normalize_cpu(fast, x, weight, bias, spec: _Spec) -> tuple[torch.Tensor, NormInfo]:
    # The CPU kernels (syncnorm/csrc/norm_cpu.cpp): the same statistics (global_moments takes the C++ local sums
    # when there is no payload), then one C++ autograd node: forward y = ((x - c0) - m1) * scale + shift in one
    # pass; backward one pass for the local sums, the same one all-reduce (syncnorm.comm's transport), one pass for dx.
    with torch.no_grad():  # statistics and prior are constants here (as inside _GlobalStatsNorm.forward)
        batch, global_count, extra_sum, mean_to_std = global_moments(
            x, spec.num_features, spec.process_group, device=spec.device, extra=spec.extra,
            extra_numel=spec.extra_numel, layer_name=spec.layer_name, eps=spec.eps,
        )
        used, total = _with_prior(spec, batch, global_count, x)
    bounds: Optional[RenormBounds] = spec.renorm
    y, params = fast.fused_norm(
        x, weight, bias, used.mean, used.m2, total, mean_to_std > _CENTER_ABOVE and x.numel() > 0, spec.eps,
        None if bounds is None else bounds.running_mean, None if bounds is None else bounds.running_var,
        1.0 if bounds is None else bounds.r_max, 0.0 if bounds is None else bounds.d_max,
        _ext.reducer_key(spec.process_group))
    r = d = None
    if bounds is not None:  # rows 4 and 5 of the node's fp64 parameters [c0, m1, invstd, w_eff, r, d]
        r, d = params[4], params[5]
        bounds.last = (r, d)
    info = NormInfo(batch=batch, used=used, global_count=global_count, r=r, d=d, extra_sum=extra_sum,
                    local_count=x.numel() // max(x.shape[1], 1))
    return y, info


def _fast_ops(x: torch.Tensor, weight: Optional[torch.Tensor]) -> Optional[Any]:
    """The C++ kernels for a training step on ``x`` (checked by the caller) with ``weight``, or None for the Python
    path (kernels disabled or unavailable, or a tensor off the CPU)."""
    fast = _ext.ops_for(x)
    return fast if fast is not None and (weight is None or weight.is_cpu) else None


def _train_step_cpu(fast, x: torch.Tensor, weight, bias, running_mean, running_var, num_batches_tracked, C: int,
                   eps: float, momentum: Optional[float], process_group, layer_name: str,
                   renorm: Optional["RenormBounds"]) -> tuple[torch.Tensor, NormInfo]:
    """:func:`train_step` on the C++ kernels ``fast`` (from :func:`_fast_ops`): one call into C++. ``x`` must be a
    valid ``(N, C, *)`` input and ``renorm`` None or a :class:`RenormBounds` with this ``eps``. Positional
    arguments only: the layers call this once per training forward, where Python's keyword handling is a
    measurable share of a small layer."""
    y, raw = fast.train_step(
        x, weight, bias, C, eps, _ext.reducer_key(process_group), running_mean, running_var, num_batches_tracked,
        0.0 if momentum is None else float(momentum), momentum is None,
        None if renorm is None else renorm.running_mean, None if renorm is None else renorm.running_var,
        1.0 if renorm is None else renorm.r_max, 0.0 if renorm is None else renorm.d_max)
    if raw[0]:
        raise _train_step_error(raw, layer_name, x)
    if renorm is not None:
        renorm.last = (raw[6], raw[7])
    return y, _info_from_raw(raw, x.numel() // C)


def _train_step_error(raw: tuple, layer_name: str, x: torch.Tensor) -> BaseException:
    """The error of a C++ ``train_step`` that returned status ``raw[0]`` != 0 (1: a peer's input was invalid,
    2: one value per channel in the whole group)."""
    return _peer_error(layer_name, raw[5]) if raw[0] == 1 else _one_value_error(layer_name, x)


def _info_from_raw(raw: tuple, local_count: int, unit_factors: bool = False) -> NormInfo:
    """The :class:`NormInfo` of a successful C++ ``train_step``: ``raw`` is its ``(status, n, mean, m2, count, flag,
    r, d)``, ``local_count`` this rank's values per channel; ``unit_factors``: r = 1 and d = 0 (fp64), as a
    renormalising step reports them when its bounds pin them there."""
    _, n, mean, m2, count, _, r, d = raw
    if unit_factors:
        r, d = torch.ones_like(mean), torch.zeros_like(mean)
    batch = Moments(n, mean, m2)
    return NormInfo(batch=batch, used=batch, global_count=count, r=r, d=d, local_count=local_count)


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
    renorm: Optional["RenormBounds"] = None,
    error: Optional[BaseException] = None,
) -> tuple[torch.Tensor, NormInfo]:
    """One training forward of a layer with no prior moments and no payload (SyncBatchNorm, BatchRenorm).

    Exactly :func:`normalize` followed by :func:`update_running_stats` with the global batch moments (running
    buffers None: no update). ``renorm``, if given, must be a :class:`RenormBounds`. On CPU with the C++ kernels
    this is one call into C++ (statistics, the forward all-reduce over :mod:`syncnorm.comm`'s transport, the fused
    autograd node and the update); elsewhere it is the two Python functions. Returns ``(y, info)``.
    """
    C = x.shape[1] if num_features is None and isinstance(x, torch.Tensor) and x.dim() >= 2 else num_features
    fast = None
    if (error is None and isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == C
            and (renorm is None or (type(renorm) is RenormBounds and renorm.eps == float(eps)))):
        fast = _fast_ops(x, weight)
    if fast is not None:
        return _train_step_cpu(fast, x, weight, bias, running_mean, running_var, num_batches_tracked, C, eps, momentum,
                              process_group, layer_name, renorm)
    y, info = normalize(x, weight, bias, eps=eps, num_features=num_features, process_group=process_group,
                        layer_name=layer_name, renorm=renorm, error=error)
    update_running_stats(running_mean, running_var, num_batches_tracked, info.batch, info.global_count, momentum)
    return y, info


def update_running_stats(
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    batch: Moments,
    global_count: int,
    momentum: Optional[float],
) -> None:
    """BatchNorm's running-statistics update from global batch moments, in place and without gradient.

    ``running_var`` receives the *unbiased* variance with the global count. ``momentum=None`` gives the cumulative
    moving average ``1 / num_batches_tracked``. A global count of 0 leaves every buffer untouched.
    """
    if running_mean is None or global_count == 0:
        return
    fast = _ext.ops_for(running_mean)
    if fast is not None:  # the same update from C++ (syncnorm/csrc/norm_cpu.cpp)
        fast.update_running(running_mean, running_var, num_batches_tracked, batch.mean, batch.m2, global_count,
                            0.0 if momentum is None else float(momentum), momentum is None)
        return
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
        else:
            factor = momentum
        unbiased = batch.m2 / max(global_count - 1, 1)
        running_mean.lerp_(batch.mean.to(running_mean.dtype), factor)
        running_var.lerp_(unbiased.to(running_var.dtype), factor)


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

    Calling it with the batch mean and biased variance returns ``(r, d)`` and keeps them in :attr:`last`. Being a
    known type (not an arbitrary callable), it lets the CPU fast path compute ``r`` and ``d`` in C++ with the same
    operations; the running statistics are read at the call, i.e. before this step's update.
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
