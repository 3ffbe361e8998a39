"""Options per session (``Session(plan, num_threads=, kernel=)``, as onnxruntime's
SessionOptions): they apply to that session's calls only, in any thread, and never change the
process defaults; ``Session.profile_summary`` and ``bfpaccel profile``; the server's and
``bfpaccel serve``'s ``--kernel`` / ``--threads`` per loaded model session."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Dict

import numpy as np
import pytest

import bfpaccel
from bfpaccel import _core
from bfpaccel.runtime import ProfileSummary

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

RNG = np.random.default_rng(7)
KERNELS = bfpaccel.available_kernels()


def _w(*shape: int, scale: float = 0.2) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _model_bytes() -> bytes:
    """Conv + relu, depthwise conv, residual add, max pool, a transposed slice, Gemm, softmax."""
    inits = {"w1": _w(16, 3, 3, 3), "b1": _w(16), "wd": _w(16, 1, 3, 3), "bd": _w(16), "w2": _w(16, 16, 1, 1),
             "fc": _w(16, 10), "fcb": _w(10), "shape": np.array([0, -1], np.int64),
             "st": np.array([0], np.int64), "en": np.array([3], np.int64), "ax": np.array([3], np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["dw"], pads=[1, 1, 1, 1], group=16),
        helper.make_node("Conv", ["dw", "w2"], ["c2"]),
        helper.make_node("Add", ["c2", "r1"], ["a2"]),
        helper.make_node("MaxPool", ["a2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Transpose", ["p"], ["pt"], perm=[0, 2, 3, 1]),
        helper.make_node("Slice", ["pt", "st", "en", "ax"], ["sl"]),
        helper.make_node("ReduceMean", ["p"], ["gap"], axes=[2, 3], keepdims=1),
        helper.make_node("Reshape", ["gap", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=-1),
    ]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                          [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 10]),
                           helper.make_tensor_value_info("sl", TensorProto.FLOAT, ["N", 6, 6, 3])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    return m.SerializeToString()


@pytest.fixture(scope="module")
def plan() -> bfpaccel.Plan:
    return bfpaccel.compile(_model_bytes(), format="msfp16")


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("m") / "m.onnx"
    p.write_bytes(_model_bytes())
    return str(p)


@pytest.fixture
def x() -> Dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((2, 3, 12, 12)).astype(np.float32)}


@pytest.fixture(autouse=True)
def process_defaults_untouched():
    """Every test here must leave the process defaults exactly as it found them."""
    k, t = bfpaccel.get_kernel(), bfpaccel.get_num_threads()
    yield
    assert (bfpaccel.get_kernel(), bfpaccel.get_num_threads()) == (k, t)


def _same_bits(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k].view(np.uint32), b[k].view(np.uint32), err_msg=k)


def _program_kernels(sess: bfpaccel.Session) -> set:
    return {k for k, _ in sess._programs}


# ----- options per session -------------------------------------------------------------
def test_two_sessions_two_kernels_same_bits(plan, x):
    default_kernel, default_threads = bfpaccel.get_kernel(), bfpaccel.get_num_threads()
    scalar = bfpaccel.Session(plan, kernel="scalar", num_threads=1)
    fast = bfpaccel.Session(plan)
    assert (scalar.kernel, scalar.num_threads) == ("scalar", 1)
    assert (fast.kernel, fast.num_threads) == (default_kernel, default_threads)
    _same_bits(scalar.run(None, x), fast.run(None, x))
    # each lowered (and packed its weights) with its own kernel
    assert _program_kernels(scalar) == {"scalar"} and _program_kernels(fast) == {default_kernel}
    assert (bfpaccel.get_kernel(), bfpaccel.get_num_threads()) == (default_kernel, default_threads)


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_as_a_session_option(plan, x, kernel):
    want = bfpaccel.Session(plan, kernel="scalar").run(None, x)
    s = bfpaccel.Session(plan, kernel=kernel, num_threads=2)
    assert s.kernel == kernel and s.num_threads == 2
    _same_bits(s.run(None, x), want)


def test_num_threads_no_longer_process_wide(plan, x):
    before = bfpaccel.get_num_threads()
    other = 1 if before != 1 else 2
    s = bfpaccel.Session(plan, num_threads=other)
    s.run(None, x)
    assert s.num_threads == other and bfpaccel.get_num_threads() == before
    assert bfpaccel.Predictor(plan, num_threads=other, kernel=" SCALAR ").session.kernel == "scalar"
    assert bfpaccel.get_num_threads() == before


def test_unset_options_follow_the_process_default(plan, x):
    s = bfpaccel.Session(plan)
    want = s.run(None, x)
    bfpaccel.set_kernel("scalar")
    try:
        assert s.kernel == "scalar"
        _same_bits(s.run(None, x), want)  # a program for the new kernel, not weights packed for another
        assert "scalar" in _program_kernels(s)
    finally:
        bfpaccel.set_kernel(None)
    assert s.kernel == bfpaccel.get_kernel()


def test_session_inside_exec_options_keeps_its_own(plan, x):
    s = bfpaccel.Session(plan, kernel="scalar")
    with _core.ExecOptions(KERNELS[-1], 1):
        s.run(None, x)
        assert s.kernel == "scalar"
        assert bfpaccel.get_kernel() == KERNELS[-1]  # the caller's scope is back after the call
    assert _program_kernels(s) == {"scalar"}


def test_sessions_with_different_kernels_in_two_threads(plan, x):
    default_kernel = bfpaccel.get_kernel()
    scalar = bfpaccel.Session(plan, kernel="scalar", num_threads=1)
    fast = bfpaccel.Session(plan)
    want = fast.run(None, x)
    out: Dict[str, list] = {"scalar": [], "fast": []}
    seen: Dict[str, set] = {"scalar": set(), "fast": set()}
    errors: list = []
    barrier = threading.Barrier(2)

    def work(name: str, sess: bfpaccel.Session) -> None:
        try:
            barrier.wait()
            for _ in range(15):
                out[name].append(sess.run(None, x))
                seen[name].add(bfpaccel.get_kernel())  # this thread is back on the process default
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=a) for a in (("scalar", scalar), ("fast", fast))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors
    assert len(out["scalar"]) == len(out["fast"]) == 15
    for r in out["scalar"] + out["fast"]:
        _same_bits(r, want)
    assert seen == {"scalar": {default_kernel}, "fast": {default_kernel}}
    assert _program_kernels(scalar) == {"scalar"} and _program_kernels(fast) == {default_kernel}


@pytest.mark.parametrize("kw, words", [
    ({"kernel": "nosuch"}, ["unknown kernel 'nosuch'", *_core.kernel_names()]),
    ({"kernel": "avx"}, ["unknown kernel", "scalar"]),
    ({"num_threads": 0}, ["number of threads", f"[1, {_core.max_threads()}]"]),
    ({"num_threads": _core.max_threads() + 1}, [f"[1, {_core.max_threads()}]"]),
    ({"num_threads": 2.0}, ["number of threads"]),
])
def test_bad_options_name_the_valid_values(plan, kw, words):
    with pytest.raises(ValueError) as ei:
        bfpaccel.Session(plan, **kw)
    for w in words:
        assert w in str(ei.value)
    with pytest.raises(ValueError):
        bfpaccel.Predictor(plan, **kw)


@pytest.mark.skipif(set(_core.kernel_names()) == set(KERNELS), reason="every kernel of this build runs here")
def test_kernel_this_cpu_cannot_run(plan):
    missing = next(k for k in _core.kernel_names() if k not in KERNELS)
    with pytest.raises(ValueError, match=f"cannot run the {missing} kernel; available: "):
        bfpaccel.Session(plan, kernel=missing)


# ----- profile ---------------------------------------------------------------------------
def test_profile_is_unchanged(plan, x):
    s = bfpaccel.Session(plan, kernel="scalar")
    prof = s.profile(x)
    lw = s.program({"x": x["x"].shape})
    assert [n for n, _ in prof] == lw.op_names
    assert all(isinstance(t, float) and t >= 0 for _, t in prof)


def test_op_kinds_match_the_core(plan, x):
    lw = bfpaccel.Session(plan).program({"x": x["x"].shape})
    K = bfpaccel._core.OpKind  # the core's numbers, by name (they are not fixed across builds)
    names = {"conv": K.CONV, "dense": K.CONV, "depthwise conv": -1, "add": K.BINARY, "max pool": K.POOL,
             "reduce mean": K.REDUCE, "softmax": K.SOFTMAX, "transpose": K.STRIDED, "slice": K.STRIDED,
             "copy": K.COPY}
    assert len(lw.op_kinds) == len(lw.program.op_kinds) == len(lw.op_names)
    for label, cpp in zip(lw.op_kinds, lw.program.op_kinds):
        assert names[label] == cpp, (label, cpp)
    assert {"conv", "dense", "depthwise conv", "max pool", "reduce mean", "softmax", "slice"} <= set(lw.op_kinds)


def test_profile_summary(plan, x):
    s = bfpaccel.Session(plan, kernel="scalar", num_threads=1)
    sm = s.profile_summary(x, runs=3, top=4)
    assert isinstance(sm, ProfileSummary)
    assert sm.kernel == "scalar" and sm.threads == 1 and sm.runs == 3 and sm.input_shapes == {"x": (2, 3, 12, 12)}
    assert sm.total_seconds > 0 and sm.total_seconds == pytest.approx(sum(sm.kind_seconds.values()))
    assert sm.total_seconds == pytest.approx(sum(o.seconds for o in sm.ops))
    assert list(sm.kind_seconds.values()) == sorted(sm.kind_seconds.values(), reverse=True)
    assert sm.kind_counts["conv"] == 2 and sm.kind_counts["depthwise conv"] == 1 and sm.kind_counts["dense"] == 1
    # the GEMM kernel runs inside the matrix ops only
    assert 0 < sm.kernel_seconds <= sm.kind_seconds["conv"] + sm.kind_seconds["dense"]
    assert sm.kernel_share == pytest.approx(sm.kernel_seconds / sm.total_seconds)
    assert all(o.kernel_seconds == 0 for o in sm.ops if o.kind not in ("conv", "dense", "depthwise conv"))
    assert len(sm.top_ops) == 4 and [o.seconds for o in sm.top_ops] == sorted((o.seconds for o in sm.ops),
                                                                             reverse=True)[:4]
    text = str(sm)
    assert text == sm.format()
    for w in ("kernel scalar", "1 thread", "kernel share", "op kind", "depthwise conv", "slowest ops",
              sm.top_ops[0].name):
        assert w in text, w
    d = json.loads(json.dumps(sm.to_dict()))
    assert d["kernel_share"] == pytest.approx(sm.kernel_share, abs=1e-4) and len(d["top_ops"]) == 4
    assert d["kind_counts"] == sm.kind_counts


def test_profile_summary_fastest_run_is_kept():
    runs = [([3.0, 1.0], [2.0, 0.0]), ([1.0, 1.0], [0.5, 0.0]), ([2.0, 2.0], [1.0, 0.0])]
    sm = ProfileSummary.from_runs(["Conv_0", "Relu_1"], ["conv", "relu"], runs, kernel="k", threads=3)
    assert sm.total_seconds == 2.0 and sm.kernel_seconds == 0.5 and sm.kernel_share == 0.25
    assert sm.kind_seconds == {"conv": 1.0, "relu": 1.0}


def test_profile_summary_bad_arguments(plan, x):
    s = bfpaccel.Session(plan)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="runs must be an int >= 1"):
            s.profile_summary(x, runs=bad)
    with pytest.raises(ValueError, match="top must be"):
        s.profile_summary(x, top=-1)
    with pytest.raises(ValueError, match="missing input"):
        s.profile_summary({}, runs=1)


def test_profile_command(onnx_path, capsys):
    from bfpaccel.cli import main

    assert main(["profile", "--model", onnx_path, "--kernel", "scalar", "--threads", "1", "--runs", "2",
                 "--batch", "2", "--top", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    for w in ("format msfp16", "batch 2", "kernel scalar, 1 thread", "kernel share", "depthwise conv",
              "slowest ops", "x [2, 3, 12, 12]"):
        assert w in out, (w, out)


def test_profile_command_on_a_plan(plan, tmp_path, capsys):
    from bfpaccel.cli import main

    p = plan.save(str(tmp_path / "m.bfpplan"))
    assert main(["profile", "--model", p, "--runs", "1", "--quiet"]) == 0
    assert f"kernel {bfpaccel.get_kernel()}" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["--model", "/no/such/model.onnx"], ["does not exist"]),
    (["--model", "/no/such/plan.bfpplan"], ["does not exist"]),
    (["--model", "alexnet"], ["unknown model 'alexnet'"]),
    (["--model", "{onnx}", "--kernel", "nosuch"], ["unknown kernel 'nosuch'", "scalar"]),
    (["--model", "{onnx}", "--threads", "0"], ["--threads must be >= 1"]),
    (["--model", "{onnx}", "--runs", "0"], ["--runs must be >= 1"]),
    (["--model", "{onnx}", "--format", "msfp99"], ["unknown format 'msfp99'"]),
    (["--model", "{plan}", "--format", "msfp12"], ["compiled for msfp16"]),
])
def test_profile_command_errors(onnx_path, plan, tmp_path, capsys, args, words):
    from bfpaccel.cli import main

    plan_path = plan.save(str(tmp_path / "m.bfpplan"))
    args = [a.format(onnx=onnx_path, plan=plan_path) for a in args]
    assert main(["profile", *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bfpaccel: error:") and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)


# ----- the server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("grpc")
    from bfpaccel.serve.testing import build_tiny_plan

    return build_tiny_plan(str(tmp_path_factory.mktemp("srv") / "tiny.bfpplan"))


def test_server_applies_kernel_and_threads_per_session(tiny_plan):
    from bfpaccel.serve import PredictionClient, serve

    default_kernel, default_threads = bfpaccel.get_kernel(), bfpaccel.get_num_threads()
    pred = bfpaccel.Predictor(tiny_plan)
    xin = RNG.standard_normal((2, 224, 224, 3)).astype(np.float32) * 50
    want = pred.predict(xin)
    with serve(tiny_plan, port=0, workers=2, kernel="scalar", num_threads=1) as h:
        client = PredictionClient("127.0.0.1", h.port, retry="none")
        try:
            got = client.predict({pred.input_name: xin}, timeout=60.0)
        finally:
            client.close()
        model = h.core.resolve(None)
        sessions = [p.session for p in list(model.predictors.queue)]
        assert len(sessions) == 2
        for s in sessions:
            assert (s.kernel, s.num_threads) == ("scalar", 1)
            assert _program_kernels(s) <= {"scalar"}
        assert any(_program_kernels(s) == {"scalar"} for s in sessions)  # warm-up and the request ran scalar
    for name, y in want.items():
        np.testing.assert_array_equal(np.asarray(got[name], np.float32).view(np.uint32), y.view(np.uint32))
    assert (bfpaccel.get_kernel(), bfpaccel.get_num_threads()) == (default_kernel, default_threads)


def test_server_rejects_bad_options_before_starting(tiny_plan):
    from bfpaccel.serve import serve

    with pytest.raises(ValueError, match="unknown kernel 'nosuch'; this build has scalar"):
        serve(tiny_plan, port=0, kernel="nosuch")
    with pytest.raises(ValueError, match=r"number of threads must be an int in \[1, "):
        serve(tiny_plan, port=0, num_threads=0)


def test_serve_cli_kernel_flag(tiny_plan):
    from bfpaccel.cli import build_parser

    args = build_parser().parse_args(["serve", "--plan", tiny_plan, "--kernel", "scalar", "--threads", "1"])
    assert args.kernel == "scalar" and args.threads == 1
    help_text = subprocess.run([sys.executable, "-m", "bfpaccel", "serve", "--help"], capture_output=True, text=True,
                               timeout=120).stdout
    assert "--kernel NAME" in help_text and "--threads" in help_text
    r = subprocess.run([sys.executable, "-m", "bfpaccel", "serve", "--plan", tiny_plan, "--port", "0", "--kernel",
                        "nosuch"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown kernel 'nosuch'" in r.stderr and "Traceback" not in r.stderr


def test_program_cache_is_bounded(tiny_plan):
    """Each input shape lowers its own program (packed weights): the cache keeps the
    ``max_programs`` most recently used, and an evicted shape still runs bit-identically."""
    import bfpaccel

    sess = bfpaccel.Session(tiny_plan, max_programs=2, kernel="scalar")
    name = sess.input_names[0]
    x = RNG.standard_normal((4, 224, 224, 3)).astype(np.float32)
    first = sess.run(None, {name: x[:1]})
    for n in (2, 3, 4):
        sess.run(None, {name: x[:n]})
    assert len(sess._programs) == 2
    again = sess.run(None, {name: x[:1]})  # lowered again after eviction
    for k in first:
        np.testing.assert_array_equal(first[k].view(np.uint32), again[k].view(np.uint32))
    with pytest.raises(ValueError, match="max_programs"):
        bfpaccel.Session(tiny_plan, max_programs=0)
