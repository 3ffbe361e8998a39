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
@pytest.mark.parametrize("K", [1, 2, 3, 4, 16, 40, 300, 520])  # 300, 520: 19 and 33 blocks (extras written 16 blocks at a time)
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


def _conv_input(N: int, C: int, H: int, W: int, rng: np.random.Generator) -> np.ndarray:
    """Pixels whose 16-channel blocks take every branch: NaN/Inf, all zero, subnormal, huge,
    units that saturate; the rest normal data over a wide range of magnitudes."""
    x = (rng.standard_normal((N, C, H, W)) * np.exp(rng.uniform(-6, 6, (N, C, H, W)))).astype(f32)
    x[0, :, 0, 0] = 0.0
    x[0, :min(C, 16), 1 % H, 2 % W] = 0.0
    x[0, 3, 2 % H, 1 % W] = np.nan
    x[-1, C - 1, H - 1, W - 1] = -np.inf
    x[-1, :, 1 % H, 1 % W] = (x[-1, :, 1 % H, 1 % W] * 1e-40).astype(f32)  # subnormal blocks
    x[0, :, H - 1, 0] = 127.9  # every unit saturates
    x[-1, :, 0, W - 1] = (x[-1, :, 0, W - 1] * 1e33).astype(f32)
    return x


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("C,H,W,groups,kh,pads", [
    (64, 7, 7, 1, 1, [0, 0, 0, 0]),
    (40, 14, 14, 1, 1, [0, 0, 0, 0]),
    (72, 14, 14, 1, 1, [0, 0, 0, 0]),
    (48, 5, 9, 2, 1, [0, 0, 0, 0]),
    (32, 7, 7, 1, 3, [1, 0, 1, 0]),
    (20, 3, 28, 1, 1, [0, 0, 0, 0]),
])
def test_conv_rows_runs_across_image_rows(kernel, threads, C, H, W, groups, kh, pads):
    """Convolutions without left/right padding quantize their input in runs of pixels that span
    image rows (short rows fill the quantizer's 16-row groups): the result equals
    reference.conv2d bit for bit, for every thread count, batch image and group."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(C * H + W)
    N, O = 2, 24
    w = (rng.standard_normal((O, C // groups, kh, 1)) * 0.3).astype(f32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=groups, pads=pads)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, C, H, W])],
                          [helper.make_empty_tensor_value_info("y")], [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    x = _conv_input(N, C, H, W, rng)
    plan = bfpaccel.compile(m, format="msfp16", vector_precision="fp32")
    got = bfpaccel.Session(plan, kernel=kernel, num_threads=threads).run(None, {"x": x})["y"]
    want = ref.conv2d(x, w, bfpaccel.get_format("msfp16"), padding=pads, groups=groups).astype(f32)
    assert_bits_equal(got, want, f"C={C} {H}x{W} groups={groups} kh={kh}")
