"""Convert any model's BatchNorm layers between norm families, revert them losslessly, and summarise them.

:func:`convert` swaps every BatchNorm-like layer of a model for the layer of a *target* (the registry
:data:`TARGETS`, target name -> :class:`Target`: one entry per target, so adding a layer family is one line),
keeping the same Parameter objects, every buffer, the ``training`` flag, ``requires_grad``, device, dtype,
``qconfig`` and hooks. :func:`revert` brings syncnorm's layers back to plain ``nn.BatchNorm1d/2d/3d``;
:func:`summary` prints the table of norm layers a user reads before and after.

``Pattern`` is the type of :func:`convert`'s ``include``/``exclude`` arguments: a glob string, a compiled regex, a
predicate ``(qualified_name, module) -> bool``, an iterable of those, or None.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import inspect
import math
import numbers
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from . import comm
from .layers.frozen import FrozenBatchNorm
from .layers.sync_batchnorm import GlobalStatsBatchNorm

__all__ = ["convert", "revert", "summary", "Target", "TARGETS"]

Pattern = Union[str, "re.Pattern[str]", Callable[[str, nn.Module], bool], Iterable[Any], None]

_STANDARD_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# taken from each source layer, never from layer_kwargs: they decide which tensors the new layer holds
_FROM_SOURCE = ("num_features", "affine", "track_running_stats", "device", "dtype")
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
_BN_BY_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# ---------------------------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One conversion target of :data:`TARGETS`: where its layer class lives and how a layer is built.

    Attributes:
        module: dotted name of the module defining the layer class (imported on first use, so a target whose
            module is missing only fails when it is asked for).
        attr: name of the layer class in ``module`` (for ``"batch"``, ``BatchNorm2d`` stands for the 1d/2d/3d family).
        build: ``build(target, source, layer_kwargs) -> nn.Module``, returning the new layer with the source's
            parameters and buffers already transplanted; :func:`convert` then copies the training flag, qconfig,
            hooks and the layer name.
        kwargs: the ``layer_kwargs`` this target accepts, or None for "every argument of the layer constructor
            except those taken from the source layer" (see :meth:`accepted_kwargs`).
        pairs_with_conv: :func:`convert` ``attach``-es each new layer to the conv that feeds it.
        reversible: False when the conversion drops BatchNorm's running statistics (``"group"``): :func:`revert`
            then leaves these layers as they are, with a warning.
    """

    module: str
    attr: str
    build: Callable[["Target", "_Source", dict], nn.Module]
    kwargs: Optional[tuple[str, ...]] = None  # accepted layer_kwargs; None: the layer constructor's arguments
    pairs_with_conv: bool = False  # attach(conv) to the conv that feeds each layer
    reversible: bool = True  # False: revert leaves these layers as they are, with a warning

    def layer_class(self) -> type:
        """The layer class ``module.attr``, importing ``module`` if needed (ImportError/AttributeError if absent)."""
        return getattr(importlib.import_module(self.module), self.attr)

    def accepted_kwargs(self) -> tuple[str, ...]:
        """Names of the ``layer_kwargs`` :func:`convert` accepts for this target, in a fixed order.

        ``kwargs`` when it is set; otherwise the named parameters of ``layer_class().__init__`` (not ``*args`` /
        ``**kwargs``) minus ``num_features``, ``affine``, ``track_running_stats``, ``device`` and ``dtype``, which
        always come from each source layer.
        """
        if self.kwargs is not None:
            return self.kwargs
        return tuple(p for p in _init_params(self.layer_class()) if p not in _FROM_SOURCE)


# ---------------------------------------------------------------------------------------------------------------
# source layers: what convert reads from any supported layer
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Origin:
    """What a converted layer remembers of the layer it came from, so :func:`revert` is lossless."""

    cls: Optional[type]  # the class to revert to when it is not a plain BatchNorm (timm BatchNormAct2d)
    dim: Optional[int]
    momentum: Optional[float]
    requires_grad: tuple[bool, bool] = (True, True)


@dataclass
class _Source:
    module: nn.Module
    name: str
    num_features: int
    eps: float
    momentum: Optional[float]
    affine: bool
    track_running_stats: bool
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    origin: _Origin
    act: Optional[tuple[nn.Module, nn.Module]]  # (drop, act) of a norm+activation layer
    paired_conv: Optional[nn.Module] = None

    @property
    def label(self) -> str:
        return f"{type(self.module).__name__}({self.num_features}) '{self.name or '<root>'}'"

    @property
    def device(self):
        # None for a layer that holds no tensor (affine=False, track_running_stats=False): the default device
        t = self.weight if self.weight is not None else self.module.running_mean
        return None if t is None else t.device

    @property
    def dtype(self):
        t = self.weight if self.weight is not None else self.module.running_mean
        return None if t is None else t.dtype


def _optional_class(module_name: str, attr: str) -> Optional[type]:
    # only look at libraries the user already imported: convert never pays for importing them
    mod = sys.modules.get(module_name)
    return getattr(mod, attr, None) if mod is not None else None


def _tv_frozen() -> Optional[type]:
    return _optional_class("torchvision.ops.misc", "FrozenBatchNorm2d")


def _timm_norm_act() -> Optional[type]:
    return _optional_class("timm.layers.norm_act", "BatchNormAct2d")


def _known_classes() -> dict[type, Optional[int]]:
    known: dict[type, Optional[int]] = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, _BatchNorm: None,
                                        nn.SyncBatchNorm: None, FrozenBatchNorm: None}
    for cls in (_tv_frozen(), _timm_norm_act(), _optional_class("timm.layers.norm_act", "SyncBatchNormAct")):
        if cls is not None:
            known[cls] = 2
    return known


def _is_syncnorm_layer(m: nn.Module) -> bool:
    return isinstance(m, (GlobalStatsBatchNorm, FrozenBatchNorm))


def _is_batchnorm_like(m: nn.Module) -> bool:
    if isinstance(m, (_BatchNorm, FrozenBatchNorm)):
        return True
    tv = _tv_frozen()
    return tv is not None and isinstance(m, tv)


def _known_base(m: nn.Module) -> tuple[type, Optional[int], bool]:
    """(nearest supported class, its dimension or None, whether a subclass in between overrides forward)."""
    known = _known_classes()
    custom = False
    for klass in type(m).__mro__:
        if klass in known:
            return klass, known[klass], custom
        if getattr(klass, "__module__", "").startswith("syncnorm.") and klass is not _NormActivation:
            # syncnorm's own layers (any family, and the activation variants convert creates)
            if issubclass(klass, (GlobalStatsBatchNorm, FrozenBatchNorm)):
                return klass, None, custom
        if "forward" in vars(klass) or "_train_forward" in vars(klass):
            custom = True
    raise AssertionError(f"{type(m).__name__} is not a BatchNorm")  # pragma: no cover - guarded by callers


def _read_source(m: nn.Module, name: str, subclasses: str) -> Optional[_Source]:
    """Describe a BatchNorm-like layer, or raise ValueError when it cannot be converted; None to leave it alone."""
    label = f"{type(m).__name__} '{name or '<root>'}'"
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        raise ValueError(
            f"syncnorm.convert: {label} is a lazy layer whose num_features is not known yet; run one forward pass "
            f"to materialise it before converting (or exclude it)")
    if "parametrizations" in m._modules:
        raise ValueError(f"syncnorm.convert: {label} has parametrized tensors (torch.nn.utils.parametrize); "
                         f"remove the parametrizations before converting (or exclude it)")
    base, dim, custom = _known_base(m)
    if custom:
        if subclasses == "skip":
            return None
        if subclasses == "error":
            raise ValueError(
                f"syncnorm.convert: {label} subclasses {base.__name__} with its own forward, which the conversion "
                f"would silently drop; pass subclasses='convert' to replace it anyway or subclasses='skip' to leave "
                f"such layers alone (or exclude it), expected one of the supported layers, got {type(m).__qualname__}")
    record: Optional[_Origin] = getattr(m, "_syncnorm_origin", None)
    if isinstance(m, _BatchNorm):
        weight, bias = m.weight, m.bias
        momentum, track = m.momentum, m.track_running_stats
        affine = m.affine
        num_features, eps = m.num_features, m.eps
    else:  # FrozenBatchNorm or torchvision FrozenBatchNorm2d: affine transform and statistics are buffers
        weight, bias = m.weight, m.bias
        affine = weight is not None
        momentum = record.momentum if record is not None else 0.1
        track = True
        num_features, eps = (m.num_features if hasattr(m, "num_features") else m.running_mean.numel()), m.eps
    act = None
    timm_cls = _timm_norm_act()
    from_timm = timm_cls is not None and base.__module__.startswith("timm.")
    if isinstance(m, _NormActivation) or from_timm:  # timm BatchNormAct2d / SyncBatchNormAct, or convert's variants
        act = (m._modules["drop"], m._modules["act"])
    if record is None:
        cls = timm_cls if from_timm else None  # revert gives timm's BatchNormAct2d back
        rg = (weight.requires_grad, bias.requires_grad) if isinstance(weight, nn.Parameter) else (True, True)
        record = _Origin(cls=cls, dim=dim, momentum=momentum, requires_grad=rg)
    elif isinstance(weight, nn.Parameter):
        record = _Origin(record.cls, record.dim, momentum, (weight.requires_grad, bias.requires_grad))
    return _Source(m, name, num_features, eps, momentum, affine, track, weight, bias, record, act)


# ---------------------------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------------------------
_SIGNATURES: dict[type, tuple[str, ...]] = {}


def _init_params(cls: type) -> tuple[str, ...]:
    if cls not in _SIGNATURES:
        params = inspect.signature(cls.__init__).parameters.values()
        _SIGNATURES[cls] = tuple(p.name for p in params if p.name != "self" and p.kind not in (
            inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))
    return _SIGNATURES[cls]


def _with_activation_if(cls: type, src: _Source) -> type:
    return _with_activation(cls) if src.act is not None else cls


def _set_affine(new: nn.Module, src: _Source, as_parameters: bool) -> None:
    if not src.affine:
        return
    for key, t, rg in (("weight", src.weight, src.origin.requires_grad[0]),
                       ("bias", src.bias, src.origin.requires_grad[1])):
        if as_parameters:
            # the same Parameter object (optimizers and name-keyed groups keep working); frozen buffers become
            # fresh Parameters with the requires_grad the layer had before it was frozen
            new._parameters[key] = t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach().clone(), rg)
        else:
            new._buffers[key] = t.detach().clone() if isinstance(t, nn.Parameter) else t


def _family_state(old: nn.Module) -> dict[str, torch.Tensor]:
    # buffers a syncnorm layer keeps beyond BatchNorm's (CrossIterationBatchNorm history, CmBN window sums, ...)
    if not _is_syncnorm_layer(old):
        return {}
    return {k: t for k, t in old._buffers.items() if k not in _STANDARD_BUFFERS + ("weight", "bias") and t is not None}


def _carry_family_state(new: nn.Module, src: _Source, target: Target) -> bool:
    """Same family (CBN -> CBN with another process group, ...): keep its state through the layer's own state-dict
    loading. False when it does not fit (another window, ...): the caller rebuilds the layer without it."""
    try:
        new.load_state_dict(_family_state(src.module), strict=False)
    except RuntimeError:
        return False
    return True


def _set_buffers(new: nn.Module, src: _Source, notes: list[str], family_kept: bool) -> None:
    old = src.module
    for key in _STANDARD_BUFFERS:
        t = old._buffers.get(key)
        if key in new._buffers and new._buffers[key] is not None and t is not None:
            new._buffers[key] = t  # the same tensor object
        elif t is not None and key != "num_batches_tracked":
            notes.append(f"dropped {key} ({type(new).__name__} keeps no running statistics)")
    family = _family_state(old)
    if family and not family_kept:
        notes.append(f"dropped {type(old).__name__} state ({', '.join(family)})")
    if not _is_syncnorm_layer(old):
        # buffers and parameters a user registered on a BatchNorm travel with it
        for key, t in old._buffers.items():
            if key not in _STANDARD_BUFFERS + ("weight", "bias") and not hasattr(new, key):
                new.register_buffer(key, t, persistent=key not in old._non_persistent_buffers_set)
        for key, p in old._parameters.items():
            if key not in ("weight", "bias") and not hasattr(new, key):
                new.register_parameter(key, p)


def _build_synchronising(target: Target, src: _Source, kwargs: dict) -> nn.Module:
    cls = target.layer_class()
    params = _init_params(cls)
    if "track_running_stats" not in params and not src.track_running_stats:
        raise ValueError(f"syncnorm.convert: {src.label} has track_running_stats=False, but {cls.__name__} needs "
                         f"running statistics; exclude it or use another target")
    kw: dict[str, Any] = {}
    for p in params:
        if p in ("num_features", "device", "dtype"):
            continue
        if p in kwargs:
            kw[p] = kwargs[p]
        elif p in ("eps", "momentum", "affine", "track_running_stats"):
            kw[p] = getattr(src, p)
        elif hasattr(src.module, p):
            # a hyper-parameter the source layer has too (process_group of a synchronising layer, r_max of a
            # BatchRenorm, window of a CrossIterationBatchNorm, ...): keep it unless layer_kwargs override it
            kw[p] = getattr(src.module, p)
    new = _with_activation_if(cls, src)(src.num_features, **kw, device=src.device, dtype=src.dtype)
    _set_affine(new, src, as_parameters=True)
    return new


def _build_frozen(target: Target, src: _Source, kwargs: dict) -> nn.Module:
    if not src.track_running_stats:
        raise ValueError(f"syncnorm.convert: {src.label} has track_running_stats=False: there are no statistics to "
                         f"freeze; exclude it or use another target")
    cls = _with_activation_if(target.layer_class(), src)
    new = cls(src.num_features, eps=kwargs.get("eps", src.eps), affine=src.affine, device=src.device,
              dtype=src.dtype)
    _set_affine(new, src, as_parameters=False)
    return new


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _build_group(target: Target, src: _Source, kwargs: dict) -> nn.Module:
    c = src.num_features
    if "num_groups" in kwargs:
        g = kwargs["num_groups"]
        if isinstance(g, bool) or not isinstance(g, numbers.Integral):
            raise TypeError(f"syncnorm.convert: {src.label} cannot become GroupNorm: num_groups must be an int "
                            f"dividing num_features={c}, got {type(g).__name__} {g!r}; choices: {_divisors(c)}")
        g = int(g)
        if g < 1 or c % g:
            raise ValueError(
                f"syncnorm.convert: {src.label} cannot become GroupNorm with num_groups={g!r}: num_groups must "
                f"divide num_features={c}; choices: {_divisors(c)}")
    else:
        g = max(d for d in _divisors(c) if d <= 32)  # 32 (the GroupNorm paper's default) when it divides C
    cls = _with_activation_if(target.layer_class(), src)
    new = cls(g, c, eps=kwargs.get("eps", src.eps), affine=src.affine, device=src.device, dtype=src.dtype)
    _set_affine(new, src, as_parameters=True)
    return new


def _build_batch(target: Target, src: _Source, kwargs: dict) -> nn.Module:
    dim = src.origin.dim or _dim_of(src.paired_conv) or kwargs.get("dim")
    if src.origin.cls is not None and src.act is not None:
        cls = src.origin.cls  # timm BatchNormAct2d: keep its activation
    elif dim in _BN_BY_DIM:
        cls = _BN_BY_DIM[dim]
    else:
        raise ValueError(
            f"syncnorm.convert: cannot tell whether {src.label} should become BatchNorm1d, 2d or 3d (no conv or "
            f"linear layer feeds it and its source type is unknown); pass dim=1, 2 or 3, got dim={dim!r}")
    new = cls(src.num_features, eps=kwargs.get("eps", src.eps), momentum=kwargs.get("momentum", src.momentum),
              affine=src.affine, track_running_stats=src.track_running_stats, device=src.device, dtype=src.dtype)
    _set_affine(new, src, as_parameters=True)
    return new


#: target name -> :class:`Target`. Adding a layer family is one entry.
TARGETS: dict[str, Target] = {
    "sync": Target("syncnorm.layers.sync_batchnorm", "SyncBatchNorm", _build_synchronising),
    "renorm": Target("syncnorm.layers.batch_renorm", "BatchRenorm", _build_synchronising),
    "cross_iteration": Target("syncnorm.layers.cross_iteration", "CrossIterationBatchNorm", _build_synchronising,
                              pairs_with_conv=True),
    "cross_minibatch": Target("syncnorm.layers.cross_minibatch", "CrossMiniBatchNorm", _build_synchronising),
    "frozen": Target("syncnorm.layers.frozen", "FrozenBatchNorm", _build_frozen, kwargs=("eps",)),
    "group": Target("torch.nn", "GroupNorm", _build_group, kwargs=("num_groups", "eps"), reversible=False),
    "batch": Target("torch.nn", "BatchNorm2d", _build_batch, kwargs=("eps", "momentum", "dim")),
}


# ---------------------------------------------------------------------------------------------------------------
# norm + activation layers (timm BatchNormAct2d converted to another family keeps its activation)
# ---------------------------------------------------------------------------------------------------------------
class _NormActivation:
    """Mixin: ``act(drop(norm(x)))`` with the ``drop``/``act`` children of timm's ``BatchNormAct2d``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))


_ACT_CLASSES: dict[type, type] = {}


def _with_activation(cls: type) -> type:
    """``cls`` followed by the source layer's dropout and activation; state-dict keys stay those of BatchNormAct2d."""
    if cls not in _ACT_CLASSES:
        name = f"{cls.__name__}Act"
        doc = (f"{cls.__name__} followed by ``drop`` and ``act`` (made by syncnorm.convert from timm's BatchNormAct2d)."
               f"\n\n{cls.__doc__ or ''}")
        act_cls = type(name, (_NormActivation, cls), {"__module__": __name__, "__qualname__": name, "__doc__": doc})
        _ACT_CLASSES[cls] = act_cls
        globals()[name] = act_cls  # so pickle finds it
    return _ACT_CLASSES[cls]


def __getattr__(name: str) -> Any:
    # unpickling a model in a fresh process: build the activation variant on demand
    if name.endswith("Act"):
        for target in TARGETS.values():
            try:
                cls = target.layer_class()
            except ImportError:
                continue
            if cls.__name__ == name[:-3]:
                return _with_activation(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------------
# include / exclude
# ---------------------------------------------------------------------------------------------------------------
def _matcher(spec: Pattern, arg: str) -> Optional[Callable[[str, nn.Module], bool]]:
    if spec is None:
        return None
    if isinstance(spec, (str, re.Pattern)) or callable(spec):
        specs = [spec]
    else:
        try:
            specs = list(spec)
        except TypeError:
            raise TypeError(f"syncnorm.convert: {arg} must be a glob string, a compiled regex, a predicate "
                            f"(name, module) -> bool or a list of those, got {type(spec).__name__}") from None
    tests: list[Callable[[str, nn.Module], bool]] = []
    for s in specs:
        if isinstance(s, str):
            tests.append(lambda name, m, s=s: any(fnmatch.fnmatchcase(p, s) for p in _prefixes(name)))
        elif isinstance(s, re.Pattern):
            tests.append(lambda name, m, s=s: any(s.fullmatch(p) for p in _prefixes(name)))
        elif callable(s):
            tests.append(lambda name, m, s=s: bool(s(name, m)))
        else:
            raise TypeError(f"syncnorm.convert: {arg} entries must be glob strings, compiled regexes or predicates, "
                            f"got {type(s).__name__}")
    return lambda name, m: any(t(name, m) for t in tests)


def _prefixes(name: str) -> list[str]:
    # "backbone.body.bn1" matches "backbone", "backbone.body" and itself
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


# ---------------------------------------------------------------------------------------------------------------
# conv pairing
# ---------------------------------------------------------------------------------------------------------------
def _dim_of(m: Optional[nn.Module]) -> Optional[int]:
    if isinstance(m, _ConvNd):
        return len(m.kernel_size)
    if isinstance(m, nn.Linear):
        return 1
    return None


def _is_pairable_conv(m: nn.Module, num_features: int) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.out_channels == num_features


class _PairingTracer(torch.fx.Tracer):
    """fx tracer that keeps every norm layer (source or target family) and every conv as a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_batchnorm_like(m) or isinstance(m, (_ConvNd, nn.GroupNorm)) or super().is_leaf_module(m, qualname)


@contextlib.contextmanager
def _hooks_silenced(root: nn.Module):
    # fx runs the hooks of the modules it traces through, with Proxy arguments: a user's feature-capturing hook
    # would store Proxies. Swap every hook dict for an empty one while tracing.
    saved = []
    for m in root.modules():
        for key in _HOOK_DICTS:
            hooks = getattr(m, key, None)
            if hooks:
                saved.append((m, key, hooks))
                setattr(m, key, type(hooks)())
    try:
        yield
    finally:
        for m, key, hooks in saved:
            setattr(m, key, hooks)


def _pair_by_graph(root: nn.Module, wanted: dict[int, _Source], found: dict[int, Optional[nn.Module]]) -> None:
    """Trace the largest traceable submodules holding wanted layers; record the conv that feeds each one."""
    holders: set[int] = set()  # modules that hold a wanted layer somewhere below
    for src in wanted.values():
        holders.add(id(root))
        parts = src.name.split(".") if src.name else []
        m = root
        for p in parts[:-1]:
            m = m._modules[p]
            holders.add(id(m))

    def visit(m: nn.Module) -> None:
        if id(m) not in holders:
            return
        try:
            with warnings.catch_warnings(), _hooks_silenced(m):
                warnings.simplefilter("ignore")
                graph = _PairingTracer().trace(m)
        except Exception:  # control flow on data, unsupported ops, ...: trace the children instead
            for child in m._modules.values():
                if child is not None:
                    visit(child)
            return
        mods = dict(m.named_modules())
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            bn = mods.get(node.target)
            if bn is None or id(bn) not in wanted:
                continue
            arg = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
            conv = None
            if isinstance(arg, torch.fx.Node) and arg.op == "call_module":
                cand = mods.get(arg.target)
                if cand is not None and _is_pairable_conv(cand, wanted[id(bn)].num_features):
                    conv = cand
            # a layer called several times must see the same conv every time
            if id(bn) in found and found[id(bn)] is not conv:
                conv = None
            found[id(bn)] = conv

    visit(root)


def _previous_sibling(root: nn.Module, src: _Source) -> Optional[nn.Module]:
    # the module registered immediately before the layer in the same parent
    if not src.name:
        return None
    parent_name, _, leaf = src.name.rpartition(".")
    prev = None
    for key, child in root.get_submodule(parent_name)._modules.items():
        if key == leaf:
            break
        if child is not None:
            prev = child
    return prev


def _pair_by_order(root: nn.Module, src: _Source) -> Optional[nn.Module]:
    prev = _previous_sibling(root, src)
    return prev if prev is not None and _is_pairable_conv(prev, src.num_features) else None


# ---------------------------------------------------------------------------------------------------------------
# convert / revert
# ---------------------------------------------------------------------------------------------------------------
def _build(target: Target, src: _Source, kwargs: dict) -> nn.Module:
    try:
        new = target.build(target, src, kwargs)
    except (ValueError, TypeError) as e:
        if str(e).startswith("syncnorm.convert"):
            raise
        # the layer refused a setting: say which layer of the model
        kind = TypeError if isinstance(e, TypeError) else ValueError
        raise kind(f"syncnorm.convert: cannot convert {src.label} to {target.attr}: {e}") from e
    if src.act is not None:
        new.drop, new.act = src.act  # the same modules (their state and training flags are kept)
    return new


def _finish(new: nn.Module, src: _Source, notes: list[str], share_hooks: bool) -> None:
    old = src.module
    new.training = old.training
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    for key in _HOOK_DICTS:
        hooks = getattr(old, key, None)
        if hooks:
            mine = getattr(new, key)
            if mine:
                mine.update(hooks)
            elif share_hooks:
                # the old layer leaves the model: hand over the dict itself, so the handles register_*_hook
                # returned before the conversion (weak references to this dict) still remove these hooks
                setattr(new, key, hooks)
            else:
                # the old layer stays in use (a root BatchNorm): a shared dict would make a hook added to
                # either layer later fire on both
                setattr(new, key, type(hooks)(hooks))
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook
    new._syncnorm_origin = src.origin
    carried = [n for n in getattr(old, "_syncnorm_notes", []) if n not in notes]
    if carried or notes:
        new._syncnorm_notes = carried + notes
    if src.name and hasattr(new, "set_layer_name"):
        new.set_layer_name(src.name)


def convert(module: nn.Module, to: str, *, include: Pattern = None, exclude: Pattern = None,
            subclasses: str = "error", **layer_kwargs: Any) -> nn.Module:
    """Replace the BatchNorm layers of ``module`` by the layers of the target ``to``; return the converted module.

    **Targets** (:data:`TARGETS`): ``"sync"`` :class:`~syncnorm.SyncBatchNorm`, ``"renorm"``
    :class:`~syncnorm.BatchRenorm`, ``"cross_iteration"`` :class:`~syncnorm.CrossIterationBatchNorm` (each layer
    ``attach``-ed to the conv that feeds it), ``"cross_minibatch"`` :class:`~syncnorm.CrossMiniBatchNorm`,
    ``"frozen"`` :class:`~syncnorm.FrozenBatchNorm`, ``"group"`` ``nn.GroupNorm`` and ``"batch"`` plain
    ``nn.BatchNorm1d/2d/3d``.

    **Sources:** ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, materialised lazy BatchNorms, every syncnorm layer,
    and, when the user imported them, torchvision's ``FrozenBatchNorm2d`` and timm's ``BatchNormAct2d`` (its
    ``drop``/``act`` children are kept and applied after the new layer, with the same state-dict keys).
    Subclasses of those with their own ``forward`` raise ValueError unless ``subclasses="convert"`` (replace them,
    dropping the custom forward) or ``"skip"`` (leave them). A lazy layer not yet materialised, a layer with
    parametrizations, or a layer without running statistics for ``"frozen"`` / ``"renorm"`` raises ValueError.
    Everything else (GroupNorm, LayerNorm, InstanceNorm, other modules) is left alone.

    **What is kept:** the same ``weight``/``bias`` Parameter objects (an optimizer built before the conversion still
    trains them; their ``requires_grad`` and names are unchanged), the same ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` tensors and any other buffer a user registered, ``eps``, ``momentum``, the ``training``
    flag of each layer, device and dtype, ``qconfig``, forward hooks and pre-hooks, and backward hooks (see
    **Hooks**). A hyper-parameter both layers have (``process_group`` of a synchronising source, ``r_max`` of a
    BatchRenorm source, ``window`` of a CrossIterationBatchNorm source) is kept unless ``layer_kwargs`` sets it.
    Exceptions, by construction of the target: ``"frozen"`` turns ``weight``/``bias`` into buffer *copies* (no
    Parameter identity: those tensors are no longer trained); ``"group"`` drops the running statistics (no way back);
    family state of a syncnorm source (CrossIterationBatchNorm history, ...) is dropped when the target is another
    family, and :func:`summary` lists what was dropped.

    **Conv pairing** (``"cross_iteration"``): each layer is ``attach``-ed to the conv whose output it normalises,
    read from a ``torch.fx`` trace of the model, or, where the model does not trace (data-dependent control flow, as
    in torchvision's detectors), of its largest submodules that do (the backbone). Layers in no traced graph take
    the conv registered immediately before them in the same parent (with ``out_channels == num_features``). A layer
    fed by anything else (a linear layer, a sum, a shared layer called on several inputs) stays unpaired: one
    UserWarning lists them and :func:`summary` marks them ``UNPAIRED``. Tracing runs no hooks and no forward
    computation. A replaced CrossIterationBatchNorm is detached from its conv (its input-capturing hook removed).

    **Hooks.** A layer replaced inside the model hands its hook dicts themselves to the new layer (the old layer
    leaves the model): the hooks run on the new layer, and a handle returned by ``register_*_hook`` before the
    conversion still removes its hook. A root that is itself a BatchNorm stays a separate, usable object, so the new
    layer gets *copies* of its hook dicts: the hooks registered before the conversion run on both layers, a hook
    registered later on either layer runs on that layer only, and a handle from before the conversion removes its
    hook from the original layer only.

    Each layer created by syncnorm gets its qualified name for error messages (``set_layer_name``). Layers shared
    between several parents become one shared new layer.

    Args:
        module: the model, converted in place; a root that is itself a BatchNorm is converted and the new layer
            returned (it shares the original's Parameters and buffers, but has its own hook dicts).
        to: target name, one of ``TARGETS``.
        include: only convert layers whose qualified name (or any dotted prefix of it, so ``"backbone"`` covers
            ``"backbone.body.bn1"``) matches: a glob string (``fnmatch``), a compiled ``re.Pattern`` (full match),
            a predicate ``(name, module) -> bool``, or a list of those (any). None converts every layer.
        exclude: same forms; matching layers are left alone (wins over ``include``).
        subclasses: ``"error"`` (default), ``"convert"`` or ``"skip"`` for BatchNorm subclasses with a custom forward.
        **layer_kwargs: arguments of the target layer, given to every converted layer at any depth (for example
            ``process_group``, ``r_max``, ``window``; ``num_groups`` for ``"group"`` (default 32, or the largest
            divisor of C below 32); ``dim`` for ``"batch"``: 1, 2 or 3 where neither the source type nor a feeding
            conv/linear tells). ``num_features``, ``affine``, ``track_running_stats``, ``device`` and ``dtype`` come
            from each source layer.

    Returns:
        ``module`` itself (converted in place), or the new layer when ``module`` is itself a BatchNorm.

    Raises:
        ValueError: unknown target, layer argument taken from the source, an unconvertible layer, an impossible
            GroupNorm split or ``dim`` outside 1..3 (each naming the layer or argument and the choices), an ``eps``
            that is not finite and > 0 or a ``momentum`` outside [0, 1] for ``"group"`` / ``"batch"`` (torch's
            layers would accept them), or a value the target layer's constructor refuses (naming the layer of the
            model).
        TypeError: ``to`` or ``subclasses`` not a str, a layer argument the target does not accept, a non-int
            ``num_groups`` or ``dim``, a non-number ``eps`` / ``momentum`` for ``"group"`` / ``"batch"``, a
            malformed include/exclude, or an argument of the wrong type refused by the
            target layer's constructor (naming the layer of the model).

        Nothing is modified when it raises.
    """
    if not isinstance(to, str):
        raise TypeError(f"syncnorm.convert: to must be a target name (str), got {type(to).__name__} {to!r}; "
                        f"choices: {sorted(TARGETS)}")
    if to not in TARGETS:
        raise ValueError(f"syncnorm.convert: unknown target to={to!r}; choices: {sorted(TARGETS)}")
    if not isinstance(subclasses, str):
        raise TypeError(f"syncnorm.convert: subclasses must be 'error', 'convert' or 'skip', got "
                        f"{type(subclasses).__name__} {subclasses!r}")
    if subclasses not in ("error", "convert", "skip"):
        raise ValueError(f"syncnorm.convert: subclasses must be 'error', 'convert' or 'skip', got {subclasses!r}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"syncnorm.convert: expected an nn.Module, got {type(module).__name__}")
    target = TARGETS[to]
    fixed = [k for k in layer_kwargs if k in _FROM_SOURCE]
    if fixed:
        raise ValueError(f"syncnorm.convert(to={to!r}): {fixed} are taken from each source layer and cannot be set; "
                         f"settable: {list(target.accepted_kwargs())}")
    accepted = target.accepted_kwargs()
    unknown = [k for k in layer_kwargs if k not in accepted]
    if unknown:
        raise TypeError(f"syncnorm.convert(to={to!r}): {target.attr} does not accept {unknown}; "
                        f"accepted layer arguments: {list(accepted)}")
    _check_values(to, layer_kwargs, f"syncnorm.convert(to={to!r})")
    return _convert(module, to, _matcher(include, "include"), _matcher(exclude, "exclude"), subclasses, layer_kwargs)


def _convert(root: nn.Module, to: str, include, exclude, subclasses: str, kwargs: dict, *,
             only: Optional[Callable[[nn.Module], bool]] = None) -> nn.Module:
    target = TARGETS[to]
    sources: dict[int, _Source] = {}
    for name, m in root.named_modules():
        if not _is_batchnorm_like(m) or (only is not None and not only(m)):
            continue
        if (include is not None and not include(name, m)) or (exclude is not None and exclude(name, m)):
            continue
        src = _read_source(m, name, subclasses)
        if src is not None:
            sources[id(m)] = src
    if not sources:
        return root

    if target.pairs_with_conv:
        found: dict[int, Optional[nn.Module]] = {}
        _pair_by_graph(root, sources, found)
        for key, src in sources.items():
            src.paired_conv = found[key] if key in found else _pair_by_order(root, src)
        # a conv feeding several layers pairs with none of them: each compensated layer consumes its conv's captured
        # input, and a conv can be attached to one layer only
        users: dict[int, list[_Source]] = {}
        for src in sources.values():
            if src.paired_conv is not None:
                users.setdefault(id(src.paired_conv), []).append(src)
        shared = sorted(src.name or "<root>" for group in users.values() if len(group) > 1 for src in group)
        for group in users.values():
            if len(group) > 1:
                for src in group:
                    src.paired_conv = None
        if shared:
            warnings.warn(f"syncnorm.convert: {len(shared)} layer(s) are fed by a conv that feeds several norm layers, "
                          f"so none of them is paired with it: {', '.join(shared)}", UserWarning, stacklevel=2)
    elif to == "batch":
        for src in sources.values():
            if src.origin.dim is None:  # a layer built directly: the conv it is attached to, else its neighbour
                src.paired_conv = getattr(src.module, "paired_conv", None)
                if _dim_of(src.paired_conv) is None:
                    dim = _dim_of(_previous_sibling(root, src))
                    if dim is not None:
                        src.origin = _Origin(src.origin.cls, dim, src.origin.momentum, src.origin.requires_grad)

    new_layers: dict[int, nn.Module] = {}
    for key, src in sources.items():  # build everything first: an error leaves the model untouched
        notes: list[str] = []
        new = _build(target, src, kwargs)
        family_kept = bool(_family_state(src.module)) and isinstance(src.module, target.layer_class())
        if family_kept and not _carry_family_state(new, src, target):
            new, family_kept = _build(target, src, kwargs), False
        _set_buffers(new, src, notes, family_kept)
        _finish(new, src, notes, share_hooks=key != id(root))
        new._syncnorm_target = to
        new_layers[key] = new
    for src in sources.values():
        if getattr(src.module, "paired_conv", None) is not None and callable(getattr(src.module, "detach", None)):
            src.module.detach()  # the replaced CrossIterationBatchNorm's hook must stop capturing the conv's input
    unpaired = []
    if target.pairs_with_conv:
        for key, src in sources.items():
            if src.paired_conv is not None:
                new_layers[key].attach(src.paired_conv)
            else:
                unpaired.append(src.name or "<root>")
    if unpaired:
        warnings.warn(f"syncnorm.convert: {len(unpaired)} layer(s) have no conv feeding them directly and run "
                      f"without cross-iteration compensation: {', '.join(unpaired)}", UserWarning, stacklevel=3)

    if id(root) in new_layers:
        return new_layers[id(root)]
    for _, parent in root.named_modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new_layers:
                parent._modules[child_name] = new_layers[id(child)]
    return root


def _check_values(to: str, kwargs: dict, who: str, *, num_groups: bool = False) -> None:
    # The layer arguments of the torch.nn targets that torch itself does not check (GroupNorm and BatchNorm accept
    # eps <= 0 or NaN and then produce NaN or fail at the first forward), and, with num_groups=True (callbacks,
    # before any model exists), num_groups as far as it is checkable without a layer (convert checks it per layer,
    # with the layer's divisors in the message). The syncnorm layers check their own arguments when built.
    if to in ("group", "batch") and "eps" in kwargs:
        eps = kwargs["eps"]
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"{who}: eps must be a real number > 0, got {type(eps).__name__} {eps!r}")
        if not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"{who}: eps must be a finite number > 0, got {eps!r}")
    if to == "batch" and kwargs.get("momentum") is not None:
        momentum = kwargs["momentum"]
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
            raise TypeError(f"{who}: momentum must be a number in [0, 1] or None, got {type(momentum).__name__} "
                            f"{momentum!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{who}: momentum must be in [0, 1] or None, got {momentum!r}")
    if to == "batch" and "dim" in kwargs:
        _check_dim(kwargs["dim"], who)
    if num_groups and to == "group" and "num_groups" in kwargs:
        g = kwargs["num_groups"]
        if isinstance(g, bool) or not isinstance(g, numbers.Integral):
            raise TypeError(f"{who}: num_groups must be an int >= 1 dividing each layer's channel count, got "
                            f"{type(g).__name__} {g!r}")
        if g < 1:
            raise ValueError(f"{who}: num_groups must be an int >= 1 dividing each layer's channel count, got {g!r}")


def _check_dim(dim, who: str) -> None:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{who}: dim must be 1, 2, 3 or None, got {type(dim).__name__} {dim!r}")
    if dim not in _BN_BY_DIM:
        raise ValueError(f"{who}: dim must be 1, 2, 3 or None, got {dim!r}")


def _reversible(m: nn.Module) -> bool:
    target = TARGETS.get(getattr(m, "_syncnorm_target", None))
    return target is None or target.reversible


def revert(module: nn.Module, *, dim: Optional[int] = None) -> nn.Module:
    """Turn every syncnorm layer of ``module`` back into a plain ``nn.BatchNorm1d/2d/3d``; return the module.

    The inverse of :func:`convert` for every target except ``"group"``: ``revert(convert(m, to))`` has the state-dict
    keys of ``m`` (``load_state_dict(strict=True)`` works both ways) and gives the same eval outputs. Parameters are
    the same objects (frozen layers get fresh Parameters with the ``requires_grad`` they had before freezing), the
    running statistics and ``num_batches_tracked`` are kept, and so are ``eps``, ``momentum``, the training flag,
    qconfig and hooks. A layer converted from timm's ``BatchNormAct2d`` becomes a ``BatchNormAct2d`` again with the
    same activation.

    The dimension (1d/2d/3d) is the one of the layer ``convert`` replaced; for a syncnorm layer built directly it is
    taken from the conv a CrossIterationBatchNorm is attached to, else from the conv or linear layer registered just
    before it in the same parent, else from ``dim``; else ValueError naming the layer. ``dim`` other than 1, 2, 3 or
    None raises ValueError (TypeError when it is not an int).

    Dropped: family state that plain BatchNorm has no place for (CrossIterationBatchNorm history, CrossMiniBatchNorm
    window sums, BatchRenorm's r_max/d_max); :func:`summary` of the result lists it per layer. There is no way back
    from GroupNorm (its batch statistics were never kept): GroupNorm layers made by ``convert(..., "group")`` are
    left as they are, with a warning naming them. Other layers (``nn.SyncBatchNorm``, torchvision
    ``FrozenBatchNorm2d`` and everything that is not syncnorm's) are left alone; ``convert(m, "batch")`` converts
    those too.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"syncnorm.revert: expected an nn.Module, got {type(module).__name__}")
    if dim is not None:
        _check_dim(dim, "syncnorm.revert")
    stuck = [name or "<root>" for name, m in module.named_modules() if not _reversible(m)]
    if stuck:
        made_by = sorted({m._syncnorm_target for m in module.modules() if not _reversible(m)})
        warnings.warn(f"syncnorm.revert: {len(stuck)} layer(s) made by syncnorm.convert(..., to={made_by}) are left "
                      f"as they are: that conversion dropped BatchNorm's running statistics, so there is no way back "
                      f"({', '.join(stuck[:5])}{', ...' if len(stuck) > 5 else ''})", UserWarning, stacklevel=2)
    kwargs = {"dim": dim} if dim is not None else {}
    return _convert(module, "batch", None, None, "convert", kwargs, only=_is_syncnorm_layer)


# ---------------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------------
def _norm_classes() -> tuple[type, ...]:
    classes = [nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm]
    for extra in (getattr(nn, "RMSNorm", None), nn.LocalResponseNorm, _tv_frozen()):
        if extra is not None:
            classes.append(extra)
    return tuple(classes)


def summary(module: nn.Module) -> str:
    """A table of every norm layer of ``module``: what a user reads before and after :func:`convert`.

    One row per norm layer (BatchNorm of any family, syncnorm layers, GroupNorm, LayerNorm, InstanceNorm,
    torchvision ``FrozenBatchNorm2d``; a layer shared by several parents once, under its first name) with columns:
    qualified name, type (with the activation of norm+activation layers), num_features (``groups/channels`` for
    GroupNorm), affine, sync (number of ranks a synchronising layer reduces over: its process group's size, 1 when
    not distributed; ``-`` for layers that never synchronise), conv (the conv a CrossIterationBatchNorm is attached
    to, ``UNPAIRED`` when none) and renorm (``r_max/d_max`` of a BatchRenorm). A first line counts the layers per
    type; notes at the end list what a conversion dropped (CrossIterationBatchNorm history, running statistics of
    GroupNorm layers, which therefore cannot be reverted) and layers that are unpaired. Issues no collective.
    """
    names: dict[int, str] = {}
    for name, m in module.named_modules():
        names.setdefault(id(m), name)
    classes = _norm_classes()
    rows = []
    counts: dict[str, int] = {}
    notes = []
    for name, m in module.named_modules():
        if not isinstance(m, classes):
            continue
        shown = name or "<root>"
        kind = type(m).__name__
        if "act" in m._modules:
            kind += f"+{type(m._modules['act']).__name__}"
        counts[kind] = counts.get(kind, 0) + 1
        if isinstance(m, nn.GroupNorm):
            features, affine = f"{m.num_groups}/{m.num_channels}", m.affine
        elif isinstance(m, nn.LayerNorm):
            features, affine = "x".join(map(str, m.normalized_shape)), m.elementwise_affine
        elif hasattr(m, "num_features"):
            features, affine = str(m.num_features), getattr(m, "affine", m.weight is not None)
        else:
            features, affine = str(getattr(m, "running_mean", torch.empty(0)).numel()), m.weight is not None
        sync = str(comm.get_world_size(m.process_group)) if hasattr(m, "process_group") else "-"
        conv = ""
        if hasattr(m, "paired_conv"):
            conv = names.get(id(m.paired_conv), "(outside)") if m.paired_conv is not None else "UNPAIRED"
            if m.paired_conv is None:
                notes.append((shown, "unpaired, no conv feeds it directly (no cross-iteration compensation)"))
        renorm = f"{m.r_max:g}/{m.d_max:g}" if hasattr(m, "r_max") and hasattr(m, "d_max") else ""
        rows.append((shown, kind, features, "yes" if affine else "no", sync, conv, renorm))
        if not _reversible(m):
            notes.append((shown, f"converted to {type(m).__name__}, running statistics dropped: syncnorm.revert "
                                 f"cannot restore"))
        else:
            notes += [(shown, note) for note in getattr(m, "_syncnorm_notes", [])]
    if not rows:
        return "syncnorm.summary: no norm layers"
    per_type = ", ".join(f"{n} {k}" for k, n in counts.items())
    header = ("name", "type", "features", "affine", "sync", "conv", "renorm")
    keep = [i for i in range(len(header)) if i < 5 or any(r[i] for r in rows)]  # hide empty conv/renorm columns
    table = [tuple(row[i] for i in keep) for row in [header, *rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(keep))]
    right = {header.index(c) for c in ("features", "sync")}

    def fmt(row) -> str:
        return "  ".join(cell.rjust(w) if keep[i] in right else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(row, widths))).rstrip()

    lines = [f"syncnorm.summary: {len(rows)} norm layer{'s' if len(rows) != 1 else ''} ({per_type})",
             fmt(table[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in table[1:]]
    if notes:
        grouped: dict[str, list[str]] = {}
        for layer, note in notes:
            grouped.setdefault(note, []).append(layer)
        lines += ["", "notes:"]
        for note, layers in grouped.items():
            shown_layers = ", ".join(layers[:8]) + (f", ... ({len(layers)} layers)" if len(layers) > 8 else "")
            lines.append(f"  {note}: {shown_layers}")
    return "\n".join(lines)
