"""`bfpaccel deploy kserve`: the manifests validate against the KServe and KEDA CRD schemas
(stored in tests/data/kserve, see its README) and the Kubernetes OpenAPI schema, the
container's command line is the server's own, and bad settings fail with one clear line."""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from bfpaccel.deploy.kserve import GRPC_PORT, HTTP_PORT, MODEL_DIR, KServeDeployment, write_kserve
from bfpaccel.serve.config import ServerConfig

jsonschema = pytest.importorskip("jsonschema")

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "kserve")
BFPACCEL = [sys.executable, "-m", "bfpaccel"]


# ---------------------------------------------------------------------- CRD validation
def _load(name):
    path = os.path.join(DATA, name)
    with (gzip.open(path, "rt") if name.endswith(".gz") else open(path)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def crds():
    """kind -> stored CRD schema."""
    out = {}
    for name in ("inferenceservice.v1beta1.json.gz", "clusterservingruntime.v1alpha1.json",
                 "keda-scaledobject.v1alpha1.json"):
        crd = _load(name)
        out[crd["kind"]] = crd
    return out


_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("int32")
def _int32(value):
    return not isinstance(value, int) or -2 ** 31 <= value < 2 ** 31


@_FORMATS.checks("int64")
def _int64(value):
    return not isinstance(value, int) or -2 ** 63 <= value < 2 ** 63


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _strict_errors(value, schema, path):
    """What `kubectl apply --validate=strict` adds to the schema: unknown fields are errors
    (Kubernetes would drop them silently otherwise), and lists typed `map`/`set` hold no
    duplicates.  jsonschema cannot say this: structural schemas do not set
    additionalProperties: false, and x-kubernetes-* keys mean nothing to it."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    errors = []
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, sub in value.items():
            where = f"{path}.{key}"
            if props is not None and key in props:
                errors += _strict_errors(sub, props[key], where)
            elif isinstance(extra, dict):
                errors += _strict_errors(sub, extra, where)
            elif props is not None or extra is False:
                errors.append(f"{where}: unknown field")
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, dict):
            for i, sub in enumerate(value):
                errors += _strict_errors(sub, items, f"{path}[{i}]")
        kind = schema.get("x-kubernetes-list-type")
        if kind == "set":
            seen = [json.dumps(v, sort_keys=True) for v in value]
            if len(set(seen)) != len(seen):
                errors.append(f"{path}: duplicate entries in a set")
        elif kind == "map":
            keys = [tuple(v.get(k) for k in schema["x-kubernetes-list-map-keys"]) for v in value]
            if len(set(keys)) != len(keys):
                errors.append(f"{path}: two entries with the same {schema['x-kubernetes-list-map-keys']}")
    return errors


def crd_errors(doc, crd):
    """Every problem of manifest `doc` against a stored CRD schema (empty: valid)."""
    errors = []
    want = f"{crd['group']}/{crd['version']}"
    if doc.get("apiVersion") != want:
        errors.append(f"apiVersion {doc.get('apiVersion')!r}, expected {want!r}")
    if doc.get("kind") != crd["kind"]:
        errors.append(f"kind {doc.get('kind')!r}, expected {crd['kind']!r}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return errors + ["metadata missing"]
    if set(meta) - {"name", "namespace", "labels", "annotations"}:
        errors.append(f"metadata: unexpected {sorted(set(meta) - {'name', 'namespace', 'labels', 'annotations'})}")
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        errors.append(f"metadata.name {name!r} is not a DNS subdomain")
    if (crd["scope"] == "Namespaced") != ("namespace" in meta):
        errors.append(f"metadata.namespace: a {crd['scope']} resource " + ("needs one" if crd["scope"] == "Namespaced"
                                                                           else "has none"))
    for key in ("labels", "annotations"):
        for k, v in (meta.get(key) or {}).items():
            if not isinstance(k, str) or not isinstance(v, str):
                errors.append(f"metadata.{key}: {k!r}: {v!r} is not string: string")
            elif key == "labels" and (len(v) > 63 or not _LABEL_VALUE.match(v)):
                errors.append(f"metadata.labels.{k}: invalid value {v!r}")
    schema = crd["openAPIV3Schema"]
    validator = jsonschema.Draft4Validator(schema, format_checker=_FORMATS)
    for e in validator.iter_errors(doc):
        errors.append(f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}")
    return errors + _strict_errors({k: v for k, v in doc.items() if k != "metadata"}, schema, "")


def test_the_validator_catches_what_a_cluster_would_refuse(crds):
    isvc = KServeDeployment("rn50", "s3://m/rn50", "img:1").inference_service()
    assert crd_errors(isvc, crds["InferenceService"]) == []
    broken = []
    for mutate in (lambda d: d["spec"]["predictor"].update(minReplicas="two"),                     # type
                   lambda d: d["spec"]["predictor"]["model"].update(storageURI="s3://x"),          # unknown field
                   lambda d: d["spec"]["predictor"]["model"]["modelFormat"].pop("name"),           # required
                   lambda d: d["spec"]["predictor"]["model"]["ports"].append(                      # list-map keys
                       dict(d["spec"]["predictor"]["model"]["ports"][0])),
                   lambda d: d["spec"]["predictor"].update(maxReplicas=2 ** 31),                   # int32
                   lambda d: d["spec"]["predictor"].update(scaleMetric="queue_depth"),             # enum
                   lambda d: d.update(apiVersion="serving.kserve.io/v1alpha1"),
                   lambda d: d["metadata"].update(name="Bad_Name"),
                   lambda d: d["metadata"].pop("namespace"),
                   lambda d: d["metadata"]["annotations"].update(replicas=3)):
        doc = copy.deepcopy(isvc)
        mutate(doc)
        broken.append(crd_errors(doc, crds["InferenceService"]))
    assert all(broken), broken
    runtime = KServeDeployment("rn50", "s3://m/rn50", "img:1").serving_runtime()
    assert crd_errors(runtime, crds["ClusterServingRuntime"]) == []
    runtime["metadata"]["namespace"] = "default"  # cluster-scoped
    assert crd_errors(runtime, crds["ClusterServingRuntime"])
    so = KServeDeployment("rn50", "s3://m/rn50", "img:1").scaled_object()
    assert crd_errors(so, crds["ScaledObject"]) == []
    so["spec"]["triggers"][0]["metadata"]["threshold"] = 2  # KEDA's trigger metadata is string: string
    assert crd_errors(so, crds["ScaledObject"])


# ---------------------------------------------------------------------- the manifests
CASES = {
    "raw-keda": dict(),
    "raw-keda-inflight": dict(scale_metric="inflight", scale_target=3, namespace="ml", min_replicas=2,
                              max_replicas=10, server=ServerConfig(workers=4, batching=True,
                                                                   preferred_batch_sizes=(4, 8))),
    "raw-hpa": dict(autoscaler="hpa", scale_target=0.5, cpu=2.5, memory_gb=6,
                    server=ServerConfig(num_threads=3, version_policy="latest:2", version_labels={"stable": 1})),
    "raw-fixed": dict(autoscaler="none", min_replicas=3, max_replicas=3),
    "serverless": dict(deployment_mode="serverless", min_replicas=0, canary_percent=10, scale_target=4),
    "serverless-rest": dict(deployment_mode="serverless", serverless_port="rest", runtime_name="bfpaccel-v2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_manifests_validate_against_the_crds(crds, case):
    d = KServeDeployment("resnet50", "gs://bucket/models/resnet50", "registry.local/bfpaccel:1.2", **CASES[case])
    docs = d.render()
    expected = {"clusterservingruntime", "inferenceservice"} | {"keda": {"scaledobject"}, "hpa": {"hpa"}}.get(
        d.autoscaler, set())
    assert set(docs) == expected
    for stem, doc in docs.items():
        if doc["kind"] in crds:
            assert crd_errors(doc, crds[doc["kind"]]) == [], stem
        else:  # core Kubernetes objects: the OpenAPI schema of the cluster
            kv = pytest.importorskip("kubernetes_validate")
            kv.validate(doc, kv.latest_version(), strict=True)
    # the files round-trip through YAML unchanged
    for doc in docs.values():
        assert yaml.safe_load(yaml.safe_dump(doc)) == doc

    runtime, isvc = docs["clusterservingruntime"], docs["inferenceservice"]
    assert runtime["metadata"]["name"] == d.runtime_name and "namespace" not in runtime["metadata"]
    spec = runtime["spec"]
    assert spec["supportedModelFormats"] == [{"name": "bfpplan", "version": "1", "autoSelect": True, "priority": 1}]
    assert spec["protocolVersions"] == ["v1", "v2", "grpc-v1", "grpc-v2"]
    assert spec["annotations"]["prometheus.kserve.io/port"] == "8080"
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    assert spec["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "true"
    container = spec["containers"][0]
    assert container["name"] == "kserve-container" and container["image"] == "registry.local/bfpaccel:1.2"
    assert container["command"] == ["bfpaccel"] and container["args"][0] == "serve"
    pred = isvc["spec"]["predictor"]
    model = pred["model"]
    assert model["modelFormat"]["name"] == "bfpplan" and model["runtime"] == d.runtime_name
    assert model["storageUri"] == "gs://bucket/models/resnet50"
    assert isvc["metadata"]["namespace"] == d.namespace
    assert model["resources"]["requests"] == model["resources"]["limits"]
    ports = {p["name"]: p["containerPort"] for p in model["ports"]}
    mode = isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
    if d.deployment_mode == "raw":
        assert mode == "RawDeployment" and ports == {"http1": HTTP_PORT, "h2c": GRPC_PORT}
        assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == \
            ("none" if d.autoscaler == "none" else "external")
        assert "scaleMetric" not in pred and "canaryTrafficPercent" not in pred  # KServe's own: cpu/Knative
        assert pred["annotations"]["prometheus.io/port"] == "8080"
        assert model["readinessProbe"]["grpc"] == {"port": GRPC_PORT}
        assert pred["minReplicas"] == d.min_replicas
        assert pred["maxReplicas"] == (d.min_replicas if d.autoscaler == "none" else d.max_replicas)
    else:
        assert mode == "Serverless" and len(ports) == 1  # Knative routes one port
        assert ports == ({"h2c": GRPC_PORT} if d.serverless_port == "grpc" else {"http1": HTTP_PORT})
        assert pred["scaleMetric"] == "concurrency" and pred["scaleTarget"] == int(d.target)
        assert pred.get("canaryTrafficPercent") == d.canary_percent
        assert pred["minReplicas"] == d.min_replicas
    metric = {"queue_depth": "bfpaccel_queue_depth", "inflight": "bfpaccel_inflight_requests"}[d.scale_metric]
    if d.autoscaler == "keda":
        so = docs["scaledobject"]
        assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                "name": "resnet50-predictor"}
        trigger = so["spec"]["triggers"][0]
        assert trigger["type"] == "prometheus" and metric in trigger["metadata"]["query"]
        assert f'namespace="{d.namespace}"' in trigger["metadata"]["query"]
        assert float(trigger["metadata"]["threshold"]) == d.target
        assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (d.min_replicas, d.max_replicas)
    if d.autoscaler == "hpa":
        m = docs["hpa"]["spec"]["metrics"][0]
        assert m["type"] == "Pods" and m["pods"]["metric"]["name"] == metric
        assert m["pods"]["target"] == {"type": "AverageValue", "averageValue": "500m"}
        assert docs["hpa"]["spec"]["scaleTargetRef"]["name"] == "resnet50-predictor"


@pytest.fixture(scope="module")
def serve_parser():
    from bfpaccel.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_container_runs_the_servers_own_command_line(serve_parser, case):
    d = KServeDeployment("resnet50", "gs://b/m", "img", **CASES[case])
    docs = d.render()
    container = docs["clusterservingruntime"]["spec"]["containers"][0]
    model = docs["inferenceservice"]["spec"]["predictor"]["model"]
    # KServe runs the runtime's args followed by the predictor's, {{.Name}} replaced by the service
    argv = [a.replace("{{.Name}}", "resnet50") for a in container["args"][1:] + model.get("args", [])]
    cfg = ServerConfig.from_args(serve_parser.parse_args(argv))
    assert cfg == dataclasses_replace(d.server_config(), model_name="resnet50")
    assert (cfg.model_root, cfg.model_name, cfg.host, cfg.port, cfg.http_port) == \
        (MODEL_DIR, "resnet50", "0.0.0.0", GRPC_PORT, HTTP_PORT)
    assert cfg.num_threads == (d.server.num_threads or max(1, int(d.cpu)))
    for name in ("workers", "batching", "preferred_batch_sizes", "version_policy", "version_labels"):
        assert getattr(cfg, name) == getattr(d.server, name), name
    assert cfg.grace == d.server.grace
    if d.deployment_mode == "raw":
        assert docs["inferenceservice"]["spec"]["predictor"]["terminationGracePeriodSeconds"] > cfg.grace


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


@pytest.mark.parametrize("kw,message", [
    (dict(name="ResNet"), "invalid name"),
    (dict(name="a" * 46), "at most 45"),
    (dict(storage_uri="models/resnet"), "SCHEME://PATH"),
    (dict(image="my image"), "invalid image"),
    (dict(namespace="Prod"), "invalid namespace"),
    (dict(min_replicas=0), "gauges vanish with its last pod"),
    (dict(min_replicas=5, max_replicas=2), "max_replicas >= max(1, min_replicas)"),
    (dict(canary_percent=10), "use deployment_mode serverless"),
    (dict(deployment_mode="serverless", canary_percent=101), "0..100"),
    (dict(deployment_mode="serverless", scale_metric="queue_depth"), "cannot read the server's queue depth"),
    (dict(deployment_mode="serverless", scale_target=2.5), "whole number"),
    (dict(deployment_mode="serverless", autoscaler="keda"), "does not work in serverless mode"),
    (dict(autoscaler="kpa"), "does not work in raw mode"),
    (dict(scale_metric="cpu"), "use queue_depth or inflight"),
    (dict(scale_target=0), "positive number"),
    (dict(cpu=0), "cpu must be a positive number"),
    (dict(prometheus_url="prometheus:9090"), "invalid Prometheus URL"),
    (dict(server=ServerConfig(plan=("x.bfpplan",), port=9000)), "--plan, --port: set by the KServe deployment"),
    (dict(server=ServerConfig(tls_cert="c", tls_key="k")), "--tls-cert, --tls-key"),
])
def test_bad_settings(kw, message):
    args = dict(name="rn50", storage_uri="s3://m/rn50", image="img")
    args.update(kw)
    with pytest.raises(ValueError, match=re.escape(message)):
        KServeDeployment(**args)


# ---------------------------------------------------------------------- the command
def _run(argv, **kw):
    return subprocess.run(BFPACCEL + argv, capture_output=True, text=True, timeout=120, **kw)


def test_cli_writes_files_and_a_stream(tmp_path, crds):
    out = tmp_path / "kserve"
    r = _run(["deploy", "kserve", "--name", "rn50", "--storage-uri", "pvc://models/rn50", "--image", "reg/bfp:1",
              "--out", str(out), "--threads", "2", "--batching", "--max-batch-size", "16", "--workers", "3",
              "--scale-metric", "inflight", "--max-replicas", "8"])
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["README.txt", "clusterservingruntime.yaml", "inferenceservice.yaml",
                                       "scaledobject.yaml"]
    assert f"kubectl apply -f {out}" in r.stdout
    docs = {}
    for fn in os.listdir(out):
        if fn.endswith(".yaml"):
            text = (out / fn).read_text()
            assert "&id" not in text and "*id" not in text  # plain YAML, no aliases
            docs[fn[:-5]] = yaml.safe_load(text)
    for doc in docs.values():
        assert crd_errors(doc, crds[doc["kind"]]) == []
    args = docs["inferenceservice"]["spec"]["predictor"]["model"]["args"]
    assert args == ["--workers", "3", "--threads", "2", "--batching", "--max-batch-size", "16"]
    assert docs["scaledobject"]["spec"]["maxReplicaCount"] == 8
    assert float(docs["scaledobject"]["spec"]["triggers"][0]["metadata"]["threshold"]) == 3  # --workers in flight
    assert "scaledobject.yaml" in (out / "README.txt").read_text()

    r = _run(["deploy", "kserve", "--name", "rn50", "--storage-uri", "s3://m/rn50", "--image", "reg/bfp:1",
              "--deployment-mode", "serverless", "--canary-percent", "20", "--min-replicas", "0"])
    assert r.returncode == 0, r.stderr
    stream = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert [d["kind"] for d in stream] == ["ClusterServingRuntime", "InferenceService"]
    for doc in stream:
        assert crd_errors(doc, crds[doc["kind"]]) == []
    assert stream[1]["spec"]["predictor"]["canaryTrafficPercent"] == 20

    r = _run(["deploy", "kserve", "--name", "rn50", "--storage-uri", "s3://m/rn50", "--image", "i", "--autoscaler",
              "hpa"])
    kinds = [d["kind"] for d in yaml.safe_load_all(r.stdout) if d]
    assert r.returncode == 0 and kinds[-1] == "HorizontalPodAutoscaler"


@pytest.mark.parametrize("extra,message", [
    (["--canary-percent", "10"], "use deployment_mode serverless"),
    (["--min-replicas", "0"], "gauges vanish"),
    (["--deployment-mode", "serverless", "--scale-metric", "queue_depth"], "queue depth"),
    (["--storage-uri", "no-scheme"], "invalid storage URI"),
    (["--preferred-batch-sizes", "16", "--max-batch-size", "8"], "over --max-batch-size 8"),
])
def test_cli_errors_are_one_line(extra, message):
    argv = ["deploy", "kserve", "--name", "rn50", "--storage-uri", "s3://m/rn50", "--image", "i"]
    r = _run(argv + extra)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("extra,message", [
    (["--port", "9000"], "unrecognized arguments: --port"),  # set by the deployment, not a flag here
    (["--threads", "0"], "argument --threads: must be >= 1"),
    (["--scale-target", "-1"], "argument --scale-target"),
    (["--autoscaler", "cpu"], "invalid choice"),
])
def test_cli_usage_errors(extra, message):
    r = _run(["deploy", "kserve", "--name", "rn50", "--storage-uri", "s3://m/rn50", "--image", "i"] + extra)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_cli_help_lists_kserve_and_server_options():
    r = _run(["deploy", "kserve", "--help"])
    assert r.returncode == 0
    for flag in ("--storage-uri", "--canary-percent", "--scale-metric", "--autoscaler", "--out", "--threads",
                 "--batching", "--version-policy"):
        assert flag in r.stdout, flag
    listed = {line.split()[0] for line in r.stdout.splitlines() if line.startswith("  -")}
    assert not listed & {"--model-root", "--auth-key", "--auth-key-file", "--port", "--plan", "--tls-cert"}
    assert "--threads" in listed


def test_write_kserve_to_stdout(capsys):
    d = KServeDeployment("rn50", "s3://m/rn50", "img")
    assert write_kserve(d, "-") == []
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [x["kind"] for x in docs] == ["ClusterServingRuntime", "InferenceService", "ScaledObject"]


# ---------------------------------------------------------------------- the contract, live
def test_the_runtime_command_line_serves_a_kserve_model_folder(tmp_path, serve_parser):
    """What KServe starts, run here: the runtime's and the predictor's args on a folder laid
    out as the storage initializer leaves /mnt/models (ports 0 instead of 8080/8081).  The
    server must answer gRPC health, KServe v2 readiness and, on the REST port the Prometheus
    annotations name, the gauges the autoscalers query."""
    pytest.importorskip("grpc_health")
    pytest.importorskip("uvicorn")
    import signal
    import time
    import urllib.request

    from bfpaccel.deploy.webservice import check_health
    from bfpaccel.serve.testing import build_tiny_plan

    models = tmp_path / "mnt-models"
    (models / "1").mkdir(parents=True)
    build_tiny_plan(str(models / "1" / "tiny.bfpplan"))
    d = KServeDeployment("tiny", "s3://b/tiny", "img", server=ServerConfig(workers=1, batching=True))
    docs = d.render()
    argv = docs["clusterservingruntime"]["spec"]["containers"][0]["args"][1:] + \
        docs["inferenceservice"]["spec"]["predictor"]["model"]["args"]
    cfg = ServerConfig.from_args(serve_parser.parse_args([a.replace("{{.Name}}", "tiny") for a in argv]))
    local = dataclasses_replace(cfg, model_root=str(models), host="127.0.0.1", port=0, http_port=0)
    proc = subprocess.Popen([sys.executable, "-m", "bfpaccel.serve", *local.to_argv()], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        grpc_port = http_port = None
        deadline = time.time() + 90
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "listening on" in line:
                grpc_port = int(line.split()[4].rsplit(":", 1)[1])
                http_port = int(re.search(r" http=(\d+)", line).group(1))
            if "ready" in line:
                break
        assert grpc_port and http_port, proc.stderr.read() if proc.poll() is not None else "no ready line"
        assert check_health("127.0.0.1", grpc_port) == "SERVING"
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/tiny/ready", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        for name in ("bfpaccel_queue_depth", "bfpaccel_inflight_requests"):
            assert re.search(rf"^{name}(\{{[^}}]*\}})? ", metrics, re.M), name
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_docstring_examples():
    import doctest

    import bfpaccel.deploy.kserve as kserve

    result = doctest.testmod(kserve)
    assert result.attempted >= 3 and result.failed == 0
