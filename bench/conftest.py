"""Shared fixtures of the bfpaccel benchmark suite (``pytest bench``).

Every benchmark runs at a fixed thread count (the ``threads`` parameter, 1 and 2 by default):
``bfpaccel.set_num_threads(n)`` for the BFP kernels, ``threadpoolctl`` limits numpy's BLAS to
``n``, and the onnxruntime baselines build their session with ``intra_op_num_threads = n``.

Timing uses ``benchmark.pedantic``: a ``--bench-cooldown`` pause (helper threads that the
previous benchmark's library left spinning go to sleep), one warm-up call (it also packs
pre-quantized weights, cached on the tensor), one timed probe call, then as many rounds as fit in
``--bench-time`` seconds (at least ``--benchmark-min-rounds``, at most ``--bench-max-rounds``).
Each result records ``extra_info``: ``gops`` (ops / median seconds / 1e9, where a
multiply-add counts 2 ops), shapes, format, threads, kernel, and what ``bench/report.py``
needs to build its tables.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable, Dict, Tuple

import numpy as np
import pytest

import bfpaccel

#: Block formats benched by default (override with ``--bench-formats``).
FORMATS = ("msfp16", "msfp12", "mxint8", "mxfp4_e2m1")
#: Thread counts benched by default (override with ``--bench-threads``).
THREADS = (1, 2)
#: A BFP result whose relative L2 error against float32 exceeds this is garbage, not rounding
#: (gaussian data gives ~0.01 for msfp16/mxint8 and ~0.16 for msfp12/mxfp4_e2m1).
MAX_REL_ERR = 0.5


# ----------------------------------------------------------------------------- options
def pytest_addoption(parser):
    g = parser.getgroup("bfpaccel-bench", "bfpaccel benchmark suite")
    g.addoption(
        "--bench-time",
        type=float,
        default=float(os.environ.get("BFPACCEL_BENCH_TIME", "0.4")),
        help="target seconds of timed rounds per benchmark (default 0.4, env BFPACCEL_BENCH_TIME)",
    )
    g.addoption(
        "--bench-max-rounds",
        type=int,
        default=1000,
        help="most rounds per benchmark (default 1000); the least is --benchmark-min-rounds",
    )
    g.addoption(
        "--bench-cooldown",
        type=float,
        default=0.15,
        help="idle seconds before each benchmark, so helper threads another library left "
        "spinning (OpenBLAS spins ~0.1 s after a call) go to sleep first (default 0.15)",
    )
    g.addoption(
        "--bench-formats",
        default=",".join(FORMATS),
        help=f"comma-separated BFP formats to bench (default {','.join(FORMATS)})",
    )
    g.addoption(
        "--bench-threads",
        default=",".join(map(str, THREADS)),
        help="comma-separated thread counts to bench (default 1,2)",
    )


def _csv(config, name: str) -> list:
    return [s.strip() for s in config.getoption(name).split(",") if s.strip()]


def pytest_generate_tests(metafunc):
    """Parametrize every benchmark that takes ``fmt`` / ``threads`` from the command line."""
    cfg = metafunc.config
    if "fmt" in metafunc.fixturenames:
        fmts = _csv(cfg, "--bench-formats")
        for f in fmts:
            bfpaccel.get_format(f)  # fail early on a typo, with the library's message
        metafunc.parametrize("fmt", fmts)
    if "threads" in metafunc.fixturenames:
        ts = [int(t) for t in _csv(cfg, "--bench-threads")]
        metafunc.parametrize("threads", ts, indirect=True, ids=[f"t{t}" for t in ts])


# ----------------------------------------------------------------------------- machine info
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")


def _cpu_details() -> dict:
    """Family/model and the SIMD flags that decide which bfpaccel kernel can run."""
    out = {"family": None, "model": None, "isa": []}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, val = line.partition(":")
                key, val = key.strip().lower(), val.strip()
                if key == "cpu family" and out["family"] is None:
                    out["family"] = val
                elif key == "model" and out["model"] is None:
                    out["model"] = val
                elif key == "flags":
                    flags = set(val.split())
                    out["isa"] = [f for f in _ISA_FLAGS if f in flags]
                    break
    except OSError:
        pass
    return out


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return "not installed"


def _blas_info() -> list:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [
        {k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "threading_layer")}
        for lib in threadpool_info()
        if lib.get("user_api") == "blas"
    ]


def _cpu_busy(interval: float = 0.5):
    """Fraction of all CPUs' time other processes kept busy over ``interval`` seconds
    (None off Linux); this process's own threads (a BLAS pool still spinning) are left out."""

    def sample():
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        own = os.times()
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0), own.user + own.system

    try:
        hz = os.sysconf("SC_CLK_TCK")
        t0, i0, o0 = sample()
        time.sleep(interval)
        t1, i1, o1 = sample()
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    total = max(t1 - t0, 1)
    busy = (total - (i1 - i0)) - (o1 - o0) * hz
    return round(min(max(busy / total, 0.0), 1.0), 3)


def pytest_sessionstart(session):
    session.config._bfpaccel_load_start = _loadavg()
    session.config._bfpaccel_busy_start = _cpu_busy()


def pytest_report_header(config):
    busy = getattr(config, "_bfpaccel_busy_start", None)
    line = f"bfpaccel bench: kernel {bfpaccel.get_kernel()} (available {', '.join(bfpaccel.available_kernels())})"
    if busy is not None:
        line += f"; CPUs {busy:.0%} busy before the start"
        if busy > 0.1:
            line += " -- other processes are running: timings will be noisy"
    return line


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what ``bench/report.py`` prints in its environment header."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    machine_info["bfpaccel_bench"] = {
        "cpu_model": _cpu_model(),
        "cpu": _cpu_details(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "bfpaccel": getattr(bfpaccel, "__version__", _version("bfpaccel")),
        "kernel": bfpaccel.get_kernel(),
        "available_kernels": bfpaccel.available_kernels(),
        "numpy": np.__version__,
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "threadpoolctl": _version("threadpoolctl"),
        "pytest-benchmark": _version("pytest-benchmark"),
        "blas": _blas_info(),
        "threads": [int(t) for t in _csv(config, "--bench-threads")],
        "formats": _csv(config, "--bench-formats"),
        "bench_time_s": config.getoption("--bench-time"),
        # other processes on the machine make timings noisy: a 1-minute load average well
        # above the benchmark's own threads at start or end is worth a look
        "loadavg_start": getattr(config, "_bfpaccel_load_start", None),
        "loadavg_end": _loadavg(),
        "cpu_busy_start": getattr(config, "_bfpaccel_busy_start", None),
        "cpu_busy_end": _cpu_busy(),
        "env": {k: os.environ[k] for k in ("BFPACCEL_KERNEL", "BFPACCEL_NUM_THREADS", "OMP_NUM_THREADS") if k in os.environ},
    }


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def threads(request):
    """Thread count of this benchmark, applied to bfpaccel and to numpy's BLAS."""
    from threadpoolctl import threadpool_limits

    n = int(request.param)
    old = bfpaccel.get_num_threads()
    bfpaccel.set_num_threads(n)
    try:
        # BLAS only: bfpaccel's own threading is set above and must not be touched here.
        with threadpool_limits(limits=n, user_api="blas"):
            yield n
    finally:
        bfpaccel.set_num_threads(old)


@pytest.fixture(scope="session")
def rand() -> Callable[..., np.ndarray]:
    """``rand(shape, kind="normal"|"relu", scale=1.0, seed=0)``: float32 test data, built once
    per session and shared (treat it as read-only)."""
    cache: Dict[Tuple, np.ndarray] = {}

    def make(shape, kind: str = "normal", scale: float = 1.0, seed: int = 0) -> np.ndarray:
        key = (tuple(shape), kind, scale, seed)
        arr = cache.get(key)
        if arr is None:
            rng = np.random.default_rng([seed, *shape])
            arr = rng.standard_normal(tuple(shape), dtype=np.float32)
            if kind == "relu":  # post-ReLU activations: half zeros, like inside a CNN
                np.maximum(arr, 0, out=arr)
            elif kind != "normal":
                raise ValueError(f"unknown kind {kind!r}")
            if scale != 1.0:
                arr *= np.float32(scale)
            arr.setflags(write=False)
            cache[key] = arr
        return arr

    return make


@pytest.fixture
def measure(benchmark, request):
    """``measure(fn, group=..., ops=..., **extra_info)`` times ``fn()`` into ``benchmark``
    (group and extra_info included) and returns one result of ``fn``.  With
    ``--benchmark-disable`` it just calls ``fn`` once, to check the suite runs."""
    cfg = request.config
    target = cfg.getoption("--bench-time")
    max_rounds = cfg.getoption("--bench-max-rounds")
    min_rounds = max(1, int(getattr(benchmark, "_min_rounds", 5) or 5))
    cooldown = cfg.getoption("--bench-cooldown")

    def run(fn: Callable[[], object], *, group: str, ops: int, **info):
        benchmark.group = group
        benchmark.extra_info.update(info)
        benchmark.extra_info["ops"] = int(ops)
        if getattr(benchmark, "disabled", False):
            return benchmark.pedantic(fn, rounds=1, iterations=1)
        if cooldown > 0:
            time.sleep(cooldown)
        out = fn()  # warm-up: packs cached weights, faults in buffers, starts thread pools
        t0 = time.perf_counter()
        fn()
        probe = time.perf_counter() - t0
        rounds = int(min(max_rounds, max(min_rounds, target / max(probe, 1e-9))))
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_ms"] = round(median * 1e3, 6)
        benchmark.extra_info["gops"] = round(ops / median / 1e9, 3)
        return out

    return run


@pytest.fixture(scope="session")
def reference():
    """``reference(fn)``: compute a float yardstick with one BLAS thread, so no BLAS helper
    thread is left spinning into the benchmark that follows."""
    from threadpoolctl import threadpool_limits

    def run(fn: Callable[[], np.ndarray]) -> np.ndarray:
        with threadpool_limits(limits=1, user_api="blas"):
            return fn()

    return run


@pytest.fixture(scope="session")
def check_close():
    """``check_close(y, ref, what)``: fail when a BFP result is nowhere near float32."""

    def check(y: np.ndarray, ref: np.ndarray, what: str) -> None:
        assert y.shape == ref.shape, f"{what}: output shape {y.shape}, expected {ref.shape}"
        assert np.isfinite(y).all(), f"{what}: output has NaN/Inf"
        err = float(np.linalg.norm(y.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))
        assert err < MAX_REL_ERR, (
            f"{what}: relative L2 error {err:.3g} against float32 is not rounding error "
            f"(limit {MAX_REL_ERR}); the kernel is wrong, so its timing means nothing"
        )

    return check
