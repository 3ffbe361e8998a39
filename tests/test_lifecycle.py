"""Model folders (bfpaccel.serve.lifecycle): layouts, version policies, labels, hot swaps under
load with no failed request, failed loads, warm-up files (TFRecord of PredictionLog) and the
KServe single-model layout.  Plans are tiny (built in well under 1 s each)."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
import time

import grpc
import numpy as np
import pytest

pytest.importorskip("onnx")

import bfpaccel  # noqa: E402
from bfpaccel.runtime.predictor import Predictor  # noqa: E402
from bfpaccel.serve import _protos as pb  # noqa: E402
from bfpaccel.serve import serve  # noqa: E402
from bfpaccel.serve.codec import make_tensor_proto  # noqa: E402
from bfpaccel.serve.core import ServingCore, VersionState  # noqa: E402
from bfpaccel.serve.lifecycle import (WARMUP_FILE, ModelFolder, WarmupError, crc32c, initial_load,  # noqa: E402
                                      masked_crc32c, parse_version_policy, read_tfrecords, read_warmup_requests,
                                      write_tfrecords, write_warmup_file)
from bfpaccel.serve.testing import build_tiny_plan, make_image  # noqa: E402

AVAILABLE, END = pb.ModelVersionState["AVAILABLE"], pb.ModelVersionState["END"]


# ---------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """Three tiny plans with different weights (seed = version)."""
    d = tmp_path_factory.mktemp("plans")
    return {v: build_tiny_plan(str(d / f"tiny{v}.bfpplan"), seed=v) for v in (1, 2, 3)}


def publish(model_dir, version, plan, warmup_requests=None):
    """Writes a version the documented way: under a temporary name, then a rename."""
    tmp = os.path.join(model_dir, f".{version}.tmp")
    os.makedirs(tmp)
    shutil.copyfile(plan, os.path.join(tmp, "model.bfpplan"))
    if warmup_requests is not None:
        write_warmup_file(os.path.join(tmp, WARMUP_FILE), warmup_requests)
    os.rename(tmp, os.path.join(model_dir, str(version)))


def make_root(tmp_path, plans, versions, name="m"):
    root = tmp_path / "models"
    (root / name).mkdir(parents=True)
    for v in versions:
        publish(str(root / name), v, plans[v])
    return str(root)


def loaded(core, name="m"):
    e = core.models[name]
    return sorted(v for v, mv in e.versions.items() if mv.available)


def folder_core(root, workers=1, **kw):
    core = ServingCore(workers=workers)
    folder = ModelFolder(core, root, **kw)
    folder.register()
    initial_load(core, folder)
    return core, folder


def image_request(n=1, name=""):
    req = pb.PredictRequest()
    if name:
        req.model_spec.name = name
    req.inputs["images"].CopyFrom(make_tensor_proto([make_image("jpeg", seed=i) for i in range(n)]))
    return req


def _stub(ch, method, resp_cls):
    return ch.unary_unary(method, request_serializer=lambda m: m.SerializeToString(),
                          response_deserializer=resp_cls.FromString)


def predict(port, req, timeout=30):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return _stub(ch, pb.PREDICT_METHOD, pb.PredictResponse)(req, timeout=timeout)


def status(port, name, version=None, label=None):
    req = pb.GetModelStatusRequest()
    req.model_spec.name = name
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        r = _stub(ch, pb.GET_MODEL_STATUS_METHOD, pb.GetModelStatusResponse)(req, timeout=10)
    return [(s.version, s.state, s.status.error_message) for s in r.model_version_status]


class Load:
    """``threads`` clients calling Predict without a version, each on its own channel, until
    stopped; records (start time, version answered) and every error."""

    def __init__(self, port, threads=4):
        self.port = port
        self.results = []
        self.errors = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        req = image_request()
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            fn = _stub(ch, pb.PREDICT_METHOD, pb.PredictResponse)
            while not self._stop.is_set():
                t = time.monotonic()
                try:
                    r = fn(req, timeout=30)
                    with self._lock:
                        self.results.append((t, r.model_spec.version.value))
                except grpc.RpcError as e:
                    with self._lock:
                        self.errors.append((t, e.code(), e.details()))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def wait_for(self, n, timeout=30):
        deadline = time.monotonic() + timeout
        while len(self.results) < n and time.monotonic() < deadline and not self.errors:
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(30)


# ---------------------------------------------------------------------- policies and layout
def test_parse_version_policy():
    assert parse_version_policy(None) == parse_version_policy("latest") == parse_version_policy("latest:1")
    assert parse_version_policy("latest:3").numbers == (3,)
    assert parse_version_policy("all").select([3, 1, 2]) == [1, 2, 3]
    assert parse_version_policy("specific:3,1").numbers == (1, 3)
    assert parse_version_policy("latest:2").select([5, 1, 9, 7]) == [7, 9]
    assert parse_version_policy("specific:2,4").select([1, 2, 3]) == [2]
    for bad in ("", "latest:0", "latest:x", "all:1", "specific:", "specific:1,1", "specific:0", "newest", 3):
        with pytest.raises(ValueError):
            parse_version_policy(bad)


@pytest.mark.parametrize("policy,want", [(None, [2]), ("latest", [2]), ("latest:2", [1, 2]), ("latest:5", [1, 2]),
                                         ("all", [1, 2]), ("specific:1", [1]), ("specific:1,2", [1, 2])])
def test_policies_pick_versions(tmp_path, plans, policy, want):
    core, _ = folder_core(make_root(tmp_path, plans, [1, 2]), version_policy=policy)
    assert loaded(core) == want
    assert core.is_ready()
    # a request without a version runs on the newest one
    assert core.resolve("m").version == want[-1]


def test_start_errors(tmp_path, plans):
    core = ServingCore(workers=1)
    with pytest.raises(FileNotFoundError):
        ModelFolder(core, tmp_path / "nope").register()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model"):
        ModelFolder(core, tmp_path / "empty").register()
    root = make_root(tmp_path, plans, [1, 2])
    with pytest.raises(ValueError, match="no version that version policy specific:7 serves"):
        ModelFolder(core, root, version_policy="specific:7").register()
    with pytest.raises(ValueError, match="not served"):
        ModelFolder(core, root, version_labels={"stable": 1}).register()  # latest:1 serves 2 only
    with pytest.raises(ValueError, match="does not serve"):
        ModelFolder(core, root, version_policy="specific:2", version_labels={"stable": 1})
    for kw in ({"version_policy": "newest"}, {"version_labels": {"bad label": 1}}, {"version_labels": {"x": 0}},
               {"poll_seconds": -1}, {"synthetic_warmup": -1}, {"model_name": "a/b"}):
        with pytest.raises(ValueError):
            ModelFolder(core, root, **kw)
    core.load_version("m", 1, plans[1])
    with pytest.raises(ValueError, match="already served"):
        ModelFolder(core, root).register()


def test_ignored_entries_and_folders_being_written(tmp_path, plans):
    root = make_root(tmp_path, plans, [1])
    m = os.path.join(root, "m")
    for hidden in (".5", "6.tmp", "7~", "x", "0"):  # hidden, temporary, not a positive integer
        os.makedirs(os.path.join(m, hidden))
        shutil.copyfile(plans[2], os.path.join(m, hidden, "model.bfpplan"))
    os.makedirs(os.path.join(m, "4"))  # a version folder that has no plan yet
    core, folder = folder_core(root, version_policy="all")
    assert loaded(core) == [1]
    assert sorted(folder.scan()["m"]) == [1, 4]
    assert folder.scan()["m"][4].problem.startswith("holds no")
    # written in place (the same folder, a plan appearing): not loaded until a scan finds it unchanged
    shutil.copyfile(plans[2], os.path.join(m, "4", "model.bfpplan"))
    s = folder.sync()
    assert not s.loaded and s.pending == [("m", 4, "changed since the last scan (still being written?)")]
    s = folder.sync()
    assert [(r.name, r.version) for r in s.loaded] == [("m", 4)]
    assert loaded(core) == [1, 4]
    # a temporary file beside the plan is ignored; two plans are refused
    open(os.path.join(m, "4", "model.bfpplan.tmp"), "wb").close()
    assert folder.scan()["m"][4].problem is None
    os.makedirs(os.path.join(m, ".9.tmp"))
    for f in ("a.bfpplan", "b.bfpplan"):
        shutil.copyfile(plans[3], os.path.join(m, ".9.tmp", f))
    os.rename(os.path.join(m, ".9.tmp"), os.path.join(m, "9"))
    s = folder.sync()
    assert not s.loaded and s.pending[0][:2] == ("m", 9) and "several model files" in s.pending[0][2]


def test_onnx_version_is_compiled_at_load(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w, b = rng.standard_normal((16, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                          "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    (tmp_path / "root" / "lin" / "1").mkdir(parents=True)
    path = str(tmp_path / "root" / "lin" / "1" / "model.onnx")
    onnx.save(m, path)
    core, folder = folder_core(str(tmp_path / "root"))
    assert loaded(core, "lin") == [1]
    x = rng.standard_normal((3, 16)).astype(np.float32)
    got = core.infer(core.resolve("lin"), x=x)["y"]
    want = Predictor(bfpaccel.compile(path, format="msfp16")).predict(x)["y"]
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# ---------------------------------------------------------------------- hot swaps
@pytest.mark.parametrize("mode", ["reload", "poll"])
def test_hot_swap_under_load(tmp_path, plans, mode, caplog):
    """4 clients call Predict (no version) without pause while version 3 is published; not one
    request fails, the answers move to version 3, the retired versions are unloaded."""
    caplog.set_level(logging.INFO, logger="bfpaccel.serve")
    root = make_root(tmp_path, plans, [1, 2])
    policy = "latest:1" if mode == "reload" else "latest:2"
    h = serve(None, port=0, model_root=root, version_policy=policy, workers=2,
              poll_seconds=0.2 if mode == "poll" else 0.0)
    try:
        assert status(h.port, "m") == ([(2, AVAILABLE, "")] if mode == "reload" else
                                       [(1, AVAILABLE, ""), (2, AVAILABLE, "")])
        with Load(h.port) as load:
            load.wait_for(40)
            assert load.results and not load.errors
            publish(os.path.join(root, "m"), 3, plans[3])
            if mode == "reload":
                summary = h.reload()
                assert [(r.name, r.version) for r in summary.loaded] == [("m", 3)]
                assert summary.unloaded == [("m", 2)] and not summary.failed
                # a tiny plan may load into memory freed earlier: the peak growth can be 0
                assert summary.peak_rss_delta_bytes >= 0 and summary.loaded[0].peak_rss_delta_bytes >= 0
                print(f"\nswap summary: {summary}")
            else:
                deadline = time.monotonic() + 30
                while sorted(h.core.models["m"].versions) != [2, 3] and time.monotonic() < deadline:
                    time.sleep(0.05)
            swapped = time.monotonic()
            n = len(load.results)
            load.wait_for(n + 40)
        assert load.errors == [], load.errors[:5]
        versions = [v for _, v in load.results]
        assert versions.count(2) > 0 and versions.count(3) > 0
        after = [v for t, v in load.results if t > swapped]
        assert after and set(after) == {3}
        want = [(3, AVAILABLE, "")] if mode == "reload" else [(2, AVAILABLE, ""), (3, AVAILABLE, "")]
        assert status(h.port, "m") == want
        assert loaded(h.core) == [v for v, _, _ in want]
        assert any("unloaded m" in r.getMessage() and "swap peak RSS" in r.getMessage() for r in caplog.records)
        metrics = h.core.metrics.render()
        assert f"bfpaccel_model_versions_loaded {len(want)}" in metrics
    finally:
        h.stop(grace=1)


def test_request_that_resolved_a_retiring_version_still_runs(tmp_path, plans):
    """A request that resolved the old version just before the swap (and reaches its model
    call while the version is being retired) is answered by it."""
    root = make_root(tmp_path, plans, [1])
    core, folder = folder_core(root, drain_grace_s=1.0)
    mv = core.resolve("m")
    publish(os.path.join(root, "m"), 2, plans[2])
    t = threading.Thread(target=folder.sync)
    t.start()
    deadline = time.monotonic() + 30
    while mv.state is not VersionState.UNLOADING and time.monotonic() < deadline:
        time.sleep(0.001)
    assert mv.state is VersionState.UNLOADING and core.resolve("m").version == 2
    out = core.infer(mv, x=np.zeros((1, 224, 224, 3), np.float32), timeout_s=10)
    t.join()
    assert next(iter(out.values())).shape == (1, 10)
    assert mv.state is VersionState.END and loaded(core) == [2]


def test_failed_load_keeps_serving(tmp_path, plans):
    root = make_root(tmp_path, plans, [1])
    h = serve(None, port=0, model_root=root, workers=1)
    try:
        bad = os.path.join(root, "m", ".2.tmp")
        os.makedirs(bad)
        with open(os.path.join(bad, "model.bfpplan"), "wb") as f:
            f.write(b"PK\x03\x04 not really a plan")
        os.rename(bad, os.path.join(root, "m", "2"))
        with Load(h.port, threads=2) as load:
            load.wait_for(10)
            s = h.reload()
            load.wait_for(len(load.results) + 10)
        assert load.errors == [] and {v for _, v in load.results} == {1}
        assert [(f.name, f.version) for f in s.failed] == [("m", 2)] and "PlanError" in s.failed[0].error
        assert not s.loaded and not s.unloaded
        st = status(h.port, "m")
        assert st[0] == (1, AVAILABLE, "") and st[1][:2] == (2, END) and "PlanError" in st[1][2]
        assert h.core.is_ready()
        # the failed version is not served (as TF Serving: not found); GetModelStatus says why
        req = image_request(name="m")
        req.model_spec.version.value = 2
        with pytest.raises(grpc.RpcError) as e:
            predict(h.port, req)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "available: [1]" in e.value.details()
        # not retried while the folder is unchanged
        s = h.reload()
        assert not s.changed
        # a fixed version 2 (renamed in over the broken one) waits for a scan that finds it
        # unchanged, then is loaded and 1 retires
        shutil.rmtree(os.path.join(root, "m", "2"))
        publish(os.path.join(root, "m"), 2, plans[2])
        s = h.reload()
        assert not s.changed and s.pending == [("m", 2, "changed since the last scan (still being written?)")]
        s = h.reload()
        assert [(r.name, r.version) for r in s.loaded] == [("m", 2)] and s.unloaded == [("m", 1)]
        assert status(h.port, "m") == [(2, AVAILABLE, "")]
        assert predict(h.port, image_request()).model_spec.version.value == 2
    finally:
        h.stop(grace=1)


def test_rollback_new_model_and_empty_folder(tmp_path, plans, caplog):
    root = make_root(tmp_path, plans, [1, 2])
    core, folder = folder_core(root)
    assert loaded(core) == [2]
    # deleting the newest version rolls back to the one before
    shutil.rmtree(os.path.join(root, "m", "2"))
    s = folder.sync()
    assert [r.version for r in s.loaded] == [1] and s.unloaded == [("m", 2)]
    # a model that appears while serving is added once it is available; a broken one never is
    os.makedirs(os.path.join(root, "n"))
    publish(os.path.join(root, "n"), 1, plans[3])
    os.makedirs(os.path.join(root, "broken", "1"))
    with open(os.path.join(root, "broken", "1", "m.bfpplan"), "wb") as f:
        f.write(b"junk")
    s = folder.sync()
    assert [(r.name, r.version) for r in s.loaded] == [("n", 1)] and [f.name for f in s.failed] == ["broken"]
    assert sorted(core.models) == ["m", "n"] and core.is_ready()
    # an emptied model folder keeps what it serves (and says so)
    caplog.set_level(logging.WARNING, logger="bfpaccel.serve")
    shutil.rmtree(os.path.join(root, "n", "1"))
    s = folder.sync()
    assert not s.changed and loaded(core, "n") == [1]
    assert any("no version to serve" in w for w in s.warnings)


# ---------------------------------------------------------------------- labels
def test_labels(tmp_path, plans, caplog):
    root = make_root(tmp_path, plans, [1, 2])
    with pytest.raises(ValueError, match="not served"):
        serve(None, port=0, model_root=root, version_policy="latest:2", version_labels={"prod": 5})
    h = serve(None, port=0, model_root=root, version_policy="latest:2",
              version_labels={"prod": 1, "canary": 2}, workers=1)
    try:
        assert h.core.models["m"].labels == {"prod": 1, "canary": 2}
        for label, v in (("prod", 1), ("canary", 2)):
            req = image_request(name="m")
            req.model_spec.version_label = label
            assert predict(h.port, req).model_spec.version.value == v
            assert status(h.port, "m", label=label) == [(v, AVAILABLE, "")]
        # version 3 retires 1 (latest:2): the label 'prod' is left out with a warning
        caplog.set_level(logging.WARNING, logger="bfpaccel.serve")
        publish(os.path.join(root, "m"), 3, plans[3])
        s = h.reload()
        assert s.unloaded == [("m", 1)]
        assert h.core.models["m"].labels == {"canary": 2}
        assert any("'prod'" in w for w in s.warnings)
        assert any("version label 'prod'" in r.getMessage() for r in caplog.records)
        req = image_request(name="m")
        req.model_spec.version_label = "prod"
        with pytest.raises(grpc.RpcError) as e:
            predict(h.port, req)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        h.stop(grace=1)


def test_startup_log_names_model_root_models(tmp_path, plans, caplog):
    """serve()'s startup line lists the models of --model-root with their versions, next to the
    plans given directly."""
    root = make_root(tmp_path, plans, [1, 2])
    caplog.set_level(logging.INFO, logger="bfpaccel.serve")
    h = serve({"direct": plans[3]}, port=0, model_root=root, version_policy="latest:2", workers=1)
    try:
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving ")]
        assert len(lines) == 1, lines
        assert f"m (versions 1, 2; --model-root {root})" in lines[0], lines[0]
        assert "direct (version 1)" in lines[0], lines[0]
        assert f":{h.port} (plaintext)" in lines[0]
    finally:
        h.stop(grace=1)


# ---------------------------------------------------------------------- warm-up
def test_crc32c_and_tfrecord_framing(tmp_path):
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0 and crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert masked_crc32c(b"") == 0xA282EAD8
    p = write_tfrecords(tmp_path / "r", [b"", b"abc", bytes(range(256)) * 10])
    assert read_tfrecords(p) == [b"", b"abc", bytes(range(256)) * 10]
    with pytest.raises(WarmupError, match="more than 2 records"):
        read_tfrecords(p, max_records=2)
    # a length beyond the end of the file (with a valid length CRC) is refused before reading
    head = struct.pack("<Q", 1 << 40)
    (tmp_path / "huge").write_bytes(head + struct.pack("<I", masked_crc32c(head)) + b"xx")
    with pytest.raises(WarmupError, match="truncated"):
        read_tfrecords(tmp_path / "huge")
    (tmp_path / "junk").write_bytes(b"this is not a tfrecord file")
    with pytest.raises(WarmupError, match="length CRC mismatch"):
        read_tfrecords(tmp_path / "junk")


def _warmup_requests():
    a = image_request(2)  # two encoded images
    b = pb.PredictRequest()
    b.inputs["x"].CopyFrom(make_tensor_proto(np.full((1, 224, 224, 3), 0.25, np.float32)))
    b.output_filter.append("output_alias")
    return [a, b]


@pytest.fixture
def predict_calls(monkeypatch):
    """Every Predictor.predict call: (input shape, distinct input values (up to 3))."""
    calls = []
    orig = Predictor.predict

    def spy(self, x, outputs=None):
        calls.append((tuple(x.shape), tuple(np.unique(x)[:3].tolist())))
        return orig(self, x, outputs)

    monkeypatch.setattr(Predictor, "predict", spy)
    return calls


def test_warmup_file_is_replayed_before_available(tmp_path, plans, predict_calls):
    root = tmp_path / "models"
    (root / "m").mkdir(parents=True)
    publish(str(root / "m"), 1, plans[1], warmup_requests=_warmup_requests())
    reqs = read_warmup_requests(root / "m" / "1" / WARMUP_FILE)
    assert len(reqs) == 2 and reqs[1].output_filter == ["output_alias"]
    core, folder = folder_core(str(root), workers=2)
    assert loaded(core) == [1]
    # each of the 2 workers ran both records, and nothing else (no synthetic zero input)
    assert len(predict_calls) == 4
    assert sum(shape == (2, 224, 224, 3) for shape, _ in predict_calls) == 2
    assert predict_calls.count(((1, 224, 224, 3), (0.25,))) == 2
    assert "2 records" in folder.last_summary.loaded[0].warmup


def test_official_warmup_file_from_tensorflow(tmp_path, plans, predict_calls):
    """A warm-up file written by TensorFlow's own TFRecord writer with the official
    PredictionLog messages is replayed; ours reads back in TensorFlow."""
    tf = pytest.importorskip("tensorflow")
    prediction_log_pb2 = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
    root = tmp_path / "models"
    (root / "m" / "1" / "assets.extra").mkdir(parents=True)
    shutil.copyfile(plans[1], root / "m" / "1" / "model.bfpplan")
    with tf.io.TFRecordWriter(str(root / "m" / "1" / WARMUP_FILE)) as w:
        for req in _warmup_requests():
            entry = prediction_log_pb2.PredictionLog()
            entry.predict_log.request.ParseFromString(req.SerializeToString())
            w.write(entry.SerializeToString())
    core, _ = folder_core(str(root), workers=1)
    assert loaded(core) == [1] and len(predict_calls) == 2
    ours = write_warmup_file(tmp_path / "ours", _warmup_requests())
    back = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(ours)]
    assert [r.predict_log.request.SerializeToString() for r in back] == \
        [q.SerializeToString() for q in _warmup_requests()]


def _corrupt(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "crc":
        data[20] ^= 0x01  # a byte inside the first record's data
    elif how == "truncated":
        data = data[:-3]
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how,message", [("crc", "data CRC mismatch"), ("truncated", "truncated"),
                                         ("not-a-log", "is not a tensorflow.serving.PredictionLog"),
                                         ("refused", "warm-up record 0 was refused: unknown input")])
def test_bad_warmup_file_fails_that_version(tmp_path, plans, how, message):
    root = make_root(tmp_path, plans, [1])
    core, folder = folder_core(root, workers=1)
    m = os.path.join(root, "m")
    if how == "refused":
        req = pb.PredictRequest()
        req.inputs["nope"].CopyFrom(make_tensor_proto(np.zeros((1, 224, 224, 3), np.float32)))
        publish(m, 2, plans[2], warmup_requests=[req])
    else:
        publish(m, 2, plans[2], warmup_requests=_warmup_requests())
        wf = os.path.join(m, "2", WARMUP_FILE)
        if how == "not-a-log":
            write_tfrecords(wf, [b"\xff\xff\xff\xff"])
        else:
            _corrupt(wf, how)
    s = folder.sync()
    assert [(f.name, f.version) for f in s.failed] == [("m", 2)]
    assert "WarmupError" in s.failed[0].error and message in s.failed[0].error, s.failed[0].error
    assert loaded(core) == [1] and core.models["m"].versions[2].state is VersionState.END
    # at start, the same file makes serve() fail with the reason
    root2 = tmp_path / "start"
    shutil.copytree(os.path.join(m, "2"), root2 / "m" / "1")
    with pytest.raises(RuntimeError, match=message.split(":")[0]):
        serve(None, port=0, model_root=str(root2), workers=1)


def test_synthetic_warmup_and_warmup_file_for_plain_plans(tmp_path, plans, predict_calls):
    h = serve(plans[1], port=0, workers=2, synthetic_warmup=3)
    h.stop(grace=0)
    assert predict_calls == [((1, 224, 224, 3), (0.0,))] * 6
    predict_calls.clear()
    h = serve(plans[1], port=0, workers=2, synthetic_warmup=0)
    h.stop(grace=0)
    assert predict_calls == []
    wf = write_warmup_file(tmp_path / "warmup", _warmup_requests()[1:])
    h = serve(plans[1], port=0, workers=1, warmup_file=wf)
    h.stop(grace=0)
    assert predict_calls == [((1, 224, 224, 3), (0.25,))]
    with pytest.raises(ValueError):
        serve(plans[1], port=0, synthetic_warmup=-1)
    with pytest.raises(FileNotFoundError):
        serve(plans[1], port=0, warmup_file=tmp_path / "none")


# ---------------------------------------------------------------------- KServe's layout
def test_kserve_single_model_folder(tmp_path, plans):
    """--model-name: the folder is one model's (/mnt/models): a plan directly in it is version 1."""
    root = tmp_path / "mnt-models"
    root.mkdir()
    shutil.copyfile(plans[2], root / "model.bfpplan")
    (root / "README.txt").write_text("other files are fine")
    h = serve(None, port=0, model_root=str(root), model_name="resnet", workers=1)
    try:
        assert h.routes == ["resnet"]
        r = predict(h.port, image_request())  # no model name: the single model
        assert (r.model_spec.name, r.model_spec.version.value) == ("resnet", 1)
        assert status(h.port, "resnet") == [(1, AVAILABLE, "")]
        want = Predictor(plans[2]).predict_images([make_image("jpeg", seed=0)])
        got = np.array(list(next(iter(r.outputs.values())).float_val), np.float32)
        np.testing.assert_array_equal(got.view(np.uint32), next(iter(want.values())).reshape(-1).view(np.uint32))
    finally:
        h.stop(grace=1)
    # ... or its version folders directly
    root2 = tmp_path / "versions"
    root2.mkdir()
    publish(str(root2), 1, plans[1])
    publish(str(root2), 2, plans[2])
    core, folder = folder_core(str(root2), model_name="resnet", version_policy="all")
    assert loaded(core, "resnet") == [1, 2]


# ---------------------------------------------------------------------- the command line
def test_cli_model_root_flags(tmp_path, plans):
    """bfpaccel serve --model-root/--version-policy/--version-label/--poll-seconds reach serve()."""
    from conftest import spawn_server

    root = make_root(tmp_path, plans, [1, 2])
    proc, port = spawn_server(["--model-root", root, "--version-policy", "all", "--version-label", "canary=1",
                               "--poll-seconds", "0.2", "--synthetic-warmup", "2", "--workers", "1", "--quiet"])
    try:
        assert status(port, "m") == [(1, AVAILABLE, ""), (2, AVAILABLE, "")]
        req = image_request(name="m")
        req.model_spec.version_label = "canary"
        assert predict(port, req).model_spec.version.value == 1
        publish(os.path.join(root, "m"), 3, plans[3])
        deadline = time.monotonic() + 30
        while len(status(port, "m")) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status(port, "m")[-1] == (3, AVAILABLE, "")
        assert predict(port, image_request()).model_spec.version.value == 3
    finally:
        proc.terminate()
        proc.wait(30)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copyfile(plans[1], single / "model.bfpplan")
    proc, port = spawn_server(["--model-root", str(single), "--model-name", "resnet", "--workers", "1", "--quiet"])
    try:
        r = predict(port, image_request())
        assert (r.model_spec.name, r.model_spec.version.value) == ("resnet", 1)
    finally:
        proc.terminate()
        proc.wait(30)
