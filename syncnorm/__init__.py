"""syncnorm: correct batch statistics when the per-device batch is small.

The public API, re-exported flat (see README.md): layers, conversion utilities and submodules.
"""

from . import comm, functional, stats
from .layers import SyncBatchNorm

__version__ = "0.1.0"

__all__ = [
    "SyncBatchNorm",
    "comm",
    "functional",
    "stats",
]
