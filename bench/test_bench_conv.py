"""The convolutions of ResNet-50 (batch 1, 224x224 input) on the BFP datapath vs onnxruntime
float32, same layer, same thread count.

Layers follow ResNet-50 v1.5 (torchvision; the stride sits on the 3x3 of a stage's first
block): the 7x7 stem and every distinct 1x1 / 3x3 convolution, each with the number of times it
occurs in the network (53 convolutions in all), so ``bench/report.py`` can total the 3x3 layers
and the whole network's convolutions.

BFP side: weights quantized and packed once (``quantize_conv_weight``), the activation quantized
on the fly inside every ``conv2d`` call, bias added (batch-norm folded into it).  Baseline: a
one-node ONNX ``Conv`` model (weights and bias as initializers) in an onnxruntime session with
``intra_op_num_threads = threads``, ``inter_op_num_threads = 1`` and all graph optimizations.
Select subsets with ``-k``: ``-k 3x3``, ``-k 1x1``, ``-k stem``, ``-k "ort and t2"``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest

import bfpaccel


class Layer(NamedTuple):
    stage: str
    cin: int
    cout: int
    k: int  # square kernel
    stride: int
    size: int  # square input height = width
    count: int  # occurrences in ResNet-50

    @property
    def pad(self) -> int:
        return self.k // 2

    @property
    def out(self) -> int:
        return (self.size + 2 * self.pad - self.k) // self.stride + 1

    @property
    def ops(self) -> int:
        return 2 * self.cout * self.out * self.out * self.cin * self.k * self.k

    @property
    def name(self) -> str:
        kind = f"{self.k}x{self.k}" if self.stage != "conv1" else f"stem{self.k}x{self.k}"
        s = f"s{self.stride}" if self.stride > 1 else ""
        return f"{self.stage}-{kind}{s}-{self.cin}to{self.cout}-{self.size}px"


LAYERS = [
    Layer("conv1", 3, 64, 7, 2, 224, 1),
    # stage 1 (conv2_x), 56x56, 3 blocks
    Layer("conv2", 64, 64, 1, 1, 56, 1),
    Layer("conv2", 64, 64, 3, 1, 56, 3),
    Layer("conv2", 64, 256, 1, 1, 56, 4),  # 3 expansions + the projection shortcut
    Layer("conv2", 256, 64, 1, 1, 56, 2),
    # stage 2 (conv3_x), 28x28, 4 blocks
    Layer("conv3", 256, 128, 1, 1, 56, 1),
    Layer("conv3", 128, 128, 3, 2, 56, 1),
    Layer("conv3", 128, 128, 3, 1, 28, 3),
    Layer("conv3", 128, 512, 1, 1, 28, 4),
    Layer("conv3", 256, 512, 1, 2, 56, 1),  # projection shortcut
    Layer("conv3", 512, 128, 1, 1, 28, 3),
    # stage 3 (conv4_x), 14x14, 6 blocks
    Layer("conv4", 512, 256, 1, 1, 28, 1),
    Layer("conv4", 256, 256, 3, 2, 28, 1),
    Layer("conv4", 256, 256, 3, 1, 14, 5),
    Layer("conv4", 256, 1024, 1, 1, 14, 6),
    Layer("conv4", 512, 1024, 1, 2, 28, 1),  # projection shortcut
    Layer("conv4", 1024, 256, 1, 1, 14, 5),
    # stage 4 (conv5_x), 7x7, 3 blocks
    Layer("conv5", 1024, 512, 1, 1, 14, 1),
    Layer("conv5", 512, 512, 3, 2, 14, 1),
    Layer("conv5", 512, 512, 3, 1, 7, 2),
    Layer("conv5", 512, 2048, 1, 1, 7, 3),
    Layer("conv5", 1024, 2048, 1, 2, 14, 1),  # projection shortcut
    Layer("conv5", 2048, 512, 1, 1, 7, 2),
]
assert sum(l.count for l in LAYERS) == 53


def _group(layer: Layer, threads: int) -> str:
    return f"conv {layer.name} threads={threads}"


def _info(layer: Layer, threads: int) -> dict:
    return {
        "op": "conv",
        "layer": layer.name,
        "shape_index": LAYERS.index(layer),
        "stage": layer.stage,
        "N": 1,
        "C": layer.cin,
        "H": layer.size,
        "W": layer.size,
        "O": layer.cout,
        "KH": layer.k,
        "KW": layer.k,
        "stride": layer.stride,
        "padding": layer.pad,
        "out_hw": layer.out,
        "count": layer.count,
        "threads": threads,
    }


def _data(rand, layer: Layer):
    # the stem sees a normalized image; every other layer sees post-ReLU activations
    x = rand((1, layer.cin, layer.size, layer.size), "normal" if layer.stage == "conv1" else "relu", seed=3)
    fan_in = layer.cin * layer.k * layer.k
    w = rand((layer.cout, layer.cin, layer.k, layer.k), "normal", scale=float(np.sqrt(2.0 / fan_in)), seed=4)
    b = rand((layer.cout,), "normal", scale=0.1, seed=5)
    return x, w, b


def _conv_float(x, w, b, stride: int, pad: int) -> np.ndarray:
    """float64 im2col convolution: the yardstick for the sanity checks."""
    O, C, KH, KW = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    Ho = (xp.shape[2] - KH) // stride + 1
    Wo = (xp.shape[3] - KW) // stride + 1
    cols = np.empty((C, KH, KW, Ho, Wo))
    for i in range(KH):
        for j in range(KW):
            cols[:, i, j] = xp[0, :, i : i + stride * Ho : stride, j : j + stride * Wo : stride]
    y = w.reshape(O, -1).astype(np.float64) @ cols.reshape(C * KH * KW, Ho * Wo)
    return (y + b[:, None]).reshape(1, O, Ho, Wo)


@pytest.mark.parametrize("layer", LAYERS, ids=[l.name for l in LAYERS])
def test_conv_bfp(measure, rand, reference, check_close, layer, fmt, threads):
    x, w, b = _data(rand, layer)
    cw = bfpaccel.quantize_conv_weight(w, fmt)  # weights: quantized once, outside the timing
    ref = reference(lambda: _conv_float(x, w, b, layer.stride, layer.pad))

    y = measure(
        lambda: bfpaccel.conv2d(x, cw, fmt, bias=b, stride=layer.stride, padding=layer.pad),
        group=_group(layer, threads),
        ops=layer.ops,
        impl=fmt,
        role="bfp",
        format=fmt,
        kernel=bfpaccel.get_kernel(),
        **_info(layer, threads),
    )
    check_close(y, ref, f"bfp {fmt} conv {layer.name}")


def _onnx_conv_model(w: np.ndarray, b: np.ndarray, layer: Layer) -> bytes:
    onnx = pytest.importorskip("onnx", reason="onnx is not installed: the onnxruntime fp32 baseline is skipped (pip install onnx onnxruntime)")
    from onnx import TensorProto, helper, numpy_helper

    p = layer.pad
    node = helper.make_node(
        "Conv",
        ["X", "W", "B"],
        ["Y"],
        kernel_shape=[layer.k, layer.k],
        strides=[layer.stride, layer.stride],
        pads=[p, p, p, p],
        dilations=[1, 1],
        group=1,
    )
    graph = helper.make_graph(
        [node],
        f"resnet50_{layer.name}",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, layer.cin, layer.size, layer.size])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, layer.cout, layer.out, layer.out])],
        initializer=[numpy_helper.from_array(np.asarray(w), "W"), numpy_helper.from_array(np.asarray(b), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bfpaccel-bench")
    model.ir_version = 8  # readable by every onnxruntime of the last few years
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.parametrize("layer", LAYERS, ids=[l.name for l in LAYERS])
def test_conv_ort(measure, rand, reference, layer, threads):
    ort = pytest.importorskip(
        "onnxruntime", reason="onnxruntime is not installed: the onnxruntime fp32 baseline is skipped (pip install onnx onnxruntime)"
    )
    x, w, b = _data(rand, layer)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(_onnx_conv_model(w, b, layer), so, providers=["CPUExecutionProvider"])
    feeds = {"X": np.ascontiguousarray(x)}
    ref = reference(lambda: _conv_float(x, w, b, layer.stride, layer.pad))
    try:
        (y,) = measure(
            lambda: sess.run(["Y"], feeds),
            group=_group(layer, threads),
            ops=layer.ops,
            impl="onnxruntime fp32",
            role="baseline",
            format="fp32",
            kernel=f"onnxruntime {ort.__version__} CPUExecutionProvider",
            **_info(layer, threads),
        )
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        assert err < 1e-4, f"onnxruntime conv {layer.name}: relative error {err:.3g}; the ONNX model is wrong"
    finally:
        del sess  # stop its (spinning) worker threads before the next benchmark starts
