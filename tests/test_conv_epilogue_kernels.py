"""A conv's epilogue (bias, residual, activation, each rounded to the vector precision) on every
kernel, bit for bit: applied in the GEMM tile's registers by kernels that fuse it (full and
partial tiles, the residual in place), by a pass over the output by the others."""

from __future__ import annotations

import numpy as np
import pytest

import bfpaccel
from bfpaccel import reference
from conftest import VNNI_KERNELS

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

f32 = np.float32


def _round(v: np.ndarray, vp: str) -> np.ndarray:
    v = v.astype(f32)
    if vp == "fp16":
        with np.errstate(over="ignore"):
            return v.astype(np.float16).astype(f32)
    if vp == "bf16":
        u = v.view(np.uint32).astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(f32).copy()
        r[np.isnan(v)] = np.nan
        return r
    return v


def _act_node(act: str, src: str):
    """src -> y through act ('relu', 'clip' to [lo, hi], anything else: none)."""
    if act == "relu":
        return helper.make_node("Relu", [src], ["y"])
    if act == "clip":
        return helper.make_node("Clip", [src, "lo", "hi"], ["y"])
    return helper.make_node("Identity", [src], ["y"])


def _model(O: int, C: int, act: str, w: np.ndarray, b: np.ndarray):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["r_in"], ["r"]),  # an intermediate that dies at the Add
             helper.make_node("Add", ["c", "r"], ["s"]), _act_node(act, "s")]
    inits = {"w": w, "b": b, "lo": np.array(-0.5, f32), "hi": np.array(0.75, f32)}
    g = helper.make_graph(
        nodes, "epi",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 7, 9]),
         helper.make_tensor_value_info("r_in", TensorProto.FLOAT, [1, O, 7, 9])],
        [helper.make_empty_tensor_value_info("y")],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("O", [32, 20])  # full tiles; a partial last tile
@pytest.mark.parametrize("act", ["none", "relu", "clip"])
@pytest.mark.parametrize("vp", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("nonneg", [False, True])  # signed input; a ReLU's (the byte path)
def test_conv_epilogue_bits(kernel, vp, act, O, nonneg):
    rng = np.random.default_rng(O * 7 + len(act) + len(vp))
    C = 24
    w = (rng.standard_normal((O, C, 3, 3)) * 0.2).astype(f32)
    b = (rng.standard_normal(O) * 3).astype(f32)
    x = (rng.standard_normal((1, C, 7, 9)) * np.exp(rng.uniform(-6, 6, (1, C, 7, 9)))).astype(f32)
    if nonneg:
        x = np.abs(x)
    r_in = (rng.standard_normal((1, O, 7, 9)) * 4).astype(f32)
    r_in[0, 0, 0, :3] = [65519.0, 70000.0, 1e-30]  # fp16 rounding edges
    plan = bfpaccel.compile(_model(O, C, act, w, b), format="msfp16", vector_precision=vp)
    got = bfpaccel.Session(plan, kernel=kernel).run(None, {"x": x, "r_in": r_in})["y"]
    acc = reference.conv2d(x, w, bfpaccel.get_format("msfp16"), padding=1)
    r = _round(np.maximum(r_in, 0), vp)  # the Relu is a vector op of its own
    s = _round(_round(acc + b.reshape(1, -1, 1, 1), vp) + r, vp)
    if act == "relu":
        s = _round(np.maximum(s, 0), vp)
    elif act == "clip":
        s = _round(np.clip(s, -0.5, 0.75), vp)
    np.testing.assert_array_equal(got.view(np.uint32), s.view(np.uint32))


@pytest.mark.parametrize("kname", VNNI_KERNELS)
@pytest.mark.parametrize("O", [32, 20])
@pytest.mark.parametrize("act", ["relu", "clip"])
def test_conv_epilogue_tile_heights(kname, tile_scaling, act, O):
    """The epilogue in the AVX-512 tiles of both heights (6 rows with fma scaling, 5 with the add
    pipes; 63 output pixels: full and partial row tiles), the signed and the byte path."""
    for nonneg in (False, True):
        test_conv_epilogue_bits(kname, "fp16", act, O, nonneg)


def _dw_model(C: int, H: int, W: int, act: str, lo: float, hi: float, w: np.ndarray, b: np.ndarray):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=C, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             _act_node(act, "c")]
    inits = {"w": w, "b": b, "lo": np.array(lo, f32), "hi": np.array(hi, f32)}
    g = helper.make_graph(nodes, "dwepi", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, W])],
                          [helper.make_empty_tensor_value_info("y")],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("W", [5, 11])  # rows shorter than a strip of 8 pixels; strips and a tail
@pytest.mark.parametrize("act,lo,hi", [("none", 0, 0), ("relu", 0, 0), ("clip", -0.5, 0.75), ("clip", 0.0, 6.0),
                                       ("clip", -0.3, 0.7),  # bounds the vector precision rounds
                                       ("clip", 0.5, -0.5)])  # lo > hi: hi everywhere
@pytest.mark.parametrize("vp", ["fp32", "fp16", "bf16"])
def test_depthwise_epilogue_bits(kernel, vp, act, lo, hi, W):
    """A depthwise conv's epilogue (bias, activation, each rounded to the vector precision) in
    the kernels' strips: bias + clip with lo <= hi as the clip of the rounded sum against the
    rounded bounds, the rest the general way -- bit for bit with NaN/Inf, fp16 overflow and
    values between the bounds' roundings."""
    rng = np.random.default_rng(W * 13 + len(act) + len(vp) + int(4 * lo))
    C, H = 40, 6
    w = (rng.standard_normal((C, 1, 3, 3)) * 0.5).astype(f32)
    b = (rng.standard_normal(C) * 2).astype(f32)
    b[:3] = [np.nan, 7e4, -np.inf]
    x = (rng.standard_normal((1, C, H, W)) * np.exp(rng.uniform(-4, 4, (1, C, H, W)))).astype(f32)
    x[0, 5, 2, :3] = [np.inf, np.nan, 6e4]
    b[8:14] = [0.74999, 0.7500001, -0.50001, 6.0001, 0.7001, -0.30001]  # sums near the bounds
    plan = bfpaccel.compile(_dw_model(C, H, W, act, lo, hi, w, b), format="msfp16", vector_precision=vp)
    got = bfpaccel.Session(plan, kernel=kernel).run(None, {"x": x})["y"]
    acc = reference.conv2d(x, w, bfpaccel.get_format("msfp16"), padding=1, groups=C)
    with np.errstate(invalid="ignore"):
        s = _round(acc.astype(f32) + b.reshape(1, -1, 1, 1), vp)
        if act == "relu":
            s = _round(np.where(np.isnan(s), s, np.maximum(s, 0)), vp)
        elif act == "clip":
            c = np.where(s < lo, f32(lo), s).astype(f32)  # ONNX: min(max(s, lo), hi)
            c = np.where(c > hi, f32(hi), c).astype(f32)
            s = np.where(np.isnan(s), s, _round(c, vp)).astype(f32)
    assert np.isnan(s).any() and np.isfinite(s).any()
    np.testing.assert_array_equal(got.view(np.uint32), s.view(np.uint32))
