"""Serving wire messages (TensorFlow Serving, KServe v2) without TensorFlow, in a private pool.

The descriptors come from ``_descriptors.py`` (compiled from ``protos/`` by
``protos/generate.py``).  They are loaded into a ``DescriptorPool`` of our own, never into
protobuf's default pool, so real TensorFlow and ``tensorflow-serving-api`` can be imported in
the same process (their ``tensorflow.TensorProto`` lives in the default pool), and so can
``tritonclient.grpc`` (its ``inference.*`` messages too).  Proto packages, message names and
field numbers are TensorFlow Serving's (``tensorflow.serving.PredictionService``,
``tensorflow.serving.ModelService``) and the KServe v2 / Open Inference Protocol's
(``inference.GRPCInferenceService``), so the bytes on the wire are the same.  Messages of the
two worlds do not mix in Python (``CopyFrom`` between them fails);
convert through bytes: ``ours.FromString(theirs.SerializeToString())``.

Example:
    >>> from bfpaccel.serve import _protos as pb
    >>> req = pb.PredictRequest()
    >>> req.inputs["images"].dtype = pb.DT_STRING
"""

from __future__ import annotations

import base64
import os
from typing import Any as _TAny, Dict

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = [
    "POOL", "TensorProto", "TensorShapeProto", "ModelSpec", "PredictRequest", "PredictResponse",
    "GetModelMetadataRequest", "GetModelMetadataResponse", "SignatureDefMap", "SignatureDef",
    "TensorInfo", "Any", "DataType", "SERVICE", "PREDICT_METHOD", "GET_MODEL_METADATA_METHOD",
    # tensorflow.serving.ModelService
    "StatusProto", "ErrorCode", "GetModelStatusRequest", "GetModelStatusResponse", "ModelVersionStatus",
    "ModelVersionState", "ReloadConfigRequest", "ReloadConfigResponse", "ModelServerConfig", "Metric",
    "MODEL_SERVICE", "GET_MODEL_STATUS_METHOD", "RELOAD_CONFIG_METHOD", "MODEL_SERVICE_UNIMPLEMENTED_METHODS",
    # inference.GRPCInferenceService (KServe v2 / Open Inference Protocol)
    "ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse", "ModelReadyRequest",
    "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse", "ModelMetadataRequest",
    "ModelMetadataResponse", "InferParameter", "InferTensorContents", "ModelInferRequest", "ModelInferResponse",
    "V2_SERVICE", "V2_SERVER_LIVE_METHOD", "V2_SERVER_READY_METHOD", "V2_MODEL_READY_METHOD",
    "V2_SERVER_METADATA_METHOD", "V2_MODEL_METADATA_METHOD", "V2_MODEL_INFER_METHOD", "V2_METHODS",
    # tensorflow.serving.PredictionLog (request logs; SavedModel warm-up records)
    "PredictionLog", "PredictLog", "PredictStreamedLog", "LogMetadata", "SamplingConfig",
]


def _descriptor_set_bytes() -> bytes:
    try:
        from ._descriptors import DESCRIPTOR_SET_B64
        return base64.b64decode(DESCRIPTOR_SET_B64)
    except ImportError:  # a checkout without the generated module: compile protos/ now
        import importlib.util

        here = os.path.dirname(os.path.abspath(__file__))
        gen = os.path.join(here, "..", "..", "..", "protos", "generate.py")
        spec = importlib.util.spec_from_file_location("_bfpaccel_protos_generate", gen)
        if spec is None or not os.path.exists(gen):
            raise ImportError("bfpaccel/serve/_descriptors.py is missing and protos/ is not beside the package; "
                              "run `python protos/generate.py` in a source checkout") from None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        return mod.compile_descriptor_set()


POOL = descriptor_pool.DescriptorPool()
_fds = descriptor_pb2.FileDescriptorSet.FromString(_descriptor_set_bytes())
for _f in _fds.file:  # dependencies come first in a --include_imports set
    POOL.Add(_f)
del _f, _fds


def _cls(full_name: str) -> _TAny:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


TensorProto = _cls("tensorflow.TensorProto")
TensorShapeProto = _cls("tensorflow.TensorShapeProto")
TensorInfo = _cls("tensorflow.TensorInfo")
SignatureDef = _cls("tensorflow.SignatureDef")
ModelSpec = _cls("tensorflow.serving.ModelSpec")
PredictRequest = _cls("tensorflow.serving.PredictRequest")
PredictResponse = _cls("tensorflow.serving.PredictResponse")
SignatureDefMap = _cls("tensorflow.serving.SignatureDefMap")
GetModelMetadataRequest = _cls("tensorflow.serving.GetModelMetadataRequest")
GetModelMetadataResponse = _cls("tensorflow.serving.GetModelMetadataResponse")
Any = _cls("google.protobuf.Any")

# tensorflow.serving.ModelService
StatusProto = _cls("tensorflow.serving.StatusProto")
GetModelStatusRequest = _cls("tensorflow.serving.GetModelStatusRequest")
GetModelStatusResponse = _cls("tensorflow.serving.GetModelStatusResponse")
ModelVersionStatus = _cls("tensorflow.serving.ModelVersionStatus")
ReloadConfigRequest = _cls("tensorflow.serving.ReloadConfigRequest")
ReloadConfigResponse = _cls("tensorflow.serving.ReloadConfigResponse")
ModelServerConfig = _cls("tensorflow.serving.ModelServerConfig")
Metric = _cls("tensorflow.serving.Metric")
#: ``tensorflow.error.Code`` name -> number (``ErrorCode["NOT_FOUND"] == 5``), for StatusProto.error_code
ErrorCode: Dict[str, int] = {v.name: v.number for v in POOL.FindEnumTypeByName("tensorflow.error.Code").values}
#: ``ModelVersionStatus.State`` name -> number (``ModelVersionState["AVAILABLE"] == 30``)
ModelVersionState: Dict[str, int] = {
    v.name: v.number for v in POOL.FindEnumTypeByName("tensorflow.serving.ModelVersionStatus.State").values}

# inference.GRPCInferenceService (KServe v2 / Open Inference Protocol)
ServerLiveRequest = _cls("inference.ServerLiveRequest")
ServerLiveResponse = _cls("inference.ServerLiveResponse")
ServerReadyRequest = _cls("inference.ServerReadyRequest")
ServerReadyResponse = _cls("inference.ServerReadyResponse")
ModelReadyRequest = _cls("inference.ModelReadyRequest")
ModelReadyResponse = _cls("inference.ModelReadyResponse")
ServerMetadataRequest = _cls("inference.ServerMetadataRequest")
ServerMetadataResponse = _cls("inference.ServerMetadataResponse")
ModelMetadataRequest = _cls("inference.ModelMetadataRequest")
#: nested ``ModelMetadataResponse.TensorMetadata`` (name, datatype, shape)
ModelMetadataResponse = _cls("inference.ModelMetadataResponse")
InferParameter = _cls("inference.InferParameter")
InferTensorContents = _cls("inference.InferTensorContents")
#: nested ``ModelInferRequest.InferInputTensor`` / ``.InferRequestedOutputTensor``
ModelInferRequest = _cls("inference.ModelInferRequest")
#: nested ``ModelInferResponse.InferOutputTensor``
ModelInferResponse = _cls("inference.ModelInferResponse")

# tensorflow.serving.PredictionLog: the records of a SavedModel's
# assets.extra/tf_serving_warmup_requests (a TFRecord file); see bfpaccel.serve.lifecycle
PredictionLog = _cls("tensorflow.serving.PredictionLog")
PredictLog = _cls("tensorflow.serving.PredictLog")
PredictStreamedLog = _cls("tensorflow.serving.PredictStreamedLog")
LogMetadata = _cls("tensorflow.serving.LogMetadata")
SamplingConfig = _cls("tensorflow.serving.SamplingConfig")

_dtype_enum = POOL.FindEnumTypeByName("tensorflow.DataType")
#: DataType name -> number (``DataType["DT_FLOAT"] == 1``)
DataType: Dict[str, int] = {v.name: v.number for v in _dtype_enum.values}
#: number -> DataType name
DataTypeName: Dict[int, str] = {v.number: v.name for v in _dtype_enum.values}
globals().update(DataType)  # DT_FLOAT, DT_STRING, ... as module constants

SERVICE = "tensorflow.serving.PredictionService"
PREDICT_METHOD = f"/{SERVICE}/Predict"
GET_MODEL_METADATA_METHOD = f"/{SERVICE}/GetModelMetadata"
#: Methods of the original service that this one leaves out (answered UNIMPLEMENTED).
UNIMPLEMENTED_METHODS = ("Classify", "Regress", "MultiInference")
SIGNATURE_DEF_MAP_TYPE_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"

MODEL_SERVICE = "tensorflow.serving.ModelService"
GET_MODEL_STATUS_METHOD = f"/{MODEL_SERVICE}/GetModelStatus"
RELOAD_CONFIG_METHOD = f"/{MODEL_SERVICE}/HandleReloadConfigRequest"
#: ModelService methods declared for the wire but answered UNIMPLEMENTED (configuration reload).
MODEL_SERVICE_UNIMPLEMENTED_METHODS = ("HandleReloadConfigRequest",)

V2_SERVICE = "inference.GRPCInferenceService"
V2_SERVER_LIVE_METHOD = f"/{V2_SERVICE}/ServerLive"
V2_SERVER_READY_METHOD = f"/{V2_SERVICE}/ServerReady"
V2_MODEL_READY_METHOD = f"/{V2_SERVICE}/ModelReady"
V2_SERVER_METADATA_METHOD = f"/{V2_SERVICE}/ServerMetadata"
V2_MODEL_METADATA_METHOD = f"/{V2_SERVICE}/ModelMetadata"
V2_MODEL_INFER_METHOD = f"/{V2_SERVICE}/ModelInfer"
#: method name -> (request class, response class) of the v2 service, as declared in the proto
V2_METHODS: Dict[str, "tuple[_TAny, _TAny]"] = {
    "ServerLive": (ServerLiveRequest, ServerLiveResponse),
    "ServerReady": (ServerReadyRequest, ServerReadyResponse),
    "ModelReady": (ModelReadyRequest, ModelReadyResponse),
    "ServerMetadata": (ServerMetadataRequest, ServerMetadataResponse),
    "ModelMetadata": (ModelMetadataRequest, ModelMetadataResponse),
    "ModelInfer": (ModelInferRequest, ModelInferResponse),
}
