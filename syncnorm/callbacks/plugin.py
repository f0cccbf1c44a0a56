"""SyncNormPlugin: syncnorm conversion as a Lightning ``LayerSync`` plugin (``Trainer(plugins=[...])``)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.layer_sync import LayerSync
from torch.nn import Module
from typing_extensions import override

from .conversion import CrossBatchScheduler, convert_missing, revert_made, validate_conversion_args

__all__ = ["SyncNormPlugin"]

_BATCHNORM_KEYS = ("running_mean", "running_var", "num_batches_tracked")
_CHECKPOINT_KEY = "syncnorm_layer_state"


def _family_buffers(layer: Module) -> list[str]:
    """Names of the buffers a syncnorm layer has beyond BatchNorm's (CBN history, CmBN window, ...)."""
    return [name for name in layer._buffers if name not in _BATCHNORM_KEYS and name not in ("weight", "bias")]


class _PluginCompanion(CrossBatchScheduler):
    """Added to ``trainer.callbacks`` by :class:`SyncNormPlugin`: CmBN/CBN wiring, and the layers' family state
    carried in the checkpoint under its own key (outside the model's state dict)."""

    def __init__(self, plugin: "SyncNormPlugin") -> None:
        self.plugin = plugin

    @override
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        state = {}
        for name, layer in self.plugin._made_layers(pl_module).items():
            state[name] = {key: buf.detach().clone() for key in _family_buffers(layer)
                           if (buf := layer._buffers[key]) is not None}
        checkpoint[_CHECKPOINT_KEY] = state


class SyncNormPlugin(LayerSync):
    r"""A ``LayerSync`` plugin that converts the model's BatchNorm layers with :func:`syncnorm.convert`.

    ``Trainer(plugins=[SyncNormPlugin("sync")], strategy="ddp")`` gives the same layers and the same results as
    ``callbacks=[NormConversion("sync")]``, and works on CPU (gloo) where ``sync_batchnorm=True`` fails.

    **Limits** (from where Lightning calls a ``LayerSync``):

    - it is applied inside the DDP/FSDP strategies' ``setup`` only: never on a single device, and only while
      fitting (``validate``/``test``/``predict`` run the unconverted model), and :meth:`revert` runs at the end of
      ``fit``;
    - it is applied *after* the checkpoint restore. A layer with state beyond BatchNorm's state-dict keys (the
      CrossIterationBatchNorm history, the CrossMiniBatchNorm window sums) would make ``fit(ckpt_path=...)`` fail
      with unexpected keys. So the plugin makes those buffers non-persistent in the layers it creates (a layer of
      the target family the user built exists before the restore too and keeps its buffers in the state dict;
      the plugin neither changes nor reverts it): checkpoints keep BatchNorm's keys
      and load into the plain model, the converted model, and a model converted by :class:`NormConversion`
      (missing family buffers start empty there). The family state travels in the checkpoint under the separate
      key ``"syncnorm_layer_state"`` and is put back into the converted layers on ``fit(ckpt_path=...)`` when
      Lightning still holds the loaded checkpoint at ``apply`` (private attribute, checked on 2.2-2.6); otherwise
      those layers restart their history (CBN) or window (CmBN), which is safe. Prefer :class:`NormConversion`,
      which converts before the restore.
    - the layers' parameters must exist when the strategy is set up (layers built in ``configure_model`` are
      converted too, since ``apply`` runs after it).

    At ``apply`` the plugin adds a companion :class:`CrossBatchScheduler` to ``trainer.callbacks``: CmBN windows
    follow ``accumulate_grad_batches`` and CBN burn-in counts optimizer steps, and it writes the family state into
    checkpoints. Picklable (``ddp_spawn``).

    Args:
        to, include, exclude, **layer_kwargs: as in :func:`syncnorm.convert` and :class:`NormConversion`.

    Raises:
        ValueError/TypeError at construction, as :class:`NormConversion`.
    """

    def __init__(self, to: str = "sync", include: Any = None, exclude: Any = None, **layer_kwargs: Any) -> None:
        validate_conversion_args("SyncNormPlugin", to, include, exclude, layer_kwargs)
        self.to = to
        self.include = include
        self.exclude = exclude
        self.layer_kwargs = layer_kwargs
        self._converted: dict[str, str] = {}
        self._made: set[int] = set()  # ids of the layers apply() created: the only ones revert() touches

    @property
    def converted(self) -> dict[str, str]:
        """``{qualified name: class name}`` of the layers of the target family after the last :meth:`apply`."""
        return dict(self._converted)

    @override
    def apply(self, model: Module) -> Module:
        """Convert ``model``'s layers (those not already of the target family); returns ``model``.

        Only the layers created here get non-persistent family buffers and are reverted by :meth:`revert`; layers
        of the target family that the user built are left as they are (their state stays in the state dict)."""
        self._converted, made = convert_missing(model, self.to, self.include, self.exclude, self.layer_kwargs)
        self._made |= made
        modules = self._made_layers(model)
        for layer in modules.values():
            for key in _family_buffers(layer):
                layer._non_persistent_buffers_set.add(key)
        trainer = getattr(model, "_trainer", None)
        if trainer is not None:
            self._attach_to(trainer, model, modules)
        return model

    def _made_layers(self, model: Module) -> dict[str, Module]:
        """``{first qualified name: layer}`` of the layers :meth:`apply` created that are still in ``model``."""
        return {name: m for name, m in model.named_modules() if id(m) in self._made}

    def _attach_to(self, trainer: "pl.Trainer", model: Module, modules: dict) -> None:
        if not any(isinstance(cb, _PluginCompanion) and cb.plugin is self for cb in trainer.callbacks):
            trainer.callbacks.append(_PluginCompanion(self))
        connector = getattr(trainer, "_checkpoint_connector", None)
        checkpoint = getattr(connector, "_loaded_checkpoint", None)
        state = checkpoint.get(_CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
        if not state:
            return
        with torch.no_grad():
            for name, buffers in state.items():
                layer = modules.get(name)
                if layer is None:
                    continue
                for key, value in buffers.items():
                    mine = layer._buffers.get(key)
                    if mine is None:
                        continue
                    if mine.shape != value.shape:
                        layer._buffers[key] = value.to(device=mine.device, dtype=mine.dtype).clone()
                    else:
                        mine.copy_(value)

    @override
    def revert(self, model: Module) -> Module:
        """Turn the layers :meth:`apply` created back into plain BatchNorm; returns ``model``.

        One ``syncnorm.convert(model, "batch")`` from the root restricted to those layers: a layer shared under
        several names is reverted once and stays shared, the dimension (1d/2d/3d) is the one of the layer it
        replaced, and layers the user built are left alone. Lightning calls this in the strategy's ``teardown``;
        a layer whose dimension cannot be told leaves the model unreverted with a warning instead of failing the
        finished fit."""
        revert_made(model, self.to, self._made)
        self._made = set()
        self._converted = {}
        return model
