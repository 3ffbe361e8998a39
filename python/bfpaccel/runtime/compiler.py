"""ONNX -> a compiled BFP plan.

``compile`` reads an ONNX model, checks every op is one the runtime executes (an unsupported op
-- control flow such as If, Loop or Scan included -- is reported by name with its node), simplifies the graph (drops Identity/Dropout, cancels
transpose pairs that tf2onnx leaves around NHWC ops, pushes constant elementwise ops through
transposes), folds batch-norm and per-channel constant scale/shift into the preceding
convolution or dense layer, turns MatMul/Gemm with constant weights into dense layers, and
quantizes every matrix-op weight once into the chosen BFP format.  The result is a
:class:`~bfpaccel.runtime.plan.Plan` that loads and runs with numpy and the C++ core alone.

Folding happens in float64 **before** weight quantization, as an FPGA compiler does it: the
quantized weight is the BFP image of ``W * gamma / sqrt(var + eps)``, and the folded shift
joins the bias (a vector op).  This is exact in real arithmetic; it differs from running the
batch-norm as a separate vector op only by where the roundings fall.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Set, Union

import numpy as np

from .. import core
from ..formats import VECTOR_PRECISIONS, Format, get_format  # VECTOR_PRECISIONS re-exported here
from . import ops as _ops
from .graph import Graph, Node, from_onnx
from .ops._registry import QUANTIZED, TO_DENSE
from .plan import Plan

__all__ = ["compile", "SUPPORTED_OPS", "UnsupportedOpError", "VECTOR_PRECISIONS"]

#: ONNX ops the runtime executes (with the default domain): every op of the registry
#: (``bfpaccel.runtime.ops``) -- lowered onto the datapath, folded when its inputs are
#: constants, or compiled into one that is (Gemm, MatMul).
SUPPORTED_OPS: Set[str] = _ops.supported_ops()


class UnsupportedOpError(ValueError):
    """The model uses ops the runtime does not execute (``.ops``: op type -> node names)."""

    def __init__(self, ops: Dict[str, List[str]]):
        self.ops = ops
        parts = []
        for op, names in sorted(ops.items()):
            shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            parts.append(f"{op} (node {shown})")
        super().__init__("unsupported op(s): " + "; ".join(parts))


ModelLike = Union[str, "os.PathLike[str]", bytes, Any]


def _load_onnx(model: ModelLike) -> Any:
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - onnx is a declared dependency of compile
        raise ImportError("bfpaccel.compile needs the onnx package: pip install onnx") from e
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX model not found: {path}")
        try:
            return onnx.load(path)
        except Exception as e:
            raise ValueError(f"{path} is not a readable ONNX model: {e}") from e
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    if isinstance(model, onnx.ModelProto):
        return model
    raise TypeError(f"model must be an ONNX path, bytes or onnx.ModelProto, got {type(model).__name__}")


# ---------------------------------------------------------------- graph passes
def _rename_uses(g: Graph, old: str, new: str) -> None:
    for n in g.nodes:
        n.inputs = [new if i == old else i for i in n.inputs]
    for o in g.outputs:
        if o.name == old:  # keep the graph output's name: the producer must write it
            raise AssertionError("renaming a graph output")


def _drop_identities(g: Graph) -> None:
    outs = set(g.output_names())
    keep: List[Node] = []
    for n in g.nodes:
        if n.op in ("Identity", "Dropout") and n.inputs and n.outputs[0] not in outs:
            _rename_uses(g, n.outputs[0], n.inputs[0])
            continue
        if n.op == "Identity" and n.inputs and n.inputs[0] in g.consts and n.outputs[0] not in outs:
            continue
        keep.append(n)
    g.nodes = keep


def _perm_of(n: Node, rank: Optional[int] = None) -> Optional[List[int]]:
    p = n.attrs.get("perm")
    if p is None:
        return list(reversed(range(rank))) if rank is not None else None
    return [int(v) for v in p]


def _cancel_transposes(g: Graph) -> bool:
    """Transpose(Transpose(x, p1), p2) with p1∘p2 = identity -> x."""
    changed = False
    prod = g.producer()
    outs = set(g.output_names())
    for n in list(g.nodes):
        if n.op != "Transpose" or n.outputs[0] in outs:
            continue
        src = prod.get(n.inputs[0])
        if src is None or src.op != "Transpose":
            continue
        p1, p2 = _perm_of(src), _perm_of(n)
        if p1 is None or p2 is None or len(p1) != len(p2):
            continue
        if [p1[i] for i in p2] == list(range(len(p1))):
            _rename_uses(g, n.outputs[0], src.inputs[0])
            g.nodes.remove(n)
            changed = True
            prod = g.producer()
    if changed:
        g.prune()
    return changed


_ELTWISE_CONST = ("Mul", "Add", "Sub", "Div")


def _push_through_transpose(g: Graph) -> bool:
    """Transpose(x, p) -> Op(., c)  ==>  Op(x, T^-1(c)) -> Transpose(p) (c constant)."""
    changed = False
    cons = g.consumers()
    prod = g.producer()
    outs = set(g.output_names())
    for n in list(g.nodes):
        if n.op not in _ELTWISE_CONST or len(n.inputs) != 2:
            continue
        ci = [i for i, v in enumerate(n.inputs) if v in g.consts]
        if len(ci) != 1:
            continue
        xi = 1 - ci[0]
        t = prod.get(n.inputs[xi])
        if t is None or t.op != "Transpose" or len(cons.get(t.outputs[0], [])) != 1 or t.outputs[0] in outs:
            continue
        p = _perm_of(t)
        c = np.asarray(g.consts[n.inputs[ci[0]]])
        if p is None or c.ndim > len(p):
            continue
        c = c.reshape((1,) * (len(p) - c.ndim) + c.shape)
        inv = list(np.argsort(p))
        c2 = np.ascontiguousarray(c.transpose(inv))
        cname = n.inputs[ci[0]] + f"/through_{t.name}"
        g.consts[cname] = c2
        mid = n.outputs[0] + "/pre_transpose"
        new_inputs = list(n.inputs)
        new_inputs[xi] = t.inputs[0]
        new_inputs[ci[0]] = cname
        op_node = Node(n.op, n.name, new_inputs, [mid], dict(n.attrs))
        tr_node = Node("Transpose", t.name + "/moved", [mid], [n.outputs[0]], {"perm": p})
        i_t = g.nodes.index(t)
        g.nodes.remove(n)
        g.nodes.remove(t)
        g.nodes[i_t:i_t] = [op_node, tr_node]
        changed = True
        cons = g.consumers()
        prod = g.producer()
    if changed:
        g.prune()
    return changed


def _per_channel(c: np.ndarray, O: int, axis_rank: int = 4) -> Optional[np.ndarray]:
    """c as a length-O per-channel vector for an NCHW (rank 4) or [M, O] (rank 2) tensor."""
    c = np.asarray(c, dtype=np.float64)
    if c.size == 1:
        return np.full(O, float(c.reshape(())), np.float64)
    if axis_rank == 4:
        shp = c.shape
        if len(shp) > 4:
            return None
        full = (1,) * (4 - len(shp)) + tuple(shp)
        if full[0] == 1 and full[1] == O and full[2] == 1 and full[3] == 1:
            return c.reshape(O)
        return None
    if c.shape[-1] == O and c.size == O:
        return c.reshape(O)
    return None


def _fold_into_matrix_ops(g: Graph) -> bool:
    changed = False
    cons = g.consumers()
    outs = set(g.output_names())
    for n in list(g.nodes):
        if not _quantizes_weight(n):
            continue
        wname = n.inputs[1]
        if wname not in g.consts or n.outputs[0] in outs:
            continue
        users = cons.get(n.outputs[0], [])
        if len(users) != 1:
            continue
        u = users[0]
        W = np.asarray(g.consts[wname], np.float64)
        O = W.shape[0]
        B = np.asarray(g.consts[n.inputs[2]], np.float64) if len(n.inputs) > 2 and n.inputs[2] else np.zeros(O)
        rank = 4 if n.op == "Conv" else 2
        newW: Optional[np.ndarray] = None
        newB: Optional[np.ndarray] = None
        if (u.op == "BatchNormalization" and all(i in g.consts for i in u.inputs[1:5])
                and len([o for o in u.outputs if o]) == 1):
            gamma, beta, mean, var = (np.asarray(g.consts[i], np.float64) for i in u.inputs[1:5])
            eps = float(u.attrs.get("epsilon", 1e-5))
            s = gamma / np.sqrt(var + eps)
            newW = W * s.reshape((O,) + (1,) * (W.ndim - 1))
            newB = (B - mean) * s + beta
        elif u.op in _ELTWISE_CONST and len(u.inputs) == 2:
            ci = [i for i, v in enumerate(u.inputs) if v in g.consts]
            if len(ci) != 1 or (u.op in ("Sub", "Div") and ci[0] != 1):
                continue
            c = _per_channel(g.consts[u.inputs[ci[0]]], O, rank)
            if c is None:
                continue
            if u.op == "Mul":
                newW, newB = W * c.reshape((O,) + (1,) * (W.ndim - 1)), B * c
            elif u.op == "Div":
                newW, newB = W / c.reshape((O,) + (1,) * (W.ndim - 1)), B / c
            elif u.op == "Add":
                newW, newB = W, B + c
            else:
                newW, newB = W, B - c
        if newW is None or newB is None:
            continue
        wn, bn = f"{n.name}/W_folded{len(g.consts)}", f"{n.name}/B_folded{len(g.consts)}"
        g.consts[wn] = newW.astype(np.float32)
        g.consts[bn] = newB.astype(np.float32)
        n.inputs = [n.inputs[0], wn, bn]
        n.outputs = [u.outputs[0]]
        n.attrs.setdefault("folded", []).append(u.name)
        g.nodes.remove(u)
        changed = True
        cons = g.consumers()
    if changed:
        g.prune()
    return changed


def _dense_from_matmul(g: Graph) -> None:
    """MatMul(x, const B[K,N]) / Gemm(x, const B, C) -> BfpDense(x, W[N,K], bias[N])."""
    for i, n in enumerate(g.nodes):
        if n.op == "MatMul" and n.inputs[1] in g.consts and np.asarray(g.consts[n.inputs[1]]).ndim == 2:
            B = np.asarray(g.consts[n.inputs[1]], np.float32)
            wn = f"{n.name}/W_dense"
            g.consts[wn] = np.ascontiguousarray(B.T)
            g.nodes[i] = Node("BfpDense", n.name, [n.inputs[0], wn], n.outputs, {"from": "MatMul"})
        elif n.op == "Gemm" and n.inputs[1] in g.consts:
            if int(n.attrs.get("transA", 0)):
                continue
            B = np.asarray(g.consts[n.inputs[1]], np.float64)
            W = B if int(n.attrs.get("transB", 0)) else B.T
            W = W * float(n.attrs.get("alpha", 1.0))
            ins = [n.inputs[0], f"{n.name}/W_dense"]
            g.consts[ins[1]] = np.ascontiguousarray(W.astype(np.float32))
            if len(n.inputs) > 2 and n.inputs[2]:
                if n.inputs[2] not in g.consts:
                    continue
                C = np.asarray(g.consts[n.inputs[2]], np.float64) * float(n.attrs.get("beta", 1.0))
                if C.size == W.shape[0] and (C.ndim == 1 or C.shape[-1] == W.shape[0]):
                    g.consts[f"{n.name}/B_dense"] = C.reshape(-1).astype(np.float32)
                    ins.append(f"{n.name}/B_dense")
                elif C.size == 1:
                    g.consts[f"{n.name}/B_dense"] = np.full(W.shape[0], float(C.reshape(())), np.float32)
                    ins.append(f"{n.name}/B_dense")
                else:
                    continue
            g.nodes[i] = Node("BfpDense", n.name, ins, n.outputs, {"from": "Gemm"})


def _quantizes_weight(n: Node) -> bool:
    """True for matrix ops whose weight (input 1) the compiler quantizes into the plan."""
    spec = _ops.find(n.op)
    return spec is not None and spec.weights == QUANTIZED


def _check_supported(g: Graph) -> None:
    bad: Dict[str, List[str]] = {}
    for n in g.nodes:
        spec = _ops.find(n.op)
        if spec is None:
            bad.setdefault(n.op, []).append(n.name)
        elif spec.weights == TO_DENSE and spec.lower is None and not all(i in g.consts for i in n.inputs[1:2]):
            bad.setdefault(f"{n.op} with a non-constant weight", []).append(n.name)
    if bad:
        raise UnsupportedOpError(bad)


#: element types a graph input may have: float tensors, and integer / boolean ones (token ids,
#: attention masks), which the session feeds as exact integers
INPUT_DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")


def _check_inputs(g: Graph) -> None:
    for vi in g.inputs:
        if vi.dtype not in INPUT_DTYPES:
            raise ValueError(
                f"graph input {vi.name!r} has dtype {vi.dtype}: the runtime takes float, integer or boolean tensors "
                f"({', '.join(INPUT_DTYPES)}; decode images outside the graph: bfpaccel.preprocess does it the "
                "seed's way)")


def _resolve_format(fmt: Union[str, Format], what: str) -> Format:
    f = get_format(fmt)
    if not f.is_block and f.element != "fp32":
        raise ValueError(f"{what}: matrix ops run on a block format or fp32, not {f.element}")
    return f


def compile(
    model: ModelLike,
    format: Union[str, Format] = "msfp16",
    weight_format: Union[str, Format, None] = None,
    vector_precision: Optional[str] = None,
    *,
    metadata: Optional[Dict[str, str]] = None,
    seed: int = 0,
    text_front: Optional[Any] = None,
) -> Plan:
    """Compiles an ONNX model into a BFP plan.

    Args:
        model: path of an ``.onnx`` file, its bytes, or an ``onnx.ModelProto``.
        format: block format of the activations at every matrix op (a preset name such as
            ``"msfp16"`` or a :class:`~bfpaccel.Format`), or ``"fp32"`` for a float32 run of the
            same graph (the reference against onnxruntime).
        weight_format: block format of the weights (default: ``format``); its block size must
            equal the activation format's.
        vector_precision: ``"fp16"`` (default, the NPU's 16-bit vector units), ``"bf16"`` or
            ``"fp32"``; with ``format="fp32"`` the default is ``"fp32"``.
        metadata: extra key/value strings stored in the plan (the ONNX ``metadata_props`` are
            copied too: preprocessing and output names recorded by the converter).
        seed: seed of stochastic rounding, where a format uses it.
        text_front: a :class:`bfpaccel.textfront.TextFront` to record in the plan (a tokenizer,
            the inputs it feeds, the pooling into sentence embeddings), checked against the
            compiled plan by :func:`bfpaccel.textfront.attach_text_front`.

    Returns:
        The :class:`~bfpaccel.runtime.plan.Plan` (``.save(path)`` writes it to one file).

    Raises:
        UnsupportedOpError: an op the runtime does not execute (named with its node).
        ValueError: bad formats, graph inputs of another type than float, integer or bool, an
            unreadable model; a ``TextFrontError`` for a text front that does not fit the plan.

    Example:
        >>> import bfpaccel  # doctest: +SKIP
        >>> plan = bfpaccel.compile("resnet50.onnx", format="msfp16")  # doctest: +SKIP
        >>> bfpaccel.Session(plan).run(None, {"input:0": x})  # doctest: +SKIP
    """
    fa = _resolve_format(format, "format")
    fw = _resolve_format(weight_format, "weight_format") if weight_format is not None else fa
    if fa.is_block != fw.is_block or (fa.is_block and fa.block_size != fw.block_size):
        raise ValueError(f"weight format {fw} must have the same block size as the activation format {fa}")
    if vector_precision is None:
        vector_precision = "fp16" if fa.is_block else "fp32"
    vp = str(vector_precision).lower()
    if vp not in VECTOR_PRECISIONS:
        raise ValueError(f"vector_precision must be one of {VECTOR_PRECISIONS}, got {vector_precision!r}")
    proto = _load_onnx(model)
    g, meta = from_onnx(proto)
    if metadata:
        meta.update({str(k): str(v) for k, v in metadata.items()})
    _check_supported(g)
    _check_inputs(g)
    g.prune()
    _drop_identities(g)
    for _ in range(100):
        a = _cancel_transposes(g)
        b = _push_through_transpose(g)
        if not (a or b):
            break
    _dense_from_matmul(g)
    while _fold_into_matrix_ops(g):
        pass
    for n in g.nodes:
        spec = _ops.find(n.op)
        if spec is not None and spec.prepare is not None:  # an op that quantizes its weights itself
            spec.prepare(n, g, fw, seed)
            continue
        if not _quantizes_weight(n):
            continue
        if n.inputs[1] not in g.consts:
            raise UnsupportedOpError({f"{n.op} with a non-constant weight": [n.name]})
        W = np.asarray(g.consts[n.inputs[1]], np.float32)
        if n.op == "BfpDense":
            W = W.reshape(W.shape[0], W.shape[1], 1, 1)
        groups = int(n.attrs.get("group", 1))
        n.attrs["weight_shape"] = list(W.shape)
        if fw.is_block:
            cw = core.quantize_conv_weight(W, fw, groups=groups, seed=seed)
            key = f"{n.name}/Wq"
            g.consts[key + ".codes"] = cw.tensor.elements
            g.consts[key + ".exps"] = cw.tensor.exponents
            n.attrs["qweight"] = key
        else:
            key = f"{n.name}/Wf"
            g.consts[key] = W
            n.attrs["fweight"] = key
        old = n.inputs[1]
        n.inputs[1] = ""
        if old not in [i for m in g.nodes for i in m.inputs]:
            g.consts.pop(old, None)
    plan = Plan(
        graph=g,
        metadata=meta,
        format=fa,
        weight_format=fw,
        vector_precision=vp,
        seed=seed,
    )
    if text_front is not None:
        from ..textfront import attach_text_front

        plan = attach_text_front(plan, text_front)
    return plan
