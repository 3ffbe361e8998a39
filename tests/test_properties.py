"""Property-based tests (hypothesis): random shapes and float32 values, NaN/Inf/subnormals
included.  The C++ kernels must equal the reference, and quantization must keep the
invariants of docs/numerics.md#shared-exponent and #element-rounding-and-saturation."""

from __future__ import annotations

import contextlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import bfpaccel
from bfpaccel import reference as ref
from conftest import BLOCK_FORMATS, KERNELS, ROUNDING_MODES, assert_array_exact, assert_bits_equal

f32 = np.float32
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

any_float32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
# values with few significant bits in a narrow range: exact ties and shared blocks are common
# (a sampled_from strategy, so that hypothesis may fill large arrays quickly)
DYADIC = sorted({float(f32(m * 2.0**e)) for m in range(-48, 49) for e in range(-10, 5)})
dyadic_float32 = st.sampled_from(DYADIC)
elements = st.one_of(any_float32, dyadic_float32)
seeds = st.integers(0, 2**64 - 1)


@contextlib.contextmanager
def using_kernel(name: str):
    bfpaccel.set_kernel(name)
    try:
        yield
    finally:
        bfpaccel.set_kernel(None)


@st.composite
def float_arrays(draw, shape, elems=elements):
    """float32 arrays of three kinds: hypothesis' own (mostly one fill value with a few
    different elements), a palette of hypothesis values scattered at random, or normals at
    a random binary scale and spread (overflowing to Inf where the scale is huge), with a
    few hypothesis values dropped in."""
    kind = draw(st.sampled_from(["hypothesis", "palette", "normal"]))
    if kind == "hypothesis":
        return draw(arrays(f32, shape, elements=elems))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "palette":
        palette = np.array(draw(st.lists(elems, min_size=1, max_size=12)), dtype=f32)
        return palette[rng.integers(0, len(palette), size=shape)]
    scale = draw(st.integers(-150, 127))
    spread = draw(st.integers(0, 40))
    with np.errstate(over="ignore"):
        x = (rng.normal(size=shape) * np.exp2(scale + rng.integers(-spread, spread + 1, size=shape))).astype(f32)
    if x.size:
        for value in draw(st.lists(elems, max_size=3)):
            x.flat[draw(st.integers(0, x.size - 1))] = value
    return x


@st.composite
def tensor_and_axis(draw, elems=elements):
    # the blocked axis is long enough for several blocks of 128; the others stay short
    ndim = draw(st.integers(1, 3))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(0, 3)) for _ in range(ndim)]
    shape[axis] = draw(st.integers(0, 300))
    x = draw(float_arrays(tuple(shape), elems))
    return x, axis


def blocks_view(x: np.ndarray, axis: int, block: int) -> np.ndarray:
    """x with ``axis`` moved last, zero-padded to whole blocks: shape (..., n_blocks, block)."""
    y = np.moveaxis(x, axis, -1)
    K = y.shape[-1]
    nb = -(-K // block)
    pad = np.zeros(y.shape[:-1] + (nb * block,), dtype=y.dtype)
    pad[..., :K] = y
    return pad.reshape(y.shape[:-1] + (nb, block))


# ----------------------------------------------------------------------------- C++ == reference
@SETTINGS
@given(tensor_and_axis(), st.sampled_from(BLOCK_FORMATS), st.sampled_from(ROUNDING_MODES), seeds,
       st.sampled_from(KERNELS))
def test_quantize_equals_reference(xa, fmt, rounding, seed, kernel):
    x, axis = xa
    f = bfpaccel.get_format(fmt, rounding=rounding)
    codes, exps = ref.quantize_blocks(x, f, axis=axis, seed=seed)
    with using_kernel(kernel):
        t = bfpaccel.quantize(x, f, axis=axis, seed=seed)
        assert_array_exact(t.elements, codes, "codes")
        assert_array_exact(t.exponents, exps, "exponents")
        expected = ref.dequantize_blocks(codes, exps, f, axis=axis)
        assert_bits_equal(t.dequantize(), expected, "dequantize")
        assert_bits_equal(bfpaccel.fake_quantize(x, f, axis=axis, seed=seed), expected, "fake_quantize")


@st.composite
def matmul_operands(draw):
    M = draw(st.integers(0, 8))
    K = draw(st.integers(0, 140))
    N = draw(st.integers(0, 8))
    a = draw(float_arrays((M, K)))
    b = draw(float_arrays((K, N)))
    return a, b


# operand-b formats with the same block size as each operand-a format
SAME_BLOCK = {n: [m for m in BLOCK_FORMATS if bfpaccel.get_format(m).block == bfpaccel.get_format(n).block]
              for n in BLOCK_FORMATS}


@SETTINGS
@given(matmul_operands(), st.sampled_from(BLOCK_FORMATS), st.sampled_from(ROUNDING_MODES), seeds,
       st.sampled_from(KERNELS), st.data())
def test_matmul_equals_reference(ab, fmt, rounding, seed, kernel, data):
    a, b = ab
    fa = bfpaccel.get_format(fmt, rounding=rounding)
    fb = bfpaccel.get_format(data.draw(st.sampled_from(SAME_BLOCK[fmt])), rounding=rounding)
    expected = ref.matmul(a, b, fa, fb, seed=seed)
    with using_kernel(kernel):
        assert_bits_equal(bfpaccel.matmul(a, b, fa, fb, seed=seed), expected)


@st.composite
def conv_operands(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    cg = draw(st.integers(1, 20))
    og = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    H, W = draw(st.integers(kh, 7)), draw(st.integers(kw, 7))
    n = draw(st.integers(1, 2))
    x = draw(float_arrays((n, cg * groups, H, W)))
    w = draw(float_arrays((og * groups, cg, kh, kw)))
    stride = draw(st.integers(1, 2))
    padding = draw(st.tuples(*[st.integers(0, 2)] * 4))
    return x, w, groups, stride, padding


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_operands(), st.sampled_from(BLOCK_FORMATS), st.sampled_from(KERNELS))
def test_conv2d_equals_reference(xw, fmt, kernel):
    x, w, groups, stride, padding = xw
    expected = ref.conv2d(x, w, fmt, stride=stride, padding=padding, groups=groups)
    with using_kernel(kernel):
        out = bfpaccel.conv2d(x, w, fmt, stride=stride, padding=padding, groups=groups)
    assert_bits_equal(out, expected)


# ----------------------------------------------------------------------------- invariants
@SETTINGS
@given(tensor_and_axis(), st.sampled_from(BLOCK_FORMATS), st.sampled_from(ROUNDING_MODES), seeds)
def test_quantized_magnitude_is_bounded(xa, fmt, rounding, seed):
    # |q| never reaches the next power of two above the block's amax (no rounding into a new
    # binade), except that a clamped minimum exponent may round a tiny block up to one unit;
    # and never exceeds the format's largest value.
    x, axis = xa
    f = bfpaccel.get_format(fmt, rounding=rounding)
    q = bfpaccel.fake_quantize(x, f, axis=axis, seed=seed)
    xb = blocks_view(x, axis, f.block).astype(np.float64)
    qb = blocks_view(q, axis, f.block).astype(np.float64)
    finite = np.isfinite(xb).all(axis=-1)
    amax = np.abs(np.where(finite[..., None], xb, 0)).max(axis=-1, initial=0.0)
    _, e = np.frexp(amax)  # amax = m * 2^e, m in [0.5, 1): the next power of two is 2^e
    bound = np.maximum(np.ldexp(1.0, e), f.min_value)
    bound = np.where(amax > 0, bound, 0.0)
    qa = np.abs(np.where(finite[..., None], qb, 0))
    assert (qa <= bound[..., None]).all()
    assert (qa <= f.max_value).all()


@SETTINGS
@given(tensor_and_axis(), st.sampled_from(BLOCK_FORMATS), st.sampled_from(ROUNDING_MODES), seeds, seeds)
def test_fake_quantize_is_idempotent(xa, fmt, rounding, seed1, seed2):
    # grid values are fixed points of every rounding mode, and the shared exponent of a
    # quantized block is the exponent it was quantized with
    x, axis = xa
    f = bfpaccel.get_format(fmt, rounding=rounding)
    once = bfpaccel.fake_quantize(x, f, axis=axis, seed=seed1)
    twice = bfpaccel.fake_quantize(once, f, axis=axis, seed=seed2)
    assert_bits_equal(twice, once)
    t1 = bfpaccel.quantize(x, f, axis=axis, seed=seed1)
    t2 = bfpaccel.quantize(once, f, axis=axis, seed=seed2)
    assert_array_exact(t2.elements, t1.elements)
    # an all-zero (or rounded-to-zero) block takes exp_min, so compare exponents of nonzero blocks
    nonzero = (blocks_view(np.nan_to_num(once, nan=1.0), axis, f.block) != 0).any(axis=-1)
    e1 = np.moveaxis(t1.exponents, axis, -1)
    e2 = np.moveaxis(t2.exponents, axis, -1)
    assert_array_exact(e2[nonzero], e1[nonzero])


@SETTINGS
@given(tensor_and_axis(), st.sampled_from(BLOCK_FORMATS), st.sampled_from(ROUNDING_MODES), seeds)
def test_sign_preserved_and_nan_blocks(xa, fmt, rounding, seed):
    x, axis = xa
    f = bfpaccel.get_format(fmt, rounding=rounding)
    q = bfpaccel.fake_quantize(x, f, axis=axis, seed=seed)
    xb = blocks_view(x, axis, f.block)  # (..., nb, B), zero padded
    qb = blocks_view(q, axis, f.block)
    nb, B = xb.shape[-2:]
    real = np.broadcast_to((np.arange(nb * B) < x.shape[axis]).reshape(nb, B), xb.shape)  # not padding
    finite = np.broadcast_to(np.isfinite(xb).all(axis=-1)[..., None], xb.shape)
    # a block with any NaN/Inf reads as NaN everywhere; other blocks have no NaN at all
    assert np.isnan(qb[~finite & real]).all()
    assert not np.isnan(qb[finite]).any()
    xf, qf = xb[finite], qb[finite]
    assert (np.sign(qf) * np.sign(xf) >= 0).all()  # never flips the sign
    assert ((qf == 0) | (np.sign(qf) == np.sign(xf))).all()


@SETTINGS
@given(tensor_and_axis(finite_float32), st.sampled_from(BLOCK_FORMATS),
       st.sampled_from(["nearest_even", "nearest_away", "toward_zero"]))
def test_deterministic_rounding_is_monotone_within_a_block(xa, fmt, rounding):
    x, axis = xa
    f = bfpaccel.get_format(fmt, rounding=rounding)
    q = bfpaccel.fake_quantize(x, f, axis=axis)
    xb = blocks_view(x, axis, f.block).reshape(-1, f.block)
    qb = blocks_view(q, axis, f.block).reshape(-1, f.block)
    finite = np.isfinite(xb).all(axis=-1)  # (huge normals may have overflowed to Inf)
    xb, qb = xb[finite], qb[finite]
    order = np.argsort(xb, axis=-1, kind="stable")
    qs = np.take_along_axis(qb, order, axis=-1)
    assert (np.diff(qs, axis=-1) >= 0).all()


@SETTINGS
@given(matmul_operands(), st.sampled_from(BLOCK_FORMATS), st.sampled_from(ROUNDING_MODES), seeds)
def test_matmul_of_fake_quantized_operands_is_the_same(ab, fmt, rounding, seed):
    # quantized values re-quantize to themselves, so feeding fake-quantized operands changes nothing
    a, b = ab
    f = bfpaccel.get_format(fmt, rounding=rounding)
    out = bfpaccel.matmul(a, b, f, seed=seed)
    fa = bfpaccel.fake_quantize(a, f, axis=1, seed=seed)
    fb = bfpaccel.fake_quantize(b, f, axis=0, seed=seed)
    assert_bits_equal(bfpaccel.matmul(fa, fb, f, seed=seed + 1 if seed < 2**64 - 1 else 0), out)


@SETTINGS
@given(matmul_operands(), st.sampled_from(BLOCK_FORMATS), st.sampled_from(["nearest_even", "toward_zero"]))
def test_matmul_transpose_symmetry(ab, fmt, rounding):
    # (A B)^T = B^T A^T exactly: the same block products, summed in the same K order
    a, b = ab
    f = bfpaccel.get_format(fmt, rounding=rounding)
    assert_bits_equal(bfpaccel.matmul(b.T, a.T, f), bfpaccel.matmul(a, b, f).T)
