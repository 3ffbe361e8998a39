"""Ops the runtime evaluates only on constants -- shape arithmetic (Constant, ConstantOfShape,
Range, Gather, Expand, Tile, Where, comparisons and logic, Mod): folded with numpy when a
program is lowered, so they cost nothing at run time.  On a computed input they are an error
naming the node."""

from __future__ import annotations

from typing import Any, List

import numpy as np

from .._validate import Attr
from ..graph import Node
from ._registry import folds

Arrays = List[Any]  # one array (or None for an absent input) per node input


@folds("Constant", inputs=0, attrs={"value": Attr.TENSOR})
def _constant(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    v = n.attrs.get("value")
    if isinstance(v, dict):
        return [np.asarray(v["array"])]
    raise NotImplementedError("Constant without a value")


@folds("ConstantOfShape", attrs={"value": Attr.TENSOR})
def _constant_of_shape(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    x = a[0]
    v = n.attrs.get("value")
    val = np.asarray(v["array"]).reshape(-1) if isinstance(v, dict) else np.asarray([0.0], np.float32)
    if not isinstance(v, dict) and isinstance(v, list):
        val = np.asarray(v).reshape(-1)
    return [np.full([int(s) for s in x.reshape(-1)], val[0], dtype=val.dtype)]


@folds("Range", inputs=3)
def _range(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    return [np.arange(a[0].reshape(()), a[1].reshape(()), a[2].reshape(()), dtype=a[0].dtype)]


@folds("Gather", inputs=2, attrs={"axis": Attr.INT})
def _gather(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    return [np.take(a[0], a[1].astype(np.int64), axis=int(n.attrs.get("axis", 0)))]


@folds("Expand", inputs=2)
def _expand(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    x = a[0]
    shape = np.broadcast_shapes(x.shape, tuple(int(s) for s in a[1].reshape(-1)))
    return [np.broadcast_to(x, shape).copy()]


@folds("Tile", inputs=2)
def _tile(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    return [np.tile(a[0], [int(r) for r in a[1].reshape(-1)])]


@folds("Where", inputs=3)
def _where(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    return [np.asarray(np.where(a[0], a[1], a[2]))]


_NP_LOGIC = {"Equal": np.equal, "Less": np.less, "Greater": np.greater, "And": np.logical_and,
             "Or": np.logical_or}


@folds(*_NP_LOGIC, inputs=2)
def _logic(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    return [np.asarray(_NP_LOGIC[n.op](a[0], a[1])).astype(bool)]


@folds("Not")
def _not(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    return [np.logical_not(a[0])]


@folds("Mod", inputs=2, attrs={"fmod": Attr.FLAG})
def _mod(n: Node, a: Arrays, opset: int) -> List[np.ndarray]:
    return [np.fmod(a[0], a[1]) if int(n.attrs.get("fmod", 0)) else np.mod(a[0], a[1])]
