"""Thin nn.Module wrappers over :mod:`syncnorm.functional`, one file per family."""

from .sync_batchnorm import GlobalStatsBatchNorm, SyncBatchNorm

__all__ = ["GlobalStatsBatchNorm", "SyncBatchNorm"]
