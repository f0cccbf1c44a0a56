"""SyncBatchNorm against float64 nn.BatchNorm on the concatenated batch, single- and multi-process."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import syncnorm
from syncnorm.stats import PeerInputError
from tests.dist.harness import CollectiveLedger, on_both_implementations, run_distributed
from tests.oracle import compare, grad_weights, make_batches, reference_bn

C = 4
SHAPES = {"1d": (), "1d-seq": (5,), "2d": (3, 4), "3d": (2, 3, 2)}


# ---------------------------------------------------------------------------------------------------------------
# single process: world size 1 is nn.BatchNorm
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("seed", [0, 1])
def test_world1_matches_batchnorm(spatial, momentum, seed):
    (x,) = make_batches([6], C, spatial, seed)
    (g,) = grad_weights([6], C, spatial, seed)
    layer = syncnorm.SyncBatchNorm(C, momentum=momentum).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    xa = x.clone().requires_grad_(True)
    for _ in range(2):
        y = layer(xa)
    (y * g).sum().backward()
    ref = reference_bn(x, g, layer.weight, layer.bias, momentum=momentum, steps=2)
    for name, a, b in [("y", y, ref["y"]), ("dx", xa.grad, ref["dx"]), ("dw", layer.weight.grad, ref["dw"]),
                       ("db", layer.bias.grad, ref["db"]), ("rm", layer.running_mean, ref["running_mean"]),
                       ("rv", layer.running_var, ref["running_var"])]:
        msg = compare(name, a, b, rtol=1e-9, atol=1e-10)
        assert msg is None, msg
    assert int(layer.num_batches_tracked) == ref["num_batches_tracked"] == 2


def test_eval_is_batchnorm_eval_and_state_dict_keys():
    layer = syncnorm.SyncBatchNorm(C)
    ref = nn.BatchNorm2d(C)
    with torch.no_grad():
        for t in (layer.running_mean, layer.running_var, layer.weight, layer.bias):
            t.uniform_(0.5, 2.0)
    ref.load_state_dict(layer.state_dict(), strict=True)
    assert set(layer.state_dict()) == set(ref.state_dict())
    layer.eval(), ref.eval()
    x = torch.randn(3, C, 5, 5)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)


def test_no_running_stats_eval_uses_batch_stats():
    layer = syncnorm.SyncBatchNorm(C, track_running_stats=False).eval()
    ref = nn.BatchNorm2d(C, track_running_stats=False).eval()
    x = torch.randn(3, C, 5, 5)
    torch.testing.assert_close(layer(x), ref(x))


@pytest.mark.parametrize("bad, exc, needle", [
    (torch.randn(5), ValueError, "expected at least 2D"),
    (torch.randn(2, C + 1, 3), ValueError, f"expected {C} channels in dim 1, got {C + 1}"),
    (torch.ones(2, C, 3, dtype=torch.int64), TypeError, "floating-point"),
])
@pytest.mark.parametrize("training", [True, False])
def test_bad_input_errors(bad, exc, needle, training):
    layer = syncnorm.SyncBatchNorm(C).train(training)
    with pytest.raises(exc, match=needle) as info:
        layer(bad)
    assert "SyncBatchNorm(4)" in str(info.value)


def test_one_value_per_channel_raises_like_batchnorm():
    layer = syncnorm.SyncBatchNorm(C)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, C))
    with pytest.raises(ValueError):
        nn.BatchNorm1d(C)(torch.randn(1, C))


def test_empty_batch_leaves_running_stats():
    layer = syncnorm.SyncBatchNorm(C)
    x = torch.zeros(0, C, 3, 3, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert int(layer.num_batches_tracked) == 0
    torch.testing.assert_close(layer.running_mean, torch.zeros(C))


@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d"])
def test_channels_last_preserved(layout):
    fmt = getattr(torch, layout)
    shape = (3, C, 5, 6) if layout == "channels_last" else (3, C, 2, 5, 6)
    x = torch.randn(shape, dtype=torch.float64).to(memory_format=fmt).requires_grad_(True)
    layer = syncnorm.SyncBatchNorm(C).double()
    y = layer(x)
    assert y.is_contiguous(memory_format=fmt)
    g = torch.randn(shape, dtype=torch.float64)
    (y * g).sum().backward()
    assert x.grad.is_contiguous(memory_format=fmt)
    ref = reference_bn(x.detach().contiguous(), g, layer.weight, layer.bias)
    assert compare("y", y, ref["y"], 1e-9, 1e-10) is None
    assert compare("dx", x.grad, ref["dx"], 1e-9, 1e-10) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_fp32_stats(dtype):
    x64 = torch.randn(4, C, 6, 6, dtype=torch.float64) * 3 + 2
    x = x64.to(dtype).requires_grad_(True)
    layer = syncnorm.SyncBatchNorm(C)
    y = layer(x)
    assert y.dtype == dtype
    assert layer.running_mean.dtype == torch.float32
    g = torch.randn_like(x64)
    (y.double() * g).sum().backward()
    assert x.grad.dtype == dtype
    ref = reference_bn(x.detach().double(), g, layer.weight, layer.bias)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert compare("y", y, ref["y"], tol, tol) is None
    assert compare("dx", x.grad, ref["dx"], tol, tol) is None
    # statistics come from the fp32-accumulated moments of the rounded input
    assert compare("rm", layer.running_mean, ref["running_mean"], 1e-5, 1e-6) is None


def test_autocast_bf16_cpu():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), syncnorm.SyncBatchNorm(C))
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert net[1].weight.grad.dtype == torch.float32
    assert torch.isfinite(net[0].weight.grad).all()
    conv_out = net[0](x).detach().to(torch.bfloat16).double()  # what the layer saw (bf16 conv output)
    torch.testing.assert_close(net[1].running_mean.double(), 0.1 * conv_out.mean((0, 2, 3)), rtol=1e-2, atol=2e-3)



@pytest.mark.parametrize("python", [False, True], ids=["active-path", "python-path"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_converted_to_low_precision_matches_native(dtype, python):
    # .half() / .to(bf16) on the whole module: parameters and buffers in the low dtype, as nn.BatchNorm allows
    torch.manual_seed(0)
    ours, native = syncnorm.SyncBatchNorm(C).to(dtype), nn.BatchNorm2d(C).to(dtype)
    x = (torch.randn(4, C, 5, 5) * 2 + 1).to(dtype)
    g = torch.randn(4, C, 5, 5)  # fixed upstream gradient (a loss like y.square() has db = 2 sum y ~ rounding noise)
    previous = syncnorm.ops.set_kernels_enabled(False) if python else None
    try:
        outs = []
        for layer in (ours, native):
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            (y.float() * g).sum().backward()
            outs.append((y, xi.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var))
    finally:
        if python:
            syncnorm.ops.set_kernels_enabled(previous)
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    for name, a, b in zip(("y", "dx", "dw", "db", "running_mean", "running_var"), *outs):
        assert a.dtype == dtype, (name, a.dtype)
        assert compare(name, a, b, tol, tol) is None, compare(name, a, b, tol, tol)

@pytest.mark.parametrize("path", ["cpu-kernels", "python"])
@pytest.mark.parametrize("case", ["mean1e4", "tiny_var"])
def test_numerics_fp32_against_fp64(case, path):
    if path == "python":
        previous = syncnorm.ops.set_kernels_enabled(False)
        try:
            _numerics_fp32_against_fp64(case)
        finally:
            syncnorm.ops.set_kernels_enabled(previous)
    else:
        assert syncnorm.ops.cpu_kernels_available(), "the CPU kernels did not build"
        _numerics_fp32_against_fp64(case)


def _numerics_fp32_against_fp64(case):
    g = torch.Generator().manual_seed(3)
    if case == "mean1e4":
        x64 = torch.randn(8, C, 7, 7, generator=g, dtype=torch.float64) + 1e4
    else:
        x64 = torch.randn(8, C, 7, 7, generator=g, dtype=torch.float64) * (1e-7) ** 0.5
    x32 = x64.float()
    layer = syncnorm.SyncBatchNorm(C, eps=1e-5)
    y = layer(x32)
    ref = reference_bn(x32.double(), torch.ones_like(x64), layer.weight, layer.bias, eps=1e-5)
    assert compare("y", y, ref["y"], 1e-4, 1e-4) is None
    assert compare("rv", layer.running_var, ref["running_var"], 1e-4, 1e-9) is None
    assert compare("rm", layer.running_mean, ref["running_mean"], 1e-6, 1e-9) is None


# ---------------------------------------------------------------------------------------------------------------
# multi-process: one spawned world runs many checks
# ---------------------------------------------------------------------------------------------------------------
CASES = {
    2: [[1, 1], [2, 5], [3, 0]],
    3: [[3, 0, 5], [1, 2, 1], [0, 4, 0]],
}


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def _oracle_checks(rank: int, world: int, results: dict, tag: str = "") -> None:
    for sizes in CASES[world]:
        for dim_name, spatial in SHAPES.items():
            for momentum in (0.1, None):
                key = f"oracle{tag}{sizes}-{dim_name}-m{momentum}"
                seed = sum(sizes) * 7 + len(spatial)
                xs = make_batches(sizes, C, spatial, seed)
                gs = grad_weights(sizes, C, spatial, seed)
                layer = syncnorm.SyncBatchNorm(C, momentum=momentum).double()
                with torch.no_grad():
                    layer.weight.copy_(torch.linspace(0.5, 1.5, C))
                    layer.bias.copy_(torch.linspace(-1, 1, C))
                x = xs[rank].clone().requires_grad_(True)
                y = layer(x)
                y = layer(x)  # second step: running stats accumulate
                (y * gs[rank]).sum().backward()
                ref = reference_bn(torch.cat(xs), torch.cat(gs), layer.weight, layer.bias, momentum=momentum, steps=2)
                off = sum(sizes[:rank])
                sl = slice(off, off + sizes[rank])
                errs = [
                    compare("y", y, ref["y"][sl], 1e-9, 1e-10),
                    compare("dx", x.grad, ref["dx"][sl], 1e-9, 1e-10),
                    compare("dw(sum over ranks)", _all_reduce_(layer.weight.grad.clone()), ref["dw"], 1e-9, 1e-9),
                    compare("db(sum over ranks)", _all_reduce_(layer.bias.grad.clone()), ref["db"], 1e-9, 1e-9),
                    compare("running_mean", layer.running_mean, ref["running_mean"], 1e-9, 1e-10),
                    compare("running_var", layer.running_var, ref["running_var"], 1e-9, 1e-10),
                ]
                if int(layer.num_batches_tracked) != ref["num_batches_tracked"]:
                    errs.append(f"num_batches_tracked {int(layer.num_batches_tracked)} != {ref['num_batches_tracked']}")
                results[key] = "; ".join(e for e in errs if e) or None


def _ledger_checks(rank: int, world: int, results: dict) -> None:
    net = nn.Sequential(nn.Conv2d(3, C, 3), syncnorm.SyncBatchNorm(C), nn.ReLU(), nn.Conv2d(C, C, 1),
                        syncnorm.SyncBatchNorm(C))
    x = torch.randn(2 + rank, 3, 6, 6)
    with CollectiveLedger() as ledger:
        y = net(x)
        fwd = list(ledger.entries)
        ledger.clear()
        y.sum().backward()
        bwd = list(ledger.entries)
        ledger.clear()
        net.eval()
        with torch.no_grad():
            net(x)
        ev = list(ledger.entries)
    results["ledger"] = {"fwd": fwd, "bwd": bwd, "eval": ev}


def _layout_and_precision_checks(rank: int, world: int, results: dict) -> None:
    sizes = [2 + r for r in range(world)]
    for fmt_name, spatial in (("channels_last", (4, 5)), ("channels_last_3d", (2, 3, 4))):
        fmt = getattr(torch, fmt_name)
        xs = make_batches(sizes, C, spatial, 11)
        gs = grad_weights(sizes, C, spatial, 11)
        layer = syncnorm.SyncBatchNorm(C).double()
        x = xs[rank].contiguous(memory_format=fmt).requires_grad_(True)
        y = layer(x)
        (y * gs[rank]).sum().backward()
        ref = reference_bn(torch.cat(xs), torch.cat(gs), layer.weight, layer.bias)
        off = sum(sizes[:rank])
        sl = slice(off, off + sizes[rank])
        errs = [compare("y", y, ref["y"][sl], 1e-9, 1e-10), compare("dx", x.grad, ref["dx"][sl], 1e-9, 1e-10)]
        if not y.is_contiguous(memory_format=fmt):
            errs.append("output lost the memory format")
        results[f"layout-{fmt_name}"] = "; ".join(e for e in errs if e) or None

    # autocast bf16: statistics in fp32, output bf16, global over ranks
    xs = make_batches(sizes, C, (4, 4), 12, dtype=torch.float32)
    layer = syncnorm.SyncBatchNorm(C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xs[rank].to(torch.bfloat16))
    full = torch.cat(xs).to(torch.bfloat16).double()
    errs = [compare("running_mean", layer.running_mean, 0.1 * full.mean((0, 2, 3)), 1e-5, 1e-6)]
    if y.dtype != torch.bfloat16:
        errs.append(f"autocast output dtype {y.dtype}")
    results["autocast-bf16"] = "; ".join(e for e in errs if e) or None

    # numerics: mean 1e4 / unit variance, and variance 1e-7 with eps 1e-5, fp32 input against float64
    for case, loc, scale in (("mean1e4", 1e4, 1.0), ("tiny-var", 0.0, (1e-7) ** 0.5)):
        xs = [t.float() for t in make_batches(sizes, C, (5, 5), 13, loc=loc, scale=scale)]
        layer = syncnorm.SyncBatchNorm(C, eps=1e-5)
        # per-channel offsets of make_batches would dominate the tiny variance: remove them
        xs = [t - t.new_tensor(torch.linspace(-3, 3, C)).view(1, C, 1, 1) for t in xs]
        y = layer(xs[rank])
        full = torch.cat(xs).double()
        ref = reference_bn(full, torch.ones_like(full), layer.weight, layer.bias, eps=1e-5)
        off = sum(sizes[:rank])
        errs = [compare("y", y, ref["y"][off:off + sizes[rank]], 1e-4, 1e-4),
                compare("running_var", layer.running_var, ref["running_var"], 1e-4, 1e-10)]
        results[f"numerics-{case}"] = "; ".join(e for e in errs if e) or None


def _error_checks(rank: int, world: int, results: dict) -> None:
    layer = syncnorm.SyncBatchNorm(C)
    # one value per channel across the whole group: same ValueError on every rank
    x = torch.randn(1 if rank == 0 else 0, C)
    try:
        layer(x)
        results["count1"] = "no error raised"
    except ValueError as e:
        results["count1"] = ("ok", str(e).split(" (input size")[0])
    # all ranks empty: empty output, running stats untouched
    y = layer(torch.zeros(0, C, 2))
    results["all-empty"] = None if (y.shape == (0, C, 2) and int(layer.num_batches_tracked) == 0) else "bad"
    # invalid input on one rank only: that rank gets the detailed error, the others PeerInputError, nobody hangs
    bad = torch.randn(3, C + 2, 2) if rank == world - 1 else torch.randn(3, C, 2)
    try:
        layer(bad)
        results["peer-error"] = "no error raised"
    except PeerInputError as e:
        results["peer-error"] = ("peer", str(e))
    except ValueError as e:
        results["peer-error"] = ("own", str(e))
    # a non-tensor input on one rank, for every synchronising layer: the same (it used to fail with an
    # AttributeError before the collective, leaving the peers waiting)
    outcomes = []
    for make in (syncnorm.SyncBatchNorm, syncnorm.BatchRenorm, syncnorm.CrossMiniBatchNorm,
                 syncnorm.CrossIterationBatchNorm):
        other = make(C)
        bad = [[0.0] * C] * 3 if rank == world - 1 else torch.randn(3, C, 2)
        try:
            other(bad)
            outcomes.append(("none", ""))
        except PeerInputError as e:
            outcomes.append(("peer", str(e)))
        except TypeError as e:
            outcomes.append(("own", str(e)))
    results["peer-nontensor"] = outcomes
    # the group is still usable afterwards
    y = layer(torch.randn(3, C, 2))
    results["after-error"] = None if y.shape == (3, C, 2) else "bad shape"


class _TinyNet(nn.Module):
    def __init__(self, norm) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = norm(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1, stride=2)
        self.bn2 = norm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def _ddp_parity_check(rank: int, world: int, results: dict) -> None:
    torch.manual_seed(0)
    ref = _TinyNet(nn.BatchNorm2d).double()
    model = _TinyNet(syncnorm.SyncBatchNorm).double()
    model.load_state_dict(ref.state_dict())
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    per_rank = 2
    for _ in range(5):
        xb = torch.randn(world * per_rank, 3, 8, 8, generator=g, dtype=torch.float64)
        yb = torch.randint(0, 3, (world * per_rank,), generator=g)
        local = slice(rank * per_rank, (rank + 1) * per_rank)
        opt.zero_grad()
        F.cross_entropy(ddp(xb[local]), yb[local]).backward()
        opt.step()
        ref_opt.zero_grad()
        F.cross_entropy(ref(xb), yb).backward()
        ref_opt.step()
    errs = []
    for (name, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        msg = compare(name, p, q, 1e-5, 1e-5)
        if msg:
            errs.append(msg)
    results["ddp-parity"] = "; ".join(errs) or None


def _world_worker(rank: int, world: int) -> dict:
    results: dict = {}
    _oracle_checks(rank, world, results)
    # the same checks on the Python path (what runs on CUDA, or on CPU without the C++ kernels)
    previous = syncnorm.ops.set_kernels_enabled(False)
    try:
        _oracle_checks(rank, world, results, tag="-python-path")
    finally:
        syncnorm.ops.set_kernels_enabled(previous)
    _ledger_checks(rank, world, results)
    on_both_implementations(_layout_and_precision_checks, rank, world, results)
    on_both_implementations(_error_checks, rank, world, results)
    if world == 2:
        _ddp_parity_check(rank, world, results)
    return results


def _subgroup_worker(rank: int, world: int) -> dict:
    group = syncnorm.comm.new_groups(2)
    layer = syncnorm.SyncBatchNorm(C, process_group=group).double()
    xs = make_batches([3, 2, 4, 1], C, (3,), 21)
    layer(xs[rank])
    mine = 0 if rank < 2 else 1
    full = torch.cat(xs[2 * mine:2 * mine + 2])
    ref = reference_bn(full, torch.ones_like(full), layer.weight, layer.bias)
    err = compare("running_mean", layer.running_mean, ref["running_mean"], 1e-9, 1e-10)
    err2 = compare("running_var", layer.running_var, ref["running_var"], 1e-9, 1e-10)
    return {"err": err or err2, "running_mean": layer.running_mean.clone(), "group_size": layer.world_size}


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def world_results(request):
    world = request.param
    return world, run_distributed(_world_worker, world, timeout=240)


def test_distributed_oracle(world_results):
    world, results = world_results
    failures = {k: v for r in results for k, v in r.items() if k.startswith("oracle") and v is not None}
    n_checks = sum(1 for k in results[0] if k.startswith("oracle"))
    assert n_checks == len(CASES[world]) * len(SHAPES) * 2 * 2  # both paths
    assert not failures, failures


def test_distributed_collective_ledger(world_results):
    world, results = world_results
    ledgers = [r["ledger"] for r in results]
    assert all(ledger == ledgers[0] for ledger in ledgers), "collectives differ across ranks"
    fwd, bwd, ev = ledgers[0]["fwd"], ledgers[0]["bwd"], ledgers[0]["eval"]
    # two SyncBatchNorm layers: exactly one all-reduce each in forward and in backward, none in eval
    assert [e[0] for e in fwd] == ["all_reduce_sum", "all_reduce_sum"], fwd
    assert [e[0] for e in bwd] == ["all_reduce_sum", "all_reduce_sum"], bwd
    assert ev == []
    # O(C): 2C + 2 values forward, 2C backward, whatever the world size
    assert [e[1] for e in fwd] == [2 * C + 2] * 2
    assert [e[1] for e in bwd] == [2 * C] * 2


@pytest.mark.parametrize("check", ["layout-channels_last", "layout-channels_last_3d", "autocast-bf16",
                                   "numerics-mean1e4", "numerics-tiny-var", "all-empty", "after-error"])
def test_distributed_checks(world_results, check):
    _, results = world_results
    for rank, r in enumerate(results):
        assert r[check] is None, f"rank {rank}: {r[check]}"


def test_distributed_errors_same_on_every_rank(world_results):
    world, results = world_results
    count1 = [r["count1"] for r in results]
    assert all(c[0] == "ok" for c in count1), count1
    assert len({c[1] for c in count1}) == 1, count1
    peer = [r["peer-error"] for r in results]
    assert peer[-1][0] == "own" and f"expected {C} channels in dim 1, got {C + 2}" in peer[-1][1], peer
    assert all(p[0] == "peer" for p in peer[:-1]), peer
    for outcomes in (r["peer-nontensor"] for r in results[:-1]):
        assert [o[0] for o in outcomes] == ["peer"] * 4, outcomes
    for kind, message in results[-1]["peer-nontensor"]:
        assert kind == "own" and "expected a torch.Tensor input, got list" in message, results[-1]["peer-nontensor"]


def test_distributed_ddp_training_parity(world_results):
    world, results = world_results
    if world != 2:
        pytest.skip("DDP parity runs in the 2-rank world")
    for rank, r in enumerate(results):
        assert r["ddp-parity"] is None, f"rank {rank}: {r['ddp-parity']}"


def test_subgroups_of_two():
    results = run_distributed(_subgroup_worker, 4, timeout=120)
    for rank, r in enumerate(results):
        assert r["err"] is None, f"rank {rank}: {r['err']}"
        assert r["group_size"] == 2
    torch.testing.assert_close(results[0]["running_mean"], results[1]["running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(results[2]["running_mean"], results[3]["running_mean"], rtol=0, atol=0)
    assert not torch.allclose(results[0]["running_mean"], results[2]["running_mean"])


def test_new_groups_rejects_bad_sizes():
    with pytest.raises(ValueError, match="group_size"):
        syncnorm.comm.new_groups(2)  # not initialised: only 1 is possible
    with pytest.raises(TypeError):
        syncnorm.comm.new_groups(2.0)
    assert syncnorm.comm.new_groups(1) is None


def test_deepcopy_and_pickle():
    import pickle

    layer = syncnorm.SyncBatchNorm(C)
    layer(torch.randn(3, C, 2))
    copy.deepcopy(layer)
    pickle.loads(pickle.dumps(layer))


@pytest.mark.parametrize("loc, scale", [(0.0, 1.0), (1e4, 1.0), (3.0, 1e-3)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernel", "reference"])
def test_batch_moments_match_float64(loc, scale, channels_last, kernels):
    """Both implementations of the statistics op give the moments of float64, also for a mean far above the spread."""
    from syncnorm.stats import moments_of

    g = torch.Generator().manual_seed(7)
    x64 = torch.randn(5, C, 6, 7, generator=g, dtype=torch.float64) * scale + loc
    x = x64.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref_mean = x.double().mean((0, 2, 3))
    ref_var = x.double().var((0, 2, 3), unbiased=False)
    with syncnorm.ops.use_kernels(kernels):
        m = moments_of(x)
    # errors relative to the spread of the data, not to the mean
    assert compare("mean", m.mean, ref_mean, 1e-7, 1e-6 * scale) is None
    assert compare("var", m.var(), ref_var, 1e-5, 0.0) is None


@pytest.mark.parametrize("python", [False, True], ids=["active-path", "python-path"])
@pytest.mark.parametrize("to", ["sync", "renorm", "cross_minibatch", "cross_iteration"])
def test_double_backward_raises_instead_of_dropping_terms(to, python):
    # The backward of every syncnorm layer runs outside autograd (its collective has no graph). With
    # create_graph=True the first-order gradients must still be exact, and differentiating them again must raise:
    # before, the C++ path returned gradients without a graph and a gradient penalty silently lost this layer's terms.
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C))
    x = torch.randn(4, 3, 6, 6)
    previous = syncnorm.ops.set_kernels_enabled(False) if python else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # renorm's default schedule note
            model = syncnorm.convert(copy.deepcopy(base), to)
        twin = copy.deepcopy(model)  # the same state: CBN / CmBN layers change theirs with every training forward
        twin(x).square().mean().backward()
        plain = [p.grad for p in twin.parameters()]
        grads = torch.autograd.grad(model(x).square().mean(), list(model.parameters()), create_graph=True)
        for g, p in zip(grads, plain):
            assert g is not None and torch.allclose(g.detach(), p, rtol=1e-5, atol=1e-6)
        penalty = sum(g.square().sum() for g in grads)
        with pytest.raises(RuntimeError, match="backward through syncnorm.backward_(apply|reduce).default but no autograd formula"):
            penalty.backward()
    finally:
        if python:
            syncnorm.ops.set_kernels_enabled(previous)


@pytest.mark.parametrize("cls", ["SyncBatchNorm", "BatchRenorm", "CrossIterationBatchNorm", "CrossMiniBatchNorm"])
@pytest.mark.parametrize("kwargs,error,message", [
    ({"eps": "x"}, TypeError, r"\(4\): eps must be a real number > 0, got str 'x'"),
    ({"eps": float("nan")}, ValueError, r"\(4\): eps must be a finite number > 0, got nan"),
    ({"eps": 0.0}, ValueError, r"\(4\): eps must be a finite number > 0, got 0.0"),
    ({"eps": True}, TypeError, r"\(4\): eps must be a real number > 0, got bool"),
    ({"momentum": "0.1"}, TypeError, r"\(4\): momentum must be a real number in \[0, 1\] or None, got str"),
    ({"momentum": float("nan")}, ValueError, r"\(4\): momentum must be in \[0, 1\] or None, got nan"),
    ({"momentum": 1.5}, ValueError, r"\(4\): momentum must be in \[0, 1\] or None, got 1.5"),
    ({"process_group": "world"}, TypeError, r"\(4\): process_group must be None or a torch.distributed.ProcessGroup"),
    ({"process_group": 1}, TypeError, r"\(4\): process_group must be None or .*got int 1"),
])
def test_bad_eps_momentum_and_group_raise_naming_the_layer(cls, kwargs, error, message):
    # a string eps used to fail inside a comparison with no name, and eps=nan was accepted (NaN outputs)
    with pytest.raises(error, match=cls + message):
        getattr(syncnorm, cls)(4, **kwargs)
    layer = getattr(syncnorm, cls)(4, eps=1, momentum=1)  # ints are fine and stored as floats
    assert type(layer.eps) is float and type(layer.momentum) is float


@pytest.mark.parametrize("cls", ["SyncBatchNorm", "BatchRenorm", "CrossIterationBatchNorm", "CrossMiniBatchNorm"])
@pytest.mark.parametrize("module_dtype,input_dtype", [(torch.float32, torch.float64), (torch.float16, torch.float32),
                                                      (torch.bfloat16, torch.float32)])
def test_eval_takes_the_dtype_combinations_training_takes(cls, module_dtype, input_dtype):
    # training accepts them (it computes in the input's dtype, fp32 at least); eval used to raise "mixed dtype"
    # from F.batch_norm, so a model trained for an epoch failed at its first validation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CBN without a conv
        layer = getattr(syncnorm, cls)(C).to(module_dtype)
        x = torch.randn(4, C, 5, 5, dtype=input_dtype) * 2 + 1
        assert layer(x).dtype == input_dtype  # a training step
    layer.eval()
    y = layer(x)
    target = input_dtype
    ref = F.batch_norm(x, layer.running_mean.to(target), layer.running_var.to(target), layer.weight.to(target),
                       layer.bias.to(target), False, 0.0, layer.eps)
    assert y.dtype == input_dtype
    torch.testing.assert_close(y, ref)


@pytest.mark.filterwarnings("ignore:.*no conv attached")  # CrossIterationBatchNorm alone: naive averaging
@pytest.mark.parametrize("make", [syncnorm.SyncBatchNorm, syncnorm.BatchRenorm, syncnorm.CrossMiniBatchNorm,
                                  syncnorm.CrossIterationBatchNorm], ids=lambda c: c.__name__)
def test_parametrized_weight_and_bias_train_like_batchnorm(make):
    # torch.nn.utils.parametrize moves weight/bias out of _parameters; the layers read them through the module
    # (a KeyError before)
    from torch.nn.utils import parametrize

    class Positive(nn.Module):
        def forward(self, w):
            return w.abs() + 0.5

    torch.manual_seed(0)
    layers = [nn.BatchNorm2d(4).double(), make(4).double()]
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(-2.0, 2.0, 4))
            layer.bias.copy_(torch.linspace(0.5, -0.5, 4))
        parametrize.register_parametrization(layer, "weight", Positive())
        parametrize.register_parametrization(layer, "bias", Positive())
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    g = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    outs = []
    for layer in layers:
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(g)
        outs.append((y, xi.grad, layer.parametrizations.weight.original.grad,
                     layer.parametrizations.bias.original.grad, layer.running_var))
    for ref, got in zip(*outs):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
