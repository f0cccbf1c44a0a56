"""RenormScheduler: Batch Renormalization's r_max / d_max from the optimizer step, in Lightning."""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from ._utils import layers_of, log_metrics, logging_step, should_log

__all__ = ["RenormScheduler"]


class RenormScheduler(Callback):
    r"""Set ``r_max`` / ``d_max`` of every :class:`syncnorm.BatchRenorm` layer from ``schedule(trainer.global_step)``.

    In ``on_train_batch_start`` (before each micro-batch's forward) the callback calls
    :func:`syncnorm.schedules.apply_schedule` with ``trainer.global_step``: the number of *optimizer steps* taken,
    not micro-batches, so every micro-batch of an accumulation window uses the same bounds. Every rank computes the
    same values from the same step; no collective. Because the schedule is a pure function of the step, which
    Lightning restores, ``fit(ckpt_path=...)`` resumes mid-schedule exactly; the values last applied are also kept in
    :meth:`state_dict` and put back on the layers when a checkpoint is loaded, so a restored model carries its bounds
    before the first training batch too.

    **Logging.** On the optimizer steps the trainer logs (``log_every_n_steps``), once per step (in
    ``on_before_optimizer_step``) and on global rank zero only, it sends to every logger ``{prefix}/r_max``,
    ``{prefix}/d_max`` and ``{prefix}/clip_fraction``: the fraction of BatchRenorm channels (over all layers,
    weighted by their channel counts) whose ``r`` or ``d`` was clipped at the forward of the step's last
    micro-batch (:meth:`syncnorm.BatchRenorm.clip_fraction`, identical on every rank). ``log=False`` turns it off.

    Args:
        schedule: callable ``step -> (r_max, d_max)``, for example
            :func:`syncnorm.schedules.paper_renorm_schedule`. It must be picklable for ``ddp_spawn`` (the schedules
            of :mod:`syncnorm.schedules` and module-level functions are).
        log: log the values through the trainer's loggers.
        prefix: metric-name prefix.

    Raises:
        TypeError: ``schedule`` is not callable, ``log`` not a bool or ``prefix`` not a string.
    """

    def __init__(self, schedule: Callable[[int], tuple[float, float]], log: bool = True,
                 prefix: str = "renorm") -> None:
        if not callable(schedule):
            raise TypeError(f"RenormScheduler: schedule must be a callable step -> (r_max, d_max), got "
                            f"{type(schedule).__name__} {schedule!r}")
        if not isinstance(log, bool):
            raise TypeError(f"RenormScheduler: log must be a bool, got {type(log).__name__} {log!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"RenormScheduler: prefix must be a str, got {type(prefix).__name__} {prefix!r}")
        self.schedule = schedule
        self.log = log
        self.prefix = prefix
        self._step: Optional[int] = None  # optimizer step of the values last applied
        self._values: Optional[tuple[float, float]] = None  # (r_max, d_max) last applied
        self._logged_at: Optional[int] = None

    @property
    def current(self) -> Optional[tuple[int, float, float]]:
        """``(step, r_max, d_max)`` last applied, or None before the first training batch."""
        if self._values is None or self._step is None:
            return None
        return (self._step, *self._values)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not layers_of(pl_module, "BatchRenorm", "syncnorm.layers.batch_renorm"):
            rank_zero_warn("RenormScheduler: the model has no syncnorm.BatchRenorm layer, so the schedule changes "
                           "nothing (convert with NormConversion(to='renorm') or syncnorm.convert(model, 'renorm'))")
        if self._values is not None:
            self._set(pl_module, *self._values)

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        from ..schedules import apply_schedule

        step = int(trainer.global_step)
        self._values = apply_schedule(pl_module, self.schedule, step)
        self._step = step

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: Any) -> None:
        # once per optimizer step, after the window's last forward
        if not self.log or self._values is None or not trainer.is_global_zero or not should_log(trainer):
            return
        step = logging_step(trainer)
        if self._logged_at == step:
            return
        self._logged_at = step
        layers = layers_of(pl_module, "BatchRenorm", "syncnorm.layers.batch_renorm")
        channels = sum(layer.num_features for _, layer in layers)
        clipped = sum(layer.clip_fraction() * layer.num_features for _, layer in layers)
        metrics = {f"{self.prefix}/r_max": self._values[0], f"{self.prefix}/d_max": self._values[1]}
        if channels:
            metrics[f"{self.prefix}/clip_fraction"] = clipped / channels
        log_metrics(trainer, metrics, step=step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step, "r_max": None if self._values is None else self._values[0],
                "d_max": None if self._values is None else self._values[1]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._step = state_dict.get("step")
        r_max, d_max = state_dict.get("r_max"), state_dict.get("d_max")
        self._values = None if r_max is None or d_max is None else (float(r_max), float(d_max))

    @staticmethod
    def _set(module: Any, r_max: float, d_max: float) -> None:
        for _, layer in layers_of(module, "BatchRenorm", "syncnorm.layers.batch_renorm"):
            layer.r_max = r_max
            layer.d_max = d_max
