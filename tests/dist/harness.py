"""Reusable multi-process harness: run a function on W gloo ranks, with a timeout, and collect the results.

Spawning a world costs about 7 s here, so a test module runs *many* checks inside one world: the worker returns a
dict of per-check results and the test functions assert on them (see ``tests/test_sync_batchnorm.py``).

A hang fails instead of stalling CI: the parent waits at most ``timeout`` seconds, then kills every rank and raises
``TimeoutError``. An exception on any rank is re-raised in the parent with the rank's traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

__all__ = ["run_distributed", "free_port", "CollectiveLedger", "RankFailure", "on_both_implementations"]


class RankFailure(RuntimeError):
    """An exception raised on one of the ranks, with that rank's traceback in the message."""


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, pg_timeout: float,
           backend: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # plain pickle: tensors travel as bytes, not as shared-memory handles that die with this process
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0,
                    pg_timeout: float = 60.0, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks and return the per-rank results.

    ``backend`` is "gloo" (CPU, the default) or "nccl" (rank r uses ``cuda:r``).

    ``fn`` must be importable (a module-level function) and its result picklable. Raises :class:`RankFailure` if
    any rank raised, ``TimeoutError`` if the world did not finish within ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, pg_timeout, backend),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    import queue as _q
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"distributed world of {world_size} ranks did not finish within {timeout:.0f}s "
                                   f"(finished ranks: {sorted(results) + sorted(failures)})")
            try:
                rank, ok, payload = queue.get(timeout=min(remaining, 1.0))
            except _q.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None)
                        and i not in results and i not in failures]
                if dead:
                    raise RankFailure(f"rank(s) {dead} died with exit codes {[procs[i].exitcode for i in dead]}")
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
                # the others may now hang in a collective; give them a moment, then stop waiting
                deadline = min(deadline, time.monotonic() + 15)
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if failures:
        first = min(failures)
        raise RankFailure(f"rank {first} of {world_size} failed:\n{failures[first]}")
    return [results[r] for r in range(world_size)]


class CollectiveLedger:
    """Counts the collectives syncnorm issues, by wrapping the functions of :mod:`syncnorm.comm`.

    Use as a context manager inside a rank; ``entries`` lists ``(function name, numel, dtype)`` in call order.
    """

    _names = ("all_reduce_sum", "all_reduce_max", "all_gather_object", "broadcast_object", "barrier")

    def __init__(self) -> None:
        self.entries: list[tuple[str, int, str]] = []
        self._saved: dict[str, Callable] = {}

    def __enter__(self) -> "CollectiveLedger":
        from syncnorm import comm

        for name in self._names:
            orig = getattr(comm, name)
            self._saved[name] = orig

            def wrapper(*a, __orig=orig, __name=name, **k):
                t = a[0] if a else None
                numel = t.numel() if hasattr(t, "numel") else -1
                dtype = str(t.dtype) if hasattr(t, "dtype") else "-"
                if comm.get_world_size(k.get("group", a[1] if len(a) > 1 else None)) > 1:
                    self.entries.append((__name, numel, dtype))
                return __orig(*a, **k)

            setattr(comm, name, wrapper)
        return self

    def __exit__(self, *exc) -> None:
        from syncnorm import comm

        for name, fn in self._saved.items():
            setattr(comm, name, fn)

    def clear(self) -> None:
        self.entries.clear()


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


REFERENCE_TAG = "@reference"


def on_both_implementations(check: Callable, rank: int, world: int, results: dict, *args: Any,
                            merge: bool = True) -> None:
    """Run ``check(rank, world, out, *args)`` once on syncnorm's C++ CPU kernels and once on the reference
    implementation of its ops, in the same world. With ``merge``, ``results[key]`` gets the value both runs gave,
    or, where they differ, a message with both (so a check whose passing value is None fails unless it passed on
    both). Without, the kernels' results keep their keys and the reference's get ``REFERENCE_TAG`` appended (for
    checks that return raw values the parent compares)."""
    from syncnorm import ops

    runs = []
    for kernels in (True, False):
        out: dict = {}
        with ops.use_kernels(kernels):
            check(rank, world, out, *args)
        runs.append(out)
    kernel, reference = runs
    if not merge:
        results.update(kernel)
        results.update({key + REFERENCE_TAG: value for key, value in reference.items()})
        return
    for key in kernel.keys() | reference.keys():
        a, b = kernel.get(key), reference.get(key)
        results[key] = a if _same(a, b) else f"implementations differ: cpu-kernel gave {a!r}; reference gave {b!r}"
