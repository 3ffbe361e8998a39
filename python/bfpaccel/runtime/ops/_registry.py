"""The op registry: one :class:`OpSpec` per ONNX op type the runtime knows.

A family module (``matrix.py``, ``elementwise.py``, ...) declares each op once, next to the
code that runs it:

* ``@lowers("Relu", ...)`` registers a *lowering handler* ``fn(cx, node)``: it reads the node's
  inputs from the lowering context ``cx`` (:class:`~bfpaccel.runtime.lower.Lowering`), emits
  program ops into it and defines the node's outputs;
* ``@folds("Relu", ...)`` registers a *folder* ``fn(node, inputs, opset) -> outputs``: numpy
  evaluation for a node whose inputs are all constants (shape arithmetic, constant reshapes);
* ``declare("Gemm", ...)`` declares an op that has neither (the compiler rewrites it).

Either decorator also takes the op's plan schema -- how many inputs and outputs it has and
which attributes a plan file may give it (checked when a plan loads, ``_validate.py``) -- and
what the compiler needs to know (does input 1 carry a weight to quantize? may all-constant
inputs be folded?).  ``SUPPORTED_OPS`` is every registered op type.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..graph import Node

if TYPE_CHECKING:  # pragma: no cover
    from ..lower import Lowering

__all__ = ["OpSpec", "lowers", "folds", "declare", "find", "all_specs", "supported_ops", "AttrCheck", "NodeCheck"]

#: ``check(value, where)``: raises the plan validator's error when an attribute is malformed.
AttrCheck = Callable[[Any, str], None]
#: ``check(node, where, consts, format, weight_format, opset)``: a node's plan-load checks beyond
#: its attribute types (``consts``: name -> (dtype, shape) of the plan's constants).
NodeCheck = Callable[[Node, str, Dict[str, Tuple[np.dtype, Tuple[int, ...]]], Any, Any, int], None]
LowerFn = Callable[["Lowering", Node], None]
#: ``prepare(node, graph, weight_format, seed)``: the compiler's step for an op that keeps its
#: weights its own way (the recurrent ops quantize W and R into the plan)
PrepareFn = Callable[[Node, Any, Any, int], None]
FoldFn = Callable[[Node, List[Any], int], List[np.ndarray]]

#: weights: the compiler quantizes input 1 once into the plan (attributes ``qweight`` / ``fweight``)
QUANTIZED = "quantized"
#: weights: the compiler turns the op into ``BfpDense`` when input 1 is a constant (else unsupported)
TO_DENSE = "to_dense"


@dataclasses.dataclass
class OpSpec:
    """Everything the compiler, the plan validator and the lowering know about one op type."""

    op_type: str
    #: emits the op into a program (None: the op runs only on constants, or is rewritten away)
    lower: Optional[LowerFn] = None
    #: numpy evaluation on constant inputs (None: an all-constant node cannot be evaluated)
    fold: Optional[FoldFn] = None
    #: all inputs constant: fold the node (False: lower it anyway, as matrix ops and Shape do)
    fold_constants: bool = True
    #: None, QUANTIZED (Conv, BfpDense) or TO_DENSE (Gemm, MatMul): see the module constants
    weights: Optional[str] = None
    #: (fewest, most or None: any number) inputs, empty names included
    inputs: Tuple[int, Optional[int]] = (1, 1)
    #: most outputs (None: any number)
    outputs: Optional[int] = 1
    #: attribute name -> its check; attributes not listed are not checked
    attrs: Mapping[str, AttrCheck] = dataclasses.field(default_factory=dict)
    #: a node's further plan-load checks (required attributes, consistent constants)
    check: Optional[NodeCheck] = None
    #: the compiler's own step for the op (weights it quantizes itself), or None
    prepare: Optional[PrepareFn] = None
    #: the module that declares the op
    family: str = ""

    def arity_text(self) -> str:
        lo, hi = self.inputs
        return f"{lo}{'' if hi == lo else (' or more' if hi is None else f' to {hi}')}"


_SPECS: Dict[str, OpSpec] = {}
_SCHEMA_KEYS = ("inputs", "outputs", "attrs", "check", "weights", "fold_constants", "prepare")
_schema_given: Dict[str, str] = {}  # op type -> the module that gave its schema


def _spec(op_type: str) -> OpSpec:
    if not isinstance(op_type, str) or not op_type:
        raise TypeError(f"op types are non-empty strings, got {op_type!r}")
    s = _SPECS.get(op_type)
    if s is None:
        s = _SPECS[op_type] = OpSpec(op_type)
    return s


def _set_schema(op_type: str, family: str, schema: Dict[str, Any]) -> None:
    if not schema:
        return
    unknown = set(schema) - set(_SCHEMA_KEYS)
    if unknown:
        raise TypeError(f"unknown op schema keys {sorted(unknown)} for {op_type}")
    s = _spec(op_type)
    if op_type in _schema_given:
        raise ValueError(f"{op_type}: schema declared twice ({_schema_given[op_type]} and {family})")
    _schema_given[op_type] = family
    for k, v in schema.items():
        if k == "inputs":
            v = (int(v), int(v)) if isinstance(v, int) else (int(v[0]), None if v[1] is None else int(v[1]))
        elif k == "attrs":
            v = dict(v)
        setattr(s, k, v)


def _family(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__module__", "") or ""


def lowers(*op_types: str, **schema: Any) -> Callable[[LowerFn], LowerFn]:
    """Registers the decorated ``fn(cx, node)`` as the lowering of ``op_types``.

    Keyword arguments give the ops' schema (each op's schema is declared once, here or in
    :func:`folds`): ``inputs`` (a count or ``(fewest, most)``, most ``None`` for any number),
    ``outputs`` (most outputs), ``attrs`` (name -> check), ``check`` (further plan-load checks),
    ``weights`` (``"quantized"`` / ``"to_dense"``), ``fold_constants`` and ``prepare`` (the
    compiler's step for an op that quantizes its weights itself).

    Example:
        >>> from bfpaccel.runtime.ops import lowers  # doctest: +SKIP
        >>> @lowers("Relu", "Sigmoid")  # doctest: +SKIP
        ... def _unary(cx, n): ...
    """

    def deco(fn: LowerFn) -> LowerFn:
        for t in op_types:
            s = _spec(t)
            if s.lower is not None:
                raise ValueError(f"{t}: a second lowering ({_family(fn)}.{fn.__name__})")
            s.lower = fn
            s.family = s.family or _family(fn)
            _set_schema(t, _family(fn), schema)
        return fn

    return deco


def folds(*op_types: str, **schema: Any) -> Callable[[FoldFn], FoldFn]:
    """Registers the decorated ``fn(node, inputs, opset) -> outputs`` as the numpy evaluation of
    ``op_types`` on constant inputs (``inputs``: one array or None per node input). Schema
    keywords as in :func:`lowers`."""

    def deco(fn: FoldFn) -> FoldFn:
        for t in op_types:
            s = _spec(t)
            if s.fold is not None:
                raise ValueError(f"{t}: a second folder ({_family(fn)}.{fn.__name__})")
            s.fold = fn
            s.family = s.family or _family(fn)
            _set_schema(t, _family(fn), schema)
        return fn

    return deco


def declare(*op_types: str, family: str = "", **schema: Any) -> None:
    """Declares ops with neither a lowering nor a folder of their own (``Gemm`` and ``MatMul``:
    the compiler turns them into ``BfpDense``)."""
    for t in op_types:
        s = _spec(t)
        s.family = s.family or family
        _set_schema(t, family, schema)


def find(op_type: str) -> Optional[OpSpec]:
    """The spec of ``op_type``, or None when the runtime does not know it."""
    return _SPECS.get(op_type)


def all_specs() -> Mapping[str, OpSpec]:
    """Every registered op type -> its spec (read-only view)."""
    return dict(_SPECS)


def supported_ops() -> set:
    """The op types the runtime executes, folds or compiles into one it executes."""
    return set(_SPECS)
