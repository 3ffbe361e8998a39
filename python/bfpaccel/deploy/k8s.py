"""Kubernetes manifests for a service (the seed's AKS deploy, SEED_API §8 steps 11-12),
written for ``kubectl apply -f``; nothing here talks to a cluster.

Per service ``<output_dir>/<name>/``: ``deployment.yaml`` (replicas, resource requests and
limits, gRPC readiness/liveness probes on 50051), ``service.yaml`` (port 80, or 443 with
TLS, the seed client's defaults, to 50051), ``hpa.yaml`` (autoscaling/v2 on CPU, when
autoscale is enabled), ``secret.yaml`` (the two keys, when auth is enabled, mounted in the
pod as files the server reads with ``--auth-key-file``; mode 0600 here),
``tls-secret.yaml`` (with TLS) and ``README.txt``.
"""

from __future__ import annotations

import base64
import json
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ..serve.config import ServerConfig
from .image import PLAN_FILE, SERVER_PORT, Image

if TYPE_CHECKING:
    from .webservice import KubernetesTarget, Webservice

__all__ = ["render_manifests", "write_manifests", "cpu_quantity", "memory_quantity"]


def cpu_quantity(cores: float) -> str:
    """Kubernetes CPU quantity: ``1.0`` -> ``"1"``, ``0.25`` -> ``"250m"``.

    Example:
        >>> cpu_quantity(0.25), cpu_quantity(2)
        ('250m', '2')
    """
    milli = int(round(float(cores) * 1000))
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def memory_quantity(gb: float) -> str:
    """Kubernetes memory quantity in mebibytes: ``0.5`` -> ``"512Mi"``.

    Example:
        >>> memory_quantity(0.5), memory_quantity(2)
        ('512Mi', '2Gi')
    """
    mi = int(round(float(gb) * 1024))
    return f"{mi // 1024}Gi" if mi % 1024 == 0 else f"{mi}Mi"


def render_manifests(name: str, container_image: str, config: Dict[str, Any], namespace: str = "default",
                     keys: Optional[List[str]] = None, tls: Optional[Dict[str, bytes]] = None,
                     service_type: str = "LoadBalancer") -> Dict[str, Dict[str, Any]]:
    """The manifests (file stem -> object) of one service.

    ``config``: the fields of a ``KubernetesDeploymentConfiguration``; ``keys``: the two
    auth keys; ``tls``: ``{"crt": pem, "key": pem}``.

    Example:
        >>> m = render_manifests("svc", "reg/img:1", {"num_replicas": 2})
        >>> sorted(m), m["deployment"]["spec"]["replicas"]
        (['deployment', 'service'], 2)
    """
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "bfpaccel"}
    selector = {"app.kubernetes.io/name": name}
    meta = {"name": name, "namespace": namespace, "labels": labels}
    ssl = bool(config.get("ssl_enabled"))
    server: Dict[str, Any] = {"plan": (f"/app/{PLAN_FILE}",), "name": name, "port": SERVER_PORT, "host": "0.0.0.0"}
    env: List[Dict[str, Any]] = []
    volumes: List[Dict[str, Any]] = []
    mounts: List[Dict[str, Any]] = []
    out: Dict[str, Dict[str, Any]] = {}
    if keys:
        secret = f"{name}-keys"
        # the keys reach the server as files of the Secret, never on its command line (where
        # anyone who can list processes would see them); 0400: the image runs as root
        volumes.append({"name": "keys", "secret": {"secretName": secret, "defaultMode": 0o400}})
        mounts.append({"name": "keys", "mountPath": "/app/keys", "readOnly": True})
        server["auth_key_files"] = ("/app/keys/primaryKey", "/app/keys/secondaryKey")
        out["secret"] = {"apiVersion": "v1", "kind": "Secret", "metadata": {**meta, "name": secret},
                         "type": "Opaque", "stringData": {"primaryKey": keys[0], "secondaryKey": keys[1]}}
    if ssl and tls:
        tls_secret = f"{name}-tls"
        out["tls-secret"] = {"apiVersion": "v1", "kind": "Secret", "metadata": {**meta, "name": tls_secret},
                             "type": "kubernetes.io/tls",
                             "data": {"tls.crt": base64.b64encode(tls["crt"]).decode(),
                                      "tls.key": base64.b64encode(tls["key"]).decode()}}
        volumes.append({"name": "tls", "secret": {"secretName": tls_secret}})
        mounts.append({"name": "tls", "mountPath": "/app/tls", "readOnly": True})
        server["tls_cert"], server["tls_key"] = "/app/tls/tls.crt", "/app/tls/tls.key"
    if config.get("workers"):
        server["workers"] = int(config["workers"])
    # the container's command line, from the one declaration of the server's options
    args = ["python", "-m", "bfpaccel.serve"] + ServerConfig(**server).to_argv(
        always=["plan", "name", "port"] + (["workers"] if config.get("workers") else []))
    # the kubelet's gRPC probe speaks plaintext only: a TLS server gets TCP probes
    probe_kind: Dict[str, Any] = {"tcpSocket": {"port": SERVER_PORT}} if ssl else {"grpc": {"port": SERVER_PORT}}
    cpu, mem = float(config.get("cpu_cores", 1.0)), float(config.get("memory_gb", 2.0))
    cpu_lim = float(config.get("cpu_cores_limit") or cpu)
    mem_lim = float(config.get("memory_gb_limit") or mem)
    container: Dict[str, Any] = {
        "name": "server",
        "image": container_image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "ports": [{"name": "grpc", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": cpu_quantity(cpu), "memory": memory_quantity(mem)},
                      "limits": {"cpu": cpu_quantity(cpu_lim), "memory": memory_quantity(mem_lim)}},
        "readinessProbe": {**probe_kind, "initialDelaySeconds": 5, "periodSeconds": 10, "timeoutSeconds": 5,
                           "failureThreshold": 3},
        "livenessProbe": {**probe_kind, "initialDelaySeconds": 30, "periodSeconds": 20, "timeoutSeconds": 5,
                          "failureThreshold": 3},
    }
    if env:
        container["env"] = env
    if mounts:
        container["volumeMounts"] = mounts
    pod_spec: Dict[str, Any] = {"containers": [container]}
    if volumes:
        pod_spec["volumes"] = volumes
    autoscale = bool(config.get("autoscale_enabled"))
    replicas = int(config.get("autoscale_min_replicas", 1)) if autoscale else int(config.get("num_replicas", 1))
    out["deployment"] = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {"replicas": replicas, "selector": {"matchLabels": selector},
                 "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
    }
    out["service"] = {
        "apiVersion": "v1", "kind": "Service", "metadata": meta,
        "spec": {"type": service_type, "selector": selector,
                 "ports": [{"name": "grpc", "port": 443 if ssl else 80, "targetPort": "grpc", "protocol": "TCP",
                            "appProtocol": "grpc"}]},
    }
    if autoscale:
        out["hpa"] = {
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta,
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                     "minReplicas": int(config.get("autoscale_min_replicas", 1)),
                     "maxReplicas": int(config.get("autoscale_max_replicas", 10)),
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                         "type": "Utilization",
                         "averageUtilization": int(config.get("autoscale_target_utilization", 70))}}}]},
        }
    return out


def _dump(obj: Dict[str, Any]) -> str:
    """YAML of a manifest, without anchors/aliases for objects used twice (plain YAML that
    every tool reads)."""
    try:
        import yaml
    except ImportError:  # JSON is YAML too
        return json.dumps(obj, indent=2) + "\n"

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump(obj, Dumper=Dumper, sort_keys=False, default_flow_style=False)


def write_manifests(svc: "Webservice", image: Image, target: "KubernetesTarget") -> Dict[str, str]:
    """Render and write the manifests of ``svc`` into ``svc.workdir``; returns stem -> path."""
    from .webservice import generate_self_signed_cert

    cfg = svc.config
    os.makedirs(svc.workdir, exist_ok=True)
    tls = None
    if cfg.get("ssl_enabled"):
        cert, key = cfg.get("ssl_cert_pem_file") or "", cfg.get("ssl_key_pem_file") or ""
        if not cert:
            cert, key = os.path.join(svc.workdir, "tls.crt"), os.path.join(svc.workdir, "tls.key")
            if not os.path.exists(cert):
                generate_self_signed_cert(cert, key, cfg.get("ssl_cname"))
        with open(cert, "rb") as f1, open(key, "rb") as f2:
            tls = {"crt": f1.read(), "key": f2.read()}
    container_image = f"{target.image_registry.rstrip('/')}/{image.name}:{image.version}"
    manifests = render_manifests(svc.name, container_image, cfg, target.namespace,
                                 list(svc._keys) or None, tls, target.service_type)
    paths = {}
    for stem, obj in manifests.items():
        p = os.path.join(svc.workdir, f"{stem}.yaml")
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            f.write(_dump(obj))
        os.replace(tmp, p)
        if stem.endswith("secret"):
            os.chmod(p, 0o600)
        paths[stem] = p
    with open(os.path.join(svc.workdir, "README.txt"), "w") as f:
        f.write(f"Service {svc.name} from image {image.id} (bundle {image.path}).\n\n"
                f"1. docker build -t {container_image} {image.path}   (put a bfpaccel wheel in wheels/ first)\n"
                f"2. docker push {container_image}\n"
                f"3. kubectl apply -f {svc.workdir}\n"
                f"Remove it with: kubectl delete -f {svc.workdir}\n")
    svc.scoring_uri = f"{'https' if cfg.get('ssl_enabled') else 'http'}://{svc.name}.{target.namespace}.svc"
    with svc.registry.write() as c:
        c.execute("UPDATE deployments SET scoring_uri=? WHERE name=?", (svc.scoring_uri, svc.name))
    return paths
