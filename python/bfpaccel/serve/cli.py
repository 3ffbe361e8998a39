"""``bfpaccel serve`` / ``bfpaccel predict`` (and ``python -m bfpaccel.serve``) handlers.

Example:
    $ python -m bfpaccel.serve --plan resnet50.bfpplan --port 50051
    $ bfpaccel predict --address 127.0.0.1:50051 cat.jpg
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any, Dict, List, Optional

__all__ = ["add_serve_parser", "run_serve", "add_predict_parser", "run_predict", "main"]


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``serve`` to a sub-command set; ``args.func(args)`` runs it (:func:`run_serve`)."""
    p = subparsers.add_parser("serve", help="serve compiled plans over gRPC (TF-Serving PredictionService)",
                              description="Serves plans over gRPC, wire-compatible with the seed's scoring "
                              "service. Stops on SIGTERM/SIGINT after finishing in-flight requests.")
    _serve_args(p)
    p.set_defaults(func=run_serve)
    return p


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", action="append", default=[], metavar="[NAME=]PATH",
                   help="plan file; repeat for several services on one port, routed by name")
    p.add_argument("--model", action="append", default=[], metavar="NAME[:VERSION]",
                   help="a registered model (a converted .onnx or a .bfpplan) served by name; repeatable; "
                   "ONNX models are compiled to --format once and cached in the registry folder")
    p.add_argument("--registry", default=None,
                   help="registry folder for --model (default $BFPACCEL_REGISTRY or ./bfpaccel-registry)")
    p.add_argument("--format", default="msfp16", help="BFP format when compiling a registered ONNX (msfp16)")
    p.add_argument("--name", default=None, help="service (route) name of a single --plan (default: file stem)")
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=50051, help="port (default 50051; 0: any free port)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (TLS on)")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--auth-key", action="append", default=[], metavar="K", help="accepted key (repeatable): auth on")
    p.add_argument("--workers", type=int, default=2, help="model instances per plan (default 2)")
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting before RESOURCE_EXHAUSTED")
    p.add_argument("--max-message-mb", type=float, default=64.0, help="largest request/response (MiB, default 64)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics at :PORT/metrics")
    p.add_argument("--threads", type=int, default=None, help="threads of the C++ core")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to drain in-flight requests on SIGTERM")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up call")
    p.add_argument("--warmup-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--simulated-latency-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="largest declared width x height of an encoded image, checked from its header before "
                   "decoding (default 67108864 = 8192x8192; 0: no limit); over it: INVALID_ARGUMENT")
    p.add_argument("--max-resize-pixels", type=int, default=None, metavar="N",
                   help="largest full size of the seed's resize before its crop (default 16777216: aspect "
                   "ratios up to 256:1; 0: no limit)")
    p.add_argument("--quiet", action="store_true", help="no access log")


def _registry_plans(args: argparse.Namespace) -> Dict[str, str]:
    """``--model NAME[:VERSION]`` -> plan paths (registered plans as they are; registered ONNX
    models compiled once to ``--format`` and cached beside the registry)."""
    import os

    if not args.model:
        return {}
    from ..registry import Model, Registry

    reg = Registry(args.registry or os.environ.get("BFPACCEL_REGISTRY", "bfpaccel-registry"))
    out: Dict[str, str] = {}
    for spec in args.model:
        m = Model(reg, spec)
        path = m.path
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        plan = next((f for f in files if f.endswith(".bfpplan")), None)
        if plan is None:
            onnx = next((f for f in files if f.endswith(".onnx")), None)
            if onnx is None:
                raise ValueError(f"model {m.id} holds neither a .bfpplan nor an .onnx: convert it first")
            cache = os.path.join(reg.root, "plans")
            os.makedirs(cache, exist_ok=True)
            plan = os.path.join(cache, f"{m.name}-{m.version}-{args.format}.bfpplan")
            if not os.path.isfile(plan):
                from .. import compile as bfp_compile

                bfp_compile(onnx, format=args.format).save(plan)
        out[m.name.split(".")[0] if len(args.model) > 1 else (args.name or m.name)] = plan
    return out


def _image_limits(args: argparse.Namespace) -> Dict[str, Any]:
    """``--max-image-pixels`` / ``--max-resize-pixels`` as serve() keywords (absent: the
    defaults; 0 or less: no limit)."""
    out: Dict[str, Any] = {}
    for flag in ("max_image_pixels", "max_resize_pixels"):
        v = getattr(args, flag, None)
        if v is not None:
            out[flag] = v if v > 0 else None
    return out


def run_serve(args: argparse.Namespace) -> int:
    """Runs the server until SIGTERM/SIGINT; returns the exit code."""
    from .server import serve

    plans: Dict[str, str] = {}
    if not args.plan and not args.model:
        raise ValueError("give --plan PATH or --model NAME[:VERSION] (with --registry)")
    for name, path in _registry_plans(args).items():
        plans[name] = path
    for spec in args.plan:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        if not name:
            import os

            name = args.name if (args.name and len(args.plan) == 1) else os.path.basename(path).split(".")[0]
        if name in plans:
            raise ValueError(f"two plans for the route {name!r}")
        plans[name] = path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if args.quiet:
        logging.getLogger("bfpaccel.serve.access").setLevel(logging.WARNING)
    handle = serve(plans, port=args.port, host=args.host, tls_cert=args.tls_cert, tls_key=args.tls_key,
                   auth_keys=args.auth_key or None, max_message_bytes=int(args.max_message_mb * 1024 * 1024),
                   workers=args.workers, queue_size=args.queue_size, metrics_port=args.metrics_port,
                   warmup=not args.no_warmup, num_threads=args.threads, block=False,
                   warmup_delay_s=args.warmup_delay, simulated_latency_ms=args.simulated_latency_ms,
                   **_image_limits(args))
    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stopping.is_set():
            return
        stopping.set()
        print(f"bfpaccel serve: signal {signum}: draining (up to {args.grace:g} s)", file=sys.stderr, flush=True)
        threading.Thread(target=handle.stop, args=(args.grace,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"bfpaccel serve: listening on {args.host}:{handle.port} routes={handle.routes}"
          + (f" metrics={handle.metrics_port}" if handle.metrics_port else ""), flush=True)
    try:
        handle.wait_ready()
    except RuntimeError as e:
        print(f"bfpaccel serve: {e}", file=sys.stderr, flush=True)
        handle.stop(0)
        return 1
    print("bfpaccel serve: ready", flush=True)
    while not handle.wait(0.5):
        pass
    return 0


def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``predict`` (score images against a running service, print top-5) to a sub-command set."""
    p = subparsers.add_parser("predict", help="score images on a running service and print the top-5 labels")
    p.add_argument("files", nargs="+", metavar="FILE", help="JPEG/PNG/GIF images")
    p.add_argument("--address", required=True, help="HOST or HOST:PORT (default port 80, 443 with --ssl)")
    p.add_argument("--service", default="", help="service (route) name")
    p.add_argument("--key", default="", help="service key")
    p.add_argument("--ssl", action="store_true", help="TLS")
    p.add_argument("--ca", default=None, help="PEM CA file to trust (self-signed servers)")
    p.add_argument("--input-name", default="images", help="input key (images or Placeholder:0)")
    p.add_argument("--output", default=None, help="output tensor name or alias (default: the model's output)")
    p.add_argument("--top", type=int, default=5, help="how many classes (default 5)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=run_predict)
    return p


def run_predict(args: argparse.Namespace) -> int:
    """Handler of ``bfpaccel predict``: prints ``file``, then ``rank score label`` lines."""
    import numpy as np

    from ..labels import imagenet_labels
    from .client import PredictionClient
    from .loadtest import _split_address

    host, port = _split_address(args.address, None, args.ssl)
    client = PredictionClient(host, port, args.ssl, args.key, args.service, root_certificates=args.ca,
                              retry="transient")
    labels: Optional[List[str]] = None
    for path in args.files:
        res = client.score_file(path, input_name=args.input_name, outputs=args.output, timeout=args.timeout)
        if isinstance(res, list):
            print(f"{path}: {len(res)} outputs, shapes {[np.shape(r) for r in res]}; choose one with --output")
            continue
        v = np.asarray(res).reshape(-1)
        print(path)
        if v.size == 1000 and labels is None:
            labels = list(imagenet_labels())
        for rank, i in enumerate(np.argsort(-v, kind="stable")[:args.top], 1):
            name = labels[i] if labels is not None and v.size == 1000 else str(i)
            print(f"  {rank}. {v[i]:.4f}  {name} ({i})")
    client.close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m bfpaccel.serve``: the ``serve`` command alone."""
    p = argparse.ArgumentParser(prog="python -m bfpaccel.serve", description="serve compiled plans over gRPC")
    _serve_args(p)
    args = p.parse_args(argv)
    try:
        return run_serve(args)
    except (ValueError, OSError) as e:
        print(f"bfpaccel serve: error: {e}", file=sys.stderr)
        return 2
