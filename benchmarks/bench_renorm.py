"""Cost of Batch Renormalization: forward + backward time of BatchRenorm against SyncBatchNorm and nn.BatchNorm2d.

Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_renorm [--repeats N] [--out benchmarks/results/renorm.md]

For each shape and world size (1, and 2 gloo ranks on CPU, one thread per rank), the three layers are timed
interleaved in one process, in a random order drawn at every repeat, with :func:`benchmarks._timing.time_interleaved`
(fp32, median of ``repeats`` samples; glibc's malloc thresholds fixed, see
:func:`benchmarks._timing.steady_allocator`).
Each sample records both the wall time and the CPU time of the process (``time.process_time``, read just around
the timed call): on a shared, oversubscribed machine the wall time also counts the time the
process waited for a core, the CPU time does not. A sample of a small shape runs several passes (see
``_passes_per_sample``); times are per pass. At world 2 every rank times the same candidates; the reported time of a
candidate is the larger of the two ranks' medians. ``nn.BatchNorm2d`` at world 2 is the unsynchronised per-rank
BatchNorm, given for scale.

BatchRenorm runs with ``r_max = 3, d_max = 5``: r and d are computed and applied at every pass (the cost does not
depend on how many channels they clip).

Target (issue 3): BatchRenorm / SyncBatchNorm <= 1.1 on every row.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch
import torch.nn as nn

SHAPES = [(8, 64, 56, 56), (2, 256, 64, 64), (4, 1024, 14, 14), (2, 64, 8, 8)]
NAMES = ["BatchNorm2d", "SyncBatchNorm", "BatchRenorm"]
TARGET = 1.1
DEFAULT_REPEATS = 21


def _passes_per_sample(shape) -> int:
    # a sample of a small shape lasts a few ms, so the timer and scheduler noise of single sub-ms passes averages out
    numel = 1
    for s in shape:
        numel *= s
    return max(1, 250_000 // numel)


def _repeat(fn, k: int):
    def run() -> None:
        for _ in range(k):
            fn()
    return run


def _candidates(shape, seed: int):
    import syncnorm
    from benchmarks._timing import fwd_bwd

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    grad = torch.randn(shape, generator=g)
    C = shape[1]
    layers = {"BatchNorm2d": nn.BatchNorm2d(C), "SyncBatchNorm": syncnorm.SyncBatchNorm(C),
              "BatchRenorm": syncnorm.BatchRenorm(C, r_max=3.0, d_max=5.0)}
    k = _passes_per_sample(shape)
    return {name: _repeat(fwd_bwd(layers[name], x, grad), k) for name in NAMES}, k


def _time_all(repeats: int, seed: int) -> list[dict]:
    from benchmarks._timing import time_interleaved

    rows = []
    for shape in SHAPES:
        cands, k = _candidates(shape, seed)
        wall, cpu = time_interleaved(cands, repeats=repeats, warmup=2, cpu_times=True)
        rows.append({"shape": shape, "wall": {n: wall[n] / k for n in NAMES}, "cpu": {n: cpu[n] / k for n in NAMES}})
    return rows


def _rank_worker(rank: int, world: int, repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    return _time_all(repeats, seed=rank)


def _table_rows(world: int, rows: list[dict]) -> list[list[object]]:
    out = []
    for r in rows:
        w, c = r["wall"], r["cpu"]
        out.append([world, "x".join(map(str, r["shape"])), w["BatchNorm2d"], w["SyncBatchNorm"], w["BatchRenorm"],
                    w["BatchRenorm"] / w["SyncBatchNorm"], w["BatchRenorm"] / w["BatchNorm2d"],
                    c["SyncBatchNorm"], c["BatchRenorm"], c["BatchRenorm"] / c["SyncBatchNorm"]])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="interleaved samples per candidate")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "renorm.md"),
                        help="markdown file the table is written to ('' to skip)")
    args = parser.parse_args(argv)

    from benchmarks._timing import machine_line, markdown_table
    from tests.dist.harness import run_distributed

    torch.set_num_threads(1)
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    table = _table_rows(1, _time_all(args.repeats, seed=0))
    per_rank = run_distributed(_rank_worker, 2, args.repeats, timeout=600)
    world2 = [{"shape": row["shape"],
               "wall": {n: max(r[i]["wall"][n] for r in per_rank) for n in NAMES},
               "cpu": {n: max(r[i]["cpu"][n] for r in per_rank) for n in NAMES}}
              for i, row in enumerate(per_rank[0])]
    table += _table_rows(2, world2)
    elapsed = time.perf_counter() - start
    load_after = os.getloadavg()[0]

    header = ["world", "shape (N,C,H,W)", "BN2d ms", "SyncBN ms", "BRN ms", "BRN / SyncBN", "BRN / BN2d",
              "SyncBN CPU ms", "BRN CPU ms", "BRN / SyncBN (CPU)"]
    md_table = markdown_table(header, table)
    worst_wall = max(row[5] for row in table)
    worst_cpu = max(row[9] for row in table)
    verdict = (f"Worst BatchRenorm / SyncBatchNorm ratio: {worst_wall:.2f} by wall time, {worst_cpu:.2f} by CPU time "
               f"(target <= {TARGET}: wall {'met' if worst_wall <= TARGET else 'missed'}, "
               f"CPU {'met' if worst_cpu <= TARGET else 'missed'}).")
    print(md_table)
    print(verdict)
    print(f"({elapsed:.0f} s, 1-minute load average {load_before:.1f} before, {load_after:.1f} after)")
    if args.out:
        cmd = "OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_renorm" + (
            f" --repeats {args.repeats}" if args.repeats != DEFAULT_REPEATS else "")
        text = "\n".join([
            "# BatchRenorm cost: forward + backward, fp32, CPU",
            "",
            f"Command: `{cmd}`  ",
            f"Machine: {machine_line()}  ",
            f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}  ",
            f"1-minute load average: {load_before:.1f} at the start, {load_after:.1f} at the end "
            f"({os.cpu_count()} cores)",
            "",
            "Median time of one forward + backward per pass, the three layers timed interleaved in one process, "
            "in a random order drawn at every repeat, with glibc's malloc thresholds fixed "
            "(`benchmarks._timing.steady_allocator`) "
            f"({args.repeats} samples each; a sample of the small shape runs {_passes_per_sample(SHAPES[-1])} "
            "passes). World 2 = two gloo ranks on this machine, one thread each, the slower rank's median. "
            "\"ms\" columns are wall time; \"CPU ms\" columns are the process's CPU time over the same samples, "
            "which excludes time spent waiting for a core on a loaded machine. BatchRenorm runs with r_max = 3, "
            "d_max = 5 (r and d computed and applied every pass). BN2d at world 2 is unsynchronised per-rank "
            "BatchNorm.",
            "",
            md_table,
            "",
            verdict,
            "",
            "BatchRenorm's extra work over SyncBatchNorm is O(C) per call and independent of N*H*W: computing r and "
            "d from the global moments and folding them into the per-channel scale/shift, with no extra collective. "
            "On CPU the C++ kernels do it inside the loop that prepares the normalisation, plus one multiply-add "
            "per channel for the weight gradient; the Python path (CUDA, or the kernels switched off) needs about "
            "30 more small tensor ops per forward+backward (225 against 194 aten calls, counted with torch.profiler "
            "on a (2, 8, 4, 4) input). Its relative cost "
            "is therefore largest on the smallest shape, where a pass does little arithmetic, and the small-shape "
            "rows are also the most sensitive to the machine's load (see the load average above). With "
            "r_max = 1, d_max = 0 (a schedule's warm-up) the layer skips that work and runs SyncBatchNorm's path.",
            "",
        ])
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
