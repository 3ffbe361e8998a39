"""The vector unit's float32 transcendental functions, as the C++ core computes them.

``exp``, ``erf`` and ``tanh`` (and ``sigmoid``, built on ``exp``) are the project's own
algorithms: a range reduction and a polynomial, written with IEEE float32 multiply, add,
subtract and divide only (no fused multiply-add), and bit operations that are exact. The core
runs exactly the same sequence of float32 operations on every kernel (portable, AVX2, AVX-512),
so these numpy functions return the core's bits on every platform, independent of the C or
numpy math library. docs/numerics.md (vector unit) states the algorithms; their accuracy is
within a few float32 ulp of the exact function (tests/test_vmath.py measures it against
float64).

Each function takes anything ``np.asarray`` accepts and returns a float32 array (not rounded to
the vector precision: the caller rounds, as the core does).
"""

from __future__ import annotations

import numpy as np

__all__ = ["exp", "erf", "tanh", "sigmoid", "swish", "gelu", "lane_sum", "softmax", "EXP_COEFFS", "ERF_SMALL_COEFFS", "ERFC_COEFFS",
           "TANH_COEFFS"]

_F = np.float32


def _c(h: str) -> np.float32:
    return _F(float.fromhex(h))


# exp: x = k ln2 + r, |r| <= ~0.35; exp(r) = 1 + (r + r^2 P(r)), P of degree 5
EXP_COEFFS = tuple(_c(h) for h in ("0x1p-1", "0x1.555554p-3", "0x1.55547p-5", "0x1.1111f2p-7",
                                   "0x1.6da59ep-10", "0x1.9fc6bcp-13"))
_LOG2E = _c("0x1.715476p+0")  # float32 nearest 1/ln 2
_LN2_HI = _c("0x1.63p-1")  # 0.693359375: 9 significant bits, so k * LN2_HI is exact
_LN2_LO = _c("-0x1.bd0106p-13")  # float32 nearest ln 2 - LN2_HI
_ROUNDER = _c("0x1.8p+23")  # t + 1.5 * 2^23 - 1.5 * 2^23: t rounded to an integer (ties to even)
_EXP_LO, _EXP_HI = _F(-104.0), _F(89.0)

# erf, |x| < 0.875: erf(x) = x + x P(x^2), P of degree 6
ERF_SMALL_COEFFS = tuple(_c(h) for h in ("0x1.06eba8p-3", "-0x1.812744p-2", "0x1.ce2e82p-4", "-0x1.b81982p-6",
                                         "0x1.553946p-8", "-0x1.ae7238p-11", "0x1.6bb13ep-14"))
_ERF_SPLIT = _F(0.875)
# erf, |x| >= 0.875 (x clamped to 4): erf = 1 - exp(-x^2) Q(1/x), Q of degree 10
ERFC_COEFFS = tuple(_c(h) for h in ("0x1.21fe7cp-14", "0x1.202bbep-1", "0x1.6705dcp-7", "-0x1.4e0442p-2",
                                    "0x1.0d4b2cp-4", "0x1.34c48cp-1", "-0x1.159198p+0", "0x1.f9ebbap-1",
                                    "-0x1.1176ecp-1", "0x1.4e286ap-3", "-0x1.65863cp-6"))
_ERF_CLAMP = _F(4.0)

# tanh, |x| < 0.625: tanh(x) = x + (x x^2) P(x^2), P of degree 6; else 1 - 2 / (exp(2|x|) + 1)
TANH_COEFFS = tuple(_c(h) for h in ("-0x1.555556p-2", "0x1.111106p-3", "-0x1.ba17dp-5", "0x1.65fe3p-6",
                                    "-0x1.1ec72ep-7", "0x1.a742a6p-9", "-0x1.a54022p-11"))
_TANH_SPLIT = _F(0.625)
_TANH_CLAMP = _F(10.0)

_ONE, _TWO, _HALF = _F(1.0), _F(2.0), _F(0.5)
_SQRT2 = _c("0x1.6a09e6p+0")  # float32 nearest sqrt(2)
_SIXTH = _c("0x1.555556p-3")  # float32 nearest 1/6


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=_F)


def _horner(coeffs, t: np.ndarray) -> np.ndarray:
    """c[n]; p = p * t + c[i] for i = n-1 .. 0 (a multiply, then an add)."""
    p = np.full_like(t, coeffs[-1])
    for c in coeffs[-2::-1]:
        p = p * t + c
    return p


def _pow2(k: np.ndarray) -> np.ndarray:
    """2^k as float32 for integers k in [-126, 127] (the bits of the exponent field)."""
    return ((k.astype(np.int32) + 127) << 23).astype(np.int32).view(_F)


def _exp_core(xc: np.ndarray) -> np.ndarray:
    """exp of finite xc in [-104, 89]."""
    kf = (xc * _LOG2E + _ROUNDER) - _ROUNDER
    r = (xc - kf * _LN2_HI) - kf * _LN2_LO
    p = _horner(EXP_COEFFS, r)
    y = ((r * r) * p + r) + _ONE
    k = kf.astype(np.int32)
    k1 = k >> 1
    return (y * _pow2(k1)) * _pow2(k - k1)


def exp(x) -> np.ndarray:
    """float32 ``exp(x)`` as the core computes it (see the module docstring)."""
    x = _f32(x)
    with np.errstate(all="ignore"):
        nan = x != x
        xc = np.where(x < _EXP_LO, _EXP_LO, x)
        xc = np.where(xc > _EXP_HI, _EXP_HI, xc)
        xc = np.where(nan, _F(0.0), xc).astype(_F)
        y = _exp_core(xc)
        return np.where(nan, _quiet(x), y).astype(_F)


def _quiet(x: np.ndarray) -> np.ndarray:
    """x with the quiet bit set (a NaN keeps its sign and payload)."""
    return (x.view(np.uint32) | np.uint32(0x00400000)).view(_F)


def _with_sign(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|y| with x's sign bit (y >= 0)."""
    return (y.view(np.uint32) | (x.view(np.uint32) & np.uint32(0x80000000))).view(_F)


def erf(x) -> np.ndarray:
    """float32 ``erf(x)`` as the core computes it (see the module docstring)."""
    x = _f32(x)
    with np.errstate(all="ignore"):
        a = (x.view(np.uint32) & np.uint32(0x7FFFFFFF)).view(_F)
        s = x * x
        ys = x + x * _horner(ERF_SMALL_COEFFS, s)
        ac = np.where(a < _ERF_CLAMP, a, _ERF_CLAMP).astype(_F)
        ah = (ac.view(np.uint32) & np.uint32(0xFFFFF000)).view(_F)  # 12 significant bits: ah * ah exact
        al = ac - ah
        d = al * (ah + ac)  # ~ ac^2 - ah^2, below 2^-7
        q = -d
        e2 = ((_SIXTH * q + _HALF) * q + _ONE) * q + _ONE  # exp(-d)
        e1 = _exp_core(-(ah * ah))
        erfc = ((e1 * e2) * _horner(ERFC_COEFFS, _ONE / ac))
        yl = _with_sign(_ONE - erfc, x)
        y = np.where(a < _ERF_SPLIT, ys, yl)
        return np.where(x != x, _quiet(x), y).astype(_F)


def tanh(x) -> np.ndarray:
    """float32 ``tanh(x)`` as the core computes it (see the module docstring)."""
    x = _f32(x)
    with np.errstate(all="ignore"):
        a = (x.view(np.uint32) & np.uint32(0x7FFFFFFF)).view(_F)
        s = x * x
        ys = _with_sign(a + (a * s) * _horner(TANH_COEFFS, s), x)
        ac = np.where(a < _TANH_CLAMP, a, _TANH_CLAMP).astype(_F)
        e = _exp_core(ac + ac)
        yl = _with_sign(_ONE - _TWO / (e + _ONE), x)
        y = np.where(a < _TANH_SPLIT, ys, yl)
        return np.where(x != x, _quiet(x), y).astype(_F)


def sigmoid(x) -> np.ndarray:
    """float32 ``1 / (1 + exp(-x))`` with this module's :func:`exp` (a NaN ``x`` gives ``x``
    made quiet)."""
    x = _f32(x)
    with np.errstate(all="ignore"):
        return np.where(x != x, _quiet(x), _ONE / (_ONE + exp(-x))).astype(_F)


def swish(x) -> np.ndarray:
    """float32 ``x / (1 + exp(-x))`` with this module's :func:`exp` (a NaN ``x`` gives ``x``
    made quiet)."""
    x = _f32(x)
    with np.errstate(all="ignore"):
        return np.where(x != x, _quiet(x), x / (_ONE + exp(-x))).astype(_F)


def gelu(x) -> np.ndarray:
    """float32 ONNX ``Gelu`` (approximate="none") in the order of its function body:
    ``(0.5 x) (1 + erf(x / sqrt(2)))`` with this module's :func:`erf`."""
    x = _f32(x)
    with np.errstate(all="ignore"):
        return ((_HALF * x) * (_ONE + erf(x / _SQRT2))).astype(_F)


def lane_sum(e) -> np.ndarray:
    """float32 sum along the last axis in the vector unit's order: element ``l`` goes to lane
    ``l % 16``, each lane adds its elements in order starting from 0, then the lanes are added in
    a fixed tree (lane j + lane j + 8, then j + 4, j + 2, j + 1)."""
    e = _f32(e)
    L = e.shape[-1]
    pad = (-L) % 16
    if pad:  # + 0 changes no partial: they start at +0 and exp is never -0
        e = np.concatenate([e, np.zeros(e.shape[:-1] + (pad,), _F)], axis=-1)
    e = e.reshape(e.shape[:-1] + (-1, 16))
    with np.errstate(all="ignore"):
        part = np.zeros(e.shape[:-2] + (16,), _F)
        for i in range(e.shape[-2]):
            part = (part + e[..., i, :]).astype(_F)
        w = 8
        while w >= 1:
            part = (part[..., :w] + part[..., w:2 * w]).astype(_F)
            w //= 2
    return part[..., 0]


def softmax(x, axis: int = -1) -> np.ndarray:
    """float32 softmax along ``axis`` as the core computes it, before rounding to the vector
    precision: ``m`` = max (NaN ignored), ``e = exp(x - m)``, ``e / lane_sum(e)``."""
    x = np.moveaxis(_f32(x), axis, -1)
    with np.errstate(all="ignore"):
        m = np.fmax.reduce(x, axis=-1, keepdims=True, initial=-np.inf)
        e = exp((x - m).astype(_F))
        y = (e / lane_sum(e)[..., None]).astype(_F)
    return np.moveaxis(y, -1, axis)
