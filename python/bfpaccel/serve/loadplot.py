"""PNG charts of ``bfpaccel loadtest --png``, drawn with matplotlib's Agg canvas (imported only
here, when a chart is asked for; the global pyplot backend is left alone).

* a search: latency percentiles (from the schedule) against the offered rate, passing and
  failing steps marked, the bound as a line;
* a single run: a latency histogram and latency over time (errors marked).

Example:
    >>> from bfpaccel.serve.loadgen import run_open
    >>> plot_step(run_open(lambda: "OK", 100.0, 0.2), "/tmp/run.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from typing import Any, Tuple

import numpy as np

from .loadgen import SearchResult, StepResult

__all__ = ["plot_step", "plot_search", "require_matplotlib"]

_MAX_POINTS = 100_000


def require_matplotlib() -> Tuple[Any, Any]:
    """``(Figure, FigureCanvasAgg)``; ImportError saying how to install matplotlib when it is missing.

    Example:
        >>> Figure, Canvas = require_matplotlib()  # doctest: +SKIP
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"--png needs matplotlib ({e}): pip install matplotlib, or 'bfpaccel[loadtest]'") from None
    return Figure, FigureCanvasAgg


def _figure(rows: int, cols: int, size: Tuple[float, float]) -> Tuple[Any, Any]:
    Figure, FigureCanvasAgg = require_matplotlib()
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Any, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OSError(f"cannot write {path}: folder {folder} does not exist")
    fig.savefig(path, format="png")


def plot_step(step: StepResult, path: str, title: str = "") -> None:
    """Draws one run: latency histogram (from schedule and from send) and latency over time.

    Example:
        >>> plot_step(step, "run.png", "poisson 50 QPS")  # doctest: +SKIP
    """
    fig, ax = _figure(1, 2, (12, 4.5))
    h, ts = ax[0][0], ax[0][1]
    ok = step.ok_mask
    lat = (step.end_s - step.sched_s)[ok] * 1000.0
    svc = (step.end_s - step.send_s)[ok] * 1000.0
    if lat.size:
        hi = float(max(lat.max(), svc.max()))
        bins = np.linspace(0.0, hi * 1.02 if hi > 0 else 1.0, 60)
        if step.target_qps is not None:
            h.hist(lat, bins=bins, alpha=0.6, label="from scheduled send")
        h.hist(svc, bins=bins, alpha=0.6, label="from actual send")
        for q, style in ((50, ":"), (99, "--")):
            v = float(np.percentile(lat, q))
            h.axvline(v, color="k", linestyle=style, linewidth=1, label=f"p{q} {v:.1f} ms")
        h.legend(fontsize=8)
    else:
        h.text(0.5, 0.5, "no successful request", ha="center", va="center", transform=h.transAxes)
    h.set_xlabel("latency (ms)")
    h.set_ylabel("requests")
    h.set_title("latency histogram")
    when = step.send_s[ok]
    shown = lat
    if lat.size > _MAX_POINTS:  # a scatter of millions of points takes minutes: a seeded sample
        pick = np.sort(np.random.default_rng(0).choice(lat.size, _MAX_POINTS, replace=False))
        when, shown = when[pick], lat[pick]
    ts.scatter(when, shown, s=4, label="ok" if shown.size == lat.size else f"ok (sample of {shown.size})")
    bad = ~ok & ~np.isnan(step.send_s)
    if bad.any():
        ts.scatter(step.send_s[bad], (step.end_s - step.sched_s)[bad] * 1000.0, s=10, marker="x", color="red",
                   label=f"errors ({int(bad.sum())})")
    if step.dropped:
        dropped = np.isnan(step.send_s)
        ts.plot(step.sched_s[dropped], np.zeros(int(dropped.sum())), "|", color="orange",
                label=f"dropped ({step.dropped})")
    ts.set_xlabel("send time (s from the start)")
    ts.set_ylabel("latency from scheduled send (ms)" if step.target_qps is not None else "latency (ms)")
    ts.set_title("latency over time")
    if lat.size or bad.any() or step.dropped:
        ts.legend(fontsize=8)
    rate = "closed loop" if step.target_qps is None else f"{step.mode} {step.target_qps:g} QPS"
    fig.suptitle(title or f"bfpaccel loadtest: {rate}, achieved {step.achieved_qps:.1f} QPS")
    _save(fig, path)


def plot_search(search: SearchResult, path: str, title: str = "") -> None:
    """Draws a p99-bound search: p50/p90/p99 (from schedule) against the offered rate.

    Example:
        >>> plot_search(result, "search.png")  # doctest: +SKIP
    """
    fig, ax = _figure(1, 1, (8, 5))
    a = ax[0][0]
    steps = sorted(search.steps, key=lambda s: s.target_qps or 0.0)
    x = np.array([s.target_qps for s in steps], dtype=float)
    any_ok = False
    for name, style in (("p50_ms", "o:"), ("p90_ms", "s--"), ("p99_ms", "D-")):
        y = np.array([getattr(s.latency, name) for s in steps], dtype=float)
        good = ~np.isnan(y)
        if good.any():
            any_ok = True
            a.plot(x[good], y[good], style, label=name.replace("_ms", ""), markersize=4)
    fails = [s for s in steps if s.passed is False and not math.isnan(s.latency.p99_ms)]
    if fails:
        a.plot([s.target_qps for s in fails], [s.latency.p99_ms for s in fails], "x", color="red", markersize=10,
               label="failed step")
    a.axhline(search.bound_ms, color="k", linewidth=1, label=f"p99 bound {search.bound_ms:g} ms")
    if search.best_index is not None:
        b = search.steps[search.best_index]
        a.axvline(b.target_qps, color="green", linestyle="--", linewidth=1, label=f"best {b.target_qps:.1f} QPS")
    if any_ok:
        from matplotlib.ticker import LogFormatter

        a.set_yscale("log")  # plain numbers, not 6x10^1; minor ticks labelled when the range is narrow
        a.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        a.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    a.set_xlabel("offered rate (target QPS of the step)")
    a.set_ylabel("latency from scheduled send (ms)")
    a.legend(fontsize=8)
    fig.suptitle(title or "bfpaccel loadtest: p99-bound search")
    _save(fig, path)
