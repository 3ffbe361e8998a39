"""MatMul and Gemm between run-time tensors (OpKind.MATMUL): batched attention products, numpy
broadcasting, 1-D operands, a constant left operand, Gemm with a computed B -- both operands
quantized at run time along K, bit for bit against ``bfpaccel.reference.matmul`` on every kernel,
for block formats of every element kind and both deterministic and stochastic rounding; the fp32
plan sums in float32 in k order, bit for bit against numpy."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest

import bfpaccel
from bfpaccel import _core, reference
from conftest import assert_bits_equal

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F = TensorProto.FLOAT
FORMATS = ["msfp16", "msfp12", "mxint8", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp4_e2m1", "msfp8"]
RNG = np.random.default_rng(7)


def _model(nodes, inputs: List[Tuple[str, List[int]]], outputs: List[str], inits: Dict[str, np.ndarray] = {},
           opset: int = 17):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                          [helper.make_empty_tensor_value_info(n) for n in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


def _x(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


N_ = helper.make_node
C_LEFT = _x(5, 40)

# name -> (model, feeds, reference(a fmt, seed) -> expected "y")
Case = Tuple[object, Dict[str, np.ndarray], Callable[[bfpaccel.Format, int], np.ndarray]]


def _cases() -> Dict[str, Case]:
    q, k = _x(2, 3, 5, 40), _x(2, 3, 7, 40)
    a4, b3 = _x(3, 1, 5, 40), _x(4, 40, 7)
    x3, w2 = _x(2, 5, 40, scale=30.0), _x(40, 7, scale=1e-3)
    kh = _x(2, 7, 3, 40)  # [batch, seq, heads, dim] as exporters reshape it
    v1, b3b = _x(40), _x(2, 40, 7)
    x3b = _x(2, 40, 7)
    return {
        # Q @ K^T with K^T a Transpose of the last two axes: read in place
        "attention_scores": (
            _model([N_("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), N_("MatMul", ["q", "kt"], ["y"])],
                   [("q", [2, 3, 5, 40]), ("k", [2, 3, 7, 40])], ["y"]),
            {"q": q, "k": k}, lambda f, s: reference.matmul(q, k.transpose(0, 1, 3, 2), f, seed=s)),
        # K^T from [batch, seq, heads, dim] (perm 0,2,3,1): copied into place first
        "exporter_key": (
            _model([N_("Transpose", ["k"], ["kt"], perm=[0, 2, 3, 1]), N_("MatMul", ["q", "kt"], ["y"])],
                   [("q", [2, 3, 5, 40]), ("k", [2, 7, 3, 40])], ["y"]),
            {"q": q, "k": kh}, lambda f, s: reference.matmul(q, kh.transpose(0, 2, 3, 1), f, seed=s)),
        "broadcast": (
            _model([N_("MatMul", ["a", "b"], ["y"])], [("a", [3, 1, 5, 40]), ("b", [4, 40, 7])], ["y"]),
            {"a": a4, "b": b3}, lambda f, s: reference.matmul(a4, b3, f, seed=s)),
        "computed_2d_b": (
            _model([N_("MatMul", ["a", "b"], ["y"])], [("a", [2, 5, 40]), ("b", [40, 7])], ["y"]),
            {"a": x3, "b": w2}, lambda f, s: reference.matmul(x3, w2, f, seed=s)),
        "vector_left": (
            _model([N_("MatMul", ["a", "b"], ["y"])], [("a", [40]), ("b", [2, 40, 7])], ["y"]),
            {"a": v1, "b": b3b}, lambda f, s: reference.matmul(v1[None], b3b, f, seed=s)[:, 0]),
        "constant_left": (
            _model([N_("MatMul", ["c", "b"], ["y"])], [("b", [2, 40, 7])], ["y"], {"c": C_LEFT}),
            {"b": x3b}, lambda f, s: reference.matmul(C_LEFT, x3b, f, seed=s)),
    }


CASES = _cases()


@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_between_activations_is_the_datapath(kernel, fmt, rounding):
    f = bfpaccel.get_format(fmt, rounding=rounding)
    for name, (m, feeds, ref) in CASES.items():
        plan = bfpaccel.compile(m, format=f, seed=11)
        assert plan.ops.get("MatMul") == 1, name  # not a dense layer: its B is computed (or A is the constant)
        got = bfpaccel.Session(plan).run(None, feeds)["y"]
        assert_bits_equal(got, ref(f, 11).astype(np.float32), f"{name} {fmt} {rounding} {kernel}")


def test_transposed_key_is_read_in_place():
    m, feeds, _ = CASES["attention_scores"]
    lw = bfpaccel.Session(bfpaccel.compile(m, format="msfp16")).program({k: v.shape for k, v in feeds.items()})
    assert lw.op_kinds == ["matmul"]  # no transpose copy before the product
    m, feeds, _ = CASES["exporter_key"]
    lw = bfpaccel.Session(bfpaccel.compile(m, format="msfp16")).program({k: v.shape for k, v in feeds.items()})
    assert lw.op_kinds.count("transpose") == 1 and "matmul" in lw.op_kinds


def _fp32_sequential(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 products summed in k order from +0.0, one rounding per multiply and per add."""
    acc = np.zeros(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]), np.float32)
    for kk in range(a.shape[-1]):
        acc = (acc + (a[..., :, kk:kk + 1] * b[..., kk:kk + 1, :]).astype(np.float32)).astype(np.float32)
    return acc


@pytest.mark.parametrize("name", ["attention_scores", "broadcast", "constant_left"])
def test_fp32_plan_sums_in_order(kernel, name):
    m, feeds, _ = CASES[name]
    got = bfpaccel.Session(bfpaccel.compile(m, format="fp32")).run(None, feeds)["y"]
    if name == "attention_scores":
        want = _fp32_sequential(feeds["q"], feeds["k"].transpose(0, 1, 3, 2))
    elif name == "broadcast":
        want = _fp32_sequential(feeds["a"], feeds["b"])
    else:
        want = _fp32_sequential(C_LEFT, feeds["b"])
    assert_bits_equal(got, want, name)
    ort = pytest.importorskip("onnxruntime")
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, s.run(None, feeds)[0], rtol=1e-5, atol=1e-5)


def _round(a: np.ndarray, vp: str) -> np.ndarray:
    return reference.fake_quantize(np.asarray(a, np.float32), vp)


@pytest.mark.parametrize("vp", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("fmt", ["msfp16", "mxfp8_e4m3"])
def test_gemm_with_a_computed_b(fmt, vp):
    """transA / transB read in place, alpha and beta * C as rounded vector ops after the product."""
    a, b, c = _x(40, 5), _x(7, 40), _x(7)
    m = _model([N_("Gemm", ["a", "b", "c"], ["y"], transA=1, transB=1, alpha=0.5, beta=2.0)],
               [("a", [40, 5]), ("b", [7, 40])], ["y"], {"c": c})
    plan = bfpaccel.compile(m, format=fmt, vector_precision=vp)
    assert plan.ops.get("Gemm") == 1
    got = bfpaccel.Session(plan).run(None, {"a": a, "b": b})["y"]
    acc = reference.matmul(a.T, b.T, fmt)
    want = _round(_round(acc * np.float32(0.5), vp) + (c.astype(np.float64) * 2).astype(np.float32), vp)
    assert_bits_equal(got, want.astype(np.float32), "Gemm")
    # a computed C with beta: beta * C is its own rounded vector op
    m2 = _model([N_("Gemm", ["a", "b", "c"], ["y"], transA=1, beta=0.25)], [("a", [40, 5]), ("b", [40, 7]),
                                                                          ("c", [5, 7])], ["y"])
    c2 = _x(5, 7)
    got2 = bfpaccel.Session(bfpaccel.compile(m2, format=fmt, vector_precision=vp)).run(
        None, {"a": a, "b": b.T.copy(), "c": c2})["y"]
    want2 = _round(reference.matmul(a.T, b.T, fmt) + _round(c2 * np.float32(0.25), vp), vp)
    assert_bits_equal(got2, want2.astype(np.float32), "Gemm, computed C")


def test_reference_batched_matmul_is_the_2d_one_per_matrix():
    a, b = _x(2, 1, 3, 33), _x(4, 33, 5)
    got = reference.matmul(a, b, "msfp16")
    assert got.shape == (2, 4, 3, 5)
    for i in range(2):
        for j in range(4):
            # deterministic rounding: each matrix quantizes alone to the same codes
            assert_bits_equal(got[i, j], reference.matmul(a[i, 0], b[j], "msfp16"), f"{i},{j}")
    with pytest.raises(ValueError, match="rank >= 2"):
        reference.matmul(np.ones(4), np.ones((4, 2)), "msfp16")
    with pytest.raises(ValueError, match="K mismatch"):
        reference.matmul(np.ones((2, 3, 4)), np.ones((5, 2)), "msfp16")


def test_shapes_that_do_not_multiply_are_named():
    m = _model([N_("MatMul", ["a", "b"], ["y"], name="mm")], [("a", [2, 5, 40]), ("b", [3, 41, 7])], ["y"])
    with pytest.raises(bfpaccel.runtime.LoweringError, match="'mm'.*do not multiply"):
        bfpaccel.Session(bfpaccel.compile(m, format="msfp16")).run(None, {"a": _x(2, 5, 40), "b": _x(3, 41, 7)})
    m = _model([N_("MatMul", ["a", "b"], ["y"], name="mm")], [("a", [2, 5, 40]), ("b", [3, 40, 7])], ["y"])
    with pytest.raises(bfpaccel.runtime.LoweringError, match="do not broadcast"):
        bfpaccel.Session(bfpaccel.compile(m, format="msfp16")).run(None, {"a": _x(2, 5, 40), "b": _x(3, 40, 7)})


@pytest.mark.parametrize("params", [
    dict(m=2, k=4, n=3, batch_shape=[2], a_strides=[1], b_strides=[1], a_count=1, b_count=2),   # A too short
    dict(m=2, k=4, n=3, batch_shape=[2], a_strides=[1], b_strides=[1], a_count=2, b_count=2),   # A's buffer
    dict(m=2, k=4, n=3, batch_shape=[2], a_strides=[-1], b_strides=[0], a_count=1, b_count=1),  # negative
    dict(m=2, k=4, n=3, batch_shape=[2, 1], a_strides=[0], b_strides=[0, 0], a_count=1, b_count=1),
    dict(m=-2, k=4, n=3, batch_shape=[1], a_strides=[0], b_strides=[0], a_count=1, b_count=1),
    dict(m=2, k=4, n=3, batch_shape=[0], a_strides=[0], b_strides=[0], a_count=1, b_count=1),
])
def test_forged_matmul_is_rejected(params):
    p = _core.Program(_core.VecPrec.FP16, bfpaccel.get_format("msfp16").kernel_params())
    a, b, y = p.add_buffer(8), p.add_buffer(24), p.add_buffer(12)
    with pytest.raises(ValueError):
        p.add_op(_core.MatMulParams(**params), [a, b], [y], name="forged")
