"""The TF Serving gRPC face: ``tensorflow.serving.PredictionService`` (Predict,
GetModelMetadata) over the serving core, wire-identical to TensorFlow Serving.

The AML front end's route header ``x-ms-aml-grpc-service-route: /api/v1/service/<name>``
picks the model; with no header (or an empty name, which the seed's client sends when it has
no service name) ``model_spec.name`` does, and with neither the single model is served, as on
the edge box.  Inputs are a DT_STRING batch of encoded images keyed by the alias (``images``)
or the tensor name (``Placeholder:0``), or a numeric tensor keyed by the plan's input name.
A model of integer inputs (a text encoder's token ids and attention mask) takes DT_INT64 /
DT_INT32 tensors (kept integer, never converted to float), one per plan input, together; a
plan with a text front takes a DT_STRING batch of UTF-8 sentences under its alias (``text``)
and answers the pooled sentence embedding (bit for bit the in-process
``Predictor.predict_texts``).  Outputs are float32 in ``float_val`` keyed by tensor name and
by alias.

Status codes: INVALID_ARGUMENT (bad image, image over a size limit, dtype, shape,
input/output/signature name), NOT_FOUND (unknown model name, version, label or route),
UNAUTHENTICATED (auth on and the key missing or wrong), RESOURCE_EXHAUSTED (message over
``max_message_bytes``, queue full, out of memory), UNAVAILABLE (loading, shutting down),
DEADLINE_EXCEEDED (deadline passed in the queue), UNIMPLEMENTED (Classify, Regress,
MultiInference), INTERNAL (a bug: logged with its traceback).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from . import _protos as pb
from .codec import (CodecError, check_tensor, float_tensor_proto, make_ndarray, make_tensor_proto, numpy_dtype,
                    tensor_shape)
from .core import (Code, ServingCore, ServingError, check_array, check_dtype, decode_texts, element_limit, invalid,
                   typed_feed)
from .grpc_face import GrpcFace

__all__ = ["PredictionServiceFace", "ModelServiceFace", "add_model_service", "decode_input", "decode_text_input",
           "ROUTE_HEADER", "ROUTE_PREFIX", "SIGNATURES"]

log = logging.getLogger("bfpaccel.serve")
access_log = logging.getLogger("bfpaccel.serve.access")

ROUTE_HEADER = "x-ms-aml-grpc-service-route"
ROUTE_PREFIX = "/api/v1/service/"
SIGNATURES = ("", "serving_default", "predict")


def decode_input(tp: Any, key: str, *, takes_images: bool, input_shape: Optional[Sequence[Optional[int]]],
                 max_batch: int, max_elements: int, declared: str = "float32"
                 ) -> Tuple[Optional[List[bytes]], Optional[np.ndarray]]:
    """One Predict input -> ``(images, None)`` for a DT_STRING batch of encoded images or
    ``(None, array)``: float32 for a float input (``declared``), the integers as sent for an
    integer input (DT_INT64/DT_INT32 token ids; a float tensor there is refused, never
    truncated); raises ``ServingError(INVALID_ARGUMENT)`` for every client mistake.

    Everything is checked before values are materialised: dtype, rank (codec ``MAX_RANK``),
    dimensions and element count as Python ints (no overflow), value counts against the shape,
    the shape against the model's ``input_shape`` and ``max_batch``, and at most
    ``max_elements`` elements -- so a single broadcast value is expanded only once the shape is
    known to be the model's.
    """
    if tp.dtype == pb.DT_STRING:
        if not takes_images:
            raise invalid(f"input {key!r} is DT_STRING but this model takes float tensors of shape "
                          f"{None if input_shape is None else ['N' if w is None else w for w in input_shape]}")
        try:
            shape = tensor_shape(tp)
        except CodecError as e:
            raise invalid(f"input {key!r}: {e}") from None
        if len(shape) > 1:
            raise invalid(f"input {key!r}: a batch of encoded images has shape [N], got {shape}")
        n = math.prod(shape)
        if n == 0:
            raise invalid(f"input {key!r} holds no images")
        if n > max_batch:
            raise invalid(f"input {key!r}: {n} images in one request; the limit is {max_batch}")
        if len(tp.string_val) != n:
            raise invalid(f"input {key!r}: shape {shape} but {len(tp.string_val)} values in string_val")
        return list(tp.string_val), None
    try:
        if tp.dtype == pb.DT_INVALID:
            raise CodecError("tensor has no dtype (DT_INVALID): an empty or missing TensorProto")
        npdt = numpy_dtype(tp.dtype)
    except CodecError as e:
        raise invalid(f"input {key!r}: {e}") from None
    if npdt.kind not in "fiu" and np.dtype(declared).kind != "b":
        raise invalid(f"input {key!r} has dtype {pb.DataTypeName.get(tp.dtype)}; send "
                      + ("DT_STRING images or " if takes_images else "")
                      + ("a numeric tensor (DT_FLOAT preferred)" if np.dtype(declared).kind == "f" else
                         f"an integer tensor (DT_INT64 or DT_INT32: the input is declared {declared})"))
    check_dtype(key, npdt, declared, str(pb.DataTypeName.get(tp.dtype)))
    try:
        _, shape, n = check_tensor(tp)  # shape, element count and value count; nothing allocated
    except CodecError as e:
        raise invalid(f"input {key!r}: {e}") from None
    check_array(key, shape, input_shape, max_batch, max_elements)
    try:
        arr = make_ndarray(tp, max_elements=max_elements)
    except CodecError as e:
        raise invalid(f"input {key!r}: {e}") from None
    return None, typed_feed(key, arr, declared)


def decode_text_input(tp: Any, key: str, max_batch: int) -> List[str]:
    """A DT_STRING batch of UTF-8 sentences (shape ``[N]``, or ``[]`` for one) -> ``str``s;
    raises ``ServingError(INVALID_ARGUMENT)``."""
    if tp.dtype != pb.DT_STRING:
        raise invalid(f"input {key!r} takes sentences (DT_STRING, UTF-8), got {pb.DataTypeName.get(tp.dtype)}")
    try:
        shape = tensor_shape(tp)
    except CodecError as e:
        raise invalid(f"input {key!r}: {e}") from None
    if len(shape) > 1:
        raise invalid(f"input {key!r}: a batch of sentences has shape [N], got {shape}")
    n = math.prod(shape)
    if n > max_batch:
        raise invalid(f"input {key!r}: {n} sentences in one request; the limit is {max_batch}")
    if len(tp.string_val) != n:
        raise invalid(f"input {key!r}: shape {shape} but {len(tp.string_val)} values in string_val")
    return decode_texts(key, list(tp.string_val), max_batch)


class PredictionServiceFace(GrpcFace):
    """``tensorflow.serving.PredictionService`` (and ``ModelService.GetModelStatus``) on a
    :class:`ServingCore`; errors become gRPC status codes (auth, metrics and the access log:
    :class:`~bfpaccel.serve.grpc_face.GrpcFace`)."""

    protocol = "tfs-grpc"

    def _select(self, md: Dict[str, str], spec: Any, check_ready: bool = True) -> Any:
        route = md.get(ROUTE_HEADER)
        name = ""
        if route:
            if not route.startswith(ROUTE_PREFIX):
                raise ServingError(Code.NOT_FOUND, f"route {route!r} is not of the form {ROUTE_PREFIX}<service>")
            name = route[len(ROUTE_PREFIX):].strip("/")
        spec_name = spec.name if spec is not None else ""
        if name and spec_name and spec_name != name:
            raise ServingError(Code.NOT_FOUND, f"model_spec.name {spec_name!r} does not match the route's "
                               f"service {name!r}")
        name = name or spec_name
        if not name and len(self.core.models) != 1:
            raise ServingError(Code.NOT_FOUND, f"this server serves several services {sorted(self.core.models)}: "
                               f"send the header '{ROUTE_HEADER}: {ROUTE_PREFIX}<name>' or model_spec.name")
        version: Optional[int] = None
        label: Optional[str] = None
        if spec is not None:
            if spec.signature_name not in SIGNATURES:
                raise invalid(f"unknown signature {spec.signature_name!r}; this model has 'serving_default'")
            if spec.HasField("version"):
                version = spec.version.value
            elif spec.WhichOneof("version_choice") == "version_label":
                label = spec.version_label or None
        return self.core.resolve(name or None, version, label, check_ready=check_ready)

    # -- Predict -----------------------------------------------------------------------------
    def predict(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._call("Predict", self._parsed(pb.PredictRequest, self._predict), request, context)

    def _predict(self, request: Any, context: grpc.ServicerContext, md: Dict[str, str], info: Dict[str, Any]) -> Any:
        mv = self._select(md, request.model_spec if request.HasField("model_spec") else None)
        info["route"] = mv.name
        p = mv.first
        if len(request.inputs) == 0:
            raise invalid(f"the request has no inputs; send the images under one of {sorted(p.input_aliases)}")
        if len(request.inputs) > len(p.input_names) and len(request.inputs) > 1:
            raise invalid(f"the request has {len(request.inputs)} inputs {sorted(request.inputs)}; this model "
                          f"takes " + (f"one, named one of {sorted(p.input_aliases)}" if len(p.input_names) == 1
                                       else f"{p.input_names} together"))
        core = self.core
        kinds = {k: mv.input_kind(k) for k in request.inputs}  # INVALID_ARGUMENT for an unknown key
        alone = [k for k, kind in kinds.items() if kind != "tensor"]
        if alone and len(kinds) > 1:
            raise invalid(f"the request has inputs {sorted(kinds)}; {alone[0]!r} ({kinds[alone[0]]}) goes alone")
        key, tp = next(iter(request.inputs.items()))
        outputs = mv.resolve_outputs(list(request.output_filter), kinds[key])
        wanted = list(dict.fromkeys(name for _, name in outputs))
        images: Optional[List[bytes]] = None
        x: Optional[np.ndarray] = None
        if kinds[key] == "text":
            texts = decode_text_input(tp, key, core.max_batch)
            info["batch"] = len(texts)
            result = core.infer(mv, texts=texts, key=key, outputs=wanted, timeout_s=context.time_remaining())
        elif len(p.input_names) > 1 or kinds[key] == "tensor" and key != p.input_name:
            feeds = {}
            for k, t in request.inputs.items():
                spec = mv.tensor_spec(k)
                declared = p.plan.input_dtypes.get(k, "float32")
                _, arr = decode_input(t, k, takes_images=False, input_shape=spec.shape, max_batch=core.max_batch,
                                      max_elements=element_limit(spec.shape, core.max_batch, core.max_input_elements),
                                      declared=declared)
                assert arr is not None
                feeds[k] = arr
            mv.check_feeds(feeds)
            info["batch"] = int(feeds[key].shape[0]) if feeds[key].ndim else 1
            result = core.infer(mv, feeds=feeds, key=key, outputs=wanted, timeout_s=context.time_remaining())
        else:
            want = mv.input_shape
            images, x = decode_input(tp, key, takes_images=p.takes_images, input_shape=want,
                                     max_batch=core.max_batch,
                                     max_elements=element_limit(want, core.max_batch, core.max_input_elements),
                                     declared=p.plan.input_dtypes.get(p.input_name, "float32"))
            info["images"] = len(images) if images is not None else 0
            if images is not None:
                info["batch"] = len(images)
            elif x is not None:
                info["batch"] = int(x.shape[0]) if x.ndim else 1
            result = core.infer(mv, x=x, images=images, key=key, outputs=wanted, timeout_s=context.time_remaining())
        resp = pb.PredictResponse()
        resp.model_spec.name = mv.name
        resp.model_spec.version.value = mv.version
        resp.model_spec.signature_name = "serving_default"
        encoded: Dict[str, Any] = {}
        for key_out, name in outputs:
            if name not in encoded:
                r = np.asarray(result[name])
                # float outputs in float_val (the seed's service); integer and bool outputs (a text
                # encoder's masks) keep their type, in int64_val / int_val / bool_val
                encoded[name] = (float_tensor_proto(r) if r.dtype.kind == "f" else
                                 make_tensor_proto(r, use_tensor_content=False))
            resp.outputs[key_out].CopyFrom(encoded[name])
        return resp

    # -- GetModelMetadata ----------------------------------------------------------------------
    def get_model_metadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._call("GetModelMetadata", self._parsed(pb.GetModelMetadataRequest, self._metadata), request,
                          context)

    def _metadata(self, request: Any, context: grpc.ServicerContext, md: Dict[str, str], info: Dict[str, Any]) -> Any:
        mv = self._select(md, request.model_spec if request.HasField("model_spec") else None)
        info["route"] = mv.name
        fields = list(request.metadata_field) or ["signature_def"]
        bad = [f for f in fields if f != "signature_def"]
        if bad:
            raise invalid(f"metadata_field {bad} not supported; only 'signature_def'")
        sdm = pb.SignatureDefMap()
        sdm.signature_def["serving_default"].CopyFrom(signature_def(mv))
        resp = pb.GetModelMetadataResponse()
        resp.model_spec.name = mv.name
        resp.model_spec.version.value = mv.version
        resp.metadata["signature_def"].type_url = pb.SIGNATURE_DEF_MAP_TYPE_URL
        resp.metadata["signature_def"].value = sdm.SerializeToString()
        return resp


def signature_def(mv: Any) -> Any:
    """The ``serving_default`` SignatureDef of a model version (TF Serving's metadata)."""
    sig = pb.SignatureDef(method_name="tensorflow/serving/predict")
    p = mv.first
    spec = p.preprocess_spec or {}

    def info_for(target: Any, name: str, dtype: int, shape: Optional[Sequence[Optional[int]]]) -> None:
        target.name = name
        target.dtype = dtype
        if shape is None:
            target.tensor_shape.unknown_rank = True
        for d in shape or []:
            target.tensor_shape.dim.add().size = -1 if d is None else int(d)

    if p.takes_images:
        info_for(sig.inputs[spec.get("input_alias") or "images"], spec.get("string_input") or "images",
                 pb.DT_STRING, [None])
    if p.text_front is not None:
        info_for(sig.inputs[p.text_front.input_alias], p.text_front.input_alias, pb.DT_STRING, [None])
    for name in p.input_names:
        t = mv.tensor_spec(name)
        info_for(sig.inputs[name], name, getattr(pb, _TF_TYPES.get(t.dtype, "DT_FLOAT")), t.shape)
    outs = {o.name: o.shape for o in mv.outputs()}
    otypes: Dict[str, int] = {o.name: getattr(pb, _TF_TYPES.get(o.dtype, "DT_FLOAT")) for o in mv.outputs()}
    for name in p.output_names:
        info_for(sig.outputs[name], name, otypes.get(name, int(pb.DT_FLOAT)), outs.get(name))
    for alias, name in p.aliases.items():
        info_for(sig.outputs[alias], name, otypes.get(name, int(pb.DT_FLOAT)), outs.get(name))
    if p.text_front is not None:
        emb = p.text_front.embedding_name
        info_for(sig.outputs[emb], emb, pb.DT_FLOAT, outs.get(emb))
    return sig


_TF_TYPES = {"FP32": "DT_FLOAT", "INT64": "DT_INT64", "INT32": "DT_INT32", "BOOL": "DT_BOOL", "FP16": "DT_HALF",
             "FP64": "DT_DOUBLE", "INT16": "DT_INT16", "INT8": "DT_INT8", "UINT8": "DT_UINT8"}


class ModelServiceFace:
    """``tensorflow.serving.ModelService.GetModelStatus``: the state of every version of a
    model (START, LOADING, AVAILABLE, UNLOADING, END with the load error), as TF Serving
    reports it; ``HandleReloadConfigRequest`` answers UNIMPLEMENTED (versions come from the
    model folder and ``ServerHandle.reload()``)."""

    protocol = "tfs-grpc"

    def __init__(self, core: ServingCore) -> None:
        self.core = core
        self._predict = PredictionServiceFace(core)  # its auth, logging and metrics plumbing

    def get_model_status(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._predict._call("GetModelStatus", self._predict._parsed(pb.GetModelStatusRequest, self._status),
                                   request, context)

    def _status(self, request: Any, context: grpc.ServicerContext, md: Dict[str, str], info: Dict[str, Any]) -> Any:
        spec = request.model_spec if request.HasField("model_spec") else None
        name = (spec.name if spec is not None else "") or self.core.default_name()
        info["route"] = name
        entry = self.core.models.get(name)
        if entry is None:
            raise ServingError(Code.NOT_FOUND, f"no model {name!r} here; this server serves "
                               f"{sorted(self.core.models)}")
        versions = sorted(entry.versions.values(), key=lambda v: v.version)
        if spec is not None and spec.HasField("version"):
            versions = [v for v in versions if v.version == spec.version.value]
        elif spec is not None and spec.WhichOneof("version_choice") == "version_label" and spec.version_label:
            if spec.version_label not in entry.labels:
                raise ServingError(Code.NOT_FOUND, f"model {name!r} has no version label {spec.version_label!r}")
            versions = [v for v in versions if v.version == entry.labels[spec.version_label]]
        if not versions:
            raise ServingError(Code.NOT_FOUND, f"model {name!r} has no such version")
        resp = pb.GetModelStatusResponse()
        for v in versions:
            st = resp.model_version_status.add()
            st.version = v.version
            st.state = v.state.value
            if v.error:
                st.status.error_code = pb.ErrorCode["UNKNOWN"]  # as TF Serving reports a failed load
                st.status.error_message = v.error
        return resp


def add_model_service(server: grpc.Server, core: ServingCore) -> List[str]:
    """Registers ``tensorflow.serving.ModelService`` on ``server``; returns its service name."""
    face = ModelServiceFace(core)

    def unimplemented(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "HandleReloadConfigRequest is not implemented: versions "
                      "come from the model folder (--model-root, --poll-seconds)")
        return b""

    handlers = {
        # no request deserializer: the face parses the bytes (a bad request is INVALID_ARGUMENT)
        "GetModelStatus": grpc.unary_unary_rpc_method_handler(
            face.get_model_status, response_serializer=lambda m: m.SerializeToString()),
        **{n: grpc.unary_unary_rpc_method_handler(unimplemented) for n in pb.MODEL_SERVICE_UNIMPLEMENTED_METHODS}}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(pb.MODEL_SERVICE, handlers),))
    return [pb.MODEL_SERVICE]
