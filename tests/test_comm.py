"""syncnorm.comm's same-host shared-memory all-reduce against gloo, in one spawned world per size."""

from __future__ import annotations

import os

import pytest
import torch

from syncnorm import _ext, comm
from tests.dist.harness import RankFailure, free_port, run_distributed

pytestmark = pytest.mark.skipif(_ext.ops() is None, reason="the C++ CPU kernels are unavailable here")


def _vector(n: int, dtype, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return (torch.randn(n, generator=g, dtype=torch.float64) * 10 ** (seed % 5)).to(dtype)


def _transport_checks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    out: dict = {}
    channel = comm._same_host_channel(None)
    out["channel"] = channel is not None
    sizes = [1, 7, 514, 4099, comm.SHM_SLOT_BYTES // 8, comm.SHM_SLOT_BYTES // 8 + 1]  # the last one: gloo
    errs = []
    # many rounds back to back: both banks are reused, sizes and dtypes change between rounds
    for seed in range(40):
        for dtype in (torch.float64, torch.float32):
            n = sizes[seed % len(sizes)]
            mine = _vector(n, dtype, rank, seed)
            got = comm.all_reduce_sum(mine.clone())
            exact = sum(_vector(n, torch.float64, r, seed).to(dtype).double() for r in range(world))
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            if not torch.allclose(got.double(), exact, rtol=tol, atol=tol * 10 ** (seed % 5)):
                errs.append(f"round {seed} {dtype} n={n}: wrong sum")
            # identical bits on every rank
            gathered = [torch.empty_like(got) for _ in range(world)]
            dist.all_gather(gathered, got)
            if not all(torch.equal(g, gathered[0]) for g in gathered):
                errs.append(f"round {seed} {dtype} n={n}: ranks disagree")
    out["errors"] = errs
    # a subgroup of the first two ranks gets its own channel and sums only within itself
    sub = comm.new_groups(2) if world % 2 == 0 else None
    if sub is not None:
        v = torch.full((5,), float(rank + 1), dtype=torch.float64)
        comm.all_reduce_sum(v, sub)
        lo = (rank // 2) * 2
        out["subgroup_ok"] = bool(torch.all(v == float(lo + 1 + lo + 2)))
        out["subgroup_channel"] = comm._same_host_channel(sub) is not None
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_all_reduce_matches_exact_sum(world):
    results = run_distributed(_transport_checks, world, timeout=240)
    for r in results:
        assert r["channel"], "the ranks of a same-host gloo world should share memory"
        assert not r["errors"], r["errors"]
        if "subgroup_ok" in r:
            assert r["subgroup_ok"] and r["subgroup_channel"]


def _disabled_check(rank: int, world: int) -> dict:
    v = torch.ones(3, dtype=torch.float64)
    comm.all_reduce_sum(v)
    return {"channel": comm._same_host_channel(None) is not None, "sum": v.tolist()}


def test_shared_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SYNCNORM_SHM", "0")  # inherited by the spawned ranks
    for r in run_distributed(_disabled_check, 2, timeout=120):
        assert not r["channel"] and r["sum"] == [2.0, 2.0, 2.0]


def _missing_peer(rank: int, world: int) -> dict:
    comm.all_reduce_sum(torch.ones(4, dtype=torch.float64))  # both ranks: sets the channel up
    if rank == 1:
        return {"skipped": True}  # rank 1 never joins the next one
    comm.all_reduce_sum(torch.ones(4, dtype=torch.float64))
    return {"skipped": False}


def test_missing_peer_raises_instead_of_hanging(monkeypatch):
    monkeypatch.setenv("SYNCNORM_SHM_TIMEOUT", "3")
    with pytest.raises(RankFailure, match="did not reach the shared-memory all-reduce"):
        run_distributed(_missing_peer, 2, timeout=120)


def test_no_collective_and_no_channel_without_distributed():
    before = dict(comm._channels)
    t = torch.ones(2)
    assert comm.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0]
    assert comm._channels == before


def _mismatched_sizes(rank: int, world: int) -> dict:
    import time

    comm.all_reduce_sum(torch.ones(4, dtype=torch.float64))  # sets the channel up
    out = {}
    big = comm.SHM_SLOT_BYTES // 8 + 1  # too big for the shared slot: goes through gloo
    cases = {
        "both shared": 4 + rank,  # a bug on the caller's side
        # one rank's vector fits the shared slot and the other's does not: without the size announcement the
        # first would wait in shared memory and the second in gloo, each until its timeout
        "straddle": 4 if rank == 0 else big,
        "both gloo": big + rank,
    }
    for name, n in cases.items():
        t0 = time.perf_counter()
        try:
            comm.all_reduce_sum(torch.ones(n, dtype=torch.float64))
            out[name] = (None, time.perf_counter() - t0)
        except RuntimeError as e:
            out[name] = (str(e), time.perf_counter() - t0)
    # the channel is still usable afterwards: both ranks stayed in step
    v = torch.full((3,), float(rank + 1), dtype=torch.float64)
    comm.all_reduce_sum(v)
    out["after"] = v.tolist()
    w = torch.full((big,), float(rank + 1), dtype=torch.float64)
    comm.all_reduce_sum(w)
    out["after big"] = (w.min().item(), w.max().item())
    return out


def test_mismatched_sizes_raise_on_every_rank():
    # gloo refuses mismatched all-reduces; the shared-memory transport must not sum stale bytes instead, and a
    # mismatch across the two transports must raise promptly rather than hang (SYNCNORM_SHM_TIMEOUT is 1800 s)
    for r in run_distributed(_mismatched_sizes, 2, timeout=120):
        for name in ("both shared", "straddle", "both gloo"):
            error, seconds = r[name]
            assert error is not None and "mismatch" in error, (name, r)
            assert seconds < 30, (name, seconds)
        assert r["after"] == [3.0, 3.0, 3.0] and r["after big"] == (3.0, 3.0), r


def _one_rank_opts_out(rank: int, world: int) -> dict:
    if rank == 1:
        os.environ["SYNCNORM_SHM"] = "0"  # this rank alone: the group must still agree (gloo for everyone)
    v = torch.full((3,), float(rank + 1), dtype=torch.float64)
    comm.all_reduce_sum(v)
    return {"channel": comm._same_host_channel(None) is not None, "sum": v.tolist()}


def test_ranks_with_different_settings_agree():
    for r in run_distributed(_one_rank_opts_out, 2, timeout=120):
        assert not r["channel"] and r["sum"] == [3.0, 3.0, 3.0]


def _direct_route_checks(rank: int, world: int, port: int, store_dir: str) -> dict:
    import torch.nn as nn

    import syncnorm
    from tests.dist.harness import CollectiveLedger

    ops = _ext.ops()
    calls = []

    def spy(tensor, key):  # counts the kernels' calls back into Python
        calls.append(tensor.numel())
        _ext._reduce(tensor, key)

    ops.set_reducer(spy)
    out: dict = {}
    try:
        comm.all_reduce_sum(torch.zeros(1, dtype=torch.float64))  # sets the channel up
        channel = comm._same_host_channel(None)

        def step(layer, x):
            # (rounds taken, Python calls) by the forward and by the backward, and the results
            x = x.clone().requires_grad_(True)
            r0, c0 = channel.rounds, len(calls)
            y = layer(x)
            r1, c1 = channel.rounds, len(calls)
            y.backward(torch.cos(y.detach()))
            r2, c2 = channel.rounds, len(calls)
            return (r1 - r0, c1 - c0, r2 - r1, c2 - c1), y.detach(), x.grad

        torch.manual_seed(0)
        x = torch.randn(3 + rank, 8, 4, 4)
        bn = syncnorm.SyncBatchNorm(8)
        out["sync"], y, dx = step(bn, x)
        with CollectiveLedger() as led:  # a replaced comm.all_reduce_sum sees every collective
            out["sync_ledger"], y2, dx2 = step(bn, x)
        out["ledger"] = [e[0] for e in led.entries]
        out["same_as_ledger_run"] = bool(torch.equal(y, y2) and torch.equal(dx, dx2))
        # one rank instrumented, the other not: still in step, same results
        if rank == 0:
            with CollectiveLedger():
                _, y3, dx3 = step(bn, x)
        else:
            _, y3, dx3 = step(bn, x)
        out["mixed_same"] = bool(torch.equal(y, y3) and torch.equal(dx, dx3))
        # a forward vector too big for the slot (CBN's weight-gradient payload, (1 + 256) * 1152 fp64 values):
        # the kernels hand it to Python (announced, then gloo); the backward's 2C values go direct
        torch.manual_seed(1)
        conv = nn.Conv2d(128, 256, 3, padding=1, bias=False)
        net = nn.Sequential(conv, syncnorm.CrossIterationBatchNorm(256, window=2).attach(conv))
        out["big"], _, _ = step(net, torch.randn(1 + rank, 128, 4, 4))
        out["big_payload_bytes"] = (1 + 256) * 1152 * 8
        out.update(_waiting_keeps_other_threads_running(rank, channel, bn, x))
    finally:
        ops.set_reducer(_ext._reduce)
    out.update(_new_world_checks(rank, bn, port, store_dir))  # last: it replaces the world
    return out


def _new_world_checks(rank: int, bn, port: int, store_dir: str) -> dict:
    # A layer's reducer key is cached: a destroyed and re-created world must still be seen. Each rank first
    # re-initialises as a world of its own (no collective: this rank's batch alone, although the old world's
    # channel is still mapped), then both join a new 2-rank world (global statistics again, over its own channel).
    import torch.distributed as dist
    import torch.nn.functional as F

    def reference(x, full):
        ref = F.batch_norm(full.double(), None, None, training=True, eps=bn.eps)
        ref = ref * bn.weight.detach().double().view(1, -1, 1, 1) + bn.bias.detach().double().view(1, -1, 1, 1)
        start = 0 if full.shape[0] == x.shape[0] or rank == 0 else full.shape[0] - x.shape[0]
        return ref[start:start + x.shape[0]]

    torch.manual_seed(0)
    x0 = torch.randn(3, 8, 4, 4)
    torch.manual_seed(0)
    x1 = torch.randn(4, 8, 4, 4)
    x = (x0, x1)[rank]
    out: dict = {}
    bn(x)  # the key of this world is cached
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/alone_{rank}", rank=0, world_size=1)
    out["alone_err"] = float((bn(x).double() - reference(x, x)).abs().max())
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out["together_err"] = float((bn(x).double() - reference(x, torch.cat([x0, x1]))).abs().max())
    return out


def _waiting_keeps_other_threads_running(rank: int, channel, bn, x) -> dict:
    # While a rank waits in the kernels for a late peer, its other Python threads run, and touching the same
    # channel from one of them neither deadlocks nor freezes the rest (the channel's lock is never taken, nor held
    # while waiting, with the GIL).
    import threading
    import time

    out: dict = {}
    stop = threading.Event()
    beats: list = []

    def heartbeat():
        while not stop.is_set():
            beats.append(time.perf_counter())
            time.sleep(0.01)

    def reader():  # reads the round counter while the forward below waits
        while not stop.is_set():
            channel.rounds
            time.sleep(0.01)

    threads = [threading.Thread(target=f, daemon=True) for f in (heartbeat, reader)] if rank == 0 else []
    for t in threads:
        t.start()
    if rank == 1:
        time.sleep(1.0)  # late for the forward
    bn(x)
    # a backward in a worker thread waits (without the GIL) for the late peer while this thread calls into the
    # channel
    y = bn(x.clone().requires_grad_(True))
    if rank == 1:
        time.sleep(1.0)
        y.sum().backward()
    else:
        worker = threading.Thread(target=lambda: y.sum().backward())
        worker.start()
        time.sleep(0.3)
        channel.rounds
        worker.join()
    stop.set()
    for t in threads:
        t.join()
    if rank == 0:
        out["max_heartbeat_gap_s"] = max(b - a for a, b in zip(beats, beats[1:]))
    return out


def test_kernels_use_the_channel_directly(tmp_path):
    for r in run_distributed(_direct_route_checks, 2, free_port(), str(tmp_path), timeout=180):
        # one round each way, no call into Python
        assert r["sync"] == (1, 0, 1, 0), r
        # with comm.all_reduce_sum replaced, the same rounds, through Python, seen by the replacement
        assert r["sync_ledger"] == (1, 1, 1, 1) and r["ledger"] == ["all_reduce_sum"] * 2, r
        assert r["same_as_ledger_run"] and r["mixed_same"], r
        # the oversized forward vector: Python, which announces it on the channel (one round) and uses gloo
        assert r["big_payload_bytes"] > comm.SHM_SLOT_BYTES
        assert r["big"] == (1, 1, 1, 0), r
        # rank 0 waited about 1 s for its peer twice, with a thread touching the channel: nothing froze
        if "max_heartbeat_gap_s" in r:
            assert r["max_heartbeat_gap_s"] < 0.5, r
        # a new world after destroy_process_group: alone, this rank's statistics; together, the global ones
        assert r["alone_err"] < 1e-5 and r["together_err"] < 1e-5, r
