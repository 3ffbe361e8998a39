"""Depthwise convs whose output rows the SIMD kernels split into blocks of rows
(several blocks per image, a shorter last block, 1 and 2 threads): bit for bit against
reference.conv2d on every kernel, with the fused Clip epilogue."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import bfpaccel
from bfpaccel import reference


def _dw_model(C, H, W, k, stride, pad):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=C, pads=[pad] * 4, strides=[stride] * 2,
                              kernel_shape=[k, k]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]
    rng = np.random.default_rng(C * 7 + H + k)
    w = (rng.standard_normal((C, 1, k, k)) * 0.4).astype(np.float32)
    b = (rng.standard_normal(C) * 0.1).astype(np.float32)
    inits = {"w": w, "b": b, "lo": np.float32(0.0), "hi": np.float32(6.0)}
    g = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, W])],
                          [helper.make_empty_tensor_value_info("y")],
                          [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    return m, w, b


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("C,H,W,k,stride,pad", [
    (96, 40, 23, 3, 1, 1),   # 40 rows: blocks of 16, 16, 8
    (100, 37, 9, 5, 1, 2),   # 5x5, channel tail, 37 rows
    (64, 70, 17, 3, 2, 1),   # stride 2: 35 output rows
    (256, 20, 830, 3, 2, 1),  # wide rows: the avx2 kernel caps its tile at ~4 MiB (bands of 9 and 1 rows)
])
def test_depthwise_row_blocks_bit_exact(kernel, restore_threads, threads, C, H, W, k, stride, pad):
    bfpaccel.set_num_threads(threads)
    m, w, b = _dw_model(C, H, W, k, stride, pad)
    rng = np.random.default_rng(H * W)
    x = (rng.standard_normal((1, C, H, W)) * np.exp(rng.uniform(-8, 8, (1, C, H, W)))).astype(np.float32)
    plan = bfpaccel.compile(m, format="msfp16", vector_precision="fp32")
    got = bfpaccel.Session(plan).run(None, {"x": x})["y"]
    acc = reference.conv2d(x, w, bfpaccel.get_format("msfp16"), stride=stride, padding=pad, groups=C)
    want = np.clip((acc.astype(np.float32) + b.reshape(1, -1, 1, 1)).astype(np.float32), 0.0, 6.0)
    assert got.shape == want.shape
    assert (got.view(np.uint32) == want.view(np.uint32)).all(), int((got != want).sum())
