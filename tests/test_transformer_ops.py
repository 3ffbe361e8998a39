"""Gelu (opset 20) and LayerNormalization (opset 17) on the vector units.

Both compute in fp32 in the order of the ONNX operator's function body and round their result
once to the vector precision, as every vector op does.  Checked on a transformer MLP block
(MatMul on the BFP core -> Gelu -> LayerNormalization) for every format and vector precision:

* the fused ops at vector precision fp32 equal the function bodies run as separate ops (same
  order, same exp and erf), bit for bit; LayerNormalization equals a numpy float32 reference in the
  same order, bit for bit;
* at fp16 / bf16 each result is the fp32 result rounded once (RNE), bit for bit;
* everything is within the vector precision's tolerance of a float64 reference, and of
  onnxruntime for the fp32 format.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
import pytest

import bfpaccel
from bfpaccel import _core, reference

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

FORMATS = ["fp32", "msfp16", "mxfp8_e4m3", "msfp12"]
VPS = ["fp32", "fp16", "bf16"]
H, O = 48, 40
RNG = np.random.default_rng(20)
W = (RNG.standard_normal((H, O)) * 0.3).astype(np.float32)
SCALE = (RNG.standard_normal(O) * 0.5 + 1).astype(np.float32)
BIAS = (RNG.standard_normal(O) * 0.2).astype(np.float32)
EPS = 1e-5


def _model(nodes, inputs, outputs: List[str], inits: Dict[str, np.ndarray], opset: int):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_empty_tensor_value_info(n) for n in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


def _fused(approximate: str, bias: bool = True):
    """MatMul -> Gelu -> LayerNormalization over the last axis; every stage is an output."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]),
             helper.make_node("Gelu", ["mm"], ["ge"], approximate=approximate),
             helper.make_node("LayerNormalization", ["ge", "s", "b"] if bias else ["ge", "s"], ["y"], epsilon=EPS)]
    inits = {"w": W, "s": SCALE, "b": BIAS} if bias else {"w": W, "s": SCALE}
    return _model(nodes, [("x", ["N", 5, H])], ["mm", "ge", "y"], inits, 20)


def _decomposed(approximate: str):
    """The same block with Gelu and LayerNormalization written as their ONNX function bodies."""
    f32 = np.float32
    N = helper.make_node
    inits = {"w": W, "s": SCALE, "b": BIAS, "half": f32(0.5), "one": f32(1.0), "eps": f32(EPS),
             "sqrt2": np.sqrt(f32(2.0)), "three": f32(3.0), "c0": f32(0.044715), "sqrt2pi": np.sqrt(f32(0.636619747))}
    nodes = [N("MatMul", ["x", "w"], ["mm"])]
    if approximate == "none":
        nodes += [N("Div", ["mm", "sqrt2"], ["g1"]), N("Erf", ["g1"], ["g2"]), N("Add", ["one", "g2"], ["phi"])]
    else:
        nodes += [N("Pow", ["mm", "three"], ["g1"]), N("Mul", ["c0", "g1"], ["g2"]), N("Add", ["mm", "g2"], ["g3"]),
                  N("Mul", ["sqrt2pi", "g3"], ["g4"]), N("Tanh", ["g4"], ["g5"]), N("Add", ["one", "g5"], ["phi"])]
    nodes += [N("Mul", ["half", "mm"], ["hx"]), N("Mul", ["hx", "phi"], ["ge"]),
              N("ReduceMean", ["ge"], ["mean"], axes=[-1]), N("Mul", ["ge", "ge"], ["sq"]),
              N("ReduceMean", ["sq"], ["msq"], axes=[-1]), N("Mul", ["mean", "mean"], ["m2"]),
              N("Sub", ["msq", "m2"], ["var"]), N("Add", ["var", "eps"], ["ve"]), N("Sqrt", ["ve"], ["sd"]),
              N("Sub", ["ge", "mean"], ["dev"]), N("Div", ["dev", "sd"], ["nrm"]), N("Mul", ["nrm", "s"], ["sc"]),
              N("Add", ["sc", "b"], ["y"])]
    return _model(nodes, [("x", ["N", 5, H])], ["mm", "ge", "y"], inits, 17)


def _round(a: np.ndarray, vp: str) -> np.ndarray:
    """a (float32) rounded to the vector precision, nearest even."""
    a = np.asarray(a, np.float32)
    if vp == "fp16":
        with np.errstate(over="ignore"):
            return a.astype(np.float16).astype(np.float32)
    if vp == "bf16":
        u = a.view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return a


def _ulp(vp: str) -> float:
    return {"fp32": 2.0 ** -23, "fp16": 2.0 ** -10, "bf16": 2.0 ** -7}[vp]


def _ln_same_order(x: np.ndarray, s: np.ndarray, b: Optional[np.ndarray], eps: float) -> np.ndarray:
    """LayerNormalization over the last axis in float32, in the function body's order (sequential
    sums: cumsum)."""
    L = x.shape[-1]
    f32 = np.float32
    mean = np.cumsum(x, axis=-1, dtype=f32)[..., -1:] / f32(L)
    msq = np.cumsum(x * x, axis=-1, dtype=f32)[..., -1:] / f32(L)
    y = ((x - mean) / np.sqrt(msq - mean * mean + f32(eps))) * s
    return y + b if b is not None else y


def _gelu64(x: np.ndarray, approximate: str) -> np.ndarray:
    x = x.astype(np.float64)
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _ln64(x: np.ndarray, s: np.ndarray, b: Optional[np.ndarray], eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + np.float32(eps)) * s
    return y + b if b is not None else y


def _x(n: int = 3) -> np.ndarray:
    x = RNG.standard_normal((n, 5, H)).astype(np.float32)
    x[0, 0, :4] = [0.0, -0.0, 1e-30, -1e-30]
    return x


def _run(m, fmt: str, vp: str, x: np.ndarray) -> Dict[str, np.ndarray]:
    return bfpaccel.Session(bfpaccel.compile(m, format=fmt, vector_precision=vp)).run(None, {"x": x})


def _same_bits(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.shape == b.shape, what
    bad = a.view(np.uint32) != b.view(np.uint32)
    assert not bad.any(), f"{what}: {int(bad.sum())} of {a.size} differ, e.g. {a[bad][:3]} vs {b[bad][:3]}"


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("vp", VPS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_mlp_block_bit_exact(fmt, vp, approximate):
    x = _x()
    got = _run(_fused(approximate), fmt, vp, x)
    at32 = _run(_fused(approximate), fmt, "fp32", x)
    mm = got["mm"]
    _same_bits(mm, at32["mm"], "the matrix unit's output is not rounded")
    if fmt != "fp32":  # the BFP datapath, bit for bit
        want = reference.matmul(x.reshape(-1, H), W, bfpaccel.get_format(fmt)).astype(np.float32).reshape(mm.shape)
        _same_bits(mm, want, "MatMul")
    # Gelu: the fp32 result rounded once; at fp32 the function body run op by op
    _same_bits(got["ge"], _round(at32["ge"], vp), "Gelu rounding")
    if vp == "fp32":
        _same_bits(got["ge"], _run(_decomposed(approximate), fmt, "fp32", x)["ge"], "Gelu vs its function body")
        _same_bits(got["y"], _run(_decomposed(approximate), fmt, "fp32", x)["y"], "LayerNorm vs its function body")
    np.testing.assert_allclose(got["ge"], _gelu64(mm, approximate), rtol=2 * _ulp(vp) + 1e-6, atol=2e-6)
    # LayerNormalization of the (rounded) Gelu output: numpy in the same order, rounded once
    _same_bits(got["y"], _round(_ln_same_order(got["ge"], SCALE, BIAS, EPS), vp), "LayerNorm")
    np.testing.assert_allclose(got["y"], _ln64(got["ge"], SCALE, BIAS, EPS), rtol=2 * _ulp(vp), atol=2e-5)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fp32_matches_onnxruntime(approximate):
    ort = pytest.importorskip("onnxruntime")
    m = _fused(approximate)
    x = _x(2) * 3
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    want = dict(zip(["mm", "ge", "y"], s.run(None, {"x": x})))
    got = _run(m, "fp32", "fp32", x)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("vp", VPS)
def test_layer_norm_over_several_axes(vp):
    """axis=1 of [N, C, L]: each sample's C*L values normalised together; a scale of shape [L]
    broadcast over C, no bias."""
    C, L = 6, 7
    s = (RNG.standard_normal(L) + 1).astype(np.float32)
    m = _model([helper.make_node("LayerNormalization", ["x", "s"], ["y"], axis=1, epsilon=1e-3)],
               [("x", [2, C, L])], ["y"], {"s": s}, 17)
    x = (RNG.standard_normal((2, C, L)) * 4 + 3).astype(np.float32)
    got = _run(m, "msfp16", vp, x)["y"]
    ref = _ln_same_order(x.reshape(2, C * L), np.tile(s, C), None, 1e-3).reshape(x.shape)
    _same_bits(got, _round(ref, vp), "LayerNorm axis=1")
    ort = pytest.importorskip("onnxruntime")
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=2 * _ulp(vp) + 1e-5, atol=1e-4)


def test_labels_and_plan_round_trip(tmp_path):
    plan = bfpaccel.compile(_fused("tanh"), format="msfp16")
    assert plan.ops["Gelu"] == 1 and plan.ops["LayerNormalization"] == 1
    p = plan.save(tmp_path / "mlp.bfpplan")
    x = _x(1)
    a = bfpaccel.Session(plan).run(None, {"x": x})
    b = bfpaccel.Session(str(p)).run(None, {"x": x})
    for k in a:
        _same_bits(a[k], b[k], k)
    lw = bfpaccel.Session(plan).program({"x": x.shape})
    assert {"dense", "gelutanh", "layer norm"} <= set(lw.op_kinds)
    assert int(_core.OpKind.LAYER_NORM) in lw.program.op_kinds


def test_unsupported_forms_are_named():
    x = _x(1)
    mean_out = _model([helper.make_node("LayerNormalization", ["x", "s"], ["y", "mean"])], [("x", [1, 5, H])],
                      ["y", "mean"], {"s": np.ones(H, np.float32)}, 17)
    with pytest.raises(bfpaccel.runtime.LoweringError, match="Mean and InvStdDev"):
        _run(mean_out, "fp32", "fp32", x)
    computed_scale = _model([helper.make_node("Relu", ["x"], ["r"]),
                             helper.make_node("LayerNormalization", ["x", "r"], ["y"])],
                            [("x", [1, 5, H])], ["y"], {}, 17)
    with pytest.raises(bfpaccel.runtime.LoweringError, match="scale must be a constant"):
        _run(computed_scale, "fp32", "fp32", x)
    bad_scale = _model([helper.make_node("LayerNormalization", ["x", "s"], ["y"])], [("x", [1, 5, H])], ["y"],
                       {"s": np.ones(H + 1, np.float32)}, 17)
    with pytest.raises(bfpaccel.runtime.LoweringError, match="does not broadcast"):
        _run(bad_scale, "fp32", "fp32", x)
    bad_gelu = _model([helper.make_node("Gelu", ["x"], ["y"], approximate="sigmoid")], [("x", [1, 5, H])], ["y"], {},
                      20)
    with pytest.raises(bfpaccel.runtime.LoweringError, match="approximate"):
        _run(bad_gelu, "fp32", "fp32", x)


def test_plan_validation_names_a_bad_gelu(tmp_path):
    import json
    import zipfile

    p = bfpaccel.compile(_fused("none"), format="msfp16").save(tmp_path / "m.bfpplan")
    with zipfile.ZipFile(p) as z:
        man, blob = json.loads(z.read("plan.json")), z.read("consts.npz")
    gelu = next(n for n in man["nodes"] if n["op"] == "Gelu")
    gelu["attrs"]["approximate"] = "sigmoid"
    with zipfile.ZipFile(tmp_path / "bad.bfpplan", "w") as z:
        z.writestr("plan.json", json.dumps(man))
        z.writestr("consts.npz", blob)
    with pytest.raises(bfpaccel.PlanError, match="approximate"):
        bfpaccel.load_plan(tmp_path / "bad.bfpplan")


@pytest.mark.parametrize("params", [
    dict(outer=2, length=8, scale=[1.0] * 7),                       # a scale per element, not fewer
    dict(outer=2, length=8, scale=[1.0] * 8, bias=[0.0] * 9),       # a bias per element, or none
    dict(outer=3, length=8, scale=[1.0] * 8),                       # rows past the end
    dict(outer=-1, length=8, scale=[1.0] * 8),                      # a negative size
])
def test_forged_layer_norm_is_rejected(params):
    p = _core.Program(_core.VecPrec.FP16, None)
    a, b = p.add_buffer(16), p.add_buffer(16)
    with pytest.raises(ValueError):
        p.add_op(_core.LayerNormParams(**params), [a], [b], name="forged")


@pytest.mark.parametrize("op,fn", [("Max", np.maximum), ("Min", np.minimum), ("Sum", np.add)])
def test_variadic_max_min_sum_use_every_input(op, fn):
    """Max / Min / Sum of 1, 2, 3 and 4 computed inputs with broadcasting: every input counts
    (a run-time Max of three inputs once read only the first two)."""
    rng = np.random.default_rng(5)
    xs = {"a": rng.standard_normal((2, 3, 4)), "b": rng.standard_normal((3, 4)), "c": rng.standard_normal((4,)),
          "d": rng.standard_normal((2, 1, 4))}
    xs = {k: v.astype(np.float32) for k, v in xs.items()}
    names = list(xs)
    for k in range(1, 5):
        ins = names[:k]
        # Relu first so the inputs are computed, not graph inputs folded away
        nodes = [helper.make_node("Relu", [n], [f"r{n}"]) for n in ins]
        nodes.append(helper.make_node(op, [f"r{n}" for n in ins], ["y"]))
        g = helper.make_graph(nodes, "v", [helper.make_tensor_value_info(n, TensorProto.FLOAT, xs[n].shape)
                                           for n in ins], [helper.make_empty_tensor_value_info("y")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = 9
        got = bfpaccel.Session(bfpaccel.compile(m, format="msfp16", vector_precision="fp32")).run(
            None, {n: xs[n] for n in ins})["y"]
        want = np.maximum(xs[ins[0]], 0)
        for n in ins[1:]:
            want = fn(want, np.maximum(xs[n], 0))
        _same_bits(got, np.broadcast_to(want, got.shape).astype(np.float32), f"{op} of {k} inputs")
        assert got.shape == np.broadcast_shapes(*(xs[n].shape for n in ins))
