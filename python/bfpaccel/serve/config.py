"""Every option of the bfpaccel server, declared once.

:class:`ServerConfig` is a frozen dataclass: one field per server option, each carrying an
:class:`Option` in its metadata (command-line flag, help text, text -> value parser, value
check, the ``serve()`` keyword it feeds, whether it is secret or set per deployment).  From
that one declaration come:

- the flags of ``bfpaccel serve`` (:func:`add_server_arguments`) and the config from parsed
  flags (:meth:`ServerConfig.from_args`);
- the command line of a server subprocess or container (:meth:`ServerConfig.to_argv`; secrets
  never go there: keys travel as files, ``--auth-key-file``);
- the keywords of ``serve()`` (:meth:`ServerConfig.serve_kwargs`);
- the environment variables the server reads at run time (:func:`environment_variables`):
  ``$BFPACCEL_AUTH_KEY`` (accepted keys, one per line) and ``$BFPACCEL_REGISTRY`` (the
  ``--model`` registry folder).  They are read when the server starts, never baked into a
  config, so an argv written for a container does not carry the deploying machine's values.

Options are grouped: *per deployment* options (model sources, ports, TLS files, key files)
are what a deploy target fills in itself; the others are tunables a deploy command passes
through (``bfpaccel deploy kserve --threads 2 --batching``).

Example:
    >>> cfg = ServerConfig(plan=("resnet50.bfpplan",), port=8500, workers=4)
    >>> cfg.to_argv()
    ['--plan', 'resnet50.bfpplan', '--port', '8500', '--workers', '4']
    >>> cfg.serve_kwargs(environ={})["workers"]
    4
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "ServerConfig",
    "Option",
    "add_server_arguments",
    "server_options",
    "serve_keyword_flags",
    "environment_variables",
    "collect_auth_keys",
    "read_key_file",
    "parse_version_policy",
    "port_number",
    "AUTH_KEY_ENV",
    "REGISTRY_ENV",
    "MIB",
]

#: Accepted keys of ``serve`` (one per line), and the key of ``predict`` / ``loadtest``.
AUTH_KEY_ENV = "BFPACCEL_AUTH_KEY"
#: Registry folder of ``--model`` (default ``./bfpaccel-registry``).
REGISTRY_ENV = "BFPACCEL_REGISTRY"
MIB = 1024 * 1024
_INT64_MAX = 2 ** 63 - 1

# the server's own defaults (tests check they equal those of serve() and of the decoder)
_DEFAULT_MAX_MESSAGE_BYTES = 64 * MIB
_DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
_DEFAULT_MAX_RESIZE_PIXELS = 16 * 1024 * 1024


# ---------------------------------------------------------------------- value rules
def port_number(text: str) -> int:
    """argparse type of a TCP port: an integer in 0..65535."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: use an integer in 0..65535") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {v}: ports run from 0 to 65535")
    return v


def _parse_port(text: str) -> int:
    try:
        return port_number(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"invalid integer {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"invalid number {text!r}") from None


def _parse_mib(text: str) -> int:
    """MiB (a number, fractions allowed) -> bytes."""
    mib = _parse_float(text)
    if not math.isfinite(mib) or mib <= 0:
        raise ValueError(f"invalid size {text!r}: give a positive number of MiB")
    n = int(mib * MIB)
    if n < 1:
        raise ValueError(f"invalid size {text!r}: under one byte")
    return n


def _show_mib(n: Any) -> str:
    return repr(int(n) / MIB)  # exact: a division by a power of two (ints below 2**53)


def _parse_pixels(text: str) -> int:
    """A pixel limit (0 or less: no limit, which the field stores as None)."""
    return _parse_int(text)


def _show_pixels(v: Any) -> str:
    return "0" if v is None else str(int(v))


def _parse_int_list(text: str) -> Tuple[int, ...]:
    """``4,8`` -> (4, 8); an empty text is the empty list."""
    if not text.strip():
        return ()
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise ValueError(f"invalid list {text!r}: use comma-separated integers such as 4,8")
    return tuple(_parse_int(p) for p in parts)


def _show_int_list(v: Any) -> str:
    return ",".join(str(int(x)) for x in v)


_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _parse_label(text: str) -> Tuple[str, int]:
    label, sep, version = text.partition("=")
    if not sep or not label:
        raise ValueError(f"invalid version label {text!r}: use LABEL=VERSION, e.g. stable=3")
    return label, _parse_int(version)


def _show_label(v: Any) -> str:
    return f"{v[0]}={int(v[1])}"


def parse_version_policy(text: str) -> Tuple[str, Tuple[int, ...]]:
    """``latest[:N]`` | ``all`` | ``specific:V1,V2,...`` -> ``(kind, numbers)``: which versions
    under a model's folder are served (TF Serving's model version policy).

    Example:
        >>> parse_version_policy("latest:2"), parse_version_policy("all")
        (('latest', (2,)), ('all', ()))
        >>> parse_version_policy("specific:3,1")
        ('specific', (1, 3))
    """
    if not isinstance(text, str):
        raise ValueError(f"version policy must be a string, got {text!r}")
    kind, sep, rest = text.strip().partition(":")
    if kind == "all" and not sep:
        return "all", ()
    if kind == "latest":
        n = _parse_int(rest) if sep else 1
        if not 1 <= n <= 1_000_000:
            raise ValueError(f"invalid version policy {text!r}: latest:N needs N >= 1")
        return "latest", (n,)
    if kind == "specific" and sep and rest.strip():
        versions = _parse_int_list(rest)
        if any(not 1 <= v <= _INT64_MAX for v in versions):
            raise ValueError(f"invalid version policy {text!r}: versions are integers >= 1")
        if len(set(versions)) != len(versions):
            raise ValueError(f"invalid version policy {text!r}: a version is listed twice")
        return "specific", tuple(sorted(versions))
    raise ValueError(f"invalid version policy {text!r}: use latest:N, all or specific:V1,V2")


def _show_version_policy(kind: str, numbers: Sequence[int]) -> str:
    return kind if kind == "all" else f"{kind}:" + ",".join(str(n) for n in numbers)


# checks: value -> normalized value, ValueError (without the flag; the caller adds it)
Check = Callable[[Any], Any]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_check(lo: Optional[int] = None, hi: Optional[int] = None, optional: bool = False) -> Check:
    def check(v: Any) -> Any:
        if v is None and optional:
            return None
        if not _is_int(v):
            raise ValueError(f"must be an integer, got {v!r}")
        if lo is not None and v < lo:
            raise ValueError(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise ValueError(f"must be <= {hi}, got {v}")
        return int(v)
    return check


def _port_check(optional: bool = False) -> Check:
    def check(v: Any) -> Any:
        if v is None and optional:
            return None
        if not _is_int(v) or not 0 <= v <= 65535:
            raise ValueError(f"invalid port {v!r}: ports run from 0 to 65535")
        return int(v)
    return check


def _float_check(lo: float = 0.0, positive: bool = False) -> Check:
    def check(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v!r}")
        if v < lo or (positive and v <= lo):
            raise ValueError(f"must be {'>' if positive else '>='} {lo:g}, got {v!r}")
        return float(v)
    return check


def _str_check(optional: bool = False, no_slash: bool = False) -> Check:
    def check(v: Any) -> Any:
        if v is None and optional:
            return None
        if not isinstance(v, str) or not v:
            raise ValueError(f"must be a non-empty string, got {v!r}")
        if "\x00" in v:
            raise ValueError(f"must not contain a NUL character, got {v!r}")
        if no_slash and "/" in v:
            raise ValueError(f"must not contain '/', got {v!r}")
        return v
    return check


def _bool_check(v: Any) -> Any:
    if not isinstance(v, bool):
        raise ValueError(f"must be True or False, got {v!r}")
    return v


def _tuple_check(item: Check) -> Check:
    def check(v: Any) -> Any:
        if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
            raise ValueError(f"must be a sequence, got {v!r}")
        return tuple(item(x) for x in v)
    return check


def _pixels_check(v: Any) -> Any:
    if v is None:
        return None
    if not _is_int(v):
        raise ValueError(f"must be an integer (0 or less, or None: no limit), got {v!r}")
    return int(v) if v > 0 else None


def _batch_sizes_check(v: Any) -> Any:
    sizes = _tuple_check(_int_check(1, 1_000_000))(v)
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"lists a size twice: {sizes}")
    return tuple(sorted(sizes))


def _policy_check(v: Any) -> Any:
    return _show_version_policy(*parse_version_policy(v))


def _labels_check(v: Any) -> Any:
    items = list(v.items()) if isinstance(v, Mapping) else v
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise ValueError(f"must be LABEL=VERSION pairs, got {v!r}")
    out: List[Tuple[str, int]] = []
    for it in items:
        if not isinstance(it, (tuple, list)) or len(it) != 2:
            raise ValueError(f"must be (label, version) pairs, got {it!r}")
        label, version = it
        if not isinstance(label, str) or not _LABEL_RE.match(label):
            raise ValueError(f"invalid label {label!r}: letters, digits, '_', '.', '-'")
        if not _is_int(version) or not 1 <= version <= _INT64_MAX:
            raise ValueError(f"label {label!r}: the version must be an integer >= 1, got {version!r}")
        if any(label == o for o, _ in out):
            raise ValueError(f"label {label!r} is given twice")
        out.append((label, int(version)))
    return tuple(out)


# ---------------------------------------------------------------------- option metadata
@dataclass(frozen=True)
class Option:
    """How one :class:`ServerConfig` field appears on a command line and reaches ``serve()``.

    Attributes:
        flag: the command-line flag (``--workers``); its argparse dest is the flag without the
            dashes, ``-`` -> ``_`` (``--no-warmup`` -> ``no_warmup``).
        help: the ``--help`` text.
        kind: ``value`` (``--flag VALUE``), ``append`` (repeatable, a tuple), ``switch``
            (``--flag`` sets True) or ``negated`` (``--no-x`` sets the field False).
        parse: command-line text -> value (``value``/``append``; raises ValueError).
        show: value -> command-line text (the inverse of ``parse``, for :meth:`ServerConfig.to_argv`).
        check: validates and normalizes a field value (raises ValueError).
        metavar: the value's name in ``--help``.
        serve_key: the ``serve()`` keyword fed by this field; None: used by the command line
            only (model sources, ``--grace``, ``--quiet``).
        secret: never written to a command line (:meth:`ServerConfig.to_argv` refuses it).
        per_deployment: filled in by a deploy target (sources, addresses, TLS and key files),
            not passed through from a deploy command's flags.
        hidden: a test/demo flag, left out of ``--help``.
        env: an environment variable the server reads at run time for this option.
        group: the ``--help`` section.
    """

    flag: str
    help: str
    kind: str = "value"
    parse: Optional[Callable[[str], Any]] = None
    show: Callable[[Any], str] = str
    check: Optional[Check] = None
    metavar: Optional[str] = None
    serve_key: Optional[str] = None
    secret: bool = False
    per_deployment: bool = False
    hidden: bool = False
    env: Optional[str] = None
    group: str = "server"

    @property
    def dest(self) -> str:
        """The argparse attribute of the flag."""
        return self.flag.lstrip("-").replace("-", "_")


_SOURCES = "model sources"
_VERSIONS = "model versions and warm-up"
_NETWORK = "network, TLS and keys"
_LIMITS = "request limits"
_EXEC = "execution and batching"
_PROCESS = "process"


_KEY = "__same__"  # serve_key placeholder: the serve() keyword is the field's own name


def _opt(default: Any, flag: str, help: str, **kw: Any) -> Any:
    """A dataclass field (immutable default) carrying its :class:`Option`."""
    return field(default=default, metadata={"option": Option(flag, help, **kw)})


@dataclass(frozen=True)
class ServerConfig:
    """Every option of ``bfpaccel serve``, validated on construction (ValueError naming the
    flag).  Frozen and comparable; build variants with ``dataclasses.replace``.

    Example:
        >>> ServerConfig(workers=0)
        Traceback (most recent call last):
        ...
        ValueError: --workers: must be >= 1, got 0
    """

    # -- model sources (the command line turns them into serve()'s plans)
    plan: Tuple[str, ...] = _opt((), "--plan", "plan file; repeat for several services on one port, routed by name",
                                 kind="append", parse=str, check=_tuple_check(_str_check()), metavar="[NAME=]PATH",
                                 serve_key=None, per_deployment=True, group=_SOURCES)
    model: Tuple[str, ...] = _opt((), "--model", "a registered model (a converted .onnx or a .bfpplan) served by "
                                  "name; repeatable; ONNX models are compiled to --format once and cached in the "
                                  "registry folder", kind="append", parse=str, check=_tuple_check(_str_check()),
                                  metavar="NAME[:VERSION]", serve_key=None, per_deployment=True, group=_SOURCES)
    registry: Optional[str] = _opt(None, "--registry", f"registry folder for --model (default ${REGISTRY_ENV} or "
                                   "./bfpaccel-registry)", parse=str, check=_str_check(optional=True), metavar="DIR",
                                   serve_key=None, per_deployment=True, env=REGISTRY_ENV, group=_SOURCES)
    format: str = _opt("msfp16", "--format", "BFP format when compiling a registered ONNX (msfp16)", parse=str,
                       check=_str_check(), serve_key=None, per_deployment=True, group=_SOURCES)
    name: Optional[str] = _opt(None, "--name", "service (route) name of a single --plan (default: file stem)",
                               parse=str, check=_str_check(optional=True, no_slash=True), serve_key=None,
                               per_deployment=True, group=_SOURCES)
    model_root: Optional[str] = _opt(None, "--model-root", "folder of models laid out as <root>/<name>/<version>/ "
                                     "(TF Serving's model base path); with --model-name, the folder of that one "
                                     "model (its plan, or its version folders), as KServe mounts /mnt/models",
                                     parse=str, check=_str_check(optional=True), metavar="DIR", serve_key=_KEY,
                                     per_deployment=True, group=_SOURCES)
    model_name: Optional[str] = _opt(None, "--model-name", "serve --model-root as the single model NAME",
                                     parse=str, check=_str_check(optional=True, no_slash=True), metavar="NAME",
                                     serve_key=_KEY, per_deployment=True, group=_SOURCES)
    # -- versions and warm-up
    version_policy: str = _opt("latest:1", "--version-policy", "versions served from a model's folder: latest:N "
                               "(the N highest), all, or specific:V1,V2 (default latest:1)", parse=str,
                               check=_policy_check, metavar="POLICY", serve_key=_KEY, group=_VERSIONS)
    version_labels: Tuple[Tuple[str, int], ...] = _opt(
        (), "--version-label", "name a served version (TF Serving version_label), e.g. stable=3; repeatable",
        kind="append", parse=_parse_label, show=_show_label, check=_labels_check, metavar="LABEL=VERSION",
        serve_key=_KEY, group=_VERSIONS)
    poll_seconds: float = _opt(0.0, "--poll-seconds", "seconds between scans of --model-root for new or removed "
                               "versions (0: scan once at start; default 0)", parse=_parse_float, show=repr,
                               check=_float_check(0.0), metavar="S", serve_key=_KEY, group=_VERSIONS)
    warmup_file: Optional[str] = _opt(None, "--warmup-file", "TF Serving warm-up records (PredictionLog TFRecord) "
                                      "to replay on every loaded version (default: each version's own "
                                      "assets.extra/tf_serving_warmup_requests when present)", parse=str,
                                      check=_str_check(optional=True), metavar="FILE", serve_key=_KEY,
                                      per_deployment=True, group=_VERSIONS)
    synthetic_warmup: int = _opt(1, "--synthetic-warmup", "synthetic warm-up calls per loaded version when it has "
                                 "no warm-up records (default 1; 0: none)", parse=_parse_int,
                                 check=_int_check(0, 10_000), metavar="N", serve_key=_KEY, group=_VERSIONS)
    warmup: bool = _opt(True, "--no-warmup", "skip every warm-up call", kind="negated", check=_bool_check,
                        serve_key=_KEY, group=_VERSIONS)
    warmup_delay_s: float = _opt(0.0, "--warmup-delay", "extra seconds of UNAVAILABLE at start (tests)",
                                 parse=_parse_float, show=repr, check=_float_check(0.0), serve_key=_KEY,
                                 hidden=True, group=_VERSIONS)
    # -- network
    host: str = _opt("127.0.0.1", "--host", "interface (default 127.0.0.1; 0.0.0.0 for all)", parse=str, metavar="HOST",
                     check=_str_check(), serve_key=_KEY, per_deployment=True, group=_NETWORK)
    port: int = _opt(50051, "--port", "gRPC port (default 50051; 0: any free port)", parse=_parse_port,
                     check=_port_check(), serve_key=_KEY, per_deployment=True, group=_NETWORK)
    http_port: Optional[int] = _opt(None, "--http-port", "HTTP port of the REST faces (TF Serving REST and KServe "
                                    "v2 REST on one port; default: off; 0: any free port)", parse=_parse_port,
                                    check=_port_check(optional=True), metavar="PORT", serve_key=_KEY,
                                    per_deployment=True, group=_NETWORK)
    metrics_port: Optional[int] = _opt(None, "--metrics-port", "Prometheus metrics at :PORT/metrics",
                                       parse=_parse_port, metavar="PORT", check=_port_check(optional=True),
                                       serve_key=_KEY,
                                       per_deployment=True, group=_NETWORK)
    tls_cert: Optional[str] = _opt(None, "--tls-cert", "PEM certificate chain (TLS on)", parse=str, metavar="PEM",
                                   check=_str_check(optional=True), serve_key=_KEY, per_deployment=True,
                                   group=_NETWORK)
    tls_key: Optional[str] = _opt(None, "--tls-key", "PEM private key", parse=str, check=_str_check(optional=True),
                                  metavar="PEM",
                                  serve_key=_KEY, per_deployment=True, group=_NETWORK)
    auth_key_files: Tuple[str, ...] = _opt((), "--auth-key-file", "file of accepted keys, one per line "
                                           f"(repeatable): auth on. The keys can also come from ${AUTH_KEY_ENV} "
                                           "(one per line)", kind="append", parse=str,
                                           check=_tuple_check(_str_check()), metavar="FILE", serve_key="auth_keys",
                                           per_deployment=True, group=_NETWORK)
    auth_keys: Tuple[str, ...] = _opt((), "--auth-key", "accepted key (repeatable): auth on. Deprecated: other local "
                                      f"users can read a command line; use --auth-key-file or ${AUTH_KEY_ENV}",
                                      kind="append", parse=str, check=_tuple_check(_str_check()), metavar="K",
                                      serve_key="auth_keys", secret=True, per_deployment=True, env=AUTH_KEY_ENV,
                                      group=_NETWORK)
    reflection: bool = _opt(True, "--no-reflection", "no gRPC server reflection", kind="negated",
                            check=_bool_check, serve_key=_KEY, group=_NETWORK)
    health: bool = _opt(True, "--no-health", "no grpc.health.v1.Health service", kind="negated",
                        check=_bool_check, serve_key=_KEY, group=_NETWORK)
    # -- limits
    max_message_bytes: int = _opt(_DEFAULT_MAX_MESSAGE_BYTES, "--max-message-mb", "largest gRPC request/response "
                                  "(MiB, default 64)", parse=_parse_mib, show=_show_mib,
                                  check=_int_check(1, 2 ** 31 - 1),
                                  metavar="MIB", serve_key=_KEY, group=_LIMITS)
    max_body_bytes: Optional[int] = _opt(None, "--max-body-mb", "largest HTTP request body (MiB, default: "
                                         "--max-message-mb); over it: 413", parse=_parse_mib, show=_show_mib,
                                         check=_int_check(1, _INT64_MAX, optional=True), metavar="MIB",
                                         serve_key=_KEY, group=_LIMITS)
    max_header_bytes: int = _opt(65536, "--max-header-bytes", "largest HTTP request head (request line and "
                                 "headers, default 65536); over it: 431", parse=_parse_int,
                                 check=_int_check(1024, 16 * MIB), metavar="N", serve_key=_KEY, group=_LIMITS)
    max_connections: int = _opt(256, "--max-connections", "open HTTP connections at most (default 256); more "
                                "wait to be accepted", parse=_parse_int, check=_int_check(1, 1_000_000),
                                metavar="N", serve_key=_KEY, group=_LIMITS)
    body_timeout_s: float = _opt(30.0, "--body-timeout-s", "seconds an HTTP client has to send a request head, "
                                 "and then its whole body (default 30); later: 408 and the connection closed",
                                 parse=_parse_float, show=repr, check=_float_check(0.0, positive=True), metavar="S",
                                 serve_key=_KEY, group=_LIMITS)
    max_image_pixels: Optional[int] = _opt(_DEFAULT_MAX_IMAGE_PIXELS, "--max-image-pixels", "largest declared width "
                                           "x height of an encoded image, checked from its header before decoding "
                                           "(default 67108864 = 8192x8192; 0: no limit); over it: INVALID_ARGUMENT",
                                           parse=_parse_pixels, show=_show_pixels, check=_pixels_check,
                                           metavar="N", serve_key=_KEY, group=_LIMITS)
    max_resize_pixels: Optional[int] = _opt(_DEFAULT_MAX_RESIZE_PIXELS, "--max-resize-pixels", "largest full size "
                                            "of the seed's resize before its crop (default 16777216: aspect ratios "
                                            "up to 256:1; 0: no limit)", parse=_parse_pixels, show=_show_pixels,
                                            check=_pixels_check, metavar="N", serve_key=_KEY, group=_LIMITS)
    max_batch: int = _opt(64, "--max-request-batch", "most images (or rows) in one request (default 64)",
                          parse=_parse_int, check=_int_check(1, 1_000_000), metavar="N", serve_key=_KEY,
                          group=_LIMITS)
    # -- execution and batching
    workers: int = _opt(2, "--workers", "model instances per plan (default 2)", parse=_parse_int,
                        check=_int_check(1, 4096), metavar="N", serve_key=_KEY, group=_EXEC)
    queue_size: int = _opt(64, "--queue-size", "requests waiting before RESOURCE_EXHAUSTED (default 64)",
                           parse=_parse_int, check=_int_check(0, 1_000_000), metavar="N", serve_key=_KEY, group=_EXEC)
    num_threads: Optional[int] = _opt(None, "--threads", "threads of the C++ core for each loaded model's session "
                                      "(default: the process setting, $BFPACCEL_NUM_THREADS or all CPUs)",
                                      parse=_parse_int, check=_int_check(1, 4096, optional=True), metavar="N",
                                      serve_key=_KEY, env="BFPACCEL_NUM_THREADS", group=_EXEC)
    kernel: Optional[str] = _opt(None, "--kernel", "kernel of each loaded model's session: one of `bfpaccel info`'s "
                                 "available kernels (default: the fastest, or $BFPACCEL_KERNEL)", parse=str,
                                 check=_str_check(optional=True), metavar="NAME", serve_key=_KEY,
                                 env="BFPACCEL_KERNEL", group=_EXEC)
    batching: bool = _opt(False, "--batching", "dynamic batching: merge concurrent requests of a model into one "
                          "call", kind="switch", check=_bool_check, serve_key=_KEY, group=_EXEC)
    max_batch_size: int = _opt(8, "--max-batch-size", "rows of one merged call with --batching (default 8)",
                               parse=_parse_int, check=_int_check(1, 1_000_000), metavar="N", serve_key=_KEY,
                               group=_EXEC)
    batch_timeout_ms: float = _opt(2.0, "--batch-timeout-ms", "longest wait for more requests before a merged "
                                   "call runs (default 2.0)", parse=_parse_float, show=repr,
                                   check=_float_check(0.0), metavar="MS", serve_key=_KEY, group=_EXEC)
    preferred_batch_sizes: Tuple[int, ...] = _opt((), "--preferred-batch-sizes", "batch sizes a merged call is cut "
                                                  "to when it can be (e.g. 4,8; each <= --max-batch-size)",
                                                  parse=_parse_int_list, show=_show_int_list,
                                                  check=_batch_sizes_check, metavar="N,N", serve_key=_KEY,
                                                  group=_EXEC)
    simulated_latency_ms: float = _opt(0.0, "--simulated-latency-ms", "added to each model call (tests, demos)",
                                       parse=_parse_float, show=repr, check=_float_check(0.0), serve_key=_KEY,
                                       hidden=True, group=_EXEC)
    # -- process
    grace: float = _opt(30.0, "--grace", "seconds to drain in-flight requests on SIGTERM (default 30)",
                        parse=_parse_float, show=repr, check=_float_check(0.0), metavar="S", serve_key=None,
                        group=_PROCESS)
    quiet: bool = _opt(False, "--quiet", "no access log", kind="switch", check=_bool_check, serve_key=None,
                       group=_PROCESS)

    def __post_init__(self) -> None:
        for f in fields(self):
            opt: Option = f.metadata["option"]
            if opt.check is not None:
                try:
                    value = opt.check(getattr(self, f.name))
                except ValueError as e:
                    raise ValueError(f"{opt.flag}: {e}") from None
                object.__setattr__(self, f.name, value)  # normalized (tuples, sorted lists, ...)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key: give both (TLS on) or neither")
        ports = [(flag, p) for flag, p in (("--port", self.port), ("--http-port", self.http_port),
                                           ("--metrics-port", self.metrics_port)) if p]
        for i, (f1, p1) in enumerate(ports):
            for f2, p2 in ports[i + 1:]:
                if p1 == p2:
                    raise ValueError(f"{f1} and {f2} are both {p1}: each listener needs its own port")
        if self.model_name is not None and self.model_root is None:
            raise ValueError("--model-name names the single model under --model-root: give --model-root DIR too")
        too_big = [n for n in self.preferred_batch_sizes if n > self.max_batch_size]
        if too_big:
            raise ValueError(f"--preferred-batch-sizes: {too_big} over --max-batch-size {self.max_batch_size}")
        kind, versions = parse_version_policy(self.version_policy)
        if kind == "specific":
            for label, v in self.version_labels:
                if v not in versions:
                    raise ValueError(f"--version-label {label}={v}: version {v} is not served by "
                                     f"--version-policy {self.version_policy}")

    # ------------------------------------------------------------------ command lines
    @classmethod
    def from_args(cls, ns: argparse.Namespace, per_deployment: bool = True,
                  exclude: Iterable[str] = ()) -> "ServerConfig":
        """The config of flags parsed by a parser that :func:`add_server_arguments` filled
        (give the same ``per_deployment`` and ``exclude``: the namespace's other attributes,
        e.g. a deploy command's own ``--name``, are then not read).  An option that was not
        given keeps its default.  Raises ValueError on inconsistent options (e.g.
        ``--tls-cert`` without ``--tls-key``)."""
        kw: Dict[str, Any] = {}
        skip = set(exclude)
        for name, opt in server_options(None if per_deployment else False):
            if name in skip:
                continue
            value = getattr(ns, opt.dest, None)
            if value is None:
                continue
            if opt.kind == "negated":
                if value:
                    kw[name] = False
            elif opt.kind == "switch":
                kw[name] = bool(value)
            elif opt.kind == "append":
                kw[name] = tuple(value)
            else:
                kw[name] = value
        return cls(**kw)

    def to_argv(self, always: Iterable[str] = ()) -> List[str]:
        """The command-line flags that make ``bfpaccel serve`` run with this config.

        Options at their default value are left out, except the fields named in ``always``
        (to spell a value out even when it is the default).  A value starting with ``-`` is
        written ``--flag=VALUE``.  Raises ValueError if a secret option is set: keys never go
        on a command line (any local user can read it); give them as ``auth_key_files``.

        Example:
            >>> ServerConfig(batching=True, preferred_batch_sizes=(8, 4)).to_argv()
            ['--batching', '--preferred-batch-sizes', '4,8']
        """
        always = set(always)
        unknown = always - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"to_argv(always=...): no such options {sorted(unknown)}")
        argv: List[str] = []
        for f in fields(self):
            opt: Option = f.metadata["option"]
            value = getattr(self, f.name)
            if opt.secret:
                if value:
                    raise ValueError(f"{opt.flag} puts a secret on the command line, where every local user can "
                                     "read it: write the keys to a file (mode 0600) and give auth_key_files")
                continue
            if value == _default(f) and f.name not in always:
                continue
            if opt.kind == "switch":
                argv += [opt.flag] if value else []
            elif opt.kind == "negated":
                argv += [] if value else [opt.flag]
            elif opt.kind == "append":
                for item in value:
                    argv += _flag_value(opt.flag, opt.show(item))
            elif value is not None or opt.show is _show_pixels:
                argv += _flag_value(opt.flag, opt.show(value))
        return argv

    # ------------------------------------------------------------------ serve()
    def serve_kwargs(self, environ: Optional[Mapping[str, str]] = None, warn: bool = True) -> Dict[str, Any]:
        """Keyword arguments of ``serve()`` (model sources excluded: the command line turns
        ``plan``/``model`` into serve()'s first argument).

        ``auth_keys`` gathers the keys of ``auth_key_files`` (files are read here),
        ``$BFPACCEL_AUTH_KEY`` from ``environ`` (default ``os.environ``) and ``auth_keys``; None
        when there is none.  ``version_labels`` becomes a dict.  Every declared keyword is
        present: :func:`bfpaccel.serve.cli.keywords_serve_accepts` drops those an older
        ``serve()`` lacks."""
        out: Dict[str, Any] = {}
        for f in fields(self):
            opt: Option = f.metadata["option"]
            key = _serve_key(f.name, opt)
            if key is None or key == "auth_keys":
                continue
            value = getattr(self, f.name)
            out[key] = dict(value) if f.name == "version_labels" else value
        keys = collect_auth_keys(self.auth_key_files, self.auth_keys,
                                 os.environ if environ is None else environ, warn=warn)
        out["auth_keys"] = keys or None
        return out

    @classmethod
    def serve_defaults(cls) -> Dict[str, Any]:
        """``serve()`` keyword -> the value :meth:`serve_kwargs` gives it by default."""
        out: Dict[str, Any] = {}
        for f in fields(cls):
            key = _serve_key(f.name, f.metadata["option"])
            if key is not None:
                d = _default(f)
                out[key] = dict(d) if f.name == "version_labels" else d
        out["auth_keys"] = None
        return out

    def check_files(self) -> None:
        """Raise FileNotFoundError naming the flag when a file or folder option names
        nothing (checked where the server runs, not where a deployment is written)."""
        for flag, path, want_dir in (("--tls-cert", self.tls_cert, False), ("--tls-key", self.tls_key, False),
                                     ("--model-root", self.model_root, True),
                                     ("--warmup-file", self.warmup_file, False),
                                     *(("--auth-key-file", p, False) for p in self.auth_key_files)):
            if path is None:
                continue
            if want_dir and not os.path.isdir(path):
                raise FileNotFoundError(f"{flag} {path}: no such folder")
            if not want_dir and not os.path.isfile(path):
                raise FileNotFoundError(f"{flag} {path}: no such file")

    def registry_path(self, environ: Optional[Mapping[str, str]] = None) -> str:
        """The ``--model`` registry folder: ``registry``, else ``$BFPACCEL_REGISTRY``, else
        ``bfpaccel-registry``."""
        env = os.environ if environ is None else environ
        return self.registry or env.get(REGISTRY_ENV) or "bfpaccel-registry"


def _serve_key(name: str, opt: Option) -> Optional[str]:
    return name if opt.serve_key == _KEY else opt.serve_key


def _default(f: Any) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory()


def _flag_value(flag: str, text: str) -> List[str]:
    return [f"{flag}={text}"] if text.startswith("-") else [flag, text]


# ---------------------------------------------------------------------- generated parsers
def server_options(per_deployment: Optional[bool] = None) -> List[Tuple[str, Option]]:
    """(field name, :class:`Option`) of every server option in declaration order;
    ``per_deployment`` True/False keeps only those that are / are not set per deployment."""
    return [(f.name, f.metadata["option"]) for f in fields(ServerConfig)
            if per_deployment is None or f.metadata["option"].per_deployment == per_deployment]


def _argparse_type(name: str, opt: Option) -> Callable[[str], Any]:
    """argparse ``type=``: the parsed value, rejected at once (a usage error naming the flag)
    when the option's check refuses it.  The value is returned as parsed (the config
    normalizes it), so e.g. ``--max-image-pixels 0`` reads 0 here and None in the config."""
    assert opt.parse is not None
    parse = opt.parse
    check = opt.check
    append = opt.kind == "append"

    def convert(text: str) -> Any:
        try:
            value = parse(text)
            if check is not None:
                check((value,) if append else value)  # an item of a list: checked as a list of one
            return value
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name  # argparse names the type in some messages
    return convert


def add_server_arguments(parser: argparse.ArgumentParser, per_deployment: bool = True,
                         exclude: Iterable[str] = ()) -> None:
    """Add the server's flags to ``parser`` (grouped as in ``--help``); read them back with
    :meth:`ServerConfig.from_args`.  ``per_deployment=False`` leaves out the options a deploy
    target sets itself (sources, ports, TLS and key files); ``exclude``: field names to leave
    out.  Every flag defaults to None (= not given; :meth:`ServerConfig.from_args` then uses
    the field's default).

    Example:
        >>> p = argparse.ArgumentParser(); add_server_arguments(p)
        >>> ServerConfig.from_args(p.parse_args(["--plan", "m.bfpplan", "--threads", "2"])).num_threads
        2
    """
    skip = set(exclude)
    groups: Dict[str, Any] = {}
    for name, opt in server_options(None if per_deployment else False):
        if name in skip:
            continue
        if opt.group not in groups:
            groups[opt.group] = parser.add_argument_group(opt.group)
        g = groups[opt.group]
        text = argparse.SUPPRESS if opt.hidden else opt.help
        if opt.kind in ("switch", "negated"):
            g.add_argument(opt.flag, action="store_true", default=None, help=text)
        elif opt.kind == "append":
            g.add_argument(opt.flag, action="append", default=None, type=_argparse_type(name, opt),
                           metavar=opt.metavar, help=text)
        else:
            g.add_argument(opt.flag, default=None, type=_argparse_type(name, opt), metavar=opt.metavar, help=text)


def serve_keyword_flags() -> Dict[str, str]:
    """``serve()`` keyword -> the flag that sets it (the first one, for ``auth_keys``).

    Example:
        >>> serve_keyword_flags()["num_threads"], serve_keyword_flags()["auth_keys"]
        ('--threads', '--auth-key-file')
    """
    out: Dict[str, str] = {}
    for name, opt in server_options():
        key = _serve_key(name, opt)
        if key is not None:
            out.setdefault(key, opt.flag)
    return out


def environment_variables() -> Dict[str, str]:
    """Environment variable -> the flag whose value it supplies when that flag is not given
    (read by the server process at run time).

    Example:
        >>> environment_variables()["BFPACCEL_AUTH_KEY"]
        '--auth-key'
    """
    return {opt.env: opt.flag for _, opt in server_options() if opt.env}


# ---------------------------------------------------------------------- keys
def read_key_file(path: str) -> List[str]:
    """The keys in a key file: one per line, blank lines ignored. Warns (stderr) when other
    users may read it."""
    import stat

    with open(path) as f:
        keys = [line.strip() for line in f if line.strip()]
    if not keys:
        raise ValueError(f"key file {path} holds no key")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        print(f"bfpaccel: warning: key file {path} can be read by other users (mode {mode:o}): chmod 600 {path}",
              file=sys.stderr)
    return keys


def collect_auth_keys(files: Sequence[str], flag_keys: Sequence[str], environ: Mapping[str, str],
                      warn: bool = True) -> List[str]:
    """The accepted keys of a server: those of each key file, of ``$BFPACCEL_AUTH_KEY`` (one
    per line) and of ``--auth-key`` (with a warning: a command line is visible to every local
    user), in that order, duplicates dropped."""
    keys: List[str] = []
    for path in files:
        keys += read_key_file(path)
    keys += [k.strip() for k in environ.get(AUTH_KEY_ENV, "").splitlines() if k.strip()]
    if flag_keys:
        if warn:
            print(f"bfpaccel: warning: --auth-key puts the key on the command line, where every local user can "
                  f"read it (ps, /proc/PID/cmdline); use --auth-key-file FILE or the {AUTH_KEY_ENV} environment "
                  "variable", file=sys.stderr)
        keys += [k for k in flag_keys if k]
    return list(dict.fromkeys(keys))
