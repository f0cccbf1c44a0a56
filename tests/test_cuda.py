"""CUDA code paths: the same checks as on CPU, on GPU (skipped when CUDA is absent), and NCCL with 2+ GPUs.

The CPU + gloo suite covers the maths; these tests pin down what differs on CUDA: device placement of the packed
vector, fp16 autocast, channels_last kernels, the deferred (pinned-memory + event) checks of ``syncnorm.stats``,
no host synchronisation in a training step, torch.compile, and the NCCL backend with the same single-collective path.
A 1-rank NCCL world whose collectives are really issued (``benchmarks.bench_gpu.always_all_reduce``) runs a converted
ResNet-50 step of every layer under ``set_sync_debug_mode("error")``, captures forward + backward in a CUDA graph
(NCCL inside) and replays it against an eager twin, and compiles in ``max-autotune-no-cudagraphs`` and
``reduce-overhead`` modes against eager.
Every synchronising layer is checked against float64 references on the concatenated batch in ONE gloo world per
world size (2 and 3 ranks) whose ranks all share one GPU (gloo stages CUDA tensors through the host).

GPU check (the one prepared command; a few minutes, capped at 300 s): ``make gpu-check OUT=$OUT`` from the
repository root runs this file with the preinstalled ``python3`` (no venv, no pip; ``SYNCNORM_CPU_EXT=0``: no C++
build) under a timeout and tees the log to ``$OUT/gpu_check.log``. Without a GPU, ``SYNCNORM_TEST_DEVICE=cpu`` runs the
same test logic on CPU tensors (the CUDA-only checks skip); with the default (``cuda``) the whole file skips.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import syncnorm
from syncnorm.stats import Moments, PeerInputError, merge_all, moments_of, raise_pending_errors
from tests.oracle import compare, grad_weights, make_batches, reference_bn
from tests.test_batch_renorm import _mismatches, _run_steps, reference_brn
from tests.test_cross_iteration import STEP_SIZES as CBN_STEP_SIZES
from tests.test_cross_iteration import _slice, ref_with_prior

DEVICE_TYPE = os.environ.get("SYNCNORM_TEST_DEVICE", "cuda").strip().lower() or "cuda"
if DEVICE_TYPE not in ("cuda", "cpu"):
    raise ValueError(f"SYNCNORM_TEST_DEVICE must be 'cuda' (the default) or 'cpu', got {DEVICE_TYPE!r}")
ON_CUDA = DEVICE_TYPE == "cuda"
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda", 0) if ON_CUDA else torch.device("cpu")

pytestmark = pytest.mark.skipif(ON_CUDA and not CUDA, reason="CUDA is not available (SYNCNORM_TEST_DEVICE=cpu runs "
                                                             "this file's logic on CPU tensors)")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="meaningless on CPU tensors (SYNCNORM_TEST_DEVICE=cpu)")
C = 8
CO = 4  # channels of the gloo-world oracles


def _sync_device() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("spatial", [(), (5,), (4, 6), (2, 3, 4)], ids=["1d", "1d-seq", "2d", "3d"])
def test_cuda_matches_float64_batchnorm(spatial):
    (x,) = make_batches([6], C, spatial, 0)
    (g,) = grad_weights([6], C, spatial, 0)
    layer = syncnorm.SyncBatchNorm(C).double().to(DEVICE)
    xc = x.to(DEVICE).requires_grad_(True)
    y = layer(xc)
    (y * g.to(DEVICE)).sum().backward()
    ref = reference_bn(x, g, layer.weight.cpu(), layer.bias.cpu())
    for name, a, b in [("y", y, ref["y"]), ("dx", xc.grad, ref["dx"]), ("dw", layer.weight.grad, ref["dw"]),
                       ("rv", layer.running_var, ref["running_var"])]:
        assert a.device.type == DEVICE.type, (name, a.device)
        msg = compare(name, a, b, 1e-9, 1e-10)
        assert msg is None, msg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_and_channels_last(dtype):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, C, 3, padding=1), syncnorm.SyncBatchNorm(C)).to(DEVICE)
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16, device=DEVICE).to(memory_format=torch.channels_last)
    with torch.autocast(DEVICE.type, dtype=dtype):
        y = net(x)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.float().square().mean().backward()
    assert net[1].running_mean.dtype == torch.float32
    assert net[1].running_mean.device.type == DEVICE.type
    assert torch.isfinite(net[0].weight.grad).all()


@pytest.mark.parametrize("target", ["sync", "renorm", "cross_iteration", "cross_minibatch", "frozen"])
def test_cuda_convert_train_step(target):
    import torchvision

    model = syncnorm.convert(torchvision.models.resnet18(num_classes=4), target).to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    for _ in range(2):
        model(x).sum().backward()
    reverted = syncnorm.revert(model).eval()
    assert torch.isfinite(reverted(x)).all()


# ---------------------------------------------------------------------------------------------------------------
# one gloo world per world size, every rank on the same device: float64 oracles of every synchronising layer and the
# deferred peer-error check
# ---------------------------------------------------------------------------------------------------------------
SYNC_CASES = {2: [[2, 5], [3, 0]], 3: [[3, 0, 5], [0, 4, 0]]}  # uneven, one or two ranks empty
SYNC_SHAPES = {"1d": ((), None), "2d": ((3, 4), None), "2d-channels_last": ((3, 4), torch.channels_last),
               "3d": ((2, 3, 2), None)}
BRN_SHAPES = {"1d": (), "2d": (3, 2), "3d": (2, 2, 2)}
# BatchRenorm data: per-channel spread and mean chosen so that, from fresh running statistics (0, 1), r_max = 3 and
# d_max = 5 clip r (channel 0: spread 0.1) and d (channel 2: mean -12) at every step and leave channels 1 and 3 free
BRN_SCALE = torch.tensor([0.1, 1.0, 2.0, 1.5], dtype=torch.float64)
BRN_LOC = torch.tensor([0.0, 0.5, -12.0, 1.0], dtype=torch.float64)
BRN_BOUNDS = [(3.0, 5.0)] * 3  # three training steps; backward of the last
# CmBN micro-batches (accumulation_steps = 2): uneven, empty ranks, and one micro-batch empty on every rank (the
# third, which opens the second window)
CMBN_SIZES = {2: [[3, 2], [0, 4], [0, 0], [2, 1], [1, 3]], 3: [[2, 0, 3], [1, 2, 0], [0, 0, 0], [0, 0, 4], [3, 1, 1]]}
ORACLE_LAYERS = ("sync", "renorm", "cross_minibatch", "cross_iteration")
ERROR_SCENARIOS = ("wait", "next-forward", "backward")
BAD_RANK = 1


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    total = t.detach().clone()
    dist.all_reduce(total)
    return total


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``t`` on ``device`` (never ``t`` itself: this rank's slice must not join the whole-batch reference's
    autograd graph)."""
    return t.detach().to(device, copy=True)


def _affine(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, layer.num_features))
        layer.bias.copy_(torch.linspace(-1, 1, layer.num_features))
    return layer


def _joined(errs) -> str | None:
    return "; ".join(e for e in errs if e) or None


def _sync_oracle(rank: int, world: int, device: torch.device, results: dict) -> None:
    """SyncBatchNorm: two training steps, backward of the second, against float64 nn.BatchNorm on the whole batch."""
    for sizes in SYNC_CASES[world]:
        for name, (spatial, fmt) in SYNC_SHAPES.items():
            for momentum in (0.1, None):
                seed = sum(sizes) * 7 + len(spatial)
                xs, gs = make_batches(sizes, CO, spatial, seed), grad_weights(sizes, CO, spatial, seed)
                layer = _affine(syncnorm.SyncBatchNorm(CO, momentum=momentum).double()).to(device)
                x = _on(xs[rank], device)
                if fmt is not None:
                    x = x.contiguous(memory_format=fmt)
                x.requires_grad_(True)
                layer(x)
                y = layer(x)
                (y * gs[rank].to(device)).sum().backward()
                ref = reference_bn(torch.cat(xs), torch.cat(gs), layer.weight.cpu(), layer.bias.cpu(),
                                   momentum=momentum, steps=2)
                sl = _slice(sizes, rank)
                errs = [
                    compare("y", y, ref["y"][sl], 1e-9, 1e-10),
                    compare("dx", x.grad, ref["dx"][sl], 1e-9, 1e-10),
                    compare("dw(sum over ranks)", _sum_over_ranks(layer.weight.grad), ref["dw"], 1e-9, 1e-9),
                    compare("db(sum over ranks)", _sum_over_ranks(layer.bias.grad), ref["db"], 1e-9, 1e-9),
                    compare("running_mean", layer.running_mean, ref["running_mean"], 1e-9, 1e-10),
                    compare("running_var", layer.running_var, ref["running_var"], 1e-9, 1e-10),
                ]
                if int(layer.num_batches_tracked) != ref["num_batches_tracked"]:
                    errs.append(f"num_batches_tracked {int(layer.num_batches_tracked)} != 2")
                if y.device != device or layer.running_var.device != device:
                    errs.append(f"results on {y.device} / {layer.running_var.device}, expected {device}")
                # (an empty batch is contiguous in every format; its output's layout is not pinned down)
                if fmt is not None and x.shape[0] and not (y.is_contiguous(memory_format=fmt)
                                            and x.grad.is_contiguous(memory_format=fmt)):
                    errs.append("the output or the input gradient lost the memory format")
                results[f"sync:{sizes}-{name}-m{momentum}"] = _joined(errs)


def _brn_batches(sizes, spatial, seed) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    full = torch.randn((sum(sizes), CO, *spatial), generator=g, dtype=torch.float64)
    view = [1, CO] + [1] * len(spatial)
    return list(torch.split(full * BRN_SCALE.view(view) + BRN_LOC.view(view), list(sizes)))


def _brn_oracle(rank: int, world: int, device: torch.device, results: dict) -> None:
    """BatchRenorm (r_max = 3, d_max = 5): three training steps with clipping active, backward of the last, against
    the float64 formula reference (tests/test_batch_renorm.py) on the whole batch."""
    for sizes in SYNC_CASES[world]:
        for name, spatial in BRN_SHAPES.items():
            for momentum in (0.1, None):
                seed = sum(sizes) * 11 + len(spatial)
                steps = [_brn_batches(sizes, spatial, seed + 100 * i) for i in range(len(BRN_BOUNDS))]
                gs = grad_weights(sizes, CO, spatial, seed)
                layer = _affine(syncnorm.BatchRenorm(CO, momentum=momentum, r_max=3.0, d_max=5.0).double())
                layer = layer.to(device)
                got = _run_steps(layer, [s[rank].to(device) for s in steps], gs[rank].to(device), BRN_BOUNDS)
                ref = reference_brn([torch.cat(s) for s in steps], torch.cat(gs), layer.weight.cpu(),
                                    layer.bias.cpu(), torch.zeros(CO, dtype=torch.float64),
                                    torch.ones(CO, dtype=torch.float64), BRN_BOUNDS, momentum)
                sl = _slice(sizes, rank)
                errs = _mismatches(got, dict(ref, y=ref["y"][sl], dx=ref["dx"][sl]), grads=("dx",))
                errs += [compare("dw(sum over ranks)", _sum_over_ranks(got["dw"]), ref["dw"], 1e-9, 1e-9),
                         compare("db(sum over ranks)", _sum_over_ranks(got["db"]), ref["db"], 1e-9, 1e-9)]
                # the case must exercise the clipping, on some channels only: at the last step with momentum 0.1
                # (with momentum None the running statistics are the data's after one step: no clipping after it)
                clipped = ref["clipped"][-1] if momentum is not None else max(ref["clipped"])
                if not 0.0 < clipped < 1.0:
                    errs.append(f"uninformative case: clipped fractions {ref['clipped']}")
                results[f"renorm:{sizes}-{name}-m{momentum}"] = _joined(errs)


def _cmbn_oracle(rank: int, world: int, device: torch.device, results: dict) -> None:
    """CrossMiniBatchNorm over 2-micro-batch windows: micro-batch k is normalised with the float64 statistics of the
    window's micro-batches 1..k (earlier ones constant), running statistics follow each micro-batch's own."""
    layer = _affine(syncnorm.CrossMiniBatchNorm(CO, accumulation_steps=2).double()).to(device)
    rm, rv, nbt = torch.zeros(CO, dtype=torch.float64), torch.ones(CO, dtype=torch.float64), 0
    window: list[torch.Tensor] = []  # the non-empty whole micro-batches of the current window
    errs = []
    for k, sizes in enumerate(CMBN_SIZES[world]):
        if k % 2 == 0:
            window = []
        xs, gs = make_batches(sizes, CO, (3,), 300 + k), grad_weights(sizes, CO, (3,), 300 + k)
        x = _on(xs[rank], device).requires_grad_(True)
        y = layer(x)
        (y * gs[rank].to(device)).sum().backward()
        dw, db = _sum_over_ranks(layer.weight.grad), _sum_over_ranks(layer.bias.grad)
        layer.zero_grad()
        full, g = torch.cat(xs), torch.cat(gs)
        if full.shape[0] == 0:
            if y.shape != x.shape or x.grad.shape != x.shape:
                errs.append(f"micro-batch {k}: empty global batch gave shapes {tuple(y.shape)} {tuple(x.grad.shape)}")
            errs += [compare(f"dw{k}", dw, torch.zeros(CO), 0, 0), compare(f"db{k}", db, torch.zeros(CO), 0, 0)]
        else:
            prior = merge_all([moments_of(t) for t in window]) if window else None
            ref = ref_with_prior(full, prior, layer.weight.cpu(), layer.bias.cpu(), g)
            sl = _slice(sizes, rank)
            errs += [compare(f"y{k}", y, ref["y"][sl], 1e-9, 1e-10),
                     compare(f"dx{k}", x.grad, ref["dx"][sl], 1e-9, 1e-10),
                     compare(f"dw{k}(sum over ranks)", dw, ref["dw"], 1e-9, 1e-9),
                     compare(f"db{k}(sum over ranks)", db, ref["db"], 1e-9, 1e-9)]
            F.batch_norm(full, rm, rv, training=True, momentum=0.1)
            nbt += 1
            window.append(full)
        errs += [compare(f"running_mean{k}", layer.running_mean, rm, 1e-9, 1e-10),
                 compare(f"running_var{k}", layer.running_var, rv, 1e-9, 1e-10)]
        if int(layer.num_batches_tracked) != nbt:
            errs.append(f"micro-batch {k}: num_batches_tracked {int(layer.num_batches_tracked)} != {nbt}")
        expected = moments_of(torch.cat(window)) if window else Moments.empty(CO)
        got = layer.window_moments()
        errs += [compare(f"window count{k}", got.count, expected.count, 0, 0),
                 compare(f"window mean{k}", got.mean, expected.mean, 1e-9, 1e-10),
                 compare(f"window var{k}", got.var(), expected.var(), 1e-9, 1e-10)]
    results["cross_minibatch:window2"] = _joined(errs)


def _cbn_oracle(rank: int, world: int, device: torch.device, results: dict, solo) -> None:
    """CrossIterationBatchNorm (window 3, conv attached, compensated), four SGD steps then a step empty on every
    rank, against the same layer and conv run by one process on CPU on the concatenated batch (in float64)."""
    torch.manual_seed(7)
    ref_conv = nn.Conv2d(3, CO, 3, padding=1).double()
    conv = copy.deepcopy(ref_conv).to(device)
    ref_bn = _affine(syncnorm.CrossIterationBatchNorm(CO, window=3, process_group=solo).double()).attach(ref_conv)
    bn = _affine(syncnorm.CrossIterationBatchNorm(CO, window=3).double()).to(device).attach(conv)
    params, ref_params = list(conv.parameters()) + list(bn.parameters()), \
        list(ref_conv.parameters()) + list(ref_bn.parameters())
    errs = []
    for step, sizes in enumerate(CBN_STEP_SIZES[world]):
        xs, gs = make_batches(sizes, 3, (4, 5), 100 + step), grad_weights(sizes, CO, (4, 5), 100 + step)
        x = _on(xs[rank], device).requires_grad_(True)
        y = bn(conv(x))
        (y * gs[rank].to(device)).sum().backward()
        xf = torch.cat(xs).requires_grad_(True)
        yf = ref_bn(ref_conv(xf))
        (yf * torch.cat(gs)).sum().backward()
        sl = _slice(sizes, rank)
        errs += [compare(f"y{step}", y, yf[sl], 1e-9, 1e-10), compare(f"dx{step}", x.grad, xf.grad[sl], 1e-9, 1e-10)]
        with torch.no_grad():
            for i, (p, q) in enumerate(zip(params, ref_params)):
                total = _sum_over_ranks(p.grad)
                errs.append(compare(f"grad{step}[{i}](sum over ranks)", total, q.grad, 1e-9, 1e-9))
                p -= 1e-2 * total + 1e-2 * p
                q -= 1e-2 * q.grad + 1e-2 * q
                p.grad = q.grad = None
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bn(conv(torch.zeros(0, 3, 4, 5, dtype=torch.float64, device=device)))  # empty on every rank: nothing recorded
    after = bn.state_dict()
    errs += [None if torch.equal(before[k], after[k]) else f"the empty step changed {k}" for k in before if k != "step"]
    for k, v in ref_bn.state_dict().items():
        if k != "step":
            errs.append(compare(f"state {k}", after[k].double(), v.double(), 1e-9, 1e-10))
    if not (bool(bn.history_compensable.all()) and float(bn.history_dvar.abs().sum()) > 0):
        errs.append("uninformative case: the history is not compensated")
    results["cross_iteration:window3-conv"] = _joined(errs)


def _deferred_error_checks(rank: int, world: int, device: torch.device, results: dict) -> None:
    """Rank BAD_RANK passes an input with the wrong channel count. It raises its ValueError at once; the others raise
    PeerInputError at the latest in the next synchronising layer's forward (scenario "next-forward") or backward
    ("backward"), or at raise_pending_errors(wait=True) ("wait"). On CUDA the device is synchronised by the test
    before the next layer runs, so that the flag is there to be found before that layer's collective (the peers never
    join it). After each scenario the group runs a good step together: nobody hangs and no stale error is left."""
    raise_pending_errors(wait=True)  # nothing left over from the checks before
    for scenario in ERROR_SCENARIOS:
        first = syncnorm.SyncBatchNorm(CO).to(device)
        second = syncnorm.SyncBatchNorm(CO).to(device)
        x = torch.randn(3, CO + 3 if rank == BAD_RANK else CO, 4, device=device)
        stage = "forward"
        try:
            y = first(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if scenario == "next-forward":
                stage = "next-forward"
                second(y)
            elif scenario == "backward":
                stage = "backward"
                y.sum().backward()
            stage = "wait"
            raise_pending_errors(wait=True)
            outcome = ("none", stage, "")
        except PeerInputError as e:
            outcome = ("peer", stage, str(e))
        except ValueError as e:
            outcome = ("own", stage, str(e))
        except Exception as e:  # noqa: BLE001 - reported to the parent
            outcome = ("other", stage, repr(e))
        results[f"deferred-{scenario}"] = outcome
        try:
            ok = syncnorm.SyncBatchNorm(CO).to(device)
            ok(torch.randn(2 + rank, CO, 4, device=device)).sum().backward()
            raise_pending_errors(wait=True)
            results[f"deferred-{scenario}-after"] = None
        except Exception as e:  # noqa: BLE001
            results[f"deferred-{scenario}-after"] = repr(e)


def _gloo_world_worker(rank: int, world: int, device_name: str) -> dict:
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results: dict = {}
    solo = syncnorm.comm.new_groups(1)  # this rank alone: the single-process CBN reference
    _sync_oracle(rank, world, device, results)
    _brn_oracle(rank, world, device, results)
    _cmbn_oracle(rank, world, device, results)
    _cbn_oracle(rank, world, device, results, solo)
    _deferred_error_checks(rank, world, device, results)
    raise_pending_errors(wait=True)
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def gloo_world(request):
    """One gloo world of W ranks, every rank on DEVICE (cuda:0, or the CPU), running every check once."""
    from tests.dist.harness import run_distributed

    world = request.param
    return world, run_distributed(_gloo_world_worker, world, str(DEVICE), timeout=240, backend="gloo")


@pytest.mark.parametrize("layer", ORACLE_LAYERS)
def test_gloo_one_device_float64_oracle(gloo_world, layer):
    """Uneven and empty per-rank batches on W ranks sharing one device equal float64 references on the whole batch."""
    world, results = gloo_world
    keys = [k for k in results[0] if k.startswith(layer + ":")]
    assert keys, f"no {layer} check ran"
    assert all(sorted(k for k in r if k.startswith(layer + ":")) == sorted(keys) for r in results)
    failures = {(rank, k): r[k] for rank, r in enumerate(results) for k in keys if r[k] is not None}
    assert not failures, failures


@pytest.mark.parametrize("scenario", ERROR_SCENARIOS)
def test_gloo_one_device_deferred_peer_error(gloo_world, scenario):
    world, results = gloo_world
    allowed = {"forward", scenario}  # at once (CPU), or at the latest where the scenario looks
    for rank, r in enumerate(results):
        kind, stage, message = r[f"deferred-{scenario}"]
        if rank == BAD_RANK:
            assert (kind, stage) == ("own", "forward"), (rank, r[f"deferred-{scenario}"])
            assert f"expected {CO} channels in dim 1, got {CO + 3}" in message, message
        else:
            assert kind == "peer" and stage in allowed, (rank, r[f"deferred-{scenario}"])
            if not ON_CUDA:
                assert stage == "forward", "on CPU the peer error is raised at once"
        assert r[f"deferred-{scenario}-after"] is None, (rank, r[f"deferred-{scenario}-after"])


# ---------------------------------------------------------------------------------------------------------------
# one process: no host synchronisation, torch.compile
# ---------------------------------------------------------------------------------------------------------------
TARGET_KWARGS = {"sync": {}, "renorm": {"r_max": 3.0, "d_max": 5.0}, "cross_minibatch": {"accumulation_steps": 2}}


def _small_conv_net(target: str, kwargs: dict | None = None, device: torch.device = DEVICE) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU(),
                        nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU())
    with torch.no_grad():
        for i in (1, 4):
            net[i].weight.uniform_(0.5, 1.5)
            net[i].bias.uniform_(-0.5, 0.5)
    kwargs = TARGET_KWARGS[target] if kwargs is None else kwargs
    return syncnorm.convert(net, target, **kwargs).to(device).train()


def _input(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(4, 3, 8, 8, generator=g) * 2 + 0.5).to(DEVICE)


@cuda_only
@pytest.mark.parametrize("target", list(TARGET_KWARGS))
def test_training_step_makes_no_host_sync(target):
    """Forward + backward of a converted conv net under torch.cuda.set_sync_debug_mode("error") (which raises on
    every host-device synchronisation) after a warm-up step outside it. Two steps, so that CmBN runs with and
    without a window prior and BatchRenorm against updated running statistics."""
    net = _small_conv_net(target)

    def step(i: int) -> None:
        net.zero_grad(set_to_none=True)
        net(_input(i)).square().mean().backward()

    step(0)  # warm-up: cuDNN handles, pinned host blocks, lazy initialisation
    torch.cuda.synchronize()
    raise_pending_errors(wait=True)
    xs = [_input(i) for i in (1, 2)]
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in xs:
            net.zero_grad(set_to_none=True)
            net(x).square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    raise_pending_errors(wait=True)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_compile_fullgraph_sync_matches_eager():
    """torch.compile(fullgraph=True, backend="inductor") of a converted "sync" net (world size 1): two training steps
    with outputs, gradients and buffers equal to the eager twin's to 1e-4."""
    import torch._dynamo

    torch._dynamo.reset()
    raise_pending_errors(wait=True)  # nothing pending when the graph is traced
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare syncnorm, not TF32 rounding
    try:
        eager = _small_conv_net("sync")
        model = copy.deepcopy(eager)
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        for step in range(2):
            x = _input(step)
            outs = {}
            for which, call, module in (("compiled", compiled, model), ("eager", eager, eager)):
                # the eager twin's last checks may still be pending on CUDA: drain them, so that this test sees the
                # compiled graph alone (test_compiled_step_after_an_eager_cuda_step covers a pending check)
                raise_pending_errors(wait=True)
                module.zero_grad(set_to_none=True)
                y = call(x)
                y.square().mean().backward()
                outs[which] = (y.detach(), {n: p.grad.clone() for n, p in module.named_parameters()},
                               {k: v.clone() for k, v in module.state_dict().items()})
            (y_c, g_c, s_c), (y_e, g_e, s_e) = outs["compiled"], outs["eager"]
            assert y_c.device.type == DEVICE.type
            errs = [compare(f"step {step}: output", y_c, y_e, 1e-4, 1e-4)]
            errs += [compare(f"step {step}: grad {n}", g_c[n], g_e[n], 1e-4, 1e-4) for n in g_e]
            errs += [compare(f"step {step}: {k}", s_c[k], s_e[k], 1e-4, 1e-4) for k in s_e]
            errs = [e for e in errs if e]
            assert not errs, errs
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        raise_pending_errors(wait=True)


@cuda_only
def test_compiled_step_after_an_eager_cuda_step():
    """An eager CUDA training forward of a syncnorm layer leaves its checks pending in syncnorm.stats (copy + event);
    a fullgraph-compiled step that runs next must still compile as one graph and run (backend "eager": this concerns
    dynamo's tracing, not code generation)."""
    import torch._dynamo

    torch._dynamo.reset()
    raise_pending_errors(wait=True)
    net = _small_conv_net("sync")
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    compiled(_input(0)).square().mean().backward()  # compiled with no check pending
    other = syncnorm.SyncBatchNorm(C).to(DEVICE)
    other(torch.randn(4, C, 3, device=DEVICE))  # eager: its checks are deferred, still pending
    try:
        compiled(_input(1)).square().mean().backward()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"a compiled step after an eager CUDA forward (deferred checks pending) failed: "
                    f"{type(e).__name__}: {str(e)[:1500]}")
    finally:
        raise_pending_errors(wait=True)


# ---------------------------------------------------------------------------------------------------------------
# NCCL (2+ GPUs) and Lightning
# ---------------------------------------------------------------------------------------------------------------
def _nccl_worker(rank: int, world: int) -> dict:
    sizes = [3, 0, 5, 2][:world]
    xs = make_batches(sizes, C, (4, 4), 1)
    gs = grad_weights(sizes, C, (4, 4), 1)
    layer = syncnorm.SyncBatchNorm(C).double().cuda()
    x = xs[rank].cuda().requires_grad_(True)
    y = layer(x)
    (y * gs[rank].cuda()).sum().backward()
    ref = reference_bn(torch.cat(xs), torch.cat(gs), layer.weight.cpu(), layer.bias.cpu())
    off = sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    out = {"y": compare("y", y, ref["y"][sl], 1e-9, 1e-10), "dx": compare("dx", x.grad, ref["dx"][sl], 1e-9, 1e-10),
           "rv": compare("rv", layer.running_var, ref["running_var"], 1e-9, 1e-10)}
    raise_pending_errors(wait=True)
    return out


@cuda_only
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_oracle_uneven_and_empty():
    from tests.dist.harness import run_distributed

    world = min(torch.cuda.device_count(), 4)
    results = run_distributed(_nccl_worker, world, timeout=180, backend="nccl")
    for rank, r in enumerate(results):
        assert all(v is None for v in r.values()), (rank, r)


@pytest.mark.parametrize("to", ["sync", "cross_iteration"])
def test_cuda_lightning_fit_with_norm_conversion(to, tmp_path):
    import pytorch_lightning as pl

    from syncnorm.callbacks import NormConversion
    from tests.lightning_helpers import TinyNet, dataset, loader

    model = TinyNet()
    cb = NormConversion(to)
    trainer = pl.Trainer(accelerator="gpu" if ON_CUDA else "cpu", devices=1, max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[cb])
    trainer.fit(model, loader(dataset(12), 4))
    layer_type = {"sync": syncnorm.SyncBatchNorm, "cross_iteration": syncnorm.CrossIterationBatchNorm}[to]
    assert isinstance(model.bn1, layer_type)
    assert model.bn1.running_mean.device.type == DEVICE.type
    assert int(model.bn1.num_batches_tracked) == 3


# ---------------------------------------------------------------------------------------------------------------
# a 1-rank NCCL world with its collectives really issued: no host sync on ResNet-50, CUDA-graph capture with NCCL
# inside, torch.compile's max-autotune-no-cudagraphs and reduce-overhead modes
# ---------------------------------------------------------------------------------------------------------------
CAPTURE_TARGETS = {"sync": {}, "renorm": {"r_max": 3.0, "d_max": 5.0}, "cross_minibatch": {"accumulation_steps": 2},
                   "cross_iteration": {"window": 3, "burn_in": 1}}
COMPILE_MODES = ("max-autotune-no-cudagraphs", "reduce-overhead")


def _capture_net(target: str, device: torch.device) -> nn.Module:
    return _small_conv_net(target, CAPTURE_TARGETS[target], device)


def _state(module: nn.Module) -> dict:
    out = {f"grad {n}": p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    out.update({k: v.detach().clone() for k, v in module.state_dict().items()})
    return out


def _mismatch(where: str, a: dict, b: dict, tol: float = 1e-4) -> list[str]:
    if a.keys() != b.keys():
        return [f"{where}: keys differ: {sorted(a.keys() ^ b.keys())}"]
    return [m for k in a if (m := compare(f"{where}: {k}", a[k], b[k], tol, tol)) is not None]


def _resnet50_no_sync(device: torch.device, out: dict) -> None:
    """A converted ResNet-50 (batch 4, 64x64, bf16 autocast, channels_last) takes 2 training steps under
    set_sync_debug_mode("error") per target, after 2 warm-up steps outside it (cuDNN, Triton JIT, CBN history)."""
    import torchvision

    for target, kwargs in {**CAPTURE_TARGETS, "cross_iteration": {"window": 4}}.items():
        try:
            torch.manual_seed(0)
            model = syncnorm.convert(torchvision.models.resnet50(num_classes=10), target, **kwargs)
            model = model.to(device, memory_format=torch.channels_last).train()
            xs = [torch.randn(4, 3, 64, 64, device=device).to(memory_format=torch.channels_last) for _ in range(4)]

            def step(x):
                model.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(x).float().square().mean()
                loss.backward()

            for x in xs[:2]:
                step(x)
            torch.cuda.synchronize()
            raise_pending_errors(wait=True)
            torch.cuda.set_sync_debug_mode("error")
            try:
                for x in xs[2:]:
                    step(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            raise_pending_errors(wait=True)
            finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
            out[f"nosync/{target}"] = None if finite else "non-finite gradients"
        except Exception as e:  # noqa: BLE001 - each target reports on its own
            out[f"nosync/{target}"] = f"{type(e).__name__}: {str(e)[:800]}"


def _graph_capture(device: torch.device, out: dict) -> None:
    """Forward + backward of a converted conv net captured in one CUDA graph (NCCL all-reduces inside), replayed on
    3 new inputs, against an eager twin taking the same steps: outputs, gradients and every buffer to 1e-4."""
    for target in CAPTURE_TARGETS:
        try:
            model = _capture_net(target, device)
            static_x = torch.randn(4, 3, 8, 8, device=device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
                for _ in range(3):
                    model.zero_grad(set_to_none=True)
                    model(static_x).square().mean().backward()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            raise_pending_errors(wait=True)
            twin = copy.deepcopy(model)
            model.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = model(static_x)
                static_y.square().mean().backward()
            errors = []
            for i in range(3):
                x = torch.randn(4, 3, 8, 8, device=device) * (1 + i) + i
                static_x.copy_(x)
                graph.replay()
                twin.zero_grad(set_to_none=True)
                y = twin(x)
                y.square().mean().backward()
                torch.cuda.synchronize()
                errors += _mismatch(f"{target} replay {i + 1}", {"y": static_y, **_state(model)},
                                    {"y": y, **_state(twin)})
            raise_pending_errors(wait=True)
            out[f"graph/{target}"] = "; ".join(errors[:5]) or None
        except Exception as e:  # noqa: BLE001
            out[f"graph/{target}"] = f"{type(e).__name__}: {str(e)[:800]}"


def _compile_modes(device: torch.device, out: dict) -> None:
    """torch.compile(fullgraph=True) in max-autotune-no-cudagraphs and reduce-overhead modes: 3 training steps of a
    converted conv net equal the eager twin's (outputs, gradients, buffers to 1e-4)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    for mode in COMPILE_MODES:
        for target in ("sync", "cross_iteration"):
            key = f"compile/{mode}/{target}"
            try:
                torch._dynamo.reset()
                counters.clear()
                eager = _capture_net(target, device)
                model = copy.deepcopy(eager)
                compiled = torch.compile(model, mode=mode, fullgraph=True)
                errors = []
                for i in range(3):
                    x = torch.randn(4, 3, 8, 8, device=device) * (1 + i) + i
                    ys = {}
                    for which, call, module in (("compiled", compiled, model), ("eager", eager, eager)):
                        raise_pending_errors(wait=True)
                        module.zero_grad(set_to_none=True)
                        y = call(x)
                        y.square().mean().backward()
                        ys[which] = {"y": y.detach().clone(), **_state(module)}
                    errors += _mismatch(f"{mode}/{target} step {i + 1}", ys["compiled"], ys["eager"])
                raise_pending_errors(wait=True)
                out[key] = "; ".join(errors[:5]) or None
                out[f"{key}/cudagraph_skips"] = dict(counters["inductor"]).get("cudagraph_skips", 0)
            except Exception as e:  # noqa: BLE001
                out[key] = f"{type(e).__name__}: {str(e)[:800]}"


def _nccl_one_rank_worker(rank: int, world: int, sections: tuple[str, ...]) -> dict:
    from benchmarks.bench_gpu import always_all_reduce

    syncnorm.comm.all_reduce_sum = always_all_reduce  # world 1: issue the NCCL collectives anyway
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda", 0)
    out: dict = {}
    for section in sections:
        {"nosync": _resnet50_no_sync, "graph": _graph_capture, "compile": _compile_modes}[section](device, out)
    return out


@pytest.fixture(scope="module")
def nccl_one_rank():
    # two worlds, so that a slow compile (max-autotune) cannot take the other results down with it
    from tests.dist.harness import run_distributed

    out = run_distributed(_nccl_one_rank_worker, 1, ("nosync", "graph"), timeout=150, pg_timeout=120,
                          backend="nccl")[0]
    try:
        out.update(run_distributed(_nccl_one_rank_worker, 1, ("compile",), timeout=200, pg_timeout=120,
                                   backend="nccl")[0])
    except Exception as e:  # noqa: BLE001 - reported by the compile tests
        out.update({f"compile/{m}/{t}": f"{type(e).__name__}: {str(e)[:800]}"
                    for m in COMPILE_MODES for t in ("sync", "cross_iteration")})
    return out


@cuda_only
@pytest.mark.parametrize("target", list(CAPTURE_TARGETS))
def test_resnet50_step_makes_no_host_sync(nccl_one_rank, target):
    assert nccl_one_rank[f"nosync/{target}"] is None, nccl_one_rank[f"nosync/{target}"]


@cuda_only
@pytest.mark.parametrize("target", list(CAPTURE_TARGETS))
def test_cuda_graph_capture_with_nccl_matches_eager(nccl_one_rank, target):
    assert nccl_one_rank[f"graph/{target}"] is None, nccl_one_rank[f"graph/{target}"]


@cuda_only
@pytest.mark.parametrize("mode", COMPILE_MODES)
@pytest.mark.parametrize("target", ["sync", "cross_iteration"])
def test_compile_modes_match_eager(nccl_one_rank, mode, target):
    key = f"compile/{mode}/{target}"
    print(f"{key}: cudagraph skips {nccl_one_rank.get(key + '/cudagraph_skips')}")
    assert nccl_one_rank[key] is None, nccl_one_rank[key]
