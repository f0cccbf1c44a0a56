"""BatchRenorm against nn.BatchNorm (r_max=1, d_max=0), a float64 formula reference and, across ranks, itself on the
concatenated batch."""

from __future__ import annotations

import itertools

import copy
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import syncnorm
from syncnorm import schedules
from syncnorm.stats import PeerInputError
from tests.dist.harness import REFERENCE_TAG, CollectiveLedger, on_both_implementations, run_distributed
from tests.oracle import compare, grad_weights, make_batches, reference_bn

C = 4
SHAPES = {"1d": (), "1d-seq": (5,), "2d": (3, 4), "3d": (2, 3, 2)}
# running statistics far enough from the data's (make_batches: std 2, means -2.5..3.5) that r and d need clipping
# on some channels and not on others with the bounds below
RUNNING_MEAN = torch.tensor([-2.0, -1.0, 1.0, 4.0], dtype=torch.float64)
RUNNING_VAR = torch.tensor([0.5, 4.0, 3.9, 20.0], dtype=torch.float64)
BOUNDS = [(2.0, 1.0), (1.5, 0.5)]  # (r_max, d_max) of step 1 and step 2


def _dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def reference_brn(steps, g, weight, bias, running_mean, running_var, bounds, momentum=0.1, eps=1e-5,
                  detach_rd=True):
    """float64 Batch Renormalization written from the formulas, autograd through it with r and d detached.

    ``steps`` is the list of (whole-batch) inputs of successive training forwards, ``bounds`` their (r_max, d_max).
    The loss ``sum(y * g)`` of the last step is back-propagated.
    """
    w = weight.detach().double().clone().requires_grad_(True)
    b = bias.detach().double().clone().requires_grad_(True)
    rm, rv = running_mean.detach().double().clone(), running_var.detach().double().clone()
    out = {"r": [], "d": [], "clipped": []}
    for i, (x_step, (r_max, d_max)) in enumerate(zip(steps, bounds)):
        x = x_step.detach().double().clone().requires_grad_(True)
        dims = _dims(x)
        view = [1, -1] + [1] * (x.dim() - 2)
        mu_b = x.mean(dims)
        var_b = x.var(dims, unbiased=False)
        sigma_b = torch.sqrt(var_b + eps)
        sigma = torch.sqrt(rv + eps)
        r_raw, d_raw = sigma_b / sigma, (mu_b - rm) / sigma
        r = r_raw.clamp(1 / r_max, r_max)
        d = d_raw.clamp(-d_max, d_max)
        if detach_rd:
            r, d = r.detach(), d.detach()
        x_hat = (x - mu_b.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
        y = w.view(view) * x_hat + b.view(view)
        out["r"].append(r.detach())
        out["d"].append(d.detach())
        clipped = (r_raw <= 1 / r_max) | (r_raw >= r_max) | (d_raw <= -d_max) | (d_raw >= d_max)
        out["clipped"].append(float(clipped.double().mean()))
        mom = 1.0 / (i + 1) if momentum is None else momentum
        with torch.no_grad():
            rm = (1 - mom) * rm + mom * mu_b
            rv = (1 - mom) * rv + mom * x.var(dims, unbiased=True)  # unbiased, whole-batch count
    (y * g.double()).sum().backward()
    out.update(y=y.detach(), dx=x.grad.detach(), dw=w.grad.detach(), db=b.grad.detach(), running_mean=rm,
               running_var=rv, num_batches_tracked=len(steps))
    return out


def _make_layer(momentum=0.1, r_max=1.0, d_max=0.0, dtype=torch.float64, **kw) -> syncnorm.BatchRenorm:
    layer = syncnorm.BatchRenorm(C, momentum=momentum, r_max=r_max, d_max=d_max, **kw).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, C))
        layer.bias.copy_(torch.linspace(-1, 1, C))
        layer.running_mean.copy_(RUNNING_MEAN)
        layer.running_var.copy_(RUNNING_VAR)
    return layer


def _run_steps(layer, steps, g, bounds):
    """Training forwards of ``layer`` over ``steps`` with the given bounds; backward of sum(y * g) at the last."""
    rs, ds, clipped = [], [], []
    for x_step, (r_max, d_max) in zip(steps, bounds):
        layer.r_max, layer.d_max = r_max, d_max
        x = x_step.clone().requires_grad_(True)
        y = layer(x)
        rs.append(layer.last_info.r.clone())
        ds.append(layer.last_info.d.clone())
        clipped.append(layer.clip_fraction())
    (y * g).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw": getattr(layer.weight, "grad", None),
            "db": getattr(layer.bias, "grad", None),
            "running_mean": layer.running_mean.clone(), "running_var": layer.running_var.clone(),
            "num_batches_tracked": int(layer.num_batches_tracked), "r": rs, "d": ds, "clipped": clipped}


def _mismatches(got: dict, ref: dict, rtol=1e-9, atol=1e-10, grads=("dx", "dw", "db")) -> list[str]:
    errs = [compare(k, got[k], ref[k], rtol, atol) for k in ("y", *grads, "running_mean", "running_var")]
    for i, (r, rr, d, dr) in enumerate(zip(got["r"], ref["r"], got["d"], ref["d"])):
        errs += [compare(f"r[{i}]", r, rr, rtol, atol), compare(f"d[{i}]", d, dr, rtol, atol)]
    if got["clipped"] != pytest.approx(ref["clipped"]):
        errs.append(f"clip_fraction {got['clipped']} != {ref['clipped']}")
    if got["num_batches_tracked"] != ref["num_batches_tracked"]:
        errs.append(f"num_batches_tracked {got['num_batches_tracked']} != {ref['num_batches_tracked']}")
    return [e for e in errs if e]


# ---------------------------------------------------------------------------------------------------------------
# single process
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_unit_bounds_equal_batchnorm(spatial, momentum):
    """r_max = 1, d_max = 0: outputs, all gradients and running statistics are nn.BatchNorm's, in float64."""
    (x,) = make_batches([6], C, spatial, 3)
    (g,) = grad_weights([6], C, spatial, 3)
    layer = _make_layer(momentum)
    got = _run_steps(layer, [x, x], g, [(1.0, 0.0)] * 2)
    ref = reference_bn(x, g, layer.weight, layer.bias, RUNNING_MEAN, RUNNING_VAR, momentum=momentum, steps=2)
    for k in ("y", "dx", "dw", "db", "running_mean", "running_var"):
        msg = compare(k, got[k], ref[k], 1e-9, 1e-10)
        assert msg is None, msg
    assert got["num_batches_tracked"] == ref["num_batches_tracked"] == 2
    assert all(torch.equal(r, torch.ones(C, dtype=torch.float64)) for r in got["r"])
    assert all(torch.equal(d, torch.zeros(C, dtype=torch.float64)) for d in got["d"])


@pytest.mark.parametrize("spatial", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_clipping_matches_formula_reference(spatial, momentum):
    """Clipping active on some channels: float64 formula reference, r and d detached, bounds changed between steps."""
    steps = [make_batches([5], C, spatial, 10 + i)[0] for i in range(2)]
    (g,) = grad_weights([5], C, spatial, 10)
    layer = _make_layer(momentum)
    got = _run_steps(layer, steps, g, BOUNDS)
    ref = reference_brn(steps, g, layer.weight, layer.bias, RUNNING_MEAN, RUNNING_VAR, BOUNDS, momentum)
    errs = _mismatches(got, ref)
    assert not errs, errs
    # the case is informative: some channels clipped, some not, and r, d away from the BatchNorm values
    assert max(got["clipped"]) > 0.0 and min(got["clipped"]) < 1.0, got["clipped"]
    assert not torch.allclose(got["r"][0], torch.ones(C, dtype=torch.float64))
    assert not torch.allclose(got["d"][0], torch.zeros(C, dtype=torch.float64))


@pytest.mark.parametrize("bounds", [(1.0, 0.0), BOUNDS[0]])
def test_no_affine(bounds):
    (x,) = make_batches([5], C, (3,), 12)
    (g,) = grad_weights([5], C, (3,), 12)
    layer = syncnorm.BatchRenorm(C, affine=False).double()
    with torch.no_grad():
        layer.running_mean.copy_(RUNNING_MEAN)
        layer.running_var.copy_(RUNNING_VAR)
    got = _run_steps(layer, [x], g, [bounds])
    ref = reference_brn([x], g, torch.ones(C), torch.zeros(C), RUNNING_MEAN, RUNNING_VAR, [bounds])
    errs = _mismatches(got, ref, grads=("dx",))
    assert not errs, errs


def test_r_and_d_carry_no_gradient():
    """Letting the gradient flow through r and d gives a different dx: the detached reference is the one we match."""
    (x,) = make_batches([6], C, (3, 3), 4)
    (g,) = grad_weights([6], C, (3, 3), 4)
    bounds = [(3.0, 2.0)]  # wide bounds: r and d unclipped on most channels, so their gradient would matter
    layer = _make_layer()
    got = _run_steps(layer, [x], g, bounds)
    detached = reference_brn([x], g, layer.weight, layer.bias, RUNNING_MEAN, RUNNING_VAR, bounds)
    through = reference_brn([x], g, layer.weight, layer.bias, RUNNING_MEAN, RUNNING_VAR, bounds, detach_rd=False)
    assert compare("dx", got["dx"], detached["dx"], 1e-9, 1e-10) is None
    assert compare("dx", got["dx"], through["dx"], 1e-3, 1e-3) is not None
    assert got["clipped"][0] < 1.0


def test_no_clipping_reaches_identity_on_running_stats():
    """r_max = d_max = inf: x_hat = (x - mu) / sigma with the running statistics in training."""
    (x,) = make_batches([6], C, (3,), 5)
    layer = _make_layer(r_max=math.inf, d_max=math.inf)
    y = layer(x)
    expected = F.batch_norm(x, RUNNING_MEAN, RUNNING_VAR, layer.weight, layer.bias, False, 0.0, layer.eps)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-10)
    assert layer.clip_fraction() == 0.0


def test_clip_fraction():
    layer = _make_layer()
    assert layer.clip_fraction() == 0.0  # no training forward yet
    (x,) = make_batches([4], C, (3,), 6)
    layer(x)
    assert layer.clip_fraction() == 1.0  # r_max = 1, d_max = 0 clips every channel
    layer.r_max, layer.d_max = 100.0, 100.0
    layer(x)
    assert layer.clip_fraction() == 0.0
    layer(torch.zeros(0, C, 3, dtype=torch.float64))  # empty global batch: nothing clipped, stats untouched
    assert layer.clip_fraction() == 0.0
    assert int(layer.num_batches_tracked) == 2


def test_eval_is_batchnorm_eval_and_state_dict_compatible():
    layer = _make_layer(r_max=2.0, d_max=1.0, dtype=torch.float32)
    ref = nn.BatchNorm2d(C)
    assert set(layer.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(layer.state_dict(), strict=True)
    back = syncnorm.BatchRenorm(C)
    back.load_state_dict(ref.state_dict(), strict=True)
    layer.eval(), ref.eval(), back.eval()
    x = torch.randn(3, C, 5, 5)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(back(x), ref(x), rtol=0, atol=0)


def test_empty_batch_leaves_running_stats():
    layer = _make_layer(r_max=2.0, d_max=1.0)
    x = torch.zeros(0, C, 3, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert int(layer.num_batches_tracked) == 0
    torch.testing.assert_close(layer.running_mean, RUNNING_MEAN, rtol=0, atol=0)


@pytest.mark.parametrize("name, value, exc", [
    ("r_max", 0.5, ValueError), ("r_max", 0.0, ValueError), ("r_max", float("nan"), ValueError),
    ("d_max", -0.1, ValueError), ("d_max", float("nan"), ValueError),
    ("r_max", "2", TypeError), ("d_max", None, TypeError), ("r_max", True, TypeError),
])
def test_bad_bounds_rejected(name, value, exc):
    with pytest.raises(exc, match=f"BatchRenorm\\(4\\).*{name}"):
        syncnorm.BatchRenorm(C, **{name: value})
    layer = syncnorm.BatchRenorm(C, r_max=2.0, d_max=1.0)
    with pytest.raises(exc, match=f"BatchRenorm\\(4\\): {name} must be"):
        setattr(layer, name, value)
    assert (layer.r_max, layer.d_max) == (2.0, 1.0)  # unchanged after a rejected assignment


def test_bound_error_message_and_accepted_values():
    layer = syncnorm.BatchRenorm(C)
    with pytest.raises(ValueError, match=r"BatchRenorm\(4\): r_max must be >= 1, got 0.5"):
        layer.r_max = 0.5
    for r, d in [(1, 0), (np.float64(2.5), np.float32(0.5)), (torch.tensor(3.0), torch.tensor(1)),
                 (math.inf, math.inf)]:
        layer.r_max, layer.d_max = r, d
        assert type(layer.r_max) is float and type(layer.d_max) is float
        assert (layer.r_max, layer.d_max) == (float(r), float(d))
    assert "r_max" not in layer.state_dict() and "d_max" not in layer.state_dict()
    with pytest.raises(ValueError, match="track_running_stats must be True"):
        syncnorm.BatchRenorm(C, track_running_stats=False)


@pytest.mark.parametrize("bad, exc, needle", [
    (torch.randn(5), ValueError, "expected at least 2D"),
    (torch.randn(2, C + 1, 3), ValueError, f"expected {C} channels in dim 1, got {C + 1}"),
    (torch.ones(2, C, 3, dtype=torch.int64), TypeError, "floating-point"),
])
@pytest.mark.parametrize("training", [True, False])
def test_bad_input_errors(bad, exc, needle, training):
    layer = syncnorm.BatchRenorm(C, r_max=2.0).train(training)
    with pytest.raises(exc, match=needle) as info:
        layer(bad)
    assert "BatchRenorm(4)" in str(info.value)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        syncnorm.BatchRenorm(C)(torch.randn(1, C))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input(dtype):
    (x64,) = make_batches([4], C, (6, 6), 7)
    (g,) = grad_weights([4], C, (6, 6), 7)
    x_low = x64.to(dtype)
    layer = _make_layer(dtype=torch.float32)
    got = _run_steps(layer, [x_low], g.to(dtype), BOUNDS[:1])
    assert got["y"].dtype == dtype and got["dx"].dtype == dtype
    assert layer.running_mean.dtype == torch.float32 and got["r"][0].dtype == torch.float64  # r, d reported in fp64
    ref = reference_brn([x_low.double()], g.to(dtype).double(), layer.weight, layer.bias, RUNNING_MEAN,
                        RUNNING_VAR, BOUNDS[:1])
    tol = 3e-2 if dtype == torch.bfloat16 else 4e-3
    errs = _mismatches(got, ref, rtol=tol, atol=tol, grads=("dx",))
    errs += [compare("dw", got["dw"], ref["dw"], 1e-4, 1e-3)]  # fp32 sums of the rounded grads
    errs += [compare("running_mean", got["running_mean"], ref["running_mean"], 1e-5, 1e-6)]
    assert not [e for e in errs if e], errs


@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d"])
def test_channels_last_preserved(layout):
    fmt = getattr(torch, layout)
    spatial = (5, 6) if layout == "channels_last" else (2, 5, 6)
    (x,) = make_batches([3], C, spatial, 8)
    (g,) = grad_weights([3], C, spatial, 8)
    layer = _make_layer()
    got = _run_steps(layer, [x.contiguous(memory_format=fmt)], g, BOUNDS[:1])
    assert got["y"].is_contiguous(memory_format=fmt) and got["dx"].is_contiguous(memory_format=fmt)
    ref = reference_brn([x], g, layer.weight, layer.bias, RUNNING_MEAN, RUNNING_VAR, BOUNDS[:1])
    errs = _mismatches(got, ref)
    assert not errs, errs


@pytest.mark.parametrize("r_max, d_max", [(1.5, 0.5), (1.0, 0.0)])
def test_functional_batch_renorm_agrees_with_layer(r_max, d_max):
    """Bit for bit, including r_max = 1, d_max = 0, where the layer skips the r/d arithmetic and the function not."""
    (x,) = make_batches([5], C, (4,), 9)
    (g,) = grad_weights([5], C, (4,), 9)
    layer = _make_layer()
    got = _run_steps(layer, [x], g, [(r_max, d_max)])
    w, b = layer.weight.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True)
    rm, rv, nbt = RUNNING_MEAN.clone(), RUNNING_VAR.clone(), torch.tensor(0)
    xf = x.clone().requires_grad_(True)
    y_f, info = syncnorm.functional.batch_renorm(xf, rm, rv, w, b, True, 0.1, 1e-5, r_max, d_max,
                                                 num_batches_tracked=nbt)
    (y_f * g).sum().backward()
    for name, a, e in [("y", got["y"], y_f), ("dx", got["dx"], xf.grad), ("dw", got["dw"], w.grad),
                       ("db", got["db"], b.grad), ("rv", got["running_var"], rv), ("r", got["r"][0], info.r),
                       ("d", got["d"][0], info.d)]:
        assert torch.equal(a, e), name
    assert int(nbt) == got["num_batches_tracked"] == 1


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = syncnorm.BatchRenorm(6)
        self.block = nn.Sequential(nn.Conv2d(6, 5, 3, stride=2), syncnorm.BatchRenorm(5, momentum=None))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv(x)))
        return self.head(F.relu(self.block(x)).mean((2, 3)))


def _train(model, schedule, steps, g, lr=0.1):
    """Plain SGD steps (hand-written: torch.optim's first use imports torch._dynamo, seconds of test time)."""
    trace = []
    for step in steps:
        schedules.apply_schedule(model, schedule, step)
        xb = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 + 1
        yb = torch.randint(0, 3, (2,), generator=g)
        model.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-lr)
        trace.append((loss.item(), model.bn1.r_max, model.bn1.d_max, model.bn1.clip_fraction()))
    return trace


def test_state_dict_round_trip_mid_run_loses_nothing():
    """Checkpoint after 6 of 12 steps, restore into a fresh model, re-apply the schedule: bit-identical run."""
    schedule = schedules.paper_renorm_schedule(start_step=2, r_max_step=10, d_max_step=7, r_max=2.0, d_max=1.0)
    torch.manual_seed(0)
    model = _Net().double()
    init = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(1)
    straight = _train(model, schedule, range(12), g)

    first = _Net().double()
    first.load_state_dict(init)
    g = torch.Generator().manual_seed(1)
    part1 = _train(first, schedule, range(6), g)
    ckpt = pickle.loads(pickle.dumps({"model": first.state_dict(), "step": 6, "rng": g.get_state()}))
    resumed = _Net().double()  # fresh layers: r_max = 1, d_max = 0 until the schedule is applied
    resumed.load_state_dict(ckpt["model"], strict=True)
    part2 = _train(resumed, schedule, range(ckpt["step"], 12), g)

    assert part1 + part2 == straight
    for (k, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert (resumed.block[1].r_max, resumed.block[1].d_max) == schedule(11)
    # the run exercised the ramp: bounds moved, and clipping went from total to partial
    assert straight[0][1:3] == (1.0, 0.0) and straight[-1][1:3] == (2.0, 1.0)
    assert straight[0][3] == 1.0 and min(t[3] for t in straight) < 1.0
    # and resuming without re-applying the schedule would not have been the same run
    stale = _Net().double()
    stale.load_state_dict(ckpt["model"])
    g.set_state(ckpt["rng"])
    stale_trace = _train(stale, schedules.constant(), range(6, 12), g)
    assert [t[0] for t in stale_trace] != [t[0] for t in part2]


def test_deepcopy_and_pickle():
    layer = syncnorm.BatchRenorm(C, r_max=2.0, d_max=0.5)
    layer(torch.randn(3, C, 2))
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert (clone.r_max, clone.d_max) == (2.0, 0.5)
        assert clone.clip_fraction() == layer.clip_fraction()
    assert "r_max=2, d_max=0.5" in repr(layer)


# ---------------------------------------------------------------------------------------------------------------
# multi-process: one spawned world per world size runs every check
# ---------------------------------------------------------------------------------------------------------------
CASES = {
    2: [[1, 1], [2, 5], [3, 0]],
    3: [[3, 0, 5], [1, 2, 1], [0, 4, 0]],
}
DIST_SHAPES = {"1d": (), "2d": (3, 2), "3d": (2, 2, 2)}


def _case_data(sizes, spatial):
    seed = sum(sizes) * 7 + len(spatial)
    steps = [make_batches(sizes, C, spatial, seed + 100 * i) for i in range(2)]
    gs = grad_weights(sizes, C, spatial, seed)
    return steps, gs


def _oracle_checks(rank: int, world: int, results: dict) -> None:
    for sizes in CASES[world]:
        for dim_name, spatial in DIST_SHAPES.items():
            for momentum in (0.1, None):
                steps, gs = _case_data(sizes, spatial)
                layer = _make_layer(momentum)
                results[f"oracle{sizes}-{dim_name}-m{momentum}"] = _run_steps(
                    layer, [s[rank] for s in steps], gs[rank], BOUNDS)


def _ledger_checks(rank: int, world: int, results: dict) -> None:
    net = nn.Sequential(nn.Conv2d(3, C, 3), syncnorm.BatchRenorm(C, r_max=2.0, d_max=1.0), nn.ReLU(),
                        nn.Conv2d(C, C, 1), syncnorm.BatchRenorm(C))
    x = torch.randn(2 + rank, 3, 6, 6)
    with CollectiveLedger() as ledger:
        y = net(x)
        fwd = list(ledger.entries)
        ledger.clear()
        y.sum().backward()
        bwd = list(ledger.entries)
        ledger.clear()
        net[1].clip_fraction()
        schedules.apply_schedule(net, schedules.paper_renorm_schedule(1, 4, 3), 2)
        other = list(ledger.entries)
        net.eval()
        with torch.no_grad():
            net(x)
        ev = list(ledger.entries)
    results["ledger"] = {"fwd": fwd, "bwd": bwd, "other": other, "eval": ev}


def _layout_and_error_checks(rank: int, world: int, results: dict) -> None:
    sizes = [2 + r for r in range(world)]
    sizes[-1] = 0
    steps, gs = _case_data(sizes, (4, 5))
    layer = _make_layer()
    results["channels_last"] = _run_steps(
        layer, [s[rank].contiguous(memory_format=torch.channels_last) for s in steps], gs[rank], BOUNDS)
    results["channels_last-kept"] = results["channels_last"]["y"].is_contiguous(memory_format=torch.channels_last)

    layer = syncnorm.BatchRenorm(C, r_max=2.0)
    bad = torch.randn(3, C + 2, 2) if rank == world - 1 else torch.randn(3, C, 2)
    try:
        layer(bad)
        results["peer-error"] = "no error raised"
    except PeerInputError as e:
        results["peer-error"] = ("peer", str(e))
    except ValueError as e:
        results["peer-error"] = ("own", str(e))
    y = layer(torch.zeros(0, C, 2))  # all ranks empty: the group is still usable and nothing is counted
    results["all-empty"] = (tuple(y.shape), int(layer.num_batches_tracked), layer.clip_fraction())


def _world_worker(rank: int, world: int) -> dict:
    results: dict = {}
    on_both_implementations(_oracle_checks, rank, world, results, merge=False)
    _ledger_checks(rank, world, results)
    on_both_implementations(_layout_and_error_checks, rank, world, results, merge=False)
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def world_results(request):
    world = request.param
    return world, run_distributed(_world_worker, world, timeout=240)


def _single_process(sizes, spatial, momentum, layout=None):
    """Single-process BatchRenorm on the concatenated batch (and the formula reference) for one case."""
    steps, gs = _case_data(sizes, spatial)
    full = [torch.cat(s) for s in steps]
    if layout is not None:
        full = [t.contiguous(memory_format=layout) for t in full]
    layer = _make_layer(momentum)
    got = _run_steps(layer, full, torch.cat(gs), BOUNDS)
    ref = reference_brn(full, torch.cat(gs), layer.weight, layer.bias, RUNNING_MEAN, RUNNING_VAR, BOUNDS, momentum)
    return got, ref


def _rank_vs_single(results, sizes, key, single):
    """Mismatches of every rank's result against the single-process one (dw, db summed over ranks)."""
    errs = []
    for rank, r in enumerate(results):
        off = sum(sizes[:rank])
        part = dict(single, y=single["y"][off:off + sizes[rank]], dx=single["dx"][off:off + sizes[rank]])
        errs += [f"rank {rank}: {e}" for e in _mismatches(r[key], part, grads=("dx",))]
    for k in ("dw", "db"):
        total = sum(r[key][k] for r in results)
        msg = compare(f"{k}(sum over ranks)", total, single[k], 1e-9, 1e-9)
        if msg:
            errs.append(msg)
    return errs


def test_distributed_oracle(world_results):
    """Uneven batches, one rank empty: every rank equals single-process BatchRenorm on the concatenated batch."""
    world, results = world_results
    n_checks = 0
    failures = {}
    for sizes in CASES[world]:
        for dim_name, spatial in DIST_SHAPES.items():
            for momentum, tag in itertools.product((0.1, None), ("", REFERENCE_TAG)):
                key = f"oracle{sizes}-{dim_name}-m{momentum}{tag}"
                single, ref = _single_process(sizes, spatial, momentum)
                errs = _rank_vs_single(results, sizes, key, single) + _mismatches(single, ref)
                # informative: some channel clipped and some channel not, in one of the two steps
                assert max(single["clipped"]) > 0.0 and min(single["clipped"]) < 1.0, (key, single["clipped"])
                # identical r and d on every rank, bit for bit
                for r in results[1:]:
                    for a, b in zip(r[key]["r"] + r[key]["d"], results[0][key]["r"] + results[0][key]["d"]):
                        if not torch.equal(a, b):
                            errs.append("r/d differ across ranks")
                if errs:
                    failures[key] = errs
                n_checks += 1
    assert n_checks == len(CASES[world]) * len(DIST_SHAPES) * 2 * 2  # C++ kernels and reference implementation
    assert any(0 in sizes for sizes in CASES[world])
    assert not failures, failures


def test_distributed_collective_ledger(world_results):
    world, results = world_results
    ledgers = [r["ledger"] for r in results]
    assert all(ledger == ledgers[0] for ledger in ledgers), "collectives differ across ranks"
    led = ledgers[0]
    # two BatchRenorm layers: one all-reduce each forward and backward, exactly SyncBatchNorm's, none elsewhere
    assert [e[0] for e in led["fwd"]] == ["all_reduce_sum"] * 2, led["fwd"]
    assert [e[0] for e in led["bwd"]] == ["all_reduce_sum"] * 2, led["bwd"]
    assert [e[1] for e in led["fwd"]] == [2 * C + 2] * 2
    assert [e[1] for e in led["bwd"]] == [2 * C] * 2
    assert led["other"] == [] and led["eval"] == []


def test_distributed_channels_last(world_results):
    world, results = world_results
    sizes = [2 + r for r in range(world)]
    sizes[-1] = 0
    single, _ = _single_process(sizes, (4, 5), 0.1, layout=torch.channels_last)
    for tag in ("", REFERENCE_TAG):
        errs = _rank_vs_single(results, sizes, "channels_last" + tag, single)
        assert not errs, (tag, errs)
        assert all(r["channels_last-kept" + tag] for r in results[:-1]), tag


def test_distributed_errors_and_empty(world_results):
    world, results = world_results
    for tag in ("", REFERENCE_TAG):
        peer = [r["peer-error" + tag] for r in results]
        assert peer[-1][0] == "own" and f"expected {C} channels in dim 1, got {C + 2}" in peer[-1][1], peer
        assert all(p[0] == "peer" for p in peer[:-1]), peer
        assert all(r["all-empty" + tag] == ((0, C, 2), 0, 0.0) for r in results), [r["all-empty" + tag]
                                                                                   for r in results]
