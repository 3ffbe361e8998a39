"""Model folders: versions on disk, TF Serving's version policies, version labels, hot reload
without failed requests, and warm-up.

TF Serving watches a *model base path* ``<root>/<name>/<version>/`` and serves the versions
its *version policy* picks; :class:`ModelFolder` does the same for plans.

**Layout.** ``<root>/<name>/<version>/`` where ``<version>`` is a positive integer folder
holding one plan (``*.bfpplan``) or one converted ONNX model (``*.onnx``, compiled when it is
loaded with :func:`bfpaccel.compile` at ``onnx_format``, msfp16 by default, as ``bfpaccel
serve --model`` compiles a registered ONNX model).  With ``model_name``, ``<root>`` is that one
model's folder, as KServe mounts a model at ``/mnt/models``: either its version folders, or a
plan (or ONNX) file directly in it, served as version 1.  A model folder under a multi-model
root may hold its file directly too (version 1).  Entries whose name starts with ``.`` or ends
with a temporary suffix (``.tmp``, ``.part``, ``~``, ...) are ignored, and so is every folder
whose name is not a positive integer (``3.tmp``, ``.3``, ``new``).

**Publishing a version** (the rule to follow): write it under a temporary name in the same
file system (``<name>/.3.tmp/``), then rename it to its number (``mv .3.tmp 3``).  A rename is
atomic, so a version folder is never seen half-written.  As a safety net a folder is loaded
only when it holds exactly one model file, and a folder seen changing between two scans
(other files, sizes or times, or replaced) waits until a scan finds it unchanged: a version
number first seen complete is loaded at once, one written in place or replaced one scan later.
A version whose load failed is not tried again until its folder changes.  A version is never
reloaded in place: publish a new number (or delete the newest folder to roll back).

**Version policy** (TF Serving's ``model_version_policy``): ``latest:N`` serves the N highest
complete versions (``latest`` = ``latest:1``, the default), ``all`` every one, ``specific:1,2``
those listed.  **Labels** ``{label: version}`` (``model_spec.version_label``) apply to every
model of the folder; they are set once the versions are available.  A label naming a version
the policy does not serve is an error at start (:meth:`ModelFolder.register` raises) and a
logged warning on a reload (the label is left out until its version is served).

**Swaps never fail a request** (:meth:`ModelFolder.sync`): new versions are loaded and warmed
up first, one at a time, while the old ones keep serving; a request without a version goes to
the newest AVAILABLE version as soon as it is warm.  Only then are retired versions unloaded:
each leaves resolution, waits ``drain_grace_s`` for requests that resolved it just before to
reach their model call, then :meth:`ServingCore.unload_version` lets the in-flight ones finish.
When a wanted version fails to load, the versions serving now stay (availability first), the
failure is reported (``GetModelStatus``: state END with the error), and the next scans skip it
until its folder changes.  A model whose folder holds no version any more keeps serving what
it has (a warning is logged): an empty folder is more often a storage hiccup than an intent.

**Warm-up**, before a version becomes AVAILABLE, on each of its workers: the version's
``assets.extra/tf_serving_warmup_requests`` when present (else ``warmup_file``), TF Serving's
format -- a TFRecord file of ``tensorflow.serving.PredictionLog`` records (at most 1000); each
``predict_log`` request is decoded as a Predict request would be (:func:`decode_input`, the
server's limits; images through the model's image front) and run.  A malformed file (framing,
CRC, protobuf) or a request the model refuses fails that version's load with the record named.
Without a file, ``synthetic_warmup`` calls with a zero input (default 1).

**Memory.** A swap holds old and new versions at once; :class:`SyncSummary` reports each
load's peak resident-memory growth and the peak of the whole swap (sampled, and from the
kernel's high-water mark when the swap set a new one), and the summary is logged.  After the
unloads, the freed heap pages are handed back to the system (glibc's ``malloc_trim``), so the
resident size returns to one version's instead of staying at old + new.

Example:
    >>> core = ServingCore(workers=2)  # doctest: +SKIP
    >>> folder = ModelFolder(core, "/models", version_policy="latest:1", poll_seconds=5)  # doctest: +SKIP
    >>> folder.register(); initial_load(core, folder); folder.start()  # doctest: +SKIP
    >>> print(folder.sync())  # doctest: +SKIP
    loaded resnet:3 (0.84 s, peak RSS +101.2 MiB, warm-up 1 synthetic call); unloaded resnet:2; ...
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .core import ModelEntry, ModelVersion, ServingCore, ServingError, VersionState

__all__ = ["ModelFolder", "VersionPolicy", "parse_version_policy", "VersionFolder", "SyncSummary", "LoadReport",
           "FailedLoad", "WarmupError", "initial_load", "load_with_warmup", "read_tfrecords", "write_tfrecords",
           "read_warmup_requests", "write_warmup_file", "crc32c", "masked_crc32c", "WARMUP_FILE",
           "MAX_WARMUP_RECORDS", "MAX_WARMUP_FILE_BYTES", "MODEL_SUFFIXES"]

log = logging.getLogger("bfpaccel.serve")

PathLike = Union[str, "os.PathLike[str]"]

#: A version folder's warm-up records, as TF Serving names them.
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
#: TF Serving's limit on warm-up records per version.
MAX_WARMUP_RECORDS = 1000
#: Largest warm-up file read.
MAX_WARMUP_FILE_BYTES = 1 << 30
#: Model files a version folder may hold: a compiled plan, or a converted ONNX model.
MODEL_SUFFIXES = (".bfpplan", ".onnx")
_TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".incomplete", ".crdownload", ".swp", "~")
_MAX_FOLDER_ENTRIES = 100_000  # files looked at per version folder (its fingerprint)
_INT64_MAX = 2 ** 63 - 1
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VERSION_RE = re.compile(r"^[0-9]+$")
_MIB = 1024 * 1024


class WarmupError(ValueError):
    """A warm-up file that cannot be replayed: framing, CRC or protobuf errors, too many
    records, or a request the model refuses (the message names the file and the record)."""


# ---------------------------------------------------------------------- version policy
@dataclass(frozen=True)
class VersionPolicy:
    """TF Serving's model version policy: ``kind`` ``latest`` (the ``numbers[0]`` highest
    versions), ``all``, or ``specific`` (the versions in ``numbers``)."""

    kind: str = "latest"
    numbers: Tuple[int, ...] = (1,)

    def select(self, versions: Iterable[int]) -> List[int]:
        """The versions of ``versions`` this policy serves, ascending."""
        have = sorted(set(int(v) for v in versions))
        if self.kind == "all":
            return have
        if self.kind == "latest":
            return have[-self.numbers[0]:] if have else []
        return [v for v in have if v in self.numbers]

    def __str__(self) -> str:
        return self.kind if self.kind == "all" else f"{self.kind}:" + ",".join(str(n) for n in self.numbers)


def parse_version_policy(text: Optional[str]) -> VersionPolicy:
    """``latest`` | ``latest:N`` | ``all`` | ``specific:V1,V2,...`` (None: ``latest:1``) ->
    :class:`VersionPolicy`; ValueError for anything else.

    Example:
        >>> parse_version_policy("latest:2"), parse_version_policy("specific:3,1").numbers
        (VersionPolicy(kind='latest', numbers=(2,)), (1, 3))
    """
    if text is None:
        return VersionPolicy()
    if not isinstance(text, str):
        raise ValueError(f"version policy must be a string such as 'latest:1', got {text!r}")
    kind, sep, rest = text.strip().partition(":")
    try:
        if kind == "all" and not sep:
            return VersionPolicy("all", ())
        if kind == "latest":
            n = int(rest) if sep else 1
            if not 1 <= n <= 1_000_000:
                raise ValueError
            return VersionPolicy("latest", (n,))
        if kind == "specific" and sep:
            parts = [p.strip() for p in rest.split(",")]
            nums = [int(p) for p in parts]
            if not nums or any(not 1 <= v <= _INT64_MAX for v in nums) or len(set(nums)) != len(nums):
                raise ValueError
            return VersionPolicy("specific", tuple(sorted(nums)))
    except ValueError:
        pass
    raise ValueError(f"invalid version policy {text!r}: use latest, latest:N (N >= 1), all, or specific:V1,V2 "
                     "(distinct versions >= 1)")


def _check_labels(labels: Optional[Mapping[str, int]]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for label, version in (labels or {}).items():
        if not isinstance(label, str) or not _LABEL_RE.match(label):
            raise ValueError(f"invalid version label {label!r}: letters, digits, '_', '.', '-' (not first)")
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or not 1 <= version <= _INT64_MAX:
            raise ValueError(f"version label {label!r}: the version must be an integer >= 1, got {version!r}")
        out[label] = int(version)
    return out


# ---------------------------------------------------------------------- TFRecord and CRC-32C
_CRC_TABLE: Optional[List[int]] = None
_FAST_CRC: Optional[Callable[[bytes], int]] = None
_FAST_CRC_LOOKED = False


def _crc_table() -> List[int]:
    global _CRC_TABLE
    if _CRC_TABLE is None:
        table = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
            table.append(c)
        _CRC_TABLE = table
    return _CRC_TABLE


def _fast_crc() -> Optional[Callable[[bytes], int]]:
    """A compiled CRC-32C when the ``crc32c`` or ``google-crc32c`` package is installed."""
    global _FAST_CRC, _FAST_CRC_LOOKED
    if not _FAST_CRC_LOOKED:
        _FAST_CRC_LOOKED = True
        try:
            import crc32c as _c  # type: ignore[import-not-found]

            _FAST_CRC = lambda b: int(_c.crc32c(b))  # noqa: E731
        except ImportError:
            try:
                import google_crc32c as _g  # type: ignore[import-not-found]

                _FAST_CRC = lambda b: int(_g.value(bytes(b)))  # noqa: E731
            except ImportError:
                _FAST_CRC = None
    return _FAST_CRC


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, as TFRecord files use it.

    Example:
        >>> hex(crc32c(b"123456789"))
        '0xe3069283'
    """
    fast = _fast_crc()
    if fast is not None:
        return fast(data)
    table = _crc_table()
    crc = 0xFFFFFFFF
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: the CRC-32C rotated right by 15 bits plus 0xa282ead8 (mod 2**32)."""
    c = crc32c(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecords(path: PathLike, max_records: int = MAX_WARMUP_RECORDS,
                   max_bytes: int = MAX_WARMUP_FILE_BYTES) -> List[bytes]:
    """The records of a TFRecord file (each: 8-byte little-endian length, masked CRC-32C of
    the length, the data, masked CRC-32C of the data), every CRC verified.

    Raises :class:`WarmupError` naming the record and byte offset for a truncated file, a CRC
    mismatch, a length beyond the end of the file, more than ``max_records`` records or a file
    over ``max_bytes``; OSError when it cannot be read.  Lengths are checked against the file
    size before anything is allocated.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size > max_bytes:
        raise WarmupError(f"{path}: {size} bytes, over the limit of {max_bytes} for a warm-up file")
    records: List[bytes] = []
    off = 0
    with open(path, "rb") as f:
        while True:
            head = f.read(12)
            if not head:
                return records
            where = f"{path}: record {len(records)} at byte {off}"
            if len(head) < 12:
                raise WarmupError(f"{where}: truncated (a record header is 12 bytes, {len(head)} left); "
                                  "not a TFRecord file or cut short")
            length, length_crc = struct.unpack("<QI", head)
            want = masked_crc32c(head[:8])
            if want != length_crc:
                raise WarmupError(f"{where}: length CRC mismatch (stored 0x{length_crc:08x}, computed "
                                  f"0x{want:08x}); not a TFRecord file or corrupted")
            if length > size - off - 16:
                raise WarmupError(f"{where}: truncated (the record says {length} bytes, {max(0, size - off - 16)} "
                                  "are left)")
            if len(records) >= max_records:
                raise WarmupError(f"{path}: more than {max_records} records (TF Serving's limit for warm-up "
                                  "files)")
            data = f.read(length)
            tail = f.read(4)
            if len(data) != length or len(tail) != 4:
                raise WarmupError(f"{where}: truncated while reading")
            (data_crc,) = struct.unpack("<I", tail)
            want = masked_crc32c(data)
            if want != data_crc:
                raise WarmupError(f"{where}: data CRC mismatch (stored 0x{data_crc:08x}, computed 0x{want:08x}); "
                                  "the file is corrupted")
            records.append(data)
            off += 16 + length


def write_tfrecords(path: PathLike, records: Iterable[bytes]) -> str:
    """Writes ``records`` as a TFRecord file (what :func:`read_tfrecords` reads); returns the path."""
    path = os.fspath(path)
    with open(path, "wb") as f:
        for r in records:
            r = bytes(r)
            head = struct.pack("<Q", len(r))
            f.write(head + struct.pack("<I", masked_crc32c(head)) + r + struct.pack("<I", masked_crc32c(r)))
    return path


def write_warmup_file(path: PathLike, requests: Iterable[Any]) -> str:
    """Writes PredictRequests (``bfpaccel.serve._protos.PredictRequest``) as a TF Serving
    warm-up file: each wrapped in a ``PredictionLog.predict_log``.  Creates the parent folder
    (``<version>/assets.extra/``); returns the path.

    Example:
        >>> req = pb.PredictRequest(); req.inputs["images"].CopyFrom(...)  # doctest: +SKIP
        >>> write_warmup_file("models/resnet/3/" + WARMUP_FILE, [req])  # doctest: +SKIP
    """
    from . import _protos as pb

    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    records = []
    for req in requests:
        entry = pb.PredictionLog()
        entry.predict_log.request.CopyFrom(req)
        records.append(entry.SerializeToString())
    return write_tfrecords(path, records)


def read_warmup_requests(path: PathLike, max_records: int = MAX_WARMUP_RECORDS) -> List[Any]:
    """The PredictRequests of a warm-up file (``predict_log`` records; the requests of a
    ``predict_streamed_log`` in order).  Raises :class:`WarmupError` for a malformed file or a
    record of another kind (this server implements Predict only)."""
    from google.protobuf.message import DecodeError

    from . import _protos as pb

    path = os.fspath(path)
    out: List[Any] = []
    for i, data in enumerate(read_tfrecords(path, max_records)):
        try:
            entry = pb.PredictionLog.FromString(data)
        except DecodeError as e:
            raise WarmupError(f"{path}: record {i} is not a tensorflow.serving.PredictionLog: {e}") from None
        kind = entry.WhichOneof("log_type")
        if kind == "predict_log":
            out.append(entry.predict_log.request)
        elif kind == "predict_streamed_log":
            out.extend(entry.predict_streamed_log.request)
        elif kind is None:
            raise WarmupError(f"{path}: record {i} is a PredictionLog without a log (predict_log expected)")
        else:
            raise WarmupError(f"{path}: record {i} is a {kind}; only predict_log records can be replayed (this "
                              "server implements Predict only)")
    return out


# ---------------------------------------------------------------------- warm-up on a predictor
def _replay_one(core: ServingCore, pred: Any, req: Any) -> None:
    """Runs one PredictRequest on a predictor the way the TF Serving gRPC face would: encoded
    images, sentences (a plan with a text front), the float input, or every input of a model of
    several (token ids and masks, kept integer)."""
    from .core import element_limit, invalid
    from .tfs_grpc import decode_input, decode_text_input

    names = list(pred.plan.input_names)
    if len(req.inputs) == 0 or (len(req.inputs) > 1 and len(req.inputs) > len(names)):
        raise invalid(f"the request has {len(req.inputs)} inputs {sorted(req.inputs)}; this model takes "
                      + (f"one, named one of {sorted(pred.input_aliases)}" if len(names) == 1 else
                         f"{names} together"))
    for k in req.inputs:
        if k not in pred.input_aliases:
            raise invalid(f"unknown input {k!r}; this model takes one of {sorted(pred.input_aliases)}")
    key, tp = next(iter(req.inputs.items()))
    front = getattr(pred, "text_front", None)
    if front is not None and key == front.input_alias:
        if len(req.inputs) > 1:
            raise invalid(f"the request has inputs {sorted(req.inputs)}; {key!r} (text) goes alone")
        try:
            pred.predict_texts(decode_text_input(tp, key, core.max_batch), list(req.output_filter) or None)
        except (ValueError, KeyError) as e:
            raise invalid(f"input {key!r}: {e}") from None
        return
    outputs: Optional[List[str]] = None
    if req.output_filter:
        try:
            outputs = list(dict.fromkeys(pred.resolve_output(o) for o in req.output_filter))
        except KeyError as e:
            raise invalid(f"unknown output {e}; this model's outputs are {pred.output_names}") from None
    if len(names) > 1:
        feeds = {}
        for k, t in req.inputs.items():
            if k not in names:
                raise invalid(f"input {k!r} goes alone; this model takes {names} together")
            sh = pred.plan.input_shapes.get(k)
            _, arr = decode_input(t, k, takes_images=False, input_shape=sh, max_batch=core.max_batch,
                                  max_elements=element_limit(sh, core.max_batch, core.max_input_elements),
                                  declared=pred.plan.input_dtypes.get(k, "float32"))
            feeds[k] = arr
        try:
            pred.predict(feeds, outputs)
        except ValueError as e:
            raise invalid(str(e)) from None
        return
    shape = pred.plan.input_shapes.get(pred.input_name)
    images, x = decode_input(tp, key, takes_images=pred.takes_images, input_shape=shape, max_batch=core.max_batch,
                             max_elements=element_limit(shape, core.max_batch, core.max_input_elements),
                             declared=pred.plan.input_dtypes.get(pred.input_name, "float32"))
    if images is not None:
        x = core.preprocess(pred, images, key)
    try:
        pred.predict(x, outputs)
    except ValueError as e:
        raise invalid(str(e)) from None


def _replay_fn(core: ServingCore, req: Any, index: int, path: str) -> Callable[[Any], None]:
    def run(pred: Any) -> None:
        try:
            _replay_one(core, pred, req)
        except ServingError as e:
            raise WarmupError(f"{path}: warm-up record {index} was refused: {e.message}") from None
    return run


def _synthetic_call(pred: Any) -> None:
    from .core import synthetic_call

    synthetic_call(pred)


def _warmup_plan(core: ServingCore, own_file: Optional[str], default_file: Optional[str], warmup: bool,
                 synthetic: int) -> Tuple[List[Callable[[Any], None]], str]:
    """The warm-up calls of one version and their description; raises WarmupError."""
    if not warmup:
        return [], "off"
    path = own_file or default_file
    if path:
        reqs = read_warmup_requests(path)
        if reqs:
            return ([_replay_fn(core, r, i, path) for i, r in enumerate(reqs)],
                    f"{len(reqs)} record{'s' if len(reqs) != 1 else ''} from {path}")
        log.warning("warm-up file %s holds no records: %d synthetic warm-up call(s) instead", path, synthetic)
    return [_synthetic_call] * synthetic, f"{synthetic} synthetic call{'s' if synthetic != 1 else ''}"


# ---------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _hwm_bytes() -> int:
    """The process's peak resident size (VmHWM), 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class _RssWatch:
    """Samples the resident size in a thread (every ``interval`` s) while it is entered; the
    kernel's high-water mark catches a peak between samples when it set a new one."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.end = self.peak = 0
        self._mark_rss = self._mark_peak = self._mark_hwm = 0
        self._hwm0 = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "_RssWatch":
        self.start = self.peak = _rss_bytes()
        self._hwm0 = _hwm_bytes()
        self.mark()
        self._thread = threading.Thread(target=self._run, name="bfpaccel-rss", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            r = _rss_bytes()
            with self._lock:
                self.peak = max(self.peak, r)
                self._mark_peak = max(self._mark_peak, r)

    def mark(self) -> None:
        """Starts a sub-measurement (:meth:`since_mark`)."""
        r = _rss_bytes()
        with self._lock:
            self._mark_rss = self._mark_peak = r
            self._mark_hwm = _hwm_bytes()

    def since_mark(self) -> int:
        """Peak growth since :meth:`mark`, in bytes."""
        r, hwm = _rss_bytes(), _hwm_bytes()
        with self._lock:
            peak = max(self._mark_peak, r)
            if hwm > self._mark_hwm:
                peak = max(peak, hwm)
            self.peak = max(self.peak, peak)
            return max(0, peak - self._mark_rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end = _rss_bytes()
        hwm = _hwm_bytes()
        self.peak = max(self.peak, self.end, hwm if hwm > self._hwm0 else 0)

    @property
    def peak_delta(self) -> int:
        return max(0, self.peak - self.start)


_TRIM: Optional[Callable[[int], int]] = None
_TRIM_LOOKED = False


def _release_freed_memory() -> None:
    """Hands the heap's free pages back to the system (glibc's ``malloc_trim``): an unloaded
    version's weights are freed, but glibc keeps the pages of its arenas, so the resident
    size would stay at old + new after every swap.  Nothing elsewhere."""
    global _TRIM, _TRIM_LOOKED
    if not _TRIM_LOOKED:
        _TRIM_LOOKED = True
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = None
    if _TRIM is not None:
        _TRIM(0)


def _mib(n: int) -> str:
    return f"{n / _MIB:+.1f} MiB"


# ---------------------------------------------------------------------- loading one version
def _notify(core: ServingCore) -> None:
    """Tells the core's change listeners (health) that models changed."""
    core._changed()


def _fail(core: ServingCore, mv: ModelVersion, e: BaseException) -> None:
    mv.error = f"{type(e).__name__}: {e}"
    mv.state = VersionState.END
    log.error("could not load %s version %d from %s: %s", mv.name, mv.version, mv.path, mv.error)
    _notify(core)


def load_with_warmup(core: ServingCore, mv: ModelVersion, *, warmup: bool = True, synthetic_warmup: int = 1,
                     warmup_file: Optional[PathLike] = None, default_warmup_file: Optional[PathLike] = None,
                     onnx_format: str = "msfp16") -> str:
    """Loads a registered version (``core.add_version``) with its warm-up: the records of
    ``warmup_file`` (else ``default_warmup_file``) replayed on each worker, else
    ``synthetic_warmup`` zero-input calls; an ``.onnx`` source is compiled first.  A failure
    (compilation, malformed warm-up file, a refused record, the plan) is recorded in
    ``mv.error`` (state END), never raised.  Returns a description of the warm-up."""
    own = os.fspath(warmup_file) if warmup_file is not None else None
    default = os.fspath(default_warmup_file) if default_warmup_file is not None else None
    mv.state = VersionState.LOADING
    try:
        calls, what = _warmup_plan(core, own, default, warmup, synthetic_warmup)
        if mv.plan is None and mv.path.lower().endswith(".onnx"):
            from .. import compile as bfp_compile

            t0 = time.perf_counter()
            mv.plan = bfp_compile(mv.path, format=onnx_format)
            log.info("compiled %s version %d from %s at %s in %.2f s", mv.name, mv.version, mv.path, onnx_format,
                     time.perf_counter() - t0)
    except Exception as e:
        _fail(core, mv, e)
        return "not run"
    core.load(mv, warmup=bool(calls), warmup_inputs=calls)
    if mv.error is None and calls:
        log.info("warmed up %s version %d: %s on each of %d worker(s)", mv.name, mv.version, what, core.workers)
    return what


def initial_load(core: ServingCore, folder: Optional["ModelFolder"] = None, *, warmup: bool = True,
                 warmup_delay_s: float = 0.0, synthetic_warmup: int = 1,
                 warmup_file: Optional[PathLike] = None) -> None:
    """The server's first load: the model folder's registered versions (their warm-up files,
    ONNX compilation, labels), then every other registered version (plans given directly:
    ``warmup_file`` replayed, else ``synthetic_warmup`` zero-input calls), then
    :meth:`ServingCore.load_all` sets ``ready``."""
    try:
        if folder is not None:
            folder.load_registered()
        with core._lock:
            todo = [v for e in core.models.values() for v in e.versions.values() if v.state is VersionState.START]
        for mv in todo:
            load_with_warmup(core, mv, warmup=warmup, synthetic_warmup=synthetic_warmup,
                             default_warmup_file=warmup_file)
    except Exception:  # never leave the server unready forever: load_all below still sets ready
        log.exception("initial load failed")
    finally:
        core.load_all(warmup, warmup_delay_s)


# ---------------------------------------------------------------------- what is on disk
@dataclass(frozen=True)
class VersionFolder:
    """One version found on disk.

    Attributes:
        name, version: the model and version number.
        path: the version folder (or the model folder, for a model file directly in it).
        model_file: its ``.bfpplan`` or ``.onnx`` file (None when it has none, or several).
        warmup_file: its ``assets.extra/tf_serving_warmup_requests`` when present.
        fingerprint: the folder's identity and every file's name, size and time (a change
            means the folder was written to).
        problem: why it cannot be loaded as it is (no model file, several), else None.
    """

    name: str
    version: int
    path: str
    model_file: Optional[str]
    warmup_file: Optional[str]
    fingerprint: Tuple[Any, ...]
    problem: Optional[str] = None


def _ignored(name: str) -> bool:
    return not name or name.startswith(".") or name.lower().endswith(_TEMP_SUFFIXES)


def _file_sig(path: str, rel: str) -> Tuple[str, int, int, int]:
    st = os.stat(path)
    return (rel, st.st_size, st.st_mtime_ns, st.st_ino)


def _inspect(name: str, version: int, folder: str, direct: bool) -> VersionFolder:
    """A version folder's model file, warm-up file and fingerprint (``direct``: the model file
    lies in the model folder itself, with other things beside it).

    The fingerprint is ``(identity, files)``: the version folder's inode (for ``direct``, the
    model files' inodes) and each file's name, size, time and inode."""
    try:
        st = os.stat(folder)
        entries = sorted((e for e in os.scandir(folder) if not _ignored(e.name)), key=lambda e: e.name)
        models = [e for e in entries if e.name.lower().endswith(MODEL_SUFFIXES) and e.is_file()]
        sig: List[Any] = []
        if direct:
            identity: Tuple[Any, ...] = ("file",) + tuple((e.stat().st_dev, e.stat().st_ino) for e in models)
            sig += [_file_sig(e.path, e.name) for e in models]
            sub = [os.path.join(folder, "assets.extra")]
        else:
            identity = ("dir", st.st_dev, st.st_ino)
            sub = []
            for e in entries:
                if e.is_dir():
                    sub.append(e.path)
                else:
                    sig.append(_file_sig(e.path, e.name))
        count = 0
        for top in sub:
            for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
                dirnames[:] = sorted(d for d in dirnames if not _ignored(d))
                for fn in sorted(filenames):
                    count += 1
                    if count > _MAX_FOLDER_ENTRIES:
                        return VersionFolder(name, version, folder, None, None, (identity, tuple(sig)),
                                             f"more than {_MAX_FOLDER_ENTRIES} files")
                    if not _ignored(fn):
                        p = os.path.join(dirpath, fn)
                        sig.append(_file_sig(p, os.path.relpath(p, folder)))
    except OSError as e:
        return VersionFolder(name, version, folder, None, None, ((), ()), f"cannot be read: {e}")
    plans = [e.path for e in models if e.name.lower().endswith(".bfpplan")]
    onnx = [e.path for e in models if e.name.lower().endswith(".onnx")]
    chosen = plans or onnx
    problem = None
    model_file: Optional[str] = None
    if not chosen:
        problem = "holds no .bfpplan or .onnx file (yet)"
    elif len(chosen) > 1:
        problem = f"holds several model files {[os.path.basename(p) for p in chosen]}: keep one"
    else:
        model_file = chosen[0]
    wf = os.path.join(folder, WARMUP_FILE)
    return VersionFolder(name, version, folder, model_file, wf if os.path.isfile(wf) else None,
                         (identity, tuple(sig)), problem)


def _scan_model(name: str, path: str) -> Dict[int, VersionFolder]:
    """A model folder's versions: integer folders, else a model file directly in it (version 1)."""
    try:
        entries = [e for e in os.scandir(path) if not _ignored(e.name)]
    except OSError as err:
        log.warning("model folder %s cannot be read: %s", path, err)
        return {}
    out: Dict[int, VersionFolder] = {}
    for ent in entries:
        if not _VERSION_RE.match(ent.name) or not ent.is_dir():
            continue
        v = int(ent.name)
        if not 1 <= v <= _INT64_MAX:
            continue
        vf = _inspect(name, v, ent.path, direct=False)
        if v in out:  # "7" and "07"
            vf = VersionFolder(name, v, ent.path, None, None, vf.fingerprint,
                               f"two folders are version {v} ({os.path.basename(out[v].path)!r}, {ent.name!r})")
        out[v] = vf
    if out:
        return out
    if any(ent.name.lower().endswith(MODEL_SUFFIXES) and ent.is_file() for ent in entries):
        return {1: _inspect(name, 1, path, direct=True)}
    return {}


# ---------------------------------------------------------------------- reports
@dataclass(frozen=True)
class LoadReport:
    """A version loaded by a sync: ``seconds`` (compilation, load and warm-up),
    ``peak_rss_delta_bytes`` (resident-memory growth at its peak), ``warmup`` (what ran)."""

    name: str
    version: int
    path: str
    seconds: float
    peak_rss_delta_bytes: int
    warmup: str

    def __str__(self) -> str:
        return (f"{self.name}:{self.version} ({self.seconds:.2f} s, peak RSS {_mib(self.peak_rss_delta_bytes)}, "
                f"warm-up {self.warmup})")


@dataclass(frozen=True)
class FailedLoad:
    """A version that failed to load (not retried until its folder changes)."""

    name: str
    version: int
    path: str
    error: str
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"{self.name}:{self.version} ({self.error})"


@dataclass
class SyncSummary:
    """What a :meth:`ModelFolder.sync` (or the initial load) changed.

    Attributes:
        loaded: versions loaded and AVAILABLE, in load order.
        unloaded: ``(name, version)`` retired (drained, then dropped).
        failed: versions that failed to load (the old ones keep serving).
        pending: ``(name, version, reason)`` seen on disk but not loadable yet.
        warnings: labels that could not be set, missing ``specific`` versions, empty folders.
        labels: model -> the labels set.
        seconds: the sync's duration.
        peak_rss_delta_bytes: resident-memory growth at the swap's peak (old and new versions
            loaded at once) over the resident size before it.
        rss_delta_bytes: resident-memory change once the swap is over.
    """

    loaded: List[LoadReport] = field(default_factory=list)
    unloaded: List[Tuple[str, int]] = field(default_factory=list)
    failed: List[FailedLoad] = field(default_factory=list)
    pending: List[Tuple[str, int, str]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    labels: Dict[str, Dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_delta_bytes: int = 0
    rss_delta_bytes: int = 0

    @property
    def changed(self) -> bool:
        """True when a version was loaded, unloaded or failed."""
        return bool(self.loaded or self.unloaded or self.failed)

    def __str__(self) -> str:
        parts = []
        if self.loaded:
            parts.append("loaded " + ", ".join(str(r) for r in self.loaded))
        if self.unloaded:
            parts.append("unloaded " + ", ".join(f"{n}:{v}" for n, v in self.unloaded))
        if self.failed:
            parts.append("failed " + ", ".join(str(f) for f in self.failed))
        if self.pending:
            parts.append("pending " + ", ".join(f"{n}:{v} ({why})" for n, v, why in self.pending))
        if self.changed:
            parts.append(f"swap peak RSS {_mib(self.peak_rss_delta_bytes)} (net {_mib(self.rss_delta_bytes)}) "
                         f"in {self.seconds:.2f} s")
        return "; ".join(parts) or "no change"


# ---------------------------------------------------------------------- the folder
class ModelFolder:
    """A model folder served by a :class:`ServingCore` with a version policy, labels and hot
    reload (see the module documentation for the layout and the rules).

    Args:
        core: the serving core the versions are loaded into.
        root: ``<root>/<name>/<version>/`` folders, or with ``model_name`` one model's folder.
        model_name: serve ``root`` as this single model (KServe's ``/mnt/models``).
        version_policy: ``latest`` / ``latest:N`` / ``all`` / ``specific:V1,V2`` (None: latest:1).
        version_labels: label -> version, for every model of the folder.
        poll_seconds: :meth:`start` rescans this often in a daemon thread (0: no thread;
            :meth:`sync` on demand, ``ServerHandle.reload()``).
        synthetic_warmup: zero-input warm-up calls per worker for a version without warm-up
            records (0: none).
        warmup_file: warm-up records for versions without their own
            ``assets.extra/tf_serving_warmup_requests``.
        warmup: False skips every warm-up call.
        onnx_format: the BFP format ``.onnx`` versions are compiled to.
        drain_grace_s: how long a retiring version waits, out of resolution, for requests
            that resolved it just before to reach their model call.
        drain_timeout_s: how long :meth:`ServingCore.unload_version` waits for in-flight requests.

    Raises:
        ValueError: a bad policy, label, model name or option.
    """

    def __init__(self, core: ServingCore, root: PathLike, model_name: Optional[str] = None,
                 version_policy: Optional[str] = None, version_labels: Optional[Mapping[str, int]] = None,
                 poll_seconds: float = 0.0, *, synthetic_warmup: int = 1, warmup_file: Optional[PathLike] = None,
                 warmup: bool = True, onnx_format: str = "msfp16", drain_grace_s: float = 0.5,
                 drain_timeout_s: float = 30.0) -> None:
        self.core = core
        self.root = os.fspath(root)
        if model_name is not None and (not isinstance(model_name, str) or not model_name or "/" in model_name
                                       or "\x00" in model_name):
            raise ValueError(f"model name {model_name!r} must be a non-empty string without '/'")
        self.model_name = model_name
        self.policy = parse_version_policy(version_policy)
        self.labels = _check_labels(version_labels)
        if self.policy.kind == "specific":
            bad = {k: v for k, v in self.labels.items() if v not in self.policy.numbers}
            if bad:
                raise ValueError(f"version labels {bad} name versions that version policy {self.policy} does not "
                                 "serve")
        for opt, v in (("poll_seconds", poll_seconds), ("drain_grace_s", drain_grace_s),
                       ("drain_timeout_s", drain_timeout_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{opt} must be a finite number >= 0, got {v!r}")
        if isinstance(synthetic_warmup, bool) or not isinstance(synthetic_warmup, int) or \
                not 0 <= synthetic_warmup <= 10_000:
            raise ValueError(f"synthetic_warmup must be an integer in 0..10000, got {synthetic_warmup!r}")
        self.poll_seconds = float(poll_seconds)
        self.synthetic_warmup = synthetic_warmup
        self.warmup_file = os.fspath(warmup_file) if warmup_file is not None else None
        self.warmup = bool(warmup)
        self.onnx_format = onnx_format
        self.drain_grace_s = float(drain_grace_s)
        self.drain_timeout_s = float(drain_timeout_s)
        self.last_summary: Optional[SyncSummary] = None
        self._managed: Dict[str, str] = {}  # model name -> its folder
        self._last_scan: Dict[Tuple[str, int], Tuple[Any, ...]] = {}
        self._failed: Dict[Tuple[str, int], Tuple[Any, ...]] = {}  # not retried until the fingerprint changes
        self._registered: List[Tuple[ModelVersion, VersionFolder]] = []
        self._said: set = set()  # warnings already logged
        self._lock = threading.Lock()  # one sync at a time
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- scanning -----------------------------------------------------------------------------
    def scan(self) -> Dict[str, Dict[int, VersionFolder]]:
        """Every model and version on disk now (complete or not); nothing is loaded."""
        if self.model_name is not None:
            found = _scan_model(self.model_name, self.root)
            return {self.model_name: found} if found else {}
        try:
            entries = sorted((e for e in os.scandir(self.root) if not _ignored(e.name) and e.is_dir()),
                             key=lambda e: e.name)
        except OSError as err:
            log.warning("model root %s cannot be read: %s", self.root, err)
            return {}
        out = {}
        for ent in entries:
            found = _scan_model(ent.name, ent.path)
            if found:
                out[ent.name] = found
        return out

    def _candidates(self, name: str, found: Dict[int, VersionFolder], first: bool,
                    summary: SyncSummary) -> Dict[int, VersionFolder]:
        """The versions a policy may pick: complete and unchanged since the last scan (or
        serving now)."""
        entry = self.core.models.get(name)
        out = {}
        for v, vf in sorted(found.items()):
            serving = entry is not None and v in entry.versions and entry.versions[v].available
            if serving:
                out[v] = vf
            elif vf.problem:
                summary.pending.append((name, v, vf.problem))
            elif not first and self._changing(name, vf):
                summary.pending.append((name, v, "changed since the last scan (still being written?)"))
            else:
                out[v] = vf
        return out

    def _changing(self, name: str, vf: VersionFolder) -> bool:
        """Seen at the last scan with other contents (or as another folder): maybe being
        written, so it waits for a scan that finds it unchanged.  (Inode numbers cannot tell a
        replaced folder from one written in place: a file system reuses them at once.)"""
        prev = self._last_scan.get((name, vf.version))
        return prev is not None and prev != vf.fingerprint

    def _remember(self, found: Dict[str, Dict[int, VersionFolder]]) -> None:
        self._last_scan = {(n, v): vf.fingerprint for n, vs in found.items() for v, vf in vs.items()}

    def _say(self, summary: SyncSummary, msg: str) -> None:
        summary.warnings.append(msg)
        if msg not in self._said:
            self._said.add(msg)
            log.warning("%s", msg)

    # -- start ------------------------------------------------------------------------------------
    def register(self) -> Dict[str, List[int]]:
        """Scans the folder and registers (state START) the versions the policy serves, to be
        loaded by :meth:`load_registered` (``initial_load``); returns model -> versions.

        Raises:
            FileNotFoundError: no such folder.
            ValueError: no model in it, a model without a complete version to serve, a label
                naming a version that is not served, or a model name already served.
        """
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"model root {self.root!r} is not a folder")
        with self._lock:
            summary = SyncSummary()
            found = self.scan()
            if not found:
                raise ValueError(f"no model in {self.root!r}: expected " + (
                    "version folders (1/, 2/, ...) or a .bfpplan/.onnx file" if self.model_name else
                    "<name>/<version>/ folders holding a .bfpplan or .onnx file"))
            plan: Dict[str, List[VersionFolder]] = {}
            for name, versions in found.items():
                if name in self.core.models:
                    raise ValueError(f"model {name!r} of {self.root!r} is already served (a plan of the same name)")
                cands = self._candidates(name, versions, True, summary)
                wanted = self.policy.select(cands)
                if not wanted:
                    why = "; ".join(f"version {v}: {p}" for n, v, p in summary.pending if n == name)
                    raise ValueError(f"model {name!r} in {self._folder_of(name)!r} has no version that version policy "
                                     f"{self.policy} serves" + (f" ({why})" if why else
                                                                f"; versions found: {sorted(versions)}"))
                missing = {k: v for k, v in self.labels.items() if v not in wanted}
                if missing:
                    raise ValueError(f"model {name!r}: version labels {missing} name versions that are not served "
                                     f"(version policy {self.policy} serves {wanted})")
                self._warn_missing_specific(name, cands, summary)
                plan[name] = [cands[v] for v in wanted]
            for name, vfs in plan.items():
                self._managed[name] = self._folder_of(name)
                for vf in vfs:
                    assert vf.model_file is not None
                    mv = self.core.add_version(name, vf.version, vf.model_file)
                    self._registered.append((mv, vf))
            self._remember(found)
            self._register_gauge()
            for n, v, why in summary.pending:
                log.info("model folder: %s version %d not loaded: %s", n, v, why)
            return {n: [vf.version for vf in vfs] for n, vfs in plan.items()}

    def load_registered(self) -> SyncSummary:
        """Loads the versions :meth:`register` found (warm-up, ONNX compilation), then sets
        the labels; returns the summary (also in ``last_summary``)."""
        with self._lock:
            summary = SyncSummary()
            t0 = time.perf_counter()
            with _RssWatch() as mem:
                for mv, vf in self._registered:
                    if mv.state is VersionState.START:
                        self._load(mv, vf, summary, mem)
                self._registered = []
                self._apply_labels(summary, at_start=True)
            self._finish(summary, mem, t0)
            return summary

    def _folder_of(self, name: str) -> str:
        return self.root if self.model_name is not None else os.path.join(self.root, name)

    def _warn_missing_specific(self, name: str, cands: Mapping[int, Any], summary: SyncSummary) -> None:
        if self.policy.kind == "specific":
            missing = [v for v in self.policy.numbers if v not in cands]
            if missing:
                self._say(summary, f"model {name!r}: versions {missing} of version policy {self.policy} are not in "
                          f"{self._folder_of(name)!r} (or not complete)")

    def _register_gauge(self) -> None:
        core = self.core

        def loaded() -> float:
            with core._lock:
                return float(sum(v.available for e in core.models.values() for v in e.versions.values()))
        core.metrics.gauge("bfpaccel_model_versions_loaded", loaded)

    # -- loading ----------------------------------------------------------------------------------
    def _load(self, mv: ModelVersion, vf: VersionFolder, summary: SyncSummary, mem: _RssWatch) -> bool:
        mem.mark()
        t0 = time.perf_counter()
        what = load_with_warmup(self.core, mv, warmup=self.warmup, synthetic_warmup=self.synthetic_warmup,
                                warmup_file=vf.warmup_file, default_warmup_file=self.warmup_file,
                                onnx_format=self.onnx_format)
        dt = time.perf_counter() - t0
        key = (mv.name, mv.version)
        if mv.error is not None or not mv.available:
            self._failed[key] = vf.fingerprint
            summary.failed.append(FailedLoad(mv.name, mv.version, mv.path, mv.error or "not available", dt))
            return False
        self._failed.pop(key, None)
        peak = max(mem.since_mark(), mv.peak_rss_delta_bytes)
        summary.loaded.append(LoadReport(mv.name, mv.version, mv.path, dt, peak, what))
        return True

    def _load_new_model(self, name: str, vf: VersionFolder, summary: SyncSummary, mem: _RssWatch) -> bool:
        """A model that appeared while serving: loaded apart, added once AVAILABLE (so a new
        model loading or failing never makes the server unready)."""
        assert vf.model_file is not None
        mv = ModelVersion(name, vf.version, vf.model_file)
        if not self._load(mv, vf, summary, mem):
            return False
        with self.core._lock:
            taken = name in self.core.models
            if not taken:
                self.core.models[name] = ModelEntry(name, versions={mv.version: mv})
        if taken:  # a model of that name was added meanwhile by other means
            self._failed[(name, vf.version)] = vf.fingerprint
            summary.loaded.pop()
            summary.failed.append(FailedLoad(name, vf.version, mv.path, "a model of the same name is served"))
            return False
        self._managed[name] = self._folder_of(name)
        _notify(self.core)
        return True

    def _apply_labels(self, summary: SyncSummary, at_start: bool = False,
                      retiring: Optional[Mapping[str, Sequence[int]]] = None) -> None:
        if not self.labels:
            return
        for name in list(self._managed):
            entry = self.core.models.get(name)
            if entry is None:
                continue
            gone = set((retiring or {}).get(name, ()))
            ok = {k: v for k, v in self.labels.items()
                  if v in entry.versions and entry.versions[v].available and v not in gone}
            for k, v in self.labels.items():
                if k not in ok:
                    msg = f"model {name!r}: version label {k!r} names version {v}, which is not loaded"
                    if at_start:
                        summary.warnings.append(msg)
                        log.error("%s", msg)
                    else:
                        self._say(summary, msg + "; the label is left out")
            if ok != entry.labels:
                self.core.set_labels(name, ok)
            summary.labels[name] = ok

    # -- sync -------------------------------------------------------------------------------------
    def sync(self) -> SyncSummary:
        """Rescans the folder and applies the policy: loads (and warms up) new versions first,
        then unloads retired ones, so a swap never fails a request.  Returns (and logs, when
        something changed) the :class:`SyncSummary`; also kept in ``last_summary``."""
        with self._lock:
            summary = SyncSummary()
            if self.core.stopping:
                return summary
            t0 = time.perf_counter()
            found = self.scan()
            core = self.core
            to_load: List[Tuple[str, VersionFolder]] = []
            wanted_by: Dict[str, List[int]] = {}
            names = sorted(set(found) | set(self._managed))
            for name in names:
                versions = found.get(name, {})
                if name not in self._managed and name in core.models:
                    self._say(summary, f"model folder {os.path.join(self.root, name)!r} is not served: a plan of "
                              f"the same name is")
                    continue
                cands = self._candidates(name, versions, False, summary)
                wanted = self.policy.select(cands)
                if name in self._managed and not wanted:
                    self._say(summary, f"model {name!r}: no version to serve in {self._folder_of(name)!r}; the "
                              "loaded versions keep serving")
                    continue
                self._warn_missing_specific(name, cands, summary)
                wanted_by[name] = wanted
                entry = core.models.get(name)
                for v in sorted(wanted, reverse=True):  # the newest first: it takes the traffic first
                    mv = entry.versions.get(v) if entry is not None else None
                    if mv is not None and mv.state is not VersionState.END:
                        continue  # serving (or loading)
                    if self._failed.get((name, v)) == cands[v].fingerprint:
                        continue  # failed as it is: not retried until the folder changes
                    to_load.append((name, cands[v]))
            # failures whose folder is gone or changed are forgotten
            self._failed = {k: fp for k, fp in self._failed.items()
                            if k[0] in found and k[1] in found[k[0]] and found[k[0]][k[1]].fingerprint == fp}
            pending_by: Dict[str, set] = {}
            for n, v, why in summary.pending:
                pending_by.setdefault(n, set()).add(v)
                if (n, v, why) not in self._said:
                    self._said.add((n, v, why))
                    log.info("model folder: %s version %d not loaded yet: %s", n, v, why)
            retire = self._retirements(wanted_by, pending_by)
            self._remember(found)
            if not to_load and not any(retire.values()):
                self._apply_labels(summary, retiring=retire)
                self.last_summary = summary
                return summary
            with _RssWatch() as mem:
                for name, vf in to_load:
                    if core.stopping:
                        break
                    if name not in self._managed:
                        self._load_new_model(name, vf, summary, mem)
                        continue
                    assert vf.model_file is not None
                    self._load(core.add_version(name, vf.version, vf.model_file), vf, summary, mem)
                retire = self._retirements(wanted_by, pending_by)  # what the loads make redundant
                self._apply_labels(summary, retiring=retire)
                self._unload(retire, summary)
            self._finish(summary, mem, t0)
            return summary

    def _retirements(self, wanted_by: Mapping[str, Sequence[int]],
                     pending_by: Mapping[str, Iterable[int]]) -> Dict[str, List[int]]:
        """Versions to unload: AVAILABLE ones the policy no longer wants (as many of the newest
        kept as wanted versions are missing: availability first), and failed ones neither
        wanted nor pending on disk (their error is forgotten)."""
        out: Dict[str, List[int]] = {}
        for name, wanted in wanted_by.items():
            entry = self.core.models.get(name)
            if entry is None or name not in self._managed:
                continue
            serving = sorted(v for v, mv in entry.versions.items() if mv.available)
            keep = [v for v in serving if v in wanted]
            short = len(wanted) - len(keep)  # wanted versions not serving (loading, failed)
            extra = [v for v in serving if v not in wanted]
            keep += extra[len(extra) - short:] if short > 0 else []
            pending = set(pending_by.get(name, ()))
            dead = [v for v, mv in entry.versions.items()
                    if mv.state is VersionState.END and v not in wanted and v not in pending]
            out[name] = sorted(set(serving) - set(keep)) + sorted(dead)
        return out

    def _unload(self, retire: Mapping[str, Sequence[int]], summary: SyncSummary) -> None:
        core = self.core
        marked = []
        with core._lock:
            for name, versions in retire.items():
                entry = core.models.get(name)
                for v in versions:
                    mv = entry.versions.get(v) if entry is not None else None
                    if mv is None:
                        continue
                    if mv.available:
                        mv.state = VersionState.UNLOADING  # out of resolution from now on
                    marked.append((name, v, mv))
        if not marked:
            return
        _notify(core)
        if any(mv.inflight or mv.state is VersionState.UNLOADING for _, _, mv in marked) and self.drain_grace_s:
            time.sleep(self.drain_grace_s)  # requests that resolved it just before reach their model call
        for name, v, mv in marked:
            served = mv.state is not VersionState.END  # else a failed version: only forgotten
            try:
                core.unload_version(name, v, drain_timeout_s=self.drain_timeout_s)
            except KeyError:
                continue
            if served:
                summary.unloaded.append((name, v))
        del marked
        _release_freed_memory()

    def _finish(self, summary: SyncSummary, mem: _RssWatch, t0: float) -> None:
        summary.seconds = time.perf_counter() - t0
        summary.peak_rss_delta_bytes = mem.peak_delta
        summary.rss_delta_bytes = mem.end - mem.start
        self.last_summary = summary
        if summary.changed:
            (log.warning if summary.failed else log.info)("model folder %s: %s", self.root, summary)

    # -- polling ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts rescanning every ``poll_seconds`` in a daemon thread (nothing when 0)."""
        if self.poll_seconds <= 0 or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="bfpaccel-model-folder", daemon=True)
        self._thread.start()
        log.info("watching %s every %g s (version policy %s)", self.root, self.poll_seconds, self.policy)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            if self.core.stopping:
                return
            try:
                self.sync()
            except Exception:  # a bad scan never stops the watcher
                log.exception("model folder %s: rescan failed", self.root)

    def stop(self, timeout: float = 5.0) -> None:
        """Stops the polling thread (waits up to ``timeout`` s for a rescan in progress)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self._thread = None
