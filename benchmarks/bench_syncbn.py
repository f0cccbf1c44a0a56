"""Per-layer forward+backward cost of syncnorm.SyncBatchNorm against nn.BatchNorm2d and the peers, at world 1 and 2.

Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_syncbn [--repeats 20]

Prints four tables (medians over interleaved repeats in a random order drawn at every repeat, one thread per rank,
glibc's malloc thresholds fixed: see :mod:`benchmarks._timing`):

1. world 1: SyncBatchNorm (its whole synchronising path runs; the all-reduce is a no-op at world 1) and the
   naive autograd design against nn.BatchNorm2d;
2. world 2 (gloo, CPU): the same, collectives included (``torch.distributed.all_reduce`` over gloo), plus
   SyncBatchNorm with the collective skipped (a switch of this benchmark only); a barrier before and after each
   sample aligns the ranks (its own cost is outside the timed region);
3. world 2 again for the smallest shape, timed as blocks of 20 back-to-back calls (no barrier between the calls of
   a block), the way a layer runs inside a training step;
4. bytes each rank sends per layer for W = 2..1024: syncnorm's one all-reduce per direction against torch's
   all_gather design (computed from the algorithms; the payload sizes are the ones the collective ledger records).

Peers: ``torch.nn.SyncBatchNorm`` refuses CPU input (checked below, the error is printed), so on CPU the peer is the
naive design used by detectron2's ``NaiveSyncBatchNorm`` (differentiable all-reduce of per-rank mean and mean of
squares), reimplemented here from its description.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn

import syncnorm
from benchmarks._timing import fwd_bwd, machine_line, markdown_table, time_interleaved

SHAPES = [(8, 64, 56, 56), (2, 256, 64, 64), (4, 1024, 14, 14), (2, 64, 8, 8)]


class NaiveSyncBN(nn.BatchNorm2d):
    """The naive design: all-reduce [mean, mean(x^2)] through autograd, average over ranks (equal batches only)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        import torch.distributed as dist
        import torch.distributed.nn.functional as dnnf

        C = x.shape[1]
        mean = x.mean(dim=(0, 2, 3))
        meansqr = (x * x).mean(dim=(0, 2, 3))
        vec = torch.cat([mean, meansqr])
        if dist.is_initialized() and dist.get_world_size() > 1:
            vec = dnnf.all_reduce(vec) / dist.get_world_size()
        mean, meansqr = vec[:C], vec[C:]
        var = meansqr - mean * mean
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach(), self.momentum)
        invstd = torch.rsqrt(var + self.eps)
        scale = self.weight * invstd
        shift = self.bias - mean * scale
        return x * scale.view(1, C, 1, 1) + shift.view(1, C, 1, 1)


def _candidates(shape, skip_collective: bool = False):
    torch.manual_seed(0)
    x = torch.randn(shape)
    g = torch.randn(shape)
    C = shape[1]
    cands = {
        "nn.BatchNorm2d": fwd_bwd(nn.BatchNorm2d(C), x, g),
        "syncnorm.SyncBatchNorm": fwd_bwd(syncnorm.SyncBatchNorm(C), x, g),
        "naive autograd SyncBN": fwd_bwd(NaiveSyncBN(C), x, g),
    }
    if skip_collective:
        fn = fwd_bwd(syncnorm.SyncBatchNorm(C), x, g)

        def no_collective():
            # everything but the exchange: comm.all_reduce_sum (the statistics path's one collective) replaced by
            # a no-op for this candidate only
            orig = syncnorm.comm.all_reduce_sum
            syncnorm.comm.all_reduce_sum = lambda t, group=None: t
            try:
                fn()
            finally:
                syncnorm.comm.all_reduce_sum = orig

        cands["SyncBatchNorm, collective skipped"] = no_collective
    return cands


def _time_shapes(repeats: int, skip_collective: bool, sync=None) -> dict:
    torch.set_num_threads(1)
    out = {}
    for shape in SHAPES:
        n = repeats if shape[0] * shape[2] > 16 else repeats * 5
        out[shape] = time_interleaved(_candidates(shape, skip_collective), repeats=n, sync=sync)
    return out


def _world_worker(rank: int, world: int, repeats: int) -> dict:
    # a barrier before and after every sample: each rank's time starts together and includes waiting for the peer
    out = _time_shapes(repeats, skip_collective=True, sync=syncnorm.comm.barrier)
    out["torch.nn.SyncBatchNorm"] = torch_syncbn_on_cpu()
    # the floor set by the backend: one bare all-reduce of a forward-sized vector (C = 256), barrier-aligned
    vec = torch.zeros(2 * 256 + 2, dtype=torch.float64)
    import torch.distributed as dist

    out["all_reduce_ms"] = time_interleaved({"gloo": lambda: dist.all_reduce(vec)}, repeats=repeats * 5,
                                            sync=syncnorm.comm.barrier)
    # the smallest layer again, BACK_TO_BACK calls per sample with no barrier in between (as inside a training
    # step, where the ranks are already aligned by the previous layer's collectives): the per-call barrier above
    # leaves caches cold, which weighs most on a layer this small
    small = SHAPES[-1]
    blocks = {name: _back_to_back(fn) for name, fn in _candidates(small, skip_collective=True).items()
              if name in BACK_TO_BACK_NAMES}
    out["back_to_back"] = {k: v / BACK_TO_BACK for k, v in
                           time_interleaved(blocks, repeats=repeats * 2, sync=syncnorm.comm.barrier).items()}
    return out


BACK_TO_BACK = 20
BACK_TO_BACK_NAMES = ("nn.BatchNorm2d", "syncnorm.SyncBatchNorm", "SyncBatchNorm, collective skipped")


def _back_to_back(fn):
    def run() -> None:
        for _ in range(BACK_TO_BACK):
            fn()
    return run


def _ratio_rows(timings: dict, names: list[str]) -> list[list[object]]:
    rows = []
    for shape, t in timings.items():
        base = t["nn.BatchNorm2d"]
        rows.append([str(shape), base] + [t[n] / base for n in names])
    return rows


def bytes_table(channels: int = 256) -> str:
    C = channels
    ours_fwd = (2 * C + 2) * 8  # fp64 [n, flag, S1, S2]
    ours_bwd = 2 * C * 8  # fp64 [sum dy, sum dy*xhat]
    torch_fwd = (2 * C + 1) * 4  # fp32 [mean, invstd, count] gathered from every rank
    torch_bwd = 2 * C * 4
    rows = []
    for W in (2, 8, 64, 256, 1024):
        ring_ours = 2 * (W - 1) / W * (ours_fwd + ours_bwd)  # ring all-reduce sends 2(W-1)/W of the payload
        ring_torch = (W - 1) * torch_fwd + 2 * (W - 1) / W * torch_bwd  # ring all-gather sends (W-1) chunks
        rows.append([W, ours_fwd + ours_bwd, f"{ring_ours / 1024:.1f}", W * torch_fwd + torch_bwd,
                     f"{ring_torch / 1024:.1f}"])
    return markdown_table(
        ["W", "syncnorm payload B/layer", "syncnorm ring KiB sent/rank", "torch all_gather B received/rank",
         "torch ring KiB sent/rank"], rows)


def torch_syncbn_on_cpu() -> str:
    layer = nn.SyncBatchNorm(4)
    try:
        layer(torch.randn(2, 4, 3, 3)).sum().backward()
    except Exception as e:  # noqa: BLE001 - we report whatever torch says
        return f"refuses CPU input: {type(e).__name__}: {str(e).splitlines()[0]}"
    return "ran on CPU (unexpected: compare it too)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-world2", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    print(f"machine: {machine_line()}\n")

    names = ["syncnorm.SyncBatchNorm", "naive autograd SyncBN"]
    w1 = _time_shapes(args.repeats, skip_collective=False)
    print("## World 1: forward+backward, ratio to nn.BatchNorm2d (median ms of nn.BatchNorm2d in column 2)\n")
    print(markdown_table(["shape", "nn.BatchNorm2d ms"] + names, _ratio_rows(w1, names)))

    if not args.skip_world2:
        from tests.dist.harness import run_distributed

        res = run_distributed(_world_worker, 2, args.repeats, timeout=900)
        print(f"\ntorch.nn.SyncBatchNorm in a 2-rank gloo world: {res[0]['torch.nn.SyncBatchNorm']}")
        lat0, lat1 = res[0]["all_reduce_ms"], res[1]["all_reduce_ms"]
        print("one bare all_reduce of 514 fp64 values (the latency floor; the layer issues two per forward+backward): "
              + ", ".join(f"{k} {lat0[k]:.3f} ms (rank 1: {lat1[k]:.3f} ms)" for k in lat0))
        names2 = names + ["SyncBatchNorm, collective skipped"]
        print("\n## World 2 (gloo, CPU, 1 thread/rank): forward+backward, ratio to nn.BatchNorm2d on the same local "
              "shape, collectives included (rank 0; rank 1 in parentheses)\n")
        rows = []
        for shape in SHAPES:
            t0, t1 = res[0][shape], res[1][shape]
            rows.append([str(shape), t0["nn.BatchNorm2d"]] + [
                f"{t0[n] / t0['nn.BatchNorm2d']:.2f} ({t1[n] / t1['nn.BatchNorm2d']:.2f})" for n in names2])
        print(markdown_table(["local shape", "nn.BatchNorm2d ms"] + names2, rows))
        b0, b1 = res[0]["back_to_back"], res[1]["back_to_back"]
        print(f"\n## World 2, {SHAPES[-1]}: {BACK_TO_BACK} back-to-back forward+backward per sample (a barrier "
              "before and after each block of calls, none between them), ratio to nn.BatchNorm2d (rank 0; rank 1 "
              "in parentheses)\n")
        names3 = [n for n in BACK_TO_BACK_NAMES if n != "nn.BatchNorm2d"]
        print(markdown_table(["local shape", "nn.BatchNorm2d ms per call"] + names3, [[str(SHAPES[-1]), b0[
            "nn.BatchNorm2d"]] + [f"{b0[n] / b0['nn.BatchNorm2d']:.2f} ({b1[n] / b1['nn.BatchNorm2d']:.2f})"
                                  for n in names3]]))

    print("\n## Bytes per rank per layer (C = 256, forward + backward)\n")
    print(bytes_table(256))


if __name__ == "__main__":
    main()
