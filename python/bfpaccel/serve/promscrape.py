"""Reads a server's Prometheus text metrics and computes histogram deltas over a load-test run
(standard library only).

``bfpaccel loadtest --metrics-url`` scrapes before and after each run (or search step) and
reports, per histogram, the observations made in between and their mean: the server's split of
each model call into queue time (``bfpaccel_queue_seconds``) and compute time
(``bfpaccel_compute_seconds``), and its request latency.  Series of one histogram are summed
over their labels.

Example:
    >>> before = parse_text('h_sum 1.0\\nh_count 10\\n')
    >>> after = parse_text('h_sum{m="a"} 1.5\\nh_sum{m="b"} 0.5\\nh_count{m="a"} 20\\nh_count{m="b"} 10\\n')
    >>> histogram_delta(before, after, "h")["mean_ms"]
    50.0
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

__all__ = ["Scrape", "parse_text", "scrape", "histogram_delta", "histogram_deltas", "SPLIT_HISTOGRAMS",
           "NOT_EXPORTED"]

#: The histograms a load test reports: queue time, compute time, and the whole request.
SPLIT_HISTOGRAMS: Tuple[str, ...] = ("bfpaccel_queue_seconds", "bfpaccel_compute_seconds",
                                     "bfpaccel_request_latency_seconds")
#: The note of a histogram the server does not export.
NOT_EXPORTED = "not exported by this server"
_MAX_BYTES = 32 * 1024 * 1024

Labels = Tuple[Tuple[str, str], ...]


@dataclass
class Scrape:
    """One scrape: sample values by (name, labels), and the metric names declared by ``# TYPE``."""

    samples: Dict[Tuple[str, Labels], float] = field(default_factory=dict)
    types: Dict[str, str] = field(default_factory=dict)

    def total(self, name: str) -> Optional[float]:
        """Sum of the samples named ``name`` over all label sets; None when there is none."""
        vals = [v for (n, _), v in self.samples.items() if n == name]
        return sum(vals) if vals else None

    def names(self) -> Set[str]:
        """Every sample name."""
        return {n for n, _ in self.samples}


class _Parser:
    def __init__(self, line: str) -> None:
        self.s, self.i = line, 0

    def error(self, what: str) -> ValueError:
        return ValueError(f"malformed metrics line ({what} at column {self.i + 1}): {self.s[:200]!r}")

    def name(self) -> str:
        j = self.i
        while self.i < len(self.s) and (self.s[self.i].isalnum() or self.s[self.i] in "_:"):
            self.i += 1
        if self.i == j or self.s[j].isdigit():
            raise self.error("a metric or label name expected")
        return self.s[j:self.i]

    def skip_spaces(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def labels(self) -> Labels:
        out: List[Tuple[str, str]] = []
        self.i += 1  # "{"
        while True:
            self.skip_spaces()
            if self.i < len(self.s) and self.s[self.i] == "}":
                self.i += 1
                return tuple(sorted(out))
            key = self.name()
            self.skip_spaces()
            if self.s[self.i:self.i + 1] != "=":
                raise self.error("= expected")
            self.i += 1
            self.skip_spaces()
            if self.s[self.i:self.i + 1] != '"':
                raise self.error("a quoted label value expected")
            self.i += 1
            val = []
            while True:
                if self.i >= len(self.s):
                    raise self.error("unterminated label value")
                c = self.s[self.i]
                if c == "\\" and self.i + 1 < len(self.s):
                    nxt = self.s[self.i + 1]
                    val.append({"n": "\n", "\\": "\\", '"': '"'}.get(nxt, "\\" + nxt))
                    self.i += 2
                elif c == '"':
                    self.i += 1
                    break
                else:
                    val.append(c)
                    self.i += 1
            out.append((key, "".join(val)))
            self.skip_spaces()
            if self.i < len(self.s) and self.s[self.i] == ",":
                self.i += 1


def _value(text: str) -> float:
    t = text.strip()
    low = t.lower()
    if low in ("+inf", "inf"):
        return math.inf
    if low == "-inf":
        return -math.inf
    return float(t)  # "NaN" parses too


def parse_text(text: str) -> Scrape:
    """Parses the Prometheus text exposition format (0.0.4); raises ValueError on a malformed line.

    Example:
        >>> parse_text('# TYPE x counter\\nx{a="1"} 3\\n').samples
        {('x', (('a', '1'),)): 3.0}
    """
    out = Scrape()
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                out.types[parts[2]] = parts[3].strip()
            continue
        p = _Parser(line)
        name = p.name()
        labels: Labels = ()
        if p.i < len(line) and line[p.i] == "{":
            labels = p.labels()
        rest = line[p.i:].split()
        if not rest:
            raise p.error("a value expected")
        try:
            out.samples[(name, labels)] = _value(rest[0])
        except ValueError:
            raise p.error(f"value {rest[0]!r} is not a number") from None
    return out


def scrape(url: str, timeout: float = 5.0) -> Scrape:
    """GETs and parses ``url`` (``http://host:port/metrics``); a clear error when it cannot.

    Example:
        >>> scrape("http://127.0.0.1:9090/metrics").total("bfpaccel_images_total")  # doctest: +SKIP
        1234.0
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"metrics URL {url!r} must start with http:// or https://")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read(_MAX_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise OSError(f"cannot read metrics from {url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise OSError(f"cannot read metrics from {url}: {reason}") from None
    if len(body) > _MAX_BYTES:
        raise OSError(f"metrics from {url} are larger than {_MAX_BYTES >> 20} MiB")
    return parse_text(body.decode("utf-8", errors="replace"))


def histogram_delta(before: Scrape, after: Scrape, name: str) -> Dict[str, Any]:
    """What histogram ``name`` observed between two scrapes (all label sets together).

    Returns ``{"exported": True, "count", "sum_s", "mean_ms"}`` (``mean_ms`` None with a note
    when nothing was observed or a counter went back), or ``{"exported": False, "note":
    "not exported by this server"}``.

    Example:
        >>> histogram_delta(parse_text(""), parse_text(""), "bfpaccel_queue_seconds")["note"]
        'not exported by this server'
    """
    declared = after.types.get(name) == "histogram" or before.types.get(name) == "histogram"
    s0, c0 = before.total(name + "_sum"), before.total(name + "_count")
    s1, c1 = after.total(name + "_sum"), after.total(name + "_count")
    if not declared and c1 is None:
        return {"exported": False, "note": NOT_EXPORTED}
    count = (c1 or 0.0) - (c0 or 0.0)
    total = (s1 or 0.0) - (s0 or 0.0)
    out: Dict[str, Any] = {"exported": True, "count": int(round(count)), "sum_s": total, "mean_ms": None}
    if count < 0 or total < 0:
        out.update(count=None, sum_s=None, note="the counters went back (server restarted?)")
    elif count == 0:
        out["note"] = "no observations during the run"
    else:
        out["mean_ms"] = total / count * 1000.0
    return out


def histogram_deltas(before: Scrape, after: Scrape,
                     names: Sequence[str] = SPLIT_HISTOGRAMS) -> Dict[str, Dict[str, Any]]:
    """:func:`histogram_delta` of each name.

    Example:
        >>> sorted(histogram_deltas(parse_text(""), parse_text("")))  # doctest: +NORMALIZE_WHITESPACE
        ['bfpaccel_compute_seconds', 'bfpaccel_queue_seconds', 'bfpaccel_request_latency_seconds']
    """
    return {n: histogram_delta(before, after, n) for n in names}
