"""One-element quantization of a depthwise conv's input at the edges of its rules, on every
kernel and rounding mode: values that round up into the next binade (saturated back to
max_units * 2^(E - unit_shift)), exact ties and the neighbours of ties at every unit position,
-0.0, subnormals, exponents outside a 5-bit shared-exponent range, NaN/Inf and random bit
patterns. A 1x1 depthwise conv with weight 1 passes the quantized input through unchanged,
so it is compared bit for bit with reference.conv2d (and the element quantizer with
reference.fake_quantize)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import bfpaccel
from bfpaccel import reference

from conftest import assert_bits_equal

f32 = np.float32


def _edge_values(unit_shift: int) -> np.ndarray:
    """Values of every kind the one-element quantizer treats apart, for int(unit_shift + 1)."""
    top = (1 << (unit_shift + 1)) - 1  # max_units
    vals = []
    for k in (-130, -126, -20, -15, -14, -1, 0, 1, 15, 16, 20, 126, 127):
        scale = np.ldexp(1.0, k - unit_shift)  # one unit in the binade [2^k, 2^(k+1))
        for m in range(1 << unit_shift, top + 1):
            for frac in (0.0, 0.25, 0.5, 0.75):
                vals.append(np.float32((m + frac) * scale))
        for frac in (0.25, 0.5, 0.75, 0.9999):  # above the largest unit: rounds into 2^(k+1) or saturates
            vals.append(np.float32((top + frac) * scale))
    v = np.array([x for x in vals if np.isfinite(x)], dtype=f32)
    # the float neighbours of each value (one ulp off a tie) and both signs
    bits = v.view(np.uint32)
    v = np.concatenate([v, (bits + 1).view(f32), (bits - 1).view(f32)])
    v = np.concatenate([v, -v])
    specials = np.array([0.0, -0.0, 1e-42, -1e-42, 1.1754942e-38, 1.1754944e-38, -1.1754944e-38,
                         np.finfo(f32).max, -np.finfo(f32).max, np.inf, -np.inf, np.nan, -np.nan],
                        dtype=f32)
    rng = np.random.default_rng(unit_shift)
    random_bits = rng.integers(0, 1 << 32, 4096, dtype=np.uint64).astype(np.uint32).view(f32)
    return np.concatenate([v, specials, random_bits])


_FORMATS = ["msfp16", "msfp12", "mxint8", "msfp9", "msfp8",
            bfpaccel.Format(block=16, shared_exp_bits=8, element="int1")]


def _dw1x1(C: int, H: int, W: int):
    w = np.ones((C, 1, 1, 1), dtype=f32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], group=C, kernel_shape=[1, 1])], "dw",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, W])],
                          [helper.make_empty_tensor_value_info("y")], [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    return m, w


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # NaN payloads in the reference
@pytest.mark.parametrize("rounding", ["nearest_even", "nearest_away", "toward_zero"])
@pytest.mark.parametrize("fmt", _FORMATS, ids=lambda f: f if isinstance(f, str) else f.element)
def test_depthwise_input_quantization_edges(kernel, fmt, rounding):
    f = bfpaccel.get_format(fmt, rounding=rounding)
    v = _edge_values(f.unit_shift)
    C, W = 37, 16  # a channel tail (37 = 2 * 16 + 5) and whole vectors
    H = -(-v.size // (C * W))
    x = np.resize(v, (1, C, H, W))  # every value at least once, the rest cycles
    m, w = _dw1x1(C, H, W)
    got = bfpaccel.Session(bfpaccel.compile(m, format=f, vector_precision="fp32")).run(None, {"x": x})["y"]
    want = reference.conv2d(x, w, f, groups=C).astype(f32)
    assert_bits_equal(got, want, f"depthwise 1x1 ({f.element}, {rounding})")
    # the same values quantized alone, against the reference's one-element blocks
    f1 = bfpaccel.get_format(f, block=1)
    assert_bits_equal(bfpaccel.fake_quantize(v, f1), reference.fake_quantize(v, f1), "fake_quantize block=1")
