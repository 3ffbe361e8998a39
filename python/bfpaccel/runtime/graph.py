"""The plan's graph: a small, ONNX-shaped intermediate representation that needs no onnx.

A :class:`Graph` is a topologically sorted list of :class:`Node` objects over named values,
plus constant tensors (numpy) and the graph's inputs/outputs.  ``from_onnx`` reads an ONNX
model into it (that is the only place that imports ``onnx``); the compiler rewrites it and the
plan file stores it as JSON + arrays, so a plan loads with numpy alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Node", "ValueInfo", "Graph", "from_onnx"]


@dataclasses.dataclass
class Node:
    """One operation: ``op`` is the ONNX op type (or a ``Bfp*`` op the compiler made)."""

    op: str
    name: str
    inputs: List[str]
    outputs: List[str]
    attrs: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"op": self.op, "name": self.name, "inputs": self.inputs, "outputs": self.outputs, "attrs": self.attrs}

    @staticmethod
    def from_json(d: Dict[str, Any]) -> "Node":
        return Node(d["op"], d["name"], list(d["inputs"]), list(d["outputs"]), dict(d.get("attrs", {})))


@dataclasses.dataclass
class ValueInfo:
    """A graph input or output: name, dtype name and shape (``None`` for a dynamic dim)."""

    name: str
    dtype: str
    shape: Optional[List[Optional[int]]]

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}

    @staticmethod
    def from_json(d: Dict[str, Any]) -> "ValueInfo":
        return ValueInfo(d["name"], d["dtype"], d["shape"])


@dataclasses.dataclass
class Graph:
    """Nodes in topological order, constants, inputs and outputs."""

    nodes: List[Node]
    consts: Dict[str, np.ndarray]
    inputs: List[ValueInfo]
    outputs: List[ValueInfo]
    opset: int = 13

    def consumers(self) -> Dict[str, List[Node]]:
        """Value name -> the nodes that read it."""
        out: Dict[str, List[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    out.setdefault(i, []).append(n)
        return out

    def producer(self) -> Dict[str, Node]:
        """Value name -> the node that writes it."""
        return {o: n for n in self.nodes for o in n.outputs}

    def output_names(self) -> List[str]:
        return [o.name for o in self.outputs]

    def prune(self) -> None:
        """Drops nodes and constants no graph output depends on."""
        need = set(self.output_names())
        keep: List[Node] = []
        for n in reversed(self.nodes):
            if any(o in need for o in n.outputs):
                keep.append(n)
                need.update(i for i in n.inputs if i)
        self.nodes = list(reversed(keep))
        self.consts = {k: v for k, v in self.consts.items() if k in need}


_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
                11: "float64", 16: "bfloat16"}


def _attr_value(a: Any) -> Any:
    from onnx import helper, numpy_helper

    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return [x.decode("utf-8", "replace") for x in v]
    if hasattr(v, "dims") and hasattr(v, "data_type"):  # TensorProto (Constant's value)
        return {"__tensor__": True, "array": numpy_helper.to_array(v)}
    if hasattr(v, "node"):  # subgraph
        raise NotImplementedError("subgraph attributes")
    return list(v) if isinstance(v, (list, tuple)) else v


def _value_info(vi: Any) -> ValueInfo:
    t = vi.type.tensor_type
    dtype = _ONNX_DTYPES.get(t.elem_type, f"onnx-type-{t.elem_type}")
    shape: Optional[List[Optional[int]]] = None
    if t.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return ValueInfo(vi.name, dtype, shape)


def from_onnx(model: Any) -> Tuple[Graph, Dict[str, str]]:
    """Reads an ``onnx.ModelProto`` into a :class:`Graph`; returns it and the model's
    ``metadata_props`` as a dict.  Constant nodes become constants."""
    from onnx import numpy_helper

    g = model.graph
    opset = 13
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            opset = int(o.version)
    consts: Dict[str, np.ndarray] = {}
    for init in g.initializer:
        consts[init.name] = numpy_helper.to_array(init)
    nodes: List[Node] = []
    for i, n in enumerate(g.node):
        name = n.name or f"{n.op_type}_{i}"
        if n.domain not in ("", "ai.onnx"):
            nodes.append(Node(f"{n.domain}.{n.op_type}", name, list(n.input), list(n.output), {}))
            continue
        attrs: Dict[str, Any] = {}
        for a in n.attribute:
            try:
                attrs[a.name] = _attr_value(a)
            except NotImplementedError:
                attrs[a.name] = "<subgraph>"
        if n.op_type == "Constant":
            if "value" in attrs:
                consts[n.output[0]] = np.asarray(attrs["value"]["array"])
            elif "value_float" in attrs:
                consts[n.output[0]] = np.asarray(attrs["value_float"], np.float32)
            elif "value_floats" in attrs:
                consts[n.output[0]] = np.asarray(attrs["value_floats"], np.float32)
            elif "value_int" in attrs:
                consts[n.output[0]] = np.asarray(attrs["value_int"], np.int64)
            elif "value_ints" in attrs:
                consts[n.output[0]] = np.asarray(attrs["value_ints"], np.int64)
            else:
                nodes.append(Node("Constant", name, list(n.input), list(n.output), attrs))
            continue
        nodes.append(Node(n.op_type, name, list(n.input), list(n.output), attrs))
    init_names = set(consts)
    inputs = [_value_info(v) for v in g.input if v.name not in init_names]
    outputs = [_value_info(v) for v in g.output]
    meta = {p.key: p.value for p in model.metadata_props}
    return Graph(nodes, consts, inputs, outputs, opset), meta


def broadcast_shape(a: Sequence[int], b: Sequence[int]) -> Tuple[int, ...]:
    """numpy broadcasting of two shapes (ValueError when they do not broadcast)."""
    return tuple(np.broadcast_shapes(tuple(a), tuple(b)))
