"""Reductions over adjacent axes (ReduceSum, ReduceMean, ReduceMax, ReduceMin, ReduceSumSquare,
ReduceL2): sequential sums in float32 over the reduced axes, the result rounded to the vector
precision."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np

from ..._core import ReduceKind, ReduceParams  # type: ignore[attr-defined]
from .._validate import Attr
from ..graph import Node
from ..values import Value, ident
from ._common import core_kind
from ._registry import folds, lowers

if TYPE_CHECKING:  # pragma: no cover
    from ..lower import Lowering

REDUCE_ATTRS = {"axes": Attr.INTS, "keepdims": Attr.FLAG, "noop_with_empty_axes": Attr.FLAG}
REDUCE_SCHEMA = dict(inputs=(1, 2), attrs=REDUCE_ATTRS)


def reduce_axes(cx: "Lowering", x: Value, axes: Sequence[int], keep: bool, sub: Any, out_name: str) -> None:
    """Emits the reduction ``sub`` of ``x`` over ``axes`` (all axes when empty)."""
    r = len(x.shape)
    axes = sorted({a % r for a in axes}) if axes else list(range(r))
    pos = sorted(x.perm.index(a) for a in axes)
    if pos != list(range(pos[0], pos[0] + len(pos))):
        x = cx.layout(x, ident(r))
        pos = sorted(axes)
        if pos != list(range(pos[0], pos[0] + len(pos))):
            raise cx.err(f"reducing over non-adjacent axes {axes} is not supported")
    ph = x.phys
    outer = int(np.prod(ph[:pos[0]]))
    R = int(np.prod([ph[p] for p in pos]))
    inner = int(np.prod(ph[pos[-1] + 1:]))
    if keep:
        shape = tuple(1 if a in axes else s for a, s in enumerate(x.shape))
        perm = x.perm
    else:
        shape = tuple(s for a, s in enumerate(x.shape) if a not in axes)
        remaining = [p for p in x.perm if p not in axes]
        ren = {a: i for i, a in enumerate(sorted(remaining))}
        perm = tuple(ren[p] for p in remaining)
    out = cx.new_value(shape, perm)
    cx.emit(ReduceParams(op=sub, outer=outer, length=R, inner=inner), [x.vid], [out.vid])
    cx.set(out_name, out)


def axes_of(n: Node, a: Sequence[Optional[np.ndarray]], idx: int) -> Optional[List[int]]:
    """The ``axes`` of a node: its attribute, else its input ``idx`` (None when neither)."""
    if "axes" in n.attrs:
        return [int(v) for v in n.attrs["axes"]]
    if len(a) > idx and a[idx] is not None:
        return [int(v) for v in np.asarray(a[idx]).reshape(-1)]
    return None


@lowers("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSumSquare", "ReduceL2", **REDUCE_SCHEMA)
def _reduce(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    axes = n.attrs.get("axes")
    if axes is None and len(n.inputs) > 1 and n.inputs[1]:
        axes = [int(a) for a in np.asarray(cx.const_input(n, 1, "axes")).reshape(-1)]
    if not axes and int(n.attrs.get("noop_with_empty_axes", 0)):
        cx.set(n.outputs[0], x)
        return
    reduce_axes(cx, x, [int(a) for a in axes] if axes else [], bool(int(n.attrs.get("keepdims", 1))),
                core_kind(ReduceKind, n.op[len("Reduce"):]), n.outputs[0])


_NP_REDUCE: Dict[str, Any] = {"ReduceSum": np.sum, "ReduceMean": np.mean, "ReduceMax": np.max, "ReduceMin": np.min}


@folds(*_NP_REDUCE)
def _fold_reduce(n: Node, a: List[Any], opset: int) -> List[np.ndarray]:
    x = a[0]
    axes = axes_of(n, a, 1)
    keep = bool(int(n.attrs.get("keepdims", 1)))
    return [np.asarray(_NP_REDUCE[n.op](x, axis=tuple(axes) if axes else None, keepdims=keep)).astype(x.dtype)]


@folds("ReduceProd", **REDUCE_SCHEMA)
def _fold_reduce_prod(n: Node, a: List[Any], opset: int) -> List[np.ndarray]:
    """ReduceProd runs only on constants (shape arithmetic)."""
    x = a[0]
    axes = axes_of(n, a, 1)
    keep = bool(int(n.attrs.get("keepdims", 1)))
    return [np.prod(x, axis=tuple(axes) if axes else None, keepdims=keep).astype(x.dtype)]
