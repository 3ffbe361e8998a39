"""Indices and masks at run time: Gather (embedding lookups), Where, Expand, Tile, Trilu,
comparisons and logic (Equal, Less, LessOrEqual, Greater, GreaterOrEqual, And, Or, Xor, Not),
IsNaN and IsInf.

On constants these ops fold with numpy while lowering (``constants.py``; shape arithmetic
costs nothing at run time).  On a computed input they run on the core, exactly: a gather, a
select, an expansion or a tile moves values unchanged (a strided copy for the last two), and a
comparison produces 0 or 1, so none of them rounds to the vector precision.  Every index of a
run-time ``Gather`` is checked by the core before anything is read: an index outside the table
is a ``ValueError`` naming the node and the indices, never a read out of bounds.  Booleans and
integers live in the float buffers as exact values (``Session`` admits integer inputs of
magnitude <= 2^24).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Sequence, Tuple

import numpy as np

from ..._core import (CompareKind, CompareParams, ExactKind, ExactUnaryParams,  # type: ignore[attr-defined]
                      GatherParams, StridedParams, WhereParams)
from .._validate import Attr
from ..graph import Node
from ..values import Value, ident, strides
from ._registry import folds, lowers

if TYPE_CHECKING:  # pragma: no cover
    from ..lower import Lowering

Arrays = List[Any]  # one array (or None for an absent input) per node input

__all__ = ["broadcast_operands", "where"]


def broadcast_operands(cx: "Lowering", names: Sequence[str]) -> Tuple[Tuple[int, ...], List[int], List[List[int]]]:
    """The broadcast output shape of ``names`` and, for each (laid out row-major; a constant as a
    constant buffer), its buffer and its strides over the output (0 where it broadcasts)."""
    shapes = [tuple(cx.shape_of(x)) for x in names]
    try:
        oshape = tuple(int(s) for s in np.broadcast_shapes(*shapes))
    except ValueError:
        raise cx.err(f"shapes {', '.join(str(s) for s in shapes)} do not broadcast") from None
    r = max(len(oshape), 1)
    full = (1,) * (r - len(oshape)) + oshape
    vids: List[int] = []
    strd: List[List[int]] = []
    for x, shp in zip(names, shapes):
        v = cx.layout(cx.get(x), ident(len(shp)))
        s_full = (1,) * (r - len(shp)) + tuple(shp)
        st = strides(s_full)
        strd.append([0 if s_full[i] == 1 and full[i] != 1 else st[i] for i in range(r)])
        vids.append(v.vid)
    return oshape, vids, strd


def _emit_broadcast(cx: "Lowering", make: Any, names: Sequence[str], out_name: str) -> None:
    oshape, vids, strd = broadcast_operands(cx, names)
    out = cx.new_value(oshape)
    cx.emit(make(list(oshape) or [1], strd), vids, [out.vid])
    cx.set(out_name, out)


def where(cx: "Lowering", cond: str, a: str, b: str, out_name: str) -> None:
    """Emits ``out = cond ? a : b`` with broadcasting (values move unchanged)."""
    _emit_broadcast(cx, lambda shape, st: WhereParams(shape=shape, c_strides=st[0], a_strides=st[1],
                                                      b_strides=st[2]), [cond, a, b], out_name)


# ---------------------------------------------------------------- comparisons and logic
_COMPARE = {"Equal": CompareKind.EQUAL, "Less": CompareKind.LESS, "LessOrEqual": CompareKind.LESS_EQUAL,
            "Greater": CompareKind.GREATER, "GreaterOrEqual": CompareKind.GREATER_EQUAL, "And": CompareKind.AND,
            "Or": CompareKind.OR, "Xor": CompareKind.XOR}


@lowers(*_COMPARE)
def _compare(cx: "Lowering", n: Node) -> None:
    kind = _COMPARE[n.op]
    _emit_broadcast(cx, lambda shape, st: CompareParams(op=kind, shape=shape, a_strides=st[0], b_strides=st[1]),
                    n.inputs[:2], n.outputs[0])


_NP_MORE_LOGIC = {"LessOrEqual": np.less_equal, "GreaterOrEqual": np.greater_equal, "Xor": np.logical_xor}


@folds(*_NP_MORE_LOGIC, inputs=2)
def _fold_more_logic(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    return [np.asarray(_NP_MORE_LOGIC[n.op](a[0], a[1])).astype(bool)]


def _exact_unary(cx: "Lowering", n: Node, kind: Any) -> None:
    x = cx.get(n.inputs[0])
    out = cx.new_value(x.shape, x.perm)
    cx.emit(ExactUnaryParams(op=kind, count=x.size), [x.vid], [out.vid])
    cx.set(n.outputs[0], out)


@lowers("Not")
def _not(cx: "Lowering", n: Node) -> None:
    _exact_unary(cx, n, ExactKind.NOT)


@lowers("IsNaN")
def _isnan(cx: "Lowering", n: Node) -> None:
    _exact_unary(cx, n, ExactKind.IS_NAN)


@folds("IsNaN")
def _fold_isnan(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    return [np.isnan(a[0])]


def _inf_kind(n: Node) -> Any:
    neg, pos = int(n.attrs.get("detect_negative", 1)), int(n.attrs.get("detect_positive", 1))
    return {(1, 1): ExactKind.IS_INF, (0, 1): ExactKind.IS_POS_INF, (1, 0): ExactKind.IS_NEG_INF}.get((neg, pos))


@lowers("IsInf", attrs={"detect_negative": Attr.FLAG, "detect_positive": Attr.FLAG})
def _isinf(cx: "Lowering", n: Node) -> None:
    kind = _inf_kind(n)
    if kind is None:  # detects nothing: all false, known while lowering
        cx.set_const(n.outputs[0], np.zeros(cx.shape_of(n.inputs[0]), bool))
        return
    _exact_unary(cx, n, kind)


@folds("IsInf")
def _fold_isinf(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    x = a[0]
    neg, pos = int(n.attrs.get("detect_negative", 1)), int(n.attrs.get("detect_positive", 1))
    return [np.isinf(x) & (((x < 0) & bool(neg)) | ((x > 0) & bool(pos)))]


# ---------------------------------------------------------------- select, expand, tile, trilu
@lowers("Where")
def _where(cx: "Lowering", n: Node) -> None:
    where(cx, n.inputs[0], n.inputs[1], n.inputs[2], n.outputs[0])


def _strided_view(cx: "Lowering", x: Value, shape: Sequence[int], st: Sequence[int], out_name: str) -> None:
    out = cx.new_value(shape)
    cx.emit(StridedParams(offset=0, shape=list(shape) or [1], strides=list(st) or [0]), [x.vid], [out.vid],
            label="expand")
    cx.set(out_name, out)


@lowers("Expand")
def _expand(cx: "Lowering", n: Node) -> None:
    x = cx.layout(cx.get(n.inputs[0]), ident(len(cx.get(n.inputs[0]).shape)))
    target = [int(v) for v in np.asarray(cx.const_input(n, 1, "the target shape")).reshape(-1)]
    try:
        oshape = tuple(int(s) for s in np.broadcast_shapes(x.shape, tuple(target)))
    except ValueError:
        raise cx.err(f"cannot expand {x.shape} to {tuple(target)}") from None
    r = len(oshape)
    s_full = (1,) * (r - len(x.shape)) + tuple(x.shape)
    st = strides(s_full)
    _strided_view(cx, x, oshape, [0 if s_full[i] == 1 and oshape[i] != 1 else st[i] for i in range(r)],
                  n.outputs[0])


@lowers("Tile")
def _tile(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    x = cx.layout(x, ident(len(x.shape)))
    reps = [int(v) for v in np.asarray(cx.const_input(n, 1, "the repeats")).reshape(-1)]
    if len(reps) != len(x.shape) or any(r < 0 for r in reps):
        raise cx.err(f"repeats {reps} do not fit an input of shape {x.shape}")
    st = strides(x.shape)
    view, vst = [], []  # each axis d as (repeats, size): the repeat axis has stride 0
    for d, s in enumerate(x.shape):
        view += [reps[d], s]
        vst += [0, st[d]]
    tmp = f"{n.outputs[0]}/tiled"
    _strided_view(cx, x, view, vst, tmp)
    t = cx.get(tmp)
    shape = [reps[d] * s for d, s in enumerate(x.shape)]
    cx.set(n.outputs[0], Value(shape, ident(len(shape)), cx.alias_vid(t.vid)))


def _trilu_mask(shape: Sequence[int], k: int, upper: bool) -> np.ndarray:
    rows, cols = int(shape[-2]), int(shape[-1])
    d = np.arange(cols)[None, :] - np.arange(rows)[:, None]
    return d >= k if upper else d <= k


def _trilu_k(a: Any) -> int:
    return int(np.asarray(a).reshape(-1)[0]) if a is not None and np.asarray(a).size else 0


@lowers("Trilu", inputs=(1, 2), attrs={"upper": Attr.FLAG})
def _trilu(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    if len(x.shape) < 2:
        raise cx.err(f"Trilu takes a tensor of rank >= 2, got shape {x.shape}")
    k = _trilu_k(cx.const_input(n, 1, "k"))
    out = n.outputs[0]
    cx.set_const(f"{out}/mask", _trilu_mask(x.shape, k, bool(int(n.attrs.get("upper", 1)))))
    cx.set_const(f"{out}/zero", np.zeros((), np.float32))
    where(cx, f"{out}/mask", n.inputs[0], f"{out}/zero", out)


@folds("Trilu")
def _fold_trilu(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    x = a[0]
    m = _trilu_mask(x.shape, _trilu_k(a[1] if len(a) > 1 else None), bool(int(n.attrs.get("upper", 1))))
    return [np.where(m, x, np.zeros((), x.dtype)).astype(x.dtype)]


# ---------------------------------------------------------------- gather
@lowers("Gather")
def _gather(cx: "Lowering", n: Node) -> None:
    data, idx = n.inputs[0], n.inputs[1]
    x = cx.get(data)
    r = len(x.shape)
    if r == 0:
        raise cx.err("Gather from a scalar")
    axis = int(n.attrs.get("axis", 0))
    if not -r <= axis < r:
        raise cx.err(f"axis {axis} is out of range for data of rank {r}")
    axis %= r
    i_shape = tuple(cx.shape_of(idx))
    if cx.is_const(idx):
        iv = np.asarray(cx.const(idx))
        if iv.dtype.kind not in "iu":
            raise cx.err(f"indices {idx!r} must be integers, got {iv.dtype}")
        bad = (iv < -x.shape[axis]) | (iv >= x.shape[axis])
        if bad.any():
            raise cx.err(f"index {int(iv[bad].reshape(-1)[0])} of {idx!r} is out of range for {x.shape[axis]} "
                         f"entries along axis {axis}")
    elif cx.dtype_of(idx) == "float32":
        raise cx.err(f"indices {idx!r} must be an integer tensor")
    xc = cx.layout(x, ident(r))
    ic = cx.layout(cx.get(idx), ident(len(i_shape)))
    count = int(np.prod(i_shape, dtype=np.int64))
    shape = tuple(x.shape[:axis]) + i_shape + tuple(x.shape[axis + 1:])
    out = cx.new_value(shape)
    what = f"input {idx!r}" if idx in cx.input_names else repr(idx)
    cx.emit(GatherParams(outer=int(np.prod(x.shape[:axis], dtype=np.int64)), length=x.shape[axis],
                         inner=int(np.prod(x.shape[axis + 1:], dtype=np.int64)), count=count, indices=what),
            [xc.vid, ic.vid], [out.vid])
    cx.set(n.outputs[0], out)
