"""The runtime's ops, one module per family, each op declared once with its lowering, its numpy
folding and its plan schema (see ``_registry.py`` and ``docs/adding-an-op.md``).

=================  ==========================================================================
``matrix``         Conv, BfpDense on the BFP core (a constant-weight Gemm / MatMul is compiled into BfpDense)
``elementwise``    Add, Sub, Mul, Div, Max, Min, Pow, Sum; Relu, Clip, Sigmoid, Tanh, Gelu, ...
``normalization``  BatchNormalization (not folded into a matrix op), LayerNormalization
``pooling``        MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool
``reduce``         ReduceSum, ReduceMean, ReduceMax, ReduceMin, ReduceSumSquare, ReduceL2
``softmax``        Softmax, LogSoftmax
``recurrent``      LSTM, GRU (the time loop in C++, weights quantized once)
``shape``          Shape, Size, Reshape, Flatten, (Un)Squeeze, Transpose, Concat, Slice, ...
``matmul``         MatMul, Gemm between run-time tensors (batched, broadcast): both operands quantized
``masks``          Gather, Where, Expand, Tile, Trilu, comparisons, logic, IsNaN, IsInf at run time
``constants``      ops evaluated only on constants: Constant, Range, Gather, Where, ...
=================  ==========================================================================
"""

from ._registry import OpSpec, all_specs, declare, find, folds, lowers, supported_ops

# importing a family registers its ops
from . import constants, elementwise, matrix, normalization, pooling, reduce, shape, softmax  # noqa: E402,F401
from . import recurrent  # noqa: E402,F401
from . import masks, matmul  # noqa: E402,F401

__all__ = ["OpSpec", "lowers", "folds", "declare", "find", "all_specs", "supported_ops"]
