"""PyTorch front end: train on what the accelerator computes.

``BfpLinear`` / ``BfpConv2d`` are drop-in ``nn.Linear`` / ``nn.Conv2d`` whose forward runs on
the C++ core's block-floating-point datapath -- bit for bit ``bfpaccel.matmul`` /
``bfpaccel.conv2d`` plus the compiled plan's bias epilogue -- and whose backward is
straight-through (gradients of the float op at the dequantized BFP operands).
``quantize_model`` swaps them into a model; the ops are ``torch.library`` custom ops
(``bfpaccel::matmul``, ``bfpaccel::linear``, ``bfpaccel::conv2d``, ``bfpaccel::fake_quantize``),
so ``torch.compile`` and ``torch.export`` keep each as one node; ``export_onnx`` / ``to_plan``
write a model that ``bfpaccel.compile`` turns back into the same numbers.

PyTorch is an optional dependency (``pip install 'bfpaccel[torch]'``); ``import bfpaccel``
never imports it, ``import bfpaccel.torch`` does.

Example:
    >>> import torch, bfpaccel.torch as bt
    >>> net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> qnet = bt.quantize_model(net, "msfp16")
    >>> qnet(torch.randn(2, 32)).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as _e:  # pragma: no cover - exercised only without torch
    raise ImportError("bfpaccel.torch needs PyTorch: pip install 'bfpaccel[torch]' (or pip install torch)") from _e

from ._ops import VECTOR_PRECISIONS, decode_format, encode_format
from .export import MixedFormatsError, export_onnx, onnx_translation_table, plan_options, to_plan
from .functional import bfp_conv2d, bfp_linear, bfp_matmul, fake_quantize
from .nn import BfpConv2d, BfpLinear, bfp_layers, quantize_model

__all__ = [
    "bfp_matmul",
    "bfp_linear",
    "bfp_conv2d",
    "fake_quantize",
    "BfpLinear",
    "BfpConv2d",
    "quantize_model",
    "bfp_layers",
    "export_onnx",
    "to_plan",
    "plan_options",
    "onnx_translation_table",
    "MixedFormatsError",
    "VECTOR_PRECISIONS",
    "encode_format",
    "decode_format",
]
