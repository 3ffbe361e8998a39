"""``BfpLinear`` / ``BfpConv2d`` (drop-in ``nn.Linear`` / ``nn.Conv2d``) and ``quantize_model``."""

from __future__ import annotations

import copy
import difflib
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..formats import Format
from ._ops import check_seed, check_vector_precision, decode_format
from .functional import conv2d_op, conv_padding, linear_op, op_formats

__all__ = ["BfpLinear", "BfpConv2d", "quantize_model", "BfpOptions", "bfp_layers"]

FormatLike = Union[str, Format]


class BfpOptions:
    """The BFP settings of one layer: formats, rounding override, vector precision, seed
    (checked once; ``fx`` / ``fw`` are the encoded formats the ops take)."""

    __slots__ = ("fx", "fw", "vector_precision", "seed")

    def __init__(self, format: FormatLike = "msfp16", weight_format: Optional[FormatLike] = None,
                 rounding: Optional[str] = None, vector_precision: str = "fp16", seed: int = 0):
        self.fx, self.fw = op_formats(format, weight_format, rounding)
        self.vector_precision = check_vector_precision(vector_precision)
        self.seed = check_seed(seed)

    @property
    def format(self) -> Format:
        return decode_format(self.fx)

    @property
    def weight_format(self) -> Format:
        return decode_format(self.fw)

    def describe(self) -> str:
        f, w = self.format, self.weight_format
        s = f"format={f.name or self.fx}"
        if w != f:
            s += f", weight_format={w.name or self.fw}"
        if f.rounding != "nearest_even":
            s += f", rounding={f.rounding}"
        return s + f", vector_precision={self.vector_precision}, seed={self.seed}"


class _BfpMixin:
    _bfp: BfpOptions

    @property
    def format(self) -> Format:
        """Block format of the activations (rounding included)."""
        return self._bfp.format

    @property
    def weight_format(self) -> Format:
        """Block format of the weights."""
        return self._bfp.weight_format

    @property
    def vector_precision(self) -> str:
        """Precision of the bias epilogue: ``"fp16"``, ``"bf16"`` or ``"fp32"``."""
        return self._bfp.vector_precision

    @property
    def seed(self) -> int:
        """Seed of stochastic rounding."""
        return self._bfp.seed

    def bfp_options(self) -> Dict[str, Any]:
        """The keyword arguments that rebuild this layer's BFP settings."""
        return dict(format=self.format, weight_format=self.weight_format, vector_precision=self.vector_precision,
                    seed=self.seed)


class BfpLinear(_BfpMixin, nn.Linear):
    """``nn.Linear`` on the BFP datapath (:func:`bfpaccel.torch.bfp_linear`): same parameters,
    ``state_dict`` keys and initialisation as ``nn.Linear``; the forward is bit for bit what
    ``bfpaccel.compile`` + ``bfpaccel.Session`` compute for the same ``Gemm`` (weights quantized
    along in_features, activations per row, bias epilogue rounded to ``vector_precision``); the
    backward is straight-through (gradients of the float op at the dequantized operands).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        format: activation block format (preset name or :class:`bfpaccel.Format`).
        weight_format: weight block format (default ``format``).
        rounding: overrides the rounding of both formats.
        vector_precision: ``"fp16"`` (default, as ``bfpaccel.compile``), ``"bf16"`` or ``"fp32"``.
        seed: seed of stochastic rounding, in ``[0, 2**63)``.

    Example:
        >>> layer = BfpLinear(64, 10, format="msfp12")
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None, dtype: Any = None,
                 *, format: FormatLike = "msfp16", weight_format: Optional[FormatLike] = None,
                 rounding: Optional[str] = None, vector_precision: str = "fp16", seed: int = 0) -> None:
        opts = BfpOptions(format, weight_format, rounding, vector_precision, seed)  # checked before any allocation
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._bfp = opts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self._bfp
        return linear_op(x, self.weight, self.bias, o.fx, o.fw, o.vector_precision, o.seed)

    @classmethod
    def from_float(cls, module: nn.Linear, **options: Any) -> "BfpLinear":
        """A ``BfpLinear`` holding ``module``'s own parameters (shared, not copied: an optimizer
        over them keeps working); ``options`` as the constructor's keywords."""
        new = cls(module.in_features, module.out_features, module.bias is not None, device="meta", **options)
        new.weight = module.weight
        new.bias = module.bias
        new.train(module.training)
        return new

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's parameters."""
        new = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        new.weight = self.weight
        new.bias = self.bias
        new.train(self.training)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._bfp.describe()


class BfpConv2d(_BfpMixin, nn.Conv2d):
    """``nn.Conv2d`` on the BFP datapath (:func:`bfpaccel.torch.bfp_conv2d`): same parameters,
    ``state_dict`` keys and initialisation as ``nn.Conv2d``; the forward is bit for bit
    ``bfpaccel.conv2d`` (blocks along input channels at each tap; ``groups`` and depthwise
    included) plus the compiled plan's bias epilogue; the backward is straight-through.

    Only ``padding_mode="zeros"`` exists on the accelerator; other modes are refused.  The
    BFP keywords are those of :class:`BfpLinear`.

    Example:
        >>> conv = BfpConv2d(3, 8, 3, padding=1, format="mxint8")
        >>> conv(torch.randn(1, 3, 16, 16)).shape
        torch.Size([1, 8, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device: Any = None, dtype: Any = None, *, format: FormatLike = "msfp16",
                 weight_format: Optional[FormatLike] = None, rounding: Optional[str] = None,
                 vector_precision: str = "fp16", seed: int = 0) -> None:
        if padding_mode != "zeros":
            raise ValueError(f"BfpConv2d supports padding_mode='zeros' only (the accelerator pads with zeros), "
                             f"got {padding_mode!r}")
        opts = BfpOptions(format, weight_format, rounding, vector_precision, seed)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         "zeros", device=device, dtype=dtype)
        self._bfp = opts
        self._pads = conv_padding(self.padding, self.kernel_size, self.dilation, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self._bfp
        return conv2d_op(x, self.weight, self.bias, list(self.stride), self._pads, list(self.dilation), self.groups,
                         o.fx, o.fw, o.vector_precision, o.seed)

    @classmethod
    def from_float(cls, module: nn.Conv2d, **options: Any) -> "BfpConv2d":
        """A ``BfpConv2d`` holding ``module``'s own parameters (shared); ``options`` as the
        constructor's keywords."""
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, module.padding_mode, device="meta",
                  **options)
        new.weight = module.weight
        new.bias = module.bias
        new.train(module.training)
        return new

    def to_float(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding this layer's parameters."""
        geometry: Dict[str, Any] = dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                                        dilation=self.dilation, groups=self.groups)
        new = nn.Conv2d(self.in_channels, self.out_channels, bias=self.bias is not None, device="meta", **geometry)
        new.weight = self.weight
        new.bias = self.bias
        new.train(self.training)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._bfp.describe()


def _swappable(m: nn.Module) -> bool:
    """Layers quantize_model replaces: exactly nn.Linear / nn.Conv2d (subclasses may compute
    something else, e.g. MultiheadAttention's out_proj is read, not called) or the Bfp ones."""
    return type(m) in (nn.Linear, nn.Conv2d, BfpLinear, BfpConv2d)


_SPEC_KEYS = ("format", "weight_format", "rounding", "vector_precision", "seed")


def _options(spec: Any, base: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    """A layer's BFP keywords (None: keep it float), checked."""
    if spec is None:
        return None
    if isinstance(spec, (str, Format)):
        opts = dict(base, format=spec)
    elif isinstance(spec, Mapping):
        bad = sorted(set(spec) - set(_SPEC_KEYS))
        if bad:
            raise ValueError(f"overrides[{name!r}] has unknown keys {bad}; allowed: {', '.join(_SPEC_KEYS)}")
        opts = dict(base, **spec)
        if opts.get("format") is None:
            return None
    else:
        raise TypeError(f"overrides[{name!r}] must be a format name, a bfpaccel.Format, None or a dict, "
                        f"got {type(spec).__name__}")
    try:
        BfpOptions(**opts)
    except (ValueError, TypeError) as e:
        raise type(e)(f"layer {name!r}: {e}") from None
    return opts


def quantize_model(module: nn.Module, format: Optional[FormatLike] = "msfp16",
                   overrides: Optional[Mapping[str, Any]] = None, inplace: bool = False, *,
                   weight_format: Optional[FormatLike] = None, rounding: Optional[str] = None,
                   vector_precision: str = "fp16", seed: int = 0) -> nn.Module:
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` of ``module`` for a :class:`BfpLinear` /
    :class:`BfpConv2d` with the same parameters (``format`` and the keywords apply to all).

    ``overrides`` maps layer names (as ``module.named_modules()`` gives them; ``""`` is
    ``module`` itself) to a format name / :class:`bfpaccel.Format` for that layer, ``None`` to
    keep it float, or a dict of the keywords (``format``, ``weight_format``, ``rounding``,
    ``vector_precision``, ``seed``).  Already quantized layers are re-configured (or turned back
    into float ones by ``None``).  Only layers whose type is exactly ``nn.Linear`` /
    ``nn.Conv2d`` are swapped (subclasses may compute something else).  Shared layers stay
    shared.  Every argument is checked before anything changes.

    Args:
        module: the model.
        format: the format of every layer not named in ``overrides`` (``None``: leave those
            layers as they are, float or already quantized).
        overrides: per-layer settings, see above.
        inplace: modify ``module`` itself (its parameters are reused, so an optimizer built
            over them keeps working); default: a deep copy is changed and returned.

    Returns:
        The model with the layers swapped (``module`` itself when ``inplace``; the new layer
        when ``module`` itself is a ``nn.Linear`` / ``nn.Conv2d``).

    Raises:
        KeyError: an override names no ``nn.Linear`` / ``nn.Conv2d`` of the model.
        ValueError: a bad format, rounding, vector precision or seed (naming the layer), or a
            ``Conv2d`` with a ``padding_mode`` other than ``"zeros"`` that would be quantized.

    Example:
        >>> net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> q = quantize_model(net, "msfp16", overrides={"2": None})
        >>> type(q[0]).__name__, type(q[2]).__name__
        ('BfpLinear', 'Linear')
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    overrides = dict(overrides or {})
    layers = {name: m for name, m in module.named_modules() if _swappable(m)}
    unknown = [k for k in overrides if k not in layers]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(layers), n=3)
            hints.append(f"{k!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        raise KeyError(f"overrides name no nn.Linear / nn.Conv2d of the model: {'; '.join(hints)}; "
                       f"its layers: {', '.join(map(repr, layers)) or 'none'}")
    base = dict(format=format, weight_format=weight_format, rounding=rounding, vector_precision=vector_precision,
                seed=seed)
    plan: Dict[str, Optional[Dict[str, Any]]] = {}
    for name, m in layers.items():
        if name in overrides:
            opts = _options(overrides[name], base, name)
        elif format is None:
            continue  # left as it is
        else:
            opts = _options(format, base, name)
        if opts is not None and isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise ValueError(f"layer {name!r}: padding_mode={m.padding_mode!r} has no BFP form (zeros only); "
                             f"keep it float with overrides={{{name!r}: None}}")
        plan[name] = opts
    if not inplace:
        memo: Dict[int, Any] = {}
        new_root = copy.deepcopy(module, memo)
        layers = {name: memo[id(m)] for name, m in layers.items()}
        module = new_root
    replaced: Dict[int, nn.Module] = {}
    for name, m in layers.items():
        if name not in plan:
            continue
        opts = plan[name]
        new: nn.Module
        if opts is None:
            new = m.to_float() if isinstance(m, (BfpLinear, BfpConv2d)) else m
        elif isinstance(m, nn.Linear):
            new = BfpLinear.from_float(m, **opts)
        else:
            new = BfpConv2d.from_float(m, **opts)  # type: ignore[arg-type]
        if new is not m:
            replaced[id(m)] = new
    if id(module) in replaced:
        return replaced[id(module)]
    for parent in module.modules():
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replaced:
                parent._modules[key] = replaced[id(child)]
    return module


def bfp_layers(module: nn.Module) -> Dict[str, Tuple[str, str, str, int]]:
    """Name -> (format, weight format, vector precision, seed) of every Bfp layer (encoded formats)."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, (BfpLinear, BfpConv2d)):
            o = m._bfp
            out[name] = (o.fx, o.fw, o.vector_precision, o.seed)
    return out
