"""TF Serving's ModelService.GetModelStatus on the gRPC port: our stubs and the official ones."""

from __future__ import annotations

import grpc
import pytest

from bfpaccel.serve import _protos as pb
from bfpaccel.serve import serve
from bfpaccel.serve.testing import build_tiny_plan


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    plan = build_tiny_plan(str(tmp_path_factory.mktemp("status") / "tiny.bfpplan"))
    h = serve({"tiny": plan}, port=0, versions={"tiny": 7})
    yield h
    h.stop(grace=0)


def _status(port, **spec):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        f = ch.unary_unary(pb.GET_MODEL_STATUS_METHOD, request_serializer=lambda m: m.SerializeToString(),
                           response_deserializer=pb.GetModelStatusResponse.FromString)
        r = pb.GetModelStatusRequest()
        for k, v in spec.items():
            if k == "version":
                r.model_spec.version.value = v
            else:
                setattr(r.model_spec, k, v)
        return f(r, timeout=10)


def test_status_of_every_version(server):
    r = _status(server.port, name="tiny")
    assert [(s.version, s.state) for s in r.model_version_status] == [(7, pb.ModelVersionState["AVAILABLE"])]
    assert _status(server.port, name="tiny", version=7).model_version_status[0].version == 7


def test_unknown_model_or_version_is_not_found(server):
    for spec in ({"name": "nope"}, {"name": "tiny", "version": 3}, {"name": "tiny", "version_label": "canary"}):
        with pytest.raises(grpc.RpcError) as e:
            _status(server.port, **spec)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, spec


def test_reload_config_is_unimplemented(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary(pb.RELOAD_CONFIG_METHOD)(b"", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_official_model_service_stub(server):
    pytest.importorskip("tensorflow_serving.apis.model_service_pb2_grpc")
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        rq = get_model_status_pb2.GetModelStatusRequest()
        rq.model_spec.name = "tiny"
        resp = model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(rq, timeout=10)
    assert resp.model_version_status[0].version == 7
    assert resp.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
