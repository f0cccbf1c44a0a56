"""CrossMiniBatchNorm (CmBN) against float64 references (its multi-process checks share the world of
tests/test_cross_iteration.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import syncnorm
from syncnorm.stats import merge_all, moments_of
from tests.oracle import compare, grad_weights, make_batches, reference_bn
from tests.test_cross_iteration import ref_with_prior

CmBN = syncnorm.CrossMiniBatchNorm
C = 4


def _layer(**kw):
    layer = CmBN(C, **kw).double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, C))
        layer.bias.copy_(torch.linspace(-1, 1, C))
    return layer


@pytest.mark.parametrize("how", ["accumulation_steps=1", "reset"])
@pytest.mark.parametrize("spatial", [(), (3, 4), (2, 2, 3)], ids=["1d", "2d", "3d"])
def test_single_micro_batch_is_batchnorm(how, spatial):
    layer = _layer(accumulation_steps=1) if how != "reset" else _layer()
    (x,) = make_batches([6], C, spatial, 0)
    (g,) = grad_weights([6], C, spatial, 0)
    xa = x.clone().requires_grad_(True)
    for _ in range(2):
        if how == "reset":
            layer.reset()
        y = layer(xa)
    (y * g).sum().backward()
    ref = reference_bn(x, g, layer.weight, layer.bias, steps=2)
    for name, a, b in [("y", y, ref["y"]), ("dx", xa.grad, ref["dx"]), ("dw", layer.weight.grad, ref["dw"]),
                       ("db", layer.bias.grad, ref["db"]), ("rm", layer.running_mean, ref["running_mean"]),
                       ("rv", layer.running_var, ref["running_var"])]:
        assert compare(name, a, b, 1e-9, 1e-10) is None


@pytest.mark.parametrize("sizes", [[3, 3, 3, 3], [2, 5, 0, 1]])
def test_micro_batch_k_uses_cumulative_window_stats(sizes):
    S = len(sizes)
    layer = _layer(accumulation_steps=S)
    xs = make_batches(sizes, C, (3, 3), 1)
    gs = grad_weights(sizes, C, (3, 3), 1)
    bn_ref = nn.BatchNorm2d(C).double()
    for k, (x, g) in enumerate(zip(xs, gs)):
        xa = x.clone().requires_grad_(True)
        y = layer(xa)
        (y * g).sum().backward()
        earlier = [m for m in map(moments_of, xs[:k]) if float(m.count) > 0]
        ref = ref_with_prior(x, merge_all(earlier) if earlier else None, layer.weight, layer.bias, g)
        assert compare(f"y{k}", y, ref["y"], 1e-9, 1e-10) is None
        assert compare(f"dx{k}", xa.grad, ref["dx"], 1e-9, 1e-10) is None
        assert compare(f"dw{k}", layer.weight.grad, ref["dw"], 1e-9, 1e-10) is None
        layer.zero_grad()
        if x.shape[0]:
            bn_ref(x)  # running statistics follow each micro-batch's own statistics, as BatchNorm's
    # at the last micro-batch (frozen weights) the statistics are those of the whole window batch
    full = moments_of(torch.cat(xs))
    used = layer.last_info.used
    torch.testing.assert_close(used.mean, full.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(used.var(), full.var(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_mean, bn_ref.running_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.running_var, bn_ref.running_var, rtol=1e-10, atol=1e-12)
    assert int(layer.num_batches_tracked) == int(bn_ref.num_batches_tracked)


def test_windows_reset_automatically_and_by_reset():
    xs = make_batches([2] * 7, C, (4,), 2)
    layer = _layer(accumulation_steps=3)
    for i, x in enumerate(xs):
        layer(x)
        start = i - i % 3
        expected = moments_of(torch.cat(xs[start:i + 1]))
        torch.testing.assert_close(layer.last_info.used.mean, expected.mean, rtol=1e-12, atol=1e-12)
        assert int(layer.window_forwards) == i % 3 + 1
    manual = _layer()  # accumulation_steps=None: only reset() ends windows
    for i, x in enumerate(xs):
        if i in (0, 2):
            manual.reset()
        manual(x)
    torch.testing.assert_close(manual.window_moments().mean, moments_of(torch.cat(xs[2:])).mean)
    # eval does not touch the window
    before = manual.window_moments()
    manual.eval()(xs[0])
    assert torch.equal(manual.window_moments().m2, before.m2)
    with pytest.raises(ValueError, match=r"CrossMiniBatchNorm\(4\): accumulation_steps must be None or an int >= 1, "
                                         "got 0"):
        manual.accumulation_steps = 0


def test_checkpoint_mid_window_resumes_bit_identically():
    torch.manual_seed(0)
    xs = [torch.randn(3, C, 5) * 2 + 1 for _ in range(7)]
    net = nn.Sequential(nn.Conv1d(C, C, 3), CmBN(C, accumulation_steps=4), nn.ReLU(), nn.Conv1d(C, 2, 1))
    ref = copy.deepcopy(net)

    def step(model, x):
        y = model(x)
        y.square().mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
                p.grad = None
        return y.detach()

    full = [step(ref, x) for x in xs]
    head = [step(net, x) for x in xs[:2]]  # mid-window: 2 of 4 micro-batches
    ckpt = copy.deepcopy(net.state_dict())
    assert {"1.window_count", "1.window_mean", "1.window_m2", "1.window_forwards"} <= set(ckpt)
    torch.manual_seed(123)
    resumed = nn.Sequential(nn.Conv1d(C, C, 3), CmBN(C, accumulation_steps=4), nn.ReLU(), nn.Conv1d(C, 2, 1))
    resumed.load_state_dict(ckpt)
    tail = [step(resumed, x) for x in xs[2:]]
    for a, b in zip(head + tail, full):
        assert torch.equal(a, b)


def test_empty_micro_batch_and_state_dict_keys():
    layer = _layer(accumulation_steps=3)
    x = make_batches([4], C, (2,), 3)[0]
    layer(x)
    before = layer.window_moments()
    y = layer(torch.zeros(0, C, 2, dtype=torch.float64))
    assert y.shape == (0, C, 2)
    assert torch.equal(layer.window_moments().mean, before.mean) and int(layer.window_forwards) == 2
    assert set(nn.BatchNorm1d(C).state_dict()) <= set(layer.state_dict())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("python", [False, True], ids=["active-path", "python-path"])
def test_low_precision_module_keeps_exact_window_counts(dtype, python):
    # .half() / .to(bf16) casts every floating buffer of a module; a float16 count would overflow at 65504 values
    # per channel (bfloat16 is inexact above 256). The window's fp64 moments keep their dtype; the affine
    # parameters and running statistics follow the module, as in nn.BatchNorm.
    layer = syncnorm.CrossMiniBatchNorm(3, accumulation_steps=4).to(dtype)
    assert layer.weight.dtype == layer.running_mean.dtype == dtype
    assert layer.window_count.dtype == layer.window_mean.dtype == layer.window_m2.dtype == torch.float64
    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(2, 3, 128, 130, generator=g, dtype=torch.float64) * (1 + k) + k).to(dtype) for k in range(3)]
    previous = syncnorm.ops.set_kernels_enabled(False) if python else None
    try:
        ys = [layer(x) for x in xs]
    finally:
        if python:
            syncnorm.ops.set_kernels_enabled(previous)
    per_batch = 2 * 128 * 130  # 33280 values per channel: the third micro-batch takes the window past 65504
    assert float(layer.window_count) == 3 * per_batch
    full = torch.cat([x.double() for x in xs])
    ref = torch.nn.functional.batch_norm(full, None, None, training=True)[2 * xs[0].shape[0]:]
    assert ys[2].dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    assert compare("y", ys[2], ref, tol, tol) is None, compare("y", ys[2], ref, tol, tol)


def test_cross_iteration_low_precision_module_keeps_fp64_history():
    layer = syncnorm.CrossIterationBatchNorm(4, window=3).half()
    for name in ("history_count", "history_mean", "history_var", "history_mean_at", "history_var_at"):
        assert getattr(layer, name).dtype == torch.float64, name
    assert layer.history_dvar.dtype == layer.weight.dtype == torch.float16
    assert layer.history_next.dtype == torch.long
    layer.float()  # and back: still fp64, parameters float32
    assert layer.history_count.dtype == torch.float64 and layer.weight.dtype == torch.float32
