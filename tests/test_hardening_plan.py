"""Malformed, forged and zip-bomb plan files: every one is a PlanError at load that names the
problem, never another exception type, a crash, a huge allocation or a wrong result at run time.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
import zlib
from typing import Any, Callable, Dict, Optional

import numpy as np
import pytest

import bfpaccel
from bfpaccel.runtime.plan import PLAN_FORMAT_VERSION, PlanError

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

RNG = np.random.default_rng(7)


def _tiny_onnx():
    w = (RNG.standard_normal((8, 4, 3, 3)) * 0.2).astype(np.float32)
    inits = {"w": w, "b": RNG.standard_normal(8).astype(np.float32),
             "fc": (RNG.standard_normal((72, 10)) * 0.1).astype(np.float32),
             "fcb": RNG.standard_normal(10).astype(np.float32), "shape": np.array([0, -1], np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Transpose", ["p"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["t", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=-1),
    ]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                          [helper.make_empty_tensor_value_info("prob")],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    return m


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(path of a good msfp16 plan, its manifest, its consts.npz bytes, a reference output)."""
    d = tmp_path_factory.mktemp("plans")
    plan = bfpaccel.compile(_tiny_onnx(), format="msfp16")
    p = plan.save(str(d / "good.bfpplan"))
    with zipfile.ZipFile(p) as z:
        man = json.loads(z.read("plan.json"))
        blob = z.read("consts.npz")
    x = RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)
    want = bfpaccel.Session(plan).run(None, {"x": x})["prob"]
    return p, man, blob, x, want


def _write(path, manifest: Any, blob: bytes, *, sha: Optional[bool] = True, raw: Optional[bytes] = None,
           extra: Optional[Dict[str, bytes]] = None, compress: int = zipfile.ZIP_STORED) -> str:
    data = raw if raw is not None else json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        z.writestr("plan.json", data)
        if sha:
            z.writestr("plan.json.sha256", hashlib.sha256(data).hexdigest())
        z.writestr("consts.npz", blob)
        for k, v in (extra or {}).items():
            z.writestr(k, v)
    return str(path)


def _node(man, op):
    return next(n for n in man["nodes"] if n["op"] == op)


def _const_of(man, op, suffix):
    n = _node(man, op)
    return n["attrs"]["qweight"] + suffix


def _drop(d, k):
    d = dict(d)
    del d[k]
    return d


def _set(path_fn: Callable[[dict], Any]) -> Callable[[dict], dict]:
    def edit(man):
        m = copy.deepcopy(man)
        path_fn(m)
        return m
    return edit


def _attr(op, key, value):
    return _set(lambda m: _node(m, op)["attrs"].__setitem__(key, value))


# (case id, edit of the manifest, what the message must say)
MANIFEST_CASES = [
    ("list", lambda m: [], "bfpaccel plan"),
    ("null", lambda m: None, "bfpaccel plan"),
    ("number", lambda m: 42, "bfpaccel plan"),
    ("string", lambda m: "plan", "bfpaccel plan"),
    ("no-version", lambda m: _drop(m, "bfpaccel_plan"), "format version"),
    ("version-str", _set(lambda m: m.__setitem__("bfpaccel_plan", "2")), "bfpaccel_plan"),
    ("version-bool", _set(lambda m: m.__setitem__("bfpaccel_plan", True)), "bfpaccel_plan"),
    ("version-0", _set(lambda m: m.__setitem__("bfpaccel_plan", 0)), "bfpaccel_plan"),
    ("missing-nodes", lambda m: _drop(m, "nodes"), "'nodes'"),
    ("missing-consts", lambda m: _drop(m, "consts"), "'consts'"),
    ("missing-format", lambda m: _drop(m, "format"), "'format'"),
    ("missing-inputs", lambda m: _drop(m, "inputs"), "'inputs'"),
    ("missing-outputs", lambda m: _drop(m, "outputs"), "'outputs'"),
    ("missing-vp", lambda m: _drop(m, "vector_precision"), "'vector_precision'"),
    ("consts-list", _set(lambda m: m.__setitem__("consts", list(m["consts"].items()))), "consts"),
    ("nodes-dict", _set(lambda m: m.__setitem__("nodes", {"a": 1})), "nodes"),
    ("node-null", _set(lambda m: m["nodes"].__setitem__(0, None)), "nodes[0]"),
    ("node-op-int", _set(lambda m: m["nodes"][0].__setitem__("op", 7)), "op"),
    ("node-unknown-op", _set(lambda m: m["nodes"][0].__setitem__("op", "Frobnicate")), "Frobnicate"),
    ("node-inputs-str", _set(lambda m: m["nodes"][0].__setitem__("inputs", "x")), "inputs"),
    ("node-attrs-list", _set(lambda m: m["nodes"][0].__setitem__("attrs", [])), "attrs"),
    ("node-no-outputs", _set(lambda m: m["nodes"][0].__setitem__("outputs", [])), "output"),
    ("inputs-dict", _set(lambda m: m.__setitem__("inputs", {})), "inputs"),
    ("input-string-dtype", _set(lambda m: m["inputs"][0].__setitem__("dtype", "string")), "graph input must be one of"),
    ("input-neg-shape", _set(lambda m: m["inputs"][0].__setitem__("shape", [None, -4, 6, 6])), "shape"),
    ("metadata-list", _set(lambda m: m.__setitem__("metadata", [])), "metadata"),
    ("metadata-int", _set(lambda m: m.__setitem__("metadata", {"k": 1})), "metadata"),
    ("seed-negative", _set(lambda m: m.__setitem__("seed", -1)), "seed"),
    ("seed-str", _set(lambda m: m.__setitem__("seed", "0")), "seed"),
    ("opset-0", _set(lambda m: m.__setitem__("opset", 0)), "opset"),
    ("vector-precision-fp8", _set(lambda m: m.__setitem__("vector_precision", "fp8")), "vector_precision"),
    ("format-unknown", _set(lambda m: m.__setitem__("format", {"name": "msfp99"})), "msfp99"),
    ("format-list", _set(lambda m: m.__setitem__("format", ["msfp16"])), "format"),
    ("format-block-0", _set(lambda m: m.__setitem__("weight_format", {"block": 0, "shared_exp_bits": 8,
                                                                       "element": "int7"})), "block"),
    ("format-bad-element", _set(lambda m: m.__setitem__("format", {"block": 16, "shared_exp_bits": 8,
                                                                    "element": "int99"})), "element"),
    ("format-mismatch", _set(lambda m: m.__setitem__("weight_format", {"name": "mxfp8_e4m3"})), "block size"),
    ("format-fp16", _set(lambda m: m.__setitem__("format", {"name": "fp16"})), "fp32"),
    ("conv-strides-0", _attr("Conv", "strides", [0, 0]), "strides"),
    ("conv-strides-1", _attr("Conv", "strides", [1]), "strides"),
    ("conv-strides-str", _attr("Conv", "strides", "1,1"), "strides"),
    ("conv-dilations-0", _attr("Conv", "dilations", [0, 1]), "dilations"),
    ("conv-pads-negative", _attr("Conv", "pads", [-1, 0, 0, 0]), "pads"),
    ("conv-group-0", _attr("Conv", "group", 0), "group"),
    ("conv-group-3", _attr("Conv", "group", 3), "group"),
    ("conv-auto-pad", _attr("Conv", "auto_pad", "SAME_SIDEWAYS"), "auto_pad"),
    ("conv-weight-shape-big", _attr("Conv", "weight_shape", [8, 4, 30, 3]), "weight_shape"),
    ("conv-weight-shape-3d", _attr("Conv", "weight_shape", [8, 4, 3]), "weight_shape"),
    ("conv-missing-weight-shape", _set(lambda m: _node(m, "Conv")["attrs"].pop("weight_shape")), "weight_shape"),
    ("conv-missing-weight", _set(lambda m: _node(m, "Conv")["attrs"].pop("qweight")), "missing weight"),
    ("conv-weight-const-gone", _attr("Conv", "qweight", "nope/Wq"), "missing weight"),
    ("conv-fweight-in-bfp-plan", _attr("Conv", "fweight", "b"), "qweight"),
    ("conv-kernel-shape", _attr("Conv", "kernel_shape", [5, 5]), "kernel_shape"),
    ("conv-weight-input", _set(lambda m: _node(m, "Conv")["inputs"].__setitem__(1, "b")), "input 1"),
    ("conv-bias-size", _set(lambda m: _node(m, "Conv")["inputs"].__setitem__(2, _node(m, "BfpDense")["inputs"][2])),
     "bias"),
    ("dense-weight-shape-4096", _set(lambda m: _node(m, "BfpDense")["attrs"]["weight_shape"].__setitem__(0, 4096)),
     "weight_shape"),
    ("dense-weight-shape-1e6", _set(lambda m: _node(m, "BfpDense")["attrs"]["weight_shape"].__setitem__(0, 10 ** 6)),
     "weight_shape"),
    ("dense-weight-shape-K", _set(lambda m: _node(m, "BfpDense")["attrs"]["weight_shape"].__setitem__(1, 7200)),
     "weight_shape"),
    ("dense-strides", _attr("BfpDense", "strides", [2, 2]), "dense layer"),
    ("pool-kernel-0", _attr("MaxPool", "kernel_shape", [0, 2]), "kernel_shape"),
    ("pool-no-kernel", _set(lambda m: _node(m, "MaxPool")["attrs"].pop("kernel_shape")), "kernel_shape"),
    ("pool-strides-0", _attr("MaxPool", "strides", [0, 0]), "strides"),
    ("pool-pads-too-big", _attr("MaxPool", "pads", [2, 2, 2, 2]), "pads"),
    ("pool-ceil-mode", _attr("MaxPool", "ceil_mode", 7), "ceil_mode"),
    ("transpose-not-perm", _attr("Transpose", "perm", [0, 0, 1, 2]), "permutation"),
    ("softmax-axis-str", _attr("Softmax", "axis", "last"), "axis"),
    ("reshape-one-input", _set(lambda m: _node(m, "Reshape")["inputs"].pop()), "inputs"),
    ("undefined-input", _set(lambda m: _node(m, "Relu")["inputs"].__setitem__(0, "ghost")), "ghost"),
    ("out-of-order", _set(lambda m: m["nodes"].reverse()), "earlier node"),
    ("defined-twice", _set(lambda m: _node(m, "Relu")["outputs"].__setitem__(0, "x")), "already defined"),
    ("undefined-output", _set(lambda m: m["outputs"][0].__setitem__("name", "ghost")), "ghost"),
    ("no-outputs", _set(lambda m: m.__setitem__("outputs", [])), "output"),
    ("const-dtype-object", _set(lambda m: next(iter(m["consts"].values())).__setitem__("dtype", "object")), "dtype"),
    ("const-shape-negative", _set(lambda m: next(iter(m["consts"].values())).__setitem__("shape", [-1])), "shape"),
    ("const-sha-bad", _set(lambda m: next(iter(m["consts"].values())).__setitem__("sha256", "xyz")), "sha256"),
    ("const-info-list", _set(lambda m: m["consts"].__setitem__(next(iter(m["consts"])), [1])), "consts"),
    ("codes-dtype", _set(lambda m: m["consts"][_const_of(m, "Conv", ".codes")].__setitem__("dtype", "uint8")),
     "codes"),
    ("exps-shape", _set(lambda m: m["consts"][_const_of(m, "Conv", ".exps")].__setitem__("shape", [8, 4, 3, 3])),
     "exps"),
]


@pytest.mark.parametrize("case,edit,match", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_malformed_manifest_is_a_plan_error(good, tmp_path, case, edit, match):
    _, man, blob, _, _ = good
    p = _write(tmp_path / f"{case}.bfpplan", edit(man), blob)
    with pytest.raises(PlanError) as e:
        bfpaccel.load_plan(p)
    assert match.lower() in str(e.value).lower(), str(e.value)
    assert str(e.value).startswith(p)


RAW_CASES = [
    ("invalid-utf8", b'{"bfpaccel_plan": 2, "name": "\xff\xfe"}', "UTF-8"),
    ("not-json", b"{nodes: ", "JSON"),
    ("deep-nesting", b"[" * 200000 + b"]" * 200000, "nested"),
    ("empty", b"", "JSON"),
]


@pytest.mark.parametrize("case,raw,match", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_unparsable_manifest_is_a_plan_error(good, tmp_path, case, raw, match):
    _, _, blob, _, _ = good
    p = _write(tmp_path / f"{case}.bfpplan", None, blob, raw=raw)
    with pytest.raises(PlanError, match=match):
        bfpaccel.load_plan(p)


def test_manifest_checksum(good, tmp_path):
    path, man, blob, x, want = good
    assert PLAN_FORMAT_VERSION == 2
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["consts.npz", "plan.json", "plan.json.sha256"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        raw = z.read("plan.json")
        assert z.read("plan.json.sha256").decode().strip() == hashlib.sha256(raw).hexdigest()
    # an edit that keeps plan.json valid but leaves its checksum stale
    edited = raw.replace(b'"seed": 0', b'"seed": 1')
    assert edited != raw
    with zipfile.ZipFile(tmp_path / "stale.bfpplan", "w") as z:
        z.writestr("plan.json", edited)
        z.writestr("plan.json.sha256", hashlib.sha256(raw).hexdigest())
        z.writestr("consts.npz", blob)
    with pytest.raises(PlanError, match="plan.json is corrupted"):
        bfpaccel.load_plan(tmp_path / "stale.bfpplan")
    # format 2 without its checksum member
    with pytest.raises(PlanError, match="plan.json.sha256"):
        bfpaccel.load_plan(_write(tmp_path / "nosha.bfpplan", man, blob, sha=False))
    # a format 1 file (before the checksum existed) still loads and runs the same
    old = dict(man, bfpaccel_plan=1)
    p1 = _write(tmp_path / "v1.bfpplan", old, blob, sha=False)
    got = bfpaccel.Session(bfpaccel.load_plan(p1)).run(None, {"x": x})["prob"]
    np.testing.assert_array_equal(got, want)
    # a newer format is refused with the upgrade message, checksum or not
    with pytest.raises(PlanError, match="upgrade bfpaccel"):
        bfpaccel.load_plan(_write(tmp_path / "v9.bfpplan", dict(man, bfpaccel_plan=9), blob, sha=False))


def test_good_plan_still_loads_and_runs(good):
    path, _, _, x, want = good
    got = bfpaccel.Session(bfpaccel.load_plan(path)).run(None, {"x": x})["prob"]
    np.testing.assert_array_equal(got, want)


def _npz(arrays: Dict[str, np.ndarray], compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as z:
        for k, a in arrays.items():
            b = io.BytesIO()
            np.lib.format.write_array(b, a)
            z.writestr(k + ".npy", b.getvalue())
    return buf.getvalue()


def _arrays(blob: bytes) -> Dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob)) as npz:
        return {k: npz[k] for k in npz.files}


def test_array_header_checked_before_reading(good, tmp_path):
    _, man, blob, _, _ = good
    arrays = _arrays(blob)
    # c0 replaced by an array the manifest does not describe (a big one, deflated to little)
    bomb = dict(arrays, c0=np.zeros(16 << 20, np.float32))  # 64 MiB of zeros, ~64 KiB deflated
    p = _write(tmp_path / "bomb.bfpplan", man, _npz(bomb, zipfile.ZIP_DEFLATED))
    assert os.path.getsize(p) < 1 << 20
    with pytest.raises(PlanError, match="declares"):
        bfpaccel.load_plan(p)
    # same size and shape, other dtype: the header is refused before the data is read
    name0 = next(iter(man["consts"]))
    a0 = arrays["c0"]
    other = a0.view(np.uint8 if a0.dtype != np.uint8 else np.int8).reshape(-1)[: a0.size]
    p = _write(tmp_path / "dtype.bfpplan", man, _npz(dict(arrays, c0=other.astype(np.float64)[: a0.size // 2])))
    with pytest.raises(PlanError, match=f"{name0!r}|c0"):
        bfpaccel.load_plan(p)
    # a big-endian copy of the same numbers
    p = _write(tmp_path / "endian.bfpplan", man, _npz(dict(arrays, c0=a0.astype(a0.dtype.newbyteorder(">")))))
    if a0.dtype.itemsize > 1:
        with pytest.raises(PlanError, match="stored as"):
            bfpaccel.load_plan(p)
    # an array too few and one too many
    short = dict(arrays)
    short.pop(f"c{len(arrays) - 1}")
    with pytest.raises(PlanError, match="arrays|missing"):
        bfpaccel.load_plan(_write(tmp_path / "short.bfpplan", man, _npz(short)))
    with pytest.raises(PlanError, match="unexpected member|members"):
        bfpaccel.load_plan(_write(tmp_path / "long.bfpplan", man, _npz(dict(arrays, extra=a0))))
    # a pickled (object) array is refused without unpickling
    with pytest.raises(PlanError):
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        fake = _npz(arrays)
        zb = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(fake)) as zi, zipfile.ZipFile(zb, "w") as zo:
            for info in zi.infolist():
                zo.writestr(info.filename, buf.getvalue() if info.filename == "c0.npy" else zi.read(info))
        bfpaccel.load_plan(_write(tmp_path / "pickle.bfpplan", man, zb.getvalue()))


def test_zip_members_sizes_checked(good, tmp_path):
    _, man, blob, _, _ = good
    # plan.json itself a deflate bomb (well-formed JSON padded with 200 MiB of spaces)
    raw = json.dumps(man).encode() + b" " * (200 << 20)
    p = tmp_path / "manifest-bomb.bfpplan"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("plan.json", raw)
        z.writestr("plan.json.sha256", hashlib.sha256(raw).hexdigest())
        z.writestr("consts.npz", blob)
    assert os.path.getsize(p) < 2 << 20
    t = time.perf_counter()
    with pytest.raises(PlanError, match="plan.json declares"):
        bfpaccel.load_plan(p)
    assert time.perf_counter() - t < 2
    # consts.npz bigger than the manifest's constants can need
    padded = _npz(dict(_arrays(blob), **{}))
    big = _write(tmp_path / "big-npz.bfpplan", man, padded + b"\0" * (4 << 20))
    with pytest.raises(PlanError, match="consts.npz declares"):
        bfpaccel.load_plan(big)
    # a compressed member that expands more than the ratio allows (a consistent manifest whose
    # constant is 64 MiB of zeros, stored in a file of some KiB)
    m2 = copy.deepcopy(man)
    zeros = np.zeros(16 << 20, np.float32)
    m2["consts"]["unused"] = {"dtype": "float32", "shape": [16 << 20],
                              "sha256": hashlib.sha256(zeros.tobytes()).hexdigest()}
    arrays = dict(_arrays(blob), **{f"c{len(man['consts'])}": zeros})
    with pytest.raises(PlanError, match="zip bomb|expands"):
        bfpaccel.load_plan(_write(tmp_path / "ratio.bfpplan", m2, _npz(arrays, zipfile.ZIP_DEFLATED)))
    # an unexpected member in the plan zip
    with pytest.raises(PlanError, match="evil.py"):
        bfpaccel.load_plan(_write(tmp_path / "extra.bfpplan", man, blob, extra={"evil.py": b"x"}))


_CHILD = textwrap.dedent("""
    import sys, numpy as np, bfpaccel
    try:
        plan = bfpaccel.load_plan(sys.argv[1])
    except bfpaccel.PlanError as e:
        print("PlanError:", e)
        sys.exit(0)
    y = bfpaccel.Session(plan).run(None, {"x": np.ones((1, 4, 6, 6), np.float32)})
    print("RAN", {k: v.shape for k, v in y.items()})
    sys.exit(1)
""")


@pytest.mark.parametrize("rows", [4096, 10 ** 6])
def test_forged_dense_weight_shape_fails_at_load_in_a_subprocess(good, tmp_path, rows):
    """Issue 9 defect 2: a BfpDense weight_shape larger than its stored codes used to read past
    the buffer (garbage at 4,096 rows, SIGSEGV at 10**6). Now: a PlanError at load."""
    _, man, blob, _, _ = good
    m = copy.deepcopy(man)
    _node(m, "BfpDense")["attrs"]["weight_shape"][0] = rows
    for out in m["outputs"]:
        out["shape"] = None
    p = _write(tmp_path / f"dense{rows}.bfpplan", m, blob)
    r = subprocess.run([sys.executable, "-c", _CHILD, p], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "PlanError" in r.stdout and "weight_shape" in r.stdout and "Traceback" not in r.stderr


def test_many_malformed_cases_counted():
    """Keeps the number of malformed-plan cases visible (reported with the change)."""
    assert len(MANIFEST_CASES) + len(RAW_CASES) >= 80


def test_save_refuses_constants_a_plan_cannot_store(tmp_path):
    plan = bfpaccel.compile(_tiny_onnx(), format="fp32")
    plan.graph.consts["odd"] = np.array(["a", "b"])
    with pytest.raises(PlanError, match="'odd'"):
        plan.save(tmp_path / "odd.bfpplan")
    assert not os.path.exists(tmp_path / "odd.bfpplan")


def test_shape_dependent_mismatch_is_a_lowering_error(good, tmp_path):
    """What only the input shapes reveal (a valid permutation of the wrong rank) is a
    LoweringError naming the node when the program is built, not an IndexError."""
    _, man, blob, x, _ = good
    m = copy.deepcopy(man)
    _node(m, "Transpose")["attrs"]["perm"] = [0, 2, 1]
    plan = bfpaccel.load_plan(_write(tmp_path / "rank.bfpplan", m, blob))
    from bfpaccel.runtime import LoweringError

    with pytest.raises(LoweringError, match="node "):
        bfpaccel.Session(plan).run(None, {"x": x})
