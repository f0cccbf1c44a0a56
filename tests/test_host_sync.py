"""A training step reads nothing on the host: no layer's forward or backward calls an op that copies a device value
to the host (``.item()``, ``float(t)``, ``if t:``, boolean-mask indexing, ``nonzero``, ...).

On CUDA such a read stops the host until the device catches up; the GPU check (tests/test_cuda.py) runs a step under
``torch.cuda.set_sync_debug_mode("error")``. Here the same property is checked on CPU tensors, where a dispatch mode
sees every aten op a step issues. On CPU :func:`syncnorm.stats.require` reads its value at once by design (it costs
nothing there), so the test swaps it (``require_each``, which ``require`` calls) for its accelerator / compiled form
(``torch._assert_async``), which needs no host
read. Every layer is covered, over several steps: SyncBatchNorm, BatchRenorm with clipping, CmBN over a 2-step window,
and CBN through burn-in, recording and compensated pooling (with ``set_step`` and a checkpoint reload in between).

Blind spot: ``.tolist()`` and ``.numpy()`` read a CPU tensor's memory without an aten op, so the probe cannot see them
(on CUDA tensors they start with a device-to-host copy, which it would see); syncnorm's layers call neither.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import syncnorm
from syncnorm import functional, ops, stats

_cpu_require_each = stats.require_each  # the CPU form, which reads its values at once

aten = torch.ops.aten
# ops whose result needs a device value on the host (or a host-visible, data-dependent shape)
_HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
               aten.masked_select.default, aten.item.default}


class _HostReads(TorchDispatchMode):
    """Records every op of the block that reads a tensor's value on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS:
            self.reads.append(str(func))
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.reads.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


def _device_style_require_each(values, checks):
    for i, check in enumerate(checks):
        torch._assert_async(check.ok(values[i]), check.message(None))


@pytest.fixture
def deferred_checks(monkeypatch):
    monkeypatch.setattr(stats, "require_each", _device_style_require_each)
    monkeypatch.setattr(functional, "require_each", _device_style_require_each)


def _net(target: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU())
    return syncnorm.convert(net, target, **kwargs).train()


CASES = {
    "sync": {},
    "renorm": {"r_max": 1.5, "d_max": 0.5},
    "cross_minibatch": {"accumulation_steps": 2},
    "cross_iteration": {"window": 3, "burn_in": 3},
}


@pytest.mark.parametrize("implementation", ["kernels", "reference"])
@pytest.mark.parametrize("target", list(CASES))
def test_training_step_reads_nothing_on_the_host(deferred_checks, target, implementation):
    net = _net(target, **CASES[target])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with ops.use_kernels(implementation == "kernels"):
        for step in range(6):
            if target == "cross_iteration" and step == 4:
                # a reload (reads the counters once, at load time: not a training step) and an explicit step
                state = copy.deepcopy(net.state_dict())
                net.load_state_dict(state)
                for m in net.modules():
                    if isinstance(m, syncnorm.CrossIterationBatchNorm):
                        m.set_step(step)
            x = torch.randn(2 + step % 2, 3, 8, 8) * 3 + 1
            with _HostReads() as probe:
                y = net(x)
                (y * torch.randn_like(y)).sum().backward()
            assert probe.reads == [], f"{target}, step {step + 1}: host reads {probe.reads}"
            opt.step()
            opt.zero_grad()
    if target == "cross_iteration":
        bn = net[1]
        # the steps went through burn-in (no recording before step 2), recorded, and pooled a full history
        assert int(bn.step) == 6 and int(bn.history_filled) == 2 and bool(bn.history_compensable.all())
    if target == "renorm":
        assert any(m.clip_fraction() > 0 for m in net.modules() if isinstance(m, syncnorm.BatchRenorm))


def test_the_probe_sees_host_reads(deferred_checks):
    # the probe is not blind: a value read, a truth test and a boolean mask are each reported
    t = torch.arange(4.0)
    with _HostReads() as probe:
        float(t.sum())
        bool(t[0] > 1)
        t[t > 1].sum()
    assert len(probe.reads) == 3, probe.reads
    # the CPU form of require_each reads its values (which is why this file swaps it); the device form does not
    check = (t.sum().reshape(1), [stats.Check(lambda v: v < 0, lambda s: s >= 0, lambda v: "negative")])
    with _HostReads() as probe:
        _cpu_require_each(*check)
    assert len(probe.reads) == 1, probe.reads
    with _HostReads() as probe:
        stats.require_each(*check)
    assert probe.reads == []


# ----------------------------------------------------------------------------------------------- the data path

_VIEWS = {"aten.select", "aten.slice", "aten.unbind", "aten.expand", "aten.detach", "aten.view", "aten.alias",
          "aten._unsafe_view", "aten.as_strided"}


class _Ops(TorchDispatchMode):
    """Records the ops of a block that compute something (not views, not the CPU-only host reads of the checks)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name not in _VIEWS and func is not aten._local_scalar_dense.default:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layer", ["sync", "renorm"])
def test_a_step_is_the_custom_ops(layer):
    """A training step of SyncBatchNorm / BatchRenorm is syncnorm's custom ops and nothing else: forward
    batch_stats -> (collective) -> forward_epilogue -> normalize, backward backward_reduce -> (collective) ->
    backward_apply. On CUDA that is four kernels and one collective per direction (the two reductions are two
    kernels each), where each small torch op would have been a launch."""
    make = {"sync": lambda: syncnorm.SyncBatchNorm(8),
            "renorm": lambda: syncnorm.BatchRenorm(8, r_max=2.0, d_max=1.0)}[layer]
    bn = make()
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    bn(x)  # a first step (lazy state)
    with _Ops() as fwd:
        y = bn(x)
    dy = torch.randn_like(y)
    with _Ops() as bwd:
        y.backward(dy)
    assert fwd.ops == ["syncnorm.batch_stats", "syncnorm.forward_epilogue", "syncnorm.normalize"], fwd.ops
    assert bwd.ops == ["syncnorm.backward_reduce", "syncnorm.backward_apply"], bwd.ops


def test_cross_iteration_bookkeeping_is_two_custom_ops():
    """A CBN training step (window 4, compensated, past burn-in) runs its history bookkeeping as two custom ops:
    cbn_prior before the statistics, cbn_record after the normalisation. What else its forward dispatches is the
    weight-sized work the compensation needs (the conv weight-gradient statistics, two products with the weights,
    the derivatives): a bounded number of ops, where the plain-torch bookkeeping was about 90 (this test fails if
    it comes back)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    bn = syncnorm.CrossIterationBatchNorm(8, window=4, burn_in=2).attach(conv)
    x = torch.randn(4, 3, 6, 6)
    for _ in range(4):  # past burn-in: the history is pooled and recorded
        bn(conv(x)).sum().backward()
    h = conv(x)
    with _Ops() as fwd:
        y = bn(h)
    mine = [op for op in fwd.ops if op.startswith("syncnorm.")]
    assert mine == ["syncnorm.cbn_prior", "syncnorm.batch_stats", "syncnorm.forward_epilogue", "syncnorm.normalize",
                    "syncnorm.cbn_record"], fwd.ops
    work = [op for op in fwd.ops if op not in ("aten.unsqueeze", "aten.permute", "aten.promote_types")]  # (views)
    assert len(work) <= 50, (len(work), work)
    with _Ops() as bwd:
        y.backward(torch.randn_like(y))
    assert [op for op in bwd.ops if op.startswith("syncnorm.")] == ["syncnorm.backward_reduce",
                                                                     "syncnorm.backward_apply"], bwd.ops
