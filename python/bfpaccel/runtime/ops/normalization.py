"""Normalization on the vector units, each result rounded to the vector precision:

* BatchNormalization that the compiler could not fold into a preceding matrix op runs as a
  per-channel ``x * s + t`` (s, t from the constant statistics in float64, then float32);
* LayerNormalization (opset 17) normalises the trailing axes from ``axis`` on: mean and variance
  in fp32 in the order of the ONNX function body, constant scale and bias.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np

from ..._core import AffineParams, LayerNormParams  # type: ignore[attr-defined]
from .._validate import Attr, need, prod
from ..graph import Node
from ..values import Value, ident
from ._registry import lowers

if TYPE_CHECKING:  # pragma: no cover
    from ..lower import Lowering


def affine(cx: "Lowering", x: Value, axis: int, s: np.ndarray, t: np.ndarray, out_name: str) -> None:
    """Emits ``out = x * s + t`` with one (s, t) per index of logical ``axis``."""
    pc = x.perm.index(axis)
    ph = x.phys
    outer, C, inner = int(np.prod(ph[:pc])), ph[pc], int(np.prod(ph[pc + 1:]))
    if s.size != C or t.size != C:
        raise cx.err(f"{s.size} scales / {t.size} shifts for {C} channels")
    out = cx.new_value(x.shape, x.perm)
    cx.emit(AffineParams(outer=outer, channels=C, inner=inner, scale=[float(v) for v in s],
                         shift=[float(v) for v in t]), [x.vid], [out.vid])
    cx.set(out_name, out)


def _check_batchnorm(n: Node, where: str, consts: Dict[str, Any], fa: Any, fw: Any, opset: int) -> None:
    sizes = [(prod(consts[i][1]), consts[i][0]) for i in n.inputs[1:5] if i in consts]
    need(all(dt.kind in "fiu" for _, dt in sizes), where, "batch-norm parameters must be numeric")
    need(len({s for s, _ in sizes}) <= 1, where, f"batch-norm parameters have different sizes "
         f"{[s for s, _ in sizes]}")


@lowers("BatchNormalization", inputs=5, outputs=5, attrs={"epsilon": Attr.NUM, "momentum": Attr.NUM},
        check=_check_batchnorm)
def _batchnorm(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    gamma, beta, mean, var = (np.asarray(cx.const_input(n, i, "batch-norm parameters"), np.float64)
                              for i in range(1, 5))
    eps = float(n.attrs.get("epsilon", 1e-5))
    s = (gamma / np.sqrt(var + eps)).astype(np.float32)
    t = (beta - mean * (gamma / np.sqrt(var + eps))).astype(np.float32)
    affine(cx, x, 1, s, t, n.outputs[0])


def _check_layer_norm(n: Node, where: str, consts: Dict[str, Any], fa: Any, fw: Any, opset: int) -> None:
    need(int(n.attrs.get("stash_type", 1)) == 1, f"{where}.attrs.stash_type",
         "only 1 (float32 statistics) is supported")


def _row_constant(cx: "Lowering", n: Node, i: int, what: str, shape: Sequence[int]) -> Optional[List[float]]:
    """Input ``i`` (a constant broadcast to the normalised ``shape``) as one number per element
    of a row; None when the input is absent."""
    c = cx.const_input(n, i, what)
    if c is None:
        return None
    c = np.asarray(c, np.float32)
    if c.ndim > len(shape):
        raise cx.err(f"{what} of shape {c.shape} has more axes than the normalised shape {tuple(shape)}")
    try:
        row = np.broadcast_to(c, tuple(shape))
    except ValueError:
        raise cx.err(f"{what} of shape {c.shape} does not broadcast to the normalised shape {tuple(shape)}") from None
    return [float(v) for v in row.reshape(-1)]


@lowers("LayerNormalization", inputs=(2, 3), outputs=3,
        attrs={"axis": Attr.INT, "epsilon": Attr.NUM, "stash_type": Attr.INT}, check=_check_layer_norm)
def _layer_norm(cx: "Lowering", n: Node) -> None:
    if any(o for o in n.outputs[1:]):
        raise cx.err("LayerNormalization's Mean and InvStdDev outputs are not supported")
    if int(n.attrs.get("stash_type", 1)) != 1:
        raise cx.err("only stash_type 1 (float32 statistics) is supported")
    x = cx.get(n.inputs[0])
    r = len(x.shape)
    axis = int(n.attrs.get("axis", -1))
    if not -r <= axis < r:
        raise cx.err(f"axis {axis} is out of range for rank {r}")
    axis %= r
    shape = x.shape[axis:]
    scale = _row_constant(cx, n, 1, "the scale", shape)
    if scale is None:
        raise cx.err("the scale (input 1) is required")
    bias = _row_constant(cx, n, 2, "the bias", shape)
    xc = cx.layout(x, ident(r))
    out = cx.new_value(x.shape)
    params = LayerNormParams(outer=int(np.prod(x.shape[:axis], dtype=np.int64)), length=len(scale),
                             epsilon=float(n.attrs.get("epsilon", 1e-5)), scale=scale, bias=bias or [])
    cx.emit(params, [xc.vid], [out.vid])
    cx.set(n.outputs[0], out)
