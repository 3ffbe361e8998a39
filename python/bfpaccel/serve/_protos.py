"""TensorFlow-Serving wire messages without TensorFlow, in a private descriptor pool.

The descriptors come from ``_descriptors.py`` (compiled from ``protos/`` by
``protos/generate.py``).  They are loaded into a ``DescriptorPool`` of our own, never into
protobuf's default pool, so real TensorFlow and ``tensorflow-serving-api`` can be imported in
the same process (their ``tensorflow.TensorProto`` lives in the default pool).  Proto packages,
message names and field numbers are TensorFlow Serving's, so the bytes on the wire are the
same.  Messages of the two worlds do not mix in Python (``CopyFrom`` between them fails);
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
