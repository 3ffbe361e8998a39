"""The ``bfpaccel::`` custom ops: the C++ core's matmul / conv2d / fake_quantize as PyTorch ops.

Each op is registered with ``torch.library.custom_op`` (an opaque node for ``torch.compile``
and ``torch.export``), a fake (meta) implementation giving the output's shape and dtype, and a
straight-through backward (``register_autograd``).

Forward: the operands go to the C++ core as float32 (``bfpaccel.matmul`` /
``bfpaccel.conv2d``: block quantization, integer block products, float32 accumulation), the
result comes back in the input's dtype and device (non-CPU tensors take a round trip through
host memory).  Where a bias is given it is added as the compiled plan's epilogue adds it:
``round_vp(float32(acc + bias))`` with the vector precision ``vp`` (``fp16``, ``bf16`` or
``fp32``), as ``bfpaccel.Session`` runs a ``Conv`` / ``Gemm`` with a bias.

Backward (straight-through estimator): the gradients are those of the *float* op evaluated at
the *dequantized* operands -- ``x_q`` and ``w_q``, the values the BFP datapath multiplied
(the same quantization, same seed, same element indices as the forward) -- so
``grad_x = grad_y @ w_q``, ``grad_w = grad_y^T @ x_q`` (and the convolution's transposes);
the bias gets ``grad_y`` summed, the vector-precision rounding of the epilogue passes the
gradient unchanged.  The gradient arithmetic runs in the gradient's dtype (at least float32).

Formats cross the op boundary as strings (``encode_format``): op schemas take only plain types.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import _core  # type: ignore[attr-defined]
from .. import core
from ..formats import ROUNDING_MODES, VECTOR_PRECISIONS, Format, get_format, vector_precision_code

__all__ = [
    "encode_format",
    "decode_format",
    "resolve_format",
    "check_seed",
    "check_vector_precision",
    "VECTOR_PRECISIONS",
]

FormatLike = Union[str, Format]

#: Vector precisions of the epilogue (bias add), as ``bfpaccel.compile`` names them.
_SEED_LIMIT = 1 << 63  # op schemas carry a signed 64-bit int


# ----------------------------------------------------------------------------- argument checks
def resolve_format(fmt: FormatLike, rounding: Optional[str] = None, what: str = "format") -> Format:
    """``fmt`` (a preset name or a :class:`bfpaccel.Format`) as a block ``Format``, with
    ``rounding`` (one of ``bfpaccel.ROUNDING_MODES``) overriding its rounding when given.

    Raises:
        ValueError: an unknown preset or rounding mode, or a plain IEEE type (``fp32``,
            ``fp16``, ``bf16``), which has no block datapath: keep such a layer a plain
            ``nn.Linear`` / ``nn.Conv2d`` instead.
    """
    if rounding is not None and rounding not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding {rounding!r}; expected one of {', '.join(ROUNDING_MODES)}")
    f = get_format(fmt, rounding=rounding)
    if not f.is_block:
        raise ValueError(
            f"{what} {f.name or f.element} is a plain IEEE type, not a block format; keep the layer a float "
            "nn.Linear / nn.Conv2d (None in quantize_model's overrides) or pick a block format such as 'msfp16'"
        )
    return f


def check_seed(seed: int) -> int:
    """``seed`` as an int in ``[0, 2**63)`` (the seed of stochastic rounding), else a ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < _SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def check_vector_precision(vp: str) -> str:
    """``vp`` normalised to one of ``VECTOR_PRECISIONS``, else a ValueError."""
    v = str(vp).strip().lower() if isinstance(vp, str) else None
    if v not in VECTOR_PRECISIONS:
        raise ValueError(f"vector_precision must be one of {', '.join(VECTOR_PRECISIONS)}, got {vp!r}")
    return v


def encode_format(f: Format) -> str:
    """A block format as the string the ops carry: ``block:shared_exp_bits:element:rounding:name``.

    Example:
        >>> encode_format(get_format("msfp16"))
        '16:8:int7:nearest_even:msfp16'
    """
    return f"{f.block_size}:{f.exp_field_bits}:{f.element}:{f.rounding}:{f.name or ''}"


@functools.lru_cache(maxsize=256)
def decode_format(s: str) -> Format:
    """The inverse of :func:`encode_format`."""
    try:
        block, seb, element, rounding, name = s.split(":")
        return Format(int(block), int(seb), element, rounding, name=name or None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not an encoded bfpaccel format: {s!r} ({e})") from None


# ----------------------------------------------------------------------------- helpers
def _f32(t: torch.Tensor) -> np.ndarray:
    """A float32, C-contiguous host copy (or view) of ``t`` as numpy."""
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def _back(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=like.device, dtype=like.dtype)


def _check_float(t: torch.Tensor, what: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {t.dtype}")


def _epilogue(acc: np.ndarray, bias: Optional[np.ndarray], vp: str) -> np.ndarray:
    """The plan's bias epilogue: ``round_vp(float32(acc + bias))``; no bias, no rounding."""
    if bias is None:
        return acc
    y = np.add(acc, bias, dtype=np.float32)
    if vp != "fp32":
        y = _core.round_vector(y, vector_precision_code(vp))
    return y


def linear_weight(weight: np.ndarray, wf: Format, seed: int) -> core.BfpTensor:
    """``weight [N, K]`` (PyTorch's ``[out, in]``) quantized as ``bfpaccel.compile`` quantizes a
    dense layer's weight -- blocked along K, stochastic bits indexed on ``[N, K]`` -- and
    presented as the ``[K, N]`` operand (``axis=0``) ``bfpaccel.matmul`` takes."""
    q = core.quantize(weight, wf, axis=1, seed=seed)
    return core.BfpTensor(wf, 0, q.elements.T, q.exponents.T)


def conv_pads(padding: Sequence[int]) -> Tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` from a 4-list."""
    t, l, b, r = (int(v) for v in padding)
    return t, l, b, r


def conv_out_hw(h: int, w: int, kh: int, kw: int, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> Tuple[int, int]:
    t, l, b, r = conv_pads(padding)
    oh = (h + t + b - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + l + r - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return oh, ow


# ----------------------------------------------------------------------------- fake_quantize
@torch.library.custom_op("bfpaccel::fake_quantize", mutates_args=())
def _fake_quantize(x: torch.Tensor, fmt: str, axis: int, seed: int) -> torch.Tensor:
    """Quantize to ``fmt`` in blocks along ``axis`` and dequantize (``bfpaccel.fake_quantize``)."""
    _check_float(x, "x")
    return _back(core.fake_quantize(_f32(x), decode_format(fmt), axis=axis, seed=seed), x)


@_fake_quantize.register_fake
def _(x, fmt, axis, seed):
    return torch.empty_like(x)


def _fq_setup(ctx, inputs, output):
    pass


def _fq_backward(ctx, grad):
    return grad, None, None, None


_fake_quantize.register_autograd(_fq_backward, setup_context=_fq_setup)


def _dequantized(x: torch.Tensor, fmt: str, axis: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The BFP values an operand stands for (no gradient), in ``dtype``."""
    with torch.no_grad():
        return torch.ops.bfpaccel.fake_quantize(x.detach(), fmt, axis, seed).to(dtype)


def _grad_dtype(grad: torch.Tensor) -> torch.dtype:
    return torch.promote_types(grad.dtype, torch.float32)


# ----------------------------------------------------------------------------- matmul
@torch.library.custom_op("bfpaccel::matmul", mutates_args=())
def _matmul(x: torch.Tensor, w: torch.Tensor, fmt: str, wfmt: str, seed: int) -> torch.Tensor:
    """``x[..., K] @ w[K, N]`` on the BFP datapath (``bfpaccel.matmul`` on ``x`` as ``[M, K]``)."""
    _check_float(x, "x")
    _check_float(w, "w")
    K, N = w.shape
    a = _f32(x).reshape(-1, K)
    y = core.matmul(a, _f32(w), decode_format(fmt), decode_format(wfmt), seed=seed)
    return _back(y.reshape(tuple(x.shape[:-1]) + (N,)), x)


@_matmul.register_fake
def _(x, w, fmt, wfmt, seed):
    return x.new_empty(tuple(x.shape[:-1]) + (w.shape[1],))


def _mm_setup(ctx, inputs, output):
    x, w, fmt, wfmt, seed = inputs
    ctx.save_for_backward(x, w)
    ctx.args = (fmt, wfmt, seed)


def _mm_backward(ctx, grad):
    x, w = ctx.saved_tensors
    fmt, wfmt, seed = ctx.args
    dt = _grad_dtype(grad)
    g = grad.to(dt)
    gx = gw = None
    if ctx.needs_input_grad[0]:
        wq = _dequantized(w, wfmt, 0, seed, dt)
        gx = (g @ wq.t()).to(x.dtype)
    if ctx.needs_input_grad[1]:
        K = w.shape[0]
        xq = _dequantized(x, fmt, -1, seed, dt).reshape(-1, K)
        gw = (xq.t() @ g.reshape(-1, g.shape[-1])).to(w.dtype)
    return gx, gw, None, None, None


_matmul.register_autograd(_mm_backward, setup_context=_mm_setup)


# ----------------------------------------------------------------------------- linear
@torch.library.custom_op("bfpaccel::linear", mutates_args=())
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fmt: str, wfmt: str, vp: str,
            seed: int) -> torch.Tensor:
    """``x[..., K] @ weight[N, K]^T (+ bias)`` on the BFP datapath, bias as the plan's epilogue."""
    _check_float(x, "x")
    _check_float(weight, "weight")
    N, K = weight.shape
    wt = linear_weight(_f32(weight), decode_format(wfmt), seed)
    acc = core.matmul(_f32(x).reshape(-1, K), wt, decode_format(fmt), seed=seed)
    y = _epilogue(acc, None if bias is None else _f32(bias).reshape(1, N), vp)
    return _back(y.reshape(tuple(x.shape[:-1]) + (N,)), x)


@_linear.register_fake
def _(x, weight, bias, fmt, wfmt, vp, seed):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


def _lin_setup(ctx, inputs, output):
    x, weight, bias, fmt, wfmt, vp, seed = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (fmt, wfmt, seed, None if bias is None else bias.dtype)


def _lin_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    fmt, wfmt, seed, bias_dtype = ctx.args
    dt = _grad_dtype(grad)
    g2 = grad.to(dt).reshape(-1, grad.shape[-1])
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        wq = _dequantized(weight, wfmt, 1, seed, dt)
        gx = (g2 @ wq).reshape(x.shape).to(x.dtype)
    if ctx.needs_input_grad[1]:
        xq = _dequantized(x, fmt, -1, seed, dt).reshape(-1, weight.shape[1])
        gw = (g2.t() @ xq).to(weight.dtype)
    if bias_dtype is not None and ctx.needs_input_grad[2]:
        gb = g2.sum(0).to(bias_dtype)
    return gx, gw, gb, None, None, None, None


_linear.register_autograd(_lin_backward, setup_context=_lin_setup)


# ----------------------------------------------------------------------------- conv2d
@torch.library.custom_op("bfpaccel::conv2d", mutates_args=())
def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
            padding: List[int], dilation: List[int], groups: int, fmt: str, wfmt: str, vp: str,
            seed: int) -> torch.Tensor:
    """NCHW x OIHW convolution on the BFP datapath (``bfpaccel.conv2d``); ``padding`` is
    ``[top, left, bottom, right]``; bias as the plan's epilogue."""
    _check_float(x, "x")
    _check_float(weight, "weight")
    cw = core.quantize_conv_weight(_f32(weight), decode_format(wfmt), groups=groups, seed=seed)
    b = None if bias is None else _f32(bias)
    acc = core.conv2d(_f32(x), cw, decode_format(fmt), bias=b if vp == "fp32" else None, stride=tuple(stride),
                      padding=conv_pads(padding), dilation=tuple(dilation), groups=groups, seed=seed)
    if b is not None and vp != "fp32":
        acc = _epilogue(acc, b.reshape(1, -1, 1, 1), vp)
    return _back(acc, x)


@_conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, fmt, wfmt, vp, seed):
    oh, ow = conv_out_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], oh, ow))


def _conv_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, fmt, wfmt, vp, seed = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (list(stride), list(padding), list(dilation), groups, fmt, wfmt, seed,
                None if bias is None else bias.dtype)


def _conv_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    stride, padding, dilation, groups, fmt, wfmt, seed, bias_dtype = ctx.args
    dt = _grad_dtype(grad)
    g = grad.to(dt)
    N, C, H, W = x.shape
    xq = _dequantized(x.reshape(N, groups, C // groups, H, W), fmt, 2, seed, dt).reshape(x.shape)
    wq = _dequantized(weight, wfmt, 1, seed, dt)
    t, l, b, r = conv_pads(padding)
    sym = t == b and l == r
    xin = xq if sym else torch.nn.functional.pad(xq, (l, r, t, b))
    pads = [t, l] if sym else [0, 0]
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
            bias_dtype is not None and bool(ctx.needs_input_grad[2])]
    gx, gw, gb = torch.ops.aten.convolution_backward(
        g, xin, wq, [weight.shape[0]] if mask[2] else None, stride, pads, dilation, False, [0, 0], groups, mask)
    if gx is not None:
        if not sym:
            gx = gx[:, :, t : t + H, l : l + W]
        gx = gx.to(x.dtype)
    if gw is not None:
        gw = gw.to(weight.dtype)
    if gb is not None:
        gb = gb.to(bias_dtype)
    return gx, gw, gb, None, None, None, None, None, None, None, None


_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)
