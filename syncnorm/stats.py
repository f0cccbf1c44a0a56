"""Per-channel moments: local moments, the exact merge, the one collective, and global moments.

Every syncnorm layer gets its batch statistics from :func:`global_moments`. The data path is

1. **Local sums** of an ``(N, C, *)`` input in at least fp32 (fp64 for fp64 input): ``sum(x)`` and ``sum(x^2)`` in
   one fast pass each, or, for channels whose mean is far larger than their spread (mean 1e4, std 1), *shifted*
   sums ``sum(x - k)``, ``sum((x - k)^2)`` around the local mean ``k``, so nothing cancels catastrophically.
2. **One collective.** Each rank packs ``[n, error_flag, sum x, sum x^2, extra...]`` in fp64 (raw sums, rebuilt
   exactly in fp64 from shifted ones) and all-reduces the vector with a sum. The vector has ``2C + 2``
   entries plus an optional caller payload, so the bytes a rank sends do not depend on the world size.
3. **Global moments** ``(N, mean, M2)`` come out of the summed vector in fp64; the merge is exact (Chan et al.),
   so uneven and empty per-rank batches are weighted by their element counts.

:class:`Moments` also merges with moments from elsewhere (earlier micro-batches for CmBN, compensated history for
CBN, accumulated batches for PreciseBN) with the same exact formula.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from . import _ext, comm

__all__ = [
    "Moments",
    "LocalSums",
    "accumulation_dtype",
    "reduce_dims",
    "local_sums",
    "global_moments",
    "moments_of",
    "PeerInputError",
    "GlobalMoments",
    "all_reduce_moments",
    "merge_all",
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
        fast = _ext.ops_for(self.mean)
        if (fast is not None and self.mean.dtype == _STATS_DTYPE and other.mean.dtype == _STATS_DTYPE
                and self.mean.shape == other.mean.shape == self.m2.shape == other.m2.shape and self.mean.dim() == 1
                and not (self.mean.requires_grad or other.mean.requires_grad or self.m2.requires_grad
                         or other.m2.requires_grad)):
            return Moments(*fast.merge_moments(self.count, self.mean, self.m2, other.count, other.mean, other.m2))
        n = self.count + other.count
        safe_n = torch.where(n > 0, n, torch.ones_like(n))
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / safe_n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / safe_n)
        return Moments(n, mean, m2)

    def detach(self) -> "Moments":
        """The same moments with every tensor detached from autograd."""
        return Moments(self.count.detach(), self.mean.detach(), self.m2.detach())


class LocalSums(NamedTuple):
    """Sums of one rank's input: ``count`` values per channel, ``s1 = sum(x - shift)``, ``s2 = sum((x - shift)^2)``
    in the accumulation dtype; ``shift`` is None (raw sums) or a per-channel tensor."""

    count: int
    shift: Optional[torch.Tensor]
    s1: torch.Tensor
    s2: torch.Tensor

    def to_moments(self) -> Moments:
        """Local :class:`Moments` in fp64 (mean = shift + s1/n, M2 = s2 - s1^2/n)."""
        device = self.s1.device
        n = torch.tensor(float(self.count), dtype=_STATS_DTYPE, device=device)
        if self.count == 0:
            z = torch.zeros_like(self.s1, dtype=_STATS_DTYPE)
            return Moments(n, z, z.clone())
        s1 = self.s1.to(_STATS_DTYPE)
        s2 = self.s2.to(_STATS_DTYPE)
        mean = s1 / self.count
        m2 = (s2 - s1 * mean).clamp_min(0)
        if self.shift is not None:
            mean = mean + self.shift.to(_STATS_DTYPE)
        return Moments(n, mean, m2)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 input, fp32 for everything else (fp16/bf16 statistics accumulate in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(x: torch.Tensor) -> list[int]:
    """All dimensions but the channel dimension 1 of an ``(N, C, *)`` tensor."""
    return [0] + list(range(2, x.dim()))


# Raw (unshifted) sums lose digits in s2 - s1^2/n once mean^2 exceeds this multiple of the variance; such inputs
# are summed again around their mean (an exact two-pass), others keep the single fast pass.
_SHIFT_ABOVE = 100.0


def _sums(x: torch.Tensor, acc: torch.dtype, shift: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    N, C = x.shape[0], x.shape[1]
    if x.dtype != acc:
        x = x.to(acc)
    if shift is None and x.is_contiguous():
        rows = x.reshape(N, C, -1)
        # one pass each, no temporary: sum and 2-norm along the contiguous spatial axis, then over the batch
        return rows.sum(2).sum(0), torch.linalg.vector_norm(rows, 2, 2).square().sum(0)
    if x.dim() > 2 and not x.is_contiguous():
        # channels_last and friends: (N, *, C) rows with C contiguous
        rows = x.movedim(1, -1).reshape(-1, C)
    else:
        rows = x.reshape(N, C, -1).transpose(1, 2).reshape(-1, C) if x.dim() > 2 else x
    if shift is not None:
        rows = rows - shift
    return rows.sum(0), (rows * rows).sum(0)


def local_sums(x: torch.Tensor, sync_free: Optional[bool] = None) -> LocalSums:
    """Per-channel sums of ``x`` (shape ``(N, C, *)``), accumulated in :func:`accumulation_dtype`.

    On CPU (default) one pass computes ``sum(x)`` and ``sum(x^2)``; when that is ill-conditioned
    (``mean^2 > 100 var`` in some channel, e.g. mean 1e4 with unit variance) the channel sums are recomputed around
    the local mean, so ``s2 - s1^2/n`` never cancels catastrophically. That decision reads one flag on the host.
    On accelerators (``sync_free``, the default off CPU) no host read is allowed, so the sums are always taken
    around the first sample of each channel, which is within a few standard deviations of the mean for any data.
    Empty input gives zero sums.
    """
    acc = accumulation_dtype(x.dtype)
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    if count == 0:
        z = torch.zeros(channels, dtype=acc, device=x.device)
        return LocalSums(0, None, z, z.clone())
    if sync_free is None:
        sync_free = x.device.type != "cpu"
    if sync_free:
        shift = x[(0, slice(None)) + (0,) * (x.dim() - 2)].to(acc)
        s1, s2 = _sums(x, acc, shift)
        return LocalSums(count, shift, s1, s2)
    s1, s2 = _sums(x, acc, None)
    mean = s1 / count
    var = s2 / count - mean * mean
    if bool((mean * mean > _SHIFT_ABOVE * var.clamp_min(0)).any()):
        shift = mean
        s1, s2 = _sums(x, acc, shift)
        return LocalSums(count, shift, s1, s2)
    return LocalSums(count, None, s1, s2)


def _pack(local: Optional[LocalSums], num_features: int, device, extra: Optional[torch.Tensor],
          extra_numel: int, error: bool) -> torch.Tensor:
    count = 0.0 if (error or local is None) else float(local.count)
    head = torch.tensor([count, 1.0 if error else 0.0], dtype=_STATS_DTYPE, device=device)
    if count == 0:
        body = torch.zeros(2 * num_features, dtype=_STATS_DTYPE, device=device)
    elif local.shift is None:
        body = torch.cat([local.s1, local.s2]).to(_STATS_DTYPE)
    else:
        # back to raw sums in fp64: sum x = s1 + n k, sum x^2 = s2 + 2 k s1 + n k^2
        s1 = local.s1.to(_STATS_DTYPE)
        k = local.shift.to(_STATS_DTYPE)
        body = torch.cat([s1 + count * k, local.s2.to(_STATS_DTYPE) + k * (2 * s1 + count * k)])
    parts = [head, body]
    if extra_numel:
        if error or extra is None:
            parts.append(torch.zeros(extra_numel, dtype=_STATS_DTYPE, device=device))
        else:
            parts.append(extra.reshape(-1).to(_STATS_DTYPE))
    return torch.cat(parts)


class GlobalMoments(NamedTuple):
    """Result of :func:`global_moments`.

    Attributes:
        moments: fp64 :class:`Moments` of the union of all ranks' batches.
        count: the global number of values per channel, as a Python int (identical on every rank).
        extra_sum: the caller's payload summed over ranks (fp64), or None.
        mean_to_std: ``max_c |mean_c| / sqrt(var_c + eps)`` as a Python float. Large values mean that
            ``x * scale + shift`` would cancel catastrophically, so :func:`syncnorm.functional.normalize` centres
            the input first.
    """

    moments: Moments
    count: int
    extra_sum: Optional[torch.Tensor]
    mean_to_std: float


def _peer_error(layer_name: str, flag: float) -> PeerInputError:
    return PeerInputError(
        f"{layer_name}: {int(flag)} other rank(s) of the process group passed invalid input to this layer "
        "(see the error raised on those ranks); every rank stops here instead of hanging"
    )


def global_moments(
    x: Optional[torch.Tensor],
    num_features: int,
    process_group=None,
    *,
    device=None,
    extra: Optional[torch.Tensor] = None,
    extra_numel: Optional[int] = None,
    error: Optional[BaseException] = None,
    layer_name: str = "layer",
    eps: float = 1e-5,
) -> GlobalMoments:
    """Global per-channel moments of ``x`` over ``process_group``, with **one** all-reduce.

    Args:
        x: this rank's ``(N, C, *)`` input (N may be 0); ignored when ``error`` is given.
        num_features: C, taken from the layer so that a rank with invalid input still packs the right size.
        process_group: group to reduce over (None = the world). World 1 issues no collective.
        device: device of the packed vector (defaults to ``x.device``).
        extra: optional payload summed over ranks in the same collective (CBN's weight-gradient statistics).
        extra_numel: size of the payload; must be given when ``error`` is set and a payload is used.
        error: when this rank's input is invalid, the exception to raise. The rank still joins the collective with
            an error flag, then raises ``error``; the other ranks raise :class:`PeerInputError`.
        layer_name: used in error messages.
        eps: the layer's eps, for :attr:`GlobalMoments.mean_to_std`.

    Returns:
        a :class:`GlobalMoments`.
    """
    if extra_numel is None:
        extra_numel = 0 if extra is None else extra.numel()
    if device is None:
        device = x.device
    fast = _ext.ops_for(x) if (error is None and x is not None) else None
    if fast is not None and torch.device(device).type == "cpu" and (not extra_numel or extra is not None):
        # the same computation from C++ (syncnorm/csrc/norm_cpu.cpp): local sums + pack, collective, unpack
        buf = fast.local_pack(x, num_features)
        if extra_numel:
            buf = torch.cat([buf, extra.reshape(-1).to(_STATS_DTYPE)])
        comm.all_reduce_sum(buf, process_group)
        n, mean, m2, count, flag, mean_to_std = fast.finish(buf, num_features, eps)
        if flag > 0:
            raise _peer_error(layer_name, flag)
        extra_sum = buf[2 + 2 * num_features:] if extra_numel else None
        return GlobalMoments(Moments(n, mean, m2), int(round(count)), extra_sum, mean_to_std)
    local = None if (error is not None or x is None) else local_sums(x)
    buf = _pack(local, num_features, device, extra, extra_numel, error is not None)
    comm.all_reduce_sum(buf, process_group)
    n = buf[0].clone()  # not a view: Moments must not keep the packed vector (and its payload) alive
    safe_n = n.clamp_min(1)
    s1 = buf[2:2 + num_features]
    mean = s1 / safe_n
    m2 = (buf[2 + num_features:2 + 2 * num_features] - mean * s1).clamp_min_(0)
    ratio = (mean * mean / (m2 / safe_n + eps)).amax()
    # One host read per forward: the error flag and the global count decide what every rank does next,
    # identically on every rank.
    count, flag, ratio2 = torch.stack([buf[0], buf[1], ratio]).tolist()
    mean_to_std = ratio2 ** 0.5
    if error is not None:
        raise error
    if flag > 0:
        raise _peer_error(layer_name, flag)
    extra_sum = buf[2 + 2 * num_features:] if extra_numel else None
    return GlobalMoments(Moments(n, mean, m2), int(round(count)), extra_sum, mean_to_std)


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
    comm.all_reduce_sum(buf, process_group)
    flag = float(buf[0])
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


def moments_of(x: torch.Tensor) -> Moments:
    """Local fp64 :class:`Moments` of an ``(N, C, *)`` tensor (no collective)."""
    return local_sums(x).to_moments()


def merge_all(parts: Sequence[Moments]) -> Moments:
    """Exact merge of several :class:`Moments` (left to right)."""
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out
