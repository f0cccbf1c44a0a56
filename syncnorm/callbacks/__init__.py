"""Lightning glue: the conversion callback, schedulers, PreciseBN, the statistics monitor and the LayerSync plugin.

Importing a callback imports ``pytorch_lightning`` (>= 2.2); :func:`precise_bn`, the plain-function PreciseBN /
AdaBN, does not.

- :class:`NormConversion` converts the norm layers in ``setup()`` (before checkpoint restore, DDP wrapping and
  ``configure_optimizers``) and drives CmBN windows and CBN burn-in from the trainer;
- :class:`CrossBatchScheduler` drives CmBN windows and CBN burn-in when the layers were built or converted
  without :class:`NormConversion` (for example by :class:`SyncNormPlugin`);
- :class:`RenormScheduler` sets BatchRenorm's ``r_max``/``d_max`` from ``trainer.global_step`` and logs them;
- :class:`PreciseBN` recomputes exact population statistics before validation and checkpointing;
- :class:`BatchNormMonitor` logs the local-vs-global statistics gap, the running-statistics spread across ranks and
  BatchRenorm clip rates;
- :class:`SyncNormPlugin` is a ``LayerSync`` for ``Trainer(plugins=[...])``.
"""

from __future__ import annotations

import importlib
from typing import Any

# eager (no Lightning import); also makes ``syncnorm.callbacks.precise_bn`` the function, not the submodule
from .precise_bn import precise_bn

_LAZY = {
    "NormConversion": "conversion",
    "CrossBatchScheduler": "conversion",
    "RenormScheduler": "renorm",
    "PreciseBN": "population",
    "BatchNormMonitor": "monitor",
    "SyncNormPlugin": "plugin",
}

__all__ = sorted([*_LAZY, "precise_bn"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"syncnorm.callbacks.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'syncnorm.callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
