"""Convolutions of inputs with at most 4 channels (an image network's stem) on the kernels' stem
path (fake-quantized values in fp32, see StemArgs in csrc/bfp.h): the same bits as the numpy
oracle on every kernel, the epilogue fused, and the inputs the path cannot take exactly (NaN,
exponents out of its range, NaN weights) handed to the GEMM path, still bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import bfpaccel
from bfpaccel import reference

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402


def _fp16(a):
    with np.errstate(over="ignore"):
        return a.astype(np.float16).astype(np.float32)


def _stem_nodes(k, stride, pads, dil, act, nchw=False):
    """NHWC input transposed to the conv's NCHW (the seed's graphs), or nchw: the conv reads the
    network's NCHW input itself (ConvParams.input_nchw on kernels with a stem path)."""
    conv_in = "x" if nchw else "xt"
    nodes = [] if nchw else [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2])]
    nodes.append(helper.make_node("Conv", [conv_in, "w", "b"], ["c"], pads=list(pads), strides=[stride] * 2,
                                  dilations=[dil] * 2, kernel_shape=[k, k]))
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    elif act == "Clip":
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", ["c"], ["y"]))
    return nodes


def _run(x, w, b, fmt, stride, pads, dil, act, threads=1, vp="fp16", nchw=False):
    """x is NHWC; nchw feeds the model its NCHW transpose instead."""
    k = w.shape[2]
    nodes = _stem_nodes(k, stride, pads, dil, act, nchw)
    xin = np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if nchw else x
    inits = {"w": w, "b": b, "lo": np.float32(-1.0), "hi": np.float32(6.0)}
    g = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(xin.shape))],
                          [helper.make_empty_tensor_value_info("y")],
                          [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    s = bfpaccel.Session(bfpaccel.compile(m, format=fmt, vector_precision=vp), num_threads=threads)
    lw = s.program({"x": xin.shape})
    got = s.run(None, {"x": xin})["y"]
    want = reference.conv2d(x.transpose(0, 3, 1, 2), w, bfpaccel.get_format(fmt), stride=stride, padding=pads,
                            dilation=dil).astype(np.float32)
    R = _fp16 if vp == "fp16" else (lambda a: a.astype(np.float32))
    with np.errstate(invalid="ignore", over="ignore"):
        v = R(want + b.reshape(1, -1, 1, 1))
        if act == "Relu":
            v = R(np.where(v > 0, v, np.where(np.isnan(v), v, 0)))
        elif act == "Clip":
            v = np.where(np.isnan(v), v, R(np.clip(v, -1.0, 6.0)))
    if nchw and x.shape[-1] > 1:  # no channels-last copy of the input where the kernel has the stem path
        assert (lw.op_kinds[0] == "transpose") != bfpaccel._core.kernel_has_stem_path(), lw.op_kinds
    return got, v, lw.program.last_stems


def _same(got, want):
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    return int((~same).sum())


_GEOMS = [  # N, C, H, W, O, k, stride, pads (top, left, bottom, right), dilation
    (1, 3, 33, 35, 32, 3, 2, (1, 1, 1, 1), 1),    # EfficientNet / MobileNet stem shape, odd sizes
    (2, 3, 30, 29, 64, 7, 2, (3, 3, 3, 3), 1),    # ResNet stem shape (one group of 4 vectors), batch 2
    (1, 3, 12, 40, 80, 3, 1, (0, 2, 1, 0), 1),    # stride 1, asymmetric padding, 64 + 16 channels
    (1, 1, 11, 13, 24, 5, 3, (2, 2, 2, 2), 1),    # one channel, stride 3 (the generic stride), 16 + 8 channels
    (1, 2, 9, 10, 40, 3, 1, (2, 2, 2, 2), 2),     # two channels, dilation 2, 40 = 2 vectors + 8 lanes
    (1, 4, 6, 5, 48, 3, 2, (1, 1, 1, 1), 1),      # four channels; 3 output columns: pixels one at a time
    (1, 3, 8, 64, 16, 1, 1, (0, 0, 0, 0), 1),     # 1x1 kernel
    (2, 3, 64, 64, 8, 4, 4, (0, 0, 0, 0), 1),     # 8 outputs (< one vector), 4x4 stride 4, no padding:
                                                  # the last pixels end the input's buffer
]


@pytest.mark.parametrize("nchw", [False, True], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("vp", ["fp16", "fp32"])
@pytest.mark.parametrize("act", ["Relu", "Clip", None])
@pytest.mark.parametrize("geom", range(len(_GEOMS)))
def test_stem_conv_bit_exact(kernel, geom, act, vp, nchw):
    """Every geometry the kernel's loops distinguish; fp32 vector precision shows the
    accumulation's own bits."""
    N, C, H, W, O, k, stride, pads, dil = _GEOMS[geom]
    rng = np.random.default_rng(300 + geom)
    x = (rng.standard_normal((N, H, W, C)) * np.exp(rng.uniform(-3, 3, (N, H, W, C)))).astype(np.float32)
    x[0, 1, 2] = 0.0  # an all-zero block
    w = (rng.standard_normal((O, C, k, k)) * 0.2).astype(np.float32)
    w[1] = 0.0  # an output channel of zero weight blocks
    b = rng.standard_normal(O).astype(np.float32)
    got, want, stems = _run(x, w, b, "msfp16", stride, pads, dil, act, vp=vp, nchw=nchw)
    assert _same(got, want) == 0
    assert stems == (1 if bfpaccel._core.kernel_has_stem_path() else 0)


@pytest.mark.parametrize("nchw", [False, True], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("fmt", ["msfp12", "msfp16", "mxint8", "msfp9"])
def test_stem_conv_formats_and_threads(kernel, fmt, nchw):
    """Other int formats (block 16, 32, 128; 5-bit shared exponents) and two threads."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 40, 37, 3)).astype(np.float32)
    w = (rng.standard_normal((32, 3, 3, 3)) * 0.3).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    got, want, stems = _run(x, w, b, fmt, 2, (1, 1, 1, 1), 1, "Clip", threads=2, nchw=nchw)
    assert _same(got, want) == 0
    assert stems == (1 if bfpaccel._core.kernel_has_stem_path() else 0)


@pytest.mark.parametrize("nchw", [False, True], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("rounding", ["nearest_even", "nearest_away", "toward_zero"])
@pytest.mark.parametrize("data", ["ties", "clamp"])
def test_stem_conv_roundings_ties_and_the_clamp(kernel, rounding, data, nchw):
    """The stem input's quantizer (8 pixels a step on AVX2) in every deterministic rounding, on
    pixels whose units have a fraction of exactly 1/2 and pixels whose largest unit rounds past
    the format's largest (the clamp); 7 x 9 pixels: a partial group of 8 at the end."""
    f = bfpaccel.get_format("msfp16", rounding=rounding)
    rng = np.random.default_rng(21)
    q = np.float32(2.0 ** -f.unit_shift)  # a unit of a pixel whose exponent is 0 (max in [1, 2))
    if data == "ties":
        x = (rng.integers(-100, 100, (1, 7, 9, 3)).astype(np.float32) + np.float32(0.5)) * q
        x[..., 0] = np.where(rng.random((1, 7, 9)) < 0.5, np.float32(-1.5), np.float32(1.5))
    else:
        x = rng.uniform(-1.5, 1.5, (1, 7, 9, 3)).astype(np.float32)
        x[..., 1] = (np.float32(2) - q * rng.uniform(0.0, 0.5, (1, 7, 9)).astype(np.float32)) * np.where(
            rng.random((1, 7, 9)) < 0.5, np.float32(-1), np.float32(1))
    w = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    got, want, stems = _run(x, w, b, f, 1, (1, 1, 1, 1), 1, None, vp="fp32", nchw=nchw)
    assert _same(got, want) == 0
    assert stems == (1 if bfpaccel._core.kernel_has_stem_path() else 0)


@pytest.mark.parametrize("nchw", [False, True], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("case", ["nan", "inf", "tiny", "huge", "subnormal_product", "nan_weight"])
def test_stem_conv_outside_its_range_takes_the_gemm_path(kernel, case, nchw):
    """Inputs whose products or sums would not be exact in fp32 (or NaN/Inf blocks) go to the
    GEMM path: the same bits as the oracle either way, and the stem path is not used."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 20, 21, 3)).astype(np.float32)
    w = (rng.standard_normal((32, 3, 3, 3)) * 0.3).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    if case == "nan":
        x[0, 3, 4, 1] = np.nan
    elif case == "inf":
        x[0, 5, 5, 0] = -np.inf
    elif case == "tiny":  # an input block's value exponent below -149 + the weights'
        x[0, 7, 7] = [1e-38, -3e-39, 2e-38]
        w *= 1e-6
    elif case == "huge":  # a block sum past 2^127
        x[0, 2, 3] = [3e38, 1e38, -2e38]
        w[:, :, 1, 1] = 3e5
    elif case == "subnormal_product":
        x[0, 9, 9] = [1e-30, 2e-30, -1e-30]
        w *= 1e-12
    else:
        w[3, 1, 0, 2] = np.nan
    got, want, stems = _run(x, w, b, "msfp16", 1, (1, 1, 1, 1), 1, None, nchw=nchw)
    assert _same(got, want) == 0
    assert stems == 0


@pytest.mark.parametrize("nchw", [False, True], ids=["nhwc", "nchw"])
def test_stem_conv_in_range_extremes_stay_on_the_path(kernel, nchw):
    """Exponents near the edges of the range the path takes (subnormal-sized products that are
    still exact, sums near the top of fp32) run on it, bit for bit."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((1, 16, 17, 3)).astype(np.float32) * np.float32(2.0 ** -60)
    w = (rng.standard_normal((16, 3, 3, 3)) * 2.0 ** -70).astype(np.float32)
    b = np.zeros(16, np.float32)
    got, want, stems = _run(x, w, b, "msfp16", 1, (1, 1, 1, 1), 1, None, vp="fp32", nchw=nchw)
    assert _same(got, want) == 0
    assert stems == (1 if bfpaccel._core.kernel_has_stem_path() else 0)
    assert np.any((got != 0) & (np.abs(got) < 2.0 ** -126)), "expected subnormal block sums"


def test_two_stems_on_one_nchw_input(kernel):
    """Two convs reading the network's NCHW input alike: each on the stem path from the planes
    (no shared quantized operand between them, which is for channels-last inputs), each with the
    bits of that conv alone."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((1, 3, 19, 23)).astype(np.float32)
    ws = [(rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32) for _ in range(2)]
    nodes = [helper.make_node("Conv", ["x", f"w{i}"], [f"y{i}"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
             for i in range(2)]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
                          [helper.make_empty_tensor_value_info("y0"), helper.make_empty_tensor_value_info("y1")],
                          [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    s = bfpaccel.Session(bfpaccel.compile(m, format="msfp16"))
    got = s.run(None, {"x": x})
    for i, w in enumerate(ws):
        want = reference.conv2d(x, w, bfpaccel.get_format("msfp16"), stride=1, padding=(1, 1, 1, 1)).astype(np.float32)
        assert _same(got[f"y{i}"], want) == 0
    if bfpaccel._core.kernel_has_stem_path():
        assert s.program({"x": x.shape}).program.last_stems == 2


def test_one_channel_one_output_conv_on_an_nchw_input(kernel):
    """C = O = groups = 1 is a depthwise conv (one-element blocks), not a stem: it takes its input
    through the usual layout, with the oracle's bits."""
    rng = np.random.default_rng(22)
    x = rng.standard_normal((1, 1, 9, 8)).astype(np.float32)
    w = rng.standard_normal((1, 1, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])], "one",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
                          [helper.make_empty_tensor_value_info("y")], [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    got = bfpaccel.Session(bfpaccel.compile(m, format="msfp16")).run(None, {"x": x})["y"]
    want = reference.conv2d(x, w, bfpaccel.get_format("msfp16"), stride=1, padding=(1, 1, 1, 1), groups=1)
    assert _same(got, want.astype(np.float32)) == 0
