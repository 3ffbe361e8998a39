"""``Session``: run a compiled plan (ONNX-Runtime-like ``run``)."""

from __future__ import annotations

from collections import OrderedDict

import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import _core  # type: ignore[attr-defined]
from .. import core
from .lower import Lowered, lower
from .plan import Plan, load_plan
from .profile import ProfileSummary

__all__ = ["Session"]


#: the largest integer magnitude an integer input may hold: the float32 buffers carry every
#: integer up to 2^24 exactly
MAX_EXACT_INT = 1 << 24


def _typed_feed(name: str, arr: np.ndarray, declared: str) -> np.ndarray:
    """A feed checked against its input's declared element type: a float input takes any numeric
    array (as float32); an integer input takes integers (kept as they are, every value of
    magnitude <= 2^24); a boolean input takes booleans."""
    try:
        kind = np.dtype(declared).kind
    except TypeError:
        kind = "f"
    if kind == "f":
        return np.ascontiguousarray(arr, dtype=np.float32)
    if kind == "b":
        if arr.dtype.kind != "b":
            raise ValueError(f"input {name!r} is declared bool, got dtype {arr.dtype}")
        return np.ascontiguousarray(arr)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"input {name!r} is declared {declared} (integer), got dtype {arr.dtype}: feed integers "
                         "(token ids, masks) as an integer array")
    if arr.size and (int(arr.max()) > MAX_EXACT_INT or int(arr.min()) < -MAX_EXACT_INT):
        bad = arr[(arr > MAX_EXACT_INT) | (arr < -MAX_EXACT_INT)].reshape(-1)[0]
        raise ValueError(f"input {name!r} holds {int(bad)}: integer inputs must lie in [-2^24, 2^24] (the datapath "
                         "carries them exactly in float32)")
    return np.ascontiguousarray(arr)


class Session:
    """Runs a :class:`~bfpaccel.runtime.plan.Plan` on the C++ core.

    The whole graph executes inside C++: the first call with a new set of input shapes lowers
    the plan into a program (layouts, buffers, fused epilogues; weights were quantized at
    compile time and are packed once per session), later calls only copy the inputs in and
    the outputs out.  ``run`` releases the GIL; calls from several threads are serialised per
    input signature.

    Options belong to the session, as onnxruntime's ``SessionOptions`` do: ``kernel`` and
    ``num_threads`` apply to this session's calls only (lowering, weight packing, runs), in
    whichever thread makes them; the process defaults (:func:`bfpaccel.set_kernel`,
    :func:`bfpaccel.set_num_threads`) and other sessions are untouched.

    Args:
        plan: a ``Plan`` or the path of a plan file.
        num_threads: threads of the C++ core for this session (``None``: the process setting
            at each call, :func:`bfpaccel.get_num_threads`).
        kernel: the kernel for this session, one of :func:`bfpaccel.available_kernels`
            (``None``: the process setting at each call, :func:`bfpaccel.get_kernel`).
        max_programs: lowered programs kept (one per kernel and input shape, each with its
            packed weights), least recently used dropped first; a dropped shape is lowered
            again when it comes back.

    Raises:
        ValueError: an unknown kernel, one this CPU cannot run, or a thread count out of
            range (the message names the valid values).

    Example:
        >>> sess = bfpaccel.Session(plan, num_threads=2, kernel="avx2")  # doctest: +SKIP
        >>> probs = sess.run(None, {"input:0": x})["softmax:0"]  # doctest: +SKIP
        >>> print(sess.profile_summary({"input:0": x}))  # doctest: +SKIP
    """

    def __init__(self, plan: Union[Plan, str, "os.PathLike[str]"], num_threads: Optional[int] = None,
                 kernel: Optional[str] = None, max_programs: int = 8):
        if not isinstance(max_programs, int) or max_programs < 1:
            raise ValueError(f"max_programs must be an int >= 1, got {max_programs!r}")
        self.max_programs = max_programs
        self._kernel = core.check_kernel(kernel)
        self._threads = None if num_threads is None else core.check_num_threads(num_threads)
        if not isinstance(plan, Plan):
            plan = load_plan(plan)
        self.plan = plan
        # programs hold weights packed for one kernel: keyed by kernel and input shapes, the
        # `max_programs` most recently used kept (each batch size is a program: unbounded
        # otherwise under dynamic batching or varied request sizes)
        self._programs: "OrderedDict[Tuple[str, Tuple[Tuple[str, Tuple[int, ...]], ...]], Lowered]" = OrderedDict()
        self._lock = threading.Lock()

    @property
    def kernel(self) -> str:
        """The kernel this session's calls use (the process default when none was given)."""
        with self.options():
            return core.get_kernel()

    @property
    def num_threads(self) -> int:
        """The thread count this session's calls use (the process default when none was given)."""
        with self.options():
            return core.get_num_threads()

    def options(self) -> Any:
        """A context manager that applies this session's kernel and thread count to the calling
        thread's core calls (``_core.ExecOptions``); ``run`` and ``profile`` enter it."""
        return _core.ExecOptions(self._kernel, self._threads or 0)

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
        types = self.plan.input_dtypes
        for k, v in feeds.items():
            arr = np.asarray(v)
            if arr.dtype.kind not in "fiub":
                raise ValueError(f"input {k!r} must be numeric, got dtype {arr.dtype}")
            arr = _typed_feed(k, arr, types.get(k, "float32"))
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
        """The lowered program for these input shapes (built on first use, with this session's
        kernel: its weights are packed for it)."""
        with self.options():
            return self._program(shapes)

    def _program(self, shapes: Dict[str, Tuple[int, ...]]) -> Lowered:
        # inside self.options(): get_kernel() is the kernel this call runs with
        key = (core.get_kernel(), tuple(sorted((k, tuple(v)) for k, v in shapes.items())))
        with self._lock:
            lw = self._programs.get(key)
            if lw is None:
                lw = lower(self.plan, dict(shapes))
                self._programs[key] = lw
                while len(self._programs) > self.max_programs:
                    self._programs.popitem(last=False)
            else:
                self._programs.move_to_end(key)
        return lw

    def run(self, output_names: Optional[Sequence[str]], feed_dict: Dict[str, Any]) -> Dict[str, np.ndarray]:
        """Runs the plan.

        Args:
            output_names: outputs to return (``None``: all of them).
            feed_dict: input name -> array. A float input takes any numeric array (cast to
                float32); an integer input (``int64`` token ids...) takes an integer array whose
                values lie in [-2^24, 2^24]; a boolean input a boolean array.

        Returns:
            dict output name -> array: float32, or the declared integer / boolean type of an
            integer or boolean output.

        Raises:
            ValueError: an unknown or missing input, a shape or element type the plan does not
                take, an integer out of range, or (from the core) an index outside its table.
        """
        feeds = self._check_feeds(feed_dict)
        names = list(self.plan.output_names if output_names is None else output_names)
        bad = [n for n in names if n not in self.plan.output_names]
        if bad:
            raise ValueError(f"unknown output(s) {bad}; the plan's outputs are {self.plan.output_names}")
        with self.options():
            lw = self._program({k: v.shape for k, v in feeds.items()})
            return lw.run(feeds, names)

    def profile(self, feed_dict: Dict[str, Any]) -> List[Tuple[str, float]]:
        """Runs once with per-op timing; returns (op name, seconds) in execution order.
        See :meth:`profile_summary` for totals per op kind and the GEMM kernel's share."""
        feeds = self._check_feeds(feed_dict)
        with self.options():
            lw = self._program({k: v.shape for k, v in feeds.items()})
            times, _ = self._profiled_run(lw, feeds)
        return list(zip(lw.op_names, times))

    def _profiled_run(self, lw: Lowered, feeds: Dict[str, np.ndarray]) -> Tuple[List[float], List[float]]:
        lw.program.set_profile(True)
        try:
            lw.run(feeds, self.plan.output_names)
            return list(lw.program.last_times), list(lw.program.last_gemm_times)
        finally:
            lw.program.set_profile(False)

    def profile_summary(self, feed_dict: Dict[str, Any], runs: int = 5, *, top: int = 10,
                        warmup: bool = True) -> ProfileSummary:
        """Times every op over ``runs`` profiled runs and aggregates the fastest run: total
        seconds, seconds per op kind, the seconds and share of the integer GEMM kernel
        (``kernel_share``), the ``top`` slowest ops.  ``print()`` it for a table.

        Args:
            feed_dict: input name -> array, as for :meth:`run`.
            runs: profiled runs (>= 1); the one with the smallest total is kept, so every
                figure of the summary comes from the same, least disturbed, run.
            top: how many of the slowest ops ``top_ops`` lists.
            warmup: one untimed run first (lowers the plan for new shapes, warms caches).

        Example:
            >>> s = sess.profile_summary({"x": x})  # doctest: +SKIP
            >>> s.total_seconds, s.kind_seconds["conv"], s.kernel_share  # doctest: +SKIP
            (0.0123, 0.0101, 0.64)
        """
        if isinstance(runs, bool) or not isinstance(runs, (int, np.integer)) or runs < 1:
            raise ValueError(f"runs must be an int >= 1, got {runs!r}")
        if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 0:
            raise ValueError(f"top must be an int >= 0, got {top!r}")
        feeds = self._check_feeds(feed_dict)
        with self.options():
            lw = self._program({k: v.shape for k, v in feeds.items()})
            if warmup:
                lw.run(feeds, self.plan.output_names)
            timed = [self._profiled_run(lw, feeds) for _ in range(int(runs))]
            kernel, threads = core.get_kernel(), core.get_num_threads()
        return ProfileSummary.from_runs(lw.op_names, lw.op_kinds, timed, kernel=kernel, threads=threads,
                                        top=int(top), input_shapes={k: tuple(v.shape) for k, v in feeds.items()})
