"""The gRPC server (bfpaccel.serve.server) on 127.0.0.1: wire compatibility with the seed's
client and the official tensorflow-serving-api stubs, errors, routing, auth, TLS, concurrency,
health, reflection, metrics and SIGTERM draining.  Plans are tiny (built in well under 1 s)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

pytest.importorskip("onnx")

import bfpaccel  # noqa: E402
from conftest import spawn_server  # noqa: E402
from bfpaccel.serve import _protos as pb  # noqa: E402
from bfpaccel.serve import PredictionClient, serve  # noqa: E402
from bfpaccel.serve.codec import make_ndarray, make_tensor_proto  # noqa: E402
from bfpaccel.serve.testing import TINY_OUTPUT, build_tiny_plan, make_image, self_signed_cert  # noqa: E402

ROUTE = "x-ms-aml-grpc-service-route"
C = grpc.StatusCode


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    return {"tiny": build_tiny_plan(str(d / "tiny.bfpplan")),
            "five": build_tiny_plan(str(d / "five.bfpplan"), seed=1, classes=5)}


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "cat.jpg"
    p.write_bytes(make_image("jpeg"))
    return str(p)


@pytest.fixture(scope="module")
def server(plans):
    h = serve(plans["tiny"], port=0, metrics_port=0)
    yield h
    h.stop(grace=1)


@pytest.fixture(scope="module")
def predictor(plans):
    return bfpaccel.Predictor(plans["tiny"])


def _call(port, request, metadata=(), method="Predict", resp=pb.PredictResponse, creds=None, timeout=10.0):
    """A call exactly as a hand-written stub makes it."""
    target = f"127.0.0.1:{port}"
    ch = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "localhost")]) \
        if creds else grpc.insecure_channel(target)
    with ch:
        fn = ch.unary_unary(f"/tensorflow.serving.PredictionService/{method}",
                            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
                            response_deserializer=resp.FromString)
        return fn(request, timeout=timeout, metadata=metadata)


def _seed_request(data: bytes, key: str = "images"):
    """What azureml.accel 1.62 score_file sends: no model_spec, no output_filter, DT_STRING [1]."""
    req = pb.PredictRequest()
    t = req.inputs[key]
    t.dtype = pb.DT_STRING
    t.tensor_shape.dim.add().size = 1
    t.string_val.append(data)
    return req


SEED_MD = (("authorization", "Bearer "), (ROUTE, "/api/v1/service/"))


def _code(fn):
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code(), ei.value.details()


# -- wire compatibility -------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["images", "Placeholder:0", "x"])
def test_seed_client_request_answered_like_the_seed_service(server, predictor, key):
    img = make_image("jpeg")
    resp = _call(server.port, _seed_request(img, key), SEED_MD)
    want = predictor.predict_images([img])[TINY_OUTPUT]
    assert set(resp.outputs) == {TINY_OUTPUT, "output_alias"}
    for k in resp.outputs:
        t = resp.outputs[k]
        assert t.dtype == pb.DT_FLOAT and not t.tensor_content and len(t.float_val) == 10  # float_val, as the seed
        assert [d.size for d in t.tensor_shape.dim] == [1, 10]
        np.testing.assert_array_equal(make_ndarray(t), want)
    assert resp.model_spec.name == "tiny" and resp.model_spec.version.value == 1


def test_batch_of_images_png_gif(server, predictor):
    imgs = [make_image("jpeg", seed=1), make_image("png", seed=2), make_image("gif", seed=3)]
    req = pb.PredictRequest()
    req.inputs["images"].CopyFrom(make_tensor_proto(imgs))
    resp = _call(server.port, req)
    np.testing.assert_array_equal(make_ndarray(resp.outputs[TINY_OUTPUT]), predictor.predict_images(imgs)[TINY_OUTPUT])


@pytest.mark.parametrize("dtype,content", [(np.float32, True), (np.float32, False), (np.float64, True),
                                           (np.uint8, True), (np.int32, False)])
def test_numeric_inputs(server, predictor, dtype, content):
    x = (np.random.default_rng(0).random((2, 224, 224, 3)) * 200).astype(dtype)
    req = pb.PredictRequest()
    req.inputs["x"].CopyFrom(make_tensor_proto(x, use_tensor_content=content))
    resp = _call(server.port, req)
    np.testing.assert_array_equal(make_ndarray(resp.outputs["output_alias"]),
                                  predictor.predict(x.astype(np.float32))[TINY_OUTPUT])


def test_output_filter_and_model_spec(server):
    req = _seed_request(make_image())
    req.output_filter.append("output_alias")
    req.model_spec.name = "tiny"
    req.model_spec.signature_name = "serving_default"
    req.model_spec.version.value = 1
    resp = _call(server.port, req)
    assert list(resp.outputs) == ["output_alias"]


def test_get_model_metadata(server):
    req = pb.GetModelMetadataRequest()
    req.metadata_field.append("signature_def")
    resp = _call(server.port, req, method="GetModelMetadata", resp=pb.GetModelMetadataResponse)
    any_ = resp.metadata["signature_def"]
    assert any_.type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    sig = pb.SignatureDefMap.FromString(any_.value).signature_def["serving_default"]
    assert sig.inputs["images"].name == "Placeholder:0" and sig.inputs["images"].dtype == pb.DT_STRING
    assert [d.size for d in sig.inputs["x"].tensor_shape.dim] == [-1, 224, 224, 3]
    assert sig.outputs["output_alias"].name == TINY_OUTPUT
    assert [d.size for d in sig.outputs[TINY_OUTPUT].tensor_shape.dim] == [-1, 10]


_OFFICIAL = textwrap.dedent("""
    import sys, numpy as np, grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, get_model_metadata_pb2, prediction_service_pb2_grpc, model_pb2
    from tensorflow_serving.apis import classification_pb2
    # our private-pool messages load next to real TensorFlow's descriptors without a clash
    from bfpaccel.serve import _protos as pb, PredictionClient
    from bfpaccel.serve.codec import make_tensor_proto
    port, img = int(sys.argv[1]), open(sys.argv[2], "rb").read()
    # same field numbers/types as the official messages
    for ours, theirs in [(pb.TensorProto, tf.make_tensor_proto(1.0).__class__), (pb.PredictRequest, predict_pb2.PredictRequest),
                         (pb.PredictResponse, predict_pb2.PredictResponse),
                         (pb.ModelSpec, model_pb2.ModelSpec),
                         (pb.GetModelMetadataResponse, get_model_metadata_pb2.GetModelMetadataResponse),
                         (pb.SignatureDefMap, get_model_metadata_pb2.SignatureDefMap)]:
        o = {f.name: (f.number, f.type, f.is_repeated) for f in ours.DESCRIPTOR.fields}
        t = {f.name: (f.number, f.type, f.is_repeated) for f in theirs.DESCRIPTOR.fields if f.name in o}
        assert o == t, (ours.DESCRIPTOR.full_name, o, t)
        assert ours.DESCRIPTOR.full_name == theirs.DESCRIPTOR.full_name
    # codec == tf.make_tensor_proto bytes, and tf.make_ndarray reads ours
    for a in [np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(3, dtype=np.int64), np.array([1, 0], bool),
              np.arange(4, dtype=np.uint8), np.arange(2, dtype=np.float64), np.arange(3, dtype=np.int32)]:
        assert make_tensor_proto(a).SerializeToString() == tf.make_tensor_proto(a).SerializeToString(), a.dtype
    s = tf.make_tensor_proto([b"ab", b"c"])
    assert make_tensor_proto([b"ab", b"c"]).SerializeToString() == s.SerializeToString()
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "tiny"
    req.model_spec.signature_name = "serving_default"
    req.inputs["images"].CopyFrom(tf.make_tensor_proto([img], shape=[1]))
    resp = stub.Predict(req, 10.0)
    out = tf.make_ndarray(resp.outputs["classifier/tiny/predictions/Softmax:0"])
    assert out.shape == (1, 10) and abs(out.sum() - 1) < 1e-2, out
    ours = PredictionClient("127.0.0.1", port).score_file(sys.argv[2])
    np.testing.assert_array_equal(ours, out[0])
    md = get_model_metadata_pb2.GetModelMetadataRequest()
    md.model_spec.name = "tiny"
    md.metadata_field.append("signature_def")
    r = stub.GetModelMetadata(md, 10.0)
    sdm = get_model_metadata_pb2.SignatureDefMap()
    assert r.metadata["signature_def"].Unpack(sdm)
    assert sdm.signature_def["serving_default"].inputs["images"].name == "Placeholder:0"
    try:
        stub.Classify(classification_pb2.ClassificationRequest(), 10.0)
        raise SystemExit("Classify answered")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNIMPLEMENTED, e
    print("OFFICIAL-OK")
""")


def test_official_tensorflow_serving_stubs(server, jpeg):
    pytest.importorskip("tensorflow_serving")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-c", _OFFICIAL, str(server.port), jpeg], capture_output=True, text=True,
                       timeout=120, env=env)
    assert "OFFICIAL-OK" in r.stdout, r.stdout + r.stderr[-3000:]


# -- errors --------------------------------------------------------------------------------------

def test_invalid_arguments_name_the_problem(server):
    p = server.port
    cases = []
    cases.append((_seed_request(b"not an image"), "could not be decoded"))
    cases.append((_seed_request(make_image(), "pixels"), "unknown input 'pixels'"))
    r = _seed_request(make_image())
    r.output_filter.append("nope:0")
    cases.append((r, "unknown output 'nope:0'"))
    r = pb.PredictRequest()
    r.inputs["x"].CopyFrom(make_tensor_proto(np.zeros((1, 10, 10, 3), np.float32)))
    cases.append((r, "shape [1, 10, 10, 3]"))
    r = pb.PredictRequest()
    r.inputs["x"].CopyFrom(make_tensor_proto(np.zeros((1, 224, 224, 3), bool)))
    cases.append((r, "dtype DT_BOOL"))
    r = pb.PredictRequest()
    r.inputs["x"].dtype = pb.DT_COMPLEX64
    cases.append((r, "DT_COMPLEX64"))
    r = pb.PredictRequest()
    t = r.inputs["images"]
    t.dtype = pb.DT_STRING
    t.tensor_shape.dim.add().size = 3
    t.string_val.append(make_image())
    cases.append((r, "3"))
    cases.append((pb.PredictRequest(), "no inputs"))
    r = _seed_request(make_image())
    r.model_spec.signature_name = "classify"
    cases.append((r, "signature"))
    r = pb.PredictRequest()
    r.inputs["x"].CopyFrom(make_tensor_proto(np.zeros(7, np.float32)))
    r.inputs["x"].tensor_content = b"\0" * 5
    cases.append((r, "tensor_content"))
    for req, text in cases:
        code, details = _code(lambda: _call(p, req, SEED_MD))
        assert code == C.INVALID_ARGUMENT and text in details, (code, details)
    assert server.ready  # none of that disturbed it
    _call(p, _seed_request(make_image()), SEED_MD)


def test_not_found_and_unimplemented(server):
    p = server.port
    assert _code(lambda: _call(p, _seed_request(make_image()), ((ROUTE, "/api/v1/service/other"),)))[0] == C.NOT_FOUND
    assert _code(lambda: _call(p, _seed_request(make_image()), ((ROUTE, "/elsewhere"),)))[0] == C.NOT_FOUND
    r = _seed_request(make_image())
    r.model_spec.version.value = 7
    code, details = _code(lambda: _call(p, r))
    assert code == C.NOT_FOUND and "version" in details
    r = _seed_request(make_image())
    r.model_spec.name = "resnet"
    assert _code(lambda: _call(p, r))[0] == C.NOT_FOUND
    for m in ("Classify", "Regress", "MultiInference"):
        assert _code(lambda: _call(p, b"", method=m))[0] == C.UNIMPLEMENTED


@pytest.mark.parametrize("service,method", [("PredictionService", "Predict"),
                                            ("PredictionService", "GetModelMetadata"),
                                            ("ModelService", "GetModelStatus")])
def test_garbage_bytes_are_invalid_argument(server, service, method):
    """Bytes that are no request message are the client's mistake (INVALID_ARGUMENT naming the
    message type), counted and logged like every call -- not gRPC's INTERNAL of a failing
    deserializer."""
    before = server.metrics.count(method, "INVALID_ARGUMENT")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        fn = ch.unary_unary(f"/tensorflow.serving.{service}/{method}")  # raw bytes both ways
        for garbage in (b"\xff\xff\xff", b"\x0a\x80", b"not a protobuf message at all"):
            with pytest.raises(grpc.RpcError) as ei:
                fn(garbage, timeout=10)
            assert ei.value.code() == C.INVALID_ARGUMENT, (garbage, ei.value.code(), ei.value.details())
            assert "not a valid tensorflow.serving." in ei.value.details()
        # a well-formed request still answers on the same channel
        ok = ch.unary_unary(f"/tensorflow.serving.{service}/{method}")(
            {"Predict": _seed_request(make_image()), "GetModelMetadata": pb.GetModelMetadataRequest(),
             "GetModelStatus": pb.GetModelStatusRequest()}[method].SerializeToString(), timeout=10)
        assert isinstance(ok, bytes) and ok
    assert server.metrics.count(method, "INVALID_ARGUMENT") == before + 3
    assert server.ready


def test_message_size_limit(plans):
    with serve(plans["tiny"], port=0, max_message_bytes=1 << 20) as h:
        big = _seed_request(b"\xff" * (2 << 20))
        assert _code(lambda: _call(h.port, big))[0] == C.RESOURCE_EXHAUSTED
        _call(h.port, _seed_request(make_image()))


def test_queue_full_is_resource_exhausted(plans):
    with serve(plans["tiny"], port=0, workers=1, queue_size=1, simulated_latency_ms=400) as h:
        codes = []

        def one():
            try:
                _call(h.port, _seed_request(make_image()))
                codes.append("OK")
            except grpc.RpcError as e:
                codes.append(e.code().name)

        ts = [threading.Thread(target=one) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert codes.count("OK") >= 2 and "RESOURCE_EXHAUSTED" in codes, codes


def test_unavailable_while_warming_up_then_health_serving(plans):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    h = serve(plans["tiny"], port=0, block=False, warmup_delay_s=1.5)
    try:
        code, details = _code(lambda: _call(h.port, _seed_request(make_image())))
        assert code == C.UNAVAILABLE and "warming up" in details
        with grpc.insecure_channel(f"127.0.0.1:{h.port}") as ch:
            st = health_pb2_grpc.HealthStub(ch)
            assert st.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            h.wait_ready(10)
            for svc in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
                        "inference.GRPCInferenceService", "tiny"):
                assert st.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING
        _call(h.port, _seed_request(make_image()))
    finally:
        h.stop(1)


def test_bad_plan_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        serve(str(tmp_path / "missing.bfpplan"), port=0)
    bad = tmp_path / "bad.bfpplan"
    bad.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="failed to load"):
        serve(str(bad), port=0)


# -- auth, TLS, routes ---------------------------------------------------------------------------

def test_auth(plans):
    with serve(plans["tiny"], port=0, auth_keys=["k1", "k2"]) as h:
        req = _seed_request(make_image())
        for md in [(), (("authorization", "Bearer "),), (("authorization", "Bearer wrong"),), SEED_MD]:
            code, details = _code(lambda: _call(h.port, req, md))
            assert code == C.UNAUTHENTICATED, md
        for value in ("Bearer k1", "bearer k2", "k1"):
            _call(h.port, req, (("authorization", value), (ROUTE, "/api/v1/service/")))
        c = PredictionClient("127.0.0.1", h.port, access_token="k2")
        assert c.score_tensors({"images": (make_image(), [1], pb.DT_STRING)}).shape == (10,)
    # auth off: the seed's empty "Bearer " is fine (covered by the module server too)


def test_tls(plans, tmp_path, jpeg):
    cert, key = self_signed_cert("localhost", str(tmp_path))
    with serve(plans["tiny"], port=0, tls_cert=str(tmp_path / "cert.pem"), tls_key=key, auth_keys=["s3cret"]) as h:
        c = PredictionClient("localhost", h.port, use_ssl=True, access_token="s3cret", root_certificates=cert)
        assert c.score_file(jpeg).shape == (10,)
        c2 = PredictionClient("127.0.0.1", h.port, use_ssl=True, access_token="s3cret",
                              root_certificates=str(tmp_path / "cert.pem"), target_name_override="localhost")
        assert c2.score_file(jpeg).shape == (10,)
        untrusted = PredictionClient("localhost", h.port, use_ssl=True, access_token="s3cret", retry="none")
        with pytest.raises(grpc.RpcError) as ei:
            untrusted.score_file(jpeg, timeout=3)
        assert ei.value.code() == C.UNAVAILABLE
        plain = PredictionClient("127.0.0.1", h.port, access_token="s3cret", retry="none")
        with pytest.raises(grpc.RpcError):
            plain.score_file(jpeg, timeout=3)


def test_two_routes_on_one_port(plans, jpeg):
    with serve({"tiny": plans["tiny"], "five": plans["five"]}, port=0) as h:
        assert PredictionClient("127.0.0.1", h.port, service_name="tiny").score_file(jpeg).shape == (10,)
        assert PredictionClient("127.0.0.1", h.port, service_name="five").score_file(jpeg).shape == (5,)
        code, details = _code(lambda: _call(h.port, _seed_request(make_image()), SEED_MD))
        assert code == C.NOT_FOUND and "five" in details and ROUTE in details
        r = _seed_request(make_image())
        r.model_spec.name = "five"
        assert make_ndarray(_call(h.port, r).outputs[TINY_OUTPUT]).shape == (1, 5)
        r.model_spec.name = "tiny"  # disagrees with the route
        assert _code(lambda: _call(h.port, r, ((ROUTE, "/api/v1/service/five"),)))[0] == C.NOT_FOUND


# -- concurrency, metrics, logs, reflection --------------------------------------------------------

def test_concurrent_clients_with_malformed_requests(plans, predictor):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    good = make_image("jpeg", seed=5)
    want = predictor.predict_images([good])[TINY_OUTPUT][0]
    with serve(plans["tiny"], port=0, workers=2) as h:
        results = {"ok": 0, "invalid": 0, "other": []}
        lock = threading.Lock()

        def client(i):
            c = PredictionClient("127.0.0.1", h.port, retry="none")
            for j in range(100):
                bad = j % 10 == 3
                try:
                    out = c.score_tensors({"images": (b"garbage" if bad else good, [1], pb.DT_STRING)},
                                          TINY_OUTPUT)
                    assert not bad
                    np.testing.assert_array_equal(out, want)
                    with lock:
                        results["ok"] += 1
                except grpc.RpcError as e:
                    with lock:
                        if bad and e.code() == C.INVALID_ARGUMENT:
                            results["invalid"] += 1
                        else:
                            results["other"].append((bad, e.code()))

        t0 = time.perf_counter()
        ts = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        print(f"\n8 clients x 100 requests: {time.perf_counter() - t0:.2f} s")
        assert results == {"ok": 720, "invalid": 80, "other": []}
        with grpc.insecure_channel(f"127.0.0.1:{h.port}") as ch:
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        assert h.metrics.count("Predict", "OK") == 720 and h.metrics.count("Predict", "INVALID_ARGUMENT") == 80


def test_metrics_endpoint(server):
    _call(server.port, _seed_request(make_image()))
    with pytest.raises(grpc.RpcError):
        _call(server.port, _seed_request(b"bad"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'bfpaccel_requests_total{method="Predict",route="tiny",code="OK",protocol="tfs-grpc"}' in text
    assert 'code="INVALID_ARGUMENT"' in text
    assert 'bfpaccel_request_latency_seconds_bucket{method="Predict",route="tiny",protocol="tfs-grpc",le="+Inf"}' in text
    assert "bfpaccel_queue_depth 0" in text and "bfpaccel_ready 1" in text
    # every model call split into time waiting for a worker and time computing
    assert 'bfpaccel_queue_seconds_count{model="tiny"}' in text
    assert 'bfpaccel_compute_seconds_bucket{model="tiny",le="+Inf"}' in text


def test_access_log_is_json_lines(server, caplog):
    with caplog.at_level(logging.INFO, logger="bfpaccel.serve.access"):
        _call(server.port, _seed_request(make_image()))
        with pytest.raises(grpc.RpcError):
            _call(server.port, _seed_request(b"bad"))
    recs = [json.loads(r.getMessage()) for r in caplog.records if r.name == "bfpaccel.serve.access"]
    assert [r["code"] for r in recs[-2:]] == ["OK", "INVALID_ARGUMENT"]
    assert recs[-2]["route"] == "tiny" and recs[-2]["images"] == 1 and "ms" in recs[-2] and "error" in recs[-1]


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    from google.protobuf.descriptor_pool import DescriptorPool

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"tensorflow.serving.PredictionService", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(db)
        svc = pool.FindServiceByName("tensorflow.serving.PredictionService")
        assert svc.FindMethodByName("Predict").input_type.full_name == "tensorflow.serving.PredictRequest"


# -- SIGTERM -------------------------------------------------------------------------------------

def test_sigterm_drains_in_flight_requests(plans):
    proc, port = spawn_server(["--plan", plans["tiny"], "--workers", "8", "--simulated-latency-ms", "700",
                               "--grace", "20", "--quiet"])
    try:
        codes = []

        def one():
            c = PredictionClient("127.0.0.1", port, retry="none")
            try:
                c.score_tensors({"images": (make_image(), [1], pb.DT_STRING)}, TINY_OUTPUT)
                codes.append("OK")
            except grpc.RpcError as e:
                codes.append(e.code().name)

        ts = [threading.Thread(target=one) for _ in range(8)]
        for t in ts:
            t.start()
        time.sleep(0.3)  # all 8 are in the 700 ms model call now
        proc.send_signal(signal.SIGTERM)
        for t in ts:
            t.join()
        assert codes == ["OK"] * 8, codes
        assert proc.wait(timeout=30) == 0
        with pytest.raises(grpc.RpcError) as ei:
            PredictionClient("127.0.0.1", port, retry="none").score_tensors(
                {"images": (make_image(), [1], pb.DT_STRING)}, timeout=2)
        assert ei.value.code() == C.UNAVAILABLE
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# -- latency (printed, not asserted) -------------------------------------------------------------

def test_latency_round_trip_vs_in_process(server, predictor):
    img = make_image("jpeg", size=(320, 240))
    x = predictor.preprocess([img])
    c = PredictionClient("127.0.0.1", server.port)

    def p50(fn, n=60):
        for _ in range(5):
            fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1000 * float(np.median(ts))

    a = p50(lambda: predictor.predict(x))
    b = p50(lambda: predictor.predict_images([img]))
    r = p50(lambda: c.score_tensors({"images": (img, [1], pb.DT_STRING)}, TINY_OUTPUT))
    print(f"\ntiny plan p50: Predictor.predict {a:.2f} ms, predict_images {b:.2f} ms, gRPC Predict {r:.2f} ms "
          f"(overhead {r - b:.2f} ms)")
