"""A depthwise conv quantizes its input as one-element blocks. Where that input is made by a BFP
conv read by nothing else (an MBConv block's expansion, a stem), the lowering marks the
producer (``ConvParams.quantize_output_elements``, ``Lowering.elements_in_producers``); on
kernels whose depthwise loop takes a quantized input (``KernelDesc::dw_quantized_input``) the
producer's epilogue quantizes each output last and the depthwise conv copies it. The outputs
keep the bits of the depthwise conv quantizing its input itself -- on every kernel, for short
and long reductions (the producer's two epilogue forms), channel tails, strides, batches,
NaN/Inf inputs and biases, formats of int and fp elements, stochastic rounding and 1 or 2
threads."""

from __future__ import annotations

import numpy as np
import pytest

import bfpaccel
from bfpaccel import _core
from bfpaccel.runtime import lower as lower_mod
from conftest import assert_bits_equal, conv_test_input

onnx = pytest.importorskip("onnx")
from onnx import helper  # noqa: E402

from test_expand_dw_fusion import FORMATS, _mbconv, nan_bias_plan  # noqa: E402

RNG = np.random.default_rng(41)
SEED = 11

# (batch, input channels, expanded channels, H, W, depthwise kernel, stride, expansion activation, bias)
CASES = [
    (1, 16, 96, 12, 12, 3, 2, "clip", True),    # one input block: the short-reduction tiles
    (2, 24, 40, 13, 11, 3, 1, "relu", True),    # a channel tail, batch 2
    (1, 96, 64, 9, 9, 3, 1, "clip", True),      # six input blocks: the long-reduction tiles
    (1, 96, 288, 6, 6, 3, 1, "clip", True),     # ... with panels past 32 KiB: the AVX2 epilogue in
                                                # registers (fewer: over a row of raw tiles)
    (1, 160, 40, 7, 7, 3, 2, "clip", False),    # ten blocks, no bias (no fast quantization)
    (1, 3, 32, 14, 14, 3, 2, "clip", True),     # a stem (kernels with a stem path read NCHW)
]


def _run(plan, x: np.ndarray, in_producer: bool, threads: int) -> tuple:
    low = lower_mod.Lowering(plan, {"x": x.shape})
    low.fuse_expansion_convs = False  # the expansion stays an op of its own
    low.quantize_elements_in_producers = in_producer
    lw = low.run()
    with bfpaccel.Session(plan, num_threads=threads).options():
        y = lw.run({"x": x}, ["y"])["y"]
    return y, low


def _marked(low) -> list:
    return [op for op in low.ops if isinstance(op.params, _core.ConvParams) and op.params.quantize_output_elements]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt,rounding", FORMATS)
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("specials", [False, True])
def test_quantizing_in_the_producer_keeps_the_bits(kernel, case, fmt, rounding, threads, specials):
    n, cin, c, h, w, k, s, act, bias = case
    plan = bfpaccel.compile(_mbconv(*case), format=bfpaccel.get_format(fmt, rounding=rounding), seed=SEED)
    x = conv_test_input(RNG, n, cin, h, w, specials)
    want, low0 = _run(plan, x, False, threads)
    got, low1 = _run(plan, x, True, threads)
    assert not _marked(low0)
    marked = _marked(low1)
    assert len(marked) == 1 and marked[0].name.startswith("expand")
    assert_bits_equal(got, want)
    if specials:
        assert np.isnan(want).any()
    got2, _ = _run(plan, x * 0.5, True, threads)  # a second run with other numbers
    want2, _ = _run(plan, x * 0.5, False, threads)
    assert_bits_equal(got2, want2)


def test_a_producer_with_another_reader_is_not_marked():
    """The expansion's output is also a graph output: it must keep its own values."""
    m = _mbconv(*CASES[0])
    m.graph.output.append(helper.make_empty_tensor_value_info("ea"))
    plan = bfpaccel.compile(m, format="msfp16", seed=SEED)
    low = lower_mod.Lowering(plan, {"x": (1, 16, 12, 12)})
    low.fuse_expansion_convs = False
    low.run()
    assert not _marked(low)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cin,c", [(16, 48), (96, 288)], ids=["short-k", "long-k"])
def test_nan_bias_signs_match_the_scalar_kernel(kernel, cin, c, threads):
    """fp16 vector precision and a clip after the expansion's bias bound every output, so the
    AVX2 epilogue quantizes them without the per-lane range test (VecEpilogue.fq_fast) -- except
    a NaN, which must still take the scalar path (a NaN quantized there is the format's NaN,
    +NaN). A -NaN and a +NaN bias reach the depthwise output (the graph's output, no bias of
    its own): every kernel gives the scalar kernel's bits, its NaN signs included, with the
    expansion's reduction short with few channels (the epilogue over a row of raw tiles) or long
    with many (the epilogue in registers)."""
    n, h, w = 1, 7, 9
    plan = nan_bias_plan(cin, c, h, w, SEED, RNG)
    x = conv_test_input(RNG, n, cin, h, w, False)
    got, low = _run(plan, x, True, threads)
    assert len(_marked(low)) == 1
    bfpaccel.set_kernel("scalar")
    try:
        want, _ = _run(plan, x, False, threads)
    finally:
        bfpaccel.set_kernel(kernel)
    nan = np.isnan(want)
    assert nan[:, 3].all() and nan[:, 17].all() and nan.sum() == 2 * h * w
    assert_bits_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got[nan]), np.signbit(want[nan]))


def test_the_session_marks_mbconv_expansions_and_the_stem():
    """Compiled the usual way (Session), a MobileNet-like chain marks its unfused expansion and
    its stem, and gives the bits of the lowering without the step."""
    case = (1, 3, 16, 20, 20, 3, 1, "clip", True)
    plan = bfpaccel.compile(_mbconv(*case), format="msfp16", seed=SEED)
    x = conv_test_input(RNG, 1, 3, 20, 20, False)
    y = bfpaccel.Session(plan, num_threads=1).run(None, {"x": x})
    y = y["y"] if isinstance(y, dict) else y[0]
    want, _ = _run(plan, x, False, 1)
    low = lower_mod.Lowering(plan, {"x": x.shape})
    low.run()
    assert len(_marked(low)) == 1
    assert_bits_equal(y, want)
