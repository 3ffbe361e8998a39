"""``bfpaccel bench``: latency of one model on the BFP runtime and its baselines, measured the
same way in one process (same ONNX, same input, interleaved blocks), as a table, JSON and PNG.

The result (``run_benchmark``'s return value, ``--json``), schema ``bfpaccel.bench/1``::

    {
      "schema": "bfpaccel.bench/1",
      "model": {"name", "onnx", "weights", "zoo", "input_name", "input_shape", "outputs"},
      "settings": {"backends": [...], "batches": [1, 8], "threads", "kernel" (--kernel or null),
                   "warmup", "runs", "block", "pause_s", "seed", "reference": "onnxruntime", "ratio",
                   "throughput", "kernel_share"},
      "env": {"cpu": {"model", "logical_cpus", "usable_cpus", "simd": [...], "flags": [...]},
              "threads", "kernel", "kernels_available", "libraries": {"bfpaccel", "numpy", ...},
              "platform", "date" (UTC ISO 8601), "loadavg_start", "loadavg_end"},
      "backends": [   # one entry per backend and batch size
        {"name": "bfp:msfp16", "label": "bfpaccel msfp16", "kind": "measured" | "estimate",
         "batch": 1, "status": "ok" | "estimate" | "unavailable" | "error", "reason": str | null,
         "latency_ms": {"p50", "p90", "p99", "mean", "min", "max", "std", "n"} | null,
         "samples_ms": [...], "throughput_per_s": batch * 1000 / p50,
         "ratio_vs_onnxruntime": onnxruntime p50 / this p50 (> 1: faster) | null,
         "output_rel_err": ||y - y_onnxruntime|| / ||y_onnxruntime|| | null,
         "kernel_share": bfp: rows: integer GEMM kernel seconds / all ops' seconds | null,
         "profile": {"total_ms", "kernel_ms", "kernel_share", "kernel", "threads", "runs", "kind_ms",
                     "kind_counts", "top_ops", "input_shapes"} (bfp: rows only; absent in older results),
         "setup_s": seconds to prepare, "info": {...backend details; bfp: rows: "kernel", "threads"...}}
      ],
      "wall_s": seconds
    }

Example:
    >>> from bfpaccel.bench import run_benchmark, format_table  # doctest: +SKIP
    >>> print(format_table(run_benchmark("resnet50", "bfp:msfp16,onnxruntime", batches="1")))  # doctest: +SKIP
"""

from .backends import (BACKEND_HELP, DEFAULT_BACKENDS, Backend, BenchArgumentError, BenchContext, Unavailable,
                       parse_backends)
from .harness import SCHEMA, check_model, environment, latency_stats, parse_batches, run_benchmark
from .report import compare, compare_rows, format_markdown, format_table, load_result, plot

__all__ = ["run_benchmark", "parse_backends", "parse_batches", "check_model", "environment", "latency_stats",
           "format_table", "format_markdown", "plot", "compare", "compare_rows", "load_result", "Backend",
           "BenchContext", "Unavailable", "BenchArgumentError", "DEFAULT_BACKENDS", "BACKEND_HELP", "SCHEMA"]
