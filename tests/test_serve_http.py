"""The HTTP faces (bfpaccel.serve.http) on 127.0.0.1: TF Serving REST through requests and curl,
KServe v2 REST through tritonclient.http, results bit-identical to the in-process Predictor;
health, metadata, every class of bad request, auth, TLS, body and connection limits."""

from __future__ import annotations

import base64
import concurrent.futures
import gzip
import json
import logging
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
requests = pytest.importorskip("requests")

import bfpaccel  # noqa: E402
from bfpaccel.serve import serve  # noqa: E402
from bfpaccel.serve.testing import TINY_OUTPUT, build_tiny_plan, make_image, self_signed_cert  # noqa: E402

MODEL = "tiny"


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return build_tiny_plan(str(tmp_path_factory.mktemp("plans") / f"{MODEL}.bfpplan"))


@pytest.fixture(scope="module")
def server(plan):
    h = serve(plan, port=0, http_port=0)
    yield h
    h.stop(grace=1)


@pytest.fixture(scope="module")
def url(server):
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture(scope="module")
def predictor(plan):
    return bfpaccel.Predictor(plan)


@pytest.fixture(scope="module")
def images():
    return [make_image("jpeg", seed=1), make_image("png", size=(80, 30), seed=2), make_image("gif", seed=3)]


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def assert_same_bits(got, want):
    got = np.asarray(got, dtype=np.float32)
    assert got.shape == want.shape
    np.testing.assert_array_equal(_bits(got), _bits(want))


def _b64(b):
    return {"b64": base64.b64encode(b).decode()}


def _x(n=2, seed=0):
    return (np.random.default_rng(seed).random((n, 224, 224, 3)) * 255).astype(np.float32)


def _triton(server, **kw):
    import tritonclient.http as th

    return th.InferenceServerClient(f"127.0.0.1:{server.http_port}", **kw)


def _raw_http(port, head: bytes, body: bytes = b"", timeout=10.0, then=None):
    """Sends bytes on a fresh socket and reads until the server closes or a full response is in."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        if then is not None:
            then(s)
        return _read_response(s)


def _read_response(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.decode("latin-1").partition(":") for line in head.split(b"\r\n")[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:n]


# -- TF Serving REST ----------------------------------------------------------------------------

def test_tf_rest_float_tensor_row_and_columnar(url, predictor):
    x = _x()
    want = predictor.predict(x)[TINY_OUTPUT]
    r = requests.post(f"{url}/v1/models/{MODEL}:predict", json={"instances": x.tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    assert_same_bits(r.json()["predictions"], want)
    r = requests.post(f"{url}/v1/models/{MODEL}:predict", json={"signature_name": "serving_default",
                                                                "inputs": {"x": x.tolist()}}, timeout=30)
    assert r.status_code == 200, r.text
    assert_same_bits(r.json()["outputs"], want)
    # integers are accepted for a float input (converted as a cast does)
    xi = np.arange(224 * 224 * 3, dtype=np.int64).reshape(1, 224, 224, 3) % 256
    r = requests.post(f"{url}/v1/models/{MODEL}/versions/1:predict", json={"instances": xi.tolist()}, timeout=30)
    assert_same_bits(r.json()["predictions"], predictor.predict(xi.astype(np.float32))[TINY_OUTPUT])


def test_tf_rest_b64_images(url, predictor, images):
    want = predictor.predict_images(images)[TINY_OUTPUT]
    for doc in ({"instances": [_b64(b) for b in images]},
                {"instances": [{"images": _b64(b)} for b in images]},
                {"inputs": {"Placeholder:0": [_b64(b) for b in images]}},
                {"inputs": [_b64(b) for b in images]}):
        r = requests.post(f"{url}/v1/models/{MODEL}/labels/stable:predict", json=doc, timeout=30)
        assert r.status_code == 200, (doc.keys(), r.text)
        body = r.json()
        assert_same_bits(body["predictions"] if "instances" in doc else body["outputs"], want)


def test_tf_rest_with_curl(url, predictor, images, tmp_path):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = tmp_path / "req.json"
    body.write_text(json.dumps({"instances": [_b64(images[0])]}))
    out = subprocess.run([curl, "-sS", "-X", "POST", "-H", "Content-Type: application/json", "--data-binary",
                          f"@{body}", f"{url}/v1/models/{MODEL}:predict"], capture_output=True, timeout=60,
                         check=True)
    assert_same_bits(json.loads(out.stdout)["predictions"], predictor.predict_images(images[:1])[TINY_OUTPUT])
    out = subprocess.run([curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"{url}/v1/models/nope"],
                         capture_output=True, timeout=60, check=True)
    assert out.stdout == b"404"


def test_tf_rest_status_and_metadata(url, predictor):
    want = {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}
    for path in (f"/v1/models/{MODEL}", f"/v1/models/{MODEL}/versions/1"):
        r = requests.get(url + path, timeout=10)
        assert r.status_code == 200 and r.json() == want
    assert requests.get(f"{url}/v1/models/{MODEL}/versions/2", timeout=10).status_code == 404
    assert requests.get(f"{url}/v1/models/{MODEL}/labels/canary", timeout=10).status_code == 404
    r = requests.get(f"{url}/v1/models/{MODEL}/metadata", timeout=10)
    assert r.status_code == 200
    md = r.json()
    assert md["model_spec"] == {"name": MODEL, "signature_name": "", "version": "1"}
    sig = md["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["method_name"] == "tensorflow/serving/predict"
    assert sig["inputs"]["images"]["dtype"] == "DT_STRING"
    assert sig["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in sig["inputs"]["x"]["tensor_shape"]["dim"]] == ["-1", "224", "224", "3"]
    assert sig["outputs"][TINY_OUTPUT]["tensor_shape"]["dim"][1]["size"] == "10"
    assert set(sig["outputs"]) == {TINY_OUTPUT, "output_alias"}


BAD_TF = [
    # (path, body bytes, status, words in the error)
    (f"/v1/models/{MODEL}:predict", b"{", 400, "not valid JSON"),
    (f"/v1/models/{MODEL}:predict", b"\xff\xfe", 400, "UTF-8"),
    (f"/v1/models/{MODEL}:predict", b"[1, 2]", 400, "JSON object"),
    (f"/v1/models/{MODEL}:predict", b"{}", 400, "instances"),
    (f"/v1/models/{MODEL}:predict", b'{"instances": [], "inputs": []}', 400, "exactly one"),
    (f"/v1/models/{MODEL}:predict", b'{"instances": []}', 400, "non-empty"),
    (f"/v1/models/{MODEL}:predict", b'{"instances": [[1, 2], [3]]}', 400, "ragged"),
    (f"/v1/models/{MODEL}:predict", b'{"instances": [[1.0, 2.0]]}', 400, "shape"),
    (f"/v1/models/{MODEL}:predict", b'{"inputs": {"x": [[[["a"]]]]}}', 400, "numbers"),
    (f"/v1/models/{MODEL}:predict", b'{"inputs": {"images": [1.5]}}', 400, "BYTES"),
    (f"/v1/models/{MODEL}:predict", b'{"inputs": {"images": [{"b64": "%%%"}]}}', 400, "base64"),
    (f"/v1/models/{MODEL}:predict", b'{"inputs": {"images": [{"b64": "aGVsbG8="}]}}', 400, "decoded"),
    (f"/v1/models/{MODEL}:predict", b'{"inputs": {"images": [[{"b64": "aGVsbG8="}]]}}', 400, "shape [N]"),
    (f"/v1/models/{MODEL}:predict", b'{"inputs": {"nope": [1]}}', 400, "unknown input"),
    (f"/v1/models/{MODEL}:predict", b'{"inputs": {"x": [1], "images": ["a"]}}', 400, "takes one"),
    (f"/v1/models/{MODEL}:predict", b'{"signature_name": "other", "instances": [1]}', 400, "signature"),
    (f"/v1/models/{MODEL}:predict", b'{"signature_name": 3, "instances": [1]}', 400, "signature_name"),
    (f"/v1/models/{MODEL}:predict", b'{"inputs": {"x": [[[[true]]]]}}', 400, "numbers"),
    (f"/v1/models/{MODEL}:predict", b'{"inputs": [[[[true]]]]}', 400, "numeric"),
    (f"/v1/models/{MODEL}:predict", b'{"instances": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, ""),
    ("/v1/models/nope:predict", b'{"instances": [1]}', 404, "no model 'nope'"),
    (f"/v1/models/{MODEL}/versions/7:predict", b'{"instances": [1]}', 404, "no version 7"),
    (f"/v1/models/{MODEL}/labels/canary:predict", b'{"instances": [1]}', 404, "label"),
    (f"/v1/models/{MODEL}:classify", b'{"examples": []}', 501, "classify"),
    (f"/v1/models/{MODEL}:regress", b'{"examples": []}', 501, "regress"),
    (f"/v1/models/{MODEL}:explain", b"{}", 404, "verb"),
]


@pytest.mark.parametrize("path,body,status,words", BAD_TF)
def test_tf_rest_bad_requests_get_json_errors(url, path, body, status, words):
    r = requests.post(url + path, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert words in r.json()["error"]


def test_tf_rest_too_many_images_is_400(url, server):
    n = server.core.max_batch + 1
    r = requests.post(f"{url}/v1/models/{MODEL}:predict", json={"instances": [_b64(b"x")] * n}, timeout=30)
    assert r.status_code == 400 and "limit" in r.json()["error"]


def test_unknown_route_and_method(url):
    r = requests.get(f"{url}/v3/nothing", timeout=10)
    assert r.status_code == 404 and "/v1/models" in r.json()["error"]
    r = requests.delete(f"{url}/v2/models/{MODEL}", timeout=10)
    assert r.status_code == 405 and "DELETE" in r.json()["error"]
    r = requests.get(f"{url}/v1/models/{MODEL}:predict", timeout=10)
    assert r.status_code == 404 and "POST" in r.json()["error"]


@pytest.fixture(scope="module")
def two_outputs(tmp_path_factory):
    """A plan of two output tensors ``a`` [N, 3] and ``b`` [N, 2] of one input ``x`` [N, 4]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = {"wa": rng.standard_normal((4, 3)).astype(np.float32), "wb": rng.standard_normal((4, 2)).astype(np.float32)}
    g = helper.make_graph([helper.make_node("MatMul", ["x", "wa"], ["a"]), helper.make_node("MatMul", ["x", "wb"], ["b"])],
                          "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    path = str(tmp_path_factory.mktemp("two") / "two.bfpplan")
    bfpaccel.compile(m, format="msfp16").save(path)
    return path


def test_tf_rest_response_layout_of_several_outputs(two_outputs):
    """TF Serving's documented predict response: row format -> "predictions", a list with one
    object per instance keyed by output name; columnar -> "outputs", an object keyed by output
    name holding each whole tensor (one output: the value itself, as the tiny model shows)."""
    x = np.random.default_rng(4).standard_normal((3, 4)).astype(np.float32)
    want = bfpaccel.Predictor(two_outputs).predict(x)
    with serve({"two": two_outputs}, port=0, http_port=0) as h:
        u = f"http://127.0.0.1:{h.http_port}/v1/models/two:predict"
        for doc in ({"instances": x.tolist()}, {"instances": [{"x": row} for row in x.tolist()]}):
            preds = requests.post(u, json=doc, timeout=30).json()["predictions"]
            assert isinstance(preds, list) and len(preds) == 3
            assert all(set(p) == {"a", "b"} for p in preds)
            for name in ("a", "b"):
                assert_same_bits([p[name] for p in preds], want[name])
        for doc in ({"inputs": x.tolist()}, {"inputs": {"x": x.tolist()}}):
            body = requests.post(u, json=doc, timeout=30).json()
            assert set(body) == {"outputs"} and set(body["outputs"]) == {"a", "b"}
            for name in ("a", "b"):
                assert_same_bits(body["outputs"][name], want[name])


# -- KServe v2 REST through tritonclient ----------------------------------------------------------

@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_v2_float_tensor_tritonclient(server, predictor, binary_in, binary_out):
    import tritonclient.http as th

    x = _x(seed=3)
    inp = th.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outs = [th.InferRequestedOutput(TINY_OUTPUT, binary_data=binary_out),
            th.InferRequestedOutput("output_alias", binary_data=not binary_out)]
    res = _triton(server).infer(MODEL, [inp], outputs=outs, request_id="r-1")
    want = predictor.predict(x)[TINY_OUTPUT]
    assert_same_bits(res.as_numpy(TINY_OUTPUT), want)
    assert_same_bits(res.as_numpy("output_alias"), want)
    resp = res.get_response()
    assert resp["model_name"] == MODEL and resp["model_version"] == "1" and resp["id"] == "r-1"


def test_v2_bytes_images_tritonclient(server, predictor, images):
    import tritonclient.http as th

    inp = th.InferInput("images", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    res = _triton(server).infer(MODEL, [inp], model_version="1")  # no outputs named: every output, binary
    assert_same_bits(res.as_numpy(TINY_OUTPUT), predictor.predict_images(images)[TINY_OUTPUT])
    assert [o["name"] for o in res.get_response()["outputs"]] == [TINY_OUTPUT]


def test_v2_json_only_request_with_requests(url, predictor):
    x = _x(n=1, seed=4)
    doc = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
           "outputs": [{"name": "output_alias"}]}
    r = requests.post(f"{url}/v2/models/{MODEL}/infer", json=doc, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    out = r.json()["outputs"]
    assert [o["name"] for o in out] == ["output_alias"] and out[0]["shape"] == [1, 10] and out[0]["datatype"] == "FP32"
    assert_same_bits(np.array(out[0]["data"]).reshape(1, 10), predictor.predict(x)[TINY_OUTPUT])
    # nested data and a gzip-compressed body
    doc["inputs"][0]["data"] = x.tolist()
    r = requests.post(f"{url}/v2/models/{MODEL}/versions/1/infer", data=gzip.compress(json.dumps(doc).encode()),
                      headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text
    assert_same_bits(np.array(r.json()["outputs"][0]["data"]).reshape(1, 10), predictor.predict(x)[TINY_OUTPUT])


def test_v2_health_and_metadata(server, url):
    c = _triton(server)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL) and c.is_model_ready(MODEL, "1")
    assert not c.is_model_ready(MODEL, "3")
    assert requests.get(f"{url}/v2/models/{MODEL}/versions/3/ready", timeout=10).status_code == 404
    assert requests.get(f"{url}/v2/models/nope/ready", timeout=10).status_code == 404
    md = c.get_server_metadata()
    assert md["name"] == "bfpaccel" and md["version"] == bfpaccel.__version__
    assert "binary_tensor_data" in md["extensions"]
    mm = c.get_model_metadata(MODEL)
    assert mm["name"] == MODEL and mm["versions"] == ["1"] and mm["platform"] == "bfpaccel_plan"
    assert {i["name"]: (i["datatype"], i["shape"]) for i in mm["inputs"]} == {
        "images": ("BYTES", [-1]), "x": ("FP32", [-1, 224, 224, 3])}
    assert mm["outputs"] == [{"name": TINY_OUTPUT, "datatype": "FP32", "shape": [-1, 10]}]
    assert c.get_model_metadata(MODEL, "1")["versions"] == ["1"]


def _v2(inputs, outputs=None, **extra):
    doc = {"inputs": inputs, **extra}
    if outputs is not None:
        doc["outputs"] = outputs
    return json.dumps(doc).encode()


X1 = {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}
BAD_V2 = [
    # (path, body, extra headers, status, words in the error)
    ("infer", b"{", {}, 400, "not valid JSON"),
    ("infer", b"[]", {}, 400, "JSON object"),
    ("infer", _v2([]), {}, 400, "inputs"),
    ("infer", _v2([{"shape": [1], "datatype": "FP32", "data": [1]}]), {}, 400, "name"),
    ("infer", _v2([{"name": "x", "shape": [1], "data": [1]}]), {}, 400, "datatype"),
    ("infer", _v2([{"name": "x", "datatype": "FP32", "data": [1]}]), {}, 400, "shape"),
    ("infer", _v2([{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]), {}, 400, "FP99"),
    ("infer", _v2([{"name": "x", "shape": [1, -2], "datatype": "FP32", "data": [1]}]), {}, 400, "negative"),
    ("infer", _v2([{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]), {}, 400, "2 values"),
    ("infer", _v2([{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]), {}, 400, "numbers"),
    ("infer", _v2([dict(X1)]), {}, 400, "expects"),
    ("infer", _v2([{"name": "x", "shape": [1, 224, 224, 3], "datatype": "BYTES", "data": ["a"] * 150528}]), {},
     400, "numeric"),
    ("infer", _v2([{"name": "x", "shape": [1, 224, 224, 3], "datatype": "BOOL", "data": [True] * 150528}]), {},
     400, "numeric"),
    ("infer", _v2([{"name": "x", "shape": [65, 224, 224, 3], "datatype": "FP32", "data": [0.0]}]), {}, 400,
     "limit"),
    ("infer", _v2([{"name": "images", "shape": [1], "datatype": "FP32", "data": [1.0]}]), {}, 400, "BYTES"),
    ("infer", _v2([{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["not an image"]}]), {}, 400,
     "decoded"),
    ("infer", _v2([{"name": "images", "shape": [0], "datatype": "BYTES", "data": []}]), {}, 400, "no images"),
    ("infer", _v2([{"name": "nope", "shape": [1], "datatype": "FP32", "data": [1.0]}]), {}, 400, "unknown input"),
    ("infer", _v2([dict(X1), dict(X1, name="images")]), {}, 400, "takes one"),
    ("infer", _v2([dict(X1)], [{"name": "nope"}]), {}, 400, "unknown output"),
    ("infer", _v2([dict(X1)], [{"name": "a"}, {"name": "a"}]), {}, 400, "twice"),
    ("infer", _v2([dict(X1)], parameters={"timeout": "soon"}), {}, 400, "timeout"),
    ("infer", _v2([{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]), {},
     400, "Inference-Header-Content-Length"),
    ("infer", _v2([{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]),
     {"Inference-Header-Content-Length": "abc"}, 400, "non-negative"),
    ("infer", _v2([{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]),
     {"Inference-Header-Content-Length": "100000"}, 400, "only"),
    ("infer", _v2([{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]) + b"\0",
     {"Inference-Header-Content-Length": str(len(_v2([{"name": "x", "shape": [1], "datatype": "FP32",
                                                       "parameters": {"binary_data_size": 4}}])))}, 400, "truncated"),
    ("infer", b"\x1f\x8b not gzip", {"Content-Encoding": "gzip"}, 400, "inflated"),
    ("infer", b"{}", {"Content-Encoding": "br"}, 400, "Content-Encoding"),
    ("versions/9/infer", _v2([dict(X1)]), {}, 404, "no version 9"),
    ("versions/one/infer", _v2([dict(X1)]), {}, 404, "no version 'one'"),
]


@pytest.mark.parametrize("path,body,headers,status,words", BAD_V2)
def test_v2_bad_requests_get_json_errors(url, path, body, headers, status, words):
    r = requests.post(f"{url}/v2/models/{MODEL}/{path}", data=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_v2_errors_reach_tritonclient(server):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    c = _triton(server)
    inp = th.InferInput("x", [1, 2], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 2), np.float32))
    with pytest.raises(InferenceServerException) as ei:
        c.infer(MODEL, [inp])
    assert ei.value.status() == "400" and "expects" in ei.value.message()
    with pytest.raises(InferenceServerException) as ei:
        c.infer("nope", [inp])
    assert ei.value.status() == "404"
    with pytest.raises(InferenceServerException) as ei:
        c.get_model_metadata("nope")
    assert ei.value.status() == "404" and "nope" in ei.value.message()


def test_queue_full_is_429(server, url):
    core = server.core
    old = core.queue_size
    core.queue_size = 0  # every model call finds the queue full
    try:
        r = requests.post(f"{url}/v2/models/{MODEL}/infer", data=_v2([dict(X1, shape=[1, 224, 224, 3],
                                                                          data=[0.0] * 150528)]), timeout=30)
        assert r.status_code == 429 and "queue" in r.json()["error"]
        r = requests.post(f"{url}/v1/models/{MODEL}:predict", json={"instances": [_b64(make_image())]}, timeout=30)
        assert r.status_code == 429 and "queue" in r.json()["error"]
    finally:
        core.queue_size = old


def test_metrics_and_access_log(server, url, caplog):
    x = _x(1)  # one successful call of each protocol, so the test stands alone
    assert requests.post(f"{url}/v1/models/{MODEL}:predict", json={"instances": x.tolist()}, timeout=30).ok
    assert requests.post(f"{url}/v2/models/{MODEL}/infer", timeout=30, json={"inputs": [
        {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}).ok
    with caplog.at_level(logging.INFO, logger="bfpaccel.serve.access"):
        requests.get(f"{url}/v1/models/{MODEL}", timeout=10)
        requests.get(f"{url}/v2/models/{MODEL}", timeout=10)
        requests.post(f"{url}/v2/models/nope/infer", data=b"{}", timeout=10)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "bfpaccel.serve.access"]
    assert [(d["protocol"], d["method"], d["code"], d["status"]) for d in lines[-3:]] == [
        ("tfs-rest", "GetModelStatus", "OK", 200), ("v2-rest", "ModelMetadata", "OK", 200),
        ("v2-rest", "ModelInfer", "NOT_FOUND", 404)]
    assert "nope" in lines[-1]["error"] and lines[-1]["route"] == ""  # unknown names never become labels
    r = requests.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert f'method="Predict",route="{MODEL}",code="OK",protocol="tfs-rest"' in r.text
    assert f'method="ModelInfer",route="{MODEL}",code="OK",protocol="v2-rest"' in r.text
    assert server.core.metrics.count(protocol="v2-rest") > 0


# -- limits ---------------------------------------------------------------------------------------

@pytest.fixture
def limited(server):
    from bfpaccel.serve.http import HttpServer

    srv = HttpServer(server.core, "127.0.0.1", 0, max_body_bytes=4096, max_connections=2, max_header_bytes=2048)
    yield srv
    srv.stop(grace=1)


def test_body_over_the_limit_is_413_without_reading_it(limited):
    # Content-Length says 1 TB and nothing is sent: the answer comes at once
    status, headers, body = _raw_http(limited.port, b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Length: 1000000000000\r\n\r\n", timeout=5)
    assert status == 413 and "4096" in json.loads(body)["error"]

    # chunked, no length: 8 KiB are sent and the connection stays open -- the server answers 413
    # once the limit is passed, without waiting for the rest
    def eight_kib(s):
        for _ in range(8):
            s.sendall(b"400\r\n" + b"a" * 1024 + b"\r\n")
    status, _, body = _raw_http(limited.port, b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n", then=eight_kib, timeout=5)
    assert status == 413 and "error" in json.loads(body)
    # a whole over-sized body sent by a client that writes first and reads after
    r = requests.post(f"http://127.0.0.1:{limited.port}/v1/models/tiny:predict", data=b"x" * 100_000, timeout=10)
    assert r.status_code == 413
    # a gzip body that inflates past the limit
    r = requests.post(f"http://127.0.0.1:{limited.port}/v1/models/tiny:predict", data=gzip.compress(b" " * 100_000),
                      headers={"Content-Encoding": "gzip"}, timeout=10)
    assert r.status_code == 413 and "inflated" in r.json()["error"]
    # under the limit the same server answers
    assert requests.get(f"http://127.0.0.1:{limited.port}/v2/health/ready", timeout=10).status_code == 200


def test_header_over_the_limit_is_refused(limited):
    head = b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n"
    status, _, body = _raw_http(limited.port, head, timeout=5)
    assert status == 431 and "2048" in json.loads(body)["error"]

    def rest(s):  # the head in two parts: the parser refuses it before it is complete
        time.sleep(0.2)
        try:
            s.sendall(head[4000:])
        except OSError:
            pass
    status, _, _ = _raw_http(limited.port, head[:4000], then=rest, timeout=5)
    assert status == 400


@pytest.fixture
def impatient(server):
    from bfpaccel.serve.http import HttpServer

    srv = HttpServer(server.core, "127.0.0.1", 0, body_timeout_s=0.5)
    yield srv
    srv.stop(grace=1)


def _closed(s):
    """True once the server has closed the connection (EOF or a reset)."""
    try:
        return s.recv(1) == b""
    except OSError:
        return True


def test_stalled_or_trickled_body_is_408_and_closed(impatient):
    """Slowloris: headers with a Content-Length, then the body stalls or trickles -- the server
    answers 408 once body_timeout_s has passed and closes the connection."""
    port = impatient.port
    head = (b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    before = impatient.core.metrics.count("Predict", "DEADLINE_EXCEEDED", protocol="tfs-rest")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # 10 bytes, then nothing
        t0 = time.monotonic()
        s.sendall(head + b'{"instances')
        status, headers, body = _read_response(s)
        took = time.monotonic() - t0
        assert status == 408, (status, body)
        assert "0.5 s" in json.loads(body)["error"] and "--body-timeout-s" in json.loads(body)["error"]
        assert headers.get("connection") == "close" and _closed(s)
        assert 0.4 < took < 5, took

    stop = threading.Event()

    def trickle(s):  # one byte every 50 ms: 1000 bytes would take 50 s
        def run():
            for _ in range(200):
                if stop.wait(0.05):
                    return
                try:
                    s.sendall(b" ")
                except OSError:
                    return
        threading.Thread(target=run, daemon=True).start()
    try:
        t0 = time.monotonic()
        status, headers, body = _raw_http(port, head, then=trickle, timeout=10)
        assert status == 408 and "was not complete" in json.loads(body)["error"]
        assert time.monotonic() - t0 < 5
    finally:
        stop.set()
    assert impatient.core.metrics.count("Predict", "DEADLINE_EXCEEDED", protocol="tfs-rest") == before + 2
    # a client that sends its body in time is answered as usual on the same server
    r = requests.post(f"http://127.0.0.1:{port}/v1/models/tiny:predict", json={"instances": [_b64(make_image())]},
                      timeout=30)
    assert r.status_code == 200


def test_stalled_head_is_408_and_closed(impatient):
    """A connection that never completes a request head (nothing sent, half a request line,
    or a kept-alive connection that starts its next head and stalls) is closed with a 408."""
    for first in (b"", b"POST /v1/models/tiny:pre", b"GET /v2 HTTP/1.1\r\nHost: x\r\n"):
        with socket.create_connection(("127.0.0.1", impatient.port), timeout=10) as s:
            t0 = time.monotonic()
            if first:
                s.sendall(first)
            status, headers, body = _read_response(s)
            assert status == 408 and "request head" in json.loads(body)["error"], (first, status, body)
            assert headers.get("connection") == "close" and _closed(s)
            assert 0.4 < time.monotonic() - t0 < 5
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=10) as s:  # kept alive, then a stall
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(s)[0] == 200
        s.sendall(b"GET /v2/hea")
        status, _, body = _read_response(s)
        assert status == 408 and _closed(s)


def test_body_timeout_option_reaches_the_http_port(plan):
    from bfpaccel.serve.http import HttpServer

    with pytest.raises(ValueError, match="body_timeout_s"):
        HttpServer(None, "127.0.0.1", 0, body_timeout_s=0)  # type: ignore[arg-type]
    with serve(plan, port=0, http_port=0, body_timeout_s=0.3) as h:
        assert h._http.body_timeout_s == 0.3
        status, _, body = _raw_http(h.http_port, b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: 10\r\n\r\n", timeout=10)
        assert status == 408 and "0.3 s" in json.loads(body)["error"]


def test_over_max_connections_is_503_not_a_hang(limited):
    held = [socket.create_connection(("127.0.0.1", limited.port), timeout=5) for _ in range(2)]
    try:
        t_end = time.monotonic() + 5
        while len(limited._server.server_state.connections) < 2 and time.monotonic() < t_end:
            time.sleep(0.01)
        t0 = time.monotonic()
        status, headers, body = _raw_http(limited.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        assert status == 503 and "max_connections" in json.loads(body)["error"]
        assert headers.get("connection") == "close" and time.monotonic() - t0 < 2
    finally:
        for s in held:
            s.close()
    t_end = time.monotonic() + 5
    while len(limited._server.server_state.connections) > 0 and time.monotonic() < t_end:
        time.sleep(0.01)
    assert requests.get(f"http://127.0.0.1:{limited.port}/v2/health/live", timeout=5).status_code == 200


def test_stop_drains_requests_in_flight(server, predictor):
    from bfpaccel.serve.http import HttpServer

    core = server.core
    srv = HttpServer(core, "127.0.0.1", 0)
    core.simulated_latency_s = 0.5
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(requests.post, f"http://127.0.0.1:{srv.port}/v1/models/{MODEL}:predict",
                            json={"instances": [_b64(make_image())]}, timeout=30)
            time.sleep(0.2)
            srv.stop(grace=10)
            r = fut.result()
    finally:
        core.simulated_latency_s = 0.0
    assert r.status_code == 200
    assert_same_bits(r.json()["predictions"], predictor.predict_images([make_image()])[TINY_OUTPUT])
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{srv.port}/v2", timeout=2)


# -- servers of their own: auth + TLS, warming up, missing dependency ------------------------------

def test_auth_and_tls(plan, predictor, tmp_path, images):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    cert, key = self_signed_cert(out_dir=str(tmp_path))
    with serve(plan, port=0, http_port=0, tls_cert=cert, tls_key=str(tmp_path / "key.pem"), auth_keys=["s3cret"]) as h:
        base = f"https://127.0.0.1:{h.http_port}"
        ca = str(tmp_path / "cert.pem")
        with pytest.raises(requests.exceptions.SSLError):  # the certificate is not trusted by default
            requests.get(f"{base}/v2/health/live", timeout=10)
        with pytest.raises(requests.ConnectionError):  # plain HTTP on the TLS port
            requests.get(f"http://127.0.0.1:{h.http_port}/v2", timeout=10)
        # health and metrics stay open; everything else needs the key
        assert requests.get(f"{base}/v2/health/ready", verify=ca, timeout=10).status_code == 200
        assert requests.get(f"{base}/metrics", verify=ca, timeout=10).status_code == 200
        for method, path in (("GET", "/v2"), ("GET", f"/v2/models/{MODEL}"), ("GET", f"/v1/models/{MODEL}"),
                             ("POST", f"/v1/models/{MODEL}:predict"), ("POST", f"/v2/models/{MODEL}/infer")):
            for hdr in ({}, {"Authorization": "Bearer wrong"}):
                r = requests.request(method, base + path, headers=hdr, data=b"{}", verify=ca, timeout=10)
                assert r.status_code == 401, (path, hdr)
                assert "key" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
        r = requests.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": [_b64(images[0])]},
                          headers={"Authorization": "Bearer s3cret"}, verify=ca, timeout=30)
        assert r.status_code == 200
        assert_same_bits(r.json()["predictions"], predictor.predict_images(images[:1])[TINY_OUTPUT])
        # tritonclient over TLS with the key in its headers
        c = th.InferenceServerClient(f"localhost:{h.http_port}", ssl=True, ssl_options={"ca_certs": ca})
        inp = th.InferInput("images", [1], "BYTES")
        inp.set_data_from_numpy(np.array(images[1:2], dtype=object), binary_data=True)
        with pytest.raises(InferenceServerException) as ei:
            c.infer(MODEL, [inp])
        assert ei.value.status() == "401"
        res = c.infer(MODEL, [inp], headers={"Authorization": "Bearer s3cret"})
        assert_same_bits(res.as_numpy(TINY_OUTPUT), predictor.predict_images(images[1:2])[TINY_OUTPUT])
        assert c.is_server_ready()  # no key needed


def test_unavailable_while_warming_up(plan):
    h = serve(plan, port=0, http_port=0, block=False, warmup_delay_s=1.5)
    try:
        base = f"http://127.0.0.1:{h.http_port}"
        assert requests.get(f"{base}/v2/health/live", timeout=10).status_code == 200
        assert requests.get(f"{base}/v2/health/ready", timeout=10).status_code == 503
        assert requests.get(f"{base}/v2/models/{MODEL}/ready", timeout=10).status_code == 503
        r = requests.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": [_b64(make_image())]}, timeout=10)
        assert r.status_code == 503 and "retry" in r.json()["error"]
        h.wait_ready(30)
        assert requests.get(f"{base}/v2/health/ready", timeout=10).status_code == 200
    finally:
        h.stop(grace=1)
    assert h.core.stopping


def test_missing_http_dependencies_name_the_extra(plan, monkeypatch):
    monkeypatch.delitem(sys.modules, "bfpaccel.serve.http", raising=False)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ImportError, match=r"pip install 'bfpaccel\[serve\]'"):
        serve(plan, port=0, http_port=0)


def test_port_in_use_is_a_clear_error(server):
    from bfpaccel.serve.http import HttpServer

    with pytest.raises(OSError, match="HTTP port"):
        HttpServer(server.core, "127.0.0.1", server.http_port)


def test_concurrent_clients(server, url, predictor, images):
    want = predictor.predict_images(images[:1])[TINY_OUTPUT]
    doc = {"instances": [_b64(images[0])]}

    def one(i):
        if i % 3 == 2:
            return requests.post(f"{url}/v1/models/{MODEL}:predict", data=b"{bad", timeout=30).status_code
        r = requests.post(f"{url}/v1/models/{MODEL}:predict", json=doc, timeout=30)
        assert_same_bits(r.json()["predictions"], want)
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(one, range(24)))
    assert codes.count(200) == 16 and codes.count(400) == 8
    assert threading.active_count() < 200
