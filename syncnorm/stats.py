"""Per-channel moments: the packed vector of the forward collective, the exact merge, and the deferred checks.

Every syncnorm layer gets its batch statistics from :func:`all_reduce_stats` (and :func:`global_moments`):

1. **Local sums.** The custom op :func:`syncnorm.ops.batch_stats` reduces this rank's ``(N, C, *)`` input to the
   fp64 vector ``[n, flag, sum x, sum x^2]`` (``2C + 2`` values; a caller's payload may follow). A rank whose input
   is invalid sends zeros with ``flag = 1`` instead.
2. **One collective.** :func:`syncnorm.comm.all_reduce_sum` sums that vector over the process group, so the bytes a
   rank sends do not depend on the world size.
3. **Global moments** ``(N, mean, M2)`` come out of the summed vector in fp64 (in the training step: inside the op
   :func:`syncnorm.ops.forward_epilogue`; elsewhere: :func:`unpack`); the merge is exact (Chan et al.), so uneven
   and empty per-rank batches are weighted by their element counts.

No value is read on the host on the way: the count and the error flag stay tensors. What is checked on them (a
peer's invalid input, one value per channel in the whole group) goes through :func:`require`, which raises at once
on CPU and, on accelerators, as soon as the device has produced the flag (see :func:`raise_pending_errors`).

:class:`Moments` also merges with moments from elsewhere (earlier micro-batches for CmBN, compensated history for
CBN, accumulated batches for PreciseBN) with the same exact formula.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from . import comm, ops
from .ops import accumulation_dtype

__all__ = [
    "Moments",
    "accumulation_dtype",
    "global_moments",
    "all_reduce_stats",
    "moments_of",
    "unpack",
    "PeerInputError",
    "require",
    "require_each",
    "Check",
    "raise_pending_errors",
    "all_reduce_moments",
    "merge_all",
    "capturing",
]

_STATS_DTYPE = torch.float64  # dtype of the packed vector and of the global moments


class PeerInputError(ValueError):
    """Raised on the ranks whose own input was valid when another rank of the group had invalid input.

    The rank with the invalid input raises the detailed ValueError/TypeError; the others raise this, so no rank
    hangs in a collective its peers never join.
    """


class Moments(NamedTuple):
    """Per-channel moments of a set of values, in fp64.

    ``count`` is a 0-d tensor (the number of values per channel, the same for every channel), ``mean`` and ``m2``
    have shape ``(C,)``; ``m2`` is the sum of squared deviations from ``mean``.
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @staticmethod
    def empty(num_features: int, device=None) -> "Moments":
        """Moments of no values (count 0, mean 0, m2 0)."""
        z = torch.zeros(num_features, dtype=_STATS_DTYPE, device=device)
        return Moments(torch.zeros((), dtype=_STATS_DTYPE, device=device), z, z.clone())

    @staticmethod
    def from_mean_var(count, mean: torch.Tensor, var: torch.Tensor) -> "Moments":
        """Moments of ``count`` values with the given mean and *biased* variance."""
        mean = mean.to(_STATS_DTYPE)
        count = torch.as_tensor(count, dtype=_STATS_DTYPE, device=mean.device)
        return Moments(count, mean, var.to(_STATS_DTYPE) * count)

    def var(self, unbiased: bool = False) -> torch.Tensor:
        """Biased (``m2 / n``) or unbiased (``m2 / (n - 1)``) variance; 0 where the count is too small."""
        denom = self.count - 1 if unbiased else self.count
        return torch.where(denom > 0, self.m2 / denom.clamp_min(1), torch.zeros_like(self.m2))

    def merge(self, other: "Moments") -> "Moments":
        """Exact moments of the union of both sets (Chan's parallel update); either may be empty."""
        n = self.count + other.count
        safe_n = torch.where(n > 0, n, torch.ones_like(n))
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / safe_n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / safe_n)
        return Moments(n, mean, m2)

    def detach(self) -> "Moments":
        """The same moments with every tensor detached from autograd."""
        return Moments(self.count.detach(), self.mean.detach(), self.m2.detach())


def unpack(stats: torch.Tensor, num_features: int) -> Moments:
    """The :class:`Moments` of a (summed) ``[n, flag, sum x, sum x^2, ...]`` vector, all fp64 tensors."""
    n = stats[0]
    safe_n = n.clamp_min(1)
    s1 = stats[2:2 + num_features]
    mean = s1 / safe_n
    m2 = (stats[2 + num_features:2 + 2 * num_features] - mean * s1).clamp_min(0)
    return Moments(n.clone(), mean, m2)


def moments_of(x: torch.Tensor) -> Moments:
    """Local fp64 :class:`Moments` of an ``(N, C, *)`` tensor (no collective)."""
    return unpack(ops.batch_stats(x.detach(), x.shape[1]), x.shape[1])


def _error_vector(num_features: int, extra_numel: int, device) -> torch.Tensor:
    # what a rank with invalid input sends: nothing counted, the error flag set
    vec = torch.zeros(2 + 2 * num_features + extra_numel, dtype=_STATS_DTYPE, device=device)
    vec[1] = 1.0
    return vec


def _peer_message(layer_name: str, flag: Optional[float]) -> str:
    who = "another rank" if flag is None else f"{int(flag)} other rank(s)"
    return (f"{layer_name}: {who} of the process group passed invalid input to this layer (see the error raised on "
            "those ranks); every rank stops here instead of hanging")


class Check(NamedTuple):
    """One condition :func:`require_each` checks on one value: ``bad(v)`` on the host value (a float), ``ok(t)`` the
    same test as a tensor, ``message(v)`` the text of the exception (``v`` None where the value is not known: under
    torch.compile and CUDA-graph capture, where the text must be a plain string), ``kind`` its class."""

    bad: Callable[[float], bool]
    ok: Callable[[torch.Tensor], torch.Tensor]
    message: Callable[[Optional[float]], str]
    kind: type = ValueError

    def error(self, value: Optional[float]) -> BaseException:
        """The exception for the bad value ``value`` (None: not known)."""
        return self.kind(self.message(value))


class _Pending(NamedTuple):
    value: torch.Tensor  # pinned host copy of the checked values
    event: object  # the device event after which `value` is valid
    checks: Sequence[Check]


_pending: "deque[_Pending]" = deque()


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (then no event may be queried and no host value
    awaited); False when CUDA was never initialised."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def require(value: torch.Tensor, bad: Callable[[float], bool], ok: Callable[[torch.Tensor], torch.Tensor],
            message: Callable[[Optional[float]], str], kind: type = ValueError) -> None:
    """Raise ``kind(message(v))`` where the 0-d tensor ``value`` holds a bad ``v`` (``bad(v)``; ``ok(value)`` is the
    same test as a tensor), without stopping an accelerator to read it: :func:`require_each` with one check."""
    require_each(value.reshape(1), [Check(bad, ok, message, kind)])


def require_each(values: torch.Tensor, checks: Sequence[Check]) -> None:
    """Raise ``checks[i].error(v)`` for the first ``i`` whose value ``v = values[i]`` is bad, without stopping an
    accelerator to read them (one copy for all the values).

    - **CPU, eager:** the values are read at once and the error raised here.
    - **CUDA, eager:** the values are copied to pinned host memory without blocking; the copy is examined, and the
      error raised, by the first :func:`raise_pending_errors` after the device has made it: every synchronising
      layer calls it at the start of its training forward and of its backward (``raise_pending_errors(wait=True)``
      waits for the device). So a peer's invalid input raises :class:`PeerInputError` at the next synchronising
      layer *if the device has finished the collective by the time the host gets there*. When the host runs further
      ahead, the peers enter the next layer's collective, which the rank with the invalid input (which raised at
      once) never joins: they then fail as for a dead peer, when that rank's process exits, or at the process
      group's timeout. Checking earlier would need the host to wait for the device at every layer.
    - **Under torch.compile, and while a CUDA graph is being captured:** ``torch._assert_async(ok(v), message)`` per
      check, which the compiled graph checks without a graph break and a captured graph replays (on CPU it raises a
      RuntimeError with the message; on CUDA it is a device-side assert, which stops the process).
    """
    if torch.compiler.is_compiling() or capturing():
        for i, check in enumerate(checks):
            # (the message is built as a string: Dynamo cannot call str() on an exception in every torch version)
            torch._assert_async(check.ok(values[i]), check.message(None))
        return
    if values.device.type == "cuda":
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        _pending.append(_Pending(host, event, tuple(checks)))
        return
    _raise_first(values, checks)


def _raise_first(values: torch.Tensor, checks: Sequence[Check]) -> None:
    for i, check in enumerate(checks):
        v = float(values[i])
        if check.bad(v):
            raise check.error(v)


def raise_pending_errors(wait: bool = False) -> None:
    """Raise the first error :func:`require_each` deferred on an accelerator whose values the device has produced
    (``wait=True``: wait for all of them). Pending checks that passed are dropped. A no-op on CPU, and while
    torch.compile traces or a CUDA graph is captured (the host-side queue is not part of a graph; the next eager call
    examines it)."""
    if torch.compiler.is_compiling() or capturing():
        return
    while _pending:
        entry = _pending[0]
        if wait:
            entry.event.synchronize()
        elif not entry.event.query():
            return
        _pending.popleft()
        try:
            _raise_first(entry.value, entry.checks)
        except BaseException:
            _pending.clear()  # the step is abandoned: later checks of it would only repeat the news
            raise


def all_reduce_stats(
    x: Optional[torch.Tensor],
    num_features: int,
    process_group=None,
    *,
    device=None,
    extra: Optional[torch.Tensor] = None,
    extra_numel: Optional[int] = None,
    error: Optional[BaseException] = None,
) -> torch.Tensor:
    """The fp64 vector ``[n, flag, sum x, sum x^2, payload]`` summed over ``process_group``, with **one** all-reduce.

    Args:
        x: this rank's ``(N, C, *)`` input (N may be 0); ignored when ``error`` is given.
        num_features: C, taken from the layer so that a rank with invalid input still sends the right size.
        process_group: group to reduce over (None = the world). World 1 issues no collective.
        device: device of the vector a rank with invalid input sends (defaults to ``x.device``, else CPU).
        extra: optional payload summed over ranks in the same collective (CBN's weight-gradient statistics).
        extra_numel: size of the payload; must be given when ``error`` is set and a payload is used.
        error: when this rank's input is invalid, the exception to raise. The rank still joins the collective with
            the error flag set (and zeros elsewhere), then raises ``error``; the other ranks see the flag in slot 1
            and raise :class:`PeerInputError` (through :func:`require`: at once on CPU, at the next check on an
            accelerator).
    """
    if extra_numel is None:
        extra_numel = 0 if extra is None else extra.numel()
    if error is not None or x is None:
        if device is None:
            device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        stats = _error_vector(num_features, extra_numel, device)
    else:
        stats = ops.batch_stats(x, num_features)
        if extra_numel:
            stats = torch.cat([stats, extra.reshape(-1).to(_STATS_DTYPE)])
    stats = comm.all_reduce_sum(stats, process_group)
    if error is not None:
        raise error
    return stats


def global_moments(
    x: Optional[torch.Tensor],
    num_features: int,
    process_group=None,
    *,
    layer_name: str = "layer",
    **options,
) -> tuple[Moments, Optional[torch.Tensor]]:
    """Global per-channel moments of ``x`` over ``process_group``, with **one** all-reduce: :func:`all_reduce_stats`
    with the same arguments (``options``: ``device``, ``extra``, ``extra_numel``, ``error``); ``layer_name`` is used in
    error messages.

    Returns:
        ``(moments, extra_sum)``: fp64 :class:`Moments` of the union of all ranks' batches (the count a 0-d
        tensor), and the payload summed over ranks (fp64) or None. A peer's invalid input raises
        :class:`PeerInputError` through :func:`require`.
    """
    stats = all_reduce_stats(x, num_features, process_group, **options)
    flag = stats[1]
    require(flag, lambda v: v > 0, lambda t: t == 0, lambda v: _peer_message(layer_name, v), PeerInputError)
    extra_sum = stats[2 + 2 * num_features:] if stats.numel() > 2 + 2 * num_features else None
    return unpack(stats, num_features), extra_sum


def all_reduce_moments(
    parts: Sequence[Optional[Moments]],
    num_features: Sequence[int],
    process_group=None,
    *,
    device=None,
    error: Optional[BaseException] = None,
    what: str = "all_reduce_moments",
) -> list[Moments]:
    """Exact union over the ranks of ``process_group`` of several per-channel :class:`Moments`, with ONE all-reduce.

    ``parts[i]`` holds this rank's moments for a set of ``num_features[i]`` channels, or None for none. Each part
    travels as raw fp64 sums ``[n, sum x, sum x^2]`` (``2C + 1`` values), all parts packed into one vector with an
    error flag in front. As in :func:`global_moments`, a rank whose own work failed passes ``error``: it still
    joins the collective, then raises ``error``, and its peers raise :class:`PeerInputError` (no rank hangs).
    Used where statistics accumulate over many batches first (PreciseBN), so one collective serves every layer.
    """
    if device is None:
        device = next((p.mean.device for p in parts if p is not None), torch.device("cpu"))
    sizes = [2 * int(c) + 1 for c in num_features]
    buf = torch.zeros(1 + sum(sizes), dtype=_STATS_DTYPE, device=device)
    if error is not None:
        buf[0] = 1.0
    else:
        offset = 1
        for part, c in zip(parts, num_features):
            if part is not None:
                n = part.count.to(_STATS_DTYPE)
                s1 = part.mean.to(_STATS_DTYPE) * n
                buf[offset] = n
                buf[offset + 1:offset + 1 + c] = s1
                buf[offset + 1 + c:offset + 1 + 2 * c] = part.m2.to(_STATS_DTYPE) + part.mean.to(_STATS_DTYPE) * s1
            offset += 2 * c + 1
    buf = comm.all_reduce_sum(buf, process_group)
    flag = float(buf[0])  # (PreciseBN runs outside a training step: a host read is fine here)
    if error is not None:
        raise error
    if flag > 0:
        raise PeerInputError(f"{what}: {int(flag)} other rank(s) of the process group failed (see the error raised "
                             "on those ranks); every rank stops here instead of hanging")
    out = []
    offset = 1
    for c in num_features:
        n = buf[offset].clone()
        s1 = buf[offset + 1:offset + 1 + c]
        mean = s1 / n.clamp_min(1)
        m2 = (buf[offset + 1 + c:offset + 1 + 2 * c] - mean * s1).clamp_min(0)
        out.append(Moments(n, mean, m2))
        offset += 2 * c + 1
    return out


def merge_all(parts: Sequence[Moments]) -> Moments:
    """Exact merge of several :class:`Moments` (left to right)."""
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out
