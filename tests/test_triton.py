"""The Triton kernels of :mod:`syncnorm.triton_ops`, run on CPU tensors by Triton's interpreter.

For every op, layout ((N, C), (N, C, L), NCHW, channels_last, NCDHW, channels_last_3d, a view in neither layout),
dtype (fp32, fp16, bf16, fp64) and batch (normal, empty, mean 1e4):

- the Triton launcher against the reference implementation (``ops.*_reference``),
- both against a float64 computation of what the op's docstring says it computes,
- output dtype, shape and strides (equal to the reference's),

each with the default block sizes and with tiny ones (so that small shapes take several tiles per program, several
row programs, a partial last channel block and several passes of the second reduction kernel); plus the routing of
the custom ops (``ops.use_triton``, ``SYNCNORM_KERNELS``, ``SYNCNORM_CPU_EXT=0``, the CUDA registration, a missing
``triton``), ``torch.library.opcheck`` with the Triton kernels forced, every kernel call of the launchers compiled for
sm_90 (no GPU needed: what the interpreter cannot catch), and ONE 2-rank gloo world that trains SyncBatchNorm,
BatchRenorm, CrossMiniBatchNorm and CrossIterationBatchNorm on the Triton kernels against float64 references.

Skipped only when ``triton`` cannot be imported. Nothing here runs on a GPU.

TRITON_INTERPRET
----------------
Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` *decorates* a function (``triton.knobs.runtime.interpret``,
triton 3.8): setting it afterwards changes nothing for functions already decorated, and nothing else in a process
that decorates no new ones. That includes triton.language's own ``@jit`` helpers (``tl.sum``, ``tl.zeros``, ...),
decorated when triton is imported, which an interpreted kernel cannot call when they were compiled; the kernels of
:mod:`syncnorm.triton_ops` call builtins only, so the variable matters at the import of that module alone, whenever
triton itself was imported. So this module never sets it for the whole process:
:func:`triton_ops_module` imports a fresh ``syncnorm.triton_ops`` with ``TRITON_INTERPRET=1`` set only during that
import, and puts back whatever module was there before when the block ends (the module-scoped fixture below does
this for every test here, the spawned ranks do it themselves). Other test files in the same pytest process, e.g.
``tests/test_cuda.py`` on a GPU machine, keep the compiled kernels.

Tolerances
----------
Those of ``tests/test_ops.py`` (its module docstring derives them), applied by its ``check_against``:

- sums (``batch_stats``, ``backward_stats``): ``|error| <= eps_A * (4 sqrt(n) + 4) * sum|terms|`` per channel, with
  ``eps_A`` the machine epsilon of the accumulation dtype (fp32 for fp16/bf16/fp32 input, fp64 for fp64) and ``n``
  the number of values per channel. The Triton kernels add each lane's tiles serially in ``A`` (at most
  ``_MAX_TILES_PER_PROGRAM`` of them), reduce the lanes by a tree in ``A``, then add the per-program partials in fp64:
  an order of additions like the others';
- the count and the error flag of ``batch_stats`` are exact (rtol = atol = 0);
- elementwise outputs (``normalize``, ``backward_input``): ``rtol = eps_out``, ``atol = 8 eps_A * max|intermediate|
  + finfo(out).tiny`` (a GPU may contract ``(x - k) * s + h`` into an FMA: one rounding fewer, within the bound);
- Triton against the reference: twice the bound (both are within it of the exact value);
- mean-1e4 batches: the variance ``sum x^2 / n - (sum x / n)^2`` from the raw sums against a two-pass float64 one with
  ``rtol = eps_A * (4 sqrt(n) + 4)``, ``atol = 16 eps_64 * mean^2`` (as in test_ops.py).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="triton cannot be imported")

import syncnorm  # noqa: E402
from syncnorm import ops  # noqa: E402
from tests.dist.harness import run_distributed  # noqa: E402
from tests.test_ops import (  # noqa: E402
    CBN_PRIOR_CASES,
    CBN_RECORD_CASES,
    EPILOGUE_CASES,
    cbn_prior_case,
    cbn_record_case,
    cbn_record_expected,
    apply_args,
    backward_case,
    check_backward_pair,
    reduce_args,
    epilogue_call,
    epilogue_case,
    F64,
    _arrange,
    check_against,
    check_output_meta,
    dims_of,
    eps,
    make_args,
    per_channel,
    semantics,
    sum_tol,
)

OPS = ["batch_stats", "normalize", "backward_stats", "backward_input"]
# the ops a layer's training step runs (the Triton launchers the 2-rank world counts)
LAYER_OPS = ["batch_stats", "forward_epilogue", "normalize", "backward_reduce", "backward_apply", "cbn_prior",
             "cbn_record"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
C = 5

# name -> (shape, memory format or "view"); odd sizes, none a multiple of a block size
LAYOUTS = {
    "2d": ((37, C), None),
    "3d": ((3, C, 11), None),
    "nchw": ((3, C, 7, 9), None),
    "channels_last": ((3, C, 6, 7), torch.channels_last),
    "ncdhw": ((2, C, 3, 4, 5), None),
    "channels_last_3d": ((2, C, 3, 4, 5), torch.channels_last_3d),
    "view": ((3, C, 5, 7), "view"),  # (C, N, 5, 14).transpose(0, 1)[..., ::2]: neither layout, made contiguous
}

# module constants of syncnorm.triton_ops -> values small enough that the shapes above take several tiles per program,
# several row programs, a partial last channel block and several passes of the second kernel over the partials
TINY_BLOCKS = {"_TILE": 16, "_MAX_BLOCK_R": 8, "_MAX_BLOCK_C": 4, "_TARGET_PROGRAMS": 8, "_MAX_TILES_PER_PROGRAM": 2,
               "_FINISH_BLOCK_P": 4, "_FINISH_BLOCK_C": 2}
TINY_BLOCK_DTYPES = (torch.float32, torch.bfloat16)


@contextlib.contextmanager
def triton_ops_module(interpret: bool = True):
    """A fresh ``syncnorm.triton_ops``, imported with ``TRITON_INTERPRET=1`` (or without it) in the environment, is
    the module the custom ops use within the block; the environment is restored right after the import, and the
    module imported before (if any) is put back at the end."""
    name = "syncnorm.triton_ops"
    saved_module = sys.modules.pop(name, None)
    saved_attr = syncnorm.__dict__.pop("triton_ops", None)
    saved_env = os.environ.get("TRITON_INTERPRET")
    try:
        if interpret:
            os.environ["TRITON_INTERPRET"] = "1"
        else:
            os.environ.pop("TRITON_INTERPRET", None)
        try:
            module = importlib.import_module(name)
        finally:
            if saved_env is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved_env
        yield module
    finally:
        sys.modules.pop(name, None)
        syncnorm.__dict__.pop("triton_ops", None)
        if saved_module is not None:
            sys.modules[name] = saved_module
            syncnorm.triton_ops = saved_attr


@pytest.fixture(scope="module", autouse=True)
def tops():
    """The interpreted syncnorm.triton_ops, for this module's tests."""
    with triton_ops_module(interpret=True) as module:
        assert module.available() and module.interpreted()
        yield module


# (block configuration, dtype): every dtype with the default blocks; the tiny blocks with fp32 and bf16 only (the loops
# do not depend on the dtype, bf16 covers the 16-bit loads and stores; this keeps the interpreter's time down)
BLOCKS_DTYPES = (
    [pytest.param("default-blocks", dt, id=f"default-blocks-{i}") for dt, i in zip(DTYPES, DTYPE_IDS)]
    + [pytest.param("tiny-blocks", dt, id=f"tiny-blocks-{i}") for dt, i in zip(DTYPES, DTYPE_IDS)
       if dt in TINY_BLOCK_DTYPES])


def use_blocks(tops, monkeypatch, blocks: str) -> None:
    if blocks == "tiny-blocks":
        for key, value in TINY_BLOCKS.items():
            monkeypatch.setattr(tops, key, value)


def make_input(layout: str, dtype: torch.dtype, n: int | None = None, *, loc: float = 0.0, seed: int = 0):
    shape, fmt = LAYOUTS[layout]
    shape = ((shape[0] if n is None else n),) + shape[1:]
    return _arrange(shape, fmt, dtype, loc, 1.0, seed)


def launcher(tops, name: str):
    return getattr(tops, f"{name}_triton")


def run_all(tops, name: str, args: tuple, label: str) -> torch.Tensor:
    """Triton vs reference, both vs float64 semantics, output metadata and strides; returns Triton's output."""
    out_t = launcher(tops, name)(*args)
    out_r = getattr(ops, f"{name}_reference")(*args)
    expected, scale = semantics(name, args)
    for out, who in ((out_t, "triton"), (out_r, "reference")):
        check_output_meta(name, args, out, f"{label} {who}")
        check_against(name, args, out, expected, scale, 1.0, f"{label} {who} vs float64")
    check_against(name, args, out_t, out_r, scale, 2.0, f"{label} triton vs reference")
    assert (out_t.shape, out_t.dtype, out_t.device) == (out_r.shape, out_r.dtype, out_r.device), label
    if out_t.numel():
        assert out_t.stride() == out_r.stride(), (label, out_t.stride(), out_r.stride())
    return out_t


# ------------------------------------------------------------------------------------------------ kernel checks


@pytest.mark.parametrize("blocks, dtype", BLOCKS_DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", OPS)
def test_triton_reference_float64(tops, monkeypatch, blocks, name, layout, dtype):
    use_blocks(tops, monkeypatch, blocks)
    x = make_input(layout, dtype, seed=len(name) * 7 + len(layout))
    run_all(tops, name, make_args(name, x), f"{name} {layout} {dtype} {blocks}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", OPS)
def test_empty_batch(tops, name, layout):
    for dtype in DTYPES:
        x = make_input(layout, dtype, n=0)
        args = make_args(name, x)
        out = run_all(tops, name, args, f"{name} {layout} {dtype} N=0")
        if name == "batch_stats":
            assert torch.equal(out, torch.zeros(2 + 2 * C, dtype=F64))
        elif name == "backward_stats":
            assert torch.equal(out, torch.zeros(2, C, dtype=F64))
        else:
            # the strides the fake implementation gives (an empty tensor keeps any strides under .contiguous())
            assert out.stride() == torch.empty_like(x, memory_format=ops._memory_format(x)).stride()


@pytest.mark.parametrize("blocks, dtype", BLOCKS_DTYPES)
@pytest.mark.parametrize("layout", ["2d", "nchw", "channels_last", "ncdhw", "channels_last_3d"])
def test_batch_stats_large_mean(tops, monkeypatch, blocks, layout, dtype):
    """Mean 1e4, unit variance: the variance from the raw sums keeps fp32-level accuracy (the kernels sum around
    each channel's first value)."""
    use_blocks(tops, monkeypatch, blocks)
    x = make_input(layout, dtype, loc=1e4, seed=3)
    args = (x, C)
    out = run_all(tops, "batch_stats", args, f"batch_stats {layout} {dtype} mean=1e4 {blocks}")
    xd = x.to(F64)
    dims = dims_of(x)
    n = x.numel() // C
    mean = xd.mean(dims)
    var = (xd - per_channel(mean, x.dim())).square().mean(dims)
    s1, s2 = out[2:2 + C], out[2 + C:]
    got = s2 / n - (s1 / n).square()
    torch.testing.assert_close(got, var, rtol=sum_tol(dtype, n), atol=16 * eps(F64) * float(mean.square().max()))


def test_dy_in_another_memory_format(tops):
    """Autograd may hand the backward ops a dy in another layout than x: the launchers bring it to x's."""
    for dtype in (torch.float32, torch.bfloat16):
        x = make_input("channels_last", dtype, seed=5)
        for name in ("backward_stats", "backward_input"):
            dy, _, consts = make_args(name, x)
            for dy_, x_ in ((dy.contiguous(), x), (dy.contiguous(memory_format=torch.channels_last), x.contiguous()),
                            (dy.to(F64), x)):  # and a dy in another dtype
                run_all(tops, name, (dy_, x_, consts), f"{name} {dtype} dy {dy_.stride()} x {x_.stride()}")


def test_tiny_blocks_exercise_every_loop(tops, monkeypatch):
    """The tiny-block configuration really takes the paths it is meant to (for the NCHW and channels_last shapes)."""
    for key, value in TINY_BLOCKS.items():
        monkeypatch.setattr(tops, key, value)
    for layout in ("nchw", "channels_last"):
        x = make_input(layout, torch.float32)
        plan = tops._plan(x, ops._memory_format(x))
        assert plan.channel_blocks > 1 and C % plan.block_c != 0, plan  # a partial last channel block
        assert plan.programs > TINY_BLOCKS["_FINISH_BLOCK_P"], plan  # several passes over the partials
        assert plan.num_tiles > plan.programs > 1, plan  # several tiles per program, several programs
        assert plan.rows % plan.block_r != 0, plan  # a partial last tile


@pytest.mark.parametrize("shape, fmt", [((32, 64, 112, 112), None), ((32, 64, 112, 112), torch.channels_last),
                                        ((2, 256, 200, 304), None), ((2, 256, 200, 304), torch.channels_last),
                                        ((4096, 1000), None), ((8, 512, 4, 4, 4), torch.channels_last_3d)])
def test_plan_for_large_gpu_shapes(tops, shape, fmt):
    """The grid of a large input (planned from its shape only; nothing is allocated): enough programs for a GPU
    with 132 SMs, bounded work per program, tiles of about _TILE elements, a grid within CUDA's limits."""
    x = torch.empty(shape, device="meta")
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    plan = tops._plan(x, ops._memory_format(x))
    assert plan.channel_blocks * plan.programs >= min(1024, plan.channel_blocks * plan.num_tiles), plan
    assert plan.num_tiles <= plan.programs * tops._MAX_TILES_PER_PROGRAM, plan
    assert plan.block_r * plan.block_c == tops._TILE, plan
    assert plan.programs <= 65535 and not plan.wide, plan
    # the contiguous axis of the tile is the one whose stride is 1
    assert (plan.stride_row == 1) == (fmt is None and len(shape) > 2), plan


# ------------------------------------------------------------------------ compiled for a GPU (no GPU needed)


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of running."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, grid, args, kwargs))


def _compile_for_sm90(kernel, args: tuple, kwargs: dict) -> None:
    """Compile ``kernel`` for sm_90 (H100 / H200) as a launch with these arguments would: ints equal to 1 become
    constexprs, aligned pointers and ints divisible by 16 get Triton's divisibility hint, and the launch's compile
    options (``enable_fp_fusion``, ...) apply. Front end, LLVM and ptxas run; nothing is loaded or launched."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    bound = dict(zip(kernel.arg_names, args), **kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = bound[name]
        kind, attr = ("constexpr", None) if param.is_constexpr else native_specialize_impl(backend, value, False, True,
                                                                                             True)
        if not param.is_constexpr and param.annotation_type:  # an annotated scalar (fp64): what a launch passes
            kind, attr = param.annotation_type, None
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif attr:
            attrs[(i,)] = backend.parse_attr(attr)
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
    triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)


def test_kernels_compile_for_sm90(monkeypatch):
    """The interpreter runs the kernels as Python: it never sees what only the compiler rejects (a constexpr where a
    tensor was expected: Triton turns every int argument equal to 1 into a constexpr, e.g. the count of a batch
    with one value per channel). So every kernel call the launchers make, for inputs whose sizes are 1 as well as
    general ones, is compiled here for sm_90 with the launch's own specialisation; and once with 64-bit offsets."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.jit import native_specialize_impl  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton has no NVIDIA backend or another layout of its internals ({e})")
    kernel_names = ["_batch_stats_partial", "_backward_stats_partial", "_finish_sums", "_normalize_kernel",
                    "_backward_input_kernel", "_forward_epilogue_kernel", "_cbn_prior_kernel",
                    "_cbn_record_data_kernel", "_cbn_record_scalar_kernel"]
    cases = [(_arrange((1, 3), None, torch.float32, 0.0, 1.0, 0), False),  # count 1, rows 1
             (_arrange((2, 1, 5), None, torch.bfloat16, 0.0, 1.0, 0), False),  # C = 1
             (_arrange((3, 5, 7, 9), None, torch.float16, 0.0, 1.0, 0), False),
             (_arrange((3, 5, 6, 7), torch.channels_last, torch.float64, 0.0, 1.0, 0), False),
             (_arrange((2, 16, 4, 8), None, torch.float32, 0.0, 1.0, 0), True)]  # int64 offsets
    with triton_ops_module(interpret=False) as compiled:
        calls: list = []
        kernels = {name: getattr(compiled, name) for name in kernel_names}
        for name in kernel_names:
            monkeypatch.setattr(compiled, name, _Recorder(name, calls))
        plan = compiled._plan
        for x, wide in cases:
            monkeypatch.setattr(compiled, "_plan", lambda *a, __wide=wide: plan(*a)._replace(wide=__wide))
            for name in OPS:
                getattr(compiled, f"{name}_triton")(*make_args(name, x))
        for case in EPILOGUE_CASES:  # every combination of the epilogue's flags the layers use
            epilogue_call(compiled.forward_epilogue_triton, epilogue_case(**EPILOGUE_CASES[case]))
        for case in CBN_PRIOR_CASES:
            compiled.cbn_prior_triton(*cbn_prior_case(**CBN_PRIOR_CASES[case]).values())
        for case in CBN_RECORD_CASES:
            compiled.cbn_record_triton(*cbn_record_case(**CBN_RECORD_CASES[case]).values())
        for x, wide in cases:
            monkeypatch.setattr(compiled, "_plan", lambda *a, __wide=wide: plan(*a)._replace(wide=__wide))
            b = backward_case(x)
            compiled.backward_reduce_triton(*reduce_args(b))
            compiled.backward_reduce_triton(*reduce_args(b, True, torch.bfloat16, torch.float16))
            compiled.backward_apply_triton(*apply_args(b))
        assert {call[0] for call in calls} == set(kernel_names)
        seen = set()
        for name, grid, args, kwargs in calls:
            assert all(isinstance(g, int) and g >= 1 for g in grid), (name, grid)
            key = (name, tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args), tuple(kwargs.items()))
            if key not in seen:  # (the same specialisation compiles once)
                seen.add(key)
                _compile_for_sm90(kernels[name], args, kwargs)


# --------------------------------------------------------------------------------------------------- routing


def _spy(monkeypatch, tops) -> list[str]:
    calls: list[str] = []
    for name in OPS:
        real = launcher(tops, name)

        def spy(*args, __real=real, __name=name):
            calls.append(__name)
            return __real(*args)

        monkeypatch.setattr(tops, f"{name}_triton", spy)
    return calls


@pytest.mark.parametrize("name", OPS)
def test_use_triton_routes_cpu_tensors(tops, monkeypatch, name):
    calls = _spy(monkeypatch, tops)
    args = make_args(name, make_input("nchw", torch.float32, seed=9))
    op = getattr(ops, name)
    before = ops.triton_enabled()
    with ops.use_triton(True):
        assert ops.triton_enabled() is True
        for kernels in (True, False):  # forced Triton wins over use_kernels
            with ops.use_kernels(kernels):
                out = op(*args)
    assert calls == [name, name]
    torch.testing.assert_close(out, launcher(tops, name)(*args), rtol=0, atol=0)
    calls.clear()
    # CPU tensors otherwise: the C++ kernels (or the reference), never Triton
    for setting in (False, None) if ops._env_triton() is None else (False,):
        with ops.use_triton(setting):
            op(*args)
    assert calls == [] and ops.triton_enabled() is before


def test_cuda_registration_routes_to_triton(tops, monkeypatch):
    """The kernel registered for CUDA tensors: Triton by default, the reference under use_triton(False) or when triton
    does not import (one warning), an error when Triton is forced but does not import. (Called here directly with CPU
    tensors, which the interpreted kernels accept.)"""
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"syncnorm::{name}", "CUDA"), name
    calls = _spy(monkeypatch, tops)
    args = make_args("normalize", make_input("channels_last", torch.float32))
    cuda_kernel = ops._cuda(ops.normalize_reference, "normalize")
    cuda_kernel(*args)
    assert calls == ["normalize"]
    with ops.use_triton(False):
        torch.testing.assert_close(cuda_kernel(*args), ops.normalize_reference(*args), rtol=0, atol=0)
    assert calls == ["normalize"]
    monkeypatch.setattr(tops, "available", lambda: False)
    monkeypatch.setattr(ops, "_triton_failed", None)
    with pytest.warns(RuntimeWarning, match="triton could not be imported"):
        cuda_kernel(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        cuda_kernel(*args)
    with ops.use_triton(True), pytest.raises(RuntimeError, match="triton could not be imported"):
        cuda_kernel(*args)
    assert calls == ["normalize"]


def test_without_triton(monkeypatch):
    """Where ``import triton`` fails, syncnorm.triton_ops still imports (available() is False, the launchers raise),
    CUDA tensors run the reference implementation (one warning), and forcing Triton raises."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    args = make_args("normalize", make_input("nchw", torch.float32))
    with triton_ops_module() as module:
        assert not module.available() and not module.interpreted() and "triton" in module.import_error()
        with pytest.raises(RuntimeError, match="triton could not be imported"):
            module.normalize_triton(*args)
        assert not ops.triton_available()
        monkeypatch.setattr(ops, "_triton_failed", None)
        with pytest.warns(RuntimeWarning, match="CUDA tensors use the reference implementation"):
            out = ops._cuda(ops.normalize_reference, "normalize")(*args)
        assert torch.equal(out, ops.normalize_reference(*args))
        with ops.use_triton(True), pytest.raises(RuntimeError, match="forced .* triton could not be imported"):
            ops.normalize(*args)


def test_forced_triton_without_interpreter_raises_clearly():
    """Kernels decorated without TRITON_INTERPRET=1 cannot take CPU tensors: the first forced call says why."""
    args = make_args("normalize", make_input("nchw", torch.float32))
    with triton_ops_module(interpret=False) as module:
        assert module.available() and not module.interpreted()
        with ops.use_triton(True), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 in the environment before"):
            ops.normalize(*args)


def test_environment_settings(monkeypatch):
    """SYNCNORM_KERNELS and SYNCNORM_CPU_EXT as re-read by set_*_enabled(None) (what the module reads at import)."""
    before = (ops.triton_enabled(), ops.kernels_enabled())
    try:
        for value, expected in (("triton", True), ("reference", False), ("auto", None), ("", None)):
            monkeypatch.setenv("SYNCNORM_KERNELS", value)
            ops.set_triton_enabled(None)
            ops.set_kernels_enabled(None)
            assert ops.triton_enabled() is expected, value
            # "reference" means the reference on every device: the C++ CPU kernels are off too
            assert ops.kernels_enabled() is (value != "reference"), value
        monkeypatch.setenv("SYNCNORM_KERNELS", "cuda")
        with pytest.warns(RuntimeWarning, match="not one of"):
            ops.set_triton_enabled(None)
        assert ops.triton_enabled() is None
        # SYNCNORM_CPU_EXT=0 still means: CPU tensors run the reference implementation
        monkeypatch.setenv("SYNCNORM_CPU_EXT", "0")
        ops.set_kernels_enabled(None)
        assert not ops.kernels_enabled()
        calls = []
        monkeypatch.setattr(torch.ops.syncnorm_cpu, "normalize", lambda *a: calls.append("cpu"))
        args = make_args("normalize", make_input("3d", torch.float32))
        assert torch.equal(ops.normalize(*args), ops.normalize_reference(*args)) and calls == []
    finally:
        monkeypatch.undo()  # the environment first: set_*_enabled(None) below would read it
        ops.set_triton_enabled(before[0])
        ops.set_kernels_enabled(before[1])


def test_environment_read_at_import():
    """In a fresh process: SYNCNORM_KERNELS=triton without TRITON_INTERPRET raises the clear error at the first op
    on a CPU tensor; once triton_ops is imported again with TRITON_INTERPRET=1, the same call runs Triton."""
    code = textwrap.dedent("""
        import os, sys, torch
        from syncnorm import ops
        assert ops.triton_enabled() is True
        x = torch.randn(4, 3, 5)
        try:
            ops.batch_stats(x, 3)
            raise SystemExit("no error")
        except RuntimeError as e:
            assert "TRITON_INTERPRET=1" in str(e), e
        del sys.modules["syncnorm.triton_ops"]
        os.environ["TRITON_INTERPRET"] = "1"
        out = ops.batch_stats(x, 3)
        torch.testing.assert_close(out, ops.batch_stats_reference(x, 3), rtol=1e-6, atol=1e-6)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(SYNCNORM_KERNELS="triton", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


OPCHECK_INPUTS = {
    "fp32-nchw": lambda: make_input("nchw", torch.float32, n=2),
    "bf16-channels_last": lambda: make_input("channels_last", torch.bfloat16, n=2),
    "fp64-2d": lambda: make_input("2d", torch.float64, n=7),
    "fp32-empty-channels_last_3d": lambda: make_input("channels_last_3d", torch.float32, n=0),
}


@pytest.mark.parametrize("inp", list(OPCHECK_INPUTS))
@pytest.mark.parametrize("name", OPS)
def test_opcheck_with_triton_forced(tops, name, inp):
    args = make_args(name, OPCHECK_INPUTS[inp]())
    with ops.use_triton(True):
        result = torch.library.opcheck(getattr(ops, name), args)
    assert all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------------------------------------- forward_epilogue


@pytest.mark.parametrize("blocks", ["default", "tiny"])
@pytest.mark.parametrize("case", list(EPILOGUE_CASES))
def test_forward_epilogue_triton_matches_reference(tops, monkeypatch, case, blocks):
    """The one-program epilogue kernel against the reference (which tests/test_ops.py checks against first
    principles): fp64 statistics to a few ulps, the constants and the running statistics to 2 ulps of their dtype
    (a GPU may contract a multiply-add into an FMA), the counts and num_batches_tracked exactly; "tiny" walks the
    channels in blocks of 2 (several passes, a partial last block)."""
    if blocks == "tiny":
        monkeypatch.setattr(tops, "_EPILOGUE_BLOCK_C", 2)
    c = epilogue_case(**EPILOGUE_CASES[case], seed=7)
    (coef_r, stats_r, counts_r), running_r = epilogue_call(ops.forward_epilogue_reference, c)
    (coef_t, stats_t, counts_t), running_t = epilogue_call(tops.forward_epilogue_triton, c)
    torch.testing.assert_close(counts_t, counts_r, rtol=0, atol=0)
    torch.testing.assert_close(stats_t, stats_r, rtol=8 * eps(F64), atol=8 * eps(F64))
    cd = coef_r.dtype
    torch.testing.assert_close(coef_t, coef_r, rtol=2 * eps(cd), atol=2 * eps(cd) * float(coef_r.abs().max()))
    for got, want in zip(running_t, running_r):
        if want is None:
            assert got is None
        elif want.is_floating_point():
            torch.testing.assert_close(got, want, rtol=2 * eps(want.dtype), atol=2 * eps(want.dtype))
        else:
            assert int(got) == int(want)


@pytest.mark.parametrize("case", list(CBN_PRIOR_CASES))
def test_cbn_prior_triton_matches_reference(tops, case):
    """CBN's pooled-prior kernel against the reference (which tests/test_ops.py checks from first principles): the
    counts exactly, mean and m2 to a few fp64 ulps; the NaN of a never-written slot does not leak."""
    a = cbn_prior_case(**CBN_PRIOR_CASES[case])
    want = ops.cbn_prior_reference(*a.values())
    got = tops.cbn_prior_triton(*a.values())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1:], want[1:], rtol=8 * eps(F64), atol=8 * eps(F64) * float(want[1:].abs().max()))


@pytest.mark.parametrize("case", list(CBN_RECORD_CASES))
def test_cbn_record_triton_writes_one_slot(tops, case):
    """CBN's record kernels against the slot-by-slot expectation (the same as the reference's): bitwise."""
    a = cbn_record_case(**CBN_RECORD_CASES[case])
    want = cbn_record_expected(a)
    tops.cbn_record_triton(*a.values())
    for name, value in want.items():
        torch.testing.assert_close(a[name], value, rtol=0, atol=0, msg=name)


def test_cbn_record_opcheck_with_triton_forced(tops):
    a = cbn_record_case(**CBN_RECORD_CASES["compensated"])
    with ops.use_triton(True):
        result = torch.library.opcheck(ops.cbn_record, tuple(a.values()))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_cbn_prior_opcheck_with_triton_forced(tops):
    a = cbn_prior_case(**CBN_PRIOR_CASES["compensated"])
    with ops.use_triton(True):
        result = torch.library.opcheck(ops.cbn_prior, tuple(a.values()))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("case", ["renorm-prior-cumulative", "no-affine-no-running", "fp16-running"])
def test_forward_epilogue_opcheck_with_triton_forced(tops, case):
    c = epilogue_case(**EPILOGUE_CASES[case])
    with ops.use_triton(True):
        result = torch.library.opcheck(ops.forward_epilogue, tuple(c["args"].values()))
    assert all(v == "SUCCESS" for v in result.values()), result


BACKWARD_PAIR_CASES = [(layout, dtype, "default") for layout in LAYOUTS for dtype in DTYPES] + [
    (layout, dtype, "tiny") for layout in LAYOUTS for dtype in TINY_BLOCK_DTYPES]


@pytest.mark.parametrize("layout, dtype, blocks", BACKWARD_PAIR_CASES,
                         ids=[f"{lay}-{str(dt)[6:]}-{b}" for lay, dt, b in BACKWARD_PAIR_CASES])
def test_backward_reduce_and_apply_triton(tops, monkeypatch, layout, dtype, blocks):
    """backward_reduce (the backward_stats kernels, packed by the second one) and backward_apply (one kernel whose
    programs form a, b, c from the summed vector) against float64, with tests/test_ops.py's bounds; also empty."""
    if blocks == "tiny":
        use_blocks(tops, monkeypatch, blocks)
    for n in (None, 0):
        b = backward_case(make_input(layout, dtype, n=n, seed=5))
        check_backward_pair(tops.backward_reduce_triton, tops.backward_apply_triton, b, f"{layout} {dtype} N={n}")


@pytest.mark.parametrize("inp", ["fp32-nchw", "bf16-channels_last", "fp32-empty-channels_last_3d"])
def test_backward_reduce_and_apply_opcheck_with_triton_forced(tops, inp):
    b = backward_case(OPCHECK_INPUTS[inp]())
    with ops.use_triton(True):
        for op, args in ((ops.backward_reduce, reduce_args(b)), (ops.backward_reduce, reduce_args(b, True, F64)),
                         (ops.backward_apply, apply_args(b))):
            result = torch.library.opcheck(op, args)
            assert all(v == "SUCCESS" for v in result.values()), (op, result)


# ------------------------------------------------------------------------------- a 2-rank world on the Triton path


def _triton_world(rank: int, world: int) -> dict:
    """The layers' multi-process oracles (tests/test_*.py) with every op on the Triton kernels (interpreted)."""
    from tests import test_batch_renorm as brn
    from tests import test_cross_iteration as cbn
    from tests import test_sync_batchnorm as sbn

    results: dict = {}
    solo = syncnorm.comm.new_groups(1)  # the single-process references of the CBN / CmBN oracles
    with triton_ops_module(interpret=True) as module, ops.use_triton(True):
        calls = {name: 0 for name in LAYER_OPS}
        for name in LAYER_OPS:
            real = getattr(module, f"{name}_triton")

            def counted(*args, __real=real, __name=name):
                calls[__name] += 1
                return __real(*args)

            setattr(module, f"{name}_triton", counted)
        # SyncBatchNorm against float64 nn.BatchNorm on the concatenated batch: uneven batches, one empty rank, fp64
        sbn._oracle_checks(rank, world, results, tag="-triton")
        # channels_last(_3d), autocast bf16, fp32 data of mean 1e4 and of variance 1e-7
        layout: dict = {}
        sbn._layout_and_precision_checks(rank, world, layout)
        results.update({f"sbn-{key}": value for key, value in layout.items()})
        # BatchRenorm with r and d clipped on some channels: raw results, compared in the parent
        renorm: dict = {}
        brn._oracle_checks(rank, world, renorm)
        results["brn"] = renorm
        # CrossIterationBatchNorm (window 3, with and without compensation) and CrossMiniBatchNorm (3 micro-batches)
        cbn._cbn_oracle(rank, world, results, solo, suffix="-triton")
        cbn._cmbn_oracle(rank, world, results, solo)
    results["calls"] = calls
    return results


@pytest.fixture(scope="module")
def world_results():
    return run_distributed(_triton_world, 2, timeout=240)


def test_world_ran_on_triton(world_results):
    for rank, r in enumerate(world_results):
        assert all(count > 0 for count in r["calls"].values()), (rank, r["calls"])


def test_world_sync_batchnorm(world_results):
    from tests.test_sync_batchnorm import CASES, SHAPES

    checks = [k for k in world_results[0] if k.startswith("oracle-triton") or k.startswith("sbn-")]
    assert len([k for k in checks if k.startswith("oracle")]) == len(CASES[2]) * len(SHAPES) * 2
    assert any(0 in sizes for sizes in CASES[2]) and any(len(set(sizes)) > 1 for sizes in CASES[2])
    failures = {(rank, k): r[k] for rank, r in enumerate(world_results) for k in checks if r[k] is not None}
    assert not failures, failures


def test_world_batch_renorm(world_results):
    """Every rank equals single-process BatchRenorm on the concatenated batch (run here on the C++ kernels or the
    reference), which equals the float64 formula reference; r and d clip on some channels and not on others."""
    from tests.test_batch_renorm import CASES, DIST_SHAPES, _mismatches, _rank_vs_single, _single_process

    per_rank = [r["brn"] for r in world_results]
    failures = {}
    for sizes in CASES[2]:
        for dim_name, spatial in DIST_SHAPES.items():
            for momentum in (0.1, None):
                key = f"oracle{sizes}-{dim_name}-m{momentum}"
                single, ref = _single_process(sizes, spatial, momentum)
                assert max(single["clipped"]) > 0.0 and min(single["clipped"]) < 1.0, (key, single["clipped"])
                errs = _rank_vs_single(per_rank, sizes, key, single) + _mismatches(single, ref)
                if errs:
                    failures[key] = errs
    assert not failures, failures


@pytest.mark.parametrize("check", ["cbn-oracle-compensateTrue-triton", "cbn-oracle-compensateFalse-triton",
                                   "cmbn-oracle"])
def test_world_cross_iteration_and_cross_minibatch(world_results, check):
    for rank, r in enumerate(world_results):
        assert r[check] is None, f"rank {rank}: {r[check]}"
    key = check.replace("oracle", "history")
    if key in world_results[0]:
        assert torch.equal(world_results[0][key], world_results[1][key])  # the same history on both ranks


def test_forward_epilogue_large_mean_as_reference(tops):
    """Mean 300, spread 2: ``sum x^2 - mean * sum x`` cancels about 10^4 of fp64's digits; the kernel must round it as
    the reference does (no FMA contraction: on a GPU a fused multiply-add would differ by up to ~mean^2/var ulps)."""
    c = epilogue_case(**EPILOGUE_CASES["renorm-prior-cumulative"], seed=4, loc=300.0)
    (coef_r, stats_r, counts_r), _ = epilogue_call(ops.forward_epilogue_reference, c)
    (coef_t, stats_t, counts_t), _ = epilogue_call(tops.forward_epilogue_triton, c)
    torch.testing.assert_close(stats_t, stats_r, rtol=8 * eps(F64), atol=8 * eps(F64))
    torch.testing.assert_close(coef_t, coef_r, rtol=2 * eps(torch.float32), atol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # (the interpreter's numpy: inf - inf)
def test_forward_epilogue_non_finite_as_reference(tops):
    """Non-finite sums (an inf in the batch) and NaN running statistics: NaN goes where the reference puts it (torch's
    clamps propagate NaN; Triton's tl.maximum / tl.minimum would drop it unless told otherwise)."""
    c = epilogue_case(**EPILOGUE_CASES["renorm"], seed=3)
    c["args"]["total"][2] = float("inf")  # sum x of channel 0
    c["args"]["total"][2 + 5 + 0] = float("inf")
    c["args"]["running_var"][1] = float("nan")
    (coef_r, stats_r, counts_r), running_r = epilogue_call(ops.forward_epilogue_reference, c)
    (coef_t, stats_t, counts_t), running_t = epilogue_call(tops.forward_epilogue_triton, c)
    assert stats_r.isnan().any() and stats_r[:, 0].isnan().any() and stats_r[6:, 1].isnan().all()
    torch.testing.assert_close(stats_t, stats_r, rtol=8 * eps(F64), atol=8 * eps(F64), equal_nan=True)
    torch.testing.assert_close(coef_t, coef_r, rtol=1e-6, atol=1e-6, equal_nan=True)
    for got, want in zip(running_t[:2], running_r[:2]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_forward_epilogue_running_buffers_go_together(tops):
    c = epilogue_case(**EPILOGUE_CASES["plain"])
    c["args"]["running_var"] = None
    for fn in (ops.forward_epilogue_reference, tops.forward_epilogue_triton):
        with pytest.raises(ValueError, match="running_mean and running_var go together"):
            epilogue_call(fn, c)
