"""Runtime values of the lowering: logical shape, physical layout and buffer.

Shared by the lowering machinery (``lower.py``) and the op handlers (``ops/``).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

__all__ = ["Value", "LoweringError", "ident", "compatible", "strides"]


class LoweringError(ValueError):
    """The graph cannot run with these input shapes (the message names the node)."""


class Value:
    """A runtime value: logical (ONNX) shape, physical permutation and its (virtual) buffer.

    Physical axis ``i`` holds logical axis ``perm[i]``: a channels-last tensor under an NCHW
    logical shape has ``perm == (0, 2, 3, 1)``.
    """

    __slots__ = ("shape", "perm", "vid")

    def __init__(self, shape: Sequence[int], perm: Sequence[int], vid: int):
        self.shape = tuple(int(s) for s in shape)
        self.perm = tuple(int(p) for p in perm)
        self.vid = vid

    @property
    def phys(self) -> Tuple[int, ...]:
        """The shape as laid out in memory."""
        return tuple(self.shape[p] for p in self.perm)

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))


def ident(r: int) -> Tuple[int, ...]:
    """The identity permutation of rank ``r``."""
    return tuple(range(r))


def compatible(shape: Sequence[int], perm: Sequence[int], want: Sequence[int]) -> bool:
    """True when data laid out by ``perm`` is already laid out by ``want`` (size-1 axes aside)."""
    a = [p for p in perm if shape[p] != 1]
    b = [p for p in want if shape[p] != 1]
    return a == b


def strides(phys: Sequence[int]) -> List[int]:
    """Row-major strides (in elements) of a contiguous tensor of shape ``phys``."""
    s = [1] * len(phys)
    for i in range(len(phys) - 2, -1, -1):
        s[i] = s[i + 1] * int(phys[i + 1])
    return s
