"""Recurrent ops: ONNX ``LSTM`` and ``GRU`` (forward, reverse, bidirectional; ``layout`` 0 and 1).

At compile time the input weights ``W`` and the recurrence weights ``R`` of all directions are
quantized once into the plan (``prepare``), each blocked along its reduction axis as a dense
layer's weight (``[D * gates * H, K]``, each row its own blocks); biases and peepholes stay
float32 constants.  Lowering emits:

* one dense layer over every time step and direction: ``x_t W^T`` with ``Wb`` in its epilogue
  (rounded once to the vector precision), ``[rows, D * gates * H]``;
* one recurrent op per direction (``_core.RecurrentParams``, ``csrc/ops/recurrent.cpp``): the
  time loop runs in C++; each step multiplies ``h`` (quantized as an activation) by ``R`` on the
  BFP datapath and runs the gate arithmetic at the plan's vector precision, rounded where the
  separate ops would round (docs/numerics.md#recurrent-cells, ``bfpaccel.reference.rnn``).

Supported: ``sequence_lens`` (a constant), ``initial_h`` / ``initial_c`` (any value), peepholes
``P`` (a constant), ``clip``, ``input_forget``, GRU ``linear_before_reset`` 0 and 1, and the
activation functions of :data:`ACTIVATIONS` with ``activation_alpha`` / ``activation_beta``
(consumed in order by the functions that take them, as onnxruntime does).  Anything else is an
error naming the node, at compile time where the compiler can tell.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ... import _core  # type: ignore[attr-defined]
from ...core import fmt_params
from .._validate import Attr, need, prod
from ..graph import Graph, Node
from ..values import Value, ident
from ._registry import lowers

if TYPE_CHECKING:  # pragma: no cover
    from ..lower import Lowering

__all__ = ["ACTIVATIONS", "rnn_settings", "RnnSettings"]

#: ONNX activation name -> (its _core.RnnActivation, takes alpha, takes beta, default alpha, default beta)
ACTIVATIONS: Dict[str, Tuple[Any, bool, bool, float, float]] = {
    "Sigmoid": (_core.RnnActivation.SIGMOID, False, False, 0.0, 0.0),
    "Tanh": (_core.RnnActivation.TANH, False, False, 0.0, 0.0),
    "Relu": (_core.RnnActivation.RELU, False, False, 0.0, 0.0),
    "HardSigmoid": (_core.RnnActivation.HARD_SIGMOID, True, True, 0.2, 0.5),
    "LeakyRelu": (_core.RnnActivation.LEAKY_RELU, True, False, 0.01, 0.0),
    "Affine": (_core.RnnActivation.AFFINE, True, True, 1.0, 0.0),
    "ThresholdedRelu": (_core.RnnActivation.THRESHOLDED_RELU, True, False, 1.0, 0.0),
    "ScaledTanh": (_core.RnnActivation.SCALED_TANH, True, True, 1.0, 1.0),
    "Elu": (_core.RnnActivation.ELU, True, False, 1.0, 0.0),
    "Softsign": (_core.RnnActivation.SOFTSIGN, False, False, 0.0, 0.0),
    "Softplus": (_core.RnnActivation.SOFTPLUS, False, False, 0.0, 0.0),
}
_DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}
_DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}
_GATES = {"LSTM": 4, "GRU": 3}


class RnnSettings:
    """A recurrent node's attributes, checked: ``gates``, ``directions``, ``reverse`` (per
    direction), ``layout``, ``clip`` (None: none), ``input_forget``, ``linear_before_reset``
    and ``acts`` (per direction, the cell's functions as ``(RnnActivation, alpha, beta)``)."""

    def __init__(self, n: Node):
        a = n.attrs
        cell = n.op
        self.cell = cell
        self.gates = _GATES[cell]
        direction = str(a.get("direction", "forward"))
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be forward, reverse or bidirectional, got {direction!r}")
        self.directions = _DIRECTIONS[direction]
        self.reverse = [direction == "reverse"] if self.directions == 1 else [False, True]
        self.layout = int(a.get("layout", 0))
        if self.layout not in (0, 1):
            raise ValueError(f"layout must be 0 or 1, got {self.layout}")
        clip = a.get("clip")
        self.clip: Optional[float] = None if clip is None else float(clip)
        if self.clip is not None and not self.clip >= 0:
            raise ValueError(f"clip must be >= 0, got {clip}")
        self.input_forget = bool(int(a.get("input_forget", 0)))
        self.linear_before_reset = bool(int(a.get("linear_before_reset", 0)))
        if self.input_forget and cell != "LSTM":
            raise ValueError("input_forget is an LSTM attribute")
        if self.linear_before_reset and cell != "GRU":
            raise ValueError("linear_before_reset is a GRU attribute")
        per = len(_DEFAULT_ACTS[cell])
        names = a.get("activations")
        names = list(names) if names else _DEFAULT_ACTS[cell] * self.directions
        if len(names) != per * self.directions:
            raise ValueError(f"{cell} with {self.directions} direction(s) takes {per * self.directions} activations, "
                             f"got {len(names)} ({names})")
        bad = [x for x in names if x not in ACTIVATIONS]
        if bad:
            raise ValueError(f"activation(s) {bad} are not supported (supported: {', '.join(ACTIVATIONS)})")
        alphas = [float(v) for v in (a.get("activation_alpha") or [])]
        betas = [float(v) for v in (a.get("activation_beta") or [])]
        acts = []
        for name in names:  # alphas / betas are consumed in order by the functions that take them
            kind, ta, tb, da, db = ACTIVATIONS[name]
            al = alphas.pop(0) if ta and alphas else da
            be = betas.pop(0) if tb and betas else db
            acts.append((kind, al, be))
        if alphas or betas:
            raise ValueError(f"activation_alpha / activation_beta have {len(alphas)} / {len(betas)} values that no "
                             "activation takes")
        self.acts = [acts[d * per:(d + 1) * per] for d in range(self.directions)]


def rnn_settings(n: Node) -> RnnSettings:
    """The checked attributes of an ``LSTM`` / ``GRU`` node (ValueError when unsupported)."""
    return RnnSettings(n)


# ---------------------------------------------------------------- compile time
def _prepare(n: Node, g: Graph, fw: Any, seed: int) -> None:
    """Quantizes W and R of all directions once into the plan (attributes ``qweight`` /
    ``qrecurrence``, or float32 ``fweight`` / ``frecurrence``); clears inputs 1 and 2."""
    from .. import compiler
    from ... import core

    def unsupported(what: str) -> "compiler.UnsupportedOpError":
        return compiler.UnsupportedOpError({f"{n.op} {what}": [n.name]})

    try:
        st = RnnSettings(n)
    except ValueError as e:
        raise unsupported(f"({e})") from None
    for i, what in ((1, "W"), (2, "R")):
        if len(n.inputs) <= i or n.inputs[i] not in g.consts:
            raise unsupported(f"with a non-constant weight {what}")
    for i, what in ((3, "bias B"), (4, "sequence_lens"), (7, "peephole P")):
        if len(n.inputs) > i and n.inputs[i] and n.inputs[i] not in g.consts:
            raise unsupported(f"with a non-constant {what}")
    W = np.asarray(g.consts[n.inputs[1]], np.float32)
    R = np.asarray(g.consts[n.inputs[2]], np.float32)
    D, G = st.directions, st.gates
    if W.ndim != 3 or W.shape[0] != D or W.shape[1] % G:
        raise unsupported(f"(W has shape {list(W.shape)}; [{D}, {G} * hidden, input] expected)")
    H = W.shape[1] // G
    if R.shape != (D, G * H, H):
        raise unsupported(f"(R has shape {list(R.shape)}; {[D, G * H, H]} expected)")
    hs = n.attrs.get("hidden_size")
    if hs is not None and int(hs) != H:
        raise unsupported(f"(hidden_size {hs} differs from the weights' {H})")
    if len(n.inputs) > 3 and n.inputs[3]:
        Bv = np.asarray(g.consts[n.inputs[3]])
        if Bv.size != D * 2 * G * H:
            raise unsupported(f"(B has {Bv.size} numbers; {D * 2 * G * H} expected)")
    if len(n.inputs) > 7 and n.inputs[7]:
        if n.op != "LSTM" or np.asarray(g.consts[n.inputs[7]]).size != D * 3 * H:
            raise unsupported(f"(P must hold {D * 3 * H} numbers)")
    n.attrs["hidden_size"] = H
    for key, arr, suffix in (("weight", W, "Wq"), ("recurrence", R, "Rq")):
        rows = arr.reshape(D * G * H, arr.shape[2])
        n.attrs[f"{key}_shape"] = [int(rows.shape[0]), int(rows.shape[1])]
        if fw.is_block:
            cw = core.quantize_conv_weight(rows.reshape(rows.shape + (1, 1)), fw, seed=seed)
            name = f"{n.name}/{suffix}"
            g.consts[name + ".codes"] = cw.tensor.elements
            g.consts[name + ".exps"] = cw.tensor.exponents
            n.attrs[f"q{key}"] = name
        else:
            name = f"{n.name}/{suffix[0]}f"
            g.consts[name] = np.ascontiguousarray(rows)
            n.attrs[f"f{key}"] = name
    old = n.inputs[1:3]
    n.inputs[1] = n.inputs[2] = ""
    if not n.outputs or not n.outputs[0]:  # a plan node needs its first output named
        n.outputs = [f"{n.name}/Y"] + list(n.outputs[1:])
    used = {i for m in g.nodes for i in m.inputs}
    for c in old:
        if c not in used:
            g.consts.pop(c, None)


# ---------------------------------------------------------------- plan-load checks
def _a_names(v: Any, where: str) -> None:
    need(isinstance(v, list) and len(v) <= 64 and all(isinstance(x, str) for x in v), where,
         f"must be a list of activation names, got {v!r}")


def _a_nums(v: Any, where: str) -> None:
    need(isinstance(v, list) and len(v) <= 64 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       for x in v), where, f"must be a list of numbers, got {v!r}")


def _check_recurrent(n: Node, where: str, consts: Dict[str, Any], fa: Any, fw: Any, opset: int) -> None:
    try:
        st = RnnSettings(n)
    except ValueError as e:
        need(False, f"{where}.attrs", str(e))
        raise
    a = n.attrs
    need(len(n.inputs) >= 3 and n.inputs[1] == "" and n.inputs[2] == "", f"{where}.inputs",
         "the weights are stored in the plan (attributes qweight / qrecurrence): inputs 1 and 2 must be empty")
    need("hidden_size" in a and isinstance(a["hidden_size"], int) and a["hidden_size"] >= 1, f"{where}.attrs",
         "needs an integer hidden_size >= 1")
    H, D, G = int(a["hidden_size"]), st.directions, st.gates
    for key in ("weight", "recurrence"):
        shape = a.get(f"{key}_shape")
        need(isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s >= 1 for s in shape),
             f"{where}.attrs", f"needs {key}_shape [rows, K]")
        assert isinstance(shape, list)  # need() raised otherwise
        need(shape[0] == D * G * H and (key == "weight" or shape[1] == H), f"{where}.attrs.{key}_shape",
             f"{shape} does not fit {D} direction(s) of {G} gates of {H}")
        q, f = f"q{key}" in a, f"f{key}" in a
        need(q != f, where, f"needs exactly one of q{key} (block format) and f{key} (fp32)")
        if q:
            need(fw.is_block, where, f"a quantized weight in a plan whose weight format is {fw}")
            code_dt = np.dtype(np.int8 if fw.kind == "int" else np.uint8)
            nb = -(-shape[1] // fw.block_size)
            for suffix, dt, shp in ((".codes", code_dt, (shape[0], shape[1], 1, 1)),
                                    (".exps", np.dtype(np.int16), (shape[0], nb, 1, 1))):
                cname = a[f"q{key}"] + suffix
                need(cname in consts, where, f"missing weight: constant {cname!r} is not in the plan")
                need(consts[cname][0] == dt and tuple(consts[cname][1]) == shp, where,
                     f"constant {cname!r} is {consts[cname][0]}{list(consts[cname][1])}, {dt}{list(shp)} expected")
        else:
            need(not fw.is_block, where, f"an fp32 weight in a plan whose weight format is {fw}")
            cname = a[f"f{key}"]
            need(cname in consts and consts[cname][0] == np.float32 and tuple(consts[cname][1]) == tuple(shape),
                 where, f"constant {cname!r} must be float32{shape}")
    for i, size, what in ((3, D * 2 * G * H, "B"), (7, D * 3 * H, "P")):
        if len(n.inputs) > i and n.inputs[i] in consts:
            need(prod(consts[n.inputs[i]][1]) == size, where, f"{what} must hold {size} numbers")


# ---------------------------------------------------------------- lowering
def _pack(cx: "Lowering", key: str, lo: int, hi: int) -> Any:
    """Rows [lo, hi) of the quantized weight ``key`` packed for the current kernel (once per
    plan and kernel)."""
    cache = cx.plan.__dict__.setdefault("_packed", {})
    ck = (key, lo, hi, _core.get_kernel())
    if ck not in cache:
        codes = np.ascontiguousarray(cx.const(key + ".codes")[lo:hi])
        exps = np.ascontiguousarray(cx.const(key + ".exps")[lo:hi])
        cache[ck] = _core.pack_operand(codes.view(np.int8), exps, fmt_params(cx.plan.weight_format), "convw", 1, 1)
    return cache[ck]


def _state(cx: "Lowering", n: Node, i: int, shape: Tuple[int, ...], what: str) -> Optional[Value]:
    if i >= len(n.inputs) or not n.inputs[i]:
        return None
    v = cx.get(n.inputs[i])
    if tuple(v.shape) != shape:
        raise cx.err(f"{what} has shape {list(v.shape)}, {list(shape)} expected")
    return cx.layout(v, ident(len(shape)))


@lowers("LSTM", "GRU", inputs=(3, 8), outputs=3, fold_constants=False, prepare=_prepare, check=_check_recurrent,
        attrs={"hidden_size": Attr.INT, "direction": Attr.STR, "layout": Attr.FLAG, "clip": Attr.NUM,
               "input_forget": Attr.FLAG, "linear_before_reset": Attr.FLAG, "activations": _a_names,
               "activation_alpha": _a_nums, "activation_beta": _a_nums, "qweight": Attr.STR, "fweight": Attr.STR,
               "qrecurrence": Attr.STR, "frecurrence": Attr.STR, "weight_shape": Attr.INTS,
               "recurrence_shape": Attr.INTS})
def _recurrent(cx: "Lowering", n: Node) -> None:
    try:
        st = RnnSettings(n)
    except ValueError as e:
        raise cx.err(str(e)) from None
    lstm = n.op == "LSTM"
    if not lstm and len(n.inputs) > 6:
        raise cx.err(f"GRU takes at most 6 inputs, got {len(n.inputs)}")
    x = cx.get(n.inputs[0])
    if len(x.shape) != 3:
        raise cx.err(f"X must have rank 3, got shape {list(x.shape)}")
    if st.layout:
        B, T, I = x.shape
    else:
        T, B, I = x.shape
    H, D, G = int(n.attrs["hidden_size"]), st.directions, st.gates
    GH = G * H
    rows, K = n.attrs["weight_shape"]
    if K != I:
        raise cx.err(f"X has {I} features, the weight W expects {K}")
    bias = cx.const_input(n, 3, "the bias B")
    if bias is not None:
        bias = np.asarray(bias, np.float32).reshape(D, 2 * GH)
    lens_c = cx.const_input(n, 4, "sequence_lens")
    lengths: List[int] = []
    if lens_c is not None:
        lens = np.asarray(lens_c).reshape(-1)
        if lens.size != B or np.any(lens < 0) or np.any(lens > T):
            raise cx.err(f"sequence_lens {lens.tolist()} must hold {B} lengths in [0, {T}]")
        lengths = [int(v) for v in lens]
    peep = cx.const_input(n, 7, "the peepholes P") if lstm else None
    if peep is not None:
        peep = np.asarray(peep, np.float32).reshape(D, 3 * H)
    sshape = (B, D, H) if st.layout else (D, B, H)
    h0 = _state(cx, n, 5, sshape, "initial_h")
    c0 = _state(cx, n, 6, sshape, "initial_c") if lstm else None

    # the input projection of every step and direction: one dense layer, Wb in its epilogue
    M = T * B
    xc = cx.layout(x, ident(3))
    xg = cx.new_value((M, D * GH))
    geom = _core.ConvGeometry(batch=M, channels=I, height=1, width=1, out_channels=D * GH, kernel_h=1, kernel_w=1,
                              stride_h=1, stride_w=1, dilation_h=1, dilation_w=1, groups=1, out_h=1, out_w=1)
    w, wf = None, -1
    if "qweight" in n.attrs:
        w = _pack(cx, n.attrs["qweight"], 0, D * GH)
    else:
        wf = cx.const_vid(np.asarray(cx.const(n.attrs["fweight"]), np.float32).T)  # [I][D * GH]
    bvid = cx.const_vid(bias[:, :GH].reshape(-1)) if bias is not None else -1
    if M > 0:
        cx.emit(_core.ConvParams(geometry=geom), [cx.alias_vid(xc.vid)], [xg.vid], label="dense", w=w, wf=wf,
                bias=bvid)

    # one recurrent op per direction, writing its slots of Y, Y_h, Y_c
    outs = list(n.outputs) + [""] * (3 - len(n.outputs))
    yshape = (B, T, D, H) if st.layout else (T, D, B, H)
    Y = cx.new_value(yshape) if outs[0] else None
    Yh = cx.new_value(sshape) if outs[1] else None
    Yc = cx.new_value(sshape) if lstm and outs[2] else None
    if not (Y or Yh or Yc):
        raise cx.err("no output is used")
    row = D * GH
    if st.layout:
        xg_step, xg_batch, y_step, y_batch, s_batch = row, T * row, D * H, T * D * H, D * H
    else:
        xg_step, xg_batch, y_step, y_batch, s_batch = B * row, row, D * B * H, H, H
    for d in range(D):
        p = _core.RecurrentParams(
            cell=_core.RnnCell.LSTM if lstm else _core.RnnCell.GRU, seq_len=T, batch=B, hidden=H,
            reverse=st.reverse[d], linear_before_reset=st.linear_before_reset, input_forget=st.input_forget,
            has_clip=st.clip is not None, clip=float(st.clip or 0.0), activations=[k for k, _, _ in st.acts[d]],
            alpha=[a for _, a, _ in st.acts[d]], beta=[b for _, _, b in st.acts[d]],
            recurrence_bias=[float(v) for v in bias[d, GH:]] if bias is not None else [],
            peephole=[float(v) for v in peep[d]] if peep is not None else [], lengths=lengths,
            xg_offset=d * GH, xg_step=xg_step, xg_batch=xg_batch,
            has_initial_h=h0 is not None, has_initial_c=c0 is not None, has_y=Y is not None,
            has_y_h=Yh is not None, has_y_c=Yc is not None,
            y_offset=d * H if st.layout else d * B * H, y_step=y_step, y_batch=y_batch,
            state_offset=d * H if st.layout else d * B * H, state_batch=s_batch)
        r0 = d * GH
        if "qrecurrence" in n.attrs:
            key = n.attrs["qrecurrence"]
            if lstm or st.linear_before_reset:
                p.recurrence = _pack(cx, key, r0, r0 + GH)
            else:  # the h rows multiply r * h: a product of their own
                p.recurrence = _pack(cx, key, r0, r0 + 2 * H)
                p.recurrence_h = _pack(cx, key, r0 + 2 * H, r0 + GH)
        else:
            Rf = np.asarray(cx.const(n.attrs["frecurrence"]), np.float32)[r0:r0 + GH]
            p.recurrence_f32 = np.ascontiguousarray(Rf.T).reshape(-1).tolist()  # [H][gates * H]
        ins = [xg.vid] + [v.vid for v in (h0, c0) if v is not None]
        cx.emit(p, ins, [v.vid for v in (Y, Yh, Yc) if v is not None], label=n.op.lower())
    for name, v in zip(outs, (Y, Yh, Yc)):
        if name and v is not None:
            cx.set(name, v)
