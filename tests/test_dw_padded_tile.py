"""Depthwise convs whose quantized input tile carries the padding columns as zeros (the
AVX-512 kernel's strips then never test a column): every padding shape -- asymmetric, wider
than the kernel, a right padding the windows never reach, rows narrower than the kernel --
with strides, dilations, channel tails, NaN/Inf weights (a padded tap still adds 0 * w) and
NaN/Inf inputs, at 1 and 2 threads, bit for bit against reference.conv2d on every kernel."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import bfpaccel
from bfpaccel import reference

from conftest import assert_bits_equal

f32 = np.float32


def _dw_model(C, H, W, kh, kw, stride, dilation, pads, w, b):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=C, pads=list(pads), strides=list(stride),
                              dilations=list(dilation), kernel_shape=[kh, kw]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]
    inits = {"w": w, "b": b, "lo": f32(-4.0), "hi": f32(6.0)}
    g = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, W])],
                          [helper.make_empty_tensor_value_info("y")],
                          [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    return m


# (C, H, W, kh, kw, stride, dilation, pads (top, left, bottom, right))
_CASES = [
    (16, 9, 13, 3, 3, (1, 1), (1, 1), (1, 1, 1, 1)),
    (37, 11, 10, 5, 5, (1, 1), (1, 1), (2, 2, 2, 2)),      # channel tail, 5x5
    (32, 12, 15, 3, 3, (2, 2), (1, 1), (0, 0, 1, 1)),      # stride 2, padding on the right only
    (20, 10, 14, 5, 5, (2, 2), (1, 1), (1, 3, 2, 0)),      # asymmetric, left wider than right
    (16, 8, 9, 3, 3, (1, 1), (1, 1), (0, 4, 0, 4)),        # padding wider than the kernel
    (48, 7, 7, 7, 7, (1, 1), (1, 1), (3, 3, 3, 3)),        # 7x7 on 7x7 (every strip at both edges)
    (16, 9, 2, 3, 3, (1, 1), (1, 1), (1, 1, 1, 1)),        # rows narrower than the kernel
    (17, 6, 1, 1, 3, (1, 1), (1, 1), (0, 1, 0, 1)),        # one column
    (24, 13, 17, 3, 3, (1, 3), (1, 1), (1, 1, 1, 2)),      # stride 3 across, right padding unread
    (16, 12, 12, 3, 3, (1, 1), (2, 2), (2, 2, 2, 2)),      # dilation 2 (the generic strips)
    (16, 10, 11, 3, 2, (2, 1), (1, 3), (1, 2, 0, 3)),      # dilation across only, 3x2
    (33, 9, 30, 5, 5, (1, 1), (1, 1), (2, 2, 2, 2)),       # several 8-pixel strips and a tail
    # wide rows: several bands of output rows, each band's tile taking the rows it shares with
    # the previous band from that band's tile (the AVX2 kernel), or none (kh < sh)
    (64, 24, 200, 3, 3, (1, 1), (1, 1), (1, 1, 1, 1)),
    (40, 23, 150, 5, 5, (2, 2), (1, 1), (2, 2, 2, 2)),
    (16, 30, 130, 3, 3, (1, 1), (2, 2), (2, 2, 2, 2)),
    (16, 40, 300, 1, 3, (3, 1), (1, 1), (0, 1, 0, 1)),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("special", ["plain", "nonfinite"])
@pytest.mark.parametrize("case", _CASES, ids=lambda c: "C{}_{}x{}_k{}x{}_s{}{}_d{}{}_p{}{}{}{}".format(
    c[0], c[1], c[2], c[3], c[4], *c[5], *c[6], *c[7]))
def test_depthwise_padded_tile_bit_exact(kernel, restore_threads, threads, special, case):
    C, H, W, kh, kw, stride, dilation, pads = case
    bfpaccel.set_num_threads(threads)
    rng = np.random.default_rng(C * 131 + H * 7 + W)
    w = (rng.standard_normal((C, 1, kh, kw)) * 0.4).astype(f32)
    b = (rng.standard_normal(C) * 0.1).astype(f32)
    x = (rng.standard_normal((1, C, H, W)) * np.exp(rng.uniform(-6, 6, (1, C, H, W)))).astype(f32)
    if special == "nonfinite":
        # a NaN and an Inf weight at the corner taps (their padded taps make NaN), an Inf input
        # at a border column and a NaN input inside
        w[0, 0, 0, 0] = np.nan
        w[C - 1, 0, kh - 1, kw - 1] = np.inf
        x[0, 1 % C, H - 1, W - 1] = -np.inf
        x[0, 2 % C, H // 2, 0] = np.nan
    m = _dw_model(C, H, W, kh, kw, stride, dilation, pads, w, b)
    plan = bfpaccel.compile(m, format="msfp16", vector_precision="fp32")
    got = bfpaccel.Session(plan).run(None, {"x": x})["y"]
    acc = reference.conv2d(x, w, bfpaccel.get_format("msfp16"), stride=stride, padding=pads, dilation=dilation,
                           groups=C)
    want = np.clip((acc.astype(f32) + b.reshape(1, -1, 1, 1)).astype(f32), f32(-4.0), f32(6.0))
    if special == "nonfinite":
        assert np.isnan(want).any()  # the case does reach the poisoned taps
    assert_bits_equal(got, want, f"depthwise {case} ({special}, {threads} threads)")


# The strips of a tile the kernel quantizes fuse each product and its addition into one FMA
# where every product x * w is exact in fp32 (the same bits). Two taps whose second product
# is not exact -- it overflows, or it has a bit below 2^-149 -- make different bits when fused:
# the kernel must see that and keep the product rounded.
def _dw_1x2_model(C, W, w):
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], group=C, kernel_shape=[1, 2])], "dw",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 3, W])],
                          [helper.make_empty_tensor_value_info("y")], [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    return m


_EDGE_PRODUCTS = {
    # x0 * w0 = -1.5 * 2^126, x1 * w1 = 2^128: rounded, Inf; fused, 1.25 * 2^127
    "overflow": ((-1.5 * 2.0 ** 100, 2.0 ** 102), (2.0 ** 26, 2.0 ** 26)),
    # x0 * w0 = 2^-149, x1 * w1 = 1.5 * 2^-149: rounded (to even), 2^-148 + 2^-149; fused, 2^-148
    "underflow": ((2.0 ** -75, 1.5 * 2.0 ** -75), (2.0 ** -74, 2.0 ** -74)),
    # both products exact: the fused path, the same bits
    "exact": ((1.5 * 2.0 ** 10, -1.25 * 2.0 ** 3), (1.75 * 2.0 ** -3, 2.0 ** -5)),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("W", [2, 40])  # the edge pair alone, or at the end of a row of ordinary values
@pytest.mark.parametrize("edge", list(_EDGE_PRODUCTS))
def test_depthwise_fused_multiply_add_only_where_exact(kernel, restore_threads, threads, W, edge):
    bfpaccel.set_num_threads(threads)
    (x0, x1), (w0, w1) = _EDGE_PRODUCTS[edge]
    C = 16
    rng = np.random.default_rng(W)
    x = (rng.standard_normal((1, C, 3, W)) * 4).astype(f32)
    x[:, :, :, W - 2], x[:, :, :, W - 1] = f32(x0), f32(x1)
    w = np.empty((C, 1, 1, 2), f32)
    w[..., 0], w[..., 1] = f32(w0), f32(w1)
    plan = bfpaccel.compile(_dw_1x2_model(C, W, w), format="msfp16", vector_precision="fp32")
    got = bfpaccel.Session(plan).run(None, {"x": x})["y"]
    want = reference.conv2d(x, w, bfpaccel.get_format("msfp16"), groups=C).astype(f32)
    last = want[0, 0, 0, W - 2]
    assert last == {"overflow": np.inf, "underflow": f32(3 * 2.0 ** -149), "exact": f32(x0 * w0 + x1 * w1)}[edge]
    assert_bits_equal(got, want, f"depthwise 1x2 ({edge}, W={W}, {threads} threads)")
