"""The optional C++ CPU fast path (``syncnorm/csrc/norm_cpu.cpp``), compiled on first use.

The Python statistics path has about sixty small tensor operations and five to six passes over the data per
forward + backward. On CPU the extension computes the same quantities in four fused passes and a few O(C) loops,
inside one C++ autograd node: the same statistics, the same centring rules, the same collectives (still issued
by :mod:`syncnorm.comm`, through a Python callback). The two paths agree to rounding, not bit for bit (the kernels
sum in SIMD lanes with fp64 block totals and form the per-channel constants in fp64); ``tests/test_fast_path.py``
checks both against each other and against float64 BatchNorm. Every rank of a group should take the same path (a
build that fails on one rank only leaves its running statistics a few ulps away from its peers').

The extension is built with ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja are needed; about a
minute, once per torch version and source change, cached under ``TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``). ``make test`` and ``make demo`` build it while setting up the environment. When it
cannot be built, syncnorm warns once and uses the Python path, which gives the same results, only slower on
small layers. Set ``SYNCNORM_CPU_EXT=0`` to always use the Python path. CUDA tensors always take the Python path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from . import comm

__all__ = ["ops", "ops_for", "enabled", "set_enabled", "build", "reducer_key", "SOURCE"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "norm_cpu.cpp"

_lock = threading.Lock()
_ops: Optional[Any] = None
_failed: Optional[str] = None


def _env_enabled() -> bool:
    return os.environ.get("SYNCNORM_CPU_EXT", "1").strip().lower() not in ("0", "false", "off", "no")


_enabled = _env_enabled()


def enabled() -> bool:
    """Whether the fast path may be used: False when ``SYNCNORM_CPU_EXT`` was ``0`` / ``false`` / ``off`` / ``no``
    when syncnorm was imported, or after ``set_enabled(False)``."""
    return _enabled


def set_enabled(value: Optional[bool] = None) -> bool:
    """Turn the fast path on or off for this process (None: back to the ``SYNCNORM_CPU_EXT`` setting); returns
    the previous value. Both paths give the same results; tests use this to run each."""
    global _enabled
    previous = _enabled
    _enabled = _env_enabled() if value is None else bool(value)
    return previous


def _cpu_flags() -> bytes:
    # the build targets this machine's CPU (-march=native); a cache shared with another CPU model must not reuse it
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith(b"flags"):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor().encode()


def _name() -> str:
    # the module name carries the source, torch version and CPU flags, so none of them ever loads a stale build
    digest = hashlib.sha1(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags()).hexdigest()[:10]
    return f"syncnorm_cpu_{digest}"


def build(verbose: bool = False) -> Any:
    """Compile (if needed) and load the extension; raises on failure. Returns the loaded module."""
    global _ops
    with _lock:
        if _ops is None:
            # importing torch.utils.cpp_extension logs a warning about CUDA_HOME on machines without CUDA;
            # nothing here uses CUDA
            log = logging.getLogger("torch.utils.cpp_extension")
            level = log.level
            if not verbose:
                log.setLevel(logging.ERROR)
            try:
                from torch.utils.cpp_extension import load

                _ops = load(name=_name(), sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native"],
                            verbose=verbose)
            finally:
                log.setLevel(level)
            _ops.set_reducer(_reduce)
    return _ops


def ops() -> Optional[Any]:
    """The loaded extension module, or None when disabled or unavailable (then the Python path runs)."""
    global _failed
    if _ops is not None:
        return _ops if _enabled else None
    if _failed is not None or not _enabled:
        return None
    try:
        return build()
    except Exception as e:  # noqa: BLE001 - any build/load failure means: use the Python path
        _failed = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        warnings.warn(f"syncnorm: the C++ CPU fast path could not be built ({_failed}); using the Python path, "
                      "which gives the same results more slowly on small layers. Set SYNCNORM_CPU_EXT=0 to silence "
                      "this.", RuntimeWarning, stacklevel=2)
        return None


def ops_for(t: torch.Tensor) -> Optional[Any]:
    """:func:`ops` for a CPU tensor, None for any other device."""
    if _ops is not None and _enabled:  # the common case first: this runs several times per layer per step
        return _ops if t.is_cpu else None
    return ops() if t.is_cpu else None


# The kernels issue their collectives by reducer key (C++ all_reduce_packed). For a group whose ranks share this
# host's shared-memory channel, the key names the channel, and the kernels exchange any vector that fits its slot
# directly, without calling back into Python (two fewer Python round trips per layer per training step). Every
# other key, and any vector that does not fit, goes through _reduce -> syncnorm.comm.all_reduce_sum. While
# syncnorm.comm.all_reduce_sum is replaced (by a test's ledger or a profiler), new keys go through Python only, so
# that the replacement sees the collectives of every forward run while it is in place, and of their backwards
# (the key is taken at the forward: a replacement installed between a forward and its backward does not see that
# backward's all-reduce). -1 means no collective (world size 1).
_DIRECT = 1 << 62
_groups: dict[int, Any] = {}
_all_reduce_sum = comm.all_reduce_sum
# id(group) -> (group, default group, comm.all_reduce_sum, key) when the key was decided: reused while the group,
# the default group (a destroyed and re-created world is a new one) and comm.all_reduce_sum are the same objects
_keys: dict[int, tuple] = {}


def reducer_key(group: Any) -> int:
    """Key of ``group`` for the kernels' all-reduces (forward and backward); -1 when ``group`` has one rank."""
    # runs once per layer per training forward: the cached key first, in one frame
    entry = _keys.get(id(group))
    if (entry is not None and entry[0] is group and entry[1] is comm._default_group()
            and entry[2] is comm.all_reduce_sum):
        return entry[3]
    world, channel = comm._route(group)  # the group's cached size and channel
    if world == 1:
        key = -1
    else:
        if channel is not None and comm.all_reduce_sum is _all_reduce_sum:
            key = _DIRECT | channel.handle
        else:
            key = 0 if group is None else id(group) & (_DIRECT - 1)
        _groups[key] = group  # also keeps the group alive, so its id is not reused
    _keys[id(group)] = (group, comm._default_group(), comm.all_reduce_sum, key)
    return key


def _reduce(tensor: torch.Tensor, key: int) -> None:
    comm.all_reduce_sum(tensor, _groups[key])
