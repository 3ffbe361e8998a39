"""bfpaccel.matmul (C++ GEMM kernels) against reference.matmul, bit for bit (docs/numerics.md#matrix-datapath)."""

from __future__ import annotations

import functools
from typing import Callable, Dict, Tuple

import numpy as np
import pytest

import bfpaccel
from bfpaccel import reference as ref
from conftest import BLOCK_FORMATS, KERNELS, ROUNDING_MODES, VNNI_KERNELS, assert_array_exact, assert_bits_equal

f32 = np.float32
SEED = 424242

Builder = Callable[[np.random.Generator], Tuple[np.ndarray, np.ndarray]]


def _normal(M: int, K: int, N: int, scale_a: float = 1.0, scale_b: float = 1.0) -> Builder:
    def build(rng):
        a = (rng.normal(size=(M, K)) * scale_a).astype(f32)
        b = (rng.normal(size=(K, N)) * scale_b).astype(f32)
        return a, b

    return build


def _nan_inf(rng):
    a, b = _normal(9, 70, 11)(rng)
    a[2, 5] = np.nan
    a[4, 40] = np.inf
    a[6, 69] = -np.inf  # last, incomplete block for block 16/32
    b[10, 3] = -np.inf
    b[69, 7] = np.nan
    b[0, 9], b[1, 9] = np.inf, -np.inf
    return a, b


def _dynamic_range(rng):
    a = (rng.normal(size=(9, 70)) * 10.0 ** rng.uniform(-30, 30, size=(9, 70))).astype(f32)
    b = (rng.normal(size=(70, 11)) * 10.0 ** rng.uniform(-30, 30, size=(70, 11))).astype(f32)
    a[0, :2] = [1e30, 1e-30]
    return a, b


def _near_max(rng):
    # products around 1e38..1e40: some t_b and some sums overflow to +-inf (and inf - inf = NaN)
    a = (rng.normal(size=(9, 70)) * 10.0 ** rng.uniform(18, 20, size=(9, 1))).astype(f32)
    b = (rng.normal(size=(70, 11)) * 10.0 ** rng.uniform(18, 20, size=(1, 11))).astype(f32)
    a[0, :] = 1e38
    b[:, 0] = -1e38
    return a, b


def _tiny(rng):
    # products near and below 1e-38: subnormal t_b (exponent sums below -126) and underflow to 0
    a = (rng.normal(size=(9, 70)) * 10.0 ** rng.uniform(-25, -17, size=(9, 70))).astype(f32)
    b = (rng.normal(size=(70, 11)) * 10.0 ** rng.uniform(-25, -17, size=(70, 11))).astype(f32)
    a[0, :] = 1e-19
    b[:, 0] = 1e-19
    return a, b


def _subnormal_inputs(rng):
    a = (rng.normal(size=(9, 70)) * 1e-40).astype(f32)  # float32 subnormals
    b = (rng.normal(size=(70, 11)) * 1e30).astype(f32)
    return a, b


def _huge_everywhere(rng):
    # every row and every column has exponents near 2^62: every product is around 2^124..2^128
    a = (rng.uniform(1, 2, size=(8, 40)) * 2.0**62 * rng.choice([-1, 1], size=(8, 40))).astype(f32)
    b = (rng.uniform(1, 2, size=(40, 6)) * 2.0**62 * rng.choice([-1, 1], size=(40, 6))).astype(f32)
    return a, b


def _huge_exponent_sums(rng):
    # exponent sums above 127 in every block, but cancelling signs keep some sums finite
    a = (rng.normal(size=(8, 64)) * 2.0**70).astype(f32)
    b = (rng.normal(size=(64, 6)) * 2.0**-10).astype(f32)
    return a, b


def _subnormal_col_scales(rng):
    # column (weight) block scales down to 2^-149 (float32 subnormals) against rows near 2^100:
    # the products are normal, the column-scaled block sums subnormal on the way
    a = (rng.normal(size=(9, 70)) * 10.0 ** rng.uniform(28, 31, size=(9, 1))).astype(f32)
    b = (rng.normal(size=(70, 11)) * 10.0 ** rng.uniform(-44, -38, size=(1, 11))).astype(f32)
    return a, b


def _order_sensitive(rng):
    # K = 4 chunks of 128 columns, each (row, chunk) and (chunk, column) at its own scale in
    # 2^-30..2^30: block results of very different sizes, so the fp32 accumulator rounds at
    # many steps and any other block order gives other bits (for every block size <= 128)
    sa = np.repeat(np.exp2(rng.integers(-30, 31, size=(9, 4))), 128, axis=1)
    sb = np.repeat(np.exp2(rng.integers(-30, 31, size=(4, 11))), 128, axis=0)
    a = (rng.normal(size=(9, 512)) * sa).astype(f32)
    b = (rng.normal(size=(512, 11)) * sb).astype(f32)
    return a, b


def _zeros(rng):
    return np.zeros((5, 40), f32), np.zeros((40, 3), f32)


def _noncontig(rng):
    a = rng.normal(size=(9, 80)).astype(f32)[:, ::2]  # (9, 40), stride 2
    b = rng.normal(size=(7, 40)).astype(f32).T  # (40, 7), Fortran order
    return a, b


def _short_k(M: int, K: int, N: int, special: str = "") -> Builder:
    """K of one or two blocks with whole 32-column panels: the tiles that address their rows from
    one base (consecutive rows, one tap), with NaN / Inf, a wide dynamic range, or exponents that
    send some tiles to the exact fallback."""

    def build(rng):
        a, b = _normal(M, K, N)(rng)
        if special == "nan_inf":
            a[1, 3], a[M - 1, K - 1], b[K // 2, 20], b[0, N - 1] = np.nan, np.inf, -np.inf, np.nan
        elif special == "dynamic":
            a = (a * 10.0 ** rng.uniform(-30, 30, size=(M, K))).astype(f32)
            b = (b * 10.0 ** rng.uniform(-30, 30, size=(K, N))).astype(f32)
        elif special == "tiny_rows":  # rows 4-8 near 2^-140: their tiles leave the fast path's range
            a[4:9] *= f32(2.0**-140)
        return a, b

    return build


CASES: Dict[str, Builder] = {
    "N1": _normal(5, 70, 1),
    "odd_7x37x33": _normal(7, 37, 33),
    "K1": _normal(4, 1, 3),
    "K129": _normal(3, 129, 4),
    "K0": _normal(4, 0, 3),
    "M0": _normal(0, 16, 5),
    "N0": _normal(3, 16, 0),
    "square_16": _normal(16, 64, 16),
    "large_64x256x96": _normal(64, 256, 96),
    "order_sensitive": _order_sensitive,
    "zeros": _zeros,
    "nan_inf": _nan_inf,
    "dynamic_range": _dynamic_range,
    "near_max": _near_max,
    "tiny": _tiny,
    "subnormal_inputs": _subnormal_inputs,
    "subnormal_col_scales": _subnormal_col_scales,
    "huge_everywhere": _huge_everywhere,
    "huge_exponent_sums": _huge_exponent_sums,
    "noncontig": _noncontig,
    "shortK16_13x16x40": _short_k(13, 16, 40),
    "shortK24_11x24x70": _short_k(11, 24, 70),
    "shortK32_7x32x33": _short_k(7, 32, 33),
    "shortK24_nan_inf": _short_k(9, 24, 40, "nan_inf"),
    "shortK16_dynamic": _short_k(12, 16, 48, "dynamic"),
    "shortK32_tiny_rows": _short_k(14, 32, 64, "tiny_rows"),
}


@functools.lru_cache(maxsize=None)
def case_data(name: str) -> Tuple[np.ndarray, np.ndarray]:
    a, b = CASES[name](np.random.default_rng(list(CASES).index(name) + 100))
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


@functools.lru_cache(maxsize=None)
def reference_matmul(name: str, fmt: str, rounding: str, fmt_b: str = "", seed: int = SEED) -> np.ndarray:
    a, b = case_data(name)
    fa = bfpaccel.get_format(fmt, rounding=rounding)
    fb = bfpaccel.get_format(fmt_b, rounding=rounding) if fmt_b else None
    return ref.matmul(a, b, fa, fb, seed=seed)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_matmul_matches_reference(kernel, fmt, rounding, case):
    a, b = case_data(case)
    f = bfpaccel.get_format(fmt, rounding=rounding)
    out = bfpaccel.matmul(a, b, f, seed=SEED)
    expected = reference_matmul(case, fmt, rounding)
    assert_bits_equal(out, expected, f"matmul {case} {fmt} {rounding}")
    assert out.shape == (a.shape[0], b.shape[1])


@pytest.mark.parametrize("kname", VNNI_KERNELS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", ["msfp16", "msfp12", "mxint8", "mxfp8_e4m3", "mxfp4_e2m1"])
def test_tile_scaling_modes_match_reference(kname, case, fmt, tile_scaling, restore_threads):
    a, b = case_data(case)
    bfpaccel.set_kernel(kname)
    try:
        for nt in (1, 2):
            bfpaccel.set_num_threads(nt)
            out = bfpaccel.matmul(a, b, fmt, seed=SEED)
            assert_bits_equal(out, reference_matmul(case, fmt, "nearest_even"), f"{kname} {tile_scaling} {case} {fmt}")
    finally:
        bfpaccel.set_kernel(None)


def test_tile_scaling_rejects_unknown_mode():
    with pytest.raises(ValueError, match="tile scaling"):
        bfpaccel._core._tile_scaling("fast")


@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_matmul_every_M_from_1_to_16(kernel, fmt, rounding):
    # rows are independent, so the first M rows of the 16-row reference are the M-row answer
    rng = np.random.default_rng(77)
    a = rng.normal(size=(16, 40)).astype(f32)
    b = rng.normal(size=(40, 5)).astype(f32)
    f = bfpaccel.get_format(fmt, rounding=rounding)
    expected = ref.matmul(a, b, f, seed=SEED)
    for M in range(1, 17):
        # stochastic bits follow the flat index, and a[:M] keeps the flat indices of its rows
        assert_bits_equal(bfpaccel.matmul(a[:M], b, f, seed=SEED), expected[:M], f"M={M}")


def test_k_zero_gives_zeros(kernel):
    out = bfpaccel.matmul(np.zeros((4, 0), f32), np.zeros((0, 3), f32), "msfp16")
    assert_bits_equal(out, np.zeros((4, 3), f32))


def test_empty_m_or_n(kernel):
    assert bfpaccel.matmul(np.zeros((0, 16), f32), np.ones((16, 5), f32), "msfp16").shape == (0, 5)
    assert bfpaccel.matmul(np.ones((3, 16), f32), np.zeros((16, 0), f32), "msfp16").shape == (3, 0)


def test_hand_computed(kernel):
    # see test_reference.py: blocks are summed in ascending K order
    a = np.zeros((1, 48), f32)
    a[0, [0, 16, 32]] = 1.0
    b = np.zeros((48, 1), f32)
    b[[0, 16, 32], 0] = [2.0**24, 1.0, 1.0]
    assert bfpaccel.matmul(a, b, "msfp16").tolist() == [[16777216.0]]
    # [1.0, 0.3] . [1, 1] = (64 + 19) / 64
    assert bfpaccel.matmul([[1.0, 0.3]], [[1.0], [1.0]], "msfp16").tolist() == [[1.296875]]


# ----------------------------------------------------------------------------- pre-quantized
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("case", ["odd_7x37x33", "nan_inf", "tiny", "large_64x256x96"])
def test_prequantized_operands(kernel, case, fmt, rounding):
    a, b = case_data(case)
    f = bfpaccel.get_format(fmt, rounding=rounding)
    qa = bfpaccel.quantize(a, f, axis=1, seed=SEED)
    qb = bfpaccel.quantize(b, f, axis=0, seed=SEED)
    expected = ref.matmul_quantized(qa.elements, qa.exponents, f, qb.elements, qb.exponents, f)
    # the C++ codes are the reference codes, so this is also reference.matmul
    assert_bits_equal(expected, reference_matmul(case, fmt, rounding))
    assert_bits_equal(bfpaccel.matmul(qa, qb), expected, "both pre-quantized")
    assert_bits_equal(bfpaccel.matmul(qa, qb, f, f), expected, "with matching fmt")
    assert_bits_equal(bfpaccel.matmul(a, qb, f, seed=SEED), expected, "float a, quantized b")
    assert_bits_equal(bfpaccel.matmul(qa, b, seed=SEED), expected, "quantized a, float b")


def test_prequantized_b_is_reused(restore_threads):
    rng = np.random.default_rng(5)
    b = rng.normal(size=(100, 24)).astype(f32)
    qb = bfpaccel.quantize(b, "mxint8", axis=0)
    outs = []
    try:
        for k in KERNELS + KERNELS[::-1]:  # the packed form is cached per kernel
            bfpaccel.set_kernel(k)
            for n in (1, 2):
                bfpaccel.set_num_threads(n)
                a = rng.normal(size=(6, 100)).astype(f32)
                expected = ref.matmul_quantized(*ref.quantize_blocks(a, "mxint8", axis=1), "mxint8",
                                                qb.elements, qb.exponents, "mxint8")
                assert_bits_equal(bfpaccel.matmul(a, qb, "mxint8"), expected)
                outs.append(bfpaccel.matmul(np.ones((2, 100), f32), qb))
    finally:
        bfpaccel.set_kernel(None)
    for o in outs[1:]:
        assert_bits_equal(o, outs[0])
    # the operand itself is left untouched
    assert_array_exact(qb.elements, ref.quantize_blocks(b, "mxint8", axis=0)[0])


# ----------------------------------------------------------------------------- mixed formats
MIXED = [
    ("mxint8", "mxfp4_e2m1"),
    ("mxfp4_e2m1", "mxint8"),
    ("msfp16", "msfp12"),
    ("msfp12", "msfp16"),
    ("mxfp8_e4m3", "mxfp6_e2m3"),
    ("mxfp8_e5m2", "mxfp8_e4m3"),
    ("mxfp6_e3m2", "mxfp8_e5m2"),
]


@pytest.mark.parametrize("case", ["odd_7x37x33", "nan_inf", "dynamic_range", "tiny", "large_64x256x96"])
@pytest.mark.parametrize("fmt,fmt_b", MIXED)
def test_mixed_formats(kernel, fmt, fmt_b, case):
    a, b = case_data(case)
    expected = reference_matmul(case, fmt, "nearest_even", fmt_b)
    assert_bits_equal(bfpaccel.matmul(a, b, fmt, fmt_b, seed=SEED), expected)
    qb = bfpaccel.quantize(b, fmt_b, axis=0, seed=SEED)
    assert_bits_equal(bfpaccel.matmul(a, qb, fmt, seed=SEED), expected)
    assert_bits_equal(bfpaccel.matmul(a, qb, fmt, fmt_b, seed=SEED), expected)


def test_mixed_block_sizes_raise():
    a = np.ones((2, 32), f32)
    b = np.ones((32, 2), f32)
    with pytest.raises(ValueError, match="block"):
        bfpaccel.matmul(a, b, "msfp16", "mxfp4_e2m1")  # block 16 vs 32
    with pytest.raises(ValueError, match="block"):
        bfpaccel.matmul(a, bfpaccel.quantize(b, "mxfp4_e2m1", axis=0), "msfp16")
    with pytest.raises(ValueError, match="block"):
        bfpaccel.matmul(a, b, "msfp16", bfpaccel.get_format("msfp16", block=32))


# ----------------------------------------------------------------------------- threads
@pytest.mark.parametrize("fmt", ["msfp16", "msfp8", "mxfp4_e2m1", "mxfp8_e4m3", "mxfp8_e5m2"])
def test_threads_give_identical_bits(kernel, fmt, restore_threads):
    a, b = case_data("large_64x256x96")
    expected = reference_matmul("large_64x256x96", fmt, "nearest_even")
    for n in (1, 2, 3):
        bfpaccel.set_num_threads(n)
        assert bfpaccel.get_num_threads() == n
        assert_bits_equal(bfpaccel.matmul(a, b, fmt, seed=SEED), expected, f"{n} threads")


# ----------------------------------------------------------------------------- errors
def test_wrong_rank_raises():
    with pytest.raises(ValueError, match="2-D"):
        bfpaccel.matmul(np.ones(16, f32), np.ones((16, 2), f32), "msfp16")
    with pytest.raises(ValueError, match="2-D"):
        bfpaccel.matmul(np.ones((2, 16), f32), np.ones((2, 16, 2), f32), "msfp16")
    with pytest.raises(ValueError):
        bfpaccel.matmul(bfpaccel.quantize(np.ones((2, 2, 16), f32), "msfp16", axis=-1),
                        np.ones((16, 2), f32), "msfp16")


def test_k_mismatch_raises():
    with pytest.raises(ValueError, match="K"):
        bfpaccel.matmul(np.ones((2, 16), f32), np.ones((17, 2), f32), "msfp16")
    qb = bfpaccel.quantize(np.ones((32, 2), f32), "msfp16", axis=0)
    with pytest.raises(ValueError, match="K"):
        bfpaccel.matmul(np.ones((2, 16), f32), qb)


def test_unknown_or_ieee_format_raises():
    a, b = np.ones((2, 16), f32), np.ones((16, 2), f32)
    with pytest.raises(ValueError, match="msfp99"):
        bfpaccel.matmul(a, b, "msfp99")
    with pytest.raises(ValueError, match="msfp99"):
        bfpaccel.matmul(a, b, "msfp16", "msfp99")
    with pytest.raises(ValueError):
        bfpaccel.matmul(a, b, "fp16")
    with pytest.raises(ValueError):
        bfpaccel.matmul(a, b)  # float operands need a format


def test_bfp_tensor_with_wrong_axis_raises():
    a, b = np.ones((2, 16), f32), np.ones((16, 2), f32)
    with pytest.raises(ValueError, match="axis"):
        bfpaccel.matmul(a, bfpaccel.quantize(b, "msfp16", axis=1), "msfp16")
    with pytest.raises(ValueError, match="axis"):
        bfpaccel.matmul(bfpaccel.quantize(a, "msfp16", axis=0), b, "msfp16")


def test_format_conflicting_with_bfp_tensor_raises():
    a, b = np.ones((2, 32), f32), np.ones((32, 2), f32)
    qa = bfpaccel.quantize(a, "msfp16", axis=1)
    qb = bfpaccel.quantize(b, "msfp16", axis=0)
    with pytest.raises(ValueError):
        bfpaccel.matmul(qa, qb, "msfp12")  # same block, other element
    with pytest.raises(ValueError):
        bfpaccel.matmul(a, qb, "msfp16", "msfp12")
    with pytest.raises(ValueError):
        bfpaccel.matmul(a, qb, "msfp16", bfpaccel.get_format("msfp16", rounding="toward_zero"))


def test_non_numeric_dtype_raises_type_error():
    with pytest.raises(TypeError):
        bfpaccel.matmul(np.ones((2, 16), np.complex64), np.ones((16, 2), f32), "msfp16")
    with pytest.raises(TypeError):
        bfpaccel.matmul(np.ones((2, 16), f32), np.array([["x"] * 2] * 16), "msfp16")


def test_bad_seed_raises():
    with pytest.raises(ValueError, match="seed"):
        bfpaccel.matmul(np.ones((2, 16), f32), np.ones((16, 2), f32), "msfp16", seed=-1)


def test_int_and_float64_operands(kernel):
    rng = np.random.default_rng(3)
    a = rng.integers(-50, 50, size=(5, 33))
    b = rng.normal(size=(33, 4))  # float64
    expected = ref.matmul(a.astype(f32), b.astype(f32), "mxfp6_e3m2")
    assert_bits_equal(bfpaccel.matmul(a, b, "mxfp6_e3m2"), expected)
    assert_bits_equal(bfpaccel.matmul(a.tolist(), b.tolist(), "mxfp6_e3m2"), expected)


def test_block_sum_rounds_once_mixed_fp8(kernel):
    # hand-computed in test_reference.py: S = 2^54 + 2^30 + 1 -> fp32(S) * 2^-25 = 2^29 + 2^6
    a = np.zeros((1, 32), f32)
    b = np.zeros((32, 1), f32)
    a[0, :20], b[:20, 0] = 57344.0, 448.0
    a[0, 20:22], b[20:22, 0] = 32768.0, 352.0
    a[0, 22], b[22, 0] = 0.125, 256.0
    a[0, 23], b[23, 0] = 2.0**-16, 2.0**-9
    assert bfpaccel.matmul(a, b, "mxfp8_e5m2", "mxfp8_e4m3").tolist() == [[536870976.0]]
    # the same products with the operands' roles swapped
    assert bfpaccel.matmul(b.T, a.T, "mxfp8_e4m3", "mxfp8_e5m2").tolist() == [[536870976.0]]


@pytest.mark.parametrize("fmt", ["msfp16", "mxint8", "msfp12"])
@pytest.mark.parametrize("log2_w", [100, 112, 120, 122, 124])
def test_huge_weight_scales(kernel, fmt, log2_w):
    """Weights whose block scales sit at the top of fp32 (values up to 2^114, scales up to 2^108;
    activations near 1, so every output is finite): the AVX-512 tile reads its block sums as
    floats offset by 1.5 * 2^23 and times them by each column's scale, so columns past 2^103 must
    take the exact path -- the same bits as the oracle either way (a stray Inf or NaN shows here)."""
    rng = np.random.default_rng(log2_w)
    M, K, N = 13, 40, 70  # 3 blocks, 3 panels, a partial tile
    a = rng.standard_normal((M, K)).astype(f32)
    b = (rng.standard_normal((K, N)) * np.float32(2.0 ** (log2_w - 12))).astype(f32)
    b[:, :8] *= np.float32(2.0 ** -40)  # ordinary columns beside the huge ones
    want = ref.matmul(a, b, bfpaccel.get_format(fmt), bfpaccel.get_format(fmt))
    assert np.isfinite(want).all()
    assert_bits_equal(bfpaccel.matmul(a, b, fmt), want, f"{fmt} 2^{log2_w}")


@pytest.mark.parametrize("block", [256, 264, 512])
def test_blocks_whose_sums_pass_2_to_22(kernel, block):
    """Blocks long enough that an int8 block sum can reach 2^22 (> 260 elements of 127 x 127): the
    AVX-512 tile's float-read sums are exact only below 2^22, so such formats take the exact path
    (the sums here are near their maximum), bit for bit."""
    f = bfpaccel.get_format("msfp16", block=block)
    K = 2 * block
    top = f32(127 / 64)  # units of 127 (the block's largest value sets the exponent)
    a = np.full((5, K), top, f32)
    b = np.full((K, 40), top, f32)
    a[1] = -top
    a[2, ::2] = 0.5
    b[:, 3] = -top
    want = ref.matmul(a, b, f, f)
    assert_bits_equal(bfpaccel.matmul(a, b, f), want, f"block {block}")
