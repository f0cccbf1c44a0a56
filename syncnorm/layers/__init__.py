"""Thin nn.Module wrappers over :mod:`syncnorm.functional`, one file per family."""

from __future__ import annotations

import importlib
from typing import Any

from .sync_batchnorm import GlobalStatsBatchNorm, SyncBatchNorm

_LAZY = {
    "BatchRenorm": "batch_renorm",
    "CrossIterationBatchNorm": "cross_iteration",
    "CrossMiniBatchNorm": "cross_minibatch",
    "FrozenBatchNorm": "frozen",
}

__all__ = ["GlobalStatsBatchNorm", "SyncBatchNorm", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"syncnorm.layers.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'syncnorm.layers' has no attribute {name!r}")
