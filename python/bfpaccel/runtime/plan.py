"""The compiled plan and its file format.

A plan file is a zip archive (``.bfpplan``), written uncompressed, holding

* ``plan.json``: ``{"bfpaccel_plan": <format version>, "bfpaccel_version", "format",
  "weight_format", "vector_precision", "seed", "opset", "inputs", "outputs", "nodes",
  "metadata", "consts": {name: {"dtype", "shape", "sha256"}}}``
* ``plan.json.sha256``: the SHA-256 of ``plan.json`` (format 2; format 1 files lack it and
  still load);
* ``consts.npz``: every constant (quantized weight codes and exponents, biases, shapes),
  one ``c<i>.npy`` per manifest entry, in order.

Loading checks the archive, the format version (a plan from a newer bfpaccel is refused with
a message saying so), the manifest as a whole (its checksum; types, required keys, every
node's attributes and the shapes they imply against the declared constants: see
``_validate.py``), every zip member's declared size against limits derived from the manifest
(no zip bombs), every array's header against its declared shape and dtype before it is read,
and the SHA-256 of every constant.  A truncated, corrupted or malformed file is a clear
:class:`PlanError` at load, never a crash or a wrong result at run time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..formats import Format, get_format
from ._validate import ALLOWED_DTYPES, ManifestInfo, check_manifest_or_raise
from .graph import Graph

__all__ = ["Plan", "PlanError", "load_plan", "PLAN_FORMAT_VERSION"]

#: Version of the plan file layout this bfpaccel writes (it reads this one and older).
#: 2: ``plan.json.sha256`` holds the SHA-256 of ``plan.json`` (format 1 files, without it, load).
PLAN_FORMAT_VERSION = 2
#: Largest plan.json accepted.
MAX_MANIFEST_BYTES = 64 << 20
#: Largest expansion of a compressed zip member (plans are written uncompressed).
MAX_COMPRESSION_RATIO = 50
_NPY_HEADER_MAX = 10000  # per array: npy header (numpy's own limit) and zip entry overhead
_MANIFEST, _MANIFEST_SHA, _CONSTS = "plan.json", "plan.json.sha256", "consts.npz"


class PlanError(ValueError):
    """A plan file that cannot be used (truncated, corrupted, from a newer version, ...)."""


def _format_to_json(f: Format) -> Dict[str, Any]:
    if f.name is not None and get_format(f.name, rounding=f.rounding) == f:
        return {"name": f.name, "rounding": f.rounding}
    return {"block": f.block, "shared_exp_bits": f.shared_exp_bits, "element": f.element, "rounding": f.rounding}


def _format_from_json(d: Dict[str, Any]) -> Format:
    if "name" in d:
        return get_format(d["name"], rounding=d.get("rounding"))
    return Format(d["block"], d["shared_exp_bits"], d["element"], rounding=d.get("rounding", "nearest_even"))


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(a).tobytes(order="C")).hexdigest()


class Plan:
    """A compiled model: the graph, its quantized weights, formats and metadata.

    Make one with :func:`bfpaccel.compile`, run it with :class:`bfpaccel.Session`, write it
    with :meth:`save` and read it back with :func:`load_plan` (no TensorFlow, no onnx).

    Attributes:
        format: activation block format at the matrix ops (or fp32).
        weight_format: block format of the weights.
        vector_precision: ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        metadata: strings copied from the ONNX ``metadata_props`` (e.g. ``bfpaccel.preprocess``).
    """

    def __init__(self, graph: Graph, metadata: Dict[str, str], format: Format, weight_format: Format,
                 vector_precision: str, seed: int = 0):
        self.graph = graph
        self.metadata = dict(metadata)
        self.format = format
        self.weight_format = weight_format
        self.vector_precision = vector_precision
        self.seed = int(seed)

    @property
    def input_names(self) -> List[str]:
        """Names of the graph inputs (feed them to ``Session.run``)."""
        return [v.name for v in self.graph.inputs]

    @property
    def output_names(self) -> List[str]:
        """Names of the graph outputs."""
        return [v.name for v in self.graph.outputs]

    @property
    def input_shapes(self) -> Dict[str, Optional[List[Optional[int]]]]:
        """Input name -> shape (``None`` for a dynamic dimension such as the batch)."""
        return {v.name: v.shape for v in self.graph.inputs}

    @property
    def input_dtypes(self) -> Dict[str, str]:
        """Input name -> its declared element type (``"float32"``, ``"int64"``...): what
        ``Session.run`` checks each feed against."""
        return {v.name: v.dtype for v in self.graph.inputs}

    @property
    def ops(self) -> Dict[str, int]:
        """Op type -> count, after compilation (folded batch-norms are gone)."""
        out: Dict[str, int] = {}
        for n in self.graph.nodes:
            out[n.op] = out.get(n.op, 0) + 1
        return out

    def weight_bytes(self) -> int:
        """Bytes of the quantized weights as the plan stores them (codes + exponents)."""
        return int(sum(a.nbytes for k, a in self.graph.consts.items() if k.endswith((".codes", ".exps", "/Wf"))))

    def __repr__(self) -> str:
        return (f"Plan({len(self.graph.nodes)} ops, format={self.format}, weight_format={self.weight_format}, "
                f"vector_precision={self.vector_precision}, inputs={self.input_names}, outputs={self.output_names})")

    # ------------------------------------------------------------ file
    def to_json(self) -> Dict[str, Any]:
        from .. import __version__

        g = self.graph
        return {
            "bfpaccel_plan": PLAN_FORMAT_VERSION,
            "bfpaccel_version": __version__,
            "format": _format_to_json(self.format),
            "weight_format": _format_to_json(self.weight_format),
            "vector_precision": self.vector_precision,
            "seed": self.seed,
            "opset": g.opset,
            "inputs": [v.to_json() for v in g.inputs],
            "outputs": [v.to_json() for v in g.outputs],
            "nodes": [n.to_json() for n in g.nodes],
            "metadata": self.metadata,
            "consts": {k: {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": _sha(v)} for k, v in g.consts.items()},
        }

    def save(self, path: Union[str, "os.PathLike[str]"]) -> str:
        """Writes the plan to one file (atomically: a temporary file renamed into place)."""
        path = os.fspath(path)
        for k, v in self.graph.consts.items():
            dt = np.asarray(v).dtype
            if str(dt) not in ALLOWED_DTYPES or not dt.isnative:
                raise PlanError(f"constant {k!r} has dtype {dt}, which a plan file does not store "
                                f"(one of {', '.join(ALLOWED_DTYPES)}, native byte order)")
        manifest = json.dumps(self.to_json(), default=_json_default).encode()
        buf = io.BytesIO()
        arrays: Dict[str, Any] = {f"c{i}": np.asarray(v) for i, v in enumerate(self.graph.consts.values())}
        np.savez(buf, **arrays)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
                z.writestr(_MANIFEST, manifest)
                z.writestr(_MANIFEST_SHA, hashlib.sha256(manifest).hexdigest() + "\n")
                z.writestr(_CONSTS, buf.getvalue())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"cannot store {type(o).__name__} in a plan")


def _zip_member(info: zipfile.ZipInfo, container_size: int, limit: int, what: str) -> None:
    """Checks a zip member's declared sizes before it is read: at most ``limit`` bytes, no
    more compressed bytes than the container holds, and no extreme compression ratio."""
    if info.file_size > limit:
        raise PlanError(f"{what} declares {info.file_size} bytes; the manifest allows at most {limit}")
    if info.compress_size > container_size:
        raise PlanError(f"{what} declares {info.compress_size} compressed bytes, more than the "
                        f"{container_size} the file holds (truncated or forged)")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise PlanError(f"{what}: stored member with inconsistent sizes")
    elif info.file_size > MAX_COMPRESSION_RATIO * info.compress_size + 4096:
        raise PlanError(f"{what} expands {info.compress_size} bytes to {info.file_size} "
                        f"(more than {MAX_COMPRESSION_RATIO}x: a zip bomb?)")


def _members(z: zipfile.ZipFile, allowed: Sequence[str], what: str) -> Dict[str, zipfile.ZipInfo]:
    infos = z.infolist()
    if len(infos) > len(allowed):
        names = [i.filename for i in infos[:len(allowed) + 3]]
        raise PlanError(f"{what} has {len(infos)} members ({names}...); expected {list(allowed)}")
    out: Dict[str, zipfile.ZipInfo] = {}
    for i in infos:
        if i.filename not in allowed:
            raise PlanError(f"{what} has an unexpected member {i.filename!r} (expected {list(allowed)})")
        if i.filename in out:
            raise PlanError(f"{what} has the member {i.filename!r} twice")
        out[i.filename] = i
    return out


def _read_npy(f: Any, name: str, dtype: np.dtype, shape: Tuple[int, ...]) -> np.ndarray:
    """One array of consts.npz, its header checked against the manifest before any allocation."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        hshape, fortran, hdtype = np.lib.format.read_array_header_1_0(f, max_header_size=_NPY_HEADER_MAX)
    elif version == (2, 0):
        hshape, fortran, hdtype = np.lib.format.read_array_header_2_0(f, max_header_size=_NPY_HEADER_MAX)
    else:
        raise ValueError(f"npy format version {version} is not one a plan uses")
    if tuple(hshape) != tuple(shape) or hdtype != dtype:
        raise PlanError(f"constant {name!r} is stored as {hdtype}{list(hshape)}, the manifest says {dtype}{list(shape)}")
    arr = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    view = memoryview(arr.reshape(-1, order="A")).cast("B") if arr.size else memoryview(b"")  # type: ignore[arg-type]
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    if got != arr.nbytes:
        raise PlanError(f"constant {name!r} is truncated ({got} of {arr.nbytes} bytes)")
    return arr


def _read_consts(blob: bytes, info: ManifestInfo) -> Dict[str, np.ndarray]:
    consts: Dict[str, np.ndarray] = {}
    with zipfile.ZipFile(io.BytesIO(blob)) as npz:
        want = [f"c{i}.npy" for i in range(len(info.consts))]
        members = _members(npz, want, "consts.npz")
        if len(members) != len(want):
            missing = [w for w in want if w not in members][:3]
            raise PlanError(f"consts.npz holds {len(members)} arrays, the manifest lists {len(want)} "
                            f"(missing {missing})")
        for (name, dtype, shape, sha), member in zip(info.consts, want):
            mi = members[member]
            nbytes = int(dtype.itemsize) * _prod(shape)
            _zip_member(mi, len(blob), nbytes + _NPY_HEADER_MAX, f"consts.npz member {member} ({name!r})")
            if mi.file_size < nbytes:
                raise PlanError(f"constant {name!r} is truncated ({mi.file_size} bytes, {nbytes} needed)")
            with npz.open(mi) as f:
                arr = _read_npy(f, name, dtype, shape)
            if _sha(arr) != sha:
                raise PlanError(f"constant {name!r} is corrupted (its SHA-256 differs from the manifest's)")
            consts[name] = arr
    return consts


def _prod(shape: Sequence[int]) -> int:
    p = 1
    for s in shape:
        p *= int(s)
    return p


def load_plan(path: Union[str, "os.PathLike[str]"]) -> Plan:
    """Reads a plan file written by :meth:`Plan.save`.

    The whole manifest is checked before any tensor is read (:mod:`._validate`): its own
    SHA-256 (format 2), types and required keys, every node's attributes and the shapes they
    imply against the declared constants; then each zip member's declared size against limits
    derived from the manifest, each array's header against its declared shape and dtype, and
    each constant's SHA-256.

    Raises:
        FileNotFoundError: no such file.
        PlanError: not a plan, truncated, corrupted or malformed (the message names the
            problem), or written by a newer bfpaccel.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"plan file not found: {path}")
    try:
        return _load(path)
    except PlanError as e:
        msg = str(e)
        raise PlanError(msg if msg.startswith(path) else f"{path}: {msg}") from e.__cause__
    except zipfile.BadZipFile as e:
        raise PlanError(f"{path} is not a bfpaccel plan or is truncated/corrupted ({e})") from e
    except (zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError,
            zlib.error) as e:
        raise PlanError(f"{path} could not be read as a plan: {e}") from e


def _load(path: str) -> Plan:
    file_size = os.path.getsize(path)
    with zipfile.ZipFile(path) as z:
        members = _members(z, (_MANIFEST, _MANIFEST_SHA, _CONSTS), "the plan zip")
        if _MANIFEST not in members or _CONSTS not in members:
            raise PlanError(f"{path} is not a bfpaccel plan (no plan.json / consts.npz inside)")
        _zip_member(members[_MANIFEST], file_size, MAX_MANIFEST_BYTES, "plan.json")
        raw = z.read(members[_MANIFEST])
        digest = None
        if _MANIFEST_SHA in members:
            _zip_member(members[_MANIFEST_SHA], file_size, 256, _MANIFEST_SHA)
            digest = z.read(members[_MANIFEST_SHA]).decode("ascii", "replace").strip()
            if digest != hashlib.sha256(raw).hexdigest():
                raise PlanError("plan.json is corrupted (its SHA-256 differs from plan.json.sha256)")
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise PlanError(f"plan.json is not UTF-8 text ({e})") from None
        except RecursionError:
            raise PlanError("plan.json is nested too deeply") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"plan.json is not valid JSON ({e})") from None
        version = manifest.get("bfpaccel_plan") if isinstance(manifest, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version > PLAN_FORMAT_VERSION:
            raise PlanError(
                f"{path} was written by bfpaccel {manifest.get('bfpaccel_version', '?')} with plan format "
                f"{version}; this bfpaccel reads format {PLAN_FORMAT_VERSION} and older: upgrade bfpaccel")
        if not isinstance(manifest, dict) or "bfpaccel_plan" not in manifest:
            raise PlanError(f"{path} is not a bfpaccel plan (plan.json is a {type(manifest).__name__} without "
                            "a format version)")
        info = check_manifest_or_raise(manifest, PlanError)
        if info.version >= 2 and digest is None:
            raise PlanError(f"plan format {info.version} stores the SHA-256 of plan.json in {_MANIFEST_SHA}, "
                            "which is missing (damaged or edited file)")
        limit = info.const_nbytes() + _NPY_HEADER_MAX * (len(info.consts) + 1)
        _zip_member(members[_CONSTS], file_size, limit, "consts.npz")
        blob = z.read(members[_CONSTS])
    consts = _read_consts(blob, info)
    g = Graph(nodes=info.nodes, consts=consts, inputs=info.inputs, outputs=info.outputs, opset=info.opset)
    return Plan(g, info.metadata, info.format, info.weight_format, info.vector_precision, info.seed)
