"""``Session``: run a compiled plan (ONNX-Runtime-like ``run``)."""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import core
from .lower import Lowered, lower
from .plan import Plan, load_plan

__all__ = ["Session"]


class Session:
    """Runs a :class:`~bfpaccel.runtime.plan.Plan` on the C++ core.

    The whole graph executes inside C++: the first call with a new set of input shapes lowers
    the plan into a program (layouts, buffers, fused epilogues; weights were quantized at
    compile time and are packed once per session), later calls only copy the inputs in and
    the outputs out.  ``run`` releases the GIL; calls from several threads are serialised per
    input signature.

    Args:
        plan: a ``Plan`` or the path of a plan file.
        num_threads: threads of the C++ core (``None``: keep the process setting; see
            :func:`bfpaccel.set_num_threads`).

    Example:
        >>> sess = bfpaccel.Session(plan)  # doctest: +SKIP
        >>> probs = sess.run(None, {"input:0": x})["softmax:0"]  # doctest: +SKIP
    """

    def __init__(self, plan: Union[Plan, str, "os.PathLike[str]"], num_threads: Optional[int] = None):
        if not isinstance(plan, Plan):
            plan = load_plan(plan)
        self.plan = plan
        if num_threads is not None:
            core.set_num_threads(num_threads)
        self._programs: Dict[Tuple[Tuple[str, Tuple[int, ...]], ...], Lowered] = {}
        self._lock = threading.Lock()

    @property
    def input_names(self) -> List[str]:
        return self.plan.input_names

    @property
    def output_names(self) -> List[str]:
        return self.plan.output_names

    def _check_feeds(self, feeds: Dict[str, Any]) -> Dict[str, np.ndarray]:
        if not isinstance(feeds, dict):
            raise TypeError("feed_dict must be a dict of input name -> array")
        want = self.plan.input_shapes
        unknown = [k for k in feeds if k not in want]
        if unknown:
            raise ValueError(f"unknown input(s) {unknown}; the plan's inputs are {list(want)}")
        missing = [k for k in want if k not in feeds]
        if missing:
            raise ValueError(f"missing input(s) {missing}")
        out: Dict[str, np.ndarray] = {}
        for k, v in feeds.items():
            arr = np.asarray(v)
            if arr.dtype.kind not in "fiub":
                raise ValueError(f"input {k!r} must be numeric, got dtype {arr.dtype}")
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            shape = want[k]
            if shape is not None:
                if arr.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, arr.shape)):
                    raise ValueError(f"input {k!r} has shape {arr.shape}; the plan expects "
                                     f"{['N' if s is None else s for s in shape]}")
            if arr.size == 0:
                raise ValueError(f"input {k!r} is empty")
            out[k] = arr
        return out

    def program(self, shapes: Dict[str, Tuple[int, ...]]) -> Lowered:
        """The lowered program for these input shapes (built on first use)."""
        key = tuple(sorted((k, tuple(v)) for k, v in shapes.items()))
        with self._lock:
            lw = self._programs.get(key)
            if lw is None:
                lw = lower(self.plan, dict(shapes))
                self._programs[key] = lw
        return lw

    def run(self, output_names: Optional[Sequence[str]], feed_dict: Dict[str, Any]) -> Dict[str, np.ndarray]:
        """Runs the plan.

        Args:
            output_names: outputs to return (``None``: all of them).
            feed_dict: input name -> array (float; cast to float32).

        Returns:
            dict output name -> float32 array.
        """
        feeds = self._check_feeds(feed_dict)
        names = list(self.plan.output_names if output_names is None else output_names)
        bad = [n for n in names if n not in self.plan.output_names]
        if bad:
            raise ValueError(f"unknown output(s) {bad}; the plan's outputs are {self.plan.output_names}")
        lw = self.program({k: v.shape for k, v in feeds.items()})
        return lw.run(feeds, names)

    def profile(self, feed_dict: Dict[str, Any]) -> List[Tuple[str, float]]:
        """Runs once with per-op timing; returns (op name, seconds) in execution order."""
        feeds = self._check_feeds(feed_dict)
        lw = self.program({k: v.shape for k, v in feeds.items()})
        lw.program.set_profile(True)
        try:
            lw.run(feeds, self.plan.output_names)
            return list(zip(lw.op_names, lw.program.last_times))
        finally:
            lw.program.set_profile(False)
