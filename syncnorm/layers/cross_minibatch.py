"""Cross mini-Batch Normalization (CmBN, YOLOv4): statistics accumulated over one gradient-accumulation window."""

from __future__ import annotations

from typing import Optional

import torch

from ..functional import check_input, normalize
from ..stats import Moments
from .sync_batchnorm import GlobalStatsBatchNorm

__all__ = ["CrossMiniBatchNorm"]

_F64 = torch.float64


class CrossMiniBatchNorm(GlobalStatsBatchNorm):
    r"""Cross mini-Batch Normalization: within one gradient-accumulation window, micro-batch k is normalised with
    the statistics of micro-batches 1..k of the window together.

    **Statistics.** Per channel, micro-batch k of a window uses the exact (count-weighted, Chan-merged) mean and
    biased variance of the union of micro-batches 1..k, each global over ``process_group``:
    ``y = (x - mean_1..k) / sqrt(var_1..k + eps) * weight + bias``. With frozen weights the last micro-batch is
    normalised with the statistics of the whole window batch. Uneven and empty batches are weighted by their element
    counts; a rank with N = 0 joins both collectives; a micro-batch whose global batch is empty leaves the window
    unchanged.

    **Gradients** are exact for those statistics: they flow through micro-batch k's contribution to the pooled
    mean and variance, while the earlier micro-batches' statistics are constants (unlike darknet's approximated
    backward); the backward divides by the pooled count.

    **Windows.** :meth:`reset` starts a new window (the Lightning callback calls it at every accumulation
    boundary, including the short last window of an epoch). With ``accumulation_steps = S`` (an int) the layer also
    starts a new window by itself every S training forwards; ``None`` means only :meth:`reset` ends a window.
    ``accumulation_steps = 1`` is exactly :class:`syncnorm.SyncBatchNorm` (``nn.BatchNorm`` at world size 1).

    **Running statistics** (when ``track_running_stats``): BatchNorm's EMA of the *current* micro-batch's global
    statistics (unbiased with the global count). **Eval** is exactly ``nn.BatchNorm`` eval and does not touch the
    window.

    **State.** The window's cumulative moments (``window_count``, ``window_mean``, ``window_m2``, fp64) and the
    number of forwards in it (``window_forwards``) are registered buffers, so a checkpoint taken mid-window resumes
    exactly. The three fp64 buffers stay fp64 when the module is cast (``.half()``, ``.to(dtype)``); they follow
    its device. A checkpoint without any of the four window buffers (a plain BatchNorm's) loads, also strictly,
    and the window starts empty.

    **Cost.** As :class:`syncnorm.SyncBatchNorm`: one all-reduce of ``2C + 2`` fp64 values in forward and one of
    ``2C`` values in backward, whatever the world size; the merge with the window is O(C).

    Args:
        num_features: C, the number of channels (dim 1 of the input).
        accumulation_steps: None, or an int >= 1: forwards per window before the layer resets by itself.
        process_group: group to synchronise over; None means the world.
        eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm``.
    """

    _fp64_buffers = ("window_count", "window_mean", "window_m2")
    _family_buffers = ("window_count", "window_mean", "window_m2", "window_forwards")

    def __init__(
        self,
        num_features: int,
        accumulation_steps: Optional[int] = None,
        process_group=None,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype)
        self.accumulation_steps = accumulation_steps
        self.register_buffer("window_count", torch.zeros((), dtype=_F64, device=device))
        self.register_buffer("window_mean", torch.zeros(num_features, dtype=_F64, device=device))
        self.register_buffer("window_m2", torch.zeros(num_features, dtype=_F64, device=device))
        self.register_buffer("window_forwards", torch.zeros((), dtype=torch.long, device=device))

    @property
    def accumulation_steps(self) -> Optional[int]:
        """Training forwards per window before an automatic reset, or None (only :meth:`reset` ends windows)."""
        return self._accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, value: Optional[int]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{self.layer_name}: accumulation_steps must be None or an int >= 1, got {value!r}")
        self._accumulation_steps = value

    def _reset_family_state(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new accumulation window: the next training forward uses only its own batch's statistics."""
        with torch.no_grad():
            self.window_count.zero_()
            self.window_mean.zero_()
            self.window_m2.zero_()
            self.window_forwards.zero_()

    def window_moments(self) -> Moments:
        """The fp64 moments of the current window so far (count 0 right after :meth:`reset`)."""
        return Moments(*(t if t.dtype == _F64 else t.to(_F64)
                         for t in (self.window_count, self.window_mean, self.window_m2)))

    def _train_forward(self, input: torch.Tensor) -> torch.Tensor:
        err = check_input(input, self.num_features, self.layer_name, self._min_dim, self._max_dim)
        with torch.no_grad():
            # the window so far as the epilogue's prior [count (every column), mean, m2]
            prior = torch.stack([self.window_count.expand(self.num_features), self.window_mean, self.window_m2])
            forwards = self.window_forwards
            if self._accumulation_steps is not None:
                # a full window starts over here; decided on the device, without reading the count on the host
                full = forwards >= self._accumulation_steps
                prior = torch.where(full, 0.0, prior)
                forwards = torch.where(full, 0, forwards)
        y, info = normalize(
            input, self.weight, self.bias, eps=self.eps, num_features=self.num_features,
            process_group=self.process_group, layer_name=self.layer_name, prior=prior, error=err, **self._running(),
        )
        self.last_info = info
        with torch.no_grad():
            # (an empty global micro-batch merges as nothing: the window's moments stay as they were)
            torch._foreach_copy_([self.window_count, self.window_mean, self.window_m2, self.window_forwards],
                                 [info.used.count, info.used.mean, info.used.m2, forwards + 1])
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", accumulation_steps={self._accumulation_steps}"
