"""convert / revert / summary: lossless round trips, what is kept, conv pairing, bad input.

Single process: the layers' distributed behaviour is tested with the layers; here process_group only has to reach
every nested layer.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import syncnorm
from syncnorm.layers.frozen import FrozenBatchNorm

convert_module = importlib.import_module("syncnorm.convert")
convert, revert, summary = convert_module.convert, convert_module.revert, convert_module.summary

ALL = ["sync", "renorm", "cross_iteration", "cross_minibatch", "frozen", "group", "batch"]
REVERSIBLE = [t for t in ALL if t != "group"]
TRAINABLE = ["sync", "renorm", "cross_iteration", "cross_minibatch"]  # world size 1 training == nn.BatchNorm
LAYER = {"sync": "SyncBatchNorm", "renorm": "BatchRenorm", "cross_iteration": "CrossIterationBatchNorm",
         "cross_minibatch": "CrossMiniBatchNorm", "frozen": "FrozenBatchNorm", "group": "GroupNorm"}


# ---------------------------------------------------------------------------------------------------------------
# a hand-made net: 1d (conv and linear), 2d, 3d, a shared layer, frozen parameters, hooks, qconfig
# ---------------------------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6))
        self.lin = nn.Linear(5, 8)
        self.bn_lin = nn.BatchNorm1d(8, momentum=None)
        self.conv2 = nn.Conv2d(3, 16, 3)
        self.bn2 = nn.BatchNorm2d(16, eps=1e-3)
        self.shared = nn.BatchNorm2d(16)
        self.block = nn.ModuleList([self.shared])  # the same layer under two names
        self.conv3 = nn.Conv3d(2, 4, 1)
        self.bn3 = nn.BatchNorm3d(4, affine=False)

    def forward(self, x1, xl, x2, x3):
        y2 = self.block[0](self.shared(self.bn2(self.conv2(x2))))
        return self.seq(x1), self.bn_lin(self.lin(xl)), y2, self.bn3(self.conv3(x3))


def inputs(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 7, generator=g), torch.randn(n, 5, generator=g), torch.randn(n, 3, 6, 6, generator=g),
            torch.randn(n, 2, 2, 3, 3, generator=g))


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                C = m.num_features
                m.running_mean.copy_(torch.randn(C, generator=g))
                m.running_var.copy_(torch.rand(C, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
                if m.affine:
                    m.weight.copy_(torch.rand(C, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(C, generator=g))
    return model


def make_net():
    net = randomise(Net())
    net.bn2.weight.requires_grad_(False)
    net.bn2.bias.requires_grad_(False)
    return net


def norm_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm,
                                                                      FrozenBatchNorm))}


def eval_outputs(model, xs):
    model.eval()
    with torch.no_grad():
        out = model(*xs)
    return out if isinstance(out, (tuple, list)) else (out,)


def assert_same_outputs(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def assert_strict_compatible(a: nn.Module, b: nn.Module):
    assert list(a.state_dict()) == list(b.state_dict())
    copy.deepcopy(a).load_state_dict(b.state_dict(), strict=True)
    copy.deepcopy(b).load_state_dict(a.state_dict(), strict=True)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def quiet_convert(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# what is kept
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("to", ALL)
def test_kept_on_hand_made_net(to):
    net = make_net()
    net.eval()
    net.bn_lin.train()  # per-layer training flags survive
    net.bn2.qconfig = "qconfig-sentinel"
    calls = []
    net.bn2.register_forward_hook(lambda m, i, o: calls.append("hook"))
    handle = net.seq[1].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    before = {n: m for n, m in norm_layers(net).items()}
    params = {n: (m.weight, m.bias) for n, m in before.items()}
    buffers = {n: (m.running_mean, m.running_var, m.num_batches_tracked) for n, m in before.items()}
    xs = inputs()
    ref = eval_outputs(copy.deepcopy(net), xs)
    calls.clear()  # the copy ran the hooks too

    out = quiet_convert(net, to)
    assert out is net  # in place
    after = norm_layers(net)
    assert list(after) == list(before)  # same names, shared layer listed once
    assert net.block[0] is net.shared
    for name, m in after.items():
        assert type(m).__name__ == LAYER.get(to, type(before[name]).__name__), name
        assert m.training == before[name].training, name
        w, b = params[name]
        if to == "frozen":
            assert isinstance(m.weight, torch.Tensor) is (w is not None) and not isinstance(m.weight, nn.Parameter)
            assert list(m.parameters()) == []
        else:
            assert m.weight is w and m.bias is b, name  # the same Parameter objects
        if to != "group":
            assert (m.running_mean, m.running_var, m.num_batches_tracked) == buffers[name]
        if hasattr(m, "set_layer_name"):
            assert f"'{name}'" in m.layer_name
    assert net.bn2.qconfig == "qconfig-sentinel"
    if to != "frozen":
        assert not net.bn2.weight.requires_grad and net.seq[1].weight.requires_grad
    if to == "group":
        assert net.bn2.num_groups == 16 and net.seq[1].num_groups == 6
        return
    assert_same_outputs(eval_outputs(net, xs), ref)  # every family's eval is BatchNorm eval
    assert calls.count("hook") == 1 and calls.count("pre") == 1
    handle.remove()  # handles of hooks registered before the conversion still work
    calls.clear()
    eval_outputs(net, xs)
    assert calls == ["hook"]


@pytest.mark.parametrize("to", REVERSIBLE)
def test_revert_round_trip_hand_made(to):
    net = make_net()
    original = copy.deepcopy(net)
    xs = inputs(1)
    net.train()
    quiet_convert(net, to)
    back = revert(net)
    assert back is net
    for name, m in norm_layers(back).items():
        assert type(m) is type(norm_layers(original)[name]), name
        assert m.eps == norm_layers(original)[name].eps and m.momentum == norm_layers(original)[name].momentum
        assert m.training
    assert back.bn2.weight.requires_grad is False and back.seq[1].weight.requires_grad is True
    assert_strict_compatible(back, original)
    assert_same_outputs(eval_outputs(back, xs), eval_outputs(original, xs))


def test_group_cannot_be_reverted_and_says_so():
    net = make_net()
    quiet_convert(net, "group")
    with pytest.warns(UserWarning, match="no way back"):
        revert(net)
    assert isinstance(net.bn2, nn.GroupNorm)
    text = summary(net)
    assert "running statistics dropped" in text and "cannot restore" in text


def test_group_split():
    net = nn.Sequential(nn.Conv2d(3, 64, 1), nn.BatchNorm2d(64), nn.Conv2d(64, 48, 1), nn.BatchNorm2d(48),
                        nn.Conv2d(48, 7, 1), nn.BatchNorm2d(7))
    g = convert(copy.deepcopy(net), "group")
    assert [g[i].num_groups for i in (1, 3, 5)] == [32, 24, 7]  # 32, else the largest divisor of C below 32
    g = convert(copy.deepcopy(net), "group", num_groups=1, include="[13]")
    assert [g[i].num_groups for i in (1, 3)] == [1, 1] and isinstance(g[5], nn.BatchNorm2d)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(48\) '3'.*num_groups=32.*choices: \[1, 2, 3, 4, 6, 8, 12, 16"):
        convert(net, "group", num_groups=32)
    assert isinstance(net[1], nn.BatchNorm2d)  # nothing was modified


@pytest.mark.filterwarnings("ignore:.*no conv attached")
@pytest.mark.parametrize("to", TRAINABLE)
def test_optimizer_built_before_conversion_trains_converted_layers(to):
    net = make_net().double()  # float64: conv biases before a norm get gradients that are 0 up to rounding
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    # the shared layer runs twice a step, which CBN / CmBN pool by design: keep it a BatchNorm here
    quiet_convert(net, to, exclude="shared")
    net.train(), ref.train()
    for step in range(1):  # one step: later CBN / CmBN steps pool earlier batches by design
        xs = [x.double() for x in inputs(10 + step, n=6)]
        for model, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            loss = sum((y * torch.linspace(-1, 1, y[0].numel(), dtype=y.dtype).view(y[0].shape)).sum()
                       for y in model(*xs))
            loss.backward()
            o.step()
    moved = 0
    for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10, msg=name)
        moved += int(not torch.equal(p, make_net().double().state_dict()[name]))
    assert moved >= 8  # the converted layers' weights and biases moved (bn2's are frozen)
    for name, m in norm_layers(net).items():
        torch.testing.assert_close(m.running_var, norm_layers(ref)[name].running_var, rtol=1e-9, atol=1e-10)


def test_frozen_stops_training_and_statistics():
    net = make_net().train()
    old_weight = net.seq[1].weight
    convert(net, "frozen")
    rm = net.seq[1].running_mean.clone()
    net(*inputs())[0].sum().backward()
    assert old_weight.grad is None
    assert torch.equal(net.seq[1].running_mean, rm) and int(net.seq[1].num_batches_tracked) == 7
    assert all("seq.1" not in n for n, _ in net.named_parameters())


def test_root_batchnorm_is_converted_and_returned():
    bn = randomise(nn.Sequential(nn.BatchNorm3d(4)))[0].eval()
    new = convert(bn, "sync")
    assert isinstance(new, syncnorm.SyncBatchNorm) and type(bn) is nn.BatchNorm3d
    assert new.weight is bn.weight and not new.training
    back = revert(new)
    assert type(back) is nn.BatchNorm3d and back.weight is bn.weight
    x = torch.randn(2, 4, 2, 2, 2)
    torch.testing.assert_close(back.eval()(x), bn(x), rtol=0, atol=0)
    frozen = convert(bn, "frozen")
    assert type(revert(frozen)) is nn.BatchNorm3d


def test_root_batchnorm_hooks_are_copied_not_shared():
    bn = nn.BatchNorm2d(3).eval()
    calls = []
    before = bn.register_forward_hook(lambda m, i, o: calls.append(("before", type(m).__name__)))
    pre = bn.register_forward_pre_hook(lambda m, i: calls.append(("pre", type(m).__name__)))
    new = convert(bn, "sync")
    x = torch.randn(2, 3, 2, 2)
    new(x), bn(x)  # hooks from before the conversion run on both layers
    assert calls == [("pre", "SyncBatchNorm"), ("before", "SyncBatchNorm"), ("pre", "BatchNorm2d"),
                     ("before", "BatchNorm2d")]
    # a hook added later to either layer runs on that layer only
    new.register_forward_hook(lambda m, i, o: calls.append(("new", type(m).__name__)))
    bn.register_forward_hook(lambda m, i, o: calls.append(("old", type(m).__name__)))
    calls.clear()
    new(x)
    assert calls == [("pre", "SyncBatchNorm"), ("before", "SyncBatchNorm"), ("new", "SyncBatchNorm")]
    calls.clear()
    bn(x)
    assert calls == [("pre", "BatchNorm2d"), ("before", "BatchNorm2d"), ("old", "BatchNorm2d")]
    # handles from before the conversion act on the original only (documented)
    before.remove(), pre.remove()
    calls.clear()
    bn(x), new(x)
    assert calls == [("old", "BatchNorm2d"), ("pre", "SyncBatchNorm"), ("before", "SyncBatchNorm"),
                     ("new", "SyncBatchNorm")]


def test_replaced_layer_hands_its_hook_dicts_over():
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    old = net[1]
    calls = []
    handle = old.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    convert(net, "renorm")
    assert net[1]._forward_hooks is old._forward_hooks  # the old layer left the model: one dict, handles work
    net.eval()(torch.randn(1, 3, 2, 2))
    assert calls == ["BatchRenorm"]
    handle.remove()
    net(torch.randn(1, 3, 2, 2))
    assert calls == ["BatchRenorm"] and not net[1]._forward_hooks


def test_process_group_reaches_nested_layers_and_is_kept():
    import torch.distributed as dist

    # a real ProcessGroup object, never initialised or used for a collective: single process, only the hand-over
    # is tested (layers refuse anything that is not a ProcessGroup)
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)
    net = make_net()
    convert(net, "sync", process_group=group)
    assert all(m.process_group is group for m in norm_layers(net).values())
    convert(net, "renorm", r_max=2.0)  # a synchronising source hands its group on
    assert all(m.process_group is group and m.r_max == 2.0 for m in norm_layers(net).values())
    convert(net, "renorm", d_max=1.0)  # same family: r_max kept
    assert all(m.r_max == 2.0 and m.d_max == 1.0 for m in norm_layers(net).values())


def test_include_exclude():
    def names(to_model):
        return sorted(n for n, m in norm_layers(to_model).items() if isinstance(m, syncnorm.SyncBatchNorm))

    assert names(convert(make_net(), "sync", include="seq")) == ["seq.1"]
    assert names(convert(make_net(), "sync", include=["bn?", "*.1"])) == ["bn2", "bn3", "seq.1"]
    assert names(convert(make_net(), "sync", include=re.compile(r"bn\d"))) == ["bn2", "bn3"]
    assert names(convert(make_net(), "sync", exclude=lambda n, m: m.num_features == 16)) == ["bn3", "bn_lin", "seq.1"]
    assert names(convert(make_net(), "sync", include="bn*", exclude="bn_lin")) == ["bn2", "bn3"]
    with pytest.raises(TypeError, match="include must be"):
        convert(make_net(), "sync", include=3)


@pytest.mark.filterwarnings("ignore:.*no conv attached")
def test_family_state_kept_within_family_dropped_across():
    net = make_net().train()
    quiet_convert(net, "cross_iteration", window=3)
    for step in range(3):
        net(*inputs(step))
    state = {k: v.clone() for k, v in net.bn2.state_dict().items()}
    quiet_convert(net, "cross_iteration", process_group=None)  # same window: history kept
    assert net.bn2.window == 3 and net.bn2.paired_conv is net.conv2
    for k, v in net.bn2.state_dict().items():
        assert torch.equal(v, state[k]), k
    quiet_convert(net, "cross_iteration", window=5)  # another window: history dropped, summary says so
    assert int(net.bn2.history_filled) == 0
    assert "dropped CrossIterationBatchNorm state (history_count" in summary(net)
    revert(net)
    assert "dropped CrossIterationBatchNorm state" in summary(net)
    assert not any(fn.__name__ == "_capture_conv_input" for fn in net.conv2._forward_hooks.values())


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------
def test_unknown_target_and_arguments():
    with pytest.raises(ValueError, match=r"unknown target to='syncbn'; choices: \['batch', 'cross_iteration'"):
        convert(make_net(), "syncbn")
    with pytest.raises(TypeError, match=r"FrozenBatchNorm does not accept \['process_group'\].*\['eps'\]"):
        convert(make_net(), "frozen", process_group=None)
    with pytest.raises(ValueError, match=r"\['affine'\] are taken from each source layer"):
        convert(make_net(), "sync", affine=False)
    with pytest.raises(ValueError, match="subclasses must be"):
        convert(make_net(), "sync", subclasses="yes")


def test_type_mistakes_raise_type_error():
    net = make_net()
    with pytest.raises(TypeError, match=r"to must be a target name \(str\), got NoneType None; choices: \['batch'"):
        convert(net, None)
    with pytest.raises(TypeError, match="subclasses must be .* got int 1"):
        convert(net, "sync", subclasses=1)
    with pytest.raises(TypeError, match=r"BatchNorm1d\(6\) 'seq.1' cannot become GroupNorm: num_groups must be an "
                                        r"int.*got float 2.0; choices: \[1, 2, 3, 6\]"):
        convert(net, "group", num_groups=2.0)
    with pytest.raises(TypeError, match="num_groups must be an int.*got str '2'"):
        convert(net, "group", num_groups="2")
    with pytest.raises(TypeError, match=r"dim must be 1, 2, 3 or None, got str '2'"):
        convert(net, "batch", dim="2")
    with pytest.raises(ValueError, match=r"dim must be 1, 2, 3 or None, got 4"):
        convert(net, "batch", dim=4)
    with pytest.raises(TypeError, match=r"revert: dim must be 1, 2, 3 or None, got float 2.0"):
        revert(net, dim=2.0)
    # torch's GroupNorm / BatchNorm take any eps (NaN outputs or a failure at the first forward): refused up front
    with pytest.raises(ValueError, match=r"convert\(to='group'\): eps must be a finite number > 0, got -1"):
        convert(net, "group", eps=-1)
    with pytest.raises(ValueError, match=r"convert\(to='batch'\): eps must be a finite number > 0, got 0.0"):
        convert(net, "batch", eps=0.0)
    with pytest.raises(TypeError, match=r"convert\(to='batch'\): momentum must be a number in \[0, 1\] or None"):
        convert(net, "batch", momentum="0.1")
    # the target layer's own refusals name the layer of the model, with their own exception type
    with pytest.raises(TypeError, match=r"cannot convert BatchNorm1d\(6\) 'seq.1' to FrozenBatchNorm: .*eps must be "
                                        r"a real number > 0, got str"):
        convert(net, "frozen", eps="1e-5")
    with pytest.raises(ValueError, match=r"cannot convert BatchNorm1d\(6\) 'seq.1' to FrozenBatchNorm: .*eps must be "
                                         r"a finite number > 0, got -1"):
        convert(net, "frozen", eps=-1)
    assert all(type(m).__name__.startswith("BatchNorm") for m in norm_layers(net).values())  # untouched
    # integers of other types are integers
    g = convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), "group", num_groups=np.int64(2))
    assert g[1].num_groups == 2 and type(g[1].num_groups) is int


def test_unconvertible_layers_name_the_layer_and_leave_model_untouched():
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    class PlainSubclass(nn.BatchNorm2d):
        pass

    net = nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(MyBN(4)), PlainSubclass(2))
    with pytest.raises(ValueError, match=r"MyBN '1.0' subclasses BatchNorm2d with its own forward.*subclasses="):
        convert(net, "sync")
    assert type(net[0]) is nn.BatchNorm1d
    convert(net, "sync", subclasses="skip")
    assert type(net[1][0]) is MyBN and type(net[2]) is syncnorm.SyncBatchNorm
    assert type(revert(net)[2]) is nn.BatchNorm2d  # dimension of the nearest supported base
    convert(net, "sync", subclasses="convert")
    assert type(net[1][0]) is syncnorm.SyncBatchNorm

    lazy = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"LazyBatchNorm2d '1' is a lazy layer.*materialise"):
        convert(lazy, "sync")
    lazy(torch.randn(2, 3, 2, 2))
    assert isinstance(convert(lazy, "sync")[1], syncnorm.SyncBatchNorm)

    no_stats = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))
    for to in ("frozen", "renorm"):
        with pytest.raises(ValueError, match=r"BatchNorm2d\(3\) '0'.*track_running_stats"):
            convert(no_stats, to)
    new = convert(no_stats, "sync")
    assert new[0].running_mean is None and type(revert(new)[0]) is nn.BatchNorm2d


def test_unknown_dimension_asks_for_dim():
    net = nn.Sequential(nn.ReLU(), syncnorm.SyncBatchNorm(3))
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(3\) '1'.*pass dim=1, 2 or 3"):
        revert(net)
    assert type(revert(net, dim=3)[1]) is nn.BatchNorm3d
    # the neighbour tells when nothing else does
    net = nn.Sequential(nn.Linear(2, 3), syncnorm.SyncBatchNorm(3), nn.Conv2d(3, 3, 1), syncnorm.SyncBatchNorm(3))
    assert [type(m) for m in revert(net)[1::2]] == [nn.BatchNorm1d, nn.BatchNorm2d]
    # nn.SyncBatchNorm is not syncnorm's: revert leaves it, convert(..., "batch") converts it
    net = nn.Sequential(nn.Conv3d(3, 3, 1), nn.SyncBatchNorm(3))
    assert type(revert(net)[1]) is nn.SyncBatchNorm
    assert type(convert(net, "batch")[1]) is nn.BatchNorm3d


def test_layer_errors_name_the_converted_layer():
    net = convert(make_net(), "sync")
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(16\) 'bn2'.*expected 16 channels"):
        net.bn2(torch.randn(2, 3, 4, 4))


# ---------------------------------------------------------------------------------------------------------------
# pairing
# ---------------------------------------------------------------------------------------------------------------
def expected_conv(bn_name: str) -> str:
    return bn_name[:-1] + "0" if "downsample" in bn_name else bn_name.replace("bn", "conv")


def test_pairing_hand_made_net_warns_once_for_unpaired():
    net = make_net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(net, "cross_iteration")
    msgs = [str(w.message) for w in caught if "compensation" in str(w.message)]
    assert len(msgs) == 1 and "bn_lin" in msgs[0] and "shared" in msgs[0]
    assert net.seq[1].paired_conv is net.seq[0] and net.bn2.paired_conv is net.conv2
    assert net.bn3.paired_conv is net.conv3 and net.shared.paired_conv is None
    text = summary(net)
    assert re.search(r"bn2 +CrossIterationBatchNorm +16 +yes +1 +conv2", text)
    assert re.search(r"shared .* UNPAIRED", text)


def test_pairing_falls_back_to_registration_order_when_tracing_fails():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = -x
            return self.bn(self.conv(x))

    net = nn.Sequential(Branchy(), Branchy())
    convert(net, "cross_iteration")
    assert net[0].bn.paired_conv is net[0].conv and net[1].bn.paired_conv is net[1].conv


@pytest.fixture(scope="module")
def resnet18():
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    return randomise(tvm.resnet18(num_classes=10))


def test_pairing_torchvision_resnet(resnet18):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = convert(copy.deepcopy(resnet18), "cross_iteration")
    assert [str(w.message) for w in caught] == []  # every layer paired: no unpaired warning
    names = {id(m): n for n, m in net.named_modules()}
    pairs = {n: names.get(id(m.paired_conv)) for n, m in net.named_modules() if hasattr(m, "paired_conv")}
    assert len(pairs) == 20
    assert pairs == {n: expected_conv(n) for n in pairs}


@pytest.mark.parametrize("to", REVERSIBLE)
def test_round_trip_resnet18(resnet18, to):
    net = copy.deepcopy(resnet18).eval()
    xs = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    ref = eval_outputs(resnet18, xs)
    convert(net, to)
    assert not net.training and all(not m.training for m in net.modules())
    assert_same_outputs(eval_outputs(net, xs), ref)
    revert(net)
    assert_strict_compatible(net, resnet18)
    assert_same_outputs(eval_outputs(net, xs), ref)


@pytest.fixture(scope="module")
def detector():
    """(model, backbone input, backbone outputs, state dict, norm layer types): built once for the module."""
    det = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    model = det.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, norm_layer=nn.BatchNorm2d,
                                        min_size=64, max_size=64)
    model = randomise(model).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # the backbone alone: 32x32 is enough
    with torch.no_grad():
        ref = list(model.backbone(x).values())
    types = {n: type(m) for n, m in model.named_modules()}
    return model, x, ref, {k: v.clone() for k, v in model.state_dict().items()}, types


@pytest.mark.parametrize("to", REVERSIBLE)
def test_round_trip_fasterrcnn(detector, to):
    model, x, ref, state, types = detector
    net = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(net, to)
    assert [str(w.message) for w in caught] == []  # cross_iteration: every layer paired, so no unpaired warning
    converted = {n: type(m).__name__ for n, m in net.named_modules() if types[n] is nn.BatchNorm2d}
    assert len(converted) == 53 and set(converted.values()) == {LAYER.get(to, "BatchNorm2d")}
    if to == "cross_iteration":  # the detector does not trace; its backbone does
        names = {id(m): n for n, m in net.named_modules()}
        pairs = {n: names.get(id(m.paired_conv)) for n, m in net.named_modules() if hasattr(m, "paired_conv")}
        assert len(pairs) == 53 and pairs == {n: expected_conv(n) for n in pairs}
    with torch.no_grad():
        assert_same_outputs(list(net.backbone(x).values()), ref)
    revert(net)
    assert {n: type(m) for n, m in net.named_modules()} == types
    # strict compatibility both ways: same keys in the same order, equal tensors, and a strict load succeeds
    got = net.state_dict()
    assert list(got) == list(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert_same_outputs(list(net.backbone(x).values()), ref)


def test_torchvision_frozen_source(resnet18):
    tvm = pytest.importorskip("torchvision.models")
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = tvm.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d)
    frozen.load_state_dict(resnet18.state_dict())
    frozen.eval()
    xs = (torch.randn(2, 3, 32, 32),)
    ref = eval_outputs(frozen, xs)
    net = convert(copy.deepcopy(frozen), "sync")
    assert all(p.requires_grad for p in net.parameters())
    # torchvision computes x * scale + shift, BatchNorm eval rounds differently
    torch.testing.assert_close(eval_outputs(net, xs)[0], ref[0], rtol=1e-5, atol=1e-5)
    revert(net)
    assert type(net.bn1) is nn.BatchNorm2d
    net.load_state_dict(frozen.state_dict(), strict=True)
    frozen.load_state_dict(net.state_dict(), strict=True)
    torch.testing.assert_close(eval_outputs(net, xs)[0], ref[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# timm (test-only dependency)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timm_model():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return randomise(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)).eval()


@pytest.mark.parametrize("to", REVERSIBLE)
def test_round_trip_timm_keeps_activation(timm_model, to):
    from timm.layers.norm_act import BatchNormAct2d

    net = copy.deepcopy(timm_model)
    acts = {n: (m.act, m.drop) for n, m in net.named_modules() if isinstance(m, BatchNormAct2d)}
    assert any(not isinstance(a, nn.Identity) for a, _ in acts.values())
    xs = (torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2)),)
    ref = eval_outputs(timm_model, xs)
    quiet_convert(net, to)
    layers = dict(net.named_modules())
    for n, (act, drop) in acts.items():
        assert layers[n].act is act and layers[n].drop is drop, n
        if to != "batch":
            assert type(layers[n]).__name__ == LAYER[to] + "Act"
    assert_same_outputs(eval_outputs(net, xs), ref)
    assert "+Hardswish" in summary(net)
    revert(net)
    layers = dict(net.named_modules())
    assert all(type(layers[n]) is BatchNormAct2d and layers[n].act is acts[n][0] for n in acts)
    assert_strict_compatible(net, timm_model)
    assert_same_outputs(eval_outputs(net, xs), ref)


def test_activation_variants_pickle(timm_model):
    net = convert(copy.deepcopy(timm_model), "sync")
    blob = pickle.dumps(net)
    # a fresh process has not built the class yet: the module builds it on first lookup
    cls = type(net.bn1)
    del convert_module.__dict__[cls.__name__]
    convert_module._ACT_CLASSES.clear()
    loaded = pickle.loads(blob)
    assert type(loaded.bn1).__name__ == "SyncBatchNormAct" and type(loaded.bn1) is not cls
    xs = (torch.randn(1, 3, 32, 32),)
    assert_same_outputs(eval_outputs(loaded, xs), eval_outputs(net, xs))


# ---------------------------------------------------------------------------------------------------------------
# summary and public names
# ---------------------------------------------------------------------------------------------------------------
def test_summary_resnet50_is_readable():
    tvm = pytest.importorskip("torchvision.models")
    text = summary(convert(tvm.resnet50(), "renorm", r_max=3.0, d_max=5.0))
    lines = text.splitlines()
    assert lines[0] == "syncnorm.summary: 53 norm layers (53 BatchRenorm)"
    assert lines[1].split() == ["name", "type", "features", "affine", "sync", "renorm"]
    assert len(lines) == 53 + 3 and max(map(len, lines)) <= 100
    assert re.fullmatch(r"layer4\.2\.bn3 +BatchRenorm +2048 +yes +1 +3/5", lines[-1])


def test_summary_other_norms_and_empty():
    net = nn.Sequential(nn.GroupNorm(2, 4), nn.LayerNorm(3), nn.InstanceNorm2d(4), FrozenBatchNorm(4))
    text = summary(net)
    assert re.search(r"0 +GroupNorm +2/4", text) and re.search(r"1 +LayerNorm +3", text)
    assert re.search(r"3 +FrozenBatchNorm +4 +yes +-", text)
    assert summary(nn.Linear(2, 2)) == "syncnorm.summary: no norm layers"


def test_registry_entries():
    assert sorted(convert_module.TARGETS) == sorted(ALL)
    for name, target in convert_module.TARGETS.items():
        if name in LAYER:
            assert target.layer_class().__name__ == LAYER[name]


def _undocumented(module) -> list[str]:
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # data (TARGETS) and type aliases: described in the module docstring
        # dataclasses without a docstring get the generated "Name(field: type, ...)"
        if not obj.__doc__ or obj.__doc__.startswith(f"{name}("):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not (inspect.isfunction(member) or isinstance(member, property)):
                    continue
                if not member.__doc__:
                    missing.append(f"{name}.{attr}")
    return missing


def test_public_names_have_docstrings():
    import syncnorm.layers.frozen as frozen_module

    assert convert_module.__doc__ and "Pattern" in convert_module.__doc__
    assert _undocumented(convert_module) == []
    assert _undocumented(frozen_module) == []
    assert {"layer_class", "accepted_kwargs"} <= set(vars(convert_module.Target))


def test_public_names():
    import syncnorm.convert  # noqa: F401  (importing the submodule must not shadow the function)

    assert syncnorm.convert is convert and syncnorm.revert is revert and syncnorm.summary is summary


def test_timm_sync_batchnorm_act_source(timm_model):
    from timm.layers import convert_sync_batchnorm
    from timm.layers.norm_act import BatchNormAct2d

    net = convert_sync_batchnorm(copy.deepcopy(timm_model))
    assert type(net.bn1).__name__ == "SyncBatchNormAct"
    act = net.bn1.act
    convert(net, "frozen")
    assert type(net.bn1).__name__ == "FrozenBatchNormAct" and net.bn1.act is act
    revert(net)
    assert type(net.bn1) is BatchNormAct2d and net.bn1.act is act
    assert_strict_compatible(net, timm_model)


def test_tracing_runs_no_user_hook(resnet18):
    net = copy.deepcopy(resnet18)
    seen = []
    net.layer2.register_forward_hook(lambda m, i, o: seen.append(type(o).__name__))
    convert(net, "cross_iteration")
    assert seen == [] and net.layer2[0].bn1.paired_conv is net.layer2[0].conv1
    net.eval()(torch.randn(1, 3, 32, 32))
    assert seen == ["Tensor"]


@pytest.mark.parametrize("to", ["sync", "renorm", "cross_iteration", "cross_minibatch", "batch", "frozen"])
def test_layer_without_tensors_converts_and_reverts(to):
    # affine=False and track_running_stats=False: the layer holds no tensor to take a device or dtype from (this
    # raised AttributeError); renorm and frozen need running statistics and refuse it with their own error
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False, track_running_stats=False))
    x = torch.randn(2, 3, 5, 5)
    if to in ("renorm", "frozen"):
        with pytest.raises(ValueError, match="track_running_stats"):
            convert(copy.deepcopy(net), to)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert(copy.deepcopy(net), to)
        assert converted[1].weight is None and converted[1].running_mean is None
        assert converted(x).shape == (2, 4, 5, 5)
        back = revert(converted)
    assert type(back[1]) is nn.BatchNorm2d and back[1].weight is None and back[1].running_mean is None


class _ConvTwoNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn1(y) + self.bn2(y)


def test_a_conv_feeding_two_norm_layers_pairs_with_neither():
    # both used to be attached to the conv; the first consumed the captured input and the second raised in training
    with pytest.warns(UserWarning, match=r"fed by a conv that feeds several norm layers.*bn1, bn2"):
        net = convert(_ConvTwoNorms(), "cross_iteration", window=3)
    assert net.bn1.paired_conv is None and net.bn2.paired_conv is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unpaired layers' fallback warning
        for _ in range(3):
            net(torch.randn(2, 3, 5, 5)).sum().backward()
    assert int(net.bn1.history_filled) == 2 and not bool(net.bn1.history_compensable.any())


@pytest.mark.parametrize("to", ["cross_iteration", "cross_minibatch"])
def test_plain_batchnorm_checkpoint_loads_strictly_and_the_family_state_starts_empty(to):
    # SyncNormPlugin writes checkpoints with BatchNorm's keys only; its docstring promises they load into a model
    # converted by NormConversion (they raised "Missing key(s)" for the CBN history / CmBN window buffers)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    plain(torch.randn(4, 3, 5, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = convert(copy.deepcopy(plain), to, **({"window": 3} if to == "cross_iteration" else {}))
    for _ in range(3):
        net(torch.randn(4, 3, 5, 5)).sum().backward()
    family = {k for k in net.state_dict() if k not in plain.state_dict()}
    assert family and any(bool(net.state_dict()[k].any()) for k in family)  # some state to forget
    # a partial, non-strict load that does not contain this layer leaves its state alone
    before = {k: net.state_dict()[k].clone() for k in family}
    net.load_state_dict({k: v for k, v in plain.state_dict().items() if k.startswith("0.")}, strict=False)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    result = net.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(not bool(net.state_dict()[k].any()) for k in family)  # empty history / window, step 0
    torch.testing.assert_close(net[1].running_mean, plain[1].running_mean)
    # a checkpoint that has some of the family buffers but not all still reports the others
    partial = {**plain.state_dict(), next(iter(sorted(family))): net.state_dict()[next(iter(sorted(family)))]}
    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_state_dict(partial, strict=True)
