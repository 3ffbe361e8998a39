"""The runtime's item-claiming parallel loop (csrc/pool.cpp) under the GEMM, the activation
quantizer, softmax and the vector-math rows: the results never depend on the thread count,
and sessions running at the same time from several Python threads (one loop at a time in the
pool: the others run their items on their own thread) give the single-threaded bits."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import bfpaccel

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

RNG = np.random.default_rng(11)
H, F = 64, 160


def _block(path: str) -> str:
    """dense -> Gelu -> dense -> Softmax over the last axis: every pool-backed loop."""
    w1 = (RNG.standard_normal((H, F)) * 0.2).astype(np.float32)
    w2 = (RNG.standard_normal((F, H)) * 0.2).astype(np.float32)
    N = helper.make_node
    g = helper.make_graph([N("MatMul", ["x", "w1"], ["h"]), N("Gelu", ["h"], ["g"]), N("MatMul", ["g", "w2"], ["o"]),
                           N("Softmax", ["o"], ["y"], axis=-1)], "b",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 200, H])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 9
    onnx.save(m, path)
    return path


@pytest.mark.parametrize("fmt", ["msfp16", "mxfp8_e4m3"])
def test_threads_and_concurrent_sessions_same_bits(fmt, tmp_path):
    plan = bfpaccel.compile(_block(str(tmp_path / "b.onnx")), format=fmt)
    x = RNG.standard_normal((3, 200, H)).astype(np.float32) * 3
    want = bfpaccel.Session(plan, num_threads=1).run(None, {"x": x})["y"]
    for k in bfpaccel.available_kernels():
        for t in (2, 3):
            got = bfpaccel.Session(plan, num_threads=t, kernel=k).run(None, {"x": x})["y"]
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (k, t)
    # four sessions at once, many runs each: loops overlap in the pool
    sessions = [bfpaccel.Session(plan, num_threads=2) for _ in range(4)]
    out: list = [None] * len(sessions)

    def work(i: int) -> None:
        for _ in range(15):
            out[i] = sessions[i].run(None, {"x": x})["y"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(sessions))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
        assert not th.is_alive()
    for o in out:
        assert np.array_equal(o.view(np.uint32), want.view(np.uint32))


def test_large_matmul_between_activations_threads_same_bits(tmp_path):
    """A MatMul of run-time tensors above the single-thread bound (2^25 multiply-adds) shares
    the threads; each matrix runs under the session's kernel: the single-threaded bits, and
    those of reference.matmul."""
    a = RNG.standard_normal((4, 192, 256)).astype(np.float32)
    b = RNG.standard_normal((4, 256, 192)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "m",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape)),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    plan = bfpaccel.compile(m, format="msfp16")
    want = bfpaccel.reference.matmul(a, b, "msfp16")
    for k in bfpaccel.available_kernels():
        for t in (1, 2):
            got = bfpaccel.Session(plan, num_threads=t, kernel=k).run(None, {"a": a, "b": b})["y"]
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (k, t)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_code_inside_an_item_sees_one_thread(threads):
    """Inside an item of the pool's loop every nested loop runs on the item's thread, so the
    thread count that code there reads (an OpenMP team's size, a GEMM's split) is 1: a fused
    expansion's GEMM inside a depthwise conv's items starts no team of its own (the amx
    kernel's OpenMP regions would otherwise put nested teams beside the pool's threads)."""
    from bfpaccel import _core

    assert _core._threads_in_items(threads, 16) == 1
    assert _core._threads_in_items(threads, 1) == threads  # one item runs on the caller, outside any item
