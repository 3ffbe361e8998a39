"""AMX vs AVX-512 (VNNI) kernel: msfp16 GEMM and ResNet-50-like convs, same run, interleaved.

    python bench/amx_bench.py [--reps 7] [--threads 1 2] [--kernels avx512 amx] [--fmt msfp16]

Each case runs every kernel in turn, ``reps`` rounds; the minimum time per kernel is reported
(GOP/s = 2*M*N*K / t) with the ratio to the first kernel. Outputs are checked bit-equal across
kernels. Weights are pre-quantized (packed once per kernel, as the runtime does).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import bfpaccel


def timeit(fn, min_time=0.2):
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        t = time.perf_counter() - t0
        if t >= min_time:
            return t / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kernels", nargs="+", default=["avx512", "amx"])
    ap.add_argument("--fmt", default="msfp16")
    ap.add_argument("--only", default="", help="substring filter on case names")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    fmt = args.fmt
    cases = []

    M = K = N = 1024
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    qa = bfpaccel.quantize(a, fmt, axis=1)
    qb = bfpaccel.quantize(b, fmt, axis=0)
    cases.append((f"gemm {M}x{K}x{N} float A", 2 * M * N * K, lambda: bfpaccel.matmul(a, qb, fmt)))
    cases.append((f"gemm {M}x{K}x{N} prequant", 2 * M * N * K, lambda: bfpaccel.matmul(qa, qb)))

    for name, C, O, H, k, s in [("3x3 64->64 56x56", 64, 64, 56, 3, 1), ("1x1 64->256 56x56", 64, 256, 56, 1, 1),
                                ("3x3 512->512 7x7", 512, 512, 7, 3, 1), ("1x1 1024->256 14x14", 1024, 256, 14, 1, 1)]:
        x = rng.standard_normal((1, C, H, H)).astype(np.float32)
        w = (rng.standard_normal((O, C, k, k)) * 0.05).astype(np.float32)
        cw = bfpaccel.quantize_conv_weight(w, fmt, 1)
        pad = k // 2
        ops = 2 * O * C * k * k * H * H
        cases.append((f"conv {name}", ops, lambda x=x, cw=cw, pad=pad: bfpaccel.conv2d(x, cw, fmt, padding=pad)))

    cases = [c for c in cases if args.only in c[0]]
    print(f"{'case':32s} thr " + " ".join(f"{k + ' GOP/s':>13s}" for k in args.kernels) + "   ratio")
    try:
        for nt in args.threads:
            bfpaccel.set_num_threads(nt)
            for name, ops, fn in cases:
                best = {k: float("inf") for k in args.kernels}
                outs = {}
                for _ in range(args.reps):
                    for k in args.kernels:
                        bfpaccel.set_kernel(k)
                        best[k] = min(best[k], timeit(fn))
                        if k not in outs:
                            outs[k] = fn()
                ref = outs[args.kernels[0]]
                for k in args.kernels[1:]:
                    assert np.array_equal(ref.view(np.uint32), outs[k].view(np.uint32)), f"{name}: {k} differs"
                g = [ops / best[k] / 1e9 for k in args.kernels]
                print(f"{name:32s} {nt:3d} " + " ".join(f"{v:13.1f}" for v in g) + f"   {g[-1] / g[0]:.2f}x",
                      flush=True)
    finally:
        bfpaccel.set_kernel(None)


if __name__ == "__main__":
    main()
