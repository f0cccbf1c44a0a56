"""The ``syncnorm`` command: summary, bench, launch, and argparse-style exits (status 2) for bad arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn as nn

from syncnorm import cli

ROOT = Path(__file__).resolve().parent.parent


def small_net() -> nn.Module:
    """A ``module:callable`` target for ``syncnorm summary``."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv1d(8, 4, 1), nn.BatchNorm1d(4))


NOT_A_MODULE = 42


def broken_factory() -> nn.Module:
    raise RuntimeError("factory exploded")


def _exit_code(argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------------------- summary

def test_summary_torchvision_model_before_and_after_conversion(capsys):
    code, out, _ = _exit_code(["summary", "torchvision:resnet18", "--to", "sync"], capsys)
    assert code == 0
    before, after = out.split("after convert(to='sync')")
    assert "20 norm layers" in before and "BatchNorm2d" in before and "SyncBatchNorm" not in before
    assert "SyncBatchNorm" in after and "layer4.1.bn2" in after


def test_summary_module_callable_without_conversion(capsys):
    code, out, _ = _exit_code(["summary", "tests.test_cli:small_net"], capsys)
    assert code == 0
    assert "BatchNorm2d" in out and "BatchNorm1d" in out and "after convert" not in out


def test_summary_passes_layer_kwargs(capsys):
    code, out, _ = _exit_code(["summary", "tests.test_cli:small_net", "--to", "renorm", "-k", "r_max=3.0",
                               "-k", "d_max=5"], capsys)
    assert code == 0
    assert "r_max=3.0, d_max=5" in out and "BatchRenorm" in out


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required"),
    (["summary"], "the following arguments are required: model"),
    (["summary", "tests.test_cli:small_net", "--to", "nonsense"], "invalid choice: 'nonsense'"),
    (["summary", "torchvision:no_such_net"], "torchvision has no model 'no_such_net'"),
    (["summary", "no_such_module_xyz:make"], "cannot import module 'no_such_module_xyz'"),
    (["summary", "tests.scripts.raises_at_import:make"],
     "importing module 'tests.scripts.raises_at_import' of model spec 'tests.scripts.raises_at_import:make' failed: "
     "RuntimeError: boom at import"),
    (["summary", "tests.test_cli:missing"], "has no attribute 'missing'"),
    (["summary", "tests.test_cli:NOT_A_MODULE"], "not a torch.nn.Module"),
    (["summary", "tests.test_cli:broken_factory"], "factory exploded"),
    (["summary", "tests.test_cli:small_net", "-k", "r_max=3"], "--layer-kwarg needs --to"),
    (["summary", "tests.test_cli:small_net", "--to", "renorm", "-k", "=3"], "expects KEY=VALUE"),
    (["summary", "tests.test_cli:small_net", "--to", "sync", "-k", "no_such_kwarg=1"], "--to sync"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["summary", "tests.test_cli:small_net", "--", "x"], "only accepted by 'bench'"),
])
def test_bad_arguments_exit_2_with_a_usage_message(capsys, argv, message):
    code, out, err = _exit_code(argv, capsys)
    assert code == 2
    assert err.startswith("usage: syncnorm") and message in err
    assert out == "", out  # the error is the only output (no table printed before a conversion error)


def test_bare_name_falls_back_and_reports_every_source(capsys):
    code, _, err = _exit_code(["summary", "no_such_net_anywhere"], capsys)
    assert code == 2 and "torchvision has no model 'no_such_net_anywhere'" in err
    assert "timm" in err  # tried next (installed or not, the reason is given)


# ------------------------------------------------------------------------------------------------------- bench

def _fake_benchmarks(tmp_path: Path) -> Path:
    d = tmp_path / "benchmarks"
    d.mkdir()
    (d / "__init__.py").write_text("")
    (d / "_timing.py").write_text("RATIO = 1.25\n")  # helpers are importable, as benchmarks._timing is
    (d / "bench_alpha.py").write_text(
        "import sys\nfrom benchmarks._timing import RATIO\n"
        "print('| layer | ratio |')\nprint(f'| alpha | {RATIO} |')\nprint('args', sys.argv[1:])\n")
    (d / "bench_broken.py").write_text("raise SystemExit(3)\n")
    (d / "notabench.py").write_text("raise SystemExit('must not run')\n")
    return d


def test_bench_lists_discovered_scripts(tmp_path, capsys):
    d = _fake_benchmarks(tmp_path)
    code, out, _ = _exit_code(["bench", "--list", "--benchmarks-dir", str(d)], capsys)
    assert code == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == ["alpha", "broken"]


def test_bench_runs_the_selected_script_and_forwards_arguments(tmp_path, capfd):
    d = _fake_benchmarks(tmp_path)
    assert cli.main(["bench", "alpha", "--benchmarks-dir", str(d), "--", "--repeats", "3"]) == 0
    out = capfd.readouterr().out
    assert "| alpha | 1.25 |" in out and "args ['--repeats', '3']" in out


def test_bench_reports_a_failing_script(tmp_path, capfd):
    d = _fake_benchmarks(tmp_path)
    assert cli.main(["bench", "--benchmarks-dir", str(d)]) == 1  # both run, one fails
    captured = capfd.readouterr()
    assert "| alpha | 1.25 |" in captured.out and "broken failed with exit status 3" in captured.err


def test_bench_bad_names_and_empty_directories_exit_2(tmp_path, capsys):
    d = _fake_benchmarks(tmp_path)
    code, _, err = _exit_code(["bench", "gamma", "--benchmarks-dir", str(d)], capsys)
    assert code == 2 and "unknown benchmark(s) gamma; available: alpha, broken" in err
    code, _, err = _exit_code(["bench", "--benchmarks-dir", str(tmp_path / "empty")], capsys)
    assert code == 2 and "no bench_*.py scripts" in err


def test_bench_finds_the_repository_benchmarks(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    expected = sorted(p.stem[len("bench_"):] for p in (ROOT / "benchmarks").glob("bench_*.py"))
    code, out, _ = _exit_code(["bench", "--list"], capsys)
    if not expected:
        assert code == 2
    else:
        assert code == 0 and [line.split("\t")[0] for line in out.splitlines()] == expected


# ------------------------------------------------------------------------------------------------------- launch

def test_launch_subcommand_is_the_launcher(capsys, monkeypatch):
    code, _, err = _exit_code(["launch", "--no-such-option", "x.py"], capsys)
    assert code == 2 and "usage: python -m syncnorm.launch" in err
    calls = []
    monkeypatch.setattr("syncnorm.launch.main", lambda argv: calls.append(argv) or 0)
    assert cli.main(["launch", "--nproc-per-node", "2", "s.py", "--x"]) == 0
    assert calls == [["--nproc-per-node", "2", "s.py", "--x"]]


def test_console_entry_points_run_as_processes():
    # `python -m syncnorm` and the installed `syncnorm` script (when the package is installed) are the same command
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = Path(sys.executable).with_name("syncnorm")
    module = [sys.executable, "-m", "syncnorm"]
    installed = [str(script)] if script.exists() else module
    proc = subprocess.run([*module, "summary", "tests.test_cli:small_net", "--to", "frozen"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "BatchNorm2d" in proc.stdout and "FrozenBatchNorm" in proc.stdout
    proc = subprocess.run([*installed, "summary"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "usage: syncnorm summary" in proc.stderr
