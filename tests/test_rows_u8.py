"""Convolutions whose input has no negative unit (a ReLU's output), bit for bit.

The AVX2 kernel takes such rows as unsigned bytes (vpmaddubsw, 4 units a step) instead of int16
units; every kernel must give the reference's bits on them, as on signed inputs: exponent ranges
that send tiles to the exact path, NaN/Inf blocks, all-zero blocks, one negative unit (the
signed path again), stochastic rounding, groups, padding, threads.
"""

from __future__ import annotations

import numpy as np
import pytest

import bfpaccel
from bfpaccel import reference as ref
from conftest import assert_bits_equal
from test_conv2d import CASES, case_data

f32 = np.float32
SEED = 4242
FORMATS = ["msfp16", "msfp12", "mxint8", "mxfp4_e2m1", "msfp8"]
DATA = ["relu", "abs", "dynamic_range", "nan_and_inf", "zero_blocks", "one_negative", "tiny_negatives"]


def _data(case: str, data: str):
    x0, w0, kwargs = case_data(case)  # test_conv2d's random case, made non-negative below
    x, w = x0.copy(), w0.copy()
    xs, ws = x.shape, w.shape
    rng = np.random.default_rng(7 * list(CASES).index(case) + DATA.index(data))
    if data == "relu":
        x = np.maximum(x, f32(0))
    elif data == "abs":
        x = np.abs(x)
    elif data == "dynamic_range":  # tiles past the fast path's range (the exact path)
        x = np.abs(x) * (10.0 ** rng.uniform(-30, 30, size=xs)).astype(f32)
        w *= (10.0 ** rng.uniform(-12, 12, size=ws)).astype(f32)
    elif data == "nan_and_inf":
        x = np.abs(x)
        x[0, 0, xs[2] // 2, xs[3] // 2] = np.nan
        x[-1, -1, -1, -1] = np.inf
    elif data == "zero_blocks":
        x = np.maximum(x, f32(0))
        x[:, :, ::2] = 0
    elif data == "one_negative":
        x = np.abs(x)
        x[0, xs[1] // 2, 0, xs[3] - 1] = -3.0
    elif data == "tiny_negatives":  # -0.0 and negatives far below their block's scale: units 0
        x = np.abs(x) + f32(1)
        x[..., ::3] = -0.0
        x[..., 1::4] = f32(-1e-9)
    return x.astype(f32), w, kwargs


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_nonnegative_rows(kernel, fmt, case, data):
    x, w, kwargs = _data(case, data)
    expected = ref.conv2d(x, w, fmt, seed=SEED, **kwargs)
    assert_bits_equal(bfpaccel.conv2d(x, w, fmt, seed=SEED, **kwargs), expected, f"{case} {fmt} {data}")
    cw = bfpaccel.quantize_conv_weight(w, fmt, kwargs.get("groups", 1), seed=SEED)
    assert_bits_equal(bfpaccel.conv2d(x, cw, fmt, seed=SEED, **kwargs), expected, f"{case} {fmt} {data} packed")


@pytest.mark.parametrize("rounding", ["nearest_away", "toward_zero", "stochastic"])
def test_nonnegative_rows_roundings(kernel, rounding):
    x, w, kwargs = _data("mixed_everything", "relu")
    f = bfpaccel.get_format("msfp16", rounding=rounding)
    assert_bits_equal(bfpaccel.conv2d(x, w, f, seed=SEED, **kwargs), ref.conv2d(x, w, f, seed=SEED, **kwargs))


def test_nonnegative_rows_threads(kernel, restore_threads):
    # large enough that the quantization and the GEMM split over threads
    rng = np.random.default_rng(5)
    x = np.maximum(rng.normal(size=(2, 64, 12, 12)), 0).astype(f32)
    w = rng.normal(size=(40, 64, 3, 3)).astype(f32)
    expected = ref.conv2d(x, w, "msfp16", padding=1)
    for n in (1, 2, 3):
        bfpaccel.set_num_threads(n)
        assert_bits_equal(bfpaccel.conv2d(x, w, "msfp16", padding=1), expected, f"{n} threads")
