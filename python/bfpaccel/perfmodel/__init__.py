"""An analytical performance model of a Brainwave-style FPGA NPU (``bfpaccel estimate``).

``estimate(model, npu)`` maps every layer of a compiled plan (or a built-in zoo architecture)
onto the NPU's matrix-vector tile engines, multifunction-unit vector chains and weight memory,
and returns per-layer cycles, the bound of each layer and the total latency. The NPU is a small
YAML of synthesis figures (``load_npu``); ``docs/perfmodel.md`` gives the model, the figures'
sources and its validation.

Example:
    >>> from bfpaccel.perfmodel import estimate, peak_tops
    >>> peak_tops("brainwave-s10")
    48.0
    >>> e = estimate("resnet50", "brainwave-s10")
    >>> e.total_ms > 0
    True
"""

from .model import (
    BUILTIN_MODELS,
    Estimate,
    NpuConfig,
    NpuConfigError,
    estimate,
    gemm_cycles,
    list_npus,
    load_npu,
    peak_macs_per_cycle,
    peak_tops,
    save_json,
)

__all__ = ["estimate", "Estimate", "load_npu", "list_npus", "NpuConfig", "NpuConfigError", "peak_tops",
           "peak_macs_per_cycle", "gemm_cycles", "save_json", "BUILTIN_MODELS"]
