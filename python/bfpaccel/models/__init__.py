"""The seed's model zoo API (``azureml.accel.models``). So far: ``preprocess_array``, the
TensorFlow preprocessing graph op (``bfpaccel.models.utils``); TensorFlow is imported only
when it is called."""

from .utils import preprocess_array

__all__ = ["preprocess_array"]
