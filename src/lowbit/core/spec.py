"""How one tensor is quantized: bit width, sign, symmetry, range and granularity.

Every other layer of lowbit speaks these frozen dataclasses; they validate themselves on
construction so a bad value fails where it is written, not deep inside a pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

MIN_BITS = 2
MAX_BITS = 16


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero-point for the whole tensor."""

    kind: str = field(default="per_tensor", init=False, repr=False)


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero-point per index along ``axis`` (e.g. output channels of a weight)."""

    axis: int = 0
    kind: str = field(default="per_channel", init=False, repr=False)


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive elements along ``axis`` (the reduction dimension).

    For a Linear weight ``[out, in]`` use ``axis=1``: every output row gets ``ceil(in / size)`` scales.
    """

    size: int = 128
    axis: int = -1
    kind: str = field(default="per_group", init=False, repr=False)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"PerGroup.size must be >= 1, got {self.size}")


Granularity = Union[PerTensor, PerChannel, PerGroup]


def check_bits(bits: int) -> None:
    """Raise ValueError unless ``bits`` is an integer in [2, 16]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def qrange(bits: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    """Integer range of a ``bits``-wide code.

    signed: ``[-2^(b-1), 2^(b-1) - 1]`` (narrow: ``[-2^(b-1) + 1, 2^(b-1) - 1]``, e.g. [-127, 127]);
    unsigned: ``[0, 2^b - 1]`` (narrow: ``[0, 2^b - 2]``).
    """
    check_bits(bits)
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return (qmin + 1 if narrow_range else qmin), qmax
    return 0, (2**bits - 2 if narrow_range else 2**bits - 1)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
        bits: code width, 2..16.
        signed: signed codes (int8) or unsigned (uint8).
        symmetric: zero-point fixed at 0 (scale = amax / qmax) or affine (scale = (max - min) / (qmax - qmin)).
        narrow_range: drop the most negative code (signed) so the range is symmetric, as TensorRT requires.
        granularity: PerTensor(), PerChannel(axis) or PerGroup(size, axis).
        calibrator: observer name (``minmax``, ``ema``, ``meanstd``, ``percentile``, ``entropy``, ``mse``).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = PerTensor()
    calibrator: str = "minmax"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerGroup)):
            raise ValueError(f"granularity must be PerTensor, PerChannel or PerGroup, got {self.granularity!r}")
        if not isinstance(self.calibrator, str) or not self.calibrator:
            raise ValueError(f"calibrator must be a non-empty name, got {self.calibrator!r}")

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return qrange(self.bits, self.signed, self.narrow_range)[0]

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return qrange(self.bits, self.signed, self.narrow_range)[1]
