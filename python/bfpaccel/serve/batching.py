"""Dynamic batching: concurrent float requests to one model version run as one model call.

Off by default (the NPU's point is batch 1); ``serve(batching=True)`` / ``bfpaccel serve
--batching`` installs a :class:`Batcher` as ``ServingCore.batcher``, and
:meth:`ServingCore.infer <bfpaccel.serve.core.ServingCore.infer>` hands it every request it
:meth:`~Batcher.accepts`.

* **What is merged**: float tensors whose first dimension is the model's free batch dimension
  and whose other dimensions are the model's fixed ones, with fewer rows than
  ``max_batch_size`` (a request of ``max_batch_size`` rows or more runs alone, unbatched).
  Everything else -- encoded images, integer tensors, models with other free dimensions --
  takes the unbatched path.
* **When a batch runs**: each model version has a queue of pending requests and a scheduler
  thread.  A batch is ready when the queued rows reach ``max_batch_size`` (or the next request
  would not fit), when a prefix of the queue adds up to a preferred size, or when the oldest
  request has waited ``timeout_s``.  The scheduler then takes a worker predictor from
  ``mv.predictors`` -- the same workers unbatched calls use, so at most ``core.workers`` model
  calls run per version -- and, once it has one, cuts the batch from what is queued *then*
  (requests keep joining while every worker is busy): the longest prefix whose rows are a
  preferred size (``max_batch_size`` counts as preferred), else the longest prefix that fits.
  Requests run in arrival order.
* **Bit identity**: each request's rows are sliced out of the batch's outputs.  The runtime
  computes every batch row exactly as it computes that row alone (convolutions run every
  image's pixels as rows of one GEMM, activations are quantized in blocks along the channel /
  reduction axis, never across rows; ``tests/test_batching.py`` checks every format and
  kernel).  A *model* may still mix rows (a Reshape folding the batch axis, a reduction over
  it): the first batch of several requests of each version is therefore also run request by
  request, and when any result differs in its bits (or an output's first dimension is not
  the batch) that version is never batched again (logged) and the requests get their batch-1
  results.
* **Deadlines and errors**: a request whose deadline passes while it is queued gets
  DEADLINE_EXCEEDED (once its batch runs, it waits for the result, as an unbatched call
  does); at most ``max(core.queue_size, max_batch_size)`` requests queue per version (then
  RESOURCE_EXHAUSTED); an error of a batch's model call is every member's error (a
  ``ValueError`` is INVALID_ARGUMENT, out of memory RESOURCE_EXHAUSTED); :meth:`Batcher.stop`
  answers the queued requests UNAVAILABLE.
* **Metrics**: per request, ``core.metrics.observe_split(model, queue_s, compute_s)`` -- queue
  time from submission until the batch's model call starts (waiting for the batch to form and
  for a worker), compute time of that call; per model call ``bfpaccel_batch_size`` (rows);
  the gauge ``bfpaccel_batch_queue_depth`` (requests waiting in every batch queue).

Encoded images are not batched.  The unbatched path decodes them inside a worker slot, so at
most ``workers`` images per version are decoded at once and their float tensors live only
while the model runs.  Decoding before queueing would keep every queued request's decoded
tensor (600 KiB per 224x224 image) in memory for the whole batching wait, and bounding that
to ``workers`` requests would cap every batch at ``workers`` requests; the core's batcher hook
is only called for float tensors, so image requests keep today's path and bound.

Each batch size a session meets is lowered into its own program (built on first use, kept):
with batching on a worker holds up to ``max_batch_size`` programs, and the first batch of each
size pays for its lowering.

Example:
    >>> h = serve("tiny.bfpplan", port=0, batching=True, max_batch_size=8,  # doctest: +SKIP
    ...           batch_timeout_ms=2.0, preferred_batch_sizes=[4, 8])
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Deque, Dict, List, Optional, Sequence

import numpy as np

from .core import Code, ModelVersion, ServingCore, ServingError, VersionState

__all__ = ["Batcher"]

log = logging.getLogger("bfpaccel.serve")

#: How often an idle scheduler (or one waiting for a worker) looks at stop and unloads.
_POLL_S = 0.1


class _Request:
    """One submitted request: its rows, wanted outputs and, once answered, result or error."""

    __slots__ = ("x", "rows", "names", "deadline", "t_submit", "done", "result", "error")

    def __init__(self, x: np.ndarray, names: Optional[List[str]], deadline: Optional[float]) -> None:
        self.x = x
        self.rows = int(x.shape[0])
        self.names = names  # resolved output names, None: every output
        self.deadline = deadline  # time.monotonic() value or None
        self.t_submit = time.perf_counter()
        self.done = threading.Event()
        self.result: Optional[Dict[str, np.ndarray]] = None
        self.error: Optional[BaseException] = None

    def finish(self, result: Optional[Dict[str, np.ndarray]] = None, error: Optional[BaseException] = None) -> None:
        self.result, self.error = result, error
        self.x = None  # type: ignore[assignment]  # the input is not needed any more
        self.done.set()


class _Lane:
    """The queue, scheduler thread and model-call threads of one model version."""

    def __init__(self, mv: ModelVersion, workers: int) -> None:
        self.mv = mv
        self.pending: Deque[_Request] = collections.deque()
        self.cond = threading.Condition(threading.RLock())
        self.closed = False
        self.verified = False  # a batch of several requests matched their batch-1 results
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"bfpaccel-batch-{mv.name}")
        self.thread: Optional[threading.Thread] = None


class Batcher:
    """Merges concurrent float requests of a model version into batches (see the module).

    Args:
        core: the serving core whose workers (``mv.predictors``) run the batches.
        max_batch_size: most rows of one model call (>= 1); requests with this many rows or
            more run alone.
        timeout_s: longest time the oldest queued request waits for more requests (>= 0).
        preferred_batch_sizes: row counts a batch is cut to when a prefix of the queue adds up
            to one (each in 1..max_batch_size); a queue reaching one runs at once.
        check_rows: run the first batch of several requests of each version also request by
            request, and stop batching a version whose rows depend on each other (default on).

    Raises:
        ValueError: a limit out of range.

    Example:
        >>> core.batcher = Batcher(core, max_batch_size=8, timeout_s=0.002)  # doctest: +SKIP
    """

    def __init__(self, core: ServingCore, max_batch_size: int = 8, timeout_s: float = 0.002,
                 preferred_batch_sizes: Optional[Sequence[int]] = None, *, check_rows: bool = True) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, (int, np.integer)) \
                or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        try:
            timeout_s = float(timeout_s)
        except (TypeError, ValueError):
            raise ValueError(f"timeout_s must be a number of seconds >= 0, got {timeout_s!r}") from None
        if not (timeout_s >= 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a finite number of seconds >= 0, got {timeout_s!r}")
        sizes = list(preferred_batch_sizes or ())
        bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, (int, np.integer))
               or not 1 <= s <= max_batch_size]
        if bad:
            raise ValueError(f"preferred_batch_sizes {bad} are not integers in 1..max_batch_size={max_batch_size}")
        self.core = core
        self.max_batch_size = int(max_batch_size)
        self.timeout_s = timeout_s
        self.preferred_batch_sizes = tuple(sorted({int(s) for s in sizes}))
        self._cut_sizes = frozenset(self.preferred_batch_sizes) | {self.max_batch_size}
        self.max_pending = max(int(core.queue_size), self.max_batch_size)
        self.check_rows = bool(check_rows)
        self._lock = threading.Lock()
        self._lanes: Dict[ModelVersion, _Lane] = {}
        self._unbatchable: "weakref.WeakSet[ModelVersion]" = weakref.WeakSet()
        self._shape_ok: "weakref.WeakKeyDictionary[ModelVersion, bool]" = weakref.WeakKeyDictionary()
        self._stopping = False
        core.metrics.gauge("bfpaccel_batch_queue_depth", self._queued)
        core.on_change(self._on_change)

    # -- the core's hook ---------------------------------------------------------------------
    def accepts(self, mv: ModelVersion, x: Any) -> bool:
        """True for a float array whose first dimension is ``mv``'s free batch dimension, whose
        other dimensions are the model's fixed ones, with 1..max_batch_size-1 rows (and a
        version that batches bit-identically)."""
        if self._stopping or not isinstance(x, np.ndarray) or x.dtype.kind != "f" or x.ndim < 1:
            return False
        if not 1 <= x.shape[0] < self.max_batch_size or mv in self._unbatchable:
            return False
        want = mv.input_shape
        if want is None or len(want) != x.ndim or want[0] is not None:
            return False
        if any(w is None or int(w) != d for w, d in zip(want[1:], x.shape[1:])):
            return False
        ok = self._shape_ok.get(mv)
        if ok is None:  # outputs of a known shape must have the batch first
            try:
                outs = mv.outputs()
            except Exception:  # a version being unloaded (no predictor left)
                return False
            ok = self._shape_ok[mv] = all(o.shape is None or (len(o.shape) >= 1 and o.shape[0] is None)
                                          for o in outs)
        return ok

    def submit(self, mv: ModelVersion, x: np.ndarray, outputs: Optional[Sequence[str]] = None,
               deadline: Optional[float] = None) -> Dict[str, np.ndarray]:
        """Queues ``x`` (an accepted array) for ``mv`` and waits for its rows of a batch's
        outputs; returns output name -> array, exactly as ``Predictor.predict(x, outputs)``.

        Args:
            mv: the model version.
            x: the request's rows.
            outputs: output names or aliases (``None``: every output).
            deadline: ``time.monotonic()`` after which a still queued request fails.

        Raises:
            ServingError: INVALID_ARGUMENT (an unknown output, a model error), DEADLINE_EXCEEDED,
                RESOURCE_EXHAUSTED (queue full, out of memory), UNAVAILABLE (stopping).
        """
        pred = mv.first
        if pred is None or mv.state in (VersionState.UNLOADING, VersionState.END):
            raise ServingError(Code.UNAVAILABLE, f"model {mv.name!r} version {mv.version} is being unloaded")
        names: Optional[List[str]] = None
        if outputs is not None:
            try:
                names = list(dict.fromkeys(pred.resolve_output(o) for o in outputs))
            except KeyError as e:
                raise ServingError(Code.INVALID_ARGUMENT, str(e.args[0]) if e.args else str(e)) from None
        if deadline is not None and time.monotonic() >= deadline:
            raise ServingError(Code.DEADLINE_EXCEEDED, "the deadline passed before the request was queued")
        req = _Request(x, names, deadline)
        lane = self._enqueue(mv, req)
        return self._wait(lane, req)

    def stop(self) -> None:
        """Stops batching: queued requests get UNAVAILABLE, running batches finish, the
        threads are joined.  Later submissions get UNAVAILABLE."""
        with self._lock:
            self._stopping = True
            lanes = list(self._lanes.values())
        for lane in lanes:
            self._close(lane, "the server is shutting down")
        for lane in lanes:
            if lane.thread is not None and lane.thread is not threading.current_thread():
                lane.thread.join()
            lane.pool.shutdown(wait=True)

    def pending(self, mv: Optional[ModelVersion] = None) -> int:
        """Requests waiting in the batch queues (of one version, or of all)."""
        with self._lock:
            lanes = [lane for m, lane in self._lanes.items() if mv is None or m is mv]
        return sum(len(lane.pending) for lane in lanes)

    # -- queueing ----------------------------------------------------------------------------
    def _queued(self) -> float:
        return float(self.pending())

    def _enqueue(self, mv: ModelVersion, req: _Request) -> _Lane:
        while True:
            with self._lock:
                if self._stopping:
                    raise ServingError(Code.UNAVAILABLE, "the server is shutting down")
                if mv.state is VersionState.END:
                    raise ServingError(Code.UNAVAILABLE, f"model {mv.name!r} version {mv.version} was unloaded")
                lane = self._lanes.get(mv)
                if lane is None or lane.closed:
                    lane = self._lanes[mv] = _Lane(mv, self.core.workers)
                    lane.thread = threading.Thread(target=self._schedule, args=(lane,), daemon=True,
                                                   name=f"bfpaccel-batcher-{mv.name}-{mv.version}")
                    lane.thread.start()
            with lane.cond:
                if lane.closed:  # retired meanwhile (unload, stop): look again
                    continue
                if len(lane.pending) >= self.max_pending:
                    raise ServingError(Code.RESOURCE_EXHAUSTED, f"the batching queue of model {mv.name!r} is full "
                                       f"({len(lane.pending)} requests waiting); retry later or raise "
                                       "--queue-size/--workers")
                lane.pending.append(req)
                lane.cond.notify_all()
                return lane

    def _wait(self, lane: _Lane, req: _Request) -> Dict[str, np.ndarray]:
        while not req.done.is_set():
            if req.deadline is None:
                req.done.wait()
                break
            if req.done.wait(max(0.0, req.deadline - time.monotonic())):
                break
            with lane.cond:
                if not req.done.is_set():
                    try:
                        lane.pending.remove(req)
                    except ValueError:  # already in a running batch: its result comes
                        pass
                    else:
                        req.finish(error=ServingError(Code.DEADLINE_EXCEEDED, "the deadline passed while queued "
                                                      "for a batch"))
            req.done.wait()
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def _close(self, lane: _Lane, why: str) -> None:
        """Closes a lane: its queued requests get UNAVAILABLE."""
        with lane.cond:
            lane.closed = True
            while lane.pending:
                lane.pending.popleft().finish(error=ServingError(Code.UNAVAILABLE, why))
            lane.cond.notify_all()

    def _forget(self, lane: _Lane) -> None:
        with self._lock:
            if self._lanes.get(lane.mv) is lane:
                del self._lanes[lane.mv]

    def _on_change(self, core: ServingCore) -> None:
        with self._lock:
            lanes = list(self._lanes.values())
        for lane in lanes:  # schedulers look at unloads now rather than at their next poll
            with lane.cond:
                lane.cond.notify_all()

    # -- scheduling (one thread per version) --------------------------------------------------
    def _expire(self, lane: _Lane) -> None:
        """Fails the queued requests whose deadline has passed (lane.cond held)."""
        now = time.monotonic()
        if any(r.deadline is not None and r.deadline <= now for r in lane.pending):
            keep: Deque[_Request] = collections.deque()
            for r in lane.pending:
                if r.deadline is not None and r.deadline <= now:
                    r.finish(error=ServingError(Code.DEADLINE_EXCEEDED, "the deadline passed while queued for "
                                                "a batch"))
                else:
                    keep.append(r)
            lane.pending = keep

    def _prefix(self, lane: _Lane) -> int:
        """How many requests, from the head of the queue, the batch takes now: the longest
        prefix whose rows are a cut size, else the longest that fits (lane.cond held)."""
        rows, best, fit = 0, 0, 0
        for i, r in enumerate(lane.pending):
            if rows + r.rows > self.max_batch_size:
                break
            rows += r.rows
            fit = i + 1
            if rows in self._cut_sizes:
                best = fit
        return best or fit

    def _wait_s(self, lane: _Lane) -> float:
        """0 when a batch is ready, else how long until the oldest request's timeout (lane.cond
        held, queue not empty)."""
        rows = 0
        for r in lane.pending:
            if rows + r.rows > self.max_batch_size:
                return 0.0  # the next request does not fit: the batch is as full as it gets
            rows += r.rows
            if rows in self._cut_sizes:
                return 0.0
        return lane.pending[0].t_submit + self.timeout_s - time.perf_counter()

    def _schedule(self, lane: _Lane) -> None:
        mv = lane.mv
        try:
            while self._next_batch(lane):
                pass
        except BaseException as e:  # a bug: answer everyone rather than leave them waiting
            log.exception("batch scheduler of %s version %d failed", mv.name, mv.version)
            self._close(lane, f"internal error in the batch scheduler: {type(e).__name__}: {e}")
        finally:
            self._forget(lane)
            lane.pool.shutdown(wait=False)  # running batches finish and answer

    def _next_batch(self, lane: _Lane) -> bool:
        """Waits for a ready batch and a worker and hands the batch to a model-call thread;
        False when the lane is done (stopping, version unloaded)."""
        mv = lane.mv
        with lane.cond:
            while True:
                if lane.closed:
                    return False
                if mv.state is VersionState.END:  # unloaded (its drain timed out if requests remain)
                    self._close(lane, f"model {mv.name!r} version {mv.version} was unloaded")  # re-entrant
                    return False
                self._expire(lane)
                if lane.pending:
                    wait = self._wait_s(lane)
                    if wait <= 0:
                        break
                    dl = [r.deadline for r in lane.pending if r.deadline is not None]
                    if dl:
                        wait = min(wait, max(0.0, min(dl) - time.monotonic()))
                    lane.cond.wait(min(wait, _POLL_S))
                elif mv.state is VersionState.UNLOADING and mv.inflight == 0:
                    lane.closed = True  # nothing can come any more
                    return False
                else:
                    lane.cond.wait(_POLL_S)
        pred = self._acquire(lane)
        if pred is None:
            return True
        with lane.cond:
            self._expire(lane)
            batch = [lane.pending.popleft() for _ in range(self._prefix(lane))]
        if not batch:
            mv.predictors.put(pred)
            return True
        try:
            lane.pool.submit(self._run, lane, pred, batch)
        except RuntimeError:  # the pool is shut down: stopping
            mv.predictors.put(pred)
            for r in batch:
                r.finish(error=ServingError(Code.UNAVAILABLE, "the server is shutting down"))
        return True

    def _acquire(self, lane: _Lane) -> Any:
        """A worker predictor once one is free; None when the queue emptied or stopping."""
        while True:
            with lane.cond:
                self._expire(lane)
                if lane.closed or not lane.pending or lane.mv.state is VersionState.END:
                    return None
            try:
                return lane.mv.predictors.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    # -- running a batch (model-call threads) ---------------------------------------------
    def _run(self, lane: _Lane, pred: Any, batch: List[_Request]) -> None:
        mv = lane.mv
        rows = sum(r.rows for r in batch)
        names: Optional[List[str]] = []
        for r in batch:
            if r.names is None:
                names = None
                break
            names = list(dict.fromkeys(names + r.names))  # type: ignore[operator]
        results: Optional[List[Dict[str, np.ndarray]]] = None
        error: Optional[BaseException] = None
        t0 = t1 = time.perf_counter()
        try:
            if len(batch) == 1:
                x = batch[0].x
            else:
                with np.errstate(over="ignore"):  # float64 beyond float32's range -> inf, as alone
                    x = np.concatenate([r.x for r in batch], axis=0, dtype=np.float32)
            t0 = time.perf_counter()
            if self.core.simulated_latency_s:
                time.sleep(self.core.simulated_latency_s)
            out = pred.predict(x, names)
            del x
            results = self._split(lane, pred, batch, rows, out)
        except ServingError as e:
            error = e
        except ValueError as e:
            error = ServingError(Code.INVALID_ARGUMENT, str(e))
        except MemoryError:
            error = ServingError(Code.RESOURCE_EXHAUSTED, f"out of memory running a batch of {rows} rows")
        except Exception as e:  # answered INTERNAL by the faces, logged there
            error = e
        finally:
            t1 = time.perf_counter()
            mv.predictors.put(pred)
        self.core.metrics.observe_batch(mv.name, rows)
        for i, r in enumerate(batch):
            self.core.metrics.observe_split(mv.name, max(0.0, t0 - r.t_submit), t1 - t0)
            if results is not None:
                r.finish(result=results[i])
            else:
                r.finish(error=error)

    def _split(self, lane: _Lane, pred: Any, batch: List[_Request], rows: int,
               out: Dict[str, np.ndarray]) -> List[Dict[str, np.ndarray]]:
        """Each request's rows of the batch's outputs; the first batch of several requests of
        a version is checked against running each request alone."""
        mv = lane.mv
        splittable = all(np.ndim(a) >= 1 and np.shape(a)[0] == rows for a in out.values())
        parts: List[Dict[str, np.ndarray]] = []
        if splittable:
            off = 0
            for r in batch:
                want = r.names if r.names is not None else pred.output_names
                parts.append({n: np.array(out[n][off:off + r.rows], copy=True) for n in want})
                off += r.rows
        if splittable and (lane.verified or len(batch) < 2 or not self.check_rows):
            return parts
        alone = [pred.predict(r.x, r.names) for r in batch]
        same = splittable and all(
            set(a) == set(p) and all(a[n].dtype == p[n].dtype and a[n].shape == p[n].shape and
                                     _same_bits(a[n], p[n]) for n in a)
            for a, p in zip(alone, parts))
        if same:
            lane.verified = True
            return parts
        why = ("an output's first dimension is not the batch" if not splittable
               else "batch rows differ in their bits from the requests run alone")
        log.warning("model %s version %d does not batch: %s; its requests run unbatched from now on",
                    mv.name, mv.version, why)
        self._unbatchable.add(mv)
        return alone


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes (NaN payloads and the sign of zero included)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
