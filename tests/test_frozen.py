"""FrozenBatchNorm: nn.BatchNorm eval maths on any (N, C, *), buffers only, BatchNorm's state-dict keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import syncnorm
from syncnorm.layers.frozen import FrozenBatchNorm

C = 5
SHAPES = {"1d": (), "1d-seq": (4,), "2d": (3, 4), "3d": (2, 3, 2)}
BN_BY_DIM = {"1d": nn.BatchNorm1d, "1d-seq": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}


def _random_bn(cls, seed: int, affine: bool = True, eps: float = 1e-5) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    bn = cls(C, eps=eps, affine=affine).double()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64) * 3)
        bn.running_var.copy_(torch.rand(C, generator=g, dtype=torch.float64) * 2 + 0.1)
        bn.num_batches_tracked.fill_(11)
        if affine:
            bn.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
    return bn.eval()


@pytest.mark.parametrize("spatial", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_equals_batchnorm_eval(spatial, affine, training):
    bn = _random_bn(BN_BY_DIM[spatial], seed=len(spatial), affine=affine, eps=1e-3)
    frozen = FrozenBatchNorm(C, eps=1e-3, affine=affine).double()
    frozen.load_state_dict(bn.state_dict(), strict=True)
    frozen.train(training)  # the flag changes nothing
    x = torch.randn(6, C, *SHAPES[spatial], dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = frozen(x), bn(xr)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    # statistics never move, nothing is trainable
    torch.testing.assert_close(frozen.running_mean, bn.running_mean, rtol=0, atol=0)
    assert int(frozen.num_batches_tracked) == 11
    assert list(frozen.parameters()) == []
    assert all(not b.requires_grad for b in frozen.buffers())


def test_state_dict_keys_match_batchnorm_both_ways():
    for affine in (True, False):
        bn = _random_bn(nn.BatchNorm2d, seed=3, affine=affine).float()
        frozen = FrozenBatchNorm(C, affine=affine)
        assert list(frozen.state_dict()) == list(bn.state_dict())
        frozen.load_state_dict(bn.state_dict(), strict=True)
        back = nn.BatchNorm2d(C, affine=affine)
        back.load_state_dict(frozen.state_dict(), strict=True)
        for k, v in bn.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k


def test_loads_torchvision_frozen_checkpoint_without_counter():
    misc = pytest.importorskip("torchvision.ops.misc")
    tv = misc.FrozenBatchNorm2d(C)
    with torch.no_grad():
        tv.running_mean.uniform_(-1, 1)
        tv.weight.uniform_(0.5, 2)
    frozen = FrozenBatchNorm(C)
    frozen.num_batches_tracked.fill_(4)
    frozen.load_state_dict(tv.state_dict(), strict=True)
    assert int(frozen.num_batches_tracked) == 4
    x = torch.randn(2, C, 3, 3)
    torch.testing.assert_close(frozen(x), tv(x), rtol=1e-6, atol=1e-6)
    tv.load_state_dict(frozen.state_dict(), strict=True)  # and back (torchvision drops the counter)


def test_moves_with_to_and_empty_batch():
    frozen = FrozenBatchNorm(C).to(torch.float64)
    assert frozen.weight.dtype == frozen.running_var.dtype == torch.float64
    assert frozen.num_batches_tracked.dtype == torch.long
    y = frozen(torch.zeros(0, C, 2, dtype=torch.float64))
    assert y.shape == (0, C, 2)


def test_bad_input_names_layer():
    frozen = FrozenBatchNorm(C)
    frozen.set_layer_name("backbone.bn1")
    with pytest.raises(ValueError, match=r"FrozenBatchNorm\(5\) 'backbone.bn1'.*expected 5 channels.*got 4"):
        frozen(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="expected at least 2D"):
        frozen(torch.randn(5))
    with pytest.raises(TypeError, match="floating-point"):
        frozen(torch.ones(2, C, dtype=torch.long))



@pytest.mark.parametrize("kwargs, exc, needle", [
    ({"num_features": 0}, ValueError, "num_features must be a positive int, got 0"),
    ({"num_features": 3.0}, TypeError, "num_features must be a positive int, got float 3.0"),
    ({"num_features": "3"}, TypeError, "num_features must be a positive int, got str '3'"),
    ({"num_features": True}, TypeError, "num_features must be a positive int, got bool True"),
    ({"num_features": 3, "eps": -1}, ValueError, r"FrozenBatchNorm\(3\): eps must be a finite number > 0, got -1"),
    ({"num_features": 3, "eps": float("inf")}, ValueError, "eps must be a finite number > 0, got inf"),
    ({"num_features": 3, "eps": "1e-5"}, TypeError, r"FrozenBatchNorm\(3\): eps must be a real number > 0, got str"),
])
def test_bad_arguments(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        FrozenBatchNorm(**kwargs)


def test_integer_like_num_features():
    frozen = FrozenBatchNorm(np.int64(3), eps=np.float32(1e-3))
    assert type(frozen.num_features) is int and frozen.num_features == 3 and frozen.running_mean.shape == (3,)
    assert type(frozen.eps) is float


def test_public_methods_have_docstrings():
    for name in ("forward", "layer_name", "set_layer_name", "extra_repr"):
        assert getattr(FrozenBatchNorm, name).__doc__, name


def test_public_name_and_repr():
    assert syncnorm.FrozenBatchNorm is FrozenBatchNorm
    assert repr(FrozenBatchNorm(3, eps=1e-3)) == "FrozenBatchNorm(3, eps=0.001)"
    assert "affine=False" in repr(FrozenBatchNorm(3, affine=False))
