"""TensorFlow front end: train on what the accelerator computes.

``bfp_conv2d`` / ``bfp_matmul`` compute, bit for bit, what the compiled BFP plan
(``bfpaccel.compile`` + ``bfpaccel.Session``) computes for a float ``Conv2D`` / ``MatMul``: the
weight block-quantized as the compiler quantizes it, the activations on the fly, the C++ core's
integer block products (``bfpaccel.conv2d`` / ``bfpaccel.matmul``, run through
``tf.numpy_function``; the GIL is released meanwhile), then the plan's epilogue (bias, residual
add, ReLU, each rounded to the vector precision). The ``vector_*`` ops do the same for the
plan's vector ops (rounding, adds, pools, means, softmax, batch norm), and ``fold_batch_norm``
folds a batch norm into the matrix op before it as the compiler does. Gradients are
straight-through: those of the float op at the dequantized operands.

They work in ``tf.compat.v1`` graphs (the model zoo's ``Quantized*`` classes are built with
them), in ``tf.function`` and eagerly; ``BfpConv2D`` / ``BfpDense`` are the Keras layers. A
graph with these ops is exported with :func:`float_graph_def` (``AccelOnnxConverter`` does it
itself): each op becomes the float op whose compiled plan computes the same numbers.

TensorFlow is an optional dependency (``pip install 'bfpaccel[tf]'``): ``import bfpaccel`` and
``import bfpaccel.tf`` never import it; the ops and layers import it on first use.

Example:
    >>> import tensorflow as tf, bfpaccel.tf as btf  # doctest: +SKIP
    >>> y = btf.bfp_conv2d(tf.ones([1, 8, 8, 16]), tf.ones([3, 3, 16, 4]), padding="SAME",
    ...                    bias=tf.zeros([4]), activation="relu")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from ._numerics import VECTOR_PRECISIONS

#: public name -> submodule; the submodules import TensorFlow (layers: Keras), so they load on
#: first use and ``import bfpaccel.tf`` alone stays light.
_LAZY = {
    **{n: "_ops" for n in ("bfp_conv2d", "bfp_matmul", "fold_batch_norm", "round_to_vector_precision", "vector_add",
                           "vector_relu", "vector_max_pool", "vector_avg_pool", "vector_spatial_mean",
                           "vector_softmax", "vector_batch_norm", "vector_l2_normalize")},
    **{n: "_export" for n in ("float_graph_def", "has_bfp_ops", "bfp_op_kinds")},
    **{n: "layers" for n in ("BfpConv2D", "BfpDense", "float_keras_model")},
}

__all__ = sorted(_LAZY) + ["VECTOR_PRECISIONS"]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'bfpaccel.tf' has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{mod}")
    except ImportError as e:
        if "tensorflow" in str(e) or "keras" in str(e):
            raise ImportError(f"bfpaccel.tf.{name} needs TensorFlow: pip install 'bfpaccel[tf]' "
                              f"(or pip install tensorflow-cpu) ({e})") from e
        raise
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
