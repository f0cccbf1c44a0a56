"""syncnorm: correct batch statistics when the per-device batch is small.

The public API, re-exported flat:

- layers: :class:`SyncBatchNorm`, :class:`BatchRenorm`, :class:`CrossIterationBatchNorm`,
  :class:`CrossMiniBatchNorm`, :class:`FrozenBatchNorm`;
- conversion: :func:`convert`, :func:`revert`, :func:`summary`;
- statistics utilities: :func:`precise_bn`;
- submodules: :mod:`comm`, :mod:`ops` (the custom ops), :mod:`stats`, :mod:`functional`, :mod:`schedules`, :mod:`callbacks`, :mod:`launch`.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import comm, functional, ops, stats
from .layers.sync_batchnorm import SyncBatchNorm

# Eager, not lazy: importing the submodule syncnorm.convert binds the package attribute "convert" to the module,
# which would shadow the function whenever the submodule is imported before syncnorm.convert is first looked up.
from .convert import convert, revert, summary

__version__ = "0.1.0"

# Names resolved on first use, so that importing syncnorm stays cheap (Lightning is only imported when a callback
# is used) and each family lives in its own module.
_LAZY = {
    "BatchRenorm": "syncnorm.layers.batch_renorm",
    "CrossIterationBatchNorm": "syncnorm.layers.cross_iteration",
    "CrossMiniBatchNorm": "syncnorm.layers.cross_minibatch",
    "FrozenBatchNorm": "syncnorm.layers.frozen",
    "precise_bn": "syncnorm.callbacks.precise_bn",
}
_LAZY_MODULES = {"schedules", "callbacks", "launch", "cli", "layers"}

__all__ = ["SyncBatchNorm", "convert", "revert", "summary", "comm", "functional", "ops", "stats", *sorted(_LAZY),
           *sorted(_LAZY_MODULES)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _LAZY_MODULES:
        module = importlib.import_module(f"syncnorm.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'syncnorm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
