"""Float32 baselines for like-for-like comparisons (onnxruntime, imported lazily).

Example:
    >>> import numpy as np
    >>> sess = ort_conv_session(np.ones((4, 2, 3, 3), np.float32), None)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional, Sequence

import numpy as np


def ort_basic_optimized(path: str) -> Any:
    """The ONNX model at ``path`` after onnxruntime's *basic* graph rewrites, as an
    ``onnx.ModelProto``: standard-ONNX rewrites only (constant folding, Identity elimination,
    BatchNormalization and Pad into Conv). Exporters' constant chains (the TorchScript exporter's
    "same" paddings, its Identity nodes standing for duplicate initializers) become initializers.
    Raises RuntimeError if the result has ops outside the standard domain.

    Example:
        >>> proto = ort_basic_optimized("model.onnx")  # doctest: +SKIP
    """
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory(prefix="bfpaccel-ort-") as d:  # the model's folder may be read-only
        so.optimized_model_filepath = os.path.join(d, "basic.onnx")
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        proto = onnx.load(so.optimized_model_filepath)
    domains = {n.domain for n in proto.graph.node} - {"", "ai.onnx"}
    if domains:
        raise RuntimeError(f"constant folding left non-standard ops (domains {sorted(domains)})")
    return proto


def ort_conv_session(
    w: np.ndarray,
    bias: Optional[np.ndarray],
    stride: int = 1,
    pads: Sequence[int] = (0, 0, 0, 0),
    dilation: int = 1,
    groups: int = 1,
    threads: int = 1,
):
    """An onnxruntime CPU session of one float32 ``Conv`` node (input ``x``, output ``y``)
    with OIHW weights ``w``; ``pads`` in ONNX order (top, left, bottom, right)."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the onnxruntime baseline needs `pip install onnx onnxruntime`") from exc
    O, _, KH, KW = w.shape
    inits = [numpy_helper.from_array(np.ascontiguousarray(w, np.float32), "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(bias, np.float32).reshape(O), "b"))
        inputs.append("b")
    node = helper.make_node(
        "Conv", inputs, ["y"], kernel_shape=[KH, KW], pads=list(pads), strides=[stride, stride],
        dilations=[dilation, dilation], group=groups,
    )
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # onnxruntime's defaults otherwise (its thread pool spins: its best speed)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_session(onnx_path: str, threads: Optional[int] = None):
    """An onnxruntime CPU session of a model file with ``threads`` intra-op threads."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the onnxruntime baseline needs `pip install onnxruntime`") from exc
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])


def ort_int8_model(onnx_path: str, out_path: str, calibration: Sequence[np.ndarray]) -> str:
    """onnxruntime's own static int8 quantization of ``onnx_path`` (QDQ, activations QUInt8,
    weights QInt8 per channel: the fastest int8 setting on x86 CPUs without AMX), calibrated
    on ``calibration`` input batches (MinMax).  Writes ``out_path`` and returns it.

    The model is first run through ``quant_pre_process`` (shape inference and onnxruntime's
    graph optimisation; needs ``sympy``), as onnxruntime recommends.
    """
    import os
    import tempfile

    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(onnx_path, load_external_data=False).graph.input[0].name
    batches = [np.asarray(b, np.float32) for b in calibration]
    if not batches:
        raise ValueError("calibration needs at least one input batch")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self):  # type: ignore[no-untyped-def]
            b = next(self.it, None)
            return None if b is None else {name: b}

    with tempfile.TemporaryDirectory() as d:
        pre = os.path.join(d, "pre.onnx")
        quant_pre_process(onnx_path, pre, skip_symbolic_shape=True)
        quantize_static(pre, out_path, _Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return out_path


def ort_int8_dynamic_model(onnx_path: str, out_path: str) -> str:
    """onnxruntime's dynamic int8 quantization of ``onnx_path`` (weights QInt8 per channel,
    activations quantized per call to QUInt8): onnxruntime's int8 path for transformer encoders,
    whose MatMuls take activations of every range. Writes ``out_path`` and returns it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(onnx_path, out_path, weight_type=QuantType.QInt8, per_channel=True)
    return out_path
