"""A 1x1 expansion conv whose only reader is a depthwise conv runs inside it
(``ConvParams.expand_channels``, ``Lowering.fuse_expansions``): the depthwise conv's work items
compute the expansion's output rows they need, epilogue and element quantization applied in
registers, and the expanded activation is never stored. The outputs keep the bits of the two
convs run one after the other -- on every kernel (those without the fused path run the
expansion whole), for channel tails, channel groups that split a kernel panel, strides,
padding, batches, NaN/Inf and out-of-range values, formats of int and fp elements, stochastic
rounding (no fused path) and 1 or 2 threads."""

from __future__ import annotations

import numpy as np
import pytest

import bfpaccel
from bfpaccel import _core
from bfpaccel.runtime import lower as lower_mod
from conftest import assert_bits_equal, conv_test_input, onnx_graph_model

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402,F401

N_ = helper.make_node
RNG = np.random.default_rng(31)
SEED = 7

# (batch, input channels, expanded channels, H, W, depthwise kernel, stride, expansion activation, bias)
CASES = [
    (1, 16, 96, 12, 12, 3, 2, "clip", True),    # an MBConv block 1 in miniature: six full blocks, stride 2
    (2, 24, 40, 13, 11, 3, 1, "relu", True),    # a channel tail (40 = 2 x 16 + 8), odd sizes, batch 2
    (1, 40, 144, 8, 8, 5, 1, "none", False),    # 9 channel blocks: with 2 threads groups of one block
    (1, 3, 20, 7, 9, 3, 2, "clip", True),       # a stem-sized expansion input (one block of 3; kernels
                                                # with a stem path run it there on the NCHW input)
    (1, 16, 96, 30, 100, 3, 1, "clip", True),   # wide rows: several bands of output rows (the rows two
    (1, 16, 40, 33, 140, 5, 2, "relu", True),   # bands share moved, not made again), stride 1 and 2
]
FORMATS = [("msfp16", "nearest_even"), ("msfp12", "nearest_away"), ("mxint8", "toward_zero"),
           ("mxfp8_e4m3", "nearest_even"), ("msfp16", "stochastic")]


def _mbconv(n: int, cin: int, c: int, h: int, w: int, k: int, s: int, act: str, bias: bool):
    """x -> 1x1 expansion (+ bias) (+ act) -> depthwise k x k, stride s, 'same' padding, + bias,
    Clip -> 1x1 projection: y."""
    we = (RNG.standard_normal((c, cin, 1, 1)) / np.sqrt(cin)).astype(np.float32)
    wd = RNG.standard_normal((c, 1, k, k)).astype(np.float32) * 0.3
    wp = (RNG.standard_normal((8, c, 1, 1)) / np.sqrt(c)).astype(np.float32)
    inits = {"we": we, "wd": wd, "bd": RNG.standard_normal(c).astype(np.float32), "wp": wp,
             "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    nodes = []
    if bias:
        inits["be"] = RNG.standard_normal(c).astype(np.float32)
    nodes.append(N_("Conv", ["x", "we"] + (["be"] if bias else []), ["e"], kernel_shape=[1, 1], name="expand"))
    e = "e"
    if act == "relu":
        nodes.append(N_("Relu", ["e"], ["ea"], name="expand_act"))
        e = "ea"
    elif act == "clip":
        nodes.append(N_("Clip", ["e", "lo", "hi"], ["ea"], name="expand_act"))
        e = "ea"
    p = k // 2
    nodes += [N_("Conv", [e, "wd", "bd"], ["d"], kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p], group=c,
                 name="dw"),
              N_("Clip", ["d", "lo", "hi"], ["da"], name="dw_act"),
              N_("Conv", ["da", "wp"], ["y"], kernel_shape=[1, 1], name="project")]
    return onnx_graph_model(nodes, (n, cin, h, w), ["y"], inits)


def _x(n: int, cin: int, h: int, w: int, specials: bool) -> np.ndarray:
    return conv_test_input(RNG, n, cin, h, w, specials)


def _run(plan, shape, x: np.ndarray, fuse: bool, threads: int) -> tuple:
    low = lower_mod.Lowering(plan, {"x": shape})
    low.fuse_expansion_convs = fuse
    lw = low.run()
    with bfpaccel.Session(plan, num_threads=threads).options():
        y = lw.run({"x": x}, ["y"])["y"]
    return y, low, lw


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt,rounding", FORMATS)
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("specials", [False, True])
def test_fused_expansion_keeps_the_bits(kernel, fuse_every_size, case, fmt, rounding, threads, specials):
    n, cin, c, h, w, k, s, act, bias = case
    plan = bfpaccel.compile(_mbconv(*case), format=bfpaccel.get_format(fmt, rounding=rounding), seed=SEED)
    x = _x(n, cin, h, w, specials)
    want, low0, lw0 = _run(plan, x.shape, x, False, threads)
    got, low1, lw1 = _run(plan, x.shape, x, True, threads)
    fused = [op for op in low1.ops if isinstance(op.params, _core.ConvParams) and op.params.expand_channels]
    if cin <= 4 and _core.kernel_has_stem_path():
        # the expansion reads the network's NCHW input on the stem path instead (input_nchw)
        assert not fused and any(getattr(op.params, "input_nchw", False) for op in low1.ops)
    else:
        assert len(fused) == 1 and fused[0].params.expand_channels == cin
        assert fused[0].name.startswith("expand") and "dw" in fused[0].name
        assert len(lw1.op_names) == len(lw0.op_names) - 1
    assert_bits_equal(got, want)
    if specials:
        assert np.isnan(want).any()
    got2, _, _ = _run(plan, x.shape, x * 0.5, True, threads)  # a second run with other numbers
    want2, _, _ = _run(plan, x.shape, x * 0.5, False, threads)
    assert_bits_equal(got2, want2)


def test_only_large_expansions_are_fused_by_default():
    """Below the size threshold (the expanded tensor stays in cache between the two ops) the
    convs stay separate; above it they are fused."""
    case = CASES[1]
    plan = bfpaccel.compile(_mbconv(*case), format="msfp16", seed=SEED)
    x = _x(case[0], case[1], case[3], case[4], False)
    _, low, _ = _run(plan, x.shape, x, True, 1)
    assert not any(isinstance(op.params, _core.ConvParams) and op.params.expand_channels for op in low.ops)
    big = (1, 16, 96, 112, 112, 3, 2, "clip", True)  # 4.8 MB expanded: EfficientNet-Lite0's block 1
    plan = bfpaccel.compile(_mbconv(*big), format="msfp16", seed=SEED)
    xb = _x(1, 16, 112, 112, False)
    got, low, _ = _run(plan, xb.shape, xb, True, 2)
    assert sum(1 for op in low.ops if isinstance(op.params, _core.ConvParams) and op.params.expand_channels) == 1
    want, _, _ = _run(plan, xb.shape, xb, False, 2)
    assert_bits_equal(got, want)


def test_an_expansion_with_another_reader_is_not_fused(fuse_every_size):
    """The expanded activation is also a graph output: it must be stored, so nothing is fused."""
    m = _mbconv(*CASES[0])
    m.graph.output.append(helper.make_empty_tensor_value_info("ea"))
    plan = bfpaccel.compile(m, format="msfp16", seed=SEED)
    low = lower_mod.Lowering(plan, {"x": (1, 16, 12, 12)})
    low.run()
    assert not any(isinstance(op.params, _core.ConvParams) and op.params.expand_channels for op in low.ops)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", ["msfp16", "mxint8"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=["c0", "c2"])
def test_fused_expansion_tiles_past_the_fast_range(kernel, fuse_every_size, case, fmt, threads):
    """Pixels near fp32's largest exponent put the expansion's tiles that hold them past the SIMD
    kernels' exact range: the exact path computes them, and its epilogue writes their columns
    into the depthwise tile's channel-block planes as the fast tiles' does (the GEMM writes the
    tile directly: VecEpilogue.cbs) -- the bits of the two convs run one after the other."""
    n, cin, c, h, w, k, s, act, bias = case
    plan = bfpaccel.compile(_mbconv(*case), format=fmt, seed=SEED)
    x = _x(n, cin, h, w, False)
    x[0, :, 2, 2] = np.float32(1.5e38) * np.sign(x[0, :, 2, 2])  # 2^126.8: sums past 2^127
    x[0, :, h - 1, 1] = np.float32(2.0 ** -120)                   # products below 2^-149
    want, _, _ = _run(plan, x.shape, x, False, threads)
    got, low, _ = _run(plan, x.shape, x, True, threads)
    assert any(isinstance(op.params, _core.ConvParams) and op.params.expand_channels for op in low.ops)
    assert_bits_equal(got, want)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=["c0", "c1"])
def test_fused_expansion_outputs_for_the_scalar_path(kernel, fuse_every_size, case, threads):
    """Expansion outputs that the element quantizers leave to the exact scalar path while every
    GEMM tile stays in the kernels' exact range: channels whose weights are zero and whose bias
    is subnormal (fp32 vector precision keeps it), +Inf, NaN or -Inf. The epilogues quantizing
    in registers take the scalar path for those lanes -- the bits of the two convs run one
    after the other."""
    n, cin, c, h, w, k, s, act, bias = case
    model = _mbconv(*case)
    inits = {t.name: t for t in model.graph.initializer}
    we, be = numpy_helper.to_array(inits["we"]).copy(), numpy_helper.to_array(inits["be"]).copy()
    chans = [0, 5, 6, 9, 17]
    we[chans] = 0.0
    be[chans] = [np.inf, np.float32(3e-39), np.float32(1.5e-41), np.nan, -np.inf]
    inits["we"].CopyFrom(numpy_helper.from_array(we, "we"))
    inits["be"].CopyFrom(numpy_helper.from_array(be, "be"))
    plan = bfpaccel.compile(model, format="msfp16", vector_precision="fp32", seed=SEED)
    x = _x(n, cin, h, w, False)
    want, _, _ = _run(plan, x.shape, x, False, threads)
    got, low, _ = _run(plan, x.shape, x, True, threads)
    assert any(isinstance(op.params, _core.ConvParams) and op.params.expand_channels for op in low.ops)
    assert np.isnan(want).any()
    assert_bits_equal(got, want)


# (vector precision, scale of the input, scale of the depthwise weights)
TINY = [("fp32", 2.0 ** -70, 2.0 ** -70),   # fp32 outputs: no bound is claimed for them
        ("fp16", 2.0 ** -21, 2.0 ** -123),  # fp16 outputs bounded by 2^-24: weights below ~2^-111 refused
        ("fp16", 1.0, 1.0)]                  # the common case: the fused strips run


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", ["msfp16", "mxint8"])
@pytest.mark.parametrize("vp,xs,ws", TINY, ids=["fp32-tiny", "fp16-tiny", "fp16-unit"])
def test_fused_expansion_products_past_fp32_keep_two_roundings(kernel, fuse_every_size, fmt, vp, xs, ws, threads):
    """The depthwise strips fuse each multiply and add into one FMA only where every product
    x * w is exact in fp32; for a fused expansion the range of x is the bound its epilogue
    gives (fp16 outputs: magnitudes from 2^-24 to 65504). Tiny expansion outputs times tiny
    weights make products whose low bits fall below 2^-149: those tiles must keep the
    product's own rounding (mul, then add), and the depthwise output -- the graph's output
    here, no bias: not rounded again -- shows any difference."""
    n, cin, c, h, w, k, s = 1, 16, 48, 9, 10, 3, 1
    we = (RNG.standard_normal((c, cin, 1, 1)) / np.sqrt(cin)).astype(np.float32)
    wd = RNG.standard_normal((c, 1, k, k))
    if ws < 1:  # magnitudes in [ws, 2 ws): every weight normal, each with low bits far below 2^-149 in a product
        wd = np.sign(wd) * (1.0 + RNG.random(wd.shape)) * ws
    wd = wd.astype(np.float32)
    nodes = [N_("Conv", ["x", "we"], ["e"], kernel_shape=[1, 1], name="expand"),
             N_("Relu", ["e"], ["ea"], name="expand_act"),
             N_("Conv", ["ea", "wd"], ["y"], kernel_shape=[k, k], strides=[s, s], pads=[1, 1, 1, 1], group=c,
                name="dw")]
    model = onnx_graph_model(nodes, (n, cin, h, w), ["y"], {"we": we, "wd": wd})
    plan = bfpaccel.compile(model, format=fmt, vector_precision=vp, seed=SEED)
    x = (_x(n, cin, h, w, False) * np.float32(xs)).astype(np.float32)
    want, _, _ = _run(plan, x.shape, x, False, threads)
    got, low, _ = _run(plan, x.shape, x, True, threads)
    assert any(isinstance(op.params, _core.ConvParams) and op.params.expand_channels for op in low.ops)
    if ws < 1:  # subnormal outputs: sums of products that lost bits
        nz = want[want != 0]
        assert nz.size and (np.abs(nz) < np.finfo(np.float32).tiny).mean() > 0.5
    assert_bits_equal(got, want)


def nan_bias_plan(cin: int, c: int, h: int, w: int, seed: int, rng: np.random.Generator = RNG):
    """x [1, cin, h, w] -> 1x1 expansion to c channels with a bias (-NaN at channel 3, +NaN at
    17, -0 at 30) -> Clip(0, 6) -> 3x3 depthwise conv, no bias: y. msfp16, fp16 vector precision:
    the plan."""
    we = (rng.standard_normal((c, cin, 1, 1)) / np.sqrt(cin)).astype(np.float32)
    be = rng.standard_normal(c).astype(np.float32)
    be[3] = -np.float32(np.nan)
    be[17] = np.float32(np.nan)
    be[30] = np.float32(-0.0)
    wd = (rng.standard_normal((c, 1, 3, 3)) * 0.3).astype(np.float32)
    nodes = [N_("Conv", ["x", "we", "be"], ["e"], kernel_shape=[1, 1], name="expand"),
             N_("Clip", ["e", "lo", "hi"], ["ea"], name="expand_act"),
             N_("Conv", ["ea", "wd"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=c, name="dw")]
    inits = {"we": we, "be": be, "wd": wd, "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    return bfpaccel.compile(onnx_graph_model(nodes, (1, cin, h, w), ["y"], inits), format="msfp16",
                            vector_precision="fp16", seed=seed)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fuse", [False, True], ids=["whole", "fused"])
def test_expansion_nan_bias_signs_match_the_scalar_kernel(kernel, fuse_every_size, fuse, threads):
    """fp16 vector precision and a clip after the expansion bound every output, so the SIMD
    epilogues quantize them without the per-lane range test -- except a NaN, which must still
    take the scalar path (a NaN quantized there is the format's NaN, +NaN; the fast arithmetic
    would keep a -NaN's sign). A -NaN and a +NaN bias reach the depthwise output (the graph's
    output here, its NaN sign kept by the products and the clip): every kernel, the expansion
    fused or run whole, gives the scalar kernel's bits, the signs of its NaNs included."""
    n, cin, c, h, w = 1, 16, 48, 7, 9
    plan = nan_bias_plan(cin, c, h, w, SEED)
    x = _x(n, cin, h, w, False)
    got, low, _ = _run(plan, x.shape, x, fuse, threads)
    bfpaccel.set_kernel("scalar")
    try:
        want, _, _ = _run(plan, x.shape, x, False, threads)
    finally:
        bfpaccel.set_kernel(kernel)
    if fuse:
        assert any(isinstance(op.params, _core.ConvParams) and op.params.expand_channels for op in low.ops)
    nan = np.isnan(want)
    assert nan[:, 3].all() and nan[:, 17].all() and nan.sum() == 2 * h * w
    assert_bits_equal(got, want)
    assert (np.isnan(got) == nan).all()
    np.testing.assert_array_equal(np.signbit(got[nan]), np.signbit(want[nan]))
