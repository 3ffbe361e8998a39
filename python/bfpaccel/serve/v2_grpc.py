"""The KServe v2 gRPC face (Open Inference Protocol, ``inference.GRPCInferenceService``) over
the serving core, on the same gRPC port as TF Serving's ``PredictionService``.

What Triton's and KServe's gRPC clients (``tritonclient.grpc``, ``kserve.InferenceGRPCClient``)
call works:

* ``ServerLive`` / ``ServerReady``: the core's liveness and readiness (every model loaded and
  warm).  They need no key when auth is on: they say no more than ``grpc.health.v1``, which
  probes reach without one.
* ``ModelReady``: whether the model (and version) can answer now; an unknown model or version
  is ``ready: false``, not an error.
* ``ServerMetadata``: name ``bfpaccel``, the package version and :data:`V2_EXTENSIONS`.
* ``ModelMetadata``: name, the available versions, platform ``bfpaccel_plan``, inputs and
  outputs with v2 datatypes (``FP32``; ``BYTES`` for encoded images) and shapes with ``-1``
  for a free dimension.
* ``ModelInfer``: one input, either the float tensor (``FP32``, named as the plan's input,
  shaped as the model's input) or a batch of encoded images (``BYTES``, shape ``[N]`` or
  ``[N, 1]``, named as the image alias or the string input, e.g. ``images`` or
  ``Placeholder:0``), given in ``raw_input_contents`` (what ``tritonclient`` sends) or in the
  typed ``contents``.  Outputs come back in ``raw_output_contents`` as Triton answers (FP32,
  little-endian).  A model of integer inputs (a text encoder's token ids and attention mask)
  takes every input together as INT64 or INT32 (kept integer), and a plan with a text front
  takes UTF-8 sentences as BYTES (``[N]`` or ``[N, 1]``) under its alias (``text``) and answers
  the sentence embedding.  ``outputs`` picks them (an output's alias names it too; none: every output
  tensor), ``id`` is echoed and ``model_version`` is the version that ran.  A version is
  chosen by number (``"2"``), by label (``"stable"``) or, with ``""``, the newest available.

The other methods of Triton's service (``ModelStreamInfer``, ``ModelConfig``,
``ModelStatistics``, ``RepositoryIndex``, ``RepositoryModelLoad``/``Unload``, the shared-memory
and the trace/log settings methods) answer UNIMPLEMENTED with a message saying what to use
instead.

Status codes: INVALID_ARGUMENT (input/output name, datatype, shape, shape against the data,
``raw_input_contents`` count or size, contents and raw contents both given, too many rows or
images, bad image, unsupported parameters such as shared memory or classification),
NOT_FOUND (unknown model, version or label), UNAUTHENTICATED (auth on and the key in the
``authorization`` metadata missing or wrong), RESOURCE_EXHAUSTED (message over
``max_message_bytes``, queue full, out of memory), UNAVAILABLE (loading, shutting down),
DEADLINE_EXCEEDED (the call's deadline passed while queued), UNIMPLEMENTED, INTERNAL (a bug:
logged with its traceback).  Calls are counted in the metrics under protocol ``v2-grpc`` and
logged as JSON lines to ``bfpaccel.serve.access``.

Example:
    >>> import tritonclient.grpc as tg  # doctest: +SKIP
    >>> c = tg.InferenceServerClient(url=f"127.0.0.1:{handle.port}")  # doctest: +SKIP
    >>> i = tg.InferInput("images", [1], "BYTES"); i.set_data_from_numpy(np.array([jpeg], object))  # doctest: +SKIP
    >>> c.infer("tiny", [i]).as_numpy("classifier/tiny/predictions/Softmax:0").shape  # doctest: +SKIP
    (1, 10)
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from . import _protos as pb
from .core import (Code, ModelVersion, ServingCore, ServingError, TensorSpec, check_array, check_dtype, decode_texts,
                   element_limit, invalid, typed_feed)
from .grpc_face import GrpcFace
from .wire import WireError, encode_v2_grpc_response, parse_v2_grpc_request, v2_numpy_dtype

__all__ = ["V2GrpcFace", "add_v2_service", "SERVER_NAME", "PLATFORM", "V2_EXTENSIONS", "UNIMPLEMENTED_METHODS",
           "STREAMING_METHODS"]

#: ``ServerMetadataResponse.name``.
SERVER_NAME = "bfpaccel"
#: ``ModelMetadataResponse.platform`` of every model.
PLATFORM = "bfpaccel_plan"
#: Protocol extensions this server offers (``ServerMetadataResponse.extensions``): the HTTP
#: face's binary tensor data; gRPC always carries tensors as raw bytes.
V2_EXTENSIONS: Tuple[str, ...] = ("binary_tensor_data",)

_REPOSITORY = "model versions come from the plans given at start and the model folder (--model-root, --poll-seconds)"
_SHM = "shared memory is not offered by this server; send tensors in raw_input_contents"
#: Methods of Triton's ``inference.GRPCInferenceService`` answered UNIMPLEMENTED -> why.
UNIMPLEMENTED_METHODS: Dict[str, str] = {
    "ModelStreamInfer": "streaming inference is not offered by this server; call ModelInfer",
    "ModelConfig": "there is no Triton model configuration here; ModelMetadata describes inputs and outputs",
    "ModelStatistics": "per-model statistics are in the Prometheus metrics (--metrics-port or the HTTP port's "
                       "/metrics)",
    "RepositoryIndex": _REPOSITORY,
    "RepositoryModelLoad": _REPOSITORY,
    "RepositoryModelUnload": _REPOSITORY,
    "SystemSharedMemoryStatus": _SHM,
    "SystemSharedMemoryRegister": _SHM,
    "SystemSharedMemoryUnregister": _SHM,
    "CudaSharedMemoryStatus": _SHM,
    "CudaSharedMemoryRegister": _SHM,
    "CudaSharedMemoryUnregister": _SHM,
    "TraceSetting": "tracing is not offered by this server; see the JSON access log (bfpaccel.serve.access)",
    "LogSettings": "log settings are not changeable over gRPC; use the server's --log-level",
}
#: The unimplemented methods that are bidirectional streams on the wire.
STREAMING_METHODS = frozenset({"ModelStreamInfer"})
_HANDLERS = {"ServerLive": "_server_live", "ServerReady": "_server_ready", "ModelReady": "_model_ready",
             "ServerMetadata": "_server_metadata", "ModelMetadata": "_model_metadata", "ModelInfer": "_model_infer"}
_NO_AUTH = frozenset({"ServerLive", "ServerReady"})  # probes: they say no more than grpc.health.v1


def _version_choice(text: str) -> Tuple[Optional[int], Optional[str]]:
    """A v2 ``model_version`` string -> ``(version, label)``: ``""`` the newest available,
    decimal digits a version number, anything else a version label."""
    t = text.strip()
    if not t:
        return None, None
    if t.isascii() and t.isdigit():
        return int(t), None
    return None, t


def _dims(spec: TensorSpec) -> List[int]:
    """A tensor's v2 shape: ``-1`` for a free dimension (a tensor of unknown rank: ``[]``)."""
    return [] if spec.shape is None else [-1 if d is None else int(d) for d in spec.shape]


def _shape_text(shape: Optional[Sequence[Optional[int]]]) -> str:
    return "unknown" if shape is None else str([-1 if d is None else d for d in shape])


class V2GrpcFace(GrpcFace):
    """``inference.GRPCInferenceService`` on a :class:`ServingCore` (see the module docstring):
    :meth:`handle` answers the six methods of the protocol, :meth:`unimplemented` the rest of
    Triton's service."""

    protocol = "v2-grpc"

    def _resolve(self, name: str, version: str) -> ModelVersion:
        v, label = _version_choice(version)
        return self.core.resolve(name or None, v, label)

    # -- dispatch ----------------------------------------------------------------------------
    def handle(self, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        """The gRPC behaviour of ``method`` (one of ``_protos.V2_METHODS``): ``request`` is the
        serialized request (or a message); a request that does not parse is INVALID_ARGUMENT."""
        req_cls = pb.V2_METHODS[method][0]
        fn = getattr(self, _HANDLERS[method])

        return self._call(method, self._parsed(req_cls, fn), request, context, auth=method not in _NO_AUTH)

    # -- health ------------------------------------------------------------------------------
    def _server_live(self, request: Any, context: grpc.ServicerContext, md: Dict[str, str],
                     info: Dict[str, Any]) -> Any:
        return pb.ServerLiveResponse(live=self.core.is_live())

    def _server_ready(self, request: Any, context: grpc.ServicerContext, md: Dict[str, str],
                      info: Dict[str, Any]) -> Any:
        return pb.ServerReadyResponse(ready=self.core.is_ready())

    def _model_ready(self, request: Any, context: grpc.ServicerContext, md: Dict[str, str],
                     info: Dict[str, Any]) -> Any:
        info["route"] = request.name if request.name in self.core.models else ""
        try:
            mv = self._resolve(request.name, request.version)
        except ServingError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=mv.available and self.core.is_live())

    # -- metadata ----------------------------------------------------------------------------
    def _server_metadata(self, request: Any, context: grpc.ServicerContext, md: Dict[str, str],
                         info: Dict[str, Any]) -> Any:
        from .. import __version__

        return pb.ServerMetadataResponse(name=SERVER_NAME, version=str(__version__), extensions=list(V2_EXTENSIONS))

    def _model_metadata(self, request: Any, context: grpc.ServicerContext, md: Dict[str, str],
                        info: Dict[str, Any]) -> Any:
        mv = self._resolve(request.name, request.version)
        info["route"] = mv.name
        entry = self.core.models.get(mv.name)
        versions = sorted(v.version for v in (list(entry.versions.values()) if entry else []) if v.available)
        resp = pb.ModelMetadataResponse(name=mv.name, platform=PLATFORM, versions=[str(v) for v in versions])
        for spec in mv.inputs():
            resp.inputs.add(name=spec.name, datatype=spec.dtype, shape=_dims(spec))
        for spec in mv.outputs():
            resp.outputs.add(name=spec.name, datatype=spec.dtype, shape=_dims(spec))
        return resp

    # -- inference ---------------------------------------------------------------------------
    def _model_infer(self, request: Any, context: grpc.ServicerContext, md: Dict[str, str],
                     info: Dict[str, Any]) -> Any:
        core = self.core
        mv = self._resolve(request.model_name, request.model_version)
        info["route"] = mv.name
        p = mv.first
        names = sorted(p.input_aliases)
        n_plan = len(p.input_names)
        if len(request.inputs) == 0 or (len(request.inputs) > 1 and len(request.inputs) > n_plan):
            raise invalid(f"the request has {len(request.inputs)} inputs"
                          + (f" {[i.name for i in request.inputs]}" if len(request.inputs) else "")
                          + (f"; this model takes one, named one of {names}" if n_plan == 1 else
                             f"; this model takes {p.input_names} together, or one of {names}"))
        kinds = {inp.name: mv.input_kind(inp.name) for inp in request.inputs}  # INVALID_ARGUMENT: unknown
        alone = [k for k, kind in kinds.items() if kind != "tensor"]
        if alone and len(request.inputs) > 1:
            raise invalid(f"the request has inputs {[i.name for i in request.inputs]}; {alone[0]!r} "
                          f"({kinds[alone[0]]}) goes alone")
        inp = request.inputs[0]
        key = inp.name
        kind = kinds[key]
        # everything about the inputs' sizes is checked here, with Python ints, before any
        # value is decoded
        max_bytes: Optional[int]
        if kind in ("images", "text"):
            what = "encoded images" if kind == "images" else "sentences (UTF-8)"
            if inp.datatype != "BYTES":
                raise invalid(f"input {key!r} has datatype {inp.datatype!r}; {what} are BYTES"
                              + (f" (the float tensor is FP32 under the name {p.input_name!r})"
                                 if kind == "images" else ""))
            shape = [int(d) for d in inp.shape]
            if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
                raise invalid(f"input {key!r}: a batch of {what} has shape [N] or [N, 1], got {shape}")
            n = shape[0]
            noun = "images" if kind == "images" else "sentences"
            if n <= 0:
                raise invalid(f"input {key!r} holds no {noun} (shape {shape})")
            if n > core.max_batch:
                raise invalid(f"input {key!r}: {n} {noun} in one request; the limit is {core.max_batch}")
            max_elements, max_bytes = n, None  # the message size limit bounds the bytes
        else:
            max_elements, max_bytes = 0, 0
            for t in request.inputs:
                spec = mv.tensor_spec(t.name)
                declared = p.plan.input_dtypes.get(t.name, "float32")
                if spec.dtype == "FP32":
                    if t.datatype != "FP32":
                        hint = (f"; encoded images go as BYTES under {sorted(p.input_aliases - {p.input_name})}"
                                if p.takes_images else "")
                        raise invalid(f"input {t.name!r} has datatype {t.datatype!r}; this model's input is FP32 of "
                                      f"shape {_shape_text(spec.shape)}{hint}")
                else:
                    try:
                        dt = v2_numpy_dtype(t.datatype)
                    except WireError as e:
                        raise invalid(f"input {t.name!r}: {e}") from None
                    check_dtype(t.name, dt, declared, t.datatype)
                shape = [int(d) for d in t.shape]
                lim = element_limit(spec.shape, core.max_batch, core.max_input_elements)
                check_array(t.name, shape, spec.shape, core.max_batch, lim)
                max_elements = max(max_elements, lim)
                max_bytes = max(max_bytes, math.prod(shape) * v2_numpy_dtype(t.datatype).itemsize)
        try:
            req = parse_v2_grpc_request(request, max_elements=max_elements, max_bytes=max_bytes)
        except WireError as e:
            raise invalid(str(e)) from None
        tensor = req.inputs[key]
        if req.outputs or kind == "text":
            outputs = mv.resolve_outputs([o.name for o in req.outputs], kind)
        else:
            outputs = [(n, n) for n in p.output_names]
        wanted = list(dict.fromkeys(name for _, name in outputs))
        timeout_s = context.time_remaining()
        if kind == "images":
            images = list(tensor.data)  # type: ignore[arg-type]
            info["images"] = info["batch"] = len(images)
            result = core.infer(mv, images=images, key=key, outputs=wanted, timeout_s=timeout_s)
        elif kind == "text":
            texts = decode_texts(key, list(tensor.data), core.max_batch)  # type: ignore[arg-type]
            info["batch"] = len(texts)
            result = core.infer(mv, texts=texts, key=key, outputs=wanted, timeout_s=timeout_s)
        else:
            feeds = {k: typed_feed(k, np.asarray(t.data), p.plan.input_dtypes.get(k, "float32"))
                     for k, t in req.inputs.items()}
            first = feeds[key]
            info["batch"] = int(first.shape[0]) if first.ndim else 1
            if n_plan == 1 and key == p.input_name:
                result = core.infer(mv, x=first, key=key, outputs=wanted, timeout_s=timeout_s)
            else:
                mv.check_feeds(feeds)
                result = core.infer(mv, feeds=feeds, key=key, outputs=wanted, timeout_s=timeout_s)
        return encode_v2_grpc_response(mv.name, {k: result[name] for k, name in outputs},
                                       model_version=str(mv.version), request_id=req.id)

    # -- the rest of Triton's service ----------------------------------------------------------
    def unimplemented(self, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        """Answers a method this server does not offer with UNIMPLEMENTED and why."""
        def fn(r: Any, c: grpc.ServicerContext, md: Dict[str, str], info: Dict[str, Any]) -> Any:
            raise ServingError(Code.UNIMPLEMENTED, f"{method} is not implemented: {UNIMPLEMENTED_METHODS[method]}")
        return self._call(method, fn, request, context)


def add_v2_service(server: grpc.Server, core: ServingCore) -> List[str]:
    """Registers ``inference.GRPCInferenceService`` (KServe v2 / Open Inference Protocol) on
    ``server``; returns its service name (for server reflection)."""
    face = V2GrpcFace(core)

    def unary(method: str) -> grpc.RpcMethodHandler:
        # the request is parsed inside the call (a malformed one is INVALID_ARGUMENT, logged and counted)
        return grpc.unary_unary_rpc_method_handler(lambda request, context: face.handle(method, request, context),
                                                   response_serializer=lambda m: m.SerializeToString())

    def unimplemented_unary(method: str) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(lambda request, context: face.unimplemented(method, request,
                                                                                              context))

    def unimplemented_stream(method: str) -> grpc.RpcMethodHandler:
        def fn(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            face.unimplemented(method, None, context)
            yield from ()
        return grpc.stream_stream_rpc_method_handler(fn)

    handlers = {name: unary(name) for name in pb.V2_METHODS}
    for name in UNIMPLEMENTED_METHODS:
        handlers[name] = unimplemented_stream(name) if name in STREAMING_METHODS else unimplemented_unary(name)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(pb.V2_SERVICE, handlers),))
    return [pb.V2_SERVICE]
