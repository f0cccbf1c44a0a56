"""CrossIterationBatchNorm against float64 references; the distributed checks of CBN *and* CmBN share one world."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import syncnorm
from syncnorm import ops
from syncnorm.stats import Moments, merge_all, moments_of
from tests.dist.harness import CollectiveLedger, on_both_implementations, run_distributed
from tests.oracle import compare, grad_weights, make_batches, reference_bn

CBN = syncnorm.CrossIterationBatchNorm
CmBN = syncnorm.CrossMiniBatchNorm
C = 4


def ref_with_prior(x, prior, weight, bias, g, eps=1e-5):
    """float64 autograd reference: normalise x with (constant prior) merged with x's own moments; loss sum(y*g)."""
    x = x.detach().double().clone().requires_grad_(True)
    w = weight.detach().double().clone().requires_grad_(True)
    b = bias.detach().double().clone().requires_grad_(True)
    dims = [0] + list(range(2, x.dim()))
    n = x.numel() // x.shape[1]
    if prior is None:
        prior = Moments.empty(x.shape[1])
    total = prior.count + n
    s1 = prior.count * prior.mean + x.sum(dims)
    s2 = prior.m2 + prior.count * prior.mean ** 2 + (x * x).sum(dims)
    mean = s1 / total
    var = s2 / total - mean ** 2
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * w.view(shape) + b.view(shape)
    (y * g).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw": w.grad, "db": b.grad, "mean": mean.detach(), "var": var.detach()}


def conv_variants():
    return {
        "2d-pad": lambda: nn.Conv2d(3, C, 3, padding=1),
        "2d-grouped": lambda: nn.Conv2d(6, C, 3, padding=1, groups=2),
        "2d-depthwise": lambda: nn.Conv2d(C, C, 3, padding=1, groups=C),
        "2d-stride-dilation": lambda: nn.Conv2d(3, C, 3, stride=2, dilation=2, padding=2, bias=False),
        "2d-reflect-same": lambda: nn.Conv2d(3, C, (3, 2), padding="same", padding_mode="reflect"),
        "1d": lambda: nn.Conv1d(3, C, 5, stride=2, padding=1),
        "3d": lambda: nn.Conv3d(2, C, 3, padding=1, stride=(1, 2, 1)),
    }


def _input_for(conv, n=5, seed=0):
    spatial = {1: (11,), 2: (7, 8), 3: (4, 5, 4)}[conv.weight.dim() - 2]
    (x,) = make_batches([n], conv.in_channels, spatial, seed)
    return x


class _SGD:
    """Plain SGD with weight decay (torch.optim would import torch._dynamo: seconds per test process)."""

    def __init__(self, params, lr, weight_decay=0.0):
        self.params, self.lr, self.wd = list(params), lr, weight_decay

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is not None:
                p -= self.lr * (p.grad + self.wd * p)


def _first_conv_step(conv0, x0, g, lr, compensate, window=2):
    """One SGD step on the first conv of a net through CBN; returns the history error to recomputed stats."""
    conv = copy.deepcopy(conv0).double()
    bn = CBN(C, window=window, compensate=compensate).double().attach(conv)
    opt = _SGD(conv.parameters(), lr=lr, weight_decay=1.0)
    y = bn(conv(x0))
    (y * g).sum().backward()
    opt.step()
    with torch.no_grad():
        z = conv(x0)
    dims = [0] + list(range(2, z.dim()))
    mu, nu = z.mean(dims), (z * z).mean(dims)
    h = bn.compensated_history()
    nu_h = h.m2 / h.count.unsqueeze(1) + h.mean ** 2
    return (h.mean[0] - mu).abs().max().item(), (nu_h[0] - nu).abs().max().item(), bn, conv, z


# ---------------------------------------------------------------------------------------------------------------
# window=1 / burn-in are BatchNorm
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attach", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_window1_matches_batchnorm(attach, momentum):
    conv = nn.Conv2d(3, C, 3).double()
    bn = CBN(C, window=1, momentum=momentum).double()
    if attach:
        bn.attach(conv)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    (x,) = make_batches([6], C, (3, 4), 0)
    (g,) = grad_weights([6], C, (3, 4), 0)
    xa = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # window 1 never warns about pairing
        for _ in range(2):
            y = bn(xa)
    (y * g).sum().backward()
    ref = reference_bn(x, g, bn.weight, bn.bias, momentum=momentum, steps=2)
    for name, a, b in [("y", y, ref["y"]), ("dx", xa.grad, ref["dx"]), ("dw", bn.weight.grad, ref["dw"]),
                       ("db", bn.bias.grad, ref["db"]), ("rm", bn.running_mean, ref["running_mean"]),
                       ("rv", bn.running_var, ref["running_var"])]:
        assert compare(name, a, b, 1e-9, 1e-10) is None
    assert int(bn.num_batches_tracked) == 2


def test_burn_in_is_batchnorm_then_pools():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, C, 3, padding=1).double()
    bn = CBN(C, window=3, burn_in=3).double().attach(conv)
    ref = nn.BatchNorm2d(C).double()
    opt = _SGD(conv.parameters(), lr=1e-3)
    xs = make_batches([4] * 5, 3, (5, 5), 1)
    for step, x in enumerate(xs):
        y = bn(conv(x))
        with torch.no_grad():
            y_ref = ref(conv(x))
        if step < 3:
            torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        else:
            assert (y - y_ref).abs().max() > 1e-3, "after burn-in the history must be used"
        y.square().sum().backward()
        opt.step()
        opt.zero_grad()
        # history starts window - 1 steps before the end of burn-in, so it is full when compensation starts
        assert int(bn.history_filled) == min(max(step - 0, 0), 2)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-10, atol=1e-12)


def test_set_step_controls_burn_in():
    conv = nn.Conv2d(3, C, 1).double()
    bn = CBN(C, window=2, burn_in=10).double().attach(conv)
    bn.set_step(8)
    x = make_batches([4], 3, (3, 3), 2)[0]
    bn(conv(x))
    assert int(bn.step) == 9 and int(bn.history_filled) == 0  # step 8 < burn_in - (window - 1): not recorded
    bn(conv(x))
    assert int(bn.history_filled) == 1
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        bn.set_step(-1)


# ---------------------------------------------------------------------------------------------------------------
# compensation
# ---------------------------------------------------------------------------------------------------------------
def test_compensation_first_conv_mean_exact_var_second_order():
    torch.manual_seed(0)
    conv0 = nn.Conv2d(3, C, 3, padding=1).double()
    x0 = _input_for(conv0)
    g = torch.randn(5, C, 7, 8, dtype=torch.float64)
    errs = {}
    for lr in (1e-3, 5e-4):
        for comp in (True, False):
            errs[lr, comp] = _first_conv_step(conv0, x0, g, lr, comp)[:2]
    for lr in (1e-3, 5e-4):
        assert errs[lr, True][0] < 1e-10, errs  # mu is linear in W: compensation is exact
        assert errs[lr, False][0] > 1e-2  # naive mean is off by O(dW)
    # nu: second order for the compensated history (halving the step quarters the error), first order for naive
    ratio_comp = errs[1e-3, True][1] / errs[5e-4, True][1]
    ratio_naive = errs[1e-3, False][1] / errs[5e-4, False][1]
    assert 3.5 < ratio_comp < 4.5, errs
    assert 1.5 < ratio_naive < 2.8, errs
    assert errs[5e-4, False][1] > 5 * errs[5e-4, True][1], errs


@pytest.mark.parametrize("variant", list(conv_variants()))
def test_conv_variants_derivatives_and_exact_mean(variant):
    torch.manual_seed(1)
    conv0 = conv_variants()[variant]().double()
    x0 = _input_for(conv0)
    with torch.no_grad():
        out_shape = conv0(x0).shape
    g = torch.randn(out_shape, dtype=torch.float64)
    err_mu, err_nu, bn, conv, z = _first_conv_step(conv0, x0, g, 1e-3, True)
    assert err_mu < 1e-10, variant
    # the stored derivatives are autograd's d mu/dW and d sigma^2/dW at the recorded weights
    conv_old = copy.deepcopy(conv0)
    zo = conv_old(x0)
    dims = [0] + list(range(2, zo.dim()))
    gmu = torch.autograd.grad(zo.mean(dims).sum(), conv_old.weight, retain_graph=True)[0]
    gvar = torch.autograd.grad(zo.var(dims, unbiased=False).sum(), conv_old.weight)[0]
    groups = conv0.groups
    dmean = bn.history_dmean[0].repeat_interleave(C // groups, dim=0)
    torch.testing.assert_close(dmean, gmu.reshape(C, -1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.history_dvar[0], gvar.reshape(C, -1), rtol=1e-10, atol=1e-12)
    # the output of the next step equals the autograd reference with the compensated history as constant prior
    prior = bn.compensated_history()
    bn.train()
    zz = conv(x0).detach().requires_grad_(True)
    y = bn(zz)
    (y * g).sum().backward()
    ref = ref_with_prior(zz.detach(), merge_all([Moments(prior.count[i], prior.mean[i], prior.m2[i])
                                                 for i in range(len(prior.count))]), bn.weight, bn.bias, g)
    torch.testing.assert_close(y, ref["y"], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(zz.grad, ref["dx"], rtol=1e-9, atol=1e-10)


def test_compensate_false_is_naive_average_and_count_weighted():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, C, 3, padding=1).double()
    bn = CBN(C, window=3, compensate=False).double().attach(conv)
    opt = _SGD(conv.parameters(), lr=1e-2)
    xs = make_batches([2, 5, 3], 3, (4, 4), 3)
    seen = []
    for x in xs:
        z = conv(x)
        seen.append(moments_of(z.detach()))
        y = bn(z)
        (y ** 3).sum().backward()
        opt.step()
        opt.zero_grad()
    used = bn.last_info.used
    expected = merge_all(seen)  # uncompensated stats of the 3 batches, weighted by counts 2:5:3
    torch.testing.assert_close(used.mean, expected.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(used.m2, expected.m2, rtol=1e-12, atol=1e-12)


def test_unpaired_warns_once_and_falls_back_to_naive():
    xs = make_batches([3, 4, 3], C, (3, 3), 4)
    bn = CBN(C, window=3).double()
    bn.set_layer_name("block.bn")
    naive = CBN(C, window=3, compensate=False).double()
    with pytest.warns(UserWarning, match=r"CrossIterationBatchNorm\(4\) 'block.bn': no conv attached") as rec:
        for x in xs:
            torch.testing.assert_close(bn(x), naive(x), rtol=0, atol=0)
    assert len([w for w in rec if "no conv attached" in str(w.message)]) == 1


# ---------------------------------------------------------------------------------------------------------------
# state: checkpoints, pairing, references
# ---------------------------------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self, window=3, attach=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = CBN(6, window=window)
        self.conv2 = nn.Conv2d(6, C, 3, stride=2, groups=2)
        self.bn2 = CBN(C, window=window)
        if attach:
            self.pair()

    def pair(self):
        self.bn1.attach(self.conv1)
        self.bn2.attach(self.conv2)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))).mean((2, 3))


def _train(net, opt, xs):
    outs = []
    for x in xs:
        y = net(x)
        outs.append(y.detach().clone())
        opt.zero_grad()
        y.square().sum().backward()
        opt.step()
    return outs


@pytest.mark.parametrize("attach_after_load", [False, True])
def test_checkpoint_mid_history_resumes_bit_identically(attach_after_load):
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, 3, 8, 8, generator=gen) for _ in range(7)]
    torch.manual_seed(3)
    net = _Net()
    full = _train(net, _SGD(net.parameters(), lr=0.05, weight_decay=0.1), xs)

    torch.manual_seed(3)
    first = _Net()
    head = _train(first, _SGD(first.parameters(), lr=0.05, weight_decay=0.1), xs[:4])
    # window 3: history full, slot pointer wrapped once
    ckpt = copy.deepcopy(first.state_dict())
    assert int(first.bn1.history_filled) == 2 and int(first.bn1.history_next) == 0

    resumed = _Net(attach=not attach_after_load)
    resumed.load_state_dict(ckpt)
    if attach_after_load:
        resumed.pair()
    tail = _train(resumed, _SGD(resumed.parameters(), lr=0.05, weight_decay=0.1), xs[4:])
    for a, b in zip(head + tail, full):
        assert torch.equal(a, b)
    for (k, a), (_, b) in zip(resumed.state_dict().items(), net.state_dict().items()):
        assert torch.equal(a, b), k


def test_state_dict_keys_eval_and_errors():
    bn = CBN(C, window=3)
    keys = set(nn.BatchNorm2d(C).state_dict())
    assert keys <= set(bn.state_dict())
    assert {"history_mean", "history_var", "history_dvar", "history_dmean", "step"} <= set(bn.state_dict())
    ref = nn.BatchNorm2d(C)
    with torch.no_grad():
        for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias):
            t.uniform_(0.5, 2.0)
    ref.load_state_dict({k: v for k, v in bn.state_dict().items() if k in keys})
    x = torch.randn(3, C, 5, 5)
    torch.testing.assert_close(bn.eval()(x), ref.eval()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        CBN(C, window=0)
    with pytest.raises(ValueError, match="burn_in must be an int >= 0, got -2"):
        CBN(C, burn_in=-2)
    with pytest.raises(TypeError, match=r"CrossIterationBatchNorm\(4\): attach expects an nn.Conv1d"):
        CBN(C).attach(nn.ConvTranspose2d(3, C, 3))
    with pytest.raises(ValueError, match="out_channels=4, got out_channels=5"):
        CBN(C).attach(nn.Conv2d(3, 5, 3))
    # attached conv that did not run before the layer
    conv = nn.Conv2d(3, C, 3)
    bn = CBN(C, window=2).attach(conv)
    with pytest.raises(ValueError, match="the conv did not run before this layer in this step"):
        bn(torch.randn(2, C, 3, 3))
    # a conv in eval mode under no_grad (a frozen backbone) still feeds a training CBN: the same output and history
    # as with the conv in training mode
    torch.manual_seed(0)
    xs = [torch.randn(2, 3, 5, 5) for _ in range(3)]
    outs = []
    for frozen in (False, True):
        torch.manual_seed(1)
        conv = nn.Conv2d(3, C, 3, padding=1)
        net = nn.Sequential(conv, CBN(C, window=2).attach(conv))
        conv.train(not frozen)
        with torch.no_grad():
            outs.append(([net(x) for x in xs], net[1].history_dvar.clone()))
    for a, b in zip(outs[0][0] + [outs[0][1]], outs[1][0] + [outs[1][1]]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert bool(outs[0][1].abs().sum() > 0)  # the compensation's derivatives were recorded
    # in eval, the layer leaves nothing of the conv's input behind
    net.eval()
    with torch.no_grad():
        net(xs[0])
    assert getattr(conv, "_syncnorm_cbn_input", None) is None  # no input kept


@pytest.mark.parametrize("python", [False, True], ids=["kernels", "python"])
def test_conv_input_errors_and_corrupt_fill_count(python, monkeypatch):
    previous = ops.set_kernels_enabled(not python)
    try:
        # an unbatched conv input (nn.Conv1d/2d accept one) gives a clear error, on either path
        conv = nn.Conv1d(C, C, 3, padding=1)
        bn = CBN(C, window=3).attach(conv)
        with pytest.raises(ValueError, match=r"ran on an unbatched input of shape \(4, 4\)"):
            bn(conv(torch.randn(C, C)))
        assert int(bn.step) == 0 and int(bn.history_filled) == 0
        # a failure that slips past the checks is still reported as the layer's error (the rank joins the
        # collective first: see the distributed test)
        monkeypatch.setattr(CBN, "_conv_input_error", lambda self, conv, conv_input, x: None)
        with pytest.raises(ValueError, match="could not compute the weight-gradient statistics of the attached Conv1d"):
            bn(conv(torch.randn(C, C)))
        assert int(bn.step) == 0
        monkeypatch.undo()
        # a checkpoint whose fill count is out of range is read as a full history, not past the buffers' end
        torch.manual_seed(0)
        conv = nn.Conv2d(3, C, 3).double()
        bn = CBN(C, window=3).double().attach(conv)
        for _ in range(2):
            bn(conv(torch.randn(2, 3, 6, 6, dtype=torch.float64)))
        state = bn.state_dict()
        outs = []
        for filled in (2, 10**7):
            twin_conv = copy.deepcopy(conv)
            twin = CBN(C, window=3).double()
            twin.load_state_dict({**state, "history_filled": torch.tensor(filled)})
            twin.attach(twin_conv)
            outs.append(twin(twin_conv(torch.ones(2, 3, 6, 6, dtype=torch.float64))))
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    finally:
        ops.set_kernels_enabled(previous)


def test_pairing_keeps_no_cycles_and_follows_deepcopy():
    net = _Net()
    net(torch.randn(2, 3, 8, 8))
    assert getattr(net.conv1, "_syncnorm_cbn_input", None) is None  # captured input is dropped after use
    twin = copy.deepcopy(net)
    assert twin.bn1.paired_conv is twin.conv1 and twin.bn2.paired_conv is twin.conv2
    assert "paired_conv" not in str(list(net.state_dict()))
    bn = CBN(6, window=2)
    ref = weakref.ref(bn)
    conv = nn.Conv2d(3, 6, 1)
    bn.attach(conv)
    del bn
    gc.disable()
    try:
        assert ref() is None, "the conv's hook must not keep the norm layer alive"
    finally:
        gc.enable()
    bn2 = CBN(6, window=2).attach(conv)
    bn2.detach()
    assert bn2.paired_conv is None and len(conv._forward_hooks) == 0
    conv.eval()
    with torch.no_grad():
        conv(torch.randn(1, 3, 2, 2))
    assert not hasattr(conv, "_syncnorm_cbn_input")


# ---------------------------------------------------------------------------------------------------------------
# multi-process: CBN and CmBN checks in one world per world size
# ---------------------------------------------------------------------------------------------------------------
STEP_SIZES = {
    2: [[3, 2], [0, 4], [2, 0], [1, 3]],
    3: [[2, 0, 3], [1, 2, 0], [0, 0, 4], [3, 1, 1]],
}


def _all_reduce_(t):
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def _slice(sizes, rank):
    off = sum(sizes[:rank])
    return slice(off, off + sizes[rank])


def _cbn_oracle(rank, world, results, solo, suffix=""):
    for compensate in (True, False):
        torch.manual_seed(7)
        conv = nn.Conv2d(3, C, 3, padding=1, groups=1).double()
        bn = CBN(C, window=3, compensate=compensate).double().attach(conv)
        ref_conv = copy.deepcopy(conv)
        ref_bn = CBN(C, window=3, compensate=compensate, process_group=solo).double().attach(ref_conv)
        params = list(conv.parameters()) + list(bn.parameters())
        ref_params = list(ref_conv.parameters()) + list(ref_bn.parameters())
        errs = []
        for step, sizes in enumerate(STEP_SIZES[world]):
            xs = make_batches(sizes, 3, (4, 5), 100 + step)
            gs = grad_weights(sizes, C, (4, 5), 100 + step)
            x = xs[rank].clone().requires_grad_(True)
            y = bn(conv(x))
            (y * gs[rank]).sum().backward()
            xf = torch.cat(xs).requires_grad_(True)
            yf = ref_bn(ref_conv(xf))
            (yf * torch.cat(gs)).sum().backward()
            sl = _slice(sizes, rank)
            errs += [compare(f"y{step}", y, yf[sl], 1e-9, 1e-10), compare(f"dx{step}", x.grad, xf.grad[sl], 1e-9, 1e-10)]
            with torch.no_grad():
                for p, q in zip(params, ref_params):
                    errs.append(compare(f"grad{step}", _all_reduce_(p.grad.clone()), q.grad, 1e-9, 1e-9))
                    p -= 1e-2 * _all_reduce_(p.grad.clone()) + 1e-2 * p
                    q -= 1e-2 * q.grad + 1e-2 * q
                    p.grad = None
                    q.grad = None
        # all ranks empty: history and running stats untouched
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        bn(conv(torch.zeros(0, 3, 4, 5, dtype=torch.float64)))
        after = bn.state_dict()
        errs += [None if torch.equal(before[k], after[k]) else f"empty step changed {k}"
                 for k in before if k != "step"]
        for k, v in ref_bn.state_dict().items():
            if k != "step":
                errs.append(compare(f"state {k}", bn.state_dict()[k].double(), v.double(), 1e-9, 1e-10))
        results[f"cbn-oracle-compensate{compensate}{suffix}"] = "; ".join(e for e in errs if e) or None
        results[f"cbn-history-compensate{compensate}{suffix}"] = torch.cat(
            [bn.history_mean.flatten(), bn.history_var.flatten(), bn.history_dvar.flatten().double()])


def _cmbn_oracle(rank, world, results, solo):
    torch.manual_seed(8)
    bn = CmBN(C, accumulation_steps=3).double()
    ref = CmBN(C, accumulation_steps=3, process_group=solo).double()
    with torch.no_grad():
        for layer in (bn, ref):
            layer.weight.copy_(torch.linspace(0.5, 1.5, C))
            layer.bias.copy_(torch.linspace(-1, 1, C))
    errs = []
    for step, sizes in enumerate(STEP_SIZES[world] * 2):
        xs = make_batches(sizes, C, (3,), 200 + step)
        gs = grad_weights(sizes, C, (3,), 200 + step)
        x = xs[rank].clone().requires_grad_(True)
        y = bn(x)
        (y * gs[rank]).sum().backward()
        xf = torch.cat(xs).requires_grad_(True)
        yf = ref(xf)
        (yf * torch.cat(gs)).sum().backward()
        sl = _slice(sizes, rank)
        errs += [compare(f"y{step}", y, yf[sl], 1e-9, 1e-10), compare(f"dx{step}", x.grad, xf.grad[sl], 1e-9, 1e-10),
                 compare(f"dw{step}", _all_reduce_(bn.weight.grad.clone()), ref.weight.grad, 1e-9, 1e-9)]
        bn.zero_grad()
        ref.zero_grad()
    for k, v in ref.state_dict().items():
        errs.append(compare(f"state {k}", bn.state_dict()[k].double(), v.double(), 1e-9, 1e-10))
    results["cmbn-oracle"] = "; ".join(e for e in errs if e) or None


def _ledger_checks(rank, world, results):
    torch.manual_seed(9)
    conv = nn.Conv2d(3, C, 3, groups=1)
    cbn = CBN(C, window=3).attach(conv)
    cmbn = CmBN(C, accumulation_steps=2)
    net = nn.Sequential(conv, cbn, nn.ReLU(), nn.Conv2d(C, C, 1), cmbn)
    entries = []
    with CollectiveLedger() as ledger:
        for _ in range(3):
            y = net(torch.randn(1 + rank, 3, 6, 6))
            fwd = list(ledger.entries)
            ledger.clear()
            y.sum().backward()
            entries.append((fwd, list(ledger.entries)))
            ledger.clear()
        net.eval()
        with torch.no_grad():
            net(torch.randn(2, 3, 6, 6))
        entries.append((list(ledger.entries), []))
    results["ledger"] = entries


def _grad_sums_failure_checks(rank, world, results):
    # rank 0's weight-gradient statistics fail in a way the input checks do not catch (an unbatched conv input with
    # the checks switched off): it must still join the forward all-reduce, so every other rank raises
    # PeerInputError instead of waiting, on both paths
    from syncnorm.stats import PeerInputError

    for python in (False, True):
        previous = ops.set_kernels_enabled(not python)
        original = CBN._conv_input_error
        CBN._conv_input_error = lambda self, conv, conv_input, x: None
        try:
            conv = nn.Conv1d(C, C, 3, padding=1)
            bn = CBN(C, window=3).attach(conv)
            x = torch.randn(C, C) if rank == 0 else torch.randn(C, C, 6)
            try:
                bn(conv(x))
                outcome = "no error"
            except PeerInputError:
                outcome = "peer"
            except ValueError as e:
                outcome = "own" if "could not compute the weight-gradient statistics" in str(e) else repr(e)
        finally:
            CBN._conv_input_error = original
            ops.set_kernels_enabled(previous)
        results[f"grad-sums-failure-{'python' if python else 'kernels'}"] = outcome


def _world_worker(rank, world):
    results = {}
    solo = syncnorm.comm.new_groups(1)  # the single-process references run on each rank without syncing
    _cbn_oracle(rank, world, results, solo)  # the C++ kernels where they build
    previous = ops.set_kernels_enabled(False)
    try:
        _cbn_oracle(rank, world, results, solo, suffix="-python")  # the Python path, in the same world
    finally:
        ops.set_kernels_enabled(previous)
    on_both_implementations(_cmbn_oracle, rank, world, results, solo)
    _ledger_checks(rank, world, results)
    on_both_implementations(_grad_sums_failure_checks, rank, world, results)
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def world_results(request):
    return request.param, run_distributed(_world_worker, request.param, timeout=240)


@pytest.mark.parametrize("check", ["cbn-oracle-compensateTrue", "cbn-oracle-compensateFalse",
                                   "cbn-oracle-compensateTrue-python", "cbn-oracle-compensateFalse-python",
                                   "cmbn-oracle"])
def test_distributed_oracle(world_results, check):
    _, results = world_results
    for rank, r in enumerate(results):
        assert r[check] is None, f"rank {rank}: {r[check]}"


def test_distributed_history_identical_on_every_rank(world_results):
    _, results = world_results
    for key in ("cbn-history-compensateTrue", "cbn-history-compensateFalse", "cbn-history-compensateTrue-python",
                "cbn-history-compensateFalse-python"):
        for r in results[1:]:
            assert torch.equal(r[key], results[0][key])
    assert results[0]["cbn-history-compensateTrue"].abs().sum() > 0


def test_distributed_one_collective_per_layer(world_results):
    world, results = world_results
    ledgers = [r["ledger"] for r in results]
    assert all(led == ledgers[0] for led in ledgers)
    payload = 3 * 9 + C * 3 * 9  # sum of input patches (C_in * k * k) + sum of x * patch (weight.numel())
    for fwd, bwd in ledgers[0][:3]:
        assert [e[0] for e in fwd] == ["all_reduce_sum"] * 2, fwd
        assert [e[1] for e in fwd] == [2 * C + 2 + payload, 2 * C + 2], fwd
        assert [e[0] for e in bwd] == ["all_reduce_sum"] * 2 and [e[1] for e in bwd] == [2 * C] * 2, bwd
    assert ledgers[0][3] == ([], [])


def test_distributed_grad_sums_failure_raises_everywhere(world_results):
    _, results = world_results
    for path in ("kernels", "python"):
        outcomes = [r[f"grad-sums-failure-{path}"] for r in results]
        assert outcomes == ["own"] + ["peer"] * (len(results) - 1), (path, outcomes)


def test_half_model_history_products_do_not_overflow_on_either_path():
    # A .half() conv + CBN whose products <d sigma^2/dW, W> (about 6e5 here) exceed float16's range while every
    # activation is finite: the Python path (CUDA's) computed them in float16 and turned the statistics into inf/NaN.
    from syncnorm import ops

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    with torch.no_grad():
        base[0].weight.mul_(30.0)
    xs = [(torch.randn(4, 3, 6, 6) * 30 + 30).half() for _ in range(4)]
    outs = {}
    for python in (False, True):
        previous = ops.set_kernels_enabled(not python)
        try:
            m = syncnorm.convert(copy.deepcopy(base), "cross_iteration", window=3).half()
            opt = torch.optim.SGD(m.parameters(), lr=1e-3)
            ys = []
            for x in xs:
                y = m(x)
                y.float().square().mean().backward()
                opt.step()
                opt.zero_grad()
                ys.append(y.detach())
        finally:
            ops.set_kernels_enabled(previous)
        assert bool(m[1].history_compensable.all())
        assert all(bool(torch.isfinite(y.float()).all()) for y in ys), "python" if python else "kernels"
        assert bool(torch.isfinite(m[1].history_var_at).all()) and bool(torch.isfinite(m[1].history_dvar.float()).all())
        outs[python] = ys
    for a, b in zip(outs[False], outs[True]):
        assert compare("y", a, b, 2e-2, 2e-2) is None, compare("y", a, b, 2e-2, 2e-2)


def test_a_conv_attaches_to_one_layer_at_a_time():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    first, second = syncnorm.CrossIterationBatchNorm(4), syncnorm.CrossIterationBatchNorm(4)
    first.attach(conv)
    first.attach(conv)  # attaching again to the same layer is fine
    with pytest.raises(ValueError, match=r"this Conv2d is already attached to CrossIterationBatchNorm\(4\);.*detach\(\)"):
        second.attach(conv)
    assert first.paired_conv is conv and second.paired_conv is None
    first.detach()
    second.attach(conv)
    assert second.paired_conv is conv
    from syncnorm.layers.cross_iteration import _capture_conv_input

    assert sum(1 for fn in conv._forward_hooks.values() if fn is _capture_conv_input) == 1
    # a deep copy or an unpickled copy owns its copy of the conv the same way, and trains with it
    import pickle

    net = nn.Sequential(conv, second)
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert twin[1].paired_conv is twin[0]
        with pytest.raises(ValueError, match="already attached"):
            syncnorm.CrossIterationBatchNorm(4).attach(twin[0])
        for _ in range(2):
            twin(torch.randn(2, 3, 5, 5)).square().sum().backward()
        assert twin[0].weight.grad is not None and conv.weight.grad is None
    with pytest.raises(ValueError, match="already attached"):  # the original keeps its own pairing
        syncnorm.CrossIterationBatchNorm(4).attach(conv)


def test_checkpoint_ring_position_is_checked_at_load():
    """A checkpoint whose ring position does not fit the window is refused with the layer's name and the expected
    and actual values (the kernels would write outside the ring buffer); the layer is left usable. (A corrupt fill
    count is tolerated: nothing but compensated_history reads it; see test_conv_input_errors_and_corrupt_fill_count.)"""
    bn = CBN(C, window=3)
    state = bn.state_dict()
    state["history_next"] = torch.tensor(5)
    with pytest.raises(RuntimeError, match=r"history_next must be a slot index in \[0, 2\) for window=3, got 5"):
        bn.load_state_dict(state)
    assert int(bn.history_next) == 0
