"""bfpaccel.reference (the numpy oracle) against cases worked out BY HAND from docs/numerics.md.

The other test files trust the reference; this file is why.  Every expected number below is
derived in the comments from the rules of docs/numerics.md (element kinds, shared exponent,
rounding, matrix datapath), never by calling the code under test.

Notation: int(p) elements have value m * 2^(E - (p-1)), so "units" are 2^(E - (p-1)).
"""

from __future__ import annotations

import numpy as np
import pytest

import bfpaccel
from bfpaccel import Format, get_format
from bfpaccel import reference as ref
from conftest import assert_bits_equal

NANE = bfpaccel.NAN_EXPONENT
f32 = np.float32


def q(x, fmt, axis=-1, seed=0):
    return ref.quantize_blocks(np.asarray(x, dtype=f32), fmt, axis=axis, seed=seed)


def fq(x, fmt, axis=-1, seed=0):
    return ref.fake_quantize(np.asarray(x, dtype=f32), fmt, axis=axis, seed=seed)


def values(*v):
    return np.array(v, dtype=f32)


# ----------------------------------------------------------------------------- msfp16 example
def test_msfp16_worked_example():
    # amax = 1.0 -> E = floor(log2 1) - 0 = 0; int(7): unit = 2^(0 - 6) = 1/64
    # 1.0*64 = 64; 0.3*64 = 19.2 -> 19; -0.77*64 = -49.28 -> -49; 0.01*64 = 0.64 -> 1
    codes, exps = q([1.0, 0.3, -0.77, 0.01], "msfp16")
    assert codes.dtype == np.int8 and exps.dtype == np.int16
    assert codes.tolist() == [64, 19, -49, 1]
    assert exps.tolist() == [0]
    # 64/64, 19/64, -49/64, 1/64
    assert_bits_equal(fq([1.0, 0.3, -0.77, 0.01], "msfp16"), values(1.0, 0.296875, -0.765625, 0.015625))


def test_negative_amax_sets_the_exponent():
    # amax = |-1.5| -> E = 0; -1.5*64 = -96, 0.25*64 = 16
    codes, exps = q([-1.5, 0.25], "msfp16")
    assert codes.tolist() == [-96, 16] and exps.tolist() == [0]


def test_incomplete_last_block_padding_never_raises_amax():
    # 20 elements, block 16: block 0 = sixteen 1.0 (E=0), block 1 = [0.3, 0.1] + zero padding.
    # block 1: amax 0.3 -> floor(log2 0.3) = -2 -> E = -2, unit 2^(-2-6) = 1/256
    # 0.3*256 = 76.8 -> 77 (0.30078125); 0.1*256 = 25.6 -> 26 (0.1015625)
    x = [1.0] * 16 + [0.3, 0.1, 0.0, 0.0]
    codes, exps = q(x, "msfp16")
    assert exps.tolist() == [0, -2]
    assert codes.tolist() == [64] * 16 + [77, 26, 0, 0]
    assert_bits_equal(fq(x, "msfp16"), values(*([1.0] * 16 + [0.30078125, 0.1015625, 0.0, 0.0])))


# ----------------------------------------------------------------------------- saturation
def test_int2_never_rounds_into_next_binade():
    # int(2): m in 0..3, unit 2^(E-1). [1.99]: E = 0, 1.99*2 = 3.98 -> rounds to 4 -> saturates to 3
    f = Format(block=4, shared_exp_bits=8, element="int2")
    codes, exps = q([1.99], f)
    assert codes.tolist() == [3] and exps.tolist() == [0]
    assert fq([1.99], f).tolist() == [1.5]


def test_e4m3_amax_1_9_gives_1_75():
    # E4M3: emax_elem 8 -> E = floor(log2 1.9) - 8 = -8, element P = 1.9 * 2^8 = 486.4.
    # top binade [256, 512) has step 2^(8-3) = 32: 486.4 -> 480 (= S.1111.111, NaN) -> saturate
    # to max normal 448 = S.1111.110 = 0x7E;  448 * 2^-8 = 1.75
    codes, exps = q([1.9], "mxfp8_e4m3")
    assert codes.dtype == np.uint8
    assert codes.tolist() == [0x7E] and exps.tolist() == [-8]
    assert fq([1.9], "mxfp8_e4m3").tolist() == [1.75]


@pytest.mark.parametrize(
    "fmt,expected",
    [
        # amax = float32(1.99) in every case; E = 0 - emax_elem
        ("msfp12", 1.75),  # int(3): 1.99*4 = 7.96 -> 8 -> sat 7 -> 7/4
        ("msfp16", 1.984375),  # int(7): 1.99*64 = 127.36 -> 127 -> 127/64 (no saturation needed)
        ("mxfp4_e2m1", 1.5),  # E=-2: P = 7.96, binade [4,8) step 2 -> 8 -> sat 6 -> 6/4
        ("mxfp6_e2m3", 1.875),  # E=-2: P = 7.96, step 0.5 -> 8 -> sat 7.5 -> 7.5/4
        ("mxfp6_e3m2", 1.75),  # E=-4: P = 31.84, step 4 -> 32 -> sat 28 -> 28/16
        ("mxfp8_e4m3", 1.75),  # E=-8: P = 509.44, step 32 -> 512 -> sat 448 -> 448/256
        ("mxfp8_e5m2", 1.75),  # E=-15: P = 65208.3, step 8192 -> 65536 -> sat 57344 -> 57344/32768
    ],
)
def test_saturation_below_two(fmt, expected):
    assert fq([1.99], fmt).tolist() == [expected]
    assert q([1.99], fmt)[1].tolist() == [0 - get_format(fmt).emax_elem]


def test_largest_float32_saturates():
    # 3.4028235e38 = (2 - 2^-23) * 2^127 -> E = 127; msfp16 units 127.99.. -> 128 -> sat 127
    big = np.finfo(f32).max
    codes, exps = q([big, -big], "msfp16")
    assert codes.tolist() == [127, -127] and exps.tolist() == [127]
    assert fq([big], "msfp16").tolist() == [127 * 2.0**121]


# ----------------------------------------------------------------------------- special blocks
@pytest.mark.parametrize("fmt,emin", [("msfp16", -127), ("mxfp4_e2m1", -127), ("mxfp8_e4m3", -127), ("msfp8", -14)])
def test_all_zero_block(fmt, emin):
    n = get_format(fmt).block
    codes, exps = q(np.zeros(n), fmt)
    assert exps.tolist() == [emin]
    assert not codes.any()
    assert_bits_equal(fq(np.zeros(n), fmt), np.zeros(n, dtype=f32))
    assert get_format(fmt).exp_min == emin


@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fmt", ["msfp16", "mxfp4_e2m1", "mxint8"])
def test_nan_or_inf_poisons_only_its_block(special, fmt):
    B = get_format(fmt).block
    x = np.zeros(3 * B, dtype=f32)
    x[:4] = [1.0, 0.3, -0.77, 0.01]  # block 0
    x[B : 2 * B] = 0.5  # block 1, then poisoned
    x[B + 5] = special
    x[2 * B] = 2.0  # block 2: amax 2
    codes, exps = q(x, fmt)
    assert exps[1] == NANE
    assert not codes[B : 2 * B].any()  # codes of a poisoned block are 0; the exponent marks it
    out = fq(x, fmt)
    assert np.isnan(out[B : 2 * B]).all()
    assert not np.isnan(out[:B]).any() and not np.isnan(out[2 * B :]).any()
    # blocks 0 and 2 are exactly what they are on their own
    assert_bits_equal(out[:B], fq(x[:B], fmt))
    assert_bits_equal(out[2 * B :], fq(x[2 * B :], fmt))
    # hand values: block 2 = [2.0, 0...] is exact in every format; E = 1 - emax_elem
    assert out[2 * B] == 2.0
    assert exps[2] == 1 - get_format(fmt).emax_elem


def test_nan_block_msfp16_hand_values():
    x = values(1.0, 0.3, -0.77, 0.01, *([0.0] * 12), 0.5, np.nan)
    codes, exps = q(x, "msfp16")
    assert exps.tolist() == [0, NANE]
    out = fq(x, "msfp16")
    assert_bits_equal(out[:4], values(1.0, 0.296875, -0.765625, 0.015625))
    assert np.isnan(out[16:]).all()


# ----------------------------------------------------------------------------- exponent exactness
def test_just_below_two_keeps_the_lower_exponent():
    x = np.nextafter(f32(2), f32(0))  # 2 - 2^-23; a float32 log2 would round it to 1.0
    assert float(x) == 2 - 2.0**-23
    # msfp16: E = floor(log2 x) = 0 (not 1); units = 128 - 2^-17 -> 128 -> sat 127 -> 127/64
    codes, exps = q([x], "msfp16")
    assert exps.tolist() == [0] and codes.tolist() == [127]
    assert fq([x], "msfp16").tolist() == [1.984375]  # with E = 1 it would read 2.0
    # mxfp4: E = 0 - 2 = -2; P = 8 - 2^-21 -> step 2 -> 8 -> sat 6 -> 6/4 = 1.5
    codes, exps = q([x], "mxfp4_e2m1")
    assert exps.tolist() == [-2] and codes.tolist() == [0b0111]
    assert fq([x], "mxfp4_e2m1").tolist() == [1.5]


@pytest.mark.parametrize("k", [-126, -100, -20, -1, 1, 20, 100, 127])
def test_just_below_powers_of_two(k):
    x = np.nextafter(f32(2.0**k), f32(0))  # (2 - 2^-23) * 2^(k-1)
    _, exps = q([x], "msfp16")
    assert exps.tolist() == [k - 1]
    _, exps = q([f32(2.0**k)], "msfp16")
    assert exps.tolist() == [k]
    # int(7) rounds 127.99.. up to 128 and saturates: 127 * 2^(k-1-6)
    assert fq([x], "msfp16").tolist() == [127 * 2.0 ** (k - 7)]


def test_subnormal_input_clamps_exponent_8bit():
    # float32(1e-40) = 71362 * 2^-149 (subnormal); floor(log2) = 16 - 149 = -133 -> clamp to -127
    x = f32(1e-40)
    assert int(x.view(np.uint32)) == 71362
    codes, exps = q([x], "msfp16")
    assert exps.tolist() == [-127]
    # units = 71362 * 2^-149 * 2^(127 + 6) = 71362 / 65536 = 1.089 -> 1 -> value 2^-133
    assert codes.tolist() == [1]
    assert fq([x], "msfp16").tolist() == [2.0**-133]
    # the smallest subnormal 2^-149 is 2^-16 units -> 0
    tiny = np.array([1], dtype=np.uint32).view(f32)
    codes, exps = q(tiny, "msfp16")
    assert codes.tolist() == [0] and exps.tolist() == [-127]


# ----------------------------------------------------------------------------- 5-bit clamping
def test_msfp8_exponent_range_and_saturation():
    f = get_format("msfp8")  # int(2), block 128, E in [-14, 15]; value = m * 2^(E-1)
    # 1e10: floor(log2) = 33 -> clamp 15 -> everything saturates to 3 * 2^14 = 49152
    codes, exps = q([1e10, -1e30, 20000.0], f)
    assert exps.tolist() == [15]
    # 20000 / 2^14 = 1.22 -> 1 -> 16384
    assert codes.tolist() == [3, -3, 1]
    assert fq([1e10, -1e30, 20000.0], f).tolist() == [49152.0, -49152.0, 16384.0]


def test_msfp8_underflow():
    f = get_format("msfp8")
    # 1e-6: floor(log2) = -20 -> clamp -14; units = 1e-6 * 2^15 = 0.033 -> 0
    codes, exps = q([1e-6, -1e-7], f)
    assert exps.tolist() == [-14] and codes.tolist() == [0, 0]
    assert fq([1e-6], f).tolist() == [0.0]
    # 2^-15: E = -15 -> clamp -14; units = 2^-15 * 2^15 = 1 -> exactly representable
    assert fq([2.0**-15], f).tolist() == [2.0**-15]
    # 3 * 2^-16: units = 1.5 -> RNE 2 (even) -> 2^-14; toward zero -> 1 -> 2^-15
    assert fq([3 * 2.0**-16], f).tolist() == [2.0**-14]
    assert fq([3 * 2.0**-16], f.with_rounding("toward_zero")).tolist() == [2.0**-15]


def test_msfp8_in_range():
    # 6.0 -> E = 2; int(2) unit 2^(2-1) = 2; 6 = 3 units; 1.0 = 0.5 units -> RNE 0; 3.0 = 1.5 -> 2 -> 4
    assert fq([6.0, 1.0, 3.0, -2.0], "msfp8").tolist() == [6.0, 0.0, 4.0, -2.0]


# ----------------------------------------------------------------------------- ties
# msfp12 = int(3), unit_shift 2: with amax 1.875 -> E = 0, unit 0.25.
TIE_X = [1.0, 0.125, 0.375, 0.625, -0.375, 1.125, -0.125, 1.875]
# in units:  4,   0.5,   1.5,   2.5,   -1.5,   4.5,    -0.5,   7.5
TIE_EXPECTED = {
    # RNE:   4, 0, 2, 2, -2, 4, 0, 8->sat 7
    "nearest_even": ([4, 0, 2, 2, -2, 4, 0, 7], [1.0, 0.0, 0.5, 0.5, -0.5, 1.0, 0.0, 1.75]),
    # away:  4, 1, 2, 3, -2, 5, -1, 8->sat 7
    "nearest_away": ([4, 1, 2, 3, -2, 5, -1, 7], [1.0, 0.25, 0.5, 0.75, -0.5, 1.25, -0.25, 1.75]),
    # trunc: 4, 0, 1, 2, -1, 4, 0, 7
    "toward_zero": ([4, 0, 1, 2, -1, 4, 0, 7], [1.0, 0.0, 0.25, 0.5, -0.25, 1.0, 0.0, 1.75]),
}


@pytest.mark.parametrize("mode", sorted(TIE_EXPECTED))
def test_int_ties(mode):
    f = get_format("msfp12", rounding=mode)
    codes, exps = q(TIE_X, f)
    assert exps.tolist() == [0]
    assert codes.tolist() == TIE_EXPECTED[mode][0]
    out = fq(TIE_X, f)
    np.testing.assert_array_equal(out, values(*TIE_EXPECTED[mode][1]))


def test_int_ties_stochastic_pick_a_neighbour():
    f = get_format("msfp12", rounding="stochastic")
    lo = np.array(TIE_EXPECTED["toward_zero"][0])
    seen = set()
    for seed in range(64):
        codes, exps = q(TIE_X, f, seed=seed)
        assert exps.tolist() == [0]
        c = codes.astype(int)
        # each tie goes to one of its two neighbours (|lo| or |lo| + 1), sign kept
        assert np.all((np.abs(c) == np.abs(lo)) | (np.abs(c) == np.abs(lo) + 1))
        assert c[0] == 4  # exact values never move
        assert c[7] == 7  # 7.5 -> 7 or 8 -> sat 7
        seen.add(tuple(c))
    assert len(seen) > 1  # the seed matters


# mxfp4 (E2M1), amax 6 -> E = 2 - 2 = 0. Grid 0, .5, 1, 1.5, 2, 3, 4, 6 = codes 0..7, sign bit 8.
FP_TIE_X = [6.0, 2.5, 0.25, 0.75, 5.0, -2.5, 3.5, 1.25]
FP_TIE_EXPECTED = {
    # 2.5 tie 2|3 -> 2 (mantissa even); .25 tie 0|.5 -> 0; .75 tie .5|1 -> 1; 5 tie 4|6 -> 4;
    # 3.5 tie 3|4 -> 4; 1.25 tie 1|1.5 -> 1
    "nearest_even": ([6.0, 2.0, 0.0, 1.0, 4.0, -2.0, 4.0, 1.0], [0x7, 0x4, 0x0, 0x2, 0x6, 0xC, 0x6, 0x2]),
    "nearest_away": ([6.0, 3.0, 0.5, 1.0, 6.0, -3.0, 4.0, 1.5], [0x7, 0x5, 0x1, 0x2, 0x7, 0xD, 0x6, 0x3]),
    "toward_zero": ([6.0, 2.0, 0.0, 0.5, 4.0, -2.0, 3.0, 1.0], [0x7, 0x4, 0x0, 0x1, 0x6, 0xC, 0x5, 0x2]),
}


@pytest.mark.parametrize("mode", sorted(FP_TIE_EXPECTED))
def test_fp_ties(mode):
    f = get_format("mxfp4_e2m1", rounding=mode)
    codes, exps = q(FP_TIE_X, f)
    assert exps.tolist() == [0]
    assert codes.tolist() == FP_TIE_EXPECTED[mode][1]
    np.testing.assert_array_equal(fq(FP_TIE_X, f), values(*FP_TIE_EXPECTED[mode][0]))


# ----------------------------------------------------------------------------- MX element codes
def test_mxfp4_codes_decode_per_ocp():
    codes = np.arange(16, dtype=np.uint8)
    e2m1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    out = ref.dequantize_blocks(codes, np.array([0], np.int16), "mxfp4_e2m1")
    np.testing.assert_array_equal(out, values(*e2m1, *[-v for v in e2m1]))
    # scale X = 2^-3
    out = ref.dequantize_blocks(codes, np.array([-3], np.int16), "mxfp4_e2m1")
    np.testing.assert_array_equal(out, values(*e2m1, *[-v for v in e2m1]) / 8)
    # units of 0.5
    assert ref.codes_to_units(codes, "mxfp4_e2m1").tolist() == [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12]


def test_mxfp4_encode_grid():
    e2m1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    x = e2m1 + [-v for v in e2m1[1:]]  # amax 6 -> E = 0
    codes, exps = q(x, "mxfp4_e2m1")
    assert exps.tolist() == [0]
    assert codes.tolist() == list(range(8)) + list(range(9, 16))


@pytest.mark.parametrize(
    "fmt,code,value",
    [
        ("mxfp8_e4m3", 0x7E, 448.0),  # 0.1111.110 = 1.75 * 2^8
        ("mxfp8_e4m3", 0x08, 2.0**-6),  # min normal
        ("mxfp8_e4m3", 0x01, 2.0**-9),  # min subnormal
        ("mxfp8_e4m3", 0xB8, -1.0),  # 1.0111.000
        ("mxfp8_e5m2", 0x7B, 57344.0),  # 0.11110.11 = 1.75 * 2^15
        ("mxfp8_e5m2", 0x04, 2.0**-14),
        ("mxfp8_e5m2", 0x01, 2.0**-16),
        ("mxfp6_e3m2", 0x1F, 28.0),  # 0.111.11 = 1.75 * 2^4
        ("mxfp6_e3m2", 0x01, 2.0**-4),
        ("mxfp6_e2m3", 0x1F, 7.5),  # 0.11.111 = 1.875 * 2^2
        ("mxfp6_e2m3", 0x01, 2.0**-3),
        ("mxfp6_e2m3", 0x08, 1.0),
    ],
)
def test_mx_element_decode(fmt, code, value):
    out = ref.dequantize_blocks(np.array([code], np.uint8), np.array([0], np.int16), fmt)
    assert out.tolist() == [value]
    # a block holding just this value represents it exactly (its own E puts it in the top
    # binade or, for powers of two, on the grid)
    assert fq([value], fmt).tolist() == [value]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("scalar", [np.float32(1.0), np.array(1.0), 1.0])
def test_reference_rejects_0d_input(scalar):
    # FORMATS/reference docstring: "cannot quantize a 0-d array: there is no axis to block".
    # (np.ascontiguousarray turns a 0-d array into shape (1,), so the check must look at the
    # input's own ndim.)
    with pytest.raises(ValueError, match="0-d"):
        ref.quantize_blocks(scalar, "msfp16")
    with pytest.raises(ValueError, match="0-d"):
        ref.fake_quantize(scalar, "msfp16")


def test_reference_errors():
    with pytest.raises(ValueError):
        ref.quantize_blocks(np.ones(4), "fp16")
    with pytest.raises(TypeError):
        ref.quantize_blocks(np.ones(4, dtype=complex), "msfp16")
    with pytest.raises(ValueError):
        ref.matmul(np.ones((2, 16)), np.ones((16, 2)), "msfp16", "mxfp4_e2m1")  # block 16 vs 32


def test_ieee_fake_quantize():
    # fp16: 1 + 2^-11 is a tie between 1 and 1 + 2^-10 -> even (1.0); 1e5 overflows to inf
    out = fq([1 + 2.0**-11, 1 + 3 * 2.0**-11, 1e5], "fp16")
    assert out.tolist() == [1.0, 1 + 2 * 2.0**-10, np.inf]
    # bf16 keeps 8 significant bits: 1 + 2^-8 ties to 1.0, 1 + 3*2^-8 -> 1 + 2^-6
    out = fq([1 + 2.0**-8, 1 + 3 * 2.0**-8], "bf16")
    assert out.tolist() == [1.0, 1 + 2.0**-6]
    out = fq([np.nan], "bf16")
    assert np.isnan(out[0])


# ----------------------------------------------------------------------------- matmul datapath
def test_matmul_tiny_exact():
    # [[1,2],[3,4]] @ [[5,6],[7,8]]: every operand is exact in msfp16 -> exact integer results
    a = values(1, 2, 3, 4).reshape(2, 2)
    b = values(5, 6, 7, 8).reshape(2, 2)
    assert ref.matmul(a, b, "msfp16").tolist() == [[19.0, 22.0], [43.0, 50.0]]


def test_matmul_tiny_with_quantization():
    # a = [1.0, 0.3] -> units [64, 19], E=0; b = [1, 1] -> units [64, 64], E=0
    # S = 64*64 + 19*64 = 5312; t = 5312 * 2^(0 + 0 - 6 - 6) = 1.296875
    out = ref.matmul(values(1.0, 0.3).reshape(1, 2), values(1.0, 1.0).reshape(2, 1), "msfp16")
    assert out.tolist() == [[1.296875]]


def test_matmul_blocks_are_added_in_ascending_k_order():
    # msfp16, K = 48 = three blocks; one nonzero per block so t_0 = 2^24, t_1 = 1, t_2 = 1.
    a = np.zeros((1, 48), f32)
    a[0, [0, 16, 32]] = 1.0
    b = np.zeros((48, 1), f32)
    b[[0, 16, 32], 0] = [2.0**24, 1.0, 1.0]
    # ascending: fp32(2^24 + 1) = 2^24 (tie, even), fp32(2^24 + 1) = 2^24  -> 16777216
    # any other order (or exact fp64 dot): 1 + 1 = 2, 2 + 2^24 = 16777218
    assert float(np.dot(a.astype(np.float64), b.astype(np.float64))[0, 0]) == 16777218.0
    assert ref.matmul(a, b, "msfp16").tolist() == [[16777216.0]]
    # the small blocks first: 1 + 1 = 2, then 2 + 2^24 = 16777218 exactly
    b2 = np.zeros((48, 1), f32)
    b2[[0, 16, 32], 0] = [1.0, 1.0, 2.0**24]
    assert ref.matmul(a, b2, "msfp16").tolist() == [[16777218.0]]


def test_matmul_block_sum_is_exact_integer():
    # mxfp8_e4m3, one block: a = [1, 2^-17, 1], b = [1, 2^-17, -1]. amax 1 -> E = -8.
    # units (2^-9 each): 1.0 -> P = 256 -> 2^17 units; 2^-17 -> P = 2^-9 -> 1 unit.
    # S = 2^34 + 1 - 2^34 = 1 exactly -> t = 1 * 2^(-8 - 8 - 9 - 9) = 2^-34.
    # (fp32 left-to-right would give 1 + 2^-34 = 1, then 1 - 1 = 0.)
    a = values(1.0, 2.0**-17, 1.0).reshape(1, 3)
    b = values(1.0, 2.0**-17, -1.0).reshape(3, 1)
    assert ref.matmul(a, b, "mxfp8_e4m3").tolist() == [[2.0**-34]]


def test_matmul_nan_block_poisons_its_outputs():
    a = np.ones((2, 32), f32)
    a[1, 20] = np.nan  # row 1, block 1
    b = np.ones((32, 2), f32)
    out = ref.matmul(a, b, "msfp16")
    assert out[0].tolist() == [32.0, 32.0]
    assert np.isnan(out[1]).all()
    b[3, 0] = np.inf  # column 0, block 0
    out = ref.matmul(a, b, "msfp16")
    assert np.isnan(out[:, 0]).all()
    assert out[0, 1] == 32.0 and np.isnan(out[1, 1])


def test_matmul_k_zero_and_empty():
    assert ref.matmul(np.zeros((3, 0), f32), np.zeros((0, 2), f32), "msfp16").tolist() == [[0.0] * 2] * 3
    assert ref.matmul(np.zeros((0, 16), f32), np.zeros((16, 2), f32), "msfp16").shape == (0, 2)


def test_matmul_overflow_to_inf():
    # 2^100 * 2^100 = 2^200 overflows fp32 -> +inf (t_b is rounded to fp32 before the sum)
    a = values(2.0**100).reshape(1, 1)
    b = values(2.0**100, -(2.0**100)).reshape(1, 2)
    assert ref.matmul(a, b, "msfp16").tolist() == [[np.inf, -np.inf]]


def test_matmul_subnormal_products():
    # 2^-70 * 2^-70 = 2^-140: a float32 subnormal, exact; 2^-80 * 2^-80 = 2^-160 -> 0
    a = values(2.0**-70, 2.0**-80).reshape(2, 1)
    b = values(2.0**-70, 2.0**-80).reshape(1, 2)
    out = ref.matmul(a, b, "msfp16")
    assert out[0, 0] == 2.0**-140
    assert out[1, 1] == 0.0
    assert out[0, 1] == 0.0  # 2^-150 is half the smallest subnormal: ties to even 0
    # 3 * 2^-151: 1.5 * 2^-150 -> rounds to 2^-149
    a2 = values(3 * 2.0**-76).reshape(1, 1)
    b2 = values(2.0**-75).reshape(1, 1)
    assert ref.matmul(a2, b2, "msfp16").tolist() == [[2.0**-149]]


# ----------------------------------------------------------------------------- stochastic rounding
def test_stochastic_same_seed_same_result():
    x = np.random.default_rng(1).normal(size=(64, 80)).astype(f32)
    f = get_format("msfp12", rounding="stochastic")
    c1, e1 = q(x, f, seed=7)
    c2, e2 = q(x, f, seed=7)
    assert np.array_equal(c1, c2) and np.array_equal(e1, e2)


def test_stochastic_different_seed_different_result():
    x = np.random.default_rng(2).normal(size=(64, 80)).astype(f32)
    f = get_format("msfp12", rounding="stochastic")
    c1, e1 = q(x, f, seed=7)
    c2, e2 = q(x, f, seed=8)
    assert np.array_equal(e1, e2)  # exponents do not depend on rounding
    assert not np.array_equal(c1, c2)
    # and every stochastic code is the truncated code or one more in magnitude
    ct, _ = q(x, f.with_rounding("toward_zero"))
    d = np.abs(c1.astype(int)) - np.abs(ct.astype(int))
    assert set(np.unique(d)) <= {0, 1}


def test_stochastic_grid_values_are_exact():
    # multiples of the unit never move, whatever the seed
    f = get_format("msfp16", rounding="stochastic")
    x = np.arange(-64, 64, dtype=f32) / 64  # E = 0, unit 1/64
    for seed in (0, 1, 2**63 + 5):
        assert_bits_equal(fq(x, f, seed=seed), x)


def test_stochastic_rounding_is_unbiased():
    # 0.3 in msfp16: E = -2, 0.3 * 2^8 = 76.8000031 units -> 76 w.p. ~0.2, 77 w.p. ~0.8
    f = get_format("msfp16", rounding="stochastic")
    x = np.full(16 * 4096, 0.3, dtype=f32)
    codes, exps = q(x, f, seed=12345)
    assert set(np.unique(codes).tolist()) == {76, 77}
    p_up = float(np.mean(codes == 77))
    assert 0.75 < p_up < 0.85  # binomial std 0.0016 at n = 65536
    mean = float(np.mean(fq(x, f, seed=12345), dtype=np.float64))
    assert abs(mean - 0.3) < 1e-3  # nearest_even would give 77/256 = 0.30078 (bias 7.8e-4)
    # nearest_even and toward_zero are biased by comparison
    assert float(fq([0.3], "msfp16")[0]) == 77 / 256
    assert abs(mean - 0.3) < abs(77 / 256 - 0.3)


def test_stochastic_bits_are_counter_based():
    # the bits depend only on (seed, flat index): a sub-array at the same indices agrees
    idx = np.arange(10)
    assert np.array_equal(ref.stochastic_bits(3, idx)[5:], ref.stochastic_bits(3, idx[5:]))
    assert not np.array_equal(ref.stochastic_bits(3, idx), ref.stochastic_bits(4, idx))
    assert (ref.stochastic_bits(3, idx) < 2**32).all()


def test_matmul_block_sum_rounds_once_to_fp32_mixed_fp8():
    # docs/numerics.md#matrix-datapath: t_b = fp32(S_b), ONE round-to-nearest-even of the exact integer S_b.
    # fmt a = mxfp8_e5m2 (units 2^(E-16)), fmt b = mxfp8_e4m3 (units 2^(E-9)), one K block.
    # Both blocks get E = 0: a's amax 57344 = 1.75 * 2^15 (E = 15 - 15), b's amax 448 (E = 8 - 8).
    #   20 x  a = 57344 (7 * 2^29 units) * b = 448 (14 * 2^14 units) = 20 * 98 * 2^43
    #    2 x  a = 32768 (4 * 2^29 units) * b = 352 (11 * 2^14 units) =  2 * 44 * 2^43
    #    1 x  a = 0.125 (2^13 units)     * b = 256 (2^17 units)      =  2^30
    #    1 x  a = 2^-16 (1 unit)         * b = 2^-9 (1 unit)         =  1
    # S = (1960 + 88) * 2^43 + 2^30 + 1 = 2^54 + 2^30 + 1.
    # fp32 ulp at 2^54 is 2^31; the remainder 2^30 + 1 is above half an ulp -> fp32(S) = 2^54 + 2^31.
    # t = (2^54 + 2^31) * 2^(0 + 0 - 16 - 9) = 2^29 + 2^6 = 536870976.
    # (Rounding S to float64 first gives 2^54 + 2^30, a tie that then goes to even 2^54 -> 2^29:
    # a double rounding the contract forbids.)
    a = np.zeros((1, 32), f32)
    b = np.zeros((32, 1), f32)
    a[0, :20], b[:20, 0] = 57344.0, 448.0
    a[0, 20:22], b[20:22, 0] = 32768.0, 352.0
    a[0, 22], b[22, 0] = 0.125, 256.0
    a[0, 23], b[23, 0] = 2.0**-16, 2.0**-9
    ca, ea = q(a, "mxfp8_e5m2", axis=1)
    cb, eb = q(b, "mxfp8_e4m3", axis=0)
    assert ea.tolist() == [[0]] and eb.tolist() == [[0]]
    assert_bits_equal(ref.dequantize_blocks(ca, ea, "mxfp8_e5m2", axis=1), a)  # exact operands
    assert_bits_equal(ref.dequantize_blocks(cb, eb, "mxfp8_e4m3", axis=0), b)
    units_a = ref.codes_to_units(ca, "mxfp8_e5m2").astype(object)
    units_b = ref.codes_to_units(cb, "mxfp8_e4m3").astype(object)
    assert int((units_a @ units_b)[0, 0]) == 2**54 + 2**30 + 1
    out = ref.matmul(a, b, "mxfp8_e5m2", "mxfp8_e4m3")
    assert out.tolist() == [[536870976.0]]
