"""An activation read by several dense layers or convs alike (attention's query, key and value
projections) is quantized once per run and its operand reused (``ConvParams.share_input``): the
outputs keep the bits of quantizing it for each layer -- against the numpy reference, against the
same graph lowered without sharing and against a graph whose layers read separate copies -- on
every kernel, for formats of every element kind, deterministic and stochastic rounding."""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import pytest

import bfpaccel
from bfpaccel import _core, reference
from bfpaccel.runtime import lower as lower_mod
from conftest import assert_bits_equal

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F = TensorProto.FLOAT
N_ = helper.make_node
FORMATS = ["msfp16", "msfp12", "mxint8", "mxfp8_e4m3", "mxfp6_e3m2", "mxfp4_e2m1"]
ROUNDINGS = ["nearest_even", "stochastic"]
RNG = np.random.default_rng(23)
M, K = 6, 40  # K: two full blocks of 16 and a partial one
SEED = 5


def _model(nodes, inputs: List[Tuple[str, List[int]]], outputs: List[str], inits: Dict[str, np.ndarray]):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                          [helper.make_empty_tensor_value_info(n) for n in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


W = {"wq": RNG.standard_normal((K, 24)).astype(np.float32), "wk": RNG.standard_normal((K, 24)).astype(np.float32),
     "wv": RNG.standard_normal((8, K)).astype(np.float32), "bq": RNG.standard_normal(24).astype(np.float32),
     "bv": RNG.standard_normal(8).astype(np.float32), "wo": RNG.standard_normal((24, 5)).astype(np.float32)}


def _dense_model(separate: bool):
    """q = x @ wq + bq, k = x @ wk, v = Gemm(x, wv^T, bv) and o = q @ wo (another input): the
    three projections read x (or, separate, three inputs fed the same numbers)."""
    xs = ["x1", "x2", "x3"] if separate else ["x", "x", "x"]
    nodes = [N_("MatMul", [xs[0], "wq"], ["q0"], name="proj_q"), N_("Add", ["q0", "bq"], ["q"], name="add_q"),
             N_("MatMul", [xs[1], "wk"], ["k"], name="proj_k"),
             N_("Gemm", [xs[2], "wv", "bv"], ["v"], transB=1, name="proj_v"),
             N_("MatMul", ["q", "wo"], ["o"], name="out")]
    inputs = [(n, [M, K]) for n in sorted(set(xs))]
    return _model(nodes, inputs, ["q", "k", "v", "o"], W)


def _x() -> np.ndarray:
    x = (RNG.standard_normal((M, K)) * np.exp(RNG.uniform(-6, 6, (M, 1)))).astype(np.float32)
    x[1, :16] = 0.0  # an all-zero block
    x[2, 3] = 1e-40  # a subnormal
    return x


X = _x()


def _dense_weights(plan: bfpaccel.Plan) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Each dense layer's weight codes [K, O] and exponents [nb, O] as compiled into the plan,
    by the name of the constant it came from."""
    out = {}
    for n in plan.graph.nodes:
        if n.op != "BfpDense":
            continue
        key = n.attrs["qweight"]
        codes = np.asarray(plan.graph.consts[key + ".codes"])
        exps = np.asarray(plan.graph.consts[key + ".exps"])
        O = codes.shape[0]
        out[n.name] = (codes.reshape(O, -1).T, exps.reshape(O, -1).T)
    return out


def _lowered(plan: bfpaccel.Plan, shapes: Dict[str, Tuple[int, ...]], share: bool):
    low = lower_mod.Lowering(plan, shapes)
    low.share_quantized_inputs = share
    lw = low.run()
    return low, lw


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_projections_share_one_quantized_input(kernel, fmt, rounding):
    f = bfpaccel.get_format(fmt, rounding=rounding)
    plan = bfpaccel.compile(_dense_model(False), format=f, seed=SEED)
    assert plan.ops.get("BfpDense") == 4
    low, lw = _lowered(plan, {"x": (M, K)}, True)
    slots = [op.params.share_input for op in low.ops if isinstance(op.params, _core.ConvParams)]
    assert sorted(slots) == [0, 1, 1, 1], slots  # the projections share slot 1; q @ wo reads q
    got = lw.run({"x": X}, ["q", "k", "v", "o"])
    assert lw.program.last_reused == 2  # quantized once, reused twice
    got2 = lw.run({"x": X * 2.0}, ["q", "k", "v", "o"])  # a new run never reuses the last one's
    assert lw.program.last_reused == 2

    # the datapath: x quantized along K (stochastic bits by x's flat index), the plan's weights
    ac, ae = reference.quantize_blocks(X, f, axis=-1, seed=SEED)
    ac2, ae2 = reference.quantize_blocks(X * 2.0, f, axis=-1, seed=SEED)
    ws = _dense_weights(plan)
    wf = plan.weight_format
    for out, node in (("k", "proj_k"), ("v", "proj_v")):
        bc, be = ws[node]
        want = reference.matmul_quantized(ac, ae, f, bc, be, wf).astype(np.float32)
        want2 = reference.matmul_quantized(ac2, ae2, f, bc, be, wf).astype(np.float32)
        if out == "v":  # + bias, rounded to the vector precision
            want = _vec(want + W["bv"], plan.vector_precision)
            want2 = _vec(want2 + W["bv"], plan.vector_precision)
        assert_bits_equal(got[out], want, f"{out} {fmt} {rounding} {kernel}")
        assert_bits_equal(got2[out], want2, f"{out} (second run) {fmt} {rounding} {kernel}")

    # the same graph lowered without sharing, and a graph whose layers read separate inputs
    _, plain = _lowered(plan, {"x": (M, K)}, False)
    want = plain.run({"x": X}, ["q", "k", "v", "o"])
    assert plain.program.last_reused == 0
    sep = bfpaccel.compile(_dense_model(True), format=f, seed=SEED)
    want_sep = bfpaccel.Session(sep).run(None, {"x1": X, "x2": X, "x3": X})
    for out in ["q", "k", "v", "o"]:
        assert_bits_equal(got[out], want[out], f"{out} vs unshared {fmt} {rounding} {kernel}")
        assert_bits_equal(got[out], want_sep[out], f"{out} vs separate inputs {fmt} {rounding} {kernel}")


def _vec(a: np.ndarray, vp: str) -> np.ndarray:
    a = np.asarray(a, np.float32)
    if vp == "fp16":
        return a.astype(np.float16).astype(np.float32)
    if vp == "bf16":
        return np.asarray(_core.round_vec(a.reshape(-1), int(_core.VecPrec.BF16))).reshape(a.shape)
    return a


def _conv_model(separate: bool):
    """A stem conv y = conv(x) (channels-last) read by three convs: a (3x3, pad 1) and b (3x3,
    pad 1, stride 2, ReLU) share its quantized operand; c (1x1, no padding) lays it out without
    padding and quantizes it itself. separate: the stem runs three times, once per branch."""
    ys = ["y1", "y2", "y3"] if separate else ["y", "y", "y"]
    nodes = [N_("Conv", ["x", "w0"], [y], pads=[0, 0, 0, 0]) for y in sorted(set(ys))]
    nodes += [N_("Conv", [ys[0], "wa", "ba"], ["a"], pads=[1, 1, 1, 1]),
              N_("Conv", [ys[1], "wb"], ["b0"], pads=[1, 1, 1, 1], strides=[2, 2]), N_("Relu", ["b0"], ["b"]),
              N_("Conv", [ys[2], "wc"], ["c"])]
    inits = {"w0": CW["w0"], "wa": CW["wa"], "ba": CW["ba"], "wb": CW["wb"], "wc": CW["wc"]}
    return _model(nodes, [("x", [2, 3, 7, 9])], ["a", "b", "c"], inits)


CW = {"w0": RNG.standard_normal((20, 3, 1, 1)).astype(np.float32),
      "wa": (RNG.standard_normal((12, 20, 3, 3)) * 0.1).astype(np.float32),
      "ba": RNG.standard_normal(12).astype(np.float32),
      "wb": (RNG.standard_normal((8, 20, 3, 3)) * 0.1).astype(np.float32),
      "wc": (RNG.standard_normal((6, 20, 1, 1)) * 0.1).astype(np.float32)}
XC = (RNG.standard_normal((2, 3, 7, 9)) * np.exp(RNG.uniform(-4, 4, (2, 1, 7, 9)))).astype(np.float32)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("fmt", ["msfp16", "mxint8", "mxfp8_e4m3", "mxfp4_e2m1"])
def test_convs_share_one_quantized_input(kernel, fmt, rounding):
    f = bfpaccel.get_format(fmt, rounding=rounding)
    plan = bfpaccel.compile(_conv_model(False), format=f, seed=SEED, vector_precision="fp32")
    low, lw = _lowered(plan, {"x": XC.shape}, True)
    slots = [op.params.share_input for op in low.ops if isinstance(op.params, _core.ConvParams)]
    assert sorted(slots) == [0, 0, 1, 1], slots
    got = lw.run({"x": XC}, ["a", "b", "c"])
    assert lw.program.last_reused == 1
    _, plain = _lowered(plan, {"x": XC.shape}, False)
    want = plain.run({"x": XC}, ["a", "b", "c"])
    sep = bfpaccel.compile(_conv_model(True), format=f, seed=SEED, vector_precision="fp32")
    want_sep = bfpaccel.Session(sep).run(None, {"x": XC})
    for out in ["a", "b", "c"]:
        assert_bits_equal(got[out], want[out], f"{out} vs unshared {fmt} {rounding} {kernel}")
        assert_bits_equal(got[out], want_sep[out], f"{out} vs separate inputs {fmt} {rounding} {kernel}")
    if rounding == "nearest_even":  # the reference quantizes the weights as the compiler does
        y = reference.conv2d(XC, CW["w0"], f).astype(np.float32)
        ref_a = reference.conv2d(y, CW["wa"], f, padding=1).astype(np.float32) + CW["ba"].reshape(1, -1, 1, 1)
        ref_b = np.maximum(reference.conv2d(y, CW["wb"], f, stride=2, padding=1).astype(np.float32), 0)
        assert_bits_equal(got["a"], ref_a.astype(np.float32), f"a {fmt} {kernel}")
        assert_bits_equal(got["b"], ref_b, f"b {fmt} {kernel}")


def test_threads_do_not_change_the_shared_bits(restore_threads):
    f = bfpaccel.get_format("msfp16")
    plan = bfpaccel.compile(_dense_model(False), format=f, seed=SEED)
    x = (RNG.standard_normal((300, K))).astype(np.float32)  # enough rows for the parallel quantizer
    outs = []
    for t in (1, 2, 3):
        bfpaccel.set_num_threads(t)
        _, lw = _lowered(plan, {"x": x.shape}, True)
        outs.append(lw.run({"x": x}, ["q", "k", "v", "o"]))
        assert lw.program.last_reused == 2
    _, plain = _lowered(plan, {"x": x.shape}, False)
    want = plain.run({"x": x}, ["q", "k", "v", "o"])
    for o in outs:
        for name in want:
            assert_bits_equal(o[name], want[name], name)


@pytest.mark.parametrize("slot", [-1, 257])
def test_share_slot_out_of_range_is_rejected(slot):
    f = bfpaccel.get_format("msfp16")
    plan = bfpaccel.compile(_dense_model(False), format=f, seed=SEED)
    low = lower_mod.Lowering(plan, {"x": (M, K)})
    low.share_quantized_inputs = False
    low.run()
    conv = next(op for op in low.ops if isinstance(op.params, _core.ConvParams))
    p = _core.Program(_core.VecPrec.FP32, f.kernel_params())
    x = p.add_buffer(M * K)
    y = p.add_buffer(M * 24)
    conv.params.share_input = slot
    with pytest.raises(ValueError, match="share_input"):
        p.add_op(conv.params, [x], [y], conv.w)


def test_share_slot_needs_bfp_weights():
    p = _core.Program(_core.VecPrec.FP32, bfpaccel.get_format("msfp16").kernel_params())
    x, w, y = p.add_buffer(4 * 4), p.add_const(np.ones(16, np.float32)), p.add_buffer(4 * 4)
    geom = _core.ConvGeometry(batch=1, channels=4, height=1, width=4, out_channels=4, kernel_h=1, kernel_w=1,
                              stride_h=1, stride_w=1, dilation_h=1, dilation_w=1, groups=1, out_h=1, out_w=4)
    with pytest.raises(ValueError, match="share_input"):
        p.add_op(_core.ConvParams(geometry=geom, share_input=1), [x], [y], None, w)
