"""FrozenBatchNorm: BatchNorm with fixed statistics and affine transform, stored as buffers."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional import check_input
from .sync_batchnorm import NamedLayer

__all__ = ["FrozenBatchNorm"]


class FrozenBatchNorm(NamedLayer, nn.Module):
    r"""BatchNorm whose statistics and affine transform are constants: ``nn.BatchNorm`` eval maths, always.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel, for any input ``(N, C, *)``
    (1d, 2d and 3d feature maps; ``N = 0`` gives an empty output), in training *and* eval mode: the ``training``
    flag is kept (so ``model.train()`` / ``model.eval()`` behave as usual for other layers) but changes nothing here.

    **Nothing is learned or synchronised.** ``weight``, ``bias``, ``running_mean`` and ``running_var`` are
    *buffers*: they move with ``.to()``, are saved in the state dict and broadcast by DDP's buffer sync (identical on
    every rank anyway), but receive no gradient and are not returned by ``parameters()``. No collective is ever
    issued and the running statistics are never updated. The input gradient flows as through a per-channel affine
    map. This is the layer detection fine-tuning uses when per-device batches are too small for batch statistics.

    **State dict.** The keys are BatchNorm's (``weight, bias, running_mean, running_var, num_batches_tracked``), so a
    ``nn.BatchNorm`` checkpoint loads with ``strict=True`` and vice versa. ``num_batches_tracked`` is kept unchanged
    (for key compatibility and a lossless :func:`syncnorm.revert`). A checkpoint without ``num_batches_tracked``
    (torchvision's ``FrozenBatchNorm2d``) also loads with ``strict=True``; the counter is then left as it is.
    With ``affine=False`` there are no ``weight``/``bias`` buffers (the keys of ``nn.BatchNorm(affine=False)``)
    and the transform is ``weight = 1, bias = 0``.

    **Conversion.** :func:`syncnorm.convert` (``to="frozen"``) copies a BatchNorm's parameters into these buffers;
    the copies are new tensors, so *Parameter identity cannot hold* for this target: an optimizer built before the
    conversion keeps the old Parameters, which no longer take part in the forward and receive no gradient.

    **Errors.** A non-int ``num_features`` or non-real ``eps`` raises TypeError, ``num_features < 1`` or ``eps`` not
    a finite number ``> 0`` raises ValueError. An input with fewer than 2 dims or a channel count other than
    ``num_features`` raises ValueError, a non-floating input TypeError, each naming the layer (:attr:`layer_name`),
    the expected and the actual value.

    Args:
        num_features: C, the number of channels (dim 1 of the input).
        eps: added to ``running_var`` before the square root.
        affine: keep ``weight``/``bias`` buffers (initialised to 1 and 0).
        device, dtype: of the buffers (``num_batches_tracked`` is always int64).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"{name}: num_features must be a positive int, got {type(num_features).__name__} "
                            f"{num_features!r}")
        num_features = int(num_features)
        if num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"{name}({num_features}): eps must be a real number > 0, got {type(eps).__name__} "
                            f"{eps!r}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"{name}({num_features}): eps must be a finite number > 0, got {eps!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.affine = bool(affine)
        self._syncnorm_name: Optional[str] = None
        factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.register_buffer("weight", torch.ones(num_features, **factory))
            self.register_buffer("bias", torch.zeros(num_features, **factory))
        else:
            self.register_buffer("weight", None)
            self.register_buffer("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``(input - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel (dim 1), in either mode.

        ``input`` is ``(N, C, *)`` with ``C == num_features`` and a floating dtype; the output has its shape, dtype
        and memory format (``nn.BatchNorm`` eval's kernel and mixed-dtype rules). No state changes, no collective.
        """
        err = check_input(input, self.num_features, self.layer_name)
        if err is not None:
            raise err
        # F.batch_norm in inference mode *is* nn.BatchNorm eval (same kernel, same mixed-dtype rules)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            # torchvision FrozenBatchNorm2d checkpoints carry no counter: keep ours rather than report it missing
            # (load_state_dict works on its own copy of the dict, so adding the key here is safe)
            state_dict[key] = self.num_batches_tracked
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        """``num_features, eps=...`` (and ``affine=False`` when there is no affine transform), for ``repr``."""
        return f"{self.num_features}, eps={self.eps:g}" + ("" if self.affine else ", affine=False")
