"""An analytical cycle model of a Brainwave-style NPU (``docs/perfmodel.md`` explains it).

The machine (Fowers et al., ISCA 2018; Chung et al., IEEE Micro 2018):

* a **matrix-vector unit** (MVM) of ``tiles`` tile engines; each tile has ``lanes``
  dot-product units of length ``native_dim`` (N), so it multiplies one N x N *native tile* of a
  weight matrix by an N-vector in ``ceil(N / lanes)`` cycles, and the whole unit does
  ``tiles * lanes * N`` multiply-accumulates per cycle at peak;
* **multifunction units** (MFUs) behind it: chained vector ops (bias, ReLU, residual add, ...)
  that stream the MVM's output at ``mfu_ops_per_cycle`` elements per cycle;
* the **matrix register file** (MRF): weights pinned on chip (``mrf_bytes`` at
  ``weight_bits`` per element); what does not fit streams from DRAM at ``dram_gbps`` each time
  its layer runs.

Mapping (one ``mv_mul`` at a time, as the single-threaded Brainwave ISA issues them):

* a convolution is a GEMM ``[M, K] x [K, O]`` with ``M = batch * output pixels`` input
  vectors, ``K = C/groups * kh * kw`` and ``O`` outputs; a dense layer has ``M`` = rows;
* a weight matrix covers ``blocks = ceil(K / N) * ceil(O_g / N)`` native tiles (zero padded);
  the tile engines take them ``tiles`` at a time, so one input vector costs
  ``ceil(blocks / tiles) * ceil(N / lanes)`` cycles and the layer
  ``compute = groups * M * ceil(blocks / tiles) * ceil(N / lanes)``; a depthwise convolution is
  the degenerate case ``K = kh * kw``, ``O_g = 1`` (very low utilisation), or, when cheaper,
  per-channel multiply-adds on the MFUs (``ceil(M * channels * kh * kw / mfu_ops_per_cycle)``);
* elementwise vector ops that only consume a matrix op's output (bias, BN scale/shift, ReLU,
  residual add, ...) are chained onto that op's MFU pipeline; a chain of ``c`` ops costs
  ``ceil(c / chain_ops) * ceil(elements / mfu_ops_per_cycle)`` cycles and runs concurrently
  with the MVM; other vector ops (pooling, softmax, a chain with no matrix op) are layers of
  their own; layout ops (Reshape, Transpose, Concat, ...) are free (addressing);
* ``layer cycles = max(compute, weight load, vector) + pipeline_fill_cycles``, and the *bound*
  is whichever of the three is largest.

Shapes come from the plan's graph walked here (ONNX semantics, so NHWC inputs with a leading
Transpose as tf2onnx writes them work), or from a built-in description of the five zoo
architectures, so ``estimate("resnet50")`` needs neither TensorFlow nor a converted model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "NpuConfig",
    "Estimate",
    "NpuConfigError",
    "load_npu",
    "list_npus",
    "peak_macs_per_cycle",
    "peak_tops",
    "gemm_cycles",
    "estimate",
    "BUILTIN_MODELS",
]

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

#: Figures an estimate cannot be made without (``null`` in a YAML: the user must set them).
REQUIRED_FIGURES = ("clock_mhz", "native_dim", "lanes", "tiles", "weight_bits")
#: Figures that may stay ``null``; the estimate then records the assumption it made.
OPTIONAL_FIGURES = ("mrf_bytes", "dram_gbps", "mfu_ops_per_cycle", "mfu_chain_ops", "pipeline_fill_cycles")


class NpuConfigError(ValueError):
    """An NPU configuration that is unknown, malformed, or lacks a figure the estimate needs."""


@dataclasses.dataclass(frozen=True)
class NpuConfig:
    """One NPU instance: the synthesis-time figures of a Brainwave-style design.

    Figures that are not public are ``None`` (``null`` in the YAML); :func:`estimate` says
    which ones it needs.  ``sources`` maps a figure to where it comes from; ``notes`` are
    free-text caveats.

    Example:
        >>> from bfpaccel.perfmodel import load_npu
        >>> npu = load_npu("brainwave-s10")
        >>> npu.tiles * npu.lanes * npu.native_dim
        96000
    """

    name: str
    clock_mhz: Optional[float]
    native_dim: Optional[int]
    lanes: Optional[int]
    tiles: Optional[int]
    mrf_bytes: Optional[int]
    dram_gbps: Optional[float]
    mfu_ops_per_cycle: Optional[int]
    weight_bits: Optional[float]
    sources: Dict[str, str] = dataclasses.field(default_factory=dict)
    notes: Tuple[str, ...] = ()
    device: str = ""
    weight_format: str = ""
    mfus: Optional[int] = None
    mfu_chain_ops: Optional[int] = None
    pipeline_fill_cycles: Optional[int] = None
    path: str = ""

    def missing(self, figures: Iterable[str] = REQUIRED_FIGURES) -> List[str]:
        """The figures among ``figures`` that are ``None``."""
        return [f for f in figures if getattr(self, f) is None]

    def require(self, figures: Iterable[str] = REQUIRED_FIGURES, why: str = "an estimate") -> None:
        """Raises :class:`NpuConfigError` naming every figure of ``figures`` that is unset."""
        miss = self.missing(figures)
        if miss:
            where = self.path or f"the {self.name!r} configuration"
            raise NpuConfigError(
                f"NPU {self.name!r} does not give {', '.join(miss)} (null in {where}: not public), which "
                f"{why} needs; copy the YAML and set them, pass them to load_npu({self.name!r}, "
                + ", ".join(f"{m}=..." for m in miss) + "), or on the command line "
                + " ".join(f"--set {m}=..." for m in miss))

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["notes"] = list(self.notes)
        return d


_INT_FIELDS = {"native_dim", "lanes", "tiles", "mrf_bytes", "mfu_ops_per_cycle", "mfus", "mfu_chain_ops",
               "pipeline_fill_cycles"}
_FLOAT_FIELDS = {"clock_mhz", "dram_gbps", "weight_bits"}
_ALL_FIELDS = {f.name for f in dataclasses.fields(NpuConfig)}


def list_npus() -> List[str]:
    """Names of the NPU configurations shipped with bfpaccel.

    Example:
        >>> from bfpaccel.perfmodel import list_npus
        >>> "brainwave-s10" in list_npus()
        True
    """
    if not os.path.isdir(_CONFIG_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(_CONFIG_DIR) if f.endswith(".yaml"))


def _coerce(name: str, key: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        if key in _INT_FIELDS:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            v: Any = int(float(value))
        elif key in _FLOAT_FIELDS:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
        else:
            return value
    except (TypeError, ValueError):
        raise NpuConfigError(f"NPU {name!r}: {key} must be a {'whole ' if key in _INT_FIELDS else ''}number, "
                             f"got {value!r}") from None
    if v <= 0 and not (key == "pipeline_fill_cycles" and v == 0):
        raise NpuConfigError(f"NPU {name!r}: {key} must be positive, got {value!r}")
    return v


def _from_mapping(d: Mapping[str, Any], path: str = "", default_name: str = "custom") -> NpuConfig:
    name = str(d.get("name") or default_name)
    unknown = set(d) - _ALL_FIELDS
    if unknown:
        raise NpuConfigError(f"NPU {name!r}: unknown key(s) {', '.join(sorted(unknown))} in {path or 'the config'}; "
                             f"known: {', '.join(sorted(_ALL_FIELDS - {'path'}))}")
    missing = [k for k in REQUIRED_FIGURES + OPTIONAL_FIGURES if k not in d]
    if missing:
        raise NpuConfigError(
            f"NPU {name!r}: {path or 'the config'} is missing {', '.join(missing)}; give every figure, "
            "null where it is not known")
    vals: Dict[str, Any] = {k: _coerce(name, k, d.get(k)) for k in _INT_FIELDS | _FLOAT_FIELDS if k in d}
    return NpuConfig(name=name, sources={str(k): str(v) for k, v in (d.get("sources") or {}).items()},
                     notes=tuple(str(n) for n in (d.get("notes") or ())), device=str(d.get("device") or ""),
                     weight_format=str(d.get("weight_format") or ""), path=path, **vals)


def load_npu(name_or_path: Union[str, "os.PathLike[str]", NpuConfig, Mapping[str, Any]] = "brainwave-s10",
             **overrides: Any) -> NpuConfig:
    """Loads an NPU configuration: a shipped name (:func:`list_npus`), a YAML path, a dict, or
    an :class:`NpuConfig`; keyword arguments override single figures.

    Raises:
        NpuConfigError: unknown name (the known ones are listed), a YAML without one of the
            figures (named), a malformed value.

    Example:
        >>> from bfpaccel.perfmodel import load_npu
        >>> load_npu("brainwave-s10", clock_mhz=300).clock_mhz
        300.0
    """
    if isinstance(name_or_path, NpuConfig):
        base = name_or_path
    elif isinstance(name_or_path, Mapping):
        base = _from_mapping(name_or_path)
    else:
        s = os.fspath(name_or_path)
        if s.endswith((".yaml", ".yml")) or os.sep in s or os.path.isfile(s):
            path = s
            if not os.path.isfile(path):
                raise NpuConfigError(f"NPU configuration file not found: {path}")
        else:
            path = os.path.join(_CONFIG_DIR, f"{s.lower()}.yaml")
            if not os.path.isfile(path):
                raise NpuConfigError(f"unknown NPU {s!r}; known: {', '.join(list_npus())} (or give a YAML path)")
        import yaml

        try:
            with open(path) as f:
                d = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise NpuConfigError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(d, dict):
            raise NpuConfigError(f"{path} must hold a mapping of NPU figures")
        base = _from_mapping(d, path, os.path.splitext(os.path.basename(path))[0])
    if not overrides:
        return base
    bad = set(overrides) - _ALL_FIELDS
    if bad:
        raise NpuConfigError(f"unknown NPU figure(s) {', '.join(sorted(bad))}; known: "
                             f"{', '.join(sorted(_ALL_FIELDS - {'path'}))}")
    vals = {k: _coerce(base.name, k, v) for k, v in overrides.items()}
    src = dict(base.sources)
    for k in overrides:
        if k in _INT_FIELDS | _FLOAT_FIELDS:
            src[k] = "set by the user"
    return dataclasses.replace(base, **vals, sources=src)


def peak_macs_per_cycle(npu: Union[str, NpuConfig]) -> int:
    """``tiles * lanes * native_dim``: multiply-accumulates per cycle at full utilisation.

    Example:
        >>> from bfpaccel.perfmodel import peak_macs_per_cycle
        >>> peak_macs_per_cycle("brainwave-s10")
        96000
    """
    n = load_npu(npu) if not isinstance(npu, NpuConfig) else npu
    n.require(("native_dim", "lanes", "tiles"), "the peak")
    return int(n.tiles) * int(n.lanes) * int(n.native_dim)  # type: ignore[arg-type]


def peak_tops(npu: Union[str, NpuConfig]) -> float:
    """Peak tera-operations per second, ``2 * MACs/cycle * clock`` (a MAC is two operations,
    the convention of the Brainwave papers' TFLOPS).

    Example:
        >>> from bfpaccel.perfmodel import peak_tops
        >>> round(peak_tops("brainwave-s10"), 3)
        48.0
    """
    n = load_npu(npu) if not isinstance(npu, NpuConfig) else npu
    n.require(("clock_mhz", "native_dim", "lanes", "tiles"), "the peak")
    return 2.0 * peak_macs_per_cycle(n) * float(n.clock_mhz) * 1e6 / 1e12  # type: ignore[arg-type]


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def gemm_cycles(M: int, K: int, N: int, npu: Union[str, NpuConfig], groups: int = 1) -> int:
    """MVM cycles of ``groups`` GEMMs ``[M, K] x [K, N]`` (no weight load, no vector work, no
    fill): ``groups * M * ceil(ceil(K/nd) * ceil(N/nd) / tiles) * ceil(nd / lanes)``.

    Example:
        >>> from bfpaccel.perfmodel import gemm_cycles
        >>> gemm_cycles(1, 400, 400, "brainwave-s10")   # one native tile: 400 / 40 lanes
        10
    """
    n = load_npu(npu) if not isinstance(npu, NpuConfig) else npu
    n.require(("native_dim", "lanes", "tiles"), "a cycle count")
    nd, lanes, tiles = int(n.native_dim), int(n.lanes), int(n.tiles)  # type: ignore[arg-type]
    blocks = _cdiv(K, nd) * _cdiv(N, nd)
    return int(groups) * int(M) * _cdiv(blocks, tiles) * _cdiv(nd, lanes)


# ---------------------------------------------------------------- shape walk
_UNARY = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Erf",
          "HardSigmoid", "HardSwish", "Floor", "Ceil", "Cast", "Identity", "Dropout", "Not", "Softmax", "LogSoftmax",
          "BatchNormalization"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Equal", "Less", "Greater", "And", "Or", "Mod",
           "Where"}
#: Elementwise ops an MFU chain can absorb (cost: one element-op per output element each).
_CHAINABLE = (_UNARY | _BINARY) - {"Softmax", "LogSoftmax", "Cast", "Identity", "Dropout", "Equal", "Less", "Greater",
                                   "And", "Or", "Not", "Where", "Mod"}
#: Ops that move or relabel data only: free on the NPU (its compiler addresses the VRF).
_LAYOUT = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Slice", "Gather", "Pad",
           "Shape", "Size", "Identity", "Dropout", "Cast", "Constant", "ConstantOfShape", "Range", "Expand", "Tile"}
_MATRIX = {"Conv", "BfpDense"}
#: Recurrent layers: their time loop is modelled step by step (matrix-vector products + MFU chain)
_RECURRENT = {"LSTM", "GRU"}
#: vector ops of one time step's gate arithmetic, chained on the MFUs behind the step's products
#: (LSTM: gate sum, bias, 3 sigmoids, 2 tanh, f*c, i*g, c sum, o*tanh(c); GRU: gate sum, bias,
#: 2 sigmoids, r*(h R_h), sum, tanh, 1-z, (1-z)*n, z*h, sum)
_RNN_STEP_OPS = {"LSTM": 11, "GRU": 11}
#: Layout ops that only relabel one tensor (a vector chain may continue through them).
_RELABEL = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Dropout", "Cast"}


class _Shapes:
    """ONNX shape inference for the plan's op set, plus the values of small integer tensors
    (shape arithmetic such as Shape -> Gather -> Concat -> Reshape)."""

    def __init__(self, consts: Mapping[str, np.ndarray]):
        self.shape: Dict[str, Optional[Tuple[int, ...]]] = {}
        self.value: Dict[str, np.ndarray] = {}
        for k, v in consts.items():
            a = np.asarray(v)
            self.shape[k] = tuple(int(s) for s in a.shape)
            if a.dtype.kind in "iub" and a.size <= 64:
                self.value[k] = a.astype(np.int64)
            elif a.dtype.kind == "f" and a.size <= 64:
                self.value[k] = a

    def get(self, name: str) -> Optional[Tuple[int, ...]]:
        return self.shape.get(name) if name else None

    def const_ints(self, name: str) -> Optional[List[int]]:
        v = self.value.get(name)
        return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]

    def run(self, n: Any) -> None:
        op, a = n.op, n.attrs
        ins = [self.get(i) for i in n.inputs]
        out: Optional[Tuple[int, ...]] = None
        x = ins[0] if ins else None
        try:
            if op == "Conv":
                out = self._conv(n, x)
            elif op == "BfpDense":
                O = int(a["weight_shape"][0])
                out = None if x is None else tuple(x[:-1]) + (O,)
            elif op in ("MaxPool", "AveragePool"):
                out = self._pool(n, x)
            elif op in ("GlobalAveragePool", "GlobalMaxPool"):
                out = None if x is None else tuple(x[:2]) + (1,) * (len(x) - 2)
            elif op in _UNARY:
                out = x
                if op == "Cast" and n.inputs[0] in self.value:
                    self.value[n.outputs[0]] = self.value[n.inputs[0]]
            elif op in _BINARY:
                known = [s for s in ins if s is not None]
                if len(known) == len([i for i in n.inputs if i]):
                    out = tuple(np.broadcast_shapes(*known))
                self._fold_binary(n)
            elif op.startswith("Reduce"):
                out = self._reduce(n, x)
            elif op == "Concat":
                if all(s is not None for s in ins):
                    ax = int(a.get("axis", 0)) % len(ins[0])  # type: ignore[arg-type]
                    s0 = list(ins[0])  # type: ignore[arg-type]
                    s0[ax] = int(sum(s[ax] for s in ins if s is not None))
                    out = tuple(s0)
                vals = [self.value.get(i) for i in n.inputs]
                if all(v is not None for v in vals):
                    self.value[n.outputs[0]] = np.concatenate([np.asarray(v).reshape(-1) for v in vals])  # type: ignore
            elif op == "Reshape":
                out = self._reshape(n, x)
            elif op == "Flatten":
                if x is not None:
                    ax = int(a.get("axis", 1)) % (len(x) + 1) if len(x) else 0
                    out = (int(np.prod(x[:ax], dtype=np.int64)), int(np.prod(x[ax:], dtype=np.int64)))
            elif op == "Transpose":
                if x is not None:
                    perm = a.get("perm") or list(reversed(range(len(x))))
                    out = tuple(x[int(p)] for p in perm)
            elif op == "Squeeze":
                axes = a.get("axes") if "axes" in a else (self.const_ints(n.inputs[1]) if len(n.inputs) > 1 else None)
                if x is not None:
                    drop = {int(v) % len(x) for v in axes} if axes else {i for i, s in enumerate(x) if s == 1}
                    out = tuple(s for i, s in enumerate(x) if i not in drop)
                    if n.inputs[0] in self.value:
                        self.value[n.outputs[0]] = self.value[n.inputs[0]].reshape(out)
            elif op == "Unsqueeze":
                axes = a.get("axes") if "axes" in a else (self.const_ints(n.inputs[1]) if len(n.inputs) > 1 else None)
                if x is not None and axes is not None:
                    r = len(x) + len(axes)
                    ins_at = sorted(int(v) % r for v in axes)
                    s = list(x)
                    for v in ins_at:
                        s.insert(v, 1)
                    out = tuple(s)
                    if n.inputs[0] in self.value:
                        self.value[n.outputs[0]] = self.value[n.inputs[0]].reshape(out)
            elif op == "Pad":
                pads = a.get("pads") if "pads" in a else (self.const_ints(n.inputs[1]) if len(n.inputs) > 1 else None)
                if x is not None and pads is not None:
                    r = len(x)
                    out = tuple(x[i] + int(pads[i]) + int(pads[i + r]) for i in range(r))
            elif op == "Shape":
                if x is not None:
                    self.value[n.outputs[0]] = np.asarray(x, np.int64)
                    out = (len(x),)
            elif op == "Size":
                if x is not None:
                    self.value[n.outputs[0]] = np.asarray(int(np.prod(x, dtype=np.int64)), np.int64)
                    out = ()
            elif op == "Gather":
                out = self._gather(n, x, ins[1] if len(ins) > 1 else None)
            elif op == "Slice":
                out = self._slice(n, x)
            elif op == "Split":
                self._split(n, x)
                return
            elif op in _RECURRENT:
                self._rnn(n, x)
                return
            elif op in ("ConstantOfShape", "Expand", "Tile", "Range"):
                out = self._misc(n, x)
        except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError):
            out = None
        for o in n.outputs[:1]:
            if o:
                self.shape[o] = out

    # -- helpers
    @staticmethod
    def _pads(a: Mapping[str, Any], spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
              dil: Sequence[int]) -> List[int]:
        auto = a.get("auto_pad", "NOTSET")
        nd = len(spatial)
        if auto in ("NOTSET", "", None):
            p = [int(v) for v in a.get("pads", [0] * (2 * nd))]
            return p
        if auto == "VALID":
            return [0] * (2 * nd)
        begin, end = [], []
        for d in range(nd):
            o = _cdiv(spatial[d], strides[d])
            total = max(0, (o - 1) * strides[d] + dil[d] * (kernel[d] - 1) + 1 - spatial[d])
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin + end

    def _conv(self, n: Any, x: Optional[Tuple[int, ...]]) -> Optional[Tuple[int, ...]]:
        if x is None:
            return None
        a = n.attrs
        O, Cg, *k = [int(v) for v in a["weight_shape"]]
        nd = len(x) - 2
        k = (k + [1] * nd)[:nd]
        s = [int(v) for v in a.get("strides", [1] * nd)]
        d = [int(v) for v in a.get("dilations", [1] * nd)]
        p = self._pads(a, x[2:], k, s, d)
        sp = tuple((x[2 + i] + p[i] + p[i + nd] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(nd))
        return (x[0], O) + sp

    def _pool(self, n: Any, x: Optional[Tuple[int, ...]]) -> Optional[Tuple[int, ...]]:
        if x is None:
            return None
        a = n.attrs
        k = [int(v) for v in a["kernel_shape"]]
        nd = len(k)
        s = [int(v) for v in a.get("strides", [1] * nd)]
        d = [int(v) for v in a.get("dilations", [1] * nd)]
        p = self._pads(a, x[2:], k, s, d)
        ceil = int(a.get("ceil_mode", 0))
        sp = []
        for i in range(nd):
            span = x[2 + i] + p[i] + p[i + nd] - d[i] * (k[i] - 1) - 1
            o = (_cdiv(span, s[i]) if ceil else span // s[i]) + 1
            if ceil and (o - 1) * s[i] >= x[2 + i] + p[i]:
                o -= 1
            sp.append(o)
        return tuple(x[:2]) + tuple(sp)

    def _reduce(self, n: Any, x: Optional[Tuple[int, ...]]) -> Optional[Tuple[int, ...]]:
        if x is None:
            return None
        a = n.attrs
        axes = a.get("axes")
        if axes is None and len(n.inputs) > 1 and n.inputs[1]:
            axes = self.const_ints(n.inputs[1])
            if axes is None:
                return None
        keep = int(a.get("keepdims", 1))
        ax = set(range(len(x))) if not axes else {int(v) % len(x) for v in axes}
        if not axes and int(a.get("noop_with_empty_axes", 0)):
            return x
        return tuple((1 if i in ax else s) for i, s in enumerate(x) if keep or i not in ax)

    def _reshape(self, n: Any, x: Optional[Tuple[int, ...]]) -> Optional[Tuple[int, ...]]:
        tgt = self.const_ints(n.inputs[1]) if len(n.inputs) > 1 else None
        if tgt is None or x is None:
            return None
        allowzero = int(n.attrs.get("allowzero", 0))
        s = [(x[i] if (v == 0 and not allowzero) else v) for i, v in enumerate(tgt)]
        if -1 in s:
            known = int(np.prod([v for v in s if v != -1], dtype=np.int64))
            s[s.index(-1)] = int(np.prod(x, dtype=np.int64)) // max(known, 1)
        if n.inputs[0] in self.value:
            self.value[n.outputs[0]] = self.value[n.inputs[0]].reshape(s)
        return tuple(int(v) for v in s)

    def _gather(self, n: Any, x: Optional[Tuple[int, ...]], ishape: Optional[Tuple[int, ...]]) -> Optional[Tuple[int, ...]]:
        if x is None or ishape is None:
            return None
        ax = int(n.attrs.get("axis", 0)) % len(x)
        data, idx = self.value.get(n.inputs[0]), self.value.get(n.inputs[1])
        if data is not None and idx is not None:
            self.value[n.outputs[0]] = np.take(data, idx, axis=ax)
        return tuple(x[:ax]) + tuple(ishape) + tuple(x[ax + 1:])

    def _slice(self, n: Any, x: Optional[Tuple[int, ...]]) -> Optional[Tuple[int, ...]]:
        if x is None:
            return None
        a = n.attrs
        if "starts" in a:
            starts, ends = a["starts"], a["ends"]
            axes = a.get("axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts, ends = self.const_ints(n.inputs[1]), self.const_ints(n.inputs[2])
            axes_in = self.const_ints(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3] else None
            steps_in = self.const_ints(n.inputs[4]) if len(n.inputs) > 4 and n.inputs[4] else None
            if starts is None or ends is None:
                return None
            axes = axes_in if axes_in is not None else list(range(len(starts)))
            steps = steps_in if steps_in is not None else [1] * len(starts)
        sl = [slice(None)] * len(x)
        for st, en, ax, sp in zip(starts, ends, axes, steps):
            sl[int(ax) % len(x)] = slice(int(st), int(en), int(sp))
        if n.inputs[0] in self.value:
            self.value[n.outputs[0]] = self.value[n.inputs[0]][tuple(sl)]
        return tuple(len(range(*s.indices(d))) for s, d in zip(sl, x))

    def _rnn(self, n: Any, x: Optional[Tuple[int, ...]]) -> None:
        """Y [T, D, B, H] (layout 1: [B, T, D, H]), Y_h and Y_c [D, B, H] ([B, D, H])."""
        a = n.attrs
        D = 2 if a.get("direction", "forward") == "bidirectional" else 1
        H = int(a["hidden_size"])
        shapes: List[Optional[Tuple[int, ...]]] = [None, None, None]
        if x is not None and len(x) == 3:
            if int(a.get("layout", 0)):
                B, T = x[0], x[1]
                shapes = [(B, T, D, H), (B, D, H), (B, D, H)]
            else:
                T, B = x[0], x[1]
                shapes = [(T, D, B, H), (D, B, H), (D, B, H)]
        for o, shp in zip(n.outputs, shapes):
            if o:
                self.shape[o] = shp

    def _split(self, n: Any, x: Optional[Tuple[int, ...]]) -> None:
        outs = [o for o in n.outputs]
        if x is None:
            for o in outs:
                self.shape[o] = None
            return
        ax = int(n.attrs.get("axis", 0)) % len(x)
        split = n.attrs.get("split") or (self.const_ints(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] else None)
        if not split:
            split = [x[ax] // len(outs)] * len(outs)
        for o, sz in zip(outs, split):
            s = list(x)
            s[ax] = int(sz)
            self.shape[o] = tuple(s)

    def _misc(self, n: Any, x: Optional[Tuple[int, ...]]) -> Optional[Tuple[int, ...]]:
        if n.op == "ConstantOfShape":
            v = self.const_ints(n.inputs[0])
            return None if v is None else tuple(v)
        if n.op == "Expand":
            v = self.const_ints(n.inputs[1])
            return None if v is None or x is None else tuple(np.broadcast_shapes(x, tuple(v)))
        if n.op == "Tile":
            v = self.const_ints(n.inputs[1])
            return None if v is None or x is None else tuple(s * r for s, r in zip(x, v))
        return None

    def _fold_binary(self, n: Any) -> None:
        vals = [self.value.get(i) for i in n.inputs]
        if not vals or any(v is None for v in vals) or n.op not in ("Add", "Sub", "Mul", "Div"):
            return
        fn: Dict[str, Callable[[Any, Any], Any]] = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply,
                                                    "Div": np.floor_divide}
        self.value[n.outputs[0]] = fn[n.op](vals[0], vals[1])


# ---------------------------------------------------------------- built-in architectures
class _Builder:
    """Writes a zoo architecture as plan-graph nodes (NCHW, BN folded where the compiler folds
    it), with weight shapes only: the cycle model needs no weights."""

    def __init__(self) -> None:
        from ..runtime.graph import Graph, Node, ValueInfo

        self._Node, self._Graph, self._VI = Node, Graph, ValueInfo
        self.nodes: List[Any] = []
        self.consts: Dict[str, np.ndarray] = {}
        self.i = 0

    def _name(self, base: str) -> str:
        self.i += 1
        return f"{base}_{self.i}" if not base.endswith("/") else f"{base}{self.i}"

    def node(self, op: str, inputs: List[str], name: str, **attrs: Any) -> str:
        out = f"{name}:0"
        self.nodes.append(self._Node(op, name, inputs, [out], attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, pad: int, name: str, groups: int = 1,
             dilation: int = 1, bias: bool = True) -> str:
        return self.node("Conv", [x, "", f"{name}/b" if bias else ""], name, weight_shape=[cout, cin // groups, k, k],
                         strides=[stride, stride], pads=[pad] * 4, group=groups, dilations=[dilation, dilation])

    def dense(self, x: str, cin: int, cout: int, name: str) -> str:
        return self.node("BfpDense", [x, "", f"{name}/b"], name, weight_shape=[cout, cin, 1, 1])

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def scale_shift(self, x: str, c: int, name: str) -> str:
        """A batch-norm the compiler cannot fold (pre-activation): Mul then Add, per channel."""
        g, b = f"{name}/scale", f"{name}/shift"
        self.consts[g] = np.ones((1, c, 1, 1), np.float32)
        self.consts[b] = np.zeros((1, c, 1, 1), np.float32)
        return self.node("Add", [self.node("Mul", [x, g], f"{name}/mul"), b], f"{name}/add")

    def pool(self, x: str, kind: str, k: int, stride: int, pad: int, name: str, ceil: int = 0) -> str:
        return self.node(kind, [x], name, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
                         ceil_mode=ceil)

    def graph(self, inp: str, shape: Sequence[Optional[int]], outputs: List[str]) -> Any:
        g = self._Graph(self.nodes, self.consts, [self._VI(inp, "float32", list(shape))],
                        [self._VI(o, "float32", None) for o in outputs])
        return g


def _resnet(units: Sequence[int], scope: str) -> Tuple[Any, str]:
    b = _Builder()
    x = "input:0"
    x = b.relu(b.conv(x, 3, 64, 7, 2, 3, f"{scope}/conv1"), f"{scope}/conv1/Relu")
    x = b.pool(x, "MaxPool", 3, 2, 1, f"{scope}/pool1")
    cin = 64
    for bi, (n, depth) in enumerate(zip(units, (64, 128, 256, 512))):
        for u in range(n):
            p = f"{scope}/block{bi + 1}/unit_{u + 1}/bottleneck_v1"
            stride = 2 if (u == 0 and bi > 0) else 1
            sc = b.conv(x, cin, 4 * depth, 1, stride, 0, f"{p}/shortcut") if u == 0 else x
            r = b.relu(b.conv(x, cin, depth, 1, stride, 0, f"{p}/conv1"), f"{p}/conv1/Relu")
            r = b.relu(b.conv(r, depth, depth, 3, 1, 1, f"{p}/conv2"), f"{p}/conv2/Relu")
            r = b.conv(r, depth, 4 * depth, 1, 1, 0, f"{p}/conv3")
            x = b.relu(b.node("Add", [sc, r], f"{p}/add"), f"{p}/Relu")
            cin = 4 * depth
    x = b.node("GlobalAveragePool", [x], f"{scope}/pool5")
    y = b.conv(x, 2048, 1000, 1, 1, 0, f"{scope}/logits")
    b.consts[f"{scope}/SpatialSqueeze/shape"] = np.asarray([-1, 1000], np.int64)
    y = b.node("Reshape", [y, f"{scope}/SpatialSqueeze/shape"], f"{scope}/SpatialSqueeze")
    y = b.node("Softmax", [y], f"{scope}/predictions/Softmax", axis=-1)
    return b.graph("input:0", [None, 3, 224, 224], [y]), "input:0"


def _vgg_convs(b: _Builder, x: str, scope: str, pool: Callable[[int, str], str]) -> List[str]:
    ends = []
    cin = 3
    for i, (n, c) in enumerate(((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))):
        for j in range(n):
            nm = f"{scope}/conv{i + 1}/conv{i + 1}_{j + 1}"
            x = b.relu(b.conv(x, cin, c, 3, 1, 1, nm), f"{nm}/Relu")
            cin = c
        ends.append(x)
        x = pool(i, x)
    return ends + [x]


def _vgg16() -> Tuple[Any, str]:
    b = _Builder()
    s = "vgg_16"
    x = _vgg_convs(b, "input:0", s, lambda i, x: b.pool(x, "MaxPool", 2, 2, 0, f"{s}/pool{i + 1}"))[-1]
    x = b.relu(b.conv(x, 512, 4096, 7, 1, 0, f"{s}/fc6"), f"{s}/fc6/Relu")
    x = b.relu(b.conv(x, 4096, 4096, 1, 1, 0, f"{s}/fc7"), f"{s}/fc7/Relu")
    y = b.conv(x, 4096, 1000, 1, 1, 0, f"{s}/fc8")
    b.consts[f"{s}/fc8/squeezed/shape"] = np.asarray([-1, 1000], np.int64)
    y = b.node("Reshape", [y, f"{s}/fc8/squeezed/shape"], f"{s}/fc8/squeezed")
    return b.graph("input:0", [None, 3, 224, 224], [y]), "input:0"


def _densenet121() -> Tuple[Any, str]:
    b = _Builder()
    s = "densenet121"
    x = b.relu(b.conv("input:0", 3, 64, 7, 2, 3, f"{s}/conv1", bias=False), f"{s}/conv1/Relu")
    x = b.pool(x, "MaxPool", 3, 2, 1, f"{s}/pool1")
    c = 64
    for bi, n in enumerate((6, 12, 24, 16)):
        for i in range(n):
            p = f"{s}/dense_block{bi + 1}/conv_block{i + 1}"
            y = b.relu(b.scale_shift(x, c, f"{p}/x1/BatchNorm"), f"{p}/x1/Relu")
            y = b.relu(b.conv(y, c, 128, 1, 1, 0, f"{p}/x1/Conv", bias=False), f"{p}/x2/Relu")
            y = b.conv(y, 128, 32, 3, 1, 1, f"{p}/x2/Conv", bias=False)
            x = b.node("Concat", [x, y], f"{p}/concat", axis=1)
            c += 32
        if bi < 3:
            p = f"{s}/transition_block{bi + 1}/blk"
            x = b.relu(b.scale_shift(x, c, f"{p}/BatchNorm"), f"{p}/Relu")
            x = b.conv(x, c, c // 2, 1, 1, 0, f"{p}/Conv", bias=False)
            c //= 2
            x = b.pool(x, "AveragePool", 2, 2, 0, f"{p}/AvgPool")
    x = b.relu(b.scale_shift(x, c, f"{s}/final_block/BatchNorm"), f"{s}/final_block/Relu")
    x = b.node("GlobalAveragePool", [x], f"{s}/final_block/global_avg_pool")
    y = b.conv(x, c, 1000, 1, 1, 0, f"{s}/logits")
    b.consts[f"{s}/SpatialSqueeze/shape"] = np.asarray([-1, 1000], np.int64)
    y = b.node("Reshape", [y, f"{s}/SpatialSqueeze/shape"], f"{s}/SpatialSqueeze")
    y = b.node("Softmax", [y], f"{s}/predictions/Softmax", axis=-1)
    return b.graph("input:0", [None, 3, 224, 224], [y]), "input:0"


def _ssdvgg() -> Tuple[Any, str]:
    b = _Builder()
    s = "ssd_300_vgg"

    def pool(i: int, x: str) -> str:
        if i < 3:
            return b.pool(x, "MaxPool", 2, 2, 0, f"{s}/pool{i + 1}")
        if i == 3:  # 2x2/2 SAME: 37 -> 19
            return b.pool(x, "MaxPool", 2, 2, 0, f"{s}/pool4", ceil=1)
        return b.pool(x, "MaxPool", 3, 1, 1, f"{s}/pool5")

    ends = _vgg_convs(b, "input:0", s, pool)
    sources = [(ends[3], 512)]
    x = b.relu(b.conv(ends[-1], 512, 1024, 3, 1, 6, f"{s}/conv6", dilation=6), f"{s}/conv6/Relu")
    x = b.relu(b.conv(x, 1024, 1024, 1, 1, 0, f"{s}/conv7"), f"{s}/conv7/Relu")
    sources.append((x, 1024))
    cin = 1024
    for name, mid, out, stride, pad in (("block8", 256, 512, 2, 1), ("block9", 128, 256, 2, 1),
                                        ("block10", 128, 256, 1, 0), ("block11", 128, 256, 1, 0)):
        x = b.relu(b.conv(x, cin, mid, 1, 1, 0, f"{s}/{name}/conv1x1"), f"{s}/{name}/conv1x1/Relu")
        x = b.relu(b.conv(x, mid, out, 3, stride, pad, f"{s}/{name}/conv3x3"), f"{s}/{name}/conv3x3/Relu")
        sources.append((x, out))
        cin = out
    outs = []
    for (src, c), (name, anchors) in zip(sources, (("block4", 4), ("block7", 6), ("block8", 6), ("block9", 6),
                                                   ("block10", 4), ("block11", 4))):
        p = f"{s}/{name}_box"
        if name == "block4":  # L2 normalisation with plain ops, then a per-channel scale
            sq = b.node("Mul", [src, src], f"{p}/L2Normalization/Square")
            sm = b.node("ReduceSum", [sq], f"{p}/L2Normalization/Sum", axes=[1], keepdims=1)
            b.consts[f"{p}/eps"] = np.asarray(1e-12, np.float32)
            inv = b.node("Reciprocal", [b.node("Sqrt", [b.node("Max", [sm, f"{p}/eps"], f"{p}/L2Normalization/Maximum")],
                                               f"{p}/L2Normalization/Sqrt")], f"{p}/L2Normalization/Rsqrt")
            b.consts[f"{p}/gamma"] = np.ones((1, c, 1, 1), np.float32)
            src = b.node("Mul", [b.node("Mul", [src, inv], f"{p}/L2Normalization/mul_x")], f"{p}/L2Normalization/mul")
            src = b.node("Mul", [src, f"{p}/gamma"], f"{p}/L2Normalization/scale")
        for head, k in (("conv_loc", 4), ("conv_cls", 21)):
            outs.append(b.conv(src, c, anchors * k, 3, 1, 1, f"{p}/{head}"))
    return b.graph("input:0", [None, 3, 300, 300], outs), "input:0"


def _rnn_layer_model(cell: str, H: int, T: int) -> Tuple[Any, str]:
    """One forward recurrent layer of hidden size ``H`` (input size ``H``) over ``T`` steps,
    batch-first input ``[N, T, H]`` (DeepBench's inference RNN shapes)."""
    b = _Builder()
    G = 4 if cell == "LSTM" else 3
    xt = b.node("Transpose", ["input:0"], "to_sequence_first", perm=[1, 0, 2])
    attrs: Dict[str, Any] = {"hidden_size": H, "weight_shape": [G * H, H], "recurrence_shape": [G * H, H]}
    if cell == "GRU":
        attrs["linear_before_reset"] = 1
    b.nodes.append(b._Node(cell, cell.lower(), [xt, "", ""], ["y:0", "h:0"], attrs))
    return b.graph("input:0", [None, T, H], ["h:0"]), "input:0"


#: Model name -> builder of its plan-shaped graph (the zoo architectures of bfpaccel.models;
#: ``gru2816``: DeepBench's GRU of hidden size 2816 over 750 steps, 71 G operations per
#: inference at batch 1; ``lstm1024``: an LSTM of hidden size 1024 over 25 steps).
BUILTIN_MODELS: Dict[str, Callable[[], Tuple[Any, str]]] = {
    "gru2816": lambda: _rnn_layer_model("GRU", 2816, 750),
    "lstm1024": lambda: _rnn_layer_model("LSTM", 1024, 25),
    "resnet50": lambda: _resnet((3, 4, 6, 3), "resnet_v1_50"),
    "resnet152": lambda: _resnet((3, 8, 36, 3), "resnet_v1_152"),
    "vgg16": _vgg16,
    "densenet121": _densenet121,
    "ssdvgg": _ssdvgg,
}


# ---------------------------------------------------------------- the estimate
@dataclasses.dataclass
class Estimate:
    """The modelled latency of one model on one NPU.

    Attributes:
        model, npu: what was estimated (the NPU as an :class:`NpuConfig`).
        batch: input vectors per inference.
        layers: one dict per layer: ``name, kind, op, macs, cycles, bound, utilisation``, plus
            ``m, k, n, groups, compute_cycles, weight_cycles, vector_cycles, fill_cycles,
            weight_bytes, resident, vector_ops, fused, output_shape, ms``.
        total_cycles, total_ms: the sum over layers (layers run one after another).
        utilization: total MACs / (total cycles * peak MACs per cycle).
        bound_counts: bound -> number of layers (``compute``, ``weight_bandwidth``, ``vector``).
        assumptions: what the estimate assumed where the configuration is silent.
        ignored_ops: op -> count of free layout ops (Reshape, Transpose, Concat, ...).

    Example:
        >>> from bfpaccel.perfmodel import estimate
        >>> e = estimate("resnet50", "brainwave-s10")
        >>> e.total_ms > 0 and e.bound_counts["compute"] > 0
        True
    """

    model: str
    npu: NpuConfig
    batch: int
    input_shapes: Dict[str, List[int]]
    layers: List[Dict[str, Any]]
    total_cycles: int
    total_macs: int
    weight_bytes: int
    assumptions: List[str]
    ignored_ops: Dict[str, int]

    @property
    def total_ms(self) -> float:
        """Modelled latency of one inference (all ``batch`` inputs), in milliseconds."""
        return self.total_cycles / (float(self.npu.clock_mhz) * 1e3)  # type: ignore[arg-type]

    @property
    def peak_macs_per_cycle(self) -> int:
        return peak_macs_per_cycle(self.npu)

    @property
    def utilization(self) -> float:
        """Fraction of the MVM's peak MACs the whole inference uses."""
        return self.total_macs / max(1, self.total_cycles * self.peak_macs_per_cycle)

    utilisation = utilization

    @property
    def effective_tops(self) -> float:
        """``2 * MACs / latency`` in tera-operations per second."""
        return 2.0 * self.total_macs / (self.total_ms * 1e-3) / 1e12 if self.total_cycles else 0.0

    @property
    def bound_counts(self) -> Dict[str, int]:
        out = {"compute": 0, "weight_bandwidth": 0, "vector": 0}
        for layer in self.layers:
            out[layer["bound"]] = out.get(layer["bound"], 0) + 1
        return out

    @property
    def bound_cycles(self) -> Dict[str, int]:
        """Bound -> cycles spent in layers with that bound."""
        out = {"compute": 0, "weight_bandwidth": 0, "vector": 0}
        for layer in self.layers:
            out[layer["bound"]] = out.get(layer["bound"], 0) + layer["cycles"]
        return out

    def to_json(self) -> Dict[str, Any]:
        """Everything as JSON-ready data (``json.dumps(e.to_json())``)."""
        return {
            "model": self.model,
            "npu": self.npu.to_json(),
            "batch": self.batch,
            "input_shapes": self.input_shapes,
            "peak_macs_per_cycle": self.peak_macs_per_cycle,
            "peak_tops": peak_tops(self.npu),
            "total_cycles": self.total_cycles,
            "total_ms": self.total_ms,
            "total_macs": self.total_macs,
            "effective_tops": self.effective_tops,
            "utilization": self.utilization,
            "weight_bytes": self.weight_bytes,
            "bound_counts": self.bound_counts,
            "bound_cycles": self.bound_cycles,
            "assumptions": list(self.assumptions),
            "ignored_ops": dict(self.ignored_ops),
            "layers": [dict(layer) for layer in self.layers],
        }

    def summary(self) -> str:
        """A few lines: latency, throughput, utilisation, bounds."""
        bc = self.bound_counts
        return (f"{self.model} on {self.npu.name} ({self.npu.device or 'NPU'}), batch {self.batch}: "
                f"{self.total_ms:.3f} ms ({self.total_cycles:,} cycles at {self.npu.clock_mhz:g} MHz), "
                f"{self.total_macs / 1e9:.2f} GMAC, {self.effective_tops:.2f} of {peak_tops(self.npu):.1f} peak TOPS "
                f"(utilisation {100 * self.utilization:.1f}%); layers bound by compute {bc['compute']}, "
                f"weight bandwidth {bc['weight_bandwidth']}, vector {bc['vector']}")

    def table(self, top: Optional[int] = None) -> str:
        """The per-layer table (``top``: only the slowest ``top`` layers), then the summary."""
        rows = self.layers
        if top is not None:
            rows = sorted(rows, key=lambda r: -r["cycles"])[:top]
        w = max([len(r["name"]) for r in rows] + [5])
        w = min(w, 60)
        lines = [f"{'layer':<{w}} {'kind':<10} {'M':>7} {'K':>6} {'N':>6} {'MMAC':>9} {'cycles':>10} {'ms':>8} "
                 f"{'util%':>6} bound"]
        for r in rows:
            name = r["name"] if len(r["name"]) <= w else "…" + r["name"][-(w - 1):]
            lines.append(f"{name:<{w}} {r['kind']:<10} {r['m'] or '':>7} {r['k'] or '':>6} {r['n'] or '':>6} "
                         f"{r['macs'] / 1e6:>9.2f} {r['cycles']:>10,} {r['ms']:>8.4f} {100 * r['utilisation']:>6.1f} "
                         f"{r['bound']}")
        lines.append(self.summary())
        for a in self.assumptions:
            lines.append(f"  assumption: {a}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Estimate({self.summary()})"


ModelLike = Union[str, "os.PathLike[str]", Any]


def _load_model(model: ModelLike) -> Tuple[Any, str, Optional[float]]:
    """-> (graph, label, plan weight bits or None)."""
    from ..runtime.plan import Plan

    if isinstance(model, Plan):
        return model.graph, "plan", (model.weight_format.bits_per_element if model.weight_format.is_block else None)
    if hasattr(model, "nodes") and hasattr(model, "inputs") and hasattr(model, "consts"):
        return model, "graph", None
    if isinstance(model, (str, os.PathLike)):
        s = os.fspath(model)
        if s.lower() in BUILTIN_MODELS:
            g, _ = BUILTIN_MODELS[s.lower()]()
            return g, s.lower(), None
        if s.endswith(".bfpplan"):
            from ..runtime.plan import load_plan

            p = load_plan(s)
            return p.graph, os.path.basename(s), (p.weight_format.bits_per_element if p.weight_format.is_block else None)
        if s.endswith(".onnx") or os.path.isfile(s):
            from ..runtime.compiler import compile as compile_plan

            p = compile_plan(s, format="msfp16")
            return p.graph, os.path.basename(s), p.weight_format.bits_per_element
        raise ValueError(f"unknown model {s!r}: give one of {', '.join(BUILTIN_MODELS)}, an .onnx or a .bfpplan path, "
                         "or a compiled Plan")
    try:
        import onnx

        if isinstance(model, onnx.ModelProto):
            from ..runtime.compiler import compile as compile_plan

            p = compile_plan(model, format="msfp16")
            return p.graph, model.graph.name or "onnx", p.weight_format.bits_per_element
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"model must be a name, a path, a Plan or an onnx.ModelProto, got {type(model).__name__}")


def _input_shapes(graph: Any, batch: int,
                  input_shape: Union[None, Sequence[Optional[int]], Mapping[str, Sequence[Optional[int]]]]
                  ) -> Dict[str, Tuple[int, ...]]:
    given: Dict[str, Sequence[Optional[int]]] = {}
    if isinstance(input_shape, Mapping):
        given = dict(input_shape)
        unknown = set(given) - {v.name for v in graph.inputs}
        if unknown:
            raise ValueError(f"input_shape names {sorted(unknown)} are not graph inputs "
                             f"{[v.name for v in graph.inputs]}")
    elif input_shape is not None:
        if len(graph.inputs) != 1:
            raise ValueError(f"the model has {len(graph.inputs)} inputs; give input_shape as a dict name -> shape")
        given = {graph.inputs[0].name: list(input_shape)}
    out: Dict[str, Tuple[int, ...]] = {}
    for vi in graph.inputs:
        shp = given.get(vi.name, vi.shape)
        if shp is None:
            raise ValueError(f"input {vi.name!r} has no declared shape; pass input_shape")
        s = [None if (d is None or int(d) < 0) else int(d) for d in shp]
        if s and s[0] is None:
            s[0] = batch
        elif s and vi.name in given and s[0] != batch and batch != 1:
            raise ValueError(f"input_shape {list(shp)} fixes the batch at {s[0]} but batch={batch}")
        if any(d is None for d in s):
            raise ValueError(f"input {vi.name!r} has dynamic dimensions {list(vi.shape or [])} besides the batch; "
                             "pass input_shape with every dimension")
        out[vi.name] = tuple(int(d) for d in s)  # type: ignore[arg-type]
    return out


def _rnn_layer(n: Any, x: Optional[Tuple[int, ...]], cfg: NpuConfig, mfu_rate: int, chain_ops: int, fill: int,
               bits: float) -> Dict[str, Any]:
    """The cycles of a recurrent layer (a plan's LSTM / GRU node).

    Its steps are serial (step t + 1 multiplies step t's h), directions one after the other.
    One step of one direction: the matrix-vector products ``x_t W^T`` and ``h R^T`` on the MVM
    (GRU without linear_before_reset: ``(r * h) R_h^T`` waits for r, a third product in
    series), each costed as :func:`gemm_cycles` of its batch rows, and the gate arithmetic as
    an MFU chain of ``_RNN_STEP_OPS`` ops over the ``gates * H`` outputs, which streams the
    products as they come: ``step = max(MVM, MFU chain) + pipeline fill``.
    """
    a = n.attrs
    if x is None or len(x) != 3:
        raise ValueError(f"cannot infer the input shape of {n.op} {n.name!r}; pass input_shape")
    layout = int(a.get("layout", 0))
    B, T = (x[0], x[1]) if layout else (x[1], x[0])
    I = int(x[2])
    H = int(a["hidden_size"])
    D = 2 if a.get("direction", "forward") == "bidirectional" else 1
    G = 4 if n.op == "LSTM" else 3
    split = n.op == "GRU" and not int(a.get("linear_before_reset", 0))
    mvm = gemm_cycles(B, I, G * H, cfg)
    mvm += gemm_cycles(B, H, 2 * H, cfg) + gemm_cycles(B, H, H, cfg) if split else gemm_cycles(B, H, G * H, cfg)
    n_ops = _RNN_STEP_OPS[n.op]
    vec = _cdiv(n_ops, chain_ops) * _cdiv(B * G * H, mfu_rate)
    steps = D * T
    return {"m": steps * B, "k": I + H, "n": G * H, "macs": steps * B * G * H * (I + H),
            "compute_cycles": steps * mvm, "vector_cycles": steps * vec, "fill_cycles": steps * fill,
            "cycles": steps * (max(mvm, vec) + fill), "weight_bytes": int(math.ceil(D * G * H * (I + H) * bits / 8)),
            "vector_ops": steps * n_ops * B * G * H, "mapped": f"{steps} serial steps: mvm + mfu chain",
            "fused": [f"{n_ops} gate ops per step"]}


def _vector_cost(n: Any, sh: _Shapes) -> int:
    """Element-operations an MFU spends on vector op ``n``."""
    out = sh.get(n.outputs[0])
    x = sh.get(n.inputs[0]) if n.inputs else None
    size = lambda s: int(np.prod(s, dtype=np.int64)) if s is not None else 0  # noqa: E731
    if n.op in ("MaxPool", "AveragePool"):
        k = int(np.prod([int(v) for v in n.attrs["kernel_shape"]], dtype=np.int64))
        return size(out) * k
    if n.op in ("GlobalAveragePool", "GlobalMaxPool") or n.op.startswith("Reduce"):
        return size(x)
    if n.op in ("Softmax", "LogSoftmax"):
        return 3 * size(x)  # exp, sum, divide
    if n.op == "Sum":
        return size(out) * max(1, len(n.inputs) - 1)
    return size(out)


def estimate(model: ModelLike, npu: Union[str, "os.PathLike[str]", NpuConfig] = "brainwave-s10", batch: int = 1,
             input_shape: Union[None, Sequence[Optional[int]], Mapping[str, Sequence[Optional[int]]]] = None
             ) -> Estimate:
    """Models the latency of ``model`` on ``npu``.

    Args:
        model: a zoo name (``resnet50``, ``resnet152``, ``vgg16``, ``densenet121``, ``ssdvgg``:
            built-in descriptions of the bfpaccel zoo architectures), a compiled
            :class:`~bfpaccel.Plan`, a ``.bfpplan`` path, or an ``.onnx`` path / ``ModelProto``
            (compiled with ``format="msfp16"`` first).
        npu: a shipped NPU name (``brainwave-s10``, ``brainwave-a10``), a YAML path or an
            :class:`NpuConfig`.
        batch: inputs per inference (fills the dynamic leading dimension).
        input_shape: the full input shape (or name -> shape), where the model's is dynamic or
            to override it; default: the declared shape with ``batch`` as its first dimension.

    Returns:
        An :class:`Estimate` (``.total_ms``, ``.layers``, ``.table()``, ``.to_json()``).

    Raises:
        NpuConfigError: the NPU lacks a figure the estimate needs (named).
        ValueError: an unknown model, shapes that cannot be inferred.

    Example:
        >>> from bfpaccel.perfmodel import estimate
        >>> round(estimate("resnet50", "brainwave-s10").total_ms, 3)  # doctest: +SKIP
    """
    if int(batch) < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    batch = int(batch)
    cfg = npu if isinstance(npu, NpuConfig) else load_npu(npu)
    cfg.require(REQUIRED_FIGURES, "an estimate")
    graph, label, plan_bits = _load_model(model)
    shapes_in = _input_shapes(graph, batch, input_shape)
    sh = _Shapes(graph.consts)
    sh.shape.update(shapes_in)

    nd, lanes, tiles = int(cfg.native_dim), int(cfg.lanes), int(cfg.tiles)  # type: ignore[arg-type]
    peak = tiles * lanes * nd
    assumptions: List[str] = []
    mfu_rate = cfg.mfu_ops_per_cycle
    if mfu_rate is None:
        mfu_rate = lanes
        assumptions.append(f"mfu_ops_per_cycle not given: the MFU chain streams {lanes} elements/cycle (= lanes)")
    chain_ops = cfg.mfu_chain_ops
    if chain_ops is None:
        chain_ops = 1
        assumptions.append("mfu_chain_ops not given: every vector op is its own MFU pass")
    fill = cfg.pipeline_fill_cycles
    if fill is None:
        fill = 0
        assumptions.append("pipeline_fill_cycles not given: no per-layer pipeline fill is charged (optimistic)")
    bits = float(cfg.weight_bits)  # type: ignore[arg-type]
    if plan_bits is not None and abs(plan_bits - bits) > 1e-9:
        assumptions.append(f"the plan's weights are {plan_bits:g} bits/element; the NPU datapath's "
                           f"{cfg.weight_format or 'format'} ({bits:g} bits) is what the MRF and DRAM are charged")

    # pass 1: shapes, and which vector ops chain onto which matrix op
    consumers: Dict[str, List[Any]] = {}
    for n in graph.nodes:
        for i in n.inputs:
            if i:
                consumers.setdefault(i, []).append(n)
    outs = set(graph.output_names()) if hasattr(graph, "output_names") else {o.name for o in graph.outputs}
    chain_of: Dict[str, str] = {}  # value name -> name of the layer whose MFU chain produced it
    layers: Dict[str, Dict[str, Any]] = {}
    order: List[str] = []
    ignored: Dict[str, int] = {}

    def new_layer(n: Any, kind: str) -> Dict[str, Any]:
        d = {"name": n.name, "kind": kind, "op": n.op, "m": 0, "k": 0, "n": 0, "groups": 1, "macs": 0,
             "compute_cycles": 0, "weight_cycles": 0, "vector_cycles": 0, "fill_cycles": fill, "weight_bytes": 0,
             "resident": True, "vector_ops": 0, "fused": [], "output_shape": None, "mapped": "",
             "_chain": []}
        layers[n.name] = d
        order.append(n.name)
        return d

    for n in graph.nodes:
        sh.run(n)
        out_shape = sh.get(n.outputs[0]) if n.outputs else None
        if n.op in _MATRIX:
            x = sh.get(n.inputs[0])
            if x is None or out_shape is None:
                raise ValueError(f"cannot infer the input shape of {n.op} {n.name!r}; pass input_shape, or the graph "
                                 "computes shapes in a way this model does not follow")
            ws = [int(v) for v in n.attrs["weight_shape"]]
            O, Cg = ws[0], ws[1]
            ktaps = int(np.prod(ws[2:], dtype=np.int64)) if len(ws) > 2 else 1
            if n.op == "Conv":
                groups = int(n.attrs.get("group", 1))
                M = int(np.prod((out_shape[0],) + tuple(out_shape[2:]), dtype=np.int64))
                K, Og = Cg * ktaps, O // groups
                kind = "depthwise" if groups > 1 and Cg == 1 and Og == 1 else ("group_conv" if groups > 1 else "conv")
            else:
                groups, M, K, Og, kind = 1, int(np.prod(x[:-1], dtype=np.int64)), Cg * ktaps, O, "dense"
            d = new_layer(n, kind)
            d.update(m=M, k=K, n=Og, groups=groups, macs=groups * M * K * Og, output_shape=list(out_shape), mapped="mvm",
                     compute_cycles=gemm_cycles(M, K, Og, cfg, groups))
            d["weight_bytes"] = int(math.ceil(O * K * bits / 8))
            if len(n.inputs) > 2 and n.inputs[2]:
                d["_chain"].append((n.name + "/bias", int(np.prod(out_shape, dtype=np.int64))))
            chain_of[n.outputs[0]] = n.name
            continue
        if n.op in _RECURRENT:
            d = new_layer(n, "recurrent")
            d.update(_rnn_layer(n, sh.get(n.inputs[0]), cfg, mfu_rate, chain_ops, fill, bits))
            d["output_shape"] = list(out_shape) if out_shape is not None else None
            continue
        if n.op in _LAYOUT or n.op.startswith("Constant"):
            ignored[n.op] = ignored.get(n.op, 0) + 1
            # a relabelling of one chain's single-use result keeps that chain going
            if (n.op in _RELABEL and n.inputs and n.inputs[0] in chain_of
                    and len(consumers.get(n.inputs[0], [])) == 1):
                chain_of[n.outputs[0]] = chain_of[n.inputs[0]]
            continue
        cost = _vector_cost(n, sh)
        # the MFU chain that streams the latest-produced operand takes the op
        srcs = [chain_of[i] for i in n.inputs if i in chain_of]
        src = max(srcs, key=order.index) if srcs else None
        if n.op in _CHAINABLE and src is not None and n.inputs and n.inputs[0]:
            d = layers[src]
            d["_chain"].append((n.name, cost))
            d["fused"].append(n.name)
            d["output_shape"] = list(out_shape) if out_shape is not None else d["output_shape"]
        else:
            d = new_layer(n, "vector")
            d["_chain"].append((n.name, cost))
            d["output_shape"] = list(out_shape) if out_shape is not None else None
        # the chain continues only while this op's result feeds nothing but the next chain op
        users = consumers.get(n.outputs[0], [])
        if n.op in _CHAINABLE and len(users) == 1 and n.outputs[0] not in outs:
            chain_of[n.outputs[0]] = d["name"]

    # pass 2: weight residency (greedy pinning in graph order), cycles, bounds
    assumptions_mrf = cfg.mrf_bytes is None
    total_w = sum(layers[k]["weight_bytes"] for k in order)
    if assumptions_mrf:
        assumptions.append(f"mrf_bytes not given: all {total_w / 2**20:.1f} MiB of weights are assumed pinned on "
                           "chip (Brainwave's persistent model; a model larger than one FPGA is split over several, "
                           "which this single-device model does not charge)")
    left = cfg.mrf_bytes if cfg.mrf_bytes is not None else None
    streamed: List[str] = []
    clock_hz = float(cfg.clock_mhz) * 1e6  # type: ignore[arg-type]
    total_cycles = 0
    total_macs = 0
    rows: List[Dict[str, Any]] = []
    for name in order:
        d = layers[name]
        if d["weight_bytes"]:
            if left is None or d["weight_bytes"] <= left:
                if left is not None:
                    left -= d["weight_bytes"]
            else:
                d["resident"] = False
                streamed.append(name)
        chain = d.pop("_chain")
        if d["kind"] == "recurrent":  # its cycles are the sum over its serial time steps (_rnn_layer)
            parts = {"compute": d["compute_cycles"], "vector": d["vector_cycles"]}
            d["bound"] = max(parts, key=lambda k: (parts[k], k == "compute"))
            d["ms"] = d["cycles"] / clock_hz * 1e3
            d["utilisation"] = d["macs"] / (d["cycles"] * peak) if d["cycles"] else 0.0
            total_cycles += d["cycles"]
            total_macs += d["macs"]
            rows.append({k: d[k] for k in ("name", "kind", "macs", "cycles", "bound", "utilisation", "op", "m", "k",
                                           "n", "groups", "compute_cycles", "weight_cycles", "vector_cycles",
                                           "fill_cycles", "weight_bytes", "resident", "vector_ops", "fused",
                                           "output_shape", "mapped", "ms")})
            continue
        if chain:
            n_ops = len(chain)
            elems = max(c for _, c in chain)
            d["vector_ops"] = int(sum(c for _, c in chain))
            d["vector_cycles"] = _cdiv(n_ops, chain_ops) * _cdiv(elems, mfu_rate) if elems else 0
        if d["kind"] == "depthwise":
            # the compiler's other choice: per-channel multiply-adds on the MFUs, one pass per
            # tap over M * channels elements (then the chain above); it takes the cheaper one
            taps = _cdiv(d["m"] * d["groups"] * d["k"], mfu_rate)
            if taps < d["compute_cycles"]:
                d["mapped"] = "mfu"
                d["compute_cycles"] = 0
                d["vector_cycles"] += taps
        if not d["resident"]:
            if cfg.dram_gbps is None:
                cfg.require(("dram_gbps",), f"streaming layer {name!r}'s {d['weight_bytes']:,} weight bytes "
                            f"(the MRF of {cfg.mrf_bytes:,} bytes is full)")
            d["weight_cycles"] = int(math.ceil(d["weight_bytes"] / (float(cfg.dram_gbps) * 1e9)  # type: ignore[arg-type]
                                               * clock_hz))
        parts = {"compute": d["compute_cycles"], "weight_bandwidth": d["weight_cycles"], "vector": d["vector_cycles"]}
        bound = max(parts, key=lambda k: (parts[k], k == "compute"))
        d["bound"] = bound
        d["cycles"] = int(parts[bound] + d["fill_cycles"])
        d["ms"] = d["cycles"] / clock_hz * 1e3
        d["utilisation"] = d["macs"] / (d["cycles"] * peak) if d["cycles"] else 0.0
        total_cycles += d["cycles"]
        total_macs += d["macs"]
        rows.append({k: d[k] for k in ("name", "kind", "macs", "cycles", "bound", "utilisation", "op", "m", "k", "n",
                                       "groups", "compute_cycles", "weight_cycles", "vector_cycles", "fill_cycles",
                                       "weight_bytes", "resident", "vector_ops", "fused", "output_shape", "mapped",
                                       "ms")})
    if streamed:
        assumptions.append(f"{len(streamed)} layer(s) do not fit the MRF after pinning earlier layers and stream "
                           f"their weights from DRAM at {cfg.dram_gbps:g} GB/s on every inference (double-buffered: "
                           "overlapped with compute)")
    first = next(iter(shapes_in.values()), (batch,))
    return Estimate(model=label, npu=cfg, batch=int(first[0]) if first else batch, input_shapes={k: list(v) for k, v in shapes_in.items()},
                    layers=rows, total_cycles=total_cycles, total_macs=total_macs, weight_bytes=total_w,
                    assumptions=assumptions, ignored_ops=ignored)


def save_json(e: Estimate, path: str) -> str:
    """Writes ``e.to_json()`` to ``path`` (atomically)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(e.to_json(), f, indent=1)
    os.replace(tmp, path)
    return path
