"""bfpaccel.quantize / fake_quantize / BfpTensor (C++ kernels) against reference.quantize_blocks.

Codes and exponents must be *equal*, dequantized values *bit-equal*, for every block preset,
every rounding mode and every kernel this CPU can run.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Tuple

import numpy as np
import pytest

import bfpaccel
from bfpaccel import reference as ref
from conftest import BLOCK_FORMATS, ROUNDING_MODES, assert_array_exact, assert_bits_equal

f32 = np.float32
SEED = 987654321


# ----------------------------------------------------------------------------- test data
def _normal(scale: float, shape=(4, 300)) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: (rng.normal(size=shape) * scale).astype(f32)


def _subnormals(rng):
    x = (rng.normal(size=(3, 200)) * 1e-40).astype(f32)  # float32 subnormals
    x[0, :5] = np.array([1, 2, 3, 0x7FFFFF, 0x400000], np.uint32).view(f32)  # smallest .. largest
    x[1, 7] = -np.array([1], np.uint32).view(f32)[0]
    x[2, 0] = 1.2e-38  # a normal number among subnormals
    return x


def _below_powers_of_two(rng):
    ks = np.arange(-126, 128)
    below = np.nextafter(np.exp2(ks).astype(f32), f32(0))  # largest float32 below 2^k
    rows = []
    for mult in ([1, -0.5, 0.75, 0.3, 0.999], [-1, 0.25, 0.5, -0.875, 0.1]):
        rows.append((below[:, None] * np.array(mult, f32)).astype(f32))
    exact = (np.exp2(ks).astype(f32)[:, None] * np.array([1, 0.5, -0.75, 0.3, 0.999], f32)).astype(f32)
    x = np.concatenate(rows + [exact], axis=0)
    x[0, 0] = np.finfo(f32).max  # the largest float32 (just below 2^128)
    return x


def _dyadic_ties(rng):
    # values with few significant bits: many land exactly halfway between two codes
    mant = rng.integers(-64, 65, size=(8, 96))
    expo = rng.integers(-12, 5, size=(8, 96))
    x = (mant * np.exp2(expo)).astype(f32)
    # blocks whose amax is an exact power of two, filled with odd multiples of 2^-j
    for r, j in enumerate(range(2, 10)):
        x[r, 0] = 1.0
        x[r, 1:16] = (2 * rng.integers(0, 2**j, 15) + 1) * 2.0 ** (-j - 1)
    return x


def _nan_inf(rng):
    x = rng.normal(size=(5, 300)).astype(f32)
    x[0, 5] = np.nan
    x[1, 100] = np.inf
    x[2, 299] = -np.inf  # in the last, incomplete block
    x[3, 40], x[3, 41] = np.nan, np.inf
    x[4, 0] = -np.nan
    return x


def _dynamic_range(rng):
    x = (rng.normal(size=(4, 256)) * 10.0 ** rng.uniform(-38, 38, size=(4, 256))).astype(f32)
    x[0, :4] = [1e30, 1e-30, -1e30, -1e-30]
    x[1, :4] = [np.finfo(f32).max, -np.finfo(f32).max, 1e-45, np.finfo(f32).tiny]
    x[2, :3] = [3e38, 1.0, 1e-38]
    return x


def _noncontig_strided(rng):
    return rng.normal(size=(12, 160)).astype(f32)[:, ::2]


def _noncontig_transposed(rng):
    return rng.normal(size=(70, 6)).astype(f32).T


CASES: Dict[str, Tuple[Callable[[np.random.Generator], np.ndarray], int]] = {
    "normal_1e-30": (_normal(1e-30), -1),
    "normal_1e-6": (_normal(1e-6), -1),
    "normal_1": (_normal(1.0), -1),
    "normal_1e6": (_normal(1e6), -1),
    "normal_1e30": (_normal(1e30), -1),
    "zeros": (lambda rng: np.zeros((3, 40), f32), -1),
    "subnormals": (_subnormals, -1),
    "below_powers_of_two": (_below_powers_of_two, -1),
    "dyadic_ties": (_dyadic_ties, -1),
    "nan_inf": (_nan_inf, -1),
    "dynamic_range": (_dynamic_range, -1),
    "K37": (_normal(1.0, (3, 37)), -1),
    "K1": (_normal(1.0, (5, 1)), -1),
    "K129": (_normal(1.0, (2, 129)), -1),
    "1d": (_normal(3.0, (1000,)), 0),
    "axis0": (_normal(1.0, (50, 6)), 0),
    "axis1": (_normal(1.0, (6, 50)), 1),
    "axis_middle_3d": (_normal(1.0, (3, 37, 5)), 1),
    "axis_neg2_3d": (_normal(1.0, (4, 40, 3)), -2),
    "axis0_3d": (_normal(1.0, (37, 2, 3)), 0),
    "noncontig_strided": (_noncontig_strided, -1),
    "noncontig_transposed_axis0": (_noncontig_transposed, 0),
    "noncontig_transposed_axis1": (_noncontig_transposed, 1),
    "empty_rows": (lambda rng: np.zeros((0, 16), f32), -1),
    "empty_K": (lambda rng: np.zeros((3, 0), f32), -1),
    "empty_K_axis0": (lambda rng: np.zeros((3, 0), f32), 0),
}


@functools.lru_cache(maxsize=None)
def case_data(name: str) -> Tuple[np.ndarray, int]:
    builder, axis = CASES[name]
    x = builder(np.random.default_rng(list(CASES).index(name) + 1))
    x.setflags(write=False)
    return x, axis


@functools.lru_cache(maxsize=None)
def reference_result(fmt: str, rounding: str, name: str, seed: int = SEED):
    x, axis = case_data(name)
    f = bfpaccel.get_format(fmt, rounding=rounding)
    codes, exps = ref.quantize_blocks(x, f, axis=axis, seed=seed)
    fq = ref.fake_quantize(x, f, axis=axis, seed=seed)
    return codes, exps, fq


def check_against_reference(x, fmt, rounding, axis, seed, codes_ref, exps_ref, fq_ref):
    f = bfpaccel.get_format(fmt, rounding=rounding)
    t = bfpaccel.quantize(x, fmt, axis=axis, rounding=rounding, seed=seed)
    assert isinstance(t, bfpaccel.BfpTensor)
    assert t.format == f
    assert t.shape == x.shape
    assert t.axis == axis % x.ndim
    assert t.elements.dtype == (np.int8 if f.kind == "int" else np.uint8)
    assert t.exponents.dtype == np.int16
    assert_array_exact(t.exponents, exps_ref, "exponents")
    assert_array_exact(t.elements, codes_ref, "codes")
    assert t.nbytes == x.size + 2 * exps_ref.size
    assert_bits_equal(t.dequantize(), fq_ref, "BfpTensor.dequantize()")
    out = bfpaccel.fake_quantize(x, fmt, axis=axis, rounding=rounding, seed=seed)
    assert_bits_equal(out, fq_ref, "fake_quantize")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_quantize_matches_reference(kernel, fmt, rounding, case):
    x, axis = case_data(case)
    codes, exps, fq = reference_result(fmt, rounding, case)
    check_against_reference(x, fmt, rounding, axis, SEED, codes, exps, fq)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_quantize_larger_array(kernel, fmt):
    # big enough for SIMD main loops and for more than one thread's share of blocks
    big = np.random.default_rng(5).normal(size=(64, 1000)).astype(f32)
    big[3, 17] = np.nan
    for rounding in ("nearest_even", "stochastic"):
        f = bfpaccel.get_format(fmt, rounding=rounding)
        codes, exps = ref.quantize_blocks(big, f, axis=1, seed=SEED)
        fq = ref.dequantize_blocks(codes, exps, f, axis=1)
        check_against_reference(big, fmt, rounding, 1, SEED, codes, exps, fq)


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 7, 2**63, 2**64 - 1])
@pytest.mark.parametrize("fmt", ["msfp12", "msfp8", "mxint8", "mxfp4_e2m1", "mxfp8_e5m2"])
def test_stochastic_seeds(kernel, fmt, seed):
    x, axis = case_data("normal_1")
    f = bfpaccel.get_format(fmt, rounding="stochastic")
    codes, exps = ref.quantize_blocks(x, f, axis=axis, seed=seed)
    fq = ref.dequantize_blocks(codes, exps, f, axis=axis)
    check_against_reference(x, fmt, "stochastic", axis, seed, codes, exps, fq)
    # the same seed again gives the same codes; another seed other codes
    again = bfpaccel.quantize(x, fmt, axis=axis, rounding="stochastic", seed=seed)
    assert np.array_equal(again.elements, codes)
    other = bfpaccel.quantize(x, fmt, axis=axis, rounding="stochastic", seed=(seed + 1) % 2**64)
    assert not np.array_equal(other.elements, codes)


@pytest.mark.parametrize("fmt", ["msfp16", "mxfp6_e2m3"])
def test_threads_do_not_change_bits(kernel, fmt, restore_threads):
    x = np.random.default_rng(9).normal(size=(96, 515)).astype(f32)
    results = []
    for n in (1, 2, 3):
        bfpaccel.set_num_threads(n)
        t = bfpaccel.quantize(x, fmt, axis=1, rounding="stochastic", seed=3)
        results.append((t.elements, t.exponents, bfpaccel.fake_quantize(x, fmt, axis=0, seed=3)))
    f = bfpaccel.get_format(fmt, rounding="stochastic")
    codes_ref, exps_ref = ref.quantize_blocks(x, f, axis=1, seed=3)
    assert_array_exact(results[0][0], codes_ref)
    assert_array_exact(results[0][1], exps_ref)
    assert_bits_equal(results[0][2], ref.fake_quantize(x, fmt, axis=0, seed=3))
    for codes, exps, fq in results[1:]:
        assert_array_exact(codes, results[0][0])
        assert_array_exact(exps, results[0][1])
        assert_bits_equal(fq, results[0][2])


# ----------------------------------------------------------------------------- conversions
def test_int_and_float64_inputs_are_converted(kernel):
    rng = np.random.default_rng(11)
    xi = rng.integers(-1000, 1000, size=(4, 40))
    x64 = rng.normal(size=(4, 40)) * 1e3  # not exactly representable in float32
    xb = rng.integers(0, 2, size=(4, 40)).astype(bool)
    for x in (xi, xi.astype(np.int8), xi.astype(np.uint16), x64, xb, x64.tolist()):
        as32 = np.asarray(x).astype(f32)
        for fmt in ("msfp16", "mxfp4_e2m1"):
            codes, exps = ref.quantize_blocks(as32, fmt, axis=-1)
            t = bfpaccel.quantize(x, fmt)
            assert_array_exact(t.elements, codes)
            assert_array_exact(t.exponents, exps)
            assert_bits_equal(bfpaccel.fake_quantize(x, fmt), ref.fake_quantize(as32, fmt))


@pytest.mark.parametrize(
    "bad",
    [np.ones(4, dtype=np.complex64), np.array([1.0, None], dtype=object), np.array(["a", "b"])],
    ids=["complex", "object", "str"],
)
def test_non_real_inputs_raise_type_error(bad):
    with pytest.raises(TypeError):
        bfpaccel.quantize(bad, "msfp16")
    with pytest.raises(TypeError):
        bfpaccel.fake_quantize(bad, "msfp16")


@pytest.mark.parametrize("scalar", [np.float32(1.0), np.array(1.0), 2.5])
def test_0d_input_raises(scalar):
    with pytest.raises(ValueError, match="0-d"):
        bfpaccel.quantize(scalar, "msfp16")
    with pytest.raises(ValueError, match="0-d"):
        bfpaccel.fake_quantize(scalar, "msfp16")


@pytest.mark.parametrize("axis", [2, -3, 10])
def test_bad_axis_raises(axis):
    x = np.ones((2, 16), f32)
    with pytest.raises(ValueError, match=str(axis)):
        bfpaccel.quantize(x, "msfp16", axis=axis)
    with pytest.raises(ValueError, match=str(axis)):
        bfpaccel.fake_quantize(x, "msfp16", axis=axis)


def test_non_integer_axis_raises():
    with pytest.raises((TypeError, ValueError)):
        bfpaccel.quantize(np.ones((2, 16), f32), "msfp16", axis=1.0)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "1", None])
def test_bad_seed_raises(seed):
    x = np.ones((2, 16), f32)
    with pytest.raises(ValueError, match="seed"):
        bfpaccel.quantize(x, "msfp16", seed=seed)
    with pytest.raises(ValueError, match="seed"):
        bfpaccel.fake_quantize(x, "msfp16", seed=seed)


def test_bad_format_and_rounding_raise():
    x = np.ones((2, 16), f32)
    with pytest.raises(ValueError, match="msfp17"):
        bfpaccel.quantize(x, "msfp17")
    with pytest.raises(ValueError, match="upward"):
        bfpaccel.quantize(x, "msfp16", rounding="upward")
    with pytest.raises(ValueError, match="upward"):
        bfpaccel.fake_quantize(x, "msfp16", rounding="upward")
    with pytest.raises(ValueError):
        bfpaccel.quantize(x, "fp16")  # not a block format


def test_numpy_integer_seed_and_axis_accepted(kernel):
    x, _ = case_data("normal_1")
    t = bfpaccel.quantize(x, "msfp12", axis=np.int64(1), rounding="stochastic", seed=np.uint64(2**63 + 1))
    codes, exps = ref.quantize_blocks(x, bfpaccel.get_format("msfp12", rounding="stochastic"), axis=1, seed=2**63 + 1)
    assert_array_exact(t.elements, codes)
    assert_array_exact(t.exponents, exps)


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp32"])
def test_fake_quantize_ieee(fmt):
    x = _dynamic_range(np.random.default_rng(4))
    x[3, :3] = [np.nan, np.inf, -np.inf]
    assert_bits_equal(bfpaccel.fake_quantize(x, fmt), ref.fake_quantize(x, fmt))


# ----------------------------------------------------------------------------- BfpTensor
def test_bfp_tensor_attributes(kernel):
    x = np.random.default_rng(3).normal(size=(4, 37, 5)).astype(f32)
    x[1, 20, 2] = np.nan
    t = bfpaccel.quantize(x, "msfp16", axis=1)
    assert t.shape == (4, 37, 5) and t.ndim == 3 and t.axis == 1
    assert t.exponents.shape == (4, 3, 5)  # ceil(37 / 16) = 3 blocks
    assert t.elements.dtype == np.int8 and t.exponents.dtype == np.int16
    assert t.nbytes == 4 * 37 * 5 + 2 * (4 * 3 * 5)
    assert t.storage_bits == 4 * 37 * 5 * 8 + 4 * 3 * 5 * 8
    assert t.has_nan
    assert t.exponents[1, 1, 2] == bfpaccel.NAN_EXPONENT
    assert "msfp16" in repr(t)
    u = bfpaccel.quantize(x[:, :, :2], "mxfp4_e2m1", axis=-1)
    assert u.axis == 2 and u.elements.dtype == np.uint8 and u.exponents.shape == (4, 37, 1)
    assert u.storage_bits == 4 * 37 * 2 * 4 + 4 * 37 * 1 * 8
    assert not bfpaccel.quantize(np.ones((2, 16), f32), "msfp16").has_nan


def test_quantize_does_not_modify_input(kernel):
    x = np.random.default_rng(8).normal(size=(4, 48)).astype(f32)
    before = x.copy()
    bfpaccel.quantize(x, "msfp12", rounding="stochastic", seed=1)
    bfpaccel.fake_quantize(x, "mxfp4_e2m1")
    assert_bits_equal(x, before)
