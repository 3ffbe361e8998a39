"""Lowering: a plan + concrete input shapes -> one C++ ``Program``.

Done once per input signature (``Session`` caches it), never per inference.  It decides:

* **shapes**: every value's logical (ONNX) shape; shape subgraphs (Shape, Gather, Concat, ...)
  are evaluated here with numpy, so they cost nothing at run time;
* **layouts**: each value has a *physical permutation* ``perm`` (physical axis ``i`` holds
  logical axis ``perm[i]``).  Convolutions and pools want channels-last, so their outputs are
  NHWC under an NCHW logical shape; ``Transpose`` only changes ``perm`` (no copy), and the
  transpose pairs tf2onnx puts around every NHWC op disappear.  A real copy is emitted only
  where an op needs a layout its input does not have (e.g. a ``Reshape`` of channels-last data
  with H, W > 1);
* **fusion**: a convolution's bias (always), a following residual ``Add`` and ``Relu``/``Clip``
  run in its epilogue; each still rounds to the vector precision as the separate ops would;
* **buffers**: temporaries are reused once dead (greedy best fit), inputs and outputs own
  theirs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import _core  # type: ignore[attr-defined]
from .graph import Graph, Node, broadcast_shape
from .plan import Plan

__all__ = ["Lowered", "lower", "LoweringError", "op_kind_name"]

# C++ op kinds (runtime.h)
K_CONV, K_BINARY, K_UNARY, K_AFFINE, K_POOL, K_REDUCE, K_SOFTMAX, K_CONCAT, K_STRIDED, K_PAD, K_COPY = range(11)
_BINARY = {"Add": 0, "Sub": 1, "Mul": 2, "Div": 3, "Max": 4, "Min": 5, "Pow": 6}
_UNARY = {"Relu": 0, "Clip": 1, "Sqrt": 2, "Reciprocal": 3, "Exp": 4, "Sigmoid": 5, "Tanh": 6, "Neg": 7, "Abs": 8,
          "LeakyRelu": 9, "Identity": 10, "Log": 11, "Erf": 12, "HardSigmoid": 13, "HardSwish": 14, "Floor": 17,
          "Ceil": 18}
_REDUCE = {"ReduceSum": 0, "ReduceMean": 1, "ReduceMax": 2, "ReduceMin": 3, "ReduceSumSquare": 4, "ReduceL2": 5}
_VP = {"fp32": 0, "fp16": 1, "bf16": 2}
_POOL_NAMES = {0: "max pool", 1: "average pool"}


def op_kind_name(kind: int, sub: int = 0, op_type: str = "") -> str:
    """A readable name of a lowered op's kind, for profiles: ``conv``, ``dense`` (a ``Gemm`` /
    ``MatMul`` on the BFP core), ``depthwise conv``, the binary/unary op (``add``, ``mul``,
    ``relu``, ``sigmoid``...), ``batchnorm``, ``max pool`` / ``average pool``, ``reduce mean``...,
    ``softmax``, ``concat``, ``transpose`` (a layout copy), ``slice``, ``pad``, ``copy``.

    Example:
        >>> op_kind_name(K_BINARY, 2), op_kind_name(K_CONV, 0, "BfpDense")
        ('mul', 'dense')
    """
    if kind == K_CONV:
        if sub == 1:
            return "depthwise conv"
        return "dense" if op_type == "BfpDense" else "conv"
    if kind == K_BINARY:
        return _NAMES_BINARY.get(sub, "binary")
    if kind == K_UNARY:
        return _NAMES_UNARY.get(sub, "unary")
    if kind == K_AFFINE:
        return "batchnorm"
    if kind == K_POOL:
        return _POOL_NAMES.get(sub, "pool")
    if kind == K_REDUCE:
        return _NAMES_REDUCE.get(sub, "reduce")
    if kind == K_SOFTMAX:
        return "log softmax" if sub else "softmax"
    if kind == K_CONCAT:
        return "concat"
    if kind == K_STRIDED:
        return "slice" if op_type in ("Slice", "Split") else "transpose"
    if kind == K_PAD:
        return "pad"
    if kind == K_COPY:
        return "copy"
    return f"kind {kind}"


_NAMES_BINARY = {v: k.lower() for k, v in _BINARY.items()}
_NAMES_UNARY = {v: k.lower() for k, v in _UNARY.items()}
_NAMES_REDUCE = {v: ("reduce " + k[len("Reduce"):]).lower() for k, v in _REDUCE.items()}


class LoweringError(ValueError):
    """The graph cannot run with these input shapes (the message names the node)."""


class _V:
    """A runtime value: logical shape, physical permutation and its (virtual) buffer."""

    __slots__ = ("shape", "perm", "vid")

    def __init__(self, shape: Sequence[int], perm: Sequence[int], vid: int):
        self.shape = tuple(int(s) for s in shape)
        self.perm = tuple(int(p) for p in perm)
        self.vid = vid

    @property
    def phys(self) -> Tuple[int, ...]:
        return tuple(self.shape[p] for p in self.perm)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _ident(r: int) -> Tuple[int, ...]:
    return tuple(range(r))


def _compatible(shape: Sequence[int], perm: Sequence[int], want: Sequence[int]) -> bool:
    """True when data laid out by ``perm`` is already laid out by ``want`` (size-1 axes aside)."""
    a = [p for p in perm if shape[p] != 1]
    b = [p for p in want if shape[p] != 1]
    return a == b


def _strides(phys: Sequence[int]) -> List[int]:
    s = [1] * len(phys)
    for i in range(len(phys) - 2, -1, -1):
        s[i] = s[i + 1] * int(phys[i + 1])
    return s


class Lowered:
    """A program for one input signature, with the map from names to buffers."""

    def __init__(self, program: Any, inputs: Dict[str, Tuple[int, Tuple[int, ...]]],
                 outputs: Dict[str, Tuple[Optional[int], Tuple[int, ...], Optional[np.ndarray]]],
                 op_names: List[str], op_kinds: Optional[List[str]] = None):
        self.program = program
        self.inputs = inputs      # name -> (buffer, shape)
        self.outputs = outputs    # name -> (buffer or None, shape, constant value or None)
        self.op_names = op_names
        #: each op's kind (``op_kind_name``): a fused conv + add + relu counts as its conv
        self.op_kinds = list(op_kinds) if op_kinds is not None else [""] * len(op_names)

    def run(self, feeds: Dict[str, np.ndarray], names: Sequence[str]) -> Dict[str, np.ndarray]:
        ins = [(self.inputs[k][0], np.ascontiguousarray(v, dtype=np.float32).reshape(-1)) for k, v in feeds.items()]
        bufs = [self.outputs[n][0] for n in names if self.outputs[n][0] is not None]
        res = self.program.run(ins, bufs)
        out: Dict[str, np.ndarray] = {}
        it = iter(res)
        for n in names:
            b, shape, const = self.outputs[n]
            out[n] = np.array(const, copy=True) if b is None else next(it).reshape(shape)
        return out


class _Lowerer:
    def __init__(self, plan: Plan, shapes: Dict[str, Tuple[int, ...]]):
        self.plan = plan
        self.g: Graph = plan.graph
        self.shapes = shapes
        self.vals: Dict[str, _V] = {}
        self.cv: Dict[str, np.ndarray] = {k: v for k, v in self.g.consts.items()}
        self.ops: List[Dict[str, Any]] = []
        self.vsize: List[int] = []       # virtual buffer sizes (floats)
        self.vroot: List[int] = []       # alias -> root
        self.vconst: Dict[int, np.ndarray] = {}
        self.vinput: set = set()
        self.node: Optional[Node] = None
        self._final_roots: set = set()

    # ------------------------------------------------------------ buffers
    def new_vid(self, n: int) -> int:
        self.vsize.append(int(n))
        self.vroot.append(len(self.vroot))
        return len(self.vroot) - 1

    def alias_vid(self, vid: int) -> int:
        self.vsize.append(self.vsize[vid])
        self.vroot.append(self.vroot[vid])
        return len(self.vroot) - 1

    def const_vid(self, arr: np.ndarray) -> int:
        a = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
        vid = self.new_vid(max(a.size, 1))
        self.vconst[vid] = a
        return vid

    def emit(self, kind: int, ins: List[int], outs: List[int], ip: Sequence[int] = (), fp: Sequence[float] = (),
             sub: int = 0, label: Optional[str] = None, **kw: Any) -> None:  # kw: w, wf, bias, res, act
        op = dict(kind=kind, sub=sub, ins=list(ins), outs=list(outs), ip=[int(v) for v in ip],
                  fp=[float(v) for v in fp], name=self.node.name if self.node else "", w=None, wf=-1, bias=-1,
                  res=-1, act=0)
        op["label"] = label or op_kind_name(kind, sub, self.node.op if self.node else "")
        op.update(kw)
        self.ops.append(op)

    def err(self, msg: str) -> LoweringError:
        n = self.node
        where = f"node {n.name!r} ({n.op})" if n else "graph"
        return LoweringError(f"{where}: {msg}")

    # ------------------------------------------------------------ values
    def get(self, name: str) -> _V:
        if name in self.vals:
            return self.vals[name]
        if name in self.cv:
            arr = np.asarray(self.cv[name])
            if arr.dtype.kind not in "fiub":
                raise self.err(f"constant {name!r} of dtype {arr.dtype} used as a tensor")
            v = _V(arr.shape, _ident(arr.ndim), self.const_vid(arr.astype(np.float32)))
            self.vals[name] = v
            return v
        raise self.err(f"value {name!r} is not computed by any node")

    def is_const(self, name: str) -> bool:
        return name in self.cv

    def new_value(self, shape: Sequence[int], perm: Optional[Sequence[int]] = None) -> _V:
        shape = tuple(int(s) for s in shape)
        return _V(shape, perm if perm is not None else _ident(len(shape)), self.new_vid(max(int(np.prod(shape)), 1)))

    def layout(self, v: _V, want: Sequence[int]) -> _V:
        """v with physical permutation ``want`` (an alias when compatible, else a copy)."""
        want = tuple(want)
        if v.perm == want:
            return v
        if _compatible(v.shape, v.perm, want):
            return _V(v.shape, want, self.alias_vid(v.vid))
        out = self.new_value(v.shape, want)
        in_str = _strides(v.phys)
        pos = {a: i for i, a in enumerate(v.perm)}
        strides = [in_str[pos[a]] for a in want]
        self.emit(K_STRIDED, [v.vid], [out.vid], [len(want), 0, *out.phys, *strides], label="transpose")
        return out

    # ------------------------------------------------------------ main
    def run(self) -> Lowered:
        g = self.g
        for vi in g.inputs:
            shp = self.shapes[vi.name]
            v = self.new_value(shp)
            self.vinput.add(v.vid)
            self.vals[vi.name] = v
        for n in g.nodes:
            self.node = n
            try:
                if all((i == "" or i in self.cv) for i in n.inputs) and n.op not in ("Conv", "BfpDense") \
                        and n.op != "Shape":
                    self.fold(n)
                    continue
                fn = getattr(self, "op_" + n.op, None)
                if fn is None:
                    raise self.err(f"op {n.op} is not supported on a computed (non-constant) input")
                fn(n)
            except LoweringError:
                raise
            except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError, AttributeError,
                    OverflowError) as e:  # a node the plan's checks let through but these shapes do not fit
                raise self.err(f"cannot lower it for these input shapes ({type(e).__name__}: {e})") from e
        self.node = None
        outputs: Dict[str, Tuple[Optional[int], Tuple[int, ...], Optional[np.ndarray]]] = {}
        out_vids: List[int] = []
        for vo in g.outputs:
            name = vo.name
            if name in self.cv and name not in self.vals:
                outputs[name] = (None, tuple(np.asarray(self.cv[name]).shape), np.asarray(self.cv[name]))
                continue
            v = self.get(name)
            if v.perm != _ident(len(v.shape)) and not _compatible(v.shape, v.perm, _ident(len(v.shape))):
                v = self.layout(v, _ident(len(v.shape)))
            root = self.vroot[v.vid]
            if root in self.vinput or root in self.vconst or root in [self.vroot[o] for o in out_vids] \
                    or self.vsize[root] != v.size:
                out = self.new_value(v.shape)
                self.emit(K_COPY, [v.vid], [out.vid], [v.size])
                v = out
            out_vids.append(v.vid)
            outputs[name] = (v.vid, v.shape, None)
        # a graph output's buffer must stay where the output is read: never fused away
        self._final_roots = {self.vroot[self.vals[vo.name].vid] for vo in g.outputs if vo.name in self.vals}
        self.fuse()
        return self.build(outputs, out_vids)

    # ------------------------------------------------------------ fusion
    def fuse(self) -> None:
        ops = self.ops
        readers: Dict[int, List[int]] = {}

        def index() -> None:
            readers.clear()
            for i, op in enumerate(ops):
                for v in op["ins"] + ([op["res"]] if op["res"] >= 0 else []):
                    readers.setdefault(self.vroot[v], []).append(i)

        index()
        i = 0
        while i < len(ops):
            op = ops[i]
            if op["kind"] != K_CONV or op.get("nofuse"):
                i += 1
                continue
            root = self.vroot[op["outs"][0]]
            if root in self._final_roots:
                i += 1
                continue
            rd = readers.get(root, [])
            if len(rd) != 1:
                i += 1
                continue
            j = rd[0]
            nxt = ops[j]
            fused = False
            if nxt["kind"] == K_BINARY and nxt["sub"] == 0 and op["res"] < 0 and op["act"] == 0:
                rank = nxt["ip"][0]
                sa, sb = nxt["ip"][1 + rank:1 + 2 * rank], nxt["ip"][1 + 2 * rank:]
                full = _strides(nxt["ip"][1:1 + rank])
                roots_in = [self.vroot[v] for v in nxt["ins"]]
                if list(sa) == full and list(sb) == full and roots_in.count(root) == 1:
                    other = nxt["ins"][1 - roots_in.index(root)]
                    op["res"] = other
                    fused = True
            elif nxt["kind"] == K_UNARY and nxt["sub"] in (0, 1) and op["act"] == 0:
                op["act"] = 1 if nxt["sub"] == 0 else 2
                if nxt["sub"] == 1:
                    op["fp"] = list(nxt["fp"])
                fused = True
            if not fused:
                i += 1
                continue
            op["outs"] = nxt["outs"]
            op["name"] = op["name"] + "+" + nxt["name"]
            ops[j] = op
            del ops[i]
            index()
            # stay on the same conv (now at j-1) to try fusing the next op too
            i = 0
        self.ops = ops

    # ------------------------------------------------------------ build
    def build(self, outputs: Dict[str, Any], out_vids: List[int]) -> Lowered:
        vp = _VP[self.plan.vector_precision]
        f = self.plan.format
        prog = _core.Program(vp, f.kernel_params() if f.is_block else None, self.plan.seed)
        last: Dict[int, int] = {}
        for i, op in enumerate(self.ops):
            for v in op["ins"] + ([op["res"]] if op["res"] >= 0 else []) + [x for x in (op["bias"], op["wf"]) if x >= 0]:
                last[self.vroot[v]] = i
        keep = set(self.vinput) | set(self.vconst) | {self.vroot[v] for v in out_vids}
        cpp: Dict[int, int] = {}
        free: List[Tuple[int, int]] = []  # (size, cpp id)
        dying: Dict[int, List[int]] = {}
        for root, i in last.items():
            if root not in keep:
                dying.setdefault(i, []).append(root)

        def materialize(root: int) -> int:
            if root in cpp:
                return cpp[root]
            if root in self.vconst:
                cpp[root] = prog.add_const(self.vconst[root])
            elif root in keep:
                cpp[root] = prog.add_buffer(self.vsize[root])
            else:
                need = self.vsize[root]
                best = None
                for k, (sz, cid) in enumerate(free):
                    if sz >= need and (best is None or sz < free[best][0]):
                        best = k
                if best is not None:
                    cpp[root] = prog.alias(free.pop(best)[1])
                else:
                    cpp[root] = prog.add_buffer(need)
            return cpp[root]

        def cid(v: int) -> int:
            return materialize(self.vroot[v]) if v >= 0 else -1

        for vid in self.vinput:
            materialize(vid)
        names, kinds = [], []
        for i, op in enumerate(self.ops):
            ins = [cid(v) for v in op["ins"]]
            res, bias, wf = cid(op["res"]), cid(op["bias"]), cid(op["wf"])
            outs = [cid(v) for v in op["outs"]]
            prog.add_op(op["kind"], op["sub"], ins, outs, op["ip"], op["fp"], op["w"], wf, bias, res, op["act"],
                        op["name"])
            names.append(op["name"])
            kinds.append(op["label"])
            for root in dying.get(i, []):
                if root in cpp:
                    free.append((self.vsize[root], cpp[root]))
        inputs = {vi.name: (cpp[self.vroot[self.vals[vi.name].vid]], tuple(self.shapes[vi.name])) for vi in self.g.inputs}
        outs2 = {}
        for name, (vid, shape, const) in outputs.items():
            outs2[name] = (None if vid is None else cid(vid), shape, const)
        return Lowered(prog, inputs, outs2, names, kinds)

    # ------------------------------------------------------------ constant folding
    def fold(self, n: Node) -> None:
        from .fold import fold_node

        try:
            res = fold_node(n, [self.cv[i] if i else None for i in n.inputs], self.g.opset)
        except NotImplementedError as e:
            raise self.err(f"cannot evaluate on constants: {e}") from None
        for name, val in zip(n.outputs, res):
            if name:
                self.cv[name] = val

    def const_input(self, n: Node, i: int, what: str) -> Optional[np.ndarray]:
        if i >= len(n.inputs) or not n.inputs[i]:
            return None
        if n.inputs[i] not in self.cv:
            raise self.err(f"{what} must be a constant (it is computed at run time)")
        return np.asarray(self.cv[n.inputs[i]])

    # ------------------------------------------------------------ ops
    def op_Shape(self, n: Node) -> None:
        shape = np.asarray(self.cv[n.inputs[0]]).shape if n.inputs[0] in self.cv else self.get(n.inputs[0]).shape
        arr = np.asarray(shape, np.int64)
        start, end = n.attrs.get("start"), n.attrs.get("end")
        if start is not None or end is not None:
            arr = arr[start:end]
        self.cv[n.outputs[0]] = arr

    def op_Size(self, n: Node) -> None:
        self.cv[n.outputs[0]] = np.asarray(self.get(n.inputs[0]).size, np.int64)

    def _conv_common(self, n: Node, x: _V, O: int, kh: int, kw: int, groups: int, strides: Sequence[int],
                     pads: Sequence[int], dil: Sequence[int]) -> _V:
        N, C, H, W = x.shape
        sh, sw = strides
        dh, dw = dil
        pt, pl, pb, pr = pads
        OH = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1
        OW = (W + pl + pr - dw * (kw - 1) - 1) // sw + 1
        if OH < 1 or OW < 1:
            raise self.err(f"the output would be empty (input {H}x{W}, kernel {kh}x{kw})")
        xn = self.layout(x, (0, 2, 3, 1))
        out = self.new_value((N, O, OH, OW), (0, 2, 3, 1))
        Wshape = n.attrs["weight_shape"]
        if Wshape[1] * groups != C:
            raise self.err(f"input has {C} channels, the weight expects {Wshape[1] * groups}")
        kw_: Dict[str, Any] = {}
        if groups == C and Wshape[1] == 1 and O == C:  # depthwise: one-element blocks, see runtime.cpp
            kw_["wf"] = self.const_vid(self.depthwise_weights(n, O, kh, kw))
            kw_["sub"] = 1
            quant = 1 if "qweight" in n.attrs else 0
            if len(n.inputs) > 2 and n.inputs[2]:
                kw_["bias"] = self.const_vid(self.bias(n, O))
            ip = [N, H, W, C, O, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, groups, OH, OW, quant]
            self.emit(K_CONV, [xn.vid], [out.vid], ip, **kw_)
            return out
        if "qweight" in n.attrs:
            kw_["w"] = self.packed(n, groups, kh * kw)
        else:
            Wf = np.asarray(self.cv[n.attrs["fweight"]], np.float32)
            G, Og, Cg = groups, O // groups, Wshape[1]
            Wt = Wf.reshape(G, Og, Cg, kh, kw).transpose(0, 3, 4, 2, 1).reshape(-1)
            kw_["wf"] = self.const_vid(Wt)
        if len(n.inputs) > 2 and n.inputs[2]:
            kw_["bias"] = self.const_vid(self.bias(n, O))
        ip = [N, H, W, C, O, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, groups, OH, OW]
        self.emit(K_CONV, [xn.vid], [out.vid], ip, **kw_)
        return out

    def bias(self, n: Node, O: int) -> np.ndarray:
        """The bias of a matrix op: a constant of ``O`` numbers."""
        b = np.asarray(self.const_input(n, 2, "the bias"), np.float32).reshape(-1)
        if b.size != O:
            raise self.err(f"the bias has {b.size} numbers for {O} output channels")
        return b

    def depthwise_weights(self, n: Node, O: int, kh: int, kw: int) -> np.ndarray:
        """[taps][O] float weights: the dequantized BFP weights (one-element blocks) or fp32."""
        if "qweight" in n.attrs:
            from ..core import BfpTensor

            codes = np.asarray(self.cv[n.attrs["qweight"] + ".codes"])
            exps = np.asarray(self.cv[n.attrs["qweight"] + ".exps"])
            W = BfpTensor(self.plan.weight_format, 1, codes, exps).dequantize()
        else:
            W = np.asarray(self.cv[n.attrs["fweight"]], np.float32)
        return np.ascontiguousarray(W.reshape(O, kh * kw).T)

    def packed(self, n: Node, groups: int, taps: int) -> Any:
        cache = self.plan.__dict__.setdefault("_packed", {})
        key = (n.attrs["qweight"], _core.get_kernel())
        if key not in cache:
            codes = np.asarray(self.cv[n.attrs["qweight"] + ".codes"])
            exps = np.asarray(self.cv[n.attrs["qweight"] + ".exps"])
            cache[key] = _core.pack_operand(codes.view(np.int8), exps, self.plan.weight_format.kernel_params(),
                                            "convw", taps, groups)
        return cache[key]

    def op_Conv(self, n: Node) -> None:
        x = self.get(n.inputs[0])
        if len(x.shape) != 4:
            raise self.err(f"only 2-D convolution (NCHW input) is supported, got rank {len(x.shape)}")
        O, Cg, kh, kw = n.attrs["weight_shape"]
        groups = int(n.attrs.get("group", 1))
        strides = [int(s) for s in n.attrs.get("strides", [1, 1])]
        dil = [int(s) for s in n.attrs.get("dilations", [1, 1])]
        pads = self._pads(n, x.shape[2:], (kh, kw), strides, dil)
        self.vals[n.outputs[0]] = self._conv_common(n, x, O, kh, kw, groups, strides, pads, dil)

    def _pads(self, n: Node, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
              dil: Sequence[int]) -> List[int]:
        auto = n.attrs.get("auto_pad", "NOTSET")
        if auto in ("NOTSET", "", None):
            p = [int(v) for v in n.attrs.get("pads", [0, 0, 0, 0])]
            return [p[0], p[1], p[2], p[3]]
        if auto == "VALID":
            return [0, 0, 0, 0]
        begin, end = [], []
        for d in range(2):
            out = -(-spatial[d] // strides[d])
            total = max(0, (out - 1) * strides[d] + dil[d] * (kernel[d] - 1) + 1 - spatial[d])
            small, big = total // 2, total - total // 2
            if auto == "SAME_UPPER":
                begin.append(small)
                end.append(big)
            else:
                begin.append(big)
                end.append(small)
        return [begin[0], begin[1], end[0], end[1]]

    def op_BfpDense(self, n: Node) -> None:
        x = self.get(n.inputs[0])
        O, K = n.attrs["weight_shape"][:2]
        if x.shape[-1] != K:
            raise self.err(f"input's last dimension is {x.shape[-1]}, the weight expects {K}")
        xc = self.layout(x, _ident(len(x.shape)))
        M = int(np.prod(x.shape[:-1], dtype=np.int64))
        x4 = _V((M, K, 1, 1), (0, 2, 3, 1), self.alias_vid(xc.vid))
        y4 = self._conv_common(n, x4, O, 1, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))
        self.vals[n.outputs[0]] = _V(tuple(x.shape[:-1]) + (O,), _ident(len(x.shape)), self.alias_vid(y4.vid))

    def op_BatchNormalization(self, n: Node) -> None:
        x = self.get(n.inputs[0])
        gamma, beta, mean, var = (np.asarray(self.const_input(n, i, "batch-norm parameters"), np.float64)
                                  for i in range(1, 5))
        eps = float(n.attrs.get("epsilon", 1e-5))
        s = (gamma / np.sqrt(var + eps)).astype(np.float32)
        t = (beta - mean * (gamma / np.sqrt(var + eps))).astype(np.float32)
        self._affine(x, 1, s, t, n.outputs[0])

    def _affine(self, x: _V, axis: int, s: np.ndarray, t: np.ndarray, out_name: str) -> None:
        pc = x.perm.index(axis)
        ph = x.phys
        outer, C, inner = int(np.prod(ph[:pc])), ph[pc], int(np.prod(ph[pc + 1:]))
        if s.size != C or t.size != C:
            raise self.err(f"{s.size} scales / {t.size} shifts for {C} channels")
        out = self.new_value(x.shape, x.perm)
        self.emit(K_AFFINE, [x.vid], [out.vid], [outer, C, inner], list(s) + list(t))
        self.vals[out_name] = out

    def _unary(self, n: Node, sub: int, fp: Sequence[float] = ()) -> None:
        x = self.get(n.inputs[0])
        out = self.new_value(x.shape, x.perm)
        self.emit(K_UNARY, [x.vid], [out.vid], [x.size], fp, sub=sub)
        self.vals[n.outputs[0]] = out

    def op_Relu(self, n: Node) -> None:
        self._unary(n, _UNARY["Relu"])

    def op_Clip(self, n: Node) -> None:
        lo = self.const_input(n, 1, "Clip min")
        hi = self.const_input(n, 2, "Clip max")
        lo_v = float(lo) if lo is not None else float(n.attrs.get("min", -np.inf))
        hi_v = float(hi) if hi is not None else float(n.attrs.get("max", np.inf))
        self._unary(n, _UNARY["Clip"], [lo_v, hi_v])

    def op_LeakyRelu(self, n: Node) -> None:
        self._unary(n, _UNARY["LeakyRelu"], [float(n.attrs.get("alpha", 0.01))])

    def op_HardSigmoid(self, n: Node) -> None:
        self._unary(n, _UNARY["HardSigmoid"], [float(n.attrs.get("alpha", 0.2)), float(n.attrs.get("beta", 0.5))])

    def _simple_unary(self, n: Node) -> None:
        self._unary(n, _UNARY[n.op])

    op_Sqrt = op_Reciprocal = op_Exp = op_Sigmoid = op_Tanh = op_Neg = op_Abs = op_Log = op_Erf = _simple_unary
    op_HardSwish = op_Floor = op_Ceil = _simple_unary

    def op_Identity(self, n: Node) -> None:
        self.vals[n.outputs[0]] = self.get(n.inputs[0])

    op_Dropout = op_Identity

    def op_Cast(self, n: Node) -> None:
        to = int(n.attrs.get("to", 1))
        if to not in (1, 10, 11, 16):
            raise self.err("casting a computed tensor to a non-float type is not supported")
        self.vals[n.outputs[0]] = self.get(n.inputs[0])

    def _binary(self, n: Node, op: str, a_name: str, b_name: str, out_name: str) -> None:
        sub = _BINARY[op]
        names = [a_name, b_name]
        shapes = [np.asarray(self.cv[x]).shape if x in self.cv else self.get(x).shape for x in names]
        try:
            oshape = broadcast_shape(shapes[0], shapes[1])
        except ValueError:
            raise self.err(f"shapes {shapes[0]} and {shapes[1]} do not broadcast") from None
        r = len(oshape)
        live = [self.get(x) for x in names if x not in self.cv]
        full = [v for v in live if len(v.shape) == r]
        perm = full[0].perm if full else _ident(r)
        if any(len(v.shape) != r for v in live):
            perm = _ident(r)
        ophys = [oshape[p] for p in perm]
        vids, strides = [], []
        for x, shp in zip(names, shapes):
            s_full = (1,) * (r - len(shp)) + tuple(shp)
            if x in self.cv:
                arr = np.asarray(self.cv[x], np.float32).reshape(s_full).transpose(perm)
                vid = self.const_vid(np.ascontiguousarray(arr))
                ph = arr.shape
            else:
                v = self.get(x)
                if len(v.shape) == r:
                    v = self.layout(v, perm)
                    ph = v.phys
                else:
                    v = self.layout(v, _ident(len(v.shape)))
                    ph = s_full
                vid = v.vid
            st = _strides(ph)
            strides.append([0 if ph[i] == 1 and ophys[i] != 1 else st[i] for i in range(r)])
            vids.append(vid)
        out = self.new_value(oshape, perm)
        if r == 0:
            ophys, strides = [1], [[0], [0]]
            r = 1
        self.emit(K_BINARY, vids, [out.vid], [r, *ophys, *strides[0], *strides[1]], sub=sub)
        self.vals[out_name] = out

    def _binop(self, n: Node) -> None:
        self._binary(n, n.op, n.inputs[0], n.inputs[1], n.outputs[0])

    op_Add = op_Sub = op_Mul = op_Div = op_Max = op_Min = op_Pow = _binop

    def op_Sum(self, n: Node) -> None:
        cur = n.inputs[0]
        for k, nxt in enumerate(n.inputs[1:]):
            out = n.outputs[0] if k == len(n.inputs) - 2 else f"{n.outputs[0]}/sum{k}"
            self._binary(n, "Add", cur, nxt, out)
            cur = out
        if len(n.inputs) == 1:
            self.vals[n.outputs[0]] = self.get(cur)

    def _pool(self, n: Node, kind: int) -> None:
        x = self.get(n.inputs[0])
        if len(x.shape) != 4:
            raise self.err(f"only 2-D pooling (NCHW input) is supported, got rank {len(x.shape)}")
        N, C, H, W = x.shape
        kh, kw = [int(k) for k in n.attrs["kernel_shape"]]
        sh, sw = [int(s) for s in n.attrs.get("strides", [1, 1])]
        dh, dw = [int(s) for s in n.attrs.get("dilations", [1, 1])]
        pt, pl, pb, pr = self._pads(n, (H, W), (kh, kw), (sh, sw), (dh, dw))
        ceil = int(n.attrs.get("ceil_mode", 0))

        def osz(i: int, k: int, s: int, d: int, p0: int, p1: int) -> int:
            span = i + p0 + p1 - d * (k - 1) - 1
            o = (-(-span // s) if ceil else span // s) + 1
            if ceil and (o - 1) * s >= i + p0:
                o -= 1
            return o

        OH, OW = osz(H, kh, sh, dh, pt, pb), osz(W, kw, sw, dw, pl, pr)
        if OH < 1 or OW < 1:
            raise self.err("the pooled output would be empty")
        xn = self.layout(x, (0, 2, 3, 1))
        out = self.new_value((N, C, OH, OW), (0, 2, 3, 1))
        cip = int(n.attrs.get("count_include_pad", 0))
        self.emit(K_POOL, [xn.vid], [out.vid], [N, H, W, C, kh, kw, sh, sw, pt, pl, pb, pr, OH, OW, cip, dh, dw],
                  sub=kind)
        self.vals[n.outputs[0]] = out

    def op_MaxPool(self, n: Node) -> None:
        if len([o for o in n.outputs if o]) > 1:
            raise self.err("MaxPool's Indices output is not supported")
        self._pool(n, 0)

    def op_AveragePool(self, n: Node) -> None:
        self._pool(n, 1)

    def _reduce(self, x: _V, axes: Sequence[int], keep: bool, sub: int, out_name: str) -> None:
        r = len(x.shape)
        axes = sorted({a % r for a in axes}) if axes else list(range(r))
        pos = sorted(x.perm.index(a) for a in axes)
        if pos != list(range(pos[0], pos[0] + len(pos))):
            x = self.layout(x, _ident(r))
            pos = sorted(axes)
            if pos != list(range(pos[0], pos[0] + len(pos))):
                raise self.err(f"reducing over non-adjacent axes {axes} is not supported")
        ph = x.phys
        outer = int(np.prod(ph[:pos[0]]))
        R = int(np.prod([ph[p] for p in pos]))
        inner = int(np.prod(ph[pos[-1] + 1:]))
        if keep:
            shape = tuple(1 if a in axes else s for a, s in enumerate(x.shape))
            perm = x.perm
        else:
            shape = tuple(s for a, s in enumerate(x.shape) if a not in axes)
            remaining = [p for p in x.perm if p not in axes]
            ren = {a: i for i, a in enumerate(sorted(remaining))}
            perm = tuple(ren[p] for p in remaining)
        out = self.new_value(shape, perm)
        self.emit(K_REDUCE, [x.vid], [out.vid], [outer, R, inner], sub=sub)
        self.vals[out_name] = out

    def op_GlobalAveragePool(self, n: Node) -> None:
        x = self.get(n.inputs[0])
        self._reduce(x, list(range(2, len(x.shape))), True, _REDUCE["ReduceMean"], n.outputs[0])

    def op_GlobalMaxPool(self, n: Node) -> None:
        x = self.get(n.inputs[0])
        self._reduce(x, list(range(2, len(x.shape))), True, _REDUCE["ReduceMax"], n.outputs[0])

    def _reduce_op(self, n: Node) -> None:
        x = self.get(n.inputs[0])
        axes = n.attrs.get("axes")
        if axes is None and len(n.inputs) > 1 and n.inputs[1]:
            axes = [int(a) for a in np.asarray(self.const_input(n, 1, "axes")).reshape(-1)]
        if not axes and int(n.attrs.get("noop_with_empty_axes", 0)):
            self.vals[n.outputs[0]] = x
            return
        self._reduce(x, [int(a) for a in axes] if axes else [], bool(int(n.attrs.get("keepdims", 1))),
                     _REDUCE[n.op], n.outputs[0])

    op_ReduceMean = op_ReduceSum = op_ReduceMax = op_ReduceMin = op_ReduceSumSquare = op_ReduceL2 = _reduce_op

    def _softmax(self, n: Node, log: int) -> None:
        x = self.get(n.inputs[0])
        r = len(x.shape)
        if self.g.opset >= 13:
            a = int(n.attrs.get("axis", -1)) % r
            pa = x.perm.index(a)
            ph = x.phys
            outer, L, inner = int(np.prod(ph[:pa])), ph[pa], int(np.prod(ph[pa + 1:]))
        else:
            a = int(n.attrs.get("axis", 1)) % r
            x = self.layout(x, _ident(r))
            outer, L, inner = int(np.prod(x.shape[:a])), int(np.prod(x.shape[a:])), 1
        out = self.new_value(x.shape, x.perm)
        self.emit(K_SOFTMAX, [x.vid], [out.vid], [outer, L, inner], sub=log)
        self.vals[n.outputs[0]] = out

    def op_Softmax(self, n: Node) -> None:
        self._softmax(n, 0)

    def op_LogSoftmax(self, n: Node) -> None:
        self._softmax(n, 1)

    def op_Concat(self, n: Node) -> None:
        names = [i for i in n.inputs if i]
        live = [self.get(i) for i in names if i not in self.cv]
        r = len(live[0].shape)
        axis = int(n.attrs["axis"]) % r
        perm = live[0].perm
        vs: List[_V] = []
        for i in names:
            if i in self.cv:
                arr = np.asarray(self.cv[i], np.float32)
                if arr.size == 0:
                    continue
                vs.append(_V(arr.shape, perm, self.const_vid(np.ascontiguousarray(arr.transpose(perm)))))
            else:
                vs.append(self.layout(self.get(i), perm))
        base = list(vs[0].shape)
        for v in vs:
            if len(v.shape) != r or any(v.shape[d] != base[d] for d in range(r) if d != axis):
                raise self.err(f"inputs of shapes {[v.shape for v in vs]} cannot be concatenated on axis {axis}")
        shape = list(base)
        shape[axis] = sum(v.shape[axis] for v in vs)
        out = self.new_value(shape, perm)
        pa = perm.index(axis)
        ph = out.phys
        outer, inner = int(np.prod(ph[:pa])), int(np.prod(ph[pa + 1:]))
        self.emit(K_CONCAT, [v.vid for v in vs], [out.vid], [outer, inner, *[v.shape[axis] for v in vs]])
        self.vals[n.outputs[0]] = out

    def op_Transpose(self, n: Node) -> None:
        x = self.get(n.inputs[0])
        r = len(x.shape)
        p = [int(v) for v in n.attrs.get("perm", list(reversed(range(r))))]
        inv = [0] * r
        for j, a in enumerate(p):
            inv[a] = j
        shape = [x.shape[a] for a in p]
        perm = tuple(inv[a] for a in x.perm)
        self.vals[n.outputs[0]] = _V(shape, perm, self.alias_vid(x.vid))

    def _reshape_to(self, x: _V, shape: Sequence[int], out_name: str) -> None:
        xc = self.layout(x, _ident(len(x.shape)))
        if int(np.prod(shape, dtype=np.int64)) != x.size:
            raise self.err(f"cannot reshape {x.shape} into {tuple(shape)}")
        self.vals[out_name] = _V(shape, _ident(len(shape)), self.alias_vid(xc.vid))

    def op_Reshape(self, n: Node) -> None:
        x = self.get(n.inputs[0])
        target = [int(v) for v in np.asarray(self.const_input(n, 1, "the target shape")).reshape(-1)]
        allowzero = int(n.attrs.get("allowzero", 0))
        shape = [x.shape[i] if (v == 0 and not allowzero) else v for i, v in enumerate(target)]
        if -1 in shape:
            known = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
            shape[shape.index(-1)] = x.size // known if known else 0
        self._reshape_to(x, shape, n.outputs[0])

    def op_Flatten(self, n: Node) -> None:
        x = self.get(n.inputs[0])
        a = int(n.attrs.get("axis", 1)) % (len(x.shape) + 1) if x.shape else 0
        self._reshape_to(x, [int(np.prod(x.shape[:a])), int(np.prod(x.shape[a:]))], n.outputs[0])

    def op_Squeeze(self, n: Node) -> None:
        x = self.get(n.inputs[0])
        axes = n.attrs.get("axes")
        if axes is None and len(n.inputs) > 1 and n.inputs[1]:
            axes = list(np.asarray(self.const_input(n, 1, "axes")).reshape(-1))
        r = len(x.shape)
        ax = {int(a) % r for a in axes} if axes is not None else {i for i, s in enumerate(x.shape) if s == 1}
        if any(x.shape[a] != 1 for a in ax):
            raise self.err(f"cannot squeeze non-1 axes of {x.shape}")
        self._drop_insert(x, [s for i, s in enumerate(x.shape) if i not in ax], n.outputs[0])

    def op_Unsqueeze(self, n: Node) -> None:
        x = self.get(n.inputs[0])
        axes = n.attrs.get("axes")
        if axes is None:
            axes = list(np.asarray(self.const_input(n, 1, "axes")).reshape(-1))
        r = len(x.shape) + len(axes)
        ax = sorted(int(a) % r for a in axes)
        shape = list(x.shape)
        for a in ax:
            shape.insert(a, 1)
        self._drop_insert(x, shape, n.outputs[0])

    def _drop_insert(self, x: _V, shape: Sequence[int], out_name: str) -> None:
        """Reshapes that only add or remove size-1 axes keep the data where it is."""
        nonone_src = [x.shape[p] for p in x.perm if x.shape[p] != 1]
        logical_src = [s for s in x.shape if s != 1]
        if nonone_src == logical_src or _compatible(x.shape, x.perm, _ident(len(x.shape))):
            self._reshape_to(x, shape, out_name)
            return
        # channels-last data with a size-1 axis change: map the perm through the non-1 axes
        src_axes = [a for a in range(len(x.shape)) if x.shape[a] != 1]
        dst_axes = [a for a in range(len(shape)) if shape[a] != 1]
        m = dict(zip(src_axes, dst_axes))
        ones = [a for a in range(len(shape)) if shape[a] == 1]
        perm = ones + [m[p] for p in x.perm if x.shape[p] != 1]
        self.vals[out_name] = _V(shape, perm, self.alias_vid(x.vid))

    def op_Pad(self, n: Node) -> None:
        x = self.get(n.inputs[0])
        mode = n.attrs.get("mode", "constant")
        if mode != "constant":
            raise self.err(f"Pad mode {mode!r} is not supported (only 'constant')")
        r = len(x.shape)
        if len(n.inputs) > 1 and n.inputs[1]:
            pads = [int(v) for v in np.asarray(self.const_input(n, 1, "pads")).reshape(-1)]
        else:
            pads = [int(v) for v in n.attrs.get("pads", [0] * 2 * r)]
        val = self.const_input(n, 2, "the pad value")
        value = float(np.asarray(val).reshape(-1)[0]) if val is not None and np.asarray(val).size else \
            float(n.attrs.get("value", 0.0))
        if len(n.inputs) > 3 and n.inputs[3]:
            axes = [int(a) % r for a in np.asarray(self.const_input(n, 3, "axes")).reshape(-1)]
            full = [0] * (2 * r)
            for k, a in enumerate(axes):
                full[a], full[r + a] = pads[k], pads[len(axes) + k]
            pads = full
        begin, end = pads[:r], pads[r:]
        shape = [x.shape[a] + begin[a] + end[a] for a in range(r)]
        out = self.new_value(shape, x.perm)
        self.emit(K_PAD, [x.vid], [out.vid], [r, *x.phys, *out.phys, *[begin[p] for p in x.perm]], [value])
        self.vals[n.outputs[0]] = out

    def _slice(self, x: _V, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int],
               steps: Sequence[int], out_name: str) -> None:
        r = len(x.shape)
        st = [0] * r
        sp = [1] * r
        ln = list(x.shape)
        for s, e, a, k in zip(starts, ends, axes, steps):
            a = int(a) % r
            dim = x.shape[a]
            rng = range(dim)[slice(int(s), int(e), int(k))] if abs(int(e)) < 2 ** 62 or True else None
            s0, e0, k0 = slice(int(max(min(s, 2 ** 62), -2 ** 62)), int(max(min(e, 2 ** 62), -2 ** 62)),
                               int(k)).indices(dim)
            rng = range(s0, e0, k0)
            st[a], sp[a], ln[a] = (rng.start if len(rng) else 0), k0, len(rng)
        in_str = _strides(x.phys)
        off = 0
        strides = []
        for i, a in enumerate(x.perm):
            off += st[a] * in_str[i]
            strides.append(in_str[i] * sp[a])
        out = self.new_value(ln, x.perm)
        self.emit(K_STRIDED, [x.vid], [out.vid], [r, off, *out.phys, *strides], label="slice")
        self.vals[out_name] = out

    def op_Slice(self, n: Node) -> None:
        x = self.get(n.inputs[0])
        if self.g.opset < 10:
            starts, ends = n.attrs["starts"], n.attrs["ends"]
            axes = n.attrs.get("axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts = list(np.asarray(self.const_input(n, 1, "starts")).reshape(-1))
            ends = list(np.asarray(self.const_input(n, 2, "ends")).reshape(-1))
            a = self.const_input(n, 3, "axes")
            axes = list(a.reshape(-1)) if a is not None else list(range(len(starts)))
            s = self.const_input(n, 4, "steps")
            steps = list(s.reshape(-1)) if s is not None else [1] * len(starts)
        self._slice(x, starts, ends, axes, steps, n.outputs[0])

    def op_Split(self, n: Node) -> None:
        x = self.get(n.inputs[0])
        r = len(x.shape)
        axis = int(n.attrs.get("axis", 0)) % r
        split = n.attrs.get("split")
        if split is None and len(n.inputs) > 1 and n.inputs[1]:
            split = list(np.asarray(self.const_input(n, 1, "split")).reshape(-1))
        outs = [o for o in n.outputs]
        if split is None:
            k = len(outs)
            size = -(-x.shape[axis] // k)
            split = [min(size, x.shape[axis] - i * size) for i in range(k)]
        s0 = 0
        for o, ln in zip(outs, split):
            if o:
                self._slice(x, [s0], [s0 + int(ln)], [axis], [1], o)
            s0 += int(ln)


def lower(plan: Plan, shapes: Dict[str, Tuple[int, ...]]) -> Lowered:
    """Builds the C++ program of ``plan`` for these input shapes."""
    return _Lowerer(plan, shapes).run()
