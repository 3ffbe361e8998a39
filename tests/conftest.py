"""Shared helpers and fixtures for the bfpaccel test suite.

The package is imported as installed (``import bfpaccel``): no ``sys.path`` tricks.  Every
C++ kernel is compared bit for bit against ``bfpaccel.reference`` (the numpy oracle of
docs/numerics.md) with ``assert_bits_equal``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Iterator, List, Tuple

import numpy as np
import pytest

import bfpaccel

#: Every block preset (the IEEE presets fp32/bf16/fp16 are not block formats).
BLOCK_FORMATS: List[str] = [n for n in bfpaccel.list_formats() if bfpaccel.get_format(n).is_block]

#: The rounding modes of docs/numerics.md#element-rounding-and-saturation.
ROUNDING_MODES: List[str] = list(bfpaccel.ROUNDING_MODES)

#: Kernels this CPU can run ("scalar" always, "avx2"/"avx512" where supported).
KERNELS: List[str] = bfpaccel.available_kernels()


def _first_mismatches(mask: np.ndarray, limit: int = 5) -> np.ndarray:
    return np.argwhere(mask)[:limit]


def assert_bits_equal(actual, expected, what: str = "result") -> None:
    """Assert two float32 arrays are bit-identical (same shape, same uint32 patterns),
    treating any NaN as equal to any NaN.  ``-0.0`` and ``+0.0`` are *different*."""
    a = np.asarray(actual)
    b = np.asarray(expected)
    assert a.dtype == np.float32, f"{what}: actual dtype is {a.dtype}, expected float32"
    assert b.dtype == np.float32, f"{what}: expected array has dtype {b.dtype}, not float32"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != expected shape {b.shape}"
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    both_nan = np.isnan(a) & np.isnan(b)
    bad = (a.view(np.uint32) != b.view(np.uint32)) & ~both_nan
    if bad.any():
        lines = []
        for idx in _first_mismatches(bad):
            t = tuple(int(i) for i in idx)
            lines.append(
                f"  at {t}: actual {a[t]!r} (0x{int(a.view(np.uint32)[t]):08x}) "
                f"expected {b[t]!r} (0x{int(b.view(np.uint32)[t]):08x})"
            )
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} values differ in their bits; first mismatches:\n"
            + "\n".join(lines)
        )


def conv_test_input(rng: np.random.Generator, n: int, c: int, h: int, w: int, specials: bool) -> np.ndarray:
    """An NCHW input of the fused-conv tests (at least 4 x 4 pixels): normal values, and with
    `specials` pixels past the format's range and below it, a NaN, an Inf and an all-zero pixel."""
    x = rng.standard_normal((n, c, h, w)).astype(np.float32) * 2.0
    if specials:
        x[0, :, 0, 1] *= 1e30   # values past the format's range
        x[0, :, 1, 2] *= 1e-33  # and below it (subnormal and zero units)
        x[0, 0, 2, 3] = np.nan
        x[-1, -1, -1, -1] = np.inf
        x[0, :, 3, 0] = 0.0     # an all-zero pixel
    return x


def onnx_graph_model(nodes, x_shape, outputs, inits):
    """An opset-17 ONNX model of `nodes` with one float input "x" of x_shape, the named outputs
    (shapes left to inference) and the initializers `inits` (name -> array)."""
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_empty_tensor_value_info(o) for o in outputs],
                          [numpy_helper.from_array(v, name) for name, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def assert_array_exact(actual, expected, what: str = "array") -> None:
    """Integer arrays (codes, exponents): same dtype, shape and values."""
    a = np.asarray(actual)
    b = np.asarray(expected)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != expected shape {b.shape}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != expected dtype {b.dtype}"
    bad = a != b
    if bad.any():
        lines = [
            f"  at {tuple(int(i) for i in idx)}: actual {a[tuple(idx)]!r} expected {b[tuple(idx)]!r}"
            for idx in _first_mismatches(bad)
        ]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} entries differ; first mismatches:\n" + "\n".join(lines)
        )


@pytest.fixture(params=KERNELS)
def kernel(request) -> Iterator[str]:
    """Run the test once per kernel this CPU can run; restore the default afterwards."""
    bfpaccel.set_kernel(request.param)
    assert bfpaccel.get_kernel() == request.param
    try:
        yield request.param
    finally:
        bfpaccel.set_kernel(None)


#: the kernels with AVX-512 GEMM tiles (native, emulated, and AMX's VNNI rows)
VNNI_KERNELS: List[str] = [k for k in KERNELS if k.startswith(("avx512", "amx"))]


@pytest.fixture(params=["fma", "add_pipes"])
def tile_scaling(request) -> Iterator[str]:
    """The AVX-512 tiles' two ways to scale block sums, each with its tile height (6 rows with
    fma, 5 with the add pipes): each CPU uses one, both run here."""
    before = bfpaccel._core._tile_scaling()
    assert bfpaccel._core._tile_scaling(request.param) == request.param
    try:
        yield request.param
    finally:
        bfpaccel._core._tile_scaling(before)


@pytest.fixture
def restore_threads() -> Iterator[int]:
    """Give back the thread count a test changed."""
    n = bfpaccel.get_num_threads()
    try:
        yield n
    finally:
        bfpaccel.set_num_threads(n)


@pytest.fixture
def fuse_every_size(monkeypatch):
    """Fuse 1x1 expansions into their depthwise convs at any size (the lowering's default fuses
    only those past the caches)."""
    from bfpaccel.runtime import lower

    monkeypatch.setattr(lower, "_FUSE_EXPANSION_BYTES", 0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261124)


def spawn_server(args: List[str]) -> Tuple[subprocess.Popen, int]:
    """Starts ``python -m bfpaccel.serve --port 0 ARGS`` and waits (60 s at most) until it says
    it is ready; returns the process and the port it listens on (the caller stops it)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "bfpaccel.serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    port = None
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "listening on" in line:
            port = int(line.split()[4].rsplit(":", 1)[1])
        if "ready" in line:
            break
    if not port:
        proc.kill()
        raise AssertionError(proc.stderr.read())
    return proc, port
