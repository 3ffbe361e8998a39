"""What the gRPC server adds to a Predict, and whether it holds a steady load.

    python bench/serving_overhead.py [--plan PATH.bfpplan] [--runs 50] [--duration 60]

1. Round trip: the same JPEG scored in-process (``Predictor.predict_images``: decode, the seed's
   preprocessing, the plan) and through the server on loopback (``PredictionClient.score_file``),
   interleaved in one run; prints both p50/p90 and the difference.
2. Load: ``bfpaccel.serve.loadtest`` at concurrency 8 for ``--duration`` seconds; prints QPS,
   latency percentiles and errors by code.

Without ``--plan`` a small CNN plan with the seed's image front is built (no TensorFlow).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default=None)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="server model instances (default 2)")
    args = ap.parse_args()

    import bfpaccel
    from bfpaccel.serve import loadtest
    from bfpaccel.serve.server import serve
    from bfpaccel.serve.testing import build_tiny_plan, make_image

    work = tempfile.mkdtemp(prefix="bfpaccel-serving-")
    plan = args.plan or build_tiny_plan(os.path.join(work, "tiny.bfpplan"))
    jpeg = os.path.join(work, "img.jpg")
    with open(jpeg, "wb") as f:
        f.write(make_image("jpeg", (320, 240)))
    data = open(jpeg, "rb").read()
    plan_obj = bfpaccel.load_plan(plan)  # one Plan: in-process and server share the packed weights
    pred = bfpaccel.Predictor(plan_obj)
    out = pred.output_names[0]
    with serve({"model": plan_obj}, port=0, block=False, workers=args.workers) as handle:
        handle.wait_ready(120)
        client = bfpaccel.PredictionClient("127.0.0.1", handle.port)
        local, remote = [], []
        for _ in range(3):
            pred.predict_images([data])
            client.score_file(jpeg, outputs=out)
        for _ in range(args.runs):
            t = time.perf_counter()
            pred.predict_images([data])
            local.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            client.score_file(jpeg, outputs=out)
            remote.append((time.perf_counter() - t) * 1e3)
        p50l, p50r = statistics.median(local), statistics.median(remote)
        q = lambda v: sorted(v)[int(0.9 * (len(v) - 1))]  # noqa: E731
        print(f"plan {os.path.basename(plan)}, {args.runs} interleaved runs, {time.strftime('%Y-%m-%d %H:%M')}")
        print(f"  in-process predict_images : p50 {p50l:7.2f} ms  p90 {q(local):7.2f} ms")
        print(f"  gRPC score_file (loopback): p50 {p50r:7.2f} ms  p90 {q(remote):7.2f} ms")
        print(f"  serving overhead at p50   : {p50r - p50l:+.2f} ms")
        rep = loadtest.run("127.0.0.1", handle.port, jpeg, concurrency=args.concurrency, duration=args.duration)
        print(rep.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
