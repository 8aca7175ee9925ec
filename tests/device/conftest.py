"""A strict device check for the CPU-only suite: ``meta`` stands in for CUDA.

Plain ``meta`` tensors refuse some CPU operands (``meta + cpu`` raises) but not all (in-place ops and ``bmm``
accept them silently), so :class:`StrictDevices` checks every aten op instead, with CUDA's rule: all tensors
of an op on one device, except CPU 0-dim tensors used as inputs (scalars) and CPU index tensors; explicit
copies between devices (``.to``, ``copy_``) are allowed.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

COPIES = {"_to_copy", "copy_", "_copy_from", "to", "lift_fresh", "lift_fresh_copy", "detach", "alias",
          "_local_scalar_dense", "_has_compatible_shallow_copy_type", "set_"}
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


class DeviceMismatch(RuntimeError):
    """Raised by :class:`StrictDevices` where CUDA would say 'Expected all tensors to be on the same device'."""


class StrictDevices(TorchDispatchMode):
    """Raise :class:`DeviceMismatch` on any aten op mixing devices the way CUDA refuses (module doc)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name not in COPIES:
            self._check(name, func, args, kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _check(name, func, args, kwargs) -> None:
        flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not flat:
            return
        mutated = func._schema.is_mutable or name.endswith("_")
        first = flat[0]
        devices = set()
        for i, t in enumerate(flat):
            scalar_input = t.device.type == "cpu" and t.ndim == 0 and not (mutated and i == 0)
            index = name in INDEXING and i > 0 and t.device.type == "cpu" and t.dtype in (torch.long, torch.bool)
            if not (scalar_input or index):
                devices.add(t.device)
        if len(devices) > 1:
            raise DeviceMismatch(f"{func}: tensors on {sorted(map(str, devices))} (first {first.device})")


@pytest.fixture
def strict_devices():
    """Run the block under :class:`StrictDevices`."""
    return StrictDevices
