"""The compiled plan and its file format.

A plan file is a zip archive (``.bfpplan``) holding

* ``plan.json``: ``{"bfpaccel_plan": <format version>, "bfpaccel_version", "format",
  "weight_format", "vector_precision", "seed", "opset", "inputs", "outputs", "nodes",
  "metadata", "consts": {name: {"dtype", "shape", "sha256"}}}``
* ``consts.npz``: every constant (quantized weight codes and exponents, biases, shapes),
  loaded with ``allow_pickle=False``.

Loading checks the archive, the format version (a plan from a newer bfpaccel is refused with
a message saying so) and the SHA-256 of every constant, so a truncated or corrupted file is a
clear :class:`PlanError`, never a crash.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from typing import Any, Dict, List, Optional, Union

import numpy as np

from ..formats import Format, get_format
from .graph import Graph, Node, ValueInfo

__all__ = ["Plan", "PlanError", "load_plan", "PLAN_FORMAT_VERSION"]

#: Version of the plan file layout this bfpaccel writes and reads.
PLAN_FORMAT_VERSION = 1


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
        manifest = json.dumps(self.to_json(), default=_json_default).encode()
        buf = io.BytesIO()
        arrays: Dict[str, Any] = {f"c{i}": np.asarray(v) for i, v in enumerate(self.graph.consts.values())}
        np.savez(buf, **arrays)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
                z.writestr("plan.json", manifest)
                z.writestr("consts.npz", buf.getvalue())
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


def load_plan(path: Union[str, "os.PathLike[str]"]) -> Plan:
    """Reads a plan file written by :meth:`Plan.save`.

    Raises:
        FileNotFoundError: no such file.
        PlanError: not a plan, truncated or corrupted, or written by a newer bfpaccel.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"plan file not found: {path}")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if "plan.json" not in names or "consts.npz" not in names:
                raise PlanError(f"{path} is not a bfpaccel plan (no plan.json / consts.npz inside)")
            manifest = json.loads(z.read("plan.json"))
            blob = z.read("consts.npz")
    except zipfile.BadZipFile as e:
        raise PlanError(f"{path} is not a bfpaccel plan or is truncated/corrupted ({e})") from e
    except (zipfile.LargeZipFile, OSError, EOFError, json.JSONDecodeError) as e:
        raise PlanError(f"{path} could not be read as a plan: {e}") from e
    version = manifest.get("bfpaccel_plan")
    if not isinstance(version, int):
        raise PlanError(f"{path} is not a bfpaccel plan (no format version)")
    if version > PLAN_FORMAT_VERSION:
        raise PlanError(
            f"{path} was written by bfpaccel {manifest.get('bfpaccel_version', '?')} with plan format "
            f"{version}; this bfpaccel reads format {PLAN_FORMAT_VERSION} and older: upgrade bfpaccel")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            arrays = [npz[f"c{i}"] for i in range(len(manifest["consts"]))]
    except Exception as e:
        raise PlanError(f"{path}: the constants are unreadable ({e})") from e
    consts: Dict[str, np.ndarray] = {}
    for (name, info), arr in zip(manifest["consts"].items(), arrays):
        if list(arr.shape) != list(info["shape"]) or str(arr.dtype) != info["dtype"] or _sha(arr) != info["sha256"]:
            raise PlanError(f"{path}: constant {name!r} is corrupted (shape, dtype or checksum differ)")
        consts[name] = arr
    g = Graph(
        nodes=[Node.from_json(d) for d in manifest["nodes"]],
        consts=consts,
        inputs=[ValueInfo.from_json(d) for d in manifest["inputs"]],
        outputs=[ValueInfo.from_json(d) for d in manifest["outputs"]],
        opset=int(manifest.get("opset", 13)),
    )
    return Plan(g, manifest.get("metadata", {}), _format_from_json(manifest["format"]),
                _format_from_json(manifest["weight_format"]), manifest["vector_precision"], manifest.get("seed", 0))
