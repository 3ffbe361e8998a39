"""Prometheus text-format metrics for the server, with the standard library only.

``Metrics`` keeps request counts by protocol/method/route/code, a latency histogram, the
split of model calls into queue and compute time, and gauges (queue depth, in-flight requests); ``MetricsServer`` exposes them at ``http://HOST:PORT/metrics`` (``http.server`` in a
daemon thread), so ``prometheus_client`` is not needed.

Example:
    >>> m = Metrics(); m.observe("Predict", "resnet50", "OK", 0.004)
    >>> "bfpaccel_requests_total" in m.render()
    True
"""

from __future__ import annotations

import bisect
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Optional, Tuple

__all__ = ["Metrics", "MetricsServer", "LATENCY_BUCKETS", "BATCH_SIZE_BUCKETS"]

#: Histogram bucket upper bounds in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Bucket upper bounds (rows) of the dynamic batcher's ``bfpaccel_batch_size`` histogram.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Thread-safe counters, latency histogram and gauges of one server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: Dict[Tuple[str, str, str, str], int] = {}
        # (method, route, protocol) -> [bucket counts..., sum, count]
        self._hist: Dict[Tuple[str, str, str], list] = {}
        # (metric name, model) -> [bucket counts..., sum, count]: queue vs compute time
        self._split: Dict[Tuple[str, str], list] = {}
        self._gauges: Dict[str, Callable[[], float]] = {}
        self._images = 0
        # model -> [bucket counts..., sum, count]: rows of each merged (dynamic batching) call
        self._batch: Dict[str, list] = {}

    def gauge(self, name: str, fn: Callable[[], float]) -> None:
        """Registers a gauge read at render time (e.g. the queue depth)."""
        self._gauges[name] = fn

    @staticmethod
    def _add(table: Dict, key: Tuple, seconds: float) -> None:
        h = table.get(key)
        if h is None:
            h = table[key] = [0] * (len(LATENCY_BUCKETS) + 2)
        i = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        if i < len(LATENCY_BUCKETS):
            h[i] += 1
        h[-2] += seconds
        h[-1] += 1

    def observe(self, method: str, route: str, code: str, seconds: float, images: int = 0,
                protocol: str = "tfs-grpc") -> None:
        """Counts one finished request of a protocol face (``tfs-grpc``, ``tfs-rest``,
        ``v2-rest``, ``v2-grpc``)."""
        with self._lock:
            k = (method, route, code, protocol)
            self._count[k] = self._count.get(k, 0) + 1
            self._add(self._hist, (method, route, protocol), seconds)
            self._images += images

    def observe_split(self, model: str, queue_s: float, compute_s: float) -> None:
        """Records one model call's time waiting for a worker (or a batch) and computing."""
        with self._lock:
            self._add(self._split, ("bfpaccel_queue_seconds", model), queue_s)
            self._add(self._split, ("bfpaccel_compute_seconds", model), compute_s)

    def observe_batch(self, model: str, rows: int) -> None:
        """Records one model call of the dynamic batcher that ran ``rows`` rows."""
        with self._lock:
            h = self._batch.get(model)
            if h is None:
                h = self._batch[model] = [0] * (len(BATCH_SIZE_BUCKETS) + 2)
            i = bisect.bisect_left(BATCH_SIZE_BUCKETS, rows)
            if i < len(BATCH_SIZE_BUCKETS):
                h[i] += 1
            h[-2] += rows
            h[-1] += 1

    def batch_totals(self, model: Optional[str] = None) -> Tuple[int, int]:
        """``(rows, calls)`` of the dynamic batcher's model calls so far (of one model or all)."""
        with self._lock:
            hs = [h for m, h in self._batch.items() if model is None or m == model]
            return sum(h[-2] for h in hs), sum(h[-1] for h in hs)

    def count(self, method: Optional[str] = None, code: Optional[str] = None, protocol: Optional[str] = None) -> int:
        """Requests counted so far, optionally of one method, status code and/or protocol."""
        with self._lock:
            return sum(v for (m, _, c, p), v in self._count.items()
                       if (method is None or m == method) and (code is None or c == code)
                       and (protocol is None or p == protocol))

    def split_totals(self, model: Optional[str] = None) -> Dict[str, Tuple[float, int]]:
        """``{"bfpaccel_queue_seconds": (sum, count), "bfpaccel_compute_seconds": ...}``."""
        out: Dict[str, Tuple[float, int]] = {}
        with self._lock:
            for (name, m), h in self._split.items():
                if model is None or m == model:
                    s, n = out.get(name, (0.0, 0))
                    out[name] = (s + h[-2], n + h[-1])
        return out

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        out = ["# HELP bfpaccel_requests_total Requests by method, route, status code (gRPC name) and protocol.",
               "# TYPE bfpaccel_requests_total counter"]

        def hist(name: str, lab: str, h: list) -> None:
            cum = 0
            for b, n in zip(LATENCY_BUCKETS, h):
                cum += n
                out.append(f'{name}_bucket{{{lab},le="{b}"}} {cum}')
            out.append(f'{name}_bucket{{{lab},le="+Inf"}} {h[-1]}')
            out.append(f"{name}_sum{{{lab}}} {h[-2]:.6f}")
            out.append(f"{name}_count{{{lab}}} {h[-1]}")

        with self._lock:
            for (m, r, c, p), v in sorted(self._count.items()):
                out.append(f'bfpaccel_requests_total{{method="{_esc(m)}",route="{_esc(r)}",code="{_esc(c)}",'
                           f'protocol="{_esc(p)}"}} {v}')
            out += ["# HELP bfpaccel_request_latency_seconds Server-side request latency.",
                    "# TYPE bfpaccel_request_latency_seconds histogram"]
            for (m, r, p), h in sorted(self._hist.items()):
                hist("bfpaccel_request_latency_seconds", f'method="{_esc(m)}",route="{_esc(r)}",protocol="{_esc(p)}"', h)
            for name, what in (("bfpaccel_queue_seconds", "waiting for a worker or a batch"),
                               ("bfpaccel_compute_seconds", "decoding and running the model")):
                out += [f"# HELP {name} Time of each model call spent {what}.", f"# TYPE {name} histogram"]
                for (n, model), h in sorted(self._split.items()):
                    if n == name:
                        hist(name, f'model="{_esc(model)}"', h)
            out += ["# HELP bfpaccel_batch_size Rows of each model call the dynamic batcher ran.",
                    "# TYPE bfpaccel_batch_size histogram"]
            for model, h in sorted(self._batch.items()):
                cum = 0
                for b, n in zip(BATCH_SIZE_BUCKETS, h):
                    cum += n
                    out.append(f'bfpaccel_batch_size_bucket{{model="{_esc(model)}",le="{b}"}} {cum}')
                out.append(f'bfpaccel_batch_size_bucket{{model="{_esc(model)}",le="+Inf"}} {h[-1]}')
                out.append(f'bfpaccel_batch_size_sum{{model="{_esc(model)}"}} {h[-2]}')
                out.append(f'bfpaccel_batch_size_count{{model="{_esc(model)}"}} {h[-1]}')
            out += ["# HELP bfpaccel_images_total Images scored.", "# TYPE bfpaccel_images_total counter",
                    f"bfpaccel_images_total {self._images}"]
        for name, fn in sorted(self._gauges.items()):
            try:
                val = float(fn())
            except Exception:  # a gauge must never break the scrape
                continue
            out += [f"# TYPE {name} gauge", f"{name} {val:g}"]
        return "\n".join(out) + "\n"


class MetricsServer:
    """Serves ``Metrics.render()`` at ``/metrics`` over HTTP in a daemon thread.

    Example:
        >>> srv = MetricsServer(Metrics(), port=0); srv.port > 0
        True
        >>> srv.stop()
    """

    def __init__(self, metrics: Metrics, port: int = 0, host: str = "127.0.0.1") -> None:
        m = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = m.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:  # keep scrapes out of stderr
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="bfpaccel-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops serving."""
        self._httpd.shutdown()
        self._httpd.server_close()
