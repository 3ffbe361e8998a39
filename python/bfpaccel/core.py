"""The public numeric API over the C++ core: quantize, fake_quantize, matmul, conv2d.

Every function here validates its arguments, converts them to the arrays and named parameter
structs the C++ core takes (``_core``), and calls one kernel; the GIL is released inside it.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core  # type: ignore[attr-defined]  # the C++ extension
from .formats import NAN_EXPONENT, Format, get_format
from .reference import _pair, normalize_padding

__all__ = [
    "BfpTensor",
    "ConvWeight",
    "quantize",
    "fake_quantize",
    "matmul",
    "quantize_conv_weight",
    "conv2d",
    "set_num_threads",
    "get_num_threads",
    "available_kernels",
    "get_kernel",
    "set_kernel",
]

FormatLike = Union[str, Format]
IntOrPair = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------- threads & kernels
def set_num_threads(n: int) -> None:
    """Threads the kernels use (default: the CPU count, or ``BFPACCEL_NUM_THREADS``).

    In a child of ``os.fork()`` (``multiprocessing``'s "fork" start method, a forking server)
    every op runs on the calling thread whatever this says: GNU OpenMP cannot start a team of
    threads in a forked child once the parent has used one (the child would wait forever). The
    results are the same bits; for multi-threaded workers start them with "spawn" or
    "forkserver".

    Example:
        >>> set_num_threads(1); get_num_threads()
        1
    """
    _core.set_num_threads(check_num_threads(n))


def check_num_threads(n: Any) -> int:
    """``n`` as a thread count, or a ``ValueError`` naming the valid range (1 to
    ``_core.max_threads()``): a huge count would exhaust the OpenMP runtime."""
    hi = _core.max_threads()
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= hi:
        raise ValueError(f"number of threads must be an int in [1, {hi}], got {n!r}")
    return int(n)


def get_num_threads() -> int:
    """Threads the kernels use."""
    return _core.get_num_threads()


def available_kernels() -> List[str]:
    """Kernels this CPU can run, in order of preference, e.g. ``["scalar", "avx2", "avx512"]``; the last
    is the default. Test builds (CMake option ``BFPACCEL_AVX512_EMULATION``) add emulated
    kernels (``"avx512-emu"``...) after ``"scalar"``: a SIMD kernel's source on portable
    intrinsics, to check it bit for bit where the CPU lacks the ISA; never the default.
    The list is read from the C++ kernel table."""
    return list(_core.available_kernels())


def get_kernel() -> str:
    """The kernel in use (the fastest available unless forced by ``set_kernel`` or
    the ``BFPACCEL_KERNEL`` environment variable)."""
    return _core.get_kernel()


def set_kernel(name: Optional[str]) -> None:
    """Force ``"scalar"``, ``"avx2"`` or ``"avx512"``; ``None`` picks the fastest available.

    Example:
        >>> set_kernel("scalar"); get_kernel()
        'scalar'
        >>> set_kernel(None)
    """
    _core.set_kernel(check_kernel(name))


def check_kernel(name: Optional[str]) -> Optional[str]:
    """The normalised kernel name (``None`` stays ``None``: the default), or a ``ValueError``
    naming the known / available kernels."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"kernel name must be a str or None, got {type(name).__name__}")
    name = name.strip().lower()
    if name not in _core.kernel_names():
        raise ValueError(f"unknown kernel {name!r}; this build has {', '.join(_core.kernel_names())}")
    if name not in available_kernels():
        raise ValueError(f"this CPU cannot run the {name} kernel; available: {', '.join(available_kernels())}")
    return name


def _init_from_env() -> None:
    k = os.environ.get("BFPACCEL_KERNEL")
    if k:
        set_kernel(k)
    t = os.environ.get("BFPACCEL_NUM_THREADS")
    if t:
        try:
            set_num_threads(int(t))
        except ValueError as exc:
            raise ValueError(f"BFPACCEL_NUM_THREADS={t!r}: {exc}") from None


# ----------------------------------------------------------------------------- formats
_SPECIALS = {"none": 0, "nan": 1, "inf": 2}


def fmt_params(f: Format) -> Any:
    """A block format's parameters as the C++ core takes them (``_core.FmtParams``, named
    fields; ``Format.kernel_params()`` is the same numbers as a tuple)."""
    if not f.is_block:
        raise ValueError(f"{f} is not a block format")
    return _core.FmtParams(
        block=f.block_size, kind=_core.ElemKind.INT if f.kind == "int" else _core.ElemKind.FP, mbits=f.mantissa_bits,
        ebits=f.exponent_bits, bias=f.element_bias, specials=_SPECIALS[f.element_specials], unit_shift=f.unit_shift,
        max_units=f.max_units, exp_min=f.exp_min, exp_max=f.exp_max, emax_elem=f.emax_elem,
        rounding=getattr(_core.Rounding, f.rounding.upper()))


# ----------------------------------------------------------------------------- tensors
def _as_float32(x, what: str) -> np.ndarray:
    """Convert to a C-contiguous float32 array; real numbers only (ints, bools, floats)."""
    if isinstance(x, BfpTensor):
        raise TypeError(f"{what} is already a BfpTensor; pass the float array")
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{what} must be a real numeric array (float or int), got dtype {arr.dtype}")
    return arr.astype(np.float32, order="C", copy=False)  # (ascontiguousarray would make 0-d arrays 1-d)


def _block_format(fmt: FormatLike, rounding: Optional[str] = None) -> Format:
    f = get_format(fmt, rounding=rounding)
    if not f.is_block:
        raise ValueError(
            f"{f.name or f.element} is a plain IEEE type, not a block format; "
            "use fake_quantize for it, or a block format such as 'msfp16'"
        )
    return f


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 1 << 64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return int(seed)


class BfpTensor:
    """A tensor in a block format: ``elements`` (one code per element, ``x``'s shape) and
    ``exponents`` (one per block: ``x``'s shape with ``shape[axis]`` replaced by the number of
    blocks).  Codes of ``int(p)`` elements are signed integers (int8); codes of MX minifloat
    elements are OCP bit patterns (uint8).  An exponent of ``NAN_EXPONENT`` marks a block that
    held NaN/Inf.  Build one with ``bfpaccel.quantize``.

    Example:
        >>> t = quantize(np.ones((4, 32), np.float32), "msfp16", axis=1)
        >>> t.exponents.shape, float(t.dequantize().sum())
        ((4, 2), 128.0)
    """

    __slots__ = ("_format", "_axis", "_elements", "_exponents", "_packed")
    _packed: Dict[Tuple[str, int, int], object]

    def __init__(self, format: Format, axis: int, elements: np.ndarray, exponents: np.ndarray):
        elements = np.asarray(elements)
        exponents = np.asarray(exponents)
        if elements.dtype not in (np.int8, np.uint8) or exponents.dtype != np.int16:
            raise TypeError("BfpTensor needs int8/uint8 elements and int16 exponents")
        if not -elements.ndim <= axis < max(elements.ndim, 1):
            raise ValueError(f"axis {axis} out of range for a {elements.ndim}-d tensor")
        axis %= max(elements.ndim, 1)
        want = list(elements.shape)
        if want:
            want[axis] = -(-want[axis] // format.block_size)
        if list(exponents.shape) != want:
            raise ValueError(f"exponents have shape {exponents.shape}; elements of shape {elements.shape} in "
                             f"blocks of {format.block_size} along axis {axis} need {tuple(want)}")
        # read-only: the packed forms cached in _packed must keep matching the codes
        elements = np.ascontiguousarray(elements)
        exponents = np.ascontiguousarray(exponents)
        elements.flags.writeable = False
        exponents.flags.writeable = False
        self._format = format
        self._axis = axis
        self._elements = elements
        self._exponents = exponents
        self._packed = {}

    @property
    def format(self) -> Format:
        """The block format."""
        return self._format

    @property
    def axis(self) -> int:
        """The blocked axis."""
        return self._axis

    @property
    def elements(self) -> np.ndarray:
        """One code per element (read-only)."""
        return self._elements

    @property
    def exponents(self) -> np.ndarray:
        """One shared exponent per block (read-only)."""
        return self._exponents

    @property
    def shape(self) -> Tuple[int, ...]:
        """Shape of the tensor that was quantized."""
        return tuple(self.elements.shape)

    @property
    def ndim(self) -> int:
        return self.elements.ndim

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (one byte per element code, two per exponent)."""
        return int(self.elements.nbytes + self.exponents.nbytes)

    @property
    def storage_bits(self) -> int:
        """Bits the format needs on the wire/FPGA: element bits plus one exponent per block."""
        return int(self.elements.size * self.format.element_bits + self.exponents.size * self.format.exp_field_bits)

    @property
    def has_nan(self) -> bool:
        """True when a block held NaN or Inf (its elements read as NaN)."""
        return bool((self.exponents == NAN_EXPONENT).any())

    def dequantize(self) -> np.ndarray:
        """The float32 values this tensor stands for."""
        outer, K, inner = _split3(self.shape, self.axis)
        out = np.empty(self.shape, dtype=np.float32)
        _core.dequantize(
            self.elements.reshape(outer, K, inner).view(np.int8),
            self.exponents.reshape(outer, self.exponents.shape[self.axis], inner),
            fmt_params(self.format),
            out.reshape(outer, K, inner),
        )
        return out

    def __repr__(self) -> str:
        return f"BfpTensor(shape={self.shape}, axis={self.axis}, format={self.format})"


def _split3(shape: Tuple[int, ...], axis: int) -> Tuple[int, int, int]:
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1 :], dtype=np.int64))
    return outer, int(shape[axis]), inner


def _norm_axis(axis: int, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of {ndim} dimensions")
    return int(axis) % ndim


def quantize(
    x, fmt: FormatLike, axis: int = -1, rounding: Optional[str] = None, seed: int = 0
) -> BfpTensor:
    """Quantize ``x`` into blocks along ``axis`` (C++ kernel, bit-exact with ``reference``).

    ``rounding`` overrides the format's rounding; ``seed`` drives ``"stochastic"`` rounding
    (same seed, same result).

    Example:
        >>> quantize([1.0, 0.3, -0.77, 0.01], "msfp16").elements.tolist()
        [64, 19, -49, 1]
    """
    f = _block_format(fmt, rounding)
    x = _as_float32(x, "x")
    if x.ndim == 0:
        raise ValueError("cannot quantize a 0-d array: there is no axis to block")
    ax = _norm_axis(axis, x.ndim)
    outer, K, inner = _split3(x.shape, ax)
    nb = -(-K // f.block_size)
    codes = np.empty(x.shape, dtype=np.int8 if f.kind == "int" else np.uint8)
    exp_shape = x.shape[:ax] + (nb,) + x.shape[ax + 1 :]
    exps = np.empty(exp_shape, dtype=np.int16)
    _core.quantize(
        x.reshape(outer, K, inner),
        fmt_params(f),
        _check_seed(seed),
        codes.reshape(outer, K, inner).view(np.int8),
        exps.reshape(outer, nb, inner),
    )
    return BfpTensor(f, ax, codes, exps)


def fake_quantize(
    x, fmt: FormatLike, axis: int = -1, rounding: Optional[str] = None, seed: int = 0
) -> np.ndarray:
    """Quantize and dequantize in one pass: float32 in, float32 out.  IEEE presets
    (``fp16``, ``bf16``, ``fp32``) round to that type (RNE, overflow to Inf).

    Example:
        >>> fake_quantize([1.0, 0.3, -0.77, 0.01], "msfp16").tolist()
        [1.0, 0.296875, -0.765625, 0.015625]
    """
    f = get_format(fmt, rounding=rounding)
    x = _as_float32(x, "x")
    if not f.is_block:
        from .reference import _round_ieee

        return _round_ieee(x, f.element)
    if x.ndim == 0:
        raise ValueError("cannot quantize a 0-d array: there is no axis to block")
    ax = _norm_axis(axis, x.ndim)
    outer, K, inner = _split3(x.shape, ax)
    out = np.empty(x.shape, dtype=np.float32)
    _core.fake_quantize(x.reshape(outer, K, inner), fmt_params(f), _check_seed(seed), out.reshape(outer, K, inner))
    return out


# ----------------------------------------------------------------------------- GEMM
def _packed(t: BfpTensor, role: str, taps: int = 1, groups: int = 1) -> object:
    """The kernel-ready form of a pre-quantized operand, built once per kernel and cached."""
    key = (role + _core.get_kernel(), taps, groups)
    p = t._packed.get(key)
    if p is None:
        p = _core.pack_operand(t.elements.view(np.int8), t.exponents, fmt_params(t.format), role, taps, groups)
        t._packed[key] = p
    return p


def matmul(
    a,
    b,
    fmt: Optional[FormatLike] = None,
    fmt_b: Optional[FormatLike] = None,
    seed: int = 0,
) -> np.ndarray:
    """``a[M,K] @ b[K,N]`` on the BFP datapath (docs/numerics.md#matrix-datapath), float32 ``[M,N]``.

    ``a`` is float (quantized along K with ``fmt``) or a ``BfpTensor`` with ``axis=1``;
    ``b`` is float (quantized along K with ``fmt_b``, default ``fmt``) or a ``BfpTensor``
    with ``axis=0`` -- pre-quantized weights, packed once and cached on the tensor.

    Example:
        >>> w = quantize(np.eye(16, dtype=np.float32), "msfp16", axis=0)
        >>> matmul(np.arange(16, dtype=np.float32)[None], w, "msfp16")[0, :4].tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    seed = _check_seed(seed)
    fa = _block_format(fmt) if fmt is not None else None
    fb = _block_format(fmt_b) if fmt_b is not None else None
    if isinstance(a, BfpTensor):
        if a.ndim != 2 or a.axis != 1:
            raise ValueError(f"a must be a 2-D BfpTensor blocked along K (axis=1), got shape {a.shape} axis {a.axis}")
        if fa is not None and fa != a.format:
            raise ValueError(f"a was quantized as {a.format}, but fmt={fa} was given")
        fa = a.format
    if isinstance(b, BfpTensor):
        if b.ndim != 2 or b.axis != 0:
            raise ValueError(
                f"b must be a 2-D BfpTensor blocked along K (axis=0), got shape {b.shape} axis {b.axis}; "
                "quantize weights [K, N] with axis=0"
            )
        if fb is not None and fb != b.format:
            raise ValueError(f"b was quantized as {b.format}, but fmt_b={fb} was given")
        fb = b.format
    if fa is None:
        fa = fb
    if fb is None:
        fb = fa
    if fa is None or fb is None:
        raise ValueError("give fmt (a format name such as 'msfp16') to quantize float operands")
    if fa.block_size != fb.block_size:
        raise ValueError(
            f"block sizes differ: a uses {fa.block_size}, b uses {fb.block_size}; quantize both operands with the same block"
        )
    if not isinstance(a, BfpTensor):
        a = _as_float32(a, "a")
        if a.ndim != 2:
            raise ValueError(f"a must be 2-D [M, K], got shape {a.shape}")
    if not isinstance(b, BfpTensor):
        b = _as_float32(b, "b")
        if b.ndim != 2:
            raise ValueError(f"b must be 2-D [K, N], got shape {b.shape}")
        b = quantize(b, fb, axis=0, seed=seed)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"K mismatch: a is {a.shape}, b is {b.shape}")
    # activations: quantized straight into the kernel's row form (no intermediate BfpTensor)
    rows = _packed(a, "rows") if isinstance(a, BfpTensor) else _core.quantize_rows(a, fmt_params(fa), seed)
    return _core.gemm(rows, _packed(b, "cols"))


# ----------------------------------------------------------------------------- convolution
class ConvWeight:
    """OIHW convolution weights quantized once along input channels at each tap, packed for
    the kernel.  Build with ``quantize_conv_weight``; pass to ``conv2d`` instead of ``w``.

    Example:
        >>> cw = quantize_conv_weight(np.ones((8, 4, 3, 3), np.float32), "msfp16")
        >>> cw.shape, cw.format.name
        ((8, 4, 3, 3), 'msfp16')
    """

    __slots__ = ("tensor", "groups")

    def __init__(self, tensor: BfpTensor, groups: int):
        self.tensor = tensor
        self.groups = groups

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.tensor.shape

    @property
    def format(self) -> Format:
        return self.tensor.format

    def dequantize(self) -> np.ndarray:
        return self.tensor.dequantize()

    def __repr__(self) -> str:
        return f"ConvWeight(shape={self.shape}, groups={self.groups}, format={self.format})"


def quantize_conv_weight(w, fmt: FormatLike, groups: int = 1, seed: int = 0) -> ConvWeight:
    """Quantize OIHW weights ``[O, C/groups, KH, KW]`` once, blocked along input channels."""
    f = _block_format(fmt)
    w = _as_float32(w, "w")
    if w.ndim != 4:
        raise ValueError(f"w must be 4-D OIHW, got shape {w.shape}")
    g = _check_groups(groups)
    if w.shape[0] % g:
        raise ValueError(f"output channels O={w.shape[0]} are not divisible by groups={g}")
    return ConvWeight(quantize(w, f, axis=1, seed=_check_seed(seed)), g)


def _check_groups(groups: int) -> int:
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    return int(groups)


def conv2d(
    x,
    w,
    fmt: Optional[FormatLike] = None,
    bias=None,
    stride: IntOrPair = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    fmt_w: Optional[FormatLike] = None,
    seed: int = 0,
) -> np.ndarray:
    """NCHW convolution on the BFP datapath; output ``acc + bias`` in float32 (NCHW).

    ``w`` is OIHW float (quantized with ``fmt_w``, default ``fmt``) or a ``ConvWeight``.
    ``padding`` is an int, ``(ph, pw)`` or ONNX-order ``(top, left, bottom, right)``.
    Blocks run along input channels at each kernel tap and never cross a group.

    Example:
        >>> y = conv2d(np.ones((1, 16, 5, 5), np.float32), np.ones((4, 16, 3, 3), np.float32), "msfp16", padding=1)
        >>> y.shape, float(y[0, 0, 2, 2])
        ((1, 4, 5, 5), 144.0)
    """
    seed = _check_seed(seed)
    g = _check_groups(groups)
    fx = _block_format(fmt) if fmt is not None else None
    if isinstance(w, ConvWeight):
        if w.groups != g:
            raise ValueError(f"the ConvWeight was built for groups={w.groups}, but groups={g} was given")
        fw = w.format
        if fmt_w is not None and _block_format(fmt_w) != fw:
            raise ValueError(f"w was quantized as {fw}, but fmt_w={fmt_w} was given")
        cw = w
    else:
        fw_or_none = _block_format(fmt_w) if fmt_w is not None else fx
        if fw_or_none is None:
            raise ValueError("give fmt (a format name such as 'msfp16') to quantize float operands")
        fw = fw_or_none
        cw = quantize_conv_weight(w, fw, g, seed)
    if fx is None:
        fx = fw
    if fx.block_size != fw.block_size:
        raise ValueError(
            f"block sizes differ: x uses {fx.block_size}, the weight was built with block {fw.block_size}; "
            "re-quantize the weight with the activation's block"
        )
    x = _as_float32(x, "x")
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D NCHW, got shape {x.shape}")
    N, C, H, W = x.shape
    O, Cg, KH, KW = cw.shape
    if C != Cg * g:
        raise ValueError(f"x has {C} channels but w expects C/groups={Cg} x groups={g} = {Cg * g}")
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    pt, pl, pb, pr = normalize_padding(padding)
    eff_h, eff_w = dh * (KH - 1) + 1, dw * (KW - 1) + 1
    if H + pt + pb < eff_h or W + pl + pr < eff_w:
        raise ValueError(
            f"the padded input {H + pt + pb}x{W + pl + pr} is smaller than the dilated kernel {eff_h}x{eff_w}"
        )
    b = None
    if bias is not None:
        b = _as_float32(bias, "bias").reshape(-1)
        if b.shape[0] != O:
            raise ValueError(f"bias has {b.shape[0]} values for {O} output channels")
    packed_w = _packed(cw.tensor, "convw", KH * KW, g)
    return _core.conv2d(
        x, fmt_params(fx), seed, packed_w, g, (sh, sw), (pt, pl, pb, pr), (dh, dw), b
    )
