"""Strided 1x1 convolutions without padding (a ResNet's downsampling shortcut and the conv1 beside
it) quantize only the pixels they read, as the input of a stride-1 conv of the output's size:
the same bits as the numpy oracle on every kernel, with the two convs still sharing one
quantized input, and a stride-1 conv of the same input keeping its own operand."""

from __future__ import annotations

import numpy as np
import pytest

import bfpaccel
from bfpaccel import reference

from conftest import assert_bits_equal

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402


def _fp16(a):
    with np.errstate(over="ignore", invalid="ignore"):
        return a.astype(np.float16).astype(np.float32)


def _run(x, ws, strides, fmt="msfp16", threads=1):
    """y_i = ReLU(conv_1x1(x, ws[i], stride strides[i]) + b_i) for every i, all reading x (NHWC in)."""
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2])]
    inits = {}
    for i, (w, s) in enumerate(zip(ws, strides)):
        nodes.append(helper.make_node("Conv", ["xt", f"w{i}", f"b{i}"], [f"c{i}"], strides=list(s), kernel_shape=[1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"y{i}"]))
        inits[f"w{i}"] = w
        inits[f"b{i}"] = np.linspace(-0.5, 0.5, w.shape[0]).astype(np.float32)
    g = helper.make_graph(nodes, "strided", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
                          [helper.make_empty_tensor_value_info(f"y{i}") for i in range(len(ws))],
                          [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    s = bfpaccel.Session(bfpaccel.compile(m, format=fmt), num_threads=threads)
    lw = s.program({"x": x.shape})
    out = s.run(None, {"x": x})
    f = bfpaccel.get_format(fmt)
    for i, (w, st) in enumerate(zip(ws, strides)):
        want = reference.conv2d(x.transpose(0, 3, 1, 2), w, f, stride=tuple(st)).astype(np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            v = _fp16(want + inits[f"b{i}"].reshape(1, -1, 1, 1))
            v = _fp16(np.where(v > 0, v, np.where(np.isnan(v), v, 0)))
        got = out[f"y{i}"]
        same = (got.view(np.uint32) == v.view(np.uint32)) | (np.isnan(got) & np.isnan(v))
        assert int((~same).sum()) == 0, f"conv {i} (stride {st}): {int((~same).sum())} outputs differ"
    return lw.program.last_reused


_CASES = [  # N, H, W, C, [(O, stride)...]
    (1, 13, 11, 40, [(24, (2, 2)), (48, (2, 2))]),  # odd sizes, a partial block, conv1 + shortcut alike
    (2, 8, 9, 64, [(32, (2, 3)), (32, (2, 3)), (16, (1, 1))]),  # batch 2, unequal strides, a stride-1 conv too
    (1, 7, 16, 128, [(80, (1, 2)), (40, (3, 1))]),  # stride in one direction only, different strides
]


@pytest.mark.parametrize("case", range(len(_CASES)))
def test_strided_pointwise_bit_exact(kernel, case):
    N, H, W, C, convs = _CASES[case]
    rng = np.random.default_rng(40 + case)
    x = (rng.standard_normal((N, H, W, C)) * np.exp(rng.uniform(-4, 4, (N, H, W, 1)))).astype(np.float32)
    x[0, 0, 0, :16] = 0.0  # an all-zero block on a sampled pixel
    x[0, 2, 2, 3] = 1e-40  # a subnormal
    x[-1, 1, 0, 1] = 3e38  # a huge block on a skipped or sampled pixel (exact fallback tiles)
    ws = [(rng.standard_normal((O, C, 1, 1)) * 0.2).astype(np.float32) for O, _ in convs]
    reused = _run(x, ws, [s for _, s in convs])
    strides = [s for _, s in convs]
    # convs of the same stride share one operand: all but the first of each stride reuse it (a
    # kernel that quantizes every pixel shares it across strides too)
    assert reused >= len(strides) - len(set(strides))


@pytest.mark.parametrize("fmt", ["msfp12", "mxint8", "msfp9"])
def test_strided_pointwise_formats_threads_and_specials(kernel, fmt):
    """Other block sizes (16, 32, 128), two threads, NaN and Inf on sampled and skipped pixels
    (a skipped pixel's NaN must not reach the output)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 15, 14, 96)).astype(np.float32)
    x[0, 2, 4, 5] = np.nan   # sampled by stride (2, 2)
    x[0, 3, 3, 7] = np.inf   # skipped
    x[0, 5, 6, 70] = -np.inf  # skipped
    ws = [(rng.standard_normal((O, 96, 1, 1)) * 0.2).astype(np.float32) for O in (64, 33)]
    _run(x, ws, [(2, 2), (2, 2)], fmt=fmt, threads=2)


# the other quantization paths: the per-block one (kernels without a row quantizer: avx2, scalar;
# formats it does not take: stochastic rounding, fp elements, wide units of e5m2), NHWC and NCHW
_GENERIC_FORMATS = [bfpaccel.get_format("msfp12", rounding="stochastic"), "mxfp8_e4m3",
                    "mxfp8_e5m2", "msfp16"]


def _strided_input(rng, N, C, H, W):
    x = (rng.standard_normal((N, C, H, W)) * np.exp(rng.uniform(-3, 3, (N, 1, H, W)))).astype(np.float32)
    x[0, :, 0, 0] = 0.0      # an all-zero block on a sampled pixel
    x[0, 3, 2, 2] = 1e-40    # a subnormal on a sampled pixel
    x[0, 5, 1, 1] = np.nan   # skipped by every stride below but 1 in that direction
    x[-1, 7, 4, 2] = -np.inf  # sampled by (2, 2) and (2, 1)
    return x


@pytest.mark.parametrize("fmt", _GENERIC_FORMATS, ids=str)
@pytest.mark.parametrize("stride", [(2, 2), (2, 3), (1, 2)])
def test_strided_pointwise_nchw_every_path(kernel, fmt, stride):
    """bfpaccel.conv2d on NCHW input (msfp16: the 8-pixel NCHW quantizer, which reads every pixel;
    the others: the per-block path, now on the sampled pixels only) against the oracle."""
    rng = np.random.default_rng(11)
    x = _strided_input(rng, 2, 40, 9, 11)
    w = (rng.standard_normal((24, 40, 1, 1)) * 0.3).astype(np.float32)
    got = bfpaccel.conv2d(x, w, fmt, stride=stride, seed=5)
    want = reference.conv2d(x, w, fmt, stride=stride, seed=5).astype(np.float32)
    assert_bits_equal(got, want, f"{fmt} stride {stride}")


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp8_e5m2"], ids=str)
def test_strided_pointwise_graph_wide_and_fp_elements(kernel, fmt):
    """The runtime's NHWC convs on formats outside the row quantizer: per-block quantization of
    the sampled pixels, two threads, two convs sharing the operand."""
    rng = np.random.default_rng(12)
    x = _strided_input(rng, 1, 48, 10, 13).transpose(0, 2, 3, 1).copy()
    ws = [(rng.standard_normal((O, 48, 1, 1)) * 0.2).astype(np.float32) for O in (32, 17)]
    _run(x, ws, [(2, 2), (2, 2)], fmt=fmt, threads=2)
