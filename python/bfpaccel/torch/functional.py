"""Functional forms: ``bfp_matmul``, ``bfp_linear``, ``bfp_conv2d``, ``fake_quantize``.

Each checks its arguments, resolves the formats once and calls one ``bfpaccel::`` custom op
(see :mod:`bfpaccel.torch._ops` for the forward and the straight-through backward).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..formats import Format
from ._ops import check_seed, check_vector_precision, encode_format, resolve_format

__all__ = ["bfp_matmul", "bfp_linear", "bfp_conv2d", "fake_quantize", "conv_padding", "op_formats"]

FormatLike = Union[str, Format]
IntOrPair = Union[int, Sequence[int]]
Padding = Union[str, int, Sequence[int]]


def op_formats(format: FormatLike, weight_format: Optional[FormatLike] = None,
               rounding: Optional[str] = None) -> Tuple[str, str]:
    """The activation and weight formats as the strings the ops take.  ``weight_format``
    defaults to ``format``; ``rounding`` overrides the rounding of both.

    Raises:
        ValueError: an unknown format or rounding, a plain IEEE type, or block sizes that differ.
    """
    fx = resolve_format(format, rounding, "format")
    fw = resolve_format(weight_format, rounding, "weight_format") if weight_format is not None else fx
    if fx.block_size != fw.block_size:
        raise ValueError(f"block sizes differ: format {fx.name or 'custom'} has {fx.block_size}, weight_format "
                         f"{fw.name or 'custom'} has {fw.block_size}; both operands need the same block")
    return encode_format(fx), encode_format(fw)


def _check_tensor(t: object, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {t.dtype}")
    return t


def fake_quantize(x: torch.Tensor, format: FormatLike = "msfp16", axis: int = -1, *, rounding: Optional[str] = None,
                  seed: int = 0) -> torch.Tensor:
    """``x`` quantized to ``format`` in blocks along ``axis`` and dequantized (the C++ core's
    ``bfpaccel.fake_quantize``), in ``x``'s dtype.  Backward: straight-through (the gradient
    passes unchanged).  It has no ONNX form: ``export_onnx`` refuses it.

    Example:
        >>> fake_quantize(torch.tensor([1.0, 0.3, -0.77, 0.01])).tolist()
        [1.0, 0.296875, -0.765625, 0.015625]
    """
    x = _check_tensor(x, "x")
    if x.dim() == 0:
        raise ValueError("cannot quantize a 0-d tensor: there is no axis to block")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis!r} is out of range for a {x.dim()}-d tensor")
    fx, _ = op_formats(format, None, rounding)
    return torch.ops.bfpaccel.fake_quantize(x, fx, axis, check_seed(seed))


def bfp_matmul(x: torch.Tensor, w: torch.Tensor, format: FormatLike = "msfp16", *,
               weight_format: Optional[FormatLike] = None, rounding: Optional[str] = None,
               seed: int = 0) -> torch.Tensor:
    """``x[..., K] @ w[K, N]`` on the BFP datapath: bit for bit ``bfpaccel.matmul(x.reshape(-1, K),
    w, format, weight_format, seed)`` (``x`` blocked along K per row, ``w`` along K per column),
    reshaped to ``[..., N]``, in ``x``'s dtype.

    Backward (straight-through): the gradients of ``x_q @ w_q`` -- the float matmul of the
    dequantized operands -- i.e. ``grad_x = grad @ w_q^T`` and ``grad_w = x_q^T @ grad``.

    Args:
        x: activations ``[..., K]`` (any float dtype; the core computes from their float32 values).
        w: ``[K, N]``.
        format: block format of ``x`` (a preset name or a :class:`bfpaccel.Format`).
        weight_format: block format of ``w`` (default ``format``; same block size).
        rounding: overrides the rounding of both formats (``bfpaccel.ROUNDING_MODES``).
        seed: seed of ``"stochastic"`` rounding, in ``[0, 2**63)``.

    Example:
        >>> bfp_matmul(torch.ones(2, 16), torch.eye(16)).sum().item()
        32.0
    """
    x = _check_tensor(x, "x")
    w = _check_tensor(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [K, N], got shape {tuple(w.shape)}")
    if x.dim() < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"K mismatch: x is {tuple(x.shape)}, w is {tuple(w.shape)}")
    fx, fw = op_formats(format, weight_format, rounding)
    return torch.ops.bfpaccel.matmul(x, w, fx, fw, check_seed(seed))


def linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fx: str, fw: str, vp: str,
              seed: int) -> torch.Tensor:
    """Shape checks, then the ``bfpaccel::linear`` op (formats already encoded)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)}: its last dimension must be in_features={weight.shape[1]}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return torch.ops.bfpaccel.linear(x, weight, bias, fx, fw, vp, seed)


def bfp_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               format: FormatLike = "msfp16", *, weight_format: Optional[FormatLike] = None,
               rounding: Optional[str] = None, vector_precision: str = "fp16", seed: int = 0) -> torch.Tensor:
    """``F.linear`` on the BFP datapath, as ``bfpaccel.compile`` runs a ``Gemm``:
    ``x[..., K] @ weight[N, K]^T`` with ``weight`` quantized once along K (blocks of the
    ``[N, K]`` rows, as the plan quantizes a dense weight) and ``x`` per row along K; the bias
    is the plan's epilogue, ``round_vp(float32(acc + bias))`` (``vector_precision``
    ``"fp16"`` -- the default of ``bfpaccel.compile`` for block formats --, ``"bf16"`` or
    ``"fp32"``: no rounding).  Without a bias the float32 accumulator is returned as it is.

    Bit for bit: ``bfpaccel.matmul(x.reshape(-1, K), W, format)`` with ``W`` the weight quantized
    that way (for every rounding but ``"stochastic"`` that equals ``bfpaccel.matmul(x, weight.T,
    format)``; stochastic bits are indexed on the ``[N, K]`` weight), then the epilogue.

    Backward (straight-through): the gradients of ``F.linear(x_q, w_q, bias)`` on the
    dequantized operands: ``grad_x = grad @ w_q``, ``grad_w = grad^T @ x_q``,
    ``grad_bias = grad.sum(0)``.

    Example:
        >>> y = bfp_linear(torch.ones(3, 32), torch.full((4, 32), 0.5), torch.ones(4))
        >>> y.shape, y[0, 0].item()
        (torch.Size([3, 4]), 17.0)
    """
    x = _check_tensor(x, "x")
    weight = _check_tensor(weight, "weight")
    if bias is not None:
        bias = _check_tensor(bias, "bias")
    fx, fw = op_formats(format, weight_format, rounding)
    return linear_op(x, weight, bias, fx, fw, check_vector_precision(vector_precision), check_seed(seed))


def _pair(v: IntOrPair, name: str) -> List[int]:
    t = [v, v] if isinstance(v, int) and not isinstance(v, bool) else list(v)  # type: ignore[arg-type]
    if len(t) != 2 or any(isinstance(u, bool) or not isinstance(u, int) or u < 1 for u in t):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return [int(u) for u in t]


def conv_padding(padding: Padding, kernel: Sequence[int], dilation: Sequence[int],
                 stride: Sequence[int]) -> List[int]:
    """``padding`` as ``[top, left, bottom, right]``: an int, ``(ph, pw)``, ONNX-order
    ``(top, left, bottom, right)``, ``"valid"`` or ``"same"`` (stride 1; an odd total pads one
    more at the bottom / right, as PyTorch does)."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return [0, 0, 0, 0]
        if mode != "same":
            raise ValueError(f"padding must be 'same', 'valid', an int or a tuple, got {padding!r}")
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' needs stride 1 (as in nn.Conv2d)")
        tot = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [tot[0] // 2, tot[1] // 2, tot[0] - tot[0] // 2, tot[1] - tot[1] // 2]
    if isinstance(padding, bool):
        raise ValueError(f"padding must be a non-negative int, a pair, a 4-tuple or 'same' / 'valid', got {padding!r}")
    p: List[int] = [padding] * 4 if isinstance(padding, int) else list(padding)
    if len(p) == 2:
        p = [p[0], p[1], p[0], p[1]]
    if len(p) != 4 or any(isinstance(u, bool) or not isinstance(u, int) or u < 0 for u in p):
        raise ValueError(f"padding must be a non-negative int, a pair, a 4-tuple (top, left, bottom, right), "
                         f"'same' or 'valid', got {padding!r}")
    return [int(u) for u in p]


def conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
              padding: List[int], dilation: List[int], groups: int, fx: str, fw: str, vp: str,
              seed: int) -> torch.Tensor:
    """Shape checks, then the ``bfpaccel::conv2d`` op (normalised geometry, encoded formats);
    a 3-D ``x`` is one unbatched image, as in ``nn.Conv2d``."""
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [out, in/groups, kh, kw], got shape {tuple(weight.shape)}")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D NCHW (or 3-D CHW), got shape {tuple(x.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    O, Cg, kh, kw = weight.shape
    if O % groups:
        raise ValueError(f"out channels {O} are not divisible by groups={groups}")
    if x.shape[1] != Cg * groups:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects in/groups={Cg} x groups={groups}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != O):
        raise ValueError(f"bias must have shape ({O},), got {tuple(bias.shape)}")
    t, l, b, r = padding
    eh, ew = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    if x.shape[2] + t + b < eh or x.shape[3] + l + r < ew:
        raise ValueError(f"the padded input {x.shape[2] + t + b}x{x.shape[3] + l + r} is smaller than the "
                         f"dilated kernel {eh}x{ew}")
    y = torch.ops.bfpaccel.conv2d(x, weight, bias, stride, padding, dilation, groups, fx, fw, vp, seed)
    return y.squeeze(0) if unbatched else y


def bfp_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: IntOrPair = 1,
               padding: Padding = 0, dilation: IntOrPair = 1, groups: int = 1, format: FormatLike = "msfp16", *,
               weight_format: Optional[FormatLike] = None, rounding: Optional[str] = None,
               vector_precision: str = "fp16", seed: int = 0) -> torch.Tensor:
    """``F.conv2d`` (NCHW x OIHW) on the BFP datapath: bit for bit ``bfpaccel.conv2d(x, weight,
    format, stride=, padding=, dilation=, groups=, fmt_w=weight_format, seed=)`` -- blocks along
    input channels at each kernel tap, never crossing a group (``groups > 1`` and depthwise
    included) -- plus the plan's bias epilogue ``round_vp(float32(acc + bias))``
    (``vector_precision="fp32"``: exactly ``bfpaccel.conv2d(..., bias=bias)``).

    ``padding``: an int, ``(ph, pw)``, ``(top, left, bottom, right)``, ``"same"`` or ``"valid"``.

    Backward (straight-through): the gradients of ``F.conv2d(x_q, w_q, bias, ...)`` on the
    dequantized operands (``torch.ops.aten.convolution_backward``).

    Example:
        >>> y = bfp_conv2d(torch.ones(1, 16, 5, 5), torch.ones(4, 16, 3, 3), padding=1)
        >>> y.shape, y[0, 0, 2, 2].item()
        (torch.Size([1, 4, 5, 5]), 144.0)
    """
    x = _check_tensor(x, "x")
    weight = _check_tensor(weight, "weight")
    if bias is not None:
        bias = _check_tensor(bias, "bias")
    st, dil = _pair(stride, "stride"), _pair(dilation, "dilation")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [out, in/groups, kh, kw], got shape {tuple(weight.shape)}")
    pad = conv_padding(padding, weight.shape[2:], dil, st)
    fx, fw = op_formats(format, weight_format, rounding)
    return conv2d_op(x, weight, bias, st, pad, dil, groups, fx, fw, check_vector_precision(vector_precision),
                     check_seed(seed))
