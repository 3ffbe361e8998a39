"""Batch-1 latency of a whole model: the BFP plan vs onnxruntime float32 and int8 (same ONNX,
same input, same threads), interleaved so drift of a shared machine hits every backend alike.

    python bench/models_latency.py --model resnet50 --threads 2 --runs 20
    python bench/models_latency.py --model /path/model.onnx --formats msfp16,msfp12

Zoo models are built the seed's way with random seeded weights (bfpaccel.models.zoo; cached
in ~/.cache/bfpaccel/models) -- latency does not depend on the weights' values.  Prints a
Markdown table (median / p90 in ms and the ratio to onnxruntime float32).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--formats", default="msfp16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20, help="timed runs per backend (interleaved rounds)")
    ap.add_argument("--no-int8", action="store_true", help="skip onnxruntime's int8 model")
    args = ap.parse_args()

    import onnxruntime

    import bfpaccel
    from bfpaccel.accuracy import resolve_model
    from bfpaccel.baselines import ort_int8_model, ort_session

    path, note = resolve_model(args.model, log=lambda m: print(m, file=sys.stderr))
    bfpaccel.set_num_threads(args.threads)
    sess32 = ort_session(path, args.threads)
    inp = sess32.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in inp.shape]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 50).astype(np.float32)
    backends = {"onnxruntime fp32": lambda: sess32.run(None, {inp.name: x})}
    if not args.no_int8:
        q = path[:-5] + ".int8.onnx"
        if not os.path.isfile(q):
            calib = [(rng.standard_normal(shape) * 50).astype(np.float32) for _ in range(4)]
            ort_int8_model(path, q, calib)
        s8 = ort_session(q, args.threads)
        backends["onnxruntime int8 (QDQ U8S8)"] = lambda: s8.run(None, {inp.name: x})
    for fmt in args.formats.split(","):
        s = bfpaccel.Session(bfpaccel.compile(path, format=fmt))
        backends[f"bfpaccel {fmt}"] = (lambda s=s: s.run(None, {inp.name: x}))
    times = {k: [] for k in backends}
    for fn in backends.values():
        for _ in range(3):
            fn()
    rounds = max(1, args.runs // 5)  # rounds of 5 runs per backend, backends interleaved
    for _ in range(rounds):
        for k, fn in backends.items():
            time.sleep(1.0)  # let the other runtime's spinning thread pool go idle first
            for _ in range(5):
                t = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t) * 1e3)
    base = statistics.median(times["onnxruntime fp32"])
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\n{args.model} ({note}), batch 1, input {shape}, {args.threads} threads, {cpu}, "
          f"bfpaccel {bfpaccel.__version__} kernel {bfpaccel.get_kernel()}, onnxruntime {onnxruntime.__version__}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| backend | median ms | p90 ms | speed vs onnxruntime fp32 |")
    print("|---|---|---|---|")
    for k, v in times.items():
        v = sorted(v)
        med = statistics.median(v)
        print(f"| {k} | {med:.1f} | {v[int(0.9 * (len(v) - 1))]:.1f} | {base / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
