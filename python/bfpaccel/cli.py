"""The ``bfpaccel`` command (thin: every subcommand calls the public API).

Subcommands:
  demo     quantize, GEMM and convolution on the C++ core: checked bit for bit against the
           numpy reference, then timed against numpy / onnxruntime float32
  formats  the table of number formats
  info     kernels this CPU can run, threads, versions
  classify the seed workflow on your images: zoo model (or ONNX / plan) -> BFP plan -> top-5
  profile  where a model's time goes on the BFP runtime: per op kind, slowest ops, GEMM kernel share
  accuracy per-format agreement with float32 on a folder of images
  finetune distil the float32 model into a narrow block format (accuracy back after quantization)
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import Callable, List, Optional

import numpy as np

from . import __version__, core, reference
from .formats import PRESETS, get_format


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _best_ms_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], runs: int, rounds: int = 3) -> tuple:
    """Best milliseconds of two functions: ``rounds`` alternating blocks of ``runs`` calls
    each, so drift of a shared machine hits both, with a pause before each block so the
    other side's spinning thread pool (OpenBLAS, onnxruntime, OpenMP) has gone idle."""
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for k, fn in enumerate((fn_a, fn_b)):
            time.sleep(0.2)
            fn()  # warm-up: packs weights, faults pages, wakes the thread pool
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t)
    return best[0] * 1e3, best[1] * 1e3


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    same = (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))
    return bool(same.all())


def cmd_formats(args: argparse.Namespace) -> int:
    print(f"{'name':<12} {'block':>5} {'exp bits':>8} {'element':>8} {'bits/elem':>9} {'max value':>12}")
    for name, f in PRESETS.items():
        if f.is_block:
            print(f"{name:<12} {f.block:>5} {f.shared_exp_bits:>8} {f.element:>8} {f.bits_per_element:>9.3f} {f.max_value:>12.4g}")
        else:
            print(f"{name:<12} {'-':>5} {'-':>8} {f.element:>8} {f.bits_per_element:>9.0f} {f.max_value:>12.4g}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(f"bfpaccel {__version__}, numpy {np.__version__}, Python {platform.python_version()}")
    print(f"CPU: {_cpu_model()}")
    print(f"kernels available: {', '.join(core.available_kernels())}; in use: {core.get_kernel()}")
    print(f"threads: {core.get_num_threads()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    rc = _kernel_demo(args)
    if rc != 0 or args.kernels_only:
        return rc
    from .story import run_story

    print("\n== the seed's story: build, register, convert, image, deploy, score, clean up ==")
    return run_story(image=args.image, fmt=args.format, runs=args.runs * 2, threads=args.threads,
                     workdir=args.workdir)


def _kernel_demo(args: argparse.Namespace) -> int:
    fmt = get_format(args.format)
    if args.threads:
        core.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"bfpaccel {__version__} on {_cpu_model()}: kernel {core.get_kernel()}, {core.get_num_threads()} threads")
    print(f"format: {fmt}\n")

    x = np.array([1.0, 0.3, -0.77, 0.01], np.float32)
    t = core.quantize(x, fmt if fmt.block_size >= 4 else "msfp16")
    print(f"quantize {[float(f'{v:.6g}') for v in x]} -> codes {t.elements.tolist()}, exponent {t.exponents.tolist()}, "
          f"values {t.dequantize().tolist()}")

    # bit-exactness against the numpy reference, on every kernel this CPU runs
    a = (rng.standard_normal((33, 200)) * 4).astype(np.float32)
    b = rng.standard_normal((200, 47)).astype(np.float32)
    xc = rng.standard_normal((1, 24, 12, 12)).astype(np.float32)
    wc = rng.standard_normal((16, 24, 3, 3)).astype(np.float32)
    ref_mm = reference.matmul(a, b, fmt)
    ref_cv = reference.conv2d(xc, wc, fmt, padding=1, stride=2)
    ok = True
    for k in core.available_kernels():
        core.set_kernel(k)
        same = _bits_equal(core.matmul(a, b, fmt), ref_mm) and _bits_equal(
            core.conv2d(xc, wc, fmt, padding=1, stride=2), ref_cv
        )
        ok &= same
        print(f"kernel {k:<7} matmul 33x200x47 and conv 24->16 3x3/2: {'bit-exact' if same else 'MISMATCH'} vs reference")
    core.set_kernel(None)

    print(f"\nspeed, {core.get_num_threads()} threads (best of 3 alternating blocks of {args.runs} calls):")
    n = args.size
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    wq = core.quantize(b, fmt, axis=0)
    gop = 2 * n**3 / 1e9
    try:
        from threadpoolctl import threadpool_limits

        blas = threadpool_limits(core.get_num_threads(), user_api="blas")
    except ImportError:  # numpy then uses its own default thread count
        blas = None
        print("  (threadpoolctl is not installed: numpy's BLAS uses its default thread count)")
    try:
        t_bfp, t_np = _best_ms_pair(lambda: core.matmul(a, wq, fmt), lambda: a @ b, args.runs)
    finally:
        if blas is not None:
            blas.restore_original_limits()
    print(f"  GEMM {n}x{n}x{n}: {fmt.name or 'bfp'} {gop / t_bfp * 1e3:7.1f} GOP/s   "
          f"numpy fp32 {gop / t_np * 1e3:7.1f} GFLOP/s   ratio {t_np / t_bfp:.2f}x")
    try:
        import onnxruntime  # noqa: F401

        from .baselines import ort_conv_session
    except ImportError:
        print("  conv: onnxruntime is not installed (pip install onnxruntime onnx) -- no float32 baseline")
        return 0 if ok else 1
    for C, H, O in ((64, 56, 64), (128, 28, 128), (256, 14, 256), (512, 7, 512)):
        x = rng.standard_normal((1, C, H, H)).astype(np.float32)
        w = (rng.standard_normal((O, C, 3, 3)) * 0.05).astype(np.float32)
        bias = np.zeros(O, np.float32)
        cw = core.quantize_conv_weight(w, fmt)
        sess = ort_conv_session(w, bias, stride=1, pads=(1, 1, 1, 1), threads=core.get_num_threads())
        t_b, t_ort = _best_ms_pair(
            lambda: core.conv2d(x, cw, fmt, bias=bias, padding=1), lambda: sess.run(None, {"x": x}), args.runs
        )
        g = 2 * O * C * 9 * H * H / 1e9
        print(f"  ResNet-50 conv 3x3 {C}->{O} @{H}x{H}: {fmt.name or 'bfp'} {g / t_b * 1e3:6.1f} GOP/s  "
              f"onnxruntime fp32 {g / t_ort * 1e3:6.1f} GFLOP/s  ratio {t_ort / t_b:.2f}x")
    return 0 if ok else 1


def cmd_classify(args: argparse.Namespace) -> int:
    """Seed workflow in one command: model -> ONNX (zoo: TF graph + tf2onnx, cached) -> BFP
    plan -> preprocess each image the model's way -> top-5 (SSD: detections)."""
    import os

    from .labels import imagenet_labels
    from .runtime import Plan, Predictor, compile, load_plan, top_k

    if args.threads is not None:
        core.check_num_threads(args.threads)
    for path in args.images:
        if not os.path.isfile(path):
            raise ValueError(f"image not found: {path}")
    log = (lambda m: None) if args.quiet else (lambda m: print(f"[bfpaccel] {m}", file=sys.stderr))
    t0 = time.perf_counter()
    plan: Plan
    if args.model.endswith(".bfpplan"):
        plan = load_plan(args.model)
        note = f"plan {args.model}"
    else:
        from .accuracy import resolve_model

        onnx_path, note = resolve_model(args.model, weights=args.weights, cache_dir=args.cache_dir, log=log)
        log(f"compiling {os.path.basename(onnx_path)} to {args.format} (vector precision {args.vector_precision})")
        plan = compile(onnx_path, format=args.format, vector_precision=args.vector_precision)
        if args.save_plan:
            plan.save(args.save_plan)
            log(f"plan written to {args.save_plan}")
    pred = Predictor(plan, num_threads=args.threads)  # the threads are this predictor's session option
    log(f"ready in {time.perf_counter() - t0:.1f} s ({note})")
    labels = imagenet_labels()
    for path in args.images:
        with open(path, "rb") as f:
            data = f.read()
        x = pred.preprocess([data])
        pred.predict(x)  # first call builds the program for this shape
        t = time.perf_counter()
        out = pred.predict(x)
        ms = (time.perf_counter() - t) * 1e3
        print(f"{path}  ({plan.format}, {ms:.1f} ms)")
        if len(out) == 12 and all("ssd_300_vgg" in k for k in out):
            from .models.ssdvgg_utils import postprocess

            classes, scores, boxes = postprocess([out[k] for k in pred.output_names])
            if len(classes) == 0:
                print("  no detections above 0.5")
            for c, sc, b in list(zip(classes, scores, boxes))[:10]:
                print(f"  class {int(c):2d}  score {float(sc):.3f}  box [ymin xmin ymax xmax] {np.round(b, 3).tolist()}")
            continue
        for name, y in out.items():
            v = y.reshape(y.shape[0], -1)[0]
            if v.size != 1000:
                print(f"  {name}: shape {tuple(y.shape)}")
                continue
            kind = "prob" if abs(float(v.sum()) - 1.0) < 1e-2 and float(v.min()) >= 0 else "logit"
            print(f"  {name}")
            for rank, (i, sc, lab) in enumerate(top_k(v, 5, labels), 1):
                print(f"    {rank}. {lab:<32s} {kind} {sc:.4f}  (class {i})")
    return 0


def _profile_inputs(plan: "object", batch: int, seed: int) -> dict:
    """A seeded float32 feed for every input of ``plan`` (the batch in each symbolic first
    dimension; pixel-sized values for a plan with an image front, as ``bfpaccel bench``)."""
    rng = np.random.default_rng(seed)
    pre = getattr(plan, "metadata", {}).get("bfpaccel.preprocess", "")
    scale = 50.0 if '"kind": "image"' in pre else 1.0
    feeds = {}
    for name, shape in plan.input_shapes.items():  # type: ignore[attr-defined]
        if shape is None:
            raise ValueError(f"the plan's input {name!r} has no recorded shape: cannot make an input for it")
        dims = list(shape)
        if dims and dims[0] is None:
            dims[0] = batch
        if any(d is None for d in dims):
            raise ValueError(f"the plan's input {name!r} has shape {['N' if d is None else d for d in shape]}: "
                             "only the batch dimension may be symbolic")
        feeds[name] = (rng.standard_normal(dims) * scale).astype(np.float32)
    return feeds


def cmd_profile(args: argparse.Namespace) -> int:
    """Compiles (or loads) a model, runs it with per-op timing on a seeded input and prints
    ``Session.profile_summary``'s table: time per op kind, the slowest ops, and the share of the
    integer GEMM kernel."""
    import os

    from .runtime import Session, compile, load_plan

    # cheap checks first: a typo must not cost a model build
    if args.kernel is not None:
        core.check_kernel(args.kernel)
    if args.threads is not None:
        core.check_num_threads(args.threads)
    if args.batch < 1 or args.top < 0:
        raise ValueError("--batch must be >= 1 and --top >= 0")
    if args.format is not None:
        get_format(args.format)
    log = (lambda m: None) if args.quiet else (lambda m: print(f"[bfpaccel] {m}", file=sys.stderr))
    if args.model.endswith(".bfpplan"):
        if not os.path.isfile(args.model):
            raise FileNotFoundError(f"plan file {args.model!r} does not exist")
        plan = load_plan(args.model)
        if args.format is not None and get_format(args.format) != plan.format:
            raise ValueError(f"{args.model} is compiled for {plan.format.name or plan.format}; --format "
                             f"{args.format} needs the ONNX model (or leave --format out)")
        note = f"plan {args.model}"
    else:
        from .accuracy import resolve_model

        fmt = args.format or "msfp16"
        onnx_path, note = resolve_model(args.model, weights=args.weights, cache_dir=args.cache_dir, log=log)
        log(f"compiling {os.path.basename(onnx_path)} to {fmt}")
        plan = compile(onnx_path, format=fmt, vector_precision=args.vector_precision)
    sess = Session(plan, num_threads=args.threads, kernel=args.kernel)
    feeds = _profile_inputs(plan, args.batch, args.seed)
    log(f"profiling {args.runs} run(s) on kernel {sess.kernel}, {sess.num_threads} thread(s)")
    summary = sess.profile_summary(feeds, runs=args.runs, top=args.top)
    fmt_name = plan.format.name or str(plan.format)
    print(f"model {args.model} ({note}), format {fmt_name}, vector precision {plan.vector_precision}, "
          f"batch {args.batch}")
    print(summary.format())
    return 0


_KERAS_APPS = {"resnet50": "ResNet50", "resnet152": "ResNet152", "vgg16": "VGG16", "densenet121": "DenseNet121"}


def cmd_fetch_weights(args: argparse.Namespace) -> int:
    """Downloads the public Keras-applications ImageNet weights (needs the internet and the tf
    extra) and writes them as a Keras ``.weights.h5`` file the zoo loads with ``weights=PATH``."""
    import os

    name = args.model.lower()
    if name not in _KERAS_APPS:
        raise ValueError(f"no public Keras ImageNet weights for {args.model!r}; choose one of {', '.join(_KERAS_APPS)} "
                         "(SSD-VGG has none)")
    os.makedirs(args.dest, exist_ok=True)
    path = os.path.join(args.dest, f"{name}_imagenet.weights.h5")
    try:
        import keras
    except ImportError as e:
        raise ImportError("fetching Keras weights needs TensorFlow/Keras: pip install 'bfpaccel[tf]'") from e
    print(f"downloading the Keras {_KERAS_APPS[name]} ImageNet weights (keras caches them in ~/.keras/models) ...")
    try:
        model = getattr(keras.applications, _KERAS_APPS[name])(weights="imagenet")
    except Exception as e:  # keras raises plain Exceptions on network errors
        raise RuntimeError(f"could not download the weights (is this machine online?): {e}") from e
    model.save_weights(path)
    print(f"wrote {path}\nuse it with: bfpaccel classify --model {name} --weights {path} IMAGE, or "
          f"models.{'Quantized' + {'resnet50': 'Resnet50', 'resnet152': 'Resnet152', 'vgg16': 'Vgg16', 'densenet121': 'Densenet121'}[name]}"
          f"(base, weights={path!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bfpaccel",
        description="Block-floating-point (MSFP, Brainwave ms-fp8/9, OCP MX) inference the way a Brainwave-style "
        "FPGA NPU runs it: bit-exact and fast on a CPU.",
    )
    p.add_argument("--version", action="version", version=f"bfpaccel {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="kernel check, then the seed's whole story (build, convert, compile, serve, "
                       "score a JPEG, top-5, latency vs onnxruntime)",
                       description="Checks the kernels bit for bit against the numpy reference and times them; "
                       "then (with the tf extra) runs the seed workflow end to end: QuantizedResnet50 TF graph "
                       "-> register -> convert -> image (BFP plan) -> local gRPC deployment -> "
                       "PredictionClient.score_file -> top-5 -> latency table -> clean up.")
    d.add_argument("--format", default="msfp16", help="number format (see `bfpaccel formats`; default msfp16)")
    d.add_argument("--threads", type=int, default=None, help="kernel threads (default: all CPUs)")
    d.add_argument("--size", type=int, default=1024, help="GEMM size n for n x n x n (default 1024)")
    d.add_argument("--runs", type=int, default=5, help="timed calls per block; 3 blocks each side, best taken (default 5)")
    d.add_argument("--kernels-only", action="store_true", help="only the kernel check, not the seed story")
    d.add_argument("--image", default=None, help="JPEG/PNG to score in the story (default: a generated picture)")
    d.add_argument("--workdir", default=None, help="keep the story's SavedModel/registry/plans here (default: temp)")
    d.set_defaults(fn=cmd_demo)
    f = sub.add_parser("formats", help="list the number formats")
    f.set_defaults(fn=cmd_formats)
    i = sub.add_parser("info", help="kernels, threads and versions")
    i.set_defaults(fn=cmd_info)
    c = sub.add_parser("classify", help="model -> BFP plan -> top-5 labels of your images (the seed workflow)",
                       description="Builds the model the seed's way (zoo: TF graph with preprocess_array, random "
                       "seeded weights unless --weights says otherwise; converted with tf2onnx and cached), compiles "
                       "it to a BFP plan and prints the top-5 ImageNet labels (SSD: detections) per image.")
    c.add_argument("images", nargs="+", help="JPEG/PNG/GIF files")
    c.add_argument("--model", default="resnet50",
                   help="resnet50 (default), resnet152, vgg16, densenet121, ssdvgg, efficientnet-lite0 (real "
                   "ImageNet weights; needs torch), PATH.onnx or PATH.bfpplan")
    c.add_argument("--format", default="msfp16", help="BFP format of the matrix ops (default msfp16)")
    c.add_argument("--vector-precision", default=None, help="fp16 (default for BFP), bf16 or fp32")
    c.add_argument("--weights", default="random", help="zoo models: random (default), store, or a Keras .h5 file")
    c.add_argument("--cache-dir", default=None, help="where converted models are kept (~/.cache/bfpaccel/models)")
    c.add_argument("--save-plan", default=None, help="also write the compiled plan to this file")
    c.add_argument("--threads", type=int, default=None, help="kernel threads (default: all CPUs)")
    c.add_argument("--quiet", action="store_true", help="no progress messages")
    c.set_defaults(fn=cmd_classify)
    pr = sub.add_parser("profile", help="where a model's time goes on the BFP runtime: per op kind, slowest ops, "
                        "integer GEMM kernel share",
                        description="Compiles the model (or loads a plan), runs it with per-op timing on a seeded "
                        "random input and prints the fastest run's time per op kind (conv, dense, depthwise conv, "
                        "add, pool, transpose...), the slowest ops and the kernel share: the part of the time "
                        "spent in the integer GEMM kernel (Session.profile_summary). --kernel and --threads are "
                        "options of the profiled session only.")
    pr.add_argument("--model", required=True,
                    help="PATH.onnx, PATH.bfpplan, or a zoo name: resnet50, resnet152, vgg16, densenet121, ssdvgg, "
                    "efficientnet-lite0")
    pr.add_argument("--format", default=None,
                    help="BFP format to compile an ONNX / zoo model to (default msfp16); a plan keeps its own")
    pr.add_argument("--vector-precision", default=None, help="fp16 (default for BFP), bf16 or fp32")
    pr.add_argument("--kernel", default=None, metavar="NAME",
                    help="kernel of the session (default: the process default; see `bfpaccel info`)")
    pr.add_argument("--threads", type=int, default=None, help="threads of the session (default: all CPUs)")
    pr.add_argument("--runs", type=int, default=5, help="profiled runs; the fastest is shown (default 5)")
    pr.add_argument("--batch", type=int, default=1, help="batch size of the random input (default 1)")
    pr.add_argument("--top", type=int, default=15, help="slowest ops listed (default 15)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    pr.add_argument("--weights", default="random", help="zoo models: random (default), store, or a Keras .h5 file")
    pr.add_argument("--cache-dir", default=None, help="where converted models are kept (~/.cache/bfpaccel/models)")
    pr.add_argument("--quiet", action="store_true", help="no progress messages")
    pr.set_defaults(fn=cmd_profile)
    fw = sub.add_parser("fetch-weights", help="download the public Keras ImageNet weights of a zoo model (online)",
                        description="Downloads the Keras-applications ImageNet weights (ResNet50/152, VGG16, "
                        "DenseNet121; needs the internet and the tf extra) into a .weights.h5 file that the model "
                        "zoo loads with weights=PATH. Nothing else in bfpaccel touches the network.")
    fw.add_argument("--model", required=True, help=", ".join(_KERAS_APPS))
    fw.add_argument("--dest", default=".", help="folder for the .weights.h5 file (default: current folder)")
    fw.set_defaults(fn=cmd_fetch_weights)
    from .bench.cli import add_bench_parser
    from .perfmodel.cli import add_estimate_parser

    add_bench_parser(sub).set_defaults(fn=lambda args: args.func(args))

    add_estimate_parser(sub).set_defaults(fn=lambda args: args.func(args))
    from .deploy.cli import add_registry_parsers
    from .serve.cli import add_predict_parser, add_serve_parser
    from .serve.loadtest import add_loadtest_parser

    add_registry_parsers(sub)
    for add in (add_serve_parser, add_predict_parser, add_loadtest_parser):
        add(sub).set_defaults(fn=lambda args: args.func(args))
    from .accuracy import add_accuracy_parser

    a = add_accuracy_parser(sub)
    a.set_defaults(fn=lambda args: args.func(args))
    from .compile_cli import add_compile_parser

    add_compile_parser(sub)
    from .finetune import add_finetune_parser

    add_finetune_parser(sub).set_defaults(fn=lambda args: args.func(args))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Runs one subcommand. A user mistake (bad argument, missing file or model, unreachable
    service, malformed plan, ...) is one line on stderr and exit status 2, never a traceback."""
    from .registry import RegistryError

    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise ValueError("--threads must be >= 1")
        if getattr(args, "size", 1) < 1 or getattr(args, "runs", 1) < 1:
            raise ValueError("--size and --runs must be >= 1")
        return int(args.fn(args))
    except KeyboardInterrupt:
        print("bfpaccel: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError, ImportError, OverflowError, RegistryError) as exc:
        print(f"bfpaccel: error: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
