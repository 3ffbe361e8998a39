"""The KServe v2 gRPC face (``inference.GRPCInferenceService``, bfpaccel.serve.v2_grpc) on the
server's gRPC port: Triton's own client (``tritonclient.grpc``) and hand-built requests from our
private-pool messages; results bit-identical to the in-process Predictor; every bad request is
a client error (never INTERNAL); auth, deadlines, metrics, access log, health and reflection."""

from __future__ import annotations

import json
import logging
import threading
import time

import grpc
import numpy as np
import pytest

pytest.importorskip("onnx")
tg = pytest.importorskip("tritonclient.grpc")

import bfpaccel  # noqa: E402
from bfpaccel.serve import _protos as pb  # noqa: E402
from bfpaccel.serve import serve  # noqa: E402
from bfpaccel.serve.testing import TINY_OUTPUT, build_tiny_plan, make_image  # noqa: E402
from bfpaccel.serve.v2_grpc import PLATFORM, UNIMPLEMENTED_METHODS, V2_EXTENSIONS  # noqa: E402
from bfpaccel.serve.wire import serialize_bytes_elements  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

C = grpc.StatusCode
MAX_BATCH = 4


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    return {"tiny": build_tiny_plan(str(d / "tiny.bfpplan")),
            "five": build_tiny_plan(str(d / "five.bfpplan"), seed=1, classes=5)}


@pytest.fixture(scope="module")
def server(plans):
    h = serve({"tiny": plans["tiny"], "five": plans["five"]}, port=0, max_batch=MAX_BATCH)
    yield h
    h.stop(grace=1)


@pytest.fixture(scope="module")
def client(server):
    c = tg.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def predictor(plans):
    return bfpaccel.Predictor(plans["tiny"])


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def _x(rows=2, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, 224, 224, 3)).astype(np.float32)


def _raw_call(port, method, request, resp_cls=None, metadata=(), timeout=20.0):
    """A unary call as a hand-written stub makes it (request: one of our messages or bytes)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        fn = ch.unary_unary(f"/inference.GRPCInferenceService/{method}",
                            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
                            response_deserializer=resp_cls.FromString if resp_cls else None)
        return fn(request, timeout=timeout, metadata=metadata)


def _code(fn):
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError("the call succeeded")


def _tensor_request(model="tiny", x=None, name="x", version="", raw=True):
    x = _x(1) if x is None else x
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    inp = req.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    if raw:
        req.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        inp.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return req


def _image_request(images, model="tiny", name="images", shape=None, raw=True):
    req = pb.ModelInferRequest(model_name=model)
    inp = req.inputs.add(name=name, datatype="BYTES", shape=shape or [len(images)])
    if raw:
        req.raw_input_contents.append(serialize_bytes_elements(images))
    else:
        inp.contents.bytes_contents.extend(images)
    return req


def _outputs(resp):
    """name -> float32 array from a ModelInferResponse's raw_output_contents."""
    assert len(resp.outputs) == len(resp.raw_output_contents)
    out = {}
    for o, raw in zip(resp.outputs, resp.raw_output_contents):
        assert o.datatype == "FP32"
        out[o.name] = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(list(o.shape))
    return out


# -- health and metadata ------------------------------------------------------------------------

def test_health_with_triton_client(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("five", "1")
    assert not client.is_model_ready("tiny", "9")
    assert not client.is_model_ready("nope")


def test_server_metadata(client):
    md = client.get_server_metadata()
    assert md.name == "bfpaccel"
    assert md.version == bfpaccel.__version__
    assert list(md.extensions) == list(V2_EXTENSIONS)


def test_model_metadata(client):
    md = client.get_model_metadata("tiny")
    assert md.name == "tiny" and list(md.versions) == ["1"] and md.platform == PLATFORM
    inputs = {t.name: (t.datatype, list(t.shape)) for t in md.inputs}
    assert inputs == {"images": ("BYTES", [-1]), "x": ("FP32", [-1, 224, 224, 3])}
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [(TINY_OUTPUT, "FP32", [-1, 10])]
    five = client.get_model_metadata("five", "1", as_json=True)
    assert five["outputs"][0]["shape"] == ["-1", "5"]  # int64 in proto JSON


# -- inference ----------------------------------------------------------------------------------

def test_infer_fp32_bit_identical(client, predictor):
    x = _x(3, seed=1)
    inp = tg.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    r = client.infer("tiny", [inp], request_id="req-42")
    resp = r.get_response()
    assert resp.id == "req-42" and resp.model_name == "tiny" and resp.model_version == "1"
    assert [o.name for o in resp.outputs] == [TINY_OUTPUT]  # every output tensor, no alias copies
    _bits_equal(r.as_numpy(TINY_OUTPUT), predictor.predict(x)[TINY_OUTPUT])


def test_infer_images_bit_identical(client, predictor):
    imgs = [make_image("jpeg"), make_image("png", size=(50, 70), seed=3)]
    ref = predictor.predict_images(imgs)[TINY_OUTPUT]
    for name, shape in (("images", [2]), ("Placeholder:0", [2, 1])):
        inp = tg.InferInput(name, shape, "BYTES")
        inp.set_data_from_numpy(np.array(imgs, dtype=object).reshape(shape))
        r = client.infer("tiny", [inp])
        _bits_equal(r.as_numpy(TINY_OUTPUT), ref)


def test_requested_outputs(client, predictor):
    x = _x(1, seed=2)
    inp = tg.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    ref = predictor.predict(x)[TINY_OUTPUT]
    r = client.infer("tiny", [inp], outputs=[tg.InferRequestedOutput("output_alias")])
    assert [o.name for o in r.get_response().outputs] == ["output_alias"]
    _bits_equal(r.as_numpy("output_alias"), ref)
    r = client.infer("tiny", [inp], outputs=[tg.InferRequestedOutput(TINY_OUTPUT),
                                             tg.InferRequestedOutput("output_alias")])
    _bits_equal(r.as_numpy(TINY_OUTPUT), ref)
    _bits_equal(r.as_numpy("output_alias"), ref)


def test_typed_contents_request(server, predictor):
    x = _x(2, seed=4)
    resp = _raw_call(server.port, "ModelInfer", _tensor_request(x=x, raw=False), pb.ModelInferResponse)
    _bits_equal(_outputs(resp)[TINY_OUTPUT], predictor.predict(x)[TINY_OUTPUT])
    assert resp.model_version == "1" and resp.id == ""
    img = make_image("gif")
    resp = _raw_call(server.port, "ModelInfer", _image_request([img], raw=False), pb.ModelInferResponse)
    _bits_equal(_outputs(resp)[TINY_OUTPUT], predictor.predict_images([img])[TINY_OUTPUT])


def test_versions_and_labels(plans):
    with serve({"tiny": plans["tiny"]}, port=0) as h:
        h.core.load_version("tiny", 2, plans["five"])
        h.core.set_labels("tiny", {"stable": 1, "canary": 2})
        c = tg.InferenceServerClient(url=f"127.0.0.1:{h.port}")
        x = _x(1, seed=5)
        inp = tg.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        for version, want, classes in (("", "2", 5), ("1", "1", 10), ("2", "2", 5), ("stable", "1", 10),
                                       ("canary", "2", 5)):
            r = c.infer("tiny", [inp], model_version=version)
            assert r.get_response().model_version == want
            assert r.as_numpy(TINY_OUTPUT).shape == (1, classes)
        assert list(c.get_model_metadata("tiny").versions) == ["1", "2"]
        assert c.get_model_metadata("tiny", "1").outputs[0].shape == [-1, 10]
        for version in ("3", "beta"):
            with pytest.raises(InferenceServerException) as ei:
                c.infer("tiny", [inp], model_version=version)
            assert ei.value.status() == "StatusCode.NOT_FOUND"
            assert not c.is_model_ready("tiny", version)
        c.close()


# -- bad requests -------------------------------------------------------------------------------

def _with(req, fn):
    fn(req)
    return req


def _two_inputs():
    req = _tensor_request()
    req.inputs.add(name="images", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(serialize_bytes_elements([make_image()]))
    return req


BAD = {
    "unknown model": (lambda: _tensor_request(model="nope"), C.NOT_FOUND, "nope"),
    "unknown version": (lambda: _tensor_request(version="7"), C.NOT_FOUND, "version 7"),
    "unknown label": (lambda: _tensor_request(version="beta"), C.NOT_FOUND, "beta"),
    "unknown input": (lambda: _tensor_request(name="pixels"), C.INVALID_ARGUMENT, "pixels"),
    "unknown output": (lambda: _with(_tensor_request(), lambda r: r.outputs.add(name="logits")),
                       C.INVALID_ARGUMENT, "logits"),
    "output twice": (lambda: _with(_tensor_request(), lambda r: [r.outputs.add(name="output_alias")
                                                                 for _ in range(2)]), C.INVALID_ARGUMENT, "twice"),
    "FP64 tensor": (lambda: _with(_tensor_request(), lambda r: setattr(r.inputs[0], "datatype", "FP64")),
                    C.INVALID_ARGUMENT, "FP32"),
    "unknown datatype": (lambda: _with(_tensor_request(), lambda r: setattr(r.inputs[0], "datatype", "FLOAT")),
                         C.INVALID_ARGUMENT, "FLOAT"),
    "FP32 images": (lambda: _with(_tensor_request(name="images"), lambda r: None), C.INVALID_ARGUMENT, "BYTES"),
    "BYTES tensor": (lambda: _image_request([make_image()], name="x"), C.INVALID_ARGUMENT, "FP32"),
    "raw size": (lambda: _with(_tensor_request(), lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12)),
                 C.INVALID_ARGUMENT, "bytes of raw data"),
    "contents count": (lambda: _with(_tensor_request(x=_x(1), raw=False),
                                     lambda r: r.inputs[0].contents.fp32_contents.append(1.0)),
                       C.INVALID_ARGUMENT, "fp32_contents"),
    "wrong contents field": (lambda: _with(_tensor_request(x=np.zeros((1, 224, 224, 3), np.float32)),
                                           lambda r: (r.ClearField("raw_input_contents"),
                                                      r.inputs[0].contents.fp64_contents.extend([0.0] * 150528))),
                             C.INVALID_ARGUMENT, "fp64_contents"),
    "raw count": (lambda: _with(_tensor_request(), lambda r: r.raw_input_contents.append(b"")),
                  C.INVALID_ARGUMENT, "raw_input_contents"),
    "contents and raw": (lambda: _with(_tensor_request(), lambda r: r.inputs[0].contents.fp32_contents.append(0.0)),
                         C.INVALID_ARGUMENT, "raw_input_contents"),
    "no data": (lambda: _with(_tensor_request(), lambda r: r.ClearField("raw_input_contents")),
                C.INVALID_ARGUMENT, "fp32_contents"),
    "shape vs model": (lambda: _with(_tensor_request(), lambda r: r.inputs[0].shape.__setitem__(1, 225)),
                       C.INVALID_ARGUMENT, "expects"),
    "rank": (lambda: _with(_tensor_request(), lambda r: r.inputs[0].shape.append(1)), C.INVALID_ARGUMENT,
             "expects"),
    "negative dim": (lambda: _with(_tensor_request(), lambda r: r.inputs[0].shape.__setitem__(0, -1)),
                     C.INVALID_ARGUMENT, "negative"),
    "too many rows": (lambda: _with(_tensor_request(), lambda r: (r.inputs[0].shape.__setitem__(0, MAX_BATCH + 1),
                                                                  r.ClearField("raw_input_contents"))),
                      C.INVALID_ARGUMENT, "limit"),
    "too many images": (lambda: _image_request([make_image()] * (MAX_BATCH + 1)), C.INVALID_ARGUMENT, "limit"),
    "image shape": (lambda: _image_request([make_image()] * 4, shape=[2, 2]), C.INVALID_ARGUMENT, "[N]"),
    "zero images": (lambda: _image_request([], shape=[0]), C.INVALID_ARGUMENT, "no images"),
    "image count vs shape": (lambda: _image_request([make_image()] * 2, shape=[3]), C.INVALID_ARGUMENT, "BYTES"),
    "not an image": (lambda: _image_request([b"GIF89a not really"]), C.INVALID_ARGUMENT, "decoded"),
    "no inputs": (lambda: pb.ModelInferRequest(model_name="tiny"), C.INVALID_ARGUMENT, "0 inputs"),
    "two inputs": (_two_inputs, C.INVALID_ARGUMENT, "2 inputs"),
    "shared memory": (lambda: _with(_tensor_request(), lambda r: setattr(
        r.inputs[0].parameters["shared_memory_region"], "string_param", "r0")), C.INVALID_ARGUMENT, "shared memory"),
    "classification": (lambda: _with(_tensor_request(), lambda r: setattr(
        r.outputs.add(name="output_alias").parameters["classification"], "int64_param", 3)),
        C.INVALID_ARGUMENT, "classification"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_are_client_errors(server, case):
    make, code, words = BAD[case]
    got, details = _code(lambda: _raw_call(server.port, "ModelInfer", make(), pb.ModelInferResponse))
    assert got == code, (case, got, details)
    assert words in details, (case, details)


def test_garbage_bytes_and_bad_metadata_requests(server):
    for method in pb.V2_METHODS:  # every method, the probes that need no key included
        for garbage in (b"\xff\xff\xff", b"\x0a\x80"):
            got, details = _code(lambda: _raw_call(server.port, method, garbage))
            assert got == C.INVALID_ARGUMENT and "not a valid inference." in details, (method, got, details)
    got, details = _code(lambda: _raw_call(server.port, "ModelMetadata", pb.ModelMetadataRequest(name="nope"),
                                           pb.ModelMetadataResponse))
    assert got == C.NOT_FOUND and "nope" in details
    got, _ = _code(lambda: _raw_call(server.port, "ModelMetadata", pb.ModelMetadataRequest(name="tiny", version="5"),
                                     pb.ModelMetadataResponse))
    assert got == C.NOT_FOUND
    # several models served: a request must name one
    got, details = _code(lambda: _raw_call(server.port, "ModelInfer", _tensor_request(model=""),
                                           pb.ModelInferResponse))
    assert got == C.NOT_FOUND and "several" in details


def test_triton_client_errors(client):
    x = _x(1)
    inp = tg.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as ei:
        client.infer("tiny", [inp], outputs=[tg.InferRequestedOutput("nope")])
    assert ei.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as ei:
        client.infer("tiny", [inp], outputs=[tg.InferRequestedOutput("output_alias", class_count=2)])
    assert ei.value.status() == "StatusCode.INVALID_ARGUMENT"
    bad = tg.InferInput("x", [1, 224, 224, 3], "FP16")
    bad.set_data_from_numpy(np.zeros((1, 224, 224, 3), np.float16))
    with pytest.raises(InferenceServerException) as ei:
        client.infer("tiny", [bad])
    assert ei.value.status() == "StatusCode.INVALID_ARGUMENT" and "FP32" in ei.value.message()


def test_unimplemented_methods(server, client):
    for method in sorted(set(UNIMPLEMENTED_METHODS) - {"ModelStreamInfer"}):
        got, details = _code(lambda: _raw_call(server.port, method, b""))
        assert got == C.UNIMPLEMENTED and method in details and "not implemented" in details
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stream = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        with pytest.raises(grpc.RpcError) as ei:
            list(stream(iter([b""]), timeout=10))
        assert ei.value.code() == C.UNIMPLEMENTED and "ModelInfer" in ei.value.details()
    for call in (lambda: client.get_model_config("tiny"), lambda: client.get_inference_statistics("tiny"),
                 lambda: client.get_model_repository_index(), lambda: client.unload_model("tiny"),
                 lambda: client.get_system_shared_memory_status(), lambda: client.get_log_settings()):
        with pytest.raises(InferenceServerException) as ei:
            call()
        assert ei.value.status() == "StatusCode.UNIMPLEMENTED"
    assert client.is_model_ready("tiny")  # nothing was unloaded


# -- auth, deadlines, metrics, log, health, reflection ------------------------------------------

def test_auth(plans):
    with serve(plans["tiny"], port=0, auth_keys=["k-one", "k-two"]) as h:
        c = tg.InferenceServerClient(url=f"127.0.0.1:{h.port}")
        x = _x(1)
        inp = tg.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        assert c.is_server_live() and c.is_server_ready()  # probes need no key
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": ""}):
            for call in (lambda: c.infer("tiny", [inp], headers=headers),
                         lambda: c.get_model_metadata("tiny", headers=headers),
                         lambda: c.is_model_ready("tiny", headers=headers),
                         lambda: c.get_server_metadata(headers=headers)):
                with pytest.raises(InferenceServerException) as ei:
                    call()
                assert ei.value.status() == "StatusCode.UNAUTHENTICATED"
        for key in ("Bearer k-one", "bearer k-two", "k-one"):
            r = c.infer("tiny", [inp], headers={"authorization": key})
            assert r.as_numpy(TINY_OUTPUT).shape == (1, 10)
        assert c.is_model_ready("tiny", headers={"authorization": "Bearer k-two"})
        assert h.core.metrics.count(method="ModelInfer", code="UNAUTHENTICATED", protocol="v2-grpc") == 3
        c.close()


def test_deadline_from_the_call(plans):
    with serve(plans["tiny"], port=0, workers=1, simulated_latency_ms=600) as h:
        c = tg.InferenceServerClient(url=f"127.0.0.1:{h.port}")
        x = _x(1)
        inp = tg.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        first = threading.Thread(target=lambda: c.infer("tiny", [inp]))
        first.start()
        time.sleep(0.2)  # the one worker is busy for 0.6 s
        with pytest.raises(InferenceServerException) as ei:
            c.infer("tiny", [inp], client_timeout=0.15)
        assert ei.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        first.join()
        t_end = time.time() + 5  # the server saw the deadline pass while queued, not a bug
        while time.time() < t_end and not h.core.metrics.count(method="ModelInfer", code="DEADLINE_EXCEEDED",
                                                               protocol="v2-grpc"):
            time.sleep(0.02)
        assert h.core.metrics.count(method="ModelInfer", code="DEADLINE_EXCEEDED", protocol="v2-grpc") == 1
        assert h.core.metrics.count(code="INTERNAL") == 0
        c.close()


def test_metrics_and_access_log(server, client, caplog):
    m = server.core.metrics
    before = m.count(method="ModelInfer", code="OK", protocol="v2-grpc")
    x = _x(1)
    inp = tg.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with caplog.at_level(logging.INFO, logger="bfpaccel.serve.access"):
        client.infer("tiny", [inp])
        img = tg.InferInput("images", [2], "BYTES")
        img.set_data_from_numpy(np.array([make_image(), make_image("png")], dtype=object))
        client.infer("five", [img])
        with pytest.raises(InferenceServerException):
            client.infer("nope", [inp])
    assert m.count(method="ModelInfer", code="OK", protocol="v2-grpc") == before + 2
    assert m.count(method="ModelInfer", code="NOT_FOUND", protocol="v2-grpc") >= 1
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "bfpaccel.serve.access"]
    infer = [d for d in lines if d["method"] == "ModelInfer"]
    assert [(d["protocol"], d["route"], d["code"], d["batch"], d["images"]) for d in infer] == [
        ("v2-grpc", "tiny", "OK", 1, 0), ("v2-grpc", "five", "OK", 2, 2), ("v2-grpc", "", "NOT_FOUND", 0, 0)]
    assert "nope" in infer[-1]["error"]
    assert 'method="ModelInfer",route="five",code="OK",protocol="v2-grpc"' in m.render()
    assert m.count(code="INTERNAL") == 0


def test_health_and_reflection_list_the_service(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert st.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(ch)
        assert pb.V2_SERVICE in db.get_services()
        from google.protobuf.descriptor_pool import DescriptorPool

        svc = DescriptorPool(db).FindServiceByName(pb.V2_SERVICE)
        assert {m.name for m in svc.methods} >= {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                  "ModelMetadata", "ModelInfer"}
        assert svc.FindMethodByName("ModelInfer").input_type.full_name == "inference.ModelInferRequest"


# -- KServe's own gRPC client -------------------------------------------------------------------

KSERVE_CLIENT = r'''
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput

port, x_path, img_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
x = np.load(x_path)
img = open(img_path, "rb").read()


def hexes(resp):
    return {o.name: [list(o.shape), o.as_numpy().astype("<f4").tobytes().hex()] for o in resp.outputs}


async def main():
    c = InferenceGRPCClient(url=f"127.0.0.1:{port}", channel_args=[("grpc.enable_retries", 0)], timeout=30)
    out = {"live": await c.is_server_live(), "ready": await c.is_server_ready(),
           "model_ready": await c.is_model_ready("tiny"), "nope_ready": await c.is_model_ready("nope")}
    raw = InferInput(name="x", shape=list(x.shape), datatype="FP32")
    raw.set_data_from_numpy(x, binary_data=True)  # raw_input_contents
    r = await c.infer(InferRequest(model_name="tiny", infer_inputs=[raw], request_id="ks-1"))
    out["raw"] = {"id": r.id, "outputs": hexes(r)}
    typed = InferInput(name="x", shape=list(x.shape), datatype="FP32", data=x.reshape(-1).tolist())  # contents
    out["typed"] = hexes(await c.infer(InferRequest(model_name="tiny", infer_inputs=[typed])))
    images = InferInput(name="images", shape=[1], datatype="BYTES")
    images.set_data_from_numpy(np.array([img], dtype=object), binary_data=True)
    r = await c.infer(InferRequest(model_name="tiny", infer_inputs=[images],
                                   request_outputs=[RequestedOutput("output_alias")]))
    out["images"] = hexes(r)
    try:
        await c.infer(InferRequest(model_name="tiny", infer_inputs=[raw], model_version="9"))
    except Exception as e:
        out["error"] = e.code().name
    await c.close()
    print(json.dumps(out))


asyncio.run(main())
'''


def test_kserve_grpc_client(server, predictor, tmp_path):
    """KServe's ``InferenceGRPCClient`` (its own copy of the v2 messages, in protobuf's default
    pool, where it clashes with tritonclient's: hence a separate process)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("kserve") is None:
        pytest.skip("the kserve SDK is not installed (.ci/run installs it)")
    x = _x(2, seed=6)
    img = make_image("png", size=(80, 60), seed=7)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "img.png").write_bytes(img)
    script = tmp_path / "kserve_client.py"
    script.write_text(KSERVE_CLIENT)
    p = subprocess.run([sys.executable, str(script), str(server.port), str(tmp_path / "x.npy"),
                        str(tmp_path / "img.png")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])

    def arr(entry):
        shape, hx = entry
        return np.frombuffer(bytes.fromhex(hx), dtype="<f4").astype(np.float32).reshape(shape)

    assert (out["live"], out["ready"], out["model_ready"], out["nope_ready"]) == (True, True, True, False)
    ref = predictor.predict(x)[TINY_OUTPUT]
    assert out["raw"]["id"] == "ks-1" and list(out["raw"]["outputs"]) == [TINY_OUTPUT]
    _bits_equal(arr(out["raw"]["outputs"][TINY_OUTPUT]), ref)
    _bits_equal(arr(out["typed"][TINY_OUTPUT]), ref)
    _bits_equal(arr(out["images"]["output_alias"]), predictor.predict_images([img])[TINY_OUTPUT])
    assert out["error"] == "NOT_FOUND"
