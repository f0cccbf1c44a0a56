"""Smoke test of benchmarks/bench_gpu.py (the prepared GPU benchmark): its ``--quick`` CPU run must still print every
table with measured numbers for native BatchNorm and syncnorm, so that the script does not rot between GPU sessions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"^\d+\.\d+$")


def _rows(text: str, section: str) -> list[list[str]]:
    """The table rows (cells) of the markdown section that starts with the heading ``section``."""
    start = text.index(section)
    end = text.find("\n## ", start + 1)
    body = text[start:] if end < 0 else text[start:end]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines()
            if line.startswith("| ") and not line.startswith("| shape") and not line.startswith("| candidate")]


def test_quick_cpu_run_prints_measured_tables(tmp_path):
    out = tmp_path / "bench_gpu.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--device", "cpu", "--quick", "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.strip() in proc.stdout  # the file holds what was printed
    assert "All figures below were measured in this run" in text
    assert "failed" not in text, text

    layers = _rows(text, "## Layers")
    assert {r[1] for r in layers} == {"fp32 NCHW", "bf16 channels_last"}
    for name in ("native", "sync", "renorm", "cross_minibatch", "conv+native", "conv+sync", "conv+cross_iteration"):
        rows = [r for r in layers if r[2] == name]
        assert len(rows) == 4, (name, rows)  # 2 quick shapes x 2 dtypes
        assert all(NUMBER.match(r[3]) and float(r[3]) > 0 for r in rows), rows
    assert all(r[3] == "n/a (CPU)" for r in layers if r[2] == "torch-sync")
    assert all(re.match(r"^[\d.e+-]+$", r[4]) for r in layers if r[2] in ("native", "sync"))  # GB/s beside the time

    steps = _rows(text, "## Training steps, eager")
    for name in ("native", "sync", "renorm", "cross_minibatch", "cross_iteration"):
        rows = [r for r in steps if r[0] == name]
        assert len(rows) == 2, (name, rows)  # ResNet and Faster R-CNN
        assert all(NUMBER.match(r[1]) for r in rows), rows
    assert "Faster R-CNN R50-FPN" in text

    compiled = {r[0]: r for r in _rows(text, "## Training steps, torch.compile")}
    assert NUMBER.match(compiled["native"][1]) and NUMBER.match(compiled["sync"][1]), compiled
    assert "## Host synchronisations" in text
