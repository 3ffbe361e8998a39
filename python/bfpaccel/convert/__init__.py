"""Model conversion: TensorFlow -> ONNX for ``bfpaccel.compile`` and the server.

- ``AccelOnnxConverter.convert_tf_model(registry, source, input, outputs)``: the seed's
  TF1 path (SavedModel from ``simple_save`` or a frozen ``.pb``), in a subprocess, with the
  seed's operation API. A string (JPEG) input is cut at the ``preprocess_array`` output.
- ``convert_keras`` / ``convert_saved_model``: TF2 models, in this process.
- ``read_onnx_metadata``: the ``bfpaccel.preprocess`` / ``bfpaccel.outputs`` records.

TensorFlow and tf2onnx are imported only when a conversion runs.
"""

from ._converter import AccelOnnxConverter, ConversionRegistry, ConvertOperation
from ._meta import OUTPUTS_KEY, PREPROCESS_KEY, read_onnx_metadata
from ._tf2 import convert_keras, convert_saved_model

__all__ = [
    "AccelOnnxConverter",
    "ConvertOperation",
    "ConversionRegistry",
    "convert_keras",
    "convert_saved_model",
    "read_onnx_metadata",
    "PREPROCESS_KEY",
    "OUTPUTS_KEY",
]
