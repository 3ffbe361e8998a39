"""``serve()``: the server for compiled plans -- a :class:`~bfpaccel.serve.core.ServingCore`
(models, versions, workers, queue, auth, readiness) with protocol faces on top: TF Serving's
gRPC ``PredictionService`` (:mod:`bfpaccel.serve.tfs_grpc`, the seed's scoring service) on
``port``.

One port serves one or several plans.  The AML front end's route header
``x-ms-aml-grpc-service-route: /api/v1/service/<name>`` picks the plan; with no header (or an
empty name, which the seed's client sends when it has no service name) the single plan is
served, as on the edge box.  Inputs are a DT_STRING batch of encoded images keyed by the alias
(``images``) or the tensor name (``Placeholder:0``), or a float tensor keyed by the plan's input
name; outputs are float32 in ``float_val`` keyed by tensor name and by alias.  Only the wire
messages are needed (``bfpaccel.serve._protos``), never TensorFlow.

Status codes: INVALID_ARGUMENT (bad image, image over a size limit, dtype, shape,
input/output/signature name), NOT_FOUND (unknown model name, version or route), UNAUTHENTICATED
(auth on and the key missing or wrong), RESOURCE_EXHAUSTED (message over
``max_message_bytes``, queue full, out of memory), UNAVAILABLE (warming up, shutting down),
DEADLINE_EXCEEDED (deadline passed in the queue), UNIMPLEMENTED (Classify, Regress,
MultiInference), INTERNAL (a bug: logged with its traceback).

Hostile input: an input tensor's dtype, rank, shape and value count are checked with Python
integers against the model's input (and ``max_batch``) before any value is decoded or a
broadcast value expanded (:func:`decode_input`).  Encoded images are checked from their header
against ``max_image_pixels`` and ``max_resize_pixels`` before decoding, and are decoded inside a
worker slot, so at most ``workers`` images per plan are decoded at once.

Example:
    >>> h = serve({"resnet50": "resnet50.bfpplan"}, port=0)  # doctest: +SKIP
    >>> PredictionClient("127.0.0.1", h.port, service_name="resnet50").score_file("cat.jpg")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent import futures
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import grpc

from . import _protos as pb
from ..preprocess import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_RESIZE_PIXELS
from .core import (DEFAULT_MAX_MESSAGE_BYTES, Code, ServingCore, ServingError, VersionState, element_limit)
from .metrics import Metrics, MetricsServer
from .tfs_grpc import ROUTE_HEADER, ROUTE_PREFIX, SIGNATURES, PredictionServiceFace, decode_input

__all__ = ["serve", "ServerHandle", "decode_input", "ROUTE_HEADER", "ROUTE_PREFIX", "DEFAULT_MAX_MESSAGE_BYTES",
           "element_limit", "ServingError", "Code"]

log = logging.getLogger("bfpaccel.serve")

PathLike = Union[str, "os.PathLike[str]"]
#: The error type of the serving core (kept under its old name for callers of ``decode_input``).
_Abort = ServingError


class ServerHandle:
    """A running server: ``port`` (gRPC), ``http_port``, ``stop(grace)``, ``wait()``, ``ready``,
    ``metrics``, and ``core`` (the :class:`~bfpaccel.serve.core.ServingCore`: models, versions).

    Example:
        >>> h = serve("tiny.bfpplan", port=0); h.port > 0  # doctest: +SKIP
        True
        >>> h.stop(grace=5)  # doctest: +SKIP
    """

    def __init__(self, server: grpc.Server, port: int, core: ServingCore, health: Any,
                 metrics_server: Optional[MetricsServer], http: Any = None) -> None:
        self._server = server
        self.port: int = port
        self.core = core
        self._health = health
        self._metrics_server = metrics_server
        self._http = http
        self.http_port: Optional[int] = http.port if http is not None else None
        self.metrics_port: Optional[int] = metrics_server.port if metrics_server else None
        self.metrics: Metrics = core.metrics
        self._stopped = threading.Event()
        self._extra_stops: List[Any] = []
        self._reload: Optional[Any] = None

    def reload(self) -> Any:
        """Rescans the model folder now: loads new versions, then unloads retired ones (no
        failed request); returns what changed.  Only for servers started with ``model_root``."""
        if self._reload is None:
            raise RuntimeError("this server was not started with model_root; there is nothing to reload")
        return self._reload()

    @property
    def ready(self) -> bool:
        """True once every model is loaded and warmed up."""
        return self.core.is_ready()

    @property
    def routes(self) -> List[str]:
        """The model (route, service) names served."""
        return list(self.core.models)

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the initial load has finished; raises RuntimeError when a plan failed to load."""
        ok = self.core.ready.wait(timeout)
        errs = self.core.errors()
        if errs:
            raise RuntimeError(f"plans failed to load: {errs}")
        return ok

    def on_stop(self, fn: Any) -> None:
        """Calls ``fn()`` when the server stops (model-folder watchers, batchers)."""
        self._extra_stops.append(fn)

    def stop(self, grace: Optional[float] = 10.0) -> None:
        """Stops taking requests, lets the in-flight ones finish (up to ``grace`` s), shuts down."""
        if self._stopped.is_set():
            return
        self.core.stopping = True
        for fn in self._extra_stops:
            try:
                fn()
            except Exception:
                log.exception("stop hook failed")
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._http is not None:
            self._http.stop(grace)
        self._server.stop(grace).wait()
        self.core.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self._stopped.set()
        log.info("server on port %d stopped", self.port)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the server has stopped (or ``timeout``); True when it has."""
        return not self._server.wait_for_termination(timeout)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop(grace=1.0)


def _health_updater(health: Any) -> Any:
    """A core change listener that mirrors model availability into grpc.health.v1."""
    from grpc_health.v1 import health_pb2

    ok = health_pb2.HealthCheckResponse.SERVING
    bad = health_pb2.HealthCheckResponse.NOT_SERVING

    def update(core: ServingCore) -> None:
        if core.stopping:
            return
        ready = core.is_ready()
        for svc in ("", pb.SERVICE, pb.MODEL_SERVICE, pb.V2_SERVICE):
            health.set(svc, ok if ready else bad)
        for name in list(core.models):
            health.set(name, ok if core.model_ready(name) else bad)
    return update


def _read_pem(v: Union[bytes, PathLike]) -> bytes:
    if isinstance(v, bytes):
        return v
    with open(v, "rb") as f:
        return f.read()


def _add_to_pool(file_descriptor: Any) -> None:
    from google.protobuf import descriptor_pb2

    try:
        pb.POOL.FindFileByName(file_descriptor.name)
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(fdp)
    for dep in file_descriptor.dependencies:
        _add_to_pool(dep)
    pb.POOL.Add(fdp)


def _models_text(core: ServingCore, folder_models: Mapping[str, Sequence[int]],
                 model_root: Optional[PathLike]) -> str:
    """The startup log's list of models: every plan given and every model of the model folder,
    each with its versions (``tiny (version 1), m (versions 1, 2; --model-root models)``)."""
    parts = []
    for name in sorted(core.models):
        versions = sorted(folder_models.get(name) or core.models[name].versions)
        text = f"{name} (version{'s' if len(versions) != 1 else ''} {', '.join(str(v) for v in versions)}"
        if name in folder_models and model_root is not None:
            text += f"; --model-root {os.fspath(model_root)}"
        parts.append(text + ")")
    return ", ".join(parts) or "no models"


def serve(plans: Union[Mapping[str, Any], PathLike, Any, None], port: int = 50051, host: str = "127.0.0.1",
          tls_cert: Optional[Union[bytes, PathLike]] = None, tls_key: Optional[Union[bytes, PathLike]] = None,
          auth_keys: Optional[Sequence[str]] = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
          workers: int = 2, queue_size: int = 64, metrics_port: Optional[int] = None, warmup: bool = True, *,
          versions: Optional[Mapping[str, int]] = None, num_threads: Optional[int] = None,
          kernel: Optional[str] = None, block: bool = True,
          max_batch: int = 64, warmup_delay_s: float = 0.0, simulated_latency_ms: float = 0.0,
          reflection: bool = True, health: bool = True,
          max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
          max_resize_pixels: Optional[int] = DEFAULT_MAX_RESIZE_PIXELS,
          http_port: Optional[int] = None, max_body_bytes: Optional[int] = None, max_connections: int = 256,
          max_header_bytes: int = 64 * 1024, body_timeout_s: float = 30.0,
          batching: bool = False, max_batch_size: int = 8, batch_timeout_ms: float = 2.0,
          preferred_batch_sizes: Optional[Sequence[int]] = None,
          model_root: Optional[PathLike] = None, model_name: Optional[str] = None,
          version_policy: Optional[str] = None, version_labels: Optional[Mapping[str, int]] = None,
          poll_seconds: float = 0.0, synthetic_warmup: int = 1,
          warmup_file: Optional[PathLike] = None) -> ServerHandle:
    """Starts the server on ``host:port`` (gRPC) and ``host:http_port`` (REST) for one or
    several plans; returns at once when ``block`` is False, else once the plans are loaded and
    warm.

    Args:
        plans: a plan path (served under its file stem, and with no route header) or a dict
            route name -> plan path (``x-ms-aml-grpc-service-route: /api/v1/service/<name>``).
        port: TCP port (0: pick a free one; see ``ServerHandle.port``).
        host: interface to bind ("0.0.0.0" for every interface).
        tls_cert, tls_key: PEM certificate chain and private key (paths or bytes): TLS on.
        auth_keys: accepted keys; when given, every call needs ``authorization: Bearer <key>``
            (``bearer <key>`` and the raw key are accepted too).
        max_message_bytes: largest request and response (gRPC's default is 4 MiB).
        workers: model instances per plan that run at the same time.
        queue_size: requests that may wait for a worker before RESOURCE_EXHAUSTED.
        metrics_port: serve Prometheus metrics at ``http://host:metrics_port/metrics`` (0: any port).
        warmup: run each model once before answering (the first call lowers the plan).
        versions: route name -> model version reported and checked against model_spec (default 1).
        num_threads: threads of the C++ core for each model session (``Session(num_threads=)``:
            the session's own option, the process setting untouched; ``None``: the process setting).
        kernel: the kernel of each model session (``Session(kernel=)``; ``None``: the process
            setting).  ``num_threads`` and ``kernel`` are checked here (ValueError naming the
            valid values) before anything starts.
        block: wait until every plan is loaded (raises RuntimeError if one fails to load).
        max_batch: most images (or rows) in one request.
        warmup_delay_s: extra UNAVAILABLE time at start (the seed's FPGA-flashing phase).
        simulated_latency_ms: added to each model call (an accelerator's latency, for demos/tests).
        reflection, health: register gRPC server reflection and grpc.health.v1.Health.
        max_image_pixels: largest declared width x height of an encoded image, checked from the
            header before decoding (default 8192 x 8192 = 64 Mi pixels, 192 MiB decoded);
            ``None``: no limit.  Over it: INVALID_ARGUMENT naming the limit.
        max_resize_pixels: largest full size of the seed's resize before its crop (default
            16 Mi pixels: aspect ratios up to 256:1); ``None``: no limit.  Images are decoded
            inside a worker slot, so at most ``workers`` are decoded at once per plan.
        http_port: serve the REST faces (TF Serving REST ``/v1/...`` and KServe v2 ``/v2/...``)
            and ``/metrics`` on this port (0: any free port; ``None``: no HTTP).
        max_body_bytes: largest HTTP request body (default ``max_message_bytes``; over it: 413).
        max_connections: concurrent HTTP connections (over it: 503).
        max_header_bytes: largest HTTP request head.
        body_timeout_s: seconds an HTTP client has to send a request head, and then the whole
            body (a client that stalls or trickles them holds a connection no longer): 408 and
            the connection closed.
        batching: dynamic batching -- requests to one model arriving within
            ``batch_timeout_ms`` run as one batch of at most ``max_batch_size`` rows
            (``preferred_batch_sizes``: sizes worth waiting for); each row's result is
            bit-identical to running it alone.  Off by default: the NPU's point is batch 1.
        model_root: a model folder ``<root>/<name>/<version>/`` (each version holding a plan),
            or with ``model_name`` a single model's folder (KServe's ``/mnt/models``).
        version_policy: ``latest`` / ``latest:N`` / ``all`` / ``specific:1,2`` (default latest:1).
        version_labels: label -> version (``model_spec.version_label``, ``/labels/<l>``).
        poll_seconds: rescan ``model_root`` this often and load/unload versions without a
            restart (0: only on ``ServerHandle.reload()``).
        synthetic_warmup: warm-up calls with a zero input per worker (default 1; 0: none);
            a version folder's ``assets.extra/tf_serving_warmup_requests`` (TF Serving's
            PredictionLog TFRecord file) is replayed instead when present, or ``warmup_file``.
        warmup_file: warm-up records (a TF Serving ``tf_serving_warmup_requests`` file)
            replayed on every version that has none of its own, plans given directly included.

    Example:
        >>> h = serve({"a": "a.bfpplan", "b": "b.bfpplan"}, port=0)  # doctest: +SKIP
        >>> h.port, h.routes  # doctest: +SKIP
        (40123, ['a', 'b'])
    """
    from ..runtime.plan import Plan

    if plans is None:
        if model_root is None:
            raise ValueError("give plans or model_root")
        items: Dict[str, Any] = {}
    elif isinstance(plans, Mapping):
        items = dict(plans)
    elif isinstance(plans, Plan):
        items = {"model": plans}
    else:
        stem = os.path.basename(os.fspath(plans)).split(".")[0] or "model"
        items = {stem: plans}
    if not items and model_root is None:
        raise ValueError("no plans to serve")
    for name, path in items.items():
        if not name or "/" in name:
            raise ValueError(f"route name {name!r} must be non-empty and contain no '/'")
        if not isinstance(path, Plan) and not os.path.exists(os.fspath(path)):
            raise FileNotFoundError(f"plan {os.fspath(path)!r} (route {name!r}) does not exist")
    if workers < 1 or queue_size < 0 or max_batch < 1:
        raise ValueError("workers and max_batch must be >= 1, queue_size >= 0")
    if isinstance(synthetic_warmup, bool) or not isinstance(synthetic_warmup, int) or synthetic_warmup < 0:
        raise ValueError(f"synthetic_warmup must be an integer >= 0, got {synthetic_warmup!r}")
    if warmup_file is not None and not os.path.isfile(os.fspath(warmup_file)):
        raise FileNotFoundError(f"warm-up file {os.fspath(warmup_file)!r} does not exist")
    from .. import core as _core

    kernel = _core.check_kernel(kernel)
    if num_threads is not None:
        num_threads = _core.check_num_threads(num_threads)
    from ..preprocess import _check_limit

    max_image_pixels = _check_limit("max_image_pixels", max_image_pixels)
    max_resize_pixels = _check_limit("max_resize_pixels", max_resize_pixels)
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both tls_cert and tls_key")
    versions = dict(versions or {})
    core = ServingCore(list(auth_keys or []), workers, queue_size, max_batch, max(1, int(max_message_bytes)),
                       max_image_pixels, max_resize_pixels, num_threads, kernel, simulated_latency_ms / 1000.0)
    for n, p in items.items():
        core.add_version(n, int(versions.get(n, 1)), p if isinstance(p, Plan) else os.fspath(p))
    folder = None
    folder_models: Dict[str, List[int]] = {}
    if model_root is not None:  # <root>/<name>/<version>/ folders, a version policy, hot reload
        from .lifecycle import ModelFolder

        folder = ModelFolder(core, model_root, model_name=model_name, version_policy=version_policy,
                             version_labels=version_labels, poll_seconds=poll_seconds,
                             synthetic_warmup=synthetic_warmup, warmup_file=warmup_file, warmup=warmup)
        folder_models = folder.register()  # adds the versions found now (loaded by initial_load below)
    if batching:
        from .batching import Batcher

        core.batcher = Batcher(core, max_batch_size=max_batch_size, timeout_s=batch_timeout_ms / 1000.0,
                               preferred_batch_sizes=preferred_batch_sizes)
    face = PredictionServiceFace(core)
    threads = workers + queue_size + 8
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bfpaccel-grpc"),
        options=[("grpc.max_receive_message_length", int(max_message_bytes)),
                 ("grpc.max_send_message_length", int(max_message_bytes)),
                 ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=threads)

    def unary(fn: Any) -> grpc.RpcMethodHandler:
        # no request deserializer: gRPC answers a deserializer's exception INTERNAL; the face
        # parses the bytes itself (INVALID_ARGUMENT, counted and logged)
        return grpc.unary_unary_rpc_method_handler(fn, response_serializer=lambda m: m.SerializeToString())

    def unimplemented(name: str) -> grpc.RpcMethodHandler:
        def fn(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented; this service only "
                          "supports Predict and GetModelMetadata")
            return b""
        return grpc.unary_unary_rpc_method_handler(fn)

    handlers = {"Predict": unary(face.predict), "GetModelMetadata": unary(face.get_model_metadata)}
    handlers.update({n: unimplemented(n) for n in pb.UNIMPLEMENTED_METHODS})
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(pb.SERVICE, handlers),))
    names = [pb.SERVICE]
    # the other gRPC faces share the port: TF Serving's ModelService and KServe v2
    from .tfs_grpc import add_model_service

    names += add_model_service(server, core)
    from .v2_grpc import add_v2_service

    names += add_v2_service(server, core)

    health_servicer = None
    if health:
        try:
            from grpc_health.v1 import health as health_mod, health_pb2, health_pb2_grpc

            health_servicer = health_mod.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            for svc in ["", pb.SERVICE, pb.MODEL_SERVICE, pb.V2_SERVICE, *items]:
                health_servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
            core.on_change(_health_updater(health_servicer))
            names.append(health_mod.SERVICE_NAME)
            _add_to_pool(health_pb2.DESCRIPTOR)
        except ImportError:
            log.warning("grpcio-health-checking is not installed: no grpc.health.v1 service")
    if reflection:
        try:
            from grpc_reflection.v1alpha import reflection as refl, reflection_pb2

            _add_to_pool(reflection_pb2.DESCRIPTOR)
            names.append(refl.SERVICE_NAME)
            refl.enable_server_reflection(names, server, pool=pb.POOL)
        except ImportError:
            log.warning("grpcio-reflection is not installed: no server reflection")

    address = f"{host}:{port}" if ":" not in host or host.startswith("[") else f"[{host}]:{port}"
    if tls_cert is not None:
        creds = grpc.ssl_server_credentials([(_read_pem(tls_key), _read_pem(tls_cert))])  # type: ignore[arg-type]
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"could not bind {address}")
    http = None
    if http_port is not None:  # TF Serving REST + KServe v2 REST + /metrics on one HTTP port
        from .http import HttpServer

        try:
            http = HttpServer(core, host=host, port=http_port, tls_cert=tls_cert, tls_key=tls_key,
                              max_body_bytes=int(max_body_bytes or max_message_bytes),
                              max_connections=max_connections, max_header_bytes=max_header_bytes,
                              body_timeout_s=body_timeout_s)
        except BaseException:
            server.stop(0)
            core.stop()
            raise
    try:
        metrics_server = MetricsServer(core.metrics, metrics_port, host) if metrics_port is not None else None
    except BaseException:
        if http is not None:
            http.stop(0)
        server.stop(0)
        core.stop()
        raise
    server.start()
    handle = ServerHandle(server, bound, core, health_servicer, metrics_server, http)
    if folder is not None:
        handle._reload = folder.sync
        handle.on_stop(folder.stop)
        threading.Thread(target=lambda: (core.ready.wait(), folder.start()), name="bfpaccel-watch",
                         daemon=True).start()
    log.info("serving %s on %s:%d (%s%s)", _models_text(core, folder_models, model_root), host, bound,
             "TLS" if tls_cert is not None else "plaintext", ", auth on" if core.auth_keys else "")
    from .lifecycle import initial_load

    loader = threading.Thread(target=initial_load, args=(core, folder), name="bfpaccel-load", daemon=True,
                              kwargs=dict(warmup=warmup, warmup_delay_s=warmup_delay_s,
                                          synthetic_warmup=synthetic_warmup, warmup_file=warmup_file))
    loader.start()
    if block:
        try:
            handle.wait_ready()
        except RuntimeError:
            handle.stop(grace=0)
            raise
    return handle
