"""bfpaccel.formats: presets, explicit triples, validation, derived quantities (docs/numerics.md#formats).

Every expected number here is written out by hand from docs/numerics.md, not computed by the code
under test.
"""

from __future__ import annotations

import math

import pytest

import bfpaccel
from bfpaccel import Format, get_format, list_formats

# docs/numerics.md#presets: name -> (block, shared exponent bits, element, bits per element).
# bits/elem = element bits (sign + magnitude / sign + e + m) + shared bits / block.
PRESET_TABLE = {
    "msfp12": (16, 8, "int3", 4 + 8 / 16),  # 4.5
    "msfp13": (16, 8, "int4", 5 + 8 / 16),  # 5.5
    "msfp14": (16, 8, "int5", 6 + 8 / 16),  # 6.5
    "msfp15": (16, 8, "int6", 7 + 8 / 16),  # 7.5
    "msfp16": (16, 8, "int7", 8 + 8 / 16),  # 8.5
    "msfp8": (128, 5, "int2", 3 + 5 / 128),
    "msfp9": (128, 5, "int3", 4 + 5 / 128),
    "mxint8": (32, 8, "int7", 8 + 8 / 32),  # 8.25
    "mxfp8_e5m2": (32, 8, "e5m2", 8 + 8 / 32),
    "mxfp8_e4m3": (32, 8, "e4m3", 8 + 8 / 32),
    "mxfp6_e3m2": (32, 8, "e3m2", 6 + 8 / 32),  # 6.25
    "mxfp6_e2m3": (32, 8, "e2m3", 6 + 8 / 32),
    "mxfp4_e2m1": (32, 8, "e2m1", 4 + 8 / 32),  # 4.25
}


def test_every_documented_preset_is_listed():
    names = list_formats()
    for n in list(PRESET_TABLE) + ["fp32", "bf16", "fp16"]:
        assert n in names
    # no undocumented block presets
    block_names = {n for n in names if get_format(n).is_block}
    assert block_names == set(PRESET_TABLE)


@pytest.mark.parametrize("name", sorted(PRESET_TABLE))
def test_preset_triple(name):
    block, sbits, element, bpe = PRESET_TABLE[name]
    f = get_format(name)
    assert (f.block, f.shared_exp_bits, f.element) == (block, sbits, element)
    assert f.rounding == "nearest_even"
    assert f.is_block
    assert f.name == name
    assert f.bits_per_element == pytest.approx(bpe, rel=0, abs=1e-12)


def test_bits_per_element_examples_from_the_brief():
    assert get_format("msfp12").bits_per_element == 4.5
    assert get_format("msfp16").bits_per_element == 8.5
    assert get_format("mxint8").bits_per_element == 8.25
    assert get_format("mxfp4_e2m1").bits_per_element == 4.25
    assert get_format("msfp8").bits_per_element == 3 + 5 / 128


@pytest.mark.parametrize("name,bits", [("fp32", 32), ("bf16", 16), ("fp16", 16)])
def test_ieee_presets(name, bits):
    f = get_format(name)
    assert not f.is_block
    assert f.block is None and f.shared_exp_bits is None
    assert f.element == name
    assert f.bits_per_element == bits


@pytest.mark.parametrize("spelling", ["MSFP16", "Msfp16", "msfp16", "  msfp16 ", "mSfP16"])
def test_names_are_case_insensitive(spelling):
    assert get_format(spelling) == get_format("msfp16")
    assert get_format(spelling).name == "msfp16"


def test_mx_names_case_insensitive():
    assert get_format("MXFP4_E2M1") == get_format("mxfp4_e2m1")
    assert get_format("MXINT8").block == 32


def test_explicit_triple_equals_preset():
    f = Format(block=16, shared_exp_bits=8, element="int7")
    assert f == get_format("msfp16")
    assert f.bits_per_element == 8.5
    # the element name is case-insensitive too
    assert Format(block=32, shared_exp_bits=8, element="E2M1") == get_format("mxfp4_e2m1")
    # a triple that is no preset is still a valid format
    g = Format(block=8, shared_exp_bits=6, element="int4")
    assert g.block == 8 and g.bits_per_element == 5 + 6 / 8
    assert (g.exp_min, g.exp_max) == (-30, 31)  # 6-bit fp16-like field: bias 31


def test_explicit_triple_differs_from_other_presets():
    f = Format(block=16, shared_exp_bits=8, element="int7")
    assert f != get_format("msfp15")
    assert f != get_format("mxint8")  # same element, block 32
    assert f != f.with_rounding("toward_zero")


def test_get_format_block_override():
    f = get_format("msfp8", block=64)
    assert (f.block, f.shared_exp_bits, f.element) == (64, 5, "int2")
    assert f.bits_per_element == 3 + 5 / 64
    assert get_format("msfp8").block == 128  # the preset itself is unchanged


def test_get_format_rounding_override():
    for r in bfpaccel.ROUNDING_MODES:
        f = get_format("mxint8", rounding=r)
        assert f.rounding == r
        assert (f.block, f.element) == (32, "int7")
    assert get_format("msfp16").rounding == "nearest_even"


def test_get_format_accepts_a_format():
    f = Format(block=4, shared_exp_bits=8, element="e4m3")
    assert get_format(f) is f
    assert get_format(f, block=8).block == 8


def test_rounding_modes_constant():
    assert tuple(bfpaccel.ROUNDING_MODES) == ("nearest_even", "nearest_away", "toward_zero", "stochastic")


def test_unknown_name_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="msfp99"):
        get_format("msfp99")
    with pytest.raises(ValueError, match="float8"):
        get_format("float8")


def test_non_string_format_is_a_type_error():
    with pytest.raises(TypeError):
        get_format(16)


@pytest.mark.parametrize("block", [0, -16, 4097, 2.5, True, "16"])
def test_bad_block_raises(block):
    with pytest.raises(ValueError, match="block"):
        Format(block=block, shared_exp_bits=8, element="int7")


def test_bad_block_override_raises_with_value():
    with pytest.raises(ValueError, match="got 0"):
        get_format("msfp8", block=0)
    with pytest.raises(ValueError, match="-3"):
        get_format("msfp16", block=-3)
    with pytest.raises(ValueError):
        get_format("fp16", block=16)  # IEEE types have no block


@pytest.mark.parametrize("element", ["int8", "int0", "e3m3", "fp8", ""])
def test_bad_element_raises_with_value(element):
    with pytest.raises(ValueError) as info:
        Format(block=16, shared_exp_bits=8, element=element)
    assert repr(element) in str(info.value)


@pytest.mark.parametrize("sbits", [2, 9, 0, None])
def test_bad_shared_exp_bits(sbits):
    with pytest.raises(ValueError, match="shared_exp_bits"):
        Format(block=16, shared_exp_bits=sbits, element="int7")


def test_ieee_element_with_block_raises():
    with pytest.raises(ValueError):
        Format(block=16, shared_exp_bits=8, element="fp16")


@pytest.mark.parametrize("rounding", ["round_up", "nearest", "RNE", ""])
def test_bad_rounding_raises_with_value(rounding):
    with pytest.raises(ValueError, match="rounding"):
        Format(block=16, shared_exp_bits=8, element="int7", rounding=rounding)
    with pytest.raises(ValueError) as info:
        get_format("msfp16", rounding=rounding)
    assert repr(rounding) in str(info.value)


def test_format_is_frozen_and_hashable():
    f = get_format("msfp16")
    with pytest.raises(Exception):
        f.block = 32  # type: ignore[misc]
    assert {f: 1}[Format(16, 8, "int7")] == 1


# ---------------------------------------------------------------------------- element tables
# docs/numerics.md#element-kinds: element max normal, min subnormal, emax_elem (exponent of the top binade).
ELEMENT_TABLE = {
    # element: (max normal, min subnormal, emax_elem, unit_shift)
    # unit = min subnormal = 2^(1 - bias - m)  ->  unit_shift = bias + m - 1
    "e5m2": (57344.0, 2.0**-16, 15, 15 + 2 - 1),
    "e4m3": (448.0, 2.0**-9, 8, 7 + 3 - 1),
    "e3m2": (28.0, 2.0**-4, 4, 3 + 2 - 1),
    "e2m3": (7.5, 2.0**-3, 2, 1 + 3 - 1),
    "e2m1": (6.0, 0.5, 2, 1 + 1 - 1),
}


@pytest.mark.parametrize("element", sorted(ELEMENT_TABLE))
def test_mx_element_constants(element):
    max_normal, min_sub, emax, ushift = ELEMENT_TABLE[element]
    f = Format(block=32, shared_exp_bits=8, element=element)
    assert f.emax_elem == emax
    assert f.unit_shift == ushift
    # max_units * unit == max normal
    assert math.ldexp(f.max_units, -f.unit_shift) == max_normal
    # with an 8-bit (E8M0) shared exponent: X in [2^-127, 2^127]
    assert f.max_value == max_normal * 2.0**127
    assert f.min_value == min_sub * 2.0**-127
    assert f.kind == "fp"


def test_max_units_by_hand():
    # E2M1 max 6 = 12 units of 0.5; E2M3 max 7.5 = 60 units of 1/8; E3M2 28 = 448 units of 1/16
    assert get_format("mxfp4_e2m1").max_units == 12
    assert get_format("mxfp6_e2m3").max_units == 60
    assert get_format("mxfp6_e3m2").max_units == 448
    # E4M3 448 = 448 * 2^9 units; E5M2 57344 = 57344 * 2^16 units
    assert get_format("mxfp8_e4m3").max_units == 448 * 512
    assert get_format("mxfp8_e5m2").max_units == 57344 * 65536
    # int(p): 2^p - 1
    assert [get_format(f"msfp{p + 9}").max_units for p in range(3, 8)] == [7, 15, 31, 63, 127]
    assert get_format("msfp8").max_units == 3
    assert get_format("msfp9").max_units == 7


def test_int_format_values_by_hand():
    # msfp16: int(7), value = m * 2^(E - 6), E in [-127, 127]
    f = get_format("msfp16")
    assert (f.exp_min, f.exp_max, f.emax_elem, f.unit_shift) == (-127, 127, 0, 6)
    assert f.max_value == 127 * 2.0 ** (127 - 6)
    assert f.min_value == 2.0 ** (-127 - 6)
    # mxint8: int(7) with implied 2^-6 -> max 127 * 2^-6 per unit scale X = 2^127
    m = get_format("mxint8")
    assert m.max_value == 127 * 2.0**-6 * 2.0**127
    assert m.min_value == 2.0**-6 * 2.0**-127
    # msfp8: int(2), 5-bit shared exponent in [-14, 15]: max 3 * 2^(15 - 1) = 49152, min 2^(-14 - 1)
    b = get_format("msfp8")
    assert (b.exp_min, b.exp_max) == (-14, 15)
    assert b.max_value == 49152.0
    assert b.min_value == 2.0**-15
    # msfp9: int(3): max 7 * 2^(15 - 2) = 57344, min 2^(-14 - 2)
    b9 = get_format("msfp9")
    assert b9.max_value == 57344.0
    assert b9.min_value == 2.0**-16
    # msfp12: int(3), 8-bit: max 7 * 2^(127 - 2)
    assert get_format("msfp12").max_value == 7 * 2.0**125


def test_ieee_max_min_values():
    assert get_format("fp16").max_value == 65504.0
    assert get_format("fp16").min_value == 2.0**-24
    assert get_format("fp32").max_value == float.fromhex("0x1.fffffep+127")
    assert get_format("bf16").max_value == float.fromhex("0x1.fep+127")


def test_element_bits():
    assert get_format("msfp16").element_bits == 8
    assert get_format("msfp8").element_bits == 3
    assert get_format("mxfp4_e2m1").element_bits == 4
    assert get_format("mxfp6_e3m2").element_bits == 6
    assert get_format("mxfp8_e4m3").element_bits == 8


def test_kernel_params_are_plain_ints():
    for name in PRESET_TABLE:
        params = get_format(name).kernel_params()
        assert len(params) == 12
        assert all(type(v) is int for v in params)
    with pytest.raises(ValueError):
        get_format("fp16").kernel_params()
    # the rounding id follows ROUNDING_MODES order
    assert get_format("msfp16", rounding="stochastic").kernel_params()[-1] == 3


def test_str_is_readable():
    s = str(get_format("msfp16"))
    for part in ("msfp16", "16", "int7", "8-bit", "nearest_even", "8.5"):
        assert part in s
    s4 = str(get_format("mxfp4_e2m1"))
    assert "mxfp4_e2m1" in s4 and "e2m1" in s4 and "32" in s4 and "4.25" in s4
    assert "custom" in str(Format(block=8, shared_exp_bits=8, element="int4"))
    assert "fp16" in str(get_format("fp16"))


def test_nan_exponent_constant():
    # the marker must lie outside every shared-exponent range
    assert bfpaccel.NAN_EXPONENT == -32768
    for name in PRESET_TABLE:
        assert bfpaccel.NAN_EXPONENT < get_format(name).exp_min
