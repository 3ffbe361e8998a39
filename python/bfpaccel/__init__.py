"""bfpaccel: run neural networks the way a block-floating-point FPGA accelerator
(Microsoft's Brainwave NPU) runs them -- bit-exact, fast, on a CPU.

Example:
    >>> import numpy as np, bfpaccel
    >>> w = bfpaccel.quantize(np.eye(16, dtype=np.float32), "msfp16", axis=0)
    >>> bfpaccel.matmul(np.ones((2, 16), np.float32), w, "msfp16").shape
    (2, 16)
"""

from ._omp import load_core as _load_core

_load_core()  # first: the OpenMP runtime reads its wait policy as the extension loads
from . import reference
from .core import (
    BfpTensor,
    ConvWeight,
    available_kernels,
    conv2d,
    fake_quantize,
    get_kernel,
    get_num_threads,
    matmul,
    quantize,
    quantize_conv_weight,
    set_kernel,
    set_num_threads,
)
from .core import _init_from_env
from . import labels
from .registry import Model, Registry
from .serve.client import PredictionClient, client_from_service
from .runtime import Plan, PlanError, Predictor, Session, top_k, UnsupportedOpError, compile, load_plan
from .formats import NAN_EXPONENT, PRESETS, ROUNDING_MODES, Format, get_format, list_formats
from .textfront import TextFront, attach_text_front

__version__ = "0.1.0"

__all__ = [
    "Format",
    "PRESETS",
    "ROUNDING_MODES",
    "NAN_EXPONENT",
    "get_format",
    "list_formats",
    "BfpTensor",
    "ConvWeight",
    "quantize",
    "fake_quantize",
    "matmul",
    "quantize_conv_weight",
    "conv2d",
    "set_num_threads",
    "get_num_threads",
    "available_kernels",
    "get_kernel",
    "set_kernel",
    "reference",
    "compile",
    "Plan",
    "PlanError",
    "load_plan",
    "Session",
    "Predictor",
    "top_k",
    "labels",
    "Registry",
    "PredictionClient",
    "client_from_service",
    "Model",
    "UnsupportedOpError",
    "TextFront",
    "attach_text_front",
]

_init_from_env()
