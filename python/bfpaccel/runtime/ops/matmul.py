"""MatMul and Gemm between run-time tensors: attention's ``Q @ Kᵀ`` and ``P @ V``, a ``Gemm``
with a computed ``B`` (``transA`` / ``transB``), a ``MatMul`` whose constant is the *left*
operand.

The compiler turns a ``MatMul`` / ``Gemm`` with a constant 2-D weight ``B`` into a dense layer
(``BfpDense``, weight quantized once into the plan); what is left lowers here onto
``OpKind.MATMUL``: numpy-style batching and broadcasting (rank >= 1, 1-D operands as numpy
treats them), both operands quantized at run time along K -- ``A``'s rows as a dense layer's
activations, ``B``'s columns as its weights -- on the same datapath, so every output matrix has
the bits of ``bfpaccel.reference.matmul`` of its pair of matrices.  A transposed operand (a
``Transpose`` of the key before ``Q @ Kᵀ``) is read in place when its layout allows, else
copied once.  ``Gemm``'s ``alpha`` and ``beta * C`` are vector ops after the product (each
rounded to the vector precision); a constant ``C`` is scaled by ``beta`` in float64 once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Sequence, Tuple

import numpy as np

from ..._core import MatMulParams  # type: ignore[attr-defined]
from .._validate import Attr
from ..graph import Node
from ..values import Value, compatible, ident
from ._registry import TO_DENSE, lowers
from .elementwise import binary

if TYPE_CHECKING:  # pragma: no cover
    from ..lower import Lowering

__all__ = ["matmul"]


def _batch_strides(own: Sequence[int], batch: Sequence[int]) -> List[int]:
    """Matrices between consecutive indices of each output batch axis, for an operand whose own
    (contiguous) batch axes are ``own`` (aligned from the right; a size-1 or missing axis
    broadcasts: 0)."""
    own = list(own)
    lead = len(batch) - len(own)
    out: List[int] = []
    for d in range(len(batch)):
        k = d - lead
        if k < 0 or own[k] == 1:
            out.append(0)
        else:
            out.append(int(np.prod(own[k + 1:], dtype=np.int64)))
    return out


def _transposed(v: Value) -> Value:
    """A 2-D value's transpose: the same buffer, its layout relabelled."""
    return Value((v.shape[1], v.shape[0]), tuple(1 - p for p in v.perm), v.vid)


def matmul(cx: "Lowering", a: Value, b: Value, what: str = "") -> Value:
    """Emits ``a @ b`` (numpy ``matmul`` semantics) on the BFP core; returns the product."""
    ra, rb = len(a.shape), len(b.shape)
    if ra == 0 or rb == 0:
        raise cx.err(f"MatMul of a scalar ({a.shape} @ {b.shape})")
    a_shape = tuple(a.shape) if ra >= 2 else (1, a.shape[0])
    b_shape = tuple(b.shape) if rb >= 2 else (b.shape[0], 1)
    M, K = a_shape[-2:]
    K2, N = b_shape[-2:]
    if K != K2:
        raise cx.err(f"{what}shapes {a.shape} and {b.shape} do not multiply: {K} != {K2}")
    try:
        batch = tuple(np.broadcast_shapes(a_shape[:-2], b_shape[:-2]))
    except ValueError:
        raise cx.err(f"{what}batch dimensions of {a.shape} and {b.shape} do not broadcast") from None
    # A: row-major [..., M, K]
    ac = cx.layout(a, ident(ra))
    # B: row-major [..., K, N], or read in place as [..., N, K] (its last two axes swapped)
    trans = False
    if rb >= 2:
        swapped = ident(rb - 2) + (rb - 1, rb - 2)
        if compatible(b.shape, b.perm, ident(rb)):
            bc = cx.layout(b, ident(rb))
        else:
            bc = cx.layout(b, swapped)  # an alias when the layout allows, else one copy
            trans = True
    else:
        bc = cx.layout(b, ident(1))
    params = MatMulParams(m=M, k=K, n=N, batch_shape=list(batch) or [1],
                          a_strides=_batch_strides(a_shape[:-2], batch) or [0],
                          b_strides=_batch_strides(b_shape[:-2], batch) or [0],
                          a_count=int(np.prod(a_shape[:-2], dtype=np.int64)),
                          b_count=int(np.prod(b_shape[:-2], dtype=np.int64)), b_transposed=trans)
    shape: Tuple[int, ...] = batch + (M, N)
    out = cx.new_value(shape)
    cx.emit(params, [ac.vid, bc.vid], [out.vid])
    keep = list(batch) + ([M] if ra >= 2 else []) + ([N] if rb >= 2 else [])
    if len(keep) != len(shape):  # 1-D operands: their axis is dropped from the result
        return Value(keep, ident(len(keep)), cx.alias_vid(out.vid))
    return out


@lowers("MatMul", inputs=2, weights=TO_DENSE, fold_constants=False)
def _matmul(cx: "Lowering", n: Node) -> None:
    cx.set(n.outputs[0], matmul(cx, cx.get(n.inputs[0]), cx.get(n.inputs[1])))


@lowers("Gemm", inputs=(2, 3), attrs={"transA": Attr.FLAG, "transB": Attr.FLAG, "alpha": Attr.NUM,
                                      "beta": Attr.NUM}, weights=TO_DENSE, fold_constants=False)
def _gemm(cx: "Lowering", n: Node) -> None:
    a, b = cx.get(n.inputs[0]), cx.get(n.inputs[1])
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise cx.err(f"Gemm takes 2-D operands, got {a.shape} and {b.shape}")
    if int(n.attrs.get("transA", 0)):
        a = _transposed(a)
    if int(n.attrs.get("transB", 0)):
        b = _transposed(b)
    alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
    out = n.outputs[0]
    has_c = len(n.inputs) > 2 and n.inputs[2] != ""
    y = matmul(cx, a, b, "Gemm: ")
    cur = f"{out}/product"
    cx.set(cur, y)
    if alpha != 1.0:
        cx.set_const(f"{out}/alpha", np.asarray(alpha, np.float32))
        binary(cx, "Mul", cur, f"{out}/alpha", f"{out}/scaled")
        cur = f"{out}/scaled"
    if has_c:
        c = n.inputs[2]
        if cx.is_const(c):
            cx.set_const(f"{out}/beta_c", (np.asarray(cx.const(c), np.float64) * beta).astype(np.float32))
            c = f"{out}/beta_c"
        elif beta != 1.0:
            cx.set_const(f"{out}/beta", np.asarray(beta, np.float32))
            binary(cx, "Mul", c, f"{out}/beta", f"{out}/beta_c")
            c = f"{out}/beta_c"
        binary(cx, "Add", cur, c, out)
    else:
        cx.set(out, cx.get(cur))
