"""bfpaccel.serve.promscrape: the Prometheus text parser (also on our own server's output),
histogram deltas between two scrapes, and scraping over loopback HTTP."""

from __future__ import annotations

import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, List

import pytest

from bfpaccel.serve.metrics import Metrics
from bfpaccel.serve.promscrape import (NOT_EXPORTED, SPLIT_HISTOGRAMS, histogram_delta, histogram_deltas, parse_text,
                                       scrape)


def test_parse_text_labels_values_and_comments():
    text = "\n".join([
        "# HELP x_total A counter, with {braces} in the help.",
        "# TYPE x_total counter",
        'x_total{a="1",b="q\\"uo,te}"} 3 1700000000000',
        'x_total{ b = "2" , a="n\\nl\\\\" } 4.5e1',
        "# TYPE h histogram",
        'h_bucket{le="+Inf"} 7',
        "h_sum 1.25",
        "h_count 7",
        "g NaN",
        "g2 -Inf",
        "",
    ])
    s = parse_text(text)
    assert s.samples[("x_total", (("a", "1"), ("b", 'q"uo,te}')))] == 3.0
    assert s.samples[("x_total", (("a", "n\nl\\"), ("b", "2")))] == 45.0
    assert s.samples[("h_bucket", (("le", "+Inf"),))] == 7.0
    assert math.isnan(s.samples[("g", ())]) and s.samples[("g2", ())] == -math.inf
    assert s.types == {"x_total": "counter", "h": "histogram"}
    assert s.total("x_total") == 48.0 and s.total("missing") is None
    for bad in ("x{a=1} 2", 'x{a="1"', "x", "x{a=\"1\"} abc", "9x 1"):
        with pytest.raises(ValueError, match="malformed metrics line"):
            parse_text(bad)


def test_histogram_delta_cases():
    before = parse_text('# TYPE q histogram\nq_sum{model="a"} 1.0\nq_count{model="a"} 10\n')
    after = parse_text('# TYPE q histogram\nq_sum{model="a"} 1.3\nq_count{model="a"} 13\n'
                       'q_sum{model="b"} 0.2\nq_count{model="b"} 2\n')
    d = histogram_delta(before, after, "q")
    assert d["exported"] and d["count"] == 5 and d["sum_s"] == pytest.approx(0.5)
    assert d["mean_ms"] == pytest.approx(100.0)
    same = histogram_delta(after, after, "q")
    assert same["count"] == 0 and same["mean_ms"] is None and "no observations" in same["note"]
    reset = histogram_delta(after, before, "q")
    assert reset["mean_ms"] is None and "went back" in reset["note"]
    # declared but never observed (the family is rendered with no series): exported, nothing observed
    empty = parse_text("# TYPE q histogram\n")
    assert histogram_delta(empty, empty, "q")["exported"] is True
    none = histogram_delta(parse_text("x 1\n"), parse_text("x 2\n"), "q")
    assert none == {"exported": False, "note": NOT_EXPORTED}
    assert set(histogram_deltas(before, after)) == set(SPLIT_HISTOGRAMS)


def test_parse_our_server_metrics():
    m = Metrics()
    m.observe("Predict", "tiny", "OK", 0.004, images=1)
    before = parse_text(m.render())
    for s in (0.002, 0.006, 0.010):
        m.observe("Predict", "tiny", "OK", s, images=1)
    if hasattr(m, "observe_split"):
        m.observe_split("tiny", 0.001, 0.003)
    after = parse_text(m.render())
    d = histogram_delta(before, after, "bfpaccel_request_latency_seconds")
    assert d["count"] == 3 and d["mean_ms"] == pytest.approx(6.0, abs=1e-3)
    q = histogram_delta(before, after, "bfpaccel_queue_seconds")
    if hasattr(m, "observe_split"):
        assert q["count"] == 1 and q["mean_ms"] == pytest.approx(1.0, abs=1e-3)
    else:
        assert q["note"] == NOT_EXPORTED


class _MetricsHttp:
    def __init__(self, bodies: List[str]) -> None:
        self.bodies = bodies
        src = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                body = (src.bodies.pop(0) if len(src.bodies) > 1 else src.bodies[0]).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_scrape_over_http_and_errors():
    srv = _MetricsHttp(["bfpaccel_compute_seconds_sum 2\nbfpaccel_compute_seconds_count 4\n",
                        "bfpaccel_compute_seconds_sum 2.5\nbfpaccel_compute_seconds_count 5\n"])
    try:
        url = f"http://127.0.0.1:{srv.port}/metrics"
        a, b = scrape(url), scrape(url)
        d = histogram_deltas(a, b)
        assert d["bfpaccel_compute_seconds"]["mean_ms"] == pytest.approx(500.0)
        assert d["bfpaccel_queue_seconds"]["note"] == NOT_EXPORTED
        with pytest.raises(OSError, match="HTTP 404"):
            scrape(f"http://127.0.0.1:{srv.port}/nope")
    finally:
        srv.stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with pytest.raises(OSError, match="cannot read metrics from"):
        scrape(f"http://127.0.0.1:{dead}/metrics", timeout=2)
    with pytest.raises(ValueError, match="http://"):
        scrape("ftp://127.0.0.1/metrics")
