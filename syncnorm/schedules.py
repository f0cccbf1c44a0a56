"""Schedules for Batch Renormalization's ``r_max`` / ``d_max``: pure functions of the optimizer step.

A *renorm schedule* (type ``RenormScheduleFn``) is any callable ``schedule(step) -> (r_max, d_max)``, where ``step``
is the number of optimizer steps taken so far (``trainer.global_step`` in Lightning, starting at 0). Because it
depends on the step alone, a resumed run gets the same values by calling it with the restored step; nothing needs
to be checkpointed. A *scalar schedule* (type ``ScalarSchedule``) is a number or a callable ``step -> float``.

**Numbers.** Wherever a value is read (arguments here, a schedule's output in :func:`check_renorm_values` and
:func:`apply_schedule`), the values accepted are exactly those :class:`syncnorm.BatchRenorm`'s ``r_max`` / ``d_max``
setters accept: real numbers (``int``, ``float``, numpy scalars such as ``np.float32``) and one-element real
tensors (0-d or not), converted with ``float()`` / ``.item()``. ``bool``, strings, ``None``, complex values, numpy
arrays and tensors of several elements raise TypeError; NaN raises ValueError.

Building blocks:

- :func:`constant` -- fixed ``(r_max, d_max)``;
- :func:`linear_ramp` -- one scalar moving linearly between two steps (``step -> float``);
- :class:`RenormSchedule` -- pairs two scalars (numbers or ``step -> float`` callables) into a renorm schedule;
- :func:`paper_renorm_schedule` -- the ramp of Ioffe (2017), every step count a parameter;
- :func:`apply_schedule` -- sets ``r_max`` / ``d_max`` on every :class:`syncnorm.BatchRenorm` of a model at a step
  (what the Lightning ``RenormScheduler`` callback calls; use it directly in a plain training loop).

The objects returned are small frozen dataclasses: picklable, comparable and with a readable ``repr``.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn as nn

__all__ = [
    "RenormScheduleFn",
    "LinearRamp",
    "RenormSchedule",
    "constant",
    "linear_ramp",
    "paper_renorm_schedule",
    "apply_schedule",
    "check_renorm_values",
]

RenormScheduleFn = Callable[[int], tuple[float, float]]
ScalarSchedule = Union[float, Callable[[int], float]]


def _step(step, who: str) -> int:
    if isinstance(step, bool):
        raise TypeError(f"{who}: step must be a non-negative int (optimizer steps taken), got bool {step!r}")
    try:
        value = operator.index(step)
    except TypeError:
        raise TypeError(f"{who}: step must be a non-negative int (optimizer steps taken), "
                        f"got {type(step).__name__} {step!r}") from None
    if value < 0:
        raise ValueError(f"{who}: step must be a non-negative int (optimizer steps taken), got {value}")
    return value


def _real(value, name: str, who: str) -> float:
    # the same values BatchRenorm's r_max / d_max setters accept
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{who}: {name} must not be NaN")
    return value


def check_renorm_values(values, source: str = "renorm schedule") -> tuple[float, float]:
    """Validate ``(r_max, d_max)`` and return it as a pair of floats.

    Raises TypeError unless ``values`` is a tuple or list of two real numbers (see **Numbers** in the module
    docstring: one-element real tensors and numpy scalars count), ValueError unless ``r_max >= 1`` and
    ``d_max >= 0`` (NaN rejected, inf allowed: no clipping). ``source`` names the producer in the message.
    """
    if not isinstance(values, (tuple, list)) or len(values) != 2:
        raise TypeError(f"{source}: expected a pair (r_max, d_max), got {type(values).__name__} {values!r}")
    r_max = _real(values[0], "r_max", source)
    d_max = _real(values[1], "d_max", source)
    if r_max < 1.0:
        raise ValueError(f"{source}: expected r_max >= 1, got r_max={r_max!r}")
    if d_max < 0.0:
        raise ValueError(f"{source}: expected d_max >= 0, got d_max={d_max!r}")
    return r_max, d_max


@dataclass(frozen=True)
class LinearRamp:
    """``step -> float``: ``start_value`` up to ``start_step``, ``end_value`` from ``end_step`` on, linear between.

    Exactly ``start_value`` at ``step <= start_step`` and exactly ``end_value`` at ``step >= end_step``; in
    between ``start_value + (end_value - start_value) * (step - start_step) / (end_step - start_step)``. With
    ``start_step == end_step`` it is a jump to ``end_value`` at that step.
    """

    start_step: int
    end_step: int
    start_value: float
    end_value: float

    def __post_init__(self) -> None:
        who = "linear_ramp"
        object.__setattr__(self, "start_step", _step(self.start_step, f"{who} start_step"))
        object.__setattr__(self, "end_step", _step(self.end_step, f"{who} end_step"))
        if self.end_step < self.start_step:
            raise ValueError(f"{who}: expected end_step >= start_step, got start_step={self.start_step}, "
                             f"end_step={self.end_step}")
        object.__setattr__(self, "start_value", _real(self.start_value, "start_value", who))
        object.__setattr__(self, "end_value", _real(self.end_value, "end_value", who))

    def __call__(self, step: int) -> float:
        """The value at ``step`` (an int >= 0, numpy ints included; TypeError / ValueError otherwise), a float."""
        step = _step(step, "linear_ramp")
        if step >= self.end_step:
            return self.end_value
        if step <= self.start_step:
            return self.start_value
        frac = (step - self.start_step) / (self.end_step - self.start_step)
        return self.start_value + (self.end_value - self.start_value) * frac


def linear_ramp(start_step: int, end_step: int, start_value: float, end_value: float) -> LinearRamp:
    """A scalar schedule moving linearly from ``start_value`` at ``start_step`` to ``end_value`` at ``end_step``.

    Constant before and after the ramp; see :class:`LinearRamp`. Combine two of them with :class:`RenormSchedule`.
    """
    return LinearRamp(start_step, end_step, start_value, end_value)


@dataclass(frozen=True)
class RenormSchedule:
    """``step -> (r_max, d_max)`` from two scalar schedules, each a number (constant) or a ``step -> float`` callable.

    Calling it validates the pair (``r_max >= 1``, ``d_max >= 0``) and raises ValueError naming the schedule and the
    step otherwise. Constant components are validated at construction.
    """

    r_max: ScalarSchedule = 1.0
    d_max: ScalarSchedule = 0.0

    def __post_init__(self) -> None:
        for name in ("r_max", "d_max"):
            value = getattr(self, name)
            if not callable(value):
                object.__setattr__(self, name, _real(value, name, "RenormSchedule"))
        check_renorm_values((self.r_max if not callable(self.r_max) else 1.0,
                             self.d_max if not callable(self.d_max) else 0.0), "RenormSchedule")

    def __call__(self, step: int) -> tuple[float, float]:
        """``(r_max, d_max)`` at ``step`` (an int >= 0) as floats, validated by :func:`check_renorm_values`."""
        step = _step(step, "RenormSchedule")
        r_max = self.r_max(step) if callable(self.r_max) else self.r_max
        d_max = self.d_max(step) if callable(self.d_max) else self.d_max
        return check_renorm_values((r_max, d_max), f"{self!r} at step {step}")


def constant(r_max: float = 1.0, d_max: float = 0.0) -> RenormSchedule:
    """The schedule returning ``(r_max, d_max)`` at every step (the defaults give plain BatchNorm)."""
    return RenormSchedule(r_max, d_max)


def paper_renorm_schedule(
    start_step: int = 5000,
    r_max_step: int = 40000,
    d_max_step: int = 25000,
    r_max: float = 3.0,
    d_max: float = 5.0,
) -> RenormSchedule:
    """The ``r_max`` / ``d_max`` ramp of Ioffe (2017), §4.1, with every step count a parameter.

    ``r_max = 1`` and ``d_max = 0`` (plain BatchNorm) up to ``start_step``; then ``r_max`` rises *linearly* to its
    final value at ``r_max_step`` and ``d_max`` linearly to its final value at ``d_max_step``; constant afterwards.
    The paper gives only the end points (1 and 0 for the first 5k steps, ``r_max = 3`` at 40k steps, ``d_max = 5``
    at 25k steps), not the ramp's shape: the linear shape is this library's choice. Scale the step counts to
    compress the ramp for a short run, e.g. ``paper_renorm_schedule(50, 400, 250)``.
    """
    who = "paper_renorm_schedule"
    start = _step(start_step, f"{who} start_step")
    for name, end in (("r_max_step", r_max_step), ("d_max_step", d_max_step)):
        if _step(end, f"{who} {name}") < start:
            raise ValueError(f"{who}: expected {name} >= start_step={start}, got {name}={end}")
    check_renorm_values((r_max, d_max), who)
    return RenormSchedule(linear_ramp(start, r_max_step, 1.0, r_max), linear_ramp(start, d_max_step, 0.0, d_max))


def apply_schedule(module: nn.Module, schedule: RenormScheduleFn, step: int) -> tuple[float, float]:
    """Set ``r_max`` / ``d_max`` of every :class:`syncnorm.BatchRenorm` in ``module`` to ``schedule(step)``.

    ``module`` itself and all its descendants are visited; other layers are left alone (a model without
    BatchRenorm layers is not an error). ``schedule`` is any callable ``step -> (r_max, d_max)``; its output is
    validated before any layer changes (TypeError unless a pair of real numbers, ValueError unless ``r_max >= 1``
    and ``d_max >= 0``), so a bad schedule leaves the model untouched. Returns the pair applied, as floats.

    Every rank computes the same values from the same step, so no collective is involved. Call it before the
    forward of each optimizer step (and after restoring a checkpoint, with the restored step).
    """
    from .layers.batch_renorm import BatchRenorm

    if not isinstance(module, nn.Module):
        raise TypeError(f"apply_schedule: expected an nn.Module, got {type(module).__name__}")
    if not callable(schedule):
        raise TypeError(f"apply_schedule: expected a callable step -> (r_max, d_max), got "
                        f"{type(schedule).__name__} {schedule!r}")
    step = _step(step, "apply_schedule")
    r_max, d_max = check_renorm_values(schedule(step), f"apply_schedule: schedule {schedule!r} at step {step}")
    for layer in module.modules():
        if isinstance(layer, BatchRenorm):
            layer.r_max = r_max
            layer.d_max = d_max
    return r_max, d_max
