"""Protocol-neutral wire codecs (bfpaccel.serve.wire) and the KServe v2 / ModelService protos:
round trips over every datatype, hostile input, and compatibility with the real client
libraries (tritonclient.http / tritonclient.grpc, tensorflow-serving-api)."""

from __future__ import annotations

import base64
import doctest
import json
import struct
import tracemalloc
from concurrent import futures

import grpc
import numpy as np
import pytest

from bfpaccel.serve import _protos as pb
from bfpaccel.serve import wire
from bfpaccel.serve.wire import WireError

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
ALL_TYPES = NUMERIC + ["BYTES"]


def sample(datatype: str, shape=(2, 3), seed: int = 0) -> np.ndarray:
    """Values of ``datatype`` that include the type's extremes (and NaN/inf for floats)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if datatype == "BYTES":
        vals = [bytes(rng.integers(0, 256, size=int(rng.integers(0, 9)), dtype=np.uint8)) for _ in range(n)]
        vals[0] = b"\xff\xd8\xff\x00jpeg"  # not UTF-8, with a NUL
        out = np.empty(n, dtype=object)
        out[:] = vals
        return out.reshape(shape)
    dt = wire.V2_DATATYPES[datatype]
    if datatype == "BOOL":
        a = rng.integers(0, 2, size=n).astype(bool)
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        a = rng.integers(info.min, info.max, size=n, dtype=dt, endpoint=True)
        a[0], a[-1] = info.min, info.max
    else:
        a = (rng.standard_normal(n) * 100).astype(dt)
        a[0], a[1], a[2] = np.finfo(dt).max, np.finfo(dt).tiny, -0.0
    return a.reshape(shape)


def utf8_sample(shape=(2, 3)) -> np.ndarray:
    vals = ["", "cat", "ünïcödé", "a\x00b", "{\"json\": 1}", "x" * 40][: int(np.prod(shape))]
    out = np.empty(len(vals), dtype=object)
    out[:] = [v.encode() for v in vals]
    return out.reshape(shape)


def assert_same(actual, expected, datatype: str) -> None:
    """Exact equality: shape, dtype, values (NaN == NaN, bits of floats)."""
    if datatype == "BYTES":
        exp = [bytes(x) for x in np.asarray(expected, dtype=object).reshape(-1)]
        act = actual if isinstance(actual, list) else [
            x.encode() if isinstance(x, str) else bytes(x) for x in np.asarray(actual, dtype=object).reshape(-1)]
        assert act == exp
        return
    a = np.asarray(actual)
    e = np.asarray(expected)
    assert a.shape == e.shape
    assert a.dtype == e.dtype.newbyteorder("="), (a.dtype, e.dtype)
    if a.dtype.kind == "f":
        assert np.array_equal(a.view(f"u{a.itemsize}"), e.view(f"u{e.itemsize}"))
    else:
        assert np.array_equal(a, e)


def v2_body(doc, binary: bytes = b""):
    header = json.dumps(doc).encode()
    return header + binary, (len(header) if binary else None)


def test_docstring_examples():
    result = doctest.testmod(wire, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------------
# protos


def _fields(desc):
    return {f.name: (f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else None,
                     f.enum_type.full_name if f.enum_type else None,
                     f.containing_oneof.name if f.containing_oneof else None) for f in desc.fields}


def _compare_messages(ours, theirs, path=""):
    assert ours.full_name == theirs.full_name
    assert _fields(ours) == _fields(theirs), path + ours.full_name
    for nested in ours.nested_types:
        _compare_messages(nested, theirs.nested_types_by_name[nested.name], path)
    for e in ours.enum_types:
        assert [(v.name, v.number) for v in e.values] == \
            [(v.name, v.number) for v in theirs.enum_types_by_name[e.name].values]


def test_v2_protos_match_tritonclient():
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    theirs = service_pb2.DESCRIPTOR
    ours_svc = pb.POOL.FindServiceByName(pb.V2_SERVICE)
    their_svc = theirs.services_by_name["GRPCInferenceService"]
    assert their_svc.full_name == pb.V2_SERVICE
    for m in ours_svc.methods:
        t = their_svc.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (t.input_type.full_name, t.output_type.full_name)
        _compare_messages(m.input_type, t.input_type)
        _compare_messages(m.output_type, t.output_type)
        assert pb.V2_METHODS[m.name][0].DESCRIPTOR.full_name == m.input_type.full_name
        assert f"/{pb.V2_SERVICE}/{m.name}" in (pb.V2_SERVER_LIVE_METHOD, pb.V2_SERVER_READY_METHOD,
                                                pb.V2_MODEL_READY_METHOD, pb.V2_SERVER_METADATA_METHOD,
                                                pb.V2_MODEL_METADATA_METHOD, pb.V2_MODEL_INFER_METHOD)
    assert sorted(m.name for m in ours_svc.methods) == sorted(pb.V2_METHODS)
    for name in ("InferParameter", "InferTensorContents"):
        _compare_messages(pb.POOL.FindMessageTypeByName(f"inference.{name}"), theirs.message_types_by_name[name])


def test_v2_messages_cross_the_wire_with_tritonclient_messages():
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    req = service_pb2.ModelInferRequest(model_name="m", id="r1")
    t = req.inputs.add(name="x", datatype="FP16", shape=[2, 1])
    t.parameters["p"].uint64_param = 2**64 - 1
    req.raw_input_contents.append(np.array([1.5, -2], np.float16).tobytes())
    req.outputs.add(name="y").parameters["binary_data"].bool_param = True
    ours = pb.ModelInferRequest.FromString(req.SerializeToString())
    assert ours.SerializeToString() == req.SerializeToString()
    parsed = wire.parse_v2_grpc_request(ours)
    assert parsed.model_name == "m" and parsed.id == "r1"
    assert parsed.inputs["x"].parameters == {"p": 2**64 - 1}
    assert parsed.outputs[0].name == "y" and parsed.outputs[0].binary_data is True


def test_model_service_protos_match_tensorflow_serving():
    pytest.importorskip("tensorflow_serving")
    from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2, model_service_pb2
    svc = pb.POOL.FindServiceByName(pb.MODEL_SERVICE)
    theirs = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"]
    assert theirs.full_name == pb.MODEL_SERVICE
    for m in svc.methods:
        t = theirs.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (t.input_type.full_name, t.output_type.full_name)
    assert pb.GET_MODEL_STATUS_METHOD == "/tensorflow.serving.ModelService/GetModelStatus"
    assert pb.RELOAD_CONFIG_METHOD == "/tensorflow.serving.ModelService/HandleReloadConfigRequest"
    for ours, mod in ((pb.GetModelStatusRequest, get_model_status_pb2),
                      (pb.GetModelStatusResponse, get_model_status_pb2),
                      (pb.ModelVersionStatus, get_model_status_pb2), (pb.ReloadConfigResponse, model_management_pb2)):
        their_cls = getattr(mod, ours.DESCRIPTOR.name)
        _compare_messages(ours.DESCRIPTOR, their_cls.DESCRIPTOR)
    _compare_messages(pb.StatusProto.DESCRIPTOR, get_model_status_pb2.ModelVersionStatus.DESCRIPTOR
                      .fields_by_name["status"].message_type)
    # a real response's bytes, both ways
    resp = get_model_status_pb2.GetModelStatusResponse()
    v = resp.model_version_status.add(version=3, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    v.status.error_code = 5
    v.status.error_message = "gone"
    ours = pb.GetModelStatusResponse.FromString(resp.SerializeToString())
    assert ours.model_version_status[0].state == pb.ModelVersionState["AVAILABLE"]
    assert ours.model_version_status[0].status.error_code == pb.ErrorCode["NOT_FOUND"]
    assert ours.SerializeToString() == resp.SerializeToString()


def test_model_status_json_is_tf_serving_rest_shape():
    from google.protobuf import json_format
    resp = pb.GetModelStatusResponse()
    v = resp.model_version_status.add()
    v.version = 123
    v.state = pb.ModelVersionStatus.AVAILABLE
    v.status.error_code = pb.ErrorCode["OK"]
    doc = json.loads(json_format.MessageToJson(resp, always_print_fields_with_no_presence=True))
    # TF Serving's REST documentation example for GET /v1/models/<name>
    assert doc == {"model_version_status": [{"version": "123", "state": "AVAILABLE",
                                             "status": {"error_code": "OK", "error_message": ""}}]}
    req = pb.ReloadConfigRequest.FromString(b"\x0a\x04\x0a\x02\x08\x01")  # a config's bytes stay opaque
    assert req.HasField("config")


# ------------------------------------------------------------------------------------------
# datatypes


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_datatype_names(datatype):
    dt = wire.v2_numpy_dtype(datatype)
    assert wire.v2_datatype(dt) == datatype
    assert wire.v2_datatype(np.zeros(1, dtype=dt)) == datatype


def test_datatype_errors():
    for bad in ("FLOAT", "fp32", "BF16", "", None, 3):
        with pytest.raises(WireError, match="not supported"):
            wire.v2_numpy_dtype(bad)
    with pytest.raises(TypeError):
        wire.v2_datatype(np.complex64)
    assert wire.v2_datatype(np.dtype(">f4")) == "FP32"
    assert wire.v2_datatype(np.array(["a"])) == "BYTES"


def test_bytes_element_serialization():
    vals = [b"", b"\x00", b"abc" * 100]
    raw = wire.serialize_bytes_elements(vals)
    assert raw[:4] == struct.pack("<I", 0) and len(raw) == 12 + 1 + 300
    assert wire.deserialize_bytes_elements(raw, 3) == vals
    with pytest.raises(WireError, match="left after"):
        wire.deserialize_bytes_elements(raw, 2)
    with pytest.raises(WireError, match="cannot hold"):
        wire.deserialize_bytes_elements(raw, 100)
    with pytest.raises(WireError, match="declares 300 bytes"):
        wire.deserialize_bytes_elements(raw[:-1], 3, "input 'img'")
    with pytest.raises(WireError, match="over the limit"):
        wire.deserialize_bytes_elements(raw, 3, max_bytes=10)
    assert wire.serialize_bytes_elements(["é"]) == b"\x02\x00\x00\x00\xc3\xa9"


# ------------------------------------------------------------------------------------------
# KServe v2 JSON


@pytest.mark.parametrize("datatype", ALL_TYPES)
@pytest.mark.parametrize("binary", [False, True])
def test_v2_json_request_from_tritonclient(datatype, binary):
    httpclient = pytest.importorskip("tritonclient.http")
    a = utf8_sample() if datatype == "BYTES" and not binary else sample(datatype)
    b = sample("FP32", (1, 4), seed=3)
    i1 = httpclient.InferInput("in 1", list(a.shape), datatype)
    i1.set_data_from_numpy(a, binary_data=binary)
    i2 = httpclient.InferInput("second", list(b.shape), "FP32")
    i2.set_data_from_numpy(b, binary_data=not binary)
    outs = [httpclient.InferRequestedOutput("y", binary_data=binary), httpclient.InferRequestedOutput("z")]
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        [i1, i2], outputs=outs, request_id="req-7", parameters={"custom": 5})
    assert header_length is not None  # one of the two inputs is always binary
    req = wire.parse_v2_json_request(body, header_length)
    assert list(req.inputs) == ["in 1", "second"]
    t = req.inputs["in 1"]
    assert (t.datatype, t.shape) == (datatype, a.shape)
    assert_same(t.data, a, datatype)
    assert_same(req.inputs["second"].data, b, "FP32")
    assert req.id == "req-7" and req.parameters["custom"] == 5
    assert req.output_names == ["y", "z"]
    # tritonclient's InferRequestedOutput defaults to binary_data=True; "other" was not requested
    assert req.binary_outputs(["y", "z", "other"]) == ({"y", "z"} if binary else {"z"})
    # header length as the HTTP header's text
    assert wire.parse_v2_json_request(body, str(header_length)).inputs["in 1"].shape == a.shape


def test_v2_json_request_without_outputs_asks_binary():
    httpclient = pytest.importorskip("tritonclient.http")
    i = httpclient.InferInput("x", [2], "INT32")
    i.set_data_from_numpy(np.array([1, 2], np.int32), binary_data=False)
    body, hl = httpclient.InferenceServerClient.generate_request_body([i])
    assert hl is None
    req = wire.parse_v2_json_request(body)
    assert req.output_names is None and req.binary_data_output
    assert req.binary_outputs(["a", "b"]) == {"a", "b"}


@pytest.mark.parametrize("datatype", ALL_TYPES)
@pytest.mark.parametrize("mode", ["json", "binary"])
def test_v2_json_response_read_by_tritonclient(datatype, mode):
    httpclient = pytest.importorskip("tritonclient.http")
    a = utf8_sample() if datatype == "BYTES" and mode == "json" else sample(datatype, seed=5)
    c = sample("INT64", (3,), seed=9)
    body, hl = wire.encode_v2_json_response("net", {"out": a, "other": c}, model_version="1", request_id="r",
                                            binary={"out"} if mode == "binary" else False)
    assert (hl is None) == (mode == "json")
    res = httpclient.InferResult.from_response_body(body, header_length=hl)
    resp = res.get_response()
    assert resp["model_name"] == "net" and resp["model_version"] == "1" and resp["id"] == "r"
    assert_same(res.as_numpy("out"), a, datatype)
    assert_same(res.as_numpy("other"), c, "INT64")
    assert ("data" in res.get_output("other")) and ("data" in res.get_output("out")) == (mode == "json")


def test_v2_json_response_non_utf8_bytes_go_binary():
    httpclient = pytest.importorskip("tritonclient.http")
    a = sample("BYTES")
    body, hl = wire.encode_v2_json_response("m", {"blob": a})
    assert hl is not None
    out = httpclient.InferResult.from_response_body(body, header_length=hl)
    assert_same(out.as_numpy("blob"), a, "BYTES")


def test_v2_json_non_finite_floats_both_ways():
    httpclient = pytest.importorskip("tritonclient.http")
    a = np.array([np.nan, np.inf, -np.inf, 0.1, -0.0], np.float32)
    body, hl = wire.encode_v2_json_response("m", {"y": a})
    assert hl is None and b"NaN" in body and b"-Infinity" in body
    assert_same(httpclient.InferResult.from_response_body(body).as_numpy("y"), a, "FP32")
    # and as a request (Python's and rapidjson's JSON tokens)
    i = httpclient.InferInput("x", [5], "FP32")
    i.set_data_from_numpy(a, binary_data=False)
    req = wire.parse_v2_json_request(httpclient.InferenceServerClient.generate_request_body([i])[0])
    assert_same(req.inputs["x"].data, a, "FP32")


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_v2_json_roundtrip_own_codec(datatype):
    """Our response body, read back as a request (same tensor encoding), JSON and binary."""
    a = utf8_sample() if datatype == "BYTES" else sample(datatype, seed=11)
    for binary in (False, True):
        body, hl = wire.encode_v2_json_response("m", {"t": a}, binary=binary)
        doc = json.loads(body[:hl] if hl else body)
        tensor = doc["outputs"][0]
        req_body, req_hl = v2_body({"inputs": [tensor]}, body[hl:] if hl else b"")
        got = wire.parse_v2_json_request(req_body, req_hl).inputs["t"]
        assert_same(got.data, a, datatype)
        if datatype != "BYTES":
            assert got.data.flags.writeable  # owned, not a view of the body


def test_v2_json_nested_and_flat_data():
    flat = {"name": "x", "shape": [2, 3], "datatype": "INT16", "data": [1, 2, 3, 4, 5, 6]}
    nested = dict(flat, data=[[1, 2, 3], [4, 5, 6]])
    for inp in (flat, nested):
        got = wire.parse_v2_json_request(v2_body({"inputs": [inp]})[0]).inputs["x"].data
        assert got.dtype == np.int16 and got.tolist() == [[1, 2, 3], [4, 5, 6]]
    scalar = {"name": "s", "shape": [], "datatype": "FP64", "data": 2.5}
    assert wire.parse_v2_json_request(v2_body({"inputs": [scalar]})[0]).inputs["s"].data.shape == ()
    empty = {"name": "e", "shape": [2, 0], "datatype": "FP32", "data": [[], []]}
    assert wire.parse_v2_json_request(v2_body({"inputs": [empty]})[0]).inputs["e"].data.shape == (2, 0)


def _bad_json_input(**kw):
    inp = {"name": "img", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}
    inp.update(kw)
    for k in [k for k, v in kw.items() if v is _DROP]:
        del inp[k]
    return v2_body({"inputs": [inp]})[0]


_DROP = object()


@pytest.mark.parametrize("kw,match", [
    (dict(data=[1, 2, 3]), "neither a flat list of 4 values nor nested"),
    (dict(data=[1, 2, 3, 4, 5]), "neither a flat list"),
    (dict(data=[[1, 2], [3]]), "a list of 1 where 2 belong"),
    (dict(data=[[1, 2], 3, 4]), "neither a flat list"),
    (dict(data=[[[1], [2]], [[3], [4]]]), "nested deeper"),
    (dict(data=[[1, 2], [3, [4]]]), "nested deeper"),
    (dict(data={"a": 1}), "data must be a list"),
    (dict(datatype="FLOAT"), "datatype 'FLOAT' is not supported"),
    (dict(datatype="BF16"), "bfloat16"),
    (dict(datatype=_DROP), "has no 'datatype'"),
    (dict(shape=_DROP), "has no 'shape'"),
    (dict(data=_DROP), "neither 'data' nor parameters.binary_data_size"),
    (dict(shape=[2, -2]), "negative dimension"),
    (dict(shape=[2, 2.0]), "non-integer dimension"),
    (dict(shape=[True, 4]), "non-integer dimension"),
    (dict(shape="2,2"), "shape must be a list"),
    (dict(shape=[1] * 33), "rank 33"),
    (dict(data=[1, 2, "3", 4]), "FP32 data must be numbers, got string"),
    (dict(data=[1, 2, True, 4]), "got boolean"),
    (dict(data=[1, 2, None, 4]), "got null"),
    (dict(datatype="INT32", data=[1, 2, 3.5, 4]), "INT32 data must be integers, got number"),
    (dict(datatype="INT8", data=[1, 2, 128, 4]), r"value 128 is out of the range of INT8 \[-128, 127\]"),
    (dict(datatype="UINT64", data=[1, 2, -1, 4]), "value -1 is out of the range of UINT64"),
    (dict(datatype="INT64", data=[1, 2, 2**63, 4]), "out of the range of INT64"),
    (dict(datatype="BOOL", data=[1, 0, 1, 0]), "BOOL data must be true/false, got integer"),
    (dict(datatype="BYTES", data=["a", "b", 3, "d"]), "BYTES data must be strings, got integer"),
    (dict(datatype="BYTES", data=["a", "b", "\ud800", "d"]), "not valid Unicode"),
    (dict(data=[1, 2, 10**400, 4]), "too large for FP32"),
    (dict(name=""), "has no 'name'"),
    (dict(parameters={"shared_memory_region": "r"}), "shared memory"),
    (dict(parameters=[1]), "'parameters' must be a JSON object"),
])
def test_v2_json_malformed_inputs(kw, match):
    with pytest.raises(WireError, match=match) as e:
        wire.parse_v2_json_request(_bad_json_input(**kw))
    if kw.get("name", "img") == "img":
        assert "'img'" in str(e.value)  # the message names the input


@pytest.mark.parametrize("doc,match", [
    ([], "must be a JSON object"),
    ({}, "'inputs' must be a non-empty list"),
    ({"inputs": []}, "'inputs' must be a non-empty list"),
    ({"inputs": [5]}, "input #0 must be a JSON object"),
    ({"id": 5, "inputs": [{}]}, "'id' must be a string"),
    ({"parameters": {"binary_data_output": "yes"}, "inputs": [{}]}, "binary_data_output"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}] * 2}, "'a' appears twice"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{"name": "y"}] * 2},
     "output 'y' appears twice"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{}]},
     "output #0 must be an object with a 'name'"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}],
      "outputs": [{"name": "y", "parameters": {"classification": 3}}]}, "classification"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}],
      "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}, "'binary_data' must be true or false"),
])
def test_v2_json_malformed_requests(doc, match):
    with pytest.raises(WireError, match=match):
        wire.parse_v2_json_request(v2_body(doc)[0])


@pytest.mark.parametrize("body,match", [
    (b"{\"inputs\": [", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[" * 200000 + b"]" * 200000, "nested too deeply"),
    (b"{\"inputs\": [{\"name\": \"a\", \"shape\": [1], \"datatype\": \"INT64\", \"data\": [" + b"9" * 5000 + b"]}]}",
     "not valid JSON"),
])
def test_v2_json_undecodable_bodies(body, match):
    with pytest.raises(WireError, match=match):
        wire.parse_v2_json_request(body)


def _binary_request(inputs, blobs):
    return v2_body({"inputs": inputs}, b"".join(blobs))


def test_v2_binary_section_errors():
    a = np.arange(4, dtype=np.float32)
    fp = {"name": "a", "shape": [4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
    body, hl = _binary_request([fp], [a.tobytes()])
    assert_same(wire.parse_v2_json_request(body, hl).inputs["a"].data, a, "FP32")
    with pytest.raises(WireError, match="runs past the binary part.*truncated"):
        wire.parse_v2_json_request(body[:-1], hl)
    with pytest.raises(WireError, match="binary part has 17 bytes but .* account for 16"):
        wire.parse_v2_json_request(body + b"\x00", hl)
    with pytest.raises(WireError, match="Inference-Header-Content-Length is .* but the body has only"):
        wire.parse_v2_json_request(body, len(body) + 1)
    for bad in ("-1", "12x", "", -3, 1.5, True):
        with pytest.raises(WireError, match="not a non-negative integer"):
            wire.parse_v2_json_request(body, bad)
    with pytest.raises(WireError, match="no Inference-Header-Content-Length header"):
        wire.parse_v2_json_request(body[:hl])
    with pytest.raises(WireError, match="not valid JSON"):
        wire.parse_v2_json_request(body, hl + 3)  # header length pointing into the binary part
    # binary_data_size not what the shape needs
    body, hl = _binary_request([dict(fp, parameters={"binary_data_size": 12})], [a.tobytes()[:12]])
    with pytest.raises(WireError, match="input 'a': binary_data_size is 12; shape \\[4\\] of FP32 needs 16"):
        wire.parse_v2_json_request(body, hl)
    for bad in (-4, "16", 16.0, True):
        body, hl = _binary_request([dict(fp, parameters={"binary_data_size": bad})], [a.tobytes()])
        with pytest.raises(WireError, match="binary_data_size must be a non-negative integer"):
            wire.parse_v2_json_request(body, hl)
    both = dict(fp, data=[1, 2, 3, 4])
    body, hl = _binary_request([both], [a.tobytes()])
    with pytest.raises(WireError, match="both 'data' and parameters.binary_data_size"):
        wire.parse_v2_json_request(body, hl)
    # BOOL bytes other than 0/1
    body, hl = _binary_request([{"name": "b", "shape": [2], "datatype": "BOOL",
                                 "parameters": {"binary_data_size": 2}}], [b"\x01\x02"])
    with pytest.raises(WireError, match="input 'b': BOOL raw data has a byte other than 0 or 1"):
        wire.parse_v2_json_request(body, hl)


def test_v2_binary_bytes_tensor_errors():
    raw = wire.serialize_bytes_elements([b"jpeg-1", b"jpeg-22"])
    inp = {"name": "img", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}
    body, hl = _binary_request([inp], [raw])
    assert wire.parse_v2_json_request(body, hl).inputs["img"].data == [b"jpeg-1", b"jpeg-22"]
    body, hl = _binary_request([dict(inp, shape=[3])], [raw])
    with pytest.raises(WireError, match="input 'img': BYTES data ends inside the length of element 2"):
        wire.parse_v2_json_request(body, hl)
    body, hl = _binary_request([dict(inp, shape=[1])], [raw])
    with pytest.raises(WireError, match="input 'img': 11 bytes left after the 1 BYTES elements"):
        wire.parse_v2_json_request(body, hl)
    short = raw[:-1]
    body, hl = _binary_request([dict(inp, parameters={"binary_data_size": len(short)})], [short])
    with pytest.raises(WireError, match="element 1 declares 7 bytes but only 6 remain"):
        wire.parse_v2_json_request(body, hl)
    body, hl = _binary_request([inp], [raw])
    with pytest.raises(WireError, match="BYTES elements total 13 bytes, over the limit of 12"):
        wire.parse_v2_json_request(body, hl, max_bytes=12)


def test_v2_huge_shapes_are_rejected_before_allocation():
    """Shapes whose arrays would need terabytes: refused from the header alone."""
    cases = [
        ({"name": "a", "shape": [2**40], "datatype": "FP32", "parameters": {"binary_data_size": 2**42}}, b"",
         dict(max_elements=10**6), "1099511627776 elements, over the limit of 1000000"),
        ({"name": "a", "shape": [2**20, 2**20], "datatype": "FP64", "data": []}, b"",
         dict(max_bytes=2**30), "8796093022208 bytes, over the limit"),
        ({"name": "a", "shape": [2**40], "datatype": "FP32", "parameters": {"binary_data_size": 2**42}}, b"",
         {}, "runs past the binary part"),
        ({"name": "a", "shape": [2**40], "datatype": "FP32", "data": [1.0]}, b"", {}, "neither a flat list"),
        ({"name": "a", "shape": [2**40], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}, b"\0" * 8,
         {}, "8 bytes cannot hold 1099511627776 BYTES elements"),
        ({"name": "a", "shape": [0, 2**62, 2**62], "datatype": "FP32", "data": []}, b"", {}, "too large to represent"),
        ({"name": "a", "shape": [10**30], "datatype": "UINT8", "data": []}, b"", dict(max_elements=2**31),
         "over the limit"),
    ]
    for inp, blob, limits, match in cases:
        body, hl = v2_body({"inputs": [inp]}, blob)
        if "binary_data_size" in inp.get("parameters", {}) and hl is None:
            hl = len(body)
        tracemalloc.start()
        try:
            with pytest.raises(WireError, match=match):
                wire.parse_v2_json_request(body, hl, **limits)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, (inp, peak)


def test_v2_limits_accept_at_the_limit():
    a = np.zeros(6, np.float32)
    body, hl = _binary_request([{"name": "a", "shape": [6], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 24}}], [a.tobytes()])
    assert wire.parse_v2_json_request(body, hl, max_elements=6, max_bytes=24).inputs["a"].data.size == 6
    with pytest.raises(WireError, match="6 elements, over the limit of 5"):
        wire.parse_v2_json_request(body, hl, max_elements=5)
    with pytest.raises(WireError, match="24 bytes, over the limit of 23"):
        wire.parse_v2_json_request(body, hl, max_bytes=23)


def test_v2_json_response_fields():
    body, hl = wire.encode_v2_json_response(
        "m", [wire.WireTensor("y", "FP32", (2,), np.array([1, 2], np.float32), {"note": "x"})],
        parameters={"sequence_id": 3})
    doc = json.loads(body)
    assert hl is None and "id" not in doc and "model_version" not in doc
    assert doc["parameters"] == {"sequence_id": 3}
    assert doc["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2], "parameters": {"note": "x"},
                               "data": [1.0, 2.0]}]
    body, hl = wire.encode_v2_json_response("m", {"y": np.ones((2, 2), np.float16)}, binary=True)
    doc = json.loads(body[:hl])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 8} and len(body) == hl + 8


# ------------------------------------------------------------------------------------------
# KServe v2 gRPC


def _contents_request(datatype, a):
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    req = service_pb2.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="x", datatype=datatype, shape=list(a.shape))
    field = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}[datatype]
    vals = [bytes(v) for v in a.reshape(-1)] if datatype == "BYTES" else a.reshape(-1).tolist()
    getattr(t.contents, field).extend(vals)
    return pb.ModelInferRequest.FromString(req.SerializeToString())


@pytest.mark.parametrize("datatype", [d for d in ALL_TYPES if d != "FP16"])
def test_v2_grpc_typed_contents(datatype):
    a = sample(datatype, seed=21)
    got = wire.parse_v2_grpc_request(_contents_request(datatype, a)).inputs["x"]
    assert got.shape == a.shape
    assert_same(got.data, a, datatype)


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_v2_grpc_raw_contents_and_response_with_tritonclient(datatype):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor
    a = sample(datatype, seed=31)
    req = service_pb2.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype=np_to_triton_dtype(a.dtype), shape=list(a.shape))
    req.raw_input_contents.append(serialize_byte_tensor(a).item() if datatype == "BYTES" else a.tobytes())
    got = wire.parse_v2_grpc_request(pb.ModelInferRequest.FromString(req.SerializeToString())).inputs["x"]
    assert_same(got.data, a, datatype)
    resp = wire.encode_v2_grpc_response("m", {"y": a, "z": np.arange(3, dtype=np.int32)}, model_version="2",
                                        request_id="q", parameters={"flag": True, "n": -3, "f": 0.5, "s": "t"})
    result = grpcclient.InferResult(service_pb2.ModelInferResponse.FromString(resp.SerializeToString()))
    assert_same(result.as_numpy("y"), a, datatype)
    assert_same(result.as_numpy("z"), np.arange(3, dtype=np.int32), "INT32")
    r = result.get_response()
    assert (r.model_name, r.model_version, r.id) == ("m", "2", "q")
    assert r.parameters["flag"].bool_param and r.parameters["n"].int64_param == -3
    assert r.parameters["f"].double_param == 0.5 and r.parameters["s"].string_param == "t"


def _grpc_req(datatype="FP32", shape=(2,), raw=None, **contents):
    req = pb.ModelInferRequest()
    t = req.inputs.add(name="x", datatype=datatype)
    t.shape.extend(shape)
    for k, v in contents.items():
        getattr(t.contents, k).extend(v)
    if raw is not None:
        req.raw_input_contents.extend(raw)
    return req


@pytest.mark.parametrize("req,match", [
    (_grpc_req(raw=[b"\0" * 8, b""]), "raw_input_contents has 2 entries for 1 inputs"),
    (_grpc_req(raw=[b"\0" * 7]), "input 'x': 7 bytes of raw data; shape \\[2\\] of FP32 needs 8"),
    (_grpc_req(fp32_contents=[1.0]), "contents.fp32_contents has 1 values; shape \\[2\\] needs 2"),
    (_grpc_req(fp64_contents=[1.0, 2.0]), "contents.fp64_contents is set for a FP32 tensor"),
    (_grpc_req("FP16", fp32_contents=[1.0, 2.0]), "FP16 has no typed contents field"),
    (_grpc_req("INT8", int_contents=[1, 200]), "value 200 is out of the range of INT8"),
    (_grpc_req("UINT16", uint_contents=[1, 70000]), "value 70000 is out of the range of UINT16"),
    (_grpc_req(raw=[b"\0" * 8], fp32_contents=[1.0, 2.0]), "has contents although the request uses raw"),
    (_grpc_req("BF16", raw=[b"\0" * 4]), "bfloat16"),
    (_grpc_req("FP32", shape=(2, -1)), "negative dimension"),
    (_grpc_req("FP32", shape=(2**40,), raw=[b""]), "over the limit"),
    (_grpc_req("BYTES", shape=(3,), raw=[wire.serialize_bytes_elements([b"a", b"b"])]),
     "cannot hold 3 BYTES elements"),
    (_grpc_req("BOOL", raw=[b"\x00\x05"]), "byte other than 0 or 1"),
    (pb.ModelInferRequest(), "request has no inputs"),
])
def test_v2_grpc_malformed(req, match):
    with pytest.raises(WireError, match=match):
        wire.parse_v2_grpc_request(req, max_elements=2**30)


def test_v2_grpc_duplicate_and_unsupported():
    req = _grpc_req(fp32_contents=[1, 2])
    req.inputs.append(req.inputs[0])
    with pytest.raises(WireError, match="'x' appears twice"):
        wire.parse_v2_grpc_request(req)
    req = _grpc_req(fp32_contents=[1, 2])
    req.inputs[0].parameters["shared_memory_region"].string_param = "r"
    with pytest.raises(WireError, match="shared memory"):
        wire.parse_v2_grpc_request(req)
    req = _grpc_req(fp32_contents=[1, 2])
    req.outputs.add(name="y").parameters["classification"].int64_param = 3
    with pytest.raises(WireError, match="classification"):
        wire.parse_v2_grpc_request(req)


@pytest.fixture(scope="module")
def v2_echo_server():
    """A loopback v2 gRPC service built on the wire codecs: ModelInfer answers each input as an
    output of the same name (those requested, or all)."""
    def infer(request, context):
        try:
            req = wire.parse_v2_grpc_request(request, max_elements=10**6)
        except WireError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        names = req.output_names or list(req.inputs)
        return wire.encode_v2_grpc_response(request.model_name, [req.inputs[n] for n in names],
                                            model_version="1", request_id=req.id)

    ser = lambda m: m.SerializeToString()  # noqa: E731
    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer, pb.ModelInferRequest.FromString, ser),
        "ServerLive": grpc.unary_unary_rpc_method_handler(lambda r, c: pb.ServerLiveResponse(live=True),
                                                          pb.ServerLiveRequest.FromString, ser),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(pb.V2_SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_v2_grpc_tritonclient_end_to_end(v2_echo_server):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException
    client = grpcclient.InferenceServerClient(v2_echo_server)
    try:
        assert client.is_server_live()
        arrays = {f"in_{dt}": sample(dt, shape=(3, 2), seed=k) for k, dt in enumerate(ALL_TYPES)}
        inputs = []
        for name, a in arrays.items():
            i = grpcclient.InferInput(name, list(a.shape), name[3:])
            i.set_data_from_numpy(a)
            inputs.append(i)
        result = client.infer("echo", inputs, request_id="abc")
        assert result.get_response().id == "abc"
        for name, a in arrays.items():
            assert_same(result.as_numpy(name), a, name[3:])
        result = client.infer("echo", inputs[:3], outputs=[grpcclient.InferRequestedOutput("in_UINT8")])
        assert [o.name for o in result.get_response().outputs] == ["in_UINT8"]
        with pytest.raises(InferenceServerException, match="appears twice") as e:
            client.infer("echo", [inputs[0], inputs[0]])
        assert "INVALID_ARGUMENT" in str(e.value.status())
    finally:
        client.close()


# ------------------------------------------------------------------------------------------
# TensorFlow Serving REST


DEEP: list = [1]
for _ in range(33):
    DEEP = [DEEP]


def tf(doc, **kw):
    return wire.parse_tf_rest_request(json.dumps(doc).encode(), **kw)


def test_tf_rest_row_format_single_and_named():
    r = tf({"instances": [[1, 2], [3, 4], [5, 6]]}, default_input="x")
    assert r.row_format and r.signature_name is None
    assert r.inputs["x"].data.dtype == np.float32 and r.inputs["x"].data.shape == (3, 2)
    img = base64.b64encode(b"\xff\xd8jpeg").decode()
    r = tf({"signature_name": "serving_default",
            "instances": [{"image": {"b64": img}, "k": 1}, {"image": {"b64": img.rstrip("=")}, "k": 2}]},
           input_dtypes={"k": "INT32"})
    assert r.signature_name == "serving_default"
    assert r.inputs["image"].datatype == "BYTES" and r.inputs["image"].data == [b"\xff\xd8jpeg"] * 2
    assert r.inputs["image"].shape == (2,)
    assert r.inputs["k"].data.dtype == np.int32 and r.inputs["k"].data.tolist() == [1, 2]
    r = tf({"instances": [{"b64": img}]}, default_input="img")  # a b64 object is a value, not named inputs
    assert r.inputs["img"].data == [b"\xff\xd8jpeg"]
    r = tf({"instances": ["foo", "bär"]}, default_input="s")
    assert r.inputs["s"].data == [b"foo", "bär".encode()]
    r = tf({"instances": [True, False]}, default_input="b")
    assert r.inputs["b"].datatype == "BOOL"


def test_tf_rest_columnar_format():
    r = tf({"inputs": {"tag": ["foo", "bar"], "signal": [[1, 2, 3], [3, 4, 1]], "sensor": [[[1, 2]], [[4, 5]]]}},
           input_dtypes={"signal": np.int64})
    assert not r.row_format
    assert r.inputs["tag"].data == [b"foo", b"bar"]
    assert r.inputs["signal"].data.dtype == np.int64 and r.inputs["signal"].shape == (2, 3)
    assert r.inputs["sensor"].shape == (2, 1, 2)
    r = tf({"inputs": 2.5}, default_input="x", default_numeric="FP64")
    assert r.inputs["x"].shape == () and r.inputs["x"].data.dtype == np.float64
    r = tf({"inputs": {"b64": "eA=="}}, default_input="x")
    assert r.inputs["x"].data == [b"x"] and r.inputs["x"].shape == ()


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_tf_rest_roundtrip_every_datatype(datatype):
    a = sample(datatype, shape=(2, 3), seed=41)
    for row in (True, False):
        body = wire.encode_tf_rest_response({"out_bytes" if datatype == "BYTES" else "out": a}, row_format=row)
        doc = json.loads(body)
        value = doc["predictions"] if row else doc["outputs"]
        req = {"instances": value} if row else {"inputs": value}
        got = tf(req, default_input="t", input_dtypes={"t": datatype}).inputs["t"]
        assert got.shape == a.shape
        assert_same(got.data, a, datatype)


def test_tf_rest_response_shapes():
    a = np.array([[0.5, np.nan], [np.inf, -np.inf]], np.float32)
    b = np.array([1, 2], np.int64)
    s = np.array([b"ok", b"\xff"], dtype=object)
    body = wire.encode_tf_rest_response({"a": a}, row_format=True)
    assert body == b'{"predictions": [[0.5, NaN], [Infinity, -Infinity]]}'
    body = wire.encode_tf_rest_response({"a": a, "b": b, "s": s}, row_format=True)
    assert json.loads(body.replace(b"NaN", b"0").replace(b"-Infinity", b"-1").replace(b"Infinity", b"1")) == {
        "predictions": [{"a": [0.5, 0], "b": 1, "s": "ok"}, {"a": [1, -1], "b": 2, "s": {"b64": "/w=="}}]}
    body = wire.encode_tf_rest_response({"b": b, "s_bytes": s}, row_format=False)
    assert json.loads(body) == {"outputs": {"b": [1, 2], "s_bytes": [{"b64": "b2s="}, {"b64": "/w=="}]}}
    assert json.loads(wire.encode_tf_rest_response({"b": b}, row_format=False)) == {"outputs": [1, 2]}
    assert json.loads(wire.encode_tf_rest_response({"x": np.float32(0.1)}, row_format=False)) == \
        {"outputs": float(np.float32(0.1))}
    with pytest.raises(WireError, match="different 0-th dimensions"):
        wire.encode_tf_rest_response({"a": a, "c": np.zeros(3)}, row_format=True)
    with pytest.raises(WireError, match="scalar"):
        wire.encode_tf_rest_response({"x": np.float32(1)}, row_format=True)


@pytest.mark.parametrize("doc,kw,match", [
    ({"instances": [[1, 2], [3]]}, dict(default_input="x"), "input 'x': ragged nested lists"),
    ({"instances": [[1, 2], 3]}, dict(default_input="x"), "ragged nested lists \\(values and lists mixed"),
    ({"instances": [1, 2]}, {}, "unnamed input value but this model has several inputs"),
    ({"instances": [{"a": 1}, {"b": 2}]}, {}, "instance #1 has inputs \\['b'\\]"),
    ({"instances": [{"a": 1}, 2]}, {}, "mixes named-input objects and bare values"),
    ({"instances": []}, dict(default_input="x"), "non-empty list"),
    ({"instances": [{}]}, {}, "empty object"),
    ({"inputs": {}}, {}, "empty object"),
    ({"inputs": [1], "instances": [1]}, dict(default_input="x"), "exactly one of"),
    ({"signature_name": "s"}, dict(default_input="x"), "exactly one of"),
    ({"inputs": [1], "signature_name": 3}, dict(default_input="x"), "'signature_name' must be a string"),
    ({"inputs": {"img": [{"b64": "not base64!"}]}}, {}, "input 'img': invalid base64"),
    ({"inputs": {"img": [{"b64": 5}]}}, {}, "must hold a string"),
    ({"inputs": {"img": [{"b64": "eA=="}]}}, dict(input_dtypes={"img": "FP32"}),
     "input 'img': a \\{\"b64\": ...\\} value for a FP32 input"),
    ({"inputs": {"img": [{"x": 1}]}}, dict(input_dtypes={"img": "FP32"}), "an object where a FP32 value belongs"),
    ({"inputs": {"img": [1, 2]}}, dict(input_dtypes={"img": "BYTES"}), "BYTES values must be strings"),
    ({"inputs": {"img": ["a", 2]}}, {}, "BYTES values must be strings"),
    ({"inputs": {"px": [0, 256]}}, dict(input_dtypes={"px": "UINT8"}), "value 256 is out of the range of UINT8"),
    ({"inputs": {"px": [0.5]}}, dict(input_dtypes={"px": "UINT8"}), "UINT8 data must be integers"),
    ({"inputs": {"f": [1, True]}}, {}, "FP32 data must be numbers, got boolean"),
    ({"inputs": {"f": DEEP}}, {}, "deeper than 32"),
    ({"inputs": {"f": list(range(11))}}, dict(max_elements=10), "11 elements, over the limit of 10"),
    ({"inputs": {"f": list(range(11))}}, dict(max_bytes=40), "44 bytes, over the limit of 40"),
    ({"inputs": {"img": [{"b64": base64.b64encode(b"x" * 100).decode()}]}}, dict(max_bytes=50),
     "decodes to more than 50 bytes"),
    ({"inputs": {"s": ["x" * 30, "y" * 30]}}, dict(max_bytes=50), "total 60 bytes, over the limit of 50"),
])
def test_tf_rest_malformed(doc, kw, match):
    with pytest.raises(WireError, match=match):
        tf(doc, **kw)


def test_tf_rest_undecodable_and_non_finite():
    with pytest.raises(WireError, match="must be a JSON object"):
        wire.parse_tf_rest_request(b"[1]")
    with pytest.raises(WireError, match="not valid JSON"):
        wire.parse_tf_rest_request(b"{\"instances\": [1,")
    r = wire.parse_tf_rest_request(b'{"instances": [NaN, Infinity, -Infinity, 1e400]}', default_input="x")
    d = r.inputs["x"].data
    assert np.isnan(d[0]) and d[1] == np.inf and d[2] == -np.inf and d[3] == np.inf
