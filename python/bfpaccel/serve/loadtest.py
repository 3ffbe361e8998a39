"""Closed-loop gRPC load test: C concurrent clients score one image for S seconds.

Example:
    >>> r = run("127.0.0.1", 50051, "cat.jpg", concurrency=4, duration=10)  # doctest: +SKIP
    >>> print(r.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import grpc
import numpy as np

from . import _protos as pb
from .client import NO_RETRY, PredictionClient

__all__ = ["LoadTestReport", "run", "add_loadtest_parser", "run_loadtest"]


@dataclass
class LoadTestReport:
    """What a load test measured (latencies in ms, client side, successful calls only)."""

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

    def summary(self) -> str:
        """One human-readable paragraph."""
        errs = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        return (f"{self.requests} requests in {self.duration_s:.1f} s with {self.concurrency} clients: "
                f"{self.qps:.1f} QPS (ok), latency p50 {self.p50_ms:.2f} ms, p90 {self.p90_ms:.2f} ms, "
                f"p99 {self.p99_ms:.2f} ms; errors: {errs}")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict without the raw latencies."""
        d = asdict(self)
        d.pop("latencies_ms")
        return d


def run(address: str, port: int, image_path: str, concurrency: int = 4, duration: float = 10.0, *,
        service_name: str = "", access_token: str = "", use_ssl: bool = False, input_name: str = "images",
        root_certificates: Optional[bytes] = None, target_name_override: Optional[str] = None,
        timeout: float = 10.0, warmup_requests: int = 1) -> LoadTestReport:
    """Runs ``concurrency`` clients (threads, one channel each) in a closed loop for ``duration`` s.

    Each request is what the seed's ``score_file`` sends (DT_STRING [1] under ``input_name``);
    no retries, so every error is counted by its status code.

    Example:
        >>> run("127.0.0.1", 50051, "cat.jpg", 8, 30).qps  # doctest: +SKIP
    """
    if concurrency < 1 or duration <= 0:
        raise ValueError("concurrency must be >= 1 and duration > 0")
    with open(image_path, "rb") as f:
        data = f.read()
    req = pb.PredictRequest()
    tp = req.inputs[input_name]
    tp.dtype = pb.DT_STRING
    tp.tensor_shape.dim.add().size = 1
    tp.string_val.append(data)

    def make() -> PredictionClient:
        return PredictionClient(address, port, use_ssl, access_token, service_name, retry=NO_RETRY,
                                root_certificates=root_certificates, target_name_override=target_name_override)

    lock = threading.Lock()
    lat: List[float] = []
    errors: Dict[str, int] = {}
    start_evt = threading.Event()
    stop_at = [0.0]

    def worker() -> None:
        c = make()
        for _ in range(warmup_requests):
            try:
                c._predict(req, timeout)
            except grpc.RpcError:
                pass
        start_evt.wait()
        mine: List[float] = []
        errs: Dict[str, int] = {}
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at[0]:
                break
            try:
                c._predict(req, timeout)
                mine.append((time.perf_counter() - t0) * 1000)
            except grpc.RpcError as e:
                code = e.code().name if hasattr(e, "code") else "UNKNOWN"
                errs[code] = errs.get(code, 0) + 1
        c.close()
        with lock:
            lat.extend(mine)
            for k, v in errs.items():
                errors[k] = errors.get(k, 0) + v

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    t_start = time.perf_counter()
    stop_at[0] = t_start + duration
    start_evt.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    a = np.array(lat) if lat else np.array([np.nan])
    pct = lambda q: float(np.percentile(a, q)) if lat else float("nan")  # noqa: E731
    return LoadTestReport(requests=len(lat) + sum(errors.values()), ok=len(lat), errors=errors, duration_s=elapsed,
                          qps=len(lat) / elapsed, p50_ms=pct(50), p90_ms=pct(90), p99_ms=pct(99),
                          mean_ms=float(np.mean(a)) if lat else float("nan"), concurrency=concurrency,
                          latencies_ms=lat)


def _split_address(address: str, port: Optional[int], use_ssl: bool) -> tuple:
    if port is None and address.count(":") == 1:
        host, p = address.rsplit(":", 1)
        return host, int(p)
    return address, port if port is not None else (443 if use_ssl else 80)


def _port(text: str) -> int:
    from .cli import port_number

    return port_number(text)


def add_loadtest_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``loadtest`` to a ``bfpaccel`` sub-command set (calls :func:`run_loadtest`)."""
    p = subparsers.add_parser("loadtest", help="load-test a running scoring service (QPS, p50/p90/p99, errors)",
                              description="C concurrent clients send an image for S seconds; prints QPS, "
                              "latency percentiles and errors by status code.")
    p.add_argument("--address", required=True, help="HOST or HOST:PORT")
    p.add_argument("--port", type=_port, default=None, help="port (default: from --address, else 80/443)")
    p.add_argument("--image", required=True, help="image file to send")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--service", default="", help="service (route) name")
    p.add_argument("--key-file", default=None, metavar="FILE",
                   help="file holding the service key (first line); or set $BFPACCEL_AUTH_KEY")
    p.add_argument("--key", default="", help="service key (deprecated: other local users can read a command line)")
    p.add_argument("--ssl", action="store_true")
    p.add_argument("--ca", default=None, help="PEM CA file to trust")
    p.add_argument("--input-name", default="images")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_loadtest)
    return p


def run_loadtest(args: argparse.Namespace) -> int:
    """Handler of ``bfpaccel loadtest``; returns the exit code (1 when no request succeeded)."""
    from .cli import _client_key

    host, port = _split_address(args.address, args.port, args.ssl)
    if not 0 < port <= 65535:
        raise ValueError(f"invalid port {port}: ports run from 1 to 65535")
    ca = open(args.ca, "rb").read() if args.ca else None
    r = run(host, port, args.image, args.concurrency, args.duration, service_name=args.service,
            access_token=_client_key(args), use_ssl=args.ssl, input_name=args.input_name, root_certificates=ca)
    print(json.dumps(r.to_dict()) if args.json else r.summary())
    return 0 if r.ok else 1
