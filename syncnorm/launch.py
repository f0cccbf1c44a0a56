"""``python -m syncnorm.launch [torchrun options] script.py [script args]``: torchrun with CPU/GPU defaults.

A thin layer over :mod:`torch.distributed.run`: it only fills in defaults on the argument list and hands it to
``torch.distributed.run.main``. Rendezvous, elastic agents, restarts and worker monitoring are torchrun's. Defaults,
each applied only when neither the option nor its torchrun environment variable (``PET_*``) is set:

- ``--nproc-per-node``: the number of visible CUDA devices, or 2 on a machine without CUDA;
- ``--standalone`` on a single node (no ``--nnodes`` above 1 and no rendezvous or master address given);
- ``OMP_NUM_THREADS`` = the usable CPU cores divided by the processes per node (at least 1), when unset.

In a process that torchrun already started (``TORCHELASTIC_RUN_ID``, or ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` in the
environment) it never spawns again: the script runs in this process, as plain ``python script.py`` would.

For scripts, :func:`init_distributed` creates the process group from torchrun's environment and returns the device of
this rank; :func:`check_world_size` turns a mismatch between the devices a script asks for and the launched world
into an error message that says which option to change.
"""

from __future__ import annotations

import atexit
import datetime
import os
import runpy
import sys
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

__all__ = [
    "build_torchrun_args",
    "main",
    "init_distributed",
    "check_world_size",
    "launched_by_torchrun",
    "record",
    "DEFAULT_CPU_PROCS",
]

#: processes per node on a machine without CUDA
DEFAULT_CPU_PROCS = 2

_PROG = "python -m syncnorm.launch"
_UNSET = object()
# torchrun options this module inspects: argparse dest -> environment variable torchrun reads as its default
_WATCHED = {
    "nproc_per_node": "PET_NPROC_PER_NODE",
    "nnodes": "PET_NNODES",
    "standalone": "PET_STANDALONE",
    "rdzv_backend": "PET_RDZV_BACKEND",
    "rdzv_endpoint": "PET_RDZV_ENDPOINT",
    "rdzv_id": "PET_RDZV_ID",
    "master_addr": "PET_MASTER_ADDR",
    "master_port": "PET_MASTER_PORT",
}


def launched_by_torchrun(environ: Optional[dict] = None) -> bool:
    """True when this process is a worker that torchrun (or another launcher speaking its protocol) started.

    Looks for ``TORCHELASTIC_RUN_ID``, or for all of ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``.
    """
    env = os.environ if environ is None else environ
    return "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def _parser():
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = _PROG
    parser.description = (
        "torchrun with syncnorm's defaults: --nproc-per-node = the CUDA device count (2 without CUDA), "
        "--standalone on one node, OMP_NUM_THREADS = cores / processes per node. Every torchrun option passes through."
    )
    return parser


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _given(parsed, dest: str, environ: dict) -> bool:
    return getattr(parsed, dest) is not _UNSET or _WATCHED[dest] in environ


def build_torchrun_args(argv: Sequence[str], *, cuda_device_count: Optional[int] = None,
                        environ: Optional[dict] = None) -> tuple[list[str], dict[str, str]]:
    """The torchrun argument list and the environment additions for ``argv`` (this launcher's command line).

    Returns ``(torchrun_argv, env)``: ``argv`` with the missing defaults inserted before the script (the user's own
    options and the script's arguments are kept verbatim and in order), and ``{"OMP_NUM_THREADS": n}`` when the
    variable is unset (else ``{}``). ``cuda_device_count`` defaults to ``torch.cuda.device_count()``; ``environ`` to
    ``os.environ`` (read only). Bad options exit with torchrun's argparse message and status 2.
    """
    env = dict(os.environ if environ is None else environ)
    argv = list(argv)
    parser = _parser()
    parser.set_defaults(**{dest: _UNSET for dest in _WATCHED})
    parsed = parser.parse_args(argv)
    # everything after the script belongs to the script (argparse.REMAINDER); options come before it
    n_options = len(argv) - 1 - len(parsed.training_script_args)
    options, script = argv[:n_options], argv[n_options:]
    extra: list[str] = []

    if _given(parsed, "nproc_per_node", env):
        nproc = parsed.nproc_per_node if parsed.nproc_per_node is not _UNSET else env["PET_NPROC_PER_NODE"]
    else:
        count = torch.cuda.device_count() if cuda_device_count is None else cuda_device_count
        nproc = str(count if count > 0 else DEFAULT_CPU_PROCS)
        extra += ["--nproc-per-node", nproc]

    nnodes = parsed.nnodes if parsed.nnodes is not _UNSET else env.get("PET_NNODES", "1")
    # torchrun itself reports these two as tracebacks (ValueError / AssertionError): check them here
    _check_nproc(parser, nproc)
    _check_nnodes(parser, nnodes)
    single_node = nnodes.split(":")[-1].strip() == "1"
    rendezvous_given = any(_given(parsed, d, env) for d in
                           ("standalone", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "master_addr", "master_port"))
    if single_node and not rendezvous_given:
        extra.append("--standalone")

    env_out: dict[str, str] = {}
    if "OMP_NUM_THREADS" not in env:
        try:
            from torch.distributed.run import determine_local_world_size

            local = max(1, determine_local_world_size(nproc))
        except ValueError:
            local = 1  # torchrun reports the bad value itself
        env_out["OMP_NUM_THREADS"] = str(max(1, _cpu_cores() // local))
    return options + extra + script, env_out


def _check_nproc(parser, nproc: str) -> None:
    from torch.distributed.run import determine_local_world_size

    if nproc.strip().lstrip("+-").isdigit() and int(nproc) < 1:
        parser.error(f"--nproc-per-node must be a positive int or one of cpu, gpu, auto; got {nproc!r}")
    try:
        determine_local_world_size(nproc)
    except ValueError as err:
        parser.error(f"--nproc-per-node must be a positive int or one of cpu, gpu, auto; got {nproc!r} ({err})")


def _check_nnodes(parser, nnodes: str) -> None:
    parts = nnodes.split(":")
    try:
        bounds = [int(p) for p in parts]
    except ValueError:
        bounds = []
    if len(parts) not in (1, 2) or len(bounds) != len(parts) or bounds[0] < 1 or bounds[-1] < bounds[0]:
        parser.error(f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX; got {nnodes!r}")


def _run_in_process(argv: list[str]) -> None:
    parsed = _parser().parse_args(argv)
    if parsed.no_python:
        os.execvp(parsed.training_script, [parsed.training_script, *parsed.training_script_args])
    sys.argv = [parsed.training_script, *parsed.training_script_args]
    if parsed.module:
        runpy.run_module(parsed.training_script, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(parsed.training_script)))
        runpy.run_path(parsed.training_script, run_name="__main__")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m syncnorm.launch`` and ``syncnorm launch``; returns the exit status.

    0 when every worker succeeded; the first failed worker's exit code (1 if it has none) when torchrun reports a
    failure; argparse's 2 for bad options (raised as SystemExit). Inside a torchrun worker it runs the script in
    this process instead (see the module docstring).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if launched_by_torchrun():
        _run_in_process(argv)
        return 0
    torchrun_argv, env = build_torchrun_args(argv)
    os.environ.update(env)  # workers inherit the launcher's environment

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(torchrun_argv)
    except ChildFailedError as err:
        # torchrun's summary: failed ranks, exit codes and, from the error files, the workers' tracebacks
        print(err, file=sys.stderr, flush=True)
        _, failure = err.get_first_failure()
        return failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
    return 0


# --------------------------------------------------------------------------------------------------- in scripts

def record(fn):
    """torchrun's :func:`torch.distributed.elastic.multiprocessing.errors.record`: decorate a script's ``main`` so
    that an uncaught exception lands in torchrun's error file (its failure summary then shows the real traceback)."""
    from torch.distributed.elastic.multiprocessing.errors import record as _record

    return _record(fn)


_STATE: dict = {"initialised_here": False, "hook_installed": False}


def _install_error_recording() -> None:
    # the effect of @record for scripts that only call init_distributed(): uncaught exceptions go to the error file
    if _STATE["hook_installed"] or "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    handler = get_error_handler()
    handler.initialize()
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if isinstance(exc, Exception):
            try:
                # record_exception reads the traceback from sys.exc_info(): make exc the exception being handled
                raise exc.with_traceback(tb)
            except Exception:  # noqa: BLE001
                try:
                    handler.record_exception(exc)
                except Exception:  # noqa: BLE001 - never hide the original error
                    pass
        previous(exc_type, exc, tb)

    sys.excepthook = hook
    _STATE["hook_installed"] = True


def _destroy() -> None:
    if _STATE["initialised_here"] and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _STATE["initialised_here"] = False


def _device_for(backend: str) -> torch.device:
    if backend != "nccl" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"init_distributed: LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible on this node; "
            f"launch at most {count} process(es) per node (--nproc-per-node {count})"
        )
    return torch.device("cuda", local_rank)


def init_distributed(timeout: Union[float, datetime.timedelta] = 1800.0,
                     backend: Optional[str] = None) -> torch.device:
    """Create the default process group from torchrun's environment and return this rank's device.

    - Backend: ``backend`` if given, else ``"nccl"`` when CUDA is available and ``"gloo"`` otherwise.
    - Device: ``cuda:LOCAL_RANK`` (made the current CUDA device) with NCCL, else ``cpu``. A ``LOCAL_RANK`` beyond the
      visible devices raises RuntimeError naming both numbers.
    - Environment: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` as torchrun sets them. Without them
      (plain ``python script.py``) it creates a world of one process on an in-memory store, so the same script,
      DDP included, runs unchanged.
    - ``timeout``: seconds (or a timedelta) before a collective that some rank never joins fails.
    - Already initialised (by this function, Lightning or the script): a no-op that returns the device of the
      existing group's backend.
    - The group this function created is destroyed at interpreter exit (``atexit``). Under torchrun an uncaught
      exception of the script is written to torchrun's error file (``TORCHELASTIC_ERROR_FILE``), as with ``@record``.
    """
    if not dist.is_available():
        raise RuntimeError("init_distributed: this PyTorch build has no torch.distributed support")
    if dist.is_initialized():
        return _device_for(str(dist.get_backend()))
    if not isinstance(timeout, datetime.timedelta):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"init_distributed: timeout must be a positive number of seconds, got {timeout!r}")
        timeout = datetime.timedelta(seconds=float(timeout))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    _install_error_recording()
    device = _device_for(backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    _STATE["initialised_here"] = True
    atexit.register(_destroy)
    return device


def check_world_size(devices: int, num_nodes: int = 1) -> int:
    """Check that the launched world matches ``devices`` processes per node on ``num_nodes`` nodes; return its size.

    Under torchrun (see :func:`launched_by_torchrun`) raises ValueError when ``devices * num_nodes`` differs from
    ``WORLD_SIZE`` or ``devices`` from ``LOCAL_WORLD_SIZE``; the message gives the launched layout and the options
    that would match it (for Lightning: ``Trainer(devices=..., num_nodes=...)`` against torchrun's
    ``--nproc-per-node``/``--nnodes``). Outside torchrun there is nothing to check and it returns
    ``devices * num_nodes`` (Lightning then starts the processes itself).
    """
    for name, value in (("devices", devices), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"check_world_size: {name} must be a positive int, got {value!r}")
    expected = devices * num_nodes
    if not launched_by_torchrun():
        return expected
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if expected != world or devices != local:
        nodes = world // local if local and world % local == 0 else "?"
        raise ValueError(
            f"world size mismatch: the script asks for devices*num_nodes = {devices}*{num_nodes} = {expected} "
            f"processes, but it was launched with WORLD_SIZE={world} ({local} process(es) per node on {nodes} "
            f"node(s)). Pass devices={local}, num_nodes={nodes} to the script, or launch it with "
            f"--nproc-per-node {devices} --nnodes {num_nodes}."
        )
    return world


if __name__ == "__main__":
    sys.exit(main())
