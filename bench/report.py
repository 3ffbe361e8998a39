#!/usr/bin/env python3
"""Markdown tables from the bfpaccel benchmark suite's pytest-benchmark JSON.

Read a finished run:
    pytest bench --benchmark-json=bench/latest.json -q
    python bench/report.py bench/latest.json > tables.md

Or run the suite first, then report (extra pytest arguments after --pytest-args):
    python bench/report.py --run bench/latest.json --pytest-args "-k 3x3" -o tables.md

For every benchmark group (one shape or layer at one thread count) the tables give the median
time, GOP/s (2*M*N*K, or 2*MACs of the convolution, over the median), and the speed of each BFP
format relative to the float32 baseline of the same group and run (numpy for GEMM,
onnxruntime for convolution): ``baseline median / bfp median``, so 2.3x means the BFP kernel
takes 2.3 times less time.  Then the ResNet-50 totals: the sum of the 3x3 layers' medians
(each distinct layer once, and weighted by how often it occurs in the network) and of all 53
convolutions, BFP vs onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from collections import OrderedDict, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional

BENCH_DIR = Path(__file__).resolve().parent
FORMAT_ORDER = ["msfp16", "msfp12", "mxint8", "mxfp4_e2m1"]


# ----------------------------------------------------------------------------- formatting
def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_gops(g: Optional[float]) -> str:
    if g is None:
        return "–"
    return f"{g:.0f}" if g >= 100 else f"{g:.1f}" if g >= 1 else f"{g:.2f}"


def fmt_ratio(r: Optional[float]) -> str:
    if r is None:
        return "–"
    return f"{r:.2f}x" if r < 10 else f"{r:.1f}x"


def table(header: List[str], rows: List[List[str]], align: Optional[List[str]] = None) -> str:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- data
class Row:
    """One benchmark: where it belongs (group, op, shape, threads) and its median."""

    def __init__(self, b: dict):
        ei = b.get("extra_info") or {}
        st = b["stats"]
        self.name = b.get("name", "?")
        self.group = b.get("group") or self.name
        self.op = ei.get("op", "other")
        self.impl = ei.get("impl", self.name)
        self.role = ei.get("role", "bfp")
        self.format = ei.get("format", self.impl)
        self.threads = ei.get("threads")
        self.kernel = ei.get("kernel", "")
        self.shape_index = ei.get("shape_index", 0)
        self.shape = ei.get("shape") or ei.get("layer") or self.group
        self.count = int(ei.get("count", 1))
        self.kh = ei.get("KH")
        self.ops = ei.get("ops")
        self.median = float(st["median"])
        self.iqr = float(st.get("iqr", 0.0))
        self.rounds = st.get("rounds")
        self.extra = ei

    @property
    def gops(self) -> Optional[float]:
        return self.ops / self.median / 1e9 if self.ops else None

    def sort_key(self):
        fo = FORMAT_ORDER.index(self.format) if self.format in FORMAT_ORDER else len(FORMAT_ORDER)
        return (0 if self.role == "baseline" else 1, fo, self.impl)


def load(path: Path) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except ValueError as exc:
        raise SystemExit(f"{path}: not valid JSON ({exc}); was the run interrupted, or did it select no benchmarks?")
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise SystemExit(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' key)")
    return data


def groups_of(rows: List[Row], op: str) -> "OrderedDict[str, List[Row]]":
    sel = sorted((r for r in rows if r.op == op), key=lambda r: (r.shape_index, r.threads or 0, r.sort_key()))
    out: "OrderedDict[str, List[Row]]" = OrderedDict()
    for r in sel:
        out.setdefault(r.group, []).append(r)
    return out


def baseline_of(rows: List[Row]) -> Optional[Row]:
    return next((r for r in rows if r.role == "baseline"), None)


# ----------------------------------------------------------------------------- sections
def _cpu_fallback() -> Dict[str, str]:
    info = {"cpu_model": platform.processor() or platform.machine(), "family": "?", "model": "?", "flags": set()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                k, v = k.strip().lower(), v.strip()
                if k == "model name":
                    info["cpu_model"] = v
                elif k == "cpu family":
                    info["family"] = v
                elif k == "model" and info["model"] == "?":
                    info["model"] = v
                elif k == "flags":
                    info["flags"] = set(v.split())
                    break
    except OSError:
        pass
    return info


def _live_version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return "not installed"


def environment(data: dict, rows: List[Row]) -> str:
    mi = data.get("machine_info", {}) or {}
    bi = mi.get("bfpaccel_bench")
    threads = sorted({r.threads for r in rows if r.threads is not None})
    lines = ["## Environment", ""]
    items = []
    if bi:
        cpu = bi.get("cpu", {}) or {}
        items.append(("CPU", f"{bi.get('cpu_model', '?')} (family {cpu.get('family', '?')}, model {cpu.get('model', '?')})"))
        items.append(("SIMD", ", ".join(cpu.get("isa", [])) or "?"))
        items.append(("logical CPUs", f"{bi.get('logical_cpus', '?')} ({bi.get('usable_cpus', '?')} usable)"))
        kern = bi.get("kernel", "?")
        avail = bi.get("available_kernels") or []
        items.append(("bfpaccel", f"{bi.get('bfpaccel', '?')}, kernel **{kern}** (available: {', '.join(avail) or '?'})"))
        blas = bi.get("blas") or []
        blas_s = "; ".join(f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')})" for b in blas) or "not detected"
        items.append(("numpy", f"{bi.get('numpy', '?')}, BLAS {blas_s}"))
        items.append(("onnxruntime", f"{bi.get('onnxruntime', '?')} (onnx {bi.get('onnx', '?')})"))
        items.append(("pytest-benchmark", f"{bi.get('pytest-benchmark', '?')}, threadpoolctl {bi.get('threadpoolctl', '?')}"))
        if bi.get("env"):
            items.append(("environment", ", ".join(f"{k}={v}" for k, v in bi["env"].items())))
        if bi.get("loadavg_start") or bi.get("loadavg_end"):
            la = lambda v: "/".join(f"{x:g}" for x in v) if v else "?"
            items.append(
                (
                    "load average (1/5/15 min)",
                    f"start {la(bi.get('loadavg_start'))}, end {la(bi.get('loadavg_end'))} "
                    "(the suite itself adds up to its thread count; more means other work shared the CPU)",
                )
            )
        bs, be = bi.get("cpu_busy_start"), bi.get("cpu_busy_end")
        if bs is not None or be is not None:
            pct = lambda v: "?" if v is None else f"{v:.0%}"
            noisy = max(v for v in (bs, be) if v is not None) > 0.1
            items.append(
                (
                    "CPU busy with other work",
                    f"{pct(bs)} before the run, {pct(be)} after"
                    + (" — **other processes shared the CPU: timings are noisy**" if noisy else ""),
                )
            )
        if bi.get("bench_time_s") is not None:
            items.append(("timing", f"≥{bi['bench_time_s']} s of rounds per benchmark, medians"))
    else:
        c = _cpu_fallback()
        isa = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16") if f in c["flags"]]
        items.append(("CPU", f"{c['cpu_model']} (family {c['family']}, model {c['model']}) — read now, not recorded in the JSON"))
        items.append(("SIMD", ", ".join(isa) or "?"))
        items.append(("logical CPUs", str(os.cpu_count())))
        kern = sorted({r.kernel for r in rows if r.role == "bfp" and r.kernel})
        items.append(("bfpaccel", f"{_live_version('bfpaccel')} (installed now), kernel {', '.join(kern) or '?'}"))
        items.append(("numpy", _live_version("numpy") + " (installed now)"))
        items.append(("onnxruntime", _live_version("onnxruntime") + " (installed now)"))
    py = mi.get("python_implementation", "") + " " + mi.get("python_version", platform.python_version())
    items.append(("Python", py.strip()))
    items.append(("threads benched", ", ".join(map(str, threads)) or "?"))
    items.append(("date", str(data.get("datetime", datetime.now().isoformat()))))
    ci = data.get("commit_info") or {}
    if ci.get("id") and ci.get("id") != "unknown":
        items.append(("commit", f"{ci['id'][:12]}{' (dirty)' if ci.get('dirty') else ''}"))
    lines.append(table(["", ""], [[f"**{k}**", v] for k, v in items], ["l", "l"]))
    return "\n".join(lines)


def _group_table(groups: "OrderedDict[str, List[Row]]", first_cols, first_names) -> str:
    header = first_names + ["impl", "median ms", "IQR ms", "GOP/s", "vs baseline"]
    out_rows = []
    for rs in groups.values():
        base = baseline_of(rs)
        for i, r in enumerate(rs):
            ratio = base.median / r.median if base is not None and r is not base else None
            lead = first_cols(r) if i == 0 else [""] * len(first_names)
            vs = "baseline" if r is base else fmt_ratio(ratio)
            out_rows.append(lead + [r.impl, fmt_ms(r.median), fmt_ms(r.iqr), fmt_gops(r.gops), vs])
    return table(header, out_rows, ["l"] * (len(first_names) + 1) + ["r"] * 4)


def gemm_section(rows: List[Row]) -> str:
    groups = groups_of(rows, "gemm")
    if not groups:
        return ""
    return "\n".join(
        [
            "## GEMM: bfp `matmul(a, w_prequantized, fmt)` vs numpy float32 `a @ b`",
            "",
            "Shape is MxKxN; the weight is quantized once, the activation on every call. "
            "`vs baseline` = numpy median / this median (above 1x: faster than numpy).",
            "",
            _group_table(groups, lambda r: [r.shape, str(r.threads)], ["MxKxN", "threads"]),
        ]
    )


def conv_section(rows: List[Row]) -> str:
    groups = groups_of(rows, "conv")
    if not groups:
        return ""

    def lead(r: Row) -> List[str]:
        e = r.extra
        return [f"`{r.shape}`", f"{e.get('out_hw', '?')}²", str(r.count), str(r.threads)]

    return "\n".join(
        [
            "## ResNet-50 convolutions (batch 1, 224x224): bfp `conv2d` vs onnxruntime float32 `Conv`",
            "",
            "Layer names: stage-kernel[stride]-CinToCout-input size; `n` = occurrences in ResNet-50 v1.5. "
            "`vs baseline` = onnxruntime median / this median.",
            "",
            _group_table(groups, lead, ["layer", "out", "n", "threads"]),
        ]
    )


def _totals(rows: List[Row], threads, pred, op: str = "conv"):
    """impl -> (sum of medians, count-weighted sum, layers, a row), over op's rows matching pred."""
    acc: Dict[str, List] = defaultdict(lambda: [0.0, 0.0, set(), None])
    for r in rows:
        if r.op == op and r.threads == threads and pred(r):
            a = acc[r.impl]
            a[0] += r.median
            a[1] += r.median * r.count
            a[2].add(r.shape)
            a[3] = r
    return acc


def resnet_totals(rows: List[Row]) -> (str, List[str]):
    conv = [r for r in rows if r.op == "conv"]
    if not conv:
        return "", []
    layers = {r.shape: r.count for r in conv}
    n3 = {r.shape: r.count for r in conv if r.kh == 3}
    n_convs = sum(layers.values())
    everything = n_convs == 53
    all_label = "all 53 convs" if everything else f"{n_convs} of 53 convs"
    lines = [
        "## ResNet-50 convolution totals",
        "",
        f"Layers benched: {len(layers)} distinct ({n_convs} of the network's 53 convolutions; "
        f"{len(n3)} distinct 3x3 layer{'s' if len(n3) != 1 else ''} = {sum(n3.values())} of 16 3x3 convolutions). "
        "`3x3 sum`: each distinct 3x3 layer once (sum of medians); `3x3 in net`: weighted by "
        f"occurrences in one ResNet-50 pass; `{all_label} in net`: every benched layer weighted by "
        "occurrences (stem, 1x1 and 3x3 convolutions only: no pooling, residual adds or classifier). "
        "Ratios: onnxruntime / bfp (above 1x: bfp faster). A total over fewer layers than the "
        "baseline's is marked *partial*.",
        "",
    ]
    header = ["threads", "impl", "3x3 sum ms", "vs ort", "3x3 in net ms", "vs ort", f"{all_label} in net ms", "vs ort"]
    trows, headlines = [], []
    for t in sorted({r.threads for r in conv}):
        t3 = _totals(conv, t, lambda r: r.kh == 3)
        tall = _totals(conv, t, lambda r: True)
        impls = sorted(tall, key=lambda i: tall[i][3].sort_key())
        base = next((i for i in impls if tall[i][3].role == "baseline"), None)
        for impl in impls:
            cells = [str(t), impl]
            for tot, idx in ((t3, 0), (t3, 1), (tall, 1)):
                if impl not in tot:
                    cells += ["–", "–"]
                    continue
                v = tot[impl][idx]
                partial = base is not None and tot[impl][2] != tot.get(base, [0, 0, set()])[2]
                cells.append(fmt_ms(v) + (" *partial*" if partial else ""))
                if base is None or impl == base or base not in tot:
                    cells.append("baseline" if impl == base else "–")
                else:
                    cells.append(fmt_ratio(tot[base][idx] / v))
            trows.append(cells)
            if base and impl != base and impl in t3 and base in t3:
                headlines.append(
                    f"{impl} ResNet-50 3x3 convs, {t} thread{'s' if t > 1 else ''}: "
                    f"{fmt_ms(t3[impl][1])} ms per image vs onnxruntime fp32 {fmt_ms(t3[base][1])} ms "
                    f"= {fmt_ratio(t3[base][1] / t3[impl][1])}; {all_label} {fmt_ms(tall[impl][1])} ms vs "
                    f"{fmt_ms(tall[base][1])} ms = {fmt_ratio(tall[base][1] / tall[impl][1])}"
                )
    lines.append(table(header, trows, ["l", "l"] + ["r"] * 6))
    return "\n".join(lines), headlines


def gemm_headlines(rows: List[Row]) -> List[str]:
    out = []
    for rs in groups_of(rows, "gemm").values():
        r0 = rs[0]
        m, k, n = (r0.extra.get(x) for x in ("M", "K", "N"))
        if not (m == k == n):
            continue
        base = baseline_of(rs)
        for r in rs:
            if r is base:
                continue
            t = r.threads
            s = f"{r.impl} GEMM {m}^3, {t} thread{'s' if t != 1 else ''}: {fmt_gops(r.gops)} GOP/s"
            if base is not None:
                s += f" = {fmt_ratio(base.median / r.median)} numpy fp32 ({fmt_gops(base.gops)} GFLOP/s)"
            out.append(s)
    return out


def mobilenet_section(rows: List[Row]) -> str:
    """The MobileNetV2 blocks (bench/test_bench_mobilenet.py): per block, then totals weighted by
    each block's occurrences in the network (17 blocks, the stem and the head)."""
    groups = groups_of(rows, "mbv2")
    if not groups:
        return ""

    def lead(r: Row) -> List[str]:
        return [f"`{r.shape}`", f"{r.extra.get('out_hw', '?')}²", str(r.count), str(r.threads)]

    lines = [
        "## MobileNetV2 blocks (batch 1, 224x224): the BFP session vs onnxruntime float32, same model",
        "",
        "Block names: b<stage>-t<expansion>[s<stride>]-CinToCout-input size (expansion 1x1 + ReLU6, 3x3 "
        "depthwise + ReLU6, projection 1x1, residual add where the shape stays); the stem and the head are "
        "plain convs. `n` = occurrences in MobileNetV2. `vs baseline` = onnxruntime median / this median.",
        "",
        _group_table(groups, lead, ["block", "out", "n", "threads"]),
        "",
    ]
    trows = []
    mb = [r for r in rows if r.op == "mbv2"]
    for t in sorted({r.threads for r in mb if r.threads is not None}):
        acc = _totals(mb, t, lambda r: True, op="mbv2")
        impls = sorted(acc, key=lambda i: acc[i][3].sort_key())
        base = next((i for i in impls if acc[i][3].role == "baseline"), None)
        for impl in impls:
            partial = base is not None and acc[impl][2] != acc[base][2]
            ratio = "baseline" if impl == base else (fmt_ratio(acc[base][1] / acc[impl][1]) if base else "–")
            trows.append([str(t), impl, str(len(acc[impl][2])),
                          fmt_ms(acc[impl][1]) + (" *partial*" if partial else ""), ratio])
    lines.append("Totals: every benched block weighted by its occurrences (convolutions, activations and "
                 "residual adds; no pooling or classifier).")
    lines.append("")
    lines.append(table(["threads", "impl", "blocks", "in net ms", "vs ort"], trows, ["l", "l", "r", "r", "r"]))
    return "\n".join(lines)


def other_section(rows: List[Row]) -> str:
    other = [r for r in rows if r.op not in ("gemm", "conv", "mbv2")]
    if not other:
        return ""
    body = [[r.group, r.name, fmt_ms(r.median), fmt_gops(r.gops)] for r in other]
    return "## Other benchmarks\n\n" + table(["group", "name", "median ms", "GOP/s"], body)


def report(data: dict, source: str) -> str:
    rows = [Row(b) for b in data["benchmarks"]]
    parts = [f"# bfpaccel benchmarks\n\nFrom `{source}`: {len(rows)} benchmarks.", environment(data, rows)]
    totals, conv_heads = resnet_totals(rows)
    heads = gemm_headlines(rows) + conv_heads
    if heads:
        parts.append("## Headlines\n\n" + "\n".join(f"- {h}" for h in heads))
    for sec in (gemm_section(rows), totals, conv_section(rows), mobilenet_section(rows), other_section(rows)):
        if sec:
            parts.append(sec)
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="report.py",
        description="Markdown tables (median ms, GOP/s, bfp vs baseline, ResNet-50 totals) from the "
        "bfpaccel benchmark suite's pytest-benchmark JSON.",
        epilog="examples:\n"
        "  pytest bench --benchmark-json=bench/latest.json -q && python bench/report.py bench/latest.json > tables.md\n"
        "  python bench/report.py --run bench/latest.json --pytest-args '-k \"3x3 or M1024\"' -o tables.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("json", type=Path, help="pytest-benchmark JSON to read (with --run: to write first)")
    ap.add_argument("--run", action="store_true", help="run `pytest bench --benchmark-json=JSON -q` first")
    ap.add_argument("--pytest-args", default="", help="extra arguments for pytest with --run, one shell-quoted string")
    ap.add_argument("-o", "--output", type=Path, help="write the markdown here instead of stdout")
    args = ap.parse_args(argv)

    rc = 0
    if args.run:
        cmd = [sys.executable, "-m", "pytest", str(BENCH_DIR), f"--benchmark-json={args.json.resolve()}", "-q"]
        cmd += shlex.split(args.pytest_args)
        print("running:", " ".join(shlex.quote(c) for c in cmd), file=sys.stderr)
        if args.json.exists():
            args.json.unlink()  # never report a stale file from an earlier run
        rc = subprocess.call(cmd, cwd=BENCH_DIR.parent)
        if rc != 0:
            print(f"pytest exited with {rc}", file=sys.stderr)
        if not args.json.exists() or args.json.stat().st_size == 0:
            print(f"{args.json} was not written (no benchmark ran?); nothing to report", file=sys.stderr)
            return rc or 1
    if not args.json.exists():
        ap.error(f"{args.json} does not exist (run the suite first, or pass --run)")
    data = load(args.json)
    if not data["benchmarks"]:
        print(f"{args.json} holds no benchmarks", file=sys.stderr)
        return rc or 1
    text = report(data, str(args.json))
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
