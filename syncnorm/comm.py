"""The only module of syncnorm that touches ``torch.distributed``.

Every helper gives the single-process answer when ``torch.distributed`` is unavailable or not initialised, so the
layers never check for it themselves. The statistics path calls :func:`all_reduce_sum` exactly once per layer in
forward and once in backward; tests count them at the backend with the profiler (see ``tests/dist``). There is no
other transport: every collective of syncnorm is a ``torch.distributed`` one.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

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
    """The sum of ``tensor`` over the ranks of ``group``; use the returned tensor.

    This is the one collective of the statistics path: callers pack everything they need into a single flat
    vector whose size depends on the number of channels only, never on the world size. With a world of 1 it
    returns ``tensor`` untouched and issues no collective.

    Eager, it is ``torch.distributed.all_reduce`` in place on the group's backend (gloo, NCCL, ...), so the
    backend's timeout, dead-peer detection, the profiler and ``TORCH_DISTRIBUTED_DEBUG`` see it. While
    ``torch.compile`` traces, it is the functional collective (``torch.distributed._functional_collectives``), which
    the compiler puts in the graph; ``tensor`` is then left as it was.
    """
    if get_world_size(group) == 1:
        return tensor
    if torch.compiler.is_compiling():
        return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", dist.group.WORLD if group is None else group))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


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
