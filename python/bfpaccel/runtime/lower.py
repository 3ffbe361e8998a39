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
  theirs;
* **element types**: every buffer holds float32; integer and boolean tensors (token ids, masks)
  are exact integers in it.  The lowering tracks each run-time value's ONNX element type: data
  movement keeps it, comparisons make booleans, ``Cast`` converts, and an op that would compute
  on integers with the vector unit's rounding (arithmetic, reductions) is refused, naming the
  node.  Integer and boolean graph outputs come back in their declared type.

What each node becomes is decided by its op's handler in ``ops/`` (registered with
``@lowers``); this module is the machinery they share (:class:`Lowering`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from .. import _core  # type: ignore[attr-defined]
from ..core import fmt_params
from .graph import Graph, Node
from .ops import find as _find_op
from .plan import Plan
from .values import LoweringError, Value, compatible, ident, strides

__all__ = ["Lowered", "lower", "LoweringError", "op_kind_name", "Lowering"]

OpKind, BinaryKind, UnaryKind, Activation = _core.OpKind, _core.BinaryKind, _core.UnaryKind, _core.Activation


def _names(enum: Any) -> Dict[int, str]:
    return {int(v): k for k, v in enum.__members__.items()}


_NAMES_KIND = _names(_core.OpKind)
_NAMES_BINARY = {v: k.lower() for v, k in _names(_core.BinaryKind).items()}
_NAMES_UNARY = {v: k.replace("_", "").lower() for v, k in _names(_core.UnaryKind).items()}
_NAMES_REDUCE = {v: "reduce " + k.replace("_", "").lower() for v, k in _names(_core.ReduceKind).items()}
_NAMES_POOL = {v: k.lower() + " pool" for v, k in _names(_core.PoolKind).items()}


def op_kind_name(kind: int, sub: int = 0, op_type: str = "") -> str:
    """A readable name of a lowered op's kind, for profiles: ``conv``, ``dense`` (a ``Gemm`` /
    ``MatMul`` on the BFP core), ``depthwise conv``, the binary/unary op (``add``, ``mul``,
    ``relu``, ``sigmoid``...), ``batchnorm``, ``max pool`` / ``average pool``, ``reduce mean``...,
    ``softmax``, ``concat``, ``transpose`` (a layout copy), ``slice``, ``pad``, ``copy``,
    ``layer norm``; any other kind is named after its ``OpKind``.
    ``kind`` and ``sub`` are the core's enums (``_core.OpKind``, ``_core.BinaryKind``...).

    Example:
        >>> op_kind_name(OpKind.BINARY, BinaryKind.MUL), op_kind_name(OpKind.CONV, 0, "BfpDense")
        ('mul', 'dense')
    """
    kind, sub = int(kind), int(sub)
    if kind == OpKind.CONV:
        if sub == 1:
            return "depthwise conv"
        return "dense" if op_type == "BfpDense" else "conv"
    if kind == OpKind.BINARY:
        return _NAMES_BINARY.get(sub, "binary")
    if kind == OpKind.UNARY:
        return _NAMES_UNARY.get(sub, "unary")
    if kind == OpKind.AFFINE:
        return "batchnorm"
    if kind == OpKind.POOL:
        return _NAMES_POOL.get(sub, "pool")
    if kind == OpKind.REDUCE:
        return _NAMES_REDUCE.get(sub, "reduce")
    if kind == OpKind.SOFTMAX:
        return "log softmax" if sub else "softmax"
    if kind == OpKind.STRIDED:
        return "slice" if op_type in ("Slice", "Split") else "transpose"
    name = _NAMES_KIND.get(kind)  # the others: the kind's name ("concat", "pad", "layer norm"...)
    return name.replace("_", " ").lower() if name else f"kind {kind}"


def op_label(params: Any, op_type: str = "") -> str:
    """:func:`op_kind_name` of an op given by its parameters (``_core.BinaryParams``...)."""
    if isinstance(params, _core.ConvParams):
        sub = int(params.depthwise)
    elif isinstance(params, _core.SoftmaxParams):
        sub = int(params.log)
    else:
        sub = int(getattr(params, "op", 0))
    return op_kind_name(type(params).kind, sub, op_type)


#: ops whose outputs have the element type of their first input (data movement, selection)
_SAME_DTYPE = {"Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Slice",
               "Split", "Pad", "Expand", "Tile", "Gather", "Trilu"}
#: ops that produce booleans
_BOOL_OUT = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not", "IsNaN",
             "IsInf"}
#: ops that take integer or boolean run-time tensors (the others compute in float at the vector
#: precision, which is not integer arithmetic)
_INT_INPUTS = _SAME_DTYPE | _BOOL_OUT | {"Cast", "Where", "Shape", "Size"}
_FLOAT = "float32"
#: the smallest expanded activation (bytes) whose 1x1 expansion is fused into its depthwise conv
#: (:meth:`Lowering.fuse_expansions`). Measured on EfficientNet-Lite0 (Zen 5, interleaved): at
#: 112^2 x 96 (4.8 MB) the fused op takes ~0.93 ms against 1.16-1.39 ms for the two; fusing the
#: 56^2 x 144 blocks (1.8 MB) too, once their depthwise convs quantize their outputs
#: (:meth:`Lowering.quantize_outputs`), measured 0.95-1.00x the model's time at 1 thread (0.95x
#: with a memory-bound process on the other core: the expanded tensor is neither written to nor
#: read from L3) and 0.99-1.00x at 2; the 28^2 x 240 ones (0.75 MB) stay in L2.
_FUSE_EXPANSION_BYTES = 1 << 20

#: ConvParams.share_input's slots (the executor's limit)
_MAX_SHARED_SLOTS = 256
_INTEGER_TYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def is_float(dtype: str) -> bool:
    """True for the float element types (and unknown ones, which the float buffers carry as is)."""
    try:
        return np.dtype(dtype).kind == "f"
    except TypeError:
        return True


@dataclasses.dataclass
class LoweredOp:
    """One program op before buffers are assigned (virtual buffer ids)."""

    params: Any                #: a ``_core.*Params``: the op's kind and its parameters
    ins: List[int]
    outs: List[int]
    name: str                  #: the node(s), for errors and profiles
    label: str                 #: its kind, for profiles (:func:`op_kind_name`)
    w: Any = None              #: conv: packed BFP weights
    wf: int = -1               #: conv: fp32 (or depthwise) weight buffer
    bias: int = -1             #: conv: bias buffer
    res: int = -1              #: conv: fused residual input


class Lowered:
    """A program for one input signature, with the map from names to buffers."""

    def __init__(self, program: Any, inputs: Dict[str, Tuple[int, Tuple[int, ...]]],
                 outputs: Dict[str, Tuple[Optional[int], Tuple[int, ...], Optional[np.ndarray]]],
                 op_names: List[str], op_kinds: Optional[List[str]] = None,
                 out_dtypes: Optional[Dict[str, str]] = None, in_place: Optional[List[str]] = None):
        self.program = program
        self.inputs = inputs      # name -> (buffer, shape)
        self.outputs = outputs    # name -> (buffer or None, shape, constant value or None)
        self.op_names = op_names
        #: each op's kind (``op_kind_name``): a fused conv + add + relu counts as its conv
        self.op_kinds = list(op_kinds) if op_kinds is not None else [""] * len(op_names)
        #: outputs returned in an integer or boolean type (the others: float32)
        self.out_dtypes = dict(out_dtypes or {})
        #: convs whose fused residual add writes its output into the residual's buffer
        self.in_place = list(in_place or [])

    def run(self, feeds: Dict[str, np.ndarray], names: Sequence[str]) -> Dict[str, np.ndarray]:
        # integer feeds are exact in float32 (Session admits magnitudes <= 2^24)
        ins = [(self.inputs[k][0], np.ascontiguousarray(v, dtype=np.float32).reshape(-1)) for k, v in feeds.items()]
        bufs = [self.outputs[n][0] for n in names if self.outputs[n][0] is not None]
        res = self.program.run(ins, bufs)
        out: Dict[str, np.ndarray] = {}
        it = iter(res)
        for n in names:
            b, shape, const = self.outputs[n]
            out[n] = np.array(const, copy=True) if b is None else next(it).reshape(shape)
            if b is not None and n in self.out_dtypes:
                with np.errstate(invalid="ignore"):  # a NaN cast to an integer type: undefined, as in ONNX
                    out[n] = out[n].astype(self.out_dtypes[n])
        return out


class Lowering:
    """The lowering of one plan for one input signature, and the context every op handler
    (``ops/``) works in: it owns the values, their layouts and buffers, emits program ops, and
    fuses and builds the program once every node is lowered.

    A handler reads its inputs with :meth:`get` (a :class:`~bfpaccel.runtime.values.Value`) or,
    for parameters that must be known when lowering, :meth:`const_input`; it makes outputs
    with :meth:`new_value` (or an alias of an input for a reshape), emits ops with :meth:`emit`
    and names its results with :meth:`set`. Errors are :meth:`err` (a LoweringError naming
    the node).
    """

    #: quantize an input that several BFP convs / dense layers read alike once per run
    #: (:meth:`share_inputs`); False quantizes it for each of them (the same bits)
    share_quantized_inputs: bool = True
    #: fuse a 1x1 expansion conv into the depthwise conv that is its only reader
    #: (:meth:`fuse_expansions`); False runs them as two ops (the same bits)
    fuse_expansion_convs: bool = True
    #: a depthwise conv whose only reader is a 1x1 BFP conv quantizes its output for that conv
    #: (:meth:`quantize_outputs`); False stores the output and the conv quantizes it (the same bits)
    quantize_conv_outputs: bool = True
    #: a BFP conv whose only reader is a depthwise conv quantizes its output's elements for that
    #: conv where the kernel can (:meth:`elements_in_producers`); False leaves it to the
    #: depthwise conv (the same bits)
    quantize_elements_in_producers: bool = True

    def __init__(self, plan: Plan, shapes: Dict[str, Tuple[int, ...]]):
        self.plan = plan
        self.g: Graph = plan.graph
        self.shapes = shapes
        self.vals: Dict[str, Value] = {}
        self.cv: Dict[str, np.ndarray] = {k: v for k, v in self.g.consts.items()}
        self.ops: List[LoweredOp] = []
        self.vsize: List[int] = []       # virtual buffer sizes (floats)
        self.vroot: List[int] = []       # alias -> root
        self.vconst: Dict[int, np.ndarray] = {}
        self.vinput: set = set()
        self.node: Optional[Node] = None
        self._final_roots: set = set()
        #: run-time value -> its ONNX element type, where not float32 (see the module doc)
        self.dtypes: Dict[str, str] = {}
        #: the graph's input names
        self.input_names = {vi.name for vi in plan.graph.inputs}

    @property
    def opset(self) -> int:
        """The ONNX opset of the plan's graph."""
        return self.g.opset

    # ------------------------------------------------------------ buffers
    def new_vid(self, n: int) -> int:
        """A new virtual buffer of ``n`` floats."""
        self.vsize.append(int(n))
        self.vroot.append(len(self.vroot))
        return len(self.vroot) - 1

    def alias_vid(self, vid: int) -> int:
        """Another name for buffer ``vid`` (the same memory: reshapes, layout-only transposes)."""
        self.vsize.append(self.vsize[vid])
        self.vroot.append(self.vroot[vid])
        return len(self.vroot) - 1

    def const_vid(self, arr: np.ndarray) -> int:
        """A buffer holding ``arr`` (as contiguous float32) when the program is built."""
        a = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
        vid = self.new_vid(max(a.size, 1))
        self.vconst[vid] = a
        return vid

    def emit(self, params: Any, ins: List[int], outs: List[int], label: Optional[str] = None, w: Any = None,
             wf: int = -1, bias: int = -1, res: int = -1) -> None:
        """Appends one program op: ``params`` (a ``_core.*Params``, whose type is the op's kind)
        reading buffers ``ins`` and writing ``outs``; a conv also takes its packed weights
        ``w`` or float weight buffer ``wf``, a bias buffer and a residual input ``res``."""
        op_type = self.node.op if self.node else ""
        self.ops.append(LoweredOp(params, list(ins), list(outs), self.node.name if self.node else "",
                                  label or op_label(params, op_type), w, wf, bias, res))

    def err(self, msg: str) -> LoweringError:
        """A LoweringError naming the node being lowered."""
        n = self.node
        where = f"node {n.name!r} ({n.op})" if n else "graph"
        return LoweringError(f"{where}: {msg}")

    # ------------------------------------------------------------ values
    def get(self, name: str) -> Value:
        """The runtime value ``name`` (a constant becomes a constant buffer on first use)."""
        if name in self.vals:
            return self.vals[name]
        if name in self.cv:
            arr = np.asarray(self.cv[name])
            if arr.dtype.kind not in "fiub":
                raise self.err(f"constant {name!r} of dtype {arr.dtype} used as a tensor")
            v = Value(arr.shape, ident(arr.ndim), self.const_vid(arr.astype(np.float32)))
            self.vals[name] = v
            return v
        raise self.err(f"value {name!r} is not computed by any node")

    def set(self, name: str, v: Value) -> None:
        """Names a node's output."""
        self.vals[name] = v

    def is_const(self, name: str) -> bool:
        """True when ``name`` is known while lowering (a plan constant or a folded value)."""
        return name in self.cv

    def const(self, name: str) -> np.ndarray:
        """The known value of constant ``name``."""
        return np.asarray(self.cv[name])

    def set_const(self, name: str, arr: np.ndarray) -> None:
        """Defines ``name`` as a value known while lowering (shape arithmetic)."""
        self.cv[name] = arr

    def shape_of(self, name: str) -> Tuple[int, ...]:
        """The logical shape of a constant or runtime value."""
        return tuple(np.asarray(self.cv[name]).shape) if name in self.cv else self.get(name).shape

    def dtype_of(self, name: str) -> str:
        """The element type of a value: a constant's numpy dtype, a run-time value's ONNX type
        (``"float32"`` for every float type)."""
        if name in self.cv:
            return str(np.asarray(self.cv[name]).dtype)
        return self.dtypes.get(name, _FLOAT)

    def set_dtype(self, name: str, dtype: str) -> None:
        """Records a run-time value's element type (a handler that knows it better than the
        default rules: ``Cast``)."""
        if is_float(dtype):
            self.dtypes.pop(name, None)
        else:
            self.dtypes[name] = str(np.dtype(dtype))

    def _check_int_inputs(self, n: Node) -> None:
        if n.op in _INT_INPUTS:
            return
        for i in n.inputs:
            if i and i not in self.cv and not is_float(self.dtype_of(i)):
                raise self.err(f"input {i!r} is a {self.dtype_of(i)} tensor computed at run time; {n.op} on "
                               "integer or boolean run-time tensors is not supported (the vector unit computes "
                               "in float and rounds)")

    def _output_dtypes(self, n: Node) -> None:
        for k, o in enumerate(n.outputs):
            if not o or o in self.cv or o in self.dtypes:
                continue
            if n.op in _BOOL_OUT:
                self.set_dtype(o, "bool")
            elif n.op in _SAME_DTYPE and n.inputs:
                self.set_dtype(o, self.dtype_of(n.inputs[0]))
            elif n.op == "Where":
                self.set_dtype(o, self.dtype_of(n.inputs[1]))

    def const_input(self, n: Node, i: int, what: str) -> Optional[np.ndarray]:
        """Input ``i`` of ``n`` as a known array (None when absent); an error when it is
        computed at run time."""
        if i >= len(n.inputs) or not n.inputs[i]:
            return None
        if n.inputs[i] not in self.cv:
            raise self.err(f"{what} must be a constant (it is computed at run time)")
        return np.asarray(self.cv[n.inputs[i]])

    def new_value(self, shape: Sequence[int], perm: Optional[Sequence[int]] = None) -> Value:
        """A value with its own new buffer (default layout: row-major)."""
        shape = tuple(int(s) for s in shape)
        return Value(shape, perm if perm is not None else ident(len(shape)), self.new_vid(max(int(np.prod(shape)), 1)))

    def layout(self, v: Value, want: Sequence[int]) -> Value:
        """v with physical permutation ``want`` (an alias when compatible, else a copy)."""
        want = tuple(want)
        if v.perm == want:
            return v
        if compatible(v.shape, v.perm, want):
            return Value(v.shape, want, self.alias_vid(v.vid))
        out = self.new_value(v.shape, want)
        in_str = strides(v.phys)
        pos = {a: i for i, a in enumerate(v.perm)}
        st = [in_str[pos[a]] for a in want]
        self.emit(_core.StridedParams(offset=0, shape=list(out.phys), strides=st), [v.vid], [out.vid],
                  label="transpose")
        return out

    # ------------------------------------------------------------ main
    def run(self) -> Lowered:
        g = self.g
        for vi in g.inputs:
            shp = self.shapes[vi.name]
            v = self.new_value(shp)
            self.vinput.add(v.vid)
            self.vals[vi.name] = v
            self.set_dtype(vi.name, vi.dtype)
        for n in g.nodes:
            self.node = n
            try:
                spec = _find_op(n.op)
                if (spec is None or spec.fold_constants) and all((i == "" or i in self.cv) for i in n.inputs):
                    self.fold(n)
                    continue
                if spec is None or spec.lower is None:
                    raise self.err(f"op {n.op} is not supported on a computed (non-constant) input")
                self._check_int_inputs(n)
                spec.lower(self, n)
                self._output_dtypes(n)
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
            if v.perm != ident(len(v.shape)) and not compatible(v.shape, v.perm, ident(len(v.shape))):
                v = self.layout(v, ident(len(v.shape)))
            root = self.vroot[v.vid]
            if root in self.vinput or root in self.vconst or root in [self.vroot[o] for o in out_vids] \
                    or self.vsize[root] != v.size:
                out = self.new_value(v.shape)
                self.emit(_core.CopyParams(count=v.size), [v.vid], [out.vid])
                v = out
            out_vids.append(v.vid)
            outputs[name] = (v.vid, v.shape, None)
        # a graph output's buffer must stay where the output is read: never fused away
        self._final_roots = {self.vroot[self.vals[vo.name].vid] for vo in g.outputs if vo.name in self.vals}
        self.fuse_pad_pool()
        self.fuse()
        if self.fuse_expansion_convs:
            self.fuse_expansions()
        if self.quantize_elements_in_producers:
            self.elements_in_producers()
        self.assign_slots(self.share_inputs() if self.share_quantized_inputs else [],
                          self.quantize_outputs() if self.quantize_conv_outputs else [])
        return self.build(outputs, out_vids)

    # ------------------------------------------------------------ fusion
    def _readers(self) -> Dict[int, List[int]]:
        """Buffer root -> the indices of the ops that read it (inputs and fused residuals)."""
        readers: Dict[int, List[int]] = {}
        for i, op in enumerate(self.ops):
            for v in op.ins + ([op.res] if op.res >= 0 else []):
                readers.setdefault(self.vroot[v], []).append(i)
        return readers

    def fuse_pad_pool(self) -> None:
        """A constant ``Pad`` of the spatial axes whose only reader is a max pool without padding
        of its own (TF-slim's ResNet: ``Pad`` then ``MaxPool`` VALID) becomes the pool's padding,
        its positions taps holding the pad value: the same maximum over the same taps in the same
        order, without writing the padded copy."""
        readers = self._readers()
        producer = {self.vroot[op.outs[0]]: op for op in self.ops if len(op.outs) == 1}
        dead = []
        for op in self.ops:
            p = op.params
            if not isinstance(p, _core.PoolParams) or p.op != _core.PoolKind.MAX or p.pad_with_value:
                continue
            w = p.window
            if w.pad_top or w.pad_left or w.pad_bottom or w.pad_right:
                continue
            root = self.vroot[op.ins[0]]
            pad = producer.get(root)
            if pad is None or not isinstance(pad.params, _core.PadParams) or len(readers.get(root, [])) != 1 \
                    or root in self._final_roots:
                continue
            q = pad.params
            ins, outs, beg = list(q.in_shape), list(q.out_shape), list(q.begin)
            end = [o - i - b for o, i, b in zip(outs, ins, beg)]
            if len(ins) != 4 or outs != [w.batch, w.height, w.width, w.channels] or np.isnan(q.value) \
                    or beg[0] or beg[3] or end[0] or end[3] or min(beg + end) < 0:
                continue
            g = _core.ConvGeometry(batch=w.batch, channels=w.channels, height=ins[1], width=ins[2],
                                   out_channels=w.out_channels, kernel_h=w.kernel_h, kernel_w=w.kernel_w,
                                   stride_h=w.stride_h, stride_w=w.stride_w, pad_top=beg[1], pad_left=beg[2],
                                   pad_bottom=end[1], pad_right=end[2], dilation_h=w.dilation_h,
                                   dilation_w=w.dilation_w, groups=1, out_h=w.out_h, out_w=w.out_w)
            op.params = _core.PoolParams(op=p.op, window=g, count_include_pad=False, pad_with_value=True,
                                         pad_value=float(q.value))
            op.ins = list(pad.ins)
            op.name = pad.name + "+" + op.name
            dead.append(pad)
        if dead:
            self.ops = [op for op in self.ops if not any(op is d for d in dead)]

    def fuse(self) -> None:
        """Folds a residual ``Add`` and a ``Relu`` / ``Clip`` that are a conv's only reader into
        the conv's epilogue (each still rounded as the separate op would be)."""
        ops = self.ops  # edited in place: _readers() sees every fusion
        readers = self._readers()
        i = 0
        while i < len(ops):
            op = ops[i]
            conv = op.params
            if not isinstance(conv, _core.ConvParams):
                i += 1
                continue
            root = self.vroot[op.outs[0]]
            if root in self._final_roots:
                i += 1
                continue
            rd = readers.get(root, [])
            if len(rd) != 1:
                i += 1
                continue
            j = rd[0]
            nxt = ops[j]
            p = nxt.params
            fused = False
            if isinstance(p, _core.BinaryParams) and p.op == BinaryKind.ADD and op.res < 0 \
                    and conv.activation == Activation.NONE:
                full = strides(p.shape)
                roots_in = [self.vroot[v] for v in nxt.ins]
                if list(p.a_strides) == full and list(p.b_strides) == full and roots_in.count(root) == 1:
                    op.res = nxt.ins[1 - roots_in.index(root)]
                    fused = True
            elif isinstance(p, _core.UnaryParams) and p.op in (UnaryKind.RELU, UnaryKind.CLIP) \
                    and conv.activation == Activation.NONE:
                if p.op == UnaryKind.RELU:
                    conv.activation = Activation.RELU
                else:
                    conv.activation, conv.clip_lo, conv.clip_hi = Activation.CLIP, p.lo, p.hi
                fused = True
            if not fused:
                i += 1
                continue
            op.outs = nxt.outs
            op.name = op.name + "+" + nxt.name
            ops[j] = op
            del ops[i]
            readers = self._readers()
            # stay on the same conv (now at j-1) to try fusing the next op too
            i = 0
        self.ops = ops

    def fuse_expansions(self) -> None:
        """A 1x1 BFP conv (stride 1, no padding, groups or residual; an MBConv block's expansion,
        its activation fused) whose only reader is a depthwise conv that quantizes its input
        becomes part of that conv (``ConvParams.expand_channels``): the depthwise conv's work
        items compute the expansion's output rows they need into their tiles (epilogue and
        element quantization in registers), so the expanded activation -- the largest tensors of
        such networks -- is never written to memory or read back. The same bits (the executor
        runs the two convs one after the other where the kernel has no such path)."""
        if not self.plan.format.is_block:
            return
        readers = self._readers()
        producer = {self.vroot[op.outs[0]]: i for i, op in enumerate(self.ops) if len(op.outs) == 1}
        drop: Set[int] = set()
        for i, op in enumerate(self.ops):
            p = op.params
            if not isinstance(p, _core.ConvParams) or not p.depthwise or not p.quantize_input \
                    or p.expand_channels or op.res >= 0:
                continue
            root = self.vroot[op.ins[0]]
            j = producer.get(root)
            if j is None or readers.get(root) != [i] or root in self._final_roots:
                continue
            ex = self.ops[j]
            e = ex.params
            if not isinstance(e, _core.ConvParams) or e.depthwise or ex.w is None or ex.res >= 0 \
                    or e.expand_channels or e.share_input or e.input_nchw:
                continue
            eg, g = e.geometry, p.geometry
            if (eg.kernel_h, eg.kernel_w, eg.stride_h, eg.stride_w, eg.dilation_h, eg.dilation_w, eg.groups) \
                    != (1, 1, 1, 1, 1, 1, 1) or (eg.pad_top, eg.pad_left, eg.pad_bottom, eg.pad_right) != (0, 0, 0, 0) \
                    or (eg.batch, eg.out_h, eg.out_w, eg.out_channels) != (g.batch, g.height, g.width, g.channels):
                continue
            if g.batch * g.height * g.width * g.channels * 4 < _FUSE_EXPANSION_BYTES:
                continue  # it stays in cache between the two ops anyway
            p.expand_channels = eg.channels
            p.expand_activation, p.expand_clip_lo, p.expand_clip_hi = e.activation, e.clip_lo, e.clip_hi
            op.ins = [ex.ins[0]] + ([ex.bias] if ex.bias >= 0 else [])
            op.w = ex.w
            op.name = ex.name + "+" + op.name
            drop.add(j)
        self.ops = [op for i, op in enumerate(self.ops) if i not in drop]

    def elements_in_producers(self) -> None:
        """A depthwise conv that quantizes its input (one-element blocks), made by a BFP conv
        without residual (an MBConv block's expansion, a stem) and read by nothing else: the
        producer gets ``ConvParams.quantize_output_elements``. On kernels whose depthwise loop
        takes a quantized input (``KernelDesc::dw_quantized_input``) the producer's epilogue
        then quantizes each output last, in registers, and the depthwise conv copies its input
        instead of quantizing it -- one pass over the activation less; elsewhere the flag does
        nothing (the same bits either way; the program links the pair, ``Program::add_op``)."""
        if not self.plan.format.is_block:
            return
        readers = self._readers()
        producer = {self.vroot[op.outs[0]]: i for i, op in enumerate(self.ops) if len(op.outs) == 1}
        for i, op in enumerate(self.ops):
            p = op.params
            if not isinstance(p, _core.ConvParams) or not p.depthwise or not p.quantize_input or p.expand_channels:
                continue
            root = self.vroot[op.ins[0]]
            j = producer.get(root)
            if j is None or j >= i or readers.get(root) != [i] or root in self._final_roots:
                continue
            ex = self.ops[j]
            e = ex.params
            if not isinstance(e, _core.ConvParams) or e.depthwise or ex.w is None or ex.res >= 0 or e.expand_channels:
                continue
            e.quantize_output_elements = True

    # ------------------------------------------------------------ shared input quantization
    def share_inputs(self) -> List[List[int]]:
        """Convs and dense layers on the BFP core that read the same value with the same input
        geometry (attention's query, key and value projections) quantize it once per run: the
        groups of such ops (indices, in order), each to get a ``ConvParams.share_input`` slot
        (:meth:`assign_slots`); the first op of a run quantizes the input into it, the others
        reuse it. The quantized operand is a pure function of the input, the format, the seed,
        the geometry and the kernel (the executor checks all of them, and drops it when its
        buffer is written), so the bits are those of quantizing it again."""
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for i, op in enumerate(self.ops):
            p = op.params
            if not isinstance(p, _core.ConvParams) or op.w is None or p.depthwise or p.input_nchw:
                continue
            g = p.geometry
            key = (self.vroot[op.ins[0]], g.batch, g.channels, g.height, g.width, g.groups, g.pad_top, g.pad_left,
                   g.pad_bottom, g.pad_right)
            groups.setdefault(key, []).append(i)
        return [v for v in groups.values() if len(v) > 1]

    def quantize_outputs(self) -> List[Tuple[int, int]]:
        """A depthwise conv that quantizes its input (one-element blocks) and whose only reader
        is a 1x1 BFP conv (stride 1, no padding or groups; an MBConv block's projection) writes
        that conv's quantized input instead of its own output: each of its work items quantizes
        its output rows with the row quantizer while they are in cache, and the 1x1 conv reuses
        the operand as a shared input (``ConvParams.quantize_output`` and ``share_input``, one
        slot). The same operand -- the quantizer's, of the same floats -- so the same bits;
        where the kernel, format or weights do not take that path the output is written and the
        1x1 conv quantizes it. Returns the (depthwise conv, reader) index pairs."""
        if not self.plan.format.is_block:
            return []
        readers = self._readers()
        pairs: List[Tuple[int, int]] = []
        for i, op in enumerate(self.ops):
            p = op.params
            if not isinstance(p, _core.ConvParams) or not p.depthwise or not p.quantize_input or op.res >= 0 \
                    or len(op.outs) != 1:
                continue
            root = self.vroot[op.outs[0]]
            rd = readers.get(root, [])
            if root in self._final_roots or len(rd) != 1:
                continue
            c = self.ops[rd[0]]
            q = c.params
            if not isinstance(q, _core.ConvParams) or q.depthwise or c.w is None or q.input_nchw \
                    or q.expand_channels or self.vroot[c.ins[0]] != root:
                continue
            g = q.geometry
            if (g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.dilation_h, g.dilation_w, g.groups) \
                    != (1, 1, 1, 1, 1, 1, 1) or (g.pad_top, g.pad_left, g.pad_bottom, g.pad_right) != (0, 0, 0, 0):
                continue
            pairs.append((i, rd[0]))
        return pairs

    def assign_slots(self, groups: List[List[int]], pairs: List[Tuple[int, int]]) -> None:
        """Gives each group of :meth:`share_inputs` and each pair of :meth:`quantize_outputs` a
        slot (1, 2, ...; the executor keeps at most 256): a slot is reused once the ops holding
        it have run. Groups and pairs past the last slot keep none (quantized per op)."""
        spans = [(v, None) for v in groups] + [([i, j], (i, j)) for i, j in pairs]
        ends: List[int] = []  # per slot: the last op of the group holding it
        for idxs, pair in sorted(spans, key=lambda t: t[0][0]):
            slot = next((s for s, end in enumerate(ends) if end < idxs[0]), None)
            if slot is None:
                if len(ends) >= _MAX_SHARED_SLOTS:
                    continue
                ends.append(-1)
                slot = len(ends) - 1
            ends[slot] = idxs[-1]
            if pair is not None:
                self.ops[pair[0]].params.quantize_output = slot + 1
                self.ops[pair[1]].params.share_input = slot + 1
            else:
                for i in idxs:
                    self.ops[i].params.share_input = slot + 1

    # ------------------------------------------------------------ build
    def residual_in_place(self, prog: Any, op: Any, i: int, cpp: Dict[int, int], keep: Set[int],
                          dying: Dict[int, List[int]]) -> bool:
        """A BFP conv whose fused residual dies with it writes its output into the residual's
        buffer: the epilogue reads each residual value just before writing that output value
        (see ``exec_conv``), so the output needs no buffer of its own and its stores go to lines
        the epilogue has just read. Only with a kernel that fuses the epilogue (the program is
        lowered per kernel): the others would need a copy of the residual."""
        p = op.params
        if not _core.kernel_fuses_epilogue():
            return False
        if op.res < 0 or op.w is None or len(op.outs) != 1 or not isinstance(p, _core.ConvParams) or p.depthwise:
            return False
        rr, orr = self.vroot[op.res], self.vroot[op.outs[0]]
        others = {self.vroot[v] for v in op.ins + [op.bias, op.wf] if v >= 0}
        if rr not in dying.get(i, []) or rr in others or rr not in cpp or orr in cpp or orr in keep \
                or self.vsize[rr] != self.vsize[orr]:
            return False
        cpp[orr] = prog.alias(cpp[rr])
        dying[i].remove(rr)  # its buffer lives on as the output's
        return True

    def build(self, outputs: Dict[str, Any], out_vids: List[int]) -> Lowered:
        vp = getattr(_core.VecPrec, self.plan.vector_precision.upper())
        f = self.plan.format
        prog = _core.Program(vp, fmt_params(f) if f.is_block else None, self.plan.seed)
        last: Dict[int, int] = {}
        for i, op in enumerate(self.ops):
            for v in op.ins + ([op.res] if op.res >= 0 else []) + [x for x in (op.bias, op.wf) if x >= 0]:
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
        in_place: List[str] = []
        for i, op in enumerate(self.ops):
            ins = [cid(v) for v in op.ins]
            res, bias, wf = cid(op.res), cid(op.bias), cid(op.wf)
            if self.residual_in_place(prog, op, i, cpp, keep, dying):
                in_place.append(op.name)
            outs = [cid(v) for v in op.outs]
            prog.add_op(op.params, ins, outs, op.w, wf, bias, res, op.name)
            names.append(op.name)
            kinds.append(op.label)
            for root in dying.get(i, []):
                if root in cpp:
                    free.append((self.vsize[root], cpp[root]))
        inputs = {vi.name: (cpp[self.vroot[self.vals[vi.name].vid]], tuple(self.shapes[vi.name])) for vi in self.g.inputs}
        outs2 = {}
        out_dtypes: Dict[str, str] = {}
        for name, (vid, shape, const) in outputs.items():
            outs2[name] = (None if vid is None else cid(vid), shape, const)
            declared = next((vo.dtype for vo in self.g.outputs if vo.name == name), "")
            dt = declared if declared in _INTEGER_TYPES else self.dtype_of(name)
            if not is_float(dt):
                out_dtypes[name] = dt
        return Lowered(prog, inputs, outs2, names, kinds, out_dtypes, in_place)

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


def lower(plan: Plan, shapes: Dict[str, Tuple[int, ...]]) -> Lowered:
    """Builds the C++ program of ``plan`` for these input shapes."""
    return Lowering(plan, shapes).run()
