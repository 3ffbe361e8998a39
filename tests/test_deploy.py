"""Images (bundle, Dockerfile, payload), local deployments (subprocess lifecycle, health,
keys, TLS, dead pids) and Kubernetes manifests (validated against the OpenAPI schema)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import bfpaccel
from bfpaccel.deploy import (
    AccelContainerImage,
    AccelInferenceConfig,
    AksWebservice,
    DeploymentError,
    Image,
    ImageError,
    KubernetesTarget,
    LocalTarget,
    LocalWebservice,
    Webservice,
    check_health,
)
from bfpaccel.registry import InUseError, Model, NotFoundError, Registry


def _tiny_onnx(path: str) -> str:
    """Conv -> GlobalAveragePool -> Flatten -> Softmax, 3x8x8 -> 16 classes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    W = numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "W")
    B = numpy_helper.from_array(np.zeros(16, np.float32), "B")
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Softmax", ["f"], ["probs"], axis=1)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 16])], [W, B])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.metadata_props.add(key="bfpaccel.preprocess", value=json.dumps({"onnx_input": "x"}))
    onnx.save(m, path)
    return path


@pytest.fixture()
def reg(tmp_path):
    r = Registry(tmp_path / "ws")
    yield r
    for svc in Webservice.list(r):
        svc.delete()
    r.close()


@pytest.fixture()
def converted(reg, tmp_path):
    src_dir = tmp_path / "saved"
    os.makedirs(src_dir)
    (src_dir / "saved_model.pb").write_bytes(b"tf graph")
    src = Model.register(reg, str(src_dir), "tiny-net")
    return reg.register_converted(src, _tiny_onnx(str(tmp_path / "model.onnx")), {})


@pytest.fixture()
def image(reg, converted):
    cfg = AccelContainerImage.image_configuration(tags={"t": "1"}, properties={"format": "msfp12"},
                                                  description="tiny")
    return Image.create(reg, "tiny-img", [converted], cfg)


# ---------------------------------------------------------------------- images
def test_payload_shape_matches_the_seed():
    cfg = AccelContainerImage.image_configuration(tags={"a": "b"}, properties={"p": "q"}, description="d")
    payload = cfg.build_create_payload(None, "img", ["m.1.accelonnx:1"])
    assert payload == {"name": "img", "description": "d", "kvTags": {"a": "b"}, "modelIds": ["m.1.accelonnx:1"],
                       "properties": {"p": "q"}, "imageFlavor": "AccelContainer", "imageType": "Docker"}
    empty = AccelContainerImage.image_configuration().build_create_payload(None, "img", [])
    assert empty["kvTags"] is None and empty["properties"] is None
    with pytest.raises(ValueError, match="model_ids"):
        cfg.build_create_payload(None, "img", None)


def test_image_bundle_contents(reg, image, converted):
    assert image.id == "tiny-img:1" and image.model_id == converted.id
    assert image.wait_for_creation() == "Succeeded"
    files = set(os.listdir(image.path))
    assert {"model.bfpplan", "server.json", "image.json", "Dockerfile", "requirements.txt", "wheels",
            "build.log"} <= files
    plan = bfpaccel.load_plan(image.plan_path)
    assert str(plan.format).startswith("msfp12")
    assert plan.metadata["bfpaccel.preprocess"] == json.dumps({"onnx_input": "x"})
    assert plan.metadata["bfpaccel.model_id"] == converted.id
    out = bfpaccel.Session(plan).run(None, {"x": np.ones((1, 3, 8, 8), np.float32)})
    probs = out["probs"] if isinstance(out, dict) else out[0]
    assert probs.shape == (1, 16) and abs(float(probs.sum()) - 1) < 1e-2
    server = json.load(open(os.path.join(image.path, "server.json")))
    assert server["plan"] == "/app/model.bfpplan" and server["port"] == 50051 and server["outputs"] == ["probs"]
    manifest = json.load(open(os.path.join(image.path, "image.json")))
    assert manifest["payload"]["modelIds"] == [converted.id] and manifest["payload"]["kvTags"] == {"t": "1"}
    image.verify()
    docker = open(os.path.join(image.path, "Dockerfile")).read()
    assert docker.splitlines()[3] == "FROM python:3.11-slim"
    assert "EXPOSE 50051" in docker
    cmd = json.loads(docker.split("CMD ", 1)[1].splitlines()[0])
    assert cmd[:5] == ["python", "-m", "bfpaccel.serve", "--plan", "/app/model.bfpplan"]
    reqs = open(os.path.join(image.path, "requirements.txt")).read().splitlines()
    assert f"numpy=={np.__version__}" in reqs and f"bfpaccel=={bfpaccel.__version__}" in reqs
    assert all(r.startswith("#") or "==" in r for r in reqs)


def test_image_rules_and_delete_order(reg, image, converted, tmp_path):
    src = Model(reg, converted.parent_id)
    with pytest.raises(ImageError, match="not a converted model"):
        Image.create(reg, "bad", [src], AccelContainerImage.image_configuration())
    with pytest.raises(ImageError, match="exactly one model"):
        Image.create(reg, "bad", [converted, converted], AccelContainerImage.image_configuration())
    with pytest.raises(ImageError, match="format"):
        Image.create(reg, "bad", [converted], AccelContainerImage.image_configuration(properties={"format": "nope"}))
    assert [i.id for i in Image.list(reg)] == ["tiny-img:1"]
    assert Image.create(reg, "tiny-img", [converted.id], AccelContainerImage.image_configuration()).version == 2
    assert Image(reg, "tiny-img").version == 2
    # cleanup order: image before converted model before source model
    with pytest.raises(InUseError, match="image tiny-img:1"):
        converted.delete()
    for im in Image.list(reg):
        path = im.path
        im.delete()
        assert not os.path.exists(path)
    with pytest.raises(NotFoundError):
        Image(reg, "tiny-img")
    converted.delete()
    src.delete()
    assert os.listdir(os.path.join(reg.root, "tmp")) == []


def test_image_from_a_plan_model(reg, tmp_path):
    plan_path = str(tmp_path / "tiny.bfpplan")
    bfpaccel.compile(_tiny_onnx(str(tmp_path / "t.onnx"))).save(plan_path)
    m = Model.register(reg, plan_path, "tiny-plan")
    im = Image.create(reg, "plan-img", [m], AccelContainerImage.image_configuration())
    assert bfpaccel.load_plan(im.plan_path).output_names == ["probs"]


def test_inference_config_reuses_the_converted_model(reg, converted):
    cfg = AccelInferenceConfig(description="x")
    payload = cfg.build_create_payload(reg, "img", [converted.parent_id])
    assert payload["modelIds"] == [converted.id]
    with pytest.raises(ImageError, match="exactly one"):
        cfg.build_create_payload(reg, "img", [])
    with pytest.raises(ImageError, match="profiling"):
        cfg.build_profile_payload()


# ---------------------------------------------------------------------- local deployments
_STAND_IN = textwrap.dedent('''
    """Stand-in for python -m bfpaccel.serve: the same flags, a gRPC health service."""
    import argparse, json, os, signal, sys, threading, time
    from concurrent import futures
    import grpc

    p = argparse.ArgumentParser()
    p.add_argument("--plan", required=True)
    p.add_argument("--name", default="")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--tls-cert"); p.add_argument("--tls-key")
    p.add_argument("--auth-key", action="append", default=[])
    p.add_argument("--auth-key-file", action="append", default=[])
    p.add_argument("--workers", type=int); p.add_argument("--metrics-port", type=int)
    a = p.parse_args()
    if os.environ.get("STAND_IN_EXIT"):
        print("stand-in: failing on purpose", flush=True); sys.exit(3)
    assert os.path.isfile(a.plan), a.plan
    json.dump(vars(a), open("argv.json", "w"))
    delay = float(os.environ.get("STAND_IN_DELAY", "0"))
    t0 = time.monotonic()

    keys = list(a.auth_key)
    for kf in a.auth_key_file:
        keys += [line.strip() for line in open(kf) if line.strip()]

    def check(req, ctx):
        if keys:
            md = dict(ctx.invocation_metadata())
            if md.get("authorization", "").split()[-1:] not in ([k] for k in keys):
                ctx.abort(grpc.StatusCode.UNAUTHENTICATED, "bad key")
        return b"\\x08\\x01" if time.monotonic() - t0 >= delay else b"\\x08\\x02"

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)})])
    addr = f"{a.host}:{a.port}"
    if a.tls_cert:
        creds = grpc.ssl_server_credentials([(open(a.tls_key, "rb").read(), open(a.tls_cert, "rb").read())])
        server.add_secure_port(addr, creds)
    else:
        server.add_insecure_port(addr)
    server.start()
    print("stand-in serving on", addr, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(0)
''')


@pytest.fixture()
def stand_in(tmp_path):
    p = tmp_path / "stand_in_server.py"
    p.write_text(_STAND_IN)
    return LocalTarget(server_command=[sys.executable, str(p)])


def test_local_lifecycle_with_stand_in_server(reg, image, stand_in):
    cfg = LocalWebservice.deploy_configuration(workers=2)
    svc = Webservice.deploy_from_image(reg, "tiny-svc", image, cfg, stand_in)
    assert svc.wait_for_deployment(timeout=30) == "Healthy" and svc.state == "Healthy"
    assert svc.scoring_uri == f"http://127.0.0.1:{svc.port}"
    argv = json.load(open(os.path.join(svc.workdir, "argv.json")))
    assert argv["plan"] == image.plan_path and argv["name"] == "tiny-svc" and argv["workers"] == 2
    assert argv["auth_key"] == [] and argv["auth_key_file"] == [] and argv["tls_cert"] is None
    with pytest.raises(DeploymentError, match="auth"):
        svc.get_keys()
    # another process's view: the record, the pid
    other = Webservice(Registry(reg.root), "tiny-svc")
    assert other.pid == svc.pid and other.state == "Healthy"
    assert [w.name for w in Webservice.list(reg)] == ["tiny-svc"]
    with pytest.raises(DeploymentError, match="already exists"):
        Webservice.deploy_from_image(reg, "tiny-svc", image, cfg, stand_in)
    with pytest.raises(InUseError, match="tiny-svc"):
        image.delete()
    pid = svc.pid
    svc.delete()
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"
    assert Webservice.list(reg) == []
    with pytest.raises(NotFoundError):
        Webservice(reg, "tiny-svc")
    image.delete()


def test_local_auth_tls_and_key_regeneration(reg, image, stand_in):
    cfg = LocalWebservice.deploy_configuration(auth_enabled=True, ssl_enabled=True)
    svc = Webservice.deploy_from_image(reg, "secure", image, cfg, stand_in)
    assert svc.wait_for_deployment(timeout=30) == "Healthy"
    assert svc.scoring_uri.startswith("https://127.0.0.1:")
    k1, k2 = svc.get_keys()
    assert k1 != k2 and len(k1) >= 24
    assert check_health("127.0.0.1", svc.port, tls_cert=svc.tls_cert_path, key=k2) == "SERVING"
    assert check_health("127.0.0.1", svc.port, tls_cert=svc.tls_cert_path, key="wrong") == "UNREACHABLE"
    argv = json.load(open(os.path.join(svc.workdir, "argv.json")))
    # the keys reach the server in a 0600 file, never on its command line (world-readable)
    assert argv["auth_key"] == [] and argv["auth_key_file"] == [svc.keys_path] and argv["tls_cert"] == svc.tls_cert_path
    assert stat.S_IMODE(os.stat(svc.keys_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(svc.keys_path)).st_mode) == 0o700
    with open(f"/proc/{svc.pid}/cmdline", "rb") as f:
        cmdline = f.read()
    assert k1.encode() not in cmdline and k2.encode() not in cmdline
    # nor in the database or its WAL: only their digests
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(reg.db_path + suffix):
            with open(reg.db_path + suffix, "rb") as f:
                blob = f.read()
            assert k1.encode() not in blob and k2.encode() not in blob, suffix
    assert k1 not in json.dumps(svc.serialize())
    n1, n2 = svc.regen_key("Secondary")
    assert n1 == k1 and n2 != k2
    assert Webservice(reg, "secure").get_keys() == (n1, n2)
    assert check_health("127.0.0.1", svc.port, tls_cert=svc.tls_cert_path, key=n2) == "SERVING"
    svc.delete()


def test_dead_server_is_detected(reg, image, stand_in):
    svc = Webservice.deploy_from_image(reg, "dies", image, LocalWebservice.deploy_configuration(), stand_in)
    svc.wait_for_deployment(timeout=30)
    os.kill(svc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Webservice(reg, "dies").state != "Failed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    svc.delete()


def test_failed_start_and_slow_start(reg, image, stand_in, monkeypatch):
    monkeypatch.setenv("STAND_IN_EXIT", "1")
    svc = Webservice.deploy_from_image(reg, "broken", image, LocalWebservice.deploy_configuration(), stand_in)
    with pytest.raises(DeploymentError, match="failing on purpose"):
        svc.wait_for_deployment(timeout=30)
    assert svc.state == "Failed"
    svc.delete()
    monkeypatch.delenv("STAND_IN_EXIT")
    monkeypatch.setenv("STAND_IN_DELAY", "60")
    slow = Webservice.deploy_from_image(reg, "slow", image, LocalWebservice.deploy_configuration(), stand_in)
    with pytest.raises(DeploymentError, match="NOT_SERVING"):
        slow.wait_for_deployment(timeout=2)
    assert slow.state == "Unhealthy"
    slow.delete()


def test_local_deploy_end_to_end_with_real_server(reg, image):
    from bfpaccel.serve.client import client_from_service

    svc = Webservice.deploy_from_image(reg, "real", image, LocalWebservice.deploy_configuration(auth_enabled=True))
    try:
        assert svc.wait_for_deployment(timeout=120) == "Healthy"
        assert svc.check_health() == "SERVING"
        x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
        with client_from_service(svc) as client:
            got = client.score_numpy_arrays({"x": x}, outputs="probs")
        want = bfpaccel.Session(bfpaccel.load_plan(image.plan_path)).run(None, {"x": x})
        want = want["probs"] if isinstance(want, dict) else want[0]
        np.testing.assert_array_equal(np.asarray(got).reshape(want.shape), want)
    finally:
        svc.delete()


# ---------------------------------------------------------------------- kubernetes
def _load_all(workdir: str) -> dict:
    yaml = pytest.importorskip("yaml")
    out = {}
    for fn in sorted(os.listdir(workdir)):
        if fn.endswith(".yaml"):
            with open(os.path.join(workdir, fn)) as f:
                out[fn[:-5]] = yaml.safe_load(f)
    return out


@pytest.mark.parametrize("autoscale,auth,ssl", [(False, False, False), (True, True, False), (False, True, True)])
def test_kubernetes_manifests_validate(reg, image, tmp_path, autoscale, auth, ssl):
    kv = pytest.importorskip("kubernetes_validate")
    cfg = AksWebservice.deploy_configuration(autoscale_enabled=autoscale, autoscale_max_replicas=4,
                                             num_replicas=3, auth_enabled=auth, ssl_enabled=ssl, cpu_cores=0.5,
                                             memory_gb=1.5)
    target = KubernetesTarget(str(tmp_path / "k8s"), namespace="ml", image_registry="registry.local:5000")
    svc = Webservice.deploy_from_image(reg, "k8s-svc", image, cfg, target)
    assert svc.state == "Generated" and svc.compute_type == "kubernetes"
    docs = _load_all(svc.workdir)
    expected = {"deployment", "service"} | ({"hpa"} if autoscale else set()) | ({"secret"} if auth else set()) \
        | ({"tls-secret"} if ssl else set())
    assert set(docs) == expected
    version = kv.latest_version()
    for stem, doc in docs.items():
        kv.validate(doc, version, strict=True)
    c = docs["deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "registry.local:5000/tiny-img:1"
    assert c["resources"]["requests"] == {"cpu": "500m", "memory": "1536Mi"}
    assert c["ports"][0]["containerPort"] == 50051
    probe = {"tcpSocket": {"port": 50051}} if ssl else {"grpc": {"port": 50051}}
    for p in ("readinessProbe", "livenessProbe"):
        assert {k: v for k, v in c[p].items() if k in probe} == probe
    assert docs["deployment"]["spec"]["replicas"] == (1 if autoscale else 3)
    assert docs["service"]["spec"]["ports"][0]["port"] == (443 if ssl else 80)
    if autoscale:
        assert docs["hpa"]["apiVersion"] == "autoscaling/v2" and docs["hpa"]["spec"]["maxReplicas"] == 4
    if auth:
        keys = svc.get_keys()
        assert docs["secret"]["stringData"] == {"primaryKey": keys[0], "secondaryKey": keys[1]}
        assert c["args"].count("--auth-key-file") == 2 and "--auth-key" not in c["args"]
        assert not any(k in a for a in c["args"] for k in keys)
        assert os.stat(os.path.join(svc.workdir, "secret.yaml")).st_mode & 0o077 == 0
        new = svc.regen_key("Primary")
        assert _load_all(svc.workdir)["secret"]["stringData"]["primaryKey"] == new[0]
    # a broken manifest is caught by the same validation
    bad = dict(docs["deployment"], spec=dict(docs["deployment"]["spec"], replicas="three"))
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)
    svc.delete()


def test_kubernetes_config_validation():
    with pytest.raises(ValueError, match="replicas"):
        AksWebservice.deploy_configuration(num_replicas=0)
    with pytest.raises(ValueError, match="autoscale"):
        AksWebservice.deploy_configuration(autoscale_enabled=True, autoscale_min_replicas=5, autoscale_max_replicas=2)
    with pytest.raises(ValueError, match="ssl_key_pem_file"):
        LocalWebservice.deploy_configuration(ssl_enabled=True, ssl_cert_pem_file="c.pem")


def test_local_deploy_tls_with_real_server(reg, image):
    cfg = LocalWebservice.deploy_configuration(ssl_enabled=True, auth_enabled=True)
    svc = Webservice.deploy_from_image(reg, "real-tls", image, cfg)
    try:
        assert svc.wait_for_deployment(timeout=120) == "Healthy"
        assert svc.scoring_uri.startswith("https://")
        assert check_health("127.0.0.1", svc.port, tls_cert=svc.tls_cert_path, key=svc.get_keys()[1]) == "SERVING"
    finally:
        svc.delete()


def test_cli_handlers(tmp_path, capsys, stand_in, monkeypatch):
    import argparse

    from bfpaccel.deploy import cli

    parser = argparse.ArgumentParser(prog="bfpaccel")
    cli.add_registry_parsers(parser.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = parser.parse_args(list(argv))
        return args.fn(args)

    monkeypatch.setenv("BFPACCEL_REGISTRY", str(tmp_path / "ws"))
    onnx_path = _tiny_onnx(str(tmp_path / "m.onnx"))
    # before anything is registered: reading commands never create the workspace
    for argv in (("registry", "list"), ("image", "list"), ("deploy", "list")):
        assert run(*argv) == 0
    for argv in (("registry", "show", "m"), ("registry", "verify"), ("registry", "delete", "m:1"),
                 ("image", "show", "img:1"), ("image", "create", "--name", "img", "--model", "m:1"),
                 ("deploy", "show", "k")):
        assert run(*argv) == 2, argv
        assert "no registry at" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()
    assert run("registry", "register", onnx_path, "--name", "m", "--tag", "k=v") == 0
    assert capsys.readouterr().out.strip() == "m:1"
    assert run("registry", "list", "--json") == 0
    assert [m["id"] for m in json.loads(capsys.readouterr().out)] == ["m:1"]
    assert run("image", "create", "--name", "img", "--model", "m:1", "--format", "msfp12") == 0
    assert run("deploy", "k8s", "--name", "k", "--image", "img", "--output-dir", str(tmp_path / "k8s"),
               "--autoscale", "--auth") == 0
    capsys.readouterr()
    assert run("registry", "delete", "m:1") == 2
    assert "used by image img:1" in capsys.readouterr().err
    assert run("deploy", "show", "k", "--keys") == 0
    assert len(json.loads(capsys.readouterr().out)["keys"]) == 2
    assert run("registry", "show", "ghost") == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="KEY=VALUE"):
        run("registry", "register", onnx_path, "--name", "m", "--tag", "novalue")
    for argv in (("deploy", "delete", "k"), ("image", "delete", "img:1"), ("registry", "delete", "m:1"),
                 ("registry", "verify", "--gc")):
        assert run(*argv) == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["deploy", "local", "--help"])
    assert "--auth" in capsys.readouterr().out


def test_no_tensorflow_imported():
    code = "import sys, bfpaccel.registry, bfpaccel.deploy; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
