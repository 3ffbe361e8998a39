"""Data movement and shape ops: Shape, Size, Reshape, Flatten, Squeeze, Unsqueeze, Transpose,
Concat, Slice, Split, Pad, Identity, Dropout, Cast.

Most cost nothing at run time: a ``Transpose`` only changes a value's physical permutation, a
reshape aliases the buffer (copying only when the layout must change first), ``Shape`` and
``Size`` are known while lowering.  Concat, Slice / Split and Pad are copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Sequence

import numpy as np

from ..._core import ConcatParams, PadParams, StridedParams  # type: ignore[attr-defined]
from .._validate import Attr, need
from ..graph import Node
from ..values import Value, compatible, ident, strides
from ._registry import folds, lowers
from .reduce import axes_of

if TYPE_CHECKING:  # pragma: no cover
    from ..lower import Lowering

Arrays = List[Any]  # one array (or None for an absent input) per node input

#: ONNX TensorProto data types -> numpy (Cast)
NP_TYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
            10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


# ---------------------------------------------------------------- shapes known while lowering
@lowers("Shape", attrs={"start": Attr.INT, "end": Attr.INT}, fold_constants=False)
def _shape(cx: "Lowering", n: Node) -> None:
    shape = cx.shape_of(n.inputs[0])
    arr = np.asarray(shape, np.int64)
    start, end = n.attrs.get("start"), n.attrs.get("end")
    if start is not None or end is not None:
        arr = arr[start:end]
    cx.set_const(n.outputs[0], arr)


@lowers("Size")
def _size(cx: "Lowering", n: Node) -> None:
    cx.set_const(n.outputs[0], np.asarray(cx.get(n.inputs[0]).size, np.int64))


@folds("Size")
def _fold_size(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    return [np.asarray(a[0].size, np.int64)]


# ---------------------------------------------------------------- identities
@lowers("Identity")
@lowers("Dropout", inputs=(1, 3), outputs=2, attrs={"seed": Attr.INT, "ratio": Attr.NUM})
def _identity(cx: "Lowering", n: Node) -> None:
    cx.set(n.outputs[0], cx.get(n.inputs[0]))


@folds("Identity", "Dropout")
def _fold_identity(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    return [a[0]]


def _check_cast(n: Node, where: str, consts: Dict[str, Any], fa: Any, fw: Any, opset: int) -> None:
    need("to" in n.attrs, where, "missing attribute 'to'")


_FLOAT_TYPES = (1, 10, 11, 16)  # float, float16, double, bfloat16


@lowers("Cast", attrs={"to": Attr.INT}, check=_check_cast)
def _cast(cx: "Lowering", n: Node) -> None:
    """A cast between float types, from an integer or boolean type, or between integer types is
    an identity (the float buffers hold integers exactly; a cast to float16 does not round);
    to bool it is ``x != 0``, from a float type to an integer type a truncation toward zero."""
    from ..._core import ExactKind, ExactUnaryParams  # type: ignore[attr-defined]
    from ..lower import is_float

    to = int(n.attrs.get("to", 1))
    x = cx.get(n.inputs[0])
    src_float = is_float(cx.dtype_of(n.inputs[0]))
    if to in _FLOAT_TYPES:
        cx.set(n.outputs[0], x)
        return
    if to not in NP_TYPES:
        raise cx.err(f"casting to ONNX type {to} is not supported")
    target = np.dtype(NP_TYPES[to])
    kind = ExactKind.NONZERO if target == np.bool_ and cx.dtype_of(n.inputs[0]) != "bool" else \
        ExactKind.TRUNC if src_float and target != np.bool_ else None
    if kind is None:
        cx.set(n.outputs[0], x)
    else:
        out = cx.new_value(x.shape, x.perm)
        cx.emit(ExactUnaryParams(op=kind, count=x.size), [x.vid], [out.vid])
        cx.set(n.outputs[0], out)
    cx.set_dtype(n.outputs[0], str(target))


@folds("Cast")
def _fold_cast(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    return [a[0].astype(NP_TYPES.get(int(n.attrs["to"]), np.float32))]


# ---------------------------------------------------------------- reshapes
def reshape_to(cx: "Lowering", x: Value, shape: Sequence[int], out_name: str) -> None:
    """``out_name`` = ``x`` reshaped (row-major data: a copy only when ``x``'s layout is not)."""
    xc = cx.layout(x, ident(len(x.shape)))
    if int(np.prod(shape, dtype=np.int64)) != x.size:
        raise cx.err(f"cannot reshape {x.shape} into {tuple(shape)}")
    cx.set(out_name, Value(shape, ident(len(shape)), cx.alias_vid(xc.vid)))


@lowers("Reshape", inputs=2, attrs={"allowzero": Attr.FLAG})
def _reshape(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    target = [int(v) for v in np.asarray(cx.const_input(n, 1, "the target shape")).reshape(-1)]
    allowzero = int(n.attrs.get("allowzero", 0))
    shape = [x.shape[i] if (v == 0 and not allowzero) else v for i, v in enumerate(target)]
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
        shape[shape.index(-1)] = x.size // known if known else 0
    reshape_to(cx, x, shape, n.outputs[0])


@folds("Reshape")
def _fold_reshape(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    x = a[0]
    shape = [int(v) for v in a[1].reshape(-1)]
    if not int(n.attrs.get("allowzero", 0)):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return [x.reshape(shape)]


@lowers("Flatten", attrs={"axis": Attr.INT})
def _flatten(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    a = int(n.attrs.get("axis", 1)) % (len(x.shape) + 1) if x.shape else 0
    reshape_to(cx, x, [int(np.prod(x.shape[:a])), int(np.prod(x.shape[a:]))], n.outputs[0])


@folds("Flatten")
def _fold_flatten(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    x = a[0]
    ax = int(n.attrs.get("axis", 1))
    return [x.reshape(int(np.prod(x.shape[:ax])), -1)]


def _drop_insert(cx: "Lowering", x: Value, shape: Sequence[int], out_name: str) -> None:
    """Reshapes that only add or remove size-1 axes keep the data where it is."""
    nonone_src = [x.shape[p] for p in x.perm if x.shape[p] != 1]
    logical_src = [s for s in x.shape if s != 1]
    if nonone_src == logical_src or compatible(x.shape, x.perm, ident(len(x.shape))):
        reshape_to(cx, x, shape, out_name)
        return
    # channels-last data with a size-1 axis change: map the perm through the non-1 axes
    src_axes = [a for a in range(len(x.shape)) if x.shape[a] != 1]
    dst_axes = [a for a in range(len(shape)) if shape[a] != 1]
    m = dict(zip(src_axes, dst_axes))
    ones = [a for a in range(len(shape)) if shape[a] == 1]
    perm = ones + [m[p] for p in x.perm if x.shape[p] != 1]
    cx.set(out_name, Value(shape, perm, cx.alias_vid(x.vid)))


@lowers("Squeeze", inputs=(1, 2), attrs={"axes": Attr.INTS})
def _squeeze(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    axes = n.attrs.get("axes")
    if axes is None and len(n.inputs) > 1 and n.inputs[1]:
        axes = list(np.asarray(cx.const_input(n, 1, "axes")).reshape(-1))
    r = len(x.shape)
    ax = {int(a) % r for a in axes} if axes is not None else {i for i, s in enumerate(x.shape) if s == 1}
    if any(x.shape[a] != 1 for a in ax):
        raise cx.err(f"cannot squeeze non-1 axes of {x.shape}")
    _drop_insert(cx, x, [s for i, s in enumerate(x.shape) if i not in ax], n.outputs[0])


@folds("Squeeze")
def _fold_squeeze(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    x = a[0]
    axes = axes_of(n, a, 1)
    return [np.squeeze(x, axis=tuple(int(v) % x.ndim for v in axes)) if axes else np.squeeze(x)]


def _check_unsqueeze(n: Node, where: str, consts: Dict[str, Any], fa: Any, fw: Any, opset: int) -> None:
    need("axes" in n.attrs or (len(n.inputs) > 1 and n.inputs[1] != ""), where, "needs 'axes' (attribute or input)")


@lowers("Unsqueeze", inputs=(1, 2), attrs={"axes": Attr.INTS}, check=_check_unsqueeze)
def _unsqueeze(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    axes = n.attrs.get("axes")
    if axes is None:
        axes = list(np.asarray(cx.const_input(n, 1, "axes")).reshape(-1))
    r = len(x.shape) + len(axes)
    ax = sorted(int(a) % r for a in axes)
    shape = list(x.shape)
    for a in ax:
        shape.insert(a, 1)
    _drop_insert(cx, x, shape, n.outputs[0])


@folds("Unsqueeze")
def _fold_unsqueeze(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    x = a[0]
    axes = axes_of(n, a, 1) or []
    r = x.ndim + len(axes)
    out = x
    for ax in sorted(int(v) % r for v in axes):
        out = np.expand_dims(out, ax)
    return [out]


@lowers("Transpose", attrs={"perm": Attr.PERM})
def _transpose(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    r = len(x.shape)
    p = [int(v) for v in n.attrs.get("perm", list(reversed(range(r))))]
    inv = [0] * r
    for j, a in enumerate(p):
        inv[a] = j
    shape = [x.shape[a] for a in p]
    perm = tuple(inv[a] for a in x.perm)
    cx.set(n.outputs[0], Value(shape, perm, cx.alias_vid(x.vid)))


@folds("Transpose")
def _fold_transpose(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    return [np.transpose(a[0], n.attrs.get("perm"))]


# ---------------------------------------------------------------- copies
def _check_concat(n: Node, where: str, consts: Dict[str, Any], fa: Any, fw: Any, opset: int) -> None:
    need("axis" in n.attrs, where, "missing attribute 'axis'")


@lowers("Concat", inputs=(1, None), attrs={"axis": Attr.INT}, check=_check_concat)
def _concat(cx: "Lowering", n: Node) -> None:
    names = [i for i in n.inputs if i]
    live = [cx.get(i) for i in names if not cx.is_const(i)]
    r = len(live[0].shape)
    axis = int(n.attrs["axis"]) % r
    perm = live[0].perm
    vs: List[Value] = []
    for i in names:
        if cx.is_const(i):
            arr = np.asarray(cx.const(i), np.float32)
            if arr.size == 0:
                continue
            vs.append(Value(arr.shape, perm, cx.const_vid(np.ascontiguousarray(arr.transpose(perm)))))
        else:
            vs.append(cx.layout(cx.get(i), perm))
    base = list(vs[0].shape)
    for v in vs:
        if len(v.shape) != r or any(v.shape[d] != base[d] for d in range(r) if d != axis):
            raise cx.err(f"inputs of shapes {[v.shape for v in vs]} cannot be concatenated on axis {axis}")
    shape = list(base)
    shape[axis] = sum(v.shape[axis] for v in vs)
    out = cx.new_value(shape, perm)
    pa = perm.index(axis)
    ph = out.phys
    outer, inner = int(np.prod(ph[:pa])), int(np.prod(ph[pa + 1:]))
    cx.emit(ConcatParams(outer=outer, inner=inner, lengths=[v.shape[axis] for v in vs]), [v.vid for v in vs],
            [out.vid])
    cx.set(n.outputs[0], out)


@folds("Concat")
def _fold_concat(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    return [np.concatenate([v for v in a if v is not None and v.size], axis=int(n.attrs["axis"]))
            if any(v is not None and v.size for v in a) else a[0]]


def _check_pad(n: Node, where: str, consts: Dict[str, Any], fa: Any, fw: Any, opset: int) -> None:
    mode = n.attrs.get("mode", "constant")
    need(mode in ("constant", "reflect", "edge", "wrap"), f"{where}.attrs.mode", f"unknown pad mode {mode!r}")


@lowers("Pad", inputs=(1, 4), attrs={"mode": Attr.STR, "pads": Attr.INTS, "value": Attr.NUM}, check=_check_pad)
def _pad(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    mode = n.attrs.get("mode", "constant")
    if mode != "constant":
        raise cx.err(f"Pad mode {mode!r} is not supported (only 'constant')")
    r = len(x.shape)
    if len(n.inputs) > 1 and n.inputs[1]:
        pads = [int(v) for v in np.asarray(cx.const_input(n, 1, "pads")).reshape(-1)]
    else:
        pads = [int(v) for v in n.attrs.get("pads", [0] * 2 * r)]
    val = cx.const_input(n, 2, "the pad value")
    value = float(np.asarray(val).reshape(-1)[0]) if val is not None and np.asarray(val).size else \
        float(n.attrs.get("value", 0.0))
    if len(n.inputs) > 3 and n.inputs[3]:
        axes = [int(a) % r for a in np.asarray(cx.const_input(n, 3, "axes")).reshape(-1)]
        full = [0] * (2 * r)
        for k, a in enumerate(axes):
            full[a], full[r + a] = pads[k], pads[len(axes) + k]
        pads = full
    begin, end = pads[:r], pads[r:]
    shape = [x.shape[a] + begin[a] + end[a] for a in range(r)]
    out = cx.new_value(shape, x.perm)
    params = PadParams(in_shape=list(x.phys), out_shape=list(out.phys), begin=[begin[p] for p in x.perm], value=value)
    cx.emit(params, [x.vid], [out.vid])
    cx.set(n.outputs[0], out)


def slice_axes(cx: "Lowering", x: Value, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int],
               steps: Sequence[int], out_name: str) -> None:
    """``out_name`` = ``x[starts:ends:steps]`` on ``axes`` (ONNX clamping rules), a strided copy."""
    r = len(x.shape)
    st = [0] * r
    sp = [1] * r
    ln = list(x.shape)
    for s, e, a, k in zip(starts, ends, axes, steps):
        a = int(a) % r
        dim = x.shape[a]
        s0, e0, k0 = slice(int(max(min(s, 2 ** 62), -2 ** 62)), int(max(min(e, 2 ** 62), -2 ** 62)),
                           int(k)).indices(dim)
        rng = range(s0, e0, k0)
        st[a], sp[a], ln[a] = (rng.start if len(rng) else 0), k0, len(rng)
    in_str = strides(x.phys)
    off = 0
    strd = []
    for i, a in enumerate(x.perm):
        off += st[a] * in_str[i]
        strd.append(in_str[i] * sp[a])
    out = cx.new_value(ln, x.perm)
    cx.emit(StridedParams(offset=off, shape=list(out.phys), strides=strd), [x.vid], [out.vid], label="slice")
    cx.set(out_name, out)


def _check_slice(n: Node, where: str, consts: Dict[str, Any], fa: Any, fw: Any, opset: int) -> None:
    a = n.attrs
    if opset < 10:
        need("starts" in a and "ends" in a, where, "needs attributes 'starts' and 'ends' (opset < 10)")
    else:
        need(len(n.inputs) >= 3 and n.inputs[1] != "" and n.inputs[2] != "", where,
             "needs inputs starts and ends (opset >= 10)")


@lowers("Slice", inputs=(1, 5), attrs={"starts": Attr.INTS, "ends": Attr.INTS, "axes": Attr.INTS},
        check=_check_slice)
def _slice(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    if cx.opset < 10:
        starts, ends = n.attrs["starts"], n.attrs["ends"]
        axes = n.attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts = list(np.asarray(cx.const_input(n, 1, "starts")).reshape(-1))
        ends = list(np.asarray(cx.const_input(n, 2, "ends")).reshape(-1))
        a = cx.const_input(n, 3, "axes")
        axes = list(a.reshape(-1)) if a is not None else list(range(len(starts)))
        s = cx.const_input(n, 4, "steps")
        steps = list(s.reshape(-1)) if s is not None else [1] * len(starts)
    slice_axes(cx, x, starts, ends, axes, steps, n.outputs[0])


@folds("Slice")
def _fold_slice(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    x = a[0]
    if opset < 10:
        starts, ends = n.attrs["starts"], n.attrs["ends"]
        axes = n.attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = a[1].reshape(-1), a[2].reshape(-1)
        axes = a[3].reshape(-1) if len(a) > 3 and a[3] is not None else range(len(starts))
        steps = a[4].reshape(-1) if len(a) > 4 and a[4] is not None else [1] * len(starts)
    sl = [slice(None)] * x.ndim
    for s, e, ax, k in zip(starts, ends, axes, steps):
        sl[int(ax) % x.ndim] = slice(int(max(min(s, 2 ** 62), -2 ** 62)), int(max(min(e, 2 ** 62), -2 ** 62)),
                                     int(k))
    return [x[tuple(sl)]]


@lowers("Split", inputs=(1, 2), outputs=None, attrs={"axis": Attr.INT, "split": Attr.NONNEG_INTS})
def _split(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    r = len(x.shape)
    axis = int(n.attrs.get("axis", 0)) % r
    split = n.attrs.get("split")
    if split is None and len(n.inputs) > 1 and n.inputs[1]:
        split = list(np.asarray(cx.const_input(n, 1, "split")).reshape(-1))
    outs = [o for o in n.outputs]
    if split is None:
        k = len(outs)
        size = -(-x.shape[axis] // k)
        split = [min(size, x.shape[axis] - i * size) for i in range(k)]
    s0 = 0
    for o, ln in zip(outs, split):
        if o:
            slice_axes(cx, x, [s0], [s0 + int(ln)], [axis], [1], o)
        s0 += int(ln)


@folds("Split")
def _fold_split(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    x = a[0]
    axis = int(n.attrs.get("axis", 0))
    split = n.attrs.get("split")
    if split is None and len(a) > 1 and a[1] is not None:
        split = [int(s) for s in a[1].reshape(-1)]
    if split is None:
        return list(np.array_split(x, len(n.outputs), axis=axis))
    return list(np.split(x, np.cumsum(split)[:-1], axis=axis))
