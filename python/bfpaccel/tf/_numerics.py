"""The compiled plan's arithmetic, op by op, in numpy and the C++ core (no TensorFlow here).

``bfpaccel.compile`` + ``bfpaccel.Session`` compute a network as

* **matrix ops** (Conv, Gemm/MatMul with a constant weight): the weight is block-quantized once
  (OIHW, blocked along input channels at each tap; a dense ``[N, K]`` weight along ``K``), the
  activations at run time (per pixel, along channels), integer block products, float32
  accumulation -- :func:`bfpaccel.conv2d` / :func:`bfpaccel.matmul`, bit for bit;
* the matrix op's **epilogue**: bias, then a residual ``Add``, then ``Relu``, each rounded to
  the vector precision (``fp16`` by default) as the separate vector ops would be; a matrix op
  without any of them hands its float32 accumulators on unrounded;
* batch norm after a matrix op **folded** into it in float64 before the weight is quantized
  (``W * gamma / sqrt(var + eps)``, the shift joins the bias); any other batch norm is an affine
  vector op ``round(x * s + t)`` with ``s``, ``t`` from the same float64 formula;
* **vector ops** in float32, each result rounded to the vector precision: reductions and pools
  sum in order (first element first), softmax with the vector unit's own float32 ``exp``
  (:mod:`bfpaccel.vmath`).

Each function here reproduces one of these exactly, so a TensorFlow graph made of them
computes what the plan computes. Rounding to the vector precision is the runtime's own
``round_vector``.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import _core  # type: ignore[attr-defined]
from .. import core
from ..formats import VECTOR_PRECISIONS, Format, get_format, vector_precision_code

__all__ = [
    "VECTOR_PRECISIONS",
    "resolve_formats",
    "check_vector_precision",
    "round_vp",
    "conv_pads",
    "conv_out_size",
    "epilogue",
    "conv_weight",
    "conv2d_nhwc",
    "dense_weight",
    "dense",
    "LastValueCache",
    "dequantized_conv_operands",
    "dequantized_dense_operands",
    "fold_batch_norm",
    "batch_norm_scale_shift",
    "affine",
    "add",
    "relu",
    "spatial_mean",
    "avg_pool",
    "max_pool_round",
    "softmax",
    "l2_normalize",
    "expf",
]

#: Vector precisions of the plan (``bfpaccel.compile(vector_precision=...)``).
F32 = np.float32

Padding = Union[str, int, Sequence]


# ----------------------------------------------------------------------------- arguments
def resolve_formats(format: Union[str, Format, None], weight_format: Union[str, Format, None] = None,
                    rounding: Optional[str] = None) -> Tuple[Optional[Format], Optional[Format]]:
    """``(activation format, weight format)`` as ``bfpaccel.compile`` resolves them; ``(None,
    None)`` for ``None`` / ``"fp32"`` (the float graph). Raises ValueError for other IEEE types
    (matrix ops run on a block format or fp32) and for block sizes that differ."""
    if format is None:
        if weight_format is not None:
            raise ValueError("weight_format needs a block format (format=None is the float graph)")
        return None, None
    fa = get_format(format, rounding=rounding)
    if not fa.is_block:
        if fa.element != "fp32":
            raise ValueError(f"matrix ops run on a block format or fp32, not {fa.element}")
        if weight_format is not None and not get_format(weight_format).element == "fp32":
            raise ValueError("with format='fp32' (the float graph) weight_format must be None or 'fp32'")
        return None, None
    fw = get_format(weight_format, rounding=rounding) if weight_format is not None else fa
    if not fw.is_block:
        raise ValueError(f"weight_format {fw.name or fw.element} is not a block format")
    if fw.block_size != fa.block_size:
        raise ValueError(f"weight format {fw} must have the same block size as the activation format {fa}")
    return fa, fw


def check_vector_precision(vp: Optional[str], fa: Optional[Format]) -> str:
    """``vp`` normalised (default: ``fp16`` with a block format, ``fp32`` for the float graph)."""
    if vp is None:
        return "fp16" if fa is not None else "fp32"
    v = str(vp).strip().lower() if isinstance(vp, str) else None
    if v not in VECTOR_PRECISIONS:
        raise ValueError(f"vector_precision must be one of {', '.join(VECTOR_PRECISIONS)}, got {vp!r}")
    return v


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=F32)


def round_vp(x: np.ndarray, vp: str) -> np.ndarray:
    """``x`` rounded to the vector precision (nearest even; fp16 overflows to Inf), as the
    runtime rounds every vector op's result; ``fp32`` leaves it as it is."""
    x = _f32(x)
    if vp == "fp32":
        return x
    return _core.round_vector(x, vector_precision_code(vp))


# ----------------------------------------------------------------------------- geometry
def _pair(v: Union[int, Sequence[int]], what: str) -> Tuple[int, int]:
    if isinstance(v, bool):
        raise ValueError(f"{what} must be an int, (h, w) or [1, h, w, 1], got {v!r}")
    if isinstance(v, (int, np.integer)):
        a = b = int(v)
    else:
        s = [int(t) for t in v]
        if len(s) == 4:  # TF's [1, h, w, 1]
            if s[0] != 1 or s[3] != 1:
                raise ValueError(f"{what} {list(v)}: only the spatial entries may differ from 1")
            s = s[1:3]
        if len(s) != 2:
            raise ValueError(f"{what} must be an int, (h, w) or [1, h, w, 1], got {v!r}")
        a, b = s
    if a < 1 or b < 1:
        raise ValueError(f"{what} must be >= 1, got {v!r}")
    return a, b


def conv_pads(padding: Padding, in_hw: Tuple[int, int], kernel: Tuple[int, int], stride: Tuple[int, int],
              dilation: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """ONNX-order pads ``(top, left, bottom, right)`` for a TF ``padding``: ``"VALID"``,
    ``"SAME"`` (TF's: the odd pixel at the bottom/right), an int, ``(ph, pw)``,
    ``((top, bottom), (left, right))`` or TF's explicit ``[[0,0],[t,b],[l,r],[0,0]]``."""
    if isinstance(padding, str):
        p = padding.upper()
        if p == "VALID":
            return 0, 0, 0, 0
        if p != "SAME":
            raise ValueError(f"padding must be 'SAME', 'VALID' or explicit numbers, got {padding!r}")
        out = []
        for d in range(2):
            o = -(-in_hw[d] // stride[d])
            total = max(0, (o - 1) * stride[d] + dilation[d] * (kernel[d] - 1) + 1 - in_hw[d])
            out.append((total // 2, total - total // 2))
        return out[0][0], out[1][0], out[0][1], out[1][1]
    return _explicit_pads(padding)


def _explicit_pads(padding: Padding) -> Tuple[int, int, int, int]:
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool):
        p = int(padding)
        t = (p, p, p, p)
    else:
        try:
            items: List[Any] = [x for x in padding]  # type: ignore[union-attr]
            if len(items) == 4 and all(np.ndim(x) == 1 and len(x) == 2 for x in items):
                if any(int(v) for v in list(items[0]) + list(items[3])):
                    raise ValueError("batch and channel padding must be 0")
                (a, b), (c, d) = items[1], items[2]
                t = (int(a), int(c), int(b), int(d))
            elif len(items) == 2 and all(np.ndim(x) == 1 and len(x) == 2 for x in items):
                (a, b), (c, d) = items
                t = (int(a), int(c), int(b), int(d))
            elif len(items) == 2 and all(np.ndim(x) == 0 for x in items):
                t = (int(items[0]), int(items[1]), int(items[0]), int(items[1]))
            else:
                raise ValueError("unrecognised layout")
        except (TypeError, ValueError) as e:
            raise ValueError(f"padding must be 'SAME', 'VALID', an int, (ph, pw), ((top, bottom), (left, right)) or "
                             f"[[0, 0], [top, bottom], [left, right], [0, 0]]; got {padding!r} ({e})") from None
    if min(t) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return t


def conv_out_size(n: Optional[int], k: int, s: int, d: int, p0: int, p1: int) -> Optional[int]:
    """Output length of one spatial axis (None when the input length is unknown)."""
    if n is None:
        return None
    return (n + p0 + p1 - d * (k - 1) - 1) // s + 1


# ----------------------------------------------------------------------------- weight cache
class LastValueCache:
    """Remembers the value computed from the last inputs seen (by a 128-bit BLAKE2 digest of
    their bytes, shapes and dtypes): an op whose weights did not change since its last run
    reuses their quantized (or folded) form. Thread-safe.

    Example:
        >>> c = LastValueCache()
        >>> w = np.ones(4, np.float32)
        >>> c.get([w], lambda: "q1"), c.get([w], lambda: "q2"), c.get([w + 1], lambda: "q3")
        ('q1', 'q1', 'q3')
    """

    def __init__(self) -> None:
        self._key: Optional[Tuple[Any, ...]] = None
        self._value: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def _digest(arrays: Sequence[Optional[np.ndarray]]) -> Tuple[Any, ...]:
        out: List[Any] = []
        for a in arrays:
            if a is None:
                out.append(None)
                continue
            a = np.ascontiguousarray(a)
            raw = a.reshape(-1).view(np.uint8)
            out.append((a.shape, a.dtype.str, hashlib.blake2b(raw.data, digest_size=16).digest()))
        return tuple(out)

    def get(self, arrays: Sequence[Optional[np.ndarray]], compute: Callable[[], Any]) -> Any:
        key = self._digest(arrays)
        with self._lock:
            if key == self._key:
                return self._value
            value = compute()
            self._key, self._value = key, value
            return value


# ----------------------------------------------------------------------------- matrix ops
def relu(y: np.ndarray) -> np.ndarray:
    """The runtime's ReLU: ``x > 0 ? x : (NaN stays NaN, else +0)``."""
    y = _f32(y)
    return np.where(y > 0, y, np.where(np.isnan(y), y, F32(0))).astype(F32)


def epilogue(acc: np.ndarray, bias: Optional[np.ndarray], residual: Optional[np.ndarray], activation: Optional[str],
             vp: str) -> np.ndarray:
    """The matrix op's epilogue as the runtime applies it: ``y = round(acc + bias)``, then
    ``round(y + residual)``, then ``round(relu(y))`` (each step only when present); with none
    of them the float32 accumulators come back unrounded."""
    y = _f32(acc)
    if bias is not None:
        y = round_vp(np.add(y, _f32(bias).reshape(-1), dtype=F32), vp)
    if residual is not None:
        y = round_vp(np.add(y, _f32(residual), dtype=F32), vp)
    if activation == "relu":
        y = round_vp(relu(y), vp)
    elif activation is not None:
        raise ValueError(f"unsupported fused activation {activation!r} (None or 'relu')")
    return y


def conv_weight(w: np.ndarray, fw: Format, seed: int = 0) -> core.ConvWeight:
    """An HWIO weight quantized as ``bfpaccel.compile`` quantizes the OIHW ``Conv`` weight
    (blocked along input channels at each tap)."""
    w = _f32(w)
    if w.ndim != 4:
        raise ValueError(f"a convolution weight is HWIO, got shape {w.shape}")
    return core.quantize_conv_weight(np.ascontiguousarray(w.transpose(3, 2, 0, 1)), fw, seed=seed)


def conv2d_nhwc(x: np.ndarray, w: Union[np.ndarray, core.ConvWeight], fx: Format, fw: Format,
                stride: Tuple[int, int], padding: Padding, dilation: Tuple[int, int],
                bias: Optional[np.ndarray] = None, residual: Optional[np.ndarray] = None,
                activation: Optional[str] = None, vp: str = "fp16", seed: int = 0) -> np.ndarray:
    """NHWC ``x``, HWIO ``w`` (TensorFlow's layouts; or its :func:`conv_weight`) -> NHWC, on
    the BFP datapath: the weight quantized as ``bfpaccel.compile`` quantizes an OIHW ``Conv``
    weight, the activations per pixel along channels (``bfpaccel.conv2d``), then
    :func:`epilogue`."""
    x = _f32(x)
    cw = w if isinstance(w, core.ConvWeight) else conv_weight(w, fw, seed)
    o, cin, kh, kw = cw.shape
    if x.ndim != 4:
        raise ValueError(f"conv2d takes NHWC x, got shape {x.shape}")
    if x.shape[3] != cin:
        raise ValueError(f"x has {x.shape[3]} channels, the HWIO weight expects {cin}")
    pads = conv_pads(padding, (x.shape[1], x.shape[2]), (kh, kw), stride, dilation)
    acc = core.conv2d(x.transpose(0, 3, 1, 2), cw, fx, stride=stride, padding=pads, dilation=dilation, seed=seed)
    return epilogue(np.ascontiguousarray(acc.transpose(0, 2, 3, 1)), bias, residual, activation, vp)


def dense_weight(w: np.ndarray, fw: Format, seed: int = 0) -> core.BfpTensor:
    """A ``[K, N]`` weight quantized as ``bfpaccel.compile`` quantizes a dense layer's ``[N, K]``
    weight (blocked along K, stochastic bits indexed on ``[N, K]``), as the ``[K, N]`` operand
    of ``bfpaccel.matmul``."""
    w = _f32(w)
    if w.ndim != 2:
        raise ValueError(f"a dense weight is [K, N], got shape {w.shape}")
    q = core.quantize(np.ascontiguousarray(w.T), fw, axis=1, seed=seed)
    return core.BfpTensor(fw, 0, q.elements.T, q.exponents.T)


def dense(x: np.ndarray, w: Union[np.ndarray, core.BfpTensor], fx: Format, fw: Format,
          bias: Optional[np.ndarray] = None, residual: Optional[np.ndarray] = None, activation: Optional[str] = None,
          vp: str = "fp16", seed: int = 0) -> np.ndarray:
    """``x [..., K] @ w [K, N]`` (or its :func:`dense_weight`) on the BFP datapath
    (``bfpaccel.matmul``, the weight quantized as the plan's dense layer), then :func:`epilogue`."""
    x = _f32(x)
    q = w if isinstance(w, core.BfpTensor) else dense_weight(w, fw, seed)
    if x.ndim < 2 or x.shape[-1] != q.shape[0]:
        raise ValueError(f"dense takes x [..., K] and w [K, N], got shapes {x.shape} and {q.shape}")
    lead = x.shape[:-1]
    acc = core.matmul(x.reshape(-1, x.shape[-1]), q, fx, seed=seed)
    res = None if residual is None else _f32(residual).reshape(acc.shape)
    return epilogue(acc, bias, res, activation, vp).reshape(lead + (q.shape[1],))


def dequantized_conv_operands(x: np.ndarray, w: np.ndarray, fx: Format, fw: Format,
                              seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """The values the datapath multiplies: NHWC ``x`` blocked along channels, HWIO ``w``
    blocked along input channels (for the straight-through gradients)."""
    return (core.fake_quantize(_f32(x), fx, axis=-1, seed=seed),
            core.fake_quantize(_f32(w), fw, axis=2, seed=seed))


def dequantized_dense_operands(x: np.ndarray, w: np.ndarray, fx: Format, fw: Format,
                               seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``x [..., K]`` and ``w [K, N]`` as the datapath sees them (blocked along ``K``)."""
    return (core.fake_quantize(_f32(x), fx, axis=-1, seed=seed),
            core.fake_quantize(_f32(w), fw, axis=0, seed=seed))


# ----------------------------------------------------------------------------- batch norm
def _eps(eps: float) -> float:
    # the ONNX attribute is a float32: the compiler reads it back as that float32's value
    return float(np.float32(eps))


def fold_batch_norm(w: np.ndarray, b: Optional[np.ndarray], gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray,
                    var: np.ndarray, eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """Batch norm folded into the preceding matrix op as ``bfpaccel.compile`` folds it (float64,
    then float32): ``w * s`` and ``(b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``;
    ``w``'s last axis is the output channel (HWIO or ``[K, N]``)."""
    s = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + _eps(eps))
    b64 = np.zeros(s.shape, np.float64) if b is None else np.asarray(b, np.float64).reshape(s.shape)
    w2 = (np.asarray(w, np.float64) * s).astype(F32)
    b2 = ((b64 - np.asarray(mean, np.float64)) * s + np.asarray(beta, np.float64)).astype(F32)
    return w2, b2


def batch_norm_scale_shift(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
                           eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """The plan's per-channel ``(scale, shift)`` of a batch norm that is not folded."""
    g = np.asarray(gamma, np.float64)
    k = g / np.sqrt(np.asarray(var, np.float64) + _eps(eps))
    return k.astype(F32), (np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * k).astype(F32)


def affine(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float,
           vp: str) -> np.ndarray:
    """A batch norm the plan runs as a vector op on the last axis: ``round(x * s + t)`` (a
    float32 multiply, then a float32 add)."""
    s, t = batch_norm_scale_shift(gamma, beta, mean, var, eps)
    return round_vp(np.add(np.multiply(_f32(x), s, dtype=F32), t, dtype=F32), vp)


# ----------------------------------------------------------------------------- vector ops
def add(a: np.ndarray, b: np.ndarray, vp: str) -> np.ndarray:
    """``round(a + b)`` (broadcasting)."""
    return round_vp(np.add(_f32(a), _f32(b), dtype=F32), vp)


def spatial_mean(x: np.ndarray, vp: str) -> np.ndarray:
    """NHWC -> [N, 1, 1, C]: the plan's ``ReduceMean`` over H, W -- a float32 sum in row-major
    pixel order, divided by the pixel count, rounded."""
    x = _f32(x)
    if x.ndim != 4:
        raise ValueError(f"spatial_mean takes NHWC, got shape {x.shape}")
    n, h, w, c = x.shape
    xr = x.reshape(n, h * w, c)
    acc = np.zeros((n, c), F32)
    for r in range(h * w):
        acc += xr[:, r]
    return round_vp(acc / F32(h * w), vp).reshape(n, 1, 1, c)


def _pool_geometry(x: np.ndarray, ksize: Tuple[int, int], strides: Tuple[int, int],
                   padding: str) -> Tuple[Tuple[int, int, int, int], int, int]:
    pads = conv_pads(padding, (x.shape[1], x.shape[2]), ksize, strides, (1, 1))
    oh = conv_out_size(x.shape[1], ksize[0], strides[0], 1, pads[0], pads[2])
    ow = conv_out_size(x.shape[2], ksize[1], strides[1], 1, pads[1], pads[3])
    if not oh or not ow or oh < 1 or ow < 1:
        raise ValueError(f"the pooled output of {x.shape} would be empty")
    return pads, int(oh), int(ow)


def avg_pool(x: np.ndarray, ksize: Tuple[int, int], strides: Tuple[int, int], padding: str, vp: str) -> np.ndarray:
    """NHWC average pool as the plan runs it: the in-bounds taps summed in (ky, kx) order,
    divided by their count (padding not counted, TF's rule), rounded."""
    x = _f32(x)
    (pt, pl, pb, pr), oh, ow = _pool_geometry(x, ksize, strides, padding)
    n, h, w, c = x.shape
    xp = np.zeros((n, h + pt + pb, w + pl + pr, c), F32)
    xp[:, pt:pt + h, pl:pl + w] = x
    inside = np.zeros((h + pt + pb, w + pl + pr), F32)
    inside[pt:pt + h, pl:pl + w] = 1
    acc = np.zeros((n, oh, ow, c), F32)
    cnt = np.zeros((oh, ow), F32)
    sh, sw = strides
    for ky in range(ksize[0]):
        for kx in range(ksize[1]):
            ys, xs = slice(ky, ky + sh * (oh - 1) + 1, sh), slice(kx, kx + sw * (ow - 1) + 1, sw)
            acc += xp[:, ys, xs]  # an out-of-bounds tap adds +0 to a sum that is never -0
            cnt += inside[ys, xs]
    return round_vp(acc / np.maximum(cnt, 1)[None, :, :, None], vp)


def max_pool_round(y: np.ndarray, vp: str) -> np.ndarray:
    """The rounding after a max pool (the max itself is exact in TensorFlow)."""
    return round_vp(y, vp)


def expf(x: np.ndarray) -> np.ndarray:
    """float32 ``exp`` as the runtime's vector unit computes it (:func:`bfpaccel.vmath.exp`, the
    same bits on every platform)."""
    from .. import vmath

    return vmath.exp(_f32(x))


def softmax(x: np.ndarray, vp: str, axis: int = -1) -> np.ndarray:
    """The plan's softmax along ``axis``: max, ``e = expf(x - max)``, the sum of ``e`` in the
    vector unit's lane order, then ``round(e / sum)`` (:func:`bfpaccel.vmath.softmax`)."""
    from .. import vmath

    return np.ascontiguousarray(round_vp(vmath.softmax(_f32(x), axis), vp))


def l2_normalize(x: np.ndarray, gamma: np.ndarray, eps: float, vp: str) -> np.ndarray:
    """SSD's channel L2 normalisation ``x * rsqrt(max(sum_c x^2, eps)) * gamma`` as the plan
    runs the ops the converter makes of it (NHWC; TF's graph optimiser turns ``(x * r) * gamma``
    into ``x * (r * gamma)``, tf2onnx ``Rsqrt`` into ``Reciprocal(Sqrt)``): ``sq = round(x *
    x)``, ``s = round(sum_c sq)`` (in channel order), ``m = round(max(s, eps))``, ``r = round(1
    / round(sqrt(m)))``, ``round(x * round(r * gamma))``."""
    x = _f32(x)
    sq = round_vp(np.multiply(x, x, dtype=F32), vp)
    s = np.zeros(x.shape[:-1] + (1,), F32)
    for c in range(x.shape[-1]):
        s[..., 0] += sq[..., c]
    s = round_vp(s, vp)
    m = round_vp(np.maximum(s, F32(eps)), vp)
    r = round_vp(np.divide(F32(1), round_vp(np.sqrt(m, dtype=F32), vp), dtype=F32), vp)
    rg = round_vp(np.multiply(r, _f32(gamma), dtype=F32), vp)
    return round_vp(np.multiply(x, rg, dtype=F32), vp)
