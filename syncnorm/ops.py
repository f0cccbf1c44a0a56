"""The custom ops of the training step: the four passes over the data and the O(C) forward epilogue, each a
``torch.library`` custom op.

=================  ==========================================  =====================================================
op                 inputs                                      result
=================  ==========================================  =====================================================
``batch_stats``    ``x (N, C, *)``                             fp64 ``(2C + 2,)``: ``[n, 0, sum x, sum x^2]``, the
                                                               vector the forward all-reduce sums (slot 1 is the
                                                               error flag a rank with bad input sets)
``normalize``      ``x``, ``coef (3, C) = [k, s, h]``          ``y = (x - k) * s + h`` per channel
``backward_stats`` ``dy``, ``x``, ``center (C,) = k``          fp64 ``(2, C)``: ``[sum dy, sum dy * (x - k)]``
``backward_input`` ``dy``, ``x``, ``coef (4, C) = [k, a, b, c]`` ``dx = dy * a + (x - k) * b + c`` per channel
=================  ==========================================  =====================================================

Between the forward all-reduce and ``normalize`` sits one O(C) op, :func:`forward_epilogue`: from the summed vector
(and a constant prior, Batch Renorm's bounds) it forms the global moments, ``mean`` and ``invstd``, ``r`` and ``d``, the
constants ``[k, s, h]`` that ``normalize`` takes, and updates the running statistics in place: one kernel on CUDA,
where its reference implementation is about fifty small torch operations (counted with a dispatch mode; a launch
each). On CPU that reference *is* its kernel (O(C) work; a C++ version would save microseconds). Cross-Iteration BN's
pooled, compensated history (the prior it merges) is one O(S C) op too, :func:`cbn_prior` (one kernel on CUDA, about
thirty torch operations in its reference), and so is the record of a step into that history, :func:`cbn_record` (two
kernels on CUDA, about forty operations in its reference).

The per-channel constants are in the accumulation dtype (fp32 for fp16/bf16/fp32 input, fp64 for fp64 input); the
outputs ``y`` and ``dx`` have the input's dtype and memory format. What the constants mean, and the two collectives
between the ops, are in :mod:`syncnorm.functional` (the one autograd Function) and :mod:`syncnorm.stats`.

Every op has
- a **reference implementation** in plain torch operations (``*_reference``), which runs on any device and is the
  maths every kernel is tested against;
- a **CPU kernel** in C++ (``syncnorm/csrc/norm_cpu.cpp``, registered with ``TORCH_LIBRARY`` as
  ``torch.ops.syncnorm_cpu.*``), compiled once per environment (see :func:`build_cpu_kernels`);
- **Triton kernels** (:mod:`syncnorm.triton_ops`, imported on first use), registered for CUDA tensors with
  ``op.register_kernel("cuda", ...)``: CUDA tensors run them when ``triton`` can be imported, the reference
  implementation otherwise (a warning says so once);
- a **fake implementation**, so ``torch.compile`` traces through the ops with ``fullgraph=True``.

Which implementation runs is chosen at each call:

- **CPU tensors**: the C++ kernels while :func:`kernels_enabled` is True (``SYNCNORM_CPU_EXT=0`` in the environment
  turns them off; :func:`use_kernels` switches them for a block of code), the reference otherwise, or when the
  kernels could not be built (a warning says so once).
- **CUDA tensors**: the Triton kernels, or the reference where ``triton`` does not import.
- :func:`triton_enabled` overrides both: True sends every tensor to the Triton kernels (CPU tensors through Triton's
  interpreter, for testing; whatever :func:`use_kernels` says), False sends none (CUDA tensors then run the
  reference), None (the default) is the above. :func:`use_triton` switches it for a block of code.
- The environment, read at import: ``SYNCNORM_KERNELS=auto`` (or unset) is the above; ``SYNCNORM_KERNELS=triton``
  sets :func:`triton_enabled` to True; ``SYNCNORM_KERNELS=reference`` runs the reference implementation on every
  device (:func:`triton_enabled` False *and* :func:`kernels_enabled` False); ``SYNCNORM_CPU_EXT=0`` runs it on CPU
  tensors only.

Triton decides at *decoration* time whether a kernel is compiled or interpreted: Triton kernels run on CPU tensors
only when ``TRITON_INTERPRET=1`` was in the environment when :mod:`syncnorm.triton_ops` was first imported (it is
imported at the first call that needs it); otherwise the first such call raises a RuntimeError that says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = [
    "batch_stats",
    "normalize",
    "backward_stats",
    "backward_input",
    "batch_stats_reference",
    "normalize_reference",
    "backward_stats_reference",
    "backward_input_reference",
    "forward_epilogue",
    "forward_epilogue_reference",
    "EPILOGUE_ROWS",
    "backward_reduce",
    "backward_reduce_reference",
    "backward_apply",
    "backward_apply_reference",
    "cbn_prior",
    "cbn_prior_reference",
    "cbn_compensate",
    "cbn_record",
    "cbn_record_reference",
    "accumulation_dtype",
    "kernels_enabled",
    "set_kernels_enabled",
    "use_kernels",
    "build_cpu_kernels",
    "cpu_kernels_available",
    "triton_enabled",
    "set_triton_enabled",
    "use_triton",
    "triton_available",
    "SOURCE",
]

SOURCE = Path(__file__).resolve().parent / "csrc" / "norm_cpu.cpp"
_F64 = torch.float64


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 input, fp32 for everything else (fp16/bf16 statistics accumulate in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_format(x: Tensor) -> torch.memory_format:
    # the layout the ops write their outputs in: channels_last(_3d) when x is in it, else contiguous
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    return t.view([1, -1] + [1] * (ndim - 2))


def _like_input(out: Tensor, x: Tensor) -> Tensor:
    # out in x's dtype and in the layout the kernels and fake implementations give (for an empty tensor too, which
    # .contiguous() would leave in any strides)
    fmt = _memory_format(x)
    if out.numel() == 0:
        return torch.empty_like(x, memory_format=fmt)
    return out.to(x.dtype).contiguous(memory_format=fmt)


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


# ----------------------------------------------------------------------------------------------- reference


def batch_stats_reference(x: Tensor, num_features: int) -> Tensor:
    """Reference of :func:`batch_stats`: fp64 sums taken around each channel's first value, then made raw."""
    out = x.new_zeros(2 + 2 * num_features, dtype=_F64)
    if x.numel() == 0:
        return out
    n = x.numel() // num_features
    xd = x.to(_F64)
    # around the first value of each channel, so that a mean far from 0 costs no digits in the squares
    k = xd[(0, slice(None)) + (0,) * (x.dim() - 2)]
    centred = xd - _per_channel(k, x.dim())
    dims = _reduce_dims(x)
    s1, s2 = centred.sum(dims), centred.square().sum(dims)
    out[0] = n
    out[2:2 + num_features] = s1 + n * k
    out[2 + num_features:] = s2 + k * (2 * s1 + n * k)
    return out


def normalize_reference(x: Tensor, coef: Tensor) -> Tensor:
    """Reference of :func:`normalize`: ``(x - k) * s + h`` in the constants' dtype, cast back to x's dtype."""
    k, s, h = (_per_channel(row, x.dim()) for row in coef.unbind(0))
    y = (x.to(coef.dtype) - k) * s + h
    return _like_input(y, x)


def backward_stats_reference(dy: Tensor, x: Tensor, center: Tensor) -> Tensor:
    """Reference of :func:`backward_stats`: ``[sum dy, sum dy * (x - k)]`` per channel, summed in fp64."""
    dims = _reduce_dims(x)
    g = dy.to(_F64)
    centred = x.to(center.dtype) - _per_channel(center, x.dim())
    return torch.stack([g.sum(dims), (g * centred.to(_F64)).sum(dims)])


def backward_input_reference(dy: Tensor, x: Tensor, coef: Tensor) -> Tensor:
    """Reference of :func:`backward_input`: ``dy * a + (x - k) * b + c`` in the constants' dtype."""
    k, a, b, c = (_per_channel(row, x.dim()) for row in coef.unbind(0))
    dx = dy.to(coef.dtype) * a + (x.to(coef.dtype) - k) * b + c
    return _like_input(dx, x)


# rows of forward_epilogue's (8, C) fp64 statistics output
EPILOGUE_ROWS = ("batch_mean", "batch_m2", "mean", "m2", "invstd", "scale", "r", "d")


def forward_epilogue_reference(
    total: Tensor, prior: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
    eps: float, momentum: Optional[float], renorm: bool, r_max: float, d_max: float, compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`forward_epilogue`, in plain torch operations (fp64 unless said otherwise)."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("forward_epilogue: running_mean and running_var go together (got "
                         f"{'running_var' if running_mean is None else 'running_mean'} alone)")
    if renorm and running_mean is None:
        raise ValueError("forward_epilogue: renorm needs running_mean and running_var")
    C = (total.shape[0] - 2) // 2
    n, flag = total[0], total[1]
    s1, s2 = total[2:2 + C], total[2 + C:2 + 2 * C]
    safe_n = n.clamp_min(1)
    batch_mean = s1 / safe_n
    batch_m2 = (s2 - batch_mean * s1).clamp_min(0)
    if prior is None:
        used_n, mean, m2 = n, batch_mean, batch_m2
    else:  # Chan's exact merge, the prior first (syncnorm.stats.Moments.merge)
        prior_n, prior_mean, prior_m2 = prior[0, 0], prior[1], prior[2]
        used_n = prior_n + n
        safe_used = torch.where(used_n > 0, used_n, torch.ones_like(used_n))
        delta = batch_mean - prior_mean
        mean = prior_mean + delta * (n / safe_used)
        m2 = prior_m2 + batch_m2 + delta * delta * (prior_n * n / safe_used)
    ones = torch.ones_like(batch_mean)
    r, d = ones, torch.zeros_like(batch_mean)
    if renorm:
        rm, rv = running_mean.to(_F64), running_var.to(_F64)  # before this step's update
        batch_var = torch.where(n > 0, batch_m2 / safe_n, torch.zeros_like(batch_m2))
        inv_sigma = torch.rsqrt(rv + eps)
        r = (torch.sqrt(batch_var + eps) * inv_sigma).clamp(1.0 / r_max, r_max)
        d = ((batch_mean - rm) * inv_sigma).clamp(-d_max, d_max)
    invstd = torch.rsqrt(m2 / used_n.clamp_min(1) + eps)
    w = ones if weight is None else weight.to(_F64)
    b = torch.zeros_like(batch_mean) if bias is None else bias.to(_F64)
    scale = w * r * invstd
    k = mean.to(compute_dtype)
    h = (b + w * d) - (mean - k.to(_F64)) * scale
    coef = torch.stack([k, scale.to(compute_dtype), h.to(compute_dtype)])
    stats = torch.stack([batch_mean, batch_m2, mean, m2, invstd, scale, r, d])
    counts = torch.stack([n, flag, used_n])
    if running_mean is not None:
        # a step that will raise (a rank's invalid input, one value per channel) leaves the statistics alone
        seen = (n > 0) & (flag == 0) & (used_n != 1)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(seen.to(num_batches_tracked.dtype))
        if momentum is not None or num_batches_tracked is not None:
            factor = momentum if momentum is not None else \
                1.0 / num_batches_tracked.clamp_min(1).to(running_mean.dtype)
            unbiased = batch_m2 / (n - 1).clamp_min(1)
            for buf, target in ((running_mean, batch_mean), (running_var, unbiased)):
                buf.copy_(torch.where(seen, torch.lerp(buf, target.to(buf.dtype), factor), buf))
    return coef, stats, counts


def _backward_pack(sums: Tensor, center: Tensor, stats: Tensor) -> Tensor:
    # [sum dy, sum dy * (x - k)] -> [sum dy, sum dy * x_hat], x_hat = (x - mean) * invstd (fp64)
    mean, invstd = stats[2], stats[4]
    return torch.cat([sums[0], (sums[1] - (mean - center.to(_F64)) * sums[0]) * invstd])


def _backward_coef(total: Tensor, center: Tensor, stats: Tensor, count: Tensor) -> Tensor:
    # dx = s * (dy - (sum dy + x_hat * sum dy x_hat) / n) = dy * a + (x - k) * b + c, in the centre's dtype
    C = center.shape[0]
    mean, invstd, scale = stats[2], stats[4], stats[5]
    n = count.clamp_min(1)
    b = -scale * invstd * total[C:] / n
    c = -scale * total[:C] / n - b * (mean - center.to(_F64))
    return torch.stack([center.to(_F64), scale, b, c]).to(center.dtype)


def _param_grads(packed: Tensor, stats: Tensor, renorm: bool, weight_dtype: torch.dtype,
                 bias_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    # this rank's d weight = sum dy x_hat (Batch Renorm: * r + sum dy * d) and d bias = sum dy, in the parameters' dtypes
    C = packed.shape[0] // 2
    dw = packed[C:] * stats[6] + packed[:C] * stats[7] if renorm else packed[C:]
    return dw.to(weight_dtype, copy=True), packed[:C].to(bias_dtype, copy=True)


def backward_reduce_reference(dy: Tensor, x: Tensor, center: Tensor, stats: Tensor, renorm: bool,
                              weight_dtype: torch.dtype, bias_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`backward_reduce`: :func:`backward_stats_reference`, then made ``[sum dy, sum dy x_hat]``,
    and the parameter gradients from it."""
    packed = _backward_pack(backward_stats_reference(dy, x, center), center, stats)
    return (packed, *_param_grads(packed, stats, renorm, weight_dtype, bias_dtype))


def backward_apply_reference(dy: Tensor, x: Tensor, total: Tensor, center: Tensor, stats: Tensor,
                             count: Tensor) -> Tensor:
    """Reference of :func:`backward_apply`: the constants ``[k, a, b, c]`` in plain torch operations, then
    :func:`backward_input_reference`."""
    return backward_input_reference(dy, x, _backward_coef(total, center, stats, count))


# ----------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("syncnorm::batch_stats", mutates_args=())
def batch_stats(x: Tensor, num_features: int) -> Tensor:
    """This rank's contribution to the forward all-reduce: fp64 ``[n, 0, sum x, sum x^2]`` (``2C + 2`` values).

    ``n`` is the number of values per channel (0 for an empty batch, whose sums are 0); slot 1 is the error flag,
    0 here. The sums are exact enough that ``sum x^2 - (sum x)^2 / n`` keeps fp32-level accuracy for data whose mean
    is far larger than its spread (each implementation sums around a per-channel shift)."""
    return batch_stats_reference(x, num_features)


@torch.library.custom_op("syncnorm::normalize", mutates_args=())
def normalize(x: Tensor, coef: Tensor) -> Tensor:
    """``y = (x - k) * s + h`` per channel, with ``coef = [k, s, h]`` of shape ``(3, C)`` in the accumulation
    dtype; ``y`` has x's dtype and memory format."""
    return normalize_reference(x, coef)


@torch.library.custom_op("syncnorm::backward_stats", mutates_args=())
def backward_stats(dy: Tensor, x: Tensor, center: Tensor) -> Tensor:
    """This rank's backward sums, fp64 of shape ``(2, C)``: ``[sum dy, sum dy * (x - k)]`` with ``k = center``."""
    return backward_stats_reference(dy, x, center)


@torch.library.custom_op("syncnorm::backward_input", mutates_args=())
def backward_input(dy: Tensor, x: Tensor, coef: Tensor) -> Tensor:
    """``dx = dy * a + (x - k) * b + c`` per channel, with ``coef = [k, a, b, c]`` of shape ``(4, C)`` in the
    accumulation dtype; ``dx`` has x's dtype and memory format."""
    return backward_input_reference(dy, x, coef)


@torch.library.custom_op("syncnorm::forward_epilogue",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def forward_epilogue(
    total: Tensor, prior: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
    eps: float, momentum: Optional[float], renorm: bool, r_max: float, d_max: float, compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Everything a training forward computes per channel between its all-reduce and :func:`normalize`.

    Args:
        total: the summed fp64 ``[n, flag, sum x, sum x^2]`` (``2C + 2`` values).
        prior: None, or fp64 ``(3, C)`` ``[count (every column), mean, m2]``: constant moments merged with the
            batch's (CmBN's window, CBN's pooled history); a count of 0 changes nothing.
        weight, bias: the affine parameters or None.
        running_mean, running_var, num_batches_tracked: the running statistics or None; updated in place from the
            batch moments when ``running_mean`` is given (BatchNorm's update: ``running_var`` gets the unbiased
            variance, ``momentum=None`` the cumulative average ``1 / num_batches_tracked``). An empty global batch
            changes nothing, and neither does a step that raises: error flag set, or a used count of 1.
        eps: added to the variances.
        renorm: Batch Renorm: ``r = clip(sqrt(var_B + eps) / sqrt(running_var + eps), 1/r_max, r_max)``,
            ``d = clip((mean_B - running_mean) / sqrt(running_var + eps), -d_max, d_max)`` from the running
            statistics *before* the update (r = 1, d = 0 otherwise).
        compute_dtype: dtype of ``coef`` (the accumulation dtype of the input).

    Returns ``(coef, stats, counts)``:
        - ``coef``, ``(3, C)`` in ``compute_dtype``: ``[k, s, h]`` for :func:`normalize`, with ``k`` the used mean
          rounded to ``compute_dtype``, ``s = weight * r * invstd`` and ``h = bias + weight * d - (mean - k) * s``;
        - ``stats``, fp64 ``(8, C)``, rows :data:`EPILOGUE_ROWS`: the batch's mean and m2, the used (merged) mean
          and m2, ``invstd = 1 / sqrt(m2 / count + eps)``, ``s``, ``r``, ``d``;
        - ``counts``, fp64 ``(3,)``: ``[batch count, error flag, used count]``.
    """
    return forward_epilogue_reference(total, prior, weight, bias, running_mean, running_var, num_batches_tracked,
                                      eps, momentum, renorm, r_max, d_max, compute_dtype)


@forward_epilogue.register_fake
def _(total, prior, weight, bias, running_mean, running_var, num_batches_tracked, eps, momentum, renorm, r_max, d_max,
      compute_dtype):
    C = (total.shape[0] - 2) // 2
    return (total.new_empty((3, C), dtype=compute_dtype), total.new_empty((8, C), dtype=_F64),
            total.new_empty(3, dtype=_F64))


def cbn_compensate(mean: Tensor, var: Tensor, mean_at: Tensor, var_at: Tensor, compensable: Tensor,
                   w_mean: Tensor, w_var: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-Iteration BN's first-order compensation of recorded per-slot moments to the conv's current weights, in
    fp64: with ``d_mean = w_mean - mean_at`` and ``d_var = w_var - var_at`` where the slot is ``compensable`` (0
    elsewhere), ``(mean + d_mean, max(var + d_var - d_mean^2, 0))``. Shapes ``(S, C)``; ``compensable`` ``(S,)``."""
    ok = compensable.unsqueeze(1)
    d_mean = torch.where(ok, w_mean.to(_F64) - mean_at.to(_F64), 0.0)
    d_var = torch.where(ok, w_var.to(_F64) - var_at.to(_F64), 0.0)
    return mean.to(_F64) + d_mean, (var.to(_F64) + d_var - d_mean * d_mean).clamp_min(0.0)


def cbn_prior_reference(count: Tensor, mean: Tensor, var: Tensor, mean_at: Tensor, var_at: Tensor,
                        compensable: Tensor, w_mean: Optional[Tensor], w_var: Optional[Tensor], step: Tensor,
                        burn_in: int) -> Tensor:
    """Reference of :func:`cbn_prior`, in plain torch operations (fp64)."""
    mean, var = mean.to(_F64), var.to(_F64)
    if w_mean is not None:
        mean, var = cbn_compensate(mean, var, mean_at, var_at, compensable, w_mean, w_var)
    count = torch.where(step >= burn_in, count.to(_F64), 0.0)
    used = (count > 0).unsqueeze(1)
    # slots not pooled contribute exact zeros (even if what they hold is not finite)
    mean, var = torch.where(used, mean, 0.0), torch.where(used, var, 0.0)
    total = count.sum()
    w = (count / total.clamp_min(1)).unsqueeze(1)
    pooled = (w * mean).sum(0)
    m2 = (count.unsqueeze(1) * (var + (mean - pooled) * (mean - pooled))).sum(0)
    return torch.stack([total.expand_as(pooled), pooled, m2])


@torch.library.custom_op("syncnorm::cbn_prior", mutates_args=())
def cbn_prior(count: Tensor, mean: Tensor, var: Tensor, mean_at: Tensor, var_at: Tensor, compensable: Tensor,
              w_mean: Optional[Tensor], w_var: Optional[Tensor], step: Tensor, burn_in: int) -> Tensor:
    """Cross-Iteration BN's pooled history: the prior :func:`forward_epilogue` merges with the batch, in one op.

    Args:
        count: ``(S,)`` values per channel recorded in each slot (0: never written, not pooled).
        mean, var: ``(S, C)`` fp64 recorded means and biased variances.
        mean_at, var_at, compensable: ``(S, C)``, ``(S, C)``, ``(S,)`` bool: what :func:`cbn_compensate` needs.
        w_mean, w_var: ``(S, C)`` products of the recorded derivatives with the current weights, or both None (no
            compensation: the slots as recorded).
        step: the layer's 0-d int64 step counter; below ``burn_in`` nothing is pooled.

    Returns the fp64 ``(3, C)`` ``[count (every column), mean, m2]`` of the union of the pooled slots, each
    compensated, weighted by its count (all 0 when nothing is pooled).
    """
    return cbn_prior_reference(count, mean, var, mean_at, var_at, compensable, w_mean, w_var, step, burn_in)


@cbn_prior.register_fake
def _(count, mean, var, mean_at, var_at, compensable, w_mean, w_var, step, burn_in):
    return mean.new_empty((3, mean.shape[1]), dtype=_F64)


_CBN_HISTORY = ("history_count", "history_mean", "history_var", "history_mean_at", "history_var_at",
                "history_compensable", "history_dmean", "history_dvar", "history_next", "history_filled")


def cbn_record_reference(history_count: Tensor, history_mean: Tensor, history_var: Tensor, history_mean_at: Tensor,
                         history_var_at: Tensor, history_compensable: Tensor, history_dmean: Tensor,
                         history_dvar: Tensor, history_next: Tensor, history_filled: Tensor, step: Tensor,
                         count: Tensor, mean: Tensor, m2: Tensor, dmean: Optional[Tensor], dvar: Optional[Tensor],
                         w_mean: Optional[Tensor], w_var: Optional[Tensor], burn_in: int) -> None:
    """Reference of :func:`cbn_record`, in plain torch operations (masked ``index_copy_`` into each buffer)."""
    slots = history_count.shape[0]
    do = (step >= burn_in - slots) & (count > 0)
    index = history_next.view(1)

    def put(buf: Tensor, value) -> None:
        # buf[slot] = value where `do`, else unchanged
        value = value.to(buf.dtype) if isinstance(value, Tensor) else value  # (a scalar: no copy)
        buf.index_copy_(0, index, torch.where(do, value, buf.index_select(0, index)))

    put(history_count, count)
    put(history_mean, mean)
    put(history_var, m2 / count.clamp_min(1))  # (written only where count > 0: the biased variance)
    compensate = dmean is not None
    if compensate:
        put(history_dmean, dmean)
        put(history_dvar, dvar)
        put(history_mean_at, w_mean)
        put(history_var_at, w_var)
    else:
        put(history_mean_at, 0.0)
        put(history_var_at, 0.0)
    put(history_compensable, compensate)
    history_next.copy_((history_next + do.to(history_next.dtype)) % slots)
    history_filled.copy_(torch.where(do, (history_filled + 1).clamp(0, slots), history_filled))


@torch.library.custom_op("syncnorm::cbn_record", mutates_args=_CBN_HISTORY)
def cbn_record(history_count: Tensor, history_mean: Tensor, history_var: Tensor, history_mean_at: Tensor,
               history_var_at: Tensor, history_compensable: Tensor, history_dmean: Tensor, history_dvar: Tensor,
               history_next: Tensor, history_filled: Tensor, step: Tensor, count: Tensor, mean: Tensor, m2: Tensor,
               dmean: Optional[Tensor], dvar: Optional[Tensor], w_mean: Optional[Tensor], w_var: Optional[Tensor],
               burn_in: int) -> None:
    """Cross-Iteration BN's record of one step into its ring buffer of ``S`` slots, in place, in one op.

    Where ``step >= burn_in - S`` and the global ``count`` (0-d) is above 0, slot ``history_next`` gets the step's
    ``count``, ``mean`` and biased variance ``m2 / count`` (``mean``, ``m2``: ``(C,)`` fp64); with ``dmean`` given, also the derivatives ``dmean``
    (``history_dmean``'s slot shape) and ``dvar``, their products with this step's weights ``w_mean``, ``w_var``
    (``(C,)``, into ``history_mean_at`` / ``history_var_at``) and ``history_compensable`` True; without, 0, 0 and
    False (the derivative slots keep what they held). Then ``history_next`` advances by one modulo ``S`` and
    ``history_filled`` (at most ``S``) by one. Otherwise nothing changes. Nothing is read on the host.
    """
    cbn_record_reference(history_count, history_mean, history_var, history_mean_at, history_var_at,
                         history_compensable, history_dmean, history_dvar, history_next, history_filled, step, count,
                         mean, m2, dmean, dvar, w_mean, w_var, burn_in)


@cbn_record.register_fake
def _(history_count, history_mean, history_var, history_mean_at, history_var_at, history_compensable, history_dmean,
      history_dvar, history_next, history_filled, step, count, mean, m2, dmean, dvar, w_mean, w_var, burn_in):
    return None


@torch.library.custom_op("syncnorm::backward_reduce", mutates_args=())
def backward_reduce(dy: Tensor, x: Tensor, center: Tensor, stats: Tensor, renorm: bool, weight_dtype: torch.dtype,
                    bias_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's backward sums: ``(packed, d_weight, d_bias)``.

    ``packed``, fp64 ``(2C,)``, is what the backward all-reduce sums: ``[sum dy, sum dy * x_hat]`` with
    ``x_hat = (x - mean) * invstd``, ``mean`` and ``invstd`` rows of the forward epilogue's ``stats`` (see
    :data:`EPILOGUE_ROWS`) and ``center = k`` (the mean rounded to the accumulation dtype, which the sums are taken
    around: :func:`backward_stats`, then ``sum dy * x_hat = (sum dy (x - k) - (mean - k) sum dy) * invstd``).
    ``d_weight = sum dy * x_hat`` (with ``renorm``: ``* r + sum dy * d``, r and d from ``stats``) in
    ``weight_dtype`` and ``d_bias = sum dy`` in ``bias_dtype``: the local parameter gradients (DDP averages them)."""
    return backward_reduce_reference(dy, x, center, stats, renorm, weight_dtype, bias_dtype)


@torch.library.custom_op("syncnorm::backward_apply", mutates_args=())
def backward_apply(dy: Tensor, x: Tensor, total: Tensor, center: Tensor, stats: Tensor, count: Tensor) -> Tensor:
    """BatchNorm's input gradient from the summed ``total = [sum dy, sum dy * x_hat]`` over ``count`` values per
    channel: ``dx = s * (dy - (sum dy + x_hat * sum dy x_hat) / count)`` with ``s``, ``mean``, ``invstd`` rows of the
    forward epilogue's ``stats``; computed as :func:`backward_input` with ``[k, a, b, c] = [center, s,
    -s invstd sum dy x_hat / n, -s sum dy / n - b (mean - k)]`` (fp64, then the centre's dtype). ``dx`` has x's
    dtype and memory format."""
    return backward_apply_reference(dy, x, total, center, stats, count)


@backward_reduce.register_fake
def _(dy, x, center, stats, renorm, weight_dtype, bias_dtype):
    C = x.shape[1]
    return x.new_empty(2 * C, dtype=_F64), x.new_empty(C, dtype=weight_dtype), x.new_empty(C, dtype=bias_dtype)


@backward_apply.register_fake
def _(dy, x, total, center, stats, count):
    return torch.empty_like(x, memory_format=_memory_format(x))


@batch_stats.register_fake
def _(x, num_features):
    return x.new_empty(2 + 2 * num_features, dtype=_F64)


@normalize.register_fake
def _(x, coef):
    return torch.empty_like(x, memory_format=_memory_format(x))


@backward_stats.register_fake
def _(dy, x, center):
    return x.new_empty((2, x.shape[1]), dtype=_F64)


@backward_input.register_fake
def _(dy, x, coef):
    return torch.empty_like(x, memory_format=_memory_format(x))


# ----------------------------------------------------------------------------------------------- CPU kernels


def _env_enabled() -> bool:
    # SYNCNORM_KERNELS=reference means the reference implementation on every device, CPU tensors included
    if os.environ.get("SYNCNORM_KERNELS", "").strip().lower() == "reference":
        return False
    return os.environ.get("SYNCNORM_CPU_EXT", "1").strip().lower() not in ("0", "false", "off", "no")


_enabled = _env_enabled()
_lock = threading.Lock()
_loaded = False
_failed: Optional[str] = None


def kernels_enabled() -> bool:
    """Whether CPU tensors go to the C++ kernels (when they could be built): ``SYNCNORM_CPU_EXT`` unset or not
    ``0``/``false``/``off``/``no``, and ``SYNCNORM_KERNELS`` not ``reference``, at import, unless :func:`use_kernels`
    says otherwise for now. (While :func:`triton_enabled` is True, every tensor runs the Triton kernels whatever this
    says.)"""
    return _enabled


def set_kernels_enabled(value: Optional[bool]) -> bool:
    """Send CPU tensors to the C++ kernels (True) or to the reference implementation (False) from now on; None goes
    back to the environment's setting (``SYNCNORM_CPU_EXT``, ``SYNCNORM_KERNELS``). Returns the previous value."""
    global _enabled
    previous, _enabled = _enabled, _env_enabled() if value is None else bool(value)
    return previous


@contextlib.contextmanager
def use_kernels(enabled: bool) -> Iterator[None]:
    """Within the block, CPU tensors go to the C++ kernels (True) or to the reference implementation (False)."""
    previous = set_kernels_enabled(enabled)
    try:
        yield
    finally:
        set_kernels_enabled(previous)


def _build_directory() -> Path:
    # One build per environment: the key covers the source, this torch install (its path and version) and the
    # interpreter, so two virtualenvs never share (and never rebuild in turn) one cache entry.
    key = hashlib.sha1(b"\0".join([
        SOURCE.read_bytes(), torch.__version__.encode(), os.path.realpath(torch.__file__).encode(),
        os.path.realpath(sys.prefix).encode(), sys.version.encode(),
    ])).hexdigest()[:16]
    root = os.environ.get("SYNCNORM_BUILD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "syncnorm")
    return Path(root) / f"cpu-{key}"


def build_cpu_kernels(verbose: bool = False) -> Path:
    """Compile (on first use in this environment) and load the C++ CPU kernels; returns their build directory.

    Raises when they cannot be built (no C++ compiler, say). Idempotent; ``make`` calls it while setting up."""
    global _loaded
    with _lock:
        directory = _build_directory()
        if not _loaded:
            directory.mkdir(parents=True, exist_ok=True)
            log = logging.getLogger("torch.utils.cpp_extension")
            level = log.level
            if not verbose:  # (its warning about CUDA_HOME concerns CUDA builds; this one is CPU only)
                log.setLevel(logging.ERROR)
            try:
                from torch.utils.cpp_extension import load

                load(name="syncnorm_cpu", sources=[str(SOURCE)], extra_cflags=["-O3", "-ffp-contract=off"],
                     build_directory=str(directory), is_python_module=False, verbose=verbose)
            finally:
                log.setLevel(level)
            _loaded = True
    return directory


def cpu_kernels_available() -> bool:
    """Whether the C++ kernels are loaded, building them on first call; False (with one warning) when they cannot
    be built."""
    global _failed
    if _loaded:
        return True
    if _failed is not None:
        return False
    try:
        build_cpu_kernels()
        return True
    except Exception as e:  # noqa: BLE001 - any build or load failure means: the reference implementation
        _failed = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        warnings.warn(f"syncnorm: the C++ CPU kernels could not be built ({_failed}); CPU tensors use the reference "
                      "implementation, which gives the same results more slowly. Set SYNCNORM_CPU_EXT=0 to silence "
                      "this.", RuntimeWarning, stacklevel=2)
        return False


# ----------------------------------------------------------------------------------------------- Triton kernels

_TRITON_SETTINGS = {"": None, "auto": None, "triton": True, "reference": False}


def _env_triton() -> Optional[bool]:
    value = os.environ.get("SYNCNORM_KERNELS", "").strip().lower()
    if value not in _TRITON_SETTINGS:
        warnings.warn(f"syncnorm: SYNCNORM_KERNELS={value!r} is not one of 'auto', 'triton', 'reference'; using "
                      "'auto'", RuntimeWarning, stacklevel=2)
        return None
    return _TRITON_SETTINGS[value]


_triton: Optional[bool] = _env_triton()
_triton_failed: Optional[str] = None


def triton_enabled() -> Optional[bool]:
    """Where the Triton kernels run: True on every tensor (CPU tensors through Triton's interpreter, which needs
    ``TRITON_INTERPRET=1``), False on none (CUDA tensors run the reference implementation), None on CUDA tensors
    when ``triton`` can be imported. ``SYNCNORM_KERNELS=triton`` / ``reference`` / ``auto`` (or unset) at import give
    True / False / None, unless :func:`use_triton` says otherwise for now."""
    return _triton


def set_triton_enabled(value: Optional[bool]) -> Optional[bool]:
    """Send every tensor to the Triton kernels (True), none (False), or go back to the ``SYNCNORM_KERNELS`` setting
    (None). Returns the previous value; passing it back restores it (the value None arises only from the ``auto``
    setting, so it restores that too)."""
    global _triton
    previous, _triton = _triton, _env_triton() if value is None else bool(value)
    return previous


@contextlib.contextmanager
def use_triton(enabled: Optional[bool]) -> Iterator[None]:
    """Within the block, every tensor runs the Triton kernels (True), none does (False), or the ``SYNCNORM_KERNELS``
    setting holds (None)."""
    previous = set_triton_enabled(enabled)
    try:
        yield
    finally:
        set_triton_enabled(previous)


def _triton_ops():
    # imported at the first call that needs it (importing triton takes a while), and looked up in sys.modules at each
    # call: a test may load an interpreted copy for a while (tests/test_triton.py)
    return importlib.import_module("syncnorm.triton_ops")


def triton_available() -> bool:
    """Whether ``triton`` can be imported (importing :mod:`syncnorm.triton_ops` on first call)."""
    return _triton_ops().available()


def _triton_launcher(name: str, device_type: str):
    """The Triton launcher of op ``name`` for a tensor on ``device_type``, or None: where the reference runs."""
    global _triton_failed
    if _triton is False:
        return None
    module = _triton_ops()
    if not module.available():
        if _triton:
            raise RuntimeError(f"syncnorm: the Triton kernels are forced (SYNCNORM_KERNELS=triton or use_triton(True)) "
                               f"but triton could not be imported ({module.import_error()})")
        if _triton_failed is None:
            _triton_failed = str(module.import_error())
            warnings.warn(f"syncnorm: triton could not be imported ({_triton_failed}); CUDA tensors use the reference "
                          "implementation, which gives the same results more slowly. Set SYNCNORM_KERNELS=reference to "
                          "silence this.", RuntimeWarning, stacklevel=3)
        return None
    if device_type != "cuda" and not module.interpreted():
        raise RuntimeError(
            f"syncnorm: the Triton kernels are forced (SYNCNORM_KERNELS=triton or use_triton(True)) for a "
            f"{device_type} tensor, but they run on CPU tensors only under Triton's interpreter: set "
            "TRITON_INTERPRET=1 in the environment before syncnorm.triton_ops is imported (Triton reads it when it "
            "decorates the kernels, so setting it later has no effect)")
    return getattr(module, f"{name}_triton")


def _cuda(reference, name: str):
    def kernel(*args):
        launcher = _triton_launcher(name, "cuda")
        return reference(*args) if launcher is None else launcher(*args)

    kernel.__name__ = f"{name}_cuda"
    return kernel


def _cpu(reference, name: str, cpp: bool = True):
    # cpp=False: an O(C) op without a C++ kernel; on CPU its plain torch operations are the kernel
    def kernel(*args):
        if _triton:
            return _triton_launcher(name, "cpu")(*args)
        if cpp and _enabled and cpu_kernels_available():
            return getattr(torch.ops.syncnorm_cpu, name)(*args)
        return reference(*args)

    kernel.__name__ = f"{name}_cpu"
    return kernel


batch_stats.register_kernel("cpu")(_cpu(batch_stats_reference, "batch_stats"))
normalize.register_kernel("cpu")(_cpu(normalize_reference, "normalize"))
backward_stats.register_kernel("cpu")(_cpu(backward_stats_reference, "backward_stats"))
backward_input.register_kernel("cpu")(_cpu(backward_input_reference, "backward_input"))
forward_epilogue.register_kernel("cpu")(_cpu(forward_epilogue_reference, "forward_epilogue", cpp=False))
forward_epilogue.register_kernel("cuda")(_cuda(forward_epilogue_reference, "forward_epilogue"))
cbn_prior.register_kernel("cpu")(_cpu(cbn_prior_reference, "cbn_prior", cpp=False))
cbn_prior.register_kernel("cuda")(_cuda(cbn_prior_reference, "cbn_prior"))
cbn_record.register_kernel("cpu")(_cpu(cbn_record_reference, "cbn_record", cpp=False))
cbn_record.register_kernel("cuda")(_cuda(cbn_record_reference, "cbn_record"))
batch_stats.register_kernel("cuda")(_cuda(batch_stats_reference, "batch_stats"))
normalize.register_kernel("cuda")(_cuda(normalize_reference, "normalize"))
backward_stats.register_kernel("cuda")(_cuda(backward_stats_reference, "backward_stats"))
backward_input.register_kernel("cuda")(_cuda(backward_input_reference, "backward_input"))


def _backward_reduce_cpu(dy, x, center, stats, renorm, weight_dtype, bias_dtype):
    # on CPU: the C++ data pass, then its O(C) packing in torch operations
    if _triton:
        return _triton_launcher("backward_reduce", "cpu")(dy, x, center, stats, renorm, weight_dtype, bias_dtype)
    if _enabled and cpu_kernels_available():
        packed = _backward_pack(torch.ops.syncnorm_cpu.backward_stats(dy, x, center), center, stats)
        return (packed, *_param_grads(packed, stats, renorm, weight_dtype, bias_dtype))
    return backward_reduce_reference(dy, x, center, stats, renorm, weight_dtype, bias_dtype)


def _backward_apply_cpu(dy, x, total, center, stats, count):
    # on CPU: the O(C) constants in torch operations, then the C++ data pass
    if _triton:
        return _triton_launcher("backward_apply", "cpu")(dy, x, total, center, stats, count)
    if _enabled and cpu_kernels_available():
        return torch.ops.syncnorm_cpu.backward_input(dy, x, _backward_coef(total, center, stats, count))
    return backward_apply_reference(dy, x, total, center, stats, count)


backward_reduce.register_kernel("cpu")(_backward_reduce_cpu)
backward_apply.register_kernel("cpu")(_backward_apply_cpu)
backward_reduce.register_kernel("cuda")(_cuda(backward_reduce_reference, "backward_reduce"))
backward_apply.register_kernel("cuda")(_cuda(backward_apply_reference, "backward_apply"))
