"""The serving core, apart from the protocols: models and versions, workers and queue,
readiness, auth, deadlines and protocol-neutral errors.

TensorFlow Serving keeps its server core (model manager, sources, version policies) apart
from ``prediction_service_impl``; this module is that core for plans.  Protocol *faces*
(TF Serving gRPC and REST, KServe v2 REST and gRPC) decode their own wire format, call
:meth:`ServingCore.resolve` and :meth:`ServingCore.infer`, and map :class:`ServingError`'s
:class:`Code` onto their own status (``Code.http_status`` / ``Code.grpc_name``).

* **Models and versions**: ``core.models[name]`` is a :class:`ModelEntry` holding
  :class:`ModelVersion` objects (TF Serving's states START, LOADING, AVAILABLE, UNLOADING, END)
  and version labels.  A request without a version gets the newest AVAILABLE one.
  :meth:`ServingCore.load_version` and :meth:`ServingCore.unload_version` add and retire
  versions while requests run: a version leaves resolution first, then the in-flight requests
  that hold it finish, then its predictors are dropped.
* **Workers and queue**: each version has ``workers`` predictors (model instances); a request
  waits for one at most until its deadline, and at most ``queue_size`` requests wait at once
  (then RESOURCE_EXHAUSTED).  Encoded images are decoded inside the worker slot, so at most
  ``workers`` images per version are in memory at once.
* **Dynamic batching** (off by default: the NPU's point is batch 1): see
  :mod:`bfpaccel.serve.batching`.
* **Metrics**: request counts and latency by protocol/method/route/code, and the split of each
  model call into queue time (``bfpaccel_queue_seconds``) and compute time
  (``bfpaccel_compute_seconds``).

Example:
    >>> core = ServingCore(workers=1)  # doctest: +SKIP
    >>> mv = core.load_version("tiny", 1, "tiny.bfpplan")  # doctest: +SKIP
    >>> core.infer(core.resolve("tiny"), x=np.zeros((1, 224, 224, 3), np.float32))  # doctest: +SKIP
"""

from __future__ import annotations

import enum
import hmac
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..preprocess import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_RESIZE_PIXELS, ImageTooLargeError
from .metrics import Metrics

__all__ = ["Code", "ServingError", "ModelVersion", "ModelEntry", "ServingCore", "TensorSpec",
           "check_array", "element_limit", "DEFAULT_MAX_MESSAGE_BYTES", "VersionState", "v2_type", "check_dtype",
           "typed_feed", "decode_texts", "MAX_EXACT_INT"]

log = logging.getLogger("bfpaccel.serve")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: integers a float input takes exactly (float32 carries every integer up to 2^24); integer
#: inputs hold the same range (the runtime's rule)
MAX_EXACT_INT = 1 << 24


class Code(enum.Enum):
    """Protocol-neutral outcome of a request; ``value`` is the gRPC status name."""

    OK = "OK"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    TOO_LARGE = "TOO_LARGE"  # a body or message over a size limit (gRPC RESOURCE_EXHAUSTED, HTTP 413)
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    INTERNAL = "INTERNAL"

    @property
    def grpc_name(self) -> str:
        """The ``grpc.StatusCode`` member name."""
        return "RESOURCE_EXHAUSTED" if self is Code.TOO_LARGE else self.value

    @property
    def http_status(self) -> int:
        """The HTTP status a REST face answers with."""
        return _HTTP[self]


_HTTP = {Code.OK: 200, Code.INVALID_ARGUMENT: 400, Code.NOT_FOUND: 404, Code.UNAUTHENTICATED: 401,
         Code.RESOURCE_EXHAUSTED: 429, Code.TOO_LARGE: 413, Code.UNAVAILABLE: 503, Code.DEADLINE_EXCEEDED: 504,
         Code.UNIMPLEMENTED: 501, Code.FAILED_PRECONDITION: 400, Code.INTERNAL: 500}


class ServingError(Exception):
    """A request that cannot be answered: ``code`` (:class:`Code`) and a message for the client."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(msg: str) -> ServingError:
    """``ServingError(INVALID_ARGUMENT, msg)``."""
    return ServingError(Code.INVALID_ARGUMENT, msg)


class VersionState(enum.Enum):
    """TF Serving's ``ModelVersionStatus.State`` (same numbers)."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as every protocol describes it: ``dtype`` is a KServe v2
    datatype name (FP32, INT64, INT32, BOOL, BYTES), ``shape`` uses None for a free dimension."""

    name: str
    dtype: str
    shape: Optional[Tuple[Optional[int], ...]]


@dataclass(eq=False)
class ModelVersion:
    """One loaded version of a model: its predictors (model instances) and state."""

    name: str
    version: int
    path: str
    plan: Any = None  # an in-memory Plan given to serve() (shares its packed weights)
    predictors: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    first: Any = None  # a Predictor, for names and shapes
    error: Optional[str] = None
    state: VersionState = VersionState.START
    inflight: int = 0
    loaded_s: float = 0.0  # seconds the load and warm-up took
    peak_rss_delta_bytes: int = 0  # resident-memory growth while loading (the cost of a swap)

    @property
    def available(self) -> bool:
        return self.state is VersionState.AVAILABLE and self.error is None

    # -- what the model takes and gives, protocol-neutral -----------------------------------
    @property
    def input_shape(self) -> Optional[List[Optional[int]]]:
        p = self.first
        return None if p is None else p.plan.input_shapes.get(p.input_name)

    def inputs(self) -> List[TensorSpec]:
        """The inputs a client may send: encoded images (BYTES, when the plan has an image
        front) under its alias, sentences (BYTES, when the plan has a text front) under its
        alias, and the tensors under the plan's input names with their declared types (FP32;
        INT64/INT32 token ids and masks)."""
        p = self.first
        specs = []
        if p.takes_images:
            spec = p.preprocess_spec or {}
            specs.append(TensorSpec(spec.get("input_alias") or "images", "BYTES", (None,)))
        if p.text_front is not None:
            specs.append(TensorSpec(p.text_front.input_alias, "BYTES", (None,)))
        for name in p.input_names:
            specs.append(self.tensor_spec(name))
        return specs

    def tensor_spec(self, name: str) -> TensorSpec:
        """A plan input as a :class:`TensorSpec` (its declared type as a v2 datatype)."""
        plan = self.first.plan
        shape = plan.input_shapes.get(name)
        return TensorSpec(name, v2_type(plan.input_dtypes.get(name, "float32")),
                          None if shape is None else tuple(shape))

    def outputs(self) -> List[TensorSpec]:
        """Output tensors by name (aliases are listed by :meth:`output_aliases`); with a text
        front, its embedding (computed for sentence inputs) comes last."""
        p = self.first
        shapes = {v.name: v.shape for v in p.plan.graph.outputs}
        types = {v.name: getattr(v, "dtype", None) or "float32" for v in p.plan.graph.outputs}
        out = []
        for name in p.output_names:
            s = shapes.get(p.output_map[name])
            out.append(TensorSpec(name, v2_type(types.get(p.output_map[name], "float32")),
                                  None if s is None else tuple(s)))
        if p.text_front is not None:
            out.append(TensorSpec(p.text_front.embedding_name, "FP32", (None, None)))
        return out

    def output_aliases(self) -> Dict[str, str]:
        """alias -> output tensor name."""
        return dict(self.first.aliases)

    def resolve_outputs(self, filt: Sequence[str], kind: str = "tensor") -> List[Tuple[str, str]]:
        """(response key, tensor name) pairs: the filter's names, or every name and alias; for
        a request of sentences (``kind="text"``) the default is the text front's embedding,
        which only such a request can ask for."""
        p = self.first
        emb = p.text_front.embedding_name if p.text_front is not None else None
        if not filt:
            if kind == "text" and emb is not None:
                return [(emb, emb)]
            pairs = [(n, n) for n in p.output_names]
            pairs += [(a, n) for a, n in p.aliases.items() if a not in p.output_map]
            return pairs
        pairs = []
        for k in dict.fromkeys(filt):
            if emb is not None and k == emb:
                if kind != "text":
                    raise invalid(f"output {k!r} is the text front's sentence embedding: send sentences under "
                                  f"{p.text_front.input_alias!r} to get it")
                pairs.append((k, k))
                continue
            try:
                pairs.append((k, p.resolve_output(k)))
            except KeyError:
                raise invalid(f"unknown output {k!r}; this model's outputs are {p.output_names}"
                              + (f", aliases {sorted(p.aliases)}" if p.aliases else "")
                              + (f", and {emb!r} for sentences" if emb else "")) from None
        return pairs

    def input_kind(self, key: str) -> str:
        """``"images"``, ``"text"`` or ``"tensor"`` for an input key; INVALID_ARGUMENT for an
        unknown key."""
        p = self.first
        if key not in p.input_aliases:
            raise invalid(f"unknown input {key!r}; this model takes one of {sorted(p.input_aliases)}")
        if key in p.input_names:
            return "tensor"
        if p.text_front is not None and key == p.text_front.input_alias:
            return "text"
        return "images" if p.takes_images else "tensor"

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Checks that a request's tensors are the plan's every input, with one batch size;
        raises INVALID_ARGUMENT naming what is missing or differs."""
        names = self.first.input_names
        missing = [n for n in names if n not in feeds]
        if missing:
            hint = ""
            if self.first.text_front is not None:
                hint = f" (or send sentences under {self.first.text_front.input_alias!r})"
            raise invalid(f"the request lacks input(s) {missing}; this model takes {names} together{hint}")
        batches = {k: int(v.shape[0]) for k, v in feeds.items() if v.ndim}
        if len(set(batches.values())) > 1:
            raise invalid(f"the inputs have different batch sizes {batches}; give every input the same first "
                          "dimension")


@dataclass(eq=False)
class ModelEntry:
    """A model name: its versions and version labels."""

    name: str
    versions: Dict[int, ModelVersion] = field(default_factory=dict)
    labels: Dict[str, int] = field(default_factory=dict)

    def latest(self) -> Optional[ModelVersion]:
        ok = [v for v in self.versions.values() if v.available]
        return max(ok, key=lambda v: v.version) if ok else None


def _shape_text(want: Sequence[Optional[int]]) -> List[Any]:
    return ['N' if w is None else w for w in want]


def element_limit(input_shape: Optional[Sequence[Optional[int]]], max_batch: int, fallback: int) -> int:
    """Most elements a float input may have: ``max_batch`` x the fixed dimensions when only the
    batch dimension is free, else ``fallback``."""
    if input_shape is None or any(d is None for d in list(input_shape)[1:]):
        return fallback
    dims = list(input_shape)
    if dims and dims[0] is None:
        dims[0] = max_batch
    return min(fallback, math.prod(int(d) for d in dims if d is not None)) if dims else 1


def check_array(key: str, shape: Sequence[int], input_shape: Optional[Sequence[Optional[int]]], max_batch: int,
                max_elements: int) -> None:
    """Checks a numeric input's shape (Python ints, before anything is allocated) against the
    model's input, ``max_batch`` and ``max_elements``; raises INVALID_ARGUMENT."""
    shape = [int(d) for d in shape]
    if any(d < 0 for d in shape):
        raise invalid(f"input {key!r} has a negative dimension: {shape}")
    if input_shape is not None and (len(shape) != len(input_shape) or
                                    any(w is not None and w != d for w, d in zip(input_shape, shape))):
        raise invalid(f"input {key!r} has shape {shape}; this model expects {_shape_text(input_shape)}")
    n = math.prod(shape)
    if n == 0:
        raise invalid(f"input {key!r} is empty")
    if shape and shape[0] > max_batch:
        raise invalid(f"input {key!r}: batch {shape[0]} over the limit {max_batch}")
    if n > max_elements:
        raise invalid(f"input {key!r} has shape {shape} = {n} elements, over this server's limit of {max_elements}")


_V2 = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
       "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
       "uint64": "UINT64", "bool": "BOOL"}


def v2_type(declared: str) -> str:
    """The v2 datatype name of a plan input's declared type (``"int64"`` -> ``"INT64"``);
    float types other than these and unknown names read as FP32 (what the runtime feeds)."""
    return _V2.get(str(declared), "FP32")


def _kind(declared: str) -> str:
    try:
        return np.dtype(declared).kind
    except TypeError:
        return "f"


def check_dtype(key: str, dtype: Any, declared: str, wire_name: str) -> None:
    """Checks a request tensor's element type (``dtype``, a numpy dtype; ``wire_name`` as the
    protocol names it, e.g. ``DT_INT64`` / ``INT64``) against the plan input's declared type:
    a float input takes numbers, an integer input (token ids, masks) integers only -- never a
    float that would be truncated -- and a bool input booleans.  Raises INVALID_ARGUMENT."""
    dt = np.dtype(dtype)
    want = _kind(declared)
    if want == "f":
        if dt.kind not in "fiu":
            raise invalid(f"input {key!r} is a float input ({declared}); got {wire_name}")
        return
    if want == "b":
        if dt.kind != "b":
            raise invalid(f"input {key!r} is declared bool; got {wire_name}: send booleans")
        return
    if dt.kind not in "iu":
        raise invalid(f"input {key!r} is declared {declared} (token ids, masks); got {wire_name}: send an integer "
                      "tensor (TF Serving DT_INT64/DT_INT32, KServe v2 INT64/INT32, JSON integers)")


def typed_feed(key: str, arr: np.ndarray, declared: str) -> np.ndarray:
    """A request array as the plan input takes it: float32 for a float input (integers only
    when float32 holds them exactly, magnitude <= 2^24), unchanged for an integer or bool
    input (the runtime checks integer ranges).  Raises INVALID_ARGUMENT."""
    if _kind(declared) != "f":
        return np.ascontiguousarray(arr)
    if arr.dtype.kind in "iu" and arr.size:
        hi, lo = int(arr.max()), int(arr.min())
        if hi > MAX_EXACT_INT or lo < -MAX_EXACT_INT:
            bad = hi if hi > MAX_EXACT_INT else lo
            raise invalid(f"input {key!r} is a float input and holds the integer {bad}, which float32 cannot carry "
                          "exactly (integers up to 2^24 only): send floats")
    with np.errstate(over="ignore"):  # float64 beyond float32's range -> inf, as a TF cast
        return np.ascontiguousarray(arr, dtype=np.float32)


def decode_texts(key: str, values: Sequence[bytes], max_batch: int) -> List[str]:
    """A batch of sentences from the wire (UTF-8 bytes) as ``str``; INVALID_ARGUMENT for no
    sentence, more than ``max_batch``, or bytes that are not UTF-8 (naming the sentence)."""
    if not values:
        raise invalid(f"input {key!r} holds no sentences")
    if len(values) > max_batch:
        raise invalid(f"input {key!r}: {len(values)} sentences in one request; the limit is {max_batch}")
    out = []
    for i, b in enumerate(values):
        try:
            out.append(bytes(b).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise invalid(f"input {key!r}: sentence {i} is not UTF-8 text ({e})") from None
    return out


def synthetic_call(pred: Any) -> None:
    """One synthetic warm-up call of a predictor: a sentence through a text front, else a zero
    input of every plan input (free dimensions 1, the declared types)."""
    if getattr(pred, "text_front", None) is not None:
        pred.predict_texts(["warm-up"])
        return
    feeds = _zero_feeds(pred.plan)
    pred.predict(feeds if len(feeds) > 1 else feeds.get(pred.input_name, next(iter(feeds.values()))))


def _zero_feeds(plan: Any) -> Dict[str, np.ndarray]:
    """A zero input of every plan input (free dimensions 1, the declared types): the warm-up."""
    feeds = {}
    for name, shape in plan.input_shapes.items():
        dims = [1 if d is None else int(d) for d in (shape or [1])]
        feeds[name] = np.zeros(dims, dtype=plan.input_dtypes.get(name, "float32"))
    return feeds


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class ServingCore:
    """Models, workers, queue, readiness, auth and metrics shared by every protocol face.

    Args:
        auth_keys: accepted keys (empty: no auth).
        workers: predictors (model instances) per version that run at the same time.
        queue_size: requests that may wait for a worker before RESOURCE_EXHAUSTED.
        max_batch: most images or rows in one request.
        max_input_elements: most elements of one numeric input whose shape is not fixed.
        max_image_pixels, max_resize_pixels: the image front's limits (see ``Predictor``).
        num_threads, kernel: each predictor session's options.
        simulated_latency_s: added to each model call (an accelerator's latency, for demos).
    """

    def __init__(self, auth_keys: Sequence[str] = (), workers: int = 2, queue_size: int = 64, max_batch: int = 64,
                 max_input_elements: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 max_resize_pixels: Optional[int] = DEFAULT_MAX_RESIZE_PIXELS, num_threads: Optional[int] = None,
                 kernel: Optional[str] = None, simulated_latency_s: float = 0.0,
                 metrics: Optional[Metrics] = None) -> None:
        if workers < 1 or queue_size < 0 or max_batch < 1:
            raise ValueError("workers and max_batch must be >= 1, queue_size >= 0")
        self.auth_keys = [k for k in auth_keys if k]
        self.workers = workers
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.max_input_elements = max_input_elements
        self.max_image_pixels = max_image_pixels
        self.max_resize_pixels = max_resize_pixels
        self.num_threads = num_threads
        self.kernel = kernel
        self.simulated_latency_s = simulated_latency_s
        self.models: Dict[str, ModelEntry] = {}
        self.ready = threading.Event()  # the initial load has finished
        self.stopping = False
        self.metrics = metrics or Metrics()
        self.batcher: Any = None  # a bfpaccel.serve.batching.Batcher when dynamic batching is on
        self._lock = threading.RLock()
        self._listeners: List[Callable[["ServingCore"], None]] = []
        self.waiting = 0
        self.running = 0
        self.metrics.gauge("bfpaccel_queue_depth", lambda: self.waiting)
        self.metrics.gauge("bfpaccel_inflight_requests", lambda: self.running)
        self.metrics.gauge("bfpaccel_ready", lambda: 1.0 if self.is_ready() else 0.0)

    # -- readiness and change notification ---------------------------------------------------
    def on_change(self, fn: Callable[["ServingCore"], None]) -> None:
        """Calls ``fn(core)`` after every load, unload and readiness change (health services)."""
        self._listeners.append(fn)

    def _changed(self) -> None:
        for fn in list(self._listeners):
            try:
                fn(self)
            except Exception:  # a listener never breaks loading
                log.exception("change listener failed")

    def is_live(self) -> bool:
        return not self.stopping

    def is_ready(self) -> bool:
        """Initial load done, not stopping, and every model has an available version."""
        if self.stopping or not self.ready.is_set():
            return False
        with self._lock:
            return all(e.latest() is not None for e in self.models.values()) and bool(self.models)

    def model_ready(self, name: str, version: Optional[int] = None) -> bool:
        try:
            mv = self.resolve(name, version)
        except ServingError:
            return False
        return mv.available and not self.stopping

    def errors(self) -> Dict[str, str]:
        """``name`` or ``name:version`` -> load error, for versions that failed to load."""
        with self._lock:
            return {f"{e.name}:{v.version}" if len(e.versions) > 1 else e.name: v.error
                    for e in self.models.values() for v in e.versions.values() if v.error}

    # -- auth -------------------------------------------------------------------------------
    def check_auth(self, header: Optional[str]) -> None:
        """Checks an ``authorization`` value (``Bearer <key>``, ``bearer <key>`` or the raw key)
        in constant time; raises UNAUTHENTICATED."""
        if not self.auth_keys:
            return
        if not header:
            raise ServingError(Code.UNAUTHENTICATED, "this service needs a key: send 'authorization: Bearer <key>'")
        token = header.strip()
        if token[:7].lower() == "bearer ":
            token = token[7:].strip()
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in self.auth_keys):
            raise ServingError(Code.UNAUTHENTICATED, "the key in 'authorization' is not valid for this service")

    # -- model resolution -------------------------------------------------------------------
    def default_name(self) -> str:
        """The single model's name (requests may omit the name when only one model is served)."""
        with self._lock:
            if len(self.models) == 1:
                return next(iter(self.models))
            raise ServingError(Code.NOT_FOUND, f"this server serves several models {sorted(self.models)}: name one")

    def resolve(self, name: Optional[str], version: Optional[int] = None, label: Optional[str] = None,
                *, check_ready: bool = True) -> ModelVersion:
        """The version a request runs on: ``version`` or ``label`` or the newest available.

        Raises NOT_FOUND (unknown model, version or label) or, with ``check_ready``,
        UNAVAILABLE (loading, failed to load, shutting down).
        """
        name = name or self.default_name()
        with self._lock:
            entry = self.models.get(name)
            if entry is None:
                raise ServingError(Code.NOT_FOUND, f"no model {name!r} here; this server serves {sorted(self.models)}")
            if label:
                if label in entry.labels:
                    version = entry.labels[label]
                elif label != "stable":
                    raise ServingError(Code.NOT_FOUND, f"model {name!r} has no version label {label!r}"
                                       + (f"; labels: {sorted(entry.labels)}" if entry.labels else ""))
            if version is not None:
                mv = entry.versions.get(int(version))
                if mv is None or mv.state in (VersionState.UNLOADING, VersionState.END):
                    have = sorted(v.version for v in entry.versions.values() if v.state is VersionState.AVAILABLE)
                    raise ServingError(Code.NOT_FOUND, f"model {name!r} has no version {version}; available: {have}")
            else:
                mv = entry.latest() or (max(entry.versions.values(), key=lambda v: v.version)
                                        if entry.versions else None)
                if mv is None:
                    raise ServingError(Code.UNAVAILABLE, f"model {name!r} has no version loaded yet")
        if check_ready:
            if self.stopping:
                raise ServingError(Code.UNAVAILABLE, "the server is shutting down")
            if not self.ready.is_set():
                raise ServingError(Code.UNAVAILABLE, "the model is loading and warming up; retry shortly")
            if mv.error:
                raise ServingError(Code.UNAVAILABLE, f"model {mv.name!r} version {mv.version} failed to load: "
                                   f"{mv.error}")
            if not mv.available:
                raise ServingError(Code.UNAVAILABLE, f"model {mv.name!r} is loading and warming up; retry shortly")
        return mv

    # -- running a request ------------------------------------------------------------------
    def infer(self, mv: ModelVersion, *, x: Optional[np.ndarray] = None, images: Optional[List[bytes]] = None,
              key: str = "", outputs: Optional[List[str]] = None, timeout_s: Optional[float] = None,
              feeds: Optional[Dict[str, np.ndarray]] = None,
              texts: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
        """Runs one request on a worker of ``mv``: a float batch ``x`` of the model's input,
        encoded ``images``, ``feeds`` (input name -> array, every input of the plan: token ids
        and masks) or ``texts`` (sentences, for a plan with a text front); returns output name
        -> array.  Raises :class:`ServingError` (a runtime ``ValueError``, such as a token id
        outside the embedding table, is INVALID_ARGUMENT with its message)."""
        if sum(v is not None for v in (x, images, feeds, texts)) != 1:
            raise ValueError("give exactly one of x, images, feeds and texts")
        deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        with self._lock:
            # a request that resolved a version now retiring still runs on it (UNLOADING waits
            # for it); one that comes after the version ended fails fast, never waits forever
            if mv.state in (VersionState.END, VersionState.START, VersionState.UNKNOWN):
                raise ServingError(Code.UNAVAILABLE, f"model {mv.name!r} version {mv.version} is being unloaded; "
                                   "retry (the request will go to the current version)")
            if self.waiting >= self.queue_size:
                raise ServingError(Code.RESOURCE_EXHAUSTED, f"the request queue is full ({self.queue_size} waiting); "
                                   "retry later or raise --queue-size/--workers")
            self.waiting += 1
            mv.inflight += 1
        try:
            # dynamic batching: float or token tensors, or sentences (never encoded images)
            item: Any = x if x is not None else feeds if feeds is not None else texts
            if self.batcher is not None and item is not None and self.batcher.accepts(mv, item):
                with self._lock:
                    self.waiting -= 1
                    self.running += 1
                try:
                    return self.batcher.submit(mv, item, outputs, deadline, key=key)
                finally:
                    with self._lock:
                        self.running -= 1
            t_q = time.perf_counter()
            try:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    pred = mv.predictors.get(timeout=remaining)
                except queue.Empty:
                    raise ServingError(Code.DEADLINE_EXCEEDED, "the deadline passed while queued") from None
            finally:
                with self._lock:
                    self.waiting -= 1
            queued = time.perf_counter() - t_q
            with self._lock:
                self.running += 1
            t_c = time.perf_counter()
            try:
                if images is not None:
                    x = self.preprocess(pred, images, key)
                if self.simulated_latency_s:
                    time.sleep(self.simulated_latency_s)
                try:
                    if texts is not None:
                        return pred.predict_texts(texts, outputs)
                    if feeds is not None:
                        return pred.predict(feeds, outputs)
                    assert x is not None
                    return pred.predict(x, outputs)
                except ValueError as e:
                    raise invalid(f"input {key!r}: {e}" if texts is not None else str(e)) from None
            finally:
                self.metrics.observe_split(mv.name, queued, time.perf_counter() - t_c)
                with self._lock:
                    self.running -= 1
                mv.predictors.put(pred)
        finally:
            with self._lock:
                mv.inflight -= 1

    @staticmethod
    def preprocess(pred: Any, images: List[bytes], key: str) -> np.ndarray:
        """Decodes and preprocesses encoded images with ``pred``'s image front; every failure
        is INVALID_ARGUMENT (RESOURCE_EXHAUSTED when out of memory) naming the image."""
        arrs = []
        for i, b in enumerate(images):
            which = f"image {i}" if len(images) > 1 else "the image"
            try:
                arrs.append(pred.preprocess([b]))
            except ImageTooLargeError as e:
                flag = {"max_pixels": "max_image_pixels"}.get(e.limit_name, e.limit_name)
                raise invalid(f"input {key!r}: {which} ({len(b)} bytes) is too large: {e} (server option "
                              f"{flag} / --{flag.replace('_', '-')})") from None
            except MemoryError:
                raise ServingError(Code.RESOURCE_EXHAUSTED, f"input {key!r}: out of memory decoding {which} "
                                   f"({len(b)} bytes)") from None
            except Exception as e:
                raise invalid(f"input {key!r}: {which} ({len(b)} bytes) could not be decoded as "
                              f"JPEG/PNG/GIF: {e}") from None
        return arrs[0] if len(arrs) == 1 else np.concatenate(arrs)

    # -- loading and unloading --------------------------------------------------------------
    def add_version(self, name: str, version: int, source: Any) -> ModelVersion:
        """Registers a version (state START) without loading it; ``source`` is a plan path or
        an in-memory ``Plan``."""
        from ..runtime.plan import Plan

        if not name or "/" in name:
            raise ValueError(f"model name {name!r} must be non-empty and contain no '/'")
        path = "<in-memory plan>" if isinstance(source, Plan) else str(source)
        mv = ModelVersion(name, int(version), path, plan=source if isinstance(source, Plan) else None)
        with self._lock:
            entry = self.models.setdefault(name, ModelEntry(name))
            if mv.version in entry.versions and entry.versions[mv.version].state is not VersionState.END:
                raise ValueError(f"model {name!r} version {version} is already present")
            entry.versions[mv.version] = mv
        return mv

    def load(self, mv: ModelVersion, warmup: bool = True, warmup_inputs: Optional[List[Any]] = None) -> ModelVersion:
        """Loads a registered version: ``workers`` predictors, each warmed up with a zero input
        (or ``warmup_inputs``: callables ``f(predictor)`` or arrays), then AVAILABLE.  A failure
        is recorded in ``mv.error`` (state END), never raised."""
        from ..runtime.plan import load_plan
        from ..runtime.predictor import Predictor

        mv.state = VersionState.LOADING
        self._changed()
        t0 = time.perf_counter()
        rss0 = _rss_bytes()
        try:
            plan = mv.plan if mv.plan is not None else load_plan(mv.path)
            for _ in range(self.workers):
                pred = Predictor(plan, num_threads=self.num_threads, kernel=self.kernel,
                                 max_image_pixels=self.max_image_pixels, max_resize_pixels=self.max_resize_pixels)
                if warmup:
                    if warmup_inputs:
                        for w in warmup_inputs:
                            w(pred) if callable(w) else pred.predict(w)
                    else:
                        synthetic_call(pred)
                mv.predictors.put(pred)
                mv.first = mv.first or pred
            mv.loaded_s = time.perf_counter() - t0
            mv.peak_rss_delta_bytes = max(0, _rss_bytes() - rss0)
            mv.state = VersionState.AVAILABLE
            sess = mv.first.session
            log.info("loaded %s version %d from %s in %.2f s: %d worker(s), kernel %s, %d thread(s) each",
                     mv.name, mv.version, mv.path, mv.loaded_s, self.workers, sess.kernel, sess.num_threads)
        except Exception as e:
            mv.error = f"{type(e).__name__}: {e}"
            mv.state = VersionState.END
            log.error("could not load %s version %d from %s: %s", mv.name, mv.version, mv.path, mv.error)
        self._changed()
        return mv

    def load_version(self, name: str, version: int, source: Any, warmup: bool = True) -> ModelVersion:
        """:meth:`add_version` then :meth:`load` (in the calling thread)."""
        return self.load(self.add_version(name, version, source), warmup)

    def unload_version(self, name: str, version: int, drain_timeout_s: float = 30.0) -> None:
        """Retires a version: no new request resolves to it, the in-flight ones finish (up to
        ``drain_timeout_s``), then its predictors are dropped and the version removed."""
        with self._lock:
            entry = self.models.get(name)
            mv = entry.versions.get(int(version)) if entry else None
            if mv is None:
                raise KeyError(f"model {name!r} has no version {version}")
            mv.state = VersionState.UNLOADING
        self._changed()
        t_end = time.monotonic() + drain_timeout_s
        while True:  # in-flight requests (counted under the lock by infer) finish first
            with self._lock:
                if mv.inflight == 0 or time.monotonic() >= t_end:
                    if mv.inflight:
                        log.warning("%s version %d unloaded with %d request(s) still running", name, version,
                                    mv.inflight)
                    mv.state = VersionState.END  # from here on infer() refuses it
                    break
            time.sleep(0.005)
        with self._lock:
            entry.versions.pop(mv.version, None)  # type: ignore[union-attr]
            for lab, v in list(entry.labels.items()):  # type: ignore[union-attr]
                if v == mv.version:
                    del entry.labels[lab]  # type: ignore[union-attr]
        while True:  # the predictors and their sessions go with the last reference
            try:
                mv.predictors.get_nowait()
            except queue.Empty:
                break
        mv.first = None
        mv.plan = None
        log.info("unloaded %s version %d", name, version)
        self._changed()

    def set_labels(self, name: str, labels: Mapping[str, int]) -> None:
        """Sets a model's version labels (label -> version); the versions must exist."""
        with self._lock:
            entry = self.models.get(name)
            if entry is None:
                raise KeyError(f"no model {name!r}")
            missing = {k: v for k, v in labels.items() if int(v) not in entry.versions}
            if missing:
                raise ValueError(f"model {name!r}: labels {missing} name versions that are not loaded")
            entry.labels = {k: int(v) for k, v in labels.items()}

    def load_all(self, warmup: bool = True, warmup_delay_s: float = 0.0) -> None:
        """Loads every registered START version, then sets ``ready``."""
        t0 = time.perf_counter()
        with self._lock:
            todo = [v for e in self.models.values() for v in e.versions.values() if v.state is VersionState.START]
        for mv in todo:
            self.load(mv, warmup)
        if warmup_delay_s > 0:  # the seed's "flashing the FPGA" phase, for tests and demos
            time.sleep(warmup_delay_s)
        self.ready.set()
        self._changed()
        log.info("ready in %.2f s", time.perf_counter() - t0)

    def stop(self) -> None:
        """Stops taking requests (every face answers UNAVAILABLE from now on)."""
        self.stopping = True
        if self.batcher is not None:
            self.batcher.stop()
        self._changed()
