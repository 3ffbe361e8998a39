"""Pure-numpy reference emulator of the BFP datapath (docs/numerics.md). The oracle of every test.

Slow and plain on purpose: loops over blocks, vectorised only across independent elements.

Conventions shared with the C++ core:

* ``quantize_blocks(x, fmt, axis)`` returns ``codes`` with ``x``'s shape and ``exponents``
  with ``x.shape[axis]`` replaced by the number of blocks.  Codes of ``int(p)`` elements are the
  signed integer values (int8); codes of fp elements are OCP bit patterns
  ``sign | exponent | mantissa`` (uint8).  A block that held a NaN or Inf has exponent
  ``NAN_EXPONENT`` and all its elements read as NaN; an all-zero block has ``fmt.exp_min``.
* Stochastic rounding draws 32 random bits per element from a counter-based generator
  (splitmix64 of ``seed + (i + 1) * 0x9E3779B97F4A7C15``, top 32 bits), ``i`` being the element's
  flat C-order index in the array passed in; the bits are added below the kept LSB to the
  first 32 fraction bits of the magnitude, then truncated.  So results do not depend on
  threads, SIMD width or the blocked axis.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from . import vmath
from .formats import NAN_EXPONENT, Format, get_format

__all__ = [
    "quantize_blocks",
    "dequantize_blocks",
    "fake_quantize",
    "codes_to_units",
    "block_dot",
    "matmul",
    "matmul_quantized",
    "conv2d",
    "normalize_padding",
    "stochastic_bits",
    "RnnWeight",
    "rnn_activation",
    "lstm_step",
    "gru_step",
    "rnn",
]

FormatLike = Union[str, Format]


# ----------------------------------------------------------------------------- helpers
def stochastic_bits(seed: int, index: np.ndarray) -> np.ndarray:
    """32 random bits (as uint64) for each flat element ``index`` under ``seed``."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed % (1 << 64)) + (index.astype(np.uint64) + np.uint64(1)) * np.uint64(
            0x9E3779B97F4A7C15
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(32)


def _floor_log2(v: np.ndarray) -> np.ndarray:
    """Exact floor(log2(v)) for v > 0 (from the exponent, never a rounded log2)."""
    _, e = np.frexp(v.astype(np.float64))
    return e.astype(np.int64) - 1


def _round_magnitude(a: np.ndarray, mode: str, rand: Optional[np.ndarray]) -> np.ndarray:
    """Round non-negative exact float64 ``a`` to an integer (as float64) by ``mode``."""
    ip = np.floor(a)
    f = a - ip  # exact
    if mode == "nearest_even":
        up = (f > 0.5) | ((f == 0.5) & (np.fmod(ip, 2.0) == 1.0))
    elif mode == "nearest_away":
        up = f >= 0.5
    elif mode == "toward_zero":
        up = np.zeros(a.shape, dtype=bool)
    elif mode == "stochastic":
        frac32 = np.floor(f * 2.0**32).astype(np.uint64)
        up = (frac32 + rand) >= np.uint64(1 << 32)
    else:  # pragma: no cover - Format validates
        raise ValueError(mode)
    return ip + up


def _encode_fp(units: np.ndarray, negative: np.ndarray, fmt: Format) -> np.ndarray:
    """Integer units (>= 0) -> OCP fp bit pattern (uint8)."""
    m, e = fmt.mantissa_bits, fmt.exponent_bits
    units = units.astype(np.int64)
    code = np.zeros(units.shape, dtype=np.int64)
    sub = units < (1 << m)
    code[sub] = units[sub]
    n = units[~sub]
    if n.size:
        k = np.floor(np.log2(n.astype(np.float64))).astype(np.int64) - m  # n in [2^(m+k), 2^(m+k+1))
        k = np.where((n >> k) >= (2 << m), k + 1, k)  # guard log2 rounding for huge n
        k = np.where((n >> k) < (1 << m), k - 1, k)
        code[~sub] = ((k + 1) << m) | ((n >> k) - (1 << m))
    sign = (negative & (units != 0)).astype(np.int64) << (e + m)
    return (code | sign).astype(np.uint8)


def codes_to_units(codes: np.ndarray, fmt: FormatLike) -> np.ndarray:
    """Element codes -> signed integer units (int64), so that value = units * 2**(E - unit_shift)."""
    fmt = get_format(fmt)
    if fmt.kind == "int":
        return codes.astype(np.int64)
    m, e = fmt.mantissa_bits, fmt.exponent_bits
    c = codes.astype(np.int64)
    sign = (c >> (e + m)) & 1
    expf = (c >> m) & ((1 << e) - 1)
    mant = c & ((1 << m) - 1)
    mag = np.where(expf == 0, mant, ((1 << m) + mant) << np.maximum(expf - 1, 0))
    return np.where(sign == 1, -mag, mag)


# ----------------------------------------------------------------------------- quantize
def _as_float32(x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"expected a real numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float32, order="C", copy=False)  # keeps 0-d arrays 0-d


def quantize_blocks(
    x, fmt: FormatLike, axis: int = -1, seed: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
    """Quantize ``x`` into blocks along ``axis``; returns ``(codes, exponents)``.

    Example:
        >>> codes, exps = quantize_blocks([1.0, 0.3, -0.77, 0.01], "msfp16")
        >>> codes.tolist(), exps.tolist()
        ([64, 19, -49, 1], [0])
    """
    fmt = get_format(fmt)
    if not fmt.is_block:
        raise ValueError(f"{fmt} is not a block format")
    x = _as_float32(x)
    if x.ndim == 0:
        raise ValueError("cannot quantize a 0-d array: there is no axis to block")
    axis = axis % x.ndim
    outer = int(np.prod(x.shape[:axis], dtype=np.int64))
    K = x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1 :], dtype=np.int64))
    B = fmt.block_size
    nb = -(-K // B)

    # (outer, K, inner) -> (outer, inner, nb, B), zero padded; flat indices ride along.
    x3 = x.reshape(outer, K, inner).astype(np.float64)
    idx3 = np.arange(x.size, dtype=np.int64).reshape(outer, K, inner)
    xb = np.zeros((outer, inner, nb * B))
    ib = np.zeros((outer, inner, nb * B), dtype=np.int64)
    xb[:, :, :K] = x3.transpose(0, 2, 1)
    ib[:, :, :K] = idx3.transpose(0, 2, 1)
    xb = xb.reshape(outer, inner, nb, B)
    ib = ib.reshape(outer, inner, nb, B)

    finite = np.asarray(np.isfinite(xb).all(axis=-1))  # (outer, inner, nb)
    mag = np.where(np.isfinite(xb), np.abs(xb), 0.0)
    amax = mag.max(axis=-1)
    E = np.full(amax.shape, fmt.exp_min, dtype=np.int64)
    nz = amax > 0
    E[nz] = _floor_log2(amax[nz]) - fmt.emax_elem
    E = np.clip(E, fmt.exp_min, fmt.exp_max)

    v = mag * np.exp2(-E.astype(np.float64))[..., None]  # exact: |x| in units of 2^E
    rand = stochastic_bits(seed, ib) if fmt.rounding == "stochastic" else None
    if fmt.kind == "int":
        q = _round_magnitude(v * 2.0**fmt.unit_shift, fmt.rounding, rand)
        units = np.minimum(q, fmt.max_units)
    else:
        m, bias = fmt.mantissa_bits, fmt.element_bias
        binade = np.where(v > 0, _floor_log2(np.where(v > 0, v, 1.0)), 0)
        qexp = np.maximum(binade, 1 - bias) - m  # exponent of the quantum at v's binade
        q = _round_magnitude(v * np.exp2(-qexp.astype(np.float64)), fmt.rounding, rand)
        units = np.minimum(q * np.exp2((qexp - (1 - bias - m)).astype(np.float64)), fmt.max_units)
    units = units.astype(np.int64)
    negative = xb < 0
    if fmt.kind == "int":
        codes = np.where(negative, -units, units).astype(np.int8)
    else:
        codes = _encode_fp(units, negative, fmt)
    codes = np.where(finite[..., None], codes, 0).astype(codes.dtype)
    E = np.where(finite, E, NAN_EXPONENT)

    # back to the caller's layout
    codes = codes.reshape(outer, inner, nb * B)[:, :, :K].transpose(0, 2, 1).reshape(x.shape)
    exp_shape = x.shape[:axis] + (nb,) + x.shape[axis + 1 :]
    exps = E.transpose(0, 2, 1).reshape(exp_shape).astype(np.int16)
    return np.ascontiguousarray(codes), np.ascontiguousarray(exps)


def dequantize_blocks(codes: np.ndarray, exps: np.ndarray, fmt: FormatLike, axis: int = -1) -> np.ndarray:
    """Codes and exponents (as from ``quantize_blocks``) -> float32 values."""
    fmt = get_format(fmt)
    codes = np.asarray(codes)
    axis = axis % codes.ndim
    E = np.repeat(np.asarray(exps).astype(np.int64), fmt.block_size, axis=axis)
    E = np.take(E, np.arange(codes.shape[axis]), axis=axis)
    units = codes_to_units(codes, fmt).astype(np.float64)
    vals = units * np.exp2((E - fmt.unit_shift).astype(np.float64))  # exact in float32 range
    vals = np.where(E == NAN_EXPONENT, np.nan, vals)
    return vals.astype(np.float32)


def fake_quantize(x, fmt: FormatLike, axis: int = -1, seed: int = 0) -> np.ndarray:
    """Quantize then dequantize (float32 in, float32 out). IEEE presets round to that type (RNE).

    Example:
        >>> fake_quantize([1.0, 0.3, -0.77, 0.01], "msfp16").tolist()
        [1.0, 0.296875, -0.765625, 0.015625]
    """
    fmt = get_format(fmt)
    if not fmt.is_block:
        return _round_ieee(_as_float32(x), fmt.element)
    codes, exps = quantize_blocks(x, fmt, axis, seed)
    return dequantize_blocks(codes, exps, fmt, axis)


def _round_ieee(x: np.ndarray, element: str) -> np.ndarray:
    """Round float32 to fp16 / bf16 (RNE, overflow to Inf) and back."""
    if element == "fp32":
        return x.copy()
    if element == "fp16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) & np.uint64(0xFFFF0000)
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, out).astype(np.float32)


# ----------------------------------------------------------------------------- datapath
def _int_to_f32(S: np.ndarray) -> np.ndarray:
    """Exact integers -> float32, round to nearest even (one rounding)."""
    if S.dtype != object:
        return S.astype(np.float64).astype(np.float32)  # |S| < 2^53: exact, then one rounding

    def one(s: int) -> float:
        s = int(s)
        mag = abs(s)
        shift = max(mag.bit_length() - 24, 0)
        q, r = divmod(mag, 1 << shift)
        half = (1 << shift) >> 1
        if shift and (r > half or (r == half and q & 1)):
            q += 1
        val = float(q) * 2.0**shift
        return -val if s < 0 else val

    return np.vectorize(one, otypes=[np.float64])(S).astype(np.float32)


def block_dot(
    a_units: np.ndarray,
    a_exp: np.ndarray,
    a_shift: int,
    b_units: np.ndarray,
    b_exp: np.ndarray,
    b_shift: int,
) -> np.ndarray:
    """docs/numerics.md#matrix-datapath for block-structured operands.

    ``a_units [M, nb, B]`` / ``a_exp [M, nb]`` and ``b_units [N, nb, B]`` / ``b_exp [N, nb]``
    (integer units, shared exponents) -> ``acc [M, N]`` float32, where for each K block in
    ascending order ``acc = fp32(acc + fp32(S_b) * 2**(Ea + Eb - shifts))``.
    """
    M, nb, _ = a_units.shape
    N = b_units.shape[0]
    acc = np.zeros((M, N), dtype=np.float32)
    for blk in range(nb):
        S = a_units[:, blk, :] @ b_units[:, blk, :].T  # exact integer sums
        e = (a_exp[:, blk, None].astype(np.int64) - a_shift) + (b_exp[None, :, blk].astype(np.int64) - b_shift)
        with np.errstate(over="ignore"):
            t = (_int_to_f32(S).astype(np.float64) * np.exp2(e.astype(np.float64))).astype(np.float32)
        nan = (a_exp[:, blk, None] == NAN_EXPONENT) | (b_exp[None, :, blk] == NAN_EXPONENT)
        t = np.where(nan, np.float32(np.nan), t)
        with np.errstate(invalid="ignore", over="ignore"):
            acc = (acc + t).astype(np.float32)
    return acc


def _unit_dtype(fa: Format, fb: Format) -> type:
    # int64 sums are converted through float64, which is exact (one rounding to float32)
    # only below 2^53; larger sums (FP8 x FP8 of E5M2) use Python integers.
    bound = fa.max_units * fb.max_units * max(fa.block_size, 1)
    return np.int64 if bound < (1 << 53) else object


def _blocked(units: np.ndarray, exps: np.ndarray, block: int) -> Tuple[np.ndarray, np.ndarray]:
    """[R, K] units, [R, nb] exps -> [R, nb, block] zero-padded units."""
    R, K = units.shape
    nb = exps.shape[1]
    out = np.zeros((R, nb * block), dtype=units.dtype)
    out[:, :K] = units
    return out.reshape(R, nb, block), exps


def matmul_quantized(
    a_codes: np.ndarray,
    a_exps: np.ndarray,
    fmt_a: FormatLike,
    b_codes: np.ndarray,
    b_exps: np.ndarray,
    fmt_b: FormatLike,
) -> np.ndarray:
    """``A[M,K] @ B[K,N]`` from codes: A blocked along axis 1, B along axis 0."""
    fa, fb = get_format(fmt_a), get_format(fmt_b)
    dt = _unit_dtype(fa, fb)
    au, ae = _blocked(codes_to_units(a_codes, fa).astype(dt), np.asarray(a_exps), fa.block_size)
    bu, be = _blocked(codes_to_units(b_codes, fb).T.astype(dt), np.asarray(b_exps).T, fb.block_size)
    return block_dot(au, ae, fa.unit_shift, bu, be, fb.unit_shift)


def matmul(a, b, fmt: FormatLike, fmt_b: Optional[FormatLike] = None, seed: int = 0) -> np.ndarray:
    """Reference ``a @ b`` with both operands quantized along K.

    ``a[M, K] @ b[K, N]``: ``a`` is blocked along axis 1 (each row), ``b`` along axis 0 (each
    column).  Batched operands ``a[..., M, K]`` and ``b[..., K, N]`` (rank >= 2 each) broadcast
    their leading axes as ``numpy.matmul`` does: each operand is quantized once, as a whole, along
    its reduced axis (``a`` along its last axis, ``b`` along its second to last; stochastic bits
    indexed by the element's flat index in that operand), and every output matrix is the 2-D
    product of its pair of quantized matrices.

    Example:
        >>> matmul(np.ones((1, 16)), np.ones((16, 1)), "msfp16").tolist()
        [[16.0]]
        >>> matmul(np.ones((2, 3, 1, 16)), np.ones((3, 16, 4)), "msfp16").shape
        (2, 3, 1, 4)
    """
    fa = get_format(fmt)
    fb = get_format(fmt_b) if fmt_b is not None else fa
    if fa.block_size != fb.block_size:
        raise ValueError(f"block sizes differ: {fa.block_size} vs {fb.block_size}")
    a, b = _as_float32(a), _as_float32(b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul takes operands of rank >= 2, got shapes {a.shape} and {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"K mismatch: a is {a.shape}, b is {b.shape}")
    ac, ae = quantize_blocks(a, fa, axis=-1, seed=seed)
    bc, be = quantize_blocks(b, fb, axis=-2, seed=seed)
    if a.ndim == 2 and b.ndim == 2:
        return matmul_quantized(ac, ae, fa, bc, be, fb)
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = np.empty(batch + (a.shape[-2], b.shape[-1]), np.float32)

    def pick(shape: Tuple[int, ...], idx: Tuple[int, ...]) -> Tuple[int, ...]:
        own = idx[len(idx) - len(shape):]  # batch axes align from the right; size 1 broadcasts
        return tuple(0 if s == 1 else i for i, s in zip(own, shape))

    for idx in np.ndindex(*batch):
        ia, ib = pick(a.shape[:-2], idx), pick(b.shape[:-2], idx)
        out[idx] = matmul_quantized(ac[ia], ae[ia], fa, bc[ib], be[ib], fb)
    return out


def normalize_padding(padding) -> Tuple[int, int, int, int]:
    """int | (ph, pw) | (top, left, bottom, right) [ONNX order] -> (top, left, bottom, right)."""
    if isinstance(padding, (int, np.integer)):
        p: Tuple[int, ...] = (int(padding),) * 4
    else:
        p = tuple(int(v) for v in padding)
        if len(p) == 2:
            p = (p[0], p[1], p[0], p[1])
        elif len(p) != 4:
            raise ValueError(f"padding must be an int, a pair or a 4-tuple, got {padding!r}")
    if min(p) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return p  # type: ignore[return-value]


def _pair(v, name: str) -> Tuple[int, int]:
    t = (int(v), int(v)) if isinstance(v, (int, np.integer)) else tuple(int(u) for u in v)
    if len(t) != 2 or min(t) < 1:
        raise ValueError(f"{name} must be a positive int or pair, got {v!r}")
    return t  # type: ignore[return-value]


def conv2d(
    x,
    w,
    fmt: FormatLike,
    bias=None,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    fmt_w: Optional[FormatLike] = None,
    seed: int = 0,
) -> np.ndarray:
    """Reference NCHW x OIHW convolution: blocks along input channels at each tap
    (tap-major K order, channels inner, blocks never crossing a group); output ``acc + bias``.
    """
    fx = get_format(fmt)
    fw = get_format(fmt_w) if fmt_w is not None else fx
    x, w = _as_float32(x), _as_float32(w)
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    G = groups
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    pt, pl, pb, pr = normalize_padding(padding)
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    Og = O // G
    B = fx.block_size
    nbc = -(-Cg // B)
    dt = _unit_dtype(fx, fw)

    # activations: blocks along channels within a group, one block per pixel (same for every tap)
    xc, xe = quantize_blocks(x.reshape(N, G, Cg, H, W), fx, axis=2, seed=seed)
    xu = np.zeros((N, G, nbc * B, H + pt + pb, W + pl + pr), dtype=dt)
    xu[:, :, :Cg, pt : pt + H, pl : pl + W] = codes_to_units(xc, fx)
    xE = np.full((N, G, nbc, H + pt + pb, W + pl + pr), fx.exp_min, dtype=np.int64)  # zero blocks
    xE[:, :, :, pt : pt + H, pl : pl + W] = xe
    xu = xu.reshape(N, G, nbc, B, H + pt + pb, W + pl + pr)

    # weights: [O, Cg, KH, KW] blocked along Cg -> rows [O, taps*nbc, B], tap-major
    wc, we = quantize_blocks(w, fw, axis=1, seed=seed)
    wu = np.zeros((O, nbc * B, KH, KW), dtype=dt)
    wu[:, :Cg] = codes_to_units(wc, fw)
    wu = wu.reshape(O, nbc, B, KH, KW).transpose(0, 3, 4, 1, 2).reshape(O, KH * KW * nbc, B)
    wE = we.astype(np.int64).transpose(0, 2, 3, 1).reshape(O, KH * KW * nbc)

    out = np.zeros((N, O, OH, OW), dtype=np.float32)
    oh, ow = np.meshgrid(np.arange(OH), np.arange(OW), indexing="ij")
    for n in range(N):
        for g in range(G):
            cols_u, cols_e = [], []
            for kh in range(KH):
                for kw in range(KW):
                    ih = (oh * sh + kh * dh).ravel()
                    iw = (ow * sw + kw * dw).ravel()
                    cols_u.append(xu[n, g][:, :, ih, iw].transpose(2, 0, 1))  # [P, nbc, B]
                    cols_e.append(xE[n, g][:, ih, iw].T)  # [P, nbc]
            cu = np.concatenate(cols_u, axis=1)
            ce = np.concatenate(cols_e, axis=1)
            rows = slice(g * Og, (g + 1) * Og)
            acc = block_dot(wu[rows], wE[rows], fw.unit_shift, cu, ce, fx.unit_shift)
            out[n, rows] = acc.reshape(Og, OH, OW)
    if bias is not None:
        out = (out + _as_float32(bias).reshape(1, O, 1, 1)).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- recurrent cells
# ONNX LSTM / GRU on the datapath (docs/numerics.md#recurrent-cells): the matrix products on
# the BFP datapath (weights quantized once, blocked along K per output row; h quantized as an
# activation every step), the gate arithmetic as separate vector ops, each result rounded once to
# the vector precision. exp and tanh are the vector unit's own float32 functions
# (bfpaccel.vmath, the core's bits on every platform); log is the C library's float32 logf, as
# in the C++ core.

_LIBM = None


def _libm():
    global _LIBM
    if _LIBM is None:
        import ctypes
        import ctypes.util

        lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        f = lib.logf
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
        _LIBM = {"logf": f}
    return _LIBM


def _libm_map(name: str, x: np.ndarray) -> np.ndarray:
    """The C library's float32 function ``name`` (``logf``) applied to every element of ``x``."""
    f = _libm()[name]
    x = np.asarray(x, np.float32)
    return np.array([f(float(v)) for v in x.ravel()], np.float32).reshape(x.shape)


#: RNN activation functions (ONNX names) -> does it take (alpha, beta)?
RNN_ACTIVATIONS = {
    "Sigmoid": (False, False), "Tanh": (False, False), "Relu": (False, False), "Softsign": (False, False),
    "Softplus": (False, False), "HardSigmoid": (True, True), "LeakyRelu": (True, False), "Affine": (True, True),
    "ThresholdedRelu": (True, False), "ScaledTanh": (True, True), "Elu": (True, False),
}
#: default alpha / beta of the activations that take them (ONNX's operators of the same names)
RNN_ACTIVATION_DEFAULTS = {"HardSigmoid": (0.2, 0.5), "LeakyRelu": (0.01, 0.0), "ThresholdedRelu": (1.0, 0.0),
                           "Elu": (1.0, 0.0), "Affine": (1.0, 0.0), "ScaledTanh": (1.0, 1.0)}


def rnn_activation(name: str, x: np.ndarray, alpha: float = 0.0, beta: float = 0.0) -> np.ndarray:
    """An RNN activation function in float32, in the order the C++ core computes it (not
    rounded to the vector precision: the caller rounds)."""
    f32 = np.float32
    x = np.asarray(x, f32)
    a, b = f32(alpha), f32(beta)
    one = f32(1.0)
    with np.errstate(all="ignore"):
        if name == "Sigmoid":
            return vmath.sigmoid(x)
        if name == "Tanh":
            return vmath.tanh(x)
        if name == "Relu":
            return np.where(x > 0, x, np.where(np.isnan(x), x, f32(0))).astype(f32)
        if name == "HardSigmoid":
            return np.where(np.isnan(x), x, np.maximum(f32(0), np.minimum(one, (a * x + b).astype(f32)))).astype(f32)
        if name == "LeakyRelu":
            return np.where(x >= 0, x, (x * a).astype(f32)).astype(f32)
        if name == "Affine":
            return (a * x + b).astype(f32)
        if name == "ThresholdedRelu":
            return np.where(x > a, x, f32(0)).astype(f32)
        if name == "ScaledTanh":
            return (a * vmath.tanh((b * x).astype(f32))).astype(f32)
        if name == "Elu":
            return np.where(x >= 0, x, (a * (vmath.exp(x) - one)).astype(f32)).astype(f32)
        if name == "Softsign":
            return (x / (one + np.abs(x))).astype(f32)
        if name == "Softplus":
            return _libm_map("logf", (one + vmath.exp(x)).astype(f32))
    raise ValueError(f"unknown RNN activation {name!r} (known: {', '.join(RNN_ACTIVATIONS)})")


class RnnWeight:
    """A recurrent op's weight ``[rows, K]`` as the datapath multiplies it: quantized once along
    K (each row its own blocks) in a block format, or float32 (``fmt="fp32"``). The rows of all
    directions are quantized together as one ``[D * gates * H, K]`` array, as the compiler does
    (stochastic rounding indexes that array)."""

    def __init__(self, w: np.ndarray, fmt: FormatLike, seed: int = 0):
        self.fmt = get_format(fmt)
        self.w = _as_float32(w)
        if self.w.ndim != 2:
            raise ValueError(f"a recurrent weight is [rows, K], got shape {self.w.shape}")
        if self.fmt.is_block:
            self.codes, self.exps = quantize_blocks(self.w, self.fmt, axis=1, seed=seed)

    def rows(self, lo: int, hi: int) -> "RnnWeight":
        """Rows [lo, hi) (their quantization unchanged)."""
        out = RnnWeight.__new__(RnnWeight)
        out.fmt, out.w = self.fmt, self.w[lo:hi]
        if self.fmt.is_block:
            out.codes, out.exps = self.codes[lo:hi], self.exps[lo:hi]
        return out

    def product(self, x: np.ndarray, fmt: FormatLike, seed: int = 0) -> np.ndarray:
        """``x[M, K] @ w.T`` on the datapath: ``x`` quantized along K with ``fmt`` (float32
        operands: sequential float32 sums over K, a multiply and an add per term)."""
        x = _as_float32(x)
        if not self.fmt.is_block:
            acc = np.zeros((x.shape[0], self.w.shape[0]), np.float32)
            with np.errstate(all="ignore"):
                for k in range(x.shape[1]):
                    acc = (acc + (x[:, k:k + 1] * self.w[None, :, k]).astype(np.float32)).astype(np.float32)
            return acc
        fa = get_format(fmt)
        xc, xe = quantize_blocks(x, fa, axis=1, seed=seed)
        return matmul_quantized(xc, xe, fa, self.codes.T, self.exps.T, self.fmt)


def _vround(x: np.ndarray, vp: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return _round_ieee(np.asarray(x, np.float32), vp)


def _acts(cell: str, activations: Optional[Sequence[str]], alpha: Optional[Sequence[float]],
          beta: Optional[Sequence[float]], num_directions: int) -> list:
    """Per direction, the cell's activation functions as (name, alpha, beta): alphas and betas
    are consumed in order by the functions that take them, defaults elsewhere."""
    n = 3 if cell == "LSTM" else 2
    names = list(activations) if activations else (["Sigmoid", "Tanh", "Tanh"] if n == 3 else ["Sigmoid", "Tanh"]) \
        * num_directions
    if len(names) != n * num_directions:
        raise ValueError(f"{cell} takes {n * num_directions} activations, got {len(names)}")
    al, be = list(alpha or []), list(beta or [])
    out = []
    for nm in names:
        if nm not in RNN_ACTIVATIONS:
            raise ValueError(f"unknown RNN activation {nm!r}")
        takes_a, takes_b = RNN_ACTIVATIONS[nm]
        da, db = RNN_ACTIVATION_DEFAULTS.get(nm, (0.0, 0.0))
        a = al.pop(0) if takes_a and al else da
        b = be.pop(0) if takes_b and be else db
        out.append((nm, float(a), float(b)))
    return [out[d * n:(d + 1) * n] for d in range(num_directions)]


def _clip(v: np.ndarray, clip: Optional[float], vp: str) -> np.ndarray:
    """An activation's input clipped to [-clip, clip] (NaN stays), rounded; None: unchanged."""
    if clip is None:
        return v
    c = np.float32(clip)
    return _vround(np.where(np.isnan(v), v, np.minimum(np.maximum(v, -c), c)), vp)


def lstm_step(xg: np.ndarray, h: np.ndarray, c: np.ndarray, r: RnnWeight, rb: Optional[np.ndarray],
              p: Optional[np.ndarray], fmt: FormatLike, vector_precision: str = "fp16",
              clip: Optional[float] = None, input_forget: bool = False, acts=None,
              seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """One LSTM time step (ONNX gate order i, o, f, c) for a batch.

    ``xg [B, 4H]``: the input projection ``x_t W^T (+ Wb)`` as the dense layer computed it;
    ``h, c [B, H]``: the previous states; ``r``: the recurrence weight (rows ``[4H, H]``);
    ``rb [4H]``: its bias; ``p [3H]``: peepholes (i, o, f) or None. Every vector op rounds:
    ``a = R(xg + R(h R^T + rb))``; ``i = R(f(R(a_i + R(p_i c))))`` (the activation's input
    clipped first, ``R(clip(.))``, for every gate), likewise ``f``
    (``input_forget``: ``R(1 - i)``); ``g = R(g(a_c))``; ``C = R(R(f c) + R(i g))``;
    ``o = R(f(R(a_o + R(p_o C))))``; ``H = R(o R(h(C)))``. Returns ``(H, C)``.
    """
    vp = vector_precision
    R_ = lambda v: _vround(v, vp)  # noqa: E731
    f32 = np.float32
    acts = acts or [("Sigmoid", 0.0, 0.0), ("Tanh", 0.0, 0.0), ("Tanh", 0.0, 0.0)]
    (fn, fa_, fb_), (gn, ga, gb), (hn, ha, hb) = acts
    H = h.shape[1]
    with np.errstate(all="ignore"):
        gh = r.product(h, fmt, seed)
        if rb is not None:
            gh = R_(gh + rb)
        a = R_(xg + gh)
        ai, ao, af, ac = (a[:, k * H:(k + 1) * H] for k in range(4))
        if p is not None:
            ai = R_(ai + R_(p[:H] * c))
        i = R_(rnn_activation(fn, _clip(ai, clip, vp), fa_, fb_))
        if input_forget:
            f = R_(f32(1) - i)
        else:
            if p is not None:
                af = R_(af + R_(p[2 * H:] * c))
            f = R_(rnn_activation(fn, _clip(af, clip, vp), fa_, fb_))
        g = R_(rnn_activation(gn, _clip(ac, clip, vp), ga, gb))
        C = R_(R_(f * c) + R_(i * g))
        if p is not None:
            ao = R_(ao + R_(p[H:2 * H] * C))
        o = R_(rnn_activation(fn, _clip(ao, clip, vp), fa_, fb_))
        Hn = R_(o * R_(rnn_activation(hn, C, ha, hb)))
    return Hn.astype(f32), C.astype(f32)


def gru_step(xg: np.ndarray, h: np.ndarray, r: RnnWeight, rb: Optional[np.ndarray], fmt: FormatLike,
             vector_precision: str = "fp16", clip: Optional[float] = None, linear_before_reset: bool = False,
             acts=None, seed: int = 0) -> np.ndarray:
    """One GRU time step (ONNX gate order z, r, h) for a batch.

    ``xg [B, 3H]``: the input projection ``x_t W^T (+ Wb)``; ``h [B, H]``; ``r``: the recurrence
    weight (rows ``[3H, H]``); ``rb [3H]``. Every vector op rounds: ``z = R(f(R(xg_z + R(h R_z^T
    + rb_z))))``, likewise ``r``; ``linear_before_reset``: ``n = R(g(R(xg_h + R(r R(h R_h^T +
    rb_h)))))``, else ``n = R(g(R(xg_h + R(R(r h) R_h^T + rb_h))))`` (``r h`` quantized as an
    activation); ``H = R(R(R(1 - z) n) + R(z h))``. Returns ``H``.
    """
    vp = vector_precision
    R_ = lambda v: _vround(v, vp)  # noqa: E731
    f32 = np.float32
    acts = acts or [("Sigmoid", 0.0, 0.0), ("Tanh", 0.0, 0.0)]
    (fn, fa_, fb_), (gn, ga, gb) = acts
    H = h.shape[1]

    def clipped(v):
        return _clip(v, clip, vp)

    with np.errstate(all="ignore"):
        if linear_before_reset:
            gh = r.product(h, fmt, seed)
        else:
            gh = r.rows(0, 2 * H).product(h, fmt, seed)
        if rb is not None:
            gh = R_(gh + rb[:gh.shape[1]])
        azr = clipped(R_(xg[:, :2 * H] + gh[:, :2 * H]))
        z = R_(rnn_activation(fn, azr[:, :H], fa_, fb_))
        rr = R_(rnn_activation(fn, azr[:, H:], fa_, fb_))
        if linear_before_reset:
            hn = R_(rr * gh[:, 2 * H:])
        else:
            hn = r.rows(2 * H, 3 * H).product(R_(rr * h), fmt, seed)
            if rb is not None:
                hn = R_(hn + rb[2 * H:])
        n = R_(rnn_activation(gn, clipped(R_(xg[:, 2 * H:] + hn)), ga, gb))
        Hn = R_(R_(R_(f32(1) - z) * n) + R_(z * h))
    return Hn.astype(f32)


def rnn(cell: str, X, W, R, B=None, *, fmt: FormatLike = "msfp16", fmt_w: Optional[FormatLike] = None,
        vector_precision: str = "fp16", direction: str = "forward", sequence_lens=None, initial_h=None,
        initial_c=None, P=None, clip: Optional[float] = None, input_forget: bool = False,
        linear_before_reset: bool = False, layout: int = 0, activations: Optional[Sequence[str]] = None,
        activation_alpha: Optional[Sequence[float]] = None, activation_beta: Optional[Sequence[float]] = None,
        seed: int = 0) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Reference ONNX ``LSTM`` / ``GRU`` (``cell``) on the datapath, as a compiled plan runs it.

    Arguments are the ONNX operator's inputs and attributes (``fmt="fp32"``: float32 matrix
    products). The input projection of all time steps is one dense layer ``X W^T`` with the
    bias ``Wb`` in its epilogue (rounded once); each step runs :func:`lstm_step` /
    :func:`gru_step`. Past a batch entry's ``sequence_lens`` its ``Y`` is 0 and its state stays.
    Returns ``(Y, Y_h, Y_c)`` (``Y_c`` None for GRU).
    """
    if cell not in ("LSTM", "GRU"):
        raise ValueError(f"cell must be 'LSTM' or 'GRU', got {cell!r}")
    fa = get_format(fmt)
    fw = get_format(fmt_w) if fmt_w is not None else fa
    vp = vector_precision
    G = 4 if cell == "LSTM" else 3
    X, W, R = _as_float32(X), _as_float32(W), _as_float32(R)
    if layout:
        X = X.transpose(1, 0, 2)
    T, Bn, I = X.shape
    D, GH, _ = W.shape
    H = GH // G
    dirs = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
    if len(dirs) != D:
        raise ValueError(f"direction {direction!r} needs {len(dirs)} directions of weights, got {D}")
    Wq = RnnWeight(W.reshape(D * GH, I), fw, seed)
    Rq = RnnWeight(R.reshape(D * GH, H), fw, seed)
    Bv = _as_float32(B).reshape(D, 2 * GH) if B is not None else None
    with np.errstate(all="ignore"):
        xg = Wq.product(X.reshape(T * Bn, I), fa, seed)
        if Bv is not None:
            xg = _vround(xg + Bv[:, :GH].reshape(-1), vp)
    xg = xg.reshape(T, Bn, D, GH)
    lens = np.full(Bn, T, np.int64) if sequence_lens is None else np.asarray(sequence_lens, np.int64).reshape(Bn)
    h0 = np.zeros((D, Bn, H), np.float32) if initial_h is None else _as_float32(initial_h)
    c0 = np.zeros((D, Bn, H), np.float32) if initial_c is None else _as_float32(initial_c)
    if layout:
        h0, c0 = h0.transpose(1, 0, 2), c0.transpose(1, 0, 2)
    Pv = _as_float32(P).reshape(D, 3 * H) if P is not None else None
    acts = _acts(cell, activations, activation_alpha, activation_beta, D)
    Y = np.zeros((T, D, Bn, H), np.float32)
    Yh = np.zeros((D, Bn, H), np.float32)
    Yc = np.zeros((D, Bn, H), np.float32)
    for d, rev in enumerate(dirs):
        r = Rq.rows(d * GH, (d + 1) * GH)
        rb = Bv[d, GH:] if Bv is not None else None
        h, c = h0[d].copy(), c0[d].copy()
        for s in range(T):
            active = lens > s
            if not active.any():
                break
            # every batch row runs (each is quantized on its own); rows past their length keep
            # their state and write no output
            ts = np.where(active, (lens - 1 - s) if rev else s, 0)
            x_in = xg[ts, np.arange(Bn), d]
            if cell == "LSTM":
                hn, cn = lstm_step(x_in, h, c, r, rb, Pv[d] if Pv is not None else None, fa, vp, clip,
                                   input_forget, acts[d], seed)
                c = np.where(active[:, None], cn, c)
            else:
                hn = gru_step(x_in, h, r, rb, fa, vp, clip, linear_before_reset, acts[d], seed)
            h = np.where(active[:, None], hn, h)
            for b in np.nonzero(active)[0]:
                Y[ts[b], d, b] = hn[b]
        ran = (lens > 0)[:, None]  # an entry of length 0 has zero final states (as onnxruntime)
        Yh[d], Yc[d] = np.where(ran, h, 0), np.where(ran, c, 0)
    if layout:
        Y, Yh, Yc = Y.transpose(2, 0, 1, 3), Yh.transpose(1, 0, 2), Yc.transpose(1, 0, 2)
    return Y, Yh, (Yc if cell == "LSTM" else None)
