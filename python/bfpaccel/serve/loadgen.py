"""Open-loop load generation and the p99-bound rate search of ``bfpaccel loadtest``.

Open loop: requests are issued on a schedule -- fixed intervals or Poisson arrivals
(exponential gaps from a seeded generator) -- whether or not earlier ones have finished.  At
most ``max_inflight`` requests are in flight; an arrival that finds them all busy is not sent
and counted as *dropped* (the schedule never waits for the server).  Each request's latency is
measured from its scheduled send time (free of coordinated omission: a stalled server makes
later requests late, and that lateness counts) and from its actual send time.

Search (MLPerf's Server scenario): :func:`search_p99` runs steps of Poisson load at rising
rates until one misses the p99 bound (or has too many errors or drops), then bisects between
the highest passing and the lowest failing rate.

Example:
    >>> offs = make_schedule("fixed", rate=4.0, duration=1.0)
    >>> offs.tolist()
    [0.0, 0.25, 0.5, 0.75]
    >>> r = run_open(lambda: "OK", rate=200.0, duration=0.1, arrivals="poisson", seed=1)
    >>> r.scheduled == r.sent + r.dropped and r.ok == r.sent
    True
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .senders import OK, RequestFn

__all__ = ["ARRIVALS", "Percentiles", "StepResult", "SearchResult", "make_schedule", "run_open", "judge_step",
           "search_p99", "MAX_SCHEDULED"]

#: Arrival processes of the open-loop modes.
ARRIVALS: Tuple[str, ...] = ("fixed", "poisson")
#: Most arrivals one step may schedule (bounds the per-request records: ~40 bytes each).
MAX_SCHEDULED = 2_000_000
_CHUNK = 4096


@dataclass
class Percentiles:
    """Latency percentiles in ms over ``n`` samples (NaN when there is none).

    Example:
        >>> Percentiles.of(np.arange(1, 101, dtype=float)).p50_ms
        50.5
    """

    n: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, ms: np.ndarray) -> "Percentiles":
        """Percentiles of an array of milliseconds."""
        a = np.asarray(ms, dtype=np.float64)
        if a.size == 0:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan)
        p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
        return cls(int(a.size), p50, p90, p99, float(a.max()), float(a.mean()))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready (NaN as None)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


@dataclass
class StepResult:
    """One run at one load: what was scheduled, sent, answered, and how fast.

    ``latency`` runs from each request's scheduled send time, ``service_latency`` from its
    actual send time, ``send_lag`` is the difference (client-side lateness); all three over
    successful requests (``send_lag`` over all sent ones).  In closed mode there is no
    schedule: ``latency`` equals ``service_latency`` and ``target_qps`` is None.
    """

    mode: str
    target_qps: Optional[float]
    schedule_s: float
    elapsed_s: float
    scheduled: int
    sent: int
    ok: int
    errors: Dict[str, int]
    dropped: int
    offered_qps: float
    achieved_qps: float
    latency: Percentiles
    service_latency: Percentiles
    send_lag: Percentiles
    max_inflight: Optional[int] = None
    concurrency: Optional[int] = None
    seed: Optional[int] = None
    #: histogram name -> delta of the server's metrics over this step (``--metrics-url``), or {"error": ...}
    server: Optional[Dict[str, Any]] = None
    #: search verdict (None outside a search)
    passed: Optional[bool] = None
    reason: str = ""
    # per-request records, seconds from the step's start (not in the JSON)
    sched_s: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    send_s: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    end_s: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    ok_mask: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)

    @property
    def error_count(self) -> int:
        """Requests that were sent and failed."""
        return sum(self.errors.values())

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (without the per-request records)."""
        d: Dict[str, Any] = {}
        for k in ("mode", "target_qps", "offered_qps", "achieved_qps", "schedule_s", "elapsed_s", "scheduled",
                  "sent", "ok", "dropped", "max_inflight", "concurrency", "seed"):
            d[k] = getattr(self, k)
        d["errors"] = dict(sorted(self.errors.items()))
        d["error_count"] = self.error_count
        d["latency_ms"] = self.latency.to_dict()
        d["service_latency_ms"] = self.service_latency.to_dict()
        d["send_lag_ms"] = self.send_lag.to_dict()
        d["server"] = self.server
        d["passed"] = self.passed
        d["reason"] = self.reason
        return d

    def summary(self) -> str:
        """A few human-readable lines."""
        errs = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        la, sl = self.latency, self.service_latency
        head = (f"{self.mode} arrivals at {self.target_qps:g} QPS for {self.schedule_s:.1f} s: "
                f"{self.scheduled} scheduled, {self.sent} sent, {self.dropped} dropped "
                f"(max-inflight {self.max_inflight}); {self.ok} ok, achieved {self.achieved_qps:.1f} QPS")
        return "\n".join([
            head,
            f"  latency from schedule: p50 {la.p50_ms:.2f} ms, p90 {la.p90_ms:.2f} ms, p99 {la.p99_ms:.2f} ms, "
            f"max {la.max_ms:.2f} ms",
            f"  latency from send:     p50 {sl.p50_ms:.2f} ms, p90 {sl.p90_ms:.2f} ms, p99 {sl.p99_ms:.2f} ms, "
            f"max {sl.max_ms:.2f} ms (send lag p99 {self.send_lag.p99_ms:.2f} ms)",
            f"  errors: {errs}",
        ])


def _check_rate(rate: float, duration: float) -> None:
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a number of requests per second > 0, not {rate!r}")
    if not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration must be > 0 s, not {duration!r}")


def make_schedule(arrivals: str, rate: float, duration: float, seed: int = 0, min_queries: int = 0) -> np.ndarray:
    """Send times (seconds from the start) of one open-loop step.

    ``fixed``: every ``1/rate`` s from 0; ``poisson``: exponential gaps of mean ``1/rate``
    (the first one from 0 too) drawn from ``numpy.random.default_rng(seed)``: the same seed
    gives the same pattern, scaled by the rate.  Arrivals run for ``duration`` s, longer if
    needed for ``min_queries`` of them (and there is at least one).

    Example:
        >>> len(make_schedule("poisson", 100.0, 2.0, seed=7)) == len(make_schedule("poisson", 100.0, 2.0, seed=7))
        True
    """
    _check_rate(rate, duration)
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {ARRIVALS}, not {arrivals!r}")
    if min_queries < 0:
        raise ValueError(f"min_queries must be >= 0, not {min_queries}")
    expected = max(rate * duration, float(min_queries))
    if expected > MAX_SCHEDULED:
        raise ValueError(f"{rate:g} QPS for {duration:g} s schedules about {expected:.0f} requests, more than "
                         f"{MAX_SCHEDULED} in one step: lower the rate, the duration or the minimum query count")
    if arrivals == "fixed":
        n = max(int(math.ceil(rate * duration - 1e-9)), min_queries, 1)
        return np.arange(n, dtype=np.float64) / rate
    rng = np.random.default_rng(seed)
    parts: List[np.ndarray] = []
    last, count = 0.0, 0
    while True:
        t = last + np.cumsum(rng.standard_exponential(_CHUNK)) / rate
        parts.append(t)
        count += t.size
        last = float(t[-1])
        if (last >= duration and count >= min_queries) or count > MAX_SCHEDULED:
            break
    times = np.concatenate(parts)
    keep = max(int(np.searchsorted(times, duration, side="left")), min_queries, 1)
    return times[:min(keep, MAX_SCHEDULED)]


def run_open(send: RequestFn, rate: float, duration: float, *, arrivals: str = "poisson", seed: int = 0,
             max_inflight: int = 256, min_queries: int = 0, warmup_requests: int = 1,
             clock: Callable[[], float] = time.perf_counter) -> StepResult:
    """Runs one open-loop step: ``send`` is called on the schedule of :func:`make_schedule`
    from a pool of at most ``max_inflight`` threads; arrivals that find the pool full are
    dropped.  ``warmup_requests`` calls are made first, outside the measurement.

    The step ends when every sent request has finished, so its length is bounded by the
    schedule plus the senders' request deadline.

    Example:
        >>> run_open(lambda: "OK", rate=50.0, duration=0.2, arrivals="fixed").scheduled
        10
    """
    if not isinstance(max_inflight, int) or max_inflight < 1:
        raise ValueError(f"max_inflight must be an integer >= 1, not {max_inflight!r}")
    offsets = make_schedule(arrivals, rate, duration, seed, min_queries)
    n = int(offsets.size)
    for _ in range(max(0, warmup_requests)):
        send()
    send_s = np.full(n, np.nan)
    end_s = np.full(n, np.nan)
    codes: List[Optional[str]] = [None] * n
    dropped = np.zeros(n, dtype=bool)
    slots = threading.BoundedSemaphore(max_inflight)
    t0 = [0.0]

    def one(i: int) -> None:
        code = "CLIENT_ERROR"
        try:
            send_s[i] = clock() - t0[0]
            code = send()
        except BaseException as e:  # a sender must not raise; if one does, count it, keep going
            code = f"CLIENT_{type(e).__name__}"
        finally:
            end_s[i] = clock() - t0[0]
            codes[i] = code
            slots.release()

    pool = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="bfpaccel-loadtest")
    try:
        t0[0] = clock()
        for i in range(n):
            wait = t0[0] + offsets[i] - clock()
            if wait > 0:
                time.sleep(wait)
            if not slots.acquire(blocking=False):
                dropped[i] = True
                continue
            pool.submit(one, i)
    except BaseException:  # interrupted: requests not started yet are not sent
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    window = max(duration, float(offsets[-1]) + (1.0 / rate if arrivals == "fixed" else 0.0))
    return _summarize(arrivals, rate, window, offsets, send_s, end_s, codes, dropped, max_inflight, seed)


def _summarize(mode: str, rate: float, window: float, sched: np.ndarray, send_s: np.ndarray, end_s: np.ndarray,
               codes: List[Optional[str]], dropped: np.ndarray, max_inflight: int, seed: int) -> StepResult:
    sent = ~dropped
    ok = np.array([c == OK for c in codes], dtype=bool) & sent
    errors = Counter(str(c) for c, s, o in zip(codes, sent, ok) if s and not o)
    last_end = float(np.nanmax(end_s)) if sent.any() else 0.0
    elapsed = max(window, last_end)
    n_ok = int(ok.sum())
    return StepResult(
        mode=mode, target_qps=float(rate), schedule_s=float(window), elapsed_s=elapsed, scheduled=int(sched.size),
        sent=int(sent.sum()), ok=n_ok, errors=dict(errors), dropped=int(dropped.sum()),
        offered_qps=sched.size / window, achieved_qps=n_ok / elapsed if elapsed > 0 else 0.0,
        latency=Percentiles.of((end_s - sched)[ok] * 1000.0),
        service_latency=Percentiles.of((end_s - send_s)[ok] * 1000.0),
        send_lag=Percentiles.of((send_s - sched)[sent] * 1000.0),
        max_inflight=max_inflight, seed=seed if mode == "poisson" else None,
        sched_s=sched, send_s=send_s, end_s=end_s, ok_mask=ok)


def judge_step(step: StepResult, bound_ms: float, max_error_rate: float = 0.01, max_drop_rate: float = 0.01) -> bool:
    """Sets ``step.passed`` and ``step.reason``: the step passes when some request succeeded,
    errors are at most ``max_error_rate`` of the sent requests, drops at most
    ``max_drop_rate`` of the scheduled ones, and p99 latency from the schedule is within
    ``bound_ms``.

    Example:
        >>> s = run_open(lambda: "OK", 100.0, 0.1)
        >>> judge_step(s, bound_ms=1e6), s.reason
        (True, 'ok')
    """
    reasons = []
    if step.ok == 0:
        reasons.append("no request succeeded")
    err_rate = step.error_count / step.sent if step.sent else 0.0
    if err_rate > max_error_rate:
        reasons.append(f"errors {100 * err_rate:.2f}% > {100 * max_error_rate:g}%")
    drop_rate = step.dropped / step.scheduled if step.scheduled else 0.0
    if drop_rate > max_drop_rate:
        reasons.append(f"dropped {100 * drop_rate:.2f}% > {100 * max_drop_rate:g}%")
    p99 = step.latency.p99_ms
    if step.ok and not p99 <= bound_ms:
        reasons.append(f"p99 {p99:.2f} ms > {bound_ms:g} ms")
    step.passed = not reasons
    step.reason = "; ".join(reasons) or "ok"
    return step.passed


@dataclass
class SearchResult:
    """Every step of a p99-bound search and the best rate found.

    ``best_index`` is the step with the highest passing rate (None: no step passed);
    ``converged``: the passing and failing rates closed in to the precision asked for.
    """

    bound_ms: float
    steps: List[StepResult]
    best_index: Optional[int]
    converged: bool
    note: str
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def best_qps(self) -> Optional[float]:
        """The highest target rate that met the bound (None: none did)."""
        return None if self.best_index is None else self.steps[self.best_index].target_qps

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready summary (the steps are listed beside it, see ``bfpaccel loadtest --json``)."""
        best = None if self.best_index is None else self.steps[self.best_index]
        return {"bound_ms": self.bound_ms, "best_qps": self.best_qps, "best_step": self.best_index,
                "best_offered_qps": best.offered_qps if best else None,
                "best_achieved_qps": best.achieved_qps if best else None,
                "best_p99_ms": best.latency.to_dict()["p99_ms"] if best else None,
                "converged": self.converged, "note": self.note, "steps_run": len(self.steps), **self.settings}

    def summary(self) -> str:
        """A table of the steps and the result line."""
        lines = [f"{'step':>4} {'target':>9} {'offered':>9} {'achieved':>9} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
                 f"{'max ms':>9} {'errors':>6} {'dropped':>7}  verdict"]
        for i, s in enumerate(self.steps):
            la = s.latency
            lines.append(f"{i:>4} {s.target_qps:>9.2f} {s.offered_qps:>9.2f} {s.achieved_qps:>9.2f} "
                         f"{la.p50_ms:>9.2f} {la.p90_ms:>9.2f} {la.p99_ms:>9.2f} {la.max_ms:>9.2f} "
                         f"{s.error_count:>6} {s.dropped:>7}  {'pass' if s.passed else 'FAIL: ' + s.reason}")
        if self.best_index is None:
            lines.append(f"no rate tried kept p99 under {self.bound_ms:g} ms ({self.note})")
        else:
            b = self.steps[self.best_index]
            lines.append(f"highest rate with p99 under {self.bound_ms:g} ms: {b.target_qps:.2f} QPS target "
                         f"(scheduled {b.offered_qps:.2f}, achieved {b.achieved_qps:.2f} QPS, "
                         f"p99 {b.latency.p99_ms:.2f} ms; {self.note})")
        return "\n".join(lines)


def search_p99(run_step: Callable[[float], StepResult], bound_ms: float, *, start_rate: float = 10.0,
               growth: float = 2.0, precision: float = 0.05, max_steps: int = 12, min_rate: float = 1.0,
               max_rate: float = 50_000.0, max_error_rate: float = 0.01, max_drop_rate: float = 0.01,
               on_step: Optional[Callable[[int, StepResult], None]] = None) -> SearchResult:
    """Finds the highest rate whose step meets ``bound_ms`` at p99 (see :func:`judge_step`).

    ``run_step(rate)`` runs one step (e.g. :func:`run_open` with Poisson arrivals).  From
    ``start_rate`` the rate is multiplied by ``growth`` while steps pass (divided while they
    fail) to bracket the answer, then the bracket is bisected until the failing rate is within
    ``precision`` (relative) of the passing one.  At most ``max_steps`` steps; rates stay
    within ``[min_rate, max_rate]``.  ``on_step(index, step)`` is called after each step.

    Example:
        >>> fake = lambda rate: run_open(lambda: "OK" if rate < 300 else "UNAVAILABLE", rate, 0.05)
        >>> r = search_p99(fake, 1000.0, start_rate=100.0, precision=0.1, max_steps=10)
        >>> 270 < r.best_qps < 300
        True
    """
    if not (math.isfinite(bound_ms) and bound_ms > 0):
        raise ValueError(f"the p99 bound must be > 0 ms, not {bound_ms!r}")
    if not growth > 1:
        raise ValueError(f"growth must be > 1, not {growth!r}")
    if not 0 < precision < 1:
        raise ValueError(f"precision must be between 0 and 1 (relative), not {precision!r}")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, not {max_steps!r}")
    if not 0 < min_rate <= start_rate <= max_rate:
        raise ValueError(f"rates must satisfy 0 < min_rate ({min_rate:g}) <= start_rate ({start_rate:g}) "
                         f"<= max_rate ({max_rate:g})")
    for name, v in (("max_error_rate", max_error_rate), ("max_drop_rate", max_drop_rate)):
        if not 0 <= v <= 1:
            raise ValueError(f"{name} must be a fraction in [0, 1], not {v!r}")
    steps: List[StepResult] = []
    lo: Optional[float] = None  # highest passing rate
    hi: Optional[float] = None  # lowest failing rate
    best: Optional[int] = None
    rate, converged, note = float(start_rate), False, ""
    while True:
        if len(steps) >= max_steps:
            note = f"stopped after --max-steps {max_steps} steps"
            break
        step = run_step(rate)
        judge_step(step, bound_ms, max_error_rate, max_drop_rate)
        steps.append(step)
        if on_step is not None:
            on_step(len(steps) - 1, step)
        if step.passed:
            if lo is None or rate > lo:
                lo, best = rate, len(steps) - 1
        elif hi is None or rate < hi:
            hi = rate
        if hi is None:  # every step passed so far: grow
            if rate >= max_rate:
                note = f"reached the maximum rate {max_rate:g} QPS without missing the bound"
                break
            rate = min(rate * growth, max_rate)
        elif lo is None:  # every step failed so far: shrink
            if rate <= min_rate:
                note = f"even the minimum rate {min_rate:g} QPS missed the bound"
                break
            rate = max(rate / growth, min_rate)
        else:
            if hi - lo <= precision * lo:
                converged = True
                note = f"converged: the lowest failing rate {hi:g} QPS is within {100 * precision:g}%"
                break
            rate = (lo + hi) / 2.0
    settings = {"start_rate": start_rate, "growth": growth, "precision": precision, "max_steps": max_steps,
                "min_rate": min_rate, "max_rate": max_rate, "max_error_rate": max_error_rate,
                "max_drop_rate": max_drop_rate}
    return SearchResult(bound_ms=float(bound_ms), steps=steps, best_index=best, converged=converged, note=note,
                        settings=settings)
