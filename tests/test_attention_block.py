"""A one-layer self-attention block as exporters write it (dense Q/K/V, reshape to heads,
Q @ Kᵀ, scale, additive mask from an int64 attention mask, softmax, P @ V, heads merged, output
dense), checked stage by stage against ``bfpaccel.reference`` for every format: every matrix op
-- dense layers and products of two activations -- bit for bit on the datapath, the vector ops
as the vector unit rounds them."""

from __future__ import annotations

import numpy as np
import pytest

import bfpaccel
from bfpaccel import reference
from conftest import assert_bits_equal

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

N_ = helper.make_node
H, NH = 48, 3
DH = H // NH
RNG = np.random.default_rng(11)
W = {k: (RNG.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32) for k in "qkvo"}
BIAS = {k: (RNG.standard_normal(H) * 0.1).astype(np.float32) for k in "qkvo"}
FORMATS = ["msfp16", "msfp12", "mxint8", "mxfp8_e4m3", "mxfp4_e2m1"]
STAGES = ["q", "k", "v", "qh", "kt", "vh", "scores", "scaled", "biased", "probs", "ctx", "merged", "y"]


def _block():
    c = lambda v: np.asarray(v, np.int64)  # noqa: E731
    inits = {f"W{k}": W[k] for k in W} | {f"b{k}": BIAS[k] for k in BIAS} | {
        "heads": c([0, 0, NH, DH]), "merge": c([0, 0, H]), "scale": np.float32(np.sqrt(DH)),
        "one": np.float32(1.0), "big": np.float32(-10000.0), "ax": c([1, 2])}
    nodes = []
    for k in "qkv":
        nodes += [N_("MatMul", ["x", f"W{k}"], [f"{k}0"]), N_("Add", [f"b{k}", f"{k}0"], [k]),
                  N_("Reshape", [k, "heads"], [f"{k}4"])]
    nodes += [N_("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]), N_("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
              N_("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
              N_("MatMul", ["qh", "kt"], ["scores"]), N_("Div", ["scores", "scale"], ["scaled"]),
              N_("Unsqueeze", ["mask", "ax"], ["m4"]), N_("Cast", ["m4"], ["mf"], to=1),
              N_("Sub", ["one", "mf"], ["inv"]), N_("Mul", ["inv", "big"], ["mbias"]),
              N_("Add", ["scaled", "mbias"], ["biased"]), N_("Softmax", ["biased"], ["probs"], axis=-1),
              N_("MatMul", ["probs", "vh"], ["ctx"]), N_("Transpose", ["ctx"], ["ctxt"], perm=[0, 2, 1, 3]),
              N_("Reshape", ["ctxt", "merge"], ["merged"]), N_("MatMul", ["merged", "Wo"], ["o0"]),
              N_("Add", ["o0", "bo"], ["y"])]
    g = helper.make_graph(nodes, "attention",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", H]),
                           helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", "S"])],
                          [helper.make_empty_tensor_value_info(s) for s in STAGES],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _vp(a: np.ndarray, vp: str) -> np.ndarray:
    return reference.fake_quantize(np.asarray(a, np.float32), vp)


@pytest.mark.parametrize("vp", ["fp16", "fp32"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_attention_block_stage_by_stage(fmt, vp):
    sess = bfpaccel.Session(bfpaccel.compile(_block(), format=fmt, vector_precision=vp))
    x = RNG.standard_normal((2, 7, H)).astype(np.float32)
    mask = np.ones((2, 7), np.int64)
    mask[1, 4:] = 0
    o = sess.run(None, {"x": x, "mask": mask})
    f = bfpaccel.get_format(fmt)
    for k in "qkv":  # dense: the datapath, then the bias rounded once
        acc = reference.matmul(x.reshape(-1, H), W[k], f).reshape(2, 7, H)
        assert_bits_equal(o[k], _vp(acc + BIAS[k], vp), f"dense {k}")
    assert_bits_equal(o["qh"], o["q"].reshape(2, 7, NH, DH).transpose(0, 2, 1, 3), "heads of q")
    assert_bits_equal(o["kt"], o["k"].reshape(2, 7, NH, DH).transpose(0, 2, 3, 1), "heads of k, transposed")
    # products of two activations: both quantized along K at run time
    assert_bits_equal(o["scores"], reference.matmul(o["qh"], o["kt"], f), "Q @ K^T")
    assert_bits_equal(o["scaled"], _vp(o["scores"] / np.float32(np.sqrt(DH)), vp), "scale")
    mbias = _vp((np.float32(1) - mask.astype(np.float32)) * np.float32(-10000), vp)[:, None, None, :]
    assert_bits_equal(o["biased"], _vp(o["scaled"] + mbias, vp), "mask")
    s = o["biased"].astype(np.float64)
    e = np.exp(s - s.max(-1, keepdims=True))
    ulp = {"fp16": 2.0 ** -10, "fp32": 2.0 ** -22}[vp]
    np.testing.assert_allclose(o["probs"], e / e.sum(-1, keepdims=True), rtol=2 * ulp, atol=1e-7)
    assert (o["probs"][1, :, :, 4:] == 0).all()  # masked keys: exp underflows to 0
    assert_bits_equal(o["ctx"], reference.matmul(o["probs"], o["vh"], f), "P @ V")
    assert_bits_equal(o["merged"], o["ctx"].transpose(0, 2, 1, 3).reshape(2, 7, H), "merged heads")
    acc = reference.matmul(o["merged"].reshape(-1, H), W["o"], f).reshape(2, 7, H)
    assert_bits_equal(o["y"], _vp(acc + BIAS["o"], vp), "output dense")


def test_attention_block_fp32_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    m = _block()
    x = RNG.standard_normal((3, 9, H)).astype(np.float32)
    mask = (RNG.random((3, 9)) > 0.2).astype(np.int64)
    mask[:, 0] = 1
    got = bfpaccel.Session(bfpaccel.compile(m, format="fp32")).run(None, {"x": x, "mask": mask})
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "mask": mask})
    for name, w in zip(STAGES, want):
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-5, err_msg=name)
