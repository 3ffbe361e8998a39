"""Block-floating-point formats: one small frozen dataclass and a table of presets.

A format is the triple *(block, shared exponent, element)* plus a rounding mode
(``docs/numerics.md`` is the contract; sources: Brainwave ISCA 2018 / IEEE Micro 2018,
MSFP NeurIPS 2020, OCP Microscaling Formats (MX) Specification v1.0).

Every element value is an integer number of *units*: ``value = n * 2**(E - unit_shift)``
where ``E`` is the block's shared exponent and ``n`` is the element's signed integer value
(``|n| <= max_units``).  For ``int(p)`` elements ``n`` is the signed magnitude and
``unit_shift = p - 1``; for the MX minifloats ``fp(e, m)`` the unit is the smallest
subnormal, ``2**(1 - bias - m)``, so ``unit_shift = bias + m - 1``.  The matrix datapath
(``reference.matmul``) sums products of these integers exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

__all__ = [
    "Format",
    "ROUNDING_MODES",
    "ELEMENT_KINDS",
    "PRESETS",
    "get_format",
    "list_formats",
    "NAN_EXPONENT",
    "VECTOR_PRECISIONS",
    "vector_precision_code",
]

#: Rounding modes (docs/numerics.md#element-rounding-and-saturation), in the order of their
#: integer ids in the C++ core.
ROUNDING_MODES = ("nearest_even", "nearest_away", "toward_zero", "stochastic")

#: Vector precisions (docs/numerics.md#vector-unit), the default first.
VECTOR_PRECISIONS = ("fp16", "bf16", "fp32")


def vector_precision_code(vp: str) -> int:
    """The C++ core's ``VecPrec`` value of a vector precision name (``"fp16"`` -> ``VecPrec.FP16``).

    Raises:
        ValueError: not one of :data:`VECTOR_PRECISIONS`.
    """
    from . import _core

    v = str(vp).strip().upper()
    if v.lower() not in VECTOR_PRECISIONS:
        raise ValueError(f"vector_precision must be one of {', '.join(VECTOR_PRECISIONS)}, got {vp!r}")
    return int(getattr(_core.VecPrec, v))


#: Exponent value stored for a block that held a NaN or an Inf (all its elements read as NaN).
NAN_EXPONENT = -32768

# fp(e, m) element kinds of the OCP MX spec: (exponent bits, mantissa bits, bias, specials)
# specials: "inf" = IEEE-like (top exponent code is Inf/NaN), "nan" = only S.1111.111 is NaN,
# "none" = every code is a finite number.
_FP_ELEMENTS = {
    "e5m2": (5, 2, 15, "inf"),
    "e4m3": (4, 3, 7, "nan"),
    "e3m2": (3, 2, 3, "none"),
    "e2m3": (2, 3, 1, "none"),
    "e2m1": (2, 1, 1, "none"),
}
_IEEE_ELEMENTS = ("fp32", "bf16", "fp16")

#: Element names that ``Format`` accepts.
ELEMENT_KINDS = tuple(f"int{p}" for p in range(1, 8)) + tuple(_FP_ELEMENTS) + _IEEE_ELEMENTS


def _shared_exp_range(bits: int) -> tuple[int, int]:
    """Range of a shared-exponent field of ``bits`` bits (docs/numerics.md#custom-formats)."""
    if bits == 8:  # E8M0 (MX) / MSFP: biased 0..254, 255 is NaN
        return -127, 127
    # fp16-like field (Brainwave ms-fp: 5 bits -> [-14, 15])
    half = 1 << (bits - 1)
    return -(half - 2), half - 1


@dataclass(frozen=True)
class Format:
    """A number format: ``block`` elements share one ``shared_exp_bits``-bit exponent.

    ``element`` is ``"int1"`` … ``"int7"`` (sign + p-bit magnitude, no hidden bit),
    an MX minifloat ``"e5m2" "e4m3" "e3m2" "e2m3" "e2m1"``, or a plain IEEE type
    ``"fp32" "bf16" "fp16"`` (then ``block`` and ``shared_exp_bits`` are ``None``).

    Example:
        >>> f = Format(block=16, shared_exp_bits=8, element="int7")
        >>> f.bits_per_element
        8.5
    """

    block: Optional[int]
    shared_exp_bits: Optional[int]
    element: str
    rounding: str = "nearest_even"
    name: Optional[str] = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        el = str(self.element).lower()
        object.__setattr__(self, "element", el)
        if el not in ELEMENT_KINDS:
            raise ValueError(
                f"unknown element {self.element!r}; expected one of {', '.join(ELEMENT_KINDS)}"
            )
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(
                f"unknown rounding {self.rounding!r}; expected one of {', '.join(ROUNDING_MODES)}"
            )
        if el in _IEEE_ELEMENTS:
            if self.block is not None or self.shared_exp_bits is not None:
                raise ValueError(f"{el} is a plain IEEE type: block and shared_exp_bits must be None")
            return
        if isinstance(self.block, bool) or not isinstance(self.block, int) or not 1 <= self.block <= 4096:
            raise ValueError(f"block must be an int in [1, 4096], got {self.block!r}")
        if (
            isinstance(self.shared_exp_bits, bool)
            or not isinstance(self.shared_exp_bits, int)
            or not 3 <= self.shared_exp_bits <= 8
        ):
            raise ValueError(f"shared_exp_bits must be an int in [3, 8], got {self.shared_exp_bits!r}")

    # ---- typed views of the block fields (block formats only) --------------------
    @property
    def block_size(self) -> int:
        """``block`` as an int; ValueError for the plain IEEE types, which have no block."""
        if self.block is None:
            raise ValueError(f"{self.name or self.element} is a plain IEEE type: it has no block")
        return self.block

    @property
    def exp_field_bits(self) -> int:
        """``shared_exp_bits`` as an int; ValueError for the plain IEEE types."""
        if self.shared_exp_bits is None:
            raise ValueError(f"{self.name or self.element} is a plain IEEE type: it has no shared exponent")
        return self.shared_exp_bits

    # ---- what kind of element -------------------------------------------------
    @property
    def is_block(self) -> bool:
        """True for block formats (False for the plain IEEE types fp32/bf16/fp16)."""
        return self.element not in _IEEE_ELEMENTS

    @property
    def kind(self) -> str:
        """``"int"``, ``"fp"`` (MX minifloat) or ``"ieee"``."""
        if self.element.startswith("int"):
            return "int"
        return "fp" if self.element in _FP_ELEMENTS else "ieee"

    @property
    def mantissa_bits(self) -> int:
        """Magnitude bits ``p`` of int(p), mantissa bits ``m`` of fp(e, m)."""
        if self.kind == "int":
            return int(self.element[3:])
        if self.kind == "fp":
            return _FP_ELEMENTS[self.element][1]
        return {"fp32": 23, "bf16": 7, "fp16": 10}[self.element]

    @property
    def exponent_bits(self) -> int:
        """Exponent bits of an fp element (0 for int elements)."""
        if self.kind == "fp":
            return _FP_ELEMENTS[self.element][0]
        if self.kind == "ieee":
            return {"fp32": 8, "bf16": 8, "fp16": 5}[self.element]
        return 0

    @property
    def element_bias(self) -> int:
        """Exponent bias of an fp element (0 for int elements)."""
        return _FP_ELEMENTS[self.element][2] if self.kind == "fp" else 0

    @property
    def element_specials(self) -> str:
        """``"inf"``, ``"nan"`` or ``"none"`` for fp elements; ``"none"`` for int."""
        return _FP_ELEMENTS[self.element][3] if self.kind == "fp" else "none"

    @property
    def element_bits(self) -> int:
        """Bits of one element code (sign included)."""
        if self.kind == "int":
            return 1 + self.mantissa_bits
        if self.kind == "fp":
            return 1 + self.exponent_bits + self.mantissa_bits
        return {"fp32": 32, "bf16": 16, "fp16": 16}[self.element]

    @property
    def emax_elem(self) -> int:
        """Exponent of the largest element binade: E = floor(log2(amax)) - emax_elem."""
        if self.kind == "int":
            return 0
        e, _, bias, specials = _FP_ELEMENTS[self.element]
        top = (1 << e) - 1 - bias
        return top - 1 if specials == "inf" else top

    @property
    def unit_shift(self) -> int:
        """Element value = units * 2**(E - unit_shift)."""
        if self.kind == "int":
            return self.mantissa_bits - 1
        return self.element_bias + self.mantissa_bits - 1

    @property
    def max_units(self) -> int:
        """Largest element magnitude, in integer units."""
        if self.kind == "int":
            return (1 << self.mantissa_bits) - 1
        m = self.mantissa_bits
        top_mant = (1 << m) - 1
        if self.element_specials == "nan":  # S.1111.111 is NaN: top binade stops one short
            top_mant -= 1
        # largest normal = (2^m + top_mant) * 2^(emax - m); unit = 2^(1 - bias - m)
        return ((1 << m) + top_mant) << (self.emax_elem + self.element_bias - 1)

    @property
    def exp_min(self) -> int:
        """Smallest shared exponent (also the exponent of an all-zero block)."""
        return _shared_exp_range(self.exp_field_bits)[0]

    @property
    def exp_max(self) -> int:
        """Largest shared exponent; larger values saturate."""
        return _shared_exp_range(self.exp_field_bits)[1]

    @property
    def bits_per_element(self) -> float:
        """Storage bits per element, the shared exponent spread over its block."""
        if not self.is_block:
            return float(self.element_bits)
        return self.element_bits + self.exp_field_bits / self.block_size

    @property
    def max_value(self) -> float:
        """Largest finite magnitude the format can hold."""
        if not self.is_block:
            return {"fp32": 3.4028234663852886e38, "bf16": 3.3895313892515355e38, "fp16": 65504.0}[
                self.element
            ]
        return math.ldexp(self.max_units, self.exp_max - self.unit_shift)

    @property
    def min_value(self) -> float:
        """Smallest positive magnitude the format can hold."""
        if not self.is_block:
            return {"fp32": 2.0**-149, "bf16": 2.0**-133, "fp16": 2.0**-24}[self.element]
        return math.ldexp(1.0, self.exp_min - self.unit_shift)

    @property
    def int8_units(self) -> bool:
        """True when every element fits a signed byte in units (the fast integer path)."""
        return self.is_block and self.max_units <= 127

    def with_rounding(self, rounding: str) -> "Format":
        """The same format with another rounding mode."""
        return dataclasses.replace(self, rounding=rounding, name=self.name)

    def kernel_params(self) -> tuple[int, ...]:
        """Plain integers the C++ core takes: (block, kind, p_or_m, ebits, bias, specials,
        unit_shift, max_units, exp_min, exp_max, emax_elem, rounding)."""
        if not self.is_block:
            raise ValueError(f"{self} is not a block format")
        return (
            self.block_size,
            0 if self.kind == "int" else 1,
            self.mantissa_bits,
            self.exponent_bits,
            self.element_bias,
            {"none": 0, "nan": 1, "inf": 2}[self.element_specials],
            self.unit_shift,
            self.max_units,
            self.exp_min,
            self.exp_max,
            self.emax_elem,
            ROUNDING_MODES.index(self.rounding),
        )

    def __str__(self) -> str:
        label = self.name or "custom"
        if not self.is_block:
            return f"{label} (IEEE {self.element})"
        return (
            f"{label} (block {self.block}, {self.shared_exp_bits}-bit shared exponent, "
            f"{self.element} elements, {self.rounding}, {self.bits_per_element:g} bits/element)"
        )


def _preset_table() -> Dict[str, Format]:
    table: Dict[str, Format] = {}
    for p in range(3, 8):  # msfp12 .. msfp16: int(3..7), block 16, 8-bit exponent
        n = f"msfp{p + 9}"
        table[n] = Format(16, 8, f"int{p}", name=n)
    table["msfp8"] = Format(128, 5, "int2", name="msfp8")  # Brainwave ms-fp8
    table["msfp9"] = Format(128, 5, "int3", name="msfp9")  # Brainwave ms-fp9
    table["mxint8"] = Format(32, 8, "int7", name="mxint8")  # int(7) with implied 2^-6
    for el in ("e5m2", "e4m3"):
        table[f"mxfp8_{el}"] = Format(32, 8, el, name=f"mxfp8_{el}")
    for el in ("e3m2", "e2m3"):
        table[f"mxfp6_{el}"] = Format(32, 8, el, name=f"mxfp6_{el}")
    table["mxfp4_e2m1"] = Format(32, 8, "e2m1", name="mxfp4_e2m1")
    for el in _IEEE_ELEMENTS:
        table[el] = Format(None, None, el, name=el)
    return table


#: Preset name -> Format (docs/numerics.md#presets).
PRESETS: Dict[str, Format] = _preset_table()


def list_formats() -> List[str]:
    """Names of all presets, e.g. ``["msfp12", ..., "fp16"]``.

    Example:
        >>> "msfp16" in list_formats()
        True
    """
    return list(PRESETS)


def get_format(
    fmt: Union[str, Format],
    *,
    block: Optional[int] = None,
    rounding: Optional[str] = None,
) -> Format:
    """Resolve a preset name (case-insensitive) or a ``Format``; optionally override its
    block size (e.g. ms-fp8 at another native vector size) or rounding.

    Example:
        >>> get_format("MSFP16").block
        16
        >>> get_format("msfp8", block=64).block
        64
    """
    if isinstance(fmt, Format):
        out = fmt
    elif isinstance(fmt, str):
        try:
            out = PRESETS[fmt.strip().lower()]
        except KeyError:
            raise ValueError(
                f"unknown format {fmt!r}; known presets: {', '.join(PRESETS)} "
                "(or build one with bfpaccel.Format(block=..., shared_exp_bits=..., element=...))"
            ) from None
    else:
        raise TypeError(f"format must be a preset name or a bfpaccel.Format, got {type(fmt).__name__}")
    if block is not None:
        if not out.is_block:
            raise ValueError(f"{out.name or out.element} has no block size to change")
        out = dataclasses.replace(out, block=block, name=out.name)
    if rounding is not None:
        out = out.with_rounding(rounding)
    return out
