"""Shared timing helpers for the benchmark scripts: medians over repeats, interleaved candidates, 2-rank worlds.

Candidates are timed *interleaved* (A, B, A, B, ...) inside one process so that machine noise hits all of them
alike; ratios are taken from medians. Multi-rank timings run in a gloo world from ``tests/dist/harness.py`` (the
same harness the tests use), every rank timing the same candidates in lock-step.
"""

from __future__ import annotations

import os
import platform
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
                     sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median wall time in milliseconds of each candidate, timed interleaved ``repeats`` times.

    ``sync`` (e.g. a barrier, or a CPU-clock marker) is called right before and right after each sample, outside the
    timed region: with a barrier, every rank starts a sample together and its time includes waiting for peers inside
    the sample's own collectives, but not the barrier itself.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - t0) * 1e3
            if sync:
                sync()
            samples[name].append(elapsed)
    return {k: statistics.median(v) for k, v in samples.items()}


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
