"""Single recurrent layers as ONNX models, for ``bfpaccel bench --model gru|lstm`` and the
NPU estimate of a recurrent layer.

Each takes a batch-first input ``x [N, T, I]``, transposes it to ONNX's sequence-first layout
(``layout=0``, which every runtime runs) and returns the layer's last state ``h [1, N, H]``.
The weights are seeded random numbers of the scale a trained layer has (uniform in
``+-1/sqrt(H)``, PyTorch's initialisation): latency is what these models are for.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import numpy as np

__all__ = ["RNN_BENCH_MODELS", "rnn_onnx", "build_rnn_onnx"]

#: bench name -> (cell, hidden size, input size, time steps)
RNN_BENCH_MODELS: Dict[str, Tuple[str, int, int, int]] = {
    "gru": ("GRU", 512, 512, 50),
    "lstm": ("LSTM", 512, 512, 50),
}


def rnn_onnx(cell: str, hidden: int, input_size: int, steps: int, seed: int = 0,
             linear_before_reset: bool = True) -> Any:
    """An ONNX model of one forward ``cell`` ("GRU" or "LSTM") layer: ``x [N, steps,
    input_size]`` -> ``h [1, N, hidden]``."""
    from onnx import TensorProto, helper, numpy_helper

    if cell not in ("GRU", "LSTM"):
        raise ValueError(f"cell must be 'GRU' or 'LSTM', got {cell!r}")
    if min(hidden, input_size, steps) < 1:
        raise ValueError("hidden, input_size and steps must be >= 1")
    G = 4 if cell == "LSTM" else 3
    rng = np.random.default_rng(seed)
    s = 1.0 / np.sqrt(hidden)
    inits = {"W": rng.uniform(-s, s, (1, G * hidden, input_size)).astype(np.float32),
             "R": rng.uniform(-s, s, (1, G * hidden, hidden)).astype(np.float32),
             "B": rng.uniform(-s, s, (1, 2 * G * hidden)).astype(np.float32)}
    attrs: Dict[str, Any] = {"hidden_size": hidden}
    if cell == "GRU":
        attrs["linear_before_reset"] = int(linear_before_reset)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], name="to_sequence_first", perm=[1, 0, 2]),
             helper.make_node(cell, ["xt", "W", "R", "B"], ["", "h"], name=cell.lower(), **attrs)]
    g = helper.make_graph(nodes, f"{cell.lower()}{hidden}",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", steps, input_size])],
                          [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "N", hidden])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)], producer_name="bfpaccel.models.rnn")
    m.ir_version = 8
    return m


def build_rnn_onnx(name: str, cache_dir: str) -> str:
    """The bench model ``name`` (:data:`RNN_BENCH_MODELS`) as an ``.onnx`` in ``cache_dir``
    (written once); returns its path."""
    import onnx

    key = name.strip().lower()
    if key not in RNN_BENCH_MODELS:
        raise ValueError(f"unknown recurrent model {name!r}: one of {', '.join(RNN_BENCH_MODELS)}")
    cell, H, I, T = RNN_BENCH_MODELS[key]
    path = os.path.join(cache_dir, f"{key}{H}_t{T}.onnx")
    if not os.path.isfile(path):
        tmp = f"{path}.tmp{os.getpid()}"
        onnx.save(rnn_onnx(cell, H, I, T), tmp)
        os.replace(tmp, path)
    return path
