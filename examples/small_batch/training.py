"""Data, model, norm methods and the DDP training loop of the small-batch study (runs inside each gloo rank).

Everything here is deterministic given a seed: the train/test split is fixed, the seed sets the initial weights and
the order of the batches, and every rank draws the same global batch and takes its own slice of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import syncnorm

# ---------------------------------------------------------------------------------------------------------- data

TEST_FRACTION = 0.3
SPLIT_SEED = 0  # the split is the same for every seed, so seeds vary only the init and the batch order


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits (1797 images, 10 classes, ships with sklearn): a stratified 70/30 train/test split.

    Images are scaled to [0, 1] and standardised with the *training* mean and std. Returns ``(x_train, y_train,
    x_test, y_test)`` with images of shape ``(N, 1, 8, 8)`` in float32.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_tr = (x_tr - mean) / std
    x_te = (x_te - mean) / std
    return (torch.from_numpy(x_tr).unsqueeze(1), torch.from_numpy(y_tr),
            torch.from_numpy(x_te).unsqueeze(1), torch.from_numpy(y_te))


def iid_batches(num_train: int, global_batch: int, iterations: int, generator: torch.Generator):
    """Yield ``iterations`` global batches of indices: epochs of a random permutation (the usual shuffled loader).

    An epoch's tail that does not fill a global batch is dropped, as ``drop_last=True`` does.
    """
    per_epoch = num_train // global_batch
    done = 0
    while done < iterations:
        perm = torch.randperm(num_train, generator=generator)
        for i in range(min(per_epoch, iterations - done)):
            yield perm[i * global_batch:(i + 1) * global_batch]
        done += per_epoch


def two_class_batches(labels: torch.Tensor, world_size: int, per_rank: int, iterations: int,
                      generator: torch.Generator):
    """Yield ``iterations`` non-i.i.d. global batches: each holds exactly 2 classes (the BRN paper's §4.3 setting).

    Each global batch of ``world_size * per_rank`` samples draws two distinct classes; ranks ``0, 2, 4, ...`` get
    ``per_rank`` samples of the first class and ranks ``1, 3, ...`` of the second. With per-rank batch 2 on 2 ranks,
    every rank's batch is a same-class pair (the paper's pairs of examples with the same label) and the global
    batch holds 2 classes. Samples of a class are drawn without replacement, reshuffled when exhausted.
    """
    classes = sorted(int(c) for c in labels.unique())
    pools = {c: torch.nonzero(labels == c).flatten() for c in classes}
    queues: dict[int, list[int]] = {c: [] for c in classes}

    def take(c: int, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if not queues[c]:
                queues[c] = pools[c][torch.randperm(len(pools[c]), generator=generator)].tolist()
            out.append(queues[c].pop())
        return out

    for _ in range(iterations):
        pick = torch.randperm(len(classes), generator=generator)[:2].tolist()
        pair = (classes[pick[0]], classes[pick[1]])
        idx: list[int] = []
        for r in range(world_size):
            idx.extend(take(pair[r % 2], per_rank))
        yield torch.tensor(idx)


# ---------------------------------------------------------------------------------------------------------- model

class DigitsNet(nn.Module):
    """Three conv-BN-ReLU blocks on 8x8 digits, global average pooling, one Linear (no norm after it).

    8x8 -> conv 3x3 (width) -> conv 3x3 stride 2 (2*width, 4x4) -> conv 3x3 (2*width, 4x4) -> pool -> Linear.
    Every norm layer sees at least 16 values per channel per sample, so per-rank batch 1 is valid for BatchNorm.
    Convs carry no bias (the norm that follows has one) and feed their norm directly, so
    ``syncnorm.convert(model, "cross_iteration")`` pairs each CBN with its conv.
    """

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        chans = [(1, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1)]
        layers: list[nn.Module] = []
        for c_in, c_out, stride in chans:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------------------- methods

@dataclasses.dataclass(frozen=True)
class Method:
    """One way to normalise: the ``syncnorm.convert`` target, its layer kwargs, and how training must drive it.

    ``accumulation``: micro-batches per optimizer step (gradient accumulation; DDP ``no_sync`` on all but the last).
    ``cmbn_reset``: call ``reset()`` on every CrossMiniBatchNorm at the start of each accumulation window.
    ``renorm_schedule``: drive BatchRenorm's r_max/d_max with the compressed paper ramp.
    ``cbn_burn_in_fraction``: CBN burn-in as a fraction of the run's optimizer steps (set_step counts those).
    """

    label: str
    convert_to: str
    layer_kwargs: tuple = ()
    accumulation: int = 1
    cmbn_reset: bool = False
    renorm_schedule: bool = False
    cbn_burn_in_fraction: float = 0.0
    description: str = ""


GROUPS = 8  # GroupNorm groups: 4 channels per group in the first block, 8 in the others

METHODS: dict[str, Method] = {m.label: m for m in [
    Method("BN", "batch", description="nn.BatchNorm2d: each rank normalises with its own batch"),
    Method("SyncBN", "sync", description="syncnorm.SyncBatchNorm: statistics of the global batch (both ranks)"),
    Method("SyncBN+acc4", "sync", accumulation=4,
           description="SyncBatchNorm with the same 4-micro-batch gradient accumulation as CmBN (control)"),
    Method("BRN", "renorm", renorm_schedule=True,
           description="syncnorm.BatchRenorm (global statistics), r_max/d_max on the compressed paper ramp"),
    Method("CBN", "cross_iteration", (("window", 4), ("compensate", True)), cbn_burn_in_fraction=0.05,
           description="syncnorm.CrossIterationBatchNorm, window 4, Taylor-compensated, burn-in 5% of steps"),
    Method("CBN-naive", "cross_iteration", (("window", 4), ("compensate", False)), cbn_burn_in_fraction=0.05,
           description="CrossIterationBatchNorm with compensate=False (plain average of the last 4 iterations)"),
    Method("CmBN", "cross_minibatch", accumulation=4, cmbn_reset=True,
           description="syncnorm.CrossMiniBatchNorm over 4 accumulated micro-batches (statistics global)"),
    Method("GN", "group", (("num_groups", GROUPS),),
           description=f"nn.GroupNorm with {GROUPS} groups (no batch statistics)"),
]}


def build_model(method: Method, width: int, total_steps: int) -> nn.Module:
    """A fresh DigitsNet converted to ``method``'s norm layers (before DDP wraps it)."""
    model = DigitsNet(width=width)
    kwargs = dict(method.layer_kwargs)
    if method.convert_to == "cross_iteration":
        kwargs["burn_in"] = int(round(method.cbn_burn_in_fraction * total_steps))
    if method.convert_to == "batch":
        return model
    model = syncnorm.convert(model, method.convert_to, **kwargs)
    if method.convert_to == "cross_iteration" and kwargs.get("compensate", True):
        unpaired = [n for n, m in model.named_modules()
                    if isinstance(m, syncnorm.CrossIterationBatchNorm) and m.paired_conv is None]
        if unpaired:  # the layer would silently fall back to naive averaging and the comparison would be void
            raise RuntimeError(f"convert left CrossIterationBatchNorm layers without a conv: {unpaired}")
    return model


def renorm_schedule(total_steps: int):
    """The BRN paper's r_max/d_max ramp compressed to a run of ``total_steps`` optimizer steps.

    The paper holds r_max=1, d_max=0 for 5k steps, then ramps (linearly here) to r_max=3 at 40k steps and d_max=5
    at 25k steps. We keep those breakpoints as fractions of a nominal 100k-step run: plain BN for the first 5% of
    the optimizer steps, d_max reaches 5 at 25% and r_max reaches 3 at 40%, both constant afterwards.
    """
    from syncnorm import schedules

    def at(fraction: float) -> int:
        return int(round(fraction * total_steps))

    return schedules.paper_renorm_schedule(start_step=at(0.05), r_max_step=at(0.40), d_max_step=at(0.25),
                                           r_max=3.0, d_max=5.0)


# ---------------------------------------------------------------------------------------------------------- training

@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run: a method at a per-rank batch size, one seed, i.i.d. or 2-class batches.

    Studies share runs: the same configuration (e.g. SyncBN at batch 2, i.i.d., seed 0) is trained once.
    """

    method: str
    per_rank_batch: int
    seed: int
    non_iid: bool = False
    epochs: float = 1.0
    steps: Optional[int] = None  # if set: this many micro-batches per rank, overriding epochs
    base_lr: float = 0.1  # at 32 samples per optimizer step; scaled linearly (see learning_rate)
    width: int = 32


def learning_rate(cfg: RunConfig, world_size: int) -> float:
    """Peak SGD learning rate by the linear scaling rule: base_lr x (samples per optimizer step) / 32."""
    samples = cfg.per_rank_batch * world_size * METHODS[cfg.method].accumulation
    return cfg.base_lr * samples / 32.0


def iterations_for(cfg: RunConfig, num_train: int, world_size: int) -> int:
    """Micro-batches per rank: ``epochs`` passes over the training split (same samples for every batch size),
    rounded up to whole accumulation windows."""
    acc = METHODS[cfg.method].accumulation
    if cfg.steps is not None:
        n = cfg.steps
    else:
        n = int(math.ceil(cfg.epochs * num_train / (cfg.per_rank_batch * world_size)))
    return max(acc, int(math.ceil(n / acc)) * acc)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    model.train()
    return float((pred == y).float().mean()) * 100.0


def train_one(cfg: RunConfig, data, rank: int, world_size: int) -> dict:
    """Train one configuration under DDP on this rank; return metrics (eval mode = running statistics)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    x_tr, y_tr, x_te, y_te = data
    method = METHODS[cfg.method]
    iterations = iterations_for(cfg, len(y_tr), world_size)
    acc = method.accumulation
    total_steps = iterations // acc
    torch.manual_seed(cfg.seed)
    model = build_model(method, cfg.width, total_steps)
    ddp = DDP(model) if world_size > 1 else model
    lr = learning_rate(cfg, world_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    warmup = max(1, total_steps // 20)

    def lr_factor(s: int) -> float:  # linear warm-up, then cosine to 0 at the last step
        return min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    cmbn = [m for m in model.modules() if isinstance(m, syncnorm.CrossMiniBatchNorm)] if method.cmbn_reset else []
    cbn = [m for m in model.modules() if isinstance(m, syncnorm.CrossIterationBatchNorm)]
    schedule = renorm_schedule(total_steps) if method.renorm_schedule else None

    gen = torch.Generator().manual_seed(10_000 + cfg.seed)  # same on every rank: all draw the same global batch
    b = cfg.per_rank_batch
    if cfg.non_iid:
        batches = two_class_batches(y_tr, world_size, b, iterations, gen)
    else:
        batches = iid_batches(len(y_tr), b * world_size, iterations, gen)

    step = 0
    losses: list[float] = []
    rmax_dmax = (1.0, 0.0)
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    for it, idx in enumerate(batches):
        pos = it % acc
        if pos == 0:
            for m in cmbn:
                m.reset()
        for m in cbn:
            if hasattr(m, "set_step"):
                m.set_step(step)
        if schedule is not None:
            rmax_dmax = syncnorm.schedules.apply_schedule(model, schedule, step)
        mine = idx[rank * b:(rank + 1) * b]
        last = pos == acc - 1
        ctx = ddp.no_sync() if (not last and world_size > 1) else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(ddp(x_tr[mine]), y_tr[mine])
            (loss / acc).backward()
        losses.append(loss.item())
        if last:
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tail = losses[-max(1, len(losses) // 10):]
    return {
        **dataclasses.asdict(cfg),
        "world_size": world_size,
        "iterations": iterations,
        "optimizer_steps": step,
        "lr": lr,
        "final_train_loss": float(np.mean(tail)),
        "loss_is_finite": bool(np.isfinite(losses).all()),
        "test_acc": _accuracy(model, x_te, y_te),
        # eval-mode accuracy on the training split tells a train/inference mismatch from overfitting (rank 0 only)
        "train_acc": _accuracy(model, x_tr, y_tr) if rank == 0 else None,
        "final_r_max_d_max": rmax_dmax if schedule is not None else None,
        "wall_s": wall,
        "cpu_s": cpu,  # this rank's CPU time: less sensitive than wall time to other load on the machine
    }


def rank_worker(rank: int, world_size: int, configs: list[RunConfig], data=None, verbose: bool = True,
                progress_path: Optional[str] = None) -> list[dict]:
    """Run every configuration in order inside one gloo world (spawning a world costs ~7 s or more).

    ``data`` is :func:`load_digits_split`'s output (loaded here if None; the launcher passes it so that the ranks
    need not import sklearn). Rank 0 prints one line per run and, if ``progress_path`` is given, appends each
    result to it as a JSON line (so an interrupted invocation keeps what it finished).
    """
    import json

    torch.set_num_threads(1)
    if data is None:
        data = load_digits_split()
    results = []
    for i, cfg in enumerate(configs):
        res = train_one(cfg, data, rank, world_size)
        results.append(res)
        if verbose and rank == 0:
            tag = "non-iid" if cfg.non_iid else "iid"
            print(f"[{i + 1}/{len(configs)}] {cfg.method:11s} b={cfg.per_rank_batch:<2d} {tag:7s} "
                  f"seed={cfg.seed} test_acc={res['test_acc']:.2f}% iters={res['iterations']} "
                  f"{res['wall_s']:.1f}s wall {res['cpu_s']:.1f}s cpu", flush=True)
        if progress_path is not None and rank == 0:
            with open(progress_path, "a") as f:
                f.write(json.dumps(res) + "\n")
    return results
