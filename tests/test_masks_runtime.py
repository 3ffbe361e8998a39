"""Indices, masks and integer inputs at run time: embedding Gathers (every index checked by the
core), attention masks (Equal, Where, Not, IsNaN, IsInf, Expand, Cast from bool / int), Trilu,
Range, shape arithmetic with dynamic batch and sequence axes, integer model inputs and outputs
through ``Session.run`` and ``Predictor``, and the ops refused with their node named."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest

import bfpaccel
from bfpaccel import _core
from conftest import assert_bits_equal

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F, I64, I32, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL
N_ = helper.make_node
RNG = np.random.default_rng(3)
V, D = 50, 16
TABLE = RNG.standard_normal((V, D)).astype(np.float32)
FORMATS = ["fp32", "msfp16", "mxint8", "mxfp4_e2m1"]


def _model(nodes, inputs: Sequence[Tuple[str, int, List]], outputs: Sequence[str], inits: Dict = {}, opset: int = 17,
           out_types: Dict[str, int] = {}):
    outs = [helper.make_tensor_value_info(n, out_types[n], None) if n in out_types
            else helper.make_empty_tensor_value_info(n) for n in outputs]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs], outs,
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


def _run(m, feeds, fmt="msfp16", **kw):
    return bfpaccel.Session(bfpaccel.compile(m, format=fmt, **kw)).run(None, feeds)


def _embedding(idx_type: int = I64):
    return _model([N_("Gather", ["table", "input_ids"], ["emb"], name="word_embeddings")],
                  [("input_ids", idx_type, ["batch", "seq"])], ["emb"], {"table": TABLE})


# ---------------------------------------------------------------- Gather
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype,onnx_type", [(np.int64, I64), (np.int32, I32)])
def test_embedding_lookup(fmt, dtype, onnx_type):
    ids = np.array([[0, 5, 49, -1, -50], [7, 7, 0, 1, 2]], dtype)
    got = _run(_embedding(onnx_type), {"input_ids": ids}, fmt)["emb"]
    assert_bits_equal(got, TABLE[ids], "a gather moves the table's values unchanged")


@pytest.mark.parametrize("bad", [50, -51, 1 << 20])
def test_index_outside_the_table_is_a_value_error(bad):
    sess = bfpaccel.Session(bfpaccel.compile(_embedding(), format="msfp16"))
    ids = np.array([[1, 2, bad]], np.int64)
    with pytest.raises(ValueError, match=r"word_embeddings.*index .*input 'input_ids'.*out of range for 50"):
        sess.run(None, {"input_ids": ids})
    # the session is unharmed
    assert_bits_equal(sess.run(None, {"input_ids": ids[:, :2]})["emb"], TABLE[ids[:, :2]], "after the error")


def test_integer_inputs_are_checked_against_their_declared_type():
    sess = bfpaccel.Session(bfpaccel.compile(_embedding(), format="msfp16"))
    with pytest.raises(ValueError, match="declared int64.*got dtype float32"):
        sess.run(None, {"input_ids": np.zeros((1, 3), np.float32)})
    with pytest.raises(ValueError, match=r"holds 16777217.*\[-2\^24, 2\^24\]"):
        sess.run(None, {"input_ids": np.array([[1, (1 << 24) + 1]], np.int64)})
    assert sess.plan.input_dtypes == {"input_ids": "int64"}


def test_gather_of_a_computed_tensor():
    """The [CLS] row of a hidden state (constant index, computed data) and a negative index."""
    m = _model([N_("Relu", ["x"], ["h"]), N_("Gather", ["h", "zero"], ["cls"], axis=1),
                N_("Gather", ["h", "last"], ["tail"], axis=-1)],
               [("x", F, [2, 6, 5])], ["cls", "tail"], {"zero": np.array(0, np.int64), "last": np.array([-1, 0])})
    x = RNG.standard_normal((2, 6, 5)).astype(np.float32)
    out = _run(m, {"x": x}, "msfp16", vector_precision="fp32")
    h = np.maximum(x, 0)
    assert_bits_equal(out["cls"], h[:, 0], "cls")
    assert_bits_equal(out["tail"], h[..., [-1, 0]], "tail")


# ---------------------------------------------------------------- masks
def _mask_model():
    """The exporters' attention-mask arithmetic on an int64 mask, every stage an output."""
    nodes = [N_("Equal", ["mask", "zero_i"], ["pad"]),                       # bool [N, S]
             N_("Not", ["pad"], ["keep"]),
             N_("Cast", ["keep"], ["keep_f"], to=1),
             N_("Where", ["pad", "neg", "zero_f"], ["bias"]),               # [N, S]: -1e4 / 0
             N_("Unsqueeze", ["bias", "axes12"], ["bias4"]),                # [N, 1, 1, S]
             N_("Shape", ["mask"], ["shp"]), N_("Gather", ["shp", "one"], ["seq"]),
             N_("Unsqueeze", ["seq", "axis0"], ["seq1"]),
             N_("Concat", ["one_one", "seq1", "one1"], ["target"], axis=0),  # [1, 1, S, 1]
             N_("Expand", ["bias4", "target"], ["bias_full"]),              # [N, 1, S, S]
             N_("Cast", ["mask", ], ["mask_f"], to=1),
             N_("Cast", ["x"], ["x_int"], to=7),                            # float -> int64: toward zero
             N_("Cast", ["x"], ["x_bool"], to=9),
             N_("IsNaN", ["x"], ["x_nan"]), N_("IsInf", ["x"], ["x_inf"]),
             N_("IsInf", ["x"], ["x_pinf"], detect_negative=0),
             N_("Less", ["x", "zero_f"], ["x_neg"]), N_("GreaterOrEqual", ["x", "zero_f"], ["x_nonneg"]),
             N_("Xor", ["x_neg", "x_nan"], ["x_xor"]),
             N_("Identity", ["mask"], ["mask_out"])]
    inits = {"zero_i": np.array(0, np.int64), "neg": np.array(-1e4, np.float32), "zero_f": np.array(0, np.float32),
             "axes12": np.array([1, 2], np.int64), "one": np.array(1, np.int64), "axis0": np.array([0], np.int64),
             "one_one": np.array([1, 1], np.int64), "one1": np.array([1], np.int64)}
    outs = ["keep", "keep_f", "bias", "bias_full", "mask_f", "x_int", "x_bool", "x_nan", "x_inf", "x_pinf", "x_neg",
            "x_nonneg", "x_xor", "mask_out", "target"]
    return _model(nodes, [("mask", I64, ["N", "S"]), ("x", F, [7])], outs, inits,
                  out_types={"keep": B, "x_int": I64, "mask_out": I64})


@pytest.mark.parametrize("fmt", FORMATS)
def test_attention_mask_arithmetic(fmt):
    sess = bfpaccel.Session(bfpaccel.compile(_mask_model(), format=fmt))
    x = np.array([1.5, -2.7, 0.0, np.nan, np.inf, -np.inf, 3e9], np.float32)
    for S in (5, 9):  # a new sequence length: another program of the same plan
        mask = (RNG.random((2, S)) > 0.3).astype(np.int64)
        out = sess.run(None, {"mask": mask, "x": x})
        pad = mask == 0
        assert out["keep"].dtype == np.bool_ and np.array_equal(out["keep"], ~pad)
        assert_bits_equal(out["keep_f"], (~pad).astype(np.float32), "Cast bool -> float")
        assert_bits_equal(out["bias"], np.where(pad, np.float32(-1e4), np.float32(0)), "Where")
        assert_bits_equal(out["bias_full"], np.broadcast_to(out["bias"][:, None, None, :], (2, 1, S, S)).copy(),
                          "Expand")
        assert_bits_equal(out["mask_f"], mask.astype(np.float32), "Cast int -> float")
        assert out["mask_out"].dtype == np.int64 and np.array_equal(out["mask_out"], mask)
        assert list(out["target"]) == [1, 1, S, 1]
    assert out["x_int"].dtype == np.int64 and list(out["x_int"][:3]) == [1, -2, 0] and out["x_int"][6] == 3000000000
    assert list(out["x_bool"]) == [True, True, False, True, True, True, True]
    assert list(out["x_nan"]) == [False, False, False, True, False, False, False]
    assert list(out["x_inf"]) == [False, False, False, False, True, True, False]
    assert list(out["x_pinf"]) == [False, False, False, False, True, False, False]
    assert list(out["x_neg"]) == [False, True, False, False, False, True, False]
    assert list(out["x_nonneg"]) == [True, False, True, False, True, False, True]
    assert list(out["x_xor"]) == [False, True, False, True, False, True, False]
    assert len(sess._programs) == 2


def test_trilu_and_tile_at_run_time():
    x = RNG.standard_normal((2, 4, 6)).astype(np.float32)
    m = _model([N_("Relu", ["x"], ["h"]), N_("Trilu", ["h", "k"], ["up"]), N_("Trilu", ["h"], ["low"], upper=0),
                N_("Tile", ["h", "reps"], ["tiled"])],
               [("x", F, [2, 4, 6])], ["up", "low", "tiled"], {"k": np.array(1, np.int64),
                                                              "reps": np.array([1, 2, 3], np.int64)})
    out = _run(m, {"x": x}, "msfp16", vector_precision="fp32")
    h = np.maximum(x, 0)
    assert_bits_equal(out["up"], np.triu(h, 1), "Trilu upper, k=1")
    assert_bits_equal(out["low"], np.tril(h), "Trilu lower")
    assert_bits_equal(out["tiled"], np.tile(h, (1, 2, 3)), "Tile")


def test_causal_mask_from_range_and_dynamic_shapes():
    """Range over the sequence length (Shape -> Gather -> Range) folds while lowering, for each
    length; the same plan runs every length without being compiled again."""
    nodes = [N_("Shape", ["x"], ["shp"]), N_("Gather", ["shp", "one"], ["s"]),
             N_("Range", ["zero", "s", "one"], ["pos"]),
             N_("Unsqueeze", ["pos", "ax1"], ["row"]), N_("Unsqueeze", ["pos", "ax0"], ["col"]),
             N_("Greater", ["col", "row"], ["future"]),
             N_("Transpose", ["x"], ["xt"], perm=[0, 2, 1]), N_("MatMul", ["x", "xt"], ["scores"]),
             N_("Where", ["future", "ninf", "scores"], ["masked"]), N_("Softmax", ["masked"], ["p"], axis=-1),
             N_("Shape", ["x"], ["shp2"]), N_("Slice", ["shp2", "zero1", "one1"], ["bdim"]),
             N_("Concat", ["bdim", "m1"], ["flat_shape"], axis=0), N_("Reshape", ["p", "flat_shape"], ["flat"])]
    inits = {"one": np.array(1, np.int64), "zero": np.array(0, np.int64), "ax0": np.array([0], np.int64),
             "ax1": np.array([1], np.int64), "ninf": np.array(-np.inf, np.float32),
             "zero1": np.array([0], np.int64), "one1": np.array([1], np.int64), "m1": np.array([-1], np.int64)}
    m = _model(nodes, [("x", F, ["batch", "seq", 8])], ["p", "flat"], inits)
    sess = bfpaccel.Session(bfpaccel.compile(m, format="fp32"))
    plan_nodes = len(sess.plan.graph.nodes)
    for b, s in ((1, 4), (3, 7), (2, 1)):
        x = RNG.standard_normal((b, s, 8)).astype(np.float32)
        out = sess.run(None, {"x": x})
        sc = x.astype(np.float64) @ x.transpose(0, 2, 1)
        sc = np.where(np.triu(np.ones((s, s), bool), 1), -np.inf, sc)
        e = np.exp(sc - sc.max(-1, keepdims=True))
        np.testing.assert_allclose(out["p"], e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
        assert out["flat"].shape == (b, s * s)
    assert len(sess._programs) == 3 and len(sess.plan.graph.nodes) == plan_nodes


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_on_any_axis(op, axis):
    x = (RNG.standard_normal((3, 4, 5)) * 3).astype(np.float32)
    m = _model([N_(op, ["x"], ["y"], axis=axis)], [("x", F, [3, 4, 5])], ["y"])
    got = _run(m, {"x": x}, "msfp16", vector_precision="fp32")["y"]
    x64 = x.astype(np.float64)
    lse = np.log(np.exp(x64 - x64.max(axis, keepdims=True)).sum(axis, keepdims=True)) + x64.max(axis, keepdims=True)
    want = x64 - lse if op == "LogSoftmax" else np.exp(x64 - lse)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- what is refused, and how
def test_integer_arithmetic_at_run_time_is_refused_with_its_node():
    m = _model([N_("Add", ["input_ids", "one"], ["shifted"], name="shift_ids")],
               [("input_ids", I64, ["N", "S"])], ["shifted"], {"one": np.array(1, np.int64)})
    with pytest.raises(bfpaccel.runtime.LoweringError, match="'shift_ids'.*input_ids.*int64"):
        _run(m, {"input_ids": np.ones((1, 3), np.int64)})
    m = _model([N_("Gather", ["table", "x"], ["e"], name="float_ids")], [("x", F, [3])], ["e"], {"table": TABLE})
    with pytest.raises(bfpaccel.runtime.LoweringError, match="'float_ids'.*must be an integer tensor"):
        _run(m, {"x": np.zeros(3, np.float32)})


@pytest.mark.parametrize("op", ["If", "Loop", "Scan"])
def test_control_flow_is_named_at_compile_time(op):
    body = helper.make_graph([N_("Identity", ["x"], ["y"])], "body", [], [helper.make_empty_tensor_value_info("y")])
    attrs = {"If": dict(then_branch=body, else_branch=body), "Loop": dict(body=body),
             "Scan": dict(body=body, num_scan_inputs=1)}[op]
    ins = {"If": ["c"], "Loop": ["", "c"], "Scan": ["x"]}[op]
    m = _model([N_(op, ins, ["out"], name=f"my_{op.lower()}", **attrs)], [("c", B, []), ("x", F, [2])], ["out"])
    with pytest.raises(bfpaccel.UnsupportedOpError, match=rf"{op} \(node 'my_{op.lower()}'\)"):
        bfpaccel.compile(m, format="msfp16")


def test_predictor_takes_integer_inputs():
    m = _model([N_("Gather", ["table", "input_ids"], ["emb"]), N_("Cast", ["mask"], ["mf"], to=1),
                N_("Unsqueeze", ["mf", "ax"], ["m3"]), N_("Mul", ["emb", "m3"], ["y"])],
               [("input_ids", I64, ["N", "S"]), ("mask", I64, ["N", "S"])], ["y"],
               {"table": TABLE, "ax": np.array([-1], np.int64)})
    pred = bfpaccel.Predictor(bfpaccel.compile(m, format="msfp16", vector_precision="fp32"))
    ids, mask = np.array([[3, 4, 5]]), np.array([[1, 1, 0]])
    y = pred.predict({"input_ids": ids, "mask": mask})["y"]
    assert_bits_equal(y, TABLE[ids] * mask[..., None].astype(np.float32), "predict")


@pytest.mark.parametrize("params", [
    dict(outer=1, length=V, inner=D, count=4, indices="x"),    # output too small
    dict(outer=1, length=V + 1, inner=D, count=2, indices="x"),  # the table is shorter
    dict(outer=1, length=0, inner=D, count=2, indices="x"),
    dict(outer=-1, length=V, inner=D, count=2, indices="x"),
])
def test_forged_gather_is_rejected(params):
    p = _core.Program(_core.VecPrec.FP16, None)
    t, i, y = p.add_const(TABLE), p.add_buffer(2), p.add_buffer(3 * D)
    with pytest.raises(ValueError):
        p.add_op(_core.GatherParams(**params), [t, i], [y], name="forged")


def test_forged_where_and_compare_are_rejected():
    p = _core.Program(_core.VecPrec.FP16, None)
    a, y = p.add_buffer(4), p.add_buffer(4)
    with pytest.raises(ValueError):
        p.add_op(_core.WhereParams(shape=[4], c_strides=[2], a_strides=[1], b_strides=[1]), [a, a, a], [y])
    with pytest.raises(ValueError):
        p.add_op(_core.CompareParams(op=_core.CompareKind.LESS, shape=[8], a_strides=[1], b_strides=[0]), [a, a],
                 [y])
    with pytest.raises(ValueError):
        p.add_op(_core.ExactUnaryParams(op=_core.ExactKind.NOT, count=5), [a], [y])
