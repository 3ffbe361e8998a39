"""``bfpaccel bench``: latency of one model on the BFP runtime and its baselines, side by side.

    bfpaccel bench --model resnet50
    bfpaccel bench --model gru --backends bfp:msfp16,onnxruntime,fpga-model --batch 1
    bfpaccel bench --model all-minilm-l6 --batch 1 --seq 128 --backends bfp:msfp16,onnxruntime,onnxruntime-int8
    bfpaccel bench --model model.onnx --backends bfp:msfp16,onnxruntime --batch 1,8 --runs 20 \\
        --json out.json --plot out.png
    bfpaccel bench --compare before.json after.json

Every backend runs the same ONNX (TensorFlow: the zoo model's Keras model with the same seeded
weights) on the same input in one process, interleaved in blocks with pauses between them.
Prints p50/p90/p99/mean latency, throughput and the speed-up over onnxruntime float32 per
backend and batch size, and for the BFP backends the share of their time spent in the integer
GEMM kernel ("kernel share", from one untimed profile after the timed runs); a backend that
cannot run here (no GPU, ...) is reported, not fatal.  --threads and --kernel are options of
each backend's session (the BFP sessions and the server's), not process-wide settings.

Backends: bfp:FORMAT, onnxruntime, onnxruntime-int8, tensorflow, cuda, fpga-model[:NPU]
(an estimate from bfpaccel.perfmodel), serving[:FORMAT][:jpeg] (gRPC Predict on loopback).
Exit codes: 0 done, 1 the run failed (e.g. the zoo model could not be built), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from typing import Any, List, Optional

from .backends import DEFAULT_BACKENDS, BenchArgumentError, parse_backends
from .harness import (DEFAULT_BATCHES, DEFAULT_BLOCK, DEFAULT_PAUSE_S, DEFAULT_RUNS, DEFAULT_SEQ_LEN, DEFAULT_WARMUP,
                      check_model, parse_batches, run_benchmark)
from .report import compare, format_table, load_result, plot

__all__ = ["add_bench_parser", "run_bench", "main"]


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an argparse ``subparsers`` object; its handler is
    :func:`run_bench` (set as the ``func`` default).

    Example:
        >>> p = argparse.ArgumentParser(); sub = p.add_subparsers()
        >>> add_bench_parser(sub).prog.endswith("bench")
        True
    """
    p = subparsers.add_parser("bench", help="latency of a model: BFP vs onnxruntime fp32/int8, TensorFlow, GPU, "
                              "FPGA model, gRPC serving", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50",
                   help="resnet50 (default), resnet152, vgg16, densenet121, ssdvgg, efficientnet-lite0, gru or lstm "
                        "(one recurrent layer, bfpaccel.models.rnn), a transformer text encoder (all-minilm-l6, "
                        "paraphrase-minilm-l3) or PATH.onnx")
    p.add_argument("--seq", type=int, default=DEFAULT_SEQ_LEN,
                   help="text encoders: tokens per sequence (default %(default)s)")
    p.add_argument("--backends", default=DEFAULT_BACKENDS, help=f"comma-separated (default: {DEFAULT_BACKENDS})")
    p.add_argument("--batch", default=",".join(str(b) for b in DEFAULT_BATCHES),
                   help="comma-separated batch sizes (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="threads of every runtime (default: all usable CPUs)")
    p.add_argument("--kernel", default=None, metavar="NAME",
                   help="kernel of the BFP sessions (bfp: and serving), one of `bfpaccel info`'s available "
                   "kernels (default: the fastest, or $BFPACCEL_KERNEL)")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help="untimed calls per backend and batch (default %(default)s; at least one always runs)")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed calls per backend and batch (default %(default)s)")
    p.add_argument("--block", type=int, default=DEFAULT_BLOCK,
                   help="calls per backend before switching to the next (default %(default)s)")
    p.add_argument("--pause", type=float, default=DEFAULT_PAUSE_S,
                   help="idle seconds before each block, so thread pools stop spinning (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the input batch (default 0)")
    p.add_argument("--json", dest="json_path", default=None, help="write the result JSON here")
    p.add_argument("--plot", dest="plot_path", default=None, help="write a PNG plot here (needs matplotlib)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="print per-backend changes from result A to result B (runs nothing)")
    p.add_argument("--cache-dir", default=None, help="where built zoo models are kept (~/.cache/bfpaccel/models)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run_bench)
    return p


def _err(msg: str) -> None:
    print(f"bfpaccel bench: error: {msg}", file=sys.stderr)


def _check_out(path: Optional[str], what: str) -> None:
    if path:
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise BenchArgumentError(f"{what} {path!r}: folder {d!r} does not exist")


def run_bench(args: argparse.Namespace) -> int:
    """Handler of ``bfpaccel bench``: runs (or compares), prints the table, writes JSON/PNG.
    Returns 0 on success, 1 when the run failed, 2 for bad arguments."""
    if args.compare:
        try:
            a, b = (load_result(p) for p in args.compare)
        except (FileNotFoundError, ValueError) as e:
            _err(str(e))
            return 2
        print(compare(a, b, *args.compare))
        return 0
    try:
        parse_backends(args.backends)
        batches = parse_batches(args.batch)
        for name, v, lo in (("--runs", args.runs, 1), ("--warmup", args.warmup, 0), ("--block", args.block, 1)):
            if v < lo:
                raise BenchArgumentError(f"{name} must be >= {lo}, got {v}")
        if args.threads is not None and args.threads < 1:
            raise BenchArgumentError(f"--threads must be >= 1, got {args.threads}")
        if args.pause < 0:
            raise BenchArgumentError(f"--pause must be >= 0, got {args.pause}")
        if args.seq < 2:
            raise BenchArgumentError(f"--seq must be >= 2 tokens, got {args.seq}")
        if args.kernel is not None:
            from ..core import check_kernel

            try:
                check_kernel(args.kernel)
            except ValueError as e:
                raise BenchArgumentError(f"--kernel: {e}") from None
        check_model(args.model)
        _check_out(args.json_path, "--json")
        _check_out(args.plot_path, "--plot")
        if args.plot_path and importlib.util.find_spec("matplotlib") is None:
            raise BenchArgumentError("--plot needs matplotlib: pip install matplotlib")
    except (BenchArgumentError, FileNotFoundError) as e:
        _err(str(e))
        return 2
    log = (lambda m: None) if args.quiet else (lambda m: print(f"[bench] {m}", file=sys.stderr))
    t0 = time.perf_counter()
    try:
        result = run_benchmark(args.model, args.backends, batches=batches, threads=args.threads, kernel=args.kernel,
                               warmup=args.warmup, runs=args.runs, block=args.block, pause_s=args.pause,
                               seed=args.seed, cache_dir=args.cache_dir, progress=not args.no_progress,
                               seq_len=args.seq, log=log)
    except (BenchArgumentError, FileNotFoundError) as e:
        _err(str(e))
        return 2
    except (ValueError, ImportError, RuntimeError, OSError) as e:
        _err(f"{type(e).__name__}: {e}")
        return 1
    print(format_table(result))
    rc = 0
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nJSON: {args.json_path}")
    if args.plot_path:
        try:
            plot(result, args.plot_path)
            print(f"plot: {args.plot_path}")
        except Exception as e:  # the numbers are printed and saved; a failed plot is reported, not hidden
            _err(f"could not draw the plot: {type(e).__name__}: {e}")
            rc = 1
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return rc


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m bfpaccel.bench.cli ...``: the same as ``bfpaccel bench ...``."""
    p = argparse.ArgumentParser(prog="bfpaccel")
    sub = p.add_subparsers(dest="command")
    add_bench_parser(sub)
    args = p.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
