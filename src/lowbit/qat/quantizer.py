"""``LearnableQuantizer``: a ``TensorQuantizer`` whose range is observed, then learnt, during training.

It *is* a ``TensorQuantizer`` (``upgrade_`` swaps the class of an existing one in place, so every reference
the graph and the layers hold stays valid) with the same ``scale`` / ``zero_point`` buffers, kept equal to
what the forward pass uses. In training mode (``model.train()``), for the step ``t`` it counts:

    t < observer_steps:  observe x (activations: EMA min-max of the batch; weights: the recipe's calibrator
                         on the current weight), qparams ← observer, x̂ = fake_quant(x) with ∂x̂/∂x = STE
    t ≥ observer_steps:  (``learn_ranges``) s and z are parameters initialised from the observer,
                         x̂ = fake_quant(x; clamp(s, ε), z) with LSQ ∂x̂/∂s and LSQ+ ∂x̂/∂z (see core.ste),
                         gradients scaled by g = 1 / sqrt(N · qmax), N = x.numel() / s.numel() counted over
                         the global batch (times the world size under DDP)

In eval mode it fake-quantizes with the current qparams. ``state_dict`` carries everything: buffers,
parameters, the step counter and (as extra state) the life-cycle state and the observer's ``state()``.
``to_tensor_quantizer_`` freezes the final qparams and turns it back into a plain ``TensorQuantizer``.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from lowbit.core import (
    SCALE_EPS, PerChannel, PerGroup, PerTensor, choose_qparams, expand_qparams, fake_quantize, grid_search_qparams,
)
from lowbit.core.spec import Granularity
from lowbit.nn import QuantState, TensorQuantizer
from lowbit.observers import make_observer
from lowbit.qat.config import QATConfig
from lowbit.qat.sync import all_reduce_extrema, world_size

log = logging.getLogger(__name__)

ROLES = ("weight", "activation")


def qparam_shape(shape: tuple[int, ...] | torch.Size, granularity: Granularity) -> tuple[int, ...]:
    """Compact qparam shape for a tensor of ``shape``: ``()``, ``(C,)``, or ``shape`` with the group axis
    replaced by ``ceil(shape[axis] / size)`` (the layouts ``expand_qparams`` takes)."""
    if isinstance(granularity, PerTensor):
        return ()
    axis = granularity.axis % len(shape)
    if isinstance(granularity, PerChannel):
        return (int(shape[axis]),)
    out = list(shape)
    out[axis] = -(-int(shape[axis]) // granularity.size)
    return tuple(out)


def _extrema_as_tensor(lo: torch.Tensor, hi: torch.Tensor, granularity: Granularity, ndim: int) -> torch.Tensor:
    """A tiny tensor whose per-tensor / per-channel min and max are ``lo`` and ``hi`` (fed to an observer)."""
    if isinstance(granularity, PerTensor):
        return torch.stack([lo.reshape(()), hi.reshape(())])
    axis = granularity.axis % ndim
    shape = [1] * ndim
    shape[axis] = -1
    other = 1 if axis == 0 else 0
    return torch.cat([lo.reshape(shape), hi.reshape(shape)], dim=other)


class LearnableQuantizer(TensorQuantizer):
    """Observe-then-learn fake quantizer for QAT (see module docstring). Build with :meth:`upgrade_`."""

    role: str
    config: QATConfig

    @classmethod
    def upgrade_(cls, q: TensorQuantizer, role: str, config: QATConfig) -> LearnableQuantizer:
        """Turn ``q`` (a plain ``TensorQuantizer`` with a spec) into a learnable one, in place."""
        if type(q) is not TensorQuantizer or q.spec is None:
            raise TypeError(f"quantizer {q.qname}: only a TensorQuantizer with a spec can become learnable")
        if role not in ROLES:
            raise ValueError(f"quantizer role must be one of {ROLES}, got {role!r}")
        if role == "activation" and isinstance(q.spec.granularity, PerGroup):
            raise ValueError(f"quantizer {q.qname}: per-group activations cannot be trained (no EMA observer)")
        q.__class__ = cls
        q.role, q.config = role, config
        q.observer_steps = config.observer_steps
        q.ranges_ready = False
        q.register_buffer("qat_steps", torch.zeros((), dtype=torch.int64, device=q.scale.device))
        q._steps_cache = 0  # host copy of qat_steps (see steps_done)
        q.register_parameter("learn_scale", None)
        q.register_parameter("learn_offset", None)
        return q

    # ------------------------------------------------------------------ set-up
    def init_parameters_(self, tensor_shape: tuple[int, ...] | torch.Size) -> None:
        """Create the learnable scale (and LSQ+ offset) for tensors of ``tensor_shape`` (no-op without
        ``learn_ranges``). Their values are set from the observer at the hand-over."""
        if not self.config.learn_ranges:
            return
        shape = qparam_shape(tuple(tensor_shape), self.spec.granularity)
        device = self.scale.device  # the model's device (prepare moved the quantizer there)
        self.learn_scale = nn.Parameter(torch.ones(shape, device=device))
        if self.config.learn_offset and not self.spec.symmetric:
            self.learn_offset = nn.Parameter(torch.zeros(shape, device=device))

    @property
    def phase(self) -> str:
        """``observe``, ``learn`` (ranges are parameters) or ``fixed`` (observer frozen, nothing learnt)."""
        if self.ranges_ready:
            return "learn"
        if self.steps_done() < self.observer_steps or self.state is not QuantState.FROZEN:
            return "observe"
        return "learn" if self.learn_scale is not None else "fixed"

    def adopt_qparams_(self) -> None:
        """Start learning from the current frozen qparams (e.g. PTQ-calibrated): no observer phase."""
        if self.state is not QuantState.FROZEN:
            raise RuntimeError(f"quantizer {self.qname} has no qparams to adopt (state {self.state.value})")
        self.observer_steps = 0
        if self.learn_scale is not None:
            self._hand_over()

    def reset(self) -> None:
        super().reset()
        self.ranges_ready = False
        self.qat_steps.zero_()
        self._steps_cache = 0

    def steps_done(self) -> int:
        """Training steps seen (``qat_steps``), read from a host-side copy: reading the buffer itself would
        wait for the GPU on every forward pass. The copy is refreshed when a checkpoint is loaded."""
        cached = self.__dict__.get("_steps_cache")
        if cached is None:
            cached = self._steps_cache = int(self.qat_steps)
        return cached

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is None or not self.enabled or self.state is QuantState.CALIBRATING or self.export_mode:
            return super().forward(x)
        if self.training:
            return self._train_forward(x)
        if self.ranges_ready:
            return self._fake_quant(x, learned=True)
        return super().forward(x)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        step = self.steps_done()
        if step < self.observer_steps or self.state is not QuantState.FROZEN:
            self._observe_step(x)
        if step >= self.observer_steps and self.learn_scale is not None and not self.ranges_ready:
            if self.role == "weight" and self.config.weight_init == "mse":
                self.init_from_tensor_(x)
            self._hand_over()
        self.qat_steps += 1
        self._steps_cache = step + 1
        return self._fake_quant(x, learned=self.ranges_ready)

    def _observe_step(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.role == "weight":  # the weight is known exactly: observe the current one, nothing to average
            self.observer = make_observer(self.spec.calibrator, name=self.qname, granularity=self.spec.granularity)
            self.observer.update(x)
        else:
            if self.observer is None:
                self.observer = make_observer("ema", name=self.qname, granularity=self.spec.granularity,
                                              momentum=self.config.ema_momentum)
            if world_size() > 1:
                x = self._global_extrema(x)
            self.observer.update(x)
        lo, hi = self.calibrated_range()
        self.set_qparams(*choose_qparams(lo, hi, self.spec.qmin, self.spec.qmax, self.spec.symmetric))

    def _global_extrema(self, x: torch.Tensor) -> torch.Tensor:
        g = self.spec.granularity
        if isinstance(g, PerTensor):
            lo, hi = torch.aminmax(x.float())
        else:
            rows = x.float().movedim(g.axis % x.ndim, 0).reshape(x.shape[g.axis % x.ndim], -1)
            lo, hi = torch.aminmax(rows, dim=1)
        return _extrema_as_tensor(*all_reduce_extrema(lo, hi), g, x.ndim)

    def init_from_tensor_(self, x: torch.Tensor) -> None:
        """Set the qparams to the least-squared-error clipping of ``x`` (``core.grid_search_qparams``)."""
        g, spec = self.spec.granularity, self.spec
        if isinstance(g, PerGroup):
            raise ValueError(f"quantizer {self.qname}: mse initialisation supports per-tensor and per-channel")
        self.set_qparams(*grid_search_qparams(x.detach(), spec.qmin, spec.qmax, spec.symmetric, g))

    def _hand_over(self) -> None:
        with torch.no_grad():
            self.learn_scale.copy_(self.scale.reshape(self.learn_scale.shape))
            if self.learn_offset is not None:
                self.learn_offset.copy_(self.zero_point.reshape(self.learn_offset.shape).float())
        self.ranges_ready = True
        log.debug("quantizer %s: ranges become learnable at step %d", self.qname, self.steps_done())

    def learned_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(clamp(s, ε), z)`` as used by the forward pass (with gradients); ``z`` is a float offset or the
        integer buffer."""
        s = torch.clamp(self.learn_scale, min=SCALE_EPS)
        return s, (self.learn_offset if self.learn_offset is not None else self.zero_point)

    def _fake_quant(self, x: torch.Tensor, learned: bool) -> torch.Tensor:
        spec = self.spec
        if not learned:
            s, z = self.expanded(x.shape)
            return fake_quantize(x, s, z, spec.qmin, spec.qmax)
        s, z = self.learned_qparams()
        self.set_qparams(s, torch.clamp(torch.round(z.detach()), spec.qmin, spec.qmax))
        g = 1.0
        if self.config.grad_scaling:  # N counts the global batch, so DDP's average equals one process's gradient
            n = x.numel() * (world_size() if self.training else 1) // max(s.numel(), 1)
            g = 1.0 / math.sqrt(max(n, 1) * spec.qmax)
        gran = spec.granularity
        return fake_quantize(x, expand_qparams(s, x.shape, gran), expand_qparams(z, x.shape, gran),
                             spec.qmin, spec.qmax, g)

    def export_tensors(self) -> dict:
        raise RuntimeError(f"quantizer {self.qname} is still learnable: call lowbit.qat.convert_(model) before export")

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict:
        return {
            "version": 1, "state": self.state.value, "observer_steps": self.observer_steps,
            "ranges_ready": self.ranges_ready, "observer": None if self.observer is None else self.observer.state(),
        }

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError(f"quantizer {self.qname}: unreadable checkpoint state {type(state).__name__}")
        self.state = QuantState(state["state"])
        self.observer_steps = int(state["observer_steps"])
        self.ranges_ready = bool(state["ranges_ready"])
        self.observer = None
        obs = state["observer"]
        if obs is not None:
            self.observer = make_observer(obs["observer"], name=self.qname, granularity=self.spec.granularity,
                                          **obs["options"])
            self.observer.load_state(obs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("scale", "zero_point"):  # qparams take their compact shape at the first observation
            incoming = state_dict.get(prefix + key)
            if isinstance(incoming, torch.Tensor) and incoming.shape != self._buffers[key].shape:
                old = self._buffers[key]
                self._buffers[key] = torch.empty(incoming.shape, dtype=old.dtype, device=old.device)
        self._steps_cache = None  # qat_steps comes from the checkpoint
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ conversion
    def final_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The qparams the converted model keeps: learnt ones rounded to codes, else the frozen ones."""
        if not self.ranges_ready:
            return self.scale.clone(), self.zero_point.clone()
        with torch.no_grad():
            s, z = self.learned_qparams()
            return s.detach().clone(), torch.clamp(torch.round(z.detach()), self.spec.qmin, self.spec.qmax).long()

    def to_tensor_quantizer_(self) -> TensorQuantizer:
        """Freeze the final qparams and become a plain ``TensorQuantizer`` (in place)."""
        if self.state is not QuantState.FROZEN:
            raise RuntimeError(f"quantizer {self.qname} never saw data: train (or calibrate) before convert_")
        scale, zero_point = self.final_qparams()
        for name in ("learn_scale", "learn_offset"):
            self._parameters.pop(name, None)
        self._buffers.pop("qat_steps", None)
        for attr in ("role", "config", "observer_steps", "ranges_ready", "_steps_cache"):
            self.__dict__.pop(attr, None)
        self.__class__ = TensorQuantizer
        self.set_qparams(scale, zero_point)
        return self
