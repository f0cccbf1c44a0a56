"""PreciseBN / AdaBN as a plain function: exact population statistics of every BatchNorm-family layer.

This module imports no Lightning, so ``syncnorm.precise_bn`` works in any training loop. The Lightning callback is
:class:`syncnorm.callbacks.PreciseBN`.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .. import comm
from ..convert import _hooks_silenced
from ..functional import check_input, normalize
from ..stats import Moments, all_reduce_moments, moments_of

__all__ = ["precise_bn", "default_forward"]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch[0])`` for a list/tuple batch (the usual ``(inputs, targets)``), else ``model(batch)``."""
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


def _to_device(batch: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return type(batch)((k, _to_device(v, device)) for k, v in batch.items())
    return batch


def _model_device(model: nn.Module) -> Optional[torch.device]:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def _is_synchronising(layer: nn.Module) -> bool:
    # syncnorm layers and torch.nn.SyncBatchNorm normalise with statistics of a process group in training
    return hasattr(layer, "process_group")


def _batch_stats_forward(layer: _BatchNorm, acc: dict, key: int, errors: list, defer: bool) -> Callable:
    """A replacement ``forward`` for one layer during the pass: record the local moments of the input, then
    normalise with the statistics of the current batch (over the layer's process group for synchronising
    layers, this rank's batch otherwise), touching none of the layer's state.

    Invalid input to a non-synchronising layer: raised at once, unless ``defer`` (some layer synchronises, so
    the peers are about to wait for this rank in that layer's collective): then the error is appended to
    ``errors``, the input is passed on as zeros of the same shape and the pass goes on in step with the peers;
    the error is raised after the final collective, which tells every rank to stop."""
    synchronising = _is_synchronising(layer)
    name = getattr(layer, "layer_name", f"{type(layer).__name__}({layer.num_features})")
    drop, act = layer._modules.get("drop"), layer._modules.get("act")  # norm + activation layers (timm-style)

    def forward(input: torch.Tensor) -> torch.Tensor:
        conv = getattr(layer, "paired_conv", None)
        if conv is not None:  # CrossIterationBatchNorm: drop the conv input its hook kept for the layer
            conv.__dict__.pop("_syncnorm_cbn_input", None)
        err = check_input(input, layer.num_features, name)
        if err is None:
            local = moments_of(input.detach())
            acc[key] = local if acc.get(key) is None else acc[key].merge(local)
        if synchronising and comm.get_world_size(layer.process_group) > 1:
            y, _ = normalize(input, layer.weight, layer.bias, eps=layer.eps, num_features=layer.num_features,
                             process_group=layer.process_group, layer_name=name, error=err)
        else:
            if err is None and input.numel() // max(input.shape[1], 1) < 2:
                err = ValueError(f"{name}: expected more than 1 value per channel in training mode, got input of "
                                 f"shape {tuple(input.shape)}")
            if err is not None:
                if not defer or not isinstance(input, torch.Tensor):
                    raise err
                errors.append(err)
                return torch.zeros_like(input)
            y = F.batch_norm(input, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
        if drop is not None:
            y = drop(y)
        if act is not None:
            y = act(y)
        return y

    return forward


def precise_bn(
    model: nn.Module,
    loader: Iterable,
    num_batches: int = 200,
    *,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    device: Optional[torch.device] = None,
    process_group=None,
    preserve_rng: bool = True,
) -> int:
    r"""Recompute the running statistics of every BatchNorm-family layer of ``model`` that is in training mode as
    **exact population moments** over ``num_batches`` batches of ``loader`` on every rank (PreciseBN; AdaBN on
    another domain's loader).

    **Which layers.** Every layer with running statistics (any ``torch.nn.modules.batchnorm._BatchNorm`` subclass
    with ``track_running_stats``: ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and every syncnorm layer) that is
    **in training mode** when the function is called, as fvcore's ``update_bn_stats``. A layer in eval mode is
    treated as frozen: its statistics are not recomputed and it normalises with its running statistics during the
    pass. :class:`syncnorm.FrozenBatchNorm` is not a ``_BatchNorm`` and is left alone. So call ``model.train()``
    first (and put the layers you freeze in eval mode); with no layer in training mode the function warns and
    returns 0 without running the model.

    **What is computed.** For each such layer the per-channel count, mean and sum of squared deviations of *all*
    values that reach it are accumulated in fp64 (exact Chan merge per batch), then merged over the ranks of
    ``process_group`` (default: the world) with **one** all-reduce for all layers together
    (:func:`syncnorm.stats.all_reduce_moments`: raw fp64 sums ``[n, sum x, sum x^2]``, ``2C + 1`` values per
    layer, plus one error flag). Then ``running_mean`` = population mean and ``running_var`` = *unbiased*
    population variance (``M2 / (N - 1)``, BatchNorm's convention), identical on every rank. Uneven batch sizes and
    ranks with fewer batches are weighted by their element counts.

    **Difference from detectron2 / fvcore** (``update_bn_stats``). Those set ``momentum = 1 / (k + 1)`` and let
    each layer average its *per-batch* means and per-batch (unbiased) variances over the batches of one process;
    they do not all-reduce at all (under DDP each rank computes its own estimate, and DDP's buffer broadcast later
    gives every rank the values of rank 0). The average of per-batch variances is the *within-batch* variance: it
    misses the variance of the batch means, ``Var_pop = E[Var_batch] + Var(mean_batch)`` (the law of total
    variance), which is large exactly when batches are small or correlated (a detection batch of 2 images). The
    pooled moments here are the variance of all values on all ranks, whatever the batch size or number of ranks.

    **The pass.** The model runs under ``torch.no_grad`` with every module in the mode it has (dropout active if in
    training mode, as in training); no module's mode is changed. Each recomputed layer normalises with the
    statistics of the current batch, as BatchNorm does in training: over its process group for synchronising
    layers (one collective per layer per forward, the layer's own), over this rank's batch otherwise. BatchRenorm,
    CrossIteration and CrossMiniBatch layers run as plain (synchronised) batch normalisation during the pass, so no
    renorm correction, history or window is used; the statistics estimated are those their running statistics
    estimate. The layers' own forward is bypassed, so their running statistics, ``num_batches_tracked``,
    ``momentum``, histories, windows, counters and ``last_info`` are untouched; afterwards only
    ``running_mean``/``running_var`` change. The forward hooks and pre-hooks of the recomputed layers (and of their
    children) do not run during the pass, so a monitoring or feature-capturing hook never sees a pass batch. The
    ``drop``/``act`` children of a norm + activation layer (timm's ``BatchNormAct2d`` and its conversions) are
    applied after the normalisation, as in their forward. Every module's ``training`` flag is restored, and with
    ``preserve_rng`` the torch (CPU and CUDA), ``random`` and NumPy random states too, so training continues as if
    the pass had not happened.

    **Distributed.** Every rank of the world must call this function, with the same layers in training mode.
    When a recomputed layer synchronises (a syncnorm layer or ``nn.SyncBatchNorm`` in a group of more than one
    rank), every rank must run the same number of forwards: when ``loader`` has a length, the ranks of the
    *world* (the layers' groups may differ from ``process_group``) first agree on the smallest
    ``min(num_batches, len(loader))`` with one all-reduce of a single number; a loader without a length must yield
    at least ``num_batches`` batches on every rank. Without synchronising layers each rank uses its own batches
    and only the final all-reduce is collective. World size 1: no collective at all.

    **Errors during the pass.** An exception raised by the forward (invalid input to a layer, for example a
    batch of one sample for a ``BatchNorm1d``) does not leave the other ranks waiting: the rank catches it, joins
    the final all-reduce with an error flag and re-raises it there, and every other rank raises
    :class:`syncnorm.stats.PeerInputError`. Invalid input to a synchronising layer is flagged in that layer's own
    collective, so all ranks stop at the same forward. Invalid input to a non-synchronising layer while other
    layers synchronise is remembered, the layer passes zeros on and the rank finishes the pass in step with its
    peers before raising. An exception elsewhere in the model on one rank only, while layers synchronise, leaves
    the peers waiting in their next synchronising layer, as it would in training.

    Args:
        model: the model (not wrapped by DDP: pass ``ddp.module``).
        loader: iterable of batches (a DataLoader, sharded by a DistributedSampler under DDP).
        num_batches: batches to use per rank; fewer if the loader is shorter (a warning says so).
        forward_fn: ``forward_fn(model, batch)`` runs the model on a batch; default :func:`default_forward`.
        device: where to move each batch (tensors in nested lists/tuples/dicts); default the model's device.
        process_group: ranks whose batches form the population; None = the world.
        preserve_rng: restore the random number generators after the pass.

    Returns:
        the number of batches this rank used (0 when no layer is in training mode).

    Raises:
        TypeError/ValueError for a bad ``num_batches``, ``model`` or ``forward_fn``; the exception of a failed
        forward (see above), or :class:`syncnorm.stats.PeerInputError` when another rank's forward failed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"precise_bn: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int):
        raise TypeError(f"precise_bn: num_batches must be a positive int, got {type(num_batches).__name__} "
                        f"{num_batches!r}")
    if num_batches < 1:
        raise ValueError(f"precise_bn: num_batches must be a positive int, got {num_batches!r}")
    if forward_fn is None:
        forward_fn = default_forward
    elif not callable(forward_fn):
        raise TypeError(f"precise_bn: forward_fn must be callable (model, batch) -> output, got "
                        f"{type(forward_fn).__name__}")
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]
    frozen = [n or type(m).__name__ for n, m in layers if not m.training]
    layers = [(n, m) for n, m in layers if m.training]
    if not layers:
        what = (f"all of its BatchNorm layers ({', '.join(frozen[:5])}{', ...' if len(frozen) > 5 else ''}) are in "
                "eval mode, which precise_bn treats as frozen; call model.train() first") if frozen else \
            "the model has no BatchNorm layer with running statistics"
        warnings.warn(f"precise_bn: {what}; nothing to do", stacklevel=2)
        return 0
    if device is None:
        device = _model_device(model)
    stats_device = layers[0][1].running_mean.device

    steps = num_batches
    try:
        steps = min(steps, len(loader))  # type: ignore[arg-type]
        sized = True
    except TypeError:
        sized = False
    synchronising = any(_is_synchronising(m) and comm.get_world_size(m.process_group) > 1 for _, m in layers)
    if synchronising and sized:
        # synchronising layers need the same number of forwards on every rank of their groups: agree over the world
        agree = torch.tensor([-float(steps)], dtype=torch.float64, device=stats_device)
        comm.all_reduce_max(agree, None)
        steps = int(-agree.item())

    acc: dict[int, Optional[Moments]] = {i: None for i in range(len(layers))}
    deferred: list[BaseException] = []
    error: Optional[BaseException] = None
    modes = [(m, m.training) for m in model.modules()]
    rng = _rng_state() if preserve_rng else None
    used = 0
    try:
        with contextlib.ExitStack() as stack:
            for _, layer in layers:
                stack.enter_context(_hooks_silenced(layer))
            for i, (_, layer) in enumerate(layers):
                layer.forward = _batch_stats_forward(layer, acc, i, deferred, synchronising)  # shadows the method
            with torch.no_grad():
                for batch in itertools.islice(loader, steps):
                    forward_fn(model, _to_device(batch, device))
                    used += 1
    except Exception as e:  # joins the final collective with the error flag, so no peer is left waiting
        error = e
    finally:
        for _, layer in layers:
            layer.__dict__.pop("forward", None)
        for m, mode in modes:
            m.training = mode
        if rng is not None:
            _set_rng_state(rng)
    if error is None and deferred:
        error = deferred[0]

    # one collective for all layers (raises here, on every rank, if any rank failed)
    sizes = [m.num_features for _, m in layers]
    merged = all_reduce_moments([acc[i] for i in range(len(layers))], sizes, process_group, device=stats_device,
                                error=error, what="precise_bn")
    if used < num_batches:
        warnings.warn(f"precise_bn: the loader gave {used} batch(es) on this rank, fewer than num_batches="
                      f"{num_batches}", stacklevel=2)
    empty = []
    with torch.no_grad():
        for (name, layer), mom in zip(layers, merged):
            n = float(mom.count)
            if n < 2:
                empty.append(name or type(layer).__name__)
                continue
            layer.running_mean.copy_(mom.mean.to(layer.running_mean.dtype))
            layer.running_var.copy_((mom.m2 / (n - 1)).to(layer.running_var.dtype))
    if empty:
        warnings.warn(f"precise_bn: layer(s) {empty} saw fewer than 2 values per channel over all ranks; their "
                      "running statistics are unchanged", stacklevel=2)
    return used


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a torch dependency in practice
        pass
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
