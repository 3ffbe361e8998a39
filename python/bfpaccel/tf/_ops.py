"""BFP ops for TensorFlow graphs: the compiled plan's numbers forward, straight-through backward.

Each op is a ``tf.numpy_function`` (a ``PyFunc`` node in a graph) over
:mod:`bfpaccel.tf._numerics` -- the C++ core's quantized matrix products (the GIL is released
while they run) and the plan's vector arithmetic -- wrapped in ``tf.custom_gradient``. The
gradients are those of the float op: for a matrix op, evaluated at the *dequantized* operands
(the values the BFP datapath multiplies); roundings to the vector precision pass the gradient
unchanged (straight-through). In graph mode the ``PyFunc`` node carries ``_bfpaccel_*``
attributes naming the op and its parameters, so :func:`bfpaccel.tf.float_graph_def` can turn it
back into the float TensorFlow op (``PyFunc`` cannot be exported to ONNX).

Works in TF1 graphs (``tf.compat.v1``), inside ``tf.function`` and eagerly.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2

from ..formats import Format
from . import _numerics as nm

__all__ = [
    "bfp_conv2d",
    "bfp_matmul",
    "round_to_vector_precision",
    "vector_add",
    "vector_relu",
    "vector_max_pool",
    "vector_avg_pool",
    "vector_spatial_mean",
    "vector_softmax",
    "vector_batch_norm",
    "vector_l2_normalize",
    "fold_batch_norm",
    "ATTR_PREFIX",
]

#: Prefix of the attributes a BFP ``PyFunc`` node carries (``_bfpaccel_op`` names its kind).
ATTR_PREFIX = "_bfpaccel_"
FormatLike = Union[str, Format, None]
ACTIVATIONS = (None, "relu")


# ----------------------------------------------------------------------------- plumbing
def _attr(v: Any) -> attr_value_pb2.AttrValue:
    if isinstance(v, bool):
        return attr_value_pb2.AttrValue(b=v)
    if isinstance(v, (int, np.integer)):
        return attr_value_pb2.AttrValue(i=int(v))
    if isinstance(v, (float, np.floating)):
        return attr_value_pb2.AttrValue(f=float(v))
    if isinstance(v, str):
        return attr_value_pb2.AttrValue(s=v.encode())
    return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(i=[int(t) for t in v]))


def _pyfunc(fn: Callable[..., Any], inputs: Sequence[Any], n_out: int, shapes: Sequence[Any], kind: str,
            attrs: Dict[str, Any]) -> List[Any]:
    """``tf.numpy_function(fn)`` with static output shapes and, in a graph, the ``_bfpaccel_*``
    attributes on its node."""
    outs = tf.numpy_function(fn, list(inputs), [tf.float32] * n_out, name=kind)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    for t, s in zip(outs, shapes):
        t.set_shape(s)
    if not tf.executing_eagerly():
        op = outs[0].op
        op._set_attr(ATTR_PREFIX + "op", _attr(kind))
        for k, v in attrs.items():
            op._set_attr(ATTR_PREFIX + k, _attr(v))
    return outs


def _vjp(fn: Callable[..., Any], inputs: Sequence[Any], dy: Any) -> List[Any]:
    """Gradients of ``fn(*inputs)`` with upstream ``dy`` (graph or eager)."""
    inputs = list(inputs)
    if tf.executing_eagerly():
        with tf.GradientTape() as tape:
            for t in inputs:
                tape.watch(t)
            y = fn(*inputs)
        grads = tape.gradient(y, inputs, output_gradients=dy)
    else:
        grads = tf.gradients(fn(*inputs), inputs, grad_ys=dy)
    return [g if g is not None else tf.zeros_like(t) for g, t in zip(grads, inputs)]


def _ste(forward: Callable[..., Any], backward: Callable[..., Any], inputs: Sequence[Any]) -> Any:
    """``forward(*inputs)`` with ``backward(inputs, outputs, upstream)`` as its gradient."""

    @tf.custom_gradient
    def op(*xs: Any) -> Any:
        ys = forward(*xs)

        def grad(*dys: Any) -> Any:
            return backward(xs, ys, dys[0] if len(dys) == 1 else dys)

        return ys, grad

    return op(*inputs)


def _f32(t: Any, what: str) -> Any:
    t = tf.convert_to_tensor(t)
    if not t.dtype.is_floating:
        raise TypeError(f"{what} must be a float tensor, got {t.dtype.name}")
    return tf.cast(t, tf.float32) if t.dtype != tf.float32 else t


def _check_activation(activation: Optional[str]) -> Optional[str]:
    a = activation.lower() if isinstance(activation, str) else activation
    if a == "linear":
        a = None
    if a not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu' (the plan fuses only ReLU into a matrix op), "
                         f"got {activation!r}")
    return a


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 1 << 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def _block_formats(fa: Optional[Format], fw: Optional[Format]) -> Tuple[Format, Format]:
    if fa is None or fw is None:  # pragma: no cover - the callers return the float ops first
        raise ValueError("a block format is needed here")
    return fa, fw


def _fmt_name(f: Format) -> str:
    return f.name or str(f)


def _tf_padding(padding: Any) -> Tuple[Any, str, List[int]]:
    """(padding for tf.nn.conv2d, attribute string, explicit [t, b, l, r])."""
    if isinstance(padding, str):
        p = padding.upper()
        if p not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID' or explicit numbers, got {padding!r}")
        return p, p, []
    t, left, b, r = nm._explicit_pads(padding)
    return [[0, 0], [t, b], [left, r], [0, 0]], "EXPLICIT", [t, b, left, r]


# ----------------------------------------------------------------------------- matrix ops
def bfp_conv2d(x: Any, w: Any, strides: Any = 1, padding: Any = "VALID", format: FormatLike = "msfp16", *,
               bias: Any = None, activation: Optional[str] = None, residual: Any = None, dilations: Any = 1,
               weight_format: FormatLike = None, rounding: Optional[str] = None,
               vector_precision: Optional[str] = None, seed: int = 0, name: Optional[str] = None) -> Any:
    """2-D convolution (NHWC ``x``, HWIO ``w``, TensorFlow's layouts) computed as the compiled
    BFP plan computes a ``Conv``: ``w`` quantized once in ``weight_format`` (default
    ``format``) blocked along input channels, ``x`` per pixel along channels, integer block
    products with float32 accumulation (``bfpaccel.conv2d``), then the plan's epilogue --
    ``+ bias``, ``+ residual``, ``relu`` -- each rounded to ``vector_precision`` (default
    ``fp16``; without bias, residual or activation the accumulators come back unrounded).

    ``strides`` / ``dilations``: int, ``(h, w)`` or ``[1, h, w, 1]``. ``padding``: ``"SAME"``,
    ``"VALID"``, an int, ``(ph, pw)``, ``((top, bottom), (left, right))`` or TF's explicit
    ``[[0, 0], [t, b], [l, r], [0, 0]]``. ``format=None`` / ``"fp32"``: the float ops.

    Backward: straight-through -- the float convolution's gradients at the dequantized
    ``x`` and ``w``; ReLU masks with the output; the bias gets the summed gradient.

    Caveat: with stochastic rounding the activations' random bits are drawn on NCHW element
    indices while the plan draws them on NHWC ones (same distribution, other draws).

    Example:
        >>> y = bfp_conv2d(tf.ones([1, 8, 8, 16]), tf.ones([3, 3, 16, 4]), padding="SAME", bias=tf.zeros([4]))
        >>> y.shape, float(y[0, 4, 4, 0]), float(y[0, 0, 0, 0])
        (TensorShape([1, 8, 8, 4]), 144.0, 64.0)
    """
    fa, fw = nm.resolve_formats(format, weight_format, rounding)
    vp = nm.check_vector_precision(vector_precision, fa)
    act = _check_activation(activation)
    seed = _check_seed(seed)
    stride = nm._pair(strides, "strides")
    dil = nm._pair(dilations, "dilations")
    tf_pad, pad_attr, explicit = _tf_padding(padding)
    with tf.name_scope(name or "bfp_conv2d"):
        x = _f32(x, "x")
        w = _f32(w, "w")
        if x.shape.rank not in (None, 4) or w.shape.rank not in (None, 4):
            raise ValueError(f"bfp_conv2d takes NHWC x and HWIO w, got shapes {x.shape} and {w.shape}")
        if x.shape.rank == 4 and w.shape.rank == 4 and None not in (x.shape[3], w.shape[2]) \
                and x.shape[3] != w.shape[2]:
            raise ValueError(f"x has {x.shape[3]} channels, the HWIO weight expects {w.shape[2]}")
        b = _f32(bias, "bias") if bias is not None else None
        res = _f32(residual, "residual") if residual is not None else None

        def float_conv(xx: Any, ww: Any) -> Any:
            return tf.nn.conv2d(xx, ww, strides=[1, *stride, 1], padding=tf_pad, dilations=[1, *dil, 1])

        if fa is None:  # the float graph
            y = float_conv(x, w)
            if b is not None:
                y = tf.nn.bias_add(y, b)
            if res is not None:
                y = y + res
            return tf.nn.relu(y) if act == "relu" else y

        fa_, fw_ = _block_formats(fa, fw)
        out_shape = _conv_out_shape(x, w, stride, dil, padding)
        has_b, has_r = b is not None, res is not None

        cache = nm.LastValueCache()  # the quantized weight, until the weight changes

        def np_forward(xv: np.ndarray, wv: np.ndarray, *rest: np.ndarray) -> np.ndarray:
            rest_l = list(rest)
            bv = rest_l.pop(0) if has_b else None
            rv = rest_l.pop(0) if has_r else None
            cw = cache.get([wv], lambda: nm.conv_weight(wv, fw_, seed))
            return nm.conv2d_nhwc(xv, cw, fa_, fw_, stride, padding, dil, bv, rv, act, vp, seed)

        def np_dequant(xv: np.ndarray, wv: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
            return nm.dequantized_conv_operands(xv, wv, fa_, fw_, seed)

        attrs = dict(strides=list(stride), padding=pad_attr, explicit_paddings=explicit, dilations=list(dil),
                     has_bias=has_b, has_residual=has_r, activation=act or "", format=_fmt_name(fa_),
                     weight_format=_fmt_name(fw_), vector_precision=vp, seed=seed)
        inputs = [x, w] + ([b] if has_b else []) + ([res] if has_r else [])

        def forward(*xs: Any) -> Any:
            return _pyfunc(np_forward, xs, 1, [out_shape], "conv2d", attrs)[0]

        def backward(xs: Sequence[Any], y: Any, dy: Any) -> List[Any]:
            dz = dy * tf.cast(y > 0, dy.dtype) if act == "relu" else dy
            xd, wd = tf.numpy_function(np_dequant, [xs[0], xs[1]], [tf.float32, tf.float32])
            xd.set_shape(xs[0].shape)
            wd.set_shape(xs[1].shape)
            grads = _vjp(float_conv, [xd, wd], dz)
            if has_b:
                grads.append(tf.reduce_sum(dz, axis=[0, 1, 2]))
            if has_r:
                grads.append(dz)
            return grads

        return _ste(forward, backward, inputs)


def _conv_out_shape(x: Any, w: Any, stride: Tuple[int, int], dil: Tuple[int, int], padding: Any) -> List[Any]:
    n = x.shape[0] if x.shape.rank == 4 else None
    o = w.shape[3] if w.shape.rank == 4 else None
    if x.shape.rank != 4 or w.shape.rank != 4 or None in (w.shape[0], w.shape[1]):
        return [n, None, None, o]
    h, wd = x.shape[1], x.shape[2]
    kh, kw = int(w.shape[0]), int(w.shape[1])
    if isinstance(padding, str) and padding.upper() == "SAME":
        return [n, None if h is None else -(-h // stride[0]), None if wd is None else -(-wd // stride[1]), o]
    pt, pl, pb, pr = nm.conv_pads(padding, (h or 0, wd or 0), (kh, kw), stride, dil)
    return [n, nm.conv_out_size(h, kh, stride[0], dil[0], pt, pb), nm.conv_out_size(wd, kw, stride[1], dil[1], pl, pr),
            o]


def bfp_matmul(x: Any, w: Any, format: FormatLike = "msfp16", *, bias: Any = None, activation: Optional[str] = None,
               residual: Any = None, weight_format: FormatLike = None, rounding: Optional[str] = None,
               vector_precision: Optional[str] = None, seed: int = 0, name: Optional[str] = None) -> Any:
    """``x [..., K] @ w [K, N]`` computed as the compiled plan computes a ``MatMul`` / ``Gemm``
    with a constant weight (a dense layer): ``w`` quantized as the plan quantizes it (blocked
    along ``K``), ``x`` along ``K`` (``bfpaccel.matmul``), float32 accumulation, then the
    epilogue (``+ bias``, ``+ residual``, ``relu``, each rounded to ``vector_precision``; none
    of them: unrounded). ``format=None`` / ``"fp32"``: the float ops. Backward:
    straight-through (the float product's gradients at the dequantized operands).

    Example:
        >>> bfp_matmul(tf.ones([2, 32]) * 0.1, tf.ones([32, 3])).numpy()[0]  # 0.1 in msfp16: 0.099609375
        array([3.1875, 3.1875, 3.1875], dtype=float32)
    """
    fa, fw = nm.resolve_formats(format, weight_format, rounding)
    vp = nm.check_vector_precision(vector_precision, fa)
    act = _check_activation(activation)
    seed = _check_seed(seed)
    with tf.name_scope(name or "bfp_matmul"):
        x = _f32(x, "x")
        w = _f32(w, "w")
        if w.shape.rank not in (None, 2) or (x.shape.rank is not None and x.shape.rank < 2):
            raise ValueError(f"bfp_matmul takes x [..., K] and w [K, N], got shapes {x.shape} and {w.shape}")
        if x.shape.rank is not None and w.shape.rank == 2 and None not in (x.shape[-1], w.shape[0]) \
                and x.shape[-1] != w.shape[0]:
            raise ValueError(f"K mismatch: x is {x.shape}, w is {w.shape}")
        b = _f32(bias, "bias") if bias is not None else None
        res = _f32(residual, "residual") if residual is not None else None

        def float_mm(xx: Any, ww: Any) -> Any:
            return tf.tensordot(xx, ww, axes=[[xx.shape.rank - 1], [0]]) if xx.shape.rank != 2 else tf.matmul(xx, ww)

        if fa is None:
            y = float_mm(x, w)
            if b is not None:
                y = tf.nn.bias_add(y, b)
            if res is not None:
                y = y + res
            return tf.nn.relu(y) if act == "relu" else y

        fa_, fw_ = _block_formats(fa, fw)
        n_out = w.shape[1] if w.shape.rank == 2 else None
        out_shape = (x.shape[:-1].concatenate([n_out]) if x.shape.rank is not None else tf.TensorShape(None))
        has_b, has_r = b is not None, res is not None

        cache = nm.LastValueCache()

        def np_forward(xv: np.ndarray, wv: np.ndarray, *rest: np.ndarray) -> np.ndarray:
            rest_l = list(rest)
            bv = rest_l.pop(0) if has_b else None
            rv = rest_l.pop(0) if has_r else None
            q = cache.get([wv], lambda: nm.dense_weight(wv, fw_, seed))
            return nm.dense(xv, q, fa_, fw_, bv, rv, act, vp, seed)

        def np_dequant(xv: np.ndarray, wv: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
            return nm.dequantized_dense_operands(xv, wv, fa_, fw_, seed)

        attrs = dict(has_bias=has_b, has_residual=has_r, activation=act or "", format=_fmt_name(fa_),
                     weight_format=_fmt_name(fw_), vector_precision=vp, seed=seed)
        inputs = [x, w] + ([b] if has_b else []) + ([res] if has_r else [])

        def forward(*xs: Any) -> Any:
            return _pyfunc(np_forward, xs, 1, [out_shape], "matmul", attrs)[0]

        def backward(xs: Sequence[Any], y: Any, dy: Any) -> List[Any]:
            dz = dy * tf.cast(y > 0, dy.dtype) if act == "relu" else dy
            xd, wd = tf.numpy_function(np_dequant, [xs[0], xs[1]], [tf.float32, tf.float32])
            xd.set_shape(xs[0].shape)
            wd.set_shape(xs[1].shape)
            k = tf.shape(xd)[-1]
            nn = tf.shape(wd)[1]
            x2 = tf.reshape(xd, [-1, k])
            dz2 = tf.reshape(dz, [-1, nn])
            grads = [tf.reshape(tf.matmul(dz2, wd, transpose_b=True), tf.shape(xs[0])),
                     tf.matmul(x2, dz2, transpose_a=True)]
            if has_b:
                grads.append(tf.reduce_sum(dz2, axis=0))
            if has_r:
                grads.append(dz)
            return grads

        return _ste(forward, backward, inputs)


# ----------------------------------------------------------------------------- vector ops
def _unary_vector(x: Any, np_fn: Callable[[np.ndarray], np.ndarray], float_fn: Callable[[Any], Any], kind: str,
                  attrs: Dict[str, Any], shape: Any, name: Optional[str]) -> Any:
    with tf.name_scope(name or kind):
        x = _f32(x, "x")

        def forward(xx: Any) -> Any:
            return _pyfunc(np_fn, [xx], 1, [shape if shape is not None else xx.shape], kind, attrs)[0]

        def backward(xs: Sequence[Any], y: Any, dy: Any) -> List[Any]:
            return _vjp(float_fn, [xs[0]], dy)

        return _ste(forward, backward, [x])


def round_to_vector_precision(x: Any, vector_precision: str = "fp16", name: Optional[str] = None) -> Any:
    """``x`` rounded to the vector precision as the plan rounds a vector op's result (the
    gradient passes unchanged). ``"fp32"`` returns ``x``."""
    vp = nm.check_vector_precision(vector_precision, None)
    if vp == "fp32":
        return tf.convert_to_tensor(x)
    return _unary_vector(x, lambda v: nm.round_vp(v, vp), tf.identity, "round", {"vector_precision": vp}, None,
                         name)


def vector_add(a: Any, b: Any, vector_precision: str = "fp16", name: Optional[str] = None) -> Any:
    """``round(a + b)`` (an ``Add`` vector op of the plan; broadcasting as ``tf.add``)."""
    vp = nm.check_vector_precision(vector_precision, None)
    with tf.name_scope(name or "add"):
        a = _f32(a, "a")
        b = _f32(b, "b")
        shape = tf.broadcast_static_shape(a.shape, b.shape)

        def forward(aa: Any, bb: Any) -> Any:
            return _pyfunc(lambda u, v: nm.add(u, v, vp), [aa, bb], 1, [shape], "add",
                           {"vector_precision": vp})[0]

        def backward(xs: Sequence[Any], y: Any, dy: Any) -> List[Any]:
            return _vjp(tf.add, list(xs), dy)

        return _ste(forward, backward, [a, b])


def vector_relu(x: Any, vector_precision: str = "fp16", name: Optional[str] = None) -> Any:
    """The plan's ``Relu`` vector op (``-0`` becomes ``+0``, NaN stays), rounded."""
    vp = nm.check_vector_precision(vector_precision, None)
    return _unary_vector(x, lambda v: nm.round_vp(nm.relu(v), vp), tf.nn.relu, "relu", {"vector_precision": vp},
                         None, name)


def vector_max_pool(x: Any, ksize: Any, strides: Any, padding: str = "VALID", vector_precision: str = "fp16",
                    name: Optional[str] = None) -> Any:
    """Max pooling (NHWC; exact in TensorFlow) with the plan's rounding of its result."""
    vp = nm.check_vector_precision(vector_precision, None)
    with tf.name_scope(name or "max_pool"):
        y = tf.nn.max_pool2d(_f32(x, "x"), list(nm._pair(ksize, "ksize")), list(nm._pair(strides, "strides")),
                             padding, name="MaxPool")
        return round_to_vector_precision(y, vp)


def vector_avg_pool(x: Any, ksize: Any, strides: Any, padding: str = "VALID", vector_precision: str = "fp16",
                    name: Optional[str] = None) -> Any:
    """Average pooling (NHWC) summed and divided as the plan does it, rounded."""
    vp = nm.check_vector_precision(vector_precision, None)
    k, s = nm._pair(ksize, "ksize"), nm._pair(strides, "strides")
    pad = padding.upper()
    if pad not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    x = _f32(x, "x")
    shape: Any = None
    if x.shape.rank == 4:
        h, w = x.shape[1], x.shape[2]
        if pad == "SAME":
            oh = None if h is None else -(-h // s[0])
            ow = None if w is None else -(-w // s[1])
        else:
            oh = None if h is None else (h - k[0]) // s[0] + 1
            ow = None if w is None else (w - k[1]) // s[1] + 1
        shape = [x.shape[0], oh, ow, x.shape[3]]
    return _unary_vector(x, lambda v: nm.avg_pool(v, k, s, pad, vp),
                         lambda t: tf.nn.avg_pool2d(t, list(k), list(s), pad), "avg_pool",
                         {"ksize": list(k), "strides": list(s), "padding": pad, "vector_precision": vp}, shape, name)


def vector_spatial_mean(x: Any, vector_precision: str = "fp16", name: Optional[str] = None) -> Any:
    """NHWC -> [N, 1, 1, C], the plan's ``ReduceMean`` over H and W (summed in pixel order)."""
    vp = nm.check_vector_precision(vector_precision, None)
    x = _f32(x, "x")
    shape = [x.shape[0], 1, 1, x.shape[3]] if x.shape.rank == 4 else None
    return _unary_vector(x, lambda v: nm.spatial_mean(v, vp),
                         lambda t: tf.reduce_mean(t, axis=[1, 2], keepdims=True), "spatial_mean",
                         {"vector_precision": vp}, shape, name)


def vector_softmax(x: Any, vector_precision: str = "fp16", name: Optional[str] = None) -> Any:
    """Softmax over the last axis as the plan computes it (the vector unit's ``exp``, sums in order),
    rounded."""
    vp = nm.check_vector_precision(vector_precision, None)
    return _unary_vector(x, lambda v: nm.softmax(v, vp), tf.nn.softmax, "softmax", {"vector_precision": vp}, None,
                         name)


def _bn_float(x: Any, gamma: Any, beta: Any, mean: Any, var: Any, eps: float) -> Any:
    s = gamma * tf.math.rsqrt(var + eps)
    return x * s + (beta - mean * s)


def vector_batch_norm(x: Any, gamma: Any, beta: Any, mean: Any, variance: Any, epsilon: float,
                      vector_precision: str = "fp16", name: Optional[str] = None) -> Any:
    """Inference batch norm over the last axis that the plan runs as an affine vector op (one
    not folded into a matrix op): ``round(x * s + t)``, ``s``/``t`` from float64. Gradients: the
    float formula's for ``x``, ``gamma``, ``beta``; none for the moving mean and variance."""
    vp = nm.check_vector_precision(vector_precision, None)
    eps = float(epsilon)
    with tf.name_scope(name or "batch_norm"):
        ins = [_f32(x, "x")] + [_f32(v, "batch-norm parameter") for v in (gamma, beta, mean, variance)]

        def np_affine(xv: np.ndarray, g: np.ndarray, bt: np.ndarray, m: np.ndarray, v: np.ndarray) -> np.ndarray:
            return nm.affine(xv, g, bt, m, v, eps, vp)

        def forward(*xs: Any) -> Any:
            return _pyfunc(np_affine, xs, 1, [xs[0].shape], "batch_norm", {"epsilon": eps, "vector_precision": vp})[0]

        def backward(xs: Sequence[Any], y: Any, dy: Any) -> List[Any]:
            # as TF's inference batch norm: no gradient for the moving mean and variance
            return _vjp(lambda xx, g, bt, m, v: _bn_float(xx, g, bt, m, v, eps), list(xs), dy)[:3] + [None, None]

        return _ste(forward, backward, ins)


def fold_batch_norm(w: Any, b: Any, gamma: Any, beta: Any, mean: Any, variance: Any, epsilon: float,
                    name: Optional[str] = None) -> Tuple[Any, Any]:
    """``(w', b')``: batch norm folded into the matrix op before it, as ``bfpaccel.compile``
    folds it (float64, then float32); ``w``'s last axis is the output channel (HWIO or
    ``[K, N]``), ``b`` may be None. Gradients: those of the float formula for ``w``, ``b``,
    ``gamma`` and ``beta``; none for the moving mean and variance (as TF's inference batch norm)."""
    eps = float(epsilon)
    with tf.name_scope(name or "fold_batch_norm"):
        wt = _f32(w, "w")
        params = [_f32(v, "batch-norm parameter") for v in (gamma, beta, mean, variance)]
        has_b = b is not None
        ins = [wt] + ([_f32(b, "b")] if has_b else []) + params

        cache = nm.LastValueCache()

        def np_fold(*arrays: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
            r = list(arrays)
            bv = r.pop(1) if has_b else None
            wv, g, bt, m, v = r
            return cache.get(list(arrays), lambda: nm.fold_batch_norm(wv, bv, g, bt, m, v, eps))

        def float_fold(wv: Any, *rest: Any) -> Tuple[Any, Any]:
            r = list(rest)
            bv = r.pop(0) if has_b else tf.zeros_like(r[0])
            g, bt, m, v = r
            s = g * tf.math.rsqrt(v + eps)
            return wv * s, (bv - m) * s + bt

        def forward(*xs: Any) -> Any:
            return tuple(_pyfunc(np_fold, xs, 2, [xs[0].shape, params[0].shape], "fold_batch_norm",
                                 {"epsilon": eps, "has_bias": has_b}))

        def backward(xs: Sequence[Any], ys: Any, dys: Any) -> List[Any]:
            dw, db = dys
            xs = list(xs)
            if tf.executing_eagerly():
                with tf.GradientTape() as tape:
                    for t in xs:
                        tape.watch(t)
                    outs = float_fold(*xs)
                grads = tape.gradient(list(outs), xs, output_gradients=[dw, db])
            else:
                grads = tf.gradients(list(float_fold(*xs)), xs, grad_ys=[dw, db])
            out = [g if g is not None else tf.zeros_like(t) for g, t in zip(grads, xs)]
            # as TF's inference batch norm: no gradient for the moving mean and variance
            return out[:-2] + [None, None]

        w2, b2 = _ste(forward, backward, ins)
        return w2, b2


def vector_l2_normalize(x: Any, gamma: Any, epsilon: float = 1e-12, vector_precision: str = "fp16",
                        name: Optional[str] = None) -> Any:
    """Channel L2 normalisation with a per-channel scale (SSD's conv4_3), ``x * rsqrt(max(sum
    x^2, eps)) * gamma``, as the plan runs the ops the converter makes of it (Mul, ReduceSum,
    Max, Sqrt, Reciprocal, then ``x * (r * gamma)``), each rounded."""
    vp = nm.check_vector_precision(vector_precision, None)
    eps = float(epsilon)
    with tf.name_scope(name or "l2_normalize"):
        ins = [_f32(x, "x"), _f32(gamma, "gamma")]

        def float_fn(xx: Any, g: Any) -> Any:
            inv = tf.math.rsqrt(tf.maximum(tf.reduce_sum(tf.square(xx), axis=-1, keepdims=True), eps))
            return xx * inv * g

        def forward(*xs: Any) -> Any:
            return _pyfunc(lambda u, g: nm.l2_normalize(u, g, eps, vp), xs, 1, [xs[0].shape], "l2_normalize",
                           {"epsilon": eps, "vector_precision": vp})[0]

        def backward(xs: Sequence[Any], y: Any, dy: Any) -> List[Any]:
            return _vjp(float_fn, list(xs), dy)

        return _ste(forward, backward, ins)
