"""Helpers shared by the Lightning callbacks: finding norm layers, logging decisions, CmBN/CBN wiring."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


def norm_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` for every BatchNorm-family layer (any ``_BatchNorm`` subclass) in ``module``."""
    for name, m in module.named_modules():
        if isinstance(m, _BatchNorm):
            yield name, m


def layers_of(module: nn.Module, class_name: str, module_path: str) -> list[tuple[str, nn.Module]]:
    """Layers of the syncnorm class ``class_name`` (imported from ``module_path`` only if already importable)."""
    import importlib

    try:
        cls = getattr(importlib.import_module(module_path), class_name)
    except (ImportError, AttributeError):
        return []
    return [(n, m) for n, m in module.named_modules() if isinstance(m, cls)]


def should_log(trainer: Any) -> bool:
    """True when the trainer's loggers record this optimizer step: ``log_every_n_steps > 0`` and
    ``(step + 1) % log_every_n_steps == 0`` with ``step`` = :func:`logging_step` (optimizer steps taken so far);
    False when there is no logger.

    Built only from values that are identical on every rank (the logger list, ``log_every_n_steps`` and the
    optimizer-step counter), so a collective gated on it is issued by every rank or by none. Lightning's own
    ``should_update_logs`` also logs when ``trainer.should_stop`` is set, which one rank may set mid-epoch before
    the others learn of it, so it is deliberately not used here.
    """
    if not trainer.loggers:
        return False
    every = int(trainer.log_every_n_steps)
    return every > 0 and (logging_step(trainer) + 1) % every == 0


def logging_step(trainer: Any) -> int:
    """The step Lightning's own logging uses for the current optimizer step (batches that stepped)."""
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def log_metrics(trainer: Any, metrics: dict[str, float], step: Optional[int] = None) -> None:
    """Send ``metrics`` to every logger of the trainer, on global rank zero only."""
    if not metrics or not trainer.is_global_zero:
        return
    step = logging_step(trainer) if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def wire_cross_batch_layers(module: nn.Module, trainer: Any, batch_idx: int) -> None:
    """Drive CmBN windows and CBN burn-in from the trainer, before the forward of micro-batch ``batch_idx``.

    - every :class:`syncnorm.CrossMiniBatchNorm` gets ``accumulation_steps = None`` (the trainer decides the
      windows) and ``reset()`` when ``batch_idx % trainer.accumulate_grad_batches == 0``: the first micro-batch of
      an accumulation window. ``batch_idx`` restarts at 0 every epoch, so the short last window of an epoch ends
      there, and a ``GradientAccumulationScheduler`` (which changes ``accumulate_grad_batches`` at epoch starts)
      is followed automatically.
    - every :class:`syncnorm.CrossIterationBatchNorm` gets ``set_step(trainer.global_step)``: burn-in counts
      optimizer steps, not micro-batches, and follows the restored step after ``fit(ckpt_path=...)``.

    Idempotent for a given batch, so several callbacks may call it. No collective.
    """
    accumulate = max(int(trainer.accumulate_grad_batches), 1)
    for _, layer in layers_of(module, "CrossMiniBatchNorm", "syncnorm.layers.cross_minibatch"):
        if layer.accumulation_steps is not None:
            layer.accumulation_steps = None
        if batch_idx % accumulate == 0:
            layer.reset()
    for _, layer in layers_of(module, "CrossIterationBatchNorm", "syncnorm.layers.cross_iteration"):
        layer.set_step(int(trainer.global_step))


def check_positive_int(value: Any, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def check_choice(value: Any, name: str, owner: str, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {value!r}")
    return value
