"""2-D pooling: MaxPool and AveragePool (NHWC windows on the vector units), GlobalAveragePool
and GlobalMaxPool (reductions over the spatial axes)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from ..._core import ConvGeometry, PoolKind, PoolParams, ReduceKind  # type: ignore[attr-defined]
from .._validate import Attr, need
from ..graph import Node
from ._common import pads_2d
from ._registry import lowers
from .reduce import reduce_axes

if TYPE_CHECKING:  # pragma: no cover
    from ..lower import Lowering

POOL_ATTRS = {"kernel_shape": Attr.POS2, "strides": Attr.POS2, "dilations": Attr.POS2, "pads": Attr.PADS4,
              "ceil_mode": Attr.FLAG, "count_include_pad": Attr.FLAG, "auto_pad": Attr.AUTO_PAD}


def _check_pool(n: Node, where: str, consts: Dict[str, Any], fa: Any, fw: Any, opset: int) -> None:
    a = n.attrs
    need("kernel_shape" in a, where, "missing attribute 'kernel_shape'")
    kh, kw = a["kernel_shape"]
    dh, dw = a.get("dilations", [1, 1])
    pads = a.get("pads", [0, 0, 0, 0])
    ext = [dh * (kh - 1) + 1, dw * (kw - 1) + 1]
    need(all(p < ext[i % 2] for i, p in enumerate(pads)), f"{where}.attrs.pads",
         f"pads {pads} must be smaller than the kernel {[kh, kw]}")


def _pool(cx: "Lowering", n: Node, kind: Any) -> None:
    x = cx.get(n.inputs[0])
    if len(x.shape) != 4:
        raise cx.err(f"only 2-D pooling (NCHW input) is supported, got rank {len(x.shape)}")
    N, C, H, W = x.shape
    kh, kw = [int(k) for k in n.attrs["kernel_shape"]]
    sh, sw = [int(s) for s in n.attrs.get("strides", [1, 1])]
    dh, dw = [int(s) for s in n.attrs.get("dilations", [1, 1])]
    pt, pl, pb, pr = pads_2d(n, (H, W), (kh, kw), (sh, sw), (dh, dw))
    ceil = int(n.attrs.get("ceil_mode", 0))

    def osz(i: int, k: int, s: int, d: int, p0: int, p1: int) -> int:
        span = i + p0 + p1 - d * (k - 1) - 1
        o = (-(-span // s) if ceil else span // s) + 1
        if ceil and (o - 1) * s >= i + p0:
            o -= 1
        return o

    OH, OW = osz(H, kh, sh, dh, pt, pb), osz(W, kw, sw, dw, pl, pr)
    if OH < 1 or OW < 1:
        raise cx.err("the pooled output would be empty")
    xn = cx.layout(x, (0, 2, 3, 1))
    out = cx.new_value((N, C, OH, OW), (0, 2, 3, 1))
    window = ConvGeometry(batch=N, channels=C, height=H, width=W, out_channels=C, kernel_h=kh, kernel_w=kw,
                          stride_h=sh, stride_w=sw, pad_top=pt, pad_left=pl, pad_bottom=pb, pad_right=pr,
                          dilation_h=dh, dilation_w=dw, groups=1, out_h=OH, out_w=OW)
    cip = bool(int(n.attrs.get("count_include_pad", 0)))
    cx.emit(PoolParams(op=kind, window=window, count_include_pad=cip), [xn.vid], [out.vid])
    cx.set(n.outputs[0], out)


@lowers("MaxPool", outputs=2, attrs=dict(POOL_ATTRS, storage_order=Attr.FLAG), check=_check_pool)
def _max_pool(cx: "Lowering", n: Node) -> None:
    if len([o for o in n.outputs if o]) > 1:
        raise cx.err("MaxPool's Indices output is not supported")
    _pool(cx, n, PoolKind.MAX)


@lowers("AveragePool", attrs=POOL_ATTRS, check=_check_pool)
def _average_pool(cx: "Lowering", n: Node) -> None:
    _pool(cx, n, PoolKind.AVERAGE)


@lowers("GlobalAveragePool")
def _global_average_pool(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    reduce_axes(cx, x, list(range(2, len(x.shape))), True, ReduceKind.MEAN, n.outputs[0])


@lowers("GlobalMaxPool")
def _global_max_pool(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    reduce_axes(cx, x, list(range(2, len(x.shape))), True, ReduceKind.MAX, n.outputs[0])
