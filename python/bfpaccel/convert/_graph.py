"""Reading a TF1 graph's names without running it: node names, SavedModel signature aliases
and the ``preprocess_array`` records, so bad tensor names fail fast, before the conversion
subprocess starts. TensorFlow's protobuf classes are imported inside the functions."""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["GraphInfo", "read_graph_info", "resolve_tensor", "split_outputs", "source_kind"]

#: Graph collection written by ``bfpaccel.models.utils.preprocess_array`` (kept in sync there).
PREPROCESS_COLLECTION = "bfpaccel_preprocess"


@dataclass
class GraphInfo:
    """What name checks need: node names, signature aliases (alias -> tensor name) and the
    ``preprocess_array`` records found in the graph's collections."""

    source: str
    kind: str  # "saved_model" or "graph_def"
    nodes: Dict[str, str] = field(default_factory=dict)  # node name -> op type
    input_aliases: Dict[str, str] = field(default_factory=dict)
    output_aliases: Dict[str, str] = field(default_factory=dict)
    preprocess: List[dict] = field(default_factory=list)
    tags: List[str] = field(default_factory=list)


def source_kind(path: str) -> str:
    """``"saved_model"`` for a SavedModel directory, ``"graph_def"`` for a frozen ``.pb``."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return "saved_model"
        raise ValueError(f"{path!r} is a directory without saved_model.pb: expected a TensorFlow SavedModel "
                         "directory (tf.compat.v1.saved_model.simple_save) or a frozen GraphDef .pb file")
    if os.path.isfile(path):
        return "graph_def"
    raise FileNotFoundError(f"source model {path!r} does not exist")


def read_graph_info(path: str, tag: str = "serve") -> GraphInfo:
    """Parse a SavedModel's MetaGraphDef (no variables are loaded) or a frozen GraphDef.

    Example:
        >>> info = read_graph_info("model_dir")  # doctest: +SKIP
        >>> info.input_aliases  # doctest: +SKIP
        {'images': 'Placeholder:0'}
    """
    kind = source_kind(path)
    info = GraphInfo(source=path, kind=kind)
    if kind == "saved_model":
        from tensorflow.core.protobuf import saved_model_pb2

        sm = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            sm.ParseFromString(f.read())
        if not sm.meta_graphs:
            raise ValueError(f"SavedModel {path!r} holds no MetaGraph")
        metas = [m for m in sm.meta_graphs if tag in m.meta_info_def.tags] or list(sm.meta_graphs)
        meta = metas[0]
        info.tags = list(meta.meta_info_def.tags)
        graph_def = meta.graph_def
        for sig in meta.signature_def.values():
            for alias, t in sig.inputs.items():
                info.input_aliases.setdefault(alias, t.name)
            for alias, t in sig.outputs.items():
                info.output_aliases.setdefault(alias, t.name)
        if PREPROCESS_COLLECTION in meta.collection_def:
            for raw in meta.collection_def[PREPROCESS_COLLECTION].bytes_list.value:
                info.preprocess.append(json.loads(raw.decode() if isinstance(raw, bytes) else raw))
    else:
        from tensorflow.core.framework import graph_pb2

        graph_def = graph_pb2.GraphDef()
        with open(path, "rb") as f:
            data = f.read()
        try:
            graph_def.ParseFromString(data)
        except Exception as exc:  # protobuf raises DecodeError
            raise ValueError(f"{path!r} is not a binary GraphDef (.pb): {exc}") from None
    info.nodes = {n.name: n.op for n in graph_def.node}
    return info


def split_outputs(output_tensors: Union[str, Sequence[str]]) -> List[str]:
    """A comma-joined string (as the seed's notebooks pass) or a list -> list of names."""
    if isinstance(output_tensors, str):
        names = [s.strip() for s in output_tensors.split(",")]
    else:
        names = [str(s).strip() for s in output_tensors]
    names = [n for n in names if n]
    if not names:
        raise ValueError("output_tensors is empty: give one tensor name or several, comma-joined "
                         "(e.g. 'classifier/resnet_v1_50/predictions/Softmax:0')")
    return names


def _candidates(info: GraphInfo, aliases: Dict[str, str]) -> List[str]:
    return list(aliases) + [f"{n}:0" for n in info.nodes]


def resolve_tensor(info: GraphInfo, name: str, role: str) -> Tuple[str, Optional[str]]:
    """Map a user name (signature alias, ``node:idx`` or bare node name) to ``(tensor name,
    alias or None)``; raise ValueError naming the close matches when it is not in the graph."""
    aliases = info.input_aliases if role == "input" else info.output_aliases
    if name in aliases:
        return aliases[name], name
    node, _, idx = name.partition(":")
    if node in info.nodes and (idx == "" or idx.isdigit()):
        tensor = f"{node}:{idx or 0}"
        alias = next((a for a, t in aliases.items() if t == tensor), None)
        return tensor, alias
    close = difflib.get_close_matches(name, _candidates(info, aliases), n=5, cutoff=0.5)
    hint = f" Close names: {', '.join(repr(c) for c in close)}." if close else ""
    if aliases:
        hint += " Signature aliases: " + ", ".join(f"{a!r} -> {t!r}" for a, t in aliases.items()) + "."
    if ":" in name and node in info.nodes:
        raise ValueError(f"{role} tensor {name!r}: bad output index {idx!r} (expected an integer).{hint}")
    raise ValueError(f"{role} tensor {name!r} is not in the graph of {info.source!r}: "
                     f"no node named {node!r}.{hint}")
