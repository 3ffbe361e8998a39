"""msfp16 GEMM 1024x1024x1024 on each SIMD kernel vs numpy float32, same run.

    python bench/gemm_vs_numpy.py [--size 1024] [--reps 15] [--kernels avx512 amx] [--tile-scaling fma]

The weight is quantized once (as the runtime does); "per call" also quantizes the activation
inside every call, "prequantized" passes both operands quantized. numpy's BLAS is limited to the
same thread count (threadpoolctl). Minimum of ``reps`` calls, two rounds; GOP/s = 2*M*N*K / t.
``--tile-scaling`` picks how the AVX-512 tiles scale block sums (``fma`` or ``add_pipes``, the
same bits; default: this CPU's choice).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

import bfpaccel


def best(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kernels", nargs="+", default=[k for k in ("avx2", "avx512", "amx")
                                                     if k in bfpaccel.available_kernels()])
    ap.add_argument("--tile-scaling", choices=["auto", "fma", "add_pipes"], default="auto")
    args = ap.parse_args()
    print(f"AVX-512 tile scaling: {bfpaccel._core._tile_scaling(args.tile_scaling)}")
    n = args.size
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    for nt in args.threads:
        res = {}
        with threadpool_limits(nt):
            for _ in range(2):
                res["numpy fp32"] = best(lambda: a @ b, args.reps)
                for k in args.kernels:
                    with bfpaccel._core.ExecOptions(k, nt):
                        wq = bfpaccel.quantize(b, "msfp16", axis=0)
                        aq = bfpaccel.quantize(a, "msfp16", axis=1)
                        res[f"{k} per call"] = best(lambda: bfpaccel.matmul(a, wq, "msfp16"), args.reps)
                        res[f"{k} prequantized"] = best(lambda: bfpaccel.matmul(aq, wq, "msfp16"), args.reps)
        base = res["numpy fp32"]
        for name, t in res.items():
            print(f"threads={nt} {name:22s} {t * 1e3:8.2f} ms {2 * n ** 3 / t / 1e9:7.0f} GOP/s  {base / t:5.2f}x numpy")


if __name__ == "__main__":
    main()
