"""Launched by tests/test_faults.py: train a converted net for a few DDP steps, then rank 1 dies.

    python -m syncnorm.launch --nproc-per-node 2 die_mid_training.py MODE OUT_DIR

MODE is how rank 1 dies once it has finished ``STEPS_BEFORE_DEATH`` SGD steps:

- ``sigkill``: ``os.kill(os.getpid(), signal.SIGKILL)``;
- ``exit0``: ``os._exit(0)``, an exit that launchers do not count as a failure.

The other ranks keep training. The first exception a survivor gets (from a collective whose peer is gone) is written
with its wall-clock time to ``OUT_DIR/survivor<RANK>.json`` and re-raised, so the job fails. Rank 1 writes the time
of its death to ``OUT_DIR/death.json`` just before dying, and each rank writes its pid to ``OUT_DIR/rank<RANK>.pid``
(the test kills leftovers by pid: torchrun starts its workers in sessions of their own).

The process group keeps init_distributed's default timeout of 1800 s, so a survivor that raises within the test's
60 s has detected the dead peer; it was not timed out. ``tests/test_faults.py`` also imports :func:`train` to run the
same loop under ``torch.multiprocessing`` spawn.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import syncnorm
from syncnorm import comm

MODES = ("sigkill", "exit0")
STEPS_BEFORE_DEATH = 3
DYING_RANK = 1
PG_TIMEOUT_S = 1800.0  # torch's default: far beyond the 60 s in which a survivor must raise
MAX_STEPS = 100_000  # a survivor never gets there: it blocks in a collective with the dead rank, then raises


def write_json(path: str, obj: dict) -> None:
    # complete before the next line runs (the dying rank kills itself right after): write, close, rename
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def build_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    return syncnorm.convert(net, "sync")


def wrap_ddp(model: nn.Module) -> DistributedDataParallel:
    # syncnorm's running statistics are identical on every rank: skip DDP's per-forward buffer broadcast.
    # torch >= 2.13 spells it forward_sync_buffers (broadcast_buffers is deprecated there, with a FutureWarning).
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DistributedDataParallel(model, forward_sync_buffers=False)
    return DistributedDataParallel(model, broadcast_buffers=False)


def die(mode: str, out_dir: str, step: int) -> None:
    write_json(os.path.join(out_dir, "death.json"),
               {"time": time.time(), "rank": comm.get_rank(), "step": step, "mode": mode, "pid": os.getpid()})
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "exit0":
        os._exit(0)
    raise AssertionError(f"rank {comm.get_rank()} is still alive after dying by {mode!r}")


def train(mode: str, out_dir: str, device: torch.device = torch.device("cpu")) -> None:
    """DDP training steps on the default process group; rank 1 dies after ``STEPS_BEFORE_DEATH`` of them."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rank = comm.get_rank()
    with open(os.path.join(out_dir, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    model = wrap_ddp(build_model().to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1 + rank)
    completed = 0
    try:
        for step in range(1, MAX_STEPS + 1):
            x = torch.randn(4, 3, 8, 8, generator=gen).to(device)
            target = torch.randint(0, 4, (4,), generator=gen).to(device)
            loss = F.cross_entropy(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            completed = step
            if rank == DYING_RANK and step == STEPS_BEFORE_DEATH:
                die(mode, out_dir, step)
    except Exception as exc:  # noqa: BLE001 - recorded, then re-raised
        write_json(os.path.join(out_dir, f"survivor{rank}.json"), {
            "time": time.time(), "rank": rank, "steps_completed": completed, "raised": True,
            "type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": str(exc)[:2000],
            "traceback": traceback.format_exc()[-6000:],
        })
        raise
    write_json(os.path.join(out_dir, f"survivor{rank}.json"),
               {"time": time.time(), "rank": rank, "steps_completed": completed, "raised": False})


if __name__ == "__main__":
    from syncnorm.launch import init_distributed

    mode, out_dir = sys.argv[1], sys.argv[2]
    train(mode, out_dir, init_distributed(timeout=PG_TIMEOUT_S))
