"""BatchNormMonitor: how much synchronising matters, and whether the ranks agree, logged per layer."""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from typing_extensions import override

from .. import comm
from ..stats import Moments, moments_of
from ._utils import check_choice, log_metrics, logging_step, norm_layers, should_log

__all__ = ["BatchNormMonitor"]


class BatchNormMonitor(Callback):
    r"""Log, per BatchNorm-family layer, the gap between local and global batch statistics, the spread of the running
    statistics across ranks, and BatchRenorm clip rates.

    Metrics (``{prefix}/{layer path}/...``), sent to every logger of the trainer on global rank zero only:

    - ``mean_gap``: ``max_c |mu_local - mu_global| / sqrt(var_global + eps)``, maximised over the ranks of the
      layer's process group: how far one rank's batch mean is from the synchronised mean, in units of the global
      standard deviation. Large values mean synchronising matters for this run. Only for layers that synchronise
      (syncnorm layers; their ``last_info.batch`` holds the global moments of the last training forward).
    - ``std_gap``: ``max_c |sqrt(var_local + eps) / sqrt(var_global + eps) - 1|``, maximised over ranks (same layers).
    - ``running_mean_spread``, ``running_var_spread``: ``max_c (max over ranks - min over ranks)`` of the running
      statistics, over the layer's process group (the world for plain ``nn.BatchNorm``). Exactly 0 for synchronised
      layers; plain BatchNorm under DDP drifts apart.
    - ``clip_fraction``: for :class:`syncnorm.BatchRenorm`, the fraction of channels whose ``r`` or ``d`` was clipped
      at the last training forward (identical on every rank).

    **When.** ``logging_interval="step"``: on the optimizer steps with ``(step + 1) % log_every_n_steps == 0``
    (``step`` = optimizer steps taken so far, the step Lightning logs at), from the last micro-batch of that step,
    in ``on_before_optimizer_step``. The decision uses only values identical on every rank, so every rank joins the
    collective or none does (Lightning's extra logging when ``trainer.should_stop`` is set is not followed: one rank
    may set it before the others). ``"epoch"``: at the end of every training epoch,
    from its last training forward. Local moments come from forward pre-hooks that are installed only while a
    logging step (or, for ``"epoch"``, the epoch) runs and cost ``O(N C)`` local work, no communication.

    **Cost.** On a logging step: one :func:`syncnorm.comm.all_reduce_max` per distinct process group of the
    monitored layers (usually one), of ``2 + 4C`` fp64 values per layer. On every other step: no collective and no
    hook. Without a logger (``Trainer(logger=False)``) the monitor does nothing.

    Args:
        logging_interval: ``"step"`` or ``"epoch"``.
        prefix: metric-name prefix.

    Raises:
        ValueError: ``logging_interval`` is not ``"step"``/``"epoch"``; TypeError: ``prefix`` is not a string.
    """

    def __init__(self, logging_interval: str = "step", prefix: str = "bn_monitor") -> None:
        check_choice(logging_interval, "logging_interval", "BatchNormMonitor", ("step", "epoch"))
        if not isinstance(prefix, str):
            raise TypeError(f"BatchNormMonitor: prefix must be a str, got {type(prefix).__name__} {prefix!r}")
        self.logging_interval = logging_interval
        self.prefix = prefix
        self._handles: list = []
        self._local: dict[str, Moments] = {}
        self._logged_at: Optional[int] = None
        self._last: dict[str, float] = {}

    @property
    def last_metrics(self) -> dict[str, float]:
        """The metrics of the last logging step (on every rank, although only rank zero logs them)."""
        return dict(self._last)

    # ------------------------------------------------------------------ hooks on the model
    def _install(self, pl_module: "pl.LightningModule") -> None:
        if self._handles:
            return
        for name, layer in norm_layers(pl_module):
            self._handles.append(layer.register_forward_pre_hook(self._capture_hook(name)))

    def _capture_hook(self, name: str):
        local = self._local

        def hook(module: torch.nn.Module, args: tuple) -> None:
            if module.training and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
                local[name] = moments_of(args[0].detach())

        return hook

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.logging_interval == "epoch" and trainer.loggers:
            self._install(pl_module)

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self.logging_interval == "step" and should_log(trainer):
            self._install(pl_module)

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: Any) -> None:
        if self.logging_interval != "step" or not self._handles:
            return
        step = logging_step(trainer)
        if self._logged_at == step:  # several optimizers: once per step
            return
        self._logged_at = step
        self._collect_and_log(trainer, pl_module, step)
        self._remove()  # the step's forwards are done: no hook until the next logging step

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.logging_interval == "epoch" and self._handles:
            self._collect_and_log(trainer, pl_module, logging_step(trainer))
            self._remove()
            self._local.clear()

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove()
        self._local.clear()

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._remove()
        self._local.clear()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_metrics": dict(self._last)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last = dict(state_dict.get("last_metrics", {}))

    # ------------------------------------------------------------------ the statistics
    def _collect_and_log(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", step: int) -> None:
        layers = [(n, m) for n, m in norm_layers(pl_module)]
        # one packed all_reduce_max per process group: [mean_gap, std_gap, rm, -rm, rv, -rv] per layer
        groups: dict[int, tuple[Any, list]] = {}
        for name, layer in layers:
            group = getattr(layer, "process_group", None)
            groups.setdefault(id(group) if group is not None else 0, (group, []))[1].append((name, layer))
        metrics: dict[str, float] = {}
        for group, members in groups.values():
            parts = []
            for name, layer in members:
                parts.append(self._gaps(name, layer))
                if layer.running_mean is not None and layer.running_var is not None:
                    rm = layer.running_mean.detach().double()
                    rv = layer.running_var.detach().double()
                    parts.append(torch.cat([rm, -rm, rv, -rv]).to(parts[-1].device))
            packed = torch.cat(parts)
            comm.all_reduce_max(packed, group)
            offset = 0
            for name, layer in members:
                key = f"{self.prefix}/{name or type(layer).__name__}"
                if getattr(layer, "last_info", None) is not None:
                    metrics[f"{key}/mean_gap"] = float(packed[offset])
                    metrics[f"{key}/std_gap"] = float(packed[offset + 1])
                offset += 2
                if layer.running_mean is not None and layer.running_var is not None:
                    c = layer.num_features
                    rm_max, rm_negmin, rv_max, rv_negmin = packed[offset:offset + 4 * c].view(4, c)
                    metrics[f"{key}/running_mean_spread"] = float((rm_max + rm_negmin).max())
                    metrics[f"{key}/running_var_spread"] = float((rv_max + rv_negmin).max())
                    offset += 4 * c
                if hasattr(layer, "clip_fraction"):
                    metrics[f"{key}/clip_fraction"] = float(layer.clip_fraction())
        self._last = metrics
        self._local.clear()
        log_metrics(trainer, metrics, step=step)

    def _gaps(self, name: str, layer: torch.nn.Module) -> torch.Tensor:
        device = layer.running_mean.device if layer.running_mean is not None else (
            layer.weight.device if layer.weight is not None else torch.device("cpu"))
        out = torch.zeros(2, dtype=torch.float64, device=device)
        info = getattr(layer, "last_info", None)
        local = self._local.get(name)
        if info is None or local is None or float(local.count) == 0 or info.global_count == 0:
            return out
        glob = info.batch
        sigma_g = (glob.var() + layer.eps).sqrt().to(device)
        sigma_l = (local.var() + layer.eps).sqrt().to(device)
        out[0] = ((local.mean.to(device) - glob.mean.to(device)).abs() / sigma_g).max()
        out[1] = (sigma_l / sigma_g - 1).abs().max()
        return out
