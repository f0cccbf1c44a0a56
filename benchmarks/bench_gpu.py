"""One-run GPU benchmark of syncnorm's layers against native BatchNorm and torch's SyncBatchNorm kernels.

Run from the repository root (one NVIDIA GPU; finishes within ``--budget-s`` seconds plus one compile, 220 s default):

    .venv/bin/python -m benchmarks.bench_gpu [--device cuda|cpu] [--quick] [--sections layers,steps,compile,syncs]
        [--out FILE] [--budget-s 220]

Every figure printed is measured in this run (nothing is read from earlier results). Prints markdown tables to
stdout and writes the same text to ``--out`` (rewritten after every section, so a run killed half-way keeps what it
measured).

World: ``torch.distributed`` initialised in this process with one rank (NCCL on CUDA, gloo on CPU; MASTER_ADDR
127.0.0.1 and a free port). Candidates:

* ``native``: ``nn.BatchNorm2d`` (cuDNN on CUDA);
* ``torch-sync``: a subclass of ``torch.nn.SyncBatchNorm`` whose training forward calls
  ``torch.nn.modules._functions.SyncBatchNorm.apply`` with world_size 1 on the 1-rank group, so torch's SyncBN
  kernels (batch_norm_stats, all_gather of the statistics, gather_stats_with_counts, backward_reduce, all_reduce of
  the sums, backward_elemt) run as they would on more ranks (``nn.SyncBatchNorm`` itself falls back to
  ``F.batch_norm`` at world 1). ``torch.nn.SyncBatchNorm`` refuses CPU input: "n/a (CPU)" there;
* ``sync`` / ``renorm`` / ``cross_minibatch`` / ``cross_iteration``: ``syncnorm.SyncBatchNorm``,
  ``BatchRenorm(r_max=3, d_max=5)``, ``CrossMiniBatchNorm(accumulation_steps=4)``,
  ``CrossIterationBatchNorm(window=4)``, on the same 1-rank group. ``syncnorm.comm.all_reduce_sum`` issues no
  collective at world 1, so this script replaces it (for this process only) by one that always calls the group's
  all-reduce (the functional collective while ``torch.compile`` traces): the syncnorm rows, like torch-sync, pay
  their real collectives on the 1-rank group.

Sections:

* ``layers``: one layer's forward+backward (``y = m(x); y.backward(dy)``, x requires grad) on the shapes below, in
  fp32 NCHW and in bf16 channels_last (bf16 *input* tensors, fp32 parameters and running statistics: what a layer
  receives under ``torch.autocast(dtype=torch.bfloat16)``, which leaves batch_norm's input dtype alone). Timed with
  CUDA events around a block of back-to-back calls; the median over repeats (candidates interleaved, in a new
  random order every repeat) divided by the block size. GB/s = (bytes of x read + y written + dy read + dx written)
  / time, the minimum traffic of a fused forward+backward (the kernels read x and dy more than once, so this is a
  lower bound of the real traffic). CrossIterationBatchNorm needs the conv that feeds it, so it is timed as a
  ``1x1 conv (C->C, no bias) + norm`` pair, and compared with the same pair around native BN and syncnorm's
  SyncBatchNorm (the ``conv+`` rows; their difference to ``conv+native`` is the norm's cost).
* ``steps``: one training step (zero_grad, forward, loss, backward, SGD with momentum): torchvision ResNet-50
  (weights=None), batch 32 of 224x224, channels_last, bf16 autocast; Faster R-CNN R50-FPN
  (``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, norm_layer=nn.BatchNorm2d,
  trainable_backbone_layers=5, min_size=640, max_size=800)``, so the 2 random 640x800 images are not resized and
  every BN trains), fp32, 3 random boxes per image as targets. Models converted with ``syncnorm.convert(model, to)``;
  ``torch-sync`` through ``nn.SyncBatchNorm.convert_sync_batchnorm`` and a class swap. Eager, timed with CUDA events
  per step, median over interleaved repeats after warm-up steps.
* ``compile``: the ResNet-50 step with ``torch.compile(model)`` (default mode: max-autotune does not compile within
  the time limit, and reduce-overhead's CUDA graphs would time a different thing per candidate). Each candidate in a
  try/except (an error is printed in its row) and skipped once the time budget is spent.
* ``syncs``: host synchronisations in one warm forward+backward of a layer and one warm training step, counted as
  the warnings of ``torch.cuda.set_sync_debug_mode("warn")`` (CUDA only).

``--quick`` shrinks everything (tiny shapes, 1-2 repeats, resnet18 at 64x64, a 128x160 Faster R-CNN, a tiny convnet
for compile) so the script's logic runs on a CPU in under a minute (``tests/test_bench_gpu.py``); on CPU times come
from ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

import syncnorm

ROOT = Path(__file__).resolve().parent.parent
SN_TARGETS = ("sync", "renorm", "cross_minibatch", "cross_iteration")
SN_KWARGS = {"sync": {}, "renorm": {"r_max": 3.0, "d_max": 5.0}, "cross_minibatch": {"accumulation_steps": 4},
             "cross_iteration": {"window": 4}}
LAYER_SHAPES = [(32, 64, 112, 112), (2, 256, 200, 304), (8, 256, 56, 56), (64, 2048, 7, 7), (2, 64, 8, 8)]
QUICK_SHAPES = [(4, 8, 8, 8), (2, 16, 6, 6)]


# ---------------------------------------------------------------------------------------------------------- output
class Report:
    """Lines printed as they come and rewritten to ``path`` after each section."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def flush(self) -> None:
        if self.path:
            Path(self.path).write_text("\n".join(self.lines) + "\n")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self("| " + " | ".join(header) + " |")
        self("|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            self("| " + " | ".join(r) + " |")
        self()


def fmt_ms(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def ratio(v, ref) -> str:
    if isinstance(v, float) and isinstance(ref, float) and ref > 0:
        return f"{v / ref:.2f}"
    return "-"


def short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")
    return "error: " + (msg[:160] + "..." if len(msg) > 160 else msg)


# ---------------------------------------------------------------------------------------------------------- world
def init_world(device: torch.device):
    if dist.is_initialized():
        return dist.group.WORLD
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    try:
        dist.init_process_group(backend, rank=0, world_size=1, **kwargs)
    except TypeError:  # a torch without device_id
        dist.init_process_group(backend, rank=0, world_size=1)
    return dist.group.WORLD


def always_all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """``syncnorm.comm.all_reduce_sum`` without its world-1 shortcut: the collective is issued on the 1-rank group."""
    group = dist.group.WORLD if group is None else group
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", group))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


# ---------------------------------------------------------------------------------------------------------- torch SyncBN forced
_TorchSyncFn = torch.nn.modules._functions.SyncBatchNorm
_TORCH_SYNC_PARAMS = [p for p in list(inspect.signature(_TorchSyncFn.forward).parameters.values())[1:]]


def torch_sync_apply(**values):
    """``_functions.SyncBatchNorm.apply`` with its arguments matched by name to this torch's signature."""
    args = []
    for p in _TORCH_SYNC_PARAMS:
        if p.name in values:
            args.append(values[p.name])
        elif p.default is not inspect.Parameter.empty:
            args.append(p.default)
        else:
            raise TypeError(f"torch's SyncBatchNorm.forward has an unknown parameter {p.name!r} "
                            f"(signature {[q.name for q in _TORCH_SYNC_PARAMS]})")
    return _TorchSyncFn.apply(*args)


class TorchSyncKernels(nn.SyncBatchNorm):
    """nn.SyncBatchNorm that always takes torch's synchronised path, world_size 1 included."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return torch_sync_apply(input=input, weight=self.weight, bias=self.bias, running_mean=self.running_mean,
                                running_var=self.running_var, eps=self.eps, momentum=factor, process_group=group,
                                world_size=dist.get_world_size(group))


def to_torch_sync(model: nn.Module) -> nn.Module:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = TorchSyncKernels
    return model


def convert_model(model: nn.Module, name: str) -> nn.Module:
    model = copy.deepcopy(model)
    if name == "native":
        return model
    if name == "torch-sync":
        return to_torch_sync(model)
    return syncnorm.convert(model, name, **SN_KWARGS[name])


def make_norm(name: str, c: int, device) -> nn.Module:
    if name == "native":
        return nn.BatchNorm2d(c, device=device)
    if name == "torch-sync":
        return TorchSyncKernels(c, device=device)
    cls = {"sync": syncnorm.SyncBatchNorm, "renorm": syncnorm.BatchRenorm,
           "cross_minibatch": syncnorm.CrossMiniBatchNorm, "cross_iteration": syncnorm.CrossIterationBatchNorm}[name]
    return cls(c, device=device, **SN_KWARGS[name])


# ---------------------------------------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object], inner: int = 1) -> float:
        """Milliseconds per call of ``fn``, over a block of ``inner`` back-to-back calls."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / inner


def interleaved(timer: Timer, fns: dict, repeats: int, inner: int, warmup: int, seed: int = 0) -> dict:
    """{name: median ms or error string}; each candidate warmed up, then timed in a shuffled order per repeat."""
    out, ok = {}, {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            timer.sync()
            ok[name] = fn
        except Exception as e:  # noqa: BLE001 - reported in the table
            out[name] = short_error(e)
    samples = {n: [] for n in ok}
    rng = random.Random(seed)
    order = list(ok)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            if name in out:
                continue
            try:
                samples[name].append(timer.time(ok[name], inner))
            except Exception as e:  # noqa: BLE001
                out[name] = short_error(e)
    for name, s in samples.items():
        if name not in out:
            out[name] = float(statistics.median(s))
    return out


class Budget:
    def __init__(self, total_s: float):
        self.t0 = time.perf_counter()
        self.total = total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()


# ---------------------------------------------------------------------------------------------------------- layers
def layer_candidates(device) -> list[str]:
    return ["native", "torch-sync", "sync", "renorm", "cross_minibatch"]


def section_layers(rep: Report, device, timer: Timer, quick: bool, budget: Budget, deadline: float) -> None:
    rep("## Layers: forward+backward of one layer")
    rep()
    clock = "CUDA events" if device.type == "cuda" else "time.perf_counter"
    rep(f"ms = median time per call ({clock} around a block of calls); GB/s = (x + y + dy + dx bytes) / time; "
        "x native / x torch-sync = time ratios (lower is faster than the reference). `conv+` rows: 1x1 conv "
        "(no bias, C->C) followed by the norm, forward+backward of the pair.")
    rep()
    shapes = QUICK_SHAPES if quick else LAYER_SHAPES
    repeats, inner, warmup = (2, 1, 1) if quick else (7, 10, 5)  # 5 warm-up calls fill the CBN window
    norms = layer_candidates(device)
    pairs = ["conv+native", "conv+sync", "conv+cross_iteration"]
    header = ["shape", "dtype/layout", "candidate", "ms", "GB/s", "x native", "x torch-sync"]
    for mode in ("fp32 NCHW", "bf16 channels_last"):
        rows = []
        for shape in shapes:
            if budget.elapsed() > deadline:
                rows.append([str(shape), mode, "all", "skipped: time budget", "", "", ""])
                continue
            dtype = torch.float32 if mode.startswith("fp32") else torch.bfloat16
            fmt = torch.contiguous_format if mode.endswith("NCHW") else torch.channels_last
            torch.manual_seed(0)
            x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_(True)
            dy = torch.randn(shape, device=device, dtype=dtype).to(memory_format=fmt)
            nbytes = 4 * x.numel() * x.element_size()
            fns, na = {}, {}
            for name in norms:
                if name == "torch-sync" and device.type != "cuda":
                    na[name] = "n/a (CPU)"
                    continue
                try:
                    m = make_norm(name, shape[1], device).train()
                except Exception as e:  # noqa: BLE001
                    na[name] = short_error(e)
                    continue

                def fn(m=m):
                    x.grad = None
                    m(x).backward(dy)
                fns[name] = fn
            for pname in pairs:
                try:
                    conv = nn.Conv2d(shape[1], shape[1], 1, bias=False, device=device).to(memory_format=fmt)
                    norm = make_norm(pname.split("+", 1)[1], shape[1], device).train()
                    if isinstance(norm, syncnorm.CrossIterationBatchNorm):
                        norm.attach(conv)
                except Exception as e:  # noqa: BLE001
                    na[pname] = short_error(e)
                    continue

                def pfn(conv=conv, norm=norm, dtype=dtype):
                    x.grad = None
                    conv.weight.grad = None
                    if dtype == torch.bfloat16:
                        with torch.autocast(device.type, dtype=torch.bfloat16):
                            y = norm(conv(x))
                    else:
                        y = norm(conv(x))
                    y.backward(dy)
                fns[pname] = pfn
            res = interleaved(timer, fns, repeats, inner, warmup)
            res.update(na)
            ref_n, ref_t = res.get("native"), res.get("torch-sync")
            ref_cn = res.get("conv+native")
            for name in norms + pairs:
                v = res.get(name, "-")
                bw = f"{nbytes / (v * 1e-3) / 1e9:.3g}" if isinstance(v, float) and not name.startswith("conv") else "-"
                rows.append([str(shape), mode, name, fmt_ms(v), bw,
                             ratio(v, ref_cn if name.startswith("conv") else ref_n),
                             "-" if name.startswith("conv") else ratio(v, ref_t)])
            del x, dy, fns
        rep(f"### {mode}" + ("" if mode.startswith("fp32") else " (bf16 input tensors, fp32 parameters)"))
        rep()
        rep.table(header, rows)
    rep("`conv+` rows: `x native` is the ratio to `conv+native`.")
    rep()


# ---------------------------------------------------------------------------------------------------------- models
def resnet_setup(quick: bool, device):
    import torchvision

    if quick:
        model, batch, size = torchvision.models.resnet18(weights=None, num_classes=10), 4, 32
    else:
        model, batch, size = torchvision.models.resnet50(weights=None), 32, 224
    model = model.to(device).to(memory_format=torch.channels_last).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    desc = f"{'resnet18' if quick else 'resnet50'} batch {batch} {size}x{size} bf16 autocast channels_last"
    return model, (x, y), desc


def resnet_step_fn(model, data, device, compiled=None):
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    fwd = compiled if compiled is not None else model
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(fwd(x).float(), y)
        loss.backward()
        opt.step()
    return step


def frcnn_setup(quick: bool, device):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    h, w = (64, 80) if quick else (640, 800)
    # --quick: fewer proposals and sampled RoIs (torchvision's box head dominates a tiny image's step on a CPU)
    small = dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, box_batch_size_per_image=32,
                 rpn_batch_size_per_image=32, num_classes=5) if quick else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Changing trainable_backbone_layers has no effect ..." (all 5 train anyway)
        model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, norm_layer=nn.BatchNorm2d,
                                        trainable_backbone_layers=5, min_size=h, max_size=w, **small)
    model = model.to(device).train()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g).to(device) for _ in range(2)]
    targets = []
    for _ in range(2):
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 8 + torch.rand(3, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, 5, (3,), generator=g).to(device)})
    return model, (images, targets), f"Faster R-CNN R50-FPN, 2 images {h}x{w}, fp32" + (
        ", 50 proposals, 32 RoIs/image" if quick else "")


def frcnn_step_fn(model, data, device, compiled=None):
    images, targets = data
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        losses = model(images, targets)
        sum(losses.values()).backward()
        opt.step()
    return step


def step_candidates(device) -> list[str]:
    return ["native", "torch-sync", *SN_TARGETS]


def time_steps(rep, device, timer, quick, budget, deadline, setup, step_fn, title):
    base, data, desc = setup(quick, device)
    rep(f"### {title}: {desc}")
    rep()
    steps, res = {}, {}
    for name in step_candidates(device):
        if name == "torch-sync" and device.type != "cuda":
            res[name] = "n/a (CPU)"
            continue
        if budget.elapsed() > deadline:
            res[name] = "skipped: time budget"
            continue
        try:
            steps[name] = step_fn(convert_model(base, name), data, device)
        except Exception as e:  # noqa: BLE001
            res[name] = short_error(e)
    repeats, warmup = (1, 1) if quick else (8, 3)
    res.update(interleaved(timer, steps, repeats, 1, warmup))
    rows = []
    for name in step_candidates(device):
        v = res.get(name, "-")
        rows.append([name, fmt_ms(v), ratio(v, res.get("native")), ratio(v, res.get("torch-sync"))])
    rep.table(["candidate", "ms / step", "x native", "x torch-sync"], rows)
    del steps, base


def section_steps(rep, device, timer, quick, budget, deadline) -> None:
    rep("## Training steps, eager")
    rep()
    rep("ms / step = median over interleaved repeats of one step (zero_grad, forward, loss, backward, SGD momentum), "
        "after warm-up steps. cudnn.benchmark on for every candidate.")
    rep()
    time_steps(rep, device, timer, quick, budget, deadline, resnet_setup, resnet_step_fn, "ResNet")
    if budget.elapsed() > deadline:
        rep("### Faster R-CNN: skipped: time budget")
        rep()
        return
    time_steps(rep, device, timer, quick, budget, deadline, frcnn_setup, frcnn_step_fn, "Faster R-CNN")


def tiny_convnet():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def section_compile(rep, device, timer, quick, budget, deadline) -> None:
    rep("## Training steps, torch.compile (default mode)")
    rep()
    if quick:
        base = tiny_convnet().to(device).to(memory_format=torch.channels_last).train()
        x = torch.randn(4, 3, 16, 16, device=device).to(memory_format=torch.channels_last)
        data, desc = (x, torch.randint(0, 10, (4,), device=device)), "tiny convnet batch 4 16x16"
        names = ["native", "sync"]
    else:
        base, data, desc = resnet_setup(False, device)
        names = ["native", "sync", "cross_minibatch", "renorm", "torch-sync", "cross_iteration"]
    rep(f"### {desc}, bf16 autocast, channels_last")
    rep()
    rep("compile s = wall time of the first two steps (compiling forward and backward); ms / step = median of the "
        "steps after them. Candidates compiled one after another; skipped when the time left is shorter than the "
        "longest compile so far (or than 60 s before the first).")
    rep()
    rows, res = [], {}
    longest = 0.0
    repeats = 1 if quick else 10
    for name in names:
        if name == "torch-sync" and device.type != "cuda":
            rows.append([name, "n/a (CPU)", "-", "-", "-"])
            continue
        left = deadline - budget.elapsed()
        if left <= 0 or left < 1.1 * longest or (not quick and left < 60):
            res[name] = "skipped: time budget"
            rows.append([name, "skipped: time budget", "-", "-", "-"])
            continue
        try:
            torch._dynamo.reset()
            model = convert_model(base, name)
            step = resnet_step_fn(model, data, device, compiled=torch.compile(model))
            t0 = time.perf_counter()
            step()
            step()
            timer.sync()
            ctime = time.perf_counter() - t0
            longest = max(longest, ctime)
            res[name] = float(statistics.median(timer.time(step) for _ in range(repeats)))
            rows.append([name, fmt_ms(res[name]), f"{ctime:.1f}", None, None])
            del model, step
        except Exception as e:  # noqa: BLE001
            res[name] = short_error(e)
            rows.append([name, res[name], "-", "-", "-"])
    for r in rows:
        if r[3] is None:
            v = res[r[0]]
            r[3], r[4] = ratio(v, res.get("native")), ratio(v, res.get("torch-sync"))
    rep.table(["candidate", "ms / step", "compile s", "x native", "x torch-sync"], rows)


def count_syncs(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def section_syncs(rep, device, timer, quick, budget, deadline) -> None:
    rep("## Host synchronisations")
    rep()
    if device.type != "cuda":
        rep("n/a (CPU): counted with torch.cuda.set_sync_debug_mode, CUDA only.")
        rep()
        return
    rep('Warnings of `torch.cuda.set_sync_debug_mode("warn")` during one call, after 3 warm-up calls.')
    rep()
    probe = torch.ones(4, device=device)
    rep(f"Check of the counter: `t.sum().item()` counts {count_syncs(lambda: probe.sum().item())} (expected 1); "
        f"`t * 2` counts {count_syncs(lambda: probe * 2)} (expected 0).")
    rep()
    shape = (8, 256, 56, 56)
    x = torch.randn(shape, device=device, requires_grad=True)
    dy = torch.randn(shape, device=device)
    cols = {n: {} for n in step_candidates(device)}
    for name in layer_candidates(device):
        try:
            m = make_norm(name, shape[1], device).train()
            fn = lambda m=m: m(x).backward(dy)  # noqa: E731
            for _ in range(3):
                fn()
            cols[name]["layer"] = str(count_syncs(fn))
        except Exception as e:  # noqa: BLE001
            cols[name]["layer"] = short_error(e)
    try:
        conv = nn.Conv2d(shape[1], shape[1], 1, bias=False, device=device)
        m = make_norm("cross_iteration", shape[1], device).train().attach(conv)
        fn = lambda: m(conv(x)).backward(dy)  # noqa: E731
        for _ in range(5):
            fn()
        cols["cross_iteration"]["layer"] = str(count_syncs(fn)) + " (conv+norm)"
    except Exception as e:  # noqa: BLE001
        cols["cross_iteration"]["layer"] = short_error(e)
    for key, setup, step_fn in (("resnet", resnet_setup, resnet_step_fn), ("frcnn", frcnn_setup, frcnn_step_fn)):
        if budget.elapsed() > deadline:
            for n in cols:
                cols[n][key] = "skipped: time budget"
            continue
        base, data, _ = setup(quick, device)
        for name in cols:
            try:
                step = step_fn(convert_model(base, name), data, device)
                for _ in range(3):
                    step()
                cols[name][key] = str(count_syncs(step))
            except Exception as e:  # noqa: BLE001
                cols[name][key] = short_error(e)
        del base, data
    rows = [[n, c.get("layer", "-"), c.get("resnet", "-"), c.get("frcnn", "-")] for n, c in cols.items()]
    rep.table(["candidate", f"layer fwd+bwd {shape} fp32", "ResNet-50 step (bf16)", "Faster R-CNN step"], rows)


# ---------------------------------------------------------------------------------------------------------- main
def header(rep: Report, device, args) -> None:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "not installed"
    try:
        import torchvision
        tvv = torchvision.__version__
    except Exception:  # noqa: BLE001
        tvv = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "syncnorm", "benchmarks"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += " (+ uncommitted changes)" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        p = torch.cuda.get_device_properties(device)
        name += f", {p.total_memory / 2**30:.0f} GiB, cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}"
    else:
        from benchmarks._timing import machine_line
        name = "CPU: " + machine_line()
    rep("# syncnorm GPU benchmark" + (" (--quick: tiny shapes, smoke test only)" if args.quick else ""))
    rep()
    rep(f"- device: {name}")
    rep(f"- torch {torch.__version__}, torchvision {tvv}, triton {tv}, python {sys.version.split()[0]}")
    rep(f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S')}")
    rep(f"- git commit: {commit}")
    rep(f"- command: {' '.join([os.path.basename(sys.executable), '-m', 'benchmarks.bench_gpu', *sys.argv[1:]])}")
    rep(f"- world: 1 rank, {dist.get_backend()}; syncnorm's and torch-sync's collectives are issued on it")
    rep(f"- syncnorm kernels: {os.environ.get('SYNCNORM_KERNELS', 'default')}")
    rep("- All figures below were measured in this run; nothing is copied from earlier results.")
    rep()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", default="layers,steps,compile,syncs")
    parser.add_argument("--out", default=None)
    parser.add_argument("--budget-s", type=float, default=220.0)
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"layers", "steps", "compile", "syncs"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda but CUDA is not available")
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
        torch.backends.cudnn.benchmark = True
    rep = Report(args.out)
    init_world(device)
    syncnorm.comm.all_reduce_sum = always_all_reduce  # real collectives at world 1 (see the module docstring)
    header(rep, device, args)
    rep.flush()
    timer = Timer(device)
    # cumulative deadlines (fractions of the budget) for each section, in the order they run
    shares = {"layers": 0.25, "steps": 0.5, "syncs": 0.6, "compile": 1.0}
    order = [s for s in ("layers", "steps", "syncs", "compile") if s in sections]
    funcs = {"layers": section_layers, "steps": section_steps, "syncs": section_syncs, "compile": section_compile}
    for s in order:
        t0 = time.perf_counter()
        try:
            funcs[s](rep, device, timer, args.quick, budget, shares[s] * args.budget_s)
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
            rep(f"section {s} failed: {short_error(e)}")
            rep("```")
            for line in traceback.format_exc().splitlines()[-15:]:
                rep(line)
            rep("```")
            rep()
        rep(f"_section {s}: {time.perf_counter() - t0:.1f} s_")
        rep()
        rep.flush()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rep(f"Total wall time: {budget.elapsed():.1f} s (budget {args.budget_s:.0f} s).")
    rep.flush()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
