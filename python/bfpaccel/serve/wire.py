"""Protocol-neutral tensor codecs for the serving faces: KServe v2 (Open Inference Protocol) over
HTTP/JSON and gRPC, and TensorFlow Serving's REST JSON.

Every parser turns a request into :class:`WireTensor` objects: numeric inputs as numpy arrays
(native byte order, owned and writable), ``BYTES`` inputs (encoded images, text) as a flat
row-major ``list`` of ``bytes``.  Every encoder takes outputs as a mapping ``name -> array`` (or
:class:`WireTensor` objects) and gives the protocol's bytes or message.  Datatypes are named
with the v2 protocol's names everywhere (``BOOL``, ``UINT8`` .. ``UINT64``, ``INT8`` ..
``INT64``, ``FP16``, ``FP32``, ``FP64``, ``BYTES``; see :data:`V2_DATATYPES`).

Hostile input.  A problem with a request is a :class:`WireError` (a ``ValueError``) whose
message names the input and the problem; a face answers it with HTTP 400 / INVALID_ARGUMENT.
Shapes are checked with Python integers (rank at most :data:`~bfpaccel.serve.codec.MAX_RANK`,
no negative or non-integer dimension), and a tensor's element count (``max_elements``) and
byte size (``max_bytes``: ``elements * itemsize``, or for ``BYTES`` the sum of the element
lengths) are checked against the limits -- both **per tensor** -- before anything of that size
is allocated.  Values never broadcast, so what the parsers allocate is bounded by the request
body, which the face limits.  JSON values are strict: ``BOOL`` takes ``true``/``false`` only,
integer types take JSON integers in their range (no ``1.0``, no booleans), float types take
numbers (out-of-range values round to infinity, as an IEEE cast does).  JSON nested deeper than
Python's parser allows is a :class:`WireError` too.

Non-finite floats.  JSON has no NaN or infinity; like TensorFlow Serving's REST API (and
Python's ``json``), the parsers accept the tokens ``NaN``, ``Infinity`` and ``-Infinity`` and
the encoders write them for non-finite values, in the TF-Serving and in the v2 JSON responses
(``tritonclient.http`` reads them; a strict JSON parser does not: ask for binary outputs).

KServe v2 binary data extension (HTTP): the body is the JSON header followed by the tensors'
raw bytes in input order; the header's length comes in the ``Inference-Header-Content-Length``
HTTP header (:data:`INFERENCE_HEADER_CONTENT_LENGTH`) and each binary input says its size in
``parameters.binary_data_size``.  Raw tensors are little-endian, row-major, without padding;
``BOOL`` is one byte 0 or 1; a ``BYTES`` element is a 4-byte little-endian length then the
bytes (:func:`serialize_bytes_elements`).  Outputs go binary when the request asks for it
(``outputs[].parameters.binary_data`` or the request's ``parameters.binary_data_output``,
:meth:`V2Request.binary_outputs`); a ``BYTES`` output that is not valid UTF-8 always goes
binary (JSON strings cannot carry it).

Example:
    >>> import numpy as np
    >>> req = parse_v2_json_request(b'{"inputs": [{"name": "x", "shape": [2], '
    ...                             b'"datatype": "FP32", "data": [1, 2.5]}]}')
    >>> req.inputs["x"].data
    array([1. , 2.5], dtype=float32)
    >>> encode_v2_json_response("m", {"y": np.array([3], dtype=np.int8)})
    (b'{"model_name": "m", "outputs": [{"name": "y", "datatype": "INT8", "shape": [1], "data": [3]}]}', None)
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from . import _protos as pb
from .codec import MAX_RANK

__all__ = [
    "WireError", "WireTensor", "V2Request", "V2RequestedOutput", "TFRestRequest",
    "V2_DATATYPES", "INFERENCE_HEADER_CONTENT_LENGTH",
    "v2_datatype", "v2_numpy_dtype", "to_wire_tensor", "serialize_bytes_elements", "deserialize_bytes_elements",
    "parse_v2_json_request", "encode_v2_json_response",
    "parse_v2_grpc_request", "encode_v2_grpc_response",
    "parse_tf_rest_request", "encode_tf_rest_response",
]

#: The HTTP header giving the length of the JSON part of a v2 body with binary tensors.
INFERENCE_HEADER_CONTENT_LENGTH = "Inference-Header-Content-Length"

#: v2 datatype name -> numpy dtype (little-endian; ``BYTES`` -> object).
V2_DATATYPES: Dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_INT_TYPES = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"})
_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
_FROM_NUMPY = {dt.newbyteorder("="): name for name, dt in V2_DATATYPES.items() if name != "BYTES"}
# gRPC InferTensorContents field of each datatype (FP16 has none: raw contents only)
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
_ALL_CONTENTS_FIELDS = tuple(sorted(set(_CONTENTS_FIELD.values())))
_LEN = struct.Struct("<I")
# Triton features this server does not offer: named in the error rather than silently ignored
_UNSUPPORTED_INPUT_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_UNSUPPORTED_OUTPUT_PARAMS = ("classification", "shared_memory_region", "shared_memory_byte_size",
                              "shared_memory_offset")

Shape = Tuple[int, ...]
TensorData = Union[np.ndarray, List[bytes]]
OutputsArg = Union[Mapping[str, Any], Iterable["WireTensor"]]


class WireError(ValueError):
    """A request that cannot be decoded (bad JSON, datatype, shape, data or size); the message
    names the input and the problem.  Faces answer it with HTTP 400 / INVALID_ARGUMENT."""


@dataclass
class WireTensor:
    """One named tensor as it crosses the wire.

    Attributes:
        name: the tensor's name.
        datatype: its v2 datatype name (``"FP32"``, ``"BYTES"``, ...).
        shape: its dimensions (``()`` for a scalar).
        data: a numpy array of ``shape`` for numeric datatypes; for ``BYTES`` a flat list of
            ``bytes`` in row-major order (``prod(shape)`` elements).
        parameters: the tensor's protocol parameters (v2 only; e.g. ``binary_data_size``).
    """

    name: str
    datatype: str
    shape: Shape
    data: TensorData
    parameters: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_bytes(self) -> bool:
        """Whether the tensor holds ``bytes`` elements (datatype ``BYTES``)."""
        return self.datatype == "BYTES"

    def as_array(self) -> np.ndarray:
        """The data as a numpy array of :attr:`shape` (``BYTES``: an object array of bytes)."""
        if isinstance(self.data, np.ndarray):
            return self.data
        out = np.empty(len(self.data), dtype=object)
        out[:] = self.data
        return out.reshape(self.shape)


@dataclass
class V2RequestedOutput:
    """An entry of a v2 request's ``outputs``: the output's name, its ``binary_data`` flag
    (``None`` when the request does not say) and its other parameters."""

    name: str
    binary_data: Optional[bool] = None
    parameters: Dict[str, Any] = field(default_factory=dict)


@dataclass
class V2Request:
    """A decoded KServe v2 inference request (JSON or gRPC).

    Attributes:
        inputs: input name -> :class:`WireTensor`, in request order.
        outputs: the requested outputs in request order (empty: the model's every output).
        id: the request id to echo (``None`` when not given).
        parameters: the request's parameters (plain Python values).
        binary_data_output: the request-level ``binary_data_output`` flag (JSON only).
        model_name, model_version: from a gRPC request (the JSON face has them in its URL).
    """

    inputs: Dict[str, WireTensor]
    outputs: List[V2RequestedOutput] = field(default_factory=list)
    id: Optional[str] = None
    parameters: Dict[str, Any] = field(default_factory=dict)
    binary_data_output: bool = False
    model_name: str = ""
    model_version: str = ""

    @property
    def output_names(self) -> Optional[List[str]]:
        """The requested output names, or ``None`` for "every output"."""
        return [o.name for o in self.outputs] if self.outputs else None

    def binary_outputs(self, names: Iterable[str]) -> Set[str]:
        """Which of the outputs ``names`` the client wants as binary data: an output's own
        ``binary_data`` flag, else the request's ``binary_data_output``."""
        flags = {o.name: o.binary_data for o in self.outputs}
        out = set()
        for n in names:
            flag = flags.get(n)
            if flag if flag is not None else self.binary_data_output:
                out.add(n)
        return out


@dataclass
class TFRestRequest:
    """A decoded TensorFlow Serving REST predict request.

    Attributes:
        inputs: input name -> :class:`WireTensor`, in request order.
        row_format: ``True`` for ``"instances"`` (answer with :func:`encode_tf_rest_response`
            ``row_format=True``: ``{"predictions": ...}``), ``False`` for ``"inputs"``.
        signature_name: the requested signature, ``None`` when not given.
    """

    inputs: Dict[str, WireTensor]
    row_format: bool
    signature_name: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# datatypes, shapes, limits


def v2_numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a v2 datatype name (``"FP32"`` -> float32, ``"BYTES"`` -> object);
    :class:`WireError` for an unknown or unsupported name."""
    if not isinstance(datatype, str) or datatype not in V2_DATATYPES:
        extra = " (bfloat16 has no numpy type here)" if datatype == "BF16" else ""
        raise WireError(f"datatype {datatype!r} is not supported{extra}; supported: {', '.join(V2_DATATYPES)}")
    return V2_DATATYPES[datatype]


def v2_datatype(dtype: Any) -> str:
    """The v2 datatype name of a numpy dtype (or array): ``np.float32`` -> ``"FP32"``; bytes,
    str and object -> ``"BYTES"``.  ``TypeError`` for a dtype the protocol cannot carry."""
    if isinstance(dtype, np.ndarray):
        dtype = dtype.dtype
    dt = np.dtype(dtype)
    if dt.kind in "SUO":
        return "BYTES"
    name = _FROM_NUMPY.get(dt.newbyteorder("="))
    if name is None:
        raise TypeError(f"numpy dtype {dt} has no v2 datatype; use bool, (u)int8..64, float16/32/64 or bytes")
    return name


def _where(name: Optional[str]) -> str:
    return f"input {name!r}" if name is not None else "input"


def _check_shape(shape: Any, where: str) -> Shape:
    if not isinstance(shape, (list, tuple)):
        raise WireError(f"{where}: shape must be a list of integers, got {type(shape).__name__}")
    if len(shape) > MAX_RANK:
        raise WireError(f"{where}: shape has rank {len(shape)}; at most {MAX_RANK} dimensions are supported")
    dims = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise WireError(f"{where}: shape {list(shape)!r} has a non-integer dimension {d!r}")
        if d < 0:
            raise WireError(f"{where}: shape {list(shape)} has a negative dimension")
        dims.append(int(d))
    return tuple(dims)


def _check_size(shape: Shape, datatype: str, where: str, max_elements: Optional[int],
                max_bytes: Optional[int]) -> int:
    """Element count of ``shape`` after the limits (numeric byte size included); no allocation."""
    n = math.prod(shape)
    if max_elements is not None and n > max_elements:
        raise WireError(f"{where}: shape {list(shape)} has {n} elements, over the limit of {max_elements}")
    itemsize = V2_DATATYPES[datatype].itemsize if datatype != "BYTES" else 1
    if max_bytes is not None and datatype != "BYTES" and n * itemsize > max_bytes:
        raise WireError(f"{where}: shape {list(shape)} of {datatype} is {n * itemsize} bytes, over the limit of "
                        f"{max_bytes}")
    # numpy refuses an array whose non-zero dimensions' bytes overflow an index, even when empty
    if math.prod(d for d in shape if d) * itemsize > sys.maxsize:
        raise WireError(f"{where}: shape {list(shape)} is too large to represent")
    return n


def _check_bytes_total(values: Sequence[bytes], where: str, max_bytes: Optional[int]) -> None:
    if max_bytes is not None:
        total = sum(map(len, values))
        if total > max_bytes:
            raise WireError(f"{where}: BYTES elements total {total} bytes, over the limit of {max_bytes}")


# ---------------------------------------------------------------------------------------------
# values -> arrays


def _values_to_array(vals: List[Any], datatype: str, shape: Shape, where: str) -> np.ndarray:
    """A flat list of JSON/protobuf scalars -> array of ``datatype`` and ``shape`` (strict types)."""
    npdt = V2_DATATYPES[datatype].newbyteorder("=")
    types = set(map(type, vals))
    if datatype == "BOOL":
        if not types <= {bool}:
            raise WireError(f"{where}: BOOL data must be true/false, got {_type_names(types - {bool})}")
        return np.array(vals, dtype=npdt).reshape(shape)
    if datatype in _INT_TYPES:
        if not types <= {int}:
            raise WireError(f"{where}: {datatype} data must be integers, got {_type_names(types - {int})}")
        if vals:
            info = np.iinfo(npdt)
            lo, hi = min(vals), max(vals)
            if lo < info.min or hi > info.max:
                bad = lo if lo < info.min else hi
                raise WireError(f"{where}: value {bad} is out of the range of {datatype} "
                                f"[{info.min}, {info.max}]")
        return np.array(vals, dtype=npdt).reshape(shape)
    # float types: integers or floats (NaN/Infinity tokens parse as floats)
    if not types <= {int, float}:
        raise WireError(f"{where}: {datatype} data must be numbers, got {_type_names(types - {int, float})}")
    try:
        with np.errstate(over="ignore"):
            return np.array(vals, dtype=np.float64).astype(npdt).reshape(shape)
    except OverflowError:
        raise WireError(f"{where}: an integer value is too large for {datatype}") from None


def _type_names(types: Iterable[type]) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object",
             type(None): "null", bytes: "bytes"}
    return ", ".join(sorted(names.get(t, t.__name__) for t in types))


def _strings_to_bytes(vals: List[Any], where: str) -> List[bytes]:
    types = set(map(type, vals))
    if not types <= {str}:
        raise WireError(f"{where}: BYTES data must be strings, got {_type_names(types - {str})}")
    try:
        return [s.encode("utf-8") for s in vals]
    except UnicodeEncodeError as e:
        raise WireError(f"{where}: a BYTES string is not valid Unicode ({e.reason})") from None


def serialize_bytes_elements(values: Iterable[Union[bytes, bytearray, memoryview, str]]) -> bytes:
    """Raw encoding of a ``BYTES`` tensor: each element as a 4-byte little-endian length and its
    bytes (``str`` elements as UTF-8), in row-major order."""
    parts = []
    for v in values:
        b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        if len(b) > 0xFFFFFFFF:
            raise ValueError(f"a BYTES element of {len(b)} bytes does not fit the 4-byte length prefix")
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes_elements(raw: Union[bytes, bytearray, memoryview], count: int, what: str = "input",
                               max_bytes: Optional[int] = None) -> List[bytes]:
    """Decodes ``count`` length-prefixed ``BYTES`` elements that must fill ``raw`` exactly;
    :class:`WireError` (naming ``what``) for a truncated element, a wrong count or trailing
    bytes.  ``count`` is checked against ``len(raw)`` before anything is decoded."""
    mv = memoryview(raw).cast("B")
    size = len(mv)
    if count * 4 > size:
        raise WireError(f"{what}: {size} bytes cannot hold {count} BYTES elements (each needs a 4-byte length)")
    if max_bytes is not None and size - 4 * count > max_bytes:
        raise WireError(f"{what}: BYTES elements total {size - 4 * count} bytes, over the limit of {max_bytes}")
    out: List[bytes] = []
    off = 0
    for i in range(count):
        if off + 4 > size:
            raise WireError(f"{what}: BYTES data ends inside the length of element {i} of {count}")
        (k,) = _LEN.unpack_from(mv, off)
        off += 4
        if off + k > size:
            raise WireError(f"{what}: BYTES element {i} declares {k} bytes but only {size - off} remain")
        out.append(bytes(mv[off:off + k]))
        off += k
    if off != size:
        raise WireError(f"{what}: {size - off} bytes left after the {count} BYTES elements of the shape")
    return out


def _raw_to_data(raw: Union[bytes, memoryview], datatype: str, shape: Shape, n: int, where: str,
                 max_bytes: Optional[int]) -> TensorData:
    """Raw tensor bytes (binary extension / raw_input_contents) -> data; sizes already checked."""
    if datatype == "BYTES":
        return deserialize_bytes_elements(raw, n, where, max_bytes)
    npdt = V2_DATATYPES[datatype]
    need = n * npdt.itemsize
    if len(raw) != need:
        raise WireError(f"{where}: {len(raw)} bytes of raw data; shape {list(shape)} of {datatype} needs {need}")
    if datatype == "BOOL":
        u8 = np.frombuffer(raw, dtype=np.uint8)
        if u8.size and int(u8.max()) > 1:
            raise WireError(f"{where}: BOOL raw data has a byte other than 0 or 1")
        return u8.astype(np.bool_).reshape(shape)
    return np.frombuffer(raw, dtype=npdt).astype(npdt.newbyteorder("="), copy=True).reshape(shape)


def _flatten(data: Any, shape: Shape, n: int, where: str) -> List[Any]:
    """v2 JSON ``data``: a flat list of ``n`` scalars, or lists nested exactly as ``shape``
    (a bare scalar for a rank-0 tensor) -> flat list of scalars."""
    if not isinstance(data, list):
        if not shape:
            return [data]
        raise WireError(f"{where}: data must be a list, got {_type_names({type(data)})}")
    if len(data) == n and not any(type(x) is list for x in data):
        return data
    level: List[Any] = [data]
    for depth, d in enumerate(shape):
        for item in level:
            if type(item) is not list:
                raise WireError(f"{where}: data is neither a flat list of {n} values nor nested as shape "
                                f"{list(shape)}: a value where a list of {d} belongs (depth {depth})")
            if len(item) != d:
                raise WireError(f"{where}: data is neither a flat list of {n} values nor nested as shape "
                                f"{list(shape)}: a list of {len(item)} where {d} belong (depth {depth})")
        level = [x for item in level for x in item]
    if any(type(x) is list for x in level):
        raise WireError(f"{where}: data is nested deeper than shape {list(shape)}")
    return level


def _json_data_to_tensor(name: str, datatype: str, shape: Shape, data: Any, where: str,
                         max_elements: Optional[int], max_bytes: Optional[int],
                         parameters: Dict[str, Any]) -> WireTensor:
    n = _check_size(shape, datatype, where, max_elements, max_bytes)
    flat = _flatten(data, shape, n, where)
    if len(flat) != n:  # a flat list of the wrong length that is not nested either
        raise WireError(f"{where}: data has {len(flat)} values; shape {list(shape)} needs {n}")
    if datatype == "BYTES":
        vals = _strings_to_bytes(flat, where)
        _check_bytes_total(vals, where, max_bytes)
        return WireTensor(name, datatype, shape, vals, parameters)
    return WireTensor(name, datatype, shape, _values_to_array(flat, datatype, shape, where), parameters)


# ---------------------------------------------------------------------------------------------
# KServe v2 JSON (+ binary data extension)


def _loads(text: Union[bytes, bytearray, memoryview, str], what: str) -> Any:
    try:
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise WireError(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise WireError(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise WireError(f"{what} is nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal of more digits than Python converts
        raise WireError(f"{what} is not valid JSON: {e}") from None


def _header_length(header_length: Union[int, str, None], body_len: int) -> Optional[int]:
    if header_length is None:
        return None
    if isinstance(header_length, str):
        s = header_length.strip()
        if not s.isdigit() or not s.isascii():
            raise WireError(f"{INFERENCE_HEADER_CONTENT_LENGTH} {header_length!r} is not a non-negative integer")
        header_length = int(s)
    if isinstance(header_length, bool) or not isinstance(header_length, int) or header_length < 0:
        raise WireError(f"{INFERENCE_HEADER_CONTENT_LENGTH} {header_length!r} is not a non-negative integer")
    if header_length > body_len:
        raise WireError(f"{INFERENCE_HEADER_CONTENT_LENGTH} is {header_length} but the body has only "
                        f"{body_len} bytes")
    return header_length


def _obj(value: Any, what: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WireError(f"{what} must be a JSON object, got {_type_names({type(value)})}")
    return value


def _bool_param(params: Dict[str, Any], key: str, where: str) -> Optional[bool]:
    v = params.get(key)
    if v is not None and not isinstance(v, bool):
        raise WireError(f"{where}: parameter {key!r} must be true or false, got {v!r}")
    return v


def _reject_params(params: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    for k in keys:
        if k in params:
            what = "the classification extension" if k == "classification" else "shared memory"
            raise WireError(f"{where}: parameter {k!r} is not supported ({what} is not offered by this server)")


def parse_v2_json_request(body: Union[bytes, bytearray, memoryview, str],
                          header_length: Union[int, str, None] = None, *,
                          max_elements: Optional[int] = None, max_bytes: Optional[int] = None) -> V2Request:
    """Decodes a KServe v2 HTTP inference request body.

    Args:
        body: the HTTP body: JSON, or JSON followed by binary tensors.
        header_length: the ``Inference-Header-Content-Length`` header (int or its text), the
            JSON part's length in bytes; ``None`` when absent: the whole body is JSON.
        max_elements: most elements of one input tensor (checked before allocation).
        max_bytes: most bytes of one input tensor's data (checked before allocation).

    Inputs take ``data`` (flat, or nested as ``shape``) or ``parameters.binary_data_size``
    (their bytes in the binary part, in input order; all of it must be used).  Raises
    :class:`WireError` for any problem.
    """
    raw_body = memoryview(body.encode("utf-8") if isinstance(body, str) else body).cast("B")
    hl = _header_length(header_length, len(raw_body))
    header = raw_body if hl is None else raw_body[:hl]
    binary = raw_body[len(raw_body):] if hl is None else raw_body[hl:]
    doc = _loads(header, "request JSON" if hl is None else f"request JSON (first {hl} bytes of the body)")
    if not isinstance(doc, dict):
        raise WireError(f"request must be a JSON object, got {_type_names({type(doc)})}")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise WireError(f"request 'id' must be a string, got {rid!r}")
    params = _obj(doc.get("parameters"), "request 'parameters'")
    binary_output = _bool_param(params, "binary_data_output", "request") or False
    inputs_doc = doc.get("inputs")
    if not isinstance(inputs_doc, list) or not inputs_doc:
        raise WireError("request 'inputs' must be a non-empty list of input tensors")
    inputs: Dict[str, WireTensor] = {}
    offset = 0
    for i, inp in enumerate(inputs_doc):
        if not isinstance(inp, dict):
            raise WireError(f"request input #{i} must be a JSON object")
        name = inp.get("name")
        if not isinstance(name, str) or not name:
            raise WireError(f"request input #{i} has no 'name' (a non-empty string)")
        where = _where(name)
        if name in inputs:
            raise WireError(f"{where} appears twice in the request")
        datatype = inp.get("datatype")
        if datatype is None:
            raise WireError(f"{where} has no 'datatype'")
        try:
            v2_numpy_dtype(datatype)
        except WireError as e:
            raise WireError(f"{where}: {e}") from None
        if "shape" not in inp:
            raise WireError(f"{where} has no 'shape'")
        shape = _check_shape(inp["shape"], where)
        iparams = _obj(inp.get("parameters"), f"{where} 'parameters'")
        _reject_params(iparams, _UNSUPPORTED_INPUT_PARAMS, where)
        size = iparams.get("binary_data_size")
        if size is None:
            if "data" not in inp:
                raise WireError(f"{where} has neither 'data' nor parameters.binary_data_size")
            inputs[name] = _json_data_to_tensor(name, datatype, shape, inp["data"], where, max_elements,
                                                max_bytes, dict(iparams))
            continue
        if "data" in inp:
            raise WireError(f"{where} has both 'data' and parameters.binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise WireError(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
        if hl is None:
            raise WireError(f"{where} has binary_data_size but the request has no "
                            f"{INFERENCE_HEADER_CONTENT_LENGTH} header (no binary part)")
        n = _check_size(shape, datatype, where, max_elements, max_bytes)
        if datatype != "BYTES" and size != n * V2_DATATYPES[datatype].itemsize:
            raise WireError(f"{where}: binary_data_size is {size}; shape {list(shape)} of {datatype} needs "
                            f"{n * V2_DATATYPES[datatype].itemsize}")
        if offset + size > len(binary):
            raise WireError(f"{where}: binary_data_size {size} at offset {offset} runs past the binary part "
                            f"({len(binary)} bytes): truncated body?")
        chunk = binary[offset:offset + size]
        offset += size
        inputs[name] = WireTensor(name, datatype, shape, _raw_to_data(chunk, datatype, shape, n, where, max_bytes),
                                  dict(iparams))
    if offset != len(binary):
        raise WireError(f"the binary part has {len(binary)} bytes but the inputs' binary_data_size "
                        f"account for {offset}")
    outputs = _parse_v2_json_outputs(doc.get("outputs"))
    return V2Request(inputs=inputs, outputs=outputs, id=rid, parameters=dict(params),
                     binary_data_output=binary_output)


def _parse_v2_json_outputs(outputs_doc: Any) -> List[V2RequestedOutput]:
    if outputs_doc is None:
        return []
    if not isinstance(outputs_doc, list):
        raise WireError("request 'outputs' must be a list")
    outs: List[V2RequestedOutput] = []
    seen = set()
    for i, o in enumerate(outputs_doc):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str) or not o["name"]:
            raise WireError(f"request output #{i} must be an object with a 'name'")
        where = f"requested output {o['name']!r}"
        if o["name"] in seen:
            raise WireError(f"{where} appears twice in the request")
        seen.add(o["name"])
        oparams = _obj(o.get("parameters"), f"{where} 'parameters'")
        _reject_params(oparams, _UNSUPPORTED_OUTPUT_PARAMS, where)
        outs.append(V2RequestedOutput(o["name"], _bool_param(oparams, "binary_data", where), dict(oparams)))
    return outs


def to_wire_tensor(name: str, value: Any, datatype: Optional[str] = None) -> WireTensor:
    """An output value as a :class:`WireTensor`: a numpy array or array-like (numeric, or
    bytes/str/object for ``BYTES``), or a WireTensor (returned as is).  ``datatype`` casts a
    numeric value (default: from its dtype)."""
    if isinstance(value, WireTensor):
        return value
    if isinstance(value, (bytes, bytearray, str)):
        value = np.array(value, dtype=object)
    arr = np.asarray(value)
    if arr.dtype.kind in "SU" and not isinstance(value, np.ndarray):
        arr = np.array(value, dtype=object)  # numpy's fixed-width bytes would drop trailing NULs
    dt = datatype or v2_datatype(arr.dtype)
    if dt == "BYTES":
        flat = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in arr.reshape(-1).tolist()]
        return WireTensor(name, "BYTES", tuple(int(d) for d in arr.shape), flat)
    npdt = v2_numpy_dtype(dt).newbyteorder("=")
    return WireTensor(name, dt, tuple(int(d) for d in arr.shape), np.asarray(arr, dtype=npdt))


def _iter_outputs(outputs: OutputsArg) -> List[WireTensor]:
    if isinstance(outputs, Mapping):
        return [to_wire_tensor(k, v) for k, v in outputs.items()]
    return [to_wire_tensor(t.name, t) for t in outputs]


def _raw_bytes(t: WireTensor) -> bytes:
    if t.is_bytes:
        return serialize_bytes_elements(t.data)  # type: ignore[arg-type]
    arr = np.asarray(t.data)
    npdt = V2_DATATYPES[t.datatype]
    if t.datatype == "BOOL":
        return np.ascontiguousarray(arr, dtype=np.bool_).view(np.uint8).tobytes()
    return np.ascontiguousarray(arr, dtype=npdt).tobytes()


def _json_values(t: WireTensor) -> Any:
    """Flat JSON-able list of a tensor's values (BYTES as str; ``None`` when not UTF-8)."""
    if t.is_bytes:
        try:
            return [bytes(b).decode("utf-8") for b in t.data]  # type: ignore[union-attr]
        except UnicodeDecodeError:
            return None
    arr = np.asarray(t.data)
    if arr.dtype.kind == "f" and arr.dtype.itemsize < 8:
        arr = arr.astype(np.float64)  # exact; json writes the shortest repr of the double
    return arr.reshape(-1).tolist()


def encode_v2_json_response(model_name: str, outputs: OutputsArg, *, model_version: Optional[str] = None,
                            request_id: Optional[str] = None, parameters: Optional[Mapping[str, Any]] = None,
                            binary: Union[bool, Collection[str]] = False) -> Tuple[bytes, Optional[int]]:
    """Encodes a KServe v2 HTTP inference response.

    Args:
        model_name: the ``model_name`` field.
        outputs: output name -> array (or :class:`WireTensor` objects), in response order.
        model_version: the ``model_version`` field (left out when ``None``).
        request_id: the request's id to echo (left out when ``None`` or empty).
        parameters: response parameters (JSON-able values).
        binary: ``True`` for every output as binary data, or the names of those to send so
            (:meth:`V2Request.binary_outputs`); a BYTES output that is not UTF-8 goes binary
            regardless.

    Returns:
        ``(body, header_length)``: ``header_length`` is ``None`` for a pure JSON body
        (``Content-Type: application/json``), else the JSON part's length to send as the
        ``Inference-Header-Content-Length`` header (``application/octet-stream``).
    """
    tensors = _iter_outputs(outputs)
    if isinstance(binary, str):
        binary = {binary}
    doc: Dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = str(model_version)
    if request_id:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = dict(parameters)
    out_docs = []
    blobs: List[bytes] = []
    for t in tensors:
        entry: Dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        params = {k: v for k, v in t.parameters.items() if k != "binary_data_size"}
        want_binary = binary is True or (not isinstance(binary, bool) and t.name in binary)
        values = None if want_binary else _json_values(t)
        if values is None:
            blob = _raw_bytes(t)
            params["binary_data_size"] = len(blob)
            blobs.append(blob)
        if params:
            entry["parameters"] = params
        if values is not None:
            entry["data"] = values
        out_docs.append(entry)
    doc["outputs"] = out_docs
    header = json.dumps(doc, allow_nan=True).encode("ascii")
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


# ---------------------------------------------------------------------------------------------
# KServe v2 gRPC


def _param_value(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _params_dict(params: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: _param_value(v) for k, v in params.items()}


def _set_param(p: Any, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, (int, np.integer)):
        v = int(value)
        if v > 2**63 - 1:
            p.uint64_param = v
        else:
            p.int64_param = v
    elif isinstance(value, (float, np.floating)):
        p.double_param = float(value)
    elif isinstance(value, str):
        p.string_param = value
    else:
        raise TypeError(f"parameter value {value!r} is not a bool, int, float or str")


def _contents_to_data(contents: Any, datatype: str, shape: Shape, n: int, where: str,
                      max_bytes: Optional[int]) -> TensorData:
    fname = _CONTENTS_FIELD.get(datatype)
    if fname is None:
        raise WireError(f"{where}: {datatype} has no typed contents field; send it in raw_input_contents")
    for other in _ALL_CONTENTS_FIELDS:
        if other != fname and len(getattr(contents, other)):
            raise WireError(f"{where}: contents.{other} is set for a {datatype} tensor (expected {fname})")
    vals = getattr(contents, fname)
    if len(vals) != n:
        raise WireError(f"{where}: contents.{fname} has {len(vals)} values; shape {list(shape)} needs {n}")
    if datatype == "BYTES":
        out = list(vals)
        _check_bytes_total(out, where, max_bytes)
        return out
    if datatype in _INT_TYPES:
        field_dt = {"int_contents": np.int32, "int64_contents": np.int64, "uint_contents": np.uint32,
                    "uint64_contents": np.uint64}[fname]
        arr = np.array(vals, dtype=field_dt)
        npdt = V2_DATATYPES[datatype].newbyteorder("=")
        if arr.size and field_dt != npdt:
            info = np.iinfo(npdt)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                bad = lo if lo < info.min else hi
                raise WireError(f"{where}: value {bad} is out of the range of {datatype} [{info.min}, {info.max}]")
        return arr.astype(npdt).reshape(shape)
    return np.array(vals, dtype=V2_DATATYPES[datatype].newbyteorder("=")).reshape(shape)


def parse_v2_grpc_request(request: Any, *, max_elements: Optional[int] = None,
                          max_bytes: Optional[int] = None) -> V2Request:
    """Decodes a v2 ``ModelInferRequest`` (``bfpaccel.serve._protos.ModelInferRequest``).

    Inputs come either all from ``raw_input_contents`` (one entry per input, in order; what
    ``tritonclient.grpc`` sends) or each from its typed ``contents`` field; FP16 only as raw.
    ``max_elements`` / ``max_bytes`` limit one input tensor.  Raises :class:`WireError`.
    """
    raw = request.raw_input_contents
    if len(raw) and len(raw) != len(request.inputs):
        raise WireError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs "
                        "(one per input, in order, is required)")
    if not len(request.inputs):
        raise WireError("request has no inputs")
    inputs: Dict[str, WireTensor] = {}
    for i, inp in enumerate(request.inputs):
        if not inp.name:
            raise WireError(f"request input #{i} has no name")
        where = _where(inp.name)
        if inp.name in inputs:
            raise WireError(f"{where} appears twice in the request")
        try:
            v2_numpy_dtype(inp.datatype)
        except WireError as e:
            raise WireError(f"{where}: {e}") from None
        shape = _check_shape(list(inp.shape), where)
        params = _params_dict(inp.parameters)
        _reject_params(params, _UNSUPPORTED_INPUT_PARAMS, where)
        n = _check_size(shape, inp.datatype, where, max_elements, max_bytes)
        if len(raw):
            if inp.HasField("contents") and any(len(getattr(inp.contents, f)) for f in _ALL_CONTENTS_FIELDS):
                raise WireError(f"{where} has contents although the request uses raw_input_contents")
            data = _raw_to_data(raw[i], inp.datatype, shape, n, where, max_bytes)
        else:
            data = _contents_to_data(inp.contents, inp.datatype, shape, n, where, max_bytes)
        inputs[inp.name] = WireTensor(inp.name, inp.datatype, shape, data, params)
    outs: List[V2RequestedOutput] = []
    seen = set()
    for o in request.outputs:
        where = f"requested output {o.name!r}"
        if not o.name:
            raise WireError("a requested output has no name")
        if o.name in seen:
            raise WireError(f"{where} appears twice in the request")
        seen.add(o.name)
        oparams = _params_dict(o.parameters)
        _reject_params(oparams, _UNSUPPORTED_OUTPUT_PARAMS, where)
        bd = oparams.get("binary_data")
        outs.append(V2RequestedOutput(o.name, bd if isinstance(bd, bool) else None, oparams))
    return V2Request(inputs=inputs, outputs=outs, id=request.id or None, parameters=_params_dict(request.parameters),
                     model_name=request.model_name, model_version=request.model_version)


def encode_v2_grpc_response(model_name: str, outputs: OutputsArg, *, model_version: str = "",
                            request_id: Optional[str] = None,
                            parameters: Optional[Mapping[str, Any]] = None) -> Any:
    """A v2 ``ModelInferResponse`` with each output's bytes in ``raw_output_contents`` (as
    Triton answers; ``tritonclient.grpc.InferResult.as_numpy`` reads it).  ``outputs``: name ->
    array or :class:`WireTensor` objects; ``parameters``: bool/int/float/str values."""
    resp = pb.ModelInferResponse(model_name=model_name, model_version=str(model_version or ""),
                                 id=request_id or "")
    for k, v in (parameters or {}).items():
        _set_param(resp.parameters[k], v)
    for t in _iter_outputs(outputs):
        o = resp.outputs.add()
        o.name = t.name
        o.datatype = t.datatype
        o.shape.extend(t.shape)
        for k, v in t.parameters.items():
            _set_param(o.parameters[k], v)
        resp.raw_output_contents.append(_raw_bytes(t))
    return resp


# ---------------------------------------------------------------------------------------------
# TensorFlow Serving REST JSON


def _is_b64(v: Any) -> bool:
    return type(v) is dict and len(v) == 1 and "b64" in v


def _b64decode(s: Any, where: str, max_bytes: Optional[int]) -> bytes:
    if not isinstance(s, str):
        raise WireError(f"{where}: a {{\"b64\": ...}} value must hold a string")
    if max_bytes is not None and len(s) // 4 * 3 > max_bytes + 3:
        raise WireError(f"{where}: a base64 value of {len(s)} characters decodes to more than {max_bytes} bytes")
    try:
        t = s.strip()
        t += "=" * (-len(t) % 4)  # unpadded base64 is accepted
        return base64.b64decode(t, validate=True)
    except (binascii.Error, ValueError) as e:
        raise WireError(f"{where}: invalid base64 ({e})") from None


def _nested_shape(value: Any, where: str) -> Tuple[Shape, List[Any]]:
    """Shape and flat leaves of a regular nested list (a scalar: ``()``); ragged -> WireError."""
    shape: List[int] = []
    level = [value]
    while True:
        lists = [type(x) is list for x in level]
        if not level or not any(lists):
            return tuple(shape), level
        if not all(lists):
            raise WireError(f"{where}: ragged nested lists (values and lists mixed at depth {len(shape)})")
        lens = {len(x) for x in level}
        if len(lens) != 1:
            raise WireError(f"{where}: ragged nested lists (lengths {sorted(lens)[:4]} at depth {len(shape)})")
        if len(shape) >= MAX_RANK:
            raise WireError(f"{where}: nested deeper than {MAX_RANK} dimensions")
        shape.append(lens.pop())
        level = [y for x in level for y in x]


def _tf_value_to_tensor(name: str, value: Any, hint: Optional[str], default_numeric: str,
                        max_elements: Optional[int], max_bytes: Optional[int]) -> WireTensor:
    where = _where(name)
    shape, leaves = _nested_shape(value, where)
    types = set(map(type, leaves))
    if hint is not None:
        datatype = hint
    elif dict in types or str in types:
        datatype = "BYTES"
    elif types and types <= {bool}:
        datatype = "BOOL"
    else:
        datatype = default_numeric
    n = _check_size(shape, datatype, where, max_elements, max_bytes)
    if datatype == "BYTES":
        out: List[bytes] = []
        for v in leaves:
            if _is_b64(v):
                out.append(_b64decode(v["b64"], where, max_bytes))
            elif isinstance(v, str):
                out.extend(_strings_to_bytes([v], where))
            else:
                raise WireError(f"{where}: BYTES values must be strings or {{\"b64\": ...}} objects, got "
                                f"{_type_names({type(v)})}")
        _check_bytes_total(out, where, max_bytes)
        return WireTensor(name, "BYTES", shape, out)
    if dict in types:
        if any(_is_b64(v) for v in leaves):
            raise WireError(f"{where}: a {{\"b64\": ...}} value for a {datatype} input (base64 is for bytes inputs)")
        raise WireError(f"{where}: an object where a {datatype} value belongs")
    assert len(leaves) == n
    return WireTensor(name, datatype, shape, _values_to_array(leaves, datatype, shape, where))


def parse_tf_rest_request(body: Union[bytes, bytearray, memoryview, str], *, default_input: Optional[str] = None,
                          input_dtypes: Optional[Mapping[str, Any]] = None, default_numeric: str = "FP32",
                          max_elements: Optional[int] = None, max_bytes: Optional[int] = None) -> TFRestRequest:
    """Decodes a TensorFlow Serving REST ``:predict`` body.

    Row format ``{"signature_name"?, "instances": [...]}``: a list of values of the one input,
    or of ``{name: value}`` objects (every object with the same names); each input is the
    instances stacked on a new 0-th dimension.  Columnar format ``{"inputs": value}`` or
    ``{"inputs": {name: value}}``.  Values are (nested) lists; ``{"b64": "..."}`` is a bytes
    value (an object whose only key is ``b64`` is always read so), a string is UTF-8 bytes.

    Args:
        body: the JSON body.
        default_input: the name of the input an unnamed value is for (the model's only input);
            an unnamed value without it is a :class:`WireError`.
        input_dtypes: input name -> v2 datatype name (or numpy dtype) the values must convert
            to, e.g. from the model's signature.  Without a hint: strings/b64 give ``BYTES``,
            all-boolean ``BOOL``, numbers ``default_numeric``.
        default_numeric: datatype of numeric values without a hint (``"FP32"``).
        max_elements, max_bytes: limits of one input tensor.
    """
    hints: Dict[str, str] = {}
    for k, v in (input_dtypes or {}).items():
        hints[k] = v if isinstance(v, str) else v2_datatype(v)
        v2_numpy_dtype(hints[k])
    v2_numpy_dtype(default_numeric)
    doc = _loads(body, "request JSON")
    if not isinstance(doc, dict):
        raise WireError(f"request must be a JSON object, got {_type_names({type(doc)})}")
    sig = doc.get("signature_name")
    if sig is not None and not isinstance(sig, str):
        raise WireError(f"'signature_name' must be a string, got {sig!r}")
    if ("instances" in doc) == ("inputs" in doc):
        raise WireError("request must have exactly one of 'instances' (row format) or 'inputs' (columnar format)")

    def unnamed() -> str:
        if default_input is None:
            raise WireError("request gives an unnamed input value but this model has several inputs; "
                            "name them ({\"name\": value})")
        return default_input

    values: Dict[str, Any] = {}
    row = "instances" in doc
    if row:
        inst = doc["instances"]
        if not isinstance(inst, list) or not inst:
            raise WireError("'instances' must be a non-empty list")
        named = [type(x) is dict and not _is_b64(x) for x in inst]
        if all(named):
            keys = list(inst[0])
            if not keys:
                raise WireError("instance #0 is an empty object")
            for i, x in enumerate(inst):
                if set(x) != set(keys):
                    raise WireError(f"instance #{i} has inputs {sorted(x)}; instance #0 has {sorted(keys)} "
                                    "(every instance needs the same inputs; use the columnar 'inputs' format "
                                    "otherwise)")
            for k in keys:
                values[k] = [x[k] for x in inst]
        elif any(named):
            raise WireError("'instances' mixes named-input objects and bare values")
        else:
            values[unnamed()] = inst
    else:
        cols = doc["inputs"]
        if type(cols) is dict and not _is_b64(cols):
            if not cols:
                raise WireError("'inputs' is an empty object")
            values = dict(cols)
        else:
            values[unnamed()] = cols
    tensors = {k: _tf_value_to_tensor(k, v, hints.get(k), default_numeric, max_elements, max_bytes)
               for k, v in values.items()}
    return TFRestRequest(inputs=tensors, row_format=row, signature_name=sig)


def _tf_json_value(t: WireTensor) -> Any:
    """A tensor as TF Serving writes it: nested lists; bytes as UTF-8 strings, or ``{"b64"}``
    objects when the output's name ends in ``_bytes`` or the bytes are not UTF-8."""
    if not t.is_bytes:
        arr = np.asarray(t.data)
        if arr.dtype.kind == "f" and arr.dtype.itemsize < 8:
            arr = arr.astype(np.float64)
        return arr.tolist()
    as_b64 = t.name.endswith("_bytes")
    flat: List[Any] = []
    for b in t.data:  # type: ignore[union-attr]
        b = bytes(b)
        if not as_b64:
            try:
                flat.append(b.decode("utf-8"))
                continue
            except UnicodeDecodeError:
                pass
        flat.append({"b64": base64.b64encode(b).decode("ascii")})
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(t.shape).tolist()


def encode_tf_rest_response(outputs: OutputsArg, *, row_format: bool) -> bytes:
    """Encodes a TensorFlow Serving REST predict response (UTF-8 JSON).

    Row format (``row_format=True``, the request had ``instances``): ``{"predictions": v}``
    with ``v`` the one output's list of per-instance values, or with several outputs a list of
    ``{name: value}`` objects, one per instance (every output then needs the same 0-th
    dimension, else :class:`WireError`, as TF Serving: ask in columnar format).  Columnar:
    ``{"outputs": value}`` for one output, ``{"outputs": {name: value}}`` for several.
    Non-finite floats are written as ``NaN`` / ``Infinity`` / ``-Infinity``.
    """
    tensors = _iter_outputs(outputs)
    if not tensors:
        raise ValueError("a predict response needs at least one output")
    if not row_format:
        if len(tensors) == 1:
            doc: Dict[str, Any] = {"outputs": _tf_json_value(tensors[0])}
        else:
            doc = {"outputs": {t.name: _tf_json_value(t) for t in tensors}}
    else:
        for t in tensors:
            if not t.shape:
                raise WireError(f"output {t.name!r} is a scalar: it has no batch dimension for the row format; "
                                "send the request in columnar format ('inputs')")
        if len(tensors) == 1:
            doc = {"predictions": _tf_json_value(tensors[0])}
        else:
            batch = {t.shape[0] for t in tensors}
            if len(batch) != 1:
                dims = ", ".join(f"{t.name}: {t.shape[0]}" for t in tensors)
                raise WireError(f"outputs have different 0-th dimensions ({dims}); the row format needs one batch "
                                "size: send the request in columnar format ('inputs')")
            cols = {t.name: _tf_json_value(t) for t in tensors}
            doc = {"predictions": [{k: v[i] for k, v in cols.items()} for i in range(batch.pop())]}
    return json.dumps(doc, allow_nan=True).encode("ascii")
