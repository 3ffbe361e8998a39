"""Latency of one model on several backends, measured the same way in one process.

``run_benchmark`` resolves the model (a zoo name is built once and cached, as in
``bfpaccel accuracy``), prepares every backend (untimed), then, for each batch size:

1. the same seeded input batch for every backend;
2. ``warmup`` untimed calls per backend (at least one: its output is checked against
   onnxruntime float32's, ``output_rel_err``);
3. ``runs`` timed calls per backend, **interleaved**: rounds in which each backend does a block
   of ``block`` calls, then the next backend, with ``pause_s`` of idle time before each block
   so the previous runtime's spinning thread pool has gone to sleep.  Drift of a shared machine
   then hits every backend alike;
4. for the ``bfp:`` backends, one untimed ``Session.profile_summary`` on the same batch: the
   share of the time spent in the integer GEMM kernel (``kernel_share``).

Threads (and the BFP kernel) are options of each backend's session or server, never set
process-wide.

Estimates (``fpga-model``) are computed, not timed.  A backend that cannot run here is
recorded with ``status: "unavailable"`` and its reason; one that fails with ``"error"``.

Example:
    >>> r = run_benchmark("model.onnx", "bfp:msfp16,onnxruntime", batches=[1], runs=10)  # doctest: +SKIP
    >>> [(b["name"], b["latency_ms"]["p50"]) for b in r["backends"]]  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .backends import (REFERENCE_BACKEND, Backend, BenchArgumentError, BenchContext, Unavailable, parse_backends)

__all__ = ["run_benchmark", "check_model", "parse_batches", "environment", "latency_stats", "SCHEMA", "DEFAULT_WARMUP", "DEFAULT_RUNS",
           "DEFAULT_BLOCK", "DEFAULT_BATCHES", "DEFAULT_PAUSE_S", "DEFAULT_SEQ_LEN"]

SCHEMA = "bfpaccel.bench/1"
DEFAULT_BATCHES = (1, 8)
DEFAULT_WARMUP = 2
DEFAULT_RUNS = 15
DEFAULT_BLOCK = 5
DEFAULT_PAUSE_S = 1.0
#: tokens per sequence of a text encoder's input
DEFAULT_SEQ_LEN = 128

#: CPU flags worth reading first when comparing runs of two machines.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


# ----- environment ---------------------------------------------------------------------
def _cpuinfo() -> Tuple[str, List[str]]:
    model, flags = "", []  # type: Tuple[str, List[str]]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or "unknown CPU", flags


def _version(module: str) -> Optional[str]:
    m = sys.modules.get(module)
    if m is None:
        return None
    return str(getattr(m, "__version__", "?"))


# Set by bench/isa_mask/run.py in the processes it runs (CPUID answers without these features)
ISA_MASK_ENV = "BFPACCEL_ISA_MASK"
_MASKED_PREFIXES = {"avx2-only": ("avx512", "amx", "avx_vnni")}


def environment(threads: int, kernel: Optional[str] = None) -> Dict[str, Any]:
    """Where and with what a run happened: CPU model and flags, threads, library versions,
    the bfpaccel kernel in use (``kernel``, else the process default), load average and the
    date (UTC). Under ``bench/isa_mask`` (``$BFPACCEL_ISA_MASK``) "simd" lists what the process
    sees and "isa_mask" names the mask ("flags" stay /proc/cpuinfo's).

    Example:
        >>> environment(2)["threads"]
        2
    """
    import bfpaccel

    model, flags = _cpuinfo()
    libs: Dict[str, Optional[str]] = {"bfpaccel": bfpaccel.__version__, "numpy": np.__version__,
                                      "python": platform.python_version()}
    for name, mod in (("onnxruntime", "onnxruntime"), ("onnx", "onnx"), ("grpcio", "grpc"),
                      ("tensorflow", "tensorflow"), ("keras", "keras")):
        v = _version(mod)
        if v is not None:  # only what this run imported: importing TensorFlow just to ask costs 2.5 s
            libs[name] = v
    try:
        load: Optional[List[float]] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    mask = os.environ.get(ISA_MASK_ENV) or None
    hidden = _MASKED_PREFIXES.get(mask or "", ())
    return {
        "cpu": {"model": model, "logical_cpus": os.cpu_count(), "usable_cpus": cpus,
                "simd": [f for f in SIMD_FLAGS if f in flags and not f.startswith(hidden)], "flags": flags,
                "isa_mask": mask},
        "threads": threads,
        "kernel": kernel or bfpaccel.get_kernel(),
        "kernels_available": list(bfpaccel.available_kernels()),
        "libraries": libs,
        "platform": platform.platform(),
        "loadavg": load,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ----- statistics ----------------------------------------------------------------------
def latency_stats(samples_ms: Sequence[float]) -> Dict[str, float]:
    """p50/p90/p99/mean/min/max/std of latencies in ms (percentiles interpolate linearly; with
    fewer than 100 samples p99 is close to the maximum).

    Example:
        >>> latency_stats([1.0, 2.0, 3.0])["p50"]
        2.0
    """
    a = np.asarray(samples_ms, np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": round(float(p50), 4), "p90": round(float(p90), 4), "p99": round(float(p99), 4),
            "mean": round(float(a.mean()), 4), "min": round(float(a.min()), 4), "max": round(float(a.max()), 4),
            "std": round(float(a.std()), 4), "n": int(a.size)}


def _rel_err(y: Optional[np.ndarray], ref: Optional[np.ndarray]) -> Optional[float]:
    if y is None or ref is None:
        return None
    y = np.asarray(y, np.float64)
    ref = np.asarray(ref, np.float64)
    if y.size != ref.size:
        return None
    return float(np.linalg.norm(y.ravel() - ref.ravel()) / max(float(np.linalg.norm(ref)), 1e-30))


# ----- the run -------------------------------------------------------------------------
def parse_batches(batches: Union[str, int, Sequence[int]]) -> Tuple[int, ...]:
    """Batch sizes from ``"1,8"`` (or an int, or a list); BenchArgumentError when one is not >= 1.

    Example:
        >>> parse_batches("1,8")
        (1, 8)
    """
    if isinstance(batches, int):
        items: List[Any] = [batches]
    elif isinstance(batches, str):
        items = [s.strip() for s in batches.split(",") if s.strip()]
    else:
        items = list(batches)
    out: List[int] = []
    for s in items:
        try:
            b = int(s)
        except (TypeError, ValueError):
            raise BenchArgumentError(f"batch sizes must be whole numbers like 1,8; got {s!r}") from None
        if b < 1:
            raise BenchArgumentError(f"batch size must be >= 1, got {b}")
        if b not in out:
            out.append(b)
    if not out:
        raise BenchArgumentError("no batch sizes given (e.g. --batch 1,8)")
    return tuple(out)


def check_model(model: str) -> Optional[str]:
    """The zoo name of ``model`` (None for a PATH.onnx); raises FileNotFoundError for a missing
    file and BenchArgumentError for an unknown name.

    Example:
        >>> check_model("ResNet-50")
        'resnet50'
    """
    from ..models.text import TEXT_MODELS
    from ..models.zoo import ZOO_MODELS

    if model.strip().lower().replace("_", "-") in TEXT_MODELS:
        return model.strip().lower().replace("_", "-")
    if model.endswith(".onnx"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"model file {model!r} does not exist")
        return None
    if model.lower() == "efficientnet-lite0":
        return "efficientnet-lite0"
    from ..models.rnn import RNN_BENCH_MODELS

    if model.lower() in RNN_BENCH_MODELS:  # a recurrent layer (bfpaccel.models.rnn): no TensorFlow twin
        return None
    n = model.lower().replace("_", "").replace("-", "")
    n = n[len("quantized"):] if n.startswith("quantized") else n
    if n not in ZOO_MODELS:
        raise BenchArgumentError(f"unknown model {model!r}: expected PATH.onnx, efficientnet-lite0, gru, lstm, a "
                                 f"text encoder ({', '.join(TEXT_MODELS)}) or one of {', '.join(ZOO_MODELS)}")
    return n


def _model_io(onnx_path: str) -> Tuple[str, List[Any], List[str], Dict[str, str]]:
    import onnx

    m = onnx.load(onnx_path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if not inputs:
        raise ValueError(f"{onnx_path} has no graph input")
    inp = inputs[0]
    dims: List[Any] = []
    for d in inp.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    meta = {p.key: p.value for p in m.metadata_props}
    return inp.name, dims, [o.name for o in m.graph.output], meta


def _sample_shape(name: str, dims: List[Any], batches: Sequence[int]) -> Tuple[int, ...]:
    if not dims:
        raise BenchArgumentError(f"input {name!r} has no shape in the ONNX; the harness needs [N, ...]")
    first = dims[0]
    if isinstance(first, int) and first > 0:
        bad = [b for b in batches if b != first]
        if bad:
            raise BenchArgumentError(f"the model's input {name!r} has a fixed batch of {first}: "
                                     f"batch size(s) {bad} cannot run; use --batch {first}")
    rest = dims[1:]
    if any(not (isinstance(d, int) and d > 0) for d in rest):
        raise BenchArgumentError(f"input {name!r} has shape {dims}: only the batch dimension may be symbolic")
    return tuple(int(d) for d in rest)


def _entry(b: Backend, batch: int) -> Dict[str, Any]:
    return {"name": b.name, "label": b.label, "kind": b.kind, "batch": batch, "status": "ok", "reason": None,
            "latency_ms": None, "samples_ms": [], "throughput_per_s": None, "ratio_vs_onnxruntime": None,
            "output_rel_err": None, "kernel_share": None, "setup_s": None, "info": dict(b.info)}


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, leave=False, dynamic_ncols=True)
        except ImportError:  # tqdm is optional: no bar, same numbers
            pass

    class _NoBar:
        def update(self, n: int = 1) -> None: ...

        def set_postfix_str(self, s: str) -> None: ...

        def close(self) -> None: ...
    return _NoBar()


def _timed_block(fn: Callable[[], Any], n: int, out: List[float], bar: Any) -> None:
    gc.collect()
    was = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise, not the backend's cost
    try:
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
            bar.update(1)
    finally:
        if was:
            gc.enable()


def run_benchmark(model: str, backends: Union[str, Sequence[str], Sequence[Backend]], *,
                  batches: Union[str, int, Sequence[int]] = DEFAULT_BATCHES, threads: Optional[int] = None,
                  kernel: Optional[str] = None,
                  warmup: int = DEFAULT_WARMUP, runs: int = DEFAULT_RUNS, block: int = DEFAULT_BLOCK,
                  pause_s: float = DEFAULT_PAUSE_S, seed: int = 0, cache_dir: Optional[str] = None,
                  progress: bool = True, keep_samples: bool = True, seq_len: int = DEFAULT_SEQ_LEN,
                  log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Benchmark ``model`` (a zoo name or PATH.onnx) on ``backends``; returns the JSON-ready
    result (see ``bfpaccel.bench`` for the schema).  ``threads`` (default: the usable CPUs)
    and ``kernel`` (the BFP kernel; default: the process default) are given to each backend's
    session; nothing is set process-wide.  A text encoder (``all-minilm-l6``,
    ``paraphrase-minilm-l3``: :mod:`bfpaccel.models.text`) runs on seeded token ids of
    ``seq_len`` tokens and an all-ones mask; its int8 baseline is onnxruntime's dynamic
    quantization.

    Raises:
        BenchArgumentError: bad arguments (checked before anything heavy runs).
        FileNotFoundError: a PATH.onnx that does not exist.

    Example:
        >>> r = run_benchmark("resnet50", "bfp:msfp16,onnxruntime", batches="1", runs=10)  # doctest: +SKIP
        >>> print(bfpaccel.bench.format_table(r))  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    for name, v, lo in (("runs", runs, 1), ("warmup", warmup, 0), ("block", block, 1)):
        if not isinstance(v, int) or v < lo:
            raise BenchArgumentError(f"{name} must be a whole number >= {lo}, got {v!r}")
    if pause_s < 0:
        raise BenchArgumentError(f"pause must be >= 0 seconds, got {pause_s}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise BenchArgumentError(f"threads must be >= 1, got {threads!r}")
    from .. import core

    try:
        kernel = core.check_kernel(kernel)
    except (TypeError, ValueError) as exc:
        raise BenchArgumentError(f"kernel: {exc}") from None
    bs = parse_batches(batches)
    if isinstance(backends, str) or not all(isinstance(b, Backend) for b in backends):
        blist = parse_backends(backends)  # type: ignore[arg-type]
    else:
        blist = list(backends)  # type: ignore[arg-type]
    if not blist:
        raise BenchArgumentError("no backends given")
    zoo_name = check_model(model)
    from ..models.text import TEXT_MODELS

    text = zoo_name in TEXT_MODELS
    if text:
        if not isinstance(seq_len, int) or seq_len < 2:
            raise BenchArgumentError(f"the sequence length must be >= 2 tokens, got {seq_len!r}")
        from ..models.text import text_model_onnx

        log(f"resolving the text encoder {zoo_name}")
        assert zoo_name is not None
        onnx_path, weights_note = text_model_onnx(zoo_name, cache_dir), TEXT_MODELS[zoo_name]["about"]
        zoo_name = None
        input_name, dims, output_names, meta = _model_io(onnx_path)
        dims = ["batch", seq_len]
        sample: Tuple[int, ...] = (seq_len,)
        sentence = TEXT_MODELS[model.strip().lower().replace("_", "-")]["sentence"]
        output_names = [sentence] + [o for o in output_names if o != sentence]  # compared across backends
    else:
        from ..accuracy import resolve_model

        onnx_path, weights_note = resolve_model(model, "random", cache_dir, log)
        input_name, dims, output_names, meta = _model_io(onnx_path)
        sample = _sample_shape(input_name, dims, bs)

    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:
            threads = os.cpu_count() or 1
    workdir = tempfile.mkdtemp(prefix="bfpaccel-bench-")
    ctx = BenchContext(onnx_path=onnx_path, model=model, zoo_name=zoo_name, input_name=input_name,
                       output_names=output_names, threads=threads, workdir=workdir, cache_dir=cache_dir,
                       is_cached_model=not model.endswith(".onnx"), batches=bs, sample_shape=sample, seed=seed,
                       metadata=meta, log=log, kernel=kernel, seq_len=seq_len if text else None)
    env_start = environment(threads, kernel)
    entries: List[Dict[str, Any]] = []
    try:
        # prepare: untimed; unavailable/error backends drop out here
        ready: List[Backend] = []
        setup: Dict[str, Tuple[str, Optional[str], float]] = {}
        for b in blist:
            t = time.perf_counter()
            try:
                log(f"preparing {b.name}")
                b.prepare(ctx)
                status, reason = ("estimate" if b.kind == "estimate" else "ok"), None
                ready.append(b)
            except Unavailable as exc:
                status, reason = "unavailable", str(exc)
                log(f"{b.name}: unavailable: {exc}")
            except Exception as exc:  # one backend failing must not end the others' run
                status, reason = "error", f"{type(exc).__name__}: {exc}"
                log(f"{b.name}: error: {reason}")
            setup[b.name] = (status, reason, round(time.perf_counter() - t, 2))

        for batch in bs:
            x = ctx.make_input(batch, seed)
            rows: Dict[str, Dict[str, Any]] = {}
            for b in blist:
                e = _entry(b, batch)
                e["status"], e["reason"], e["setup_s"] = setup[b.name]
                rows[b.name] = e
                entries.append(e)
            measured: List[Tuple[Backend, Callable[[], Any]]] = []
            for b in ready:
                e = rows[b.name]
                try:
                    if b.kind == "estimate":
                        ms, details = b.estimate_ms(batch)
                        e["samples_ms"] = [ms]
                        e["latency_ms"] = {"p50": ms, "p90": ms, "p99": ms, "mean": ms, "min": ms, "max": ms,
                                           "std": 0.0, "n": 0}
                        e["info"].update(details)
                    else:
                        measured.append((b, b.bind(x)))
                except Exception as exc:
                    e["status"], e["reason"] = "error", f"{type(exc).__name__}: {exc}"
                    log(f"{b.name} batch {batch}: error: {e['reason']}")

            total = len(measured) * (warmup + runs)
            bar = _progress(total, f"batch {batch}", progress)
            samples: Dict[str, List[float]] = {b.name: [] for b, _ in measured}
            outputs: Dict[str, Optional[np.ndarray]] = {}
            alive: List[Tuple[Backend, Callable[[], Any]]] = []
            try:
                # warm-up: the first call of a new shape builds programs, packs weights, wakes pools
                for b, fn in measured:
                    bar.set_postfix_str(f"warm-up {b.name}")
                    try:
                        time.sleep(pause_s / 2)
                        res = fn()
                        outputs[b.name] = b.output(res, ctx)
                        for _ in range(max(warmup - 1, 0)):
                            fn()
                        bar.update(warmup)
                        alive.append((b, fn))
                    except Exception as exc:
                        rows[b.name]["status"] = "error"
                        rows[b.name]["reason"] = f"{type(exc).__name__}: {exc}"
                        log(f"{b.name} batch {batch}: error: {rows[b.name]['reason']}")
                        bar.update(warmup + runs)
                # interleaved rounds: each backend a block, then the next
                for r in range(math.ceil(runs / block)):
                    n = min(block, runs - r * block)
                    for b, fn in list(alive):
                        bar.set_postfix_str(b.name)
                        time.sleep(pause_s)  # let the previous runtime's spinning threads go idle
                        try:
                            _timed_block(fn, n, samples[b.name], bar)
                        except Exception as exc:
                            rows[b.name]["status"] = "error"
                            rows[b.name]["reason"] = f"{type(exc).__name__}: {exc}"
                            alive.remove((b, fn))
            finally:
                bar.close()
            # where the time went, untimed, on the same batch (bfp: backends: the GEMM kernel's share)
            for b, _ in alive:
                if rows[b.name]["status"] != "ok":
                    continue
                try:
                    prof = b.profile(x)
                except Exception as exc:  # the latency is measured; a failed profile is reported, not fatal
                    rows[b.name]["info"]["profile_error"] = f"{type(exc).__name__}: {exc}"
                    continue
                if prof:
                    rows[b.name]["kernel_share"] = prof.get("kernel_share")
                    rows[b.name]["profile"] = prof
            ref_out = outputs.get(REFERENCE_BACKEND)
            for b, _ in measured:
                e = rows[b.name]
                if e["status"] != "ok" or not samples[b.name]:
                    continue
                e["latency_ms"] = latency_stats(samples[b.name])
                e["samples_ms"] = [round(v, 4) for v in samples[b.name]] if keep_samples else []
                e["output_rel_err"] = _rel_err(outputs.get(b.name), ref_out)
            ref = rows.get(REFERENCE_BACKEND)
            ref_p50 = ref["latency_ms"]["p50"] if ref and ref["status"] == "ok" and ref["latency_ms"] else None
            for e in rows.values():
                lat = e["latency_ms"]
                if lat and lat["p50"] > 0:
                    e["throughput_per_s"] = round(batch * 1e3 / lat["p50"], 3)
                    if ref_p50:
                        e["ratio_vs_onnxruntime"] = round(ref_p50 / lat["p50"], 4)
    finally:
        for b in blist:
            try:
                b.close()
            except Exception:  # closing is best effort; the numbers are already taken
                pass
        shutil.rmtree(workdir, ignore_errors=True)

    env = environment(threads, kernel)
    env["loadavg_start"] = env_start["loadavg"]
    env["loadavg_end"] = env.pop("loadavg")
    return {
        "schema": SCHEMA,
        "model": {"name": model, "onnx": onnx_path, "weights": weights_note, "zoo": zoo_name,
                  "input_name": input_name, "input_shape": dims, "outputs": output_names},
        "settings": {"backends": [b.name for b in blist], "batches": list(bs), "threads": threads, "kernel": kernel,
                     "seq_len": seq_len if text else None,
                     "warmup": warmup, "runs": runs, "block": block, "pause_s": pause_s, "seed": seed,
                     "reference": REFERENCE_BACKEND,
                     "ratio": "speed-up vs onnxruntime fp32: its p50 / this p50 (> 1: faster)",
                     "throughput": "batch * 1000 / p50 (items per second)",
                     "kernel_share": "bfp: backends: the integer GEMM kernel's seconds / all ops' seconds "
                                     "(Session.profile_summary, fastest of 3 profiled runs)"},
        "env": env,
        "backends": entries,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
