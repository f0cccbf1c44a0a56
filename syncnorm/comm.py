"""The only module of syncnorm that touches ``torch.distributed``.

Every helper gives the single-process answer when ``torch.distributed`` is unavailable or not initialised, so the
layers never check for it themselves. The statistics path calls :func:`all_reduce_sum` exactly once per layer in
forward and once in backward; tests wrap that function to count collectives (see ``tests/dist``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = [
    "is_initialized",
    "is_process_group",
    "get_world_size",
    "get_rank",
    "get_backend",
    "all_reduce_sum",
    "all_reduce_max",
    "all_gather_object",
    "broadcast_object",
    "barrier",
    "new_groups",
    "group_ranks",
    "ProcessGroup",
]

ProcessGroup = Any  # torch.distributed.ProcessGroup, kept loose so type hints work without distributed support


def is_initialized() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def is_process_group(obj: Any) -> bool:
    """Whether ``obj`` can be a layer's ``process_group``: None (the default group) or a
    ``torch.distributed.ProcessGroup``."""
    return obj is None or (dist.is_available() and isinstance(obj, dist.ProcessGroup))


def get_world_size(group: Optional[ProcessGroup] = None) -> int:
    """Number of ranks in ``group`` (default: the world); 1 when distributed is not initialised."""
    if not is_initialized():
        return 1
    return dist.get_world_size(group)


def get_rank(group: Optional[ProcessGroup] = None) -> int:
    """This process's rank within ``group`` (default: the world); 0 when distributed is not initialised."""
    if not is_initialized():
        return 0
    return dist.get_rank(group)


def get_backend(group: Optional[ProcessGroup] = None) -> Optional[str]:
    """Backend name of ``group`` ("gloo", "nccl", ...), or None when distributed is not initialised."""
    if not is_initialized():
        return None
    return str(dist.get_backend(group))


def all_reduce_sum(tensor: torch.Tensor, group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group``, in place, and return it.

    This is the one collective of the statistics path: callers pack everything they need into a single flat
    vector whose size depends on the number of channels only, never on the world size. With a world of 1 it
    returns ``tensor`` untouched and issues no collective.

    Transport: ``torch.distributed.all_reduce`` on the group's backend, except for a contiguous float32/float64
    CPU vector of at most :data:`SHM_SLOT_BYTES` in a gloo group whose ranks all run on this host: that goes
    through a shared-memory region the group maps once (see :class:`SameHostChannel`). The result is the same
    sum, bit-identical on every rank, without gloo's per-call latency (about 2 ms on a 2-core VM, more than a
    whole small BatchNorm layer). In such a group every other tensor is announced through shared memory (its size
    and dtype, no data) before the backend's all-reduce, so calls that do not match across ranks raise a
    RuntimeError on every rank instead of hanging. ``SYNCNORM_SHM=0`` turns the shared-memory transport off.

    The C++ kernels' training steps put the vectors that fit the slot on the same channel themselves, without
    calling this function (they call it for everything else, and for everything of a layer whose forward ran
    while this function was replaced, e.g. by a test's ledger, backward included); both draw rounds from the
    channel's one counter, so the order is the same.
    """
    world, channel = _route(group)
    if world == 1:
        return tensor
    if channel is not None:
        if tensor.is_cpu and tensor.dtype in _SHM_DTYPES and tensor.is_contiguous() and channel.fits(tensor):
            channel.all_reduce_sum(tensor)
            return tensor
        # this one goes through the backend; a header-only round first, so that a mismatched call on a peer
        # (one that went through shared memory) raises on every rank now instead of leaving each rank waiting in
        # a different transport until a timeout
        channel.announce(tensor)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


_routes: dict = {}  # id(group) -> (group, default group it was decided under, world size, channel or None)


def _route(group: Optional[ProcessGroup]) -> tuple[int, Optional["SameHostChannel"]]:
    # (world size, same-host channel or None) of `group`, decided once per group and default group (a group's size
    # and transport never change; a destroyed and re-created world is a new default group). all_reduce_sum runs
    # twice per layer per training step, so it must not re-query torch.distributed each time (~20 us per call).
    default = _default_group()
    entry = _routes.get(id(group))
    if entry is not None and entry[0] is group and entry[1] is default:
        return entry[2], entry[3]
    world = get_world_size(group)
    # opening the channel is collective: every rank of the group reaches it at the same (first) collective
    channel = _same_host_channel(group) if world > 1 else None
    _routes[id(group)] = (group, default, world, channel)  # keeps `group` alive, so its id is not reused
    return world, channel


_c10d = dist.distributed_c10d if dist.is_available() else None


def _default_group():
    # the default process group object, or None when torch.distributed is unavailable or not initialised (read on
    # every training forward of every layer, through _ext.reducer_key)
    return None if _c10d is None else _c10d._world.default_pg


# ---------------------------------------------------------------------------------------------------------------
# same-host shared-memory transport for the small CPU vectors of the statistics path
# ---------------------------------------------------------------------------------------------------------------

SHM_SLOT_BYTES = 1 << 20  # largest vector (bytes) sent through shared memory; larger ones use the backend
_SHM_DEFAULT_TIMEOUT = 1800.0  # seconds a rank waits for its peers: gloo's default process-group timeout
_SHM_DTYPES = (torch.float32, torch.float64)
_channels: dict = {}  # id(group) -> (group, SameHostChannel or None), decided identically on every rank


def _shm_enabled() -> bool:
    return os.environ.get("SYNCNORM_SHM", "1").strip().lower() not in ("0", "false", "off", "no")


class SameHostChannel:
    """A shared-memory all-reduce among the ranks of one gloo process group on one host.

    Created collectively (see :func:`_same_host_channel`): group rank 0 creates a file in ``/dev/shm`` (the
    temporary directory where there is none), every rank maps it, then it is unlinked, so nothing outlives the
    processes. The synchronisation and the rank-ordered sum are in the C++ kernels (``shm_all_reduce`` in
    ``syncnorm/csrc/norm_cpu.cpp``), which also keep the channel's round counter (``handle`` names the channel
    there). The kernels' training steps exchange their statistics vectors over the channel directly, without a
    call back into Python (see :func:`syncnorm._ext.reducer_key`); every exchange, from here or from the kernels,
    takes the next round of the same counter. A rank that never arrives makes its peers raise after
    ``SYNCNORM_SHM_TIMEOUT`` seconds (default 1800, gloo's default timeout) instead of hanging. Whether a group
    uses the channel is decided from every rank's settings (host, ``SYNCNORM_SHM``, the C++ kernels, the timeout),
    so all ranks agree.
    """

    def __init__(self, ops, mapping, address: int, rank: int, world: int, capacity: int, timeout: float) -> None:
        self._ops, self._mapping, self._address = ops, mapping, address
        self.rank, self.world, self.capacity, self.timeout = rank, world, capacity, timeout
        self.handle: int = ops.shm_open(address, rank, world, capacity, timeout)

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` (contiguous, CPU, float32/float64) fits one slot."""
        return tensor.numel() * tensor.element_size() <= self.capacity

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """In-place sum over the group's ranks; every rank must call it in the same order with the same size."""
        self._ops.shm_round(self.handle, tensor)

    def announce(self, tensor: torch.Tensor) -> None:
        """A round that exchanges only ``tensor``'s byte size and dtype: raises RuntimeError on every rank when a peer
        posted a different size or dtype in the same round (the caller then all-reduces ``tensor`` elsewhere)."""
        self._ops.shm_round(self.handle, tensor, True)

    @property
    def rounds(self) -> int:
        """Rounds taken on this channel so far, from Python and from the kernels."""
        return self._ops.shm_rounds(self.handle)


def _same_host_channel(group: Optional[ProcessGroup]) -> Optional[SameHostChannel]:
    # keyed by the process-group object itself (the default group's too): a destroyed and re-created world gets
    # a new channel; the dict keeps every group it has seen alive, so an id is never reused
    pg = dist.group.WORLD if group is None else group
    key = id(pg)
    entry = _channels.get(key)
    if entry is not None:
        return entry[1]
    channel = None
    if get_backend(group) == "gloo":
        channel = _open_channel(group)  # collective: every rank of a gloo group takes part, enabled or not
    _channels[key] = (pg, channel)
    return channel


def _open_channel(group: Optional[ProcessGroup]) -> Optional[SameHostChannel]:
    # Collective over the group (every rank reaches it at the same all_reduce_sum call); every rank decides the
    # same: a channel for all, or gloo for all.
    import ctypes
    import mmap
    import socket
    import tempfile
    import uuid

    from . import _ext

    world, rank = get_world_size(group), get_rank(group)
    enabled = _shm_enabled()
    ops = _ext.ops() if enabled else None
    try:
        timeout = float(os.environ.get("SYNCNORM_SHM_TIMEOUT", str(_SHM_DEFAULT_TIMEOUT)))
        timeout_ok = timeout > 0
    except ValueError:
        timeout, timeout_ok = _SHM_DEFAULT_TIMEOUT, False
    # every rank's settings go into the decision, so that ranks with different environments still agree
    infos = all_gather_object((socket.gethostname(), enabled, ops is not None, timeout_ok), group)
    if any(host != infos[0][0] or not (on and has_ops and ok) for host, on, has_ops, ok in infos):
        if enabled and not timeout_ok:
            import warnings

            warnings.warn(f"syncnorm: SYNCNORM_SHM_TIMEOUT={os.environ.get('SYNCNORM_SHM_TIMEOUT')!r} is not a "
                          "positive number of seconds; this process group uses gloo for its statistics",
                          RuntimeWarning, stacklevel=3)
        return None
    capacity = SHM_SLOT_BYTES
    size = 64 * world + 2 * world * capacity
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = None
    if rank == 0:
        path = os.path.join(directory, f"syncnorm-{uuid.uuid4().hex}")
        try:
            with open(path, "wb") as f:
                f.truncate(size)
        except OSError:
            path = None
    path = broadcast_object(path, src=group_ranks(group)[0], group=group)
    if path is None:
        return None
    mapping = None
    try:
        with open(path, "r+b") as f:
            mapping = mmap.mmap(f.fileno(), size)
    except OSError:
        mapping = None
    ok = all_gather_object(mapping is not None, group)
    barrier(group)  # everyone has opened (or failed to open) the file: it can go
    if rank == 0:
        try:
            os.unlink(path)
        except OSError:
            pass
    if not all(ok):
        return None
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    return SameHostChannel(ops, mapping, address, rank, world, capacity, timeout)


def all_reduce_max(tensor: torch.Tensor, group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over ``group``, in place (monitoring and PreciseBN helpers)."""
    if get_world_size(group) == 1:
        return tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def all_gather_object(obj: Any, group: Optional[ProcessGroup] = None) -> list:
    """Gather a picklable object from every rank of ``group``; ``[obj]`` when not distributed."""
    world = get_world_size(group)
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: Optional[ProcessGroup] = None) -> Any:
    """Broadcast a picklable object from global rank ``src``; returns ``obj`` when not distributed."""
    if get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group: Optional[ProcessGroup] = None) -> None:
    """Synchronise the ranks of ``group``; a no-op when not distributed."""
    if get_world_size(group) > 1:
        dist.barrier(group=group)


def group_ranks(group: Optional[ProcessGroup] = None) -> list[int]:
    """Global ranks that belong to ``group`` (the whole world for None); ``[0]`` when not distributed."""
    if not is_initialized():
        return [0]
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def new_groups(group_size: int) -> Optional[ProcessGroup]:
    """Split the world into consecutive groups of ``group_size`` ranks and return this rank's group.

    Ranks ``[0, k)``, ``[k, 2k)``, ... form the groups. Every rank must call this function, in the same order
    relative to other group creations, because ``torch.distributed.new_group`` is itself collective. Pass the
    result as ``process_group=`` to any syncnorm layer (or to :func:`syncnorm.convert`) to synchronise statistics
    only within groups of ``group_size`` ranks, for example the GPUs of one node.

    Returns None when distributed is not initialised (a single process is its own group), and the default group
    when ``group_size`` equals the world size. Raises ValueError when ``group_size`` is not a positive divisor of
    the world size.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"new_groups: group_size must be an int, got {type(group_size).__name__}")
    if not is_initialized():
        if group_size != 1:
            raise ValueError(
                f"new_groups: group_size={group_size} needs an initialised process group of at least that many "
                "ranks; torch.distributed is not initialised (world size 1)"
            )
        return None
    world = dist.get_world_size()
    if group_size < 1 or world % group_size != 0:
        raise ValueError(
            f"new_groups: group_size must be a positive divisor of the world size {world}, got {group_size}"
        )
    if group_size == world:
        return dist.group.WORLD
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, group_size):
        ranks = list(range(start, start + group_size))
        group = dist.new_group(ranks)  # collective over the whole world: every rank creates every group
        if rank in ranks:
            mine = group
    return mine
