"""NormConversion: convert a LightningModule's norm layers in ``setup()``; CrossBatchScheduler: CmBN/CBN wiring."""

from __future__ import annotations

import importlib
import re
from typing import Any, Optional

import pytorch_lightning as pl
import torch.nn as nn
from pytorch_lightning.callbacks import Callback, StochasticWeightAveraging
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from ._utils import check_positive_int, wire_cross_batch_layers

__all__ = ["NormConversion", "CrossBatchScheduler"]


def target_classes(to: str) -> tuple[type, ...]:
    """Classes a layer converted to ``to`` may have."""
    from ..convert import TARGETS

    if to == "batch":
        return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    return (TARGETS[to].layer_class(),)


def validate_conversion_args(owner: str, to: Any, include: Any, exclude: Any, layer_kwargs: dict) -> None:
    """Check ``to``, ``include``/``exclude`` and ``layer_kwargs`` as :func:`syncnorm.convert` would, up front."""
    conv = importlib.import_module("syncnorm.convert")

    if not isinstance(to, str) or to not in conv.TARGETS:
        raise ValueError(f"{owner}: to must be one of {sorted(conv.TARGETS)}, got {to!r}")
    conv._matcher(include, "include")
    conv._matcher(exclude, "exclude")
    target = conv.TARGETS[to]
    fixed = [k for k in layer_kwargs if k in conv._FROM_SOURCE]
    if fixed:
        raise ValueError(f"{owner}: layer_kwargs {fixed} are taken from each source layer and cannot be set; "
                         f"settable for to={to!r}: {list(target.accepted_kwargs())}")
    unknown = [k for k in layer_kwargs if k not in target.accepted_kwargs()]
    if unknown:
        raise TypeError(f"{owner}: to={to!r} ({target.attr}) does not accept layer_kwargs {unknown}; accepted: "
                        f"{list(target.accepted_kwargs())}")
    # the values too (a bad r_max, window or eps would otherwise only surface in setup, after the Trainer has
    # started): what convert checks up front, then, for the syncnorm layers, their own constructor on a
    # one-channel probe
    conv._check_values(to, layer_kwargs, f"{owner}(to={to!r})", num_groups=True)
    if target.build is conv._build_synchronising or to == "frozen":
        probe = {k: v for k, v in layer_kwargs.items() if not (to == "cross_minibatch" and k == "accumulation_steps")}
        try:
            target.layer_class()(1, **probe)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{owner}: layer_kwargs {probe} rejected by {target.attr} (checked on a one-channel "
                            f"probe layer): {err}") from None
    if to == "cross_minibatch" and "accumulation_steps" in layer_kwargs:
        # the callbacks drive CmBN windows from the trainer (wire_cross_batch_layers sets accumulation_steps=None),
        # so a value here would be silently overridden
        raise ValueError(f"{owner}: accumulation_steps={layer_kwargs['accumulation_steps']!r} would be ignored: under "
                         "the callbacks a CrossMiniBatchNorm window is one optimizer step of the Trainer; set "
                         "Trainer(accumulate_grad_batches=...) instead")


def _as_list(spec: Any) -> list:
    if spec is None:
        return []
    if isinstance(spec, (str, re.Pattern)) or callable(spec):
        return [spec]
    return list(spec)


def convert_missing(module: nn.Module, to: str, include: Any, exclude: Any,
                    layer_kwargs: dict) -> tuple[dict[str, str], set[int]]:
    """Convert the layers of ``module`` that are not already of the target family.

    Returns ``({name: class name}, made)``: every layer of the target family that the filters select, after the
    conversion (converted now, earlier, or built by the user), and the ``id`` of each layer this call created (a
    layer shared under several names counts once). Only the layers in ``made`` are ever reverted or have their
    buffers' persistence changed; the user's own layers are left as they are.
    """
    from ..convert import convert

    classes = target_classes(to)

    def already(name: str, m: nn.Module) -> bool:
        return isinstance(m, classes)

    before = list(module.modules())  # kept alive, so no new layer can reuse the id of a replaced one
    seen = {id(m) for m in before}
    out = convert(module, to, include=include, exclude=[*_as_list(exclude), already], **layer_kwargs)
    if out is not module:  # only when the root itself is a norm layer, never for a LightningModule
        raise MisconfigurationException("NormConversion: the LightningModule itself cannot be a norm layer")
    made = {id(m) for m in module.modules()
            if id(m) not in seen and isinstance(m, classes) and getattr(m, "_syncnorm_target", None) == to}
    del before
    return selected_layers(module, to, include, exclude), made


def revert_made(module: nn.Module, to: str, made: set[int]) -> None:
    """Turn the layers in ``made`` (ids from :func:`convert_missing`) back into plain BatchNorm, in place.

    One :func:`syncnorm.convert` ``(module, "batch")`` call from the root, restricted to those layers: a layer
    shared under several names is reverted once and stays shared, and the 1d/2d/3d choice sees the whole model
    (the source type recorded at conversion, else the feeding conv). Layers the user built or converted themselves
    are not touched. Nothing to do for ``to="batch"``; ``to="group"`` cannot be reverted (a warning says so); when
    the dimension of a layer cannot be told, nothing is reverted and a warning names the layer.
    """
    from ..convert import convert

    if not made or to == "batch":
        return
    if to == "group":
        rank_zero_warn("NormConversion/SyncNormPlugin: layers converted to 'group' (nn.GroupNorm) cannot be reverted: "
                       "BatchNorm's running statistics were dropped by the conversion; they are left as GroupNorm")
        return
    classes = target_classes(to)

    def mine(name: str, m: nn.Module) -> bool:
        return id(m) in made and isinstance(m, classes) and getattr(m, "_syncnorm_target", None) == to

    try:
        convert(module, "batch", include=mine, subclasses="convert")
    except ValueError as e:  # convert modifies nothing when it raises; a finished fit should not crash here
        rank_zero_warn(f"NormConversion/SyncNormPlugin: the converted layers were not reverted: {e}")


def spec_text(spec: Any) -> str:
    """Text of an ``include``/``exclude`` spec that is the same in every process and every run (no addresses)."""
    if spec is None:
        return "None"
    if isinstance(spec, str):
        return repr(spec)
    if isinstance(spec, re.Pattern):
        return f"re.compile({spec.pattern!r}, {int(spec.flags)})"
    if callable(spec):
        func = getattr(spec, "func", None)  # functools.partial
        target = spec if func is None else func
        name = getattr(target, "__qualname__", None) or type(target).__qualname__
        module = getattr(target, "__module__", None) or type(target).__module__
        return f"{module}.{name}" if func is None else f"partial({module}.{name})"
    try:
        return "[" + ", ".join(spec_text(s) for s in spec) + "]"
    except TypeError:
        return type(spec).__qualname__


def selected_layers(module: nn.Module, to: str, include: Any, exclude: Any) -> dict[str, str]:
    """``{name: class name}`` of the BatchNorm-like layers the filters select (converted or not)."""
    conv = importlib.import_module("syncnorm.convert")

    inc, exc = conv._matcher(include, "include"), conv._matcher(exclude, "exclude")
    out = {}
    for name, m in module.named_modules():
        if not conv._is_batchnorm_like(m):
            continue
        if (inc is not None and not inc(name, m)) or (exc is not None and exc(name, m)):
            continue
        out[name] = type(m).__qualname__
    return out


class CrossBatchScheduler(Callback):
    r"""Tie :class:`syncnorm.CrossMiniBatchNorm` windows and :class:`syncnorm.CrossIterationBatchNorm` burn-in to the
    trainer.

    In ``on_train_batch_start`` (before each micro-batch's forward):

    - every CrossMiniBatchNorm gets ``accumulation_steps = None`` and ``reset()`` when
      ``batch_idx % trainer.accumulate_grad_batches == 0``, the first micro-batch of an accumulation window, so
      the window is exactly the micro-batches of one optimizer step: with 7 batches and
      ``accumulate_grad_batches=3`` the windows start at batches 0, 3 and 6 (the last one short, as Lightning's last
      optimizer step of the epoch). ``batch_idx`` restarts every epoch and a ``GradientAccumulationScheduler``
      changes ``accumulate_grad_batches`` at epoch starts, so both are followed.
    - every CrossIterationBatchNorm gets ``set_step(trainer.global_step)``: ``burn_in`` counts optimizer steps, not
      micro-batches, and resumes with the restored step after ``fit(ckpt_path=...)``.

    :class:`NormConversion` does the same by itself, so this callback is only needed when the layers come from
    elsewhere (built directly, :func:`syncnorm.convert` before ``fit``); :class:`SyncNormPlugin` adds it itself.
    Stateless; no collective.
    """

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        wire_cross_batch_layers(pl_module, trainer, batch_idx)


class NormConversion(Callback):
    r"""Convert the LightningModule's BatchNorm layers with :func:`syncnorm.convert` in ``setup()``.

    **When.** ``setup`` runs before the checkpoint restore, the strategy's setup (DDP wrapping) and
    ``configure_optimizers``, for every stage. So the converted layers' parameters are the ones the optimizer holds,
    the state dict of a checkpoint written by a converted model (including CrossIterationBatchNorm history and
    CrossMiniBatchNorm window buffers) loads with ``fit(ckpt_path=...)``, ``validate``/``test``/``predict`` see the
    same layers, and DDP broadcasts the converted model. Layers already of the target family are left as they are
    (a second ``setup`` converts nothing). Works with every strategy whose model is a plain module at ``setup``
    (single device, ``ddp``, ``ddp_spawn``) on CPU and GPU; on CPU ``ddp`` the statistics are exact global
    statistics over the gloo group, which ``Trainer(sync_batchnorm=True)`` cannot give (torch's SyncBatchNorm needs
    CUDA).

    **Checks** in ``on_fit_start`` (raising ``MisconfigurationException``):

    1. a ``StochasticWeightAveraging`` callback is ordered before this one: its ``setup`` deep-copied the
       unconverted model, so the averaged model would keep plain BatchNorm layers;
    2. layers converted in ``setup`` were replaced afterwards, by ``Trainer(sync_batchnorm=True)`` or another
       ``LayerSync`` plugin (``sync_batchnorm=True`` is caught already in ``setup``: on CPU torch's SyncBatchNorm
       would fail in DDP wrapping before ``on_fit_start``);
    3. BatchNorm layers selected by ``include``/``exclude`` are not converted: they were built in
       ``LightningModule.configure_model``, which runs after ``setup``. Convert them there with
       ``syncnorm.convert``.

    **Wiring.** In ``on_train_batch_start`` it does what :class:`CrossBatchScheduler` does (CmBN windows follow
    ``accumulate_grad_batches``, CBN burn-in counts optimizer steps), unless such a callback is present.

    **End of fit.** With ``revert_on_fit_end=True`` the layers this callback created are turned back into plain
    ``nn.BatchNorm1d/2d/3d`` in ``on_fit_end``, for export: one ``syncnorm.convert(model, "batch")`` from the root
    restricted to those layers (a layer shared under several names stays one shared layer; the dimension is the
    one of the layer it replaced). Layers of the target family that the user built or converted are left alone. A
    later ``validate``/``test``/``predict`` with this callback keeps the reverted layers (it evaluates the model
    as exported); a later ``fit`` converts again.

    Args:
        to: target of :func:`syncnorm.convert` (``"sync"``, ``"renorm"``, ``"cross_iteration"``,
            ``"cross_minibatch"``, ``"frozen"``, ``"group"``, ``"batch"``).
        include, exclude: which layers, as in :func:`syncnorm.convert` (glob strings, compiled regexes,
            predicates or lists; predicates must be picklable for ``ddp_spawn``).
        revert_on_fit_end: revert the converted layers at the end of ``fit``.
        group_size: synchronise within consecutive groups of this many ranks (:func:`syncnorm.comm.new_groups`,
            created in ``setup`` on every rank); None = the whole world. Use this instead of a ``process_group``
            layer argument under ``ddp_spawn`` (process groups cannot be pickled).
        **layer_kwargs: arguments of the target layer (``r_max``, ``window``, ``burn_in``, ...).

    Raises:
        ValueError/TypeError at construction for an unknown target, malformed ``include``/``exclude``, a layer
        argument the target does not accept or a value its layer refuses (``r_max=0.5``, ``window=0``, ...),
        ``accumulation_steps`` for ``cross_minibatch`` (the Trainer's
        ``accumulate_grad_batches`` decides the windows), or a bad ``group_size``.
    """

    def __init__(self, to: str = "sync", include: Any = None, exclude: Any = None, revert_on_fit_end: bool = False,
                 group_size: Optional[int] = None, **layer_kwargs: Any) -> None:
        validate_conversion_args("NormConversion", to, include, exclude, layer_kwargs)
        if not isinstance(revert_on_fit_end, bool):
            raise TypeError(f"NormConversion: revert_on_fit_end must be a bool, got {revert_on_fit_end!r}")
        if group_size is not None:
            check_positive_int(group_size, "group_size", "NormConversion")
            if "process_group" in layer_kwargs:
                raise ValueError("NormConversion: pass either group_size or process_group, not both")
        self.to = to
        self.include = include
        self.exclude = exclude
        self.revert_on_fit_end = revert_on_fit_end
        self._reverted = False  # on_fit_end reverted: later validate/test/predict keep the plain layers
        self.group_size = group_size
        self.layer_kwargs = layer_kwargs
        self._converted: dict[str, str] = {}  # qualified name -> class name, of the target-family layers selected
        self._made: set[int] = set()  # ids of the layers this callback created (the only ones it reverts)
        self._checkpoint_target: Optional[str] = None
        self._group: Any = None  # process group made from group_size (never pickled)
        self._has_group = False

    @property
    def converted(self) -> dict[str, str]:
        """``{qualified name: class name}`` of the layers of the target family selected at ``setup``."""
        return dict(self._converted)

    @property
    @override
    def state_key(self) -> str:
        # several NormConversion callbacks (different targets or layers) may share a Trainer
        # stable text, the same after a restart (patterns as text, predicates by module and qualified name)
        return self._generate_state_key(to=self.to, include=spec_text(self.include),
                                        exclude=spec_text(self.exclude))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_group"], state["_has_group"] = None, False
        return state

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and isinstance(getattr(trainer.strategy, "_layer_sync", None), TorchSyncBatchNorm):
            raise MisconfigurationException(
                "NormConversion: Trainer(sync_batchnorm=True) would replace the syncnorm layers converted here by "
                "torch.nn.SyncBatchNorm (which needs CUDA) after setup; remove sync_batchnorm=True, NormConversion "
                f"already gives synchronised statistics (to={self.to!r})")
        if self._reverted and stage != "fit":
            return  # the model was reverted for export at the end of fit: evaluate it as it is now
        self._reverted = False
        kwargs = dict(self.layer_kwargs)
        if self.group_size is not None:
            if not self._has_group:
                from .. import comm

                self._group, self._has_group = comm.new_groups(self.group_size), True
            kwargs["process_group"] = self._group
        self._converted, made = convert_missing(pl_module, self.to, self.include, self.exclude, kwargs)
        self._made |= made

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        callbacks = list(trainer.callbacks)
        mine = next((i for i, cb in enumerate(callbacks) if cb is self), len(callbacks))
        swa = [type(cb).__name__ for cb in callbacks[:mine] if isinstance(cb, StochasticWeightAveraging)]
        if swa:
            raise MisconfigurationException(
                f"NormConversion: {swa[0]} is ordered before NormConversion in Trainer(callbacks=[...]); its setup "
                "deep-copied the model before the conversion, so the averaged model keeps plain BatchNorm layers. "
                "Put NormConversion before StochasticWeightAveraging.")
        classes = target_classes(self.to)
        current = dict(pl_module.named_modules())
        replaced = [f"{name} ({cls} -> {type(current[name]).__qualname__ if name in current else 'removed'})"
                    for name, cls in self._converted.items()
                    if name not in current or not isinstance(current[name], classes)]
        if replaced:
            raise MisconfigurationException(
                f"NormConversion: {len(replaced)} layer(s) converted to {self.to!r} in setup were replaced before "
                f"fit started, by Trainer(sync_batchnorm=True) or a LayerSync plugin: {', '.join(replaced[:5])}"
                f"{', ...' if len(replaced) > 5 else ''}. Remove sync_batchnorm=True / the plugin (or use "
                "SyncNormPlugin with the same target).")
        selected = selected_layers(pl_module, self.to, self.include, self.exclude)
        missing = [f"{name} ({cls})" for name, cls in selected.items() if not isinstance(current[name], classes)]
        if missing:
            raise MisconfigurationException(
                f"NormConversion: {len(missing)} norm layer(s) were not converted to {self.to!r}: "
                f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}. They did not exist at setup: "
                "layers built in LightningModule.configure_model appear after Callback.setup. Convert them at the "
                f"end of configure_model with syncnorm.convert(self, {self.to!r}), or build them in __init__.")
        if self._checkpoint_target is not None and self._checkpoint_target != self.to:
            rank_zero_warn(f"NormConversion: the checkpoint was written by a model converted to "
                           f"{self._checkpoint_target!r}, this run converts to {self.to!r}")

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if not any(isinstance(cb, CrossBatchScheduler) for cb in trainer.callbacks):
            wire_cross_batch_layers(pl_module, trainer, batch_idx)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.revert_on_fit_end:
            return
        revert_made(pl_module, self.to, self._made)
        self._made = set()
        self._converted = {}
        self._reverted = True

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"to": self.to, "converted": dict(self._converted)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the layers were converted in setup already; only remember what the checkpoint says, to warn on mismatch
        self._checkpoint_target = state_dict.get("to")
