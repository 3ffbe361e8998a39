"""Constant folding with numpy: ops whose inputs are all known when a program is lowered
(shape arithmetic, constant reshapes, ...).  Each op's folder lives with the op in its family
module (``ops/``, registered with ``@folds``) and follows the ONNX operator spec."""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from .graph import Node
from .ops import find

__all__ = ["fold_node"]


def fold_node(n: Node, ins: Sequence[Optional[np.ndarray]], opset: int) -> List[np.ndarray]:
    """Evaluates ``n`` on constant inputs; raises NotImplementedError for ops it cannot."""
    spec = find(n.op)
    if spec is None or spec.fold is None:
        raise NotImplementedError(n.op)
    return spec.fold(n, [np.asarray(x) if x is not None else None for x in ins], opset)
