"""Batch Renormalization (Ioffe 2017) with batch statistics that are global over a process group."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from ..functional import NormInfo, check_input, train_step
from .sync_batchnorm import GlobalStatsBatchNorm

__all__ = ["BatchRenorm"]


class BatchRenorm(GlobalStatsBatchNorm):
    r"""Batch Renormalization (Ioffe 2017) whose batch statistics are global over a process group.

    Accepts any input of shape ``(N, C, *)`` (1d, 2d and 3d feature maps, any memory format), on CPU (gloo) and
    CUDA (NCCL), like :class:`syncnorm.SyncBatchNorm`.

    **Training.** Per channel, with ``mu_B`` and the *biased* variance ``var_B`` of the global batch (the union of
    every rank's batch in the process group), ``sigma_B = sqrt(var_B + eps)``, ``mu = running_mean`` and
    ``sigma = sqrt(running_var + eps)``:

    - ``r = clip(sigma_B / sigma, 1 / r_max, r_max)`` and ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``, computed
      in float64 with **no gradient** (they are constants for autograd);
    - ``x_hat = (x - mu_B) / sigma_B * r + d`` and ``y = weight * x_hat + bias``.

    ``r`` and ``d`` use the running statistics from *before* this step's update; the running statistics then update
    exactly as in BatchNorm: ``running_var`` with the *unbiased* variance of the global batch (global count
    ``N_total - 1``), ``momentum`` or, for ``momentum=None``, the cumulative average; ``num_batches_tracked`` counts
    training forwards with a non-empty global batch. The gradient flows through ``mu_B`` and ``sigma_B`` only, so
    ``d input`` is BatchNorm's input gradient with ``weight * r`` in place of ``weight``, and
    ``d weight = r * sum(dy * (x - mu_B) / sigma_B) + d * sum(dy)`` (local, DDP averages it), ``d bias = sum(dy)``.
    With ``r_max = 1`` and ``d_max = 0`` (the defaults) ``r = 1`` and ``d = 0`` and the layer is exactly
    ``nn.BatchNorm``, forward and backward.

    After a training forward, ``last_info.r`` and ``last_info.d`` hold the ``r`` and ``d`` applied (shape ``(C,)``,
    fp64), and :meth:`clip_fraction` the fraction of channels where either was clipped.

    **Synchronisation, uneven and empty batches.** Identical to :class:`syncnorm.SyncBatchNorm`: the global batch
    moments come from the same single all-reduce, ranks are weighted by their number of values per channel, so the
    result equals single-process BatchRenorm on the concatenated batch with the same ``r`` and ``d`` on every rank.
    A rank with ``N = 0`` joins both collectives and returns an empty output. If the whole group holds no values,
    the output is empty everywhere and the running statistics are untouched; if it holds exactly one value per
    channel, every rank raises the same ValueError.

    **Cost.** The same collectives as SyncBatchNorm, no more: one all-reduce in forward of ``2C + 2`` fp64 values
    (``16C + 16`` bytes) and one in backward of ``2C`` fp64 values (``16C`` bytes), per rank, whatever the world
    size. ``r`` and ``d`` are computed on every
    rank from the already-global moments and the (identical) running statistics, with no extra communication. While
    ``r_max = 1`` and ``d_max = 0`` the r/d arithmetic is skipped altogether (``r = 1``, ``d = 0`` exactly), so the
    warm-up phase of a schedule costs exactly what SyncBatchNorm costs.

    **Eval** (and world size 1 in eval): ``y = weight * (x - mu) / sigma + bias`` with the running statistics,
    exactly ``nn.BatchNorm`` eval, no collective.

    **r_max and d_max** are plain float attributes that a schedule may change at any step (see
    :mod:`syncnorm.schedules`); assigning ``r_max < 1``, ``d_max < 0``, NaN or a non-number raises ValueError /
    TypeError naming the layer. ``r_max = inf`` / ``d_max = inf`` disable the clipping. They are *not* in the state
    dict, which keeps exactly BatchNorm's keys (``weight, bias, running_mean, running_var, num_batches_tracked``), so
    ``nn.BatchNorm`` checkpoints load into BatchRenorm and back. A schedule is a pure function of the optimizer step,
    so resuming from a checkpoint restores them by re-applying the schedule at the restored step
    (:func:`syncnorm.schedules.apply_schedule`, or the Lightning ``RenormScheduler`` callback); with fixed values,
    constructing the layer with the same arguments restores them.

    **Precision and layout.** Statistics accumulate in fp32 (fp64 for fp64 input) even for fp16/bf16 input or under
    autocast; ``r`` and ``d`` are computed in fp64; the output has the input's dtype and memory format.

    **Errors.** Input with fewer than 2 dims, a wrong channel count or a non-floating dtype raises ValueError /
    TypeError naming the layer, the expected and the actual value; in training the offending rank still joins the
    forward collective with an error flag, so every other rank raises :class:`syncnorm.stats.PeerInputError`
    instead of hanging.

    Args:
        num_features: C, the number of channels (dim 1 of the input).
        eps: added to both variances (batch and running).
        momentum: running-statistics momentum, or None for a cumulative average.
        affine: learn per-channel ``weight`` and ``bias``.
        r_max: clip bound of ``r`` (``>= 1``; 1 means ``r = 1``).
        d_max: clip bound of ``|d|`` (``>= 0``; 0 means ``d = 0``).
        process_group: group to synchronise over; None means the default (world) group.
        device, dtype: of the parameters and buffers.
        track_running_stats: must be True (Batch Renormalization is defined through the running statistics); it is
            accepted so that generic code passing BatchNorm's arguments works, and False raises ValueError.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        r_max: float = 1.0,
        d_max: float = 0.0,
        process_group=None,
        device=None,
        dtype=None,
        track_running_stats: bool = True,
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                f"{type(self).__name__}: track_running_stats must be True (r and d compare the batch statistics "
                f"with the running statistics), got {track_running_stats!r}"
            )
        super().__init__(num_features, eps, momentum, affine, True, process_group, device, dtype)
        self.r_max = r_max
        self.d_max = d_max
        # fp64 r and d of the last training forward and the bounds they were clipped to (for clip_fraction)
        self._clip_state: Optional[tuple[torch.Tensor, torch.Tensor, float, float]] = None

    # ------------------------------------------------------------------ r_max / d_max
    @property
    def r_max(self) -> float:
        """Clip bound of ``r``: ``r`` is clipped to ``[1 / r_max, r_max]``. A float ``>= 1`` (may be inf)."""
        return self._r_max

    @r_max.setter
    def r_max(self, value: float) -> None:
        self._r_max = self._bound("r_max", value, 1.0)

    @property
    def d_max(self) -> float:
        """Clip bound of ``d``: ``d`` is clipped to ``[-d_max, d_max]``. A float ``>= 0`` (may be inf)."""
        return self._d_max

    @d_max.setter
    def d_max(self, value: float) -> None:
        self._d_max = self._bound("d_max", value, 0.0)

    def _bound(self, name: str, value, lowest: float) -> float:
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{self.layer_name}: {name} must be a real number >= {lowest:g}, "
                            f"got {type(value).__name__} {value!r}")
        value = float(value)
        if math.isnan(value) or value < lowest:
            raise ValueError(f"{self.layer_name}: {name} must be >= {lowest:g}, got {value!r}")
        return value

    # ------------------------------------------------------------------ forward
    def _train_forward(self, input: torch.Tensor) -> torch.Tensor:
        r_max, d_max = self._r_max, self._d_max
        # r_max = 1, d_max = 0 pins r = 1 and d = 0: that is SyncBatchNorm, so the renorm arithmetic is skipped
        plain = r_max == 1.0 and d_max == 0.0
        # (r and d are computed from the running statistics before train_step's update changes them in place)
        err = check_input(input, self.num_features, self.layer_name, self._min_dim, self._max_dim)
        y, info = train_step(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
            eps=self.eps, momentum=self.momentum, num_features=self.num_features, process_group=self.process_group,
            layer_name=self.layer_name, renorm=None if plain else (r_max, d_max), error=err,
        )
        if plain:
            info.r = torch.ones_like(info.batch.mean)
            info.d = torch.zeros_like(info.batch.mean)
        self.last_info = info
        self._clip_state = (info.r, info.d, r_max, d_max)
        return y

    def clip_fraction(self) -> float:
        """Fraction of channels in which ``r`` or ``d`` was clipped at the last training forward.

        A channel counts as clipped when ``r`` sits at one of its bounds ``1/r_max``, ``r_max`` or ``d`` at
        ``-d_max``, ``d_max`` (the bounds in force at that forward), i.e. when the unclipped ``sigma_B / sigma`` or
        ``(mu_B - mu) / sigma`` reached or crossed a bound. So ``r_max = 1, d_max = 0`` (plain BatchNorm) gives 1.0
        and ``r_max = d_max = inf`` gives 0.0. Returns 0.0 before the first training forward and after a forward
        whose global batch was empty. O(C), no collective; identical on every rank.
        """
        info: Optional[NormInfo] = self.last_info
        if info is None or self._clip_state is None or float(info.global_count) == 0:
            return 0.0
        r, d, r_max, d_max = self._clip_state
        # clamp returns the bound itself when it clips, so equality with the fp64 bound is exact
        clipped = (r == r_max) | (r == 1.0 / r_max) | (d == d_max) | (d == -d_max)
        return float(clipped.double().mean())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self._r_max:g}, d_max={self._d_max:g}"
