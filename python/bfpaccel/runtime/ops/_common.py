"""Helpers shared by several op families."""

from __future__ import annotations

import re
from typing import Any, List, Sequence

from ..graph import Node

__all__ = ["pads_2d", "core_kind"]


def core_kind(enum: Any, op_type: str) -> Any:
    """The member of a core enum (``_core.UnaryKind``...) named after an ONNX op type:
    ``core_kind(UnaryKind, "LeakyRelu")`` is ``UnaryKind.LEAKY_RELU``."""
    return getattr(enum, re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", op_type).upper())


def pads_2d(n: Node, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
            dil: Sequence[int]) -> List[int]:
    """A 2-D window op's padding ``[top, left, bottom, right]`` from ``pads`` / ``auto_pad``."""
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
