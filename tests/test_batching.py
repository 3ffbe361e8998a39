"""Dynamic batching (bfpaccel.serve.batching): every row of a merged call is bit-identical to
that request run alone at batch 1.

First the runtime itself: ``Predictor.predict(stack)`` row i equals ``predict(row i)`` in its
bits for the tiny serving plan and a conv/dense plan, in every format and on every kernel.
Then the batcher: concurrent gRPC Predict calls, deadlines, stop with queued requests,
``max_batch_size``, preferred sizes, errors, a model that mixes rows, metrics.

``BFPACCEL_LONG_TESTS=1`` runs the concurrent gRPC test for 60 s instead of 3 s and prints its
figures (``pytest -s``).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import urllib.request
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

pytest.importorskip("onnx")

import bfpaccel  # noqa: E402
from conftest import spawn_server  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from bfpaccel.serve import PredictionClient, serve  # noqa: E402
from bfpaccel.serve.batching import Batcher  # noqa: E402
from bfpaccel.serve.core import Code, ServingCore, ServingError  # noqa: E402
from bfpaccel.serve.testing import TINY_OUTPUT, build_tiny_plan, make_image  # noqa: E402

LONG = os.environ.get("BFPACCEL_LONG_TESTS") == "1"
#: Formats a plan's matrix ops run in: every block format and fp32.
FORMATS = [f for f in bfpaccel.list_formats() if bfpaccel.get_format(f).is_block] + ["fp32"]
KERNELS = bfpaccel.available_kernels()
TINY_SHAPE = (224, 224, 3)


def _model(nodes: List[Any], inits: Dict[str, np.ndarray], shape: List[Any], outputs: List[str]) -> Any:
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_empty_tensor_value_info(n) for n in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    return m


def _conv_dense_model() -> Any:
    """Convs (strided, depthwise, grouped 1x1), dense layers on 2-D rows and on 3-D token
    rows, pooling, softmax: the matrix ops whose batch rows share one GEMM."""
    rng = np.random.default_rng(5)

    def w(*s: int) -> np.ndarray:
        return (rng.standard_normal(s) * 0.2).astype(np.float32)

    inits = {"w1": w(16, 3, 3, 3), "b1": w(16), "w2": w(16, 1, 3, 3), "w3": w(24, 8, 1, 1), "b3": w(24),
             "fc": w(24, 40), "fcb": w(40), "fc2": w(40, 10), "tw": w(24, 12),
             "sh": np.array([0, -1], np.int64), "sh3": np.array([0, -1, 24], np.int64)}
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["xt", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c2", "w3", "b3"], ["c3"], group=2),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Transpose", ["r3"], ["r3t"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["r3t", "sh3"], ["tok"]),
        helper.make_node("MatMul", ["tok", "tw"], ["tokens"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["gp"]),
        helper.make_node("Reshape", ["gp", "sh"], ["fl"]),
        helper.make_node("Gemm", ["fl", "fc", "fcb"], ["h"]),
        helper.make_node("Sigmoid", ["h"], ["hs"]),
        helper.make_node("MatMul", ["hs", "fc2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    return _model(nodes, inits, ["N", 15, 13, 3], ["prob", "logits", "tokens"])


def _rows_mixing_plan() -> Any:
    """A model whose rows depend on each other (it subtracts the batch mean)."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
             helper.make_node("Sub", ["x", "m"], ["y"])]
    g = helper.make_graph(nodes, "mix", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    return bfpaccel.compile(m, format="msfp16")


def _wide_range(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """Rows of very different magnitudes (one exponent per row and per element), a NaN, an
    inf and a subnormal row: block exponents differ from row to row."""
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-20, 20, shape[:1] + (1,) * (len(shape) - 1)))
    x *= np.exp(rng.uniform(-3, 3, shape))
    x = x.astype(np.float32)
    if shape[0] > 3:
        x[1].flat[0] = np.nan
        x[2].flat[1] = np.inf
        x[3] = np.float32(1e-41)
    return x


def _assert_rows_alone(pred: bfpaccel.Predictor, x: np.ndarray, what: str) -> None:
    batch = pred.predict(x)
    for i in range(x.shape[0]):
        one = pred.predict(x[i:i + 1])
        assert set(one) == set(batch)
        for name, y in one.items():
            np.testing.assert_array_equal(batch[name][i:i + 1].view(np.uint32), y.view(np.uint32),
                                          err_msg=f"{what}: output {name} row {i} of {x.shape[0]}")


# -- the runtime: batch rows are bit-identical to batch 1 -------------------------------------
@pytest.fixture(scope="module")
def conv_dense() -> Any:
    return _conv_dense_model()


@pytest.mark.parametrize("fmt", FORMATS)
def test_runtime_conv_dense_rows_equal_batch_one(conv_dense, fmt):
    """Every kernel, 1 and 2 threads, batches of 5 (per-row quantizer paths) and 17 (rows of
    16 and a tail in the dense layers)."""
    plan = bfpaccel.compile(conv_dense, format=fmt)
    rng = np.random.default_rng(sum(map(ord, fmt)))
    for kernel in KERNELS:
        for threads in (1, 2):
            pred = bfpaccel.Predictor(plan, num_threads=threads, kernel=kernel)
            for n in (5, 17):
                _assert_rows_alone(pred, _wide_range(rng, (n, 15, 13, 3)), f"{fmt} {kernel} {threads} thread(s)")


@pytest.mark.parametrize("fmt", ["msfp16", "mxfp4_e2m1", "mxint8"])
@pytest.mark.parametrize("vp", ["bf16", "fp32"])
def test_runtime_rows_equal_batch_one_other_vector_precisions(conv_dense, fmt, vp):
    plan = bfpaccel.compile(conv_dense, format=fmt, vector_precision=vp)
    rng = np.random.default_rng(3)
    for kernel in KERNELS:
        _assert_rows_alone(bfpaccel.Predictor(plan, num_threads=2, kernel=kernel),
                           _wide_range(rng, (6, 15, 13, 3)), f"{fmt} {vp} {kernel}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_runtime_tiny_plan_rows_equal_batch_one(tmp_path, fmt):
    path = build_tiny_plan(str(tmp_path / f"tiny-{fmt}.bfpplan"), format=fmt)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3,) + TINY_SHAPE) * np.array([1.0, 300.0, 1e-3]).reshape(3, 1, 1, 1)).astype(np.float32)
    for kernel in KERNELS:
        _assert_rows_alone(bfpaccel.Predictor(path, num_threads=2, kernel=kernel), x, f"tiny {fmt} {kernel}")


def test_row_check_catches_a_model_that_mixes_rows():
    """The check above fails where rows do depend on each other."""
    with pytest.raises(AssertionError, match="row 0"):
        _assert_rows_alone(bfpaccel.Predictor(_rows_mixing_plan()), np.arange(8, dtype=np.float32).reshape(2, 4),
                           "mix")


# -- the batcher on a core ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return build_tiny_plan(str(tmp_path_factory.mktemp("plans") / "tiny.bfpplan"))


@pytest.fixture(scope="module")
def ref(tiny) -> bfpaccel.Predictor:
    return bfpaccel.Predictor(tiny)


def _core(source: Any, name: str = "tiny", workers: int = 1, queue_size: int = 64, check_rows: bool = False,
          **kw: Any) -> ServingCore:
    """A core serving ``source`` with a batcher; the first batch's check of rows against
    batch-1 runs (extra model calls) is off unless ``check_rows``, so tests see each call."""
    core = ServingCore(workers=workers, queue_size=queue_size)
    core.add_version(name, 1, source)
    core.load_all()
    core.batcher = Batcher(core, check_rows=check_rows, **kw)
    return core


class _Recording:
    """A worker predictor that records each model call's rows (and can fail)."""

    def __init__(self, pred: Any, sizes: List[int], fail: Optional[BaseException] = None) -> None:
        self._pred, self._sizes, self._fail = pred, sizes, fail

    def predict(self, x: np.ndarray, outputs: Any = None) -> Dict[str, np.ndarray]:
        self._sizes.append(int(x.shape[0]))
        if self._fail is not None:
            raise self._fail
        return self._pred.predict(x, outputs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pred, name)


def _take_workers(core: ServingCore, mv: Any) -> List[Any]:
    """Takes every worker out of the pool (as if all were busy)."""
    return [mv.predictors.get(timeout=5) for _ in range(core.workers)]


def _record(core: ServingCore, mv: Any, sizes: List[int], fail: Optional[BaseException] = None) -> List[Any]:
    """Worker predictors wrapped in :class:`_Recording`, held out of the pool."""
    return [_Recording(p, sizes, fail) for p in _take_workers(core, mv)]


def _release(mv: Any, preds: List[Any]) -> None:
    for p in preds:
        mv.predictors.put(p)


def _start(core: ServingCore, mv: Any, xs: List[np.ndarray], timeout_s: Optional[float] = None,
           outputs: Optional[List[str]] = None) -> tuple:
    """One thread per input calling ``core.infer``; waits until all are queued for a batch.
    Returns (threads, results, errors)."""
    results: List[Any] = [None] * len(xs)
    errors: List[Any] = [None] * len(xs)

    def call(i: int) -> None:
        try:
            results[i] = core.infer(mv, x=xs[i], timeout_s=timeout_s, outputs=outputs)
        except Exception as e:
            errors[i] = e

    threads = []
    for i in range(len(xs)):
        before = core.batcher.pending(mv)
        t = threading.Thread(target=call, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        _until(lambda: core.batcher.pending(mv) > before or errors[i] is not None or results[i] is not None)
    return threads, results, errors


def _until(cond: Any, timeout: float = 10.0) -> None:
    t_end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < t_end, "timed out waiting"
        time.sleep(0.002)


def _join(threads: List[threading.Thread]) -> None:
    for t in threads:
        t.join(20)
        assert not t.is_alive()


def _rows(seed: int, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n,) + TINY_SHAPE).astype(np.float32)


def _assert_same(got: Dict[str, np.ndarray], want: Dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape
        np.testing.assert_array_equal(got[k].view(np.uint32), want[k].view(np.uint32), err_msg=k)


def _batcher_threads(model: str) -> List[threading.Thread]:
    """The batcher's threads (schedulers and model-call threads) of one model."""
    return [t for t in threading.enumerate()
            if t.name.startswith((f"bfpaccel-batch-{model}_", f"bfpaccel-batcher-{model}-"))]


def test_options_checked(tiny):
    core = ServingCore(workers=1)
    for kw in ({"max_batch_size": 0}, {"max_batch_size": 2.5}, {"timeout_s": -1}, {"timeout_s": float("nan")},
               {"max_batch_size": 8, "preferred_batch_sizes": [4, 9]}, {"preferred_batch_sizes": [0]}):
        with pytest.raises(ValueError):
            Batcher(core, **kw)


def test_accepts_only_float_rows_of_the_batch_dimension(tiny):
    core = _core(tiny, max_batch_size=4)
    mv = core.resolve("tiny")
    b = core.batcher
    assert b.accepts(mv, np.zeros((1,) + TINY_SHAPE, np.float32))
    assert b.accepts(mv, np.zeros((3,) + TINY_SHAPE, np.float64))
    assert not b.accepts(mv, np.zeros((4,) + TINY_SHAPE, np.float32))  # max_batch_size rows: alone
    assert not b.accepts(mv, np.zeros((1,) + TINY_SHAPE, np.int32))
    assert not b.accepts(mv, np.zeros((1, 224, 224, 4), np.float32))
    assert not b.accepts(mv, np.zeros(TINY_SHAPE, np.float32))
    assert not b.accepts(mv, [[0.0]])
    core.stop()


def test_max_batch_size_respected_and_big_requests_alone(tiny, ref):
    """13 queued rows (a 2-row request second) with max_batch_size 4: calls of 4, 4, 4, 1."""
    core = _core(tiny, name="maxsize", max_batch_size=4, timeout_s=0.3)
    mv = core.resolve("maxsize")
    sizes: List[int] = []
    held = _record(core, mv, sizes)
    xs = [_rows(100 + i, 2 if i == 1 else 1) for i in range(12)]
    threads, results, errors = _start(core, mv, xs)
    _release(mv, held)
    _join(threads)
    assert errors == [None] * len(xs)
    for x, got in zip(xs, results):
        _assert_same(got, ref.predict(x))
    assert sizes == [4, 4, 4, 1], sizes
    assert core.metrics.batch_totals("maxsize") == (13, 4)
    # a request of max_batch_size rows or more runs alone, unbatched
    for n in (4, 6):
        big = _rows(7, n)
        _assert_same(core.infer(mv, x=big), ref.predict(big))
        assert sizes[-1] == n
    assert core.metrics.batch_totals("maxsize") == (13, 4)
    assert _batcher_threads("maxsize")
    core.stop()
    assert not _batcher_threads("maxsize")


def test_preferred_size_runs_at_once(tiny, ref):
    core = _core(tiny, max_batch_size=8, timeout_s=30.0, preferred_batch_sizes=[3])
    mv = core.resolve("tiny")
    sizes: List[int] = []
    _release(mv, _record(core, mv, sizes))
    xs = [_rows(200 + i) for i in range(3)]
    t0 = time.monotonic()
    threads, results, errors = _start(core, mv, xs)
    _join(threads)
    assert time.monotonic() - t0 < 15  # not the 30 s timeout
    assert errors == [None] * 3 and sizes == [3]
    for x, got in zip(xs, results):
        _assert_same(got, ref.predict(x))
    core.stop()


def test_timeout_runs_a_partial_batch(tiny, ref):
    core = _core(tiny, max_batch_size=8, timeout_s=0.4, preferred_batch_sizes=[3])
    mv = core.resolve("tiny")
    sizes: List[int] = []
    _release(mv, _record(core, mv, sizes))
    xs = [_rows(300 + i) for i in range(2)]
    t0 = time.monotonic()
    threads, results, errors = _start(core, mv, xs)
    _join(threads)
    assert time.monotonic() - t0 >= 0.35  # waited for the oldest request's timeout
    assert errors == [None, None] and sizes == [2]
    core.stop()


def test_batch_cut_to_a_preferred_size(tiny, ref):
    """7 queued rows, preferred 4: a batch of 4, then the 3 left once their timeout passed."""
    core = _core(tiny, max_batch_size=8, timeout_s=0.1, preferred_batch_sizes=[4])
    mv = core.resolve("tiny")
    sizes: List[int] = []
    held = _record(core, mv, sizes)
    xs = [_rows(400 + i) for i in range(7)]
    threads, results, errors = _start(core, mv, xs)
    _release(mv, held)
    _join(threads)
    assert errors == [None] * 7 and sizes == [4, 3]
    for x, got in zip(xs, results):
        _assert_same(got, ref.predict(x))
    core.stop()


def test_outputs_union_and_aliases(tiny, ref):
    core = _core(tiny, max_batch_size=8, timeout_s=0.05)
    mv = core.resolve("tiny")
    sizes: List[int] = []
    held = _record(core, mv, sizes)
    xs = [_rows(500 + i) for i in range(3)]
    threads, results, errors = _start(core, mv, xs[:2], outputs=["output_alias"])
    t3, r3, e3 = _start(core, mv, xs[2:])
    _release(mv, held)
    _join(threads + t3)
    assert errors == [None, None] and e3 == [None] and sizes == [3]
    for x, got in zip(xs, results + r3):
        _assert_same(got, ref.predict(x))
    with pytest.raises(ServingError) as e:
        core.batcher.submit(mv, xs[0], ["nope"])
    assert e.value.code is Code.INVALID_ARGUMENT
    core.stop()


def test_deadline_while_queued(tiny, ref):
    core = _core(tiny, max_batch_size=8, timeout_s=0.001)
    mv = core.resolve("tiny")
    held = _take_workers(core, mv)
    t0 = time.monotonic()
    with pytest.raises(ServingError) as e:
        core.infer(mv, x=_rows(1), timeout_s=0.3)
    assert e.value.code is Code.DEADLINE_EXCEEDED
    assert 0.25 <= time.monotonic() - t0 < 5
    assert core.batcher.pending(mv) == 0
    # one of several queued requests expires; the others run once a worker is free
    threads, results, errors = _start(core, mv, [_rows(2), _rows(3)])
    ta, ra, ea = _start(core, mv, [_rows(4)], timeout_s=0.2)
    _join(ta)
    assert isinstance(ea[0], ServingError) and ea[0].code is Code.DEADLINE_EXCEEDED
    _release(mv, held)
    _join(threads)
    assert errors == [None, None]
    _assert_same(results[1], ref.predict(_rows(3)))
    core.stop()


def test_stop_fails_queued_requests(tiny):
    core = _core(tiny, name="stopme", max_batch_size=8, timeout_s=0.001)
    mv = core.resolve("stopme")
    held = _take_workers(core, mv)
    threads, results, errors = _start(core, mv, [_rows(i) for i in range(5)])
    assert core.batcher.pending(mv) == 5
    assert _batcher_threads("stopme")
    core.batcher.stop()
    _join(threads)
    assert results == [None] * 5
    assert all(isinstance(e, ServingError) and e.code is Code.UNAVAILABLE for e in errors), errors
    assert not _batcher_threads("stopme")
    with pytest.raises(ServingError) as e:
        core.batcher.submit(mv, _rows(9))
    assert e.value.code is Code.UNAVAILABLE
    assert not core.batcher.accepts(mv, _rows(9))
    _release(mv, held)


def test_errors_reach_every_member(tiny):
    for fail, check in ((ValueError("bad rows"), lambda e: isinstance(e, ServingError)
                         and e.code is Code.INVALID_ARGUMENT and "bad rows" in e.message),
                        (MemoryError(), lambda e: isinstance(e, ServingError) and e.code is Code.RESOURCE_EXHAUSTED),
                        (RuntimeError("bug"), lambda e: isinstance(e, RuntimeError) and "bug" in str(e))):
        core = _core(tiny, max_batch_size=8, timeout_s=0.05)
        mv = core.resolve("tiny")
        sizes: List[int] = []
        held = _record(core, mv, sizes, fail)
        threads, results, errors = _start(core, mv, [_rows(i) for i in range(3)])
        _release(mv, held)
        _join(threads)
        # a ValueError (a client's bad values) reruns each member alone: only those at fault fail
        assert sizes == ([3, 1, 1, 1] if isinstance(fail, ValueError) else [3]) and results == [None] * 3
        assert all(check(e) for e in errors), errors
        assert mv.predictors.qsize() == core.workers  # the worker came back
        core.stop()


def test_model_that_mixes_rows_is_not_batched(caplog):
    plan = _rows_mixing_plan()
    core = _core(plan, name="mix", max_batch_size=8, timeout_s=0.05, check_rows=True)
    mv = core.resolve("mix")
    ref = bfpaccel.Predictor(plan)
    sizes: List[int] = []
    held = _record(core, mv, sizes)
    xs = [np.full((1, 4), float(i + 1), np.float32) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="bfpaccel.serve"):
        threads, results, errors = _start(core, mv, xs)
        _release(mv, held)
        _join(threads)
    assert errors == [None] * 3
    for x, got in zip(xs, results):
        _assert_same(got, ref.predict(x))  # the batch-1 results, not the batch's
    assert sizes == [3, 1, 1, 1]
    assert "does not batch" in caplog.text
    assert not core.batcher.accepts(mv, xs[0])
    core.stop()


def test_unloaded_version_ends_its_scheduler(tiny, ref):
    core = _core(tiny, name="unloadme", max_batch_size=8, timeout_s=0.001)
    mv = core.resolve("unloadme")
    _assert_same(core.infer(mv, x=_rows(1)), ref.predict(_rows(1)))
    assert _batcher_threads("unloadme")
    core.unload_version("unloadme", 1)
    _until(lambda: not _batcher_threads("unloadme"))  # the scheduler and its model-call threads end
    core.stop()


# -- the server: concurrent gRPC calls ---------------------------------------------------------
# -- token inputs and sentences ------------------------------------------------------------

@pytest.fixture(scope="module")
def text_plan(tmp_path_factory) -> str:
    pytest.importorskip("tokenizers")
    from bfpaccel.serve.testing import build_tiny_text_plan

    path = str(tmp_path_factory.mktemp("text") / "enc.bfpplan")
    build_tiny_text_plan(path, text_front={"pooling": "mean", "normalize": True})
    return path


class _FeedRecording(_Recording):
    """A worker predictor that records each model call's (rows, sequence length)."""

    def predict(self, x: Any, outputs: Any = None) -> Dict[str, np.ndarray]:
        ids = x["input_ids"] if isinstance(x, dict) else x
        self._sizes.append((int(ids.shape[0]), int(ids.shape[1])))  # type: ignore[arg-type]
        return self._pred.predict(x, outputs)


def _infer_all(core: ServingCore, mv: Any, calls: List[Dict[str, Any]]) -> tuple:
    """One thread per ``core.infer(mv, **kw)``, each started once the previous one is queued."""
    results: List[Any] = [None] * len(calls)
    errors: List[Any] = [None] * len(calls)

    def call(i: int) -> None:
        try:
            results[i] = core.infer(mv, **calls[i])
        except Exception as e:
            errors[i] = e

    threads = []
    for i in range(len(calls)):
        before = core.batcher.pending(mv)
        t = threading.Thread(target=call, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        _until(lambda: core.batcher.pending(mv) > before or errors[i] is not None or results[i] is not None)
    return threads, results, errors


def _tokens(seed: int, rows: int, length: int, dtype: Any = np.int64) -> Dict[str, np.ndarray]:
    """Token ids of the tiny vocabulary (20 entries) and a mask with padding at the end of some rows."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 20, (rows, length)).astype(dtype)
    mask = np.ones((rows, length), dtype)
    for r in range(rows):
        n = int(rng.integers(1, length + 1))
        ids[r, n:] = 0
        mask[r, n:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_accepts_token_inputs_and_sentences(text_plan):
    core = _core(text_plan, name="enc", max_batch_size=4)
    mv = core.resolve("enc")
    b = core.batcher
    assert b.accepts(mv, _tokens(0, 3, 5)) and b.accepts(mv, _tokens(0, 1, 9, np.int32))
    assert not b.accepts(mv, _tokens(0, 4, 5))  # max_batch_size rows: alone
    assert not b.accepts(mv, {"input_ids": _tokens(0, 1, 5)["input_ids"]})  # an input missing
    f = _tokens(0, 2, 5)
    assert not b.accepts(mv, {"input_ids": f["input_ids"], "attention_mask": f["attention_mask"][:1]})
    assert not b.accepts(mv, {k: v.astype(np.float32) for k, v in f.items()})  # float token ids
    assert not b.accepts(mv, {"input_ids": f["input_ids"][0], "attention_mask": f["attention_mask"][0]})  # no batch
    assert b.accepts(mv, ["the cat", "a dog"]) and not b.accepts(mv, ["a"] * 4) and not b.accepts(mv, [b"the"])
    core.stop()


def test_token_requests_of_one_sequence_length_merge_bit_identical(text_plan):
    """Token-id requests merge with those of the same sequence length only (in arrival order of
    each length); every request's rows equal the request run alone, bit for bit."""
    ref = bfpaccel.Predictor(text_plan)
    core = _core(text_plan, name="enc", max_batch_size=8, timeout_s=0.05)
    mv = core.resolve("enc")
    calls: List[Any] = []
    held = [_FeedRecording(p, calls) for p in _take_workers(core, mv)]
    reqs = [_tokens(1, 2, 5), _tokens(2, 1, 7), _tokens(3, 1, 5), _tokens(4, 3, 5), _tokens(5, 1, 7),
            _tokens(6, 2, 7, np.int32)]  # int32 ids: not merged with the int64 ones of their length
    threads, results, errors = _infer_all(core, mv, [{"feeds": f, "key": "input_ids"} for f in reqs])
    _release(mv, held)
    _join(threads)
    assert errors == [None] * len(reqs)
    assert sorted(calls) == sorted([(6, 5), (2, 7), (2, 7)]), calls  # 2+1+3 rows of length 5; 1+1; the int32 pair
    for f, got in zip(reqs, results):
        _assert_same(got, ref.predict(f))
    core.stop()


def test_first_token_batch_is_checked_against_requests_alone(text_plan):
    ref = bfpaccel.Predictor(text_plan)
    core = _core(text_plan, name="enc", max_batch_size=8, timeout_s=0.05, check_rows=True)
    mv = core.resolve("enc")
    held = _take_workers(core, mv)
    reqs = [_tokens(10 + i, 1 + i % 2, 6) for i in range(4)]
    threads, results, errors = _infer_all(core, mv, [{"feeds": f} for f in reqs])
    _release(mv, held)
    _join(threads)
    assert errors == [None] * 4 and core.batcher._lanes[mv].verified  # rows matched their batch-1 runs
    for f, got in zip(reqs, results):
        _assert_same(got, ref.predict(f))
    core.stop()


def test_a_bad_token_id_fails_only_its_request(text_plan):
    ref = bfpaccel.Predictor(text_plan)
    core = _core(text_plan, name="enc", max_batch_size=8, timeout_s=0.05)
    mv = core.resolve("enc")
    held = _take_workers(core, mv)
    bad = _tokens(21, 1, 5)
    bad["input_ids"][0, 0] = 99  # outside the 20-entry table
    reqs = [_tokens(20, 2, 5), bad, _tokens(22, 1, 5)]
    threads, results, errors = _infer_all(core, mv, [{"feeds": f, "key": "input_ids"} for f in reqs])
    _release(mv, held)
    _join(threads)
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], ServingError) and errors[1].code is Code.INVALID_ARGUMENT
    assert "out of range" in errors[1].message
    _assert_same(results[0], ref.predict(reqs[0]))
    _assert_same(results[2], ref.predict(reqs[2]))
    core.stop()


def test_sentence_requests_merge_when_their_padded_lengths_are_equal(text_plan):
    """Sentences are tokenized per request, padded as they would be alone; requests whose padded
    lengths are equal run as one batch, the others apart -- each answer bit for bit
    ``Predictor.predict_texts`` of the request alone (the embedding and the token outputs)."""
    ref = bfpaccel.Predictor(text_plan)
    front = ref.text_front
    groups = [["Hello, world!", "a dog is running"], ["the cat"], ["the cats sat"], ["a dog", "the cat"]]
    lengths = [front.tokenize(g)["input_ids"].shape[1] for g in groups]
    assert lengths == [6, 4, 6, 4]
    core = _core(text_plan, name="enc", max_batch_size=8, timeout_s=0.05)
    mv = core.resolve("enc")
    calls: List[Any] = []
    held = [_FeedRecording(p, calls) for p in _take_workers(core, mv)]
    emb = front.embedding_name
    outs = [[emb], [emb, "token_embeddings"], [emb], ["token_embeddings"]]
    threads, results, errors = _infer_all(core, mv, [{"texts": g, "key": "text", "outputs": o}
                                                     for g, o in zip(groups, outs)])
    _release(mv, held)
    _join(threads)
    assert errors == [None] * 4
    assert sorted(calls) == [(3, 4), (3, 6)], calls
    for g, o, got in zip(groups, outs, results):
        _assert_same(got, ref.predict_texts(g, o))
    core.stop()


def test_sentence_the_front_refuses_is_invalid_argument(tmp_path):
    pytest.importorskip("tokenizers")
    from bfpaccel.serve.testing import build_tiny_text_plan

    path = str(tmp_path / "strict.bfpplan")
    build_tiny_text_plan(path, text_front={"truncation": False, "max_length": 6})
    core = _core(path, name="enc", max_batch_size=8, timeout_s=0.01)
    mv = core.resolve("enc")
    assert core.batcher.accepts(mv, ["the cat sat on the mat"])
    with pytest.raises(ServingError) as ei:
        core.infer(mv, texts=["the cat sat on the mat"], key="text")
    assert ei.value.code is Code.INVALID_ARGUMENT and "'text'" in ei.value.message and "max_length" in ei.value.message
    core.stop()


@pytest.fixture(scope="module")
def server(tiny):
    h = serve(tiny, port=0, metrics_port=0, workers=2, batching=True, max_batch_size=8, batch_timeout_ms=2.0)
    yield h
    h.stop(grace=1)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _metric(text: str, name: str, model: str = "tiny") -> float:
    m = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_concurrent_grpc_rows_bit_identical(server, ref):
    """8 threads of Predict with distinct float inputs (1-3 rows), batching on: no error, every
    row bit-identical to batch 1 in process, merged calls of more than one request."""
    import grpc

    duration = 60.0 if LONG else 3.0
    n_threads = 8
    rows0, calls0 = server.metrics.batch_totals("tiny")
    inputs = [[_rows(1000 * t + k, 1 + (t + k) % 3) for k in range(6)] for t in range(n_threads)]
    wants = [[ref.predict(x)[TINY_OUTPUT] for x in xs] for xs in inputs]
    done = [0] * n_threads
    bad: List[str] = []
    lat: List[float] = []
    lock = threading.Lock()
    t_end = time.monotonic() + duration

    def client(t: int) -> None:
        c = PredictionClient("127.0.0.1", server.port, retry="none")
        try:
            k = 0
            while time.monotonic() < t_end:
                x, want = inputs[t][k % 6], wants[t][k % 6]
                t0 = time.perf_counter()
                try:
                    got = c.predict({"x": x}, outputs=[TINY_OUTPUT], timeout=30)[TINY_OUTPUT]
                except grpc.RpcError as e:
                    with lock:
                        bad.append(f"thread {t}: {e.code()} {e.details()}")
                    return
                with lock:
                    lat.append(time.perf_counter() - t0)
                if got.shape != want.shape or not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
                    with lock:
                        bad.append(f"thread {t} input {k % 6}: bits differ")
                    return
                done[t] += 1
                k += 1
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
    t_start = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(duration + 120)
    wall = time.monotonic() - t_start
    assert not bad, bad[:5]
    total = sum(done)
    assert total > 0 and all(done), done
    rows, calls = server.metrics.batch_totals("tiny")
    rows, calls = rows - rows0, calls - calls0
    assert calls < total and rows / calls > 1.0, (rows, calls, total)  # requests were merged
    text = _scrape(server.metrics_port)
    assert _metric(text, "bfpaccel_batch_size_count") >= calls
    assert _metric(text, "bfpaccel_batch_size_sum") >= rows
    assert 'bfpaccel_batch_size_bucket{model="tiny",le="1"}' in text
    n_split = _metric(text, "bfpaccel_queue_seconds_count")
    assert n_split == _metric(text, "bfpaccel_compute_seconds_count") >= total
    assert _metric(text, "bfpaccel_queue_seconds_sum") > 0 and _metric(text, "bfpaccel_compute_seconds_sum") > 0
    buckets = {m.group(1): int(m.group(2)) for m in
               re.finditer(r'^bfpaccel_batch_size_bucket{model="tiny",le="([^"]+)"} (\d+)$', text, re.M)}
    lat.sort()
    print(f"\nbatching: {n_threads} threads x {wall:.1f} s: {total} requests ({total / wall:.1f}/s, "
          f"{sum(int(x.shape[0]) for xs in inputs for x in xs) / 6 / n_threads:.1f} rows each on average), "
          f"0 errors, 0 differing rows; {calls} model calls of {rows / calls:.2f} rows on average; "
          f"latency p50 {1e3 * lat[len(lat) // 2]:.1f} ms p99 {1e3 * lat[int(len(lat) * 0.99)]:.1f} ms; "
          f"queue {_metric(text, 'bfpaccel_queue_seconds_sum') / n_split * 1e3:.2f} ms, compute "
          f"{_metric(text, 'bfpaccel_compute_seconds_sum') / n_split * 1e3:.2f} ms per request; "
          f"batch-size buckets (cumulative) {buckets}")


def test_grpc_deadline_and_images_unbatched(server, ref):
    import grpc

    mv = server.core.resolve("tiny")
    c = PredictionClient("127.0.0.1", server.port, retry="none")
    try:
        held = _take_workers(server.core, mv)
        try:
            with pytest.raises(grpc.RpcError) as e:
                c.predict({"x": _rows(1)}, timeout=0.3)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            _release(mv, held)
        _until(lambda: server.core.batcher.pending(mv) == 0)
        before = server.metrics.batch_totals("tiny")
        img = make_image("jpeg")
        got = c.predict({"images": [img]})[TINY_OUTPUT]
        _assert_same({"o": got}, {"o": ref.predict_images([img])[TINY_OUTPUT]})
        assert server.metrics.batch_totals("tiny") == before  # images take the unbatched path
        big = _rows(11, 9)  # more rows than max_batch_size: alone
        _assert_same({"o": c.predict({"x": big})[TINY_OUTPUT]}, {"o": ref.predict(big)[TINY_OUTPUT]})
        assert server.metrics.batch_totals("tiny") == before
    finally:
        c.close()


def test_cli_batching_flags(tiny, ref):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    proc, port = spawn_server(["--plan", tiny, "--name", "tiny", "--batching", "--max-batch-size", "4",
                               "--batch-timeout-ms", "20", "--preferred-batch-sizes", "2,4", "--workers", "1",
                               "--metrics-port", str(metrics_port), "--quiet"])
    try:
        xs = [_rows(600 + i) for i in range(4)]
        out: List[Any] = [None] * 4

        def call(i: int) -> None:
            with PredictionClient("127.0.0.1", port, retry="none") as c:
                out[i] = c.predict({"x": xs[i]}, outputs=[TINY_OUTPUT], timeout=30)[TINY_OUTPUT]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        _join(threads)
        for x, got in zip(xs, out):
            _assert_same({"o": got}, {"o": ref.predict(x)[TINY_OUTPUT]})
        text = _scrape(metrics_port)
        assert _metric(text, "bfpaccel_batch_size_sum") == 4  # every request went through the batcher
        assert 1 <= _metric(text, "bfpaccel_batch_size_count") <= 4
    finally:
        proc.terminate()
        proc.wait(30)
