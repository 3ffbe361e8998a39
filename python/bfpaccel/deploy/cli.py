"""``bfpaccel registry | image | deploy`` subcommands (wired into ``bfpaccel.cli`` with
:func:`add_registry_parsers`).

Every command takes ``--registry PATH`` (default ``$BFPACCEL_REGISTRY`` or
``./bfpaccel-registry``). Handlers return an exit status: 0 ok, 2 a user error (message on
stderr), 1 a deployment that did not become healthy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

__all__ = ["add_registry_parsers", "DEFAULT_REGISTRY"]

DEFAULT_REGISTRY = "bfpaccel-registry"


def _registry_path(args: argparse.Namespace) -> str:
    return args.registry or os.environ.get("BFPACCEL_REGISTRY") or DEFAULT_REGISTRY


def _open(args: argparse.Namespace, create: bool = True) -> Any:
    """The registry of ``--registry`` / ``$BFPACCEL_REGISTRY``. Commands that only read or remove
    pass ``create=False``: a path without a registry is then an error instead of a new, empty
    workspace left behind (a mistyped path must not create folders)."""
    from ..registry import Registry, RegistryError

    path = _registry_path(args)
    if not create and not os.path.isfile(os.path.join(path, Registry.DB_NAME)):
        raise RegistryError(f"no registry at {os.path.abspath(path)} (bfpaccel registry register creates one; "
                            f"--registry PATH or $BFPACCEL_REGISTRY choose another)")
    return Registry(path)


def _open_if_any(args: argparse.Namespace) -> Any:
    """The registry, or None when there is none yet at the path (list commands print nothing)."""
    from ..registry import Registry

    path = _registry_path(args)
    if not os.path.isfile(os.path.join(path, Registry.DB_NAME)):
        print(f"(no registry at {os.path.abspath(path)} yet)", file=sys.stderr)
        return None
    return Registry(path)


def _kv(items: Optional[List[str]], what: str) -> Dict[str, str]:
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise ValueError(f"{what} {it!r}: use KEY=VALUE")
        out[k] = v
    return out


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Registry errors become a one-line message and exit status 2 (the main CLI already
    handles ValueError/OSError the same way)."""

    def run(args: argparse.Namespace) -> int:
        from ..registry import RegistryError

        try:
            return fn(args)
        except RegistryError as e:
            print(f"bfpaccel: error: {e}", file=sys.stderr)
            return 2

    run.__doc__ = fn.__doc__
    return run


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------------- registry
def cmd_registry_register(args: argparse.Namespace) -> int:
    from ..registry import Model

    reg = _open(args)
    m = Model.register(reg, args.path, args.name, tags=_kv(args.tag, "--tag"), description=args.description,
                       properties=_kv(args.property, "--property"))
    print(m.id)
    return 0


def cmd_registry_list(args: argparse.Namespace) -> int:
    from ..registry import Model

    tags: List[Any] = []
    for t in args.tag or []:
        k, sep, v = t.partition("=")
        tags.append([k, v] if sep else k)
    reg = _open_if_any(args)
    models = [] if reg is None else Model.list(reg, name=args.name, tags=tags or None, latest=args.latest)
    if args.json:
        _print_json([m.serialize() for m in models])
        return 0
    if not models:
        print("no models registered")
        return 0
    print(f"{'id':<40} {'size':>12} {'created':<19}  parent / tags")
    for m in models:
        extra = (f"parent {m.parent_id}  " if m.parent_id else "") + " ".join(f"{k}={v}" for k, v in m.tags.items())
        print(f"{m.id:<40} {m.size:>12} {_when(m.created_time):<19}  {extra}")
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    from ..registry import Model

    from ..registry import parse_id

    parse_id(args.id)  # a malformed id is the first thing to say
    m = Model(_open(args, create=False), args.id)
    info = m.serialize()
    info["dependents"] = m.dependents()
    if args.verify:
        m.verify()
        info["verified"] = True
    _print_json(info)
    return 0


def cmd_registry_delete(args: argparse.Namespace) -> int:
    from ..registry import Model

    from ..registry import parse_id

    parse_id(args.id)  # a malformed id is the first thing to say
    m = Model(_open(args, create=False), args.id)
    m.delete()
    print(f"deleted model {m.id}")
    return 0


def cmd_registry_verify(args: argparse.Namespace) -> int:
    reg = _open(args, create=False)
    if args.gc:
        counts = reg.gc()
        print(f"removed {counts['staging']} staging dir(s) and {counts['objects']} unreferenced object(s)")
    problems = reg.verify()
    for p in problems:
        print(p)
    print("store intact" if not problems else f"{len(problems)} corrupted model(s)")
    return 0 if not problems else 2


# ---------------------------------------------------------------------- images
def cmd_image_create(args: argparse.Namespace) -> int:
    from .image import AccelContainerImage, Image

    props = _kv(args.property, "--property")
    if args.format:
        props["format"] = args.format
    if args.vector_precision:
        props["vector_precision"] = args.vector_precision
    cfg = AccelContainerImage.image_configuration(tags=_kv(args.tag, "--tag") or None, properties=props or None,
                                                  description=args.description)
    im = Image.create(_open(args, create=False), args.name, [args.model], cfg)
    im.wait_for_creation(show_output=args.show_output)
    print(f"{im.id} {im.path}")
    return 0


def cmd_image_list(args: argparse.Namespace) -> int:
    from .image import Image

    reg = _open_if_any(args)
    images = [] if reg is None else Image.list(reg, name=args.name)
    if args.json:
        _print_json([i.serialize() for i in images])
    elif not images:
        print("no images")
    else:
        for i in images:
            print(f"{i.id:<32} model {i.model_id:<36} {i.path}")
    return 0


def cmd_image_show(args: argparse.Namespace) -> int:
    from .image import Image

    _print_json(Image(_open(args, create=False), args.id).serialize())
    return 0


def cmd_image_delete(args: argparse.Namespace) -> int:
    from .image import Image

    im = Image(_open(args, create=False), args.id)
    im.delete()
    print(f"deleted image {im.id}")
    return 0


# ---------------------------------------------------------------------- deployments
def _finish_deploy(svc: Any, args: argparse.Namespace) -> int:
    from .webservice import DeploymentError

    if svc.compute_type == "local" and not args.no_wait:
        try:
            svc.wait_for_deployment(show_output=not args.quiet, timeout=args.timeout)
        except DeploymentError as e:
            print(f"bfpaccel: error: {e}", file=sys.stderr)
            return 1
    print(f"{svc.name}: {svc.state} {svc.scoring_uri or ''}".rstrip())
    if svc.compute_type != "local":
        print(f"manifests in {svc.workdir}: build and push the image, then kubectl apply -f {svc.workdir} "
              f"(see {os.path.join(svc.workdir, 'README.txt')})")
    if svc.auth_enabled:
        print("keys: bfpaccel deploy show --keys " + svc.name)
    if svc.tls_cert_path:
        print(f"certificate: {svc.tls_cert_path} (clients: GRPC_DEFAULT_SSL_ROOTS_FILE_PATH={svc.tls_cert_path})")
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from .webservice import LocalTarget, LocalWebservice, Webservice

    cfg = LocalWebservice.deploy_configuration(port=args.port, auth_enabled=args.auth, ssl_enabled=args.ssl,
                                               ssl_cert_pem_file=args.ssl_cert, ssl_key_pem_file=args.ssl_key,
                                               ssl_cname=args.ssl_cname, workers=args.workers,
                                               metrics_port=args.metrics_port)
    svc = Webservice.deploy_from_image(_open(args, create=False), args.name, args.image, cfg, LocalTarget())
    return _finish_deploy(svc, args)


def cmd_deploy_k8s(args: argparse.Namespace) -> int:
    from .webservice import AksWebservice, KubernetesTarget, Webservice

    cfg = AksWebservice.deploy_configuration(
        autoscale_enabled=args.autoscale, autoscale_min_replicas=args.min_replicas,
        autoscale_max_replicas=args.max_replicas, autoscale_target_utilization=args.target_utilization,
        num_replicas=args.replicas, auth_enabled=args.auth, cpu_cores=args.cpu, memory_gb=args.memory_gb,
        ssl_enabled=args.ssl, ssl_cert_pem_file=args.ssl_cert, ssl_key_pem_file=args.ssl_key,
        ssl_cname=args.ssl_cname, workers=args.workers)
    target = KubernetesTarget(args.output_dir, namespace=args.namespace, image_registry=args.image_registry,
                              service_type=args.service_type)
    svc = Webservice.deploy_from_image(_open(args, create=False), args.name, args.image, cfg, target)
    args.no_wait = True
    return _finish_deploy(svc, args)


def cmd_deploy_kserve(args: argparse.Namespace) -> int:
    """Write the KServe manifests (nothing is recorded in a registry: they are plain files)."""
    from ..serve.config import ServerConfig
    from .kserve import KServeDeployment, write_kserve

    d = KServeDeployment(args.name, args.storage_uri, args.image, namespace=args.namespace,
                         runtime_name=args.runtime_name, deployment_mode=args.deployment_mode,
                         autoscaler=args.autoscaler, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                         scale_metric=args.scale_metric, scale_target=args.scale_target,
                         canary_percent=args.canary_percent, prometheus_url=args.prometheus_url,
                         prometheus_query=args.prometheus_query, serverless_port=args.serverless_port,
                         cpu=args.cpu, memory_gb=args.memory_gb,
                         server=ServerConfig.from_args(args, per_deployment=False))
    paths = write_kserve(d, args.out)
    if paths:
        for path in paths:
            print(path)
        print(f"kubectl apply -f {args.out}   (see {os.path.join(args.out, 'README.txt')})")
    return 0


def cmd_deploy_list(args: argparse.Namespace) -> int:
    from .webservice import Webservice

    reg = _open_if_any(args)
    services = [] if reg is None else Webservice.list(reg)
    if args.json:
        _print_json([s.serialize() for s in services])
    elif not services:
        print("no services")
    else:
        for s in services:
            print(f"{s.name:<24} {s.compute_type:<10} {s.state:<13} {s.image_id:<28} {s.scoring_uri or ''}")
    return 0


def cmd_deploy_show(args: argparse.Namespace) -> int:
    from .webservice import Webservice

    svc = Webservice(_open(args, create=False), args.name)
    info = svc.serialize()
    if args.keys:
        info["keys"] = list(svc.get_keys())
    _print_json(info)
    return 0


def cmd_deploy_delete(args: argparse.Namespace) -> int:
    from .webservice import Webservice

    svc = Webservice(_open(args, create=False), args.name)
    svc.delete()
    print(f"deleted service {svc.name}" + ("" if svc.compute_type == "local"
                                           else f" (kubectl delete -f {svc.workdir} removes it from the cluster)"))
    return 0


# ---------------------------------------------------------------------- parsers
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=None, metavar="PATH",
                   help=f"workspace directory (default: $BFPACCEL_REGISTRY or ./{DEFAULT_REGISTRY})")


def _set(p: argparse.ArgumentParser, fn: Callable[[argparse.Namespace], int]) -> None:
    p.set_defaults(fn=_guarded(fn))


def _tls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--auth", action="store_true", help="key auth: two keys are generated (deploy show --keys)")
    p.add_argument("--ssl", action="store_true", help="TLS (a self-signed certificate unless --ssl-cert/--ssl-key)")
    p.add_argument("--ssl-cert", default=None, metavar="PEM", help="certificate chain for --ssl")
    p.add_argument("--ssl-key", default=None, metavar="PEM", help="private key for --ssl")
    p.add_argument("--ssl-cname", default=None, help="extra host name in a generated certificate")
    p.add_argument("--workers", type=int, default=None, help="model instances in the server")


def add_registry_parsers(subparsers: Any) -> None:
    """Add ``registry``, ``image`` and ``deploy`` to a ``bfpaccel`` argparse subparsers
    object; each leaf sets ``fn`` (call ``args.fn(args)``, it returns the exit status).

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser(); add_registry_parsers(p.add_subparsers(dest="command"))
        >>> p.parse_args(["registry", "list"]).fn.__name__
        'run'
    """
    from ..serve.cli import port_number

    # registry
    r = subparsers.add_parser("registry", help="register, list, show and delete models",
                              description="The local model registry (the seed's Model.register / Model.list).")
    rs = r.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    p = rs.add_parser("register", help="copy a model file or directory in as the next version",
                      description="Copy a file (.onnx, .pb, .bfpplan) or a directory (SavedModel) into the "
                      "registry; prints the new id name:version.")
    _common(p)
    p.add_argument("path", help="model file or directory")
    p.add_argument("--name", required=True, help="model name (letters, digits, . _ -)")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="tag (repeatable)")
    p.add_argument("--property", action="append", metavar="KEY=VALUE", help="property (repeatable)")
    p.add_argument("--description", default=None)
    _set(p, cmd_registry_register)
    p = rs.add_parser("list", help="registered models", description="List models, oldest first.")
    _common(p)
    p.add_argument("--name", default=None, help="only this model name")
    p.add_argument("--tag", action="append", metavar="KEY[=VALUE]", help="only models with this tag (repeatable)")
    p.add_argument("--latest", action="store_true", help="only the newest version of each name")
    p.add_argument("--json", action="store_true", help="JSON output")
    _set(p, cmd_registry_list)
    p = rs.add_parser("show", help="one model's record", description="Print a model's record as JSON.")
    _common(p)
    p.add_argument("id", help="name:version, or name for the latest")
    p.add_argument("--verify", action="store_true", help="also re-hash its files")
    _set(p, cmd_registry_show)
    p = rs.add_parser("delete", help="unregister a model version",
                      description="Refused while a converted model or an image depends on it "
                      "(delete services, images, converted models, then models).")
    _common(p)
    p.add_argument("id", help="name:version")
    _set(p, cmd_registry_delete)
    p = rs.add_parser("verify", help="re-hash every stored model",
                      description="Check every model's files against their SHA-256; --gc also removes "
                      "leftovers of crashed registrations.")
    _common(p)
    p.add_argument("--gc", action="store_true", help="remove unreferenced objects and dead staging dirs first")
    _set(p, cmd_registry_verify)

    # images
    im = subparsers.add_parser("image", help="create deployable images (bundles) from converted models",
                               description="The seed's AccelContainerImage / Image.create, as a local bundle "
                               "directory (BFP plan, server config, Dockerfile, pinned requirements).")
    ims = im.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    p = ims.add_parser("create", help="compile a converted model into an image bundle",
                       description="Compile one converted model (.onnx, or a .bfpplan) and write the bundle.")
    _common(p)
    p.add_argument("--name", required=True, help="image name")
    p.add_argument("--model", required=True, help="converted model id (name:version)")
    p.add_argument("--format", default=None, help="BFP format of the plan (default msfp16)")
    p.add_argument("--vector-precision", default=None, help="fp16 (default), bf16 or fp32")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="tag (repeatable)")
    p.add_argument("--property", action="append", metavar="KEY=VALUE", help="property (repeatable)")
    p.add_argument("--description", default=None)
    p.add_argument("--show-output", action="store_true", help="print the build log")
    _set(p, cmd_image_create)
    p = ims.add_parser("list", help="images")
    _common(p)
    p.add_argument("--name", default=None)
    p.add_argument("--json", action="store_true")
    _set(p, cmd_image_list)
    p = ims.add_parser("show", help="one image's record")
    _common(p)
    p.add_argument("id", help="name:version, or name for the latest")
    _set(p, cmd_image_show)
    p = ims.add_parser("delete", help="delete an image (refused while a service uses it)")
    _common(p)
    p.add_argument("id", help="name:version")
    _set(p, cmd_image_delete)

    # deployments
    d = subparsers.add_parser("deploy", help="run an image as a gRPC service (local) or write k8s manifests",
                              description="The seed's Webservice.deploy_from_image: a local server on "
                              "127.0.0.1, or Kubernetes manifests for kubectl apply.")
    ds = d.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    p = ds.add_parser("local", help="start a local gRPC service (python -m bfpaccel.serve)",
                      description="Start the server in the background on 127.0.0.1 and wait until its health "
                      "check says SERVING; it keeps running after this command returns.")
    _common(p)
    p.add_argument("--name", required=True, help="service name (also the route name)")
    p.add_argument("--image", required=True, help="image id (name:version, or name for the latest)")
    p.add_argument("--port", type=port_number, default=None, help="port (default: a free one)")
    p.add_argument("--metrics-port", type=port_number, default=None, help="Prometheus metrics port")
    _tls_options(p)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for health (default 120)")
    p.add_argument("--no-wait", action="store_true", help="return without waiting for health")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    _set(p, cmd_deploy_local)
    p = ds.add_parser("k8s", help="write Kubernetes manifests (Deployment, Service, HPA, Secret)",
                      description="Write manifests for kubectl apply; nothing contacts a cluster.")
    _common(p)
    p.add_argument("--name", required=True, help="service name")
    p.add_argument("--image", required=True, help="image id (name:version, or name for the latest)")
    p.add_argument("--output-dir", required=True, help="manifests go to OUTPUT_DIR/NAME/")
    p.add_argument("--namespace", default="default")
    p.add_argument("--image-registry", default="localhost:5000", help="where the container image is pushed")
    p.add_argument("--service-type", default="LoadBalancer", choices=["LoadBalancer", "ClusterIP", "NodePort"])
    p.add_argument("--replicas", type=int, default=1, help="fixed replicas (without --autoscale)")
    p.add_argument("--autoscale", action="store_true", help="HorizontalPodAutoscaler on CPU")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=10)
    p.add_argument("--target-utilization", type=int, default=70, help="CPU percent (default 70)")
    p.add_argument("--cpu", type=float, default=1.0, help="CPU cores requested (default 1)")
    p.add_argument("--memory-gb", type=float, default=2.0, help="memory requested in GiB (default 2)")
    _tls_options(p)
    _set(p, cmd_deploy_k8s)
    _add_kserve_parser(ds)
    p = ds.add_parser("list", help="services and their states")
    _common(p)
    p.add_argument("--json", action="store_true")
    _set(p, cmd_deploy_list)
    p = ds.add_parser("show", help="one service's record")
    _common(p)
    p.add_argument("name")
    p.add_argument("--keys", action="store_true", help="include the auth keys (only this command shows them; they "
                   "are kept in the registry's deployments/NAME/auth-keys, mode 0600)")
    _set(p, cmd_deploy_show)
    p = ds.add_parser("delete", help="stop a service and remove its record")
    _common(p)
    p.add_argument("name")
    _set(p, cmd_deploy_delete)


def _positive_float(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _add_kserve_parser(ds: Any) -> None:
    """``deploy kserve``: its own flags, then the server's tunable options generated from
    :class:`~bfpaccel.serve.config.ServerConfig` (the per-deployment ones are set by KServe)."""
    from ..serve.config import add_server_arguments
    from .kserve import SCALE_METRICS

    p = ds.add_parser(
        "kserve", help="write KServe manifests (ClusterServingRuntime, InferenceService, autoscaler)",
        description="Write a ClusterServingRuntime for the model format bfpplan (bfpaccel serve with REST on 8080 "
        "and gRPC on 8081 named h2c), an InferenceService for one model, and an autoscaler that follows the "
        "server's queue depth or in-flight requests instead of CPU: a KEDA ScaledObject (default), an "
        "autoscaling/v2 HPA on a custom metric, or Knative's concurrency autoscaler (--deployment-mode "
        "serverless, which also allows --canary-percent). Nothing contacts a cluster. The server options "
        "below go to the predictor's container args.")
    k = p.add_argument_group("KServe deployment")
    k.add_argument("--name", required=True, help="InferenceService name (lowercase letters, digits, '-')")
    k.add_argument("--storage-uri", required=True, metavar="URI",
                   help="where KServe fetches the model: a .bfpplan or version folders 1/, 2/ holding one "
                   "(s3://, gs://, pvc://, https://...)")
    k.add_argument("--image", required=True, help="container image with bfpaccel installed")
    k.add_argument("--out", default="-", metavar="DIR|-",
                   help="write the manifests and a README into DIR, or '-' (default): one YAML stream on stdout")
    k.add_argument("--namespace", default="default", metavar="NS",
                   help="namespace of the InferenceService (default default)")
    k.add_argument("--runtime-name", default="bfpaccel", metavar="NAME",
                   help="ClusterServingRuntime name (default bfpaccel)")
    k.add_argument("--deployment-mode", choices=["raw", "serverless"], default="raw",
                   help="raw: a Kubernetes Deployment scaled by KEDA or an HPA (default); serverless: Knative "
                   "(concurrency autoscaling, scale to zero, canary traffic)")
    k.add_argument("--autoscaler", choices=["keda", "hpa", "kpa", "none"], default=None,
                   help="keda: a KEDA ScaledObject with a Prometheus trigger (default in raw mode); hpa: an "
                   "autoscaling/v2 HPA on a Pods custom metric (needs a Prometheus adapter); none: fixed "
                   "--min-replicas; kpa: Knative's autoscaler (serverless mode)")
    k.add_argument("--min-replicas", type=int, default=1, metavar="N",
                   help="fewest replicas (default 1; 0 only with serverless)")
    k.add_argument("--max-replicas", type=int, default=4, metavar="N", help="most replicas (default 4)")
    k.add_argument("--scale-metric", choices=sorted(SCALE_METRICS), default=None,
                   help="queue_depth: requests waiting for a worker (bfpaccel_queue_depth; the default in raw "
                   "mode); inflight: requests being computed (bfpaccel_inflight_requests; Knative's concurrency, "
                   "the only choice in serverless mode)")
    k.add_argument("--scale-target", type=_positive_float, default=None, metavar="X",
                   help="target of the metric per pod (default: 2 waiting requests, or --workers in flight)")
    k.add_argument("--canary-percent", type=int, default=None, metavar="P",
                   help="share of traffic (0..100) for the newest revision while it rolls out (serverless only)")
    k.add_argument("--prometheus-url", default="http://prometheus-operated.monitoring.svc:9090", metavar="URL",
                   help="Prometheus that KEDA queries (default http://prometheus-operated.monitoring.svc:9090)")
    k.add_argument("--prometheus-query", default=None, metavar="PROMQL",
                   help="KEDA's query (default: the metric summed over this service's predictor pods)")
    k.add_argument("--serverless-port", choices=["grpc", "rest"], default="grpc",
                   help="the one port Knative routes: grpc (8081, h2c; default) or rest (8080)")
    k.add_argument("--cpu", type=_positive_float, default=1.0, metavar="CORES",
                   help="CPU cores requested and limited (default 1; --threads defaults to it, rounded down)")
    k.add_argument("--memory-gb", type=_positive_float, default=2.0, metavar="GIB", help="memory in GiB (default 2)")
    add_server_arguments(p, per_deployment=False)
    _set(p, cmd_deploy_kserve)
