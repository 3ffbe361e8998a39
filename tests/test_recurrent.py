"""ONNX LSTM and GRU on the BFP datapath (runtime/ops/recurrent.py, csrc/ops/recurrent.cpp).

* every kernel, every format here, every option (directions, sequence_lens, initial states,
  peepholes, clip, input_forget, linear_before_reset, layout, activations): the compiled plan
  equals ``bfpaccel.reference.rnn`` (numpy: reference matmuls, vector rounding) bit for bit;
* ``format="fp32"`` is within 1e-5 of onnxruntime;
* unsupported attributes are compile-time errors naming the node; forged parameters are
  rejected when the op is added.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest

import bfpaccel
from bfpaccel import _core, get_format, reference
from conftest import KERNELS, assert_bits_equal

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

FORMATS = ["msfp16", "msfp12", "mxint8", "mxfp8_e4m3", "mxfp4_e2m1"]
T, B, I, H = 5, 3, 20, 24

#: (cell, attributes, options): the ONNX attributes and which optional inputs the graph has
CASES: List[Tuple[str, Dict[str, Any], Dict[str, Any]]] = [
    ("LSTM", {}, {}),
    ("LSTM", {"direction": "reverse"}, {"lens": [2, 5, 0], "h0": True, "c0": True}),
    ("LSTM", {"direction": "bidirectional", "clip": 0.6}, {"P": True, "lens": [5, 1, 3]}),
    ("LSTM", {"input_forget": 1}, {"P": True, "h0": True, "no_bias": True}),
    ("LSTM", {"direction": "bidirectional"}, {"layout": 1, "h0": True, "c0": True, "lens": [4, 5, 2]}),
    ("GRU", {}, {}),
    ("GRU", {"linear_before_reset": 1, "direction": "bidirectional"}, {"lens": [3, 5, 1], "h0": True}),
    ("GRU", {"direction": "reverse", "clip": 0.4}, {"h0": True, "no_bias": True}),
    ("GRU", {"linear_before_reset": 1}, {"layout": 1, "lens": [5, 0, 2]}),
    ("GRU", {"activations": ["HardSigmoid", "LeakyRelu"], "activation_alpha": [0.3, 0.05],
             "activation_beta": [0.4]}, {}),
    ("LSTM", {"activations": ["Sigmoid", "Softsign", "Elu"], "activation_alpha": [0.7]}, {"h0": True}),
]
CASE_IDS = [f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)]


def _graph(cell: str, attrs: Dict[str, Any], opt: Dict[str, Any], seed: int = 0, T: int = T, B: int = B,
           I: int = I, H: int = H) -> Tuple[Any, Dict[str, np.ndarray], Tuple[Any, ...], Dict[str, Any]]:
    """An ONNX model of one recurrent node, its feeds, and the reference's arguments."""
    D = 2 if attrs.get("direction") == "bidirectional" else 1
    G = 4 if cell == "LSTM" else 3
    layout = opt.get("layout", 0)
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((D, G * H, I)) * 0.3).astype(np.float32)
    R = (rng.standard_normal((D, G * H, H)) * 0.3).astype(np.float32)
    Bb = None if opt.get("no_bias") else (rng.standard_normal((D, 2 * G * H)) * 0.3).astype(np.float32)
    xs = (B, T, I) if layout else (T, B, I)
    hs = (B, D, H) if layout else (D, B, H)
    X = rng.standard_normal(xs).astype(np.float32)
    h0 = (rng.standard_normal(hs) * 0.5).astype(np.float32) if opt.get("h0") else None
    c0 = (rng.standard_normal(hs) * 0.5).astype(np.float32) if opt.get("c0") else None
    P = (rng.standard_normal((D, 3 * H)) * 0.5).astype(np.float32) if opt.get("P") else None
    lens = opt.get("lens")
    inits: Dict[str, np.ndarray] = {"W": W, "R": R}
    if Bb is not None:
        inits["B"] = Bb
    if lens is not None:
        inits["L"] = np.array(lens, np.int32)
    if P is not None:
        inits["P"] = P
    ins = ["X", "W", "R", "B" if Bb is not None else "", "L" if lens is not None else "", "h0" if h0 is not None else ""]
    graph_inputs = [("X", xs)]
    feeds = {"X": X}
    if h0 is not None:
        graph_inputs.append(("h0", hs))
        feeds["h0"] = h0
    if cell == "LSTM":
        ins += ["c0" if c0 is not None else "", "P" if P is not None else ""]
        if c0 is not None:
            graph_inputs.append(("c0", hs))
            feeds["c0"] = c0
    while ins[-1] == "":
        ins.pop()
    outs = ["Y", "Yh"] + (["Yc"] if cell == "LSTM" else [])
    node = helper.make_node(cell, ins, outs, name="rnn0", hidden_size=H, **({"layout": layout} if layout else {}),
                            **attrs)
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(s))
                                        for k, s in graph_inputs],
                          [helper.make_empty_tensor_value_info(o) for o in outs],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    kw = dict(direction=attrs.get("direction", "forward"), sequence_lens=lens, initial_h=h0, initial_c=c0, P=P,
              clip=attrs.get("clip"), input_forget=bool(attrs.get("input_forget", 0)),
              linear_before_reset=bool(attrs.get("linear_before_reset", 0)), layout=layout,
              activations=attrs.get("activations"), activation_alpha=attrs.get("activation_alpha"),
              activation_beta=attrs.get("activation_beta"))
    return m, feeds, (X, W, R, Bb), kw


def _outputs(res: Dict[str, np.ndarray], cell: str) -> List[np.ndarray]:
    return [res["Y"], res["Yh"]] + ([res["Yc"]] if cell == "LSTM" else [])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_matches_reference_on_every_kernel(fmt: str, case: int) -> None:
    cell, attrs, opt = CASES[case]
    vp = ["fp16", "bf16", "fp32"][case % 3]
    m, feeds, (X, W, R, Bb), kw = _graph(cell, attrs, opt, seed=case)
    plan = bfpaccel.compile(m, format=fmt, vector_precision=vp)
    want = reference.rnn(cell, X, W, R, Bb, fmt=fmt, vector_precision=vp, **kw)
    for k in KERNELS:
        got = _outputs(bfpaccel.Session(plan, kernel=k).run(None, feeds), cell)
        for name, g, w in zip(("Y", "Y_h", "Y_c"), got, want):
            assert_bits_equal(g, w, f"{cell} case {case} {fmt} vp={vp} kernel={k}: {name}")


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_stochastic_rounding_and_weight_format(cell: str) -> None:
    """Stochastic rounding indexes the arrays as the reference does; the weights may use another
    format of the same block size."""
    fa = get_format("msfp16", rounding="stochastic")
    attrs = {"direction": "bidirectional"} if cell == "LSTM" else {"linear_before_reset": 0}
    m, feeds, (X, W, R, Bb), kw = _graph(cell, attrs, {"h0": True, "lens": [5, 2, 4]}, seed=7)
    plan = bfpaccel.compile(m, format=fa, weight_format="msfp12", vector_precision="fp16", seed=99)
    want = reference.rnn(cell, X, W, R, Bb, fmt=fa, fmt_w="msfp12", vector_precision="fp16", seed=99, **kw)
    for k in KERNELS:
        got = _outputs(bfpaccel.Session(plan, kernel=k).run(None, feeds), cell)
        for g, w in zip(got, want):
            assert_bits_equal(g, w, f"{cell} stochastic, kernel {k}")


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_fp32_matches_onnxruntime(case: int) -> None:
    ort = pytest.importorskip("onnxruntime")
    cell, attrs, opt = CASES[case]
    m, feeds, (X, W, R, Bb), kw = _graph(cell, attrs, opt, seed=case)
    got = _outputs(bfpaccel.Session(bfpaccel.compile(m, format="fp32")).run(None, feeds), cell)
    ref32 = reference.rnn(cell, X, W, R, Bb, fmt="fp32", vector_precision="fp32", **kw)
    for g, w in zip(got, ref32):
        assert_bits_equal(g, w, f"{cell} case {case} fp32 against the reference")
    if opt.get("layout"):  # onnxruntime runs layout 0 only: compare with the transposed graph
        opt0 = dict(opt, layout=0)
        m, feeds0, _, _ = _graph(cell, attrs, opt0, seed=case)
        feeds = {k: v.transpose(1, 0, 2) for k, v in feeds.items()}
        got = [got[0].transpose(1, 2, 0, 3)] + [v.transpose(1, 0, 2) for v in got[1:]]
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)
    for name, g, w in zip(("Y", "Y_h", "Y_c"), got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5, err_msg=f"{cell} case {case}: {name}")


def test_quantized_rnn_differs_from_fp32_by_its_format() -> None:
    """The BFP plan is not the float32 graph (the datapath quantizes), and is close to it."""
    m, feeds, _, _ = _graph("GRU", {}, {}, seed=3)
    y32 = bfpaccel.Session(bfpaccel.compile(m, format="fp32")).run(["Y"], feeds)["Y"]
    y16 = bfpaccel.Session(bfpaccel.compile(m, format="msfp16")).run(["Y"], feeds)["Y"]
    y12 = bfpaccel.Session(bfpaccel.compile(m, format="msfp12")).run(["Y"], feeds)["Y"]
    e16, e12 = float(np.abs(y16 - y32).max()), float(np.abs(y12 - y32).max())
    assert 0 < e16 < 0.05 and e16 < e12, (e16, e12)


def test_weights_are_quantized_once_into_the_plan(tmp_path) -> None:
    m, feeds, _, _ = _graph("LSTM", {"direction": "bidirectional"}, {"P": True, "h0": True}, seed=4)
    plan = bfpaccel.compile(m, format="msfp16")
    node = [n for n in plan.graph.nodes if n.op == "LSTM"][0]
    assert node.inputs[1] == node.inputs[2] == ""
    assert "W" not in plan.graph.consts and "R" not in plan.graph.consts
    assert plan.graph.consts[node.attrs["qrecurrence"] + ".codes"].shape == (2 * 4 * H, H, 1, 1)
    p = tmp_path / "lstm.bfp"
    plan.save(str(p))
    a = bfpaccel.Session(plan).run(None, feeds)
    b = bfpaccel.Session(str(p)).run(None, feeds)
    for k in a:
        assert_bits_equal(b[k], a[k], k)


def test_profile_shows_the_recurrence_on_the_matrix_unit() -> None:
    m, feeds, _, _ = _graph("GRU", {}, {}, seed=5)
    sess = bfpaccel.Session(bfpaccel.compile(m, format="msfp16"))
    summary = sess.profile_summary(feeds)
    text = repr(summary)
    assert "gru" in text and "dense" in text, text


def _unsupported(cell: str, **attrs: Any):
    m, _, _, _ = _graph(cell, attrs, {}, seed=1)
    return m


@pytest.mark.parametrize("cell,attrs,match", [
    ("GRU", {"activations": ["Sigmoid", "Gelu"]}, r"GRU \(activation\(s\) \['Gelu'\].*node 'rnn0'"),
    ("LSTM", {"activations": ["Sigmoid", "Tanh"]}, r"takes 3 activations.*'rnn0'"),
    ("LSTM", {"direction": "sideways"}, r"direction.*'rnn0'"),
    ("GRU", {"input_forget": 1}, r"input_forget is an LSTM attribute.*'rnn0'"),
    ("GRU", {"activation_alpha": [0.5]}, r"no activation takes.*'rnn0'"),
])
def test_unsupported_attributes_name_the_node(cell: str, attrs: Dict[str, Any], match: str) -> None:
    with pytest.raises(bfpaccel.runtime.UnsupportedOpError, match=match):
        bfpaccel.compile(_unsupported(cell, **attrs), format="msfp16")


def test_non_constant_weight_is_an_error() -> None:
    node = helper.make_node("GRU", ["X", "W", "R"], ["Y"], name="g", hidden_size=4)
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 1, 3]),
                                        helper.make_tensor_value_info("W", TensorProto.FLOAT, [1, 12, 3])],
                          [helper.make_empty_tensor_value_info("Y")],
                          [numpy_helper.from_array(np.zeros((1, 12, 4), np.float32), "R")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    with pytest.raises(bfpaccel.runtime.UnsupportedOpError, match=r"non-constant weight W.*'g'"):
        bfpaccel.compile(m, format="msfp16")


def _program_with(params: Any, nin: int = 1, nout: int = 2, size: int = 1000, fmt: Optional[str] = "msfp16"):
    prog = _core.Program(_core.VecPrec.FP16, bfpaccel.core.fmt_params(get_format(fmt)) if fmt else None, 0)
    ins = [prog.add_buffer(size) for _ in range(nin)]
    outs = [prog.add_buffer(size) for _ in range(nout)]
    prog.add_op(params, ins, outs, name="forged")
    return prog


def _packed(rows: int, K: int) -> Any:
    w = bfpaccel.quantize_conv_weight(np.ones((rows, K, 1, 1), np.float32), "msfp16")
    return _core.pack_operand(w.tensor.elements.view(np.int8), w.tensor.exponents,
                              bfpaccel.core.fmt_params(get_format("msfp16")), "convw", 1, 1)


def _good(**over: Any) -> Any:
    p = dict(cell=_core.RnnCell.GRU, seq_len=4, batch=2, hidden=8, linear_before_reset=True,
             activations=[_core.RnnActivation.SIGMOID, _core.RnnActivation.TANH], alpha=[0.0, 0.0], beta=[0.0, 0.0],
             xg_offset=0, xg_step=2 * 24, xg_batch=24, has_y=True, has_y_h=True, y_offset=0, y_step=16, y_batch=8,
             state_offset=0, state_batch=8, recurrence=_packed(24, 8))
    p.update(over)
    return _core.RecurrentParams(**p)


def test_good_forged_program_runs() -> None:
    prog = _program_with(_good())
    out = prog.run([(0, np.zeros(1000, np.float32))], [1, 2])
    assert np.all(out[1][:16] == 0)  # zero input, zero bias, zero state: h stays 0


@pytest.mark.parametrize("over,match", [
    ({"hidden": 9}, "recurrence weight does not match"),
    ({"lengths": [1, 5]}, "sequence length"),
    ({"lengths": [1]}, "lengths has 1 entries"),
    ({"activations": [_core.RnnActivation.SIGMOID]}, "activations has 1 entries"),
    ({"xg_step": 400}, "input projection buffer holds"),
    ({"y_batch": 990}, "Y buffer holds"),
    ({"recurrence": None}, "missing recurrence weight"),
    ({"linear_before_reset": False}, "recurrence weight does not match"),
    ({"peephole": [0.0] * 24}, "a GRU has no peepholes"),
    ({"has_y_c": True}, "writes 3 outputs"),
    ({"recurrence_bias": [0.0] * 5}, "recurrence_bias has 5 entries"),
    ({"xg_offset": -1}, "negative offset"),
    ({"has_clip": True, "clip": -1.0}, "clip must be >= 0"),
])
def test_forged_recurrent_op_is_rejected(over: Dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _program_with(_good(**over))


def test_fp32_weights_in_a_block_program_are_rejected() -> None:
    with pytest.raises(ValueError, match="fp32 recurrence weights"):
        _program_with(_good(recurrence_f32=[0.0] * (8 * 24)))
    with pytest.raises(ValueError, match="BFP recurrence weights in a program without format"):
        _program_with(_good(), fmt=None)


def _rewrite_plan(src: str, dst: str, edit) -> str:
    """A copy of plan file ``src`` with its manifest changed by ``edit(manifest)``."""
    import hashlib
    import json
    import zipfile

    with zipfile.ZipFile(src) as z:
        man = json.loads(z.read("plan.json"))
        blob = z.read("consts.npz")
    edit(man)
    data = json.dumps(man).encode()
    with zipfile.ZipFile(dst, "w") as z:
        z.writestr("plan.json", data)
        z.writestr("plan.json.sha256", hashlib.sha256(data).hexdigest())
        z.writestr("consts.npz", blob)
    return dst


def _rnn_node(man: Dict[str, Any]) -> Dict[str, Any]:
    return [n for n in man["nodes"] if n["op"] in ("LSTM", "GRU")][0]


@pytest.mark.parametrize("edit,match", [
    (lambda n: n["attrs"].update(hidden_size=H + 1), "does not fit"),
    (lambda n: n["attrs"].pop("qrecurrence"), "exactly one of qrecurrence"),
    (lambda n: n["attrs"].update(qrecurrence="nope"), "missing weight"),
    (lambda n: n["attrs"].update(activations=["Sigmoid", "Gelu"]), r"activation\(s\) \['Gelu'\]"),
    (lambda n: n["attrs"].update(activations="Sigmoid"), "list of activation names"),
    (lambda n: n["inputs"].__setitem__(1, "X"), "inputs 1 and 2 must be empty"),
    (lambda n: n["attrs"].update(direction="sideways"), "direction"),
])
def test_malformed_recurrent_plan_is_rejected_at_load(tmp_path, edit, match: str) -> None:
    m, _, _, _ = _graph("GRU", {}, {}, seed=2)
    good = bfpaccel.compile(m, format="msfp16").save(str(tmp_path / "good.bfpplan"))
    bad = _rewrite_plan(good, str(tmp_path / "bad.bfpplan"), lambda man: edit(_rnn_node(man)))
    with pytest.raises(bfpaccel.runtime.PlanError, match=match):
        bfpaccel.runtime.load_plan(bad)
