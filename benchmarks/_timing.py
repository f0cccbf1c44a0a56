"""Shared timing helpers for the benchmark scripts: medians over repeats, interleaved candidates, 2-rank worlds.

Candidates are timed *interleaved* inside one process so that machine noise hits all of them alike, in a new
random order at every repeat (the same order on every rank), so that no candidate always runs right after the
same neighbour: on a small layer a call's time depends on which code ran just before it (what is still in the
CPU's caches), by up to 10 %. Ratios are taken from medians. ``SYNCNORM_BENCH_FIXED_ORDER=1`` keeps the listed
order at every repeat instead (the method of the figures taken before the shuffle, to compare with them).

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


def time_interleaved(candidates: Mapping[str, Callable[[], object]], repeats: int = 20, warmup: int = 3,
                     sync: Callable[[], None] | None = None, seed: int = 0, cpu_times: bool = False):
    """Median wall time in milliseconds of each candidate, timed interleaved ``repeats`` times.

    Returns ``{name: ms}``; with ``cpu_times=True``, ``(wall, cpu)``: the same, and the median process CPU time
    (``time.process_time``) of the same samples.

    Each repeat runs every candidate once, in an order drawn from ``random.Random(seed)``: the same sequence of
    orders on every rank (the candidates' collectives must meet), a different order from one repeat to the next.
    ``sync`` (e.g. a barrier, or a CPU-clock marker) is called right before and right after each sample, outside the
    timed region: with a barrier, every rank starts a sample together and its time includes waiting for peers inside
    the sample's own collectives, but not the barrier itself.
    """
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
