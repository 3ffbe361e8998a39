"""Dynamic batching: concurrent requests to one model version run as one model call.

Off by default (the NPU's point is batch 1); ``serve(batching=True)`` / ``bfpaccel serve
--batching`` installs a :class:`Batcher` as ``ServingCore.batcher``, and
:meth:`ServingCore.infer <bfpaccel.serve.core.ServingCore.infer>` hands it every request it
:meth:`~Batcher.accepts`.

* **What is merged**: tensors whose first dimension is the model's free batch dimension and
  whose other dimensions fit the model's input, with fewer rows than ``max_batch_size`` (a
  request of ``max_batch_size`` rows or more runs alone, unbatched): float tensors, the
  integer tensor of a one-input integer model, every input of a several-input model together
  (a text encoder's token ids and attention mask, ``core.infer(feeds=)``), and sentences for a
  plan with a text front (``core.infer(texts=)``).  Only requests of the same *shape* merge:
  the same input names, integer types and non-batch dimensions -- for token inputs, the same
  sequence length.  Sentences are tokenized per request, as they would be alone (padded to the
  request's own longest sentence, or as the front says), before they queue; so sentence
  requests merge exactly when their padded lengths are equal.  They are never re-padded to a
  batch's longest sequence: a longer sequence changes the model's activation blocks along the
  sequence (attention) and so the bits of every row, and would change an answer with the
  traffic around it.  Encoded images take the unbatched path (see below).
* **When a batch runs**: each model version has a queue of pending requests and a scheduler
  thread.  A batch is ready when the queued rows reach ``max_batch_size`` (or the next request
  would not fit), when a prefix of the queue adds up to a preferred size, or when the oldest
  request has waited ``timeout_s``.  The scheduler then takes a worker predictor from
  ``mv.predictors`` -- the same workers unbatched calls use, so at most ``core.workers`` model
  calls run per version -- and, once it has one, cuts the batch from what is queued *then*
  (requests keep joining while every worker is busy): the longest prefix whose rows are a
  preferred size (``max_batch_size`` counts as preferred), else the longest prefix that fits.
  A batch takes, in arrival order, the requests of the head's shape (others wait for the
  next batch); the queue's head always runs in the next batch.
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
  RESOURCE_EXHAUSTED); when a batch's model call fails with a ``ValueError`` (a token id
  outside the embedding table...) each member runs again alone, so a bad request fails only
  itself (INVALID_ARGUMENT); other errors are every member's (out of memory
  RESOURCE_EXHAUSTED); :meth:`Batcher.stop` answers the queued requests UNAVAILABLE.
* **Metrics**: per request, ``core.metrics.observe_split(model, queue_s, compute_s)`` -- queue
  time from submission until the batch's model call starts (waiting for the batch to form and
  for a worker), compute time of that call; per model call ``bfpaccel_batch_size`` (rows);
  the gauge ``bfpaccel_batch_queue_depth`` (requests waiting in every batch queue).

Encoded images are not batched.  The unbatched path decodes them inside a worker slot, so at
most ``workers`` images per version are decoded at once and their float tensors live only
while the model runs.  Decoding before queueing would keep every queued request's decoded
tensor (600 KiB per 224x224 image) in memory for the whole batching wait, and bounding that
to ``workers`` requests would cap every batch at ``workers`` requests; the core's batcher hook
is never called for images, so image requests keep today's path and bound.

Each batch size a session meets is lowered into its own program (built on first use, kept):
with batching on a worker holds up to ``max_batch_size`` programs per input shape (per
sequence length for token inputs and sentences: ``pad_to_multiple_of`` bounds them), and the
first batch of each size pays for its lowering.

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
from typing import Any, Callable, Deque, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .core import Code, ModelVersion, ServingCore, ServingError, VersionState

__all__ = ["Batcher"]

log = logging.getLogger("bfpaccel.serve")

#: How often an idle scheduler (or one waiting for a worker) looks at stop and unloads.
_POLL_S = 0.1


#: A request's model input: the array of the model's one input, or input name -> array.
Feed = Union[np.ndarray, Dict[str, np.ndarray]]
#: A request's own step after the model (a text front's pooling of its rows).
Post = Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]


def _shape_key(x: Feed) -> Hashable:
    """What requests must share to merge: input names, integer types, non-batch dimensions
    (float arrays merge across float types: a batch is float32, as each would be alone)."""
    def one(a: np.ndarray) -> Tuple[str, Tuple[int, ...]]:
        return ("f" if a.dtype.kind == "f" else a.dtype.str), tuple(int(d) for d in a.shape[1:])
    if isinstance(x, dict):
        return tuple((k, *one(v)) for k, v in sorted(x.items()))
    return one(x)


class _Request:
    """One submitted request: its rows, wanted outputs and, once answered, result or error."""

    __slots__ = ("x", "rows", "key", "names", "post", "deadline", "t_submit", "done", "result", "error")

    def __init__(self, x: Feed, names: Optional[List[str]], deadline: Optional[float],
                 post: Optional[Post] = None) -> None:
        self.x = x
        first = next(iter(x.values())) if isinstance(x, dict) else x
        self.rows = int(first.shape[0])
        self.key = _shape_key(x)
        self.post = post  # applied to the request's rows of the model outputs
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
    """Merges concurrent requests of a model version into batches (see the module).

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
        self._tokenize_lock = threading.Lock()  # one tokenizer per version, shared by request threads
        core.metrics.gauge("bfpaccel_batch_queue_depth", self._queued)
        core.on_change(self._on_change)

    # -- the core's hook ---------------------------------------------------------------------
    def accepts(self, mv: ModelVersion, x: Any) -> bool:
        """True for what the batcher merges (and a version that batches bit-identically), with
        1..max_batch_size-1 rows:

        * an array of the model's one input (float, or integer where the plan declares the
          input integer) whose first dimension is the model's free batch dimension and whose
          other dimensions fit the model's (fixed ones equal);
        * a mapping input name -> array holding every input of the plan, each as above, with
          one batch size (token ids and attention masks);
        * a list of sentences (``str``) for a plan with a text front.
        """
        if self._stopping or mv in self._unbatchable:
            return False
        p = mv.first
        if p is None:
            return False
        if isinstance(x, list):
            if p.text_front is None or not 1 <= len(x) < self.max_batch_size or \
                    not all(isinstance(t, str) for t in x):
                return False
        elif isinstance(x, Mapping):
            names = list(p.input_names)
            if set(x) != set(names) or not all(self._fits(mv, n, x[n]) for n in names):
                return False
            rows = {int(a.shape[0]) for a in x.values()}
            if len(rows) != 1 or not 1 <= rows.pop() < self.max_batch_size:
                return False
        elif not (len(p.input_names) == 1 and self._fits(mv, p.input_name, x)
                  and 1 <= x.shape[0] < self.max_batch_size):
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

    @staticmethod
    def _fits(mv: ModelVersion, name: str, a: Any) -> bool:
        """An array for plan input ``name``: its declared kind of values (float; integer for an
        integer input; bool), the model's rank, a free batch dimension first and the fixed
        dimensions equal (a free one, such as a sequence length, takes any size)."""
        if not isinstance(a, np.ndarray) or a.ndim < 1:
            return False
        declared = np.dtype(mv.first.plan.input_dtypes.get(name, "float32")).kind
        if not (a.dtype.kind == declared or (declared in "iu" and a.dtype.kind in "iu")):
            return False
        want = mv.first.plan.input_shapes.get(name)
        if want is None or len(want) != a.ndim or want[0] is not None:
            return False
        return all(w is None or int(w) == d for w, d in zip(want[1:], a.shape[1:]))

    def submit(self, mv: ModelVersion, x: Union[np.ndarray, Mapping[str, np.ndarray], List[str]],
               outputs: Optional[Sequence[str]] = None, deadline: Optional[float] = None, *,
               key: str = "") -> Dict[str, np.ndarray]:
        """Queues ``x`` (what :meth:`accepts` took) for ``mv`` and waits for its rows of a
        batch's outputs; returns output name -> array, exactly as ``Predictor.predict(x,
        outputs)`` (``Predictor.predict_texts(x, outputs)`` for sentences).

        Args:
            mv: the model version.
            x: the request's rows: an array, input name -> array, or sentences.
            outputs: output names or aliases (``None``: every output; for sentences the
                text front's embedding).
            deadline: ``time.monotonic()`` after which a still queued request fails.
            key: the request's input name, for error messages about sentences.

        Raises:
            ServingError: INVALID_ARGUMENT (an unknown output, a sentence the front refuses, a
                model error), DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (queue full, out of memory),
                UNAVAILABLE (stopping).
        """
        pred = mv.first
        if pred is None or mv.state in (VersionState.UNLOADING, VersionState.END):
            raise ServingError(Code.UNAVAILABLE, f"model {mv.name!r} version {mv.version} is being unloaded")
        names: Optional[List[str]] = None
        post: Optional[Post] = None
        try:
            if isinstance(x, list):
                feed, names, post = self._text_request(pred, x, outputs)
            else:
                feed = dict(x) if isinstance(x, Mapping) else x
                if outputs is not None:
                    names = list(dict.fromkeys(pred.resolve_output(o) for o in outputs))
        except KeyError as e:
            raise ServingError(Code.INVALID_ARGUMENT, str(e.args[0]) if e.args else str(e)) from None
        except (ValueError, TypeError) as e:  # the text front refuses a sentence, as unbatched
            raise ServingError(Code.INVALID_ARGUMENT, f"input {key!r}: {e}") from None
        if deadline is not None and time.monotonic() >= deadline:
            raise ServingError(Code.DEADLINE_EXCEEDED, "the deadline passed before the request was queued")
        req = _Request(feed, names, deadline, post)
        lane = self._enqueue(mv, req)
        return self._wait(lane, req)

    def _text_request(self, pred: Any, texts: List[str], outputs: Optional[Sequence[str]]
                      ) -> Tuple[Dict[str, np.ndarray], List[str], Post]:
        """Sentences -> (the model feeds, tokenized as ``Predictor.predict_texts`` tokenizes
        them alone, the model outputs to fetch, the step that turns the request's rows of those
        outputs into ``predict_texts``'s answer: the pooled embedding and/or model outputs)."""
        with self._tokenize_lock:
            return pred.text_request(texts, outputs)

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

    def _group(self, lane: _Lane) -> Tuple[List[int], bool]:
        """The queue positions the next batch takes -- of the requests of the head's shape, in
        arrival order, the longest run from the head whose rows are a cut size, else the longest
        that fits -- and whether the batch is ready now: a cut size reached, or the next
        request of that shape does not fit (lane.cond held, queue not empty)."""
        head = lane.pending[0].key
        rows, best, taken, full = 0, 0, [], False
        for i, r in enumerate(lane.pending):
            if r.key != head:
                continue
            if rows + r.rows > self.max_batch_size:
                full = True  # the batch is as full as it gets
                break
            rows += r.rows
            taken.append(i)
            if rows in self._cut_sizes:
                best = len(taken)
        return taken[:best or len(taken)], full or best > 0

    def _take(self, lane: _Lane) -> List[_Request]:
        """Removes and returns the next batch's requests (lane.cond held)."""
        if not lane.pending:
            return []
        chosen = set(self._group(lane)[0])
        batch = [r for i, r in enumerate(lane.pending) if i in chosen]
        lane.pending = collections.deque(r for i, r in enumerate(lane.pending) if i not in chosen)
        return batch

    def _wait_s(self, lane: _Lane) -> float:
        """0 when a batch is ready, else how long until the oldest request's timeout (lane.cond
        held, queue not empty)."""
        if self._group(lane)[1]:
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
            batch = self._take(lane)
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
        errors: List[Optional[BaseException]] = [None] * len(batch)
        try:
            x = _merge([r.x for r in batch])
            t0 = time.perf_counter()
            if self.core.simulated_latency_s:
                time.sleep(self.core.simulated_latency_s)
            try:
                out = pred.predict(x, names)
            except ValueError:
                if len(batch) == 1:
                    raise
                # one request's mistake (a token id outside the table): each runs alone, so
                # only the requests at fault fail
                del x
                results, errors = self._alone(pred, batch)
            else:
                del x
                results = self._split(lane, pred, batch, rows, out)
            results = [r.post(res) if (r.post is not None and res is not None) else res
                       for r, res in zip(batch, results)]
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
            if results is not None and results[i] is not None:
                r.finish(result=results[i])
            else:
                r.finish(error=errors[i] if results is not None else error)

    @staticmethod
    def _alone(pred: Any, batch: List[_Request]) -> Tuple[List[Any], List[Optional[BaseException]]]:
        """Each request run alone: (result or None, error or None) per request."""
        results: List[Any] = []
        errors: List[Optional[BaseException]] = []
        for r in batch:
            try:
                results.append(pred.predict(r.x, r.names))
                errors.append(None)
            except ValueError as e:
                results.append(None)
                errors.append(ServingError(Code.INVALID_ARGUMENT, str(e)))
        return results, errors

    def _split(self, lane: _Lane, pred: Any, batch: List[_Request], rows: int,
               out: Dict[str, np.ndarray]) -> List[Any]:
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


def _merge(xs: List[Feed]) -> Feed:
    """The batch's input: the requests' rows one after the other (float arrays as float32, as
    each would run alone; integer arrays keep their type; input name -> array per input)."""
    if len(xs) == 1:
        return xs[0]
    first = xs[0]
    if isinstance(first, dict):
        return {k: np.concatenate([x[k] for x in xs], axis=0) for k in first}  # type: ignore[index]
    if first.dtype.kind == "f":
        with np.errstate(over="ignore"):  # float64 beyond float32's range -> inf, as alone
            return np.concatenate(xs, axis=0, dtype=np.float32)  # type: ignore[arg-type]
    return np.concatenate(xs, axis=0)  # type: ignore[arg-type]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes (NaN payloads and the sign of zero included)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
