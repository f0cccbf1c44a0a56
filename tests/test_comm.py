"""syncnorm.comm: single-process answers, exact sums, and the collectives every layer issues, counted at the backend.

``comm.all_reduce_sum`` is the one collective of the statistics path. Here it is counted where it reaches gloo: the
profiler records each gloo collective as an event named ``gloo:<collective>`` (``gloo:all_reduce``) whose input shape
(``record_shapes=True``) is that of the reduced tensor. Unlike the ``CollectiveLedger`` test of
``tests/test_sync_batchnorm.py``, which wraps ``syncnorm.comm``, this sees collectives issued by any path.

All distributed checks run inside one spawned gloo world per size (spawning costs ~7 s): the worker returns a dict of
observations and the test functions assert on them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import syncnorm
from syncnorm import comm
from tests.dist.harness import run_distributed

C = 4  # channels of the layers under test
SPATIAL = (3, 4)
BATCHES = {  # per-rank batch sizes: uneven, and one rank with an empty batch
    2: [[2, 5], [0, 3]],
    3: [[2, 5, 0]],
}
LAYERS = {
    "SyncBatchNorm": lambda: syncnorm.SyncBatchNorm(C),
    "BatchRenorm": lambda: syncnorm.BatchRenorm(C, r_max=3, d_max=5),
    "CrossMiniBatchNorm": lambda: syncnorm.CrossMiniBatchNorm(C),
    "CrossIterationBatchNorm(window=1)": lambda: syncnorm.CrossIterationBatchNorm(C, window=1),
    "CrossIterationBatchNorm(window=3, compensate=False)":
        lambda: syncnorm.CrossIterationBatchNorm(C, window=3, compensate=False),
}
STEPS = 3  # training steps per layer: later steps use running statistics, the CmBN window or the CBN history

# the conv + CBN pair: grouped conv, so the payload has groups * k and C * k values
CONV = dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2)
CONV_C = CONV["out_channels"]
CONV_K = CONV["in_channels"] // CONV["groups"] * CONV["kernel_size"] ** 2  # C_in / groups * prod(kernel) = 18
CONV_FORWARD_NUMEL = 2 * CONV_C + 2 + CONV["groups"] * CONV_K + CONV_C * CONV_K  # 14 + 36 + 108 = 158


# ---------------------------------------------------------------------------------------------------------------
# counting at the backend
# ---------------------------------------------------------------------------------------------------------------
def backend_collectives(fn):
    """Run ``fn()`` under the CPU profiler; return its result and ``[(event name, input shapes)]`` of every gloo
    collective it issued (events named ``gloo:...``), in order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        result = fn()
    events = [(e.name, [list(s) for s in e.input_shapes]) for e in prof.events() if e.name.startswith("gloo:")]
    return result, events


def numels(events) -> list:
    """Element count of the (single) tensor of each event, or the raw shapes where that is not what was recorded."""
    out = []
    for _, shapes in events:
        if len(shapes) == 1 and len(shapes[0]) == 1:
            out.append(shapes[0][0])
        else:
            out.append(shapes)
    return out


# ---------------------------------------------------------------------------------------------------------------
# world size 1 / not initialised
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_collectives(monkeypatch):
    """Every collective entry point comm could reach raises: a test passes only if none is issued."""
    import torch.distributed._functional_collectives as funcol

    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was issued")

    for mod, names in ((dist, ("all_reduce", "all_gather_object", "broadcast_object_list", "barrier", "new_group")),
                       (funcol, ("all_reduce",))):
        for name in names:
            monkeypatch.setattr(mod, name, forbidden)


def test_not_initialised_single_process_answers(no_collectives):
    assert not dist.is_initialized()
    assert not comm.is_initialized()
    assert comm.get_world_size() == 1 and comm.get_rank() == 0
    assert comm.get_backend() is None
    assert comm.group_ranks() == [0]
    assert comm.new_groups(1) is None
    t = torch.arange(5, dtype=torch.float64)
    before = t.clone()
    out, events = backend_collectives(lambda: comm.all_reduce_sum(t))
    assert out is t and torch.equal(t, before)  # untouched
    assert events == []
    assert comm.all_reduce_max(t) is t and torch.equal(t, before)
    obj = {"a": [1, 2]}
    assert comm.all_gather_object(obj) == [obj]
    assert comm.broadcast_object(obj) is obj
    assert comm.barrier() is None
    assert comm.is_process_group(None) and not comm.is_process_group("world")


def test_not_initialised_layer_issues_nothing(no_collectives):
    layer = syncnorm.SyncBatchNorm(C)
    x = torch.randn(3, C, *SPATIAL, requires_grad=True)
    _, events = backend_collectives(lambda: layer(x).square().sum().backward())
    assert events == [] and x.grad is not None


def test_initialised_world_of_one_issues_nothing(no_collectives):
    """A process group of one rank: all_reduce_sum still returns the tensor untouched without a collective."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert comm.is_initialized() and comm.get_world_size() == 1 and comm.get_rank() == 0
        assert comm.get_backend() == "gloo"
        t = torch.arange(7, dtype=torch.float32)
        before = t.clone()
        out, events = backend_collectives(lambda: comm.all_reduce_sum(t))
        assert out is t and torch.equal(t, before) and events == []
        assert comm.all_gather_object(3) == [3] and comm.broadcast_object("x") == "x"
        comm.barrier()
        layer = syncnorm.SyncBatchNorm(C)
        x = torch.randn(3, C, *SPATIAL, requires_grad=True)
        _, events = backend_collectives(lambda: layer(x).square().sum().backward())
        assert events == []
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# the spawned world
# ---------------------------------------------------------------------------------------------------------------
def _exact_vector(n: int, dtype: torch.dtype, rank: int, seed: int) -> torch.Tensor:
    # integers times 2^-4: every partial sum is exactly representable in fp32 and fp64, so the sum must be exact
    g = torch.Generator().manual_seed(1000 * seed + rank)
    return (torch.randint(-4096, 4096, (n,), generator=g).to(torch.float64) / 16).to(dtype)


def _sum_checks(rank: int, world: int, out: dict) -> None:
    errors = []
    for seed, n in enumerate([1, 7, 2 * C + 2, 1000]):
        for dtype in (torch.float64, torch.float32):
            mine = _exact_vector(n, dtype, rank, seed)
            expected = sum(_exact_vector(n, torch.float64, r, seed) for r in range(world)).to(dtype)
            t = mine.clone()
            got, events = backend_collectives(lambda: comm.all_reduce_sum(t))
            if got is not t:
                errors.append(f"n={n} {dtype}: eager all_reduce_sum should reduce in place and return its input")
            if not torch.equal(got, expected):
                errors.append(f"n={n} {dtype}: sum off by {(got.double() - expected.double()).abs().max():.3g}")
            if [e[0] for e in events] != ["gloo:all_reduce"] or numels(events) != [n]:
                errors.append(f"n={n} {dtype}: backend saw {events}")
    out["sum-errors"] = errors
    out["world_size"] = comm.get_world_size()
    out["rank"] = comm.get_rank()
    out["backend"] = comm.get_backend()
    out["gathered"] = comm.all_gather_object({"rank": rank})
    out["broadcast"] = comm.broadcast_object(f"from rank {rank}", src=0)
    comm.barrier()


def _train_steps(model: nn.Module, make_x, steps: int) -> list:
    """Per training step: (forward events, backward events) at the backend."""
    out = []
    for step in range(steps):
        x = make_x(step).requires_grad_(True)
        y, fwd = backend_collectives(lambda: model(x))
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(step))
        _, bwd = backend_collectives(lambda: (y * g).sum().backward())
        out.append({"fwd": fwd, "bwd": bwd, "grad": x.grad is not None and x.grad.shape == x.shape})
        with torch.no_grad():  # a plain SGD step (no DDP: no collective of its own)
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.01 * p.grad
                    p.grad = None
    return out


def _eval_events(model: nn.Module, x: torch.Tensor) -> list:
    model.eval()
    x = x.clone().requires_grad_(True)

    def run():
        model(x).square().sum().backward()  # eval with autograd
        with torch.no_grad():
            model(x)

    return backend_collectives(run)[1]


def _layer_checks(rank: int, world: int, out: dict) -> None:
    for sizes in BATCHES[world]:
        n = sizes[rank]
        for name, make in LAYERS.items():
            torch.manual_seed(0)
            layer = make()

            def make_x(step):
                gen = torch.Generator().manual_seed(100 * step + rank)
                return torch.randn((n, C) + SPATIAL, generator=gen) * 2 + 1

            key = f"{name}{sizes}"
            out[f"train:{key}"] = _train_steps(layer, make_x, STEPS)
            out[f"eval:{key}"] = _eval_events(layer, make_x(0))

        # CrossIterationBatchNorm with its conv attached and compensation on: the weight-gradient statistics ride
        # in the forward vector
        torch.manual_seed(0)
        model = syncnorm.convert(nn.Sequential(nn.Conv2d(**CONV), nn.BatchNorm2d(CONV_C)), "cross_iteration",
                                 window=3)
        bn = model[1]
        out[f"cbn-paired:{sizes}"] = (type(bn).__name__, bn.paired_conv is model[0], bn.compensate, bn.window)

        def make_conv_x(step):
            gen = torch.Generator().manual_seed(100 * step + rank)
            return torch.randn((n, CONV["in_channels"], 5, 5), generator=gen)

        out[f"train:cbn-conv{sizes}"] = _train_steps(model, make_conv_x, STEPS)
        out[f"history:cbn-conv{sizes}"] = (int(bn.history_filled), bool(bn.history_compensable.any()))
        out[f"eval:cbn-conv{sizes}"] = _eval_events(model, make_conv_x(0))


def _world_worker(rank: int, world: int) -> dict:
    out: dict = {}
    _sum_checks(rank, world, out)
    _layer_checks(rank, world, out)
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def world_results(request):
    world = request.param
    return world, run_distributed(_world_worker, world, timeout=240)


def test_all_reduce_sum_is_exact_and_one_backend_collective(world_results):
    world, results = world_results
    for rank, r in enumerate(results):
        assert r["sum-errors"] == [], f"rank {rank}: {r['sum-errors']}"


def test_helpers_in_a_world(world_results):
    world, results = world_results
    for rank, r in enumerate(results):
        assert (r["world_size"], r["rank"], r["backend"]) == (world, rank, "gloo")
        assert r["gathered"] == [{"rank": i} for i in range(world)]
        assert r["broadcast"] == "from rank 0"


def _assert_one_per_direction(key: str, steps: list, forward_numel: int, backward_numel: int, rank: int) -> None:
    assert len(steps) == STEPS
    for i, s in enumerate(steps):
        where = f"rank {rank}, {key}, step {i}"
        # exactly one collective per direction, and it is the all-reduce
        assert [e[0] for e in s["fwd"]] == ["gloo:all_reduce"], f"{where}: forward issued {s['fwd']}"
        assert [e[0] for e in s["bwd"]] == ["gloo:all_reduce"], f"{where}: backward issued {s['bwd']}"
        assert numels(s["fwd"]) == [forward_numel], f"{where}: forward {s['fwd']}"
        assert numels(s["bwd"]) == [backward_numel], f"{where}: backward {s['bwd']}"
        assert s["grad"], f"{where}: no input gradient"


@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer_one_all_reduce_per_direction(world_results, layer):
    """Training: one all-reduce in forward (2C + 2 fp64 values) and one in backward (2C), on every rank, whatever the
    batch sizes (an empty batch still joins both); at most 2C + 8 values either way."""
    world, results = world_results
    for sizes in BATCHES[world]:
        key = f"train:{layer}{sizes}"
        for rank, r in enumerate(results):
            _assert_one_per_direction(key, r[key], 2 * C + 2, 2 * C, rank)
            assert all(max(numels(s["fwd"]) + numels(s["bwd"])) <= 2 * C + 8 for s in r[key])
        assert all(r[key] == results[0][key] for r in results), f"{key}: the ranks issued different collectives"


@pytest.mark.parametrize("layer", list(LAYERS) + ["cbn-conv"])
def test_eval_issues_no_collective(world_results, layer):
    world, results = world_results
    for sizes in BATCHES[world]:
        for rank, r in enumerate(results):
            assert r[f"eval:{layer}{sizes}"] == [], f"rank {rank}, {layer}{sizes}: eval issued collectives"


def test_cross_iteration_with_conv_carries_weight_gradient_statistics(world_results):
    """convert(Sequential(conv, bn), "cross_iteration", window=3): the forward vector is 2C + 2 + groups*k + C*k
    values (k = C_in / groups * prod(kernel)), still one all-reduce per direction; the backward stays 2C."""
    world, results = world_results
    for sizes in BATCHES[world]:
        for rank, r in enumerate(results):
            assert r[f"cbn-paired:{sizes}"] == ("CrossIterationBatchNorm", True, True, 3)
            _assert_one_per_direction(f"cbn-conv{sizes}", r[f"train:cbn-conv{sizes}"], CONV_FORWARD_NUMEL,
                                      2 * CONV_C, rank)
            # the steps did record compensable history (so the compensated path ran in steps 2 and 3)
            assert r[f"history:cbn-conv{sizes}"] == (2, True)
