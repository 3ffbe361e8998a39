"""bfpaccel.serve.loadgen: arrival schedules, the open-loop engine (drops, both latencies,
error codes) with in-process senders, the step verdict and the p99-bound search logic with
scripted steps (exact sequences of rates)."""

from __future__ import annotations

import json
import threading
import time
from typing import List

import numpy as np
import pytest

from bfpaccel.serve.loadgen import (MAX_SCHEDULED, Percentiles, StepResult, judge_step, make_schedule, run_open,
                                    search_p99)


# -- schedules ---------------------------------------------------------------------------------------

def test_fixed_schedule():
    assert make_schedule("fixed", 10.0, 0.5).tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert make_schedule("fixed", 10.0, 0.5, min_queries=8).size == 8
    assert make_schedule("fixed", 0.5, 1.0).tolist() == [0.0]  # at least one arrival


def test_poisson_schedule_is_seeded_and_exponential():
    a = make_schedule("poisson", 1000.0, 200.0, seed=11)
    assert np.array_equal(a, make_schedule("poisson", 1000.0, 200.0, seed=11))
    assert not np.array_equal(a[:100], make_schedule("poisson", 1000.0, 200.0, seed=12)[:100])
    gaps = np.diff(np.concatenate([[0.0], a]))
    assert (gaps > 0).all() and a[-1] < 200.0
    # ~200k exponential gaps of mean 1 ms: mean and coefficient of variation (1 for an exponential)
    assert gaps.mean() == pytest.approx(1e-3, rel=0.01)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.02)
    # the same seed at twice the rate: the same pattern, twice as dense
    b = make_schedule("poisson", 2000.0, 100.0, seed=11)
    n = min(a.size, b.size) - 10
    np.testing.assert_allclose(b[:n], a[:n] / 2, rtol=1e-12)
    assert make_schedule("poisson", 10.0, 0.1, seed=1, min_queries=50).size == 50


@pytest.mark.parametrize("kwargs, match", [
    (dict(arrivals="fixed", rate=0.0, duration=1.0), "rate"),
    (dict(arrivals="fixed", rate=float("nan"), duration=1.0), "rate"),
    (dict(arrivals="fixed", rate=1.0, duration=0.0), "duration"),
    (dict(arrivals="bursty", rate=1.0, duration=1.0), "arrivals"),
    (dict(arrivals="poisson", rate=1e6, duration=10.0), "more than"),
    (dict(arrivals="fixed", rate=1.0, duration=1.0, min_queries=MAX_SCHEDULED + 1), "more than"),
    (dict(arrivals="fixed", rate=1.0, duration=1.0, min_queries=-1), "min_queries"),
])
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(**kwargs)


# -- the open-loop engine --------------------------------------------------------------------------------

def test_open_loop_does_not_wait_for_answers():
    running, peak, lock = [0], [0], threading.Lock()

    def slow() -> str:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return "OK"

    r = run_open(slow, 50.0, 0.4, arrivals="fixed", max_inflight=64, warmup_requests=0)
    assert r.scheduled == 20 and r.sent == 20 and r.dropped == 0 and r.ok == 20
    assert peak[0] >= 2  # a closed loop with one client never overlaps requests
    ok = r.ok_mask
    lat = (r.end_s - r.sched_s)[ok]
    svc = (r.end_s - r.send_s)[ok]
    assert (lat >= svc).all() and (svc >= 0.19).all()  # from schedule >= from send >= the service time
    assert r.latency.n == r.service_latency.n == 20 and r.latency.p99_ms >= r.service_latency.p99_ms
    assert r.target_qps == 50.0 and r.offered_qps == pytest.approx(50.0) and r.mode == "fixed" and r.seed is None


def test_full_pool_drops_instead_of_waiting():
    calls = [0]

    def stuck() -> str:
        calls[0] += 1
        time.sleep(0.3)
        return "OK"

    r = run_open(stuck, 100.0, 0.3, arrivals="fixed", max_inflight=2, warmup_requests=0)
    assert r.scheduled == 30 and r.sent + r.dropped == 30
    # two slots held 0.3 s each: a handful sent (more only if the dispatcher itself stalled), the rest dropped
    assert r.sent == calls[0] and 2 <= r.sent <= 10 and r.dropped >= 20
    assert int(np.isnan(r.send_s).sum()) == r.dropped  # a dropped arrival is never sent
    assert r.ok == r.sent and r.errors == {}
    d = r.to_dict()
    assert d["dropped"] == r.dropped and d["max_inflight"] == 2


def test_errors_by_code_and_raising_sender():
    seq = iter(range(10 ** 6))

    def flaky() -> str:
        i = next(seq)
        if i % 3 == 1:
            return "UNAVAILABLE"
        if i % 3 == 2:
            raise RuntimeError("sender bug")
        return "OK"

    r = run_open(flaky, 300.0, 0.1, arrivals="fixed", warmup_requests=0)
    assert r.scheduled == 30 and r.sent == 30 and r.ok == 10
    assert r.errors == {"UNAVAILABLE": 10, "CLIENT_RuntimeError": 10} and r.error_count == 20
    assert r.latency.n == 10


def test_nothing_ok_is_strict_json():
    r = run_open(lambda: "UNAVAILABLE", 100.0, 0.05, arrivals="poisson", seed=3, warmup_requests=0)
    assert r.ok == 0 and r.latency.n == 0 and np.isnan(r.latency.p99_ms)
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["latency_ms"]["p99_ms"] is None and d["seed"] == 3 and d["mode"] == "poisson"


def test_run_open_errors():
    with pytest.raises(ValueError, match="max_inflight"):
        run_open(lambda: "OK", 10.0, 0.1, max_inflight=0)


# -- verdicts and the search -------------------------------------------------------------------------------

def fake_step(rate: float, p99: float, errors: int = 0, dropped: int = 0, n: int = 200) -> StepResult:
    sent = n - dropped
    lat = Percentiles(sent - errors, p99 / 3, p99 / 2, p99, p99 * 1.1, p99 / 2.5)
    return StepResult(mode="poisson", target_qps=rate, schedule_s=n / rate, elapsed_s=n / rate, scheduled=n,
                      sent=sent, ok=sent - errors, errors={"UNAVAILABLE": errors} if errors else {}, dropped=dropped,
                      offered_qps=rate, achieved_qps=rate * (sent - errors) / n, latency=lat, service_latency=lat,
                      send_lag=Percentiles.of(np.zeros(0)), max_inflight=256, seed=0)


def test_judge_step():
    s = fake_step(10, 20.0)
    assert judge_step(s, 25.0) and s.passed and s.reason == "ok"
    assert not judge_step(s, 15.0) and "p99 20.00 ms > 15 ms" in s.reason
    s = fake_step(10, 5.0, errors=3)  # 1.5% of 200
    assert not judge_step(s, 25.0) and "errors 1.50% > 1%" in s.reason
    assert judge_step(s, 25.0, max_error_rate=0.02)
    s = fake_step(10, 5.0, dropped=4)  # 2% of 200
    assert not judge_step(s, 25.0) and "dropped 2.00% > 1%" in s.reason
    s = fake_step(10, 5.0, errors=200)
    assert not judge_step(s, 25.0, max_error_rate=1.0) and "no request succeeded" in s.reason


def _threshold_runner(limit: float, rates: List[float]):
    def run(rate: float) -> StepResult:
        rates.append(rate)
        return fake_step(rate, 10.0 if rate < limit else 50.0)
    return run


def test_search_grows_then_bisects():
    rates: List[float] = []
    seen: List[int] = []
    r = search_p99(_threshold_runner(300.0, rates), 30.0, start_rate=20.0, precision=0.05, max_steps=20,
                   on_step=lambda i, s: seen.append(i))
    assert rates == [20, 40, 80, 160, 320, 240, 280, 300, 290]
    assert seen == list(range(9))
    assert r.best_qps == 290 and r.best_index == 8 and r.converged
    assert [s.passed for s in r.steps] == [True, True, True, True, False, True, True, False, True]
    assert r.steps[4].reason == "p99 50.00 ms > 30 ms"
    d = r.to_dict()
    assert d["best_qps"] == 290 and d["steps_run"] == 9 and d["bound_ms"] == 30.0 and d["growth"] == 2.0
    text = r.summary()
    assert "highest rate with p99 under 30 ms: 290.00 QPS target (scheduled 290.00" in text and text.count("FAIL") == 2


def test_search_shrinks_when_the_start_fails():
    rates: List[float] = []
    r = search_p99(_threshold_runner(300.0, rates), 30.0, start_rate=1000.0, precision=0.05, max_steps=20)
    assert rates[:3] == [1000, 500, 250]
    assert r.converged and r.best_qps == max(x for x in rates if x < 300)
    hi = min(x for x in rates if x >= 300)
    assert hi - r.best_qps <= 0.05 * r.best_qps and 280 < r.best_qps < 300


def test_search_limits():
    rates: List[float] = []
    r = search_p99(_threshold_runner(1e9, rates), 30.0, start_rate=10.0, max_rate=35.0, max_steps=10)
    assert rates == [10, 20, 35] and r.best_qps == 35 and not r.converged and "maximum rate" in r.note
    rates = []
    r = search_p99(_threshold_runner(0.0, rates), 30.0, start_rate=8.0, min_rate=2.0, max_steps=10)
    assert rates == [8, 4, 2] and r.best_index is None and "minimum rate" in r.note
    assert "no rate tried kept p99 under 30 ms" in r.summary()
    rates = []
    r = search_p99(_threshold_runner(1e9, rates), 30.0, start_rate=1.0, max_steps=3)
    assert rates == [1, 2, 4] and r.best_qps == 4 and "max-steps 3" in r.note
    for kw, match in [(dict(growth=1.0), "growth"), (dict(precision=0.0), "precision"),
                      (dict(max_steps=0), "max_steps"), (dict(start_rate=0.5), "min_rate"),
                      (dict(max_error_rate=2.0), "max_error_rate")]:
        with pytest.raises(ValueError, match=match):
            search_p99(_threshold_runner(1.0, []), 30.0, **kw)
    with pytest.raises(ValueError, match="bound"):
        search_p99(_threshold_runner(1.0, []), 0.0)
