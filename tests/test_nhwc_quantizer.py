"""The runtime's channels-last activation quantizer, bit for bit on every kernel.

A compiled graph keeps activations NHWC and quantizes each conv's input a run of pixels at a
time (the AVX2 kernel: 8 pixels per step, their block maxima and exponents in vectors, the
rare block on the per-block path). These cases aim at what such a step can get wrong: runs
that do not fill a group (1 to 17 pixels), partial channel blocks, every deterministic
rounding, ties, a block maximum whose units round past the format's largest (the clamp),
all-zero blocks, blocks whose units all round to zero, tiny and subnormal maxima, NaN/Inf.
"""

from __future__ import annotations

import numpy as np
import pytest

import bfpaccel
from bfpaccel import reference

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

f32 = np.float32
FORMATS = {
    "msfp16": bfpaccel.get_format("msfp16"),
    "msfp16-away": bfpaccel.get_format("msfp16", rounding="nearest_away"),
    "msfp16-zero": bfpaccel.get_format("msfp16", rounding="toward_zero"),
    "msfp12": bfpaccel.get_format("msfp12"),
}
DATA = ["random", "clamp", "ties", "zero_blocks", "tiny", "nan_inf"]


def _fp16(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return a.astype(np.float16).astype(f32)


def _input(data: str, fmt: bfpaccel.Format, N: int, H: int, W: int, C: int, seed: int) -> np.ndarray:
    """NHWC input; blocks are runs of fmt.block channels of one pixel."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, H, W, C)) * np.exp2(rng.integers(-8, 8, (N, H, W, 1)))).astype(f32)
    quantum = np.exp2(f32(-fmt.unit_shift))  # a unit of a block whose exponent is 0
    if data == "clamp":  # maxima in [2 - quantum/2, 2): their units round past max_units
        top = f32(2) - quantum * rng.uniform(0.0, 0.5, (N, H, W, 1)).astype(f32)
        x = x / np.max(np.abs(x), axis=-1, keepdims=True) * f32(1.5)
        x[..., ::7] = top * np.where(rng.random((N, H, W, 1)) < 0.5, f32(-1), f32(1))
    elif data == "ties":  # units with a fraction of exactly 1/2 (block maximum 1.x: exponent 0)
        units = rng.integers(-60, 60, x.shape).astype(f32) + f32(0.5)
        x = units * quantum / 2 ** (fmt.emax_elem)
        x[..., 0] = f32(1.25)
    elif data == "zero_blocks":
        x[:, ::2] = 0
        x[..., 1::3, :] = -0.0
    elif data == "tiny":  # maxima near and below 2^-126: exponents at the format's floor, subnormals
        x = x * f32(1e-36) * np.exp2(rng.integers(-12, 4, (N, H, W, 1))).astype(f32)
        x[0, 0, 0, : min(C, 5)] = f32(1e-40)
    elif data == "nan_inf":
        x[0, 0, W // 2, C // 2] = np.nan
        x[-1, -1, -1, -1] = -np.inf
    return x


def _check(x: np.ndarray, fmt: bfpaccel.Format, O: int, threads: int) -> None:
    """One 1x1 conv (+ bias, ReLU) reading the NHWC input, against the oracle."""
    C = x.shape[-1]
    rng = np.random.default_rng(C * 31 + O)
    w = (rng.standard_normal((O, C, 1, 1)) * 0.25).astype(f32)
    b = np.linspace(-0.5, 0.5, O).astype(f32)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["xt", "w", "b"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    g = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
                          [helper.make_empty_tensor_value_info("y")],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    got = bfpaccel.Session(bfpaccel.compile(m, format=fmt), num_threads=threads).run(None, {"x": x})["y"]
    want = reference.conv2d(x.transpose(0, 3, 1, 2), w, fmt).astype(f32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = _fp16(want + b.reshape(1, -1, 1, 1))
        v = _fp16(np.where(v > 0, v, np.where(np.isnan(v), v, 0)))
    same = (got.view(np.uint32) == v.view(np.uint32)) | (np.isnan(got) & np.isnan(v))
    assert int((~same).sum()) == 0, f"{int((~same).sum())} of {v.size} outputs differ"


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("W", [1, 7, 8, 9, 17])
def test_nhwc_quantizer_bit_exact(kernel, fmt, data, W):
    f = FORMATS[fmt]
    x = _input(data, f, 1, 2, W, 40, seed=W * 7 + DATA.index(data))  # 40 channels: a partial third block
    _check(x, f, 24, 1)


@pytest.mark.parametrize("C", [13, 16, 24, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_nhwc_quantizer_channel_counts(kernel, C, threads):
    f = FORMATS["msfp16"]
    for data in ("random", "clamp"):
        _check(_input(data, f, 2, 3, 11, C, seed=C + threads), f, 16, threads)
