"""Cost of CrossIterationBatchNorm and CrossMiniBatchNorm in a small-ResNet training step, against SyncBatchNorm.

Run from the repository root (default: CIFAR ResNet-20, per-rank batches 8 and 32 of 32x32 images):

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_cross_iteration [--model resnet20|resnet18|both]
        [--repeats 15] [--configs 8x32,32x32]

Models (10 classes):

* ``resnet20`` (default): the CIFAR ResNet-20 of He et al. 2016, section 4.2, defined below: a 3x3 conv with 16
  filters, then 3 stages of 3 basic blocks (two 3x3 convs each) with 16, 32 and 64 filters on 32x32, 16x16 and 8x8
  maps (the first conv of stages 2 and 3 has stride 2), BatchNorm2d after every conv, global average pooling and a
  linear layer; parameter-free "option A" shortcuts (stride-2 subsampling and zero-padded channels), so every
  BatchNorm is fed directly by a conv. 0.27 M parameters.
* ``resnet18``: torchvision's resnet18 (11.2 M parameters). Its conv weights dominate at small image sizes, so it
  is the worst case for CrossIterationBatchNorm, whose extra work is weight-sized (see below). Default configs
  ``8x64,4x32``.

What is measured, on a 2-rank gloo world (CPU, one thread per rank), for the model whose every BatchNorm is
converted with ``syncnorm.convert`` to SyncBatchNorm, CrossIterationBatchNorm(window=4) (each layer attached to the
conv that feeds it, compensation on) or CrossMiniBatchNorm(accumulation_steps=4):

* **step time**: one full training step (zero_grad, forward, cross-entropy, backward with DDP's gradient
  all-reduce, SGD with momentum), ``DistributedDataParallel(forward_sync_buffers=False)``. Median over interleaved
  repeats (A, B, C, A, B, C, ...) after 3 warm-up steps each, with a barrier before and after each timed step;
  the reported time is rank 0's wall time. The timing world runs with glibc's default allocator settings, as
  training does. The process CPU time of rank 0 over the same steps (all its threads,
  gloo's included) is reported too: on a loaded machine it excludes the time spent waiting for a core, but it also
  excludes time blocked in collectives. With DDP's default buffer sync every buffer (CBN's history
  included) would also be broadcast each step; syncnorm layers keep identical buffers on every rank, so the
  broadcast is not needed.
* **peak memory**: the peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs) of rank 0 while
  building the model, DDP and optimizer and running 6 training steps, minus the RSS just before building it. The
  candidates run one after another in the same process, in a second 2-rank world started with glibc's mmap
  threshold pinned to 64 KiB (so freed memory goes back to the OS and the peaks are comparable; pinned, a step
  takes about twice as long, which is why the timing runs in a world of its own), and SyncBatchNorm is measured
  again at the end to show the noise of this measure.

CrossIterationBatchNorm's extra work per layer and step scales with the weight of the conv feeding it
(C_out * C_in * k * k): the weight-gradient statistics, the fp64 payload added to the forward all-reduce and a
window of weight-sized history. CrossMiniBatchNorm's extra work is an O(C) merge.

Prints to stdout: the command, machine, date, 1-minute load average at the start and end, the wall time of the
run, and one markdown table per (model, config) with ratios to SyncBatchNorm and the issue's targets
(CBN <= 1.3x time and <= 1.2x memory, CmBN <= 1.05x time). Writes no file.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import inspect
import os
import shlex
import statistics
import sys
import time

# The memory world runs with glibc's mmap threshold pinned to 64 KiB, so freed tensors go back to the OS and each
# candidate's peak RSS is comparable. The timing world runs with glibc's default (dynamic) threshold, as training
# does: pinned, every allocation above 64 KiB is an mmap/munmap pair with fresh page faults, which made a step
# ~1.9x slower here and diluted the ratios between candidates.
MEMORY_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._timing import machine_line, markdown_table  # noqa: E402

CANDIDATES = {
    "SyncBatchNorm": ("sync", {}),
    "CrossIterationBatchNorm(window=4)": ("cross_iteration", {"window": 4}),
    "CrossMiniBatchNorm(accumulation_steps=4)": ("cross_minibatch", {"accumulation_steps": 4}),
}
CBN, CMBN = "CrossIterationBatchNorm(window=4)", "CrossMiniBatchNorm(accumulation_steps=4)"
TARGET_TIME = {CBN: 1.3, CMBN: 1.05}
TARGET_MEMORY = {CBN: 1.2}
DEFAULT_CONFIGS = {"resnet20": "8x32,32x32", "resnet18": "8x64,4x32"}
DEFAULT_REPEATS = 15
WARMUP = 3
MEMORY_STEPS = 6


# ---------------------------------------------------------------------------------------------------------------
# CIFAR ResNet-20 (He et al. 2016, section 4.2)
# ---------------------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus a parameter-free shortcut ("option A"), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad != 0:
            shortcut = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + shortcut)


class ResNetCIFAR(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3 stages of n basic blocks with widths 16, 32, 64; n=3 is ResNet-20."""

    def __init__(self, n: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, in_planes = [], 16
        for i, planes in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_model(name: str) -> nn.Module:
    if name == "resnet20":
        return ResNetCIFAR(n=3, num_classes=10)
    if name == "resnet18":
        import torchvision
        return torchvision.models.resnet18(num_classes=10)
    raise ValueError(f"bench_cross_iteration: model must be 'resnet20' or 'resnet18', got {name!r}")


# ---------------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------------
def _build(model_name: str, target: str, kwargs: dict):
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    import syncnorm

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = syncnorm.convert(make_model(model_name), target, **kwargs)
    for w in caught:
        if "compensation" in str(w.message):  # an unpaired CBN layer would make the CBN numbers meaningless
            raise RuntimeError(f"bench_cross_iteration: {model_name}: {w.message}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    # no buffer broadcast at each forward: syncnorm's layers keep identical buffers on every rank
    # (forward_sync_buffers replaces broadcast_buffers, deprecated since torch 2.13)
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        ddp = DistributedDataParallel(model, forward_sync_buffers=False)
    else:
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return ddp, opt


def _step_fn(ddp, opt, x, labels):
    def run() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), labels).backward()
        opt.step()
    return run


def _time_interleaved(steps: dict, repeats: int, sync) -> tuple[dict, dict]:
    """Median wall and process-CPU milliseconds per step of each candidate, timed interleaved."""
    for fn in steps.values():
        for _ in range(WARMUP):
            fn()
    wall: dict = {k: [] for k in steps}
    cpu: dict = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[name].append((time.perf_counter() - w0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _inputs(rank: int, batch: int, size: int):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, 3, size, size, generator=g)
    return x, torch.randint(0, 10, (batch,), generator=g)


def _time_worker(rank: int, world: int, runs: list, repeats: int) -> dict:
    from syncnorm import comm

    torch.set_num_threads(1)
    out: dict = {"malloc": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")}
    for model_name, batch, size in runs:
        x, labels = _inputs(rank, batch, size)
        # all candidates alive, interleaved
        built = {name: _build(model_name, *spec) for name, spec in CANDIDATES.items()}
        steps = {name: _step_fn(ddp, opt, x, labels) for name, (ddp, opt) in built.items()}
        wall, cpu = _time_interleaved(steps, repeats, comm.barrier)
        del built, steps
        out[(model_name, batch, size)] = {"wall": wall, "cpu": cpu}
    return out


def _memory_worker(rank: int, world: int, runs: list) -> dict:
    from syncnorm import comm

    torch.set_num_threads(1)
    out: dict = {"malloc": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")}
    for model_name, batch, size in runs:
        x, labels = _inputs(rank, batch, size)
        # a fresh process's first model + DDP + steps also pays one-time costs (oneDNN's generated kernels, gloo's
        # buffers, allocator arenas): run every candidate once, unmeasured, so that none of them is charged for it
        for spec in CANDIDATES.values():
            ddp, opt = _build(model_name, *spec)
            step = _step_fn(ddp, opt, x, labels)
            for _ in range(WARMUP):
                step()
            del ddp, opt, step
        # then one candidate at a time
        mem = {}
        for name in list(CANDIDATES) + ["SyncBatchNorm (again)"]:
            spec = CANDIDATES[name.replace(" (again)", "")]
            comm.barrier()
            _reset_peak()
            base = _rss_bytes()
            ddp, opt = _build(model_name, *spec)
            step = _step_fn(ddp, opt, x, labels)
            for _ in range(MEMORY_STEPS):
                step()
            mem[name] = (_peak_rss_bytes() - base) / 2**20
            del ddp, opt, step
        out[(model_name, batch, size)] = mem
    return out


def _set_env(values: dict) -> None:
    for k, v in values.items():  # None: unset
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _run_world(worker, env: dict, *args) -> list:
    # a 2-rank world whose ranks start with `env` applied to this process's environment (malloc reads it at start)
    from tests.dist.harness import run_distributed

    saved = {k: os.environ.get(k) for k in env}
    try:
        _set_env(env)
        return run_distributed(worker, 2, *args, timeout=3600, pg_timeout=900)
    finally:
        _set_env(saved)


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def _verdict(name: str, t_ratio: float, m_ratio: float) -> str:
    parts = []
    if name in TARGET_TIME:
        ok = t_ratio <= TARGET_TIME[name]
        parts.append(f"time <= {TARGET_TIME[name]}x {'met' if ok else 'MISSED'}")
    if name in TARGET_MEMORY:
        ok = m_ratio <= TARGET_MEMORY[name]
        parts.append(f"memory <= {TARGET_MEMORY[name]}x {'met' if ok else 'MISSED'}")
    return "; ".join(parts) if parts else "-"


def _table(res: dict) -> str:
    wall, cpu, mem = res["wall"], res["cpu"], res["memory"]
    bw, bc, bm = wall["SyncBatchNorm"], cpu["SyncBatchNorm"], mem["SyncBatchNorm"]
    rows = []
    for name in list(CANDIDATES) + ["SyncBatchNorm (again)"]:
        m = mem[name]
        if name in wall:
            t, c = wall[name], cpu[name]
            rows.append([name, f"{t:.1f}", f"{t / bw:.2f}x", f"{c:.1f}", f"{c / bc:.2f}x", f"{m:.1f}",
                         f"{m / bm:.2f}x", _verdict(name, t / bw, m / bm)])
        else:
            rows.append([name, "-", "-", "-", "-", f"{m:.1f}", f"{m / bm:.2f}x", "-"])
    return markdown_table(["norm layer", "step ms (median, wall)", "wall vs SyncBN", "step CPU ms (median)",
                           "CPU vs SyncBN", "peak MiB above baseline", "memory vs SyncBN", "targets"], rows)


def _parse_configs(text: str) -> list[tuple[int, int]]:
    try:
        configs = [tuple(int(v) for v in c.split("x")) for c in text.split(",")]
    except ValueError:
        configs = []
    if not configs or any(len(c) != 2 or min(c) < 1 for c in configs):
        raise argparse.ArgumentTypeError(f"--configs must look like 8x32,32x32 (batch x image size), got {text!r}")
    return configs  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["resnet20", "resnet18", "both"], default="resnet20",
                        help="model to measure (default resnet20; 'both' measures resnet20 then resnet18)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="interleaved timed steps per candidate")
    parser.add_argument("--configs", default=None,
                        help="comma-separated per-rank batch x image size, e.g. 8x32,32x32 (default per model: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_CONFIGS.items()) + ")")
    parser.add_argument("--timing-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run the timing world with MALLOC_MMAP_THRESHOLD_=BYTES instead of glibc's default "
                             "(65536 reproduces the method of the sessions before the fourth)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    models = ["resnet20", "resnet18"] if args.model == "both" else [args.model]
    try:
        runs = [(m, b, s) for m in models for b, s in _parse_configs(args.configs or DEFAULT_CONFIGS[m])]
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))

    argv_shown = sys.argv[1:] if argv is None else argv
    command = "OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_cross_iteration" + "".join(
        " " + shlex.quote(a) for a in argv_shown)
    load_before = os.getloadavg()
    start = time.perf_counter()
    threshold = None if args.timing_mmap_threshold is None else str(args.timing_mmap_threshold)
    timing = _run_world(_time_worker, {"MALLOC_MMAP_THRESHOLD_": threshold}, runs, args.repeats)[0]
    memory = _run_world(_memory_worker, MEMORY_MALLOC_ENV, runs)[0]
    elapsed = time.perf_counter() - start
    load_after = os.getloadavg()
    torch.set_num_threads(1)

    params = {m: sum(p.numel() for p in make_model(m).parameters()) for m in models}
    print("# CrossIterationBatchNorm / CrossMiniBatchNorm: training-step cost against SyncBatchNorm "
          "(world 2, gloo, CPU)\n")
    print(f"Command: `{command}`  ")
    print(f"Machine: {machine_line()}  ")
    print(f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}  ")
    print(f"Load average (1/5/15 min, {os.cpu_count()} cores): "
          + " / ".join(f"{v:.1f}" for v in load_before) + " at the start, "
          + " / ".join(f"{v:.1f}" for v in load_after) + " at the end  ")
    print(f"Wall time of the measurement: {elapsed:.0f} s\n")
    print(f"{args.repeats} interleaved timed steps per candidate after {WARMUP} warm-up steps; rank 0's medians. "
          f"Peak memory: rank 0's peak RSS while building model + DDP + optimizer and running {MEMORY_STEPS} steps, "
          "minus the RSS before. Targets (issue 4): CrossIterationBatchNorm <= 1.3x SyncBatchNorm time and <= 1.2x "
          "memory; CrossMiniBatchNorm <= 1.05x time. The 'targets' column judges wall time.  ")
    print(f"Two 2-rank worlds: timing with glibc's mmap threshold = {timing['malloc']}; memory with "
          f"MALLOC_MMAP_THRESHOLD_ = {memory['malloc']} (freed memory returns to the OS, so peaks are comparable).\n")
    for model_name, batch, size in runs:
        print(f"## {model_name} ({params[model_name] / 1e6:.2f} M parameters), per-rank batch {batch}, "
              f"{size}x{size} images\n")
        key = (model_name, batch, size)
        print(_table({**timing[key], "memory": memory[key]}))
        print()


if __name__ == "__main__":
    main()
