"""gRPC ``tensorflow.serving.PredictionService`` for compiled plans (the seed's scoring service).

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

import hmac
import json
import logging
import math
import os
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import grpc
import numpy as np

from . import _protos as pb
from ..preprocess import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_RESIZE_PIXELS, ImageTooLargeError
from .codec import CodecError, check_tensor, float_tensor_proto, make_ndarray, numpy_dtype, tensor_shape
from .metrics import Metrics, MetricsServer

__all__ = ["serve", "ServerHandle", "decode_input", "ROUTE_HEADER", "ROUTE_PREFIX", "DEFAULT_MAX_MESSAGE_BYTES"]

log = logging.getLogger("bfpaccel.serve")
access_log = logging.getLogger("bfpaccel.serve.access")

ROUTE_HEADER = "x-ms-aml-grpc-service-route"
ROUTE_PREFIX = "/api/v1/service/"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SIGNATURES = ("", "serving_default", "predict")
PathLike = Union[str, "os.PathLike[str]"]


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(msg: str) -> _Abort:
    return _Abort(grpc.StatusCode.INVALID_ARGUMENT, msg)


def _shape_text(want: Sequence[Optional[int]]) -> List[Any]:
    return ['N' if w is None else w for w in want]


def element_limit(input_shape: Optional[Sequence[Optional[int]]], max_batch: int, fallback: int) -> int:
    """Most elements a float input may have: ``max_batch`` x the fixed dimensions when only the
    batch dimension is free, else ``fallback``."""
    if input_shape is None or any(d is None for d in list(input_shape)[1:]):
        return fallback
    dims = list(input_shape)
    if dims and dims[0] is None:
        dims[0] = max_batch
    return min(fallback, math.prod(int(d) for d in dims if d is not None)) if dims else 1


def decode_input(tp: Any, key: str, *, takes_images: bool, input_shape: Optional[Sequence[Optional[int]]],
                 max_batch: int, max_elements: int) -> Tuple[Optional[List[bytes]], Optional[np.ndarray]]:
    """One Predict input -> ``(images, None)`` for a DT_STRING batch of encoded images or
    ``(None, float32 array)``; raises ``_Abort(INVALID_ARGUMENT)`` for every client mistake.

    Everything is checked before values are materialised: dtype, rank (codec ``MAX_RANK``),
    dimensions and element count as Python ints (no overflow), value counts against the shape,
    the shape against the model's ``input_shape`` and ``max_batch``, and at most
    ``max_elements`` elements -- so a single broadcast value is expanded only once the shape is
    known to be the model's.
    """
    if tp.dtype == pb.DT_STRING:
        if not takes_images:
            raise _invalid(f"input {key!r} is DT_STRING but this model takes float tensors of shape "
                           f"{None if input_shape is None else _shape_text(input_shape)}")
        try:
            shape = tensor_shape(tp)
        except CodecError as e:
            raise _invalid(f"input {key!r}: {e}") from None
        if len(shape) > 1:
            raise _invalid(f"input {key!r}: a batch of encoded images has shape [N], got {shape}")
        n = math.prod(shape)
        if n == 0:
            raise _invalid(f"input {key!r} holds no images")
        if n > max_batch:
            raise _invalid(f"input {key!r}: {n} images in one request; the limit is {max_batch}")
        if len(tp.string_val) != n:
            raise _invalid(f"input {key!r}: shape {shape} but {len(tp.string_val)} values in string_val")
        return list(tp.string_val), None
    try:
        if tp.dtype == pb.DT_INVALID:
            raise CodecError("tensor has no dtype (DT_INVALID): an empty or missing TensorProto")
        npdt = numpy_dtype(tp.dtype)
    except CodecError as e:
        raise _invalid(f"input {key!r}: {e}") from None
    if npdt.kind not in "fiu":
        raise _invalid(f"input {key!r} has dtype {pb.DataTypeName.get(tp.dtype)}; send DT_STRING images "
                       "or a numeric tensor (DT_FLOAT preferred)")
    try:
        _, shape, n = check_tensor(tp)  # shape, element count and value count; nothing allocated
    except CodecError as e:
        raise _invalid(f"input {key!r}: {e}") from None
    if input_shape is not None and (len(shape) != len(input_shape) or
                                    any(w is not None and w != d for w, d in zip(input_shape, shape))):
        raise _invalid(f"input {key!r} has shape {shape}; this model expects {_shape_text(input_shape)}")
    if n == 0:
        raise _invalid(f"input {key!r} is empty")
    if shape and shape[0] > max_batch:
        raise _invalid(f"input {key!r}: batch {shape[0]} over the limit {max_batch}")
    if n > max_elements:
        raise _invalid(f"input {key!r} has shape {shape} = {n} elements, over this server's limit of "
                       f"{max_elements}")
    try:
        arr = make_ndarray(tp, max_elements=max_elements)
    except CodecError as e:
        raise _invalid(f"input {key!r}: {e}") from None
    with np.errstate(over="ignore"):  # float64 beyond float32's range -> inf, as a TF cast
        return None, np.ascontiguousarray(arr, dtype=np.float32)


@dataclass
class _Model:
    name: str
    version: int
    path: str
    predictors: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    first: Any = None  # a Predictor, for names and shapes
    error: Optional[str] = None
    plan: Any = None  # an in-memory Plan given to serve() (shares its packed weights)


class ServerHandle:
    """A running server: ``port``, ``stop(grace)``, ``wait()``, ``ready``, ``metrics``.

    Example:
        >>> h = serve("tiny.bfpplan", port=0); h.port > 0  # doctest: +SKIP
        True
        >>> h.stop(grace=5)  # doctest: +SKIP
    """

    def __init__(self, server: grpc.Server, port: int, service: "_PredictionService",
                 health: Any, metrics_server: Optional[MetricsServer]) -> None:
        self._server = server
        self.port: int = port
        self._service = service
        self._health = health
        self._metrics_server = metrics_server
        self.metrics_port: Optional[int] = metrics_server.port if metrics_server else None
        self.metrics: Metrics = service.metrics
        self._stopped = threading.Event()

    @property
    def ready(self) -> bool:
        """True once every plan is loaded and warmed up."""
        return self._service.ready.is_set()

    @property
    def routes(self) -> List[str]:
        """The route (service) names served."""
        return list(self._service.models)

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Blocks until warm-up has finished; raises RuntimeError when a plan failed to load."""
        ok = self._service.ready.wait(timeout)
        errs = {m.name: m.error for m in self._service.models.values() if m.error}
        if errs:
            raise RuntimeError(f"plans failed to load: {errs}")
        return ok

    def stop(self, grace: Optional[float] = 10.0) -> None:
        """Stops taking requests, lets the in-flight ones finish (up to ``grace`` s), shuts down."""
        if self._stopped.is_set():
            return
        self._service.stopping = True
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
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


class _PredictionService:
    def __init__(self, models: Dict[str, _Model], auth_keys: Sequence[str], workers: int, queue_size: int,
                 max_batch: int, simulated_latency_s: float, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 max_resize_pixels: Optional[int] = DEFAULT_MAX_RESIZE_PIXELS,
                 max_input_elements: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.models = models
        self.max_image_pixels = max_image_pixels
        self.max_resize_pixels = max_resize_pixels
        self.max_input_elements = max_input_elements
        self.auth_keys = [k for k in auth_keys if k]
        self.workers = workers
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.simulated_latency_s = simulated_latency_s
        self.ready = threading.Event()
        self.stopping = False
        self.metrics = Metrics()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.metrics.gauge("bfpaccel_queue_depth", lambda: self.waiting)
        self.metrics.gauge("bfpaccel_inflight_requests", lambda: self.running)
        self.metrics.gauge("bfpaccel_ready", lambda: 1.0 if self.ready.is_set() else 0.0)

    # -- request plumbing --------------------------------------------------------------------
    def _check_auth(self, md: Dict[str, str]) -> None:
        if not self.auth_keys:
            return
        value = md.get("authorization")
        if not value:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "this service needs a key: send metadata "
                         "'authorization: Bearer <key>'")
        token = value.strip()
        if token[:7].lower() == "bearer ":
            token = token[7:].strip()
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in self.auth_keys):
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "the key in 'authorization' is not valid for this service")

    def _select(self, md: Dict[str, str], spec: Any) -> _Model:
        route = md.get(ROUTE_HEADER)
        name = ""
        if route:
            if not route.startswith(ROUTE_PREFIX):
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"route {route!r} is not of the form {ROUTE_PREFIX}<service>")
            name = route[len(ROUTE_PREFIX):].strip("/")
        spec_name = spec.name if spec is not None else ""
        if name and spec_name and spec_name != name:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"model_spec.name {spec_name!r} does not match the route's "
                         f"service {name!r}")
        name = name or spec_name
        if name:
            model = self.models.get(name)
            if model is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"no service {name!r} here; this server serves "
                             f"{sorted(self.models)}")
        elif len(self.models) == 1:
            model = next(iter(self.models.values()))
        else:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"this server serves several services {sorted(self.models)}: "
                         f"send the header '{ROUTE_HEADER}: {ROUTE_PREFIX}<name>' or model_spec.name")
        if spec is not None:
            if spec.HasField("version") and spec.version.value != model.version:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"service {model.name!r} has version {model.version}, "
                             f"not {spec.version.value}")
            if spec.WhichOneof("version_choice") == "version_label" and spec.version_label not in ("", "stable"):
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"unknown version label {spec.version_label!r}")
            if spec.signature_name not in SIGNATURES:
                raise _invalid(f"unknown signature {spec.signature_name!r}; this model has 'serving_default'")
        return model

    def _ready_model(self, model: _Model) -> None:
        if self.stopping:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if model.error:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"service {model.name!r} failed to load: {model.error}")
        if not self.ready.is_set():
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the model is loading and warming up; retry shortly")

    def _call(self, method: str, fn: Any, request: Any, context: grpc.ServicerContext) -> Any:
        t0 = time.perf_counter()
        md = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
        info: Dict[str, Any] = {"route": "", "images": 0}
        code, message, response = grpc.StatusCode.OK, "", None
        try:
            self._check_auth(md)
            response = fn(request, context, md, info)
        except _Abort as e:
            code, message = e.code, e.message
        except MemoryError:
            log.warning("%s ran out of memory", method)
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory for this request"
        except Exception as e:  # the server never dies on input; a bug is logged and answered INTERNAL
            log.exception("%s failed", method)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"
        dt = time.perf_counter() - t0
        self.metrics.observe(method, info["route"], code.name, dt, info["images"])
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(json.dumps({
                "ts": round(time.time(), 3), "method": method, "route": info["route"], "peer": context.peer(),
                "code": code.name, "ms": round(dt * 1000, 3), "images": info["images"],
                "batch": info.get("batch", 0), **({"error": message} if message else {})}))
        if code is not grpc.StatusCode.OK:
            context.abort(code, message)
        return response

    # -- Predict -----------------------------------------------------------------------------
    def predict(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._call("Predict", self._predict, request, context)

    def _predict(self, request: Any, context: grpc.ServicerContext, md: Dict[str, str], info: Dict[str, Any]) -> Any:
        model = self._select(md, request.model_spec if request.HasField("model_spec") else None)
        info["route"] = model.name
        self._ready_model(model)
        p = model.first
        if len(request.inputs) == 0:
            raise _invalid(f"the request has no inputs; send the images under one of {sorted(p.input_aliases)}")
        if len(request.inputs) > 1:
            raise _invalid(f"the request has {len(request.inputs)} inputs {sorted(request.inputs)}; this model "
                           f"takes one, named one of {sorted(p.input_aliases)}")
        key, tp = next(iter(request.inputs.items()))
        if key not in p.input_aliases:
            raise _invalid(f"unknown input {key!r}; this model takes one of {sorted(p.input_aliases)}")
        outputs = self._resolve_outputs(p, list(request.output_filter))
        want = self._input_shape(p)
        images, x = decode_input(tp, key, takes_images=p.takes_images, input_shape=want, max_batch=self.max_batch,
                                 max_elements=element_limit(want, self.max_batch, self.max_input_elements))
        info["images"] = len(images) if images is not None else 0
        if x is not None:
            info["batch"] = int(x.shape[0]) if x.ndim else 1
        wanted = list(dict.fromkeys(name for _, name in outputs))
        result = self._run(model, x, images, key, wanted, context)
        if images is not None:
            info["batch"] = len(images)
        resp = pb.PredictResponse()
        resp.model_spec.name = model.name
        resp.model_spec.version.value = model.version
        resp.model_spec.signature_name = "serving_default"
        encoded: Dict[str, Any] = {}
        for key_out, name in outputs:
            if name not in encoded:
                encoded[name] = float_tensor_proto(result[name])
            resp.outputs[key_out].CopyFrom(encoded[name])
        return resp

    @staticmethod
    def _input_shape(p: Any) -> Optional[List[Optional[int]]]:
        return p.plan.input_shapes.get(p.input_name)

    @staticmethod
    def _resolve_outputs(p: Any, filt: List[str]) -> List[Tuple[str, str]]:
        """(response key, tensor name) pairs: the filter's names, or every name and alias."""
        if not filt:
            pairs = [(n, n) for n in p.output_names]
            pairs += [(a, n) for a, n in p.aliases.items() if a not in p.output_map]
            return pairs
        pairs = []
        for k in dict.fromkeys(filt):
            try:
                pairs.append((k, p.resolve_output(k)))
            except KeyError:
                raise _invalid(f"unknown output {k!r} in output_filter; this model's outputs are "
                               f"{p.output_names}" + (f", aliases {sorted(p.aliases)}" if p.aliases else "")) from None
        return pairs

    def _run(self, model: _Model, x: Optional[np.ndarray], images: Optional[List[bytes]], key: str,
             outputs: List[str], context: grpc.ServicerContext) -> Dict[str, np.ndarray]:
        with self._lock:
            if self.waiting >= self.queue_size:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the request queue is full ({self.queue_size} "
                             "waiting); retry later or raise --queue-size/--workers")
            self.waiting += 1
        try:
            remaining = context.time_remaining()
            try:
                pred = model.predictors.get(timeout=remaining if remaining is not None else None)
            except queue.Empty:
                raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while queued") from None
        finally:
            with self._lock:
                self.waiting -= 1
        with self._lock:
            self.running += 1
        try:
            if images is not None:  # decoded inside the slot: at most `workers` images in memory at once
                x = self._preprocess(pred, images, key)
            assert x is not None
            if self.simulated_latency_s:
                time.sleep(self.simulated_latency_s)
            try:
                return pred.predict(x, outputs)
            except ValueError as e:
                raise _invalid(str(e)) from None
        finally:
            with self._lock:
                self.running -= 1
            model.predictors.put(pred)

    @staticmethod
    def _preprocess(pred: Any, images: List[bytes], key: str) -> np.ndarray:
        arrs = []
        for i, b in enumerate(images):
            which = f"image {i}" if len(images) > 1 else "the image"
            try:
                arrs.append(pred.preprocess([b]))
            except ImageTooLargeError as e:
                flag = {"max_pixels": "max_image_pixels"}.get(e.limit_name, e.limit_name)
                raise _invalid(f"input {key!r}: {which} ({len(b)} bytes) is too large: {e} (server option "
                               f"{flag} / --{flag.replace('_', '-')})") from None
            except MemoryError:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"input {key!r}: out of memory decoding {which} "
                             f"({len(b)} bytes)") from None
            except Exception as e:
                raise _invalid(f"input {key!r}: {which} ({len(b)} bytes) could not be decoded as "
                               f"JPEG/PNG/GIF: {e}") from None
        return arrs[0] if len(arrs) == 1 else np.concatenate(arrs)

    # -- GetModelMetadata ----------------------------------------------------------------------
    def get_model_metadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._call("GetModelMetadata", self._metadata, request, context)

    def _metadata(self, request: Any, context: grpc.ServicerContext, md: Dict[str, str], info: Dict[str, Any]) -> Any:
        model = self._select(md, request.model_spec if request.HasField("model_spec") else None)
        info["route"] = model.name
        self._ready_model(model)
        fields = list(request.metadata_field) or ["signature_def"]
        bad = [f for f in fields if f != "signature_def"]
        if bad:
            raise _invalid(f"metadata_field {bad} not supported; only 'signature_def'")
        p = model.first
        sig = pb.SignatureDef(method_name="tensorflow/serving/predict")
        spec = p.preprocess_spec or {}

        def info_for(target: Any, name: str, dtype: int, shape: Optional[List[Optional[int]]]) -> None:
            target.name = name
            target.dtype = dtype
            if shape is None:
                target.tensor_shape.unknown_rank = True
            for d in shape or []:
                target.tensor_shape.dim.add().size = -1 if d is None else int(d)

        if p.takes_images:
            info_for(sig.inputs[spec.get("input_alias") or "images"], spec.get("string_input") or "images",
                     pb.DT_STRING, [None])
        info_for(sig.inputs[p.input_name], p.input_name, pb.DT_FLOAT, self._input_shape(p))
        out_shapes = {v.name: v.shape for v in p.plan.graph.outputs}
        for name in p.output_names:
            info_for(sig.outputs[name], name, pb.DT_FLOAT, out_shapes.get(p.output_map[name]))
        for alias, name in p.aliases.items():
            info_for(sig.outputs[alias], name, pb.DT_FLOAT, out_shapes.get(p.output_map[name]))
        sdm = pb.SignatureDefMap()
        sdm.signature_def["serving_default"].CopyFrom(sig)
        resp = pb.GetModelMetadataResponse()
        resp.model_spec.name = model.name
        resp.model_spec.version.value = model.version
        resp.metadata["signature_def"].type_url = pb.SIGNATURE_DEF_MAP_TYPE_URL
        resp.metadata["signature_def"].value = sdm.SerializeToString()
        return resp

    # -- loading -------------------------------------------------------------------------------
    def load(self, warmup: bool, warmup_delay_s: float, num_threads: Optional[int], health: Any,
             kernel: Optional[str] = None) -> None:
        from ..runtime.plan import load_plan
        from ..runtime.predictor import Predictor

        t0 = time.perf_counter()
        for m in self.models.values():
            try:
                plan = m.plan if m.plan is not None else load_plan(m.path)
                for _ in range(self.workers):
                    pred = Predictor(plan, num_threads=num_threads, kernel=kernel,
                                     max_image_pixels=self.max_image_pixels,
                                     max_resize_pixels=self.max_resize_pixels)
                    if warmup:
                        shape = [1 if d is None else d for d in (pred.plan.input_shapes.get(pred.input_name) or [1])]
                        pred.predict(np.zeros(shape, np.float32))
                    m.predictors.put(pred)
                    m.first = m.first or pred
                sess = m.first.session if m.first is not None else None
                log.info("loaded %s (version %d) from %s: %d worker(s)%s", m.name, m.version, m.path, self.workers,
                         f", kernel {sess.kernel}, {sess.num_threads} thread(s) each" if sess is not None else "")
            except Exception as e:
                m.error = f"{type(e).__name__}: {e}"
                log.error("could not load %s from %s: %s", m.name, m.path, m.error)
        if warmup_delay_s > 0:  # the seed's "flashing the FPGA" phase, for tests and demos
            time.sleep(warmup_delay_s)
        self.ready.set()
        if health is not None:
            from grpc_health.v1 import health_pb2

            ok = health_pb2.HealthCheckResponse.SERVING
            bad = health_pb2.HealthCheckResponse.NOT_SERVING
            all_ok = not any(m.error for m in self.models.values())
            for svc in ("", pb.SERVICE):
                health.set(svc, ok if all_ok else bad)
            for m in self.models.values():
                health.set(m.name, bad if m.error else ok)
        log.info("ready in %.2f s", time.perf_counter() - t0)


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


def serve(plans: Union[Mapping[str, Any], PathLike, Any], port: int = 50051, host: str = "127.0.0.1",
          tls_cert: Optional[Union[bytes, PathLike]] = None, tls_key: Optional[Union[bytes, PathLike]] = None,
          auth_keys: Optional[Sequence[str]] = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
          workers: int = 2, queue_size: int = 64, metrics_port: Optional[int] = None, warmup: bool = True, *,
          versions: Optional[Mapping[str, int]] = None, num_threads: Optional[int] = None,
          kernel: Optional[str] = None, block: bool = True,
          max_batch: int = 64, warmup_delay_s: float = 0.0, simulated_latency_ms: float = 0.0,
          reflection: bool = True, health: bool = True,
          max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
          max_resize_pixels: Optional[int] = DEFAULT_MAX_RESIZE_PIXELS) -> ServerHandle:
    """Starts a PredictionService on ``host:port`` for one or several plans; returns at once
    when ``block`` is False, else once the plans are loaded and warm.

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

    Example:
        >>> h = serve({"a": "a.bfpplan", "b": "b.bfpplan"}, port=0)  # doctest: +SKIP
        >>> h.port, h.routes  # doctest: +SKIP
        (40123, ['a', 'b'])
    """
    from ..runtime.plan import Plan

    if isinstance(plans, Mapping):
        items = dict(plans)
    elif isinstance(plans, Plan):
        items = {"model": plans}
    else:
        stem = os.path.basename(os.fspath(plans)).split(".")[0] or "model"
        items = {stem: plans}
    if not items:
        raise ValueError("no plans to serve")
    for name, path in items.items():
        if not name or "/" in name:
            raise ValueError(f"route name {name!r} must be non-empty and contain no '/'")
        if not isinstance(path, Plan) and not os.path.exists(os.fspath(path)):
            raise FileNotFoundError(f"plan {os.fspath(path)!r} (route {name!r}) does not exist")
    if workers < 1 or queue_size < 0 or max_batch < 1:
        raise ValueError("workers and max_batch must be >= 1, queue_size >= 0")
    from .. import core

    kernel = core.check_kernel(kernel)
    if num_threads is not None:
        num_threads = core.check_num_threads(num_threads)
    from ..preprocess import _check_limit

    max_image_pixels = _check_limit("max_image_pixels", max_image_pixels)
    max_resize_pixels = _check_limit("max_resize_pixels", max_resize_pixels)
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both tls_cert and tls_key")
    versions = dict(versions or {})
    models = {n: _Model(n, int(versions.get(n, 1)), "<in-memory plan>" if isinstance(p, Plan) else os.fspath(p),
                        plan=p if isinstance(p, Plan) else None) for n, p in items.items()}
    service = _PredictionService(models, list(auth_keys or []), workers, queue_size, max_batch,
                                 simulated_latency_ms / 1000.0, max_image_pixels, max_resize_pixels,
                                 max(1, int(max_message_bytes)))
    threads = workers + queue_size + 8
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bfpaccel-grpc"),
        options=[("grpc.max_receive_message_length", int(max_message_bytes)),
                 ("grpc.max_send_message_length", int(max_message_bytes)),
                 ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=threads)

    def unary(fn: Any, req_cls: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=req_cls.FromString,
                                                   response_serializer=lambda m: m.SerializeToString())

    def unimplemented(name: str) -> grpc.RpcMethodHandler:
        def fn(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented; this service only "
                          "supports Predict and GetModelMetadata")
            return b""
        return grpc.unary_unary_rpc_method_handler(fn)

    handlers = {"Predict": unary(service.predict, pb.PredictRequest),
                "GetModelMetadata": unary(service.get_model_metadata, pb.GetModelMetadataRequest)}
    handlers.update({n: unimplemented(n) for n in pb.UNIMPLEMENTED_METHODS})
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(pb.SERVICE, handlers),))

    health_servicer = None
    names = [pb.SERVICE]
    if health:
        try:
            from grpc_health.v1 import health as health_mod, health_pb2, health_pb2_grpc

            health_servicer = health_mod.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            for svc in ["", pb.SERVICE, *models]:
                health_servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
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
    metrics_server = MetricsServer(service.metrics, metrics_port, host) if metrics_port is not None else None
    server.start()
    handle = ServerHandle(server, bound, service, health_servicer, metrics_server)
    log.info("serving %s on %s:%d (%s%s)", sorted(models), host, bound, "TLS" if tls_cert is not None else "plaintext",
             ", auth on" if service.auth_keys else "")
    loader = threading.Thread(target=service.load,
                              args=(warmup, warmup_delay_s, num_threads, health_servicer, kernel),
                              name="bfpaccel-load", daemon=True)
    loader.start()
    if block:
        try:
            handle.wait_ready()
        except RuntimeError:
            handle.stop(grace=0)
            raise
    return handle
