"""A depthwise conv whose only reader is a 1x1 BFP conv (an MBConv block's projection) writes
that conv's quantized input instead of its own output (``ConvParams.quantize_output``,
``Lowering.quantize_outputs``): its work items quantize their output rows with the row
quantizer while they are in cache, and the 1x1 conv reuses the operand from their shared slot.
The outputs keep the bits of the two convs run apart -- on every kernel (those without the path
write the output and the 1x1 conv quantizes it), for channel tails, nine channel blocks, blocks
of 32 (two of the depthwise conv's channel blocks), strides, kernels of 5, batches, a fused
expansion in front, a residual after, NaN/Inf and out-of-range values, formats the row
quantizer does not take (fp elements, stochastic rounding) and 1 or 2 threads."""

from __future__ import annotations

import numpy as np
import pytest

import bfpaccel
from bfpaccel import _core
from bfpaccel.runtime import lower as lower_mod
from conftest import assert_bits_equal, conv_test_input, onnx_graph_model

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

N_ = helper.make_node
RNG = np.random.default_rng(47)
SEED = 11
#: the kernels whose depthwise conv quantizes its output for the reader (the AVX-512 one, native
#: or emulated, which the AMX kernels share, and the AVX2 one)
PATH_KERNELS = {"avx2", "avx512", "avx512-emu", "amx", "amx-emu"}

# (batch, input channels, depthwise channels, H, W, kernel, stride, expansion in front, residual after)
CASES = [
    (1, 16, 32, 16, 16, 3, 1, False, True),    # block 0 in miniature: 2 channel blocks, a residual
    (2, 8, 40, 13, 11, 3, 1, False, False),    # a channel tail (40 = 2 x 16 + 8), odd sizes, batch 2
    (1, 24, 144, 9, 9, 5, 2, False, False),    # 9 channel blocks, kernel 5, stride 2
    (1, 16, 96, 12, 12, 3, 2, True, False),    # block 1: an expansion fused in front, stride 2
    (1, 8, 8, 7, 7, 3, 1, False, True),        # one partial block
    (1, 16, 96, 24, 100, 3, 1, False, False),  # wide rows: several bands of output rows
    (1, 8, 48, 26, 120, 5, 2, True, False),    # the same with an expansion in front, kernel 5, stride 2
]
FORMATS = [("msfp16", "nearest_even"), ("msfp12", "nearest_away"), ("mxint8", "toward_zero"),
           ("mxfp8_e4m3", "nearest_even"), ("msfp16", "stochastic")]


def _model(n: int, cin: int, c: int, h: int, w: int, k: int, s: int, expand: bool, residual: bool,
           dw_act: bool = True):
    """x -> 1x1 expansion [+ Clip] -> depthwise k x k (stride s, 'same', bias[, Clip]) -> 1x1
    projection to cin channels (bias) [+ x] -> y (the tests fuse the expansion into the
    depthwise conv only where `expand` says so)."""
    inits = {"wd": RNG.standard_normal((c, 1, k, k)).astype(np.float32) * 0.3,
             "bd": RNG.standard_normal(c).astype(np.float32),
             "wp": (RNG.standard_normal((cin, c, 1, 1)) / np.sqrt(c)).astype(np.float32),
             "bp": RNG.standard_normal(cin).astype(np.float32),
             "we": (RNG.standard_normal((c, cin, 1, 1)) / np.sqrt(cin)).astype(np.float32),
             "be": RNG.standard_normal(c).astype(np.float32),
             "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    nodes = [N_("Conv", ["x", "we", "be"], ["e"], kernel_shape=[1, 1], name="expand")]
    if expand:
        nodes.append(N_("Clip", ["e", "lo", "hi"], ["ea"], name="expand_act"))
        e = "ea"
    else:
        e = "e"
    p = k // 2
    nodes += [N_("Conv", [e, "wd", "bd"], ["d"], kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p], group=c,
                 name="dw"),
              N_("Clip", ["d", "lo", "hi"], ["da"], name="dw_act") if dw_act else N_("Identity", ["d"], ["da"]),
              N_("Conv", ["da", "wp", "bp"], ["pr"], kernel_shape=[1, 1], name="project")]
    if residual:
        assert s == 1
        nodes.append(N_("Add", ["pr", "x"], ["y"], name="add"))
    else:
        nodes.append(N_("Identity", ["pr"], ["y"], name="out"))
    return onnx_graph_model(nodes, (n, cin, h, w), ["y"], inits)


def _x(n: int, cin: int, h: int, w: int, specials: bool) -> np.ndarray:
    return conv_test_input(RNG, n, cin, h, w, specials)


def _run(plan, x: np.ndarray, on: bool, threads: int, runs: int = 1, expand: bool = True):
    low = lower_mod.Lowering(plan, {"x": x.shape})
    low.quantize_conv_outputs = on
    low.fuse_expansion_convs = expand
    lw = low.run()
    outs = []
    with bfpaccel.Session(plan, num_threads=threads).options():
        for r in range(runs):
            outs.append(lw.run({"x": x * (0.5 ** r)}, ["y"])["y"])
    return outs, low, lw


def _takes_path(kernel: str, fmt: str, rounding: str) -> bool:
    return kernel in PATH_KERNELS and not fmt.startswith("mxfp") and rounding != "stochastic"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt,rounding", FORMATS)
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("specials", [False, True])
def test_quantized_output_keeps_the_bits(kernel, fuse_every_size, case, fmt, rounding, threads, specials):
    n, cin, c, h, w, k, s, expand, residual = case
    plan = bfpaccel.compile(_model(*case), format=bfpaccel.get_format(fmt, rounding=rounding), seed=SEED)
    x = _x(n, cin, h, w, specials)
    want, _, lw0 = _run(plan, x, False, threads, runs=2, expand=expand)
    got, low, lw1 = _run(plan, x, True, threads, runs=2, expand=expand)
    dw = [op for op in low.ops if isinstance(op.params, _core.ConvParams) and op.params.depthwise]
    assert len(dw) == 1 and dw[0].params.quantize_output >= 1
    assert bool(dw[0].params.expand_channels) == expand
    reader = [op for op in low.ops if isinstance(op.params, _core.ConvParams)
              and op.params.share_input == dw[0].params.quantize_output]
    assert len(reader) == 1 and reader[0].name.startswith("project")
    assert lw0.program.last_reused == 0
    assert lw1.program.last_reused == (1 if _takes_path(kernel, fmt, rounding) else 0)
    for g_, w_ in zip(got, want):
        assert_bits_equal(g_, w_)
    if specials:
        assert np.isnan(want[0]).any()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=["tail", "expand"])
def test_a_signed_quantized_output_keeps_the_bits(kernel, fuse_every_size, case, threads):
    """No activation after the depthwise conv: its output has negative values, which an int16-row
    kernel's operand (bytes while no unit is negative) takes widened."""
    n, cin, c, h, w, k, s, expand, residual = case
    plan = bfpaccel.compile(_model(*case, dw_act=False), format="msfp16", seed=SEED)
    x = _x(n, cin, h, w, False)
    want, _, _ = _run(plan, x, False, threads, runs=2, expand=expand)
    got, _, lw = _run(plan, x, True, threads, runs=2, expand=expand)
    assert lw.program.last_reused == (1 if kernel in PATH_KERNELS else 0)
    for g_, w_ in zip(got, want):
        assert_bits_equal(g_, w_)


def test_a_depthwise_output_with_another_reader_is_written():
    """The depthwise conv's output is also a graph output, or its reader is not a 1x1 conv:
    the output is stored as usual."""
    m = _model(*CASES[0])
    m.graph.output.append(helper.make_empty_tensor_value_info("da"))
    plan = bfpaccel.compile(m, format="msfp16", seed=SEED)
    low = lower_mod.Lowering(plan, {"x": (1, 16, 16, 16)})
    low.run()
    assert not any(isinstance(op.params, _core.ConvParams) and op.params.quantize_output for op in low.ops)
    m = _model(*CASES[0])
    proj = next(nd for nd in m.graph.node if nd.name == "project")
    proj.attribute[0].ints[:] = [3, 3]  # a 3x3 reader ('same' padding)
    proj.attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    m.graph.initializer[[i.name for i in m.graph.initializer].index("wp")].CopyFrom(
        numpy_helper.from_array(RNG.standard_normal((16, 32, 3, 3)).astype(np.float32) * 0.1, "wp"))
    plan = bfpaccel.compile(m, format="msfp16", seed=SEED)
    x = _x(1, 16, 16, 16, False)
    got, low, _ = _run(plan, x, True, 1)
    assert not any(isinstance(op.params, _core.ConvParams) and op.params.quantize_output for op in low.ops)
    want, _, _ = _run(plan, x, False, 1)
    assert_bits_equal(got[0], want[0])


def test_session_runs_use_the_quantized_output(restore_threads):
    """Through Session.run, with the default lowering, on the default kernel: the same bits as
    the lowering without it, run after run."""
    case = CASES[1]
    plan = bfpaccel.compile(_model(*case), format="msfp16", seed=SEED)
    x = _x(case[0], case[1], case[3], case[4], False)
    s = bfpaccel.Session(plan, num_threads=2)
    want, _, _ = _run(plan, x, False, 2, runs=1)
    for _ in range(3):
        assert_bits_equal(s.run(None, {"x": x})["y"], want[0])


@pytest.mark.parametrize("slot,quantize_input", [(-1, True), (257, True), (1, False)])
def test_a_bad_quantize_output_is_rejected(slot, quantize_input):
    """A slot out of [0, 256], or a depthwise conv that does not quantize its input."""
    p = _core.Program(_core.VecPrec.FP32, bfpaccel.get_format("msfp16").kernel_params())
    x, w, y = p.add_buffer(4 * 16), p.add_const(np.ones(9 * 16, np.float32)), p.add_buffer(4 * 16)
    geom = _core.ConvGeometry(batch=1, channels=16, height=2, width=2, out_channels=16, kernel_h=3, kernel_w=3,
                              stride_h=1, stride_w=1, pad_top=1, pad_left=1, pad_bottom=1, pad_right=1,
                              dilation_h=1, dilation_w=1, groups=16, out_h=2, out_w=2)
    with pytest.raises(ValueError, match="quantize_output"):
        p.add_op(_core.ConvParams(geometry=geom, depthwise=True, quantize_input=quantize_input,
                                  quantize_output=slot), [x], [y], None, w)


def _two_blocks(c: int, h: int):
    """Two blocks alike, one after the other: x -> dw -> Clip -> 1x1 -> dw -> Clip -> 1x1 -> y
    (the second pair reuses the first pair's slot, its buffers those of the first pair)."""
    inits = {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    nodes = []
    src = "x"
    for b in range(2):
        inits[f"wd{b}"] = RNG.standard_normal((c, 1, 3, 3)).astype(np.float32) * 0.3
        inits[f"wp{b}"] = (RNG.standard_normal((c, c, 1, 1)) / np.sqrt(c)).astype(np.float32)
        nodes += [N_("Conv", [src, f"wd{b}"], [f"d{b}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=c,
                     name=f"dw{b}"),
                  N_("Clip", [f"d{b}", "lo", "hi"], [f"a{b}"], name=f"act{b}"),
                  N_("Conv", [f"a{b}", f"wp{b}"], [f"p{b}"], kernel_shape=[1, 1], name=f"project{b}")]
        src = f"p{b}"
    nodes.append(N_("Identity", [src], ["y"], name="out"))
    return onnx_graph_model(nodes, (1, c, h, h), ["y"], inits)


@pytest.mark.parametrize("threads", [1, 2])
def test_pairs_sharing_a_slot_keep_the_bits(kernel, threads):
    """Two pairs on one slot, the second depthwise conv's output in the first one's buffer: on
    kernels with the path each reader gets its own producer's operand; on the others the slot
    the first reader filled is never taken for the second (its producer wrote floats)."""
    plan = bfpaccel.compile(_two_blocks(32, 10), format="msfp16", seed=SEED)
    x = _x(1, 32, 10, 10, False)
    want, _, _ = _run(plan, x, False, threads, runs=2)
    got, low, lw = _run(plan, x, True, threads, runs=2)
    slots = [op.params.quantize_output for op in low.ops
             if isinstance(op.params, _core.ConvParams) and op.params.depthwise]
    assert slots == [1, 1]
    assert lw.program.last_reused == (2 if kernel in PATH_KERNELS else 0)
    for g_, w_ in zip(got, want):
        assert_bits_equal(g_, w_)


def test_a_slot_used_between_producer_and_reader_unlinks_them(monkeypatch):
    """A program in which another conv takes the pair's slot between the depthwise conv and its
    reader (never made by the lowering): the two are not linked, the depthwise conv writes its
    output, and the bits are those of the plain program -- not an error, nor a stale operand."""
    c, h = 32, 8
    inits = {"wd": RNG.standard_normal((c, 1, 3, 3)).astype(np.float32) * 0.3,
             "wp": (RNG.standard_normal((c, c, 1, 1)) / np.sqrt(c)).astype(np.float32),
             "ws": (RNG.standard_normal((c, c, 1, 1)) / np.sqrt(c)).astype(np.float32)}
    nodes = [N_("Conv", ["x", "wd"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=c, name="dw"),
             N_("Conv", ["x", "ws"], ["s"], kernel_shape=[1, 1], name="side"),
             N_("Conv", ["d", "wp"], ["p"], kernel_shape=[1, 1], name="project")]
    plan = bfpaccel.compile(onnx_graph_model(nodes, (1, c, h, h), ["p", "s"], inits), format="msfp16", seed=SEED)
    x = _x(1, c, h, h, False)

    def run(on: bool):
        low = lower_mod.Lowering(plan, {"x": x.shape})
        low.quantize_conv_outputs = on
        lw = low.run()
        with bfpaccel.Session(plan, num_threads=1).options():
            return lw.run({"x": x}, ["p", "s"]), low, lw

    want, _, _ = run(False)
    orig = lower_mod.Lowering.assign_slots

    def forged(self, groups, pairs):
        orig(self, groups, pairs)
        side = next(op for op in self.ops if op.name.startswith("side") and isinstance(op.params, _core.ConvParams))
        side.params.share_input = 1

    monkeypatch.setattr(lower_mod.Lowering, "assign_slots", forged)
    got, low, lw = run(True)
    convs = [op for op in low.ops if isinstance(op.params, _core.ConvParams)]
    assert [op.name for op in convs] == ["dw", "side", "project"]
    assert [op.params.quantize_output for op in convs] == [1, 0, 0]
    assert [op.params.share_input for op in convs] == [0, 1, 1]
    assert lw.program.last_reused == 0
    for name in ("p", "s"):
        assert_bits_equal(got[name], want[name], name)
