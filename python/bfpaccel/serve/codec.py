"""numpy <-> ``tensorflow.TensorProto`` without TensorFlow (``tf.make_tensor_proto`` /
``tf.make_ndarray`` semantics for the dtypes a serving client meets).

Supported: float32 (DT_FLOAT), float64, float16 (DT_HALF), int8/16/32/64, uint8/16/32/64, bool and
strings/bytes (DT_STRING).  Decoding accepts packed ``tensor_content`` (little-endian) or the
typed ``*_val`` field; a single typed value is broadcast to the whole shape, as TensorFlow does.

Hostile input: shapes are checked with Python integers (rank at most :data:`MAX_RANK`, no
negative dimension, the element count never overflows), value counts are checked against the
shape before anything is allocated (:func:`check_tensor`), and ``make_ndarray(tp,
max_elements=...)`` refuses a shape over a limit before a single value is broadcast; every
such problem is a :class:`CodecError` (a ``ValueError``).

Example:
    >>> import numpy as np
    >>> from bfpaccel.serve.codec import make_tensor_proto, make_ndarray
    >>> make_ndarray(make_tensor_proto(np.eye(2, dtype=np.float32))).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import math
import sys
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _protos as pb

__all__ = ["make_tensor_proto", "make_ndarray", "numpy_dtype", "tf_dtype", "tensor_shape", "check_tensor",
           "CodecError", "MAX_RANK"]

#: Largest tensor rank accepted (numpy 1.x's limit; TensorFlow allows 254 but no model here needs it).
MAX_RANK = 32


class CodecError(ValueError):
    """A TensorProto that cannot be turned into an array (or an array that cannot be sent)."""


# DataType number -> (numpy dtype, typed field)
_TYPES = {
    pb.DT_FLOAT: (np.dtype("<f4"), "float_val"),
    pb.DT_DOUBLE: (np.dtype("<f8"), "double_val"),
    pb.DT_HALF: (np.dtype("<f2"), "half_val"),
    pb.DT_INT32: (np.dtype("<i4"), "int_val"),
    pb.DT_INT16: (np.dtype("<i2"), "int_val"),
    pb.DT_INT8: (np.dtype("i1"), "int_val"),
    pb.DT_UINT8: (np.dtype("u1"), "int_val"),
    pb.DT_UINT16: (np.dtype("<u2"), "int_val"),
    pb.DT_INT64: (np.dtype("<i8"), "int64_val"),
    pb.DT_UINT32: (np.dtype("<u4"), "uint32_val"),
    pb.DT_UINT64: (np.dtype("<u8"), "uint64_val"),
    pb.DT_BOOL: (np.dtype("?"), "bool_val"),
    pb.DT_STRING: (np.dtype(object), "string_val"),
}
#: dtypes tf.make_tensor_proto writes to their *_val field even when packing others
_NO_CONTENT = frozenset({pb.DT_BOOL, pb.DT_UINT16})
_FROM_NUMPY = {np.dtype(v[0]).newbyteorder("=") if v[0].kind != "O" else v[0]: k for k, v in _TYPES.items()}


def tf_dtype(dtype: Any) -> int:
    """The ``DataType`` number for a numpy dtype (``np.float32`` -> 1)."""
    dt = np.dtype(dtype)
    if dt.kind in "SUO":
        return pb.DT_STRING
    dt = dt.newbyteorder("=")
    if dt not in _FROM_NUMPY:
        raise CodecError(f"numpy dtype {dt} has no TensorProto encoding here; use float32/64, float16, "
                         "(u)int8/16/32/64, bool or bytes")
    return _FROM_NUMPY[dt]


def numpy_dtype(dtype: int) -> np.dtype:
    """The numpy dtype of a ``DataType`` number (``DT_STRING`` -> object)."""
    if dtype not in _TYPES:
        name = pb.DataTypeName.get(dtype, str(dtype))
        raise CodecError(f"tensor dtype {name} is not supported (supported: "
                         f"{', '.join(pb.DataTypeName[k] for k in _TYPES)})")
    return _TYPES[dtype][0]


def tensor_shape(tp: Any, max_rank: int = MAX_RANK) -> List[int]:
    """The shape of a TensorProto as a list of ints (``[]`` for a scalar); at most ``max_rank``
    dimensions, none negative."""
    if tp.tensor_shape.unknown_rank:
        raise CodecError("tensor has unknown rank")
    rank = len(tp.tensor_shape.dim)
    if rank > max_rank:
        raise CodecError(f"tensor has rank {rank}; at most {max_rank} dimensions are supported")
    dims = [int(d.size) for d in tp.tensor_shape.dim]
    if any(d < 0 for d in dims):
        raise CodecError(f"tensor shape {dims} has a negative dimension")
    return dims


def check_tensor(tp: Any, max_elements: Optional[int] = None) -> Tuple[np.dtype, List[int], int]:
    """Validates a TensorProto without allocating its values: ``(numpy dtype, shape, element
    count)``.  Checks the dtype, the shape (:func:`tensor_shape`), the element count (a Python
    int: no overflow; at most ``max_elements`` when given) and that the values present fit the
    shape (``tensor_content`` bytes, or ``*_val`` count equal to it or 1 to broadcast).

    Example:
        >>> t = pb.TensorProto(dtype=pb.DT_FLOAT); t.tensor_shape.dim.add().size = 3
        >>> t.float_val.append(0.5); check_tensor(t)[1:]
        ([3], 3)
    """
    if tp.dtype == pb.DT_INVALID:
        raise CodecError("tensor has no dtype (DT_INVALID): an empty or missing TensorProto")
    npdt = numpy_dtype(tp.dtype)
    shape = tensor_shape(tp)
    n = math.prod(shape)
    if max_elements is not None and n > max_elements:
        raise CodecError(f"tensor shape {shape} has {n} elements, over the limit of {max_elements}")
    if tp.dtype == pb.DT_STRING:
        k = len(tp.string_val)
        if k != n and k != 1:
            raise CodecError(f"DT_STRING tensor of shape {shape} has {k} values")
        return npdt, shape, _representable(shape, n, npdt)
    if tp.tensor_content:
        if len(tp.tensor_content) != n * npdt.itemsize:
            raise CodecError(f"tensor_content has {len(tp.tensor_content)} bytes; shape {shape} of "
                             f"{pb.DataTypeName[tp.dtype]} needs {n * npdt.itemsize}")
        return npdt, shape, _representable(shape, n, npdt)
    k = len(getattr(tp, _TYPES[tp.dtype][1]))
    if k != n and k != 1:
        raise CodecError(f"{pb.DataTypeName[tp.dtype]} tensor of shape {shape} has {k} values in "
                         f"{_TYPES[tp.dtype][1]} and no tensor_content")
    return npdt, shape, _representable(shape, n, npdt)


def _representable(shape: List[int], n: int, npdt: np.dtype) -> int:
    """``n`` when numpy can hold an array of ``shape`` (it refuses, even with a zero
    dimension, when the other dimensions' bytes overflow an index); else CodecError."""
    if math.prod(d for d in shape if d) * max(npdt.itemsize, 1) > sys.maxsize:
        raise CodecError(f"tensor shape {shape} is too large to represent")
    return n


def make_tensor_proto(values: Any, dtype: Optional[Union[int, Any]] = None, shape: Optional[Sequence[int]] = None,
                      use_tensor_content: bool = True) -> Any:
    """Encodes an array (or bytes / a list of bytes) as a TensorProto.

    Args:
        values: array-like; ``bytes``/``str`` or a sequence of them for DT_STRING.
        dtype: a ``DataType`` number or a numpy dtype (default: from ``values``).
        shape: the shape to declare (default: the array's); a single value is broadcast.
        use_tensor_content: numeric values packed little-endian in ``tensor_content`` (what
            ``tf.make_tensor_proto`` does; bool and uint16 still go to their ``*_val`` field,
            as there); ``False`` writes the typed ``*_val`` field.

    Example:
        >>> make_tensor_proto([b"jpeg bytes"]).dtype == pb.DT_STRING
        True
    """
    want = (dtype if isinstance(dtype, int) and not isinstance(dtype, bool) else
            (tf_dtype(dtype) if dtype is not None else None))
    if isinstance(values, (bytes, bytearray, str)):
        values = [values]
        if shape is None:
            shape = []
    if want == pb.DT_STRING or (want is None and _is_stringy(values)):
        arr = np.asarray(values, dtype=object)
        tp = pb.TensorProto(dtype=pb.DT_STRING)
        flat = [v.encode() if isinstance(v, str) else bytes(v) for v in arr.reshape(-1)]
        tp.string_val.extend(flat)
        dims = list(arr.shape) if shape is None else list(shape)
    else:
        arr = np.asarray(values)
        if want is None:
            want = tf_dtype(arr.dtype)
        npdt = numpy_dtype(want)
        arr = np.asarray(arr, dtype=npdt)
        dims = list(arr.shape) if shape is None else list(shape)
        n = math.prod(int(d) for d in dims)
        if arr.size not in (n, 1):
            raise CodecError(f"{arr.size} values cannot fill shape {dims}")
        tp = pb.TensorProto(dtype=want)
        if use_tensor_content and want not in _NO_CONTENT:
            if arr.size != n:
                arr = np.broadcast_to(arr.reshape(-1)[:1], (n,))
            tp.tensor_content = np.ascontiguousarray(arr, dtype=npdt).tobytes()
        else:
            field = _TYPES[want][1]
            flat = arr.reshape(-1)
            if want == pb.DT_HALF:
                flat = flat.view(np.uint16)
            getattr(tp, field).extend(flat.tolist())
    for d in dims:
        tp.tensor_shape.dim.add().size = int(d)
    return tp


def _is_stringy(values: Any) -> bool:
    if isinstance(values, np.ndarray):
        return values.dtype.kind in "SUO" and (values.dtype.kind != "O" or
                                               all(isinstance(v, (bytes, str)) for v in values.reshape(-1)[:1]))
    if isinstance(values, (list, tuple)) and values:
        first = values[0]
        while isinstance(first, (list, tuple)) and first:
            first = first[0]
        return isinstance(first, (bytes, bytearray, str))
    return False


def make_ndarray(tp: Any, max_elements: Optional[int] = None) -> np.ndarray:
    """Decodes a TensorProto into a numpy array (``tf.make_ndarray`` semantics).

    DT_STRING gives an object array of ``bytes``.  Raises :class:`CodecError` for an
    unsupported dtype, a bad shape, a shape of more than ``max_elements`` elements (checked
    before a single value is broadcast; pass it for untrusted input) or when the value count
    does not fit the shape.  Integer ``*_val`` values out of the dtype's range wrap, as
    TensorFlow's C++ cast does.

    Example:
        >>> t = pb.TensorProto(dtype=pb.DT_FLOAT); t.tensor_shape.dim.add().size = 3
        >>> t.float_val.append(0.5); make_ndarray(t).tolist()   # one value: broadcast
        [0.5, 0.5, 0.5]
    """
    npdt, shape, n = check_tensor(tp, max_elements)
    if tp.dtype == pb.DT_STRING:
        vals = list(tp.string_val)
        if len(vals) == 1 and n != 1:
            vals = vals * n
        out = np.empty(len(vals), dtype=object)
        out[:] = vals
        return out.reshape(shape)
    if tp.tensor_content:
        return np.frombuffer(tp.tensor_content, dtype=npdt).reshape(shape).astype(npdt.newbyteorder("="))
    field_name = _TYPES[tp.dtype][1]
    field = getattr(tp, field_name)
    if tp.dtype == pb.DT_HALF:
        vals = np.array(field, dtype=np.int32).astype(np.uint16).view(np.float16)
    elif field_name in _FIELD_DTYPES:  # the field's own integer type, then a wrapping cast
        vals = np.array(field, dtype=_FIELD_DTYPES[field_name]).astype(npdt.newbyteorder("="))
    else:
        vals = np.array(field, dtype=npdt.newbyteorder("="))
    if vals.size == n:
        return vals.reshape(shape)
    return np.repeat(vals, n).reshape(shape)  # one value (checked): broadcast


#: integer *_val fields -> their protobuf type
_FIELD_DTYPES = {"int_val": np.int32, "int64_val": np.int64, "uint32_val": np.uint32, "uint64_val": np.uint64}


def float_tensor_proto(arr: np.ndarray) -> Any:
    """A float32 TensorProto with the values in ``float_val`` (what the seed's service sent)."""
    a = np.asarray(arr, dtype=np.float32)
    tp = pb.TensorProto(dtype=pb.DT_FLOAT)
    for d in a.shape:
        tp.tensor_shape.dim.add().size = int(d)
    tp.float_val.extend(a.reshape(-1).tolist())
    return tp

