"""Elementwise vector ops: broadcasting binary ops (Add, Sub, Mul, Div, Max, Min, Pow, Sum) and
unary ops (Relu, Clip, LeakyRelu, Sigmoid, Tanh, Exp, Log, Gelu, ...).

Each runs on the vector units: its result is rounded to the plan's vector precision.  A binary
op keeps the layout of its full-rank operand (a channels-last tensor stays channels-last);
constants are laid out to match once, when the program is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List

import numpy as np

from ..._core import BinaryKind, BinaryParams, UnaryKind, UnaryParams  # type: ignore[attr-defined]
from .._validate import Attr, need
from ..graph import Node, broadcast_shape
from ..values import ident, strides
from ._common import core_kind
from ._registry import folds, lowers

if TYPE_CHECKING:  # pragma: no cover
    from ..lower import Lowering

Arrays = List[Any]  # one array (or None for an absent input) per node input


# ---------------------------------------------------------------- binary
def binary(cx: "Lowering", op: str, a_name: str, b_name: str, out_name: str) -> None:
    """Emits ``out = op(a, b)`` with ONNX broadcasting (``op``: ``"Add"``, ``"Mul"``, ...)."""
    sub = core_kind(BinaryKind, op)
    names = [a_name, b_name]
    shapes = [cx.shape_of(x) for x in names]
    try:
        oshape = broadcast_shape(shapes[0], shapes[1])
    except ValueError:
        raise cx.err(f"shapes {shapes[0]} and {shapes[1]} do not broadcast") from None
    r = len(oshape)
    live = [cx.get(x) for x in names if not cx.is_const(x)]
    full = [v for v in live if len(v.shape) == r]
    perm = full[0].perm if full else ident(r)
    if any(len(v.shape) != r for v in live):
        perm = ident(r)
    ophys = [oshape[p] for p in perm]
    vids, strd = [], []
    for x, shp in zip(names, shapes):
        s_full = (1,) * (r - len(shp)) + tuple(shp)
        if cx.is_const(x):
            arr = np.asarray(cx.const(x), np.float32).reshape(s_full).transpose(perm)
            vid = cx.const_vid(np.ascontiguousarray(arr))
            ph = arr.shape
        else:
            v = cx.get(x)
            if len(v.shape) == r:
                v = cx.layout(v, perm)
                ph = v.phys
            else:
                v = cx.layout(v, ident(len(v.shape)))
                ph = s_full
            vid = v.vid
        st = strides(ph)
        strd.append([0 if ph[i] == 1 and ophys[i] != 1 else st[i] for i in range(r)])
        vids.append(vid)
    out = cx.new_value(oshape, perm)
    if r == 0:
        ophys, strd = [1], [[0], [0]]
        r = 1
    cx.emit(BinaryParams(op=sub, shape=list(ophys), a_strides=strd[0], b_strides=strd[1]), vids, [out.vid])
    cx.set(out_name, out)


@lowers("Add", "Sub", "Mul", "Div", "Pow", inputs=2)
def _binop(cx: "Lowering", n: Node) -> None:
    binary(cx, n.op, n.inputs[0], n.inputs[1], n.outputs[0])


@lowers("Sum", "Max", "Min", inputs=(1, None))
def _variadic(cx: "Lowering", n: Node) -> None:
    """Sum / Max / Min of any number of inputs (multidirectional broadcasting): folded left to
    right, one binary op per further input (``((a + b) + c) + ...``); one input is the identity."""
    op = "Add" if n.op == "Sum" else n.op
    cur = n.inputs[0]
    for k, nxt in enumerate(n.inputs[1:]):
        out = n.outputs[0] if k == len(n.inputs) - 2 else f"{n.outputs[0]}/{n.op.lower()}{k}"
        binary(cx, op, cur, nxt, out)
        cur = out
    if len(n.inputs) == 1:
        cx.set(n.outputs[0], cx.get(cur))


_NP_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Max": np.maximum, "Min": np.minimum,
              "Pow": np.power}


@folds("Add", "Sub", "Mul", "Max", "Min", "Pow")
def _fold_binary(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    fn = _NP_BINARY[n.op]
    if n.op in ("Max", "Min") and len(a) != 2:
        out = a[0]
        for v in a[1:]:
            out = fn(out, v)
        return [out]
    return [np.asarray(fn(a[0], a[1])).astype(np.result_type(a[0], a[1]))]


@folds("Div")
def _fold_div(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    if a[0].dtype.kind in "iu":
        return [np.trunc(a[0] / a[1]).astype(a[0].dtype)]
    return [(a[0] / a[1]).astype(a[0].dtype)]


@folds("Sum")
def _fold_sum(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    out = a[0]
    for v in a[1:]:
        out = out + v
    return [out]


# ---------------------------------------------------------------- unary
def unary(cx: "Lowering", n: Node, sub: Any, **params: float) -> None:
    """Emits ``n``'s output = the unary function ``sub`` (a ``UnaryKind``) of its input; ``params``:
    the function's parameters (``lo``, ``hi``, ``alpha``, ``beta``)."""
    x = cx.get(n.inputs[0])
    out = cx.new_value(x.shape, x.perm)
    cx.emit(UnaryParams(op=sub, count=x.size, **params), [x.vid], [out.vid])
    cx.set(n.outputs[0], out)


@lowers("Relu", "Sqrt", "Reciprocal", "Exp", "Sigmoid", "Tanh", "Neg", "Abs", "Log", "Erf", "HardSwish", "Floor",
        "Ceil")
def _simple_unary(cx: "Lowering", n: Node) -> None:
    unary(cx, n, core_kind(UnaryKind, n.op))


@lowers("Clip", inputs=(1, 3), attrs={"min": Attr.NUM, "max": Attr.NUM})
def _clip(cx: "Lowering", n: Node) -> None:
    lo = cx.const_input(n, 1, "Clip min")
    hi = cx.const_input(n, 2, "Clip max")
    lo_v = float(lo) if lo is not None else float(n.attrs.get("min", -np.inf))
    hi_v = float(hi) if hi is not None else float(n.attrs.get("max", np.inf))
    unary(cx, n, UnaryKind.CLIP, lo=lo_v, hi=hi_v)


@lowers("LeakyRelu", attrs={"alpha": Attr.NUM})
def _leaky_relu(cx: "Lowering", n: Node) -> None:
    unary(cx, n, UnaryKind.LEAKY_RELU, alpha=float(n.attrs.get("alpha", 0.01)))


@lowers("HardSigmoid", attrs={"alpha": Attr.NUM, "beta": Attr.NUM})
def _hard_sigmoid(cx: "Lowering", n: Node) -> None:
    unary(cx, n, UnaryKind.HARD_SIGMOID, alpha=float(n.attrs.get("alpha", 0.2)), beta=float(n.attrs.get("beta", 0.5)))


_GELU = {"none": UnaryKind.GELU, "tanh": UnaryKind.GELU_TANH}


def _check_gelu(n: Node, where: str, consts: Any, fa: Any, fw: Any, opset: int) -> None:
    a = n.attrs.get("approximate", "none")
    need(a in _GELU, f"{where}.attrs.approximate", f"must be 'none' or 'tanh', got {a!r}")


@lowers("Gelu", attrs={"approximate": Attr.STR}, check=_check_gelu)
def _gelu(cx: "Lowering", n: Node) -> None:
    """Gelu (opset 20): ``approximate="none"`` (erf) or ``"tanh"``, computed in fp32 in the order
    of the ONNX function body and rounded once to the vector precision."""
    a = n.attrs.get("approximate", "none")
    if a not in _GELU:
        raise cx.err(f"approximate must be 'none' or 'tanh', got {a!r}")
    unary(cx, n, _GELU[a])


_NP_UNARY = {"Sqrt": np.sqrt, "Neg": np.negative, "Abs": np.abs, "Floor": np.floor, "Ceil": np.ceil, "Exp": np.exp,
             "Log": np.log, "Reciprocal": np.reciprocal, "Tanh": np.tanh}


@folds(*_NP_UNARY)
def _fold_unary(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    x = a[0]
    return [_NP_UNARY[n.op](x).astype(x.dtype)]


@folds("Relu")
def _fold_relu(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    x = a[0]
    return [np.maximum(x, 0).astype(x.dtype)]


@folds("Sigmoid")
def _fold_sigmoid(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    x = a[0]
    return [(1 / (1 + np.exp(-x))).astype(x.dtype)]


@folds("Clip")
def _fold_clip(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    x = a[0]
    lo = a[1] if len(a) > 1 and a[1] is not None else n.attrs.get("min", -np.inf)
    hi = a[2] if len(a) > 2 and a[2] is not None else n.attrs.get("max", np.inf)
    return [np.clip(x, lo, hi).astype(x.dtype)]
