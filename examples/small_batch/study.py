"""Small-batch accuracy studies of syncnorm's layers on sklearn's digits, 2 gloo ranks on CPU, DDP.

Three studies (see README.md in this folder):

- ``brn``        (issue 3): BN vs SyncBN vs BatchRenorm at per-rank batch 2, non-i.i.d. batches holding only 2
                  classes (the BRN paper's §4.3 setting), with the i.i.d. batches of the same size for reference;
- ``cbn``        (issue 4): BN, SyncBN, CBN (compensated and naive), CmBN (accumulation 4, with SyncBN under the
                  same accumulation as a control) and GroupNorm at per-rank batch 2;
- ``batch_size`` (issue 7): accuracy against per-rank batch 1, 2, 4, 16 for BN, SyncBN, BRN, CBN, CmBN and GN.

Every number is the test accuracy in eval mode (running statistics), mean ± sample std over seeds. All runs of one
invocation share one spawned gloo world (``tests/dist/harness.py``), 1 thread per rank.

    OMP_NUM_THREADS=1 .venv/bin/python examples/small_batch/study.py --study all --seeds 3 \\
        --report benchmarks/results/small_batch.md --plot benchmarks/results/small_batch.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(HERE), str(ROOT)):  # `training` (this folder) and `tests.dist.harness` (repo root)
    if p not in sys.path:
        sys.path.insert(0, p)

from training import METHODS, RunConfig  # noqa: E402

WORLD_SIZE = 2
STUDIES = ("brn", "cbn", "batch_size")
BRN_METHODS = ("BN", "SyncBN", "BRN")
CBN_METHODS = ("BN", "SyncBN", "SyncBN+acc4", "CmBN", "CBN-naive", "CBN", "GN")
SWEEP_METHODS = ("BN", "SyncBN", "BRN", "CBN", "CmBN", "GN")
SWEEP_BATCHES = (1, 2, 4, 16)
BEGIN, END = "<!-- BEGIN GENERATED: examples/small_batch/study.py -->", "<!-- END GENERATED -->"


def study_configs(study: str, seeds: int, epochs: float, steps) -> list[RunConfig]:
    """The runs one study needs, seeds 0..seeds-1."""
    common = dict(epochs=epochs, steps=steps)
    out: list[RunConfig] = []
    for seed in range(seeds):
        if study == "brn":
            out += [RunConfig(m, 2, seed, non_iid=n, **common) for n in (True, False) for m in BRN_METHODS]
        elif study == "cbn":
            out += [RunConfig(m, 2, seed, **common) for m in CBN_METHODS]
        elif study == "batch_size":
            out += [RunConfig(m, b, seed, **common) for b in SWEEP_BATCHES for m in SWEEP_METHODS]
        else:
            raise ValueError(f"unknown study {study!r}, expected one of {STUDIES}")
    return out


def build_configs(studies, seeds: int, epochs: float, steps) -> list[RunConfig]:
    """The union of the studies' runs, each distinct configuration once (studies share e.g. SyncBN at batch 2)."""
    return list(dict.fromkeys(c for s in studies for c in study_configs(s, seeds, epochs, steps)))


# ---------------------------------------------------------------------------------------------------------- tables

def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean, std = _stats(values)
    return f"{mean:.1f} ± {std:.1f}"


def _select(results, **where) -> list[dict]:
    return [r for r in results if all(r[k] == v for k, v in where.items())]


def _accs(results, **where) -> list[float]:
    return [r["test_acc"] for r in sorted(_select(results, **where), key=lambda r: r["seed"])]


def _seeds(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def table_brn(results) -> str:
    lines = ["| method | non-i.i.d. (2 classes / batch) | per seed | i.i.d. | per seed | r_max, d_max at end |",
             "|---|---|---|---|---|---|"]
    for m in BRN_METHODS:
        non = _accs(results, method=m, per_rank_batch=2, non_iid=True)
        iid = _accs(results, method=m, per_rank_batch=2, non_iid=False)
        rd = [r["final_r_max_d_max"] for r in _select(results, method=m, per_rank_batch=2) if r["final_r_max_d_max"]]
        rd_s = f"{rd[0][0]:g}, {rd[0][1]:g}" if rd else "–"
        lines.append(f"| {m} | {_cell(non)} | {_seeds(non)} | {_cell(iid)} | {_seeds(iid)} | {rd_s} |")
    return "\n".join(lines)


def table_cbn(results) -> str:
    lines = ["| method | test accuracy | per seed | optimizer steps | train loss (last 10%) |", "|---|---|---|---|---|"]
    for m in CBN_METHODS:
        rows = _select(results, method=m, per_rank_batch=2, non_iid=False)
        if not rows:
            continue
        accs = _accs(results, method=m, per_rank_batch=2, non_iid=False)
        loss = statistics.fmean(r["final_train_loss"] for r in rows)
        lines.append(f"| {m} | {_cell(accs)} | {_seeds(accs)} | {rows[0]['optimizer_steps']} | {loss:.3f} |")
    return "\n".join(lines)


def table_sweep(results) -> str:
    lines = ["| method | " + " | ".join(f"b={b}" for b in SWEEP_BATCHES) + " |",
             "|---|" + "---|" * len(SWEEP_BATCHES)]
    for m in SWEEP_METHODS:
        cells = [_cell(_accs(results, method=m, per_rank_batch=b, non_iid=False)) for b in SWEEP_BATCHES]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for m in SWEEP_METHODS:
        xs, ys, es = [], [], []
        for b in SWEEP_BATCHES:
            accs = _accs(results, method=m, per_rank_batch=b, non_iid=False)
            if accs:
                mean, std = _stats(accs)
                xs.append(b)
                ys.append(mean)
                es.append(std)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(SWEEP_BATCHES, [str(b) for b in SWEEP_BATCHES])
    ax.set_xlabel(f"per-rank batch size ({WORLD_SIZE} ranks)")
    ax.set_ylabel("test accuracy, eval mode (%)")
    seeds = len({r["seed"] for r in results})
    ax.set_title(f"sklearn digits, mean ± std over {seeds} seed(s)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{os.cpu_count()}-core CPU ({cpu}), no GPU; torch {torch.__version__}, python "
            f"{platform.python_version()}, {WORLD_SIZE} gloo ranks x 1 thread")


def render(results, studies, args, command: str, wall_s: float, study_wall: dict) -> str:
    r0 = results[0]
    seeds = sorted({r["seed"] for r in results})
    parts = [
        f"Generated {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} on {machine_line()}.",
        "",
        f"Reproduce: `{command}` (total {wall_s / 60:.1f} min wall, "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in study_wall.items())
        + " of training; runs shared by studies count in each).",
        "",
        f"Setup: sklearn digits (8x8, 1257 train / 540 test, stratified, fixed split), DigitsNet "
        f"(3 conv-norm-ReLU blocks, width {r0['width']}, global pooling, Linear), {WORLD_SIZE} ranks, DDP, "
        + (f"{r0['steps']} micro-batches per run" if r0["steps"] is not None else f"{r0['epochs']:g} epoch(s) per run")
        + f", SGD momentum 0.9, weight decay 5e-4, peak lr {r0['base_lr']:g} x (samples per optimizer step) / 32, "
        "5% linear warm-up then cosine. Seeds "
        f"{', '.join(map(str, seeds))} (init and batch order). Accuracy: % of the test split in eval mode "
        "(running statistics), mean ± sample std over seeds.",
        "",
        "Methods: " + "; ".join(f"**{k}** = {v.description}" for k, v in METHODS.items()) + ".",
    ]
    if "brn" in studies:
        parts += ["", "### BN vs BatchRenorm, per-rank batch 2, non-i.i.d. batches (issue 3)", "",
                  "Each global batch of 4 holds 2 classes; each rank's batch of 2 is a same-class pair. The i.i.d. "
                  "columns use shuffled batches of the same size.", "", table_brn(results)]
    if "cbn" in studies:
        parts += ["", "### Per-rank batch 2, 2 ranks: BN, SyncBN, CBN, CmBN, GN (issue 4)", "",
                  "i.i.d. shuffled batches; every method sees the same samples. CmBN and SyncBN+acc4 step the "
                  "optimizer every 4 micro-batches (4x fewer steps at 4x the lr).", "", table_cbn(results)]
    if "batch_size" in studies:
        parts += ["", "### Accuracy against per-rank batch size (issue 7)", "",
                  "Same number of epochs at every batch size (fewer steps for bigger batches, lr scaled linearly).",
                  "", table_sweep(results)]
        if args.plot:
            parts += ["", f"![accuracy vs per-rank batch size]({Path(args.plot).name})"]
    return "\n".join(parts) + "\n"


def write_report(path: Path, body: str) -> None:
    """Write ``body`` between the generated markers of ``path``, keeping any hand-written text around them."""
    block = f"{BEGIN}\n{body}{END}\n"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            pattern = re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?"
            path.write_text(re.sub(pattern, lambda _: block, text, count=1, flags=re.S))
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Small-batch accuracy studies\n\n" + block)


# ---------------------------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=(*STUDIES, "all"), default="all", help="which study to run (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default: 3)")
    p.add_argument("--epochs", type=float, default=1.0,
                   help="passes over the training split per run, at every batch size (default: 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="micro-batches per rank per run, overriding --epochs (for quick checks)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "small_batch",
                   help="folder for results.json and table.md (default: runs/small_batch)")
    p.add_argument("--report", type=Path, default=None,
                   help="also write the tables into this markdown file (between generated markers)")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG of the batch-size study (default: OUT/small_batch.png when that study runs)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the world is killed")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.epochs <= 0:
        p.error(f"--epochs must be > 0, got {args.epochs}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    studies = STUDIES if args.study == "all" else (args.study,)
    if "batch_size" in studies and args.plot is None:
        args.plot = args.out / "small_batch.png"
    if "batch_size" not in studies:
        args.plot = None
    configs = build_configs(studies, args.seeds, args.epochs, args.steps)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tests.dist.harness import run_distributed
    from training import load_digits_split, rank_worker

    print(f"{len(configs)} runs on {WORLD_SIZE} gloo ranks: studies {', '.join(studies)}, {args.seeds} seed(s)",
          flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    progress = args.out / "progress.jsonl"
    progress.write_text("")
    t0 = time.perf_counter()
    per_rank = run_distributed(rank_worker, WORLD_SIZE, configs, load_digits_split(), True, str(progress),
                               timeout=args.timeout)
    wall = time.perf_counter() - t0
    results = per_rank[0]
    for r0, r1 in zip(per_rank[0], per_rank[1]):
        # global-statistics layers keep identical running stats on both ranks; DDP broadcasts BN's from rank 0
        r0["rank1_test_acc"] = r1["test_acc"]
    by_config = {RunConfig(**{f: r[f] for f in RunConfig.__dataclass_fields__}): r for r in results}
    study_wall = {s: sum(by_config[c]["wall_s"] for c in study_configs(s, args.seeds, args.epochs, args.steps))
                  for s in studies}

    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    command = "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)])
    if "batch_size" in studies:
        plot_sweep(results, args.plot)
    body = render(results, studies, args, command, wall, study_wall)
    (args.out / "table.md").write_text(body)
    if args.report is not None:
        write_report(args.report, body)
    print(body)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'table.md'}"
          + (f", {args.plot}" if args.plot else "") + (f", {args.report}" if args.report else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
