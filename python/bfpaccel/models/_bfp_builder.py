"""``BfpGraphBuilder``: the zoo architectures built from :mod:`bfpaccel.tf` ops, so that the
``Quantized*`` graphs compute what the compiled BFP plan of the float graph computes.

It follows what ``bfpaccel.compile`` does to the float graph: a convolution stays *pending*
until what comes after it is known, so that a following batch norm is folded into its weights
(float64, before quantization), a bias, a residual ``add`` and a ``relu`` run in its epilogue
(each rounded to the vector precision), and anything else sees its float32 accumulators.
Vector ops are the plan's (rounded, summed in the plan's order). Names the seed's users rely on
are kept: the tensor ``<scope>/Relu``, ``pool5``, ``Mean``, ``predictions/Softmax``,
``squeezed``, ``Reshape``...; the variables are the float graph's.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import tensorflow as tf

from .. import tf as btf
from ..formats import Format
from .accel_model import GraphBuilder, Getter

__all__ = ["BfpGraphBuilder"]


class _Pending:
    """A convolution whose epilogue is still open (see the module docstring)."""

    def __init__(self, b: "BfpGraphBuilder", scope: str, x: Any, w: Any, bias: Optional[Any], stride: int,
                 padding: str, dilation: int) -> None:
        self.b, self.scope = b, scope
        self.x, self.w, self.bias = x, w, bias
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.residual: Optional[Any] = None
        self.act: Optional[str] = None
        self.out: Optional[Any] = None

    @property
    def open(self) -> bool:
        return self.out is None and self.residual is None and self.act is None

    @property
    def shape(self) -> Any:
        return self.materialize().shape

    def materialize(self, name: Optional[str] = None, scope: Optional[str] = None) -> Any:
        if self.out is None:
            b = self.b
            with _abs_scope(self.scope):
                y = btf.bfp_conv2d(self.x, self.w, self.stride, self.padding, b.format, bias=self.bias,
                                   activation=self.act, residual=self.residual, dilations=self.dilation,
                                   weight_format=b.weight_format, vector_precision=b.vector_precision, seed=b.seed)
            out_scope = self.scope if scope is None else scope
            default = "BiasAdd" if self.bias is not None else "Conv2D"
            with _abs_scope(out_scope):
                self.out = tf.identity(y, name=name or default)
        return self.out


def _abs_scope(scope: str) -> Any:
    """The absolute name scope ``scope`` ("" = the root) of the default graph."""
    return tf.compat.v1.get_default_graph().name_scope(scope + "/" if scope else "")


def _convert(value: _Pending, dtype: Any = None, name: Optional[str] = None, as_ref: bool = False) -> Any:
    return value.materialize()


tf.register_tensor_conversion_function(_Pending, _convert)


class BfpGraphBuilder(GraphBuilder):
    """:class:`~bfpaccel.models.accel_model.GraphBuilder` whose layers are the compiled plan's
    BFP arithmetic (``format``, ``weight_format``, ``vector_precision``, ``seed`` as in
    ``bfpaccel.compile``).

    Example:
        >>> b = BfpGraphBuilder(getter, "msfp16")  # doctest: +SKIP
    """

    def __init__(self, getter: Getter, format: Any = "msfp16", weight_format: Any = None,
                 vector_precision: Optional[str] = None, seed: int = 0) -> None:
        super().__init__(getter)
        from ..tf import _numerics as nm

        fa, _ = nm.resolve_formats(format, weight_format)
        if fa is None:
            raise ValueError("BfpGraphBuilder needs a block format (the float graph uses GraphBuilder)")
        self.format: Format = fa
        self.weight_format = weight_format
        self.vector_precision = nm.check_vector_precision(vector_precision, fa)
        self.seed = int(seed)
        self.base: str = ""  # an outer name scope for every op (the classifier's prefix)

    # ----- scopes -------------------------------------------------------------------------
    def _here(self) -> str:
        return "/".join(([self.base] if self.base else []) + self._stack)

    def scope(self, name: str) -> Any:  # type: ignore[override]
        import contextlib

        @contextlib.contextmanager
        def cm() -> Any:
            self._stack.append(name)
            try:
                with _abs_scope(self._here()):
                    yield
            finally:
                self._stack.pop()

        return cm()

    def tensor(self, x: Any) -> Any:
        return x.materialize() if isinstance(x, _Pending) else x

    # ----- matrix ops ---------------------------------------------------------------------
    def conv(self, x: Any, cout: int, k: int, stride: int = 1, padding: str = "SAME", dilation: int = 1,
             bias: bool = True, kind: str = "conv", keras: Optional[str] = None) -> Any:
        x = self.tensor(x)
        cin = int(x.shape[-1])
        w = self.var("weights", (k, k, cin, cout), kind, (keras, 0) if keras else None)
        b = self.var("biases", (cout,), "bias", (keras, 1) if keras else None) if bias else None
        return _Pending(self, self._here(), x, w, b, stride, padding, dilation)

    def bn(self, x: Any, eps: float, kind: str = "gamma", keras: Optional[str] = None) -> Any:
        c = int(self.tensor(x).shape[-1]) if not isinstance(x, _Pending) else int(x.w.shape[-1])
        with self.scope("BatchNorm"):
            src = (lambda i: (keras, i)) if keras else (lambda i: None)
            gamma = self.var("gamma", (c,), kind, src(0))
            beta = self.var("beta", (c,), "beta", src(1))
            mean = self.var("moving_mean", (c,), "mean", src(2))
            var = self.var("moving_variance", (c,), "var", src(3))
            if isinstance(x, _Pending) and x.open:
                x.w, x.bias = btf.fold_batch_norm(x.w, x.bias, gamma, beta, mean, var, eps, name="fold")
                return x
            return btf.vector_batch_norm(self.tensor(x), gamma, beta, mean, var, eps, self.vector_precision,
                                         name="FusedBatchNormV3")

    # ----- vector ops -----------------------------------------------------------------------
    def relu(self, x: Any, name: str = "Relu") -> Any:
        if isinstance(x, _Pending) and x.out is None and x.act is None:
            x.act = "relu"
            return x.materialize(name, self._here())
        y = btf.vector_relu(self.tensor(x), self.vector_precision, name=name + "_bfp")
        return tf.identity(y, name=name)

    def add(self, a: Any, b: Any, name: str = "add") -> Any:
        if isinstance(b, _Pending) and b.open:
            b.residual = self.tensor(a)
            return b
        if isinstance(a, _Pending) and a.open:
            a.residual = self.tensor(b)
            return a
        y = btf.vector_add(self.tensor(a), self.tensor(b), self.vector_precision, name=name + "_bfp")
        return tf.identity(y, name=name)

    def pad(self, x: Any, p: int) -> Any:
        return super().pad(self.tensor(x), p)

    def max_pool(self, x: Any, k: int, s: int, padding: str = "VALID", name: str = "MaxPool") -> Any:
        return btf.vector_max_pool(self.tensor(x), k, s, padding, self.vector_precision, name=name)

    def avg_pool(self, x: Any, k: int, s: int, padding: str = "VALID", name: str = "AvgPool") -> Any:
        return btf.vector_avg_pool(self.tensor(x), k, s, padding, self.vector_precision, name=name)

    def global_mean(self, x: Any, name: str = "Mean") -> Any:
        y = btf.vector_spatial_mean(self.tensor(x), self.vector_precision, name=name + "_bfp")
        return tf.identity(y, name=name)

    def softmax(self, x: Any, name: str = "Softmax") -> Any:
        y = btf.vector_softmax(self.tensor(x), self.vector_precision, name=name + "_bfp")
        return tf.identity(y, name=name)

    def concat(self, values: Sequence[Any], axis: int, name: str = "concat") -> Any:
        return tf.concat([self.tensor(v) for v in values], axis=axis, name=name)

    def squeeze(self, x: Any, axis: Sequence[int], name: str) -> Any:
        return tf.squeeze(self.tensor(x), list(axis), name=name)

    def l2_normalize(self, x: Any, eps: float = 1e-12) -> Any:
        x = self.tensor(x)
        gamma = self.var("gamma", (int(x.shape[-1]),), "l2scale")
        y = btf.vector_l2_normalize(x, gamma, eps, self.vector_precision, name="l2_normalize")
        return tf.identity(y, name="mul")
