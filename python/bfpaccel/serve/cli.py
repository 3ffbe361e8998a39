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

__all__ = ["add_serve_parser", "run_serve", "add_predict_parser", "run_predict", "main", "port_number",
           "read_key_file", "AUTH_KEY_ENV"]

#: Environment variable with the accepted key(s) of ``serve`` (one per line) and the key of
#: ``predict`` / ``loadtest``: keys on a command line are visible to every local user.
AUTH_KEY_ENV = "BFPACCEL_AUTH_KEY"


def port_number(text: str) -> int:
    """argparse type of a TCP port: an integer in 0..65535."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: use an integer in 0..65535") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {v}: ports run from 0 to 65535")
    return v


def read_key_file(path: str) -> List[str]:
    """The keys in a key file: one per line, blank lines ignored. Warns (stderr) when other
    users may read it."""
    import os
    import stat

    with open(path) as f:
        keys = [line.strip() for line in f if line.strip()]
    if not keys:
        raise ValueError(f"key file {path} holds no key")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        print(f"bfpaccel: warning: key file {path} can be read by other users (mode {mode:o}): chmod 600 {path}",
              file=sys.stderr)
    return keys


def _warn_key_on_command_line(flag: str, instead: str) -> None:
    print(f"bfpaccel: warning: {flag} puts the key on the command line, where every local user can read it "
          f"(ps, /proc/PID/cmdline); use {instead} or the {AUTH_KEY_ENV} environment variable", file=sys.stderr)


def _server_keys(args: argparse.Namespace) -> List[str]:
    """Accepted keys from --auth-key-file, $BFPACCEL_AUTH_KEY and (warned) --auth-key."""
    import os

    keys: List[str] = []
    for path in getattr(args, "auth_key_file", None) or []:
        keys += read_key_file(path)
    env = os.environ.get(AUTH_KEY_ENV, "")
    keys += [k.strip() for k in env.splitlines() if k.strip()]
    if args.auth_key:
        _warn_key_on_command_line("--auth-key", "--auth-key-file FILE")
        keys += [k for k in args.auth_key if k]
    return list(dict.fromkeys(keys))


def _client_key(args: argparse.Namespace) -> str:
    """The key of predict/loadtest from --key-file, $BFPACCEL_AUTH_KEY or (warned) --key."""
    import os

    if getattr(args, "key_file", None):
        return read_key_file(args.key_file)[0]
    if args.key:
        _warn_key_on_command_line("--key", "--key-file FILE")
        return str(args.key)
    env = [k.strip() for k in os.environ.get(AUTH_KEY_ENV, "").splitlines() if k.strip()]
    return env[0] if env else ""


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
    p.add_argument("--port", type=port_number, default=50051, help="port (default 50051; 0: any free port)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (TLS on)")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--auth-key-file", action="append", default=[], metavar="FILE",
                   help="file of accepted keys, one per line (repeatable): auth on. The keys can also come "
                   f"from ${AUTH_KEY_ENV} (one per line)")
    p.add_argument("--auth-key", action="append", default=[], metavar="K",
                   help="accepted key (repeatable): auth on. Deprecated: other local users can read a command "
                   "line; use --auth-key-file or $" + AUTH_KEY_ENV)
    p.add_argument("--workers", type=int, default=2, help="model instances per plan (default 2)")
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting before RESOURCE_EXHAUSTED")
    p.add_argument("--max-message-mb", type=float, default=64.0, help="largest request/response (MiB, default 64)")
    p.add_argument("--metrics-port", type=port_number, default=None, help="Prometheus metrics at :PORT/metrics")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the C++ core for each loaded model's session (default: the process "
                   "setting, $BFPACCEL_NUM_THREADS or all CPUs)")
    p.add_argument("--kernel", default=None, metavar="NAME",
                   help="kernel of each loaded model's session: one of `bfpaccel info`'s available kernels "
                   "(default: the fastest, or $BFPACCEL_KERNEL)")
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
    auth_keys = _server_keys(args)
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
                   auth_keys=auth_keys or None, max_message_bytes=int(args.max_message_mb * 1024 * 1024),
                   workers=args.workers, queue_size=args.queue_size, metrics_port=args.metrics_port,
                   warmup=not args.no_warmup, num_threads=args.threads, kernel=args.kernel, block=False,
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
    p.add_argument("--key-file", default=None, metavar="FILE",
                   help=f"file holding the service key (first line); or set ${AUTH_KEY_ENV}")
    p.add_argument("--key", default="", help="service key (deprecated: other local users can read a command line)")
    p.add_argument("--ssl", action="store_true", help="TLS")
    p.add_argument("--ca", default=None, help="PEM CA file to trust (self-signed servers)")
    p.add_argument("--input-name", default="images", help="input key (images or Placeholder:0)")
    p.add_argument("--output", default=None, help="output tensor name or alias (default: the model's output)")
    p.add_argument("--top", type=int, default=5, help="how many classes (default 5)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to wait for the service to accept a connection (default 5)")
    p.set_defaults(func=run_predict)
    return p


def _wait_connected(channel: Any, timeout: float) -> Any:
    """The channel's state after its first connection attempt: READY, TRANSIENT_FAILURE (a
    dead address fails at once instead of retrying with back-off), or None after ``timeout``."""
    import grpc

    done = threading.Event()
    seen: List[Any] = [None]

    def on_change(state: Any) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                     grpc.ChannelConnectivity.SHUTDOWN):
            seen[0] = state
            done.set()

    channel.subscribe(on_change, try_to_connect=True)
    try:
        done.wait(timeout)
    finally:
        channel.unsubscribe(on_change)
    return seen[0]


def run_predict(args: argparse.Namespace) -> int:
    """Handler of ``bfpaccel predict``: prints ``file``, then ``rank score label`` lines."""
    import os

    import numpy as np

    from ..labels import imagenet_labels
    from .client import PredictionClient
    from .loadtest import _split_address

    import grpc

    host, port = _split_address(args.address, None, args.ssl)
    if not 0 < port <= 65535:
        raise ValueError(f"invalid port {port} in --address {args.address!r}: ports run from 1 to 65535")
    for path in args.files:
        if not os.path.isfile(path):
            raise ValueError(f"image not found: {path}")
    client = PredictionClient(host, port, args.ssl, _client_key(args), args.service, root_certificates=args.ca,
                              retry="transient")
    client._get_grpc_stub()
    state = _wait_connected(client._channel, max(0.1, args.connect_timeout))
    if state != grpc.ChannelConnectivity.READY:
        client.close()
        why = (f"no answer within {args.connect_timeout:g} s" if state is None
               else "connection refused, unreachable or the TLS handshake failed")
        raise ConnectionError(f"cannot connect to {host}:{port}: {why} (is the service running there"
                              + ("? Is it a TLS service?)" if args.ssl else "? Add --ssl for a TLS service)"))
    labels: Optional[List[str]] = None
    for path in args.files:
        try:
            res = client.score_file(path, input_name=args.input_name, outputs=args.output, timeout=args.timeout)
        except grpc.RpcError as e:
            client.close()
            code = e.code().name if hasattr(e, "code") and e.code() is not None else "ERROR"
            details = e.details() if hasattr(e, "details") else str(e)
            raise ConnectionError(f"{path}: the service at {host}:{port} answered {code}: {details}") from None
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
    from ..registry import RegistryError

    try:
        return run_serve(args)
    except (ValueError, OSError, LookupError, RegistryError) as e:
        print(f"bfpaccel serve: error: {e}", file=sys.stderr)
        return 2
