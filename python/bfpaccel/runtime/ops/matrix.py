"""Matrix ops on the BFP core with a weight quantized once into the plan: Conv and BfpDense (the
compiler's dense layer).

The compiler turns ``Gemm`` / ``MatMul`` with a constant 2-D weight into ``BfpDense`` (the others
run between run-time operands: ``matmul.py``) and quantizes
every ``Conv`` / ``BfpDense`` weight once into the plan (``weights="quantized"``); lowering
runs both as an NHWC convolution with the bias, a following residual ``Add`` and ``Relu`` /
``Clip`` fused into its epilogue (``lower.py``).  Depthwise convolutions (one channel per
group) take a dedicated path: one-element blocks, fp32 arithmetic on fake-quantized operands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Sequence

import numpy as np

from ... import _core  # type: ignore[attr-defined]
from ...core import fmt_params
from .._validate import Attr, need, prod
from ..graph import Node
from ..values import Value, ident
from ._common import pads_2d
from ._registry import QUANTIZED, lowers

if TYPE_CHECKING:  # pragma: no cover
    from ..lower import Lowering

#: attributes of a matrix op in a plan (the compiler adds weight_shape and qweight / fweight)
CONV_ATTRS = {"strides": Attr.POS2, "dilations": Attr.POS2, "pads": Attr.PADS4, "auto_pad": Attr.AUTO_PAD,
              "group": Attr.INT, "weight_shape": Attr.POS4, "kernel_shape": Attr.POS2, "qweight": Attr.STR,
              "fweight": Attr.STR}


def check_matrix_op(n: Node, where: str, consts: Dict[str, Any], fa: Any, fw: Any, opset: int) -> None:
    """Plan-load checks of a Conv / BfpDense: its compiled weight against the plan's constants."""
    a = n.attrs
    need("weight_shape" in a, where, "missing attribute 'weight_shape' (the compiled weight's shape)")
    O, Cg, kh, kw = a["weight_shape"]
    need(n.inputs[1] == "", f"{where}.inputs", "the weight is stored in the plan (attribute qweight/fweight): "
         "input 1 must be empty")
    if n.op == "BfpDense":
        need((kh, kw) == (1, 1), f"{where}.attrs.weight_shape", f"a dense layer's weight is [O, K, 1, 1], got "
             f"{a['weight_shape']}")
        for k in ("group", "strides", "dilations", "pads", "auto_pad", "kernel_shape"):
            need(k not in a or (k == "group" and a[k] == 1), f"{where}.attrs", f"a dense layer has no {k!r}")
    groups = int(a.get("group", 1))
    need(groups >= 1 and O % groups == 0, f"{where}.attrs.group",
         f"must be >= 1 and divide the {O} output channels, got {groups}")
    if "kernel_shape" in a:
        need(list(a["kernel_shape"]) == [kh, kw], f"{where}.attrs.kernel_shape",
             f"{a['kernel_shape']} differs from the weight's {[kh, kw]}")
    has_q, has_f = "qweight" in a, "fweight" in a
    need(has_q or has_f, where, "missing weight: no attribute 'qweight' (block format) or 'fweight' (fp32)")
    need(not (has_q and has_f), where, "has both 'qweight' and 'fweight'")
    wshape = (O, Cg, kh, kw)
    if has_q:
        need(fw.is_block, where, f"a quantized weight ('qweight') in a plan whose weight format is {fw}")
        key = a["qweight"]
        code_dt = np.dtype(np.int8 if fw.kind == "int" else np.uint8)
        nblocks = -(-Cg // fw.block_size)
        for suffix, dt, shape in ((".codes", code_dt, wshape), (".exps", np.dtype(np.int16), (O, nblocks, kh, kw))):
            cname = key + suffix
            need(cname in consts, where, f"missing weight: constant {cname!r} is not in the plan")
            cdt, cshape = consts[cname]
            need(cdt == dt and cshape == shape, where,
                 f"constant {cname!r} is {cdt}{list(cshape)}; weight_shape {list(wshape)} in {fw} needs "
                 f"{dt}{list(shape)}")
    else:
        need(not fw.is_block, where, f"an fp32 weight ('fweight') in a plan whose weight format is {fw}")
        cname = a["fweight"]
        need(cname in consts, where, f"missing weight: constant {cname!r} is not in the plan")
        cdt, cshape = consts[cname]
        need(cdt == np.float32 and cshape == wshape, where,
             f"constant {cname!r} is {cdt}{list(cshape)}; weight_shape needs float32{list(wshape)}")
    if len(n.inputs) > 2 and n.inputs[2] in consts:
        cdt, cshape = consts[n.inputs[2]]
        need(cdt.kind in "fiu" and prod(cshape) == O, where,
             f"bias {n.inputs[2]!r} is {cdt}{list(cshape)}; {O} numbers expected")


_MATRIX = dict(inputs=(2, 3), attrs=CONV_ATTRS, check=check_matrix_op, weights=QUANTIZED, fold_constants=False)

# Gemm and MatMul: the compiler makes a dense layer of those with a constant 2-D weight; the others
# lower in matmul.py (both operands quantized at run time)


def _bias(cx: "Lowering", n: Node, O: int) -> np.ndarray:
    """The bias of a matrix op: a constant of ``O`` numbers."""
    b = np.asarray(cx.const_input(n, 2, "the bias"), np.float32).reshape(-1)
    if b.size != O:
        raise cx.err(f"the bias has {b.size} numbers for {O} output channels")
    return b


def _depthwise_weights(cx: "Lowering", n: Node, O: int, kh: int, kw: int) -> np.ndarray:
    """[taps][O] float weights: the dequantized BFP weights (one-element blocks) or fp32."""
    if "qweight" in n.attrs:
        from ...core import BfpTensor

        codes = cx.const(n.attrs["qweight"] + ".codes")
        exps = cx.const(n.attrs["qweight"] + ".exps")
        W = BfpTensor(cx.plan.weight_format, 1, codes, exps).dequantize()
    else:
        W = np.asarray(cx.const(n.attrs["fweight"]), np.float32)
    return np.ascontiguousarray(W.reshape(O, kh * kw).T)


def _packed(cx: "Lowering", n: Node, groups: int, taps: int) -> Any:
    """The weight packed for the current kernel (once per plan and kernel)."""
    cache = cx.plan.__dict__.setdefault("_packed", {})
    key = (n.attrs["qweight"], _core.get_kernel())
    if key not in cache:
        codes = cx.const(n.attrs["qweight"] + ".codes")
        exps = cx.const(n.attrs["qweight"] + ".exps")
        cache[key] = _core.pack_operand(codes.view(np.int8), exps, fmt_params(cx.plan.weight_format), "convw",
                                        taps, groups)
    return cache[key]


def conv_nhwc(cx: "Lowering", n: Node, x: Value, O: int, kh: int, kw: int, groups: int, strides: Sequence[int],
              pads: Sequence[int], dil: Sequence[int]) -> Value:
    """Emits the convolution of ``x`` (NCHW logical) by ``n``'s compiled weight; returns its
    NHWC output."""
    N, C, H, W = x.shape
    sh, sw = strides
    dh, dw = dil
    pt, pl, pb, pr = pads
    OH = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if OH < 1 or OW < 1:
        raise cx.err(f"the output would be empty (input {H}x{W}, kernel {kh}x{kw})")
    # a stem (<= 4 channels, BFP weights) reads an NCHW input as it is on the kernel's stem path:
    # no channels-last copy of the network's input (the executor makes one where that path does
    # not take it)
    Wshape = n.attrs["weight_shape"]
    depthwise = groups == C and Wshape[1] == 1 and O == C
    nchw = (tuple(x.perm) == (0, 1, 2, 3) and "qweight" in n.attrs and groups == 1 and 1 < C <= 4
            and not depthwise and _core.kernel_has_stem_path())
    xn = x if nchw else cx.layout(x, (0, 2, 3, 1))
    out = cx.new_value((N, O, OH, OW), (0, 2, 3, 1))
    if Wshape[1] * groups != C:
        raise cx.err(f"input has {C} channels, the weight expects {Wshape[1] * groups}")
    geom = _core.ConvGeometry(batch=N, channels=C, height=H, width=W, out_channels=O, kernel_h=kh, kernel_w=kw,
                              stride_h=sh, stride_w=sw, pad_top=pt, pad_left=pl, pad_bottom=pb, pad_right=pr,
                              dilation_h=dh, dilation_w=dw, groups=groups, out_h=OH, out_w=OW)
    params = _core.ConvParams(geometry=geom, input_nchw=nchw)
    w, wf = None, -1
    if depthwise:  # one-element blocks, see ops/conv.cpp
        wf = cx.const_vid(_depthwise_weights(cx, n, O, kh, kw))
        params.depthwise, params.quantize_input = True, "qweight" in n.attrs
    elif "qweight" in n.attrs:
        w = _packed(cx, n, groups, kh * kw)
    else:
        Wf = np.asarray(cx.const(n.attrs["fweight"]), np.float32)
        G, Og, Cg = groups, O // groups, Wshape[1]
        wf = cx.const_vid(Wf.reshape(G, Og, Cg, kh, kw).transpose(0, 3, 4, 2, 1).reshape(-1))
    bias = cx.const_vid(_bias(cx, n, O)) if len(n.inputs) > 2 and n.inputs[2] else -1
    cx.emit(params, [xn.vid], [out.vid], w=w, wf=wf, bias=bias)
    return out


@lowers("Conv", **_MATRIX)
def _conv(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    if len(x.shape) != 4:
        raise cx.err(f"only 2-D convolution (NCHW input) is supported, got rank {len(x.shape)}")
    O, Cg, kh, kw = n.attrs["weight_shape"]
    groups = int(n.attrs.get("group", 1))
    strides = [int(s) for s in n.attrs.get("strides", [1, 1])]
    dil = [int(s) for s in n.attrs.get("dilations", [1, 1])]
    pads = pads_2d(n, x.shape[2:], (kh, kw), strides, dil)
    cx.set(n.outputs[0], conv_nhwc(cx, n, x, O, kh, kw, groups, strides, pads, dil))


@lowers("BfpDense", **_MATRIX)
def _dense(cx: "Lowering", n: Node) -> None:
    x = cx.get(n.inputs[0])
    O, K = n.attrs["weight_shape"][:2]
    if x.shape[-1] != K:
        raise cx.err(f"input's last dimension is {x.shape[-1]}, the weight expects {K}")
    xc = cx.layout(x, ident(len(x.shape)))
    M = int(np.prod(x.shape[:-1], dtype=np.int64))
    x4 = Value((M, K, 1, 1), (0, 2, 3, 1), cx.alias_vid(xc.vid))
    y4 = conv_nhwc(cx, n, x4, O, 1, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))
    cx.set(n.outputs[0], Value(tuple(x.shape[:-1]) + (O,), ident(len(x.shape)), cx.alias_vid(y4.vid)))
