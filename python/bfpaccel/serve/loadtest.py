"""``bfpaccel loadtest``: load-tests a running scoring service.

Modes:

* ``closed`` (the default): C concurrent clients each send the next request as soon as the
  previous one is answered, for S seconds (:func:`run`);
* ``fixed`` / ``poisson``: open loop at ``--rate`` QPS, fixed intervals or Poisson arrivals;
  latency from the scheduled and from the actual send time, arrivals that find
  ``--max-inflight`` requests in flight counted as dropped (:mod:`bfpaccel.serve.loadgen`);
* ``--search-p99-ms BOUND``: the highest Poisson rate whose p99 stays under the bound
  (MLPerf's Server scenario; :func:`bfpaccel.serve.loadgen.search_p99`).

The protocol is pluggable (``--protocol``, :mod:`bfpaccel.serve.senders`); ``--metrics-url``
adds the server's queue/compute split (:mod:`bfpaccel.serve.promscrape`); ``--json PATH`` and
``--png PATH`` write the full result and a chart (:mod:`bfpaccel.serve.loadplot`).

Example:
    >>> r = run("127.0.0.1", 50051, "cat.jpg", concurrency=4, duration=10)  # doctest: +SKIP
    >>> print(r.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import threading
import time
from array import array
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from .loadgen import ARRIVALS, Percentiles, SearchResult, StepResult, run_open, search_p99
from .senders import OK, SENDERS, Payload, Sender, Target, make_sender

__all__ = ["LoadTestReport", "run", "run_closed", "add_loadtest_parser", "run_loadtest", "result_document",
           "host_info", "MODES"]

#: ``--mode`` choices.
MODES: Tuple[str, ...] = ("closed",) + ARRIVALS


@dataclass
class LoadTestReport:
    """What a closed-loop load test measured (latencies in ms, client side, successful calls only)."""

    requests: int
    ok: int
    errors: Dict[str, int]
    duration_s: float
    qps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    concurrency: int
    latencies_ms: List[float] = field(default_factory=list, repr=False)
    #: per request, for charts: send and end time (s from the start, in send order) and success
    send_s: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    end_s: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    ok_mask: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)

    def summary(self) -> str:
        """One human-readable paragraph."""
        errs = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        return (f"{self.requests} requests in {self.duration_s:.1f} s with {self.concurrency} clients: "
                f"{self.qps:.1f} QPS (ok), latency p50 {self.p50_ms:.2f} ms, p90 {self.p90_ms:.2f} ms, "
                f"p99 {self.p99_ms:.2f} ms; errors: {errs}")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict without the raw latencies."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("latencies_ms", "send_s", "end_s", "ok_mask")}

    def to_step(self) -> StepResult:
        """The run as a :class:`~bfpaccel.serve.loadgen.StepResult` (mode ``closed``: no schedule,
        so latency from schedule and from send are the same)."""
        lat = Percentiles.of(np.asarray(self.latencies_ms, dtype=np.float64))
        return StepResult(mode="closed", target_qps=None, schedule_s=self.duration_s, elapsed_s=self.duration_s,
                          scheduled=self.requests, sent=self.requests, ok=self.ok, errors=dict(self.errors),
                          dropped=0, offered_qps=self.requests / self.duration_s if self.duration_s else 0.0,
                          achieved_qps=self.qps, latency=lat, service_latency=lat, send_lag=Percentiles.of(np.zeros(0)),
                          concurrency=self.concurrency, sched_s=self.send_s, send_s=self.send_s, end_s=self.end_s,
                          ok_mask=self.ok_mask)


def run_closed(make_sender_fn: Callable[[], Sender], payload: Payload, concurrency: int = 4, duration: float = 10.0,
               warmup_requests: int = 1) -> LoadTestReport:
    """Closed loop: ``concurrency`` threads, each with its own sender (connection), send
    ``payload`` back to back for ``duration`` s; ``warmup_requests`` per thread first.

    Example:
        >>> t = Target("127.0.0.1", 50051)  # doctest: +SKIP
        >>> run_closed(lambda: make_sender("tfs-grpc", t), Payload(image=jpeg), 8, 30).qps  # doctest: +SKIP
    """
    if not isinstance(concurrency, int) or concurrency < 1 or not duration > 0:
        raise ValueError("concurrency must be >= 1 and duration > 0")
    senders: List[Sender] = []
    try:  # errors (a missing package, a bad option) surface here, in the caller's thread
        for _ in range(concurrency):
            senders.append(make_sender_fn())
    except BaseException:
        for s in senders:
            s.close()
        raise
    lock = threading.Lock()
    lat: List[float] = []
    sends, ends, oks = array("d"), array("d"), bytearray()  # 17 bytes a request
    errors: Dict[str, int] = {}
    warm = threading.Barrier(concurrency + 1)  # the clock starts once every client is warm
    failures: List[BaseException] = []
    start_evt = threading.Event()
    clock = [0.0, 0.0]  # start, stop

    def worker(sender: Sender) -> None:
        mine: List[float] = []
        my_send, my_end, my_ok = array("d"), array("d"), bytearray()
        errs: Dict[str, int] = {}
        try:
            try:
                send = sender.prepare(payload)
                for _ in range(warmup_requests):
                    send()
            except Exception as e:  # re-raised by the caller's thread, not printed from this one
                failures.append(e)
                warm.abort()
                return
            try:
                warm.wait()
            except threading.BrokenBarrierError:
                return
            start_evt.wait()
            while True:
                t0 = time.perf_counter()
                if t0 >= clock[1]:
                    break
                code = send()
                t1 = time.perf_counter()
                my_send.append(t0 - clock[0])
                my_end.append(t1 - clock[0])
                my_ok.append(code == OK)
                if code == OK:
                    mine.append((t1 - t0) * 1000)
                else:
                    errs[code] = errs.get(code, 0) + 1
        finally:
            sender.close()
            with lock:
                lat.extend(mine)
                sends.extend(my_send)
                ends.extend(my_end)
                oks.extend(my_ok)
                for k, v in errs.items():
                    errors[k] = errors.get(k, 0) + v

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in senders]
    for t in threads:
        t.start()
    try:
        warm.wait()
    except threading.BrokenBarrierError:
        for t in threads:
            t.join()
        raise failures[0] if failures else RuntimeError("a load-test client failed while warming up")
    t_start = time.perf_counter()
    clock[0], clock[1] = t_start, t_start + duration
    start_evt.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    a = np.array(lat) if lat else np.array([np.nan])
    pct = lambda q: float(np.percentile(a, q)) if lat else float("nan")  # noqa: E731
    order = np.argsort(np.frombuffer(sends, dtype=np.float64), kind="stable")
    return LoadTestReport(requests=len(lat) + sum(errors.values()), ok=len(lat), errors=errors, duration_s=elapsed,
                          qps=len(lat) / elapsed, p50_ms=pct(50), p90_ms=pct(90), p99_ms=pct(99),
                          mean_ms=float(np.mean(a)) if lat else float("nan"), concurrency=concurrency,
                          latencies_ms=lat, send_s=np.frombuffer(sends, dtype=np.float64)[order],
                          end_s=np.frombuffer(ends, dtype=np.float64)[order],
                          ok_mask=np.frombuffer(bytes(oks), dtype=np.uint8)[order].astype(bool))


def run(address: str, port: int, image_path: Optional[str], concurrency: int = 4, duration: float = 10.0, *,
        service_name: str = "", access_token: str = "", use_ssl: bool = False, input_name: str = "images",
        root_certificates: Optional[Union[bytes, str]] = None, target_name_override: Optional[str] = None,
        timeout: float = 10.0, warmup_requests: int = 1, protocol: str = "tfs-grpc", model_name: str = "",
        payload: Optional[Payload] = None) -> LoadTestReport:
    """Runs ``concurrency`` clients (threads, one connection each) in a closed loop for ``duration`` s.

    By default each request is what the seed's ``score_file`` sends (TF Serving gRPC, DT_STRING
    [1] under ``input_name``); ``protocol`` picks another face (:data:`~bfpaccel.serve.senders.SENDERS`)
    and ``payload`` another request body (then ``image_path`` may be None).  No retries, so
    every error is counted by its status code.

    Example:
        >>> run("127.0.0.1", 50051, "cat.jpg", 8, 30).qps  # doctest: +SKIP
    """
    if concurrency < 1 or duration <= 0:
        raise ValueError("concurrency must be >= 1 and duration > 0")
    if payload is None:
        if image_path is None:
            raise ValueError("give an image path or a payload")
        with open(image_path, "rb") as f:
            payload = Payload(image=f.read(), input_name=input_name)
    target = Target(address, port, use_ssl, access_token, service_name, model_name, root_certificates,
                    target_name_override, timeout)
    return run_closed(lambda: make_sender(protocol, target), payload, concurrency, duration, warmup_requests)


# -- reports ------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def host_info() -> Dict[str, Any]:
    """The load generator's machine: CPU model (``/proc/cpuinfo``), logical CPUs, OS, Python.

    Example:
        >>> sorted(host_info())
        ['cpu_model', 'logical_cpus', 'platform', 'python']
    """
    return {"cpu_model": _cpu_model(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def result_document(config: Dict[str, Any], steps: List[StepResult],
                    search: Optional[SearchResult] = None) -> Dict[str, Any]:
    """The full result of ``bfpaccel loadtest --json PATH``: version, time, host, config, every
    step (target and achieved rate, p50/p90/p99/max/mean from the schedule and from the send,
    errors by code, drops, server histogram deltas, search verdict) and the search summary.

    Example:
        >>> doc = result_document({"mode": "fixed"}, [])
        >>> doc["format"], doc["steps"], doc["search"]
        ('bfpaccel-loadtest/1', [], None)
    """
    from .. import __version__

    return _finite({
        "format": "bfpaccel-loadtest/1",
        "bfpaccel_version": __version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": host_info(),
        "config": config,
        "steps": [s.to_dict() for s in steps],
        "search": search.to_dict() if search is not None else None,
    })


def _server_line(server: Optional[Dict[str, Any]]) -> Optional[str]:
    if not server:
        return None
    if "error" in server:
        return f"  server metrics: {server['error']}"
    parts = []
    for name, label in (("bfpaccel_queue_seconds", "queue"), ("bfpaccel_compute_seconds", "compute"),
                        ("bfpaccel_request_latency_seconds", "request")):
        d = server.get(name)
        if d is None:
            continue
        if d.get("mean_ms") is not None:
            parts.append(f"{label} mean {d['mean_ms']:.2f} ms ({d['count']} obs.)")
        else:
            parts.append(f"{label}: {d.get('note', 'n/a')}")
    return "  server (metrics delta): " + "; ".join(parts)


class _ServerMetrics:
    """Scrapes ``--metrics-url`` around each step."""

    def __init__(self, url: str) -> None:
        from .promscrape import scrape

        self.url = url
        scrape(url)  # a wrong URL is a user mistake: fail before any load is sent

    def around(self, fn: Callable[[], Any]) -> Tuple[Any, Dict[str, Any]]:
        from .promscrape import histogram_deltas, scrape

        before = scrape(self.url)
        out = fn()
        try:
            return out, histogram_deltas(before, scrape(self.url))
        except (OSError, ValueError) as e:  # the server went away: keep the client-side result
            return out, {"error": str(e)}


# -- CLI ------------------------------------------------------------------------------------------------

def _split_address(address: str, port: Optional[int], use_ssl: bool) -> tuple:
    if port is None and address.count(":") == 1:
        host, p = address.rsplit(":", 1)
        return host, int(p)
    return address, port if port is not None else (443 if use_ssl else 80)


def _port(text: str) -> int:
    from .cli import port_number

    return port_number(text)


def _positive(kind: type) -> Callable[[str], Any]:
    def conv(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return v
    return conv


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction in [0, 1] (0.01 = 1%)")
    return v


def add_loadtest_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``loadtest`` to a ``bfpaccel`` sub-command set (calls :func:`run_loadtest`)."""
    p = subparsers.add_parser(
        "loadtest", help="load-test a running scoring service (closed/open loop, p99-bound search)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sends an image (or an array) to a running service and reports throughput, latency\n"
        "percentiles and errors by status code.\n\n"
        "  closed (default)  C concurrent clients send back to back for S seconds (QPS, p50/p90/p99).\n"
        "  fixed, poisson    open loop at --rate QPS (fixed intervals or Poisson arrivals): requests go out\n"
        "                    on schedule whether or not earlier ones finished; latency is measured from the\n"
        "                    scheduled send time (no coordinated omission) and from the actual send time;\n"
        "                    an arrival that finds --max-inflight requests in flight is dropped (reported).\n"
        "  --search-p99-ms   the highest Poisson rate whose p99 (from schedule) stays under the bound: the\n"
        "                    rate grows by --growth until a step fails, then is bisected; every step is shown.\n\n"
        "Exit status: 0 when some request succeeded (a search: when some rate met the bound), 1 otherwise,\n"
        "2 for a usage error.",
        epilog="examples:\n"
        "  bfpaccel loadtest --address 127.0.0.1:50051 --image cat.jpg --concurrency 8 --duration 60\n"
        "  bfpaccel loadtest --address 127.0.0.1:50051 --image cat.jpg --mode poisson --rate 40 --json run.json\n"
        "  bfpaccel loadtest --address 127.0.0.1:50051 --image cat.jpg --search-p99-ms 50 --duration 20 \\\n"
        "      --metrics-url http://127.0.0.1:9090/metrics --json search.json --png search.png\n"
        "  bfpaccel loadtest --address 127.0.0.1:8501 --protocol tfs-rest --model resnet50 --image cat.jpg")
    g = p.add_argument_group("service")
    g.add_argument("--address", required=True, help="HOST or HOST:PORT")
    g.add_argument("--port", type=_port, default=None, help="port (default: from --address, else 80/443)")
    g.add_argument("--protocol", choices=sorted(SENDERS), default="tfs-grpc",
                   help="the service's face: TF Serving gRPC Predict (default), TF Serving REST "
                   "(/v1/models/NAME:predict), KServe v2 REST or gRPC")
    g.add_argument("--service", default="", help="service (route) name; the default --model of the other protocols")
    g.add_argument("--model", default="", help="model name (REST URL, v2 requests; tfs-grpc: sent as model_spec.name)")
    g.add_argument("--key-file", default=None, metavar="FILE",
                   help="file holding the service key (first line); or set $BFPACCEL_AUTH_KEY")
    g.add_argument("--key", default="", help="service key (deprecated: other local users can read a command line)")
    g.add_argument("--ssl", action="store_true", help="TLS (https for the REST protocols)")
    g.add_argument("--ca", default=None, help="PEM CA file to trust")
    g.add_argument("--timeout", type=_positive(float), default=10.0, metavar="S",
                   help="deadline of one request, s (default 10)")
    g = p.add_argument_group("request")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="image file to send (one encoded image per request)")
    src.add_argument("--array", metavar="FILE.npy",
                     help="numpy array (batch dimension included) to send as float32 instead of an image")
    g.add_argument("--input-name", default="images", metavar="NAME",
                   help="model input the data is sent under (default images)")
    g = p.add_argument_group("load")
    g.add_argument("--mode", choices=MODES, default=None,
                   help="closed loop (default), or open loop with fixed or Poisson arrivals (needs --rate)")
    g.add_argument("--duration", type=_positive(float), default=10.0, metavar="S",
                   help="seconds per run or search step (default 10)")
    g.add_argument("--concurrency", type=int, default=None, metavar="C",
                   help="closed mode: concurrent clients (default 4)")
    g.add_argument("--rate", type=_positive(float), default=None, metavar="QPS",
                   help="fixed/poisson: requests per second offered")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="poisson: seed of the arrival times (default 0)")
    g.add_argument("--max-inflight", type=_positive(int), default=256, metavar="N",
                   help="open loop: most requests in flight; an arrival beyond it is dropped (default 256)")
    g.add_argument("--min-queries", type=int, default=None, metavar="N",
                   help="open loop: a run or step lasts until at least this many arrivals (default: 100 "
                   "in a search, else 0)")
    g.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="requests sent before measuring (per client in closed mode)")
    g = p.add_argument_group("p99-bound search")
    g.add_argument("--search-p99-ms", type=_positive(float), default=None, metavar="BOUND",
                   help="find the highest Poisson rate whose p99 latency (from schedule) is under BOUND ms")
    g.add_argument("--start-rate", type=_positive(float), default=None, metavar="QPS",
                   help="first rate tried (default: --rate, else 10)")
    g.add_argument("--growth", type=float, default=2.0, metavar="F", help="rate factor while bracketing (default 2)")
    g.add_argument("--precision", type=float, default=0.05, metavar="F",
                   help="stop when the failing rate is within this fraction of the passing one (default 0.05)")
    g.add_argument("--max-steps", type=_positive(int), default=12, metavar="N", help="most steps (default 12)")
    g.add_argument("--min-rate", type=_positive(float), default=1.0, metavar="QPS",
                   help="lowest rate tried when steps fail (default 1)")
    g.add_argument("--max-rate", type=_positive(float), default=50_000.0, metavar="QPS",
                   help="highest rate tried (default 50000)")
    g.add_argument("--max-error-rate", type=_fraction, default=0.01, metavar="F",
                   help="a step with a larger fraction of failed requests fails (default 0.01)")
    g.add_argument("--max-drop-rate", type=_fraction, default=0.01, metavar="F",
                   help="a step with a larger fraction of dropped arrivals fails (default 0.01)")
    g = p.add_argument_group("reports")
    g.add_argument("--metrics-url", default=None, metavar="URL",
                   help="the server's Prometheus endpoint (http://HOST:PORT/metrics): scraped before and after "
                   "each run or step to report its queue vs compute time (bfpaccel_queue_seconds, "
                   "bfpaccel_compute_seconds) and request latency")
    g.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                   help="write the full result (config, host CPU, version, every step) as JSON to PATH ('-': "
                   "stdout); with no PATH, print the report as JSON instead of text (closed mode: the "
                   "one-run summary of earlier versions)")
    g.add_argument("--png", default=None, metavar="PATH",
                   help="draw a chart (needs matplotlib): latency vs offered rate for a search, else a "
                   "latency histogram and time series")
    p.set_defaults(func=run_loadtest)
    return p


def _resolve(args: argparse.Namespace) -> Dict[str, Any]:
    """Checks option combinations; returns the run's settings (the JSON ``config``)."""
    search = args.search_p99_ms is not None
    mode = args.mode or ("poisson" if search else "closed")
    if search and mode == "closed":
        raise ValueError("--search-p99-ms runs open-loop steps: use --mode poisson (the default) or fixed")
    if mode == "closed":
        for flag, v in (("--rate", args.rate), ("--start-rate", args.start_rate),
                        ("--min-queries", args.min_queries)):
            if v is not None:
                raise ValueError(f"{flag} applies to the open-loop modes: add --mode poisson or --mode fixed")
    else:
        if args.concurrency is not None:
            raise ValueError("--concurrency applies to --mode closed; the open-loop modes bound the requests in "
                             "flight with --max-inflight")
        if not search and args.rate is None:
            raise ValueError(f"--mode {mode} needs --rate QPS")
    concurrency = 4 if args.concurrency is None else args.concurrency
    if concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    min_queries = args.min_queries if args.min_queries is not None else (100 if search else 0)
    if min_queries < 0 or args.warmup < 0:
        raise ValueError("--min-queries and --warmup must be >= 0")
    for flag, path in (("--json", args.json), ("--png", args.png)):  # checked now, not after a long run
        if path and path != "-" and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{flag} {path}: folder {os.path.dirname(os.path.abspath(path))} does not exist")
    if args.metrics_url is not None and not args.metrics_url.startswith(("http://", "https://")):
        raise ValueError(f"--metrics-url {args.metrics_url!r} must start with http:// or https://")
    host, port = _split_address(args.address, args.port, args.ssl)
    if not 0 < port <= 65535:
        raise ValueError(f"invalid port {port}: ports run from 1 to 65535")
    cfg: Dict[str, Any] = {
        "mode": mode, "protocol": args.protocol, "host": host, "port": port, "ssl": bool(args.ssl),
        "service": args.service, "model": args.model, "duration_s": args.duration, "timeout_s": args.timeout,
        "warmup_requests": args.warmup, "metrics_url": args.metrics_url,
    }
    if mode == "closed":
        cfg["concurrency"] = concurrency
    else:
        cfg.update(rate_qps=args.rate, seed=args.seed, max_inflight=args.max_inflight, min_queries=min_queries)
    if search:
        start = args.start_rate if args.start_rate is not None else (args.rate if args.rate is not None else 10.0)
        cfg["search"] = {"p99_bound_ms": args.search_p99_ms, "start_rate": start, "growth": args.growth,
                         "precision": args.precision, "max_steps": args.max_steps,
                         "min_rate": min(args.min_rate, start), "max_rate": max(args.max_rate, start),
                         "max_error_rate": args.max_error_rate, "max_drop_rate": args.max_drop_rate}
    return cfg


def _payload(args: argparse.Namespace) -> Payload:
    if args.image is not None:
        with open(args.image, "rb") as f:
            return Payload(image=f.read(), input_name=args.input_name)
    try:
        arr = np.load(args.array, allow_pickle=False)
    except (ValueError, EOFError) as e:
        raise ValueError(f"cannot read --array {args.array}: {e}") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"--array {args.array} holds several arrays (.npz): save one array with numpy.save")
    return Payload(array=arr, input_name=args.input_name)


def _step_lines(steps: List[StepResult], search: Optional[SearchResult]) -> List[str]:
    """The server-metrics lines of the text report (one per step of a search)."""
    lines = []
    for i, st in enumerate(steps):
        sl = _server_line(st.server)
        if sl:
            lines.append(f"step {i}{sl[1:]}" if search is not None else sl)
    return lines


def _open_loop(args: argparse.Namespace, cfg: Dict[str, Any], target: Target, payload: Payload,
               measured: Callable[[Callable[[], Any]], Tuple[Any, Optional[Dict[str, Any]]]]
               ) -> Tuple[List[StepResult], Optional[SearchResult]]:
    """Runs one open-loop step, or a search; one sender (connection pool) for all steps."""
    with make_sender(args.protocol, target) as sender:
        send = sender.prepare(payload)

        def one_step(rate: float) -> StepResult:
            st, server = measured(lambda: run_open(send, rate, args.duration, arrivals=cfg["mode"], seed=args.seed,
                                                   max_inflight=args.max_inflight, min_queries=cfg["min_queries"],
                                                   warmup_requests=args.warmup))
            st.server = server
            return st

        if "search" not in cfg:
            return [one_step(args.rate)], None

        def progress(i: int, st: StepResult) -> None:
            print(f"step {i}: {st.target_qps:.2f} QPS -> achieved {st.achieved_qps:.2f} QPS, "
                  f"p99 {st.latency.p99_ms:.2f} ms, {st.error_count} errors, {st.dropped} dropped: "
                  f"{'pass' if st.passed else 'FAIL (' + st.reason + ')'}", file=sys.stderr, flush=True)

        s = cfg["search"]
        search = search_p99(one_step, s["p99_bound_ms"], start_rate=s["start_rate"], growth=s["growth"],
                            precision=s["precision"], max_steps=s["max_steps"], min_rate=s["min_rate"],
                            max_rate=s["max_rate"], max_error_rate=s["max_error_rate"],
                            max_drop_rate=s["max_drop_rate"], on_step=progress)
        return search.steps, search


def run_loadtest(args: argparse.Namespace) -> int:
    """Handler of ``bfpaccel loadtest``; returns the exit code (1 when no request succeeded, or
    a search found no rate under the bound)."""
    from .cli import _client_key

    cfg = _resolve(args)
    if args.png:  # before the load: a missing matplotlib must not cost a whole run
        from .loadplot import require_matplotlib

        require_matplotlib()
    payload = _payload(args)
    cfg["payload"] = payload.describe()
    ca: Optional[bytes] = None
    if args.ca:
        with open(args.ca, "rb") as ca_file:
            ca = ca_file.read()
    target = Target(cfg["host"], cfg["port"], args.ssl, _client_key(args), args.service, args.model, ca, None,
                    args.timeout)
    metrics = _ServerMetrics(args.metrics_url) if args.metrics_url else None

    def measured(fn: Callable[[], Any]) -> Tuple[Any, Optional[Dict[str, Any]]]:
        return metrics.around(fn) if metrics is not None else (fn(), None)

    search: Optional[SearchResult] = None
    legacy: Optional[Dict[str, Any]] = None
    if cfg["mode"] == "closed":
        rep, server = measured(lambda: run_closed(lambda: make_sender(args.protocol, target), payload,
                                                  cfg["concurrency"], args.duration, args.warmup))
        steps = [rep.to_step()]
        steps[0].server = server
        ok, text, legacy = rep.ok > 0, rep.summary(), rep.to_dict()
    else:
        steps, search = _open_loop(args, cfg, target, payload, measured)
        ok = search.best_index is not None if search is not None else steps[0].ok > 0
        text = search.summary() if search is not None else steps[0].summary()
    text = "\n".join([text] + _step_lines(steps, search))
    doc = result_document(cfg, steps, search)
    if args.json == "":  # bare --json: JSON instead of text (closed mode: the dict of earlier versions)
        print(json.dumps(legacy if legacy is not None else doc))
    elif args.json == "-":
        print(json.dumps(doc, indent=1))
    else:
        print(text)
        if args.json is not None:
            with open(args.json, "w") as out:
                json.dump(doc, out, indent=1)
                out.write("\n")
    if args.png:
        from .loadplot import plot_search, plot_step

        if search is not None:
            plot_search(search, args.png)
        else:
            plot_step(steps[0], args.png)
    return 0 if ok else 1
