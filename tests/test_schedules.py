"""r_max / d_max schedules: values at the ramp boundaries and in the middle, validation, apply_schedule."""

from __future__ import annotations

import math
import pickle

import inspect

import numpy as np
import pytest
import torch
import torch.nn as nn

import syncnorm
from syncnorm import schedules
from syncnorm.schedules import apply_schedule, constant, linear_ramp, paper_renorm_schedule


@pytest.mark.parametrize("step, expected", [
    (0, (1.0, 0.0)),
    (4999, (1.0, 0.0)),
    (5000, (1.0, 0.0)),  # ramps start here
    (15000, (1.0 + 2.0 * 10000 / 35000, 2.5)),  # middle of the d_max ramp
    (22500, (2.0, 5.0 * 17500 / 20000)),  # middle of the r_max ramp
    (25000, (1.0 + 2.0 * 20000 / 35000, 5.0)),  # d_max reaches 5
    (40000, (3.0, 5.0)),  # r_max reaches 3
    (10**7, (3.0, 5.0)),
])
def test_paper_schedule_defaults(step, expected):
    got = paper_renorm_schedule()(step)
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    assert all(type(v) is float for v in got)


def test_paper_schedule_compressed_and_monotone():
    s = paper_renorm_schedule(start_step=10, r_max_step=50, d_max_step=30, r_max=4.0, d_max=2.0)
    assert s(0) == s(10) == (1.0, 0.0)
    assert s(11) == pytest.approx((1.0 + 3.0 / 40, 2.0 / 20))
    assert s(20) == pytest.approx((1.75, 1.0))
    assert s(30) == pytest.approx((2.5, 2.0))
    assert s(50) == s(1000) == (4.0, 2.0)
    values = [s(t) for t in range(60)]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(values, values[1:]))
    # pure: the value depends on the step only, whatever was called before
    assert [s(t) for t in reversed(range(60))] == values[::-1]


def test_paper_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="r_max_step >= start_step=100, got r_max_step=50"):
        paper_renorm_schedule(100, 50, 200)
    with pytest.raises(ValueError, match="d_max_step"):
        paper_renorm_schedule(100, 200, 50)
    with pytest.raises(ValueError, match="expected r_max >= 1, got r_max=0.5"):
        paper_renorm_schedule(r_max=0.5)
    with pytest.raises(ValueError, match="d_max >= 0"):
        paper_renorm_schedule(d_max=-1.0)
    with pytest.raises(ValueError, match="non-negative"):
        paper_renorm_schedule(start_step=-1)
    with pytest.raises(TypeError, match="start_step"):
        paper_renorm_schedule(start_step=5.5)


@pytest.mark.parametrize("step, expected", [(0, 2.0), (4, 2.0), (5, 2.0), (6, 2.5), (9, 4.0), (10, 4.5),
                                            (15, 7.0), (100, 7.0)])
def test_linear_ramp_values(step, expected):
    assert linear_ramp(5, 15, 2.0, 7.0)(step) == pytest.approx(expected, rel=1e-15)


def test_linear_ramp_jump_and_decreasing():
    jump = linear_ramp(3, 3, 1.0, 2.0)
    assert [jump(t) for t in range(5)] == [1.0, 1.0, 1.0, 2.0, 2.0]
    down = linear_ramp(0, 4, 2.0, 0.0)
    assert [down(t) for t in range(6)] == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]


def test_linear_ramp_validation():
    with pytest.raises(ValueError, match="end_step >= start_step"):
        linear_ramp(10, 5, 0.0, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        linear_ramp(0, 5, 0.0, float("nan"))
    with pytest.raises(TypeError, match="start_value"):
        linear_ramp(0, 5, "0", 1.0)
    ramp = linear_ramp(0, 5, 0.0, 1.0)
    with pytest.raises(ValueError, match="non-negative int.*got -1"):
        ramp(-1)
    with pytest.raises(TypeError, match="got float 1.5"):
        ramp(1.5)
    with pytest.raises(TypeError, match="got bool"):
        ramp(True)
    assert ramp(np.int64(2)) == pytest.approx(0.4)


def test_constant_and_combined():
    assert constant()(0) == (1.0, 0.0)
    assert constant(2, 1)(123456) == (2.0, 1.0)
    with pytest.raises(ValueError, match="expected r_max >= 1"):
        constant(0.9, 0.0)
    with pytest.raises(ValueError, match="expected d_max >= 0"):
        constant(1.0, -0.5)
    mixed = schedules.RenormSchedule(r_max=2.0, d_max=linear_ramp(0, 10, 0.0, 1.0))
    assert mixed(5) == (2.0, 0.5)
    # a component that leaves the valid range is caught at the step where it does, naming it
    bad = schedules.RenormSchedule(r_max=linear_ramp(0, 10, 1.0, 0.0), d_max=0.0)
    assert bad(0) == (1.0, 0.0)
    with pytest.raises(ValueError, match=r"at step 5: expected r_max >= 1, got r_max=0.5"):
        bad(5)


def test_schedules_pickle_and_compare():
    s = paper_renorm_schedule(1, 8, 5)
    clone = pickle.loads(pickle.dumps(s))
    assert clone == s and clone(6) == s(6)
    assert "LinearRamp(start_step=1, end_step=8" in repr(s)


@pytest.mark.parametrize("values, exc, needle", [
    ((1.0,), TypeError, "expected a pair"),
    (1.5, TypeError, "expected a pair"),
    ((1.0, 0.0, 0.0), TypeError, "expected a pair"),
    (("2", 0.0), TypeError, "r_max must be a real number"),
    ((0.5, 0.0), ValueError, "expected r_max >= 1, got r_max=0.5"),
    ((1.0, -2.0), ValueError, "expected d_max >= 0, got d_max=-2.0"),
    ((float("nan"), 0.0), ValueError, "NaN"),
])
def test_check_renorm_values(values, exc, needle):
    with pytest.raises(exc, match=needle):
        schedules.check_renorm_values(values, "my schedule")


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = syncnorm.BatchRenorm(3)
        self.sub = nn.Sequential(nn.Conv2d(3, 3, 1), syncnorm.BatchRenorm(3, r_max=5.0), nn.BatchNorm2d(3))
        self.sync = syncnorm.SyncBatchNorm(3)


def _bounds(model):
    return [(m.r_max, m.d_max) for m in model.modules() if isinstance(m, syncnorm.BatchRenorm)]


def test_apply_schedule_sets_every_batch_renorm():
    model = _Model()
    s = paper_renorm_schedule(2, 6, 4, r_max=3.0, d_max=2.0)
    assert apply_schedule(model, s, 4) == (2.0, 2.0)
    assert _bounds(model) == [(2.0, 2.0)] * 2
    assert not hasattr(model.sync, "r_max") and not hasattr(model.sub[2], "r_max")
    # any callable works; numpy step; the module itself is visited
    out = apply_schedule(model.a, lambda step: (np.float32(1.5), step / 10), np.int64(3))
    assert out == (1.5, 0.3) and all(type(v) is float for v in out)
    assert (model.a.r_max, model.a.d_max) == (1.5, 0.3)
    assert apply_schedule(nn.Linear(2, 2), s, 10) == (3.0, 2.0)  # no BatchRenorm: nothing to set, not an error


@pytest.mark.parametrize("schedule, step, exc, needle", [
    (lambda step: (0.5, 0.0), 7, ValueError, "at step 7: expected r_max >= 1, got r_max=0.5"),
    (lambda step: (1.0, -1.0), 0, ValueError, "expected d_max >= 0"),
    (lambda step: 2.0, 0, TypeError, "expected a pair"),
    (lambda step: (1.0, None), 0, TypeError, "d_max must be a real number"),
    ((2.0, 1.0), 0, TypeError, "expected a callable"),
    (constant(2.0, 1.0), -3, ValueError, "non-negative"),
])
def test_apply_schedule_rejects_bad_schedules(schedule, step, exc, needle):
    model = _Model()
    before = _bounds(model)
    with pytest.raises(exc, match=needle):
        apply_schedule(model, schedule, step)
    assert _bounds(model) == before  # validated before any layer changes


_CANDIDATES = {
    "int": 2, "float": 2.5, "inf": math.inf, "np.float32": np.float32(2.5), "np.int64": np.int64(2),
    "tensor-0d": torch.tensor(2.5), "tensor-0d-int": torch.tensor(2), "tensor-1elem": torch.tensor([2.5]),
    "tensor-0d-f64-grad": torch.tensor(2.5, dtype=torch.float64, requires_grad=True),
    "bool": True, "tensor-bool": torch.tensor(True), "str": "2", "None": None, "complex": 2 + 0j,
    "tensor-complex": torch.tensor(2 + 0j), "tensor-2elem": torch.tensor([2.0, 3.0]), "np-0d-array": np.array(2.5),
    "nan": math.nan, "tensor-nan": torch.tensor(math.nan), "below": 0.5,
}


def _outcome(fn):
    try:
        value = fn()
    except (TypeError, ValueError) as e:
        return type(e)
    assert type(value) is float
    return value


@pytest.mark.parametrize("slot", ["r_max", "d_max"])
def test_apply_schedule_accepts_exactly_what_the_setter_accepts(slot):
    layer = syncnorm.BatchRenorm(3)

    def through_setter(v):
        setattr(layer, slot, v)
        return getattr(layer, slot)

    def through_schedule(v):
        pair = (v, 0.0) if slot == "r_max" else (1.0, v)
        return apply_schedule(layer, lambda step: pair, 0)[0 if slot == "r_max" else 1]

    got = {k: (_outcome(lambda: through_setter(v)), _outcome(lambda: through_schedule(v)))
           for k, v in _CANDIDATES.items()}
    assert {k: a for k, (a, _) in got.items()} == {k: b for k, (_, b) in got.items()}
    # and what that common behaviour is: real numbers and one-element real tensors, as floats
    accepted = {k for k, (a, _) in got.items() if isinstance(a, float)}
    expected = {"int", "float", "inf", "np.float32", "np.int64", "tensor-0d", "tensor-0d-int", "tensor-1elem",
                "tensor-0d-f64-grad"}
    if slot == "d_max":
        expected.add("below")  # 0.5 is a valid d_max but not a valid r_max
    assert accepted == expected
    assert got["tensor-0d"][0] == 2.5 and got["np.float32"][0] == 2.5
    for k in ("bool", "tensor-bool", "str", "None", "complex", "tensor-complex", "tensor-2elem", "np-0d-array"):
        assert got[k] == (TypeError, TypeError), k
    assert got["nan"] == got["tensor-nan"] == (ValueError, ValueError)


def test_schedule_arguments_accept_tensors():
    s = paper_renorm_schedule(0, 10, 10, r_max=torch.tensor(3.0), d_max=np.float64(2.0))
    assert s(10) == (3.0, 2.0) and all(type(v) is float for v in s(5))
    assert linear_ramp(0, 2, torch.tensor(0.0), torch.tensor([1.0]))(1) == 0.5


def test_public_names_have_docstrings():
    missing = []
    for name in schedules.__all__:
        obj = getattr(schedules, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            assert name in schedules.__doc__, name  # type aliases are described in the module docstring
            continue
        if not obj.__doc__ or obj.__doc__.startswith(f"{name}("):  # dataclasses generate "Name(field, ...)"
            missing.append(name)
        if inspect.isclass(obj):
            missing += [f"{name}.{a}" for a, m in vars(obj).items()
                        if (a == "__call__" or not a.startswith("_")) and inspect.isfunction(m) and not m.__doc__]
    assert missing == []


def test_apply_schedule_rejects_non_module():
    with pytest.raises(TypeError, match="expected an nn.Module"):
        apply_schedule(object(), constant(), 0)


def test_public_name():
    assert syncnorm.schedules.paper_renorm_schedule is paper_renorm_schedule
    assert math.isinf(apply_schedule(_Model(), constant(math.inf, math.inf), 0)[0])
