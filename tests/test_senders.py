"""bfpaccel.serve.senders: what each protocol's sender puts on the wire, checked against
recording servers on loopback (a standard-library HTTP server for the REST faces, gRPC
generic handlers for the gRPC faces), and how it maps failures to codes."""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List

import grpc
import numpy as np
import pytest

from bfpaccel.serve import _protos as pb
from bfpaccel.serve.senders import (OK, SENDERS, Payload, Sender, Target, TfsGrpcSender, TfsRestSender, make_sender,
                                    register)

JPEG = b"\xff\xd8\xff\xe0fake-jpeg-bytes\x00\x01"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpRecorder:
    """A loopback HTTP/1.1 server that records each POST (path, headers, body) and answers
    with ``status``/``body`` (after ``delay`` s)."""

    def __init__(self) -> None:
        self.calls: List[Dict[str, Any]] = []
        self.status, self.body, self.headers, self.delay = 200, b"{}", {}, 0.0
        rec = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                rec.calls.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                  "body": body})
                if rec.delay:
                    time.sleep(rec.delay)
                self.send_response(rec.status)
                for k, v in rec.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(rec.body)))
                self.end_headers()
                self.wfile.write(rec.body)

            def log_message(self, *a: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_rec():
    r = HttpRecorder()
    yield r
    r.stop()


class GrpcRecorder:
    """A gRPC server answering one method with a generic handler; records requests and metadata."""

    def __init__(self, method: str, deserialize: Any, respond: Any) -> None:
        self.calls: List[Dict[str, Any]] = []
        self.abort_code = None
        rec = self

        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            rec.calls.append({"req": request, "md": dict(context.invocation_metadata()),
                              "deadline": context.time_remaining()})
            if rec.abort_code is not None:
                context.abort(rec.abort_code, "refused by the test")
            return respond()

        class Generic(grpc.GenericRpcHandler):
            def service(self, details: Any) -> Any:
                if details.method == method:
                    return grpc.unary_unary_rpc_method_handler(handler, request_deserializer=deserialize,
                                                               response_serializer=lambda m: m.SerializeToString())
                return None

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((Generic(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


# -- the registry and the data classes -------------------------------------------------------------------

def test_registry_and_validation():
    assert set(SENDERS) == {"tfs-grpc", "tfs-rest", "v2-rest", "v2-grpc"}
    for name, cls in SENDERS.items():
        assert cls.protocol == name
    with pytest.raises(ValueError, match="unknown protocol 'soap'.*tfs-grpc"):
        make_sender("soap", Target("127.0.0.1", 1))
    with pytest.raises(ValueError, match="already registered"):
        register("tfs-grpc")(type("Dup", (TfsGrpcSender,), {}))
    for bad in (dict(), dict(image=b"x", array=np.zeros((1, 2)))):
        with pytest.raises(ValueError, match="exactly one"):
            Payload(**bad)
    with pytest.raises(ValueError, match="numeric"):
        Payload(array=np.array(["a"]))
    with pytest.raises(ValueError, match="numeric"):
        Payload(array=np.float32(1.0))
    with pytest.raises(TypeError, match="bytes"):
        Payload(image="cat.jpg")  # type: ignore[arg-type]
    assert Payload(array=np.arange(4, dtype=np.int64).reshape(1, 4)).array.dtype == np.float32
    assert Payload(image=JPEG).describe() == {"kind": "image", "bytes": len(JPEG), "input_name": "images"}
    with pytest.raises(ValueError, match="port"):
        Target("h", 0)
    with pytest.raises(ValueError, match="timeout"):
        Target("h", 1, timeout=0)
    assert Target("::1", 80).hostport == "[::1]:80"
    assert Target("h", 1, service_name="svc").model == "svc"
    assert Target("h", 1, service_name="svc", model_name="m").model == "m"
    for proto in ("tfs-rest", "v2-rest", "v2-grpc"):
        pytest.importorskip("requests" if proto == "tfs-rest" else "tritonclient")
        with pytest.raises(ValueError, match="needs a model name"):
            make_sender(proto, Target("127.0.0.1", 1))
    assert isinstance(make_sender("tfs-grpc", Target("127.0.0.1", 1)), Sender)


# -- tfs-grpc: against a recording PredictionService -----------------------------------------------------

@pytest.fixture
def predict_rec():
    def respond() -> Any:
        r = pb.PredictResponse()
        r.outputs["out"].CopyFrom(pb.TensorProto(dtype=pb.DT_FLOAT))
        return r

    r = GrpcRecorder(pb.PREDICT_METHOD, pb.PredictRequest.FromString, respond)
    yield r
    r.stop()


def test_tfs_grpc_request_metadata_and_codes(predict_rec):
    t = Target("127.0.0.1", predict_rec.port, access_token="k1", service_name="svc", timeout=3.0)
    with make_sender("tfs-grpc", t) as s:
        assert s.prepare(Payload(image=JPEG))() == OK
        call = predict_rec.calls[-1]
        req = call["req"]
        assert not req.HasField("model_spec")  # the seed's request: no model_spec unless a model is named
        tp = req.inputs["images"]
        assert list(req.inputs) == ["images"] and tp.dtype == pb.DT_STRING
        assert [d.size for d in tp.tensor_shape.dim] == [1] and list(tp.string_val) == [JPEG]
        assert call["md"]["authorization"] == "Bearer k1"
        assert call["md"]["x-ms-aml-grpc-service-route"] == "/api/v1/service/svc"
        assert 2 < call["deadline"] <= 3.05
        arr = np.arange(6, dtype=np.float32).reshape(1, 6)
        assert s.prepare(Payload(array=arr, input_name="x:0"))() == OK
        tp = predict_rec.calls[-1]["req"].inputs["x:0"]
        assert tp.dtype == pb.DT_FLOAT and [d.size for d in tp.tensor_shape.dim] == [1, 6]
        assert np.frombuffer(tp.tensor_content, np.float32).tolist() == arr.ravel().tolist()
        predict_rec.abort_code = grpc.StatusCode.RESOURCE_EXHAUSTED
        assert s.prepare(Payload(image=JPEG))() == "RESOURCE_EXHAUSTED"
        assert len(predict_rec.calls) == 3  # no retries
    with make_sender("tfs-grpc", Target("127.0.0.1", predict_rec.port, model_name="tiny")) as s:
        predict_rec.abort_code = None
        assert s.prepare(Payload(image=JPEG))() == OK
        assert predict_rec.calls[-1]["req"].model_spec.name == "tiny"
    with make_sender("tfs-grpc", Target("127.0.0.1", _free_port(), timeout=2.0)) as s:
        assert s.prepare(Payload(image=JPEG))() == "UNAVAILABLE"


def test_tfs_grpc_one_channel_many_threads(predict_rec):
    with make_sender("tfs-grpc", Target("127.0.0.1", predict_rec.port)) as s:
        send = s.prepare(Payload(image=JPEG))
        with futures.ThreadPoolExecutor(16) as ex:
            codes = list(ex.map(lambda _: send(), range(64)))
    assert codes == [OK] * 64 and len(predict_rec.calls) == 64


# -- tfs-rest --------------------------------------------------------------------------------------------

def test_tfs_rest_request(http_rec):
    pytest.importorskip("requests")
    http_rec.body = b'{"predictions": [[0.1, 0.9]]}'
    t = Target("127.0.0.1", http_rec.port, access_token="k2", model_name="tiny net")
    with make_sender("tfs-rest", t) as s:
        assert s.url == f"http://127.0.0.1:{http_rec.port}/v1/models/tiny%20net:predict"
        assert s.prepare(Payload(image=JPEG))() == OK
        call = http_rec.calls[-1]
        assert call["path"] == "/v1/models/tiny%20net:predict"
        assert call["headers"]["authorization"] == "Bearer k2"
        assert call["headers"]["content-type"] == "application/json"
        assert json.loads(call["body"]) == {"instances": [{"b64": base64.b64encode(JPEG).decode()}]}
        arr = np.array([[1.5, -2.0], [0.25, 3.0]], np.float32)
        assert s.prepare(Payload(array=arr, input_name="x"))() == OK
        assert json.loads(http_rec.calls[-1]["body"]) == {"inputs": {"x": [[1.5, -2.0], [0.25, 3.0]]}}
        http_rec.status, http_rec.body = 503, b'{"error": "busy"}'
        assert s.prepare(Payload(image=JPEG))() == "HTTP_503"
    # no key: no authorization header; the service name is the default model
    with make_sender("tfs-rest", Target("127.0.0.1", http_rec.port, service_name="svc")) as s:
        http_rec.status = 200
        assert s.prepare(Payload(image=JPEG))() == OK
        assert "authorization" not in http_rec.calls[-1]["headers"]
        assert http_rec.calls[-1]["path"] == "/v1/models/svc:predict"


def test_tfs_rest_errors_and_threads(http_rec):
    pytest.importorskip("requests")
    with make_sender("tfs-rest", Target("127.0.0.1", _free_port(), model_name="m")) as s:
        assert s.prepare(Payload(image=JPEG))() == "CONNECTION_ERROR"
    http_rec.delay = 1.0
    with make_sender("tfs-rest", Target("127.0.0.1", http_rec.port, model_name="m", timeout=0.2)) as s:
        assert s.prepare(Payload(image=JPEG))() == "TIMEOUT"
    http_rec.delay = 0.0
    with make_sender("tfs-rest", Target("127.0.0.1", http_rec.port, model_name="m")) as s:
        send = s.prepare(Payload(image=JPEG))
        with futures.ThreadPoolExecutor(8) as ex:
            codes = list(ex.map(lambda _: send(), range(40)))
        assert codes == [OK] * 40
        assert 1 <= len(s._opened) <= 8  # one keep-alive session per sending thread
    assert s._opened == []


# -- v2-rest (tritonclient.http) ------------------------------------------------------------------------

def _v2_http_parts(call: Dict[str, Any]) -> tuple:
    n = int(call["headers"]["inference-header-content-length"])
    return json.loads(call["body"][:n]), call["body"][n:]


def test_v2_rest_request(http_rec):
    pytest.importorskip("tritonclient.http")
    http_rec.body = json.dumps({"model_name": "tiny", "outputs": []}).encode()
    t = Target("127.0.0.1", http_rec.port, access_token="k3", model_name="tiny")
    with make_sender("v2-rest", t) as s:
        assert s.prepare(Payload(image=JPEG))() == OK
        call = http_rec.calls[-1]
        assert call["path"] == "/v2/models/tiny/infer"
        assert call["headers"]["authorization"] == "Bearer k3"
        head, binary = _v2_http_parts(call)
        (inp,) = head["inputs"]
        assert inp["name"] == "images" and inp["datatype"] == "BYTES" and inp["shape"] == [1]
        assert inp["parameters"]["binary_data_size"] == 4 + len(JPEG)
        assert binary == struct.pack("<I", len(JPEG)) + JPEG  # BYTES element: length prefix + data
        arr = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
        assert s.prepare(Payload(array=arr, input_name="x"))() == OK
        head, binary = _v2_http_parts(http_rec.calls[-1])
        (inp,) = head["inputs"]
        assert inp["name"] == "x" and inp["datatype"] == "FP32" and inp["shape"] == [1, 3, 4]
        assert binary == arr.tobytes()
        http_rec.status, http_rec.body = 400, b'{"error": "bad input"}'
        assert s.prepare(Payload(image=JPEG))() == "HTTP_400"
    with make_sender("v2-rest", Target("127.0.0.1", _free_port(), model_name="m", timeout=2.0)) as s:
        assert s.prepare(Payload(image=JPEG))() == "CONNECTION_ERROR"


def test_v2_rest_threads(http_rec):
    pytest.importorskip("tritonclient.http")
    http_rec.body = b'{"model_name": "m", "outputs": []}'
    with make_sender("v2-rest", Target("127.0.0.1", http_rec.port, model_name="m")) as s:
        send = s.prepare(Payload(image=JPEG))
        with futures.ThreadPoolExecutor(6) as ex:
            codes = list(ex.map(lambda _: send(), range(30)))
    assert codes == [OK] * 30 and len(http_rec.calls) == 30


# -- v2-grpc (tritonclient.grpc) ------------------------------------------------------------------------

@pytest.fixture
def infer_rec():
    sp = pytest.importorskip("tritonclient.grpc.service_pb2")
    r = GrpcRecorder("/inference.GRPCInferenceService/ModelInfer", sp.ModelInferRequest.FromString,
                     lambda: sp.ModelInferResponse(model_name="tiny"))
    yield r
    r.stop()


def test_v2_grpc_request(infer_rec):
    t = Target("127.0.0.1", infer_rec.port, access_token="k4", model_name="tiny", timeout=4.0)
    with make_sender("v2-grpc", t) as s:
        assert s.prepare(Payload(image=JPEG))() == OK
        call = infer_rec.calls[-1]
        req = call["req"]
        assert req.model_name == "tiny"
        (inp,) = req.inputs
        assert inp.name == "images" and inp.datatype == "BYTES" and list(inp.shape) == [1]
        assert list(req.raw_input_contents) == [struct.pack("<I", len(JPEG)) + JPEG]
        assert call["md"]["authorization"] == "Bearer k4"
        assert 3 < call["deadline"] <= 4.05
        arr = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
        assert s.prepare(Payload(array=arr, input_name="x"))() == OK
        req = infer_rec.calls[-1]["req"]
        assert req.inputs[0].datatype == "FP32" and list(req.inputs[0].shape) == [2, 4]
        assert req.raw_input_contents[0] == arr.tobytes()
        infer_rec.abort_code = grpc.StatusCode.UNAUTHENTICATED
        assert s.prepare(Payload(image=JPEG))() == "UNAUTHENTICATED"
        infer_rec.abort_code = None
        send = s.prepare(Payload(image=JPEG))
        with futures.ThreadPoolExecutor(8) as ex:
            assert list(ex.map(lambda _: send(), range(32))) == [OK] * 32
    with make_sender("v2-grpc", Target("127.0.0.1", _free_port(), model_name="m", timeout=2.0)) as s:
        assert s.prepare(Payload(image=JPEG))() == "UNAVAILABLE"
