"""The blocks of MobileNetV2 (batch 1, 224x224 input) on the BFP runtime vs onnxruntime float32,
same block, same thread count.

A MobileNetV2 block is an inverted residual: a 1x1 expansion to ``t`` times the channels with
ReLU6, a 3x3 depthwise convolution (stride 1 or 2) with ReLU6, a 1x1 projection, and the
residual add where the stride is 1 and the channels stay. Each distinct block shape (the first
block of each stage and its repeats) is one tiny ONNX model -- batch norms folded into the convs'
biases, as every exporter leaves them -- with the number of times it occurs in the network (17
blocks), plus the 3x3 stem and the 1x1 head, so ``bench/report.py`` can total the network's
convolutions. Depthwise layers are where a BFP runtime differs most from a GEMM library: the
runtime fuses the expansion into the depthwise conv, quantizes each activation once, and runs
the depthwise conv on one-element blocks.

BFP side: ``bfpaccel.compile(model, format=fmt)`` and ``bfpaccel.Session(plan, num_threads=threads)``
(the session's own thread count). Baseline: the same model in an onnxruntime session with
``intra_op_num_threads = threads``, ``inter_op_num_threads = 1`` and all graph optimizations.
Select subsets with ``-k``: ``-k block``, ``-k "s2"``, ``-k "ort and t2"``.
"""

from __future__ import annotations

from typing import List, NamedTuple

import numpy as np
import pytest

import bfpaccel


class Block(NamedTuple):
    stage: int
    cin: int
    cout: int
    t: int  # expansion factor (0: the stem or the head, a plain conv)
    stride: int
    size: int  # square input height = width
    count: int  # occurrences in MobileNetV2
    k: int = 3  # the depthwise (or stem) kernel

    @property
    def hidden(self) -> int:
        return self.cin * self.t

    @property
    def out(self) -> int:
        return (self.size + 2 * (self.k // 2) - self.k) // self.stride + 1

    @property
    def residual(self) -> bool:
        return self.t > 0 and self.stride == 1 and self.cin == self.cout

    @property
    def ops(self) -> int:
        """2 x multiply-adds of the block's convolutions."""
        if self.t == 0:
            return 2 * self.cout * self.out * self.out * self.cin * self.k * self.k
        expand = self.size * self.size * self.cin * self.hidden if self.t > 1 else 0
        dw = self.out * self.out * self.hidden * self.k * self.k
        project = self.out * self.out * self.hidden * self.cout
        return 2 * (expand + dw + project)

    @property
    def name(self) -> str:
        if self.t == 0:
            kind = "stem3x3s2" if self.stage == 0 else "head1x1"
            return f"{kind}-{self.cin}to{self.cout}-{self.size}px"
        s = f"s{self.stride}" if self.stride > 1 else ""
        return f"b{self.stage}-t{self.t}{s}-{self.cin}to{self.cout}-{self.size}px"


# MobileNetV2 (t, c, n, s): (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1)
BLOCKS: List[Block] = [
    Block(0, 3, 32, 0, 2, 224, 1),  # the stem: 3x3 stride 2 + ReLU6
    Block(1, 32, 16, 1, 1, 112, 1),  # t = 1: no expansion
    Block(2, 16, 24, 6, 2, 112, 1),
    Block(2, 24, 24, 6, 1, 56, 1),
    Block(3, 24, 32, 6, 2, 56, 1),
    Block(3, 32, 32, 6, 1, 28, 2),
    Block(4, 32, 64, 6, 2, 28, 1),
    Block(4, 64, 64, 6, 1, 14, 3),
    Block(5, 64, 96, 6, 1, 14, 1),
    Block(5, 96, 96, 6, 1, 14, 2),
    Block(6, 96, 160, 6, 2, 14, 1),
    Block(6, 160, 160, 6, 1, 7, 2),
    Block(7, 160, 320, 6, 1, 7, 1),
    Block(8, 320, 1280, 0, 1, 7, 1, k=1),  # the head: 1x1 + ReLU6
]
assert sum(b.count for b in BLOCKS if b.t > 0) == 17


def _model(b: Block, nhwc: bool = True) -> bytes:
    """The block as an ONNX model (float32, folded batch norms as biases, seeded weights).
    nhwc: the input and output are channels-last, with Transposes to and from the convs' NCHW
    (as a TensorFlow export has them), so that neither runtime pays a layout change the network
    around the block would not: the BFP runtime keeps activations channels-last and folds the
    Transposes; onnxruntime folds them into its own layout changes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng([7, b.stage, b.cin, b.cout, b.stride])
    inits, nodes = [], []

    def conv(x: str, cin: int, cout: int, k: int, stride: int, group: int, relu6: bool, name: str) -> str:
        fan_in = (cin // group) * k * k
        w = (rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        bias = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(bias, f"{name}_b")])
        p = k // 2
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_y"], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[p, p, p, p], group=group))
        if not relu6:
            return f"{name}_y"
        nodes.append(helper.make_node("Clip", [f"{name}_y", "zero", "six"], [f"{name}_a"]))
        return f"{name}_a"

    inits += [numpy_helper.from_array(np.float32(0.0), "zero"), numpy_helper.from_array(np.float32(6.0), "six")]
    x = "x"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]))
        x = "xt"
    if b.t == 0:
        y = conv(x, b.cin, b.cout, b.k, b.stride, 1, True, "conv")
    else:
        h = conv(x, b.cin, b.hidden, 1, 1, 1, True, "expand") if b.t > 1 else x
        h = conv(h, b.hidden, b.hidden, b.k, b.stride, b.hidden, True, "dw")
        y = conv(h, b.hidden, b.cout, 1, 1, 1, False, "project")
        if b.residual:
            nodes.append(helper.make_node("Add", [y, x], ["sum"]))
            y = "sum"
    if nhwc:
        nodes.append(helper.make_node("Transpose", [y], ["y"], perm=[0, 2, 3, 1]))
    else:
        nodes.append(helper.make_node("Identity", [y], ["y"]))
    shape_in = [1, b.size, b.size, b.cin] if nhwc else [1, b.cin, b.size, b.size]
    shape_out = [1, b.out, b.out, b.cout] if nhwc else [1, b.cout, b.out, b.out]
    graph = helper.make_graph(
        nodes, f"mobilenetv2_{b.name}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bfpaccel-bench")
    model.ir_version = 8  # readable by every onnxruntime of the last few years
    return model.SerializeToString()


def _group(b: Block, threads: int) -> str:
    return f"mobilenetv2 {b.name} threads={threads}"


def _info(b: Block, threads: int) -> dict:
    return {"op": "mbv2", "layer": b.name, "shape_index": BLOCKS.index(b), "N": 1, "C": b.cin, "H": b.size,
            "W": b.size, "O": b.cout, "t": b.t, "stride": b.stride, "out_hw": b.out, "residual": b.residual,
            "count": b.count, "threads": threads}


def _input(rand, b: Block) -> np.ndarray:
    # channels-last (see _model); the stem sees a normalized image, every block the previous one's output
    return np.ascontiguousarray(rand((1, b.size, b.size, b.cin), "normal", seed=6))


def _ort(model: bytes, threads: int):
    ort = pytest.importorskip(
        "onnxruntime", reason="onnxruntime is not installed: the onnxruntime fp32 baseline is skipped (pip install onnxruntime)")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_mobilenet_block_bfp(measure, rand, reference, check_close, block, fmt, threads, tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
    model = _model(block)
    path = tmp_path / f"{block.name}.onnx"
    path.write_bytes(model)
    sess = bfpaccel.Session(bfpaccel.compile(str(path), format=fmt), num_threads=threads)
    x = _input(rand, block)
    feeds = {"x": x}
    ref = reference(lambda: _ort(model, 1).run(["y"], feeds)[0])
    y = measure(lambda: sess.run(["y"], feeds)["y"], group=_group(block, threads), ops=block.ops, impl=fmt,
                role="bfp", format=fmt, kernel=bfpaccel.get_kernel(), **_info(block, threads))
    check_close(np.asarray(y), ref.astype(np.float64), f"bfp {fmt} MobileNetV2 {block.name}")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_mobilenet_block_ort(measure, rand, block, threads):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
    sess = _ort(_model(block), threads)
    import onnxruntime as ort
    feeds = {"x": _input(rand, block)}
    try:
        measure(lambda: sess.run(["y"], feeds), group=_group(block, threads), ops=block.ops, impl="onnxruntime fp32",
                role="baseline", format="fp32", kernel=f"onnxruntime {ort.__version__} CPUExecutionProvider",
                **_info(block, threads))
    finally:
        del sess  # stop its (spinning) worker threads before the next benchmark starts
