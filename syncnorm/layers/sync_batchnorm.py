"""Cross-GPU Batch Normalization (MegDet): statistics all-reduced over a process group, on any backend."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .. import comm
from ..functional import NormInfo, check_input, train_step

__all__ = ["SyncBatchNorm", "GlobalStatsBatchNorm", "NamedLayer"]


class NamedLayer:
    """Mixin giving a norm layer the name its error messages use (set by :func:`syncnorm.convert`)."""

    _syncnorm_name: Optional[str] = None

    @property
    def layer_name(self) -> str:
        """Name used in error messages: the qualified name if known, else ``ClassName(num_features)``."""
        base = f"{type(self).__name__}({self.num_features})"
        return f"{base} '{self._syncnorm_name}'" if self._syncnorm_name else base

    def set_layer_name(self, name: str) -> None:
        """Record the qualified name of this layer in its model, for error messages."""
        self._syncnorm_name = name


class GlobalStatsBatchNorm(NamedLayer, _BatchNorm):
    """Base of the synchronising layers: BatchNorm's parameters, buffers and state-dict keys, plus a process group.

    Subclasses implement :meth:`_train_forward`; eval mode is handled here and is exactly ``nn.BatchNorm`` eval (no
    collective). The layer's name in error messages is its qualified name when :func:`syncnorm.convert` created
    it (or after :meth:`set_layer_name`), else ``ClassName(num_features)``.
    """

    _min_dim = 2
    _max_dim: Optional[int] = None
    # buffers that accumulate statistics in float64 by design (counts and moments pooled over steps): dtype casts of
    # the module (.half(), .float(), .to(dtype)) leave them in float64, device moves apply (see _apply)
    _fp64_buffers: tuple[str, ...] = ()
    # buffers beyond BatchNorm's that hold the family's own state (CBN history, CmBN window); a checkpoint that has
    # none of them (plain BatchNorm's, or SyncNormPlugin's) loads, and that state starts empty (_reset_family_state)
    _family_buffers: tuple[str, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"{name}({num_features}): eps must be a real number > 0, got {type(eps).__name__} {eps!r}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"{name}({num_features}): eps must be a finite number > 0, got {eps!r}")
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)):
            raise TypeError(f"{name}({num_features}): momentum must be a real number in [0, 1] or None, got "
                            f"{type(momentum).__name__} {momentum!r}")
        if momentum is not None and not (0.0 <= momentum <= 1.0):  # NaN fails this too
            raise ValueError(f"{name}({num_features}): momentum must be in [0, 1] or None, got {momentum!r}")
        eps = float(eps)
        momentum = None if momentum is None else float(momentum)
        if not comm.is_process_group(process_group):
            raise TypeError(f"{name}({num_features}): process_group must be None or a torch.distributed.ProcessGroup "
                            f"(e.g. from syncnorm.comm.new_groups), got {type(process_group).__name__} "
                            f"{process_group!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        self._syncnorm_name: Optional[str] = None
        self.last_info = None

    last_info: Optional[NormInfo]
    """What the last training forward computed (global batch moments, count, r/d; see
    :class:`syncnorm.functional.NormInfo`), or None before the first one. For monitors; all detached tensors."""

    def _apply(self, fn, recurse: bool = True):
        # nn.Module casts every floating buffer with the module. A float16 count overflows at 65504 values per
        # channel (and bfloat16 is inexact from 257), which would silently corrupt the pooled statistics, so the
        # float64 statistics buffers keep their dtype and only follow the module's device.
        before = {name: self._buffers[name] for name in self._fp64_buffers if self._buffers.get(name) is not None}
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # read before nn.BatchNorm's loader, which inserts num_batches_tracked into checkpoints of old versions
        has_layer = any(prefix + name in state_dict
                        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        family = {prefix + name for name in self._family_buffers if self._buffers.get(name) is not None}
        if family and has_layer and not family & state_dict.keys():
            # a checkpoint with BatchNorm's keys only: this layer's own state starts empty (a checkpoint that has
            # some of these keys but not all still reports the missing ones; one without this layer at all, e.g. a
            # partial strict=False load of other modules, leaves its state alone)
            missing_keys[:] = [k for k in missing_keys if k not in family]
            self._reset_family_state()

    def _reset_family_state(self) -> None:
        """Empty the state in :attr:`_family_buffers` (called when a checkpoint without it is loaded)."""

    # ------------------------------------------------------------------ validation
    def _check_input_dim(self, input: torch.Tensor) -> None:
        err = check_input(input, self.num_features, self.layer_name, self._min_dim, self._max_dim)
        if err is not None:
            raise err

    def _input_error(self, input) -> Optional[BaseException]:
        return check_input(input, self.num_features, self.layer_name, self._min_dim, self._max_dim)

    def _use_batch_stats(self) -> bool:
        return self.training or (self.running_mean is None and self.running_var is None)

    @property
    def world_size(self) -> int:
        """Number of ranks this layer synchronises over (1 when not distributed)."""
        return comm.get_world_size(self.process_group)

    # ------------------------------------------------------------------ forward
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Eval: ``nn.BatchNorm`` eval, no collective. Training: the subclass's synchronised path."""
        if not self.training:
            self._check_input_dim(input)
            # eval: nn.BatchNorm eval (running statistics, or local batch statistics without running stats)
            tensors = [self.running_mean if self.track_running_stats else None,
                       self.running_var if self.track_running_stats else None, self.weight, self.bias]
            dtypes = {t.dtype for t in tensors if t is not None}
            low = input.dtype in (torch.float16, torch.bfloat16)
            if dtypes and dtypes != {input.dtype} and not (low and dtypes == {torch.float32}):
                # the dtype combinations the training path takes but F.batch_norm refuses (an fp32 module on fp64
                # input, a .half() module on fp32 input): compute in the input's dtype (fp32 for fp16/bf16 input),
                # as training does, instead of training fine and failing at the first evaluation
                target = torch.float32 if low else input.dtype
                tensors = [None if t is None else t.to(target) for t in tensors]
            return F.batch_norm(input, *tensors[:2], *tensors[2:], self._use_batch_stats(), 0.0, self.eps)
        return self._train_forward(input)

    def _train_forward(self, input: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _running(self) -> dict:
        """The running statistics as keyword arguments of :func:`syncnorm.functional.normalize` (which updates
        them in place), or none when the layer does not track them."""
        if not self.track_running_stats:
            return {}
        return {"running_mean": self.running_mean, "running_var": self.running_var,
                "num_batches_tracked": self.num_batches_tracked, "momentum": self.momentum}

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.process_group is not None:
            s += f", group_size={self.world_size}"
        return s


class SyncBatchNorm(GlobalStatsBatchNorm):
    r"""Batch Normalization whose batch statistics are global over a process group, on CPU (gloo) and CUDA (NCCL).

    Accepts any input of shape ``(N, C, *)`` (1d, 2d and 3d feature maps, any memory format).

    **Training, world size W > 1.** Per channel, the mean and biased variance used to normalise are those of the
    union of the W ranks' batches, exactly as ``nn.BatchNorm`` on the concatenated batch would compute them:
    ``y = (x - mean) / sqrt(var + eps) * weight + bias``. Ranks are weighted by their number of values per channel,
    so uneven batches are exact. A rank with ``N = 0`` joins both collectives and returns an empty output. If the
    whole group holds no values the output is empty everywhere and the running statistics are untouched; if it holds
    exactly one value per channel, every rank raises the same ValueError (as ``nn.BatchNorm`` does).

    **Gradients.** The input gradient is the exact gradient of the sum of every rank's loss, as in
    ``torch.nn.SyncBatchNorm``; ``weight``/``bias`` gradients are the local ones (DDP averages them). First order
    only: the backward runs outside autograd, so differentiating the gradients again (``create_graph=True``, e.g.
    a gradient penalty) raises RuntimeError when it reaches this layer.

    **Running statistics** (when ``track_running_stats``) are updated identically on every rank from the global
    statistics: ``running_var`` with the *unbiased* global variance (global count ``N_total - 1``), ``momentum=None``
    gives the cumulative average, and ``num_batches_tracked`` counts training forwards with a non-empty global batch.

    **Cost.** Exactly one ``torch.distributed`` all-reduce in forward, of ``2C + 2`` fp64 values (``16C + 16``
    bytes), and one in backward, of ``2C`` fp64 values (``16C`` bytes), per rank, independent of W.
    ``torch.nn.SyncBatchNorm`` all-gathers ``O(W * C)``. The arithmetic is four passes over the data per forward +
    backward, in the custom ops of :mod:`syncnorm.ops` (C++ kernels on CPU). Nothing is read on the host during a
    training step; on an accelerator the checks of the collective's error flag and count surface at the next
    synchronising layer (see :func:`syncnorm.stats.require`). ``torch.compile(fullgraph=True)`` traces the layer.

    **World size 1, no process group, eval mode.** No collective. Eval mode is exactly ``nn.BatchNorm`` eval
    (running statistics; without running statistics, this rank's batch statistics). World size 1 in training gives
    ``nn.BatchNorm`` training results (to floating-point rounding) through the same path.

    **Precision and layout.** Statistics accumulate in fp32 (fp64 for fp64 input) even for fp16/bf16 input or under
    autocast; the output has the input's dtype and memory format (channels_last / channels_last_3d preserved).
    Parameters and running statistics in another dtype (a module cast with ``.half()``, an fp32 module on fp64
    input) are used in the input's dtype (fp32 for fp16/bf16 input), in training and in eval.

    **Errors.** A non-real ``eps`` / ``momentum``, or a ``process_group`` that is neither None nor a
    ``torch.distributed.ProcessGroup``, raises TypeError, ``eps`` not a finite number > 0 or ``momentum``
    outside [0, 1] ValueError, at construction. Input with fewer than 2 dims, a wrong channel count or a
    non-floating dtype raises ValueError / TypeError naming the layer, the expected and the actual value. In
    training the offending rank still joins the forward collective with an error flag, then raises; every other rank
    raises :class:`syncnorm.stats.PeerInputError` instead of hanging: at once on CPU, and on CUDA (where the step
    reads nothing on the host) at the latest in the next synchronising layer's forward or backward (see
    :func:`syncnorm.stats.require`). Under ``torch.compile`` an input of invalid shape or type is found while that
    rank traces, before any collective, so its peers wait for the process group's timeout.

    Args:
        num_features: C, the number of channels (dim 1 of the input).
        eps: added to the variance for stability.
        momentum: running-statistics momentum, or None for a cumulative average.
        affine: learn per-channel ``weight`` and ``bias``.
        track_running_stats: keep ``running_mean``/``running_var``/``num_batches_tracked``.
        process_group: group to synchronise over; None means the default (world) group. See
            :func:`syncnorm.comm.new_groups` for groups of k ranks.
    """

    def _train_forward(self, input: torch.Tensor) -> torch.Tensor:
        err = check_input(input, self.num_features, self.layer_name, self._min_dim, self._max_dim)
        y, self.last_info = train_step(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
            eps=self.eps, momentum=self.momentum, num_features=self.num_features, process_group=self.process_group,
            layer_name=self.layer_name, error=err,
        )
        return y
