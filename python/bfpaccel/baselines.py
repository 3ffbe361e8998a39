"""Float32 baselines for like-for-like comparisons (onnxruntime, imported lazily).

Example:
    >>> import numpy as np
    >>> sess = ort_conv_session(np.ones((4, 2, 3, 3), np.float32), None)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


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
