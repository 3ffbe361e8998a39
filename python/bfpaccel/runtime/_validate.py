"""Validation of a plan's manifest (``plan.json``) as a whole, before any tensor is read.

:func:`check_manifest` checks the types and required keys of every field, every node's
attributes (strides, pads, kernel sizes, permutations, ...), that every value a node reads is
defined before it, and the shapes the attributes imply against the constants the manifest
declares (a convolution's ``weight_shape`` against its quantized codes and exponents, its
bias length, ...).  Anything wrong is a :class:`~bfpaccel.runtime.plan.PlanError` naming the
field, so a malformed plan fails at load, never while it runs.  The constants themselves are
then read against the declared shapes, dtypes and checksums (``plan.py``).

What a node of each op type may hold (its inputs, outputs, attribute checks and further
checks) is declared with the op in the registry (``ops/``); this module supplies the checks
(:class:`Attr`, :func:`need`) and applies them.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..formats import Format, get_format
from .graph import Node, ValueInfo

__all__ = ["check_manifest", "ManifestInfo", "ALLOWED_DTYPES", "MAX_NDIM", "Attr", "need", "prod"]

#: dtypes a plan constant may have (numeric, native byte order; nothing that needs pickle).
ALLOWED_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                  "float16", "float32", "float64")
MAX_NDIM = 32
_MAX_DIM = 1 << 40
_MAX_ITEMS = 1 << 22  # nodes, consts, inputs, outputs, list attributes
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_AUTO_PAD = ("NOTSET", "", "SAME_UPPER", "SAME_LOWER", "VALID")
_INPUT_DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")


class _Bad(Exception):
    """A schema violation (turned into a PlanError with the file name by the caller)."""


class ManifestInfo:
    """The checked manifest: formats, graph pieces and the declared constants (in file order)."""

    def __init__(self, version: int, bfpaccel_version: str, format: Format, weight_format: Format,
                 vector_precision: str, seed: int, opset: int, inputs: List[ValueInfo], outputs: List[ValueInfo],
                 nodes: List[Node], metadata: Dict[str, str], consts: List[Tuple[str, np.dtype, Tuple[int, ...], str]]):
        self.version = version
        self.bfpaccel_version = bfpaccel_version
        self.format = format
        self.weight_format = weight_format
        self.vector_precision = vector_precision
        self.seed = seed
        self.opset = opset
        self.inputs = inputs
        self.outputs = outputs
        self.nodes = nodes
        self.metadata = metadata
        self.consts = consts

    def const_nbytes(self) -> int:
        """Bytes of all the declared constants."""
        return sum(int(dt.itemsize) * _prod(shape) for _, dt, shape, _ in self.consts)


def _prod(shape: Sequence[int]) -> int:
    p = 1
    for s in shape:
        p *= int(s)
    return p


# ---------------------------------------------------------------- primitive checks
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool))


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise _Bad(f"{where}: {msg}")


def _dict(v: Any, where: str) -> Dict[str, Any]:
    _need(isinstance(v, dict), where, f"must be a JSON object, got {type(v).__name__}")
    return v


def _list(v: Any, where: str, max_len: int = _MAX_ITEMS) -> List[Any]:
    _need(isinstance(v, list), where, f"must be a JSON list, got {type(v).__name__}")
    _need(len(v) <= max_len, where, f"has {len(v)} entries (at most {max_len})")
    return v


def _str(v: Any, where: str, nonempty: bool = False) -> str:
    _need(isinstance(v, str), where, f"must be a string, got {_show(v)}")
    if nonempty:
        _need(v != "", where, "must not be empty")
    return v


def _int(v: Any, where: str, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    _need(_is_int(v), where, f"must be an integer, got {_show(v)}")
    _need((lo is None or v >= lo) and (hi is None or v <= hi), where,
          f"must be in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}], got {v}")
    return int(v)


def _ints(v: Any, where: str, n: Optional[int] = None, lo: Optional[int] = None) -> List[int]:
    lst = _list(v, where, max_len=MAX_NDIM * 2 if n is None else n)
    _need(all(_is_int(x) for x in lst), where, f"must be a list of integers, got {_show(v)}")
    if n is not None:
        _need(len(lst) == n, where, f"must have {n} entries, got {_show(v)}")
    if lo is not None:
        _need(all(x >= lo for x in lst), where, f"entries must be >= {lo}, got {_show(v)}")
    _need(all(abs(x) < 1 << 62 for x in lst), where, f"entries out of range: {_show(v)}")
    return [int(x) for x in lst]


# ---------------------------------------------------------------- attribute checkers
AttrCheck = Callable[[Any, str], None]


def _a_int(v: Any, where: str) -> None:
    _int(v, where, -(1 << 62), 1 << 62)


def _a_01(v: Any, where: str) -> None:
    _int(v, where, 0, 1)


def _a_num(v: Any, where: str) -> None:
    _need(_is_num(v) or v is None, where, f"must be a number, got {_show(v)}")


def _a_ints(v: Any, where: str) -> None:
    _ints(v, where)


def _a_nonneg_ints(v: Any, where: str) -> None:
    _ints(v, where, lo=0)


def _a_pos2(v: Any, where: str) -> None:
    _ints(v, where, 2, lo=1)


def _a_pads4(v: Any, where: str) -> None:
    _ints(v, where, 4, lo=0)


def _a_pos4(v: Any, where: str) -> None:
    _ints(v, where, 4, lo=1)


def _a_perm(v: Any, where: str) -> None:
    p = _ints(v, where)
    _need(sorted(p) == list(range(len(p))), where, f"must be a permutation of 0..{len(p) - 1}, got {_show(v)}")


def _a_auto_pad(v: Any, where: str) -> None:
    _need(v in _AUTO_PAD, where, f"must be one of {', '.join(repr(a) for a in _AUTO_PAD)}, got {_show(v)}")


def _a_str(v: Any, where: str) -> None:
    _str(v, where)


def _a_tensor(v: Any, where: str) -> None:
    """A tensor attribute as plan.json stores it: {"__tensor__": true, "array": nested list}."""
    if isinstance(v, list):
        _list(v, where, 1 << 16)
        return
    d = _dict(v, where)
    _need("array" in d, where, "a tensor attribute needs 'array'")
    arr = d["array"]
    _need(_is_num(arr) or isinstance(arr, (list, bool)), where, "'array' must be a number or a (nested) list")
    try:
        a = np.asarray(arr)
    except (ValueError, TypeError, RecursionError) as e:
        raise _Bad(f"{where}: 'array' is not a rectangular numeric array ({e})") from None
    _need(a.dtype.kind in "biuf" and a.ndim <= MAX_NDIM and a.size <= 1 << 16, where,
          "'array' must be a small rectangular numeric array")


class Attr:
    """The attribute checks an op declares in its registration (``ops/``): ``attrs={"axis":
    Attr.INT}``. Each is ``check(value, where)`` and raises the validator's error."""

    INT = staticmethod(_a_int)                  # an integer
    FLAG = staticmethod(_a_01)                  # 0 or 1
    NUM = staticmethod(_a_num)                  # a number (or null)
    INTS = staticmethod(_a_ints)                # a list of integers
    NONNEG_INTS = staticmethod(_a_nonneg_ints)  # a list of integers >= 0
    POS2 = staticmethod(_a_pos2)                # two integers >= 1
    PADS4 = staticmethod(_a_pads4)              # four integers >= 0
    POS4 = staticmethod(_a_pos4)                # four integers >= 1
    PERM = staticmethod(_a_perm)                # a permutation of 0..n-1
    AUTO_PAD = staticmethod(_a_auto_pad)        # an ONNX auto_pad value
    STR = staticmethod(_a_str)                  # a string
    TENSOR = staticmethod(_a_tensor)            # a tensor attribute as plan.json stores it


def need(cond: bool, where: str, msg: str) -> None:
    """Raises the validator's error ``where: msg`` unless ``cond`` (for an op's ``check``)."""
    _need(cond, where, msg)


def prod(shape: Sequence[int]) -> int:
    """The number of elements of ``shape``."""
    return _prod(shape)


# ---------------------------------------------------------------- pieces of the manifest
def _format(v: Any, where: str) -> Format:
    d = _dict(v, where)
    if "name" in d:
        _str(d["name"], f"{where}.name", nonempty=True)
        rounding = d.get("rounding")
        _need(rounding is None or isinstance(rounding, str), f"{where}.rounding", "must be a string")
        try:
            return get_format(d["name"], rounding=rounding)
        except (ValueError, TypeError, KeyError) as e:
            raise _Bad(f"{where}: {e}") from None
    for k in ("block", "shared_exp_bits", "element"):
        _need(k in d, where, f"needs 'name' or 'block', 'shared_exp_bits' and 'element' (missing {k!r})")
    try:
        return Format(d["block"], d["shared_exp_bits"], d["element"], rounding=d.get("rounding", "nearest_even"))
    except (ValueError, TypeError, KeyError) as e:
        raise _Bad(f"{where}: {e}") from None


def _value_info(v: Any, where: str, is_input: bool) -> ValueInfo:
    d = _dict(v, where)
    for k in ("name", "dtype", "shape"):
        _need(k in d, where, f"missing {k!r}")
    name = _str(d["name"], f"{where}.name", nonempty=True)
    dtype = _str(d["dtype"], f"{where}.dtype")
    if is_input:
        _need(dtype in _INPUT_DTYPES, f"{where}.dtype", f"a graph input must be one of {', '.join(_INPUT_DTYPES)}, "
              f"got {dtype!r}")
    shape = d["shape"]
    if shape is not None:
        lst = _list(shape, f"{where}.shape", MAX_NDIM)
        _need(all(s is None or (_is_int(s) and 0 <= s <= _MAX_DIM) for s in lst), f"{where}.shape",
              f"entries must be integers >= 0 or null, got {_show(shape)}")
        shape = list(lst)
    return ValueInfo(name, dtype, shape)


def _consts(v: Any) -> List[Tuple[str, np.dtype, Tuple[int, ...], str]]:
    d = _dict(v, "consts")
    _need(len(d) <= _MAX_ITEMS, "consts", f"has {len(d)} entries (at most {_MAX_ITEMS})")
    out = []
    for name, info in d.items():
        where = f"consts[{name!r}]"
        _need(name != "", where, "a constant needs a name")
        info = _dict(info, where)
        for k in ("dtype", "shape", "sha256"):
            _need(k in info, where, f"missing {k!r}")
        dt = info["dtype"]
        _need(dt in ALLOWED_DTYPES, f"{where}.dtype", f"must be one of {', '.join(ALLOWED_DTYPES)}, got {_show(dt)}")
        shape = _list(info["shape"], f"{where}.shape", MAX_NDIM)
        _need(all(_is_int(s) and 0 <= s <= _MAX_DIM for s in shape), f"{where}.shape",
              f"must be a list of integers >= 0, got {_show(shape)}")
        _need(_prod(shape) <= _MAX_DIM, f"{where}.shape", f"{_show(shape)} has too many elements")
        sha = info["sha256"]
        _need(isinstance(sha, str) and _SHA_RE.fullmatch(sha) is not None, f"{where}.sha256",
              "must be 64 lowercase hex digits")
        out.append((name, np.dtype(dt), tuple(int(s) for s in shape), sha))
    return out


def _node(v: Any, i: int) -> Node:
    from .ops import find

    where = f"nodes[{i}]"
    d = _dict(v, where)
    for k in ("op", "name", "inputs", "outputs"):
        _need(k in d, where, f"missing {k!r}")
    op = _str(d["op"], f"{where}.op", nonempty=True)
    name = _str(d["name"], f"{where}.name")
    where = f"nodes[{i}] ({op} {name!r})"
    spec = find(op)
    _need(spec is not None, where, f"op {op!r} is not one this runtime executes")
    assert spec is not None
    inputs = _list(d["inputs"], f"{where}.inputs")
    outputs = _list(d["outputs"], f"{where}.outputs")
    _need(all(isinstance(x, str) for x in inputs), f"{where}.inputs", "must be a list of strings")
    _need(all(isinstance(x, str) for x in outputs), f"{where}.outputs", "must be a list of strings")
    attrs = _dict(d.get("attrs", {}), f"{where}.attrs")
    (lo, hi), max_out, checks = spec.inputs, spec.outputs, spec.attrs
    _need(len(inputs) >= lo and (hi is None or len(inputs) <= hi), f"{where}.inputs",
          f"{op} takes {spec.arity_text()} inputs, got {len(inputs)}")
    _need(lo == 0 or inputs[0] != "", f"{where}.inputs", "the first input must not be empty")
    _need(len(outputs) >= 1 and outputs[0] != "", f"{where}.outputs", "needs a first output")
    _need(max_out is None or len(outputs) <= max_out, f"{where}.outputs",
          f"{op} has at most {max_out} outputs, got {len(outputs)}")
    for k, check in checks.items():
        if k in attrs:
            check(attrs[k], f"{where}.attrs.{k}")
    return Node(op, name, list(inputs), list(outputs), dict(attrs))


# ---------------------------------------------------------------- graph-level checks
def _check_node_semantics(n: Node, where: str, consts: Dict[str, Tuple[np.dtype, Tuple[int, ...]]],
                          fa: Format, fw: Format, opset: int) -> None:
    from .ops import find

    spec = find(n.op)
    if spec is not None and spec.check is not None:
        spec.check(n, where, consts, fa, fw, opset)


def check_manifest(m: Any) -> ManifestInfo:
    """Checks a parsed plan.json; returns its pieces. Raises ``_Bad`` (message without the file
    name) on the first problem; the caller turns it into a PlanError."""
    from .compiler import VECTOR_PRECISIONS

    d = _dict(m, "plan.json")
    version: Any = d.get("bfpaccel_plan")
    _need(_is_int(version) and version >= 1, "bfpaccel_plan", f"format version must be an integer >= 1, "
          f"got {_show(version)}")
    for k in ("format", "weight_format", "vector_precision", "inputs", "outputs", "nodes", "consts"):
        _need(k in d, "plan.json", f"missing required key {k!r}")
    bver = d.get("bfpaccel_version", "?")
    _need(isinstance(bver, str), "bfpaccel_version", "must be a string")
    fa = _format(d["format"], "format")
    fw = _format(d["weight_format"], "weight_format")
    _need(fa.is_block or fa.element == "fp32", "format", f"matrix ops run on a block format or fp32, not {fa.element}")
    _need(fw.is_block or fw.element == "fp32", "weight_format",
          f"matrix ops run on a block format or fp32, not {fw.element}")
    _need(fa.is_block == fw.is_block and (not fa.is_block or fa.block_size == fw.block_size), "weight_format",
          f"{fw} does not go with the activation format {fa} (same block size needed)")
    vp = d["vector_precision"]
    _need(vp in VECTOR_PRECISIONS, "vector_precision", f"must be one of {', '.join(VECTOR_PRECISIONS)}, "
          f"got {_show(vp)}")
    seed = _int(d.get("seed", 0), "seed", 0, (1 << 64) - 1)
    opset = _int(d.get("opset", 13), "opset", 1, 1000)
    inputs = [_value_info(v, f"inputs[{i}]", True) for i, v in enumerate(_list(d["inputs"], "inputs"))]
    outputs = [_value_info(v, f"outputs[{i}]", False) for i, v in enumerate(_list(d["outputs"], "outputs"))]
    _need(len(outputs) >= 1, "outputs", "a plan needs at least one output")
    meta = _dict(d.get("metadata", {}), "metadata")
    _need(all(isinstance(v, str) for v in meta.values()), "metadata", "values must be strings")
    consts_list = _consts(d["consts"])
    consts = {name: (dt, shape) for name, dt, shape, _ in consts_list}
    nodes = [_node(v, i) for i, v in enumerate(_list(d["nodes"], "nodes"))]

    defined = set(consts)
    for i, vi in enumerate(inputs):
        _need(vi.name not in defined, f"inputs[{i}]", f"{vi.name!r} is defined twice (an input or a constant)")
        defined.add(vi.name)
    for i, n in enumerate(nodes):
        where = f"nodes[{i}] ({n.op} {n.name!r})"
        for x in n.inputs:
            _need(x == "" or x in defined, f"{where}.inputs",
                  f"reads {x!r}, which no input, constant or earlier node defines")
        _check_node_semantics(n, where, consts, fa, fw, opset)
        for o in n.outputs:
            if o:
                _need(o not in defined, f"{where}.outputs", f"{o!r} is already defined")
                defined.add(o)
    for i, vo in enumerate(outputs):
        _need(vo.name in defined, f"outputs[{i}]", f"{vo.name!r} is not computed by any node")
    return ManifestInfo(version, bver, fa, fw, vp, seed, opset, inputs, outputs, nodes,
                        {str(k): v for k, v in meta.items()}, consts_list)


def check_manifest_or_raise(m: Any, error: Callable[[str], Exception]) -> ManifestInfo:
    """:func:`check_manifest` with the problem raised as ``error(message)``."""
    try:
        return check_manifest(m)
    except _Bad as e:
        raise error(f"plan.json is malformed: {e}") from None
    except RecursionError:
        raise error("plan.json is malformed: nested too deeply") from None
