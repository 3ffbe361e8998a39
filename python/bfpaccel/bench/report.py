"""Reading a ``bfpaccel bench`` result: a text table, a Markdown table, a PNG plot (p50 bars
with p99 whiskers, latency CDFs) and the changes between two results.

Example:
    >>> import json  # doctest: +SKIP
    >>> r = json.load(open("bench.json"))  # doctest: +SKIP
    >>> print(format_table(r))  # doctest: +SKIP
    >>> plot(r, "bench.png")  # doctest: +SKIP
    >>> print(compare(json.load(open("old.json")), r))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import textwrap
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["format_table", "format_markdown", "plot", "compare", "compare_rows", "load_result", "describe_run",
           "NOISE"]

#: Changes of p50 smaller than this share are reported as "same" by ``compare``.
NOISE = 0.05


def load_result(path: str) -> Dict[str, Any]:
    """A result JSON written by ``bfpaccel bench --json``; ValueError if it is not one.

    Example:
        >>> load_result("bench.json")["schema"]  # doctest: +SKIP
        'bfpaccel.bench/1'
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"result file {path!r} does not exist")
    with open(path) as f:
        try:
            r = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(r, dict) or not str(r.get("schema", "")).startswith("bfpaccel.bench/") or "backends" not in r:
        raise ValueError(f"{path} is not a bfpaccel bench result (no 'schema': 'bfpaccel.bench/...')")
    return r


def _f(v: Optional[float], digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def describe_run(r: Dict[str, Any]) -> List[str]:
    """Header lines: model, input, machine, versions, settings."""
    m, env, s = r["model"], r["env"], r["settings"]
    libs = ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items() if k != "python")
    shape = ["N" if not isinstance(d, int) or d <= 0 else d for d in m.get("input_shape") or []]
    simd = " ".join(env.get("cpu", {}).get("simd", []))
    if env.get("cpu", {}).get("isa_mask"):
        simd += f"; emulated {env['cpu']['isa_mask']} (bench/isa_mask)"
    return [
        f"model {m['name']} ({m.get('weights', '')}), input {m.get('input_name')} {shape}",
        f"{env.get('cpu', {}).get('model', '?')} [{simd}], {env.get('threads')} threads, bfpaccel kernel "
        f"{env.get('kernel')}; {libs}; {env.get('date', '')}",
        f"{s['warmup']} warm-up + {s['runs']} timed runs per backend and batch, interleaved in blocks of "
        f"{s['block']} with {s['pause_s']} s pauses; load average {env.get('loadavg_start')} -> "
        f"{env.get('loadavg_end')}; wall {r.get('wall_s')} s",
    ]


def _by_batch(r: Dict[str, Any]) -> Dict[int, List[Dict[str, Any]]]:
    out: Dict[int, List[Dict[str, Any]]] = {}
    for e in r["backends"]:
        out.setdefault(int(e["batch"]), []).append(e)
    return out


def _share(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{100 * v:.1f}%"


def _row_cells(e: Dict[str, Any], share: bool = True) -> Optional[List[str]]:
    lat = e.get("latency_ms")
    if e["status"] in ("ok", "estimate") and lat:
        est = e["status"] == "estimate"
        ratio = e.get("ratio_vs_onnxruntime")
        ref = e["name"] == "onnxruntime"
        rel = e.get("output_rel_err")
        cells = [_f(lat["p50"]), "-" if est else _f(lat["p90"]), "-" if est else _f(lat["p99"]),
                 "-" if est else _f(lat["mean"]), _f(e.get("throughput_per_s"), 1),
                 "1.00x" if ref else ("-" if ratio is None else f"{ratio:.2f}x" + ("*" if est else "")),
                 "ref" if ref else ("-" if rel is None else f"{rel:.1e}")]
        return cells + [_share(e.get("kernel_share"))] if share else cells
    return None


_HEAD = ["p50 ms", "p90 ms", "p99 ms", "mean ms", "items/s", "vs ort fp32", "out rel err"]
#: the BFP rows' share of time in the integer GEMM kernel ("-" for other rows and old results)
_SHARE_HEAD = "kernel share"
_SHARE_NOTE = ("kernel share: the part of a bfp: row's time spent in the integer GEMM kernel "
               "(a stem conv's fp32 block sums included; Session.profile_summary after the timed runs)")


def _has_share(r: Dict[str, Any]) -> bool:
    """True for results that record the kernel share (older results do not)."""
    return any("kernel_share" in e for e in r["backends"])


def format_table(r: Dict[str, Any]) -> str:
    """The result as a readable text table, one block per batch size.

    Example:
        >>> print(format_table(result))  # doctest: +SKIP
    """
    lines = describe_run(r)
    width = max([len(e["label"]) for e in r["backends"]] + [8]) + 2
    any_est = False
    widths = [12] * len(_HEAD) + [14]
    for batch, rows in _by_batch(r).items():
        lines += ["", f"batch {batch}",
                  f"{'backend':<{width}}" + "".join(f"{h:>{w}}" for h, w in zip(_HEAD + [_SHARE_HEAD], widths))]
        lines.append("-" * len(lines[-1]))
        for e in rows:
            cells = _row_cells(e)
            if cells is None:
                lines.append(f"{e['label']:<{width}}{e['status']}: {e.get('reason') or ''}")
            else:
                any_est |= e["status"] == "estimate"
                lines.append(f"{e['label']:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    lines += ["", "vs ort fp32: speed-up over onnxruntime float32 on the CPU (its p50 / this p50; > 1 is faster); "
              "out rel err: ||y - y_ort|| / ||y_ort|| of the first output", _SHARE_NOTE]
    if any_est:
        lines.append("*: an estimate of the FPGA NPU from bfpaccel.perfmodel, not a measurement on this machine")
    return "\n".join(lines)


def format_markdown(r: Dict[str, Any]) -> str:
    """The result as Markdown (header lines and one table per batch size).

    Example:
        >>> print(format_markdown(result))  # doctest: +SKIP
    """
    head = describe_run(r)
    kernel = r["settings"].get("kernel")
    lines = [f"`bfpaccel bench --model {r['model']['name']} --batch "
             f"{','.join(str(b) for b in r['settings']['batches'])} --threads {r['settings']['threads']} "
             + (f"--kernel {kernel} " if kernel else "")
             + f"--warmup {r['settings']['warmup']} --runs {r['settings']['runs']}`", ""]
    lines += [h + "  " for h in head]
    any_est = False
    share = _has_share(r)  # results older than the column keep their table as it was
    cols = _HEAD + ([_SHARE_HEAD] if share else [])
    for batch, rows in _by_batch(r).items():
        lines += ["", f"| batch {batch} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for e in rows:
            cells = _row_cells(e, share)
            if cells is None:
                reason = (e.get("reason") or "").replace("|", "\\|")
                lines.append(f"| {e['label']} | {e['status']}: {reason} |" + " |" * (len(cols) - 1))
            else:
                any_est |= e["status"] == "estimate"
                lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    lines += ["", "vs ort fp32: onnxruntime float32's p50 / this p50 (> 1: faster). out rel err: "
              "‖y − y_ort‖ / ‖y_ort‖ of the first output." + (f" {_SHARE_NOTE}." if share else "")]
    if any_est:
        lines[-1] += " \\*: estimate from `bfpaccel.perfmodel`, not measured."
    return "\n".join(lines)


# ----- plot ----------------------------------------------------------------------------
def plot(r: Dict[str, Any], path: str) -> str:
    """A PNG: per batch size, bars of p50 latency with whiskers to p99 (estimates hatched) and
    the latency CDF of each measured backend.  Needs matplotlib (Agg backend, no display).

    Example:
        >>> plot(result, "bench.png")  # doctest: +SKIP
        'bench.png'
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_batch(r)
    nb = len(groups)
    fig, axes = plt.subplots(2, nb, figsize=(max(7.0, 6.5 * nb), 9.0), squeeze=False)
    cmap = plt.get_cmap("tab10")
    labels = list(dict.fromkeys(e["label"] for e in r["backends"]))
    color = {lab: cmap(i % 10) for i, lab in enumerate(labels)}
    for col, (batch, rows) in enumerate(groups.items()):
        ax, cdf = axes[0][col], axes[1][col]
        shown = [e for e in rows if e.get("latency_ms") and e["status"] in ("ok", "estimate")]
        missing = [e for e in rows if e not in shown]
        xs = list(range(len(shown)))
        p50 = [e["latency_ms"]["p50"] for e in shown]
        up = [max(e["latency_ms"]["p99"] - e["latency_ms"]["p50"], 0.0) for e in shown]
        bars = ax.bar(xs, p50, yerr=[[0.0] * len(shown), up], capsize=5,
                      color=[color[e["label"]] for e in shown], edgecolor="black", linewidth=0.6)
        for bar_, e in zip(bars, shown):
            if e["status"] == "estimate":
                bar_.set_hatch("//")
                bar_.set_alpha(0.6)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{e['label']}{' *' if e['status'] == 'estimate' else ''}\n"
                            f"p50 {e['latency_ms']['p50']:.3g} ms" for e in shown], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("latency ms (bar p50, whisker p99)")
        ax.set_title(f"{os.path.basename(r['model']['name'])}, batch {batch}, {r['env'].get('threads')} threads")
        if p50 and min(p50) > 0 and max(p50) / min(p50) > 30:
            ax.set_yscale("log")
        if missing:
            ax.set_xlabel(textwrap.fill("not run: " + "; ".join(f"{e['label']} ({e['status']})" for e in missing),
                                        110), fontsize=7)
        for e in shown:
            if e["status"] == "estimate":
                cdf.axvline(e["latency_ms"]["p50"], color=color[e["label"]], linestyle="--",
                            label=e["label"] + " *")
                continue
            v = sorted(e.get("samples_ms") or [])
            if not v:
                continue
            y = [0.0] + [(i + 1) / len(v) for i in range(len(v))]
            cdf.step([v[0]] + v, y, where="post", color=color[e["label"]], label=e["label"])
        cdf.set_xlabel("latency ms")
        cdf.set_ylabel("fraction of runs <=")
        cdf.set_ylim(0, 1.02)
        cdf.set_title(f"latency CDF, batch {batch}")
        if any(e["status"] == "ok" for e in shown):
            lats = [e["latency_ms"]["p50"] for e in shown]
            if min(lats) > 0 and max(lats) / min(lats) > 30:
                cdf.set_xscale("log")
        cdf.grid(alpha=0.3)
        if shown:
            cdf.legend(fontsize=7, loc="best")
    env = r["env"]
    fig.suptitle(f"bfpaccel bench: {env.get('cpu', {}).get('model', '?')}, kernel {env.get('kernel')}, "
                 f"{env.get('date', '')}  (* estimate, not measured)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


# ----- compare -------------------------------------------------------------------------
def _key(e: Dict[str, Any]) -> Tuple[str, int]:
    return e["name"], int(e["batch"])


def compare_rows(a: Dict[str, Any], b: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per (backend, batch): status and p50 in ``a`` and ``b``, and the change of p50
    (``change``: b/a - 1; negative is faster) with a verdict (``faster``/``slower``/``same``
    within :data:`NOISE`), and the BFP rows' kernel share in each (``kernel_share_a/b``; None
    for other rows and for results older than the field)."""
    ea = {_key(e): e for e in a["backends"]}
    eb = {_key(e): e for e in b["backends"]}
    out: List[Dict[str, Any]] = []
    for k in list(ea) + [k for k in eb if k not in ea]:
        x, y = ea.get(k), eb.get(k)
        row: Dict[str, Any] = {"name": k[0], "batch": k[1], "label": (y or x or {}).get("label", k[0]),
                               "status_a": x["status"] if x else "absent", "status_b": y["status"] if y else "absent",
                               "p50_a": None, "p50_b": None, "change": None, "verdict": None,
                               "ratio_a": x.get("ratio_vs_onnxruntime") if x else None,
                               "ratio_b": y.get("ratio_vs_onnxruntime") if y else None,
                               "kernel_share_a": x.get("kernel_share") if x else None,
                               "kernel_share_b": y.get("kernel_share") if y else None}
        if x and x.get("latency_ms"):
            row["p50_a"] = x["latency_ms"]["p50"]
        if y and y.get("latency_ms"):
            row["p50_b"] = y["latency_ms"]["p50"]
        if row["p50_a"] and row["p50_b"]:
            ch = row["p50_b"] / row["p50_a"] - 1.0
            row["change"] = round(ch, 4)
            row["verdict"] = "same" if abs(ch) < NOISE else ("faster" if ch < 0 else "slower")
        out.append(row)
    return out


def _env_changes(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    ea, eb = a.get("env", {}), b.get("env", {})
    changes = []
    pairs = [("CPU", ea.get("cpu", {}).get("model"), eb.get("cpu", {}).get("model")),
             ("SIMD", " ".join(ea.get("cpu", {}).get("simd", [])), " ".join(eb.get("cpu", {}).get("simd", []))),
             ("threads", ea.get("threads"), eb.get("threads")), ("kernel", ea.get("kernel"), eb.get("kernel")),
             ("model", a.get("model", {}).get("name"), b.get("model", {}).get("name"))]
    la, lb = ea.get("libraries", {}), eb.get("libraries", {})
    pairs += [(k, la.get(k), lb.get(k)) for k in dict.fromkeys(list(la) + list(lb))]
    for what, x, y in pairs:
        if x != y:
            changes.append(f"{what}: {x} -> {y}")
    return changes


def compare(a: Dict[str, Any], b: Dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """Per-backend changes from result ``a`` to result ``b`` as a text table, with what changed
    in the environment (CPU, threads, kernel, library versions) first.

    Example:
        >>> print(compare(load_result("before.json"), load_result("after.json")))  # doctest: +SKIP
    """
    lines = [f"A = {name_a} ({a.get('env', {}).get('date', '?')})", f"B = {name_b} ({b.get('env', {}).get('date', '?')})"]
    env = _env_changes(a, b)
    lines.append("environment changes: " + ("; ".join(env) if env else "none"))
    rows = compare_rows(a, b)
    share = _has_share(a) or _has_share(b)
    width = max([len(r["label"]) for r in rows] + [8]) + 2
    head = (f"{'backend':<{width}}{'batch':>6}{'p50 A ms':>11}{'p50 B ms':>11}{'change':>9}  {'verdict':<8}"
            f"{'vs ort A':>10}{'vs ort B':>10}" + (f"{'share A':>9}{'share B':>9}" if share else ""))
    lines += ["", head, "-" * len(head)]
    for r in rows:
        shares = f"{_share(r['kernel_share_a']):>9}{_share(r['kernel_share_b']):>9}" if share else ""
        if r["p50_a"] is None or r["p50_b"] is None:
            sa = _f(r["p50_a"]) if r["p50_a"] is not None else r["status_a"]
            sb = _f(r["p50_b"]) if r["p50_b"] is not None else r["status_b"]
            lines.append(f"{r['label']:<{width}}{r['batch']:>6}{sa:>11}{sb:>11}{'':>9}  {'-':<8}"
                         + (f"{'':>20}{shares}" if share else ""))
            continue
        ra = "-" if r["ratio_a"] is None else f"{r['ratio_a']:.2f}x"
        rb = "-" if r["ratio_b"] is None else f"{r['ratio_b']:.2f}x"
        lines.append(f"{r['label']:<{width}}{r['batch']:>6}{r['p50_a']:>11.2f}{r['p50_b']:>11.2f}"
                     f"{100 * r['change']:>+8.1f}%  {r['verdict']:<8}{ra:>10}{rb:>10}{shares}")
    lines += ["", f"change: p50 B / p50 A - 1 (negative: B is faster); 'same' within {100 * NOISE:.0f}%"
              + ("; share: the bfp: rows' kernel share ('-': not recorded)" if share else "")]
    return "\n".join(lines)
