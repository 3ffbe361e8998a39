"""The compiler and runtime (bfpaccel.compile / Session / plan files) on small ONNX graphs.

With ``format="fp32"`` and ``vector_precision="fp32"`` the runtime computes the ONNX graph in
float32, so it must match onnxruntime closely; with a block format the matrix ops must match
the numpy oracle (``reference.conv2d`` / ``reference.matmul``) bit for bit, and vector ops
must round to the vector precision.
"""

from __future__ import annotations

import itertools
import os
from typing import Dict, List, Optional

import numpy as np
import pytest

import bfpaccel
from bfpaccel import reference
from conftest import VNNI_KERNELS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _model(nodes, inputs, outputs, inits: Dict[str, np.ndarray], opset: int = 15):
    g = helper.make_graph(
        nodes, "t",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, []) if False else helper.make_empty_tensor_value_info(n) for n in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _ort(m, feeds):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def _close(a, b, rtol=1e-4, atol=1e-5):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


RNG = np.random.default_rng(1)


def _w(*shape, scale=0.2):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _cnn(nchw_input: bool = True):
    """A small CNN touching most ops the seed models need, tf2onnx-style transposes included."""
    inits = {
        "w1": _w(8, 3, 3, 3), "b1": _w(8),
        "g": np.abs(_w(8)) + 0.5, "be": _w(8), "mu": _w(8), "var": np.abs(_w(8)) + 0.5,
        "w2": _w(8, 8, 1, 1), "w3": _w(8, 1, 3, 3), "b3": _w(8),
        "w4": _w(16, 16, 3, 3), "fc": _w(16, 10), "fcb": _w(10),
        "scale": _w(1, 16, 1, 1), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "shape2": np.array([0, -1], np.int64), "axes": np.array([2, 3], np.int64),
        "six": np.array(6.0, np.float32), "zero": np.array(0.0, np.float32),
    }
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),  # NHWC input like tf2onnx
        helper.make_node("Conv", ["xt", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn1"], epsilon=1e-3),
        helper.make_node("Relu", ["bn1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("Add", ["c2", "r1"], ["a2"]),
        helper.make_node("Clip", ["a2", "zero", "six"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], group=8, pads=[1, 1, 1, 1]),  # depthwise
        helper.make_node("MaxPool", ["c3"], ["p3"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["p3", "p3"], ["cc"], axis=1),
        helper.make_node("Mul", ["cc", "scale"], ["m4"]),
        helper.make_node("Pad", ["m4", "pads"], ["pd"]),
        helper.make_node("Conv", ["pd", "w4"], ["c4"], dilations=[1, 1]),
        helper.make_node("AveragePool", ["c4"], ["ap"], kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["ap", "g2", "be2", "mu2", "var2"], ["bn4"]),
        helper.make_node("Sigmoid", ["bn4"], ["sg"]),
        helper.make_node("Mul", ["bn4", "sg"], ["sw"]),  # swish
        helper.make_node("ReduceMean", ["sw"], ["gap"], axes=[2, 3], keepdims=1),
        helper.make_node("Reshape", ["gap", "shape2"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=-1),
    ]
    inits.update({"g2": np.abs(_w(16)) + 0.5, "be2": _w(16), "mu2": _w(16), "var2": np.abs(_w(16)) + 0.5})
    return _model(nodes, [("x", ["N", 17, 19, 3])], ["logits", "prob"], inits)


def test_fp32_matches_onnxruntime():
    m = _cnn()
    x = RNG.standard_normal((2, 17, 19, 3)).astype(np.float32)
    want = _ort(m, {"x": x})
    plan = bfpaccel.compile(m, format="fp32")
    assert plan.vector_precision == "fp32"
    got = bfpaccel.Session(plan).run(None, {"x": x})
    assert set(got) == {"logits", "prob"}
    _close(got["logits"], want["logits"])
    _close(got["prob"], want["prob"])
    # batch 1 and batch 3 reuse the plan with new programs
    for n in (1, 3):
        xb = RNG.standard_normal((n, 17, 19, 3)).astype(np.float32)
        _close(bfpaccel.Session(plan).run(["prob"], {"x": xb})["prob"], _ort(m, {"x": xb})["prob"])


def test_batchnorm_folded_and_transposes_gone():
    plan = bfpaccel.compile(_cnn(), format="msfp16")
    ops = plan.ops
    assert ops.get("BatchNormalization", 0) == 1  # the one after AveragePool cannot fold
    assert "Gemm" not in ops and ops["BfpDense"] == 1
    # the conv after Mul(scale) through Concat stays a Mul (not foldable across Concat)
    assert ops["Mul"] == 2


@pytest.mark.parametrize("fmt", ["msfp16", "msfp12", "mxfp4_e2m1", "mxint8"])
def test_bfp_close_to_fp32(fmt):
    m = _cnn()
    x = RNG.standard_normal((1, 17, 19, 3)).astype(np.float32)
    want = _ort(m, {"x": x})["logits"]
    got = bfpaccel.Session(bfpaccel.compile(m, format=fmt)).run(["logits"], {"x": x})["logits"]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < {"msfp16": 0.02, "mxint8": 0.02, "msfp12": 0.15, "mxfp4_e2m1": 0.4}[fmt], rel


def test_conv_bit_exact_against_reference():
    """One conv + bias + relu: the BFP runtime equals reference.conv2d + fp16 vector ops."""
    w, b = _w(24, 20, 3, 3), _w(24)
    m = _model([helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 0, 1, 2], strides=[1, 2]),
                helper.make_node("Relu", ["c"], ["y"])], [("x", [2, 20, 9, 11])], ["y"], {"w": w, "b": b})
    x = (RNG.standard_normal((2, 20, 9, 11)) * np.exp(RNG.uniform(-8, 8, (2, 20, 9, 11)))).astype(np.float32)
    x[0, :, 0, 0] = 0.0
    x[1, 3, 2, 2] = 1e-40  # a subnormal
    for fmt in ["msfp16", "mxfp6_e3m2", "msfp9"]:
        plan = bfpaccel.compile(m, format=fmt, vector_precision="fp16")
        got = bfpaccel.Session(plan).run(None, {"x": x})["y"]
        f = bfpaccel.get_format(fmt)
        acc = reference.conv2d(x, w, f, stride=(1, 2), padding=(1, 0, 1, 2))
        want = np.maximum((acc + b.reshape(1, -1, 1, 1)).astype(np.float16).astype(np.float32), 0)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=fmt)


def test_dense_bit_exact_against_reference():
    w = _w(40, 7)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [3, 40])], ["y"], {"w": w})
    x = RNG.standard_normal((3, 40)).astype(np.float32)
    got = bfpaccel.Session(bfpaccel.compile(m, format="msfp14")).run(None, {"x": x})["y"]
    want = reference.matmul(x, w, bfpaccel.get_format("msfp14"))  # no vector op: the fp32 result
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("vp,dtype", [("fp16", np.float16), ("bf16", None)])
def test_vector_precision_rounding(vp, dtype):
    m = _model([helper.make_node("Add", ["x", "c"], ["y"])], [("x", [4, 1000])], ["y"],
               {"c": np.float32(1e-3).reshape(())})
    x = (RNG.standard_normal((4, 1000)) * np.exp(RNG.uniform(-20, 12, (4, 1000)))).astype(np.float32)
    x[0, :4] = [65519.0, 65520.0, -1e6, np.nan]
    got = bfpaccel.Session(bfpaccel.compile(m, format="msfp16", vector_precision=vp)).run(None, {"x": x})["y"]
    s = (x + np.float32(1e-3)).astype(np.float32)
    if dtype is not None:
        with np.errstate(over="ignore"):
            want = s.astype(dtype).astype(np.float32)
    else:
        u = s.view(np.uint32).astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
        want = r.view(np.float32).copy()
        want[np.isnan(s)] = np.nan
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok].view(np.uint32), want[ok].view(np.uint32))


def test_plan_save_load_roundtrip(tmp_path):
    m = _cnn()
    plan = bfpaccel.compile(m, format="msfp16", metadata={"hello": "world"})
    p = plan.save(tmp_path / "m.bfpplan")
    plan2 = bfpaccel.load_plan(p)
    assert plan2.metadata["hello"] == "world"
    assert plan2.format == plan.format and plan2.input_names == plan.input_names
    x = RNG.standard_normal((1, 17, 19, 3)).astype(np.float32)
    a = bfpaccel.Session(plan).run(None, {"x": x})
    b = bfpaccel.Session(str(p)).run(None, {"x": x})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_plan_file_errors(tmp_path):
    plan = bfpaccel.compile(_cnn(), format="msfp16")
    p = tmp_path / "m.bfpplan"
    plan.save(p)
    data = p.read_bytes()
    (tmp_path / "trunc.bfpplan").write_bytes(data[: len(data) // 2])
    with pytest.raises(bfpaccel.PlanError, match="truncated|not a bfpaccel plan"):
        bfpaccel.load_plan(tmp_path / "trunc.bfpplan")
    (tmp_path / "junk.bfpplan").write_bytes(b"hello")
    with pytest.raises(bfpaccel.PlanError):
        bfpaccel.load_plan(tmp_path / "junk.bfpplan")
    with pytest.raises(FileNotFoundError):
        bfpaccel.load_plan(tmp_path / "nope.bfpplan")
    # a newer plan format
    import json
    import zipfile

    with zipfile.ZipFile(p) as z:
        man = json.loads(z.read("plan.json"))
        blob = z.read("consts.npz")
    man["bfpaccel_plan"] = 99
    man["bfpaccel_version"] = "9.0"
    with zipfile.ZipFile(tmp_path / "new.bfpplan", "w") as z:
        z.writestr("plan.json", json.dumps(man))
        z.writestr("consts.npz", blob)
    with pytest.raises(bfpaccel.PlanError, match="newer|upgrade"):
        bfpaccel.load_plan(tmp_path / "new.bfpplan")
    # a corrupted constant (flip one byte inside consts.npz)
    raw = bytearray(data)
    i = raw.find(b"consts.npz")
    j = len(raw) - 2000
    raw[j] ^= 0xFF
    (tmp_path / "bad.bfpplan").write_bytes(bytes(raw))
    with pytest.raises(bfpaccel.PlanError):
        bfpaccel.load_plan(tmp_path / "bad.bfpplan")


def test_unsupported_op_named_at_compile_time():
    m = _model([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("LpNormalization", ["c"], ["y"]),
                helper.make_node("Hardmax", ["y"], ["z"])],
               [("x", [1, 2, 4, 4])], ["z"], {"w": _w(2, 2, 1, 1)})
    with pytest.raises(bfpaccel.UnsupportedOpError) as e:
        bfpaccel.compile(m)
    assert "LpNormalization" in str(e.value) and "Hardmax" in str(e.value)
    assert "node" in str(e.value)


def test_bad_inputs_clear_errors():
    plan = bfpaccel.compile(_cnn(), format="msfp16")
    s = bfpaccel.Session(plan)
    with pytest.raises(ValueError, match="unknown input"):
        s.run(None, {"y": np.zeros((1, 17, 19, 3), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        s.run(None, {"x": np.zeros((1, 17, 19), np.float32)})
    with pytest.raises(ValueError, match="unknown output"):
        s.run(["nope"], {"x": np.zeros((1, 17, 19, 3), np.float32)})
    with pytest.raises(ValueError, match="missing"):
        s.run(None, {})
    with pytest.raises(ValueError, match="format"):
        bfpaccel.compile(_cnn(), format="msfp16", weight_format="mxfp8_e4m3")
    with pytest.raises(ValueError, match="vector_precision"):
        bfpaccel.compile(_cnn(), vector_precision="fp8")
    with pytest.raises(FileNotFoundError):
        bfpaccel.compile("/nonexistent/model.onnx")


@pytest.mark.parametrize("fmt", ["msfp16", "msfp12", "mxfp8_e4m3", "mxfp4_e2m1", "msfp9", "mxint8",
                                 bfpaccel.get_format("msfp14", rounding="toward_zero"),
                                 bfpaccel.get_format("msfp13", rounding="nearest_away")])
def test_depthwise_bit_exact_against_reference(kernel, fmt):
    """Depthwise convs run on a dedicated path (one-element blocks: fp32 on fake-quantized
    operands); it must equal the datapath of reference.conv2d bit for bit, NaN weights,
    subnormals and huge ranges included."""
    rng = np.random.default_rng(3)
    C = 20
    w = (rng.standard_normal((C, 1, 3, 3)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(C) * 0.1).astype(np.float32)
    w[3, 0, 1, 1] = np.nan
    m = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], group=C, pads=[1, 1, 1, 1], strides=[2, 1])],
               [("x", [2, C, 9, 8])], ["y"], {"w": w, "b": b})
    x = (rng.standard_normal((2, C, 9, 8)) * np.exp(rng.uniform(-30, 30, (2, C, 9, 8)))).astype(np.float32)
    x[0, 1, 2, 2] = 1e-42
    x[1, 2] = 0
    got = bfpaccel.Session(bfpaccel.compile(m, format=fmt, vector_precision="fp32")).run(None, {"x": x})["y"]
    want = (reference.conv2d(x, w, bfpaccel.get_format(fmt), stride=(2, 1), padding=1, groups=C)
            + b.reshape(1, -1, 1, 1)).astype(np.float32)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), int((~same).sum())


_DW_GEOMS = [  # C, H, W, k, strides, pads (top, left, bottom, right), dilations
    (37, 9, 21, 3, (1, 1), (1, 1, 1, 1), (1, 1)),   # C % 16 != 0, OW = 21 (strips of 8 + 5)
    (5, 7, 6, 3, (2, 2), (1, 1, 1, 1), (1, 1)),     # C < 16: only a masked tail
    (48, 11, 13, 5, (2, 2), (2, 1, 2, 2), (1, 1)),  # 5x5, stride 2, asymmetric padding all sides
    (19, 10, 12, 3, (1, 2), (2, 3, 1, 2), (2, 2)),  # dilation, padding wider than the kernel reach
    (33, 4, 3, 5, (1, 1), (2, 2, 2, 2), (1, 1)),    # kernel larger than the input: most taps padded
]


@pytest.mark.parametrize("vp", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("act", ["Relu", "Clip", None])
@pytest.mark.parametrize("geom", range(len(_DW_GEOMS)))
def test_depthwise_fused_epilogue_bit_exact(kernel, geom, act, vp):
    """Depthwise conv (op sub 1) + bias + residual Add + Relu/Clip in one op: odd channel
    counts, strides, padding on all sides, dilation, widths that leave strip tails; each
    vector op rounds to the vector precision exactly as the separate ops would."""
    C, H, W, k, st, pads, dil = _DW_GEOMS[geom]
    rng = np.random.default_rng(100 + geom)
    N = 2
    w = (rng.standard_normal((C, 1, k, k)) * 0.5).astype(np.float32)
    b = (rng.standard_normal(C) * 1e2).astype(np.float32)
    w[min(3, C - 1), 0, 0, 0] = np.nan  # a padded tap of a NaN weight is NaN too
    OH = (H + pads[0] + pads[2] - dil[0] * (k - 1) - 1) // st[0] + 1
    OW = (W + pads[1] + pads[3] - dil[1] * (k - 1) - 1) // st[1] + 1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=C, pads=list(pads), strides=list(st),
                              dilations=list(dil), kernel_shape=[k, k]),
             helper.make_node("Add", ["c", "r"], ["a"])]
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["a"], ["y"]))
    elif act == "Clip":
        nodes.append(helper.make_node("Clip", ["a", "lo", "hi"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", ["a"], ["y"]))
    m = _model(nodes, [("x", [N, C, H, W]), ("r", [N, C, OH, OW])], ["y"],
               {"w": w, "b": b, "lo": np.float32(-3.0), "hi": np.float32(6.0)})
    x = (rng.standard_normal((N, C, H, W)) * np.exp(rng.uniform(-6, 12, (N, C, H, W)))).astype(np.float32)
    x[0, 0, 1, 1] = 1e-41
    r = (rng.standard_normal((N, C, OH, OW)) * np.exp(rng.uniform(-20, 12, (N, C, OH, OW)))).astype(np.float32)
    r[1, 0, 0, :2] = [np.inf, -np.inf]
    plan = bfpaccel.compile(m, format="msfp16", vector_precision=vp)
    s = bfpaccel.Session(plan)
    lw = s.program({"x": x.shape, "r": r.shape})
    kinds = list(lw.program.op_kinds)
    assert -1 in kinds, kinds  # the depthwise op, with bias/residual/activation fused into it
    if act is not None:  # no separate Add / Relu / Clip (only layout transposes around it)
        assert kinds.count(-1) == 1 and not {1, 2} & set(kinds), lw.op_names
    got = s.run(None, {"x": x, "r": r})["y"]
    R = {"fp16": _fp16, "bf16": _bf16, "fp32": lambda a: a.astype(np.float32)}[vp]
    acc = reference.conv2d(x, w, bfpaccel.get_format("msfp16"), stride=st, padding=pads, dilation=dil,
                           groups=C).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = R(acc + b.reshape(1, -1, 1, 1))
        v = R(v + r)
        if act == "Relu":
            v = R(np.where(v > 0, v, np.where(np.isnan(v), v, 0)))
        elif act == "Clip":
            v = np.where(np.isnan(v), v, R(np.clip(v, -3.0, 6.0)))
    same = (got.view(np.uint32) == v.view(np.uint32)) | (np.isnan(got) & np.isnan(v))
    assert same.all(), int((~same).sum())


@pytest.mark.parametrize("fmt", ["msfp16", "mxint8", "mxfp8_e4m3", "fp32"])
def test_depthwise_large_threads_bit_exact(kernel, fmt, restore_threads):
    """A depthwise conv big enough to run in parallel (2 threads) and a plain one without
    epilogue: the same bits as the reference (or, in fp32, the sequential fp32 sum)."""
    bfpaccel.set_num_threads(2)
    rng = np.random.default_rng(7)
    C, H, W = 72, 30, 29
    w = (rng.standard_normal((C, 1, 3, 3)) * 0.3).astype(np.float32)
    w[::4] *= np.float32(2.0 ** -20)
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], group=C, pads=[0, 1, 1, 0], strides=[2, 2])],
               [("x", [1, C, H, W])], ["y"], {"w": w})
    x = (rng.standard_normal((1, C, H, W)) * np.exp(rng.uniform(-10, 10, (1, C, H, W)))).astype(np.float32)
    # tiny inputs: products that underflow round once as products, then add (not an FMA)
    x[:, ::2] = (rng.standard_normal((1, C // 2, H, W)) * np.exp(rng.uniform(-86, -78, (1, C // 2, H, W))))
    got = bfpaccel.Session(bfpaccel.compile(m, format=fmt, vector_precision="fp32")).run(None, {"x": x})["y"]
    if fmt == "fp32":  # no quantization: taps in order, fp32 products and sums
        xp = np.pad(x, ((0, 0), (0, 0), (0, 1), (1, 0)))
        want = np.zeros_like(got)
        for ky in range(3):
            for kx in range(3):
                want = (want + xp[:, :, ky:ky + 2 * got.shape[2]:2, kx:kx + 2 * got.shape[3]:2]
                        * w[:, 0, ky, kx].reshape(1, -1, 1, 1)).astype(np.float32)
    else:
        want = reference.conv2d(x, w, bfpaccel.get_format(fmt), stride=2, padding=(0, 1, 1, 0),
                                groups=C).astype(np.float32)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), int((~same).sum())


def _bf16(a: np.ndarray) -> np.ndarray:
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32).copy()
    r[np.isnan(a)] = np.nan
    return r


def _fp16(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return a.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("vp", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("act", ["Relu", "Clip", "Clip0"])
@pytest.mark.parametrize("parts", ["bias+res", "bias", "none"])
def test_fused_epilogue_bit_exact(kernel, vp, act, parts):
    """conv (+ bias) (+ residual Add) + Relu/Clip fused into one epilogue (SIMD or portable, per
    kernel) rounds after each op exactly as the separate vector ops do; a clip straight after
    the matrix unit rounds once, and a NaN keeps its bits there."""
    rng = np.random.default_rng(11)
    w, b = _w(37, 24, 1, 1), (rng.standard_normal(37) * 1e3).astype(np.float32)
    lo, hi = (0.0, 6.0) if act == "Clip0" else (-3.0, 6.0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"] if "bias" in parts else ["x", "w"], ["c"])]
    last = "c"
    if "res" in parts:
        nodes.append(helper.make_node("Add", ["c", "r"], ["a"]))
        last = "a"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", [last], ["y"]))
    else:
        nodes.append(helper.make_node("Clip", [last, "lo", "hi"], ["y"]))
    inputs = [("x", [1, 24, 5, 7])] + ([("r", [1, 37, 5, 7])] if "res" in parts else [])
    m = _model(nodes, inputs, ["y"], {"w": w, "b": b, "lo": np.float32(lo), "hi": np.float32(hi)})
    x = (rng.standard_normal((1, 24, 5, 7)) * np.exp(rng.uniform(-4, 12, (1, 24, 5, 7)))).astype(np.float32)
    x[0, :, 0, 1] = np.nan  # a NaN pixel: NaN outputs straight from the matrix unit
    r = (rng.standard_normal((1, 37, 5, 7)) * np.exp(rng.uniform(-20, 12, (1, 37, 5, 7)))).astype(np.float32)
    r[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    plan = bfpaccel.compile(m, format="msfp16", vector_precision=vp)
    feeds = {"x": x, "r": r} if "res" in parts else {"x": x}
    names = bfpaccel.Session(plan).program({k: a.shape for k, a in feeds.items()}).op_names
    assert any(n.startswith("Conv_0+") and ("Relu" in n or "Clip" in n) for n in names), names  # one fused op
    got = bfpaccel.Session(plan).run(None, feeds)["y"]
    R = {"fp16": _fp16, "bf16": _bf16, "fp32": lambda a: a.astype(np.float32)}[vp]
    acc = reference.conv2d(x, w, bfpaccel.get_format("msfp16")).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = R(acc + b.reshape(1, -1, 1, 1)) if "bias" in parts else acc
        v = R(v + r) if "res" in parts else v
        v = R(np.where(v > 0, v, np.where(np.isnan(v), v, 0))) if act == "Relu" else \
            np.where(np.isnan(v), v, R(np.clip(v, lo, hi)))
    same = (got.view(np.uint32) == v.view(np.uint32)) | (np.isnan(got) & np.isnan(v))
    assert same.all(), int((~same).sum())


@pytest.mark.parametrize("vp", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("op,k,stride,pads,dil,cip", [
    ("MaxPool", 3, 2, [1, 1, 1, 1], 1, 0),      # ResNet's pool
    ("MaxPool", 2, 1, [0, 1, 1, 0], 2, 0),      # dilated, uneven pads
    ("AveragePool", 3, 1, [1, 1, 1, 1], 1, 0),  # padding not counted
    ("AveragePool", 3, 2, [1, 0, 1, 2], 1, 1),  # padding counted
    ("MaxPool", 9, 1, [4, 4, 4, 4], 1, 0),      # a window past 8x8 (the generic loop)
    ("AveragePool", 9, 3, [0, 0, 0, 0], 1, 0),
])
def test_pooling_matches_numpy(kernel, vp, op, k, stride, pads, dil, cip):
    """Max and average pools on every kernel: the NaN-propagating max / the fp32 sum in tap order
    divided by the window's count, rounded once to the vector precision, bit for bit."""
    rng = np.random.default_rng(k * 7 + stride)
    # max pools: 104 channels, one run of 64 in registers and a tail of 40 (2 vectors and a part)
    N, C, H, W = 2, 104 if op == "MaxPool" else 40, 11, 10
    attrs = dict(kernel_shape=[k, k], strides=[stride] * 2, pads=pads)
    if op == "MaxPool":
        attrs["dilations"] = [dil] * 2
    else:
        attrs["count_include_pad"] = cip
    m = _model([helper.make_node(op, ["x"], ["y"], **attrs)], [("x", [N, C, H, W])], ["y"], {})
    x = (rng.standard_normal((N, C, H, W)) * np.exp(rng.uniform(-3, 3, (N, C, H, W)))).astype(np.float32)
    x[0, 3, 2, 2] = np.nan
    x[1, 5, 4, :] = -np.inf
    x[1, 30, 6, 5] = np.nan
    x[0, C - 3, 1, 3] = np.nan
    x[0, C - 1, 7, 7] = np.nan
    got = bfpaccel.Session(bfpaccel.compile(m, format="msfp16", vector_precision=vp)).run(None, {"x": x})["y"]
    pt, pl, pb, pr = pads[0], pads[1], pads[2], pads[3]
    OH = (H + pt + pb - dil * (k - 1) - 1) // stride + 1
    OW = (W + pl + pr - dil * (k - 1) - 1) // stride + 1
    want = np.zeros((N, C, OH, OW), np.float32)
    for oy in range(OH):
        for ox in range(OW):
            acc = np.full((N, C), -np.inf if op == "MaxPool" else 0.0, np.float32)
            cnt = 0
            for ky in range(k):
                for kx in range(k):
                    iy, ix = oy * stride - pt + ky * dil, ox * stride - pl + kx * dil
                    if 0 <= iy < H and 0 <= ix < W:
                        v = x[:, :, iy, ix]
                        acc = np.where((v > acc) | np.isnan(v), v, acc) if op == "MaxPool" else (acc + v).astype(np.float32)
                        cnt += 1
                    elif cip and -pt <= iy < H + pb and -pl <= ix < W + pr:
                        cnt += 1
            want[:, :, oy, ox] = acc if op == "MaxPool" else acc / np.float32(max(cnt, 1))
    R = {"fp16": _fp16, "bf16": _bf16, "fp32": lambda a: a.astype(np.float32)}[vp]
    with np.errstate(invalid="ignore", over="ignore"):
        want = R(want)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), int((~same).sum())


@pytest.mark.parametrize("k,stride,pads,value", [
    (3, 2, [0, 0, 1, 1, 0, 0, 1, 1], 0.0),     # TF-slim's ResNet pool1
    (3, 1, [0, 0, 0, 2, 0, 0, 1, 0], -1.5),    # uneven pads, a negative value
    (2, 2, [0, 0, 1, 0, 0, 0, 0, 1], 1e30),    # a value above every input
    (9, 1, [0, 0, 4, 4, 0, 0, 4, 4], 0.5),     # a window past 8x8 (the generic loop)
])
@pytest.mark.parametrize("vp", ["fp16", "fp32"])
def test_pad_then_max_pool_fused(kernel, k, stride, pads, value, vp):
    """A constant Pad whose only reader is a max pool becomes the pool's padding (one op, no
    padded copy): the same bits as padding with numpy and pooling; with another reader of the
    padded tensor it stays a Pad."""
    rng = np.random.default_rng(k + stride)
    N, C, H, W = 2, 24, 9, 10
    # tf2onnx's layout: an NHWC input padded on its spatial axes, transposed for the pool
    nhwc = [0, pads[2], pads[3], 0, 0, pads[6], pads[7], 0]
    nodes = [helper.make_node("Pad", ["x", "pads", "v"], ["xp"], mode="constant"),
             helper.make_node("Transpose", ["xp"], ["xt"], perm=[0, 3, 1, 2]),
             helper.make_node("MaxPool", ["xt"], ["y"], kernel_shape=[k, k], strides=[stride] * 2)]
    inits = {"pads": np.array(nhwc, np.int64), "v": np.array(value, np.float32)}
    m = _model(nodes, [("x", [N, H, W, C])], ["y"], inits)
    x = rng.standard_normal((N, H, W, C)).astype(np.float32) * 3
    x[0, 0, 0, 2] = np.nan
    x[1, :, 0, 4] = -np.inf
    sess = bfpaccel.Session(bfpaccel.compile(m, format="msfp16", vector_precision=vp))
    names = sess.program({"x": x.shape}).op_names
    assert "Pad_0+MaxPool_2" in names and "Pad_0" not in names, names
    got = sess.run(None, {"x": x})["y"]
    xp = np.pad(x.transpose(0, 3, 1, 2), [(0, 0), (0, 0), (pads[2], pads[6]), (pads[3], pads[7])],
                constant_values=np.float32(value))
    OH, OW = (xp.shape[2] - k) // stride + 1, (xp.shape[3] - k) // stride + 1
    want = np.full((N, C, OH, OW), -np.inf, np.float32)
    for oy in range(OH):
        for ox in range(OW):
            acc = want[:, :, oy, ox]
            for ky in range(k):
                for kx in range(k):
                    v = xp[:, :, oy * stride + ky, ox * stride + kx]
                    acc = np.where((v > acc) | np.isnan(v), v, acc)
            want[:, :, oy, ox] = acc
    with np.errstate(over="ignore"):
        want = _fp16(want) if vp == "fp16" else want
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), int((~same).sum())
    # the padded tensor read twice: no fusion, the same pooled bits
    m2 = _model(nodes + [helper.make_node("Neg", ["xp"], ["z"])], [("x", [N, H, W, C])], ["y", "z"], inits)
    sess2 = bfpaccel.Session(bfpaccel.compile(m2, format="msfp16", vector_precision=vp))
    assert "Pad_0" in sess2.program({"x": x.shape}).op_names
    got2 = sess2.run(None, {"x": x})["y"]
    assert np.array_equal(got2.view(np.uint32), got.view(np.uint32))


@pytest.mark.parametrize("depthwise", [False, True])
def test_fused_clip_with_min_above_max(kernel, depthwise):
    """Clip with min > max is min(max(x, min), max) (ONNX, numpy): max everywhere, NaN kept -- the
    same whether the Clip is fused into the conv's epilogue or runs alone."""
    rng = np.random.default_rng(3)
    C = 24
    w = _w(C, 1, 3, 3) if depthwise else _w(40, C, 1, 1)
    conv = helper.make_node("Conv", ["x", "w"], ["c"], group=C, pads=[1] * 4) if depthwise else \
        helper.make_node("Conv", ["x", "w"], ["c"])
    m = _model([conv, helper.make_node("Clip", ["c", "lo", "hi"], ["y"])], [("x", [1, C, 5, 6])], ["y"],
               {"w": w, "lo": np.float32(6.0), "hi": np.float32(-3.0)})
    x = rng.standard_normal((1, C, 5, 6)).astype(np.float32) * 4
    x[0, :, 2, 3] = np.nan
    plan = bfpaccel.compile(m, format="msfp16", vector_precision="fp32")
    names = bfpaccel.Session(plan).program({"x": x.shape}).op_names
    assert any("+Clip" in n for n in names), names  # fused
    got = bfpaccel.Session(plan).run(None, {"x": x})["y"]
    nan = np.isnan(got)
    assert nan.any() and (got[~nan] == np.float32(-3.0)).all()


@pytest.mark.parametrize("vp", ["fp16", "fp32"])
@pytest.mark.parametrize("O,k", [(37, 1), (160, 1), (40, 3)])
@pytest.mark.parametrize("extra_reader", [False, True])
def test_residual_add_in_place_bit_exact(kernel, vp, O, k, extra_reader, restore_threads):
    """A conv whose fused residual is read by nothing after it writes its output into the
    residual's buffer: the same bits as the reference on every kernel, for full and edge
    panels, the AMX tiles (>= 16 rows, > 128 columns), tiles routed to the exact path (tiny
    and huge pixels), NaN/Inf residuals and 2 threads; and with another reader of the
    residual after the conv."""
    bfpaccel.set_num_threads(2)
    rng = np.random.default_rng(5)
    C, H, W = 24, 6, 7
    w, b = _w(O, C, k, k), (rng.standard_normal(O) * 10).astype(np.float32)
    w[::5] *= np.float32(2.0 ** -24)  # with the tiny pixels below: products past the fast paths' range
    nodes = [helper.make_node("Relu", ["r0"], ["r"]),  # the residual: an intermediate value
             helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[k // 2] * 4),
             helper.make_node("Add", ["c", "r"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    outs = ["y"]
    if extra_reader:
        nodes.append(helper.make_node("Sub", ["y", "r"], ["z"]))  # reads the residual after the conv
        outs.append("z")
    m = _model(nodes, [("x", [1, C, H, W]), ("r0", [1, O, H, W])], outs, {"w": w, "b": b})
    x = (rng.standard_normal((1, C, H, W)) * np.exp(rng.uniform(-4, 8, (1, C, H, W)))).astype(np.float32)
    x[0, :, 1, :] *= np.float32(2.0 ** -120)  # products below the fast paths' range: exact tiles
    x[0, :, 4, 2:5] *= np.float32(2.0 ** 115)  # sums past it
    x[0, :, 3, 0] = np.nan
    r0 = (rng.standard_normal((1, O, H, W)) * np.exp(rng.uniform(-10, 12, (1, O, H, W)))).astype(np.float32)
    r0[0, 0, 0, :3] = [np.nan, np.inf, 1.0]
    plan = bfpaccel.compile(m, format="msfp16", vector_precision=vp)
    sess = bfpaccel.Session(plan)
    feeds = {"x": x, "r0": r0}
    lw = sess.program({n: a.shape for n, a in feeds.items()})
    fused = [n for n in lw.op_names if n.startswith("Conv_1+")]
    assert fused and "Add" in fused[0], lw.op_names
    fuses = bfpaccel._core.kernel_fuses_epilogue()
    if not extra_reader:
        assert lw.in_place == (fused if fuses else []), lw.in_place
    got = sess.run(None, feeds)
    if not fuses:  # a program lowered for a kernel that fuses (residual in place) run on this one
        bfpaccel.set_kernel("scalar")
        lw2 = bfpaccel.Session(plan).program({n: a.shape for n, a in feeds.items()})
        bfpaccel.set_kernel(kernel)
        assert lw2.in_place == fused or extra_reader, lw2.in_place
        got2 = lw2.run(feeds, ["y"])["y"]
        assert np.array_equal(got2.view(np.uint32), got["y"].view(np.uint32))
    R = {"fp16": _fp16, "fp32": lambda a: a.astype(np.float32)}[vp]
    with np.errstate(invalid="ignore", over="ignore"):
        r = R(np.where(r0 > 0, r0, np.where(np.isnan(r0), r0, 0)))
        acc = reference.conv2d(x, w, bfpaccel.get_format("msfp16"), padding=(k // 2,) * 4).astype(np.float32)
        v = R(R(acc + b.reshape(1, -1, 1, 1)) + r)
        v = R(np.where(v > 0, v, np.where(np.isnan(v), v, 0)))
    same = (got["y"].view(np.uint32) == v.view(np.uint32)) | (np.isnan(got["y"]) & np.isnan(v))
    assert same.all(), int((~same).sum())
    if extra_reader:
        with np.errstate(invalid="ignore", over="ignore"):
            z = R(got["y"] - r)
        np.testing.assert_array_equal(got["z"].view(np.uint32), z.view(np.uint32))


@pytest.mark.parametrize("kernel", bfpaccel.available_kernels())
def test_batch_rows_equal_batch_one(kernel):
    """A batch runs every image's pixels as rows of one GEMM per conv: each row of a batch
    of 3 is bit-identical to that image run alone, on every kernel."""
    plan = bfpaccel.compile(_cnn(), format="msfp16")
    sess = bfpaccel.Session(plan, kernel=kernel)
    x = RNG.standard_normal((3, 17, 19, 3)).astype(np.float32)
    batch = sess.run(None, {"x": x})
    for i in range(3):
        one = sess.run(None, {"x": x[i:i + 1]})
        for name, y in one.items():
            np.testing.assert_array_equal(batch[name][i:i + 1].view(np.uint32), y.view(np.uint32),
                                          err_msg=f"{kernel} {name} image {i}")


@pytest.mark.parametrize("pads,value", [
    ([0, 1, 2, 0, 0, 1, 0, 3], 0.0),      # NCHW: channels, rows and columns padded
    ([0, 0, -1, 2, 0, 0, 1, -2], 1.5),    # negative pads crop rows and columns
    ([1, 0, 0, 0, 0, 0, 0, 0], -2.0),     # a whole new image of the pad value
    ([0, 0, -3, 0, 0, 0, 0, 0], 0.0),     # every row cropped away from one side
])
def test_pad_constant_matches_numpy(pads, value):
    """Pad (constant mode): each output row written once (pad value, the input row's part, pad
    value), positive and negative pads on every axis, as numpy.pad plus slicing."""
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    m = _model([helper.make_node("Pad", ["x", "pads", "v"], ["y"], mode="constant")], [("x", list(x.shape))], ["y"],
               {"pads": np.array(pads, np.int64), "v": np.array(value, np.float32)})
    got = bfpaccel.Session(bfpaccel.compile(m, format="fp32")).run(None, {"x": x})["y"]
    r = len(x.shape)
    lo, hi = pads[:r], pads[r:]
    want = np.pad(x, [(max(a, 0), max(b, 0)) for a, b in zip(lo, hi)], constant_values=value)
    want = want[tuple(slice(-min(a, 0), want.shape[i] + min(b, 0)) for i, (a, b) in enumerate(zip(lo, hi)))]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(4))))
def test_transpose_every_perm_matches_numpy(perm):
    """Transposes of a 4-D tensor (wide enough on every axis for the tiled path of the strided
    copy: NCHW <-> NHWC with many channels), as numpy.transpose, bit for bit."""
    x = RNG.standard_normal((2, 37, 6, 40)).astype(np.float32)
    m = _model([helper.make_node("Transpose", ["x"], ["t"], perm=list(perm)),
                helper.make_node("Relu", ["t"], ["y"])], [("x", list(x.shape))], ["y"], {})
    got = bfpaccel.Session(bfpaccel.compile(m, format="fp32")).run(None, {"x": x})["y"]
    np.testing.assert_array_equal(got, np.maximum(np.transpose(x, perm), 0))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("C,k,H,W,O", [
    (160, 3, 5, 7, 37),     # K = 1440: the kernel runs K in chunks; a 5-column panel, a 5-row tile
    (2048, 1, 3, 5, 70),    # a 1x1 conv with K = 2048, 15 rows, a 6-column panel
    (40, 1, 9, 11, 70),     # short K: row tiles run over all the panels in turn (99 rows)
    (512, 3, 5, 7, 256),    # 1.5 MB of panels: all 6 row tiles in one group, one pass over the weights
])
def test_long_k_conv_bit_exact(kernel, restore_threads, threads, C, k, H, W, O):
    """Convs whose K the SIMD kernel splits into chunks (accumulators resumed from the output),
    and short-K convs whose row tiles run over all the panels in turn, give the datapath's bits: with a fused bias + residual + ReLU epilogue, row tiles whose
    exponents send them to the exact path (extreme input rows), edge panels and short tiles."""
    bfpaccel.set_num_threads(threads)
    _check_long_k_conv(C, k, H, W, O)


@pytest.mark.parametrize("kname", VNNI_KERNELS)
@pytest.mark.parametrize("C,k,H,W,O", [(160, 3, 5, 7, 37), (40, 1, 9, 11, 70), (512, 3, 5, 7, 256)])
def test_long_k_conv_tile_heights(kname, tile_scaling, restore_threads, C, k, H, W, O):
    """The same convs on the AVX-512 tiles of both heights (6 rows with fma scaling, 5 with the add
    pipes): chunked K, row tiles over all panels with the batched epilogue, one pass over large
    weights, and the exact path's tiles, at 1 and 2 threads."""
    bfpaccel.set_kernel(kname)
    try:
        for threads in (1, 2):
            bfpaccel.set_num_threads(threads)
            _check_long_k_conv(C, k, H, W, O)
    finally:
        bfpaccel.set_kernel(None)


def _check_long_k_conv(C: int, k: int, H: int, W: int, O: int) -> None:
    rng = np.random.default_rng(C + O)
    w, b = _w(O, C, k, k), (rng.standard_normal(O) * 10).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[k // 2] * 4),
             helper.make_node("Add", ["c", "r"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    x = (rng.standard_normal((1, C, H, W)) * np.exp(rng.uniform(-3, 3, (1, C, H, W)))).astype(np.float32)
    w[3] *= np.float32(2.0 ** 105)   # with the large pixel: tiles past the fast path's range (exact path)
    x[0, :, 1, 2] *= np.float32(2.0 ** 20)
    x[0, :, 2, 0] *= np.float32(2.0 ** -100)
    m = _model(nodes, [("x", [1, C, H, W]), ("r", [1, O, H, W])], ["y"], {"w": w, "b": b})
    r = rng.standard_normal((1, O, H, W)).astype(np.float32)
    plan = bfpaccel.compile(m, format="msfp16", vector_precision="fp32")
    got = bfpaccel.Session(plan).run(None, {"x": x, "r": r})["y"]
    acc = reference.conv2d(x, w, bfpaccel.get_format("msfp16"), padding=k // 2).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        want = np.maximum((acc + b.reshape(1, -1, 1, 1)) + r, np.float32(0))
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), int((~same).sum())


@pytest.mark.parametrize("k,stride,dil,pad", [(3, 2, 1, 1), (7, 2, 1, 3), (3, 1, 2, 2), (5, 1, 1, 2), (1, 2, 1, 0)])
def test_window_exponent_range_routes_exact_tiles(kernel, k, stride, dil, pad):
    """Strided, dilated and padded convs whose windows hold large and tiny input pixels, against a
    huge and a tiny output channel (the window's exponent range picks each tile's path): every
    output equals the datapath's bits."""
    rng = np.random.default_rng(k * 31 + stride * 7 + dil)
    C, O, H, W = 16, 40, 13, 11
    w = _w(O, C, k, k)
    w[3] *= np.float32(2.0 ** 105)
    w[5] *= np.float32(2.0 ** -30)   # with the tiny pixels: products near the subnormal range
    x = rng.standard_normal((1, C, H, W)).astype(np.float32)
    for yy, xx in [(0, 0), (4, 7), (12, 10), (6, 0), (9, 5)]:
        x[0, :, yy, xx] *= np.float32(2.0 ** 20)
    for yy, xx in [(2, 3), (8, 8), (11, 1), (0, 9), (5, 5)]:
        x[0, :, yy, xx] *= np.float32(2.0 ** -100)
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[pad] * 4, strides=[stride] * 2,
                                 dilations=[dil] * 2)], [("x", [1, C, H, W])], ["y"], {"w": w})
    got = bfpaccel.Session(bfpaccel.compile(m, format="msfp16", vector_precision="fp32")).run(None, {"x": x})["y"]
    want = reference.conv2d(x, w, bfpaccel.get_format("msfp16"), stride=stride, padding=pad,
                            dilation=dil).astype(np.float32)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), int((~same).sum())
