"""Triton kernels of the custom ops of :mod:`syncnorm.ops`: what CUDA tensors run when ``triton`` imports.

============================ ============================================== ==========================================
launcher                     kernels (grid)                                 result (the op's reference semantics)
============================ ============================================== ==========================================
``batch_stats_triton``       ``_batch_stats_partial`` (channel blocks,      fp64 ``(2C + 2,)``: ``[n, 0, sum x,
                             row programs), then ``_finish_sums`` (channel  sum x^2]``, summed around each channel's
                             blocks)                                        first value, then made raw
``forward_epilogue_triton``  ``_forward_epilogue_kernel`` (one program)     the O(C) step between the all-reduce and
                                                                            ``normalize``; running statistics updated
``normalize_triton``         ``_normalize_kernel`` (channel blocks, row     ``y = (x - k) * s + h`` in coef's dtype,
                             programs)                                      y in x's dtype and memory format
``backward_reduce_triton``   ``_backward_stats_partial``, then              fp64 ``(2C,)`` ``[sum dy, sum dy x_hat]``
                             ``_finish_sums`` (``PACK``)                    and the weight / bias gradients
``backward_apply_triton``    ``_backward_input_kernel`` (``FROM_TOTAL``)    dx from the summed vector: each program
                                                                            forms its channels' ``a, b, c``
``backward_stats_triton``    ``_backward_stats_partial``, then              fp64 ``(2, C)``: ``[sum dy,
                             ``_finish_sums``                               sum dy * (x - k)]``
``backward_input_triton``    ``_backward_input_kernel``                     ``dx = dy * a + (x - k) * b + c`` in
                                                                            coef's dtype
============================ ============================================== ==========================================

A training step runs the first five (the layers' ops): forward ``_batch_stats_partial``, ``_finish_sums``, the
all-reduce, ``_forward_epilogue_kernel``, ``_normalize_kernel``; backward ``_backward_stats_partial``,
``_finish_sums``, the all-reduce, ``_backward_input_kernel``. Fusing the epilogue into the normalising kernel would
save one more launch, but that kernel runs many programs per channel, which would then race on the running statistics
(read for Batch Renorm's r and d, and updated, in the same step) unless they wrote new buffers and copied them back
(the launch saved).

**The epilogue** (``forward_epilogue``) is O(C) work: one program walks the channels in blocks, in fp64, so that
reading the running statistics (Batch Renorm's ``r``, ``d``), updating them, and incrementing
``num_batches_tracked`` happen in one place, in order, without a race between programs. Its float arguments are
passed as fp64 (annotated ``tl.float64``; Triton would pass a Python float as fp32), so ``eps`` and the clip bounds are
exact, and a clipped ``r`` equals the bound. The O(C) kernels (the epilogue, the second pass of the reductions) are
compiled without FMA contraction (``enable_fp_fusion=False``): ``sum x^2 - mean * sum x`` cancels, and a fused
multiply-add would round it differently from the reference by up to ``mean^2 / var`` ulps; NaN propagates through
their clamps as through torch.clamp.

**Layout.** Every kernel sees x as ``(N, C, S)`` (S: the spatial sizes multiplied) and walks it as *rows* of
channels: element ``(o, r, c)`` is at ``o * stride_outer + r * stride_row + c * stride_c``. Two cases cover every
layout the ops keep (anything else is made contiguous first, and dy is brought to x's memory format):

- channels innermost -- ``(N, C)``, channels_last, channels_last_3d, or one value per sample and channel
  (``S == 1``): one outer block of ``N * S`` rows, ``stride_row = C``, ``stride_c = 1``; a tile is
  ``[BLOCK_R rows, BLOCK_C channels]`` with the channels contiguous.
- channels outermost -- contiguous ``(N, C, L)``, NCHW, NCDHW with ``S > 1``: ``N`` outer blocks of ``S`` rows,
  ``stride_row = 1``, ``stride_c = S``; a tile is a ``BLOCK_R``-long contiguous run of each of ``BLOCK_C``
  channels of one sample. (A tile never straddles two samples, so no per-element division by S is needed.)

The block sizes are powers of two derived from the shape only (about ``_TILE`` elements a tile), and Triton
specialises the strides equal to 1, so it knows which axis is contiguous and vectorises the loads along it.

**Grid.** ``(channel blocks, row programs)``; each program loops over the row tiles ``t = pid, pid + P, ...`` of its
channel block, so it reads its per-channel constants (shift, ``k, s, h`` ...) once. ``P`` (row programs) is chosen
from the shape alone: enough programs to fill a large GPU (about ``_TARGET_PROGRAMS`` in all), at most
``_MAX_TILES_PER_PROGRAM`` tiles each.

**Reductions** (``batch_stats``, ``backward_stats``) are split: each program keeps a ``[BLOCK_R, BLOCK_C]``
accumulator in the accumulation dtype (fp32 for fp16/bf16/fp32 input, fp64 for fp64), reduces it over the rows once
at the end, and writes its per-channel partial sums as fp64 to a ``(P, 2, C)`` workspace; a second small kernel
(``_finish_sums``) adds the ``P`` partials of each channel in fp64, in a fixed order. Partials + a second pass rather
than ``tl.atomic_add`` into the fp64 output: the result is then bitwise reproducible from run to run (fp64 atomics
add in whatever order the programs finish), and the workspace is small (``P * 2C`` doubles, at most a few MB). The
cost is one extra launch of a tiny kernel.

**No host synchronisation**: the launchers read shapes, strides and dtypes only (never a tensor's values), allocate
their outputs and launch; they run in the current CUDA stream of x's device.

Without an importable ``triton`` this module still imports: :func:`available` is False and the launchers raise.

**CPU tensors** run the kernels only under Triton's interpreter, and Triton chooses compiled or interpreted when it
*decorates* a function with ``@triton.jit`` (``triton.knobs.runtime.interpret``, read from ``TRITON_INTERPRET``):
``TRITON_INTERPRET=1`` must be in the environment when this module is first imported; setting it later changes nothing
for kernels already decorated. :func:`interpreted` says which happened. The kernels call triton.language builtins only
(see ``_sum_combine``), so it does not matter whether triton itself was imported before or after.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
from torch import Tensor

from .ops import _memory_format, accumulation_dtype

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except Exception as e:  # noqa: BLE001 - any failure to import triton means: no Triton kernels
    triton = tl = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

__all__ = [
    "available",
    "import_error",
    "interpreted",
    "batch_stats_triton",
    "normalize_triton",
    "backward_stats_triton",
    "backward_input_triton",
    "forward_epilogue_triton",
    "backward_reduce_triton",
    "backward_apply_triton",
    "cbn_prior_triton",
    "cbn_record_triton",
]

_F64 = torch.float64
# what the environment said when this module was imported (the kernels were decorated then)
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

# elements of one tile (a [BLOCK_R, BLOCK_C] block): 16 per thread with the default 4 warps, enough loads in flight
_TILE = 2048
# longest contiguous run of one channel a tile takes in the channels-outermost layout
_MAX_BLOCK_R = 1024
# widest channel block in the channels-innermost layout (128 fp32 channels: a 512-byte contiguous row segment)
_MAX_BLOCK_C = 128
# about 16 programs of 4 warps per SM on a 132-SM H200; a reduction writes one partial per row program
_TARGET_PROGRAMS = 2048
# tiles one program accumulates at most before more programs are used (bounds the fp32 run in each lane)
_MAX_TILES_PER_PROGRAM = 64
# the grid's second axis (row programs) is limited to 65535 on CUDA (the first, channel blocks, to 2**31 - 1)
_MAX_ROW_PROGRAMS = 65535
# tile of the second pass over the partials
_FINISH_BLOCK_P = 64
_FINISH_BLOCK_C = 32


def available() -> bool:
    """Whether ``triton`` could be imported (the launchers need it)."""
    return triton is not None


def import_error() -> str | None:
    """Why ``triton`` could not be imported, or None."""
    return _IMPORT_ERROR


def _jit(fn=None, **options):
    # triton.jit where triton imports; the plain function otherwise, so that this module always imports
    if fn is None:
        return lambda f: _jit(f, **options)
    return fn if triton is None else triton.jit(fn, **options)


@_jit
def _add(a, b):
    return a + b


# The kernels call triton.language *builtins* only (tl.full, tl.reduce, ...), never its @triton.jit helpers such as
# tl.sum or tl.zeros: those are decorated when triton is imported, and an interpreted kernel cannot call a compiled
# helper. So whether the kernels are interpreted depends on TRITON_INTERPRET at the import of this module alone, not
# on when triton was imported. Sums are tl.reduce with the combiner tl.sum itself uses (the interpreter recognises it
# and sums with numpy; with any other combiner it loops over the elements in Python); the same code compiled.
_sum_combine = getattr(getattr(tl, "standard", None), "_sum_combine", _add)


# --------------------------------------------------------------------------------------------------------- kernels


@_jit
def _tile(t, tiles_per_outer, rows, stride_outer, stride_row, BLOCK_R: tl.constexpr, WIDE: tl.constexpr):
    """Offsets (without the channel part) and mask of the rows of tile ``t``: ``BLOCK_R`` consecutive rows of one
    outer block (one sample in the channels-outermost layout, the whole batch in the channels-innermost one)."""
    outer = t // tiles_per_outer  # one scalar division per tile, none per element
    block = t - outer * tiles_per_outer
    if WIDE:  # 2**31 elements or more: offsets in int64
        outer = outer.to(tl.int64)
        block = block.to(tl.int64)
    r = block * BLOCK_R + tl.arange(0, BLOCK_R)
    return outer * stride_outer + r * stride_row, r < rows


@_jit
def _upcast(v, ACC: tl.constexpr):
    """v in ACC; fp16 / bf16 go through fp32 (exact), which is also the only conversion of bf16 that Triton's
    interpreter implements."""
    if v.dtype != tl.float64:
        v = v.to(tl.float32)
    return v.to(ACC)


@_jit
def _downcast(v, OUT: tl.constexpr):
    """v in the output dtype OUT; to fp16 / bf16 through fp32 (a single rounding when v is fp32, as it is for
    fp16 / bf16 input, whose constants are fp32)."""
    if OUT != tl.float64:
        v = v.to(tl.float32)
    return v.to(OUT)


@_jit
def _batch_stats_partial(x_ptr, part_ptr, C, rows, tiles_per_outer, num_tiles, stride_outer, stride_row, stride_c,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr):
    """Partial shifted sums of one (channel block, row program): ``part[p, 0, c] = sum (x - k_c)``,
    ``part[p, 1, c] = sum (x - k_c)^2`` over the program's tiles, with ``k_c = x[0, c, 0]`` (the channel's first
    value, the same shift in every program: a mean far from 0 then costs no digits in the squares)."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    col_off = cols.to(tl.int64) * stride_c if WIDE else cols * stride_c
    shift = _upcast(tl.load(x_ptr + col_off, mask=cmask, other=0.0), ACC)  # x[0, c, 0], read once per program
    s1 = tl.full([BLOCK_R, BLOCK_C], 0, ACC)
    s2 = tl.full([BLOCK_R, BLOCK_C], 0, ACC)
    for t in range(pid_r, num_tiles, tl.num_programs(1)):
        row_off, rmask = _tile(t, tiles_per_outer, rows, stride_outer, stride_row, BLOCK_R, WIDE)
        mask = rmask[:, None] & cmask[None, :]
        v = _upcast(tl.load(x_ptr + row_off[:, None] + col_off[None, :], mask=mask, other=0.0), ACC)
        d = tl.where(mask, v - shift[None, :], 0.0)  # masked lanes would add -k
        s1 += d
        s2 += d * d
    # one reduction over the rows per program, then fp64 from here on
    base = part_ptr + pid_r.to(tl.int64) * 2 * C + cols
    tl.store(base, tl.reduce(s1, 0, _sum_combine).to(tl.float64), mask=cmask)
    tl.store(base + C, tl.reduce(s2, 0, _sum_combine).to(tl.float64), mask=cmask)


@_jit
def _backward_stats_partial(dy_ptr, x_ptr, center_ptr, part_ptr, C, rows, tiles_per_outer, num_tiles, stride_outer,
                            stride_row, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
                            WIDE: tl.constexpr):
    """Partial sums of one (channel block, row program): ``part[p, 0, c] = sum dy``,
    ``part[p, 1, c] = sum dy * (x - k_c)`` (dy has x's layout)."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    col_off = cols.to(tl.int64) * stride_c if WIDE else cols * stride_c
    k = _upcast(tl.load(center_ptr + cols, mask=cmask, other=0.0), ACC)
    sg = tl.full([BLOCK_R, BLOCK_C], 0, ACC)
    sgx = tl.full([BLOCK_R, BLOCK_C], 0, ACC)
    for t in range(pid_r, num_tiles, tl.num_programs(1)):
        row_off, rmask = _tile(t, tiles_per_outer, rows, stride_outer, stride_row, BLOCK_R, WIDE)
        mask = rmask[:, None] & cmask[None, :]
        off = row_off[:, None] + col_off[None, :]
        g = _upcast(tl.load(dy_ptr + off, mask=mask, other=0.0), ACC)
        xc = _upcast(tl.load(x_ptr + off, mask=mask, other=0.0), ACC) - k[None, :]
        sg += g
        sgx += tl.where(mask, g * xc, 0.0)  # (0 * (0 - k) would be NaN for an infinite k)
    base = part_ptr + pid_r.to(tl.int64) * 2 * C + cols
    tl.store(base, tl.reduce(sg, 0, _sum_combine).to(tl.float64), mask=cmask)
    tl.store(base + C, tl.reduce(sgx, 0, _sum_combine).to(tl.float64), mask=cmask)


# (programs, count and stride_c are a loop bound, a value cast to fp64 and an offset read once: specialising on their
# divisibility or on their being 1 would only multiply the compiled variants)
@_jit(do_not_specialize=("programs", "count", "stride_c"))
def _finish_sums(part_ptr, x_ptr, out_ptr, center_ptr, stats_ptr, dw_ptr, db_ptr, C, programs, count, stride_c,
                 SHIFTED: tl.constexpr, PACK: tl.constexpr, RENORM: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Second pass: the fp64 sums of the ``programs`` partials of each channel, added in a fixed order.

    ``SHIFTED`` (batch_stats): the partials are sums of ``x - k`` and ``(x - k)^2`` around ``k = x[0, c, 0]``; they
    are made raw (``sum x = s1 + n k``, ``sum x^2 = s2 + k (2 s1 + n k)``) and written after ``[n, 0]``. Otherwise
    (backward_stats) they are written as they are, as the ``(2, C)`` output; with ``PACK`` (backward_reduce) the
    second row becomes ``sum dy * x_hat = (s2 - (mean - k) s1) * invstd`` (``k`` from ``center``, ``mean`` and
    ``invstd`` from the forward epilogue's ``stats``), and the parameter gradients are written too: ``d_bias = sum
    dy``, ``d_weight = sum dy x_hat`` (``RENORM``: ``* r + sum dy * d``) in their pointers' dtypes."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    a1 = tl.full([BLOCK_P, BLOCK_C], 0, tl.float64)
    a2 = tl.full([BLOCK_P, BLOCK_C], 0, tl.float64)
    for p0 in range(0, programs, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < programs)[:, None] & cmask[None, :]
        ptr = part_ptr + p[:, None].to(tl.int64) * 2 * C + cols[None, :]
        a1 += tl.load(ptr, mask=mask, other=0.0)
        a2 += tl.load(ptr + C, mask=mask, other=0.0)
    s1 = tl.reduce(a1, 0, _sum_combine)
    s2 = tl.reduce(a2, 0, _sum_combine)
    if SHIFTED:
        k = _upcast(tl.load(x_ptr + cols.to(tl.int64) * stride_c, mask=cmask, other=0.0), tl.float64)
        n = tl.cast(count, tl.float64)  # (a count of 1 arrives as a constexpr: Triton specialises ints equal to 1)
        sum_x = s1 + n * k
        sum_x2 = s2 + k * (2.0 * s1 + n * k)
        tl.store(out_ptr + 2 + cols, sum_x, mask=cmask)
        tl.store(out_ptr + 2 + C + cols, sum_x2, mask=cmask)
        if pid == 0:
            tl.store(out_ptr, n)
            tl.store(out_ptr + 1, 0.0)  # the error flag: this rank's input is fine
    else:
        if PACK:
            k = _upcast(tl.load(center_ptr + cols, mask=cmask, other=0.0), tl.float64)
            mean = tl.load(stats_ptr + 2 * C + cols, mask=cmask, other=0.0)
            invstd = tl.load(stats_ptr + 4 * C + cols, mask=cmask, other=0.0)
            s2 = (s2 - (mean - k) * s1) * invstd
            dw = s2
            if RENORM:
                r = tl.load(stats_ptr + 6 * C + cols, mask=cmask, other=1.0)
                d = tl.load(stats_ptr + 7 * C + cols, mask=cmask, other=0.0)
                dw = s2 * r + s1 * d
            tl.store(dw_ptr + cols, _downcast(dw, dw_ptr.dtype.element_ty), mask=cmask)
            tl.store(db_ptr + cols, _downcast(s1, db_ptr.dtype.element_ty), mask=cmask)
        tl.store(out_ptr + cols, s1, mask=cmask)
        tl.store(out_ptr + C + cols, s2, mask=cmask)


@_jit
def _normalize_kernel(x_ptr, coef_ptr, y_ptr, C, rows, tiles_per_outer, num_tiles, stride_outer, stride_row,
                      stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr):
    """``y = (x - k) * s + h`` in coef's dtype, stored in y's dtype (y has x's layout)."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    col_off = cols.to(tl.int64) * stride_c if WIDE else cols * stride_c
    # the per-channel constants, once per program (coef is (3, C) contiguous, in the compute dtype)
    k = tl.load(coef_ptr + cols, mask=cmask, other=0.0)[None, :]
    s = tl.load(coef_ptr + C + cols, mask=cmask, other=0.0)[None, :]
    h = tl.load(coef_ptr + 2 * C + cols, mask=cmask, other=0.0)[None, :]
    for t in range(pid_r, num_tiles, tl.num_programs(1)):
        row_off, rmask = _tile(t, tiles_per_outer, rows, stride_outer, stride_row, BLOCK_R, WIDE)
        mask = rmask[:, None] & cmask[None, :]
        off = row_off[:, None] + col_off[None, :]
        v = _upcast(tl.load(x_ptr + off, mask=mask, other=0.0), k.dtype)
        y = (v - k) * s + h
        tl.store(y_ptr + off, _downcast(y, y_ptr.dtype.element_ty), mask=mask)


@_jit
def _backward_input_kernel(dy_ptr, x_ptr, coef_ptr, total_ptr, stats_ptr, count_ptr, dx_ptr, C, rows,
                           tiles_per_outer, num_tiles, stride_outer, stride_row, stride_c, FROM_TOTAL: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr):
    """``dx = dy * a + (x - k) * b + c`` in coef's dtype, stored in dx's dtype (dy and dx have x's layout).

    ``FROM_TOTAL`` (backward_apply): coef is the centre ``k`` alone, and each program forms ``a, b, c`` of its
    channels itself, in fp64, from the summed ``total = [sum dy, sum dy x_hat]``, the count and the forward
    epilogue's ``stats`` (``a = s``, ``b = -s invstd sum dy x_hat / n``, ``c = -s sum dy / n - b (mean - k)``)."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    col_off = cols.to(tl.int64) * stride_c if WIDE else cols * stride_c
    k = tl.load(coef_ptr + cols, mask=cmask, other=0.0)
    if FROM_TOTAL:
        n = tl.maximum(tl.load(count_ptr), 1.0)
        mean = tl.load(stats_ptr + 2 * C + cols, mask=cmask, other=0.0)
        invstd = tl.load(stats_ptr + 4 * C + cols, mask=cmask, other=0.0)
        s = tl.load(stats_ptr + 5 * C + cols, mask=cmask, other=0.0)
        sum_dy = tl.load(total_ptr + cols, mask=cmask, other=0.0)
        sum_dy_xhat = tl.load(total_ptr + C + cols, mask=cmask, other=0.0)
        b64 = -s * invstd * sum_dy_xhat / n
        c64 = -s * sum_dy / n - b64 * (mean - _upcast(k, tl.float64))
        a = s.to(k.dtype)[None, :]
        b = b64.to(k.dtype)[None, :]
        c = c64.to(k.dtype)[None, :]
    else:
        a = tl.load(coef_ptr + C + cols, mask=cmask, other=0.0)[None, :]
        b = tl.load(coef_ptr + 2 * C + cols, mask=cmask, other=0.0)[None, :]
        c = tl.load(coef_ptr + 3 * C + cols, mask=cmask, other=0.0)[None, :]
    k = k[None, :]
    for t in range(pid_r, num_tiles, tl.num_programs(1)):
        row_off, rmask = _tile(t, tiles_per_outer, rows, stride_outer, stride_row, BLOCK_R, WIDE)
        mask = rmask[:, None] & cmask[None, :]
        off = row_off[:, None] + col_off[None, :]
        g = _upcast(tl.load(dy_ptr + off, mask=mask, other=0.0), k.dtype)
        v = _upcast(tl.load(x_ptr + off, mask=mask, other=0.0), k.dtype)
        dx = g * a + (v - k) * b + c
        tl.store(dx_ptr + off, _downcast(dx, dx_ptr.dtype.element_ty), mask=mask)


@_jit
def _lerp(a, b, w):
    """torch.lerp's formula (``a + w (b - a)`` for ``|w| < 0.5``, else ``b - (b - a) (1 - w)``)."""
    return tl.where(tl.abs(w) < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@_jit
def _forward_epilogue_kernel(total_ptr, prior_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, nbt_ptr, coef_ptr, stats_ptr,
                             counts_ptr, C, eps: tl.float64, momentum: tl.float64, r_max: tl.float64,
                             d_max: tl.float64,
                             HAS_PRIOR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                             RENORM: tl.constexpr, UPDATE: tl.constexpr, HAS_NBT: tl.constexpr,
                             CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr):
    """:func:`syncnorm.ops.forward_epilogue` in one program (grid ``(1,)``), fp64 throughout; the running statistics
    are updated in their own dtype (fp16 / bf16 through fp32), as torch.lerp does."""
    # the float arguments as fp64 vectors (compiled they are fp64 already; the interpreter passes Python floats,
    # which would become fp32 constants in arithmetic)
    eps = tl.full([BLOCK_C], eps, tl.float64)
    momentum = tl.full([BLOCK_C], momentum, tl.float64)
    r_max = tl.full([BLOCK_C], r_max, tl.float64)
    d_max = tl.full([BLOCK_C], d_max, tl.float64)
    n = tl.load(total_ptr)
    flag = tl.load(total_ptr + 1)
    safe_n = tl.maximum(n, 1.0)
    if HAS_PRIOR:
        prior_n = tl.load(prior_ptr)  # row 0 holds the prior's count in every column
        used_n = prior_n + n
    else:
        prior_n = n * 0.0
        used_n = n
    safe_used = tl.where(used_n > 0, used_n, 1.0)
    # a step that will raise (a rank's invalid input, one value per channel) leaves the statistics alone
    seen = (n > 0) & (flag == 0) & (used_n != 1)
    if HAS_NBT:
        nbt = tl.load(nbt_ptr) + seen.to(tl.int64)
        # every thread of the program has read the old count before one of them stores the new one
        tl.debug_barrier()
        if UPDATE:
            tl.store(nbt_ptr, nbt)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = cols < C
        s1 = tl.load(total_ptr + 2 + cols, mask=m, other=0.0)
        s2 = tl.load(total_ptr + 2 + C + cols, mask=m, other=0.0)
        batch_mean = s1 / safe_n
        batch_m2 = tl.maximum(s2 - batch_mean * s1, 0.0, propagate_nan=tl.PropagateNan.ALL)
        mean = batch_mean
        m2 = batch_m2
        if HAS_PRIOR:  # Chan's exact merge, the prior first
            prior_mean = tl.load(prior_ptr + C + cols, mask=m, other=0.0)
            prior_m2 = tl.load(prior_ptr + 2 * C + cols, mask=m, other=0.0)
            delta = batch_mean - prior_mean
            mean = prior_mean + delta * (n / safe_used)
            m2 = prior_m2 + batch_m2 + delta * delta * (prior_n * n / safe_used)
        r = tl.full([BLOCK_C], 1.0, tl.float64)
        d = tl.full([BLOCK_C], 0.0, tl.float64)
        if RENORM:  # against the running statistics before this step's update
            rm = _upcast(tl.load(rm_ptr + cols, mask=m, other=0.0), tl.float64)
            rv = _upcast(tl.load(rv_ptr + cols, mask=m, other=1.0), tl.float64)
            batch_var = tl.where(n > 0, batch_m2 / safe_n, 0.0)
            inv_sigma = 1.0 / tl.sqrt(rv + eps)
            # (NaN in, NaN out, as torch.clamp: tl.maximum / tl.minimum drop NaN by default)
            r = tl.maximum(tl.sqrt(batch_var + eps) * inv_sigma, 1.0 / r_max, propagate_nan=tl.PropagateNan.ALL)
            r = tl.minimum(r, r_max, propagate_nan=tl.PropagateNan.ALL)
            d = tl.maximum((batch_mean - rm) * inv_sigma, -d_max, propagate_nan=tl.PropagateNan.ALL)
            d = tl.minimum(d, d_max, propagate_nan=tl.PropagateNan.ALL)
        invstd = 1.0 / tl.sqrt(m2 / tl.maximum(used_n, 1.0) + eps)
        w = tl.full([BLOCK_C], 1.0, tl.float64)
        b = tl.full([BLOCK_C], 0.0, tl.float64)
        if HAS_W:
            w = _upcast(tl.load(w_ptr + cols, mask=m, other=1.0), tl.float64)
        if HAS_B:
            b = _upcast(tl.load(b_ptr + cols, mask=m, other=0.0), tl.float64)
        scale = w * r * invstd
        cdt = coef_ptr.dtype.element_ty
        k = mean.to(cdt)
        h = (b + w * d) - (mean - k.to(tl.float64)) * scale
        tl.store(coef_ptr + cols, k, mask=m)
        tl.store(coef_ptr + C + cols, scale.to(cdt), mask=m)
        tl.store(coef_ptr + 2 * C + cols, h.to(cdt), mask=m)
        tl.store(stats_ptr + cols, batch_mean, mask=m)
        tl.store(stats_ptr + C + cols, batch_m2, mask=m)
        tl.store(stats_ptr + 2 * C + cols, mean, mask=m)
        tl.store(stats_ptr + 3 * C + cols, m2, mask=m)
        tl.store(stats_ptr + 4 * C + cols, invstd, mask=m)
        tl.store(stats_ptr + 5 * C + cols, scale, mask=m)
        tl.store(stats_ptr + 6 * C + cols, r, mask=m)
        tl.store(stats_ptr + 7 * C + cols, d, mask=m)
        if UPDATE:
            rdt = rm_ptr.dtype.element_ty
            ops_dt = tl.float64 if rdt == tl.float64 else tl.float32  # torch.lerp's compute dtype
            if CUMULATIVE:
                # 1 / num_batches_tracked in the buffer's dtype, as torch computes it (through fp64 here: the
                # interpreter converts to bf16 from fp32 only)
                count = _upcast(_downcast(tl.cast(tl.maximum(nbt, 1), tl.float64), rdt), tl.float64)
                factor = _upcast(_downcast(1.0 / count, rdt), ops_dt)
            else:
                factor = tl.cast(momentum, ops_dt)
            old_mean = _upcast(tl.load(rm_ptr + cols, mask=m, other=0.0), ops_dt)
            old_var = _upcast(tl.load(rv_ptr + cols, mask=m, other=0.0), ops_dt)
            unbiased = batch_m2 / tl.maximum(n - 1.0, 1.0)
            target_mean = _upcast(_downcast(batch_mean, rdt), ops_dt)
            target_var = _upcast(_downcast(unbiased, rdt), ops_dt)
            new_mean = tl.where(seen, _lerp(old_mean, target_mean, factor), old_mean)
            new_var = tl.where(seen, _lerp(old_var, target_var, factor), old_var)
            tl.store(rm_ptr + cols, _downcast(new_mean, rdt), mask=m)
            tl.store(rv_ptr + cols, _downcast(new_var, rdt), mask=m)
    tl.store(counts_ptr, n)
    tl.store(counts_ptr + 1, flag)
    tl.store(counts_ptr + 2, used_n)


@_jit
def _cbn_slot(count_ptr, mean_ptr, var_ptr, mean_at_ptr, var_at_ptr, comp_ptr, wm_ptr, wv_ptr, s, cols, m, active, C,
              COMPENSATE: tl.constexpr):
    """Slot ``s`` of Cross-Iteration BN's history for channels ``cols``: its count (0 unless pooled) and its
    compensated mean and variance, both exactly 0 where the slot is not pooled (ops.cbn_prior_reference)."""
    n = tl.load(count_ptr + s).to(tl.float64)
    n = tl.where(active, n, 0.0)
    off = s * C + cols
    mean = tl.load(mean_ptr + off, mask=m, other=0.0).to(tl.float64)
    var = tl.load(var_ptr + off, mask=m, other=0.0).to(tl.float64)
    if COMPENSATE:
        ok = tl.load(comp_ptr + s) != 0
        d_mean = tl.where(ok, tl.load(wm_ptr + off, mask=m, other=0.0).to(tl.float64)
                          - tl.load(mean_at_ptr + off, mask=m, other=0.0).to(tl.float64), 0.0)
        d_var = tl.where(ok, tl.load(wv_ptr + off, mask=m, other=0.0).to(tl.float64)
                         - tl.load(var_at_ptr + off, mask=m, other=0.0).to(tl.float64), 0.0)
        mean = mean + d_mean
        var = tl.maximum(var + d_var - d_mean * d_mean, 0.0, propagate_nan=tl.PropagateNan.ALL)
    used = n > 0
    return n, tl.where(used, mean, 0.0), tl.where(used, var, 0.0)


@_jit
def _cbn_prior_kernel(count_ptr, mean_ptr, var_ptr, mean_at_ptr, var_at_ptr, comp_ptr, wm_ptr, wv_ptr, step_ptr,
                      out_ptr, S, C, burn_in, COMPENSATE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Cross-Iteration BN's pooled prior ``[count, mean, m2]`` (3 rows of C, fp64) for one block of channels: three
    passes over the S slots (the total count, the weighted mean, the m2 about it), each summed in slot order (the
    reference's ``.sum(0)`` may add them in another order: equal to a few ulps)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = cols < C
    active = tl.load(step_ptr) >= burn_in
    total = tl.full((BLOCK_C,), 0.0, tl.float64)
    for s in range(0, S):
        total += tl.where(active, tl.load(count_ptr + s).to(tl.float64), 0.0)
    safe_total = tl.maximum(total, 1.0, propagate_nan=tl.PropagateNan.ALL)  # (clamp_min(1))
    pooled = tl.full((BLOCK_C,), 0.0, tl.float64)
    for s in range(0, S):
        n, mean, var = _cbn_slot(count_ptr, mean_ptr, var_ptr, mean_at_ptr, var_at_ptr, comp_ptr, wm_ptr, wv_ptr, s,
                                 cols, m, active, C, COMPENSATE)
        pooled += (n / safe_total) * mean
    m2 = tl.full((BLOCK_C,), 0.0, tl.float64)
    for s in range(0, S):
        n, mean, var = _cbn_slot(count_ptr, mean_ptr, var_ptr, mean_at_ptr, var_at_ptr, comp_ptr, wm_ptr, wv_ptr, s,
                                 cols, m, active, C, COMPENSATE)
        m2 += n * (var + (mean - pooled) * (mean - pooled))
    tl.store(out_ptr + cols, total, mask=m)
    tl.store(out_ptr + C + cols, pooled, mask=m)
    tl.store(out_ptr + 2 * C + cols, m2, mask=m)


@_jit
def _cbn_record_data_kernel(next_ptr, step_ptr, count_ptr, mean_ptr, m2_ptr, wm_ptr, wv_ptr, dmean_ptr, dvar_ptr,
                            h_mean_ptr, h_var_ptr, h_mean_at_ptr, h_var_at_ptr, h_dmean_ptr, h_dvar_ptr, S, C, ND, NV,
                            burn_in, COMPENSATE: tl.constexpr, BLOCK: tl.constexpr):
    """The per-channel and weight-sized parts of CBN's record (ops.cbn_record): this program's block of each of the
    (C,) rows and of the two derivative slots, stored into slot ``next`` where the step records (masked stores: an
    unrecorded step writes nothing). ``next`` is read here and advanced by the scalar kernel launched after."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(next_ptr)
    n = tl.load(count_ptr)
    do = (tl.load(step_ptr) >= burn_in - S) & (n > 0)
    mc = (offs < C) & do
    tl.store(h_mean_ptr + slot * C + offs, tl.load(mean_ptr + offs, mask=mc, other=0.0), mask=mc)
    safe_n = tl.maximum(n, 1.0, propagate_nan=tl.PropagateNan.ALL)  # (clamp_min(1), as the reference)
    tl.store(h_var_ptr + slot * C + offs, tl.load(m2_ptr + offs, mask=mc, other=0.0) / safe_n, mask=mc)
    if COMPENSATE:
        tl.store(h_mean_at_ptr + slot * C + offs, tl.load(wm_ptr + offs, mask=mc, other=0.0), mask=mc)
        tl.store(h_var_at_ptr + slot * C + offs, tl.load(wv_ptr + offs, mask=mc, other=0.0), mask=mc)
        md = (offs < ND) & do
        tl.store(h_dmean_ptr + slot * ND + offs, tl.load(dmean_ptr + offs, mask=md, other=0.0), mask=md)
        mv = (offs < NV) & do
        tl.store(h_dvar_ptr + slot * NV + offs, tl.load(dvar_ptr + offs, mask=mv, other=0.0), mask=mv)
    else:
        zero = tl.full((BLOCK,), 0.0, tl.float64)
        tl.store(h_mean_at_ptr + slot * C + offs, zero, mask=mc)
        tl.store(h_var_at_ptr + slot * C + offs, zero, mask=mc)


@_jit
def _cbn_record_scalar_kernel(next_ptr, filled_ptr, step_ptr, count_ptr, h_count_ptr, h_comp_ptr, S, burn_in,
                              COMPENSATE: tl.constexpr):
    """The scalar part of CBN's record, one program, after the data kernel: the slot's count and compensable flag,
    then ``next`` and ``filled`` advanced (where the step records)."""
    slot = tl.load(next_ptr)
    n = tl.load(count_ptr)
    do = (tl.load(step_ptr) >= burn_in - S) & (n > 0)
    filled = tl.load(filled_ptr)
    # every thread of the program has read `next` and `filled` before one of them stores the new values
    tl.debug_barrier()
    tl.store(h_count_ptr + slot, n.to(h_count_ptr.dtype.element_ty), mask=do)
    tl.store(h_comp_ptr + slot, tl.full((), COMPENSATE, tl.int1), mask=do)
    tl.store(filled_ptr, tl.maximum(tl.minimum(filled + 1, S), 0), mask=do)  # (clamp(0, S))
    tl.store(next_ptr, (slot + 1) % S, mask=do)


# ------------------------------------------------------------------------------------------------------- launchers


class _Plan(NamedTuple):
    """How a kernel walks x: geometry (see the module docstring), block sizes and grid."""

    rows: int  # rows per outer block
    tiles_per_outer: int
    num_tiles: int
    stride_outer: int
    stride_row: int
    stride_c: int
    block_r: int
    block_c: int
    channel_blocks: int
    programs: int  # row programs per channel block
    wide: bool

    def geometry(self) -> tuple:
        return (self.rows, self.tiles_per_outer, self.num_tiles, self.stride_outer, self.stride_row, self.stride_c)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.channel_blocks, self.programs)


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _plan(x: Tensor, fmt: torch.memory_format) -> _Plan:
    """The plan for a non-empty x that is contiguous in ``fmt`` (strides are derived from the shape: a size-1 dim
    may have any stride in a contiguous tensor)."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    if fmt == torch.contiguous_format and s > 1:
        # channels outermost: each (sample, channel) is a contiguous run of s values
        outer, rows, stride_outer, stride_row, stride_c = n, s, c * s, 1, s
        block_r = min(_pow2(rows), _MAX_BLOCK_R)
        block_c = min(_pow2(c), max(1, _TILE // block_r))
    else:
        # channels innermost: (N, C), channels_last(_3d), or s == 1 -- row r = n * s + spatial index, C apart
        outer, rows, stride_outer, stride_row, stride_c = 1, n * s, 0, c, 1
        block_c = min(_pow2(c), _MAX_BLOCK_C)
        block_r = min(_pow2(rows), max(1, _TILE // block_c))
    tiles_per_outer = _cdiv(rows, block_r)
    num_tiles = outer * tiles_per_outer
    channel_blocks = _cdiv(c, block_c)
    programs = max(_cdiv(_TARGET_PROGRAMS, channel_blocks), _cdiv(num_tiles, _MAX_TILES_PER_PROGRAM))
    programs = max(1, min(programs, num_tiles, _MAX_ROW_PROGRAMS))
    return _Plan(rows, tiles_per_outer, num_tiles, stride_outer, stride_row, stride_c, block_r, block_c,
                 channel_blocks, programs, wide=x.numel() >= 2**31)


def _tl_dtype(dtype: torch.dtype):
    table = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}
    if dtype not in table:
        raise TypeError(f"syncnorm Triton kernels: expected float16, bfloat16, float32 or float64, got {dtype}")
    return table[dtype]


def _require(x: Tensor, what: str) -> None:
    if triton is None:
        raise RuntimeError(f"syncnorm.triton_ops.{what}: triton could not be imported ({_IMPORT_ERROR})")
    if x.dim() < 2:
        raise ValueError(f"syncnorm.triton_ops.{what}: expected an (N, C, *) input, got shape {tuple(x.shape)}")


def _in_layout(x: Tensor) -> tuple[Tensor, torch.memory_format]:
    """x in the layout the kernels walk (itself when it already is), and that memory format."""
    fmt = _memory_format(x)
    return (x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)), fmt


def _on_device(x: Tensor):
    # Triton launches on the current CUDA device and its current stream: make that x's device
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _finish(part: Tensor, x: Tensor, out: Tensor, plan: _Plan, count: int, shifted: bool, pack: tuple = None,
            renorm: bool = False) -> None:
    # pack: (center, stats, d_weight, d_bias) for backward_reduce
    c = x.shape[1]
    center, stats, dw, db = (out,) * 4 if pack is None else pack  # (not read without PACK)
    # x and its channel stride are read only by the shifted (batch_stats) pass: otherwise pass what does not
    # specialise the kernel on x's dtype or alignment
    x_arg, stride_c = (x, plan.stride_c) if shifted else (out, 0)
    _finish_sums[(_cdiv(c, _FINISH_BLOCK_C),)](
        part, x_arg, out, center, stats, dw, db, c, plan.programs, count, stride_c, SHIFTED=shifted,
        PACK=pack is not None, RENORM=renorm, BLOCK_P=_FINISH_BLOCK_P, BLOCK_C=_FINISH_BLOCK_C,
        enable_fp_fusion=False)  # (see the module docstring: no FMA in the O(C) kernels)


def batch_stats_triton(x: Tensor, num_features: int) -> Tensor:
    """Triton :func:`syncnorm.ops.batch_stats`: fp64 ``[n, 0, sum x, sum x^2]`` (``2C + 2`` values)."""
    _require(x, "batch_stats_triton")
    if x.numel() == 0:
        return torch.zeros(2 + 2 * num_features, dtype=_F64, device=x.device)
    if x.shape[1] != num_features:
        raise ValueError(f"syncnorm.triton_ops.batch_stats_triton: expected {num_features} channels in dim 1, got "
                         f"shape {tuple(x.shape)}")
    x, fmt = _in_layout(x)
    plan = _plan(x, fmt)
    c = num_features
    part = torch.empty((plan.programs, 2, c), dtype=_F64, device=x.device)  # every entry is written
    out = torch.empty(2 + 2 * c, dtype=_F64, device=x.device)
    with _on_device(x):
        _batch_stats_partial[plan.grid](
            x, part, c, *plan.geometry(), BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
            ACC=_tl_dtype(accumulation_dtype(x.dtype)), WIDE=plan.wide)
        _finish(part, x, out, plan, x.numel() // c, shifted=True)
    return out


def _backward_sums(dy: Tensor, x: Tensor, center: Tensor, what: str, pack: tuple | None = None,
                   renorm: bool = False) -> Tensor:
    """``[sum dy, sum dy * (x - center)]`` (pack None: shape (2, C)) or, with ``pack = (stats, d_weight, d_bias)``,
    ``[sum dy, sum dy * x_hat]`` (shape (2C,)) with the parameter gradients written into the two tensors given."""
    _require(x, what)
    c = x.shape[1]
    shape = (2, c) if pack is None else (2 * c,)
    if x.numel() == 0:
        out = torch.zeros(shape, dtype=_F64, device=x.device)
        if pack is not None:
            pack[1].zero_()
            pack[2].zero_()
        return out
    x, fmt = _in_layout(x)
    dy = dy.contiguous(memory_format=fmt)
    plan = _plan(x, fmt)
    # x - k and the products in the wider of center's dtype and x's accumulation dtype (the layers pass the centre in
    # the accumulation dtype, so that is just the accumulation dtype)
    acc = torch.promote_types(accumulation_dtype(x.dtype), center.dtype)
    center = center.contiguous()
    part = torch.empty((plan.programs, 2, c), dtype=_F64, device=x.device)
    out = torch.empty(shape, dtype=_F64, device=x.device)
    with _on_device(x):
        _backward_stats_partial[plan.grid](
            dy, x, center, part, c, *plan.geometry(), BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
            ACC=_tl_dtype(acc), WIDE=plan.wide)
        _finish(part, x, out, plan, 0, shifted=False,
                pack=None if pack is None else (center, pack[0].contiguous(), pack[1], pack[2]), renorm=renorm)
    return out


def backward_stats_triton(dy: Tensor, x: Tensor, center: Tensor) -> Tensor:
    """Triton :func:`syncnorm.ops.backward_stats`: fp64 ``(2, C)`` = ``[sum dy, sum dy * (x - center)]``."""
    return _backward_sums(dy, x, center, "backward_stats_triton")


def backward_reduce_triton(dy: Tensor, x: Tensor, center: Tensor, stats: Tensor, renorm: bool,
                           weight_dtype: torch.dtype, bias_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Triton :func:`syncnorm.ops.backward_reduce`: ``(packed, d_weight, d_bias)`` from the same two kernels as
    backward_stats, the second of which packs the vector and writes the parameter gradients."""
    c = x.shape[1]
    dw = torch.empty(c, dtype=weight_dtype, device=x.device)
    db = torch.empty(c, dtype=bias_dtype, device=x.device)
    packed = _backward_sums(dy, x, center, "backward_reduce_triton", pack=(stats, dw, db), renorm=renorm)
    return packed, dw, db


def _elementwise(kernel, tensors: tuple[Tensor, ...], x: Tensor, coef: Tensor, what: str, extra: tuple = (),
                 **flags) -> Tensor:
    """Run ``kernel(*tensors_in_x_layout, x, coef, *extra, out, ...)``: the output in x's dtype and memory format."""
    _require(x, what)
    out = torch.empty_like(x, memory_format=_memory_format(x))
    if x.numel() == 0:
        return out
    x, fmt = _in_layout(x)
    tensors = tuple(t.contiguous(memory_format=fmt) for t in tensors)
    plan = _plan(x, fmt)
    _tl_dtype(coef.dtype)  # (the compute dtype: a float type)
    with _on_device(x):
        kernel[plan.grid](*tensors, x, coef.contiguous(), *extra, out, x.shape[1], *plan.geometry(), **flags,
                          BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, WIDE=plan.wide)
    return out


def normalize_triton(x: Tensor, coef: Tensor) -> Tensor:
    """Triton :func:`syncnorm.ops.normalize`: ``y = (x - k) * s + h`` with ``coef = [k, s, h]`` of shape (3, C)."""
    return _elementwise(_normalize_kernel, (), x, coef, "normalize_triton")


def backward_input_triton(dy: Tensor, x: Tensor, coef: Tensor) -> Tensor:
    """Triton :func:`syncnorm.ops.backward_input`: ``dx = dy * a + (x - k) * b + c`` with ``coef = [k, a, b, c]``."""
    return _elementwise(_backward_input_kernel, (dy,), x, coef, "backward_input_triton", extra=(coef,) * 3,
                        FROM_TOTAL=False)  # (the extra pointers are not read)


def backward_apply_triton(dy: Tensor, x: Tensor, total: Tensor, center: Tensor, stats: Tensor,
                          count: Tensor) -> Tensor:
    """Triton :func:`syncnorm.ops.backward_apply`: one kernel, whose programs form their channels' ``a, b, c`` from
    the summed vector themselves."""
    return _elementwise(_backward_input_kernel, (dy,), x, center, "backward_apply_triton",
                        extra=(total.contiguous(), stats.contiguous(), count.reshape(1)), FROM_TOTAL=True)


# channels one pass of the epilogue's program takes
_EPILOGUE_BLOCK_C = 256


def forward_epilogue_triton(total: Tensor, prior, weight, bias, running_mean, running_var, num_batches_tracked,
                            eps: float, momentum, renorm: bool, r_max: float, d_max: float,
                            compute_dtype: torch.dtype):
    """Triton :func:`syncnorm.ops.forward_epilogue`: ``(coef, stats, counts)``, the running statistics updated in
    place."""
    if triton is None:
        raise RuntimeError(f"syncnorm.triton_ops.forward_epilogue_triton: triton could not be imported ({_IMPORT_ERROR})")
    C = (total.shape[0] - 2) // 2
    if (running_mean is None) != (running_var is None):
        raise ValueError("syncnorm.triton_ops.forward_epilogue_triton: running_mean and running_var go together "
                         f"(got {'running_var' if running_mean is None else 'running_mean'} alone)")
    if renorm and running_mean is None:
        raise ValueError("syncnorm.triton_ops.forward_epilogue_triton: renorm needs running_mean and running_var")
    for name, buf in (("running_mean", running_mean), ("running_var", running_var),
                      ("num_batches_tracked", num_batches_tracked)):
        if buf is not None and not buf.is_contiguous():
            raise ValueError(f"syncnorm.triton_ops.forward_epilogue_triton: {name} must be contiguous (it is updated "
                             "in place)")
    device = total.device
    total = total.contiguous()
    coef = torch.empty((3, C), dtype=compute_dtype, device=device)
    stats = torch.empty((8, C), dtype=_F64, device=device)
    counts = torch.empty(3, dtype=_F64, device=device)
    update = running_mean is not None and (momentum is not None or num_batches_tracked is not None)
    dummy = total  # for the pointers a constexpr flag says are not read
    _tl_dtype(compute_dtype)
    with _on_device(total):
        _forward_epilogue_kernel[(1,)](
            total, dummy if prior is None else prior.contiguous(), dummy if weight is None else weight.contiguous(),
            dummy if bias is None else bias.contiguous(), dummy if running_mean is None else running_mean,
            dummy if running_var is None else running_var,
            dummy if num_batches_tracked is None else num_batches_tracked, coef, stats, counts, C, float(eps),
            0.0 if momentum is None else float(momentum), float(r_max), float(d_max),
            HAS_PRIOR=prior is not None, HAS_W=weight is not None, HAS_B=bias is not None, RENORM=bool(renorm),
            UPDATE=update, HAS_NBT=num_batches_tracked is not None, CUMULATIVE=momentum is None,
            BLOCK_C=min(_pow2(C), _EPILOGUE_BLOCK_C), enable_fp_fusion=False)
    return coef, stats, counts


def interpreted() -> bool:
    """Whether the kernels were decorated under Triton's interpreter (``TRITON_INTERPRET=1`` when this module was
    imported): only then do they run on CPU tensors."""
    if triton is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # another layout of triton's internals: what the environment said at import
        return _INTERPRET_AT_IMPORT
    return isinstance(_normalize_kernel, InterpretedFunction)


_CBN_BLOCK_C = 128


def cbn_prior_triton(count: Tensor, mean: Tensor, var: Tensor, mean_at: Tensor, var_at: Tensor, compensable: Tensor,
                     w_mean, w_var, step: Tensor, burn_in: int) -> Tensor:
    """:func:`syncnorm.ops.cbn_prior` as one kernel: one program per block of channels, three passes over the slots."""
    if triton is None:
        raise RuntimeError(f"syncnorm.triton_ops.cbn_prior_triton: triton could not be imported ({_IMPORT_ERROR})")
    if (w_mean is None) != (w_var is None):
        raise ValueError("syncnorm.triton_ops.cbn_prior_triton: w_mean and w_var go together")
    S, C = mean.shape
    out = torch.empty((3, C), dtype=_F64, device=mean.device)
    if C == 0:
        return out
    compensate = w_mean is not None
    with _on_device(mean):
        _cbn_prior_kernel[(_cdiv(C, _CBN_BLOCK_C),)](
            count.contiguous(), mean.contiguous(), var.contiguous(), mean_at.contiguous(), var_at.contiguous(),
            compensable.contiguous(), (w_mean if compensate else mean).contiguous(),
            (w_var if compensate else var).contiguous(), step, out, S, C, int(burn_in), COMPENSATE=compensate,
            BLOCK_C=min(_pow2(C), _CBN_BLOCK_C), enable_fp_fusion=False)
    return out


_CBN_RECORD_BLOCK = 1024


def cbn_record_triton(history_count: Tensor, history_mean: Tensor, history_var: Tensor, history_mean_at: Tensor,
                      history_var_at: Tensor, history_compensable: Tensor, history_dmean: Tensor, history_dvar: Tensor,
                      history_next: Tensor, history_filled: Tensor, step: Tensor, count: Tensor, mean: Tensor,
                      m2: Tensor, dmean, dvar, w_mean, w_var, burn_in: int) -> None:
    """:func:`syncnorm.ops.cbn_record` as two kernels: the rows and derivative slots (one program per block of
    elements), then one program for the slot's count, its flag and the ring's position."""
    if triton is None:
        raise RuntimeError(f"syncnorm.triton_ops.cbn_record_triton: triton could not be imported ({_IMPORT_ERROR})")
    compensate = dmean is not None
    if compensate and (dvar is None or w_mean is None or w_var is None):
        raise ValueError("syncnorm.triton_ops.cbn_record_triton: dmean, dvar, w_mean and w_var go together")
    buffers = (history_count, history_mean, history_var, history_mean_at, history_var_at, history_compensable,
               history_dmean, history_dvar, history_next, history_filled)
    if not all(b.is_contiguous() for b in buffers):
        raise ValueError("syncnorm.triton_ops.cbn_record_triton: the history buffers must be contiguous (they are "
                         "written in place)")
    S, C = history_mean.shape
    nd = history_dmean[0].numel() if compensate else 0
    nv = history_dvar[0].numel() if compensate else 0
    if compensate:
        dmean = dmean.to(history_dmean.dtype).contiguous()
        dvar = dvar.to(history_dvar.dtype).contiguous()
        if dmean.numel() != nd or dvar.numel() != nv:
            raise ValueError(f"syncnorm.triton_ops.cbn_record_triton: derivatives of {dmean.numel()} and "
                             f"{dvar.numel()} values for slots of {nd} and {nv}")
    mean, m2 = mean.to(_F64).contiguous(), m2.to(_F64).contiguous()
    count = count.to(_F64)
    w_mean = mean if w_mean is None else w_mean.to(_F64).contiguous()
    w_var = mean if w_var is None else w_var.to(_F64).contiguous()
    dmean = mean if dmean is None else dmean
    dvar = mean if dvar is None else dvar
    with _on_device(mean):
        _cbn_record_data_kernel[(_cdiv(max(C, nd, nv, 1), _CBN_RECORD_BLOCK),)](
            history_next, step, count, mean, m2, w_mean, w_var, dmean, dvar, history_mean, history_var,
            history_mean_at, history_var_at, history_dmean, history_dvar, S, C, nd, nv, int(burn_in),
            COMPENSATE=compensate, BLOCK=_CBN_RECORD_BLOCK)
        _cbn_record_scalar_kernel[(1,)](history_next, history_filled, step, count, history_count,
                                        history_compensable, S, int(burn_in), COMPENSATE=compensate)
