"""Capture what a layer sees, streaming: the one helper under CLE, bias correction, AdaRound and GPTQ.

Every Conv/Linear is viewed as a batch of matrix products, one per group::

    y_g = W_g · x_g          W_g: [out/G, d],  x_g: one input patch of d = (in/G)·kh·kw values

(``F.unfold`` gives the patches; a Linear is one group with ``d = in``). The passes need only two running
statistics of the patches, never the activations themselves:

    H_g = Σ x_g x_gᵀ   (second moment: ‖ΔW_g X‖² = tr(ΔW_g H_g ΔW_gᵀ), the AdaRound / GPTQ objective)
    m_g = Σ x_g        (first moment: E[ΔW x] = ΔW · E[x], the bias shift)

Data reaches a pass as a :class:`ForwardLoop`: it is a ``forward_loop(model)`` callable and also yields its
batches one at a time, so a capture can stop each forward pass right after the layer it needs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn import QuantLayerMixin, engine_emulation
from lowbit.data import iter_batches, run_batch

log = logging.getLogger(__name__)

# Largest patch tensor materialised at once (elements); bigger batches are cut along the batch dimension.
CHUNK_ELEMENTS = 2**24


class ForwardLoop:
    """Calibration data as ``forward_loop(model)`` that also yields its batches.

    Args:
        data: an iterable of batches, one Tensor (cut into ``batch_size`` batches), or a user
            ``forward_loop(model)`` callable (then captures cannot stop early and run whole passes).
        batch_size: batch size when ``data`` is one Tensor.
        max_batches: use at most this many batches (None: all).
        frontier_bytes: memory the layer-wise passes may spend on kept activations (None: the default of
            ``lowbit.ptq.frontier``).
    """

    def __init__(self, data: Any, batch_size: int = 32, max_batches: int | None = None,
                 frontier_bytes: int | None = None) -> None:
        if isinstance(data, ForwardLoop):
            data = data.data
        self.data = data
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.frontier_bytes = frontier_bytes

    @property
    def is_callable_only(self) -> bool:
        return callable(self.data) and not isinstance(self.data, (torch.Tensor, nn.Module)) and not hasattr(self.data, "__iter__")

    def batches(self) -> Iterator[Any]:
        """The batches, in order (refuses a callable-only loop)."""
        if self.is_callable_only:
            raise TypeError("this pass needs calibration batches; a forward_loop callable cannot be cut into batches")
        for i, batch in enumerate(iter_batches(self.data, self.batch_size)):
            if self.max_batches is not None and i >= self.max_batches:
                return
            yield batch

    def __call__(self, model: nn.Module) -> None:
        with torch.no_grad():
            if self.is_callable_only:
                self.data(model)
                return
            seen = 0
            for batch in self.batches():
                run_batch(model, batch)
                seen += 1
            if seen == 0:
                raise ValueError("calibration data is empty: no batch was seen")


def as_forward_loop(data: Any) -> ForwardLoop:
    """Wrap data (iterable, Tensor, callable or ForwardLoop) as a :class:`ForwardLoop`."""
    return data if isinstance(data, ForwardLoop) else ForwardLoop(data)


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the layer of interest has run."""


def run_until(model: nn.Module, loop: ForwardLoop, layer: nn.Module, on_input: Callable | None = None,
              on_output: Callable | None = None) -> int:
    """Run every batch through ``model``, calling ``on_input(x)`` / ``on_output(y)`` at ``layer``.

    With batches, each pass stops right after ``layer`` (or before it when only inputs are wanted). Returns
    the number of batches.
    """
    stop = not loop.is_callable_only
    handles = []
    if on_input is not None:
        def pre(_mod, args):
            on_input(args[0])
            if stop and on_output is None:
                raise _Stop
        handles.append(layer.register_forward_pre_hook(pre))
    if on_output is not None:
        def post(_mod, _args, out):
            on_output(out)
            if stop:
                raise _Stop
        handles.append(layer.register_forward_hook(post))
    n = 0
    try:
        with torch.no_grad():
            if not stop:
                loop(model)
                return 1
            for batch in loop.batches():
                with contextlib.suppress(_Stop):
                    run_batch(model, batch)
                n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("calibration data is empty: no batch was seen")
    return n


def layer_order(model: nn.Module, loop: ForwardLoop) -> list[tuple[str, QuantLayerMixin]]:
    """Quantized layers in the order a forward pass first calls them (one batch is run)."""
    layers = {id(m): (n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}
    order: list[tuple[str, QuantLayerMixin]] = []
    handles = []
    for name, mod in layers.values():
        def pre(m, _args, name=name):
            if all(o[1] is not m for o in order):
                order.append((name, m))
        handles.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            if loop.is_callable_only:
                loop(model)
            else:
                run_batch(model, next(iter(loop.batches())))
    finally:
        for h in handles:
            h.remove()
    return order


@contextlib.contextmanager
def engine_unlinked(*layers: QuantLayerMixin):
    """Compute ``layers`` in plain fake-quant float (their own pre-activation output), not as the engine's
    fused kernel (whose output is already the next quantizer's codes)."""
    with contextlib.ExitStack() as stack:
        for m in layers:
            stack.enter_context(engine_emulation(m, False))
        yield


def groups_of(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1)


def weight_matrix(layer: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``W`` as ``[G, out/G, d]`` (the matrix form in the module doc)."""
    w = layer.weight if weight is None else weight
    if isinstance(layer, nn.ConvTranspose2d):
        raise NotImplementedError(f"{getattr(layer, 'layer_name', 'layer')}: ConvTranspose2d is not supported by this pass")
    g = groups_of(layer)
    return w.reshape(g, w.shape[0] // g, -1)


def from_weight_matrix(layer: nn.Module, mat: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_matrix`: back to the layer's weight shape."""
    return mat.reshape(layer.weight.shape)


def patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input patches of ``layer`` as ``[G, n, d]`` (``n`` = batch · output positions)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, stride, pad, dil = (1, *layer.kernel_size), (1, *layer.stride), (0, *layer.padding), (1, *layer.dilation)
    elif isinstance(layer, nn.Conv2d):
        kernel, stride, pad, dil = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    else:
        raise NotImplementedError(f"{type(layer).__name__} is not supported by this pass")
    if layer.padding_mode != "zeros" or isinstance(pad, str):
        raise NotImplementedError(f"{getattr(layer, 'layer_name', 'layer')}: padding {layer.padding!r} / "
                                  f"{layer.padding_mode} is not supported by this pass")
    cols = F.unfold(x, kernel, dilation=dil, padding=pad, stride=stride)  # [B, C·k, L]
    g = groups_of(layer)
    b, ck, L = cols.shape
    return cols.reshape(b, g, ck // g, L).permute(1, 0, 3, 2).reshape(g, b * L, ck // g)


@dataclass
class InputMoments:
    """Running ``Σ x xᵀ`` and ``Σ x`` of a layer's input patches, per group (float64)."""

    hessian: torch.Tensor  # [G, d, d]
    total: torch.Tensor  # [G, d]
    count: int = 0

    @classmethod
    def empty(cls, layer: nn.Module) -> InputMoments:
        w = weight_matrix(layer)
        g, _, d = w.shape
        return cls(torch.zeros(g, d, d, dtype=torch.float64, device=w.device),
                   torch.zeros(g, d, dtype=torch.float64, device=w.device))

    def update(self, layer: nn.Module, x: torch.Tensor) -> None:
        """Add one batch of layer inputs (cut into chunks so the patch tensor stays small)."""
        x = x.detach().float()
        per_sample = max(1, x[:1].numel() * _patch_growth(layer))
        step = max(1, CHUNK_ELEMENTS // per_sample)
        for chunk in torch.split(x, step):
            p = patches(layer, chunk)
            self.hessian += torch.bmm(p.transpose(1, 2), p).double()
            self.total += p.sum(dim=1).double()
            self.count += p.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        """``E[x]`` per group, ``[G, d]``."""
        return self.total / max(self.count, 1)

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[x xᵀ]`` per group, ``[G, d, d]``."""
        return self.hessian / max(self.count, 1)

    def ridge(self, damp: float = 0.01) -> float:
        """Damping for this much data: ``damp + d / n``.

        With ``n`` patches of ``d`` values, ``H`` has rank at most ``n``; when ``n`` is not much larger than
        ``d`` (a classifier fed 64 images, ``d = 1280``) an error measured with ``H`` alone can be driven to
        zero along directions the data never visited, and the result does not generalise. Adding
        ``(damp + d/n) · mean(diag H) · I`` falls back smoothly to a per-weight (diagonal) error there.
        """
        d = self.hessian.shape[-1]
        return damp + d / max(self.count, 1)

    def damped_second_moment(self, damp: float = 0.01) -> torch.Tensor:
        """``E[x xᵀ] + ridge · mean(diag) · I`` (see :meth:`ridge`)."""
        h = self.second_moment
        diag = torch.diagonal(h, dim1=-2, dim2=-1)
        mean = diag.mean(dim=-1, keepdim=True).clamp_min(1e-12)
        return h + torch.diag_embed((self.ridge(damp) * mean).expand_as(diag))


def _patch_growth(layer: nn.Module) -> int:
    k = getattr(layer, "kernel_size", (1,))
    s = getattr(layer, "stride", (1,))
    growth = 1
    for a, b in zip(k, s):
        growth *= max(1, -(-a // b))
    return growth


def effective_input(layer: QuantLayerMixin, x: torch.Tensor) -> torch.Tensor:
    """The input the layer's weights really multiply: its own input quantizer applied (module-swap mode);
    in graph mode the quantizer sits upstream and ``x`` is already quantized."""
    return layer.input_quantizer(x)


def capture_moments(model: nn.Module, loop: ForwardLoop, layer: QuantLayerMixin) -> InputMoments:
    """Stream every batch to ``layer`` (stopping there) and return its input moments."""
    moments = InputMoments.empty(layer)
    run_until(model, loop, layer, on_input=lambda x: moments.update(layer, effective_input(layer, x)))
    if moments.count == 0:
        raise RuntimeError(f"layer {getattr(layer, 'layer_name', '?')} was never called by the calibration data")
    return moments


class ChannelMean:
    """Running per-channel mean of a layer output (channel axis 1 for conv, last for linear)."""

    def __init__(self, channel_dim: int) -> None:
        self.channel_dim = channel_dim
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, y: torch.Tensor) -> None:
        y = y.detach().double().movedim(self.channel_dim, -1)
        flat = y.reshape(-1, y.shape[-1])
        s = flat.sum(dim=0)
        self.total = s if self.total is None else self.total + s
        self.count += flat.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no output was seen")
        return self.total / self.count


def channel_dim_of(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


def batches_of(data: Iterable[Any] | torch.Tensor, batch_size: int = 32) -> list[Any]:
    """A list of batches (for tests and small data)."""
    return list(iter_batches(data, batch_size))
