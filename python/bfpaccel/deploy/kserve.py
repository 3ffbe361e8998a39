"""KServe manifests for bfpaccel's server (``bfpaccel deploy kserve``); nothing here talks to
a cluster.

Three objects (four files with the README):

- ``clusterservingruntime.yaml``: a ``ClusterServingRuntime`` (serving.kserve.io/v1alpha1)
  named ``bfpaccel`` that serves the model format ``bfpplan`` (version "1", auto-selected)
  over the protocols ``v1, v2, grpc-v1, grpc-v2``.  Its container runs ``bfpaccel serve
  --model-root /mnt/models --model-name {{.Name}} --host 0.0.0.0 --port 8081 --http-port
  8080``: KServe's conventions (REST on 8080, gRPC on 8081) and its storage initializer's
  mount point, holding the plan or its version folders; KServe replaces ``{{.Name}}`` with
  the InferenceService's name.  ``prometheus.kserve.io/port: '8080'`` and ``path: /metrics``
  say where the server's metrics are (the REST port serves ``/metrics``).
- ``inferenceservice.yaml``: an ``InferenceService`` (serving.kserve.io/v1beta1) whose
  predictor asks for ``modelFormat: bfpplan`` on that runtime, with ``storageUri``,
  replicas, resources and the server's tunable options as container args (KServe appends a
  predictor's args to its runtime's), built from :class:`~bfpaccel.serve.config.ServerConfig`.
- the autoscaler: a KEDA ``ScaledObject`` or an ``autoscaling/v2`` HorizontalPodAutoscaler.

Autoscaling: on load, not CPU
-----------------------------
The server exports ``bfpaccel_queue_depth`` (requests waiting for a worker: the server is
saturated) and ``bfpaccel_inflight_requests`` (requests being computed).  A CPU target scales
too late for a compute-bound model server (a busy pod is at 100% whether 1 or 50 requests
wait), so replicas follow one of those gauges, summed over the pods and divided by a target
per pod (``--scale-metric``, ``--scale-target``).

KServe's own autoscalers cannot do it: in RawDeployment mode its HPA knows only cpu and memory,
and its KEDA integration (``autoscalerClass: keda``) is recent; Knative's autoscaler counts
in-flight requests at its queue-proxy, not the server's queue.  So, by default
(``--deployment-mode raw --autoscaler keda``), the InferenceService is a RawDeployment with
``serving.kserve.io/autoscalerClass: external`` (KServe makes no HPA) and a **KEDA
ScaledObject** scales its Deployment ``<name>-predictor`` with a ``prometheus`` trigger
querying ``sum(bfpaccel_queue_depth{namespace=..., pod=~"<name>-predictor-.*"})``.  KEDA
queries Prometheus itself, so nothing else needs installing, and the manifests work with any
KServe that has raw deployments.  The choices:

- ``--autoscaler keda`` (raw, the default): the ScaledObject above (needs KEDA and a
  Prometheus that scrapes the pods: the predictor carries ``prometheus.io/scrape`` annotations).
- ``--autoscaler hpa`` (raw): an ``autoscaling/v2`` HorizontalPodAutoscaler on the ``Pods``
  metric ``bfpaccel_queue_depth`` (or ``..._inflight_requests``) with an ``AverageValue``
  target, for clusters whose Prometheus adapter serves custom metrics (its rule is in the
  README written beside the manifests).  No KEDA needed, but the adapter must be set up.
- ``--autoscaler none`` (raw): a fixed ``--min-replicas`` (``autoscalerClass: none``).
- ``--deployment-mode serverless`` (Knative, autoscaler ``kpa``): Knative's autoscaler on
  ``scaleMetric: concurrency`` (in-flight requests per pod, measured by Knative itself;
  ``--scale-metric inflight`` only), scale to zero, and ``canaryTrafficPercent`` rollouts,
  which only Knative implements.  Knative routes one container port: ``--serverless-port
  grpc`` (the default) declares 8081 named ``h2c`` so Knative speaks HTTP/2 cleartext to it
  (gRPC); ``rest`` declares 8080 instead.

The server's own gauges vanish with its last pod, so the raw autoscalers cannot wake a
deployment scaled to zero: they need ``--min-replicas`` >= 1 (Knative's activator can).

Raw pods have no Knative queue-proxy to gather metrics, so there the predictor overrides the
runtime's ``serving.kserve.io/enable-prometheus-scraping: "true"`` (which would point
Prometheus at the queue-proxy's port) and annotates the pods with the server's own port.

Example:
    >>> from bfpaccel.serve.config import ServerConfig
    >>> d = KServeDeployment("resnet50", "s3://models/resnet50", "registry.local/bfpaccel:1",
    ...                      server=ServerConfig(batching=True))
    >>> sorted(d.render())
    ['clusterservingruntime', 'inferenceservice', 'scaledobject']
    >>> d.render()["inferenceservice"]["spec"]["predictor"]["model"]["args"]
    ['--threads', '1', '--batching']
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..serve.config import ServerConfig, server_options
from .k8s import _dump, cpu_quantity, memory_quantity

__all__ = ["KServeDeployment", "write_kserve", "MODEL_FORMAT", "HTTP_PORT", "GRPC_PORT", "MODEL_DIR",
           "SCALE_METRICS"]

#: The ``modelFormat`` name of compiled plans.
MODEL_FORMAT = "bfpplan"
#: KServe's ports: REST (and /metrics) and gRPC.
HTTP_PORT = 8080
GRPC_PORT = 8081
#: Where KServe's storage initializer puts ``storageUri``.
MODEL_DIR = "/mnt/models"
#: ``--scale-metric`` -> the server's Prometheus gauge.
SCALE_METRICS = {"queue_depth": "bfpaccel_queue_depth", "inflight": "bfpaccel_inflight_requests"}

_KSERVE = "serving.kserve.io"
_AUTOSCALERS = {"raw": ("keda", "hpa", "none"), "serverless": ("kpa",)}
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")


def _quantity(x: float) -> str:
    """A Kubernetes quantity: ``2.0`` -> ``"2"``, ``0.5`` -> ``"500m"``."""
    milli = int(round(x * 1000))
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


@dataclass(frozen=True)
class KServeDeployment:
    """One model on KServe: the runtime, the InferenceService and its autoscaler.

    Args:
        name: the InferenceService (a DNS-1035 label: lowercase letters, digits, '-').
        storage_uri: where KServe fetches the model (``s3://``, ``gs://``, ``pvc://``, ...):
            a ``.bfpplan``, or version folders ``1/``, ``2/`` each holding one.
        image: the container image with bfpaccel installed (``bfpaccel image create`` builds one).
        namespace: of the InferenceService and its autoscaler.
        runtime_name: of the ClusterServingRuntime (cluster-wide; one serves every bfpplan model).
        deployment_mode: ``raw`` (Kubernetes Deployment; KEDA/HPA/fixed replicas) or
            ``serverless`` (Knative: concurrency autoscaling, scale to zero, canary traffic).
        autoscaler: ``keda``/``hpa``/``none`` (raw) or ``kpa`` (serverless); None: ``keda``
            for raw, ``kpa`` for serverless.  See the module docstring for the trade-offs.
        min_replicas, max_replicas: the replica range (fixed at ``min_replicas`` with ``none``).
        scale_metric: ``queue_depth`` (requests waiting for a worker) or ``inflight``; None:
            ``queue_depth``, or ``inflight`` with Knative (the only metric it can use).
        scale_target: the metric's target per pod; None: 2 waiting requests, or the server's
            ``workers`` in flight.
        canary_percent: traffic share of a new revision (serverless only; None: all of it).
        prometheus_url: the Prometheus KEDA queries.
        prometheus_query: the KEDA query; None: the metric summed over this service's pods.
        serverless_port: Knative's one routed port: ``grpc`` (8081, ``h2c``) or ``rest`` (8080).
        cpu, memory_gb: requests (and limits) of the server container.  The server's
            ``--threads`` defaults to the CPU count rounded down (at least 1): a process in a
            container sees every CPU of the node, not its share.
        server: the server's tunable options (its per-deployment options -- model location,
            ports, TLS and key files -- are set here and must be left at their defaults).
    """

    name: str
    storage_uri: str
    image: str
    namespace: str = "default"
    runtime_name: str = "bfpaccel"
    deployment_mode: str = "raw"
    autoscaler: Optional[str] = None
    min_replicas: int = 1
    max_replicas: int = 4
    scale_metric: Optional[str] = None
    scale_target: Optional[float] = None
    canary_percent: Optional[int] = None
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    prometheus_query: Optional[str] = None
    serverless_port: str = "grpc"
    cpu: float = 1.0
    memory_gb: float = 2.0
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(isinstance(self.name, str) and len(self.name) <= 45 and bool(_DNS1035.match(self.name)),
             f"invalid name {self.name!r}: lowercase letters, digits and '-', starting with a letter, at most "
             "45 characters (KServe adds '-predictor-...' to it)")
        need(isinstance(self.namespace, str) and len(self.namespace) <= 63
             and bool(_DNS1123_LABEL.match(self.namespace)), f"invalid namespace {self.namespace!r}")
        need(isinstance(self.runtime_name, str) and len(self.runtime_name) <= 253
             and bool(_DNS1123_SUBDOMAIN.match(self.runtime_name)), f"invalid runtime name {self.runtime_name!r}")
        need(isinstance(self.storage_uri, str) and bool(_URI.match(self.storage_uri)),
             f"invalid storage URI {self.storage_uri!r}: use SCHEME://PATH (s3://, gs://, pvc://, https://...)")
        need(isinstance(self.image, str) and bool(self.image) and not any(c.isspace() for c in self.image),
             f"invalid image {self.image!r}")
        need(self.deployment_mode in _AUTOSCALERS,
             f"deployment mode {self.deployment_mode!r}: use raw or serverless")
        autoscaler = self.autoscaler or _AUTOSCALERS[self.deployment_mode][0]
        need(autoscaler in _AUTOSCALERS[self.deployment_mode],
             f"autoscaler {autoscaler!r} does not work in {self.deployment_mode} mode: use "
             + " or ".join(_AUTOSCALERS[self.deployment_mode])
             + (" (Knative scales serverless services itself)" if self.deployment_mode == "serverless" else ""))
        object.__setattr__(self, "autoscaler", autoscaler)
        for what, v in (("min_replicas", self.min_replicas), ("max_replicas", self.max_replicas)):
            need(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10_000,
                 f"{what} must be an integer in 0..10000, got {v!r}")
        need(self.max_replicas >= max(1, self.min_replicas),
             f"need max_replicas >= max(1, min_replicas), got {self.min_replicas}..{self.max_replicas}")
        if autoscaler in ("keda", "hpa", "none"):
            need(self.min_replicas >= 1, f"min_replicas 0 with the {autoscaler} autoscaler: the server's own "
                 "gauges vanish with its last pod, so nothing would scale it up again; use min_replicas >= 1, "
                 "or deployment_mode serverless (Knative's activator wakes it)")
        metric = self.scale_metric or ("inflight" if autoscaler == "kpa" else "queue_depth")
        need(metric in SCALE_METRICS, f"scale metric {metric!r}: use queue_depth or inflight")
        object.__setattr__(self, "scale_metric", metric)
        if autoscaler == "kpa":
            need(metric == "inflight", "Knative's autoscaler measures in-flight requests itself and "
                 "cannot read the server's queue depth: use scale_metric inflight, or deployment_mode raw")
        if self.scale_target is not None:
            t = self.scale_target
            need(not isinstance(t, bool) and isinstance(t, (int, float)) and math.isfinite(t) and t > 0,
                 f"scale target must be a positive number, got {t!r}")
            need(autoscaler != "kpa" or float(t).is_integer(), f"Knative's concurrency target is a whole "
                 f"number of requests, got {t!r}")
            object.__setattr__(self, "scale_target", float(t))
        if self.canary_percent is not None:
            need(self.deployment_mode == "serverless", "canary_percent is a Knative traffic split between "
                 "revisions: use deployment_mode serverless")
            need(isinstance(self.canary_percent, int) and not isinstance(self.canary_percent, bool)
                 and 0 <= self.canary_percent <= 100, f"canary percent must be in 0..100, got {self.canary_percent!r}")
        need(isinstance(self.prometheus_url, str) and bool(re.match(r"^https?://\S+$", self.prometheus_url)),
             f"invalid Prometheus URL {self.prometheus_url!r}")
        need(self.prometheus_query is None
             or (isinstance(self.prometheus_query, str) and bool(self.prometheus_query.strip())),
             "the Prometheus query must be a non-empty string")
        need(self.serverless_port in ("grpc", "rest"), f"serverless port {self.serverless_port!r}: use grpc or rest")
        for what, amount in (("cpu", self.cpu), ("memory_gb", self.memory_gb)):
            need(not isinstance(amount, bool) and isinstance(amount, (int, float)) and math.isfinite(amount)
                 and amount > 0, f"{what} must be a positive number, got {amount!r}")
        need(isinstance(self.server, ServerConfig), "server must be a ServerConfig")
        defaults = ServerConfig()
        set_here = [opt.flag for name, opt in server_options(per_deployment=True)
                    if getattr(self.server, name) != getattr(defaults, name)]
        need(not set_here, f"{', '.join(set_here)}: set by the KServe deployment itself (model folder, ports, "
             "TLS and keys come from KServe and the cluster)")

    # ------------------------------------------------------------------ pieces
    @property
    def predictor_name(self) -> str:
        """The Deployment (raw) / Knative service that KServe creates for the predictor."""
        return f"{self.name}-predictor"

    @property
    def target(self) -> float:
        """The scale target per pod (``scale_target`` or its default)."""
        if self.scale_target is not None:
            return self.scale_target
        return 2.0 if self.scale_metric == "queue_depth" else float(self.server.workers)

    def query(self) -> str:
        """The Prometheus query of the KEDA trigger."""
        if self.prometheus_query:
            return self.prometheus_query
        return (f'sum({SCALE_METRICS[str(self.scale_metric)]}{{namespace="{self.namespace}",'
                f'pod=~"{self.predictor_name}-.*"}})')

    def runtime_server_config(self) -> ServerConfig:
        """The options fixed by the runtime: model folder and name, address and ports."""
        return dataclasses.replace(ServerConfig(), model_root=MODEL_DIR, model_name="{{.Name}}", host="0.0.0.0",
                                   port=GRPC_PORT, http_port=HTTP_PORT)

    def server_config(self) -> ServerConfig:
        """The whole config the container runs with (runtime options + this service's)."""
        threads = self.server.num_threads or max(1, int(self.cpu))
        base = self.runtime_server_config()
        tunables = {name: getattr(self.server, name) for name, _ in server_options(per_deployment=False)}
        return dataclasses.replace(base, **{**tunables, "num_threads": threads})

    def runtime_args(self) -> List[str]:
        """The runtime container's args (after the ``bfpaccel`` command)."""
        return ["serve"] + self.runtime_server_config().to_argv(
            always=["model_root", "model_name", "host", "port", "http_port"])

    def predictor_args(self) -> List[str]:
        """The predictor's args, appended by KServe to :meth:`runtime_args`: every option of
        :meth:`server_config` the runtime does not set."""
        cfg = self.server_config()
        tunables = dataclasses.replace(ServerConfig(), **{name: getattr(cfg, name)
                                                           for name, _ in server_options(per_deployment=False)})
        return tunables.to_argv()

    def _labels(self) -> Dict[str, str]:
        return {"app.kubernetes.io/name": self.name, "app.kubernetes.io/part-of": "bfpaccel"}

    # ------------------------------------------------------------------ objects
    def serving_runtime(self) -> Dict[str, Any]:
        """The ClusterServingRuntime."""
        return {
            "apiVersion": f"{_KSERVE}/v1alpha1",
            "kind": "ClusterServingRuntime",
            "metadata": {"name": self.runtime_name, "labels": {"app.kubernetes.io/part-of": "bfpaccel"}},
            "spec": {
                "annotations": {
                    "prometheus.kserve.io/port": str(HTTP_PORT),
                    "prometheus.kserve.io/path": "/metrics",
                    "serving.kserve.io/enable-prometheus-scraping": "true",
                    # Knative pods: the queue-proxy merges the server's metrics into its own port
                    "serving.kserve.io/enable-metric-aggregation": "true",
                },
                "supportedModelFormats": [{"name": MODEL_FORMAT, "version": "1", "autoSelect": True, "priority": 1}],
                "protocolVersions": ["v1", "v2", "grpc-v1", "grpc-v2"],
                "containers": [{
                    "name": "kserve-container",
                    "image": self.image,
                    "command": ["bfpaccel"],
                    "args": self.runtime_args(),
                    "securityContext": {
                        "allowPrivilegeEscalation": False, "privileged": False, "runAsNonRoot": True,
                        "runAsUser": 1000,  # the image defines no user
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "resources": {"requests": {"cpu": "1", "memory": "2Gi"},
                                  "limits": {"cpu": "1", "memory": "2Gi"}},
                }],
            },
        }

    def inference_service(self) -> Dict[str, Any]:
        """The InferenceService."""
        raw = self.deployment_mode == "raw"
        annotations = {f"{_KSERVE}/deploymentMode": "RawDeployment" if raw else "Serverless"}
        if raw:
            annotations[f"{_KSERVE}/autoscalerClass"] = {"keda": "external", "hpa": "external",
                                                         "none": "none"}[str(self.autoscaler)]
        grpc_port = {"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"}
        http_port = {"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}
        resources = {"requests": {"cpu": cpu_quantity(self.cpu), "memory": memory_quantity(self.memory_gb)},
                     "limits": {"cpu": cpu_quantity(self.cpu), "memory": memory_quantity(self.memory_gb)}}
        model: Dict[str, Any] = {
            "modelFormat": {"name": MODEL_FORMAT, "version": "1"},
            "runtime": self.runtime_name,
            "storageUri": self.storage_uri,
            "resources": resources,
        }
        args = self.predictor_args()
        if args:
            model["args"] = args
        predictor: Dict[str, Any] = {}
        if raw:
            # both faces: KServe's Service maps the first port to :80 and the h2c one to :8081
            model["ports"] = [http_port, grpc_port]
            probe = {"grpc": {"port": GRPC_PORT}, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3}
            model["readinessProbe"] = {**probe, "initialDelaySeconds": 5}
            model["livenessProbe"] = {**probe, "initialDelaySeconds": 30}
            fixed = self.autoscaler == "none"
            predictor["minReplicas"] = self.min_replicas
            predictor["maxReplicas"] = self.min_replicas if fixed else self.max_replicas
            predictor["terminationGracePeriodSeconds"] = int(math.ceil(self.server.grace)) + 5
            # no queue-proxy here: Prometheus scrapes the server itself
            predictor["annotations"] = {
                f"{_KSERVE}/enable-prometheus-scraping": "false",
                f"{_KSERVE}/enable-metric-aggregation": "false",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(HTTP_PORT),
                "prometheus.io/path": "/metrics",
            }
        else:
            model["ports"] = [grpc_port if self.serverless_port == "grpc" else http_port]
            predictor["minReplicas"] = self.min_replicas
            predictor["maxReplicas"] = self.max_replicas
            predictor["scaleMetric"] = "concurrency"  # in-flight requests per pod
            predictor["scaleTarget"] = int(self.target)
            if self.canary_percent is not None:
                predictor["canaryTrafficPercent"] = self.canary_percent
        predictor["model"] = model
        return {
            "apiVersion": f"{_KSERVE}/v1beta1",
            "kind": "InferenceService",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self._labels(),
                         "annotations": annotations},
            "spec": {"predictor": predictor},
        }

    def scaled_object(self) -> Dict[str, Any]:
        """The KEDA ScaledObject (autoscaler ``keda``)."""
        return {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {"name": self.predictor_name, "namespace": self.namespace, "labels": self._labels()},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": self.predictor_name},
                "minReplicaCount": self.min_replicas,
                "maxReplicaCount": self.max_replicas,
                "pollingInterval": 15,
                "cooldownPeriod": 300,
                "triggers": [{
                    "type": "prometheus",
                    "metricType": "AverageValue",  # the sum over pods / the target = replicas
                    "metadata": {"serverAddress": self.prometheus_url, "query": self.query(),
                                 "threshold": _quantity(self.target)},
                }],
            },
        }

    def hpa(self) -> Dict[str, Any]:
        """The HorizontalPodAutoscaler on the custom Pods metric (autoscaler ``hpa``)."""
        return {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": self.predictor_name, "namespace": self.namespace, "labels": self._labels()},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": self.predictor_name},
                "minReplicas": self.min_replicas,
                "maxReplicas": self.max_replicas,
                "metrics": [{"type": "Pods", "pods": {
                    "metric": {"name": SCALE_METRICS[str(self.scale_metric)]},
                    "target": {"type": "AverageValue", "averageValue": _quantity(self.target)}}}],
            },
        }

    def render(self) -> Dict[str, Dict[str, Any]]:
        """File stem -> manifest object."""
        out = {"clusterservingruntime": self.serving_runtime(), "inferenceservice": self.inference_service()}
        if self.autoscaler == "keda":
            out["scaledobject"] = self.scaled_object()
        elif self.autoscaler == "hpa":
            out["hpa"] = self.hpa()
        return out

    def readme(self) -> str:
        """Apply instructions (and the Prometheus adapter rule for ``hpa``)."""
        metric = SCALE_METRICS[str(self.scale_metric)]
        text = (f"InferenceService {self.name} (namespace {self.namespace}) on the ClusterServingRuntime "
                f"{self.runtime_name}, model from {self.storage_uri}.\n\n"
                "1. The image must hold bfpaccel (bfpaccel image create builds one; push it where the cluster "
                "pulls from).\n"
                "2. kubectl apply -f clusterservingruntime.yaml   (once per cluster; cluster-scoped)\n"
                "3. kubectl apply -f inferenceservice.yaml")
        if self.autoscaler == "keda":
            text += (" -f scaledobject.yaml   (needs KEDA, and a Prometheus at "
                     f"{self.prometheus_url} that scrapes pods annotated prometheus.io/scrape)\n")
        elif self.autoscaler == "hpa":
            text += (" -f hpa.yaml\n\nThe HPA reads the Pods metric {m} from custom.metrics.k8s.io: a Prometheus "
                     "adapter rule such as\n\n  rules:\n  - seriesQuery: '{m}{{namespace!=\"\",pod!=\"\"}}'\n"
                     "    resources: {{overrides: {{namespace: {{resource: namespace}}, pod: {{resource: pod}}}}}}\n"
                     "    metricsQuery: 'sum(<<.Series>>{{<<.LabelMatchers>>}}) by (<<.GroupBy>>)'\n").format(m=metric)
        else:
            text += "\n"
        grpc_note = ("gRPC on port 8081 of the predictor Service; REST on port 80" if self.deployment_mode == "raw"
                     else f"{'gRPC' if self.serverless_port == 'grpc' else 'REST'} through the Knative route")
        text += (f"\nClients: {grpc_note}.  Remove with kubectl delete -f inferenceservice.yaml (and the "
                 "autoscaler file).\n")
        return text


def write_kserve(deployment: KServeDeployment, out: str) -> List[str]:
    """Write the manifests into folder ``out`` (created; returns the paths), or as one
    multi-document YAML stream on stdout when ``out`` is ``-`` (returns [])."""
    manifests = deployment.render()
    if out == "-":
        sys.stdout.write("---\n".join(_dump(obj) for obj in manifests.values()))
        sys.stdout.flush()
        return []
    os.makedirs(out, exist_ok=True)
    paths = []
    for stem, obj in manifests.items():
        path = os.path.join(out, f"{stem}.yaml")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(_dump(obj))
        os.replace(tmp, path)
        paths.append(path)
    readme = os.path.join(out, "README.txt")
    with open(readme, "w") as f:
        f.write(deployment.readme())
    return paths + [readme]
