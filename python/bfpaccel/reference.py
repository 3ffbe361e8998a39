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
    """Reference ``a[M,K] @ b[K,N]`` with both operands quantized along K.

    Example:
        >>> matmul(np.ones((1, 16)), np.ones((16, 1)), "msfp16").tolist()
        [[16.0]]
    """
    fa = get_format(fmt)
    fb = get_format(fmt_b) if fmt_b is not None else fa
    if fa.block_size != fb.block_size:
        raise ValueError(f"block sizes differ: {fa.block_size} vs {fb.block_size}")
    a, b = _as_float32(a), _as_float32(b)
    ac, ae = quantize_blocks(a, fa, axis=1, seed=seed)
    bc, be = quantize_blocks(b, fb, axis=0, seed=seed)
    return matmul_quantized(ac, ae, fa, bc, be, fb)


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
