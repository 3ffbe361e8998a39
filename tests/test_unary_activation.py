"""A Relu or Clip op of its own (not fused into a conv's epilogue: its input is a graph input
or an Add) runs as a vector loop on the SIMD kernels: the same bits as the portable loop of
the scalar kernel -- NaNs (quiet and signalling, rounded to the vector precision like any
value), +-0, +-Inf, fp16 overflow, values at and between the bounds' roundings, Clip with
lo > hi (hi everywhere), lengths that are no multiple of 8, 1 and 2 threads."""

from __future__ import annotations

import numpy as np
import pytest

import bfpaccel
from conftest import onnx_graph_model

onnx = pytest.importorskip("onnx")
from onnx import helper  # noqa: E402

f32 = np.float32


def _model(act: str, lo: float, hi: float, shape):
    nodes = [helper.make_node("Add", ["x", "x2"], ["s"], name="add")]
    if act == "relu":
        nodes.append(helper.make_node("Relu", ["s"], ["y"], name="act"))
    else:
        nodes.append(helper.make_node("Clip", ["s", "lo", "hi"], ["y"], name="act"))
    inits = {"lo": np.array(lo, f32), "hi": np.array(hi, f32), "x2": np.zeros(shape, f32)}
    return onnx_graph_model(nodes, shape, ["y"], inits)


def _input(shape, rng) -> np.ndarray:
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-5, 5, shape))).astype(f32).ravel()
    specials = np.array([0x7FC00000, 0x7F800001, 0xFFC00123, 0x80000000, 0x00000000, 0x7F800000, 0xFF800000,
                         0x00000001], np.uint32).view(f32)
    x[:8] = specials
    x[8:16] = [7e4, -7e4, 65519.0, 0.70001, 0.7, -0.30001, 6.0, 5.99999]
    return x.reshape(shape)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 3, 7, 5), (2, 16, 40, 33)])  # 105 values; several chunks of 16384
@pytest.mark.parametrize("act,lo,hi", [("relu", 0, 0), ("clip", 0.0, 6.0), ("clip", -0.3, 0.7), ("clip", 1.0, 0.0)])
@pytest.mark.parametrize("vp", ["fp32", "fp16", "bf16"])
def test_activation_op_bits(kernel, restore_threads, vp, act, lo, hi, shape, threads):
    rng = np.random.default_rng(len(vp) * 7 + int(10 * lo) + shape[1])
    x = _input(shape, rng)
    plan = bfpaccel.compile(_model(act, lo, hi, shape), format="msfp16", vector_precision=vp)
    bfpaccel.set_num_threads(threads)
    got = bfpaccel.Session(plan, kernel=kernel).run(None, {"x": x})["y"]
    want = bfpaccel.Session(plan, kernel="scalar").run(None, {"x": x})["y"]
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # and the op's meaning, away from NaN payloads and rounding
    with np.errstate(invalid="ignore"):
        ref = np.maximum(x, 0) if act == "relu" else np.minimum(np.maximum(x, f32(lo)), f32(hi))
    if vp == "fp32":
        np.testing.assert_array_equal(np.isnan(got), np.isnan(x))
        ok = ~np.isnan(x)
        np.testing.assert_array_equal(got[ok], ref[ok])
