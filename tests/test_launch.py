"""syncnorm.launch: argument building (in process), then the launcher for real (torchrun workers on gloo).

The real launches share no state: each is one `python -m syncnorm.launch ...` subprocess with a timeout; the workers
write one JSON file per rank (tests/scripts/check_global_stats.py) and the tests read them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from syncnorm import launch
from tests.dist.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"
TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "MASTER_ADDR", "MASTER_PORT")


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and not k.startswith("PET_")}
    env.pop("OMP_NUM_THREADS", None)  # the launcher's default is under test
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture
def outside_torchrun(monkeypatch):
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    for key in [k for k in os.environ if k.startswith("PET_")]:
        monkeypatch.delenv(key)


# ------------------------------------------------------------------------------------------ build_torchrun_args

def test_defaults_on_a_cpu_machine(outside_torchrun):
    argv, env = launch.build_torchrun_args(["train.py", "--lr", "0.1"], cuda_device_count=0, environ={})
    assert argv == ["--nproc-per-node", "2", "--standalone", "train.py", "--lr", "0.1"]
    cores = len(os.sched_getaffinity(0))
    assert env == {"OMP_NUM_THREADS": str(max(1, cores // 2))}


def test_defaults_on_a_gpu_machine(outside_torchrun):
    argv, _ = launch.build_torchrun_args(["train.py"], cuda_device_count=8, environ={})
    assert argv == ["--nproc-per-node", "8", "--standalone", "train.py"]


@pytest.mark.parametrize("options, expected", [
    (["--nproc-per-node", "3"], ["--nproc-per-node", "3", "--standalone"]),
    (["--nproc_per_node=3"], ["--nproc_per_node=3", "--standalone"]),
    (["--standalone", "--max-restarts", "2"], ["--standalone", "--max-restarts", "2", "--nproc-per-node", "2"]),
    # several nodes or an explicit rendezvous: never --standalone, which would override them
    (["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "h:1"],
     ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "h:1", "--nproc-per-node", "2"]),
    (["--nnodes", "1:4"], ["--nnodes", "1:4", "--nproc-per-node", "2"]),
    (["--master-port", "29555"], ["--master-port", "29555", "--nproc-per-node", "2"]),
    (["--nnodes", "1", "--node-rank", "0"], ["--nnodes", "1", "--node-rank", "0", "--nproc-per-node", "2",
                                             "--standalone"]),
])
def test_user_options_pass_through_and_win(outside_torchrun, options, expected):
    argv, _ = launch.build_torchrun_args([*options, "s.py", "x"], cuda_device_count=0, environ={})
    assert argv == [*expected, "s.py", "x"]


def test_script_arguments_are_never_read_as_launcher_options(outside_torchrun):
    script_args = ["--nproc-per-node", "7", "--nnodes", "3", "--standalone"]
    argv, _ = launch.build_torchrun_args(["s.py", *script_args], cuda_device_count=0, environ={})
    assert argv == ["--nproc-per-node", "2", "--standalone", "s.py", *script_args]


def test_torchrun_environment_variables_count_as_given(outside_torchrun):
    argv, env = launch.build_torchrun_args(["s.py"], cuda_device_count=0,
                                           environ={"PET_NPROC_PER_NODE": "4", "PET_RDZV_ENDPOINT": "h:2"})
    assert argv == ["s.py"]
    assert env == {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // 4))}


def test_omp_num_threads_is_left_alone_when_set(outside_torchrun):
    _, env = launch.build_torchrun_args(["s.py"], cuda_device_count=0, environ={"OMP_NUM_THREADS": "5"})
    assert env == {}


@pytest.mark.parametrize("argv", [[], ["--nproc-per-node"], ["--no-such-option", "s.py"], ["--nnodes"]])
def test_bad_launcher_arguments_exit_2_with_usage(outside_torchrun, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        launch.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m syncnorm.launch" in err and "error:" in err


@pytest.mark.parametrize("argv, message", [
    (["--nproc-per-node", "abc", "s.py"], "--nproc-per-node must be a positive int or one of cpu, gpu, auto; got 'abc'"),
    (["--nproc-per-node", "0", "s.py"], "--nproc-per-node must be a positive int or one of cpu, gpu, auto; got '0'"),
    (["--nnodes", "0", "s.py"], "--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX; got '0'"),
    (["--nnodes", "abc", "s.py"], "got 'abc'"),
    (["--nnodes", "3:2", "s.py"], "got '3:2'"),
])
def test_bad_launcher_values_exit_2_before_torchrun(outside_torchrun, capsys, argv, message):
    # torchrun reports these as tracebacks with status 1 once it runs; they are checked before it starts
    with pytest.raises(SystemExit) as exc:
        launch.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m syncnorm.launch" in err and message in err


# ------------------------------------------------------------------------------------------ inside a torchrun worker

def test_launched_by_torchrun_detection():
    assert launch.launched_by_torchrun({"TORCHELASTIC_RUN_ID": "x"})
    assert launch.launched_by_torchrun({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert not launch.launched_by_torchrun({"RANK": "0"})
    assert not launch.launched_by_torchrun({})


def test_inside_a_worker_the_script_runs_in_process(outside_torchrun, monkeypatch, tmp_path):
    script = tmp_path / "record_argv.py"
    out = tmp_path / "argv.json"
    script.write_text("import json, os, sys\n"
                      f"open({str(out)!r}, 'a').write(json.dumps([os.getpid(), sys.argv]) + '\\n')\n")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "outer-run")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert launch.main(["--nproc-per-node", "4", str(script), "a", "--b"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 1  # ran once, not once per requested process
    pid, argv = json.loads(lines[0])
    assert pid == os.getpid() and argv == [str(script), "a", "--b"]


# ------------------------------------------------------------------------------------------ check_world_size

def test_check_world_size_outside_torchrun(outside_torchrun):
    assert launch.check_world_size(2) == 2
    assert launch.check_world_size(4, num_nodes=2) == 8


@pytest.mark.parametrize("devices, num_nodes", [(2, 1), (4, 1), (1, 2)])
def test_check_world_size_names_the_mismatch(outside_torchrun, monkeypatch, devices, num_nodes):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError) as exc:
        launch.check_world_size(devices, num_nodes)
    msg = str(exc.value)
    assert f"{devices}*{num_nodes} = {devices * num_nodes}" in msg and "WORLD_SIZE=4" in msg
    assert "devices=2, num_nodes=2" in msg and f"--nproc-per-node {devices} --nnodes {num_nodes}" in msg


def test_check_world_size_accepts_the_launched_layout(outside_torchrun, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launch.check_world_size(2, num_nodes=2) == 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_check_world_size_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="devices must be a positive int"):
        launch.check_world_size(bad)


# ------------------------------------------------------------------------------------------ init_distributed

def test_init_distributed_without_torchrun_is_a_world_of_one(outside_torchrun):
    from syncnorm import comm

    assert not comm.is_initialized()
    try:
        device = launch.init_distributed(timeout=30)
        assert device == torch.device("cuda", 0) if torch.cuda.is_available() else device == torch.device("cpu")
        assert comm.is_initialized() and comm.get_world_size() == 1 and comm.get_rank() == 0
        assert launch.init_distributed() == device  # no-op the second time
        assert comm.get_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    finally:
        launch._destroy()  # what the atexit hook does
    assert not comm.is_initialized()


@pytest.mark.parametrize("bad", [0, -5.0, "10", True])
def test_init_distributed_rejects_bad_timeouts(outside_torchrun, bad):
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        launch.init_distributed(timeout=bad)


# ------------------------------------------------------------------------------------------ real launches

def _read_ranks(out: Path, world: int) -> list[dict]:
    files = sorted(out.glob("rank*.json"))
    assert [f.name for f in files] == [f"rank{r}.json" for r in range(world)]
    return [json.loads(f.read_text()) for f in files]


def _launch(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "syncnorm.launch", *args], cwd=ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_launcher_two_processes_see_global_statistics(tmp_path):
    proc = _launch(["--nproc-per-node", "2", str(SCRIPTS / "check_global_stats.py"), str(tmp_path), "--flag"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cores = len(os.sched_getaffinity(0))
    for rank, r in enumerate(_read_ranks(tmp_path, 2)):
        assert r["rank"] == rank and r["world"] == 2 and r["env_world_size"] == 2 and r["local_rank"] == rank
        assert r["backend"] == "gloo" and r["device"] == "cpu"
        assert r["omp_num_threads"] == str(max(1, cores // 2))
        assert r["argv"] == [str(tmp_path), "--flag"]
        assert r["output_differs_from_local"]  # the check below can fail: local statistics give other outputs
        assert r["output_matches_global"] and r["running_mean_matches_global"] and r["running_var_matches_global"]


def test_two_nodes_on_loopback(tmp_path):
    port = free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"syncnorm-test-{port}",
              str(SCRIPTS / "check_global_stats.py"), str(tmp_path)]
    cmd = [sys.executable, "-m", "syncnorm.launch", *common]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=150)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.communicate()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(outputs)
    results = _read_ranks(tmp_path, 2)
    for r in results:
        assert r["world"] == 2 and r["env_world_size"] == 2
        assert r["local_rank"] == 0  # one process per node
        assert r["output_differs_from_local"]
        assert r["output_matches_global"] and r["running_mean_matches_global"] and r["running_var_matches_global"]


def test_a_failing_rank_fails_the_launch_with_its_traceback(tmp_path):
    # worker output goes to files (--redirects 3): the message can only come through torchrun's error file
    proc = _launch(["--redirects", "3", "--log-dir", str(tmp_path), str(SCRIPTS / "fail_on_rank.py"), "marker-7431"])
    assert proc.returncode == 1
    err = proc.stderr
    assert "rank      : 1" in err
    assert "ValueError: deliberate failure on rank 1 (marker-7431)" in err
    assert "fail_on_rank.py" in err and "Traceback" in err
