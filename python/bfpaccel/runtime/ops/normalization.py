"""Normalization: BatchNormalization that the compiler could not fold into a preceding matrix op
runs as a per-channel ``x * s + t`` on the vector units (s, t from the constant statistics in
float64, then float32), rounded to the vector precision."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

import numpy as np

from ..._core import AffineParams  # type: ignore[attr-defined]
from .._validate import Attr, need, prod
from ..graph import Node
from ..values import Value
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
