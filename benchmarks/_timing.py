"""Shared timing helpers for the benchmark scripts: medians over repeats, interleaved candidates, 2-rank worlds.

Candidates are timed *interleaved* inside one process so that machine noise hits all of them alike, in a new
random order at every repeat (the same order on every rank), so that no candidate always runs right after the
same neighbour: on a small layer a call's time depends on which code ran just before it (what is still in the
CPU's caches), by up to 10 %. Ratios are taken from medians. ``SYNCNORM_BENCH_FIXED_ORDER=1`` keeps the listed
order at every repeat instead (the method of the figures taken before the shuffle, to compare with them).

Every process that calls :func:`time_interleaved` first fixes glibc malloc's mmap and trim thresholds
(:func:`steady_allocator`), so that no candidate pays page faults for memory another one just returned to the OS
(``bench_cross_iteration`` has its own timing loop and allocator settings, for its memory figures).

Multi-rank timings run in a gloo world from ``tests/dist/harness.py`` (the same harness the tests use), every rank
timing the same candidates in lock-step.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import time
from typing import Callable, Mapping

import torch


def machine_line() -> str:
    """One line describing the machine and software the numbers were taken on."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads/rank {torch.get_num_threads()}, python {platform.python_version()}")


_allocator_fixed: bool | None = None


def steady_allocator() -> bool:
    """Fix glibc malloc's mmap and trim thresholds in this process (once; True when they are fixed).

    By default glibc returns a large freed block to the OS (``munmap``, or trimming the heap top) and maps fresh
    pages for the next large allocation, which then page-faults on first touch; which candidate pays for that
    depends on the order of the candidates, and on the 6-8 MB tensors of the large shapes it moved a candidate's
    median by up to 40 % from run to run. With the thresholds fixed (mmap above 32 MiB, trim above 256 MiB), freed
    blocks stay in the heap for the next candidate, the steady state a training loop reaches after its first steps.
    Applied to every candidate alike; a no-op on other C libraries.
    """
    global _allocator_fixed
    if _allocator_fixed is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3
            _allocator_fixed = bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(
                libc.mallopt(m_trim_threshold, 256 << 20))
        except (OSError, AttributeError):
            _allocator_fixed = False
    return _allocator_fixed


def time_interleaved(candidates: Mapping[str, Callable[[], object]], repeats: int = 20, warmup: int = 3,
                     sync: Callable[[], None] | None = None, seed: int = 0, cpu_times: bool = False):
    """Median wall time in milliseconds of each candidate, timed interleaved ``repeats`` times.

    Returns ``{name: ms}``; with ``cpu_times=True``, ``(wall, cpu)``: the same, and the median process CPU time
    (``time.process_time``) of the same samples.

    The process's allocator is put in its steady state first (:func:`steady_allocator`). Each repeat runs every
    candidate once, in an order drawn from ``random.Random(seed)`` (a shuffle per repeat): the same sequence of
    orders on every rank (the candidates' collectives must meet).
    ``sync`` (e.g. a barrier, or a CPU-clock marker) is called right before and right after each sample, outside the
    timed region: with a barrier, every rank starts a sample together and its time includes waiting for peers inside
    the sample's own collectives, but not the barrier itself.
    """
    steady_allocator()
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    cpu: dict[str, list[float]] = {k: [] for k in candidates}
    rng = random.Random(seed)
    fixed = os.environ.get("SYNCNORM_BENCH_FIXED_ORDER", "") not in ("", "0")
    names = list(candidates)
    for _ in range(repeats):
        if not fixed:
            rng.shuffle(names)
        for name in names:
            fn = candidates[name]
            if sync:
                sync()
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - t0) * 1e3
            cpu[name].append((time.process_time() - c0) * 1e3)
            if sync:
                sync()
            samples[name].append(elapsed)
    wall = {k: statistics.median(v) for k, v in samples.items()}
    return (wall, {k: statistics.median(v) for k, v in cpu.items()}) if cpu_times else wall


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """A closure running one forward and backward of ``layer`` on ``x``."""
    def run() -> None:
        xi = x.detach().requires_grad_(True)
        layer(xi).backward(grad)
    return run


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        out.append("| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in r) + " |")
    return "\n".join(out)
