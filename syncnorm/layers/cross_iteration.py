"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) with a synchronised, checkpointable history."""

from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.conv import _ConvNd

from .. import ops
from ..functional import NormInfo, normalize
from ..stats import Moments, accumulation_dtype, capturing
from .sync_batchnorm import GlobalStatsBatchNorm

__all__ = ["CrossIterationBatchNorm"]

_F64 = torch.float64
_CAPTURED = "_syncnorm_cbn_input"  # attribute of the conv holding its input until the training norm reads it
# the buffers of the family's own state (the history and the step counter)
_HISTORY_ORDER = ("history_count", "history_mean", "history_var", "history_mean_at", "history_var_at",
                  "history_compensable", "history_dmean", "history_dvar", "history_next", "history_filled", "step")


_CAPTURING = "_syncnorm_cbn_capturing"  # attribute of the conv: True while its paired layer is in training mode


def _capture_conv_input(conv: nn.Module, inputs: tuple, output) -> None:
    # Module-level and stateless, so deep copies / pickles of the conv carry no reference to a norm layer (only a
    # bool, which the paired layer keeps equal to its own training mode). The input is kept only while the paired
    # layer trains, which reads (and drops) it in its own forward right after; in training the conv's autograd graph
    # keeps that input alive anyway. The conv's own mode does not matter: a conv in eval mode (a frozen backbone)
    # under no_grad still feeds a training CBN. (No lookup of the owner here: under torch.compile that would guard on
    # the global registry of pairs, which changes whenever any layer is created or collected.)
    # (plain getattr / setattr: torch.compile traces these on every torch version, but not every operation on
    # a module's __dict__)
    if getattr(conv, _CAPTURING, False):
        setattr(conv, _CAPTURED, inputs[0])


def _take_captured(conv: Optional[nn.Module]) -> Optional[torch.Tensor]:
    # the conv input the hook kept for this step (None: none), dropped from the conv
    captured = None if conv is None else getattr(conv, _CAPTURED, None)
    if captured is not None:
        setattr(conv, _CAPTURED, None)
    return captured


def _conv_output_size(conv: _ConvNd, size: tuple[int, ...]) -> tuple[int, ...]:
    # spatial output size of `conv` on an input of spatial size `size` (nn.Conv's shape formula)
    if conv.padding == "same":
        return size
    padding = (0,) * len(size) if conv.padding == "valid" else conv.padding
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, p, d, k, s in zip(size, padding, conv.dilation, conv.kernel_size, conv.stride))


# conv -> weak reference to the CrossIterationBatchNorm attached to it (neither keeps the other alive). A deep copy or
# unpickled copy of a layer registers itself for its copy of the conv (CrossIterationBatchNorm.__setstate__).
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _owner_of(conv: nn.Module) -> Optional["CrossIterationBatchNorm"]:
    ref = _OWNERS.get(conv)
    owner = ref() if ref is not None else None
    return owner if owner is not None and owner.paired_conv is conv else None


def _remove_capture_hook(conv: nn.Module) -> None:
    for key in [k for k, fn in conv._forward_hooks.items() if fn is _capture_conv_input]:
        del conv._forward_hooks[key]
    conv.__dict__.pop(_CAPTURED, None)
    conv.__dict__.pop(_CAPTURING, None)


class CrossIterationBatchNorm(GlobalStatsBatchNorm):
    r"""Cross-Iteration Batch Normalization: batch statistics pooled over the last ``window`` iterations, with the
    statistics of earlier iterations Taylor-compensated for how the preceding conv's weights have changed since.

    **Statistics in use at training step t** (per channel c, all global over ``process_group``). For each of the
    last ``window - 1`` iterations tau still in the history the layer keeps the global count ``n_tau``, mean
    ``mu_tau``, biased variance, ``d mu / d W`` (the mean input patch of the conv, the same for every output channel
    of a conv group), ``d sigma^2 / d W = d nu / d W - 2 mu d mu / d W`` (with ``nu = E[x^2]``), and the products of
    both with the conv weight and bias of that time. With ``dW = W_t - W_tau`` and ``db = b_t - b_tau``:

    * ``mu~ = mu_tau + <d mu/d W, dW> + db``
    * ``nu~ = nu_tau + <d nu/d W, dW> + 2 mu_tau db``, then ``nu~ = max(nu~, mu~^2)``

    (first-order Taylor expansion, as in the paper; the layer evaluates it in the centred form
    ``sigma~^2 = max(sigma_tau^2 + <d sigma^2/d W, dW> - (mu~ - mu_tau)^2, 0)``, which is algebraically identical
    and keeps its digits when ``|mu| >> sigma``). The input is normalised with the count-weighted pool of the
    current global batch and the compensated history, ``mu_bar = sum n mu~ / sum n``,
    ``sigma_bar^2 = sum n nu~ / sum n - mu_bar^2``. Gradients flow only through the current batch's statistics
    (the history is a constant); the backward divides by the pooled count.

    **Weight-gradient statistics without autograd.** ``d mu_c / d W_c`` is the mean input patch (``C_in / groups *
    prod(kernel)`` numbers per conv group) and ``d nu_c / d W_c`` is a conv weight-gradient with ``grad_output =
    2 x / M``. Both are computed under ``no_grad`` from the conv input captured by a forward hook, as local sums,
    and summed over ranks **in the same forward all-reduce** as the batch statistics, so every rank holds an
    identical history. Grouped, depthwise, strided, dilated and padded (any ``padding_mode``, ``'same'``) Conv1d,
    Conv2d and Conv3d are supported; transposed convs and unbatched conv inputs are refused. If the weight-gradient
    statistics fail, the rank still joins the collective with an error flag, so its peers raise
    :class:`syncnorm.stats.PeerInputError` rather than wait.

    **Pairing.** :meth:`attach` names the conv whose output this layer normalises (``syncnorm.convert`` does it for
    every conv -> norm pair). A layer with ``compensate=True`` and ``window > 1`` but no attached conv falls back to
    naive averaging (``compensate=False``) and warns once, naming the layer. The conv must run, in training, right
    before this layer in the same step; its bias (if any) is compensated too.

    **Special cases.** ``window=1`` is exactly :class:`syncnorm.SyncBatchNorm` (``nn.BatchNorm`` at world size 1).
    ``compensate=False`` averages the uncompensated history (naive). While the step counter is below ``burn_in`` the
    output is exactly BatchNorm's; the layer already records history in the last ``window - 1`` burn-in steps, so
    the window is full when compensation starts. The step counter is set by :meth:`set_step` (the Lightning
    callback passes ``trainer.global_step``); otherwise it counts this layer's training forwards. A step whose
    global batch is empty (every rank has N = 0) adds nothing to the history.

    **Uneven and empty batches.** As :class:`syncnorm.SyncBatchNorm`: ranks are weighted by their element counts,
    a rank with N = 0 joins both collectives.

    **Running statistics** (when ``track_running_stats``): BatchNorm's EMA of the *current* global batch statistics
    (unbiased with the global count), not of the pooled ones. **Eval** is exactly ``nn.BatchNorm`` eval.

    **State.** The history is a ring buffer of ``window - 1`` slots in registered buffers (``history_*``, ``step``);
    ``state_dict`` holds it and a restored layer continues bit-identically. Buffers whose shape depends on the conv
    (``history_dmean``, ``history_dvar``) take the shape of a loaded checkpoint when the layer is not attached yet.
    The per-slot counts and moments (``history_count``, ``history_mean``, ``history_var``, ``history_mean_at``,
    ``history_var_at``) are fp64 and stay fp64 when the module is cast (``.half()``, ``.to(dtype)``); the
    derivatives take the module's dtype. A checkpoint without any of the history buffers (a plain BatchNorm's)
    loads, also strictly: the history starts empty and ``step`` at 0. Under DDP the (already identical) buffers are re-broadcast each step unless ``broadcast_buffers=False``.

    **Host reads and torch.compile.** A training step reads nothing on the device from the host: burn-in, the
    slots pooled (weighted by their counts; slots never written have count 0) and the slot written are decided on the
    device from the buffers. Whether the step may record history at all (``step >= burn_in - (window - 1)``), which
    decides whether the weight-gradient statistics are computed and sent, is decided from a host copy of the step
    counter that :meth:`set_step`, ``load_state_dict`` (which reads the loaded counters once) and each training
    forward keep up to date; change the counter through those, not by writing the ``step`` buffer. The conv's input
    comes from a forward hook, which ``torch.compile`` traces: ``torch.compile(model, fullgraph=True)`` compiles a
    converted net with this layer in one graph. A compiled step (or a captured CUDA graph) keeps no host copy of the
    counter: it always
    computes and sends the weight-gradient statistics (the device then decides what is recorded, with the same
    results as eager), and the next eager step reads the counter once.

    **Cost.** One all-reduce in forward of ``2C + 2`` fp64 values plus, while compensation records history,
    ``C_in * prod(kernel) + weight.numel()`` fp64 values (``8 *`` that many bytes); one in backward of ``2C``
    values, whatever the world size. Extra memory: ``window - 1`` copies of the conv weight (in its dtype) plus
    O(window * C) fp64 values; extra compute: one conv weight-gradient per step (as much as the conv's forward)
    plus O(window * weight.numel()) for the compensation.

    Args:
        num_features: C, the number of channels (the attached conv's ``out_channels``).
        window: number of iterations pooled (the current one included); ``>= 1``.
        burn_in: number of initial steps that use plain BatchNorm; ``>= 0``.
        compensate: apply the Taylor compensation (False = naive averaging of the history).
        process_group: group to synchronise over; None means the world.
        eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm``.
    """

    _fp64_buffers = ("history_count", "history_mean", "history_var", "history_mean_at", "history_var_at")
    _family_buffers = _HISTORY_ORDER

    def __init__(
        self,
        num_features: int,
        window: int = 4,
        burn_in: int = 0,
        compensate: bool = True,
        process_group=None,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        name = f"{type(self).__name__}({num_features})"
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{name}: window must be an int >= 1, got {window!r}")
        if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
            raise ValueError(f"{name}: burn_in must be an int >= 0, got {burn_in!r}")
        if not isinstance(compensate, bool):
            raise TypeError(f"{name}: compensate must be a bool, got {type(compensate).__name__}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype)
        self.window = window
        self.burn_in = burn_in
        self.compensate = compensate
        slots = window - 1
        C = num_features
        f64 = {"dtype": _F64, "device": device}
        self.register_buffer("history_count", torch.zeros(slots, **f64))
        self.register_buffer("history_mean", torch.zeros(slots, C, **f64))
        self.register_buffer("history_var", torch.zeros(slots, C, **f64))
        self.register_buffer("history_mean_at", torch.zeros(slots, C, **f64))  # <d mu/dW, W_tau> + b_tau
        self.register_buffer("history_var_at", torch.zeros(slots, C, **f64))  # <d sigma^2/dW, W_tau>
        self.register_buffer("history_compensable", torch.zeros(slots, dtype=torch.bool, device=device))
        # shapes (slots, groups, C_in/groups * k) and (slots, C, C_in/groups * k), set by attach() or a checkpoint
        self.register_buffer("history_dmean", torch.zeros(slots, 0, 0, device=device, dtype=dtype))
        self.register_buffer("history_dvar", torch.zeros(slots, C, 0, device=device, dtype=dtype))
        self.register_buffer("history_next", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("history_filled", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=device))
        self._conv: list = []  # [conv] or []: a plain list, so the conv is neither a submodule nor in state_dict
        self._warned_unpaired = False
        # host copy of `step` (None: unknown, read from the buffer at the next eager training forward), so that a
        # training step reads nothing on the device to decide whether it may record history
        self._host_step: Optional[int] = 0

    def __setstate__(self, state) -> None:
        # copy.deepcopy and pickle restore the pairing through this: the copy owns its copy of the conv, so a second
        # layer attaching to that conv is refused as for the original
        super().__setstate__(state)
        self.__dict__.setdefault("_host_step", None)
        conv = self.paired_conv
        if conv is not None and _owner_of(conv) is None:
            _OWNERS[conv] = weakref.ref(self)

    # ------------------------------------------------------------------ pairing
    @property
    def paired_conv(self) -> Optional[_ConvNd]:
        """The conv attached with :meth:`attach`, or None."""
        return self._conv[0] if self._conv else None

    def attach(self, conv: nn.Module) -> "CrossIterationBatchNorm":
        """Pair this layer with the conv whose output it normalises; returns ``self``.

        Registers a forward hook on ``conv`` that, while this layer is in training mode, keeps the conv's input until
        this layer has read it (whatever the conv's own mode: a conv in eval mode under ``no_grad`` works). A conv
        already attached to another CrossIterationBatchNorm is refused (ValueError): call that layer's
        :meth:`detach` first.
        Accepts ``nn.Conv1d/2d/3d`` (any groups, stride, dilation, padding, padding_mode) with
        ``out_channels == num_features``. If the history's gradient buffers have another shape (a different conv),
        they are re-allocated and the slots already recorded are used without compensation.
        """
        if not isinstance(conv, _ConvNd) or not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise TypeError(f"{self.layer_name}: attach expects an nn.Conv1d, nn.Conv2d or nn.Conv3d (not transposed), "
                            f"got {type(conv).__name__}")
        if conv.out_channels != self.num_features:
            raise ValueError(f"{self.layer_name}: attach expects a conv with out_channels={self.num_features}, "
                             f"got out_channels={conv.out_channels}")
        owner = _owner_of(conv)
        if owner is not None and owner is not self:
            raise ValueError(f"{self.layer_name}: this {type(conv).__name__} is already attached to {owner.layer_name}; "
                             "a conv can feed one compensated layer (the layer consumes the conv's captured input "
                             "each step): detach() the other layer first")
        self.detach()
        _remove_capture_hook(conv)  # a hook left by a layer that no longer exists, or copied with the conv
        conv.register_forward_hook(_capture_conv_input)
        conv.__dict__[_CAPTURING] = self.training
        self._conv = [conv]
        _OWNERS[conv] = weakref.ref(self)
        dmean_shape, dvar_shape = self._grad_shapes(conv)
        if tuple(self.history_dmean.shape) != dmean_shape or tuple(self.history_dvar.shape) != dvar_shape:
            dtype = conv.weight.dtype
            self.history_dmean = torch.zeros(dmean_shape, dtype=dtype, device=self.history_count.device)
            self.history_dvar = torch.zeros(dvar_shape, dtype=dtype, device=self.history_count.device)
            self.history_compensable.zero_()
        return self

    def train(self, mode: bool = True) -> "CrossIterationBatchNorm":
        """As ``nn.Module.train``; the attached conv's hook captures its input only while this layer trains."""
        super().train(mode)
        conv = self.paired_conv
        if conv is not None:
            conv.__dict__[_CAPTURING] = bool(mode)
        return self

    def detach(self) -> None:
        """Unpair from the attached conv (removes the hook); the history is kept."""
        conv = self.paired_conv
        if conv is not None:
            _remove_capture_hook(conv)
            if _owner_of(conv) is self:
                del _OWNERS[conv]
        self._conv = []

    def _grad_shapes(self, conv: _ConvNd) -> tuple[tuple[int, ...], tuple[int, ...]]:
        per_channel = conv.weight[0].numel()  # C_in / groups * prod(kernel)
        slots = self.window - 1
        return (slots, conv.groups, per_channel), (slots, self.num_features, per_channel)

    def set_step(self, step: int) -> None:
        """Set the step counter that ``burn_in`` is compared against (it still advances by one per training
        forward)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{self.layer_name}: step must be an int >= 0, got {step!r}")
        self.step.fill_(step)
        self._host_step = step

    def _reset_family_state(self) -> None:
        self.reset_history()
        with torch.no_grad():
            self.step.zero_()
        self._host_step = 0

    def reset_history(self) -> None:
        """Forget every recorded iteration (the step counter is kept)."""
        for buf in (self.history_count, self.history_mean, self.history_var, self.history_mean_at,
                    self.history_var_at, self.history_compensable, self.history_dmean, self.history_dvar,
                    self.history_next, self.history_filled):
            buf.zero_()

    # ------------------------------------------------------------------ forward
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Eval: ``nn.BatchNorm`` eval (running statistics, no collective; any conv input kept for this layer is
        dropped). Training: the batch's global moments merged with the compensated history, as described above."""
        if not self.training:
            _take_captured(self.paired_conv)
        return super().forward(input)

    def _train_forward(self, input: torch.Tensor) -> torch.Tensor:
        err = self._input_error(input)
        conv = self.paired_conv
        captured = _take_captured(conv)
        slots = self.window - 1
        if slots > 0 and self.compensate and conv is None and not self._warned_unpaired:
            self._warned_unpaired = True
            warnings.warn(f"{self.layer_name}: no conv attached (call attach(conv) or use syncnorm.convert); "
                          "falling back to compensate=False (naive averaging of the history)", stacklevel=3)
        compensating = self.compensate and conv is not None
        # Whether this step may record history decides whether the weight-gradient statistics are computed and
        # sent. Eager, that is decided from the host copy of the step counter (no device read); a compiled step or a
        # captured CUDA graph cannot keep a host counter, so it always computes them and lets the device decide what
        # is recorded.
        if torch.compiler.is_compiling() or capturing():
            may_record = slots > 0
            self._host_step = None
        else:
            may_record = slots > 0 and self._step_on_host() >= self.burn_in - slots
        extra = extra_numel = None
        if may_record and compensating:
            w = conv.weight
            extra_numel = w.numel() // w.shape[0] * (conv.groups + self.num_features)
            if err is None:
                err = self._conv_input_error(conv, captured, input)
        if err is None and extra_numel is not None:
            try:
                extra = self._local_grad_sums(conv, captured, input)
            except (RuntimeError, ValueError) as e:
                err = self._grad_sums_error(conv, e)
        # the pooled history enters as a prior of count 0 (which changes nothing) while the step is in burn-in
        prior = self._compensated_prior(conv if compensating else None) if slots > 0 else None
        y, info = normalize(
            input, self.weight, self.bias, eps=self.eps, num_features=self.num_features,
            process_group=self.process_group, layer_name=self.layer_name, prior=prior, extra=extra,
            extra_numel=extra_numel, error=err, **self._running(),
        )
        if may_record:
            self._record(info, conv if compensating else None)
        if extra_numel is not None:
            # the global payload is weight-sized: keep neither it nor the packed vector that info.batch.count views
            batch = Moments(info.batch.count.clone(), info.batch.mean, info.batch.m2)
            info.used = batch if info.used is info.batch else info.used
            info.batch, info.extra_sum = batch, None
        self.last_info = info
        self.step.add_(1)
        if self._host_step is not None:
            self._host_step += 1
        return y

    def _step_on_host(self) -> int:
        # the host copy of `step`, read from the buffer only when unknown (after a compiled step)
        if self._host_step is None:
            self._host_step = int(self.step)
        return self._host_step

    # ------------------------------------------------------------------ weight-gradient statistics
    def _grad_sums_error(self, conv: _ConvNd, e: BaseException) -> ValueError:
        return ValueError(f"{self.layer_name}: could not compute the weight-gradient statistics of the attached "
                          f"{type(conv).__name__}: {e}")

    def _conv_input_error(self, conv: _ConvNd, conv_input: Optional[torch.Tensor],
                          x: torch.Tensor) -> Optional[ValueError]:
        """Why the captured conv input cannot give the weight-gradient statistics of ``x``, or None."""
        if conv_input is None:
            return self._grad_sums_error(conv, ValueError(
                "the conv did not run before this layer in this step, or ran while this layer was in eval mode (it "
                "must feed this layer directly)"))
        if conv_input.dim() != conv.weight.dim():
            return self._grad_sums_error(conv, ValueError(
                f"the conv ran on an unbatched input of shape {tuple(conv_input.shape)}; expected a batched input "
                f"with {conv.weight.dim()} dims"))
        if conv_input.shape[0] != x.shape[0] or conv_input.dim() != x.dim():
            return self._grad_sums_error(conv, ValueError(
                f"conv input of shape {tuple(conv_input.shape)} does not match this layer's input of shape "
                f"{tuple(x.shape)}"))
        expected = _conv_output_size(conv, tuple(conv_input.shape[2:]))
        if x.shape[0] and expected != tuple(x.shape[2:]):
            return self._grad_sums_error(conv, ValueError(
                f"the conv maps its input of shape {tuple(conv_input.shape)} to spatial size {expected}, but this "
                f"layer's input has shape {tuple(x.shape)}"))
        return None

    def _local_grad_sums(self, conv: _ConvNd, conv_input: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """This rank's ``[sum of input patches per group, sum of x * patch per channel]`` in fp64 (flattened)."""
        groups = conv.groups
        C = self.num_features
        per_channel = conv.weight[0].numel()
        n_patch, n_cross = groups * per_channel, C * per_channel
        if x.numel() == 0:
            return torch.zeros(n_patch + n_cross, dtype=_F64, device=x.device)
        with torch.no_grad():
            acc = accumulation_dtype(x.dtype)
            nd = x.dim() - 2
            xin = conv_input.detach().to(acc)
            padding = conv.padding
            if isinstance(padding, str) or conv.padding_mode != "zeros":
                mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
                xin = F.pad(xin, conv._reversed_padding_repeated_twice, mode=mode)
                padding = (0,) * nd
            y = x.detach().to(acc)
            # shift each channel by one of its samples: sum((y - k) * patch) keeps its digits when |mean| >> std
            k = y[(0, slice(None)) + (0,) * nd]
            yk = y - k.view([1, C] + [1] * nd)
            args = (conv.stride, padding, conv.dilation, False, [0] * nd)
            wshape = tuple(conv.weight.shape)
            cross = torch.ops.aten.convolution_backward(
                yk, xin, yk.new_empty(1).expand(wshape), None, *args, groups, (False, True, False))[1]
            # sum over the batch and every output position of each input patch element: the weight-gradient of
            # an all-ones grad_output with one output channel per group, taken on the batch-summed input (a
            # conv of one sample and `groups` output channels: a small fraction of the cross term's cost)
            ones = xin.new_ones((1, groups) + tuple(y.shape[2:]))
            patch_shape = (groups,) + wshape[1:]
            patch = torch.ops.aten.convolution_backward(
                ones, xin.sum(0, keepdim=True), xin.new_empty(1).expand(patch_shape), None, *args, groups,
                (False, True, False))[1]
            patch64 = patch.to(_F64).reshape(groups, 1, per_channel)
            cross64 = cross.to(_F64).reshape(groups, C // groups, per_channel)
            cross64 = cross64 + k.to(_F64).view(groups, C // groups, 1) * patch64
            return torch.cat([patch64.reshape(-1), cross64.reshape(-1)])

    def _record(self, info: NormInfo, conv: Optional[_ConvNd]) -> None:
        """Write this step's global moments (and derivatives) into the ring-buffer slot ``history_next``, on the
        device: nothing is written when the step is before ``burn_in - (window - 1)`` or its global batch is empty."""
        with torch.no_grad():
            count = info.global_count
            dmean = dvar = w_dot_mean = w_dot_var = None
            if conv is not None:
                C, groups = self.num_features, conv.groups
                per_channel = conv.weight[0].numel()
                sums = info.extra_sum
                safe_count = count.clamp_min(1)
                patch = sums[:groups * per_channel].view(groups, 1, per_channel)
                cross = sums[groups * per_channel:].view(groups, C // groups, per_channel)
                # d mu_c / d W_c: mean input patch of c's group; d sigma_c^2 / d W_c; both as stored (rounded)
                dmean = (patch / safe_count).view(groups, per_channel).to(self.history_dmean.dtype)
                dvar = (2.0 * (cross - info.batch.mean.view(groups, C // groups, 1) * patch) / safe_count)
                dvar = dvar.view(C, per_channel).to(self.history_dvar.dtype)
                # products with the weights of this step, from the stored (rounded) derivatives, so that later
                # <d, W_t> - <d, W_tau> is <d, W_t - W_tau> up to the rounding of the products
                w_dot_mean, w_dot_var = self._weight_products(conv, dmean.unsqueeze(0), dvar.unsqueeze(0))
                w_dot_mean, w_dot_var = w_dot_mean[0], w_dot_var[0]
            ops.cbn_record(self.history_count, self.history_mean, self.history_var, self.history_mean_at,
                           self.history_var_at, self.history_compensable, self.history_dmean, self.history_dvar,
                           self.history_next, self.history_filled, self.step, count, info.batch.mean,
                           info.batch.m2, dmean, dvar, w_dot_mean, w_dot_var, self.burn_in)

    def _weight_products(self, conv: _ConvNd, dmean: torch.Tensor, dvar: torch.Tensor):
        """``(<dmean_s, W>, <dvar_s, W>)`` per slot s and channel, plus the conv bias in the first; returned in fp64
        (the first accumulated in fp64, the second in the derivative's dtype, at least fp32)."""
        C, groups = self.num_features, conv.groups
        w = conv.weight.detach().to(_F64).reshape(C, -1)
        mean_part = torch.einsum("sgk,gok->sgo", dmean.to(_F64), w.view(groups, C // groups, -1)).reshape(-1, C)
        if conv.bias is not None:
            mean_part = mean_part + conv.bias.detach().to(_F64)
        # weight-sized: one batched matmul in the derivative's dtype (fp32 accumulation for fp32 models; the
        # centred derivative keeps this term of the size of sigma^2, so its rounding stays below the batch noise);
        # fp16 / bf16 derivatives are widened first: the products overflow fp16 long before the statistics do
        acc = torch.promote_types(dvar.dtype, torch.float32)
        var_part = torch.linalg.vecdot(dvar.to(acc), conv.weight.detach().to(acc).reshape(C, -1)).to(_F64)
        return mean_part, var_part

    def _history(self, conv: Optional[_ConvNd]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(count (S,), mean (S, C), biased var (S, C))`` of every slot in fp64, compensated to ``conv``'s current
        weights where recorded with compensation (``conv`` None: as recorded). Slots never written have count 0."""
        count = self.history_count.to(_F64)
        mean = self.history_mean.to(_F64)
        var = self.history_var.to(_F64)
        if conv is not None:
            w_dot_mean, w_dot_var = self._weight_products(conv, self.history_dmean, self.history_dvar)
            mean, var = ops.cbn_compensate(mean, var, self.history_mean_at, self.history_var_at,
                                           self.history_compensable, w_dot_mean, w_dot_var)
        return count, mean, var

    def _compensated_prior(self, conv: Optional[_ConvNd]) -> torch.Tensor:
        """The pooled (compensated) history as the fp64 ``(3, C)`` prior ``[count, mean, m2]`` of
        :func:`syncnorm.ops.cbn_prior`: count 0 (and mean, m2 0) while the step counter is below ``burn_in``.
        Computed on the device, over every slot, weighted by the slots' counts: the weight products (two matmuls)
        and one op."""
        with torch.no_grad():
            w_dot_mean = w_dot_var = None
            if conv is not None:
                w_dot_mean, w_dot_var = self._weight_products(conv, self.history_dmean, self.history_dvar)
            return ops.cbn_prior(self.history_count, self.history_mean, self.history_var, self.history_mean_at,
                                 self.history_var_at, self.history_compensable, w_dot_mean, w_dot_var, self.step,
                                 self.burn_in)

    def compensated_history(self) -> Moments:
        """Per-slot moments of the recorded iterations as they would be used now: ``count (S,)``, ``mean (S, C)``,
        ``m2 (S, C)`` (compensated to the attached conv's current weights when ``compensate``), oldest slot first.
        For inspection and tests (it reads the fill count on the host); no collective."""
        slots = self.window - 1
        filled = min(max(int(self.history_filled), 0), slots)
        order = list(range(filled)) if filled < slots else [(int(self.history_next) + i) % slots for i in range(slots)]
        with torch.no_grad():
            count, mean, var = self._history(self.paired_conv if self.compensate else None)
            return Moments(count[order], mean[order], var[order] * count[order].unsqueeze(1))

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a layer that is not attached yet adopts the conv-dependent shapes of the checkpoint
        if self.paired_conv is None:
            for name in ("history_dmean", "history_dvar"):
                incoming = state_dict.get(prefix + name)
                current = getattr(self, name)
                if isinstance(incoming, torch.Tensor) and incoming.shape != current.shape and \
                        incoming.dim() == current.dim():
                    setattr(self, name, torch.zeros(incoming.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # loading is not a training step: the counters are read on the host here, once
        slots = self.window - 1
        slot = int(self.history_next)
        if slots > 0 and not 0 <= slot < slots:
            error_msgs.append(f"{self.layer_name}: history_next must be a slot index in [0, {slots}) for window="
                              f"{self.window}, got {slot} in the checkpoint")
            self.history_next.zero_()
        self._host_step = int(self.step)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", window={self.window}, burn_in={self.burn_in}, "
                f"compensate={self.compensate}")
