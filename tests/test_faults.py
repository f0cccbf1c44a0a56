"""A rank that dies mid-training makes its surviving peer raise promptly, and a launched job fail promptly.

syncnorm's collectives all go through torch.distributed (gloo here), whose transport notices a peer whose sockets
close. Rank 1 of a 2-rank DDP job with syncnorm layers dies after ``STEPS_BEFORE_DEATH`` SGD steps, by SIGKILL or by
``os._exit(0)`` (an exit that launchers do not count as a failure); the process group keeps the 1800 s default
timeout, so raising within ``RAISE_LIMIT_S`` means the dead peer was detected, not timed out.

- Under ``torch.multiprocessing`` spawn: rank 0 must raise (from the collective it is blocked in) within
  ``RAISE_LIMIT_S`` of the death. Both ranks write wall-clock times to files (tests/scripts/die_mid_training.py):
  rank 1 just before dying, rank 0 when the exception reaches its training loop.
- Under ``python -m syncnorm.launch``: the whole job must exit non-zero within ``RAISE_LIMIT_S`` of the death.

The parent never waits on a rank without a deadline: a survivor that hangs fails the test at death +
``RAISE_LIMIT_S`` (plus a short grace), and every process the test started is killed on the way out.
Each test also checks that it left nothing named "syncnorm" in /dev/shm (the old private transport's segments).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "scripts" / "die_mid_training.py"

WORLD = 2
MODES = ("sigkill", "exit0")  # the script's MODES
RAISE_LIMIT_S = 60.0  # the survivor must raise / the job must exit within this long after the death
GRACE_S = 5.0  # how much longer the parent waits before it calls the survivor hung (the assertion uses RAISE_LIMIT_S)
SETUP_LIMIT_S = 90.0  # start-up (imports, rendezvous) and the steps before the death, on a busy 2-core machine
TEST_TIMEOUT_S = int(SETUP_LIMIT_S + RAISE_LIMIT_S + 30)
TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "MASTER_ADDR", "MASTER_PORT")


def _load_script():
    spec = importlib.util.spec_from_file_location("die_mid_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _syncnorm_shm() -> set[str]:
    try:
        return {name for name in os.listdir("/dev/shm") if "syncnorm" in name.lower()}
    except FileNotFoundError:  # no /dev/shm on this platform: nothing can be left there
        return set()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _wait_for_death(out: Path, processes_ended, deadline: float, describe) -> dict:
    """The dying rank's record, once written; fails if the job ends first or the deadline passes."""
    while True:
        death = _read_json(out / "death.json")
        if death is not None:
            return death
        if processes_ended():
            pytest.fail(f"the job ended before rank 1 died at step 3:\n{describe()}")
        if time.time() > deadline:
            pytest.fail(f"rank 1 did not reach its death within {SETUP_LIMIT_S:.0f}s of the start:\n{describe()}")
        time.sleep(0.05)


def _check_survivor(survivor: dict, death: dict, steps_before_death: int) -> float:
    """Rank 0's record shows an exception from a torch.distributed collective, raised after the death and within
    RAISE_LIMIT_S of it; returns that delay."""
    assert survivor["raised"], f"rank 0 finished its loop without an exception: {survivor}"
    assert survivor["steps_completed"] >= steps_before_death, survivor  # it was training, mid-run
    where = survivor["traceback"]
    assert f"torch{os.sep}distributed" in where, f"rank 0 raised outside a collective:\n{where}"
    delay = survivor["time"] - death["time"]
    assert 0 <= delay < RAISE_LIMIT_S, f"rank 0 raised {delay:.2f}s after rank 1's death:\n{where}"
    return delay


# ------------------------------------------------------------------------------------------ torch.multiprocessing

def _spawned_rank(rank: int, world: int, init_method: str, mode: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    script = _load_script()
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=script.PG_TIMEOUT_S))
    try:
        script.train(mode, out_dir)  # rank 1 dies inside; the survivor's exception is recorded in out_dir
    except Exception:  # noqa: BLE001 - the parent reads the record
        pass


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize("mode", MODES)
def test_spawned_survivor_raises_when_its_peer_dies(mode, tmp_path, monkeypatch):
    shm_before = _syncnorm_shm()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks inherit it
    script = _load_script()
    ctx = mp.get_context("spawn")
    init_method = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_spawned_rank, args=(r, WORLD, init_method, mode, str(tmp_path)), daemon=True)
             for r in range(WORLD)]
    start = time.time()
    for p in procs:
        p.start()

    def describe() -> str:
        records = {f.name: f.read_text()[-3000:] for f in sorted(tmp_path.glob("*.json"))}
        return f"exit codes {[p.exitcode for p in procs]}; records {records}"

    try:
        death = _wait_for_death(tmp_path, lambda: any(p.exitcode is not None for p in procs),
                                start + SETUP_LIMIT_S, describe)
        survivor = None
        while survivor is None:
            survivor = _read_json(tmp_path / "survivor0.json")
            if survivor is None:
                if procs[0].exitcode is not None:
                    pytest.fail(f"rank 0 ended without recording an exception:\n{describe()}")
                if time.time() > death["time"] + RAISE_LIMIT_S + GRACE_S:
                    pytest.fail(f"rank 0 did not raise within {RAISE_LIMIT_S:.0f}s of rank 1's death "
                                f"({mode}): it hangs\n{describe()}")
                time.sleep(0.05)
        for p in procs:
            p.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)

    assert death["rank"] == 1 and death["step"] == script.STEPS_BEFORE_DEATH and death["mode"] == mode
    assert procs[1].exitcode == (-signal.SIGKILL if mode == "sigkill" else 0), describe()
    delay = _check_survivor(survivor, death, script.STEPS_BEFORE_DEATH)
    print(f"\n[spawn/{mode}] rank 0 raised {delay:.3f}s after rank 1 died: {survivor['type']}: "
          f"{survivor['message'][:120]}")
    assert not (_syncnorm_shm() - shm_before), f"left in /dev/shm: {sorted(_syncnorm_shm() - shm_before)}"


# ------------------------------------------------------------------------------------------ python -m syncnorm.launch

def _launcher_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and not k.startswith("PET_")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _alive_workers(out: Path) -> list[int]:
    """Pids of the script's workers that still run (torchrun starts them in sessions of their own)."""
    alive = []
    for pid_file in out.glob("rank*.pid"):
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ValueError, OSError):
            continue
        if SCRIPT.name.encode() in cmdline and state != "Z":
            alive.append(pid)
    return alive


def _kill_job(proc: subprocess.Popen, out: Path) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    for pid in _alive_workers(out):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize("mode", MODES)
def test_launched_job_fails_when_a_rank_dies(mode, tmp_path):
    shm_before = _syncnorm_shm()
    script = _load_script()
    out = tmp_path / "out"
    out.mkdir()
    log_path = tmp_path / "launcher.log"
    cmd = [sys.executable, "-m", "syncnorm.launch", "--nproc-per-node", str(WORLD), str(SCRIPT), mode, str(out)]
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_launcher_env(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def describe() -> str:
        return f"launcher exit code {proc.poll()}; output:\n{log_path.read_text()[-6000:]}"

    try:
        death = _wait_for_death(out, lambda: proc.poll() is not None, start + SETUP_LIMIT_S, describe)
        try:
            proc.wait(timeout=max(0.0, death["time"] + RAISE_LIMIT_S + GRACE_S - time.time()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not exit within {RAISE_LIMIT_S:.0f}s of rank 1's death ({mode}): it hangs\n"
                        f"{describe()}")
        exited = time.time()
        deadline = time.time() + 5  # the launcher has returned; its workers must be gone too
        while _alive_workers(out) and time.time() < deadline:
            time.sleep(0.05)
        left_running = _alive_workers(out)
    finally:
        _kill_job(proc, out)

    assert death["rank"] == 1 and death["step"] == script.STEPS_BEFORE_DEATH and death["mode"] == mode
    assert proc.returncode != 0, f"rank 1 died ({mode}) but the job succeeded\n{describe()}"
    delay = exited - death["time"]
    assert delay < RAISE_LIMIT_S, f"the job exited {delay:.1f}s after rank 1's death\n{describe()}"
    assert not left_running, f"workers {left_running} still run after the launcher exited"
    survivor = _read_json(out / "survivor0.json")
    if mode == "exit0":
        # torchrun sees rank 1 succeed: only rank 0's exception can fail the job
        assert survivor is not None, f"rank 0 recorded no exception\n{describe()}"
    if survivor is not None:  # after a SIGKILL torchrun may stop rank 0 before the exception reaches it
        raised = _check_survivor(survivor, death, script.STEPS_BEFORE_DEATH)
        raised_text = f"rank 0 raised after {raised:.3f}s ({survivor['type']}), "
    else:
        raised_text = "rank 0 stopped by torchrun before raising, "
    print(f"\n[launch/{mode}] {raised_text}job exited {delay:.3f}s after rank 1 died, code {proc.returncode}")
    assert not (_syncnorm_shm() - shm_before), f"left in /dev/shm: {sorted(_syncnorm_shm() - shm_before)}"
