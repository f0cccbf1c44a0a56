"""Smoke test of examples/small_batch/study.py: every study and method runs 2 steps in one spawned 2-rank world and
the script writes its results, tables, plot and report. Plus the samplers' contracts and the CLI's bad-argument exit.

Most of the smoke test's time is the two spawned ranks starting up (importing torch), so it grows with machine load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "examples" / "small_batch" / "study.py"
sys.path.insert(0, str(STUDY.parent))

import study  # noqa: E402  (examples/small_batch/study.py)
import training  # noqa: E402  (examples/small_batch/training.py)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("small_batch")
    report = out / "report.md"
    report.write_text("# kept heading\n\n<!-- BEGIN GENERATED: examples/small_batch/study.py -->\nold\n"
                      "<!-- END GENERATED -->\n\nhand-written notes stay\n")
    # in-process (the 2 ranks are still spawned): saves one interpreter start and torch import
    assert study.main(["--study", "all", "--seeds", "1", "--steps", "2", "--out", str(out),
                       "--report", str(report)]) == 0
    return out, report


def test_smoke_writes_results_for_every_run(smoke):
    out, _ = smoke
    results = json.loads((out / "results.json").read_text())
    expected = {(c.method, c.per_rank_batch, c.non_iid) for s in ("brn", "cbn", "batch_size")
                for c in study.study_configs(s, 1, 2.0, 2)}
    assert {(r["method"], r["per_rank_batch"], r["non_iid"]) for r in results} == expected
    for r in results:
        assert r["loss_is_finite"], r
        assert 0.0 <= r["test_acc"] <= 100.0
        assert r["iterations"] == max(2, training.METHODS[r["method"]].accumulation)
        assert r["optimizer_steps"] == r["iterations"] // training.METHODS[r["method"]].accumulation


def test_smoke_writes_tables_plot_and_report(smoke):
    out, report = smoke
    table = (out / "table.md").read_text()
    for heading in ("non-i.i.d.", "BN, SyncBN, CBN, CmBN, GN", "per-rank batch size"):
        assert heading in table
    for method in ("BN", "SyncBN", "SyncBN+acc4", "BRN", "CBN", "CBN-naive", "CmBN", "GN"):
        assert f"| {method} |" in table
    png = (out / "small_batch.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    text = report.read_text()
    assert text.startswith("# kept heading") and text.rstrip().endswith("hand-written notes stay")
    assert "\nold\n" not in text and "| CBN-naive |" in text


def test_two_class_batches_hold_two_classes_one_per_rank():
    labels = torch.arange(10).repeat_interleave(7)
    gen = torch.Generator().manual_seed(0)
    batches = list(training.two_class_batches(labels, world_size=2, per_rank=2, iterations=50, generator=gen))
    assert len(batches) == 50
    for idx in batches:
        assert idx.shape == (4,)
        per_rank = [set(labels[idx[r * 2:(r + 1) * 2]].tolist()) for r in range(2)]
        assert all(len(s) == 1 for s in per_rank)
        assert per_rank[0] != per_rank[1]


def test_iid_batches_cover_each_epoch_once():
    gen = torch.Generator().manual_seed(0)
    batches = list(training.iid_batches(20, 4, iterations=10, generator=gen))
    assert len(batches) == 10
    assert sorted(torch.cat(batches[:5]).tolist()) == list(range(20))
    assert sorted(torch.cat(batches[5:]).tolist()) == list(range(20))


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--steps", "0"], ["--epochs", "-1"], ["--study", "bogus"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        study.parse_args(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err
