"""The seed's model zoo API (``azureml.accel.models``): ``preprocess_array`` (the TensorFlow
preprocessing graph op), the ten featurizers ``Resnet50``, ``QuantizedResnet50``,
``Resnet152``, ``QuantizedResnet152``, ``Vgg16``, ``QuantizedVgg16``, ``Densenet121``,
``QuantizedDensenet121``, ``SsdVgg``, ``QuantizedSsdVgg`` (base class ``AccelModel``) and
``DoesNotExistError``. TensorFlow is imported only when a graph is built.

Example:
    >>> from bfpaccel.models import Resnet50
    >>> Resnet50("/tmp/models", weights="random").version
    '1.1.3'
"""

from ._densenet121 import Densenet121, QuantizedDensenet121
from ._resnet import QuantizedResnet50, QuantizedResnet152, Resnet50, Resnet152
from ._ssdvgg import QuantizedSsdVgg, SsdVgg
from ._vgg16 import QuantizedVgg16, Vgg16
from .accel_model import AccelModel
from .doesnotexisterror import DoesNotExistError
from .utils import preprocess_array

__all__ = [
    "preprocess_array",
    "AccelModel",
    "DoesNotExistError",
    "Resnet50",
    "QuantizedResnet50",
    "Resnet152",
    "QuantizedResnet152",
    "Vgg16",
    "QuantizedVgg16",
    "Densenet121",
    "QuantizedDensenet121",
    "SsdVgg",
    "QuantizedSsdVgg",
]
