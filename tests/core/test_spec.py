"""QuantSpec, granularities, check_bits and qrange against closed-form integer ranges."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lowbit.core import PerChannel, PerGroup, PerTensor, QuantSpec, check_bits, qrange

ALL_BITS = range(2, 17)

# Independent reference: numpy's own integer dtypes for the widths that exist.
NUMPY_INT = {8: (np.int8, np.uint8), 16: (np.int16, np.uint16)}


@pytest.mark.parametrize("bits", ALL_BITS)
def test_qrange_signed(bits):
    assert qrange(bits, signed=True) == (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    lo, hi = qrange(bits, signed=True)
    assert hi - lo + 1 == 2**bits  # every code of the width is used
    assert lo == -hi - 1


@pytest.mark.parametrize("bits", ALL_BITS)
def test_qrange_unsigned(bits):
    assert qrange(bits, signed=False) == (0, (1 << bits) - 1)
    assert qrange(bits, signed=False, narrow_range=False) == qrange(bits, False)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_qrange_narrow(bits):
    lo, hi = qrange(bits, signed=True, narrow_range=True)
    assert (lo, hi) == (-(1 << (bits - 1)) + 1, (1 << (bits - 1)) - 1)
    assert lo == -hi  # symmetric code range
    assert qrange(bits, signed=False, narrow_range=True) == (0, (1 << bits) - 2)


@pytest.mark.parametrize("bits", sorted(NUMPY_INT))
def test_qrange_matches_numpy_iinfo(bits):
    sdt, udt = NUMPY_INT[bits]
    assert qrange(bits, True) == (np.iinfo(sdt).min, np.iinfo(sdt).max)
    assert qrange(bits, False) == (np.iinfo(udt).min, np.iinfo(udt).max)


def test_qrange_known_values():
    assert qrange(8, True, narrow_range=True) == (-127, 127)
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(4, True) == (-8, 7)
    assert qrange(4, False) == (0, 15)
    assert qrange(2, True) == (-2, 1)
    assert qrange(2, True, narrow_range=True) == (-1, 1)
    assert qrange(16, True) == (-32768, 32767)
    assert qrange(16, False) == (0, 65535)


BAD_BITS = [0, 1, 17, 32, -8, 8.0, 4.5, "8", None, True, False, np.float32(8)]


@pytest.mark.parametrize("bits", BAD_BITS, ids=repr)
def test_bad_bits_rejected(bits):
    with pytest.raises(ValueError):
        check_bits(bits)
    with pytest.raises(ValueError):
        qrange(bits, True)
    with pytest.raises(ValueError):
        qrange(bits, False, narrow_range=True)
    with pytest.raises(ValueError):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_good_bits_accepted(bits):
    assert check_bits(bits) is None
    spec = QuantSpec(bits=bits)
    assert spec.bits == bits


def test_quantspec_defaults():
    spec = QuantSpec()
    assert (spec.bits, spec.signed, spec.symmetric, spec.narrow_range) == (8, True, True, False)
    assert spec.granularity == PerTensor()
    assert spec.calibrator == "minmax"
    assert (spec.qmin, spec.qmax) == (-128, 127)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("narrow", [True, False])
def test_quantspec_qmin_qmax_follow_qrange(bits, signed, narrow):
    spec = QuantSpec(bits=bits, signed=signed, narrow_range=narrow)
    assert (spec.qmin, spec.qmax) == qrange(bits, signed, narrow)


def test_quantspec_narrow_int8_and_uint8():
    assert (QuantSpec(narrow_range=True).qmin, QuantSpec(narrow_range=True).qmax) == (-127, 127)
    u8 = QuantSpec(signed=False, symmetric=False)
    assert (u8.qmin, u8.qmax) == (0, 255)


@pytest.mark.parametrize("gran", [None, "per_tensor", 0, PerTensor, object()], ids=repr)
def test_quantspec_rejects_bad_granularity(gran):
    with pytest.raises(ValueError):
        QuantSpec(granularity=gran)


@pytest.mark.parametrize("cal", ["", None, 3, b"minmax"], ids=repr)
def test_quantspec_rejects_bad_calibrator(cal):
    with pytest.raises(ValueError):
        QuantSpec(calibrator=cal)


@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(0), PerChannel(axis=-1), PerGroup(32, 1), PerGroup()])
def test_quantspec_accepts_granularities(gran):
    assert QuantSpec(granularity=gran).granularity is gran


def test_quantspec_is_frozen_and_hashable():
    spec = QuantSpec(bits=4, granularity=PerChannel(1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 8  # type: ignore[misc]
    assert spec == QuantSpec(bits=4, granularity=PerChannel(1))
    assert spec != QuantSpec(bits=4, granularity=PerChannel(0))
    assert hash(spec) == hash(QuantSpec(bits=4, granularity=PerChannel(1)))
    assert len({spec, QuantSpec(bits=4, granularity=PerChannel(1)), QuantSpec()}) == 2
    # dataclasses.replace goes through validation again
    with pytest.raises(ValueError):
        dataclasses.replace(spec, bits=1)
    assert dataclasses.replace(spec, bits=6).qmax == 31


def test_granularity_kinds_and_defaults():
    assert PerTensor().kind == "per_tensor"
    assert PerChannel().kind == "per_channel" and PerChannel().axis == 0
    g = PerGroup()
    assert g.kind == "per_group" and (g.size, g.axis) == (128, -1)
    assert PerGroup(size=1).size == 1
    # kind is not an init argument
    with pytest.raises(TypeError):
        PerChannel(axis=0, kind="per_tensor")  # type: ignore[call-arg]
    assert PerChannel(1) != PerChannel(2) and PerGroup(16, 0) == PerGroup(16, 0)


@pytest.mark.parametrize("size", [0, -1, -128])
def test_pergroup_rejects_bad_size(size):
    with pytest.raises(ValueError):
        PerGroup(size=size)
