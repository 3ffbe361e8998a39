"""PredictionClient (bfpaccel.serve.client) and the numpy <-> TensorProto codec: the seed's
wire behaviour (metadata, request shape, deadlines, retries) checked against a recording
server, return shapes, the quirk fixes, client_from_service, the predict/loadtest CLIs."""

from __future__ import annotations

import argparse
import sys
from concurrent import futures
from datetime import timedelta
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from bfpaccel.serve import _protos as pb
from bfpaccel.serve import PredictionClient, RetryPolicy, client_from_service
from bfpaccel.serve.codec import CodecError, float_tensor_proto, make_ndarray, make_tensor_proto

C = grpc.StatusCode
OUT = "classifier/x/predictions/Softmax:0"


# -- codec ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64,
                                   np.uint8, np.uint16, np.uint32, np.uint64, np.bool_])
@pytest.mark.parametrize("content", [True, False])
def test_codec_round_trip(dtype, content):
    a = (np.arange(12).reshape(3, 4) % 3).astype(dtype)
    b = make_ndarray(pb.TensorProto.FromString(make_tensor_proto(a, use_tensor_content=content).SerializeToString()))
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_codec_strings_scalars_broadcast_errors():
    s = make_ndarray(make_tensor_proto([b"ab", "c"]))
    assert s.dtype == object and list(s) == [b"ab", b"c"]
    assert make_ndarray(make_tensor_proto(b"x")).shape == ()
    assert make_ndarray(make_tensor_proto(np.float32(2.5))).shape == ()
    t = pb.TensorProto(dtype=pb.DT_FLOAT)
    t.tensor_shape.dim.add().size = 2
    t.tensor_shape.dim.add().size = 3
    t.float_val.append(7.0)  # single value: broadcast (TF semantics)
    np.testing.assert_array_equal(make_ndarray(t), np.full((2, 3), 7, np.float32))
    t = pb.TensorProto(dtype=pb.DT_INT64)
    t.tensor_shape.dim.add().size = 3
    t.int64_val.append(4)
    assert make_ndarray(t).tolist() == [4, 4, 4]
    np.testing.assert_array_equal(make_ndarray(float_tensor_proto(np.eye(2))), np.eye(2, dtype=np.float32))
    with pytest.raises(CodecError, match="DT_INVALID"):
        make_ndarray(pb.TensorProto())
    t = pb.TensorProto(dtype=pb.DT_FLOAT)
    t.tensor_shape.dim.add().size = 3
    t.float_val.extend([1, 2])
    with pytest.raises(CodecError, match="2 values"):
        make_ndarray(t)
    with pytest.raises(CodecError, match="complex"):
        make_tensor_proto(np.zeros(2, np.complex64))
    with pytest.raises(CodecError, match="not supported"):
        make_ndarray(pb.TensorProto(dtype=pb.DT_VARIANT))
    assert make_tensor_proto([1.0, 2.0], dtype=pb.DT_FLOAT).dtype == pb.DT_FLOAT
    np.testing.assert_array_equal(make_ndarray(make_tensor_proto(3, dtype=np.float32, shape=[2, 2])),
                                  np.full((2, 2), 3, np.float32))


def test_no_tensorflow_needed():
    import subprocess

    code = ("import sys, builtins; real = builtins.__import__\n"
            "def imp(n, *a, **k):\n"
            "    if n.split('.')[0] in ('tensorflow', 'tensorflow_serving'): raise ImportError(n)\n"
            "    return real(n, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "import bfpaccel.serve, bfpaccel.accel.client\n"
            "from bfpaccel.accel import PredictionClient, client_from_service\n"
            "assert PredictionClient is bfpaccel.serve.PredictionClient\n"
            "print('ok', 'tensorflow' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "ok False", r.stderr


# -- a recording server --------------------------------------------------------------------------

class Recorder:
    """A PredictionService that records metadata/requests/deadlines and answers from a script."""

    def __init__(self):
        self.calls = []
        self.fail = []  # status codes to answer first, one per call
        self.outputs = {OUT: np.arange(10, dtype=np.float32).reshape(1, 10)}
        self.server = grpc.server(futures.ThreadPoolExecutor(4))

        def predict(req, ctx):
            self.calls.append({"md": tuple((k, v) for k, v in ctx.invocation_metadata() if not k.startswith(("user-agent", "grpc-"))),
                               "req": req, "deadline": ctx.time_remaining()})
            if self.fail:
                ctx.abort(self.fail.pop(0), "scripted")
            resp = pb.PredictResponse()
            for k, v in self.outputs.items():
                resp.outputs[k].CopyFrom(float_tensor_proto(v))
            return resp

        h = grpc.unary_unary_rpc_method_handler(predict, request_deserializer=pb.PredictRequest.FromString,
                                                response_serializer=lambda m: m.SerializeToString())
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(pb.SERVICE, {"Predict": h}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def client(self, **kw):
        sleeps = []
        c = PredictionClient("127.0.0.1", self.port, **kw)
        c._sleep = sleeps.append
        c.sleeps = sleeps
        return c


@pytest.fixture
def rec():
    r = Recorder()
    yield r
    r.server.stop(0)


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(b"\xff\xd8jpegbytes")
    return str(p)


def test_ports_and_address():
    assert PredictionClient("h")._host == "h:80"
    assert PredictionClient("h", use_ssl=True)._host == "h:443"
    assert PredictionClient("h", 50051)._host == "h:50051"
    with pytest.raises(ValueError, match="address"):
        PredictionClient(None)


def test_seed_wire_request_and_metadata(rec, img):
    c = rec.client()
    out = c.score_file(img)
    call = rec.calls[-1]
    assert call["md"] == (("authorization", "Bearer "), ("x-ms-aml-grpc-service-route", "/api/v1/service/"))
    req = call["req"]
    assert not req.HasField("model_spec") and list(req.output_filter) == []
    t = req.inputs["images"]
    assert list(req.inputs) == ["images"] and t.dtype == pb.DT_STRING
    assert [d.size for d in t.tensor_shape.dim] == [1] and list(t.string_val) == [b"\xff\xd8jpegbytes"]
    assert 9 < call["deadline"] <= 10.5  # 10 s per attempt
    assert out.shape == (10,)
    c2 = rec.client(access_token="key1", service_name="svc")
    c2.score_file(img, input_name="Placeholder:0")
    assert rec.calls[-1]["md"] == (("authorization", "Bearer key1"), ("x-ms-aml-grpc-service-route", "/api/v1/service/svc"))
    assert list(rec.calls[-1]["req"].inputs) == ["Placeholder:0"]
    c2.score_numpy_arrays({"x": np.zeros((1, 2), np.float32)})
    call = rec.calls[-1]
    assert 29 < call["deadline"] <= 30.5  # 30 s per attempt
    x = call["req"].inputs["x"]
    assert x.dtype == pb.DT_FLOAT and len(x.tensor_content) == 8 and [d.size for d in x.tensor_shape.dim] == [1, 2]


def test_return_shapes_seed_and_fixed(rec, img):
    rec.outputs = {OUT: np.ones((1, 10), np.float32), "output_alias": np.ones((1, 10), np.float32)}
    c = rec.client()
    assert c.score_file(img, outputs=OUT).shape == (10,)            # str: batch stripped
    assert [a.shape for a in c.score_file(img, outputs=[OUT])] == [(1, 10)]  # list: kept (seed)
    assert c.score_file(img).shape == (10,)  # alias duplicates are not "several outputs"
    assert c.score_numpy_arrays({"x": np.zeros(3)}, OUT).shape == (1, 10)  # never stripped
    fixed = rec.client(consistent_batch_dim=True)
    assert [a.shape for a in fixed.score_file(img, outputs=[OUT, "output_alias"])] == [(10,), (10,)]
    rec.outputs = {"a:0": np.ones((1, 2), np.float32), "b:0": np.ones((1, 3), np.float32)}
    several = c.score_file(img)
    assert sorted(a.shape for a in several) == [(1, 2), (1, 3)]
    with pytest.raises(KeyError, match="not in the response"):
        c.score_file(img, outputs="missing:0")


def test_score_tensors_any_dtype(rec):
    c = rec.client()
    c.score_tensors({"a": (np.ones((1, 3)), [1, 3], pb.DT_FLOAT), "b": (np.arange(4, dtype="<i8").tobytes(), [4], pb.DT_INT64),
                     "s": ([b"p", b"q"], [2], pb.DT_STRING), "u": ([1, 2], [2], np.uint8)})
    req = rec.calls[-1]["req"]
    np.testing.assert_array_equal(make_ndarray(req.inputs["a"]), np.ones((1, 3), np.float32))
    assert make_ndarray(req.inputs["b"]).tolist() == [0, 1, 2, 3]
    assert list(make_ndarray(req.inputs["s"])) == [b"p", b"q"]
    assert make_ndarray(req.inputs["u"]).dtype == np.uint8


def test_seed_retry_policy(rec, img, caplog, capsys):
    rec.fail = [C.UNAVAILABLE, C.NOT_FOUND, C.RESOURCE_EXHAUSTED]
    c = rec.client()
    assert c.score_file(img).shape == (10,)
    assert c.sleeps == [1.0, 2.0, 4.0] and len(rec.calls) == 4
    assert "Retrying" in caplog.text and "Retrying" not in capsys.readouterr().out  # logged, not printed
    rec.calls.clear()
    rec.fail = [C.UNAVAILABLE] * 10
    c = rec.client()
    with pytest.raises(grpc.RpcError) as ei:
        c.score_file(img)
    assert ei.value.code() == C.UNAVAILABLE and len(rec.calls) == 5 and c.sleeps == [1.0, 2.0, 4.0, 8.0]
    rec.calls.clear()
    rec.fail = [C.INVALID_ARGUMENT]
    c = rec.client()
    with pytest.raises(grpc.RpcError) as ei:
        c.score_file(img)
    assert ei.value.code() == C.INVALID_ARGUMENT and len(rec.calls) == 1 and c.sleeps == []


def test_narrow_retry_options(rec, img):
    rec.fail = [C.NOT_FOUND]
    c = rec.client(retry="transient")
    with pytest.raises(grpc.RpcError):
        c.score_file(img)
    assert len(rec.calls) == 1
    rec.fail = [C.UNAVAILABLE, C.DEADLINE_EXCEEDED]
    c = rec.client(retry=RetryPolicy(attempts=3, backoff=(0.5,)))
    c.score_file(img)
    assert c.sleeps == [0.5, 0.5]
    rec.fail = [C.UNAVAILABLE]
    with pytest.raises(grpc.RpcError):
        rec.client(retry="none").score_file(img)
    with pytest.raises(ValueError, match="retry"):
        PredictionClient("h", retry="sometimes")


def test_channel_recycled_after_idle(rec, img):
    c = rec.client(channel_shutdown_timeout=timedelta(seconds=5))
    now = [c._get_datetime_now()]
    c._get_datetime_now = lambda: now[0]
    c.score_file(img)
    first = c._channel
    now[0] += timedelta(seconds=3)
    c.score_file(img)
    assert c._channel is first
    now[0] += timedelta(seconds=6)
    c.score_file(img)
    assert c._channel is not first


def test_message_size_option(rec, tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * (5 << 20))
    with pytest.raises(grpc.RpcError) as ei:  # server side keeps gRPC's 4 MiB default here
        rec.client(retry="none").score_file(str(big))
    assert ei.value.code() == C.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as ei:  # and a client limit is enforced before sending
        rec.client(retry="none", max_message_bytes=1 << 20).score_file(str(big))
    assert ei.value.code() == C.RESOURCE_EXHAUSTED


def test_client_from_service():
    svc = SimpleNamespace(scoring_uri="https://1.2.3.4:8443/api", get_keys=lambda: ("k1", "k2"), auth_enabled=True,
                          name="svc")
    c = client_from_service(svc)
    assert c._host == "1.2.3.4:8443" and c._use_ssl and c._metadata[0] == ("authorization", "Bearer k1")
    assert c._metadata[1] == ("x-ms-aml-grpc-service-route", "/api/v1/service/svc")
    svc2 = SimpleNamespace(scoring_uri="http://example", get_keys=lambda: ("k",), auth_enabled=False, name="n")
    c2 = client_from_service(svc2)
    assert c2._host == "example:80" and not c2._use_ssl and c2._metadata[0] == ("authorization", "Bearer ")


def test_alias_module_paths():
    from bfpaccel.accel import PredictionClient as A
    from bfpaccel.accel.client import PredictionClient as B, client_from_service as f

    assert A is B is PredictionClient and f is client_from_service


# -- against the real server: extras and CLIs ----------------------------------------------------

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    pytest.importorskip("onnx")
    from bfpaccel.serve import serve
    from bfpaccel.serve.testing import build_tiny_plan, make_image

    d = tmp_path_factory.mktemp("live")
    plan = build_tiny_plan(str(d / "tiny.bfpplan"))
    (d / "a.jpg").write_bytes(make_image("jpeg"))
    (d / "b.png").write_bytes(make_image("png", seed=1))
    h = serve({"tiny": plan}, port=0)
    yield SimpleNamespace(port=h.port, dir=d, plan=plan)
    h.stop(1)


def test_score_image_images_metadata(live):
    import bfpaccel
    from bfpaccel.serve.testing import TINY_OUTPUT

    c = PredictionClient("127.0.0.1", live.port, service_name="tiny")
    one = c.score_image(str(live.dir / "a.jpg"))
    assert set(one) == {TINY_OUTPUT, "output_alias"} and one[TINY_OUTPUT].shape == (10,)
    both = c.score_images([str(live.dir / "a.jpg"), (live.dir / "b.png").read_bytes()], outputs=["output_alias"])
    assert list(both) == ["output_alias"] and both["output_alias"].shape == (2, 10)
    want = bfpaccel.Predictor(live.plan).predict_images([(live.dir / "a.jpg").read_bytes()])[TINY_OUTPUT][0]
    np.testing.assert_array_equal(both["output_alias"][0], want)
    md = c.get_model_metadata()
    assert md["name"] == "tiny" and md["inputs"]["images"]["dtype"] == "DT_STRING"
    with c:
        assert c.score_file(str(live.dir / "a.jpg"), outputs="output_alias").shape == (10,)


def test_predict_cli(live, capsys):
    from bfpaccel.serve.cli import add_predict_parser

    p = argparse.ArgumentParser()
    add_predict_parser(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["predict", "--address", f"127.0.0.1:{live.port}", "--service", "tiny",
                         str(live.dir / "a.jpg"), str(live.dir / "b.png")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.count("  1. ") == 2 and out.count("  5. ") == 2 and "a.jpg" in out


def test_loadtest(live, capsys):
    from bfpaccel.serve import loadtest

    r = loadtest.run("127.0.0.1", live.port, str(live.dir / "a.jpg"), concurrency=2, duration=1.0)
    assert r.ok > 0 and r.errors == {} and r.qps > 0 and r.p50_ms <= r.p90_ms <= r.p99_ms
    r2 = loadtest.run("127.0.0.1", live.port, str(live.dir / "a.jpg"), concurrency=1, duration=0.5,
                      input_name="nope")
    assert r2.ok == 0 and set(r2.errors) == {"INVALID_ARGUMENT"}
    p = argparse.ArgumentParser()
    loadtest.add_loadtest_parser(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["loadtest", "--address", f"127.0.0.1:{live.port}", "--image", str(live.dir / "a.jpg"),
                         "--concurrency", "2", "--duration", "0.5", "--json"])
    assert args.func(args) == 0
    assert '"qps"' in capsys.readouterr().out
