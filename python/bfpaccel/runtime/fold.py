# mypy: disable-error-code="assignment,operator"
"""Constant folding with numpy: ops whose inputs are all known when a program is lowered
(shape arithmetic, constant reshapes, ...).  Follows the ONNX operator specs."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np

from .graph import Node

__all__ = ["fold_node"]

_NP_TYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
             10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def _axes(n: Node, ins: Sequence[Any], idx: int) -> Optional[List[int]]:
    if "axes" in n.attrs:
        return [int(a) for a in n.attrs["axes"]]
    if len(ins) > idx and ins[idx] is not None:
        return [int(a) for a in np.asarray(ins[idx]).reshape(-1)]
    return None


def fold_node(n: Node, ins: Sequence[Optional[np.ndarray]], opset: int) -> List[np.ndarray]:
    """Evaluates ``n`` on constant inputs; raises NotImplementedError for ops it cannot."""
    a: List[Any] = [np.asarray(x) if x is not None else None for x in ins]
    op = n.op
    x: Any = a[0] if a else None
    if op in ("Identity", "Dropout"):
        return [x]
    if op == "Constant":
        v = n.attrs.get("value")
        if isinstance(v, dict):
            return [np.asarray(v["array"])]
        raise NotImplementedError("Constant without a value")
    if op == "Shape":
        return [np.asarray(x.shape, np.int64)]
    if op == "Size":
        return [np.asarray(x.size, np.int64)]
    if op == "Cast":
        return [x.astype(_NP_TYPES.get(int(n.attrs["to"]), np.float32))]
    if op == "Gather":
        return [np.take(x, a[1].astype(np.int64), axis=int(n.attrs.get("axis", 0)))]
    if op == "Unsqueeze":
        axes = _axes(n, a, 1) or []
        r = x.ndim + len(axes)
        out = x
        for ax in sorted(int(v) % r for v in axes):
            out = np.expand_dims(out, ax)
        return [out]
    if op == "Squeeze":
        axes = _axes(n, a, 1)
        return [np.squeeze(x, axis=tuple(int(v) % x.ndim for v in axes)) if axes else np.squeeze(x)]
    if op == "Concat":
        return [np.concatenate([v for v in a if v is not None and v.size], axis=int(n.attrs["axis"]))
                if any(v is not None and v.size for v in a) else a[0]]
    if op == "Reshape":
        shape = [int(v) for v in a[1].reshape(-1)]
        if not int(n.attrs.get("allowzero", 0)):
            shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
        return [x.reshape(shape)]
    if op == "Flatten":
        ax = int(n.attrs.get("axis", 1))
        return [x.reshape(int(np.prod(x.shape[:ax])), -1)]
    if op == "Transpose":
        return [np.transpose(x, n.attrs.get("perm"))]
    if op == "Slice":
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
    if op == "ConstantOfShape":
        v = n.attrs.get("value")
        val = np.asarray(v["array"]).reshape(-1) if isinstance(v, dict) else np.asarray([0.0], np.float32)
        if not isinstance(v, dict) and isinstance(v, list):
            val = np.asarray(v).reshape(-1)
        return [np.full([int(s) for s in x.reshape(-1)], val[0], dtype=val.dtype)]
    if op == "Range":
        return [np.arange(a[0].reshape(()), a[1].reshape(()), a[2].reshape(()), dtype=a[0].dtype)]
    if op == "Expand":
        shape = np.broadcast_shapes(x.shape, tuple(int(s) for s in a[1].reshape(-1)))
        return [np.broadcast_to(x, shape).copy()]
    if op == "Tile":
        return [np.tile(x, [int(r) for r in a[1].reshape(-1)])]
    if op == "Split":
        axis = int(n.attrs.get("axis", 0))
        split = n.attrs.get("split")
        if split is None and len(a) > 1 and a[1] is not None:
            split = [int(s) for s in a[1].reshape(-1)]
        if split is None:
            return list(np.array_split(x, len(n.outputs), axis=axis))
        return list(np.split(x, np.cumsum(split)[:-1], axis=axis))
    binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Max": np.maximum, "Min": np.minimum,
              "Equal": np.equal, "Less": np.less, "Greater": np.greater, "And": np.logical_and,
              "Or": np.logical_or, "Pow": np.power}
    if op in binary:
        if op in ("Max", "Min") and len(a) > 2:
            out = a[0]
            for v in a[1:]:
                out = binary[op](out, v)
            return [out]
        return [np.asarray(binary[op](a[0], a[1])).astype(np.result_type(a[0], a[1]) if op in
                                                           ("Add", "Sub", "Mul", "Max", "Min", "Pow") else bool)]
    if op == "Div":
        if a[0].dtype.kind in "iu":
            return [np.trunc(a[0] / a[1]).astype(a[0].dtype)]
        return [(a[0] / a[1]).astype(a[0].dtype)]
    if op == "Mod":
        return [np.fmod(a[0], a[1]) if int(n.attrs.get("fmod", 0)) else np.mod(a[0], a[1])]
    if op == "Sum":
        out = a[0]
        for v in a[1:]:
            out = out + v
        return [out]
    if op == "Where":
        return [np.where(a[0], a[1], a[2])]
    if op == "Not":
        return [np.logical_not(x)]
    unary = {"Sqrt": np.sqrt, "Neg": np.negative, "Abs": np.abs, "Floor": np.floor, "Ceil": np.ceil, "Exp": np.exp,
             "Log": np.log, "Reciprocal": np.reciprocal, "Tanh": np.tanh}
    if op in unary:
        return [unary[op](x).astype(x.dtype)]
    if op == "Relu":
        return [np.maximum(x, 0).astype(x.dtype)]
    if op == "Sigmoid":
        return [(1 / (1 + np.exp(-x))).astype(x.dtype)]
    if op == "ReduceProd":
        axes = _axes(n, a, 1)
        keep = bool(int(n.attrs.get("keepdims", 1)))
        return [np.prod(x, axis=tuple(axes) if axes else None, keepdims=keep).astype(x.dtype)]
    if op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin"):
        axes = _axes(n, a, 1)
        keep = bool(int(n.attrs.get("keepdims", 1)))
        fn = {"ReduceSum": np.sum, "ReduceMean": np.mean, "ReduceMax": np.max, "ReduceMin": np.min}[op]
        return [np.asarray(fn(x, axis=tuple(axes) if axes else None, keepdims=keep)).astype(x.dtype)]
    if op == "Clip":
        lo = a[1] if len(a) > 1 and a[1] is not None else n.attrs.get("min", -np.inf)
        hi = a[2] if len(a) > 2 and a[2] is not None else n.attrs.get("max", np.inf)
        return [np.clip(x, lo, hi).astype(x.dtype)]
    raise NotImplementedError(op)
