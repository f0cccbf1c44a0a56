"""PreciseBN as a Lightning callback: exact population statistics before validation and checkpointing."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from typing_extensions import override

from ._utils import check_positive_int
from .precise_bn import precise_bn

__all__ = ["PreciseBN"]


class _TransferredBatches:
    """The training batches, moved to the device by the strategy (with the LightningModule's transfer hooks)."""

    def __init__(self, trainer: "pl.Trainer") -> None:
        self.trainer = trainer
        loaders = trainer.train_dataloader
        if loaders is None:
            raise RuntimeError("PreciseBN: the trainer has no training dataloader")
        self.loaders = loaders

    def _sources(self) -> list:
        loaders = self.loaders
        if isinstance(loaders, dict):
            return list(loaders.values())
        if isinstance(loaders, (list, tuple)):
            return list(loaders)
        return [loaders]

    def __len__(self) -> int:
        return min(len(loader) for loader in self._sources())

    def __iter__(self) -> Iterator[Any]:
        loaders = self.loaders
        strategy = self.trainer.strategy
        if isinstance(loaders, dict):
            for values in zip(*loaders.values()):
                yield strategy.batch_to_device(dict(zip(loaders.keys(), values)))
        elif isinstance(loaders, (list, tuple)):
            for values in zip(*loaders):
                yield strategy.batch_to_device(type(loaders)(values))
        else:
            for batch in loaders:
                yield strategy.batch_to_device(batch)


class PreciseBN(Callback):
    r"""Recompute the running statistics of every BatchNorm-family layer as exact population moments over
    ``num_batches`` training batches (detectron2's PreciseBN, fvcore's ``update_bn_stats``), with
    :func:`syncnorm.precise_bn`.

    **When.** Once per training epoch whose number ``e`` satisfies ``(e + 1) % every_n_epochs == 0``, after the
    epoch's last training batch and before the validation and checkpointing that follow it: in
    ``on_validation_start`` of the validation that closes the training epoch (not the sanity check, not a mid-epoch
    validation of ``val_check_interval < 1``), or in ``on_train_epoch_end`` when no validation ran (this callback's
    hook runs before ``ModelCheckpoint``'s, which Lightning orders last).

    **What.** ``num_batches`` batches of ``trainer.train_dataloader`` (the same sharded loader the epoch used; with
    several training loaders, one batch of each zipped together) are moved to the device by the strategy (the
    LightningModule's batch-transfer hooks apply) and run through the LightningModule without gradients, with every
    module in the mode it had during the epoch's training steps (recorded at the end of each training batch of a
    due epoch; Lightning has switched the model to eval mode by ``on_validation_start``). Every BatchNorm-family
    layer that was in training mode gets as running mean and *unbiased* variance the mean and variance of all
    values that reached it on every rank (counts, sums and squares merged exactly, one all-reduce for all layers);
    a layer the LightningModule keeps in eval mode (frozen BatchNorm) is left alone. This differs from
    detectron2/fvcore, which average per-batch variances and so drop the variance of the batch means; see
    :func:`syncnorm.precise_bn`. Hooks on the recomputed layers do not run during the pass, so
    :class:`BatchNormMonitor` statistics are not mixed with the pass's batches.

    **Untouched.** ``momentum``, ``num_batches_tracked``, each module's ``training`` flag, layer histories and windows,
    the random number generators, the optimizer, the progress counters and the training iterator are as before.

    Args:
        num_batches: training batches per rank (fewer if the loader is shorter).
        every_n_epochs: run after every n-th training epoch.
        forward_fn: ``forward_fn(pl_module, batch) -> Any`` runs the model on a batch; default
            ``pl_module(batch[0])`` for list/tuple batches, else ``pl_module(batch)``. Must be picklable for
            ``ddp_spawn``.

    Raises:
        TypeError/ValueError at construction for a non-positive ``num_batches``/``every_n_epochs`` or a
        non-callable ``forward_fn``.
    """

    def __init__(self, num_batches: int = 200, every_n_epochs: int = 1,
                 forward_fn: Optional[Callable[[Any, Any], Any]] = None) -> None:
        self.num_batches = check_positive_int(num_batches, "num_batches", "PreciseBN")
        self.every_n_epochs = check_positive_int(every_n_epochs, "every_n_epochs", "PreciseBN")
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"PreciseBN: forward_fn must be callable (pl_module, batch) -> Any, got "
                            f"{type(forward_fn).__name__}")
        self.forward_fn = forward_fn
        self._last_epoch: Optional[int] = None  # epoch of the last recomputation
        self._last_step: Optional[int] = None
        self._runs = 0
        self._train_modes: Optional[dict[str, bool]] = None  # module name -> training, during the due epoch

    @property
    def runs(self) -> int:
        """How many times the statistics were recomputed (restored from checkpoints)."""
        return self._runs

    def _due(self, trainer: "pl.Trainer") -> bool:
        epoch = trainer.current_epoch
        return (epoch + 1) % self.every_n_epochs == 0 and self._last_epoch != epoch

    @staticmethod
    def _epoch_finished(trainer: "pl.Trainer") -> bool:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return bool(progress.is_last_batch) or progress.current.ready >= trainer.num_training_batches

    def recompute(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> int:
        """Recompute the statistics now (every rank must call it); returns the batches this rank used.

        The modules run in the modes recorded during the last training batch (if any), which are restored
        afterwards to what they are now."""
        now = [(m, m.training) for m in pl_module.modules()]
        try:
            if self._train_modes is not None:
                for name, m in pl_module.named_modules():
                    if name in self._train_modes:
                        m.training = self._train_modes[name]
            used = precise_bn(pl_module, _TransferredBatches(trainer), self.num_batches, forward_fn=self.forward_fn,
                              device=None)
        finally:
            for m, mode in now:
                m.training = mode
            self._train_modes = None
        self._last_epoch = trainer.current_epoch
        self._last_step = trainer.global_step
        self._runs += 1
        return used

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._due(trainer):  # the modes the training step ran with (frozen layers stay frozen in the pass)
            self._train_modes = {name: m.training for name, m in pl_module.named_modules()}

    @override
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self._due(trainer):
            return
        if self._epoch_finished(trainer):
            self.recompute(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._due(trainer):
            self.recompute(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self._last_epoch, "last_step": self._last_step, "runs": self._runs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_epoch = state_dict.get("last_epoch")
        self._last_step = state_dict.get("last_step")
        self._runs = int(state_dict.get("runs", 0))
