"""Softmax and LogSoftmax along one axis (opset >= 13) or over the flattened trailing axes
(opset < 13): max-subtracted, float32 sums, the result rounded to the vector precision."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..._core import SoftmaxParams  # type: ignore[attr-defined]
from .._validate import Attr
from ..graph import Node
from ..values import ident
from ._registry import lowers

if TYPE_CHECKING:  # pragma: no cover
    from ..lower import Lowering


@lowers("Softmax", "LogSoftmax", attrs={"axis": Attr.INT})
def _softmax(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    r = len(x.shape)
    if cx.opset >= 13:
        a = int(n.attrs.get("axis", -1)) % r
        pa = x.perm.index(a)
        ph = x.phys
        outer, L, inner = int(np.prod(ph[:pa])), ph[pa], int(np.prod(ph[pa + 1:]))
    else:
        a = int(n.attrs.get("axis", 1)) % r
        x = cx.layout(x, ident(r))
        outer, L, inner = int(np.prod(x.shape[:a])), int(np.prod(x.shape[a:])), 1
    out = cx.new_value(x.shape, x.perm)
    cx.emit(SoftmaxParams(log=n.op == "LogSoftmax", outer=outer, length=L, inner=inner), [x.vid], [out.vid])
    cx.set(n.outputs[0], out)
