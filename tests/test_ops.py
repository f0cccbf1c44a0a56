"""The custom ops of :mod:`syncnorm.ops`: C++ CPU kernel, reference implementation and float64 semantics.

The four data passes are checked op by op below; the ops the layers call (``forward_epilogue``, ``backward_reduce``,
``backward_apply``: those passes with their O(C) parts) have their own sections at the end.

For every op, layout, dtype and batch (normal, empty, mean 1e4):

- the C++ kernel (``torch.ops.syncnorm_cpu.*``) against the reference implementation (``ops.*_reference``),
- both against a float64 computation of what the op's docstring says it computes,
- output dtype, shape and memory format (channels_last stays channels_last),

plus ``torch.library.opcheck`` on both paths, the fake implementations against the real outputs, a hypothesis
property test kernel == reference, and a check that ``ops.use_kernels(False)`` really runs the reference.

Tolerances
----------
The kernels are built without ``-march=native`` but sum in SIMD lanes and blocks (see ``norm_cpu.cpp``), in another
order than torch's reductions, so the two implementations agree up to rounding only. Every tolerance below is a
rounding-error bound derived from the dtype's machine epsilon (never tuned to what happened to pass):

- **Sums** (``batch_stats``, ``backward_stats``) accumulate in the accumulation dtype ``A`` (fp32 for fp16 / bf16 /
  fp32 input, fp64 for fp64). A sum of ``n`` terms carries an error of at most ``n * eps_A * sum|terms|`` whatever the
  order; for rounding errors of random sign the typical error is ``~sqrt(n) * eps_A/2 * sum|terms|``. We allow
  ``eps_A * (4 sqrt(n) + 4) * sum|terms|`` per channel (the ``+ 4`` covers the one or two roundings inside each term,
  ``x - k`` and the product): more than 10 standard deviations of the random-walk error (``~eps_A/2 * sqrt(n/3)``
  for same-sign terms), yet small enough that dropping a single term of a 9000-term sum (an error of ~1/n of the
  scale) fails. Errors are measured against
  ``sum|terms|``, not the sum itself, because a sum of centred data cancels.
- **Elementwise outputs** (``normalize``, ``backward_input``) are a few operations in ``A`` (each rounding ``<= eps_A/2``
  of the intermediate's size) followed by one rounding to the output dtype (``<= eps_out/2`` relative, or half the
  subnormal spacing, which is below ``finfo.tiny``). We allow ``rtol = eps_out`` and
  ``atol = 8 eps_A * max|intermediate| + finfo(out).tiny``.
- Kernel against reference: both are within the bound of the exact value, so they are within twice the bound of each
  other (triangle inequality).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncnorm import ops
from syncnorm.stats import Moments, merge_all

pytestmark = pytest.mark.skipif(not ops.cpu_kernels_available(), reason="the C++ CPU kernels could not be built")

F64 = torch.float64
C = 5
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16"]
OPS = ["batch_stats", "normalize", "backward_stats", "backward_input"]

# name -> (shape for N values per batch, memory format or "view"); sizes chosen so that the kernels' SIMD body and
# scalar tail (channels-first runs of 63 and 4500 > 4096 values: a block boundary), and several row blocks of the
# channels-last reduction (624 rows > 512) are all exercised.
LAYOUTS = {
    "2d": ((200, C), None),
    "3d": ((2, C, 4500), None),
    "nchw": ((3, C, 7, 9), None),
    "channels_last": ((4, C, 12, 13), torch.channels_last),
    "channels_last_3d": ((3, C, 4, 5, 6), torch.channels_last_3d),
    "transposed_view": ((3, C, 7, 9), "view"),  # (C, N, 7, 18).transpose(0, 1)[..., ::2]: neither layout
    "transposed_2d": ((200, C), "view"),  # (C, N).t()
}


# --------------------------------------------------------------------------------------------------------- helpers


def make_input(layout: str, dtype: torch.dtype, n: int | None = None, *, loc: float = 0.0, scale: float = 1.0,
               seed: int = 0) -> torch.Tensor:
    """A tensor of the given layout whose values are float64 normals (loc, scale) rounded to ``dtype``, with a
    per-channel offset so that the channels differ."""
    shape, fmt = LAYOUTS[layout]
    shape = ((shape[0] if n is None else n),) + shape[1:]
    return _arrange(shape, fmt, dtype, loc, scale, seed)


def _arrange(shape, fmt, dtype, loc, scale, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    offset = torch.linspace(-1, 1, c, dtype=F64).view([1, c] + [1] * (len(shape) - 2)) * scale
    x = (torch.randn(shape, generator=g, dtype=F64) * scale + loc + offset).to(dtype)
    if fmt == "view":
        # a view in neither layout: storage (C, N, *, 2 * last) with N and C swapped (and, beyond 2-d, every second
        # element of the last dim)
        if len(shape) == 2:
            out = torch.empty(shape[::-1], dtype=dtype).t()
        else:
            big = (shape[1], shape[0]) + tuple(shape[2:-1]) + (2 * shape[-1],)
            out = torch.empty(big, dtype=dtype).transpose(0, 1)[..., ::2]
        out.copy_(x)
        assert tuple(out.shape) == tuple(shape) and (out.numel() == 0 or not out.is_contiguous())
        return out
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return ops.accumulation_dtype(dtype)


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def sum_tol(dtype: torch.dtype, n: int) -> float:
    """Error bound of an n-term sum in the accumulation dtype, relative to the sum of |terms| (module docstring)."""
    return eps(acc_dtype(dtype)) * (4 * math.sqrt(max(n, 1)) + 4)


def dims_of(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view([1, -1] + [1] * (ndim - 2))


def assert_sums_close(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, tol: float, what: str):
    """|actual - expected| <= tol * scale elementwise (scale: sum of |terms| of each sum)."""
    assert actual.dtype == F64 and actual.shape == expected.shape, (what, actual.dtype, actual.shape)
    s = scale.to(F64).clamp_min(1e-300)  # all-zero terms: both sides must be 0
    torch.testing.assert_close(actual / s, expected / s, rtol=0.0, atol=tol, msg=lambda m: f"{what}: {m}")


def coef_for(x: torch.Tensor, rows: int, seed: int = 1) -> torch.Tensor:
    """Per-channel constants in the accumulation dtype: row 0 is a centre k near each channel's mean (as the layers
    pass it), the other rows O(1) values."""
    g = torch.Generator().manual_seed(seed)
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    if x.numel():
        k = x.to(F64).mean(dims_of(x)) + 0.1 * torch.randn(c, generator=g, dtype=F64)
    else:
        k = torch.randn(c, generator=g, dtype=F64)
    rest = torch.randn(rows - 1, c, generator=g, dtype=F64)
    if rows > 1:
        rest[0] = rest[0].abs() + 0.5  # a scale
    return torch.cat([k[None], rest]).to(acc)


def make_args(name: str, x: torch.Tensor, seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed + 100)
    if name == "batch_stats":
        return (x, x.shape[1])
    if name == "normalize":
        return (x, coef_for(x, 3, seed))
    dy = torch.randn(x.shape, generator=g, dtype=F64).to(x.dtype)
    if name == "backward_stats":
        return (dy, x, coef_for(x, 1, seed)[0])
    return (dy, x, coef_for(x, 4, seed))


# ------------------------------------------------------------------------------------ float64 semantics and checks


def semantics(name: str, args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's documented result computed in float64, and the scale its error is measured against (per element:
    sum of |terms| for sums, the largest intermediate for elementwise ops)."""
    if name == "batch_stats":
        x, c = args
        xd = x.to(F64)
        dims = dims_of(x)
        n = x.numel() // c
        out = torch.zeros(2 + 2 * c, dtype=F64)
        scale = torch.zeros(2 + 2 * c, dtype=F64)
        out[0] = n
        if x.numel():
            out[2:2 + c], out[2 + c:] = xd.sum(dims), xd.square().sum(dims)
            scale[2:2 + c], scale[2 + c:] = xd.abs().sum(dims), xd.square().sum(dims)
        return out, scale
    if name == "normalize":
        x, coef = args
        k, s, h = (per_channel(r.to(F64), x.dim()) for r in coef.unbind(0))
        xc = x.to(F64) - k
        y = xc * s + h
        mag = (xc.abs() * s.abs() + h.abs()).amax() if x.numel() else torch.zeros((), dtype=F64)
        return y, mag
    if name == "backward_stats":
        dy, x, center = args
        dims = dims_of(x)
        g = dy.to(F64)
        t = g * (x.to(F64) - per_channel(center.to(F64), x.dim()))
        return torch.stack([g.sum(dims), t.sum(dims)]), torch.stack([g.abs().sum(dims), t.abs().sum(dims)])
    dy, x, coef = args
    k, a, b, c = (per_channel(r.to(F64), x.dim()) for r in coef.unbind(0))
    xc = x.to(F64) - k
    dx = dy.to(F64) * a + xc * b + c
    mag = ((dy.to(F64) * a).abs() + (xc * b).abs() + c.abs()).amax() if x.numel() else torch.zeros((), dtype=F64)
    return dx, mag


def elementwise_tol(dtype: torch.dtype, magnitude: float) -> tuple[float, float]:
    """(rtol, atol) of an elementwise op against its exact value (module docstring)."""
    return eps(dtype), 8 * eps(acc_dtype(dtype)) * magnitude + torch.finfo(dtype).tiny


def check_against(name: str, args: tuple, actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor,
                  factor: float, what: str) -> None:
    """``actual`` is within ``factor`` times the rounding bound of ``expected`` (factor 2: two approximations)."""
    x = input_of(name, args)
    if name in ("batch_stats", "backward_stats"):
        n = x.numel() // x.shape[1]
        if name == "batch_stats":
            c = x.shape[1]
            # the count and the error flag are exact
            torch.testing.assert_close(actual[:2], expected[:2].to(actual.dtype), rtol=0, atol=0,
                                       msg=lambda m: f"{what}: [n, flag]: {m}")
            # sum x^2 has one more rounding per term (the square): covered by the "+ 4" of sum_tol
            assert_sums_close(actual[2:], expected[2:], scale[2:], factor * sum_tol(x.dtype, n), what)
            assert actual.shape == (2 + 2 * c,)
        else:
            assert_sums_close(actual, expected, scale, factor * sum_tol(x.dtype, n), what)
        return
    rtol, atol = elementwise_tol(x.dtype, float(scale))
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=factor * rtol, atol=factor * atol,
                               msg=lambda m: f"{what}: {m}")


def check_output_meta(name: str, args: tuple, out: torch.Tensor, what: str) -> None:
    x = input_of(name, args)
    c = x.shape[1]
    if name == "batch_stats":
        assert (out.dtype, tuple(out.shape)) == (F64, (2 + 2 * c,)), what
    elif name == "backward_stats":
        assert (out.dtype, tuple(out.shape)) == (F64, (2, c)), what
    else:
        assert out.dtype == x.dtype and out.shape == x.shape, (what, out.dtype, out.shape)
        if x.numel():
            if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
                assert out.is_contiguous(memory_format=torch.channels_last), (what, out.stride())
            elif x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
                assert out.is_contiguous(memory_format=torch.channels_last_3d), (what, out.stride())
            else:
                assert out.is_contiguous(), (what, out.stride())


def input_of(name: str, args: tuple) -> torch.Tensor:
    return args[0] if name in ("batch_stats", "normalize") else args[1]


def kernel(name: str):
    return getattr(torch.ops.syncnorm_cpu, name)


def reference(name: str):
    return getattr(ops, f"{name}_reference")


def run_all(name: str, args: tuple, label: str) -> None:
    """Kernel vs reference, both vs float64 semantics, and the outputs' metadata."""
    out_k = kernel(name)(*args)
    out_r = reference(name)(*args)
    expected, scale = semantics(name, args)
    for out, who in ((out_k, "cpu-kernel"), (out_r, "reference")):
        check_output_meta(name, args, out, f"{label} {who}")
        check_against(name, args, out, expected, scale, 1.0, f"{label} {who} vs float64")
    check_against(name, args, out_k, out_r, scale, 2.0, f"{label} kernel vs reference")
    if out_k.numel():
        assert out_k.stride() == out_r.stride(), (label, out_k.stride(), out_r.stride())
    # the custom op itself (kernel path, the default here) gives the kernel's result
    with ops.use_kernels(True):
        torch.testing.assert_close(getattr(ops, name)(*args), out_k, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------- per-layout checks


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", OPS)
def test_kernel_reference_float64(name, layout, dtype):
    x = make_input(layout, dtype, seed=zlib.crc32(f"{name}-{layout}".encode()) % 1000)
    run_all(name, make_args(name, x), f"{name} {layout} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", OPS)
def test_empty_batch(name, layout, dtype):
    x = make_input(layout, dtype, n=0)
    args = make_args(name, x)
    run_all(name, args, f"{name} {layout} {dtype} N=0")
    out = kernel(name)(*args)
    if name == "batch_stats":
        assert torch.equal(out, torch.zeros(2 + 2 * C, dtype=F64))  # n = 0 and every sum 0
    elif name == "backward_stats":
        assert torch.equal(out, torch.zeros(2, C, dtype=F64))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", OPS)
def test_large_mean(name, layout, dtype):
    """Mean 1e4, unit variance (before rounding to dtype: fp16 / bf16 quantise such data to steps of 8 / 64, and the
    checks are on the rounded values)."""
    x = make_input(layout, dtype, loc=1e4, scale=1.0, seed=3)
    args = make_args(name, x)
    run_all(name, args, f"{name} {layout} {dtype} mean=1e4")
    if name != "batch_stats":
        return
    # the variance derived from the raw sums keeps its digits: sum x^2 - (sum x)^2 / n against a two-pass float64
    xd = x.to(F64)
    dims = dims_of(x)
    n = x.numel() // C
    mean = xd.mean(dims)
    var = (xd - per_channel(mean, x.dim())).square().mean(dims)
    # rtol: the n-term sum of squared deviations in A (each implementation sums around a shift near the data);
    # atol: deriving var from raw fp64 sums of size n * mean^2 cancels about mean^2 / var digits of fp64
    rtol = sum_tol(dtype, n)
    atol = 16 * eps(F64) * float(mean.square().max())
    for out, who in ((kernel(name)(*args), "cpu-kernel"), (reference(name)(*args), "reference")):
        s1, s2 = out[2:2 + C], out[2 + C:]
        got = s2 / n - (s1 / n).square()
        torch.testing.assert_close(got, var, rtol=rtol, atol=atol, msg=lambda m: f"{who} {dtype} {layout} var: {m}")


@pytest.mark.parametrize("layout", ["3d", "nchw", "channels_last", "2d"])
@pytest.mark.parametrize("name", OPS)
def test_two_threads(name, layout):
    """Inputs large enough that at::parallel_for would split the work (grain sizes of 32768 values) over 2 threads.

    (The kernels are built by torch.utils.cpp_extension without -fopenmp, so at::parallel_for in them runs serially
    today; this guards the merge of per-thread partial sums should that change.)"""
    sizes = {"3d": (4, 4, 9000), "nchw": (8, 4, 64, 64), "channels_last": (8, 3, 40, 40), "2d": (12000, 3)}
    fmt = torch.channels_last if layout == "channels_last" else None
    x = _arrange(sizes[layout], fmt, torch.float32, 0.5, 2.0, 11)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_all(name, make_args(name, x), f"{name} {layout} 2 threads")
    finally:
        torch.set_num_threads(previous)


def test_dy_in_another_memory_format():
    """Autograd may hand the backward ops a contiguous dy for a channels_last x (and vice versa)."""
    x = make_input("channels_last", torch.float32, seed=5)
    for name in ("backward_stats", "backward_input"):
        dy, _, consts = make_args(name, x)
        for dy_, x_ in ((dy.contiguous(), x), (dy.contiguous(memory_format=torch.channels_last), x.contiguous())):
            run_all(name, (dy_, x_, consts), f"{name} dy {dy_.stride()} x {x_.stride()}")


# ----------------------------------------------------------------------------------------------------- opcheck

OPCHECK_INPUTS = {
    "fp32-nchw": lambda: make_input("nchw", torch.float32, n=2),
    "fp16-channels_last": lambda: make_input("channels_last", torch.float16, n=2),
    "fp64-2d": lambda: make_input("2d", torch.float64, n=7),
    "bf16-view": lambda: make_input("transposed_view", torch.bfloat16, n=2),
    "fp32-empty-channels_last_3d": lambda: make_input("channels_last_3d", torch.float32, n=0),
}


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernel", "reference"])
@pytest.mark.parametrize("inp", list(OPCHECK_INPUTS))
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, inp, kernels):
    args = make_args(name, OPCHECK_INPUTS[inp]())
    with ops.use_kernels(kernels):
        result = torch.library.opcheck(getattr(ops, name), args)
    assert all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------------------------------------ fake implementations


def _fake_and_real(name: str, args: tuple, kernels: bool):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = getattr(ops, name)
    with ops.use_kernels(kernels):
        real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    return fake, real


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("empty", [False, True], ids=["N>0", "N=0"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", OPS)
def test_fake_matches_real(name, layout, empty, dtype, kernels):
    args = make_args(name, make_input(layout, dtype, n=0 if empty else 2))
    fake, real = _fake_and_real(name, args, kernels)
    assert (fake.shape, fake.dtype, fake.device) == (real.shape, real.dtype, real.device)
    if real.numel():
        assert fake.stride() == real.stride(), (fake.stride(), real.stride())
    # (zero-element outputs: see test_reference_empty_output_strides_match_fake)


@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d"])
def test_reference_empty_output_strides_match_fake(layout):
    # e.g. x of shape (0, 5, 12, 13), strides (780, 1, 65, 5): fake, kernel and reference give (780, 156, 13, 1)
    # (.contiguous() alone would leave an empty tensor's strides as they were)
    x = make_input(layout, torch.float32, n=0)
    args = make_args("normalize", x)
    fake, real = _fake_and_real("normalize", args, kernels=False)
    assert fake.stride() == kernel("normalize")(*args).stride()  # the kernel agrees with the fake
    assert fake.stride() == real.stride(), (fake.stride(), real.stride())


# -------------------------------------------------------------------------------------------- property test

_LAYOUT_KINDS = ["contiguous", "channels_last", "view"]


@st.composite
def inputs(draw):
    n = draw(st.integers(0, 6))
    c = draw(st.integers(1, 5))
    spatial = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=3)))
    kind = draw(st.sampled_from(_LAYOUT_KINDS))
    dtype = draw(st.sampled_from(DTYPES))
    loc = draw(st.sampled_from([0.0, 3.0, -50.0, 1e4]))
    scale = draw(st.sampled_from([1.0, 1e-3, 100.0]))
    seed = draw(st.integers(0, 2**16))
    shape = (n, c) + spatial
    fmt = None
    if kind == "channels_last" and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    elif kind == "view":
        fmt = "view"
    x = _arrange(shape, fmt, dtype, loc, scale, seed)
    return x


_PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                     derandomize=True)


@_PROPERTY
@given(x=inputs())
def test_property_batch_stats_kernel_matches_reference(x):
    args = (x, x.shape[1])
    expected, scale = semantics("batch_stats", args)
    out_k, out_r = kernel("batch_stats")(*args), reference("batch_stats")(*args)
    check_against("batch_stats", args, out_k, out_r, scale, 2.0, "kernel vs reference")
    check_against("batch_stats", args, out_k, expected, scale, 1.0, "kernel vs float64")


@_PROPERTY
@given(x=inputs(), seed=st.integers(0, 1000))
def test_property_normalize_kernel_matches_reference(x, seed):
    args = (x, coef_for(x, 3, seed))
    expected, scale = semantics("normalize", args)
    out_k, out_r = kernel("normalize")(*args), reference("normalize")(*args)
    check_output_meta("normalize", args, out_k, "kernel")
    check_against("normalize", args, out_k, out_r, scale, 2.0, "kernel vs reference")
    check_against("normalize", args, out_k, expected, scale, 1.0, "kernel vs float64")
    if out_k.numel():
        assert out_k.stride() == out_r.stride()


# ------------------------------------------------------------------------------------------------------ routing


@pytest.mark.parametrize("name", OPS)
def test_use_kernels_false_routes_to_reference(name, monkeypatch):
    """The custom op calls torch.ops.syncnorm_cpu.<name> while kernels are enabled and never when they are not."""
    calls: list[str] = []
    real_kernel = kernel(name)

    def spy(*args):
        calls.append(name)
        return real_kernel(*args)

    monkeypatch.setattr(torch.ops.syncnorm_cpu, name, spy)
    # fp32 with enough values that the two implementations round differently: the results tell them apart too
    args = make_args(name, make_input("3d", torch.float32, seed=9))
    op = getattr(ops, name)

    with ops.use_kernels(True):
        assert ops.kernels_enabled()
        out = op(*args)
    assert calls == [name], "the spy does not see the kernel: this test could not detect wrong routing"
    assert torch.equal(out, real_kernel(*args))

    calls.clear()
    with ops.use_kernels(False):
        assert not ops.kernels_enabled()
        out = op(*args)
    assert calls == [], "use_kernels(False) still called the C++ kernel"
    assert torch.equal(out, reference(name)(*args))
    assert ops.kernels_enabled()  # restored on exit


def test_set_kernels_enabled_returns_previous():
    before = ops.kernels_enabled()
    try:
        assert ops.set_kernels_enabled(False) is before
        assert ops.set_kernels_enabled(True) is False
        assert ops.kernels_enabled()
    finally:
        ops.set_kernels_enabled(before)


# ------------------------------------------------------------------------------------------- forward_epilogue

def epilogue_case(*, prior: bool, affine: bool, running: bool, momentum, renorm: bool, n: int = 9, flag: float = 0.0,
                  compute_dtype=torch.float32, running_dtype=torch.float32, seed: int = 0, loc: float = 3.0) -> dict:
    """Raw data of a forward_epilogue call: this step's (global) batch ``x`` (n, C) and the prior's values ``p``, the
    summed vector and the prior moments built from them, parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, generator=g, dtype=F64) * 2 + loc
    p = torch.randn(4, C, generator=g, dtype=F64) * 1.5 - 1 + (loc - 3.0)
    total = torch.zeros(2 + 2 * C, dtype=F64)
    total[0], total[1] = n, flag
    total[2:2 + C], total[2 + C:] = x.sum(0), x.square().sum(0)
    prior_t = None
    if prior:
        pm = p.mean(0)
        prior_t = torch.stack([torch.full((C,), float(p.shape[0]), dtype=F64), pm, (p - pm).square().sum(0)])
    args = {
        "total": total, "prior": prior_t,
        "weight": (torch.rand(C, generator=g) + 0.5) if affine else None,
        "bias": torch.randn(C, generator=g) if affine else None,
        "running_mean": (torch.randn(C, generator=g) * 0.5).to(running_dtype) if running else None,
        "running_var": (torch.rand(C, generator=g) + 0.5).to(running_dtype) if running else None,
        "num_batches_tracked": torch.tensor(3) if running else None,
        "eps": 1e-5, "momentum": momentum, "renorm": renorm, "r_max": 1.25, "d_max": 0.5,
        "compute_dtype": compute_dtype,
    }
    return {"x": x, "p": p, "args": args}


def epilogue_call(fn, case: dict):
    """Call ``fn`` on a copy of the case's arguments; returns its outputs and the running statistics after."""
    a = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case["args"].items()}
    out = fn(*a.values())
    return out, (a["running_mean"], a["running_var"], a["num_batches_tracked"])


EPILOGUE_CASES = {
    "plain": {"prior": False, "affine": True, "running": True, "momentum": 0.1, "renorm": False},
    "no-affine-no-running": {"prior": False, "affine": False, "running": False, "momentum": 0.1, "renorm": False},
    "prior": {"prior": True, "affine": True, "running": True, "momentum": 0.1, "renorm": False},
    "renorm": {"prior": False, "affine": True, "running": True, "momentum": 0.1, "renorm": True},
    "renorm-prior-cumulative": {"prior": True, "affine": True, "running": True, "momentum": None, "renorm": True},
    "fp64": {"prior": True, "affine": True, "running": True, "momentum": 0.1, "renorm": True,
             "compute_dtype": F64, "running_dtype": F64},
    "fp16-running": {"prior": False, "affine": True, "running": True, "momentum": None, "renorm": True,
                     "running_dtype": torch.float16},
    "empty-batch": {"prior": True, "affine": True, "running": True, "momentum": 0.1, "renorm": True, "n": 0},
    "one-value": {"prior": False, "affine": True, "running": True, "momentum": 0.1, "renorm": False, "n": 1},
    "peer-flag": {"prior": False, "affine": True, "running": True, "momentum": None, "renorm": False, "flag": 1.0},
}


@pytest.mark.parametrize("case", list(EPILOGUE_CASES))
def test_forward_epilogue_semantics(case):
    """The reference against first principles in float64: the moments of the concatenated values (prior's and
    batch's), Batch Renorm's r and d, BatchNorm's constants, and the running statistics exactly as
    ``F.batch_norm(training=True)`` updates them on the batch (nothing updated for a step that raises)."""
    spec = EPILOGUE_CASES[case]
    c = epilogue_case(**spec)
    a = c["args"]
    (coef, stats, counts), (rm, rv, nbt) = epilogue_call(ops.forward_epilogue_reference, c)
    x, p = c["x"], c["p"]
    used = torch.cat([p, x]) if spec["prior"] else x
    n, nu = x.shape[0], used.shape[0]
    assert counts.tolist() == [n, spec.get("flag", 0.0), nu]
    tol = {"rtol": 1e-12, "atol": 1e-12}
    mean_u = used.mean(0) if nu else torch.zeros(C, dtype=F64)
    m2_u = (used - mean_u).square().sum(0)
    torch.testing.assert_close(stats[2], mean_u, **tol)
    torch.testing.assert_close(stats[3], m2_u, **tol)
    invstd = torch.rsqrt(m2_u / max(nu, 1) + a["eps"])
    torch.testing.assert_close(stats[4], invstd, **tol)
    r, d = torch.ones(C, dtype=F64), torch.zeros(C, dtype=F64)
    if spec["renorm"]:
        mean_b = x.mean(0) if n else torch.zeros(C, dtype=F64)
        var_b = x.var(0, unbiased=False) if n else torch.zeros(C, dtype=F64)
        sigma = torch.sqrt(a["running_var"].to(F64) + a["eps"])
        r = (torch.sqrt(var_b + a["eps"]) / sigma).clamp(1 / a["r_max"], a["r_max"])
        d = ((mean_b - a["running_mean"].to(F64)) / sigma).clamp(-a["d_max"], a["d_max"])
        assert ((r == a["r_max"]) | (r == 1 / a["r_max"])).any() or n == 0, "the case clips nothing"
    torch.testing.assert_close(stats[6], r, **tol)
    torch.testing.assert_close(stats[7], d, **tol)
    w = torch.ones(C, dtype=F64) if a["weight"] is None else a["weight"].to(F64)
    b = torch.zeros(C, dtype=F64) if a["bias"] is None else a["bias"].to(F64)
    # y = (x - mean) * invstd * w * r + w * d + b  ==  (x - k) * s + h
    cd = spec.get("compute_dtype", torch.float32)
    s, h = w * r * invstd, b + w * d - (mean_u - coef[0].to(F64)) * w * r * invstd
    ctol = {"rtol": 2 * eps(cd), "atol": 2 * eps(cd) * float(h.abs().max())}
    torch.testing.assert_close(coef[0].to(F64), mean_u, rtol=eps(cd), atol=tol["atol"])  # k: the mean, rounded
    torch.testing.assert_close(coef[1].to(F64), s, **ctol)
    torch.testing.assert_close(coef[2].to(F64), h, **ctol)
    if a["running_mean"] is None:
        return
    ref_rm, ref_rv = a["running_mean"].clone(), a["running_var"].clone()
    raises = spec.get("flag", 0.0) > 0 or nu == 1
    if n and not raises:
        momentum = spec["momentum"] if spec["momentum"] is not None else 1.0 / (int(a["num_batches_tracked"]) + 1)
        torch.nn.functional.batch_norm(x.to(ref_rm.dtype), ref_rm, ref_rv, training=True, momentum=momentum)
    rdt = ref_rm.dtype
    torch.testing.assert_close(rm, ref_rm, rtol=2 * eps(rdt), atol=2 * eps(rdt))
    torch.testing.assert_close(rv, ref_rv, rtol=2 * eps(rdt), atol=2 * eps(rdt))
    assert int(nbt) == 3 + (1 if n and not raises else 0)


@pytest.mark.parametrize("case", ["plain", "renorm-prior-cumulative", "no-affine-no-running"])
def test_forward_epilogue_opcheck(case):
    c = epilogue_case(**EPILOGUE_CASES[case])
    result = torch.library.opcheck(ops.forward_epilogue, tuple(c["args"].values()))
    assert all(v == "SUCCESS" for v in result.values()), result


# ---------------------------------------------------------------------------------------------------- cbn_prior

CBN_PRIOR_CASES = {
    "compensated": dict(slots=3, compensate=True, active=True),
    "as-recorded": dict(slots=3, compensate=False, active=True),
    "burn-in": dict(slots=3, compensate=True, active=False),
    "one-slot": dict(slots=1, compensate=True, active=True),
    "many-channels": dict(slots=2, compensate=True, active=True, channels=300),
    "many-slots": dict(slots=7, compensate=True, active=True),
}


def cbn_prior_case(*, slots: int, compensate: bool, active: bool, channels: int = 5, seed: int = 3) -> dict:
    """Arguments of ops.cbn_prior: slots with uneven counts, one never written (count 0) and holding NaN (it must not
    leak into the pool), one not compensable; the data's mean (40) far larger than its spread (the m2 about the
    pooled mean must keep its digits)."""
    g = torch.Generator().manual_seed(seed)
    S, C = slots, channels
    count = torch.tensor([6.0, 0.0, 11.0, 3.0, 1.0, 8.0, 2.0][:S], dtype=F64)
    mean = 40 + torch.randn(S, C, generator=g, dtype=F64)
    var = torch.rand(S, C, generator=g, dtype=F64) + 0.5
    mean_at = torch.randn(S, C, generator=g, dtype=F64)
    var_at = torch.randn(S, C, generator=g, dtype=F64) * 0.1
    compensable = torch.tensor([True, True, False, True, True, False, True][:S])
    if S > 1:
        mean[1], var[1] = float("nan"), float("nan")
    w_mean = w_var = None
    if compensate:
        w_mean = mean_at + 0.3 * torch.randn(S, C, generator=g, dtype=F64)
        w_var = var_at + 0.05 * torch.randn(S, C, generator=g, dtype=F64)
    step = torch.tensor(7 if active else 2, dtype=torch.long)
    return dict(count=count, mean=mean, var=var, mean_at=mean_at, var_at=var_at, compensable=compensable,
                w_mean=w_mean, w_var=w_var, step=step, burn_in=5)


@pytest.mark.parametrize("case", list(CBN_PRIOR_CASES))
def test_cbn_prior_from_first_principles(case):
    """The pooled prior is the exact union (Chan's merge) of the slots of nonzero count, each compensated slot moved
    by the first-order change of its mean and variance; nothing while the step counter is below burn_in."""
    a = cbn_prior_case(**CBN_PRIOR_CASES[case])
    got = ops.cbn_prior(*a.values())
    C = a["mean"].shape[1]
    parts = [Moments.empty(C)]
    for s in range(a["mean"].shape[0]):
        n = float(a["count"][s])
        if n == 0 or int(a["step"]) < a["burn_in"]:
            continue
        mean, var = a["mean"][s].clone(), a["var"][s].clone()
        if a["w_mean"] is not None and bool(a["compensable"][s]):
            d_mean = a["w_mean"][s] - a["mean_at"][s]
            d_var = a["w_var"][s] - a["var_at"][s]
            mean, var = mean + d_mean, (var + d_var - d_mean ** 2).clamp_min(0)
        parts.append(Moments.from_mean_var(n, mean, var))
    want = merge_all(parts)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], want.count.expand(C), rtol=0, atol=0)
    torch.testing.assert_close(got[1], want.mean, rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(got[2], want.m2, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("case", ["compensated", "as-recorded"])
def test_cbn_prior_opcheck(case):
    a = cbn_prior_case(**CBN_PRIOR_CASES[case])
    result = torch.library.opcheck(ops.cbn_prior, tuple(a.values()))
    assert all(v == "SUCCESS" for v in result.values()), result


CBN_RECORD_CASES = {
    "compensated": dict(compensate=True),
    "as-recorded": dict(compensate=False),
    "wraps": dict(compensate=True, next_slot=2, filled=3),
    "empty-batch": dict(compensate=True, count=0.0),
    "before-burn-in": dict(compensate=True, step=1),
    "bf16-derivatives": dict(compensate=True, deriv_dtype=torch.bfloat16),
    "one-slot": dict(compensate=True, slots=1, next_slot=0, filled=1),
}


def cbn_record_case(*, compensate: bool, slots: int = 3, next_slot: int = 1, filled: int = 1, count: float = 12.0,
                    step: int = 9, deriv_dtype=torch.float32, channels: int = 6, groups: int = 2, k: int = 5,
                    seed: int = 4) -> dict:
    """Arguments of ops.cbn_record: a history of 3 slots (burn_in 5: the steps from 3 on record) already holding
    data, and one step's values."""
    g = torch.Generator().manual_seed(seed)
    S, C = slots, channels
    r = lambda *shape, dtype=F64: torch.randn(*shape, generator=g, dtype=F64).to(dtype)  # noqa: E731
    history = dict(
        history_count=torch.tensor([5.0, 7.0, 9.0][:S], dtype=F64), history_mean=r(S, C), history_var=r(S, C).abs(),
        history_mean_at=r(S, C), history_var_at=r(S, C), history_compensable=torch.tensor([True, False, True][:S]),
        history_dmean=r(S, groups, k, dtype=deriv_dtype), history_dvar=r(S, C, k, dtype=deriv_dtype),
        history_next=torch.tensor(next_slot), history_filled=torch.tensor(filled))
    values = dict(step=torch.tensor(step), count=torch.tensor(count, dtype=F64), mean=r(C), m2=r(C).abs() * count,
                  dmean=r(groups, k).to(deriv_dtype) if compensate else None,
                  dvar=r(C, k).to(deriv_dtype) if compensate else None,
                  w_mean=r(C) if compensate else None, w_var=r(C) if compensate else None, burn_in=5)
    return {**history, **values}


def cbn_record_expected(a: dict) -> dict:
    """What ops.cbn_record must leave in the buffers, written out slot by slot."""
    out = {k: v.clone() for k, v in a.items() if k.startswith("history_")}
    S = out["history_count"].shape[0]
    if not (int(a["step"]) >= a["burn_in"] - S and float(a["count"]) > 0):
        return out
    i = int(a["history_next"])
    out["history_count"][i] = a["count"]
    out["history_mean"][i] = a["mean"]
    out["history_var"][i] = a["m2"] / a["count"]
    compensate = a["dmean"] is not None
    out["history_compensable"][i] = compensate
    out["history_mean_at"][i] = a["w_mean"] if compensate else 0.0
    out["history_var_at"][i] = a["w_var"] if compensate else 0.0
    if compensate:
        out["history_dmean"][i] = a["dmean"]
        out["history_dvar"][i] = a["dvar"]
    out["history_next"].fill_((i + 1) % S)
    out["history_filled"].fill_(min(int(a["history_filled"]) + 1, S))
    return out


@pytest.mark.parametrize("case", list(CBN_RECORD_CASES))
def test_cbn_record_writes_one_slot(case):
    a = cbn_record_case(**CBN_RECORD_CASES[case])
    want = cbn_record_expected(a)
    ops.cbn_record(*a.values())
    for name, value in want.items():
        torch.testing.assert_close(a[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case", ["compensated", "as-recorded"])
def test_cbn_record_opcheck(case):
    a = cbn_record_case(**CBN_RECORD_CASES[case])
    result = torch.library.opcheck(ops.cbn_record, tuple(a.values()))
    assert all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------------------ backward_reduce and backward_apply

def backward_case(x: torch.Tensor, seed: int = 1) -> dict:
    """dy, the forward epilogue's stats (mean near the data's, invstd, scale), the centre (the mean rounded to the
    accumulation dtype), a summed total (this batch's sums, times 3: three ranks alike) and its count."""
    g = torch.Generator().manual_seed(seed + 200)
    c = x.shape[1]
    dy = torch.randn(x.shape, generator=g, dtype=F64).to(x.dtype)
    stats = torch.randn(8, c, generator=g, dtype=F64)
    mean = x.to(F64).mean(dims_of(x)) if x.numel() else torch.zeros(c, dtype=F64)
    stats[2] = mean + 0.01 * torch.randn(c, generator=g, dtype=F64)
    stats[4] = torch.rand(c, generator=g, dtype=F64) + 0.5
    stats[5] = torch.rand(c, generator=g, dtype=F64) + 0.5
    center = stats[2].to(acc_dtype(x.dtype))
    n = x.numel() // c
    total = torch.cat([torch.randn(c, generator=g, dtype=F64), torch.randn(c, generator=g, dtype=F64)]) * n
    return {"dy": dy, "x": x, "center": center, "stats": stats, "total": total,
            "count": torch.tensor(float(3 * n), dtype=F64)}


def backward_reduce_semantics(b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """[sum dy, sum dy * (x - mean) * invstd] in float64, and the error scale of each sum (module docstring: the
    sum of |terms|, of the sums around k and of the (mean - k) correction)."""
    x, dims = b["x"], dims_of(b["x"])
    mean, invstd = b["stats"][2], b["stats"][4]
    g = b["dy"].to(F64)
    xc = x.to(F64) - per_channel(b["center"].to(F64), x.dim())
    exact = torch.cat([g.sum(dims), (g * (x.to(F64) - per_channel(mean, x.dim()))).sum(dims) * invstd])
    shift = (mean - b["center"].to(F64)).abs()
    scale = torch.cat([g.abs().sum(dims), ((g * xc).abs().sum(dims) + shift * g.abs().sum(dims)) * invstd])
    return exact, scale


def backward_apply_semantics(b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = s * (dy - (sum dy + x_hat * sum dy x_hat) / n) in float64, and the largest intermediate."""
    x, c = b["x"], b["x"].shape[1]
    mean, invstd, s = (per_channel(b["stats"][i], x.dim()) for i in (2, 4, 5))
    t1, t2 = (per_channel(t, x.dim()) for t in (b["total"][:c], b["total"][c:]))
    n = max(float(b["count"]), 1.0)
    xhat = (x.to(F64) - mean) * invstd
    dy = b["dy"].to(F64)
    dx = s * (dy - (t1 + xhat * t2) / n)
    mag = ((dy * s).abs() + (s * xhat * t2 / n).abs() + (s * t1 / n).abs()).amax() if x.numel() else \
        torch.zeros((), dtype=F64)
    return dx, mag


def reduce_args(b: dict, renorm: bool = False, weight_dtype=torch.float32, bias_dtype=torch.float32) -> tuple:
    return (b["dy"], b["x"], b["center"], b["stats"], renorm, weight_dtype, bias_dtype)


def apply_args(b: dict) -> tuple:
    return (b["dy"], b["x"], b["total"], b["center"], b["stats"], b["count"])


def check_backward_pair(reduce_fn, apply_fn, b: dict, label: str) -> None:
    """``reduce_fn`` / ``apply_fn`` (an implementation of backward_reduce / backward_apply) against float64: the
    packed sums, the parameter gradients (plain and Batch Renorm's, in fp32 and fp64), dx."""
    x = b["x"]
    C, n = x.shape[1], x.numel() // x.shape[1]
    exact, scale = backward_reduce_semantics(b)
    r, d = b["stats"][6], b["stats"][7]
    for renorm, pdt in ((False, torch.float32), (True, F64)):
        out, dw, db = reduce_fn(*reduce_args(b, renorm, pdt, pdt))
        assert out.dtype == F64 and out.shape == (2 * C,), (label, out.dtype, out.shape)
        # the (mean - k) correction adds one fp64 product per channel: within the "+ 4" of sum_tol
        assert_sums_close(out, exact, scale, sum_tol(x.dtype, n), f"{label} backward_reduce")
        assert dw.dtype == db.dtype == pdt and dw.shape == db.shape == (C,), (label, dw.dtype, db.dtype)
        want_dw = exact[C:] * r + exact[:C] * d if renorm else exact[C:]
        dw_scale = scale[C:] * r.abs() + scale[:C] * d.abs() if renorm else scale[C:]
        # + the rounding to the parameters' dtype
        tol = sum_tol(x.dtype, n) + (eps(pdt) if pdt != F64 else 0.0)
        assert_sums_close(dw.to(F64), want_dw, dw_scale, tol, f"{label} d_weight renorm={renorm}")
        assert_sums_close(db.to(F64), exact[:C], scale[:C], tol, f"{label} d_bias")
    dx = apply_fn(*apply_args(b))
    exact, mag = backward_apply_semantics(b)
    check_output_meta("backward_input", (b["dy"], x, None), dx, f"{label} backward_apply")
    rtol, atol = elementwise_tol(x.dtype, float(mag))
    torch.testing.assert_close(dx.to(F64), exact, rtol=rtol, atol=atol, msg=lambda m: f"{label} backward_apply: {m}")


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernel", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_reduce_and_apply(layout, dtype, kernels):
    """The two backward ops the layers run (the data passes of backward_stats / backward_input with their O(C)
    packing and constants), on the C++ path and the reference, against float64; an empty batch gives zeros."""
    for n in (None, 0):
        b = backward_case(make_input(layout, dtype, n=n, seed=zlib.crc32(layout.encode()) % 1000))
        with ops.use_kernels(kernels):
            check_backward_pair(ops.backward_reduce, ops.backward_apply, b, f"{layout} {dtype} N={n}")


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernel", "reference"])
@pytest.mark.parametrize("inp", list(OPCHECK_INPUTS))
def test_backward_reduce_and_apply_opcheck(inp, kernels):
    b = backward_case(OPCHECK_INPUTS[inp]())
    with ops.use_kernels(kernels):
        for op, args in ((ops.backward_reduce, reduce_args(b)), (ops.backward_reduce, reduce_args(b, True, F64)),
                         (ops.backward_apply, apply_args(b))):
            result = torch.library.opcheck(op, args)
            assert all(v == "SUCCESS" for v in result.values()), (op, result)
