"""The kernels' row quantizer (activations quantized into a GEMM's rows operand, 16 rows at a
time) on rows that take every branch of its per-block extras, checked through the GEMM against
reference.matmul bit for bit: NaN/Inf rows, all-zero rows, rows whose units all round to 0,
rows whose units cancel (sum 0, not all zero), subnormal block scales, scalings past 2^127,
groups of fewer than 16 rows and blocks shorter than 16 channels."""

from __future__ import annotations

import numpy as np
import pytest

import bfpaccel
from bfpaccel import reference as ref
from conftest import ROUNDING_MODES, assert_bits_equal

f32 = np.float32
SEED = 99


def _rows(K: int, rng: np.random.Generator) -> np.ndarray:
    rows = []
    for kind in range(16):
        r = rng.normal(size=K).astype(f32)
        if kind == 1:
            r[:] = 0.0
        elif kind == 2:
            r[K // 2] = np.nan
        elif kind == 3:
            r[0] = -np.inf
        elif kind == 4:  # subnormal inputs: exponent clamped, subnormal block scale
            r = (r * 1e-40).astype(f32)
        elif kind == 5:  # below the smallest unit: every unit rounds to 0
            r = np.full(K, 1e-45, f32)
        elif kind == 6:  # units that cancel: sum 0, block not all zero
            r[:] = 0.0
            r[0], r[min(1, K - 1)] = 1.0, -1.0
        elif kind == 7:  # huge magnitudes
            r = (r * 1e37).astype(f32)
        elif kind == 8:  # tiny normal magnitudes (scalings past 2^127)
            r = (r * 1e-37).astype(f32)
        elif kind == 9:  # one non-zero element, the rest zero
            r[:] = 0.0
            r[K - 1] = -3.5
        elif kind == 10:  # all at the block maximum: units saturate
            r[:] = 127.9
        rows.append(r)
    return np.stack(rows)


@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize("K", [1, 2, 3, 4, 16, 40])
@pytest.mark.parametrize("M", [16, 21, 5])
def test_row_quantizer_edge_rows(kernel, M, K, rounding):
    rng = np.random.default_rng(M * 100 + K)
    a = np.concatenate([_rows(K, rng), _rows(K, rng)])[:M]
    a = a[rng.permutation(M)]
    b = rng.normal(size=(K, 7)).astype(f32)
    f = bfpaccel.get_format("msfp16", rounding=rounding)
    expected = ref.matmul(a, b, f, seed=SEED)
    assert_bits_equal(bfpaccel.matmul(a, b, f, seed=SEED), expected, f"M={M} K={K} {rounding}")


@pytest.mark.parametrize("fmt", ["msfp12", "mxint8"])
def test_row_quantizer_other_int_formats(kernel, fmt):
    rng = np.random.default_rng(5)
    a = np.concatenate([_rows(32, rng), _rows(32, rng)])
    b = rng.normal(size=(32, 9)).astype(f32)
    f = bfpaccel.get_format(fmt)
    assert_bits_equal(bfpaccel.matmul(a, b, f, seed=SEED), ref.matmul(a, b, f, seed=SEED), fmt)
