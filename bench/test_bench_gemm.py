"""GEMM on the BFP datapath vs numpy float32, same shapes, same thread count.

The BFP side is what the accelerator does for a fully-connected layer: the weight ``b[K, N]``
is quantized (and packed) once, ahead of time; the activation ``a[M, K]`` is quantized on the
fly inside every call, which is therefore part of the timing.  The baseline is ``a @ b`` in
float32 (numpy's BLAS, limited to the same number of threads).

Each (shape, threads) pair is one benchmark group: ``bfp <fmt>`` for every format and
``numpy fp32`` side by side.  Run ``pytest bench -k gemm``.
"""

from __future__ import annotations

import numpy as np
import pytest

import bfpaccel

#: (M, K, N): a square GEMM, batch-1..16 fully-connected layers, and ResNet-50's classifier.
SHAPES = [
    (1024, 1024, 1024),
    (1, 1024, 1024),
    (4, 1024, 1024),
    (16, 1024, 1024),
    (1, 2048, 1000),
]
SHAPE_IDS = [f"M{m}-K{k}-N{n}" for m, k, n in SHAPES]


def _group(shape, threads: int) -> str:
    m, k, n = shape
    return f"gemm M={m} K={k} N={n} threads={threads}"


def _info(shape, threads: int) -> dict:
    m, k, n = shape
    return {
        "op": "gemm",
        "shape": f"{m}x{k}x{n}",
        "shape_index": SHAPES.index(shape),
        "M": m,
        "K": k,
        "N": n,
        "threads": threads,
    }


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gemm_bfp(measure, rand, reference, check_close, shape, fmt, threads):
    m, k, n = shape
    a = rand((m, k), "normal", seed=1)
    b = rand((k, n), "normal", scale=0.05, seed=2)
    w = bfpaccel.quantize(b, fmt, axis=0)  # weights: quantized once, outside the timing
    ref = reference(lambda: a @ b)

    y = measure(
        lambda: bfpaccel.matmul(a, w, fmt),
        group=_group(shape, threads),
        ops=2 * m * n * k,
        impl=fmt,
        role="bfp",
        format=fmt,
        kernel=bfpaccel.get_kernel(),
        **_info(shape, threads),
    )
    check_close(y, ref, f"bfp {fmt} gemm {m}x{k}x{n}")


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gemm_numpy(measure, rand, shape, threads):
    from threadpoolctl import threadpool_info

    m, k, n = shape
    a = rand((m, k), "normal", seed=1)
    b = rand((k, n), "normal", scale=0.05, seed=2)
    blas = [f"{lib['internal_api']} {lib['version']} x{lib['num_threads']}" for lib in threadpool_info() if lib["user_api"] == "blas"]

    measure(
        lambda: a @ b,
        group=_group(shape, threads),
        ops=2 * m * n * k,
        impl="numpy fp32",
        role="baseline",
        format="fp32",
        kernel=", ".join(blas) or "BLAS not detected by threadpoolctl",
        **_info(shape, threads),
    )
