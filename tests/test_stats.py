"""syncnorm.stats: the packed vector, the exact merge, and the checks that must not read the device in a step."""

from __future__ import annotations

import pytest
import torch

from syncnorm import stats
from syncnorm.stats import Moments, PeerInputError


class _Event:
    """Stands in for a CUDA event: ``done`` says whether the device has produced the value yet."""

    def __init__(self, done: bool) -> None:
        self.done = done
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True
        self.done = True


def _pend(value: float, done: bool) -> _Event:
    event = _Event(done)
    check = stats.Check(lambda v: v > 0, lambda t: t == 0, lambda v: f"flag {v}", PeerInputError)
    stats._pending.append(stats._Pending(torch.tensor([value]), event, (check,)))
    return event


@pytest.fixture(autouse=True)
def _no_leftovers():
    stats._pending.clear()
    yield
    stats._pending.clear()


def test_pending_error_waits_for_its_event_then_raises():
    event = _pend(1.0, done=False)
    stats.raise_pending_errors()  # the device has not produced the flag yet: nothing is read, nothing raised
    assert len(stats._pending) == 1
    event.done = True
    with pytest.raises(PeerInputError, match="flag 1.0"):
        stats.raise_pending_errors()
    assert not stats._pending


def test_pending_checks_that_pass_are_dropped_in_order_and_wait_blocks():
    _pend(0.0, done=True)
    later = _pend(2.0, done=False)
    stats.raise_pending_errors()
    assert len(stats._pending) == 1  # the passed one is gone, the one not yet produced stays
    with pytest.raises(PeerInputError, match="flag 2.0"):
        stats.raise_pending_errors(wait=True)
    assert later.waited


def test_require_on_cpu_raises_at_once_with_the_value():
    with pytest.raises(ValueError, match="got 3.0"):
        stats.require(torch.tensor(3.0), lambda v: v > 0, lambda t: t == 0, lambda v: f"got {v}")
    stats.require(torch.tensor(0.0), lambda v: v > 0, lambda t: t == 0, lambda v: f"got {v}")
    assert not stats._pending


def test_global_moments_world1_and_error_flag():
    x = torch.randn(4, 3, 5, dtype=torch.float64) * 2 + 7
    moments, extra = stats.global_moments(x, 3)
    assert extra is None and float(moments.count) == 20
    torch.testing.assert_close(moments.mean, x.mean((0, 2)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moments.m2, x.var((0, 2), unbiased=False) * 20, rtol=1e-10, atol=1e-10)
    # a rank with invalid input raises its own error after (not instead of) the collective
    with pytest.raises(TypeError, match="mine"):
        stats.global_moments(None, 3, error=TypeError("mine"))


def test_merge_is_exact_and_count_zero_is_neutral():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64) + 4
    ma, mb = stats.moments_of(a), stats.moments_of(b)
    both = stats.moments_of(torch.cat([a, b]))
    merged = ma.merge(mb)
    for got, want in zip(merged, both):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    empty = Moments.empty(3)
    for got, want in zip(empty.merge(mb), mb):
        assert torch.equal(got, want)
