"""The C++ CPU kernels (syncnorm/csrc/norm_cpu.cpp) against the Python path and against float64 nn.BatchNorm.

Every other test runs whichever path is active (the kernels, on CPU, when they build). Here both paths run on the
same input and must agree, over the layouts, dtypes and options the kernels handle themselves: contiguous 1d/2d/3d,
channels_last(_3d), (N, C) input, other strides (copied), long rows that span several summation blocks, fp64 / fp32
/ fp16 / bf16, no affine, momentum None, Batch Renorm with active clipping, and the large-mean re-centring.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import syncnorm
from syncnorm import _ext
from tests.oracle import compare, reference_bn

pytestmark = pytest.mark.skipif(_ext.ops() is None, reason="the C++ CPU kernels are unavailable here")


def _run(layer, x, g, steps=2, python=False):
    """`steps` training steps of a copy of `layer` on x; returns outputs, grads and buffers of the last one."""
    layer = copy.deepcopy(layer)
    previous = _ext.set_enabled(not python)
    try:
        for _ in range(steps):
            xi = x.detach().clone().requires_grad_(True)
            if layer.weight is not None:
                layer.weight.grad = layer.bias.grad = None
            y = layer(xi)
            (y.double() * g).sum().backward()
    finally:
        _ext.set_enabled(previous)
    out = {"y": y.detach(), "dx": xi.grad, "running_mean": layer.running_mean.clone(),
           "running_var": layer.running_var.clone(), "nbt": int(layer.num_batches_tracked), "layer": layer}
    if layer.weight is not None:
        out["dw"], out["db"] = layer.weight.grad, layer.bias.grad
    return out


def _agree(a, b, rtol, atol):
    errs = [compare(k, a[k], b[k], rtol, atol) for k in ("y", "dx", "dw", "db", "running_mean", "running_var")
            if k in a]
    errs = [e for e in errs if e]
    if a["y"].dtype != b["y"].dtype:
        errs.append(f"dtype {a['y'].dtype} != {b['y'].dtype}")
    if a["y"].stride() != b["y"].stride() or a["dx"].stride() != b["dx"].stride():
        errs.append(f"strides y {a['y'].stride()} vs {b['y'].stride()}, dx {a['dx'].stride()} vs {b['dx'].stride()}")
    if a["nbt"] != b["nbt"]:
        errs.append(f"num_batches_tracked {a['nbt']} != {b['nbt']}")
    return errs


def _input(shape, dtype, layout="contiguous", seed=0, loc=0.5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc
    x = x + torch.linspace(-2, 2, shape[1], dtype=torch.float64).view(1, -1, *([1] * (len(shape) - 2)))
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    elif layout == "strided":  # neither contiguous nor channels_last: the kernels copy it first
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x, grad


CASES = [
    ((6, 5), "contiguous"),
    ((6, 5), "strided"),  # (N, C) with C not contiguous: read through a copy
    ((4, 5, 7), "contiguous"),
    ((4, 5, 7), "strided"),
    ((3, 5, 4, 6), "contiguous"),
    ((3, 5, 4, 6), "channels_last"),
    ((3, 5, 4, 6), "strided"),
    ((2, 5, 2, 3, 4), "contiguous"),
    ((2, 5, 2, 3, 4), "channels_last"),
    ((2, 3, 75, 111), "contiguous"),  # rows of 8325 values: several summation blocks per row
    ((600, 3, 2, 2), "channels_last"),  # 2400 rows of C: several row blocks in the channels-last reduction
]


@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{s}-{l}" for s, l in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernels_match_python_path(shape, layout, dtype):
    x, g = _input(shape, dtype, layout)
    layer = syncnorm.SyncBatchNorm(shape[1]).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
        layer.bias.copy_(torch.linspace(-1, 1, shape[1]))
    fast, slow = _run(layer, x, g), _run(layer, x, g, python=True)
    tol = (1e-10, 1e-11) if dtype == torch.float64 else (2e-5, 2e-5)
    assert not _agree(fast, slow, *tol)
    # and both against float64 nn.BatchNorm on the same input (two steps: running statistics accumulate)
    ref = reference_bn(x.double(), g, layer.weight, layer.bias, steps=2)
    for k in ("y", "dx", "dw", "db", "running_mean", "running_var"):
        assert compare(k, fast[k], ref[k], *tol) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_kernels_low_precision(dtype, layout):
    x, g = _input((4, 6, 5, 5), dtype, layout)
    layer = syncnorm.SyncBatchNorm(6)
    fast, slow = _run(layer, x, g), _run(layer, x, g, python=True)
    assert fast["y"].dtype == dtype and fast["dx"].dtype == dtype
    assert fast["running_mean"].dtype == torch.float32
    tol = 1e-2 if dtype == torch.float16 else 4e-2  # one rounding of the output to the input dtype
    assert not _agree(fast, slow, tol, tol)
    # statistics are taken in fp32 from the low-precision values
    ref = reference_bn(x.double(), g, layer.weight, layer.bias, steps=2)
    assert compare("running_var", fast["running_var"], ref["running_var"], 1e-5, 1e-6) is None


@pytest.mark.parametrize("momentum", [None, 0.3])
@pytest.mark.parametrize("affine", [True, False])
def test_kernels_options(momentum, affine):
    x, g = _input((5, 4, 3, 3), torch.float64)
    layer = syncnorm.SyncBatchNorm(4, momentum=momentum, affine=affine).double()
    fast, slow = _run(layer, x, g, steps=3), _run(layer, x, g, steps=3, python=True)
    assert not _agree(fast, slow, 1e-10, 1e-11)
    assert fast["nbt"] == 3


@pytest.mark.parametrize("loc,scale", [(1e4, 1.0), (0.0, 1e-7 ** 0.5), (-3e5, 10.0)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_kernels_ill_conditioned_input(loc, scale, layout):
    # large mean against the spread: the shifted second summation pass and the re-centred normalisation
    x64, g = _input((6, 4, 7, 7), torch.float64, layout, loc=loc, scale=scale)
    x = x64.float()
    layer = syncnorm.SyncBatchNorm(4)
    fast = _run(layer, x, g, steps=1)
    ref = reference_bn(x.double(), g, layer.weight, layer.bias, steps=1)
    assert compare("y", fast["y"], ref["y"], 1e-4, 1e-4) is None
    assert compare("dx", fast["dx"], ref["dx"], 1e-3, 1e-3 * ref["dx"].abs().max().item()) is None
    assert compare("running_var", fast["running_var"], ref["running_var"], 1e-4, 1e-10) is None
    assert compare("running_mean", fast["running_mean"], ref["running_mean"], 1e-6, 1e-9) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernels_batch_renorm_match_python_path(dtype):
    x, g = _input((6, 5, 4, 4), dtype, scale=3.0)
    layer = syncnorm.BatchRenorm(5, r_max=1.5, d_max=0.5).to(dtype)
    with torch.no_grad():  # running statistics far from the batch: both r and d clip in some channels
        layer.running_mean.copy_(torch.linspace(-4, 4, 5))
        layer.running_var.copy_(torch.linspace(0.1, 20, 5))
        layer.weight.copy_(torch.linspace(0.5, 1.5, 5))
    fast, slow = _run(layer, x, g, steps=1), _run(layer, x, g, steps=1, python=True)
    tol = (1e-10, 1e-11) if dtype == torch.float64 else (2e-5, 2e-5)
    assert not _agree(fast, slow, *tol)
    info_f, info_s = fast["layer"].last_info, slow["layer"].last_info
    assert compare("r", info_f.r, info_s.r, *tol) is None and compare("d", info_f.d, info_s.d, *tol) is None
    clipped = fast["layer"].clip_fraction()
    assert clipped == slow["layer"].clip_fraction() and 0.0 < clipped <= 1.0


def test_sync_batchnorm_last_info_matches_python_path_and_keeps_no_output():
    # SyncBatchNorm's hot path keeps the kernels' raw result and builds last_info when it is read
    import gc
    import weakref

    x, _ = _input((4, 5, 3, 3), torch.float64)
    infos = []
    for python in (False, True):
        layer = syncnorm.SyncBatchNorm(5).double()
        previous = _ext.set_enabled(not python)
        try:
            y = layer(x)
            alive = weakref.ref(y)
            del y
            gc.collect()
            assert alive() is None  # the layer's state does not hold its output
            info = layer.last_info
            assert layer.last_info is info  # built once
            # a failing forward (one value per channel) leaves the last good info in place
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                layer(torch.randn(1, 5, dtype=torch.float64))
            assert layer.last_info is info
        finally:
            _ext.set_enabled(previous)
        infos.append(info)
    fast, slow = infos
    assert fast.global_count == slow.global_count == 36 and fast.local_count == slow.local_count == 36
    assert fast.r is None and fast.d is None and fast.extra_sum is None and fast.used is fast.batch
    for name in ("count", "mean", "m2"):
        assert compare(name, getattr(fast.batch, name), getattr(slow.batch, name), 1e-12, 1e-12) is None


def test_subclass_overrides_are_honoured_on_the_kernels_path():
    # SyncBatchNorm's and BatchRenorm's inlined kernel step stands in for the standard _train_forward only: a
    # subclass that overrides the training path, the affine read or the accepted dims gets its override, on every
    # call and on both paths
    class Scaled(syncnorm.SyncBatchNorm):
        def _train_forward(self, input):
            return 2 * super()._train_forward(input)

    class WeightThree(syncnorm.BatchRenorm):
        def _affine(self):
            return torch.full_like(self.weight, 3.0), self.bias

    class Only4D(syncnorm.SyncBatchNorm):
        _min_dim = _max_dim = 4

    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    for enabled in (True, False):
        previous = _ext.set_enabled(enabled)
        try:
            for _ in range(2):
                torch.testing.assert_close(Scaled(3).double()(x), 2 * syncnorm.SyncBatchNorm(3).double()(x))
                torch.testing.assert_close(WeightThree(3).double()(x), 3 * syncnorm.BatchRenorm(3).double()(x))
                with pytest.raises(ValueError, match=r"Only4D\(3\): expected 4D input, got 2D"):
                    Only4D(3).double()(x[:, :, 0, 0])
        finally:
            _ext.set_enabled(previous)
    assert syncnorm.SyncBatchNorm(3)._kernel_step_ok() and syncnorm.BatchRenorm(3)._kernel_step_ok()
    assert not (Scaled(3)._kernel_step_ok() or WeightThree(3)._kernel_step_ok() or Only4D(3)._kernel_step_ok())


def test_patched_train_forward_is_called_on_the_kernels_path(monkeypatch):
    # a patch of _train_forward on the instance or on the class (a profiler's wrapper, a test's mock), applied
    # after the class was made, is honoured as before the inlined kernel step
    calls = []
    layer = syncnorm.BatchRenorm(3)
    original = syncnorm.BatchRenorm._train_forward

    def on_instance(input):
        calls.append("instance")
        return original(layer, input)

    def on_class(self, input):
        calls.append("class")
        return original(self, input)

    x = torch.randn(4, 3)
    layer._train_forward = on_instance
    layer(x), layer(x)
    del layer._train_forward
    monkeypatch.setattr(syncnorm.BatchRenorm, "_train_forward", on_class)
    layer(x), layer(x)
    assert calls == ["instance"] * 2 + ["class"] * 2
    # the accepted dims set on an instance, and the base class's affine read patched
    sbn = syncnorm.SyncBatchNorm(3)
    sbn._max_dim = 2
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(3\): expected at least 2D|expected 2D input"):
        sbn(torch.randn(4, 3, 2))
    from syncnorm.layers.sync_batchnorm import GlobalStatsBatchNorm

    monkeypatch.setattr(GlobalStatsBatchNorm, "_affine", lambda self: (torch.full((3,), 2.0), None))
    expected = 2 * torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(syncnorm.SyncBatchNorm(3)(x), expected)


def test_last_info_of_a_layer_pickled_before_it_was_a_property():
    import pickle

    layer = syncnorm.SyncBatchNorm(3)
    layer(torch.randn(4, 3))
    info = layer.last_info
    state = layer.__dict__
    state["last_info"] = state.pop("_last_info")  # how versions before the property stored it
    loaded = pickle.loads(pickle.dumps(layer))
    assert loaded.last_info.global_count == info.global_count == 4
    torch.testing.assert_close(loaded.last_info.batch.mean, info.batch.mean)


def test_kernels_channel_mismatch_still_raises():
    layer = syncnorm.SyncBatchNorm(4)
    with pytest.raises(ValueError, match="expected 4 channels"):
        layer(torch.randn(2, 3, 2, 2))


def test_unbuildable_extension_falls_back_with_one_warning(monkeypatch):
    def broken(verbose=False):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_ext, "_ops", None)
    monkeypatch.setattr(_ext, "_failed", None)
    monkeypatch.setattr(_ext, "build", broken)
    x, g = _input((4, 3, 2, 2), torch.float64)
    layer = syncnorm.SyncBatchNorm(3).double()
    with pytest.warns(RuntimeWarning, match="could not be built"):
        y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        y2 = layer(x)
    ref = reference_bn(x, g, layer.weight, layer.bias)
    assert compare("y", y, ref["y"], 1e-10, 1e-11) is None and compare("y2", y2, ref["y"], 1e-10, 1e-11) is None


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("SYNCNORM_CPU_EXT", "0")
    previous = _ext.set_enabled(None)  # re-read the environment
    try:
        assert _ext.ops() is None and _ext.ops_for(torch.zeros(1)) is None
    finally:
        _ext.set_enabled(previous)
    assert _ext.ops() is not None


@pytest.mark.parametrize("layer_type", ["SyncBatchNorm", "BatchRenorm", "CrossMiniBatchNorm", "CrossIterationBatchNorm"])
def test_layer_state_holds_no_graph_after_training_step(layer_type):
    # statistics computed outside an autograd node must not carry a graph into the layer's state (deepcopy,
    # checkpointing and memory all depend on it)
    kwargs = {"BatchRenorm": {"r_max": 2.0, "d_max": 1.0}, "CrossMiniBatchNorm": {"accumulation_steps": 2},
              "CrossIterationBatchNorm": {"window": 2}}.get(layer_type, {})
    conv = torch.nn.Conv2d(3, 4, 3)
    norm = getattr(syncnorm, layer_type)(4, **kwargs)
    if layer_type == "CrossIterationBatchNorm":
        norm.attach(conv)
    net = torch.nn.Sequential(conv, norm)
    for _ in range(3):
        net(torch.randn(2, 3, 6, 6, requires_grad=True)).square().sum().backward()
    info = norm.last_info
    for t in (*info.batch, *info.used, info.r, info.d):
        assert t is None or (not t.requires_grad and t.grad_fn is None)
    twin = copy.deepcopy(net)
    torch.testing.assert_close(twin[1].running_mean, norm.running_mean)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_minibatch_window_step_matches_python_path(dtype):
    # CmBN's one-call window step against its Python path over two windows of 3 micro-batches (auto reset)
    layer = syncnorm.CrossMiniBatchNorm(4, accumulation_steps=3).to(dtype)
    runs = {}
    for python in (False, True):
        twin = copy.deepcopy(layer)
        previous = _ext.set_enabled(not python)
        outs = []
        try:
            for i in range(6):
                x, g = _input((3 + i % 2, 4, 3, 3), dtype, seed=i)
                x = x.requires_grad_(True)
                y = twin(x)
                (y.double() * g).sum().backward()
                outs += [y.detach(), x.grad, twin.window_mean.clone(), twin.window_m2.clone(),
                         twin.window_count.clone(), twin.running_var.clone()]
        finally:
            _ext.set_enabled(previous)
        runs[python] = (outs, twin.weight.grad.clone(), int(twin.window_forwards))
    tol = (1e-10, 1e-11) if dtype == torch.float64 else (2e-5, 2e-5)
    for i, (a, b) in enumerate(zip(runs[False][0], runs[True][0])):
        assert compare(f"item {i}", a, b, *tol) is None
    assert compare("dw", runs[False][1], runs[True][1], *tol) is None
    assert runs[False][2] == runs[True][2] == 3



@pytest.mark.parametrize("make", ["expand", "chunk", "every_other_channel"])
def test_kernels_other_strided_inputs(make):
    # stride-0 and sliced inputs (2-d and 4-d) must be read as the tensors they are
    g = torch.Generator().manual_seed(5)
    if make == "expand":
        x = torch.randn(64, 1, generator=g, dtype=torch.float64).expand(64, 4)  # channel stride 0
    elif make == "chunk":
        x = torch.randn(8, 10, generator=g, dtype=torch.float64).chunk(2, dim=1)[0]
    else:
        x = torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64)[:, ::2]
    assert not x.is_contiguous()
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    layer = syncnorm.SyncBatchNorm(x.shape[1]).double()
    fast = _run(layer, x, grad, steps=1)
    ref = reference_bn(x.contiguous(), grad, layer.weight, layer.bias, steps=1)
    for k in ("y", "dx", "dw", "db", "running_mean", "running_var"):
        assert compare(k, fast[k], ref[k], 1e-10, 1e-11) is None


def test_renorm_bounds_with_own_eps_statistics_or_prior_follow_the_python_rules():
    # the functional API may pass a RenormBounds whose eps / running statistics differ from the layer's, or a prior:
    # the fast path must give what the Python path gives
    from syncnorm.functional import RenormBounds, normalize, train_step
    from syncnorm.stats import Moments

    x, g = _input((6, 3, 4, 4), torch.float64, scale=3.0)
    rm_other, rv_other = torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64), torch.tensor([0.5, 4.0, 9.0],
                                                                                           dtype=torch.float64)
    prior = Moments(torch.tensor(40.0, dtype=torch.float64), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
                    torch.tensor([40.0, 80.0, 10.0], dtype=torch.float64))
    cases = {
        "own eps": dict(bounds=(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), 1e-1),
                        prior=None),
        "prior": dict(bounds=(rm_other, rv_other, 1e-5), prior=prior),
    }
    for name, case in cases.items():
        outs = []
        for python in (False, True):
            previous = _ext.set_enabled(not python)
            try:
                rm, rv, eps_b = case["bounds"]
                bounds = RenormBounds(rm, rv, eps_b, 1.5, 0.5)
                y, info = normalize(x, None, None, eps=1e-5, renorm=bounds, prior=case["prior"])
                outs.append((y, info.r, info.d))
            finally:
                _ext.set_enabled(previous)
        for a, b in zip(outs[0], outs[1]):
            assert compare(name, a, b, 1e-10, 1e-11) is None
    # train_step: r and d compare with the bounds' statistics, the update goes to the running buffers given
    outs = []
    for python in (False, True):
        previous = _ext.set_enabled(not python)
        try:
            run_m, run_v = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
            bounds = RenormBounds(rm_other, rv_other, 1e-5, 1.5, 0.5)
            y, info = train_step(x, None, None, run_m, run_v, None, eps=1e-5, momentum=0.1, renorm=bounds)
            outs.append((y, info.r, info.d, run_m, run_v))
        finally:
            _ext.set_enabled(previous)
    for a, b in zip(outs[0], outs[1]):
        assert compare("train_step", a, b, 1e-10, 1e-11) is None


# ---------------------------------------------------------------------------------------------------------------
# CrossIterationBatchNorm: the one-call C++ training forward (cbn_step) against its Python path
# ---------------------------------------------------------------------------------------------------------------
CBN_CONVS = {
    "conv2d-bias": lambda: torch.nn.Conv2d(3, 4, 3, padding=1),
    "grouped-strided-dilated": lambda: torch.nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2),
    "depthwise": lambda: torch.nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
    "reflect": lambda: torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    "same-even-kernel": lambda: torch.nn.Conv2d(3, 4, 4, padding="same", dilation=1),
    "conv1d-circular": lambda: torch.nn.Conv1d(3, 4, 5, stride=2, padding=2, padding_mode="circular"),
    "conv3d": lambda: torch.nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1)),
    "conv2d-1x1": lambda: torch.nn.Conv2d(3, 4, 1, bias=False),
}
_CBN_SPATIAL = {1: (9,), 2: (7, 6), 3: (4, 5, 6)}


def _cbn_run(conv, bn, batches, python, lr=0.05, channels_last=False, autocast=False, attach=True):
    """Training steps of copies of (conv, bn) with an SGD step between them; per step y and the input grad, then the
    final parameter grads and every buffer."""
    conv, bn = copy.deepcopy(conv), copy.deepcopy(bn)
    if attach and bn.compensate and bn.window > 1:
        bn.attach(conv)
    previous = _ext.set_enabled(not python)
    outs = []
    try:
        for x, g in batches:
            x = x.detach().clone()
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            for p in (*conv.parameters(), *bn.parameters()):
                p.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = bn(conv(x))
            (y.double() * g).sum().backward()
            outs += [y.detach(), x.grad]
            with torch.no_grad():
                for p in (*conv.parameters(), *bn.parameters()):
                    p -= lr * p.grad
    finally:
        _ext.set_enabled(previous)
    grads = [p.grad for p in (*conv.parameters(), *bn.parameters())]
    return outs, grads, bn.state_dict(), bn


def _cbn_batches(conv, dtype, sizes, loc=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial = _CBN_SPATIAL[conv.weight.dim() - 2]
    out = []
    for n in sizes:
        x = (torch.randn((n, conv.in_channels) + spatial, generator=g, dtype=torch.float64) * scale + loc).to(dtype)
        with torch.no_grad():
            shape = (n,) + tuple(conv(torch.zeros((1, conv.in_channels) + spatial, dtype=conv.weight.dtype)).shape[1:])
        out.append((x, torch.randn(shape, generator=g, dtype=torch.float64)))
    return out


def _cbn_agree(a, b, rtol, atol):
    errs = [compare(f"step {i // 2} {'y' if i % 2 == 0 else 'dx'}", u, v, rtol, atol)
            for i, (u, v) in enumerate(zip(a[0], b[0]))]
    errs += [compare(f"grad {i}", u, v, rtol, atol) for i, (u, v) in enumerate(zip(a[1], b[1])) if u is not None]
    for key, v in b[2].items():
        u = a[2][key]
        if u.dtype in (torch.bool, torch.long):
            errs.append(None if torch.equal(u, v) else f"{key}: {u.tolist()} != {v.tolist()}")
        else:
            errs.append(compare(key, u, v, rtol, max(atol, rtol * float(v.abs().max()) if v.numel() else atol)))
    return [e for e in errs if e]


@pytest.mark.parametrize("name", list(CBN_CONVS))
def test_cross_iteration_step_matches_python_path(name):
    # seven steps of window 3 (the ring wraps twice), one of them with an empty batch; float64, so the two paths
    # must agree to rounding in every output, gradient and history buffer
    torch.manual_seed(3)
    conv = CBN_CONVS[name]().double()
    bn = syncnorm.CrossIterationBatchNorm(conv.out_channels, window=3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    batches = _cbn_batches(conv, torch.float64, [3, 2, 4, 0, 3, 1, 2], seed=1)
    fast, slow = _cbn_run(conv, bn, batches, False), _cbn_run(conv, bn, batches, True)
    assert not _cbn_agree(fast, slow, 1e-10, 1e-12), _cbn_agree(fast, slow, 1e-10, 1e-12)
    assert int(fast[3].history_filled) == 2 and bool(fast[3].history_compensable.all())


@pytest.mark.parametrize("option", ["naive", "burn_in", "unpaired", "momentum_none", "no_affine"])
def test_cross_iteration_step_options_match_python_path(option):
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    kwargs = {"naive": {"compensate": False}, "burn_in": {"burn_in": 3}, "momentum_none": {"momentum": None},
              "no_affine": {"affine": False}}.get(option, {})
    bn = syncnorm.CrossIterationBatchNorm(4, window=3, **kwargs).double()
    batches = _cbn_batches(conv, torch.float64, [2, 3, 2, 4, 3, 2], seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unpaired layer's one warning
        fast, slow = (_cbn_run(conv, bn, batches, python, attach=option != "unpaired") for python in (False, True))
    assert not _cbn_agree(fast, slow, 1e-10, 1e-12), _cbn_agree(fast, slow, 1e-10, 1e-12)
    assert int(fast[3].history_filled) == 2
    assert bool(fast[3].history_compensable.any()) == (option not in ("naive", "unpaired"))


@pytest.mark.parametrize("case", ["fp32-channels_last", "fp32-large-mean", "bf16-autocast"])
def test_cross_iteration_step_low_precision_matches_python_path(case):
    # fp32 / bf16: both paths accumulate in fp32 and agree to fp32 rounding of the statistics; the large-mean case
    # (conv output mean ~ 300 std) takes the shifted cross sums on both paths
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    if case == "fp32-large-mean":
        with torch.no_grad():
            conv.bias.fill_(300.0)
    bn = syncnorm.CrossIterationBatchNorm(4, window=3)
    batches = _cbn_batches(conv, torch.float32, [3, 2, 4, 3, 2], seed=3)
    kw = {"channels_last": case == "fp32-channels_last", "autocast": case == "bf16-autocast"}
    fast, slow = (_cbn_run(conv, bn, batches, python, lr=0.02, **kw) for python in (False, True))
    tol = (2e-2, 2e-2) if case == "bf16-autocast" else (2e-4, 2e-5)
    assert not _cbn_agree(fast, slow, *tol), _cbn_agree(fast, slow, *tol)
    if kw["channels_last"]:
        assert fast[0][0].is_contiguous(memory_format=torch.channels_last)
    if kw["autocast"]:
        assert fast[0][0].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# modules converted to fp16 / bf16 as a whole (.half(), .to(torch.bfloat16)): parameters and buffers in the low
# dtype, as nn.BatchNorm accepts them. The Python path (the only one on CUDA) used to refuse them.
# ---------------------------------------------------------------------------------------------------------------
_LOW_MODULES = {
    "sync": lambda: syncnorm.SyncBatchNorm(6),
    "renorm": lambda: syncnorm.BatchRenorm(6, r_max=1.5, d_max=0.5),
    "cross_minibatch": lambda: syncnorm.CrossMiniBatchNorm(6, accumulation_steps=2),
    "cross_iteration_naive": lambda: syncnorm.CrossIterationBatchNorm(6, window=3, compensate=False),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(_LOW_MODULES))
def test_low_precision_module_matches_python_path(name, dtype):
    layer = _LOW_MODULES[name]()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, 6))
        layer.bias.copy_(torch.linspace(-1, 1, 6))
    layer = layer.to(dtype)
    x, g = _input((4, 6, 5, 5), dtype)
    fast, slow = _run(layer, x, g, steps=3), _run(layer, x, g, steps=3, python=True)
    for r in (fast, slow):
        assert r["y"].dtype == dtype and r["dx"].dtype == dtype and r["dw"].dtype == dtype
        assert r["db"].dtype == dtype and r["running_mean"].dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 4e-2  # one rounding of the output to the input dtype
    assert not _agree(fast, slow, tol, tol), _agree(fast, slow, tol, tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cross_iteration_module_matches_python_path(dtype):
    # compensated CBN with its conv, both converted as a whole
    torch.manual_seed(6)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).to(dtype)
    bn = syncnorm.CrossIterationBatchNorm(4, window=3).to(dtype)
    batches = _cbn_batches(conv, dtype, [3, 2, 4, 3], seed=4)
    fast, slow = (_cbn_run(conv, bn, batches, python, lr=0.02) for python in (False, True))
    tol = (2e-2, 2e-2) if dtype == torch.float16 else (5e-2, 5e-2)
    assert not _cbn_agree(fast, slow, *tol), _cbn_agree(fast, slow, *tol)
    assert fast[0][0].dtype == dtype and slow[0][0].dtype == dtype
    assert bool(fast[3].history_compensable.all()) and bool(slow[3].history_compensable.all())
