"""``bfpaccel serve`` / ``bfpaccel predict`` (and ``python -m bfpaccel.serve``) handlers.

Example:
    $ python -m bfpaccel.serve --plan resnet50.bfpplan --port 50051
    $ bfpaccel predict --address 127.0.0.1:50051 cat.jpg
"""

from __future__ import annotations

import argparse
import inspect
import logging
import signal
import sys
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional

__all__ = ["add_serve_parser", "run_serve", "add_predict_parser", "run_predict", "main", "port_number",
           "read_key_file", "AUTH_KEY_ENV", "keywords_serve_accepts"]

from .config import (AUTH_KEY_ENV, ServerConfig, add_server_arguments, collect_auth_keys, port_number, read_key_file,
                     serve_keyword_flags)


def _warn_key_on_command_line(flag: str, instead: str) -> None:
    print(f"bfpaccel: warning: {flag} puts the key on the command line, where every local user can read it "
          f"(ps, /proc/PID/cmdline); use {instead} or the {AUTH_KEY_ENV} environment variable", file=sys.stderr)


def _server_keys(args: argparse.Namespace) -> List[str]:
    """Accepted keys from --auth-key-file, $BFPACCEL_AUTH_KEY and (warned) --auth-key."""
    import os

    return collect_auth_keys(getattr(args, "auth_key_file", None) or [], getattr(args, "auth_key", None) or [],
                             os.environ)


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
    """The flags of ``serve``: generated from :class:`~bfpaccel.serve.config.ServerConfig`."""
    add_server_arguments(p)


def _registry_plans(cfg: ServerConfig) -> Dict[str, str]:
    """``--model NAME[:VERSION]`` -> plan paths (registered plans as they are; registered ONNX
    models compiled once to ``--format`` and cached beside the registry)."""
    import os

    if not cfg.model:
        return {}
    from ..registry import Model, Registry

    reg = Registry(cfg.registry_path())
    out: Dict[str, str] = {}
    for spec in cfg.model:
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
            plan = os.path.join(cache, f"{m.name}-{m.version}-{cfg.format}.bfpplan")
            if not os.path.isfile(plan):
                from .. import compile as bfp_compile

                bfp_compile(onnx, format=cfg.format).save(plan)
        out[m.name.split(".")[0] if len(cfg.model) > 1 else (cfg.name or m.name)] = plan
    return out


def _image_limits(args: argparse.Namespace) -> Dict[str, Any]:
    """``--max-image-pixels`` / ``--max-resize-pixels`` as serve() keywords, for the flags that
    were given (0 or less: no limit, None), as :class:`ServerConfig` reads them."""
    cfg = ServerConfig.from_args(args)
    return {k: getattr(cfg, k) for k in ("max_image_pixels", "max_resize_pixels") if getattr(args, k, None) is not None}


def keywords_serve_accepts(serve_fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """The part of ``kwargs`` (from :meth:`ServerConfig.serve_kwargs`) that ``serve_fn`` takes.

    ServerConfig declares options ahead of the server that implements them (the REST faces,
    dynamic batching, model-root versions...).  So that ``bfpaccel serve`` runs on ``serve()``
    both before and after it learns them, a keyword its signature does not name is dropped,
    but only while it holds its default: an option that was set and that this server cannot
    honour is a ValueError naming its flag, never silently ignored.
    """
    params = inspect.signature(serve_fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    defaults = ServerConfig.serve_defaults()
    flags = serve_keyword_flags()
    out: Dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in params:
            out[key] = value
        elif key not in defaults or value != defaults[key]:
            raise ValueError(f"{flags.get(key, key)} is not supported by this server version (serve() has no "
                             f"{key!r} option)")
    return out


def run_serve(args: argparse.Namespace) -> int:
    """Runs the server until SIGTERM/SIGINT; returns the exit code."""
    import os

    from .server import serve

    cfg = ServerConfig.from_args(args)
    if not cfg.plan and not cfg.model and cfg.model_root is None:
        raise ValueError("give --plan PATH or --model NAME[:VERSION] (with --registry), or --model-root DIR")
    cfg.check_files()
    kwargs = keywords_serve_accepts(serve, cfg.serve_kwargs())
    plans: Dict[str, str] = dict(_registry_plans(cfg))
    for spec in cfg.plan:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        if not name:
            name = cfg.name if (cfg.name and len(cfg.plan) == 1) else os.path.basename(path).split(".")[0]
        if name in plans:
            raise ValueError(f"two plans for the route {name!r}")
        plans[name] = path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if cfg.quiet:
        logging.getLogger("bfpaccel.serve.access").setLevel(logging.WARNING)
    handle = serve(plans, block=False, **kwargs)
    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stopping.is_set():
            return
        stopping.set()
        print(f"bfpaccel serve: signal {signum}: draining (up to {cfg.grace:g} s)", file=sys.stderr, flush=True)
        threading.Thread(target=handle.stop, args=(cfg.grace,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    http_port = getattr(handle, "http_port", None)
    print(f"bfpaccel serve: listening on {cfg.host}:{handle.port} routes={handle.routes}"
          + (f" http={http_port}" if http_port else "")
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
    """Adds ``predict`` (score images against a running service, print top-5; or embed sentences
    with ``--text``) to a sub-command set."""
    p = subparsers.add_parser("predict", help="score images on a running service and print the top-5 labels, or "
                                              "send sentences (--text) to a plan with a text front")
    p.add_argument("files", nargs="*", metavar="FILE", help="JPEG/PNG/GIF images")
    p.add_argument("--text", action="append", default=None, metavar="SENTENCE",
                   help="a sentence for a plan with a text front (repeat for several; sent together as DT_STRING "
                        "under --input-name, default 'text'); prints each embedding's size, norm and first values")
    p.add_argument("--address", required=True, help="HOST or HOST:PORT (default port 80, 443 with --ssl)")
    p.add_argument("--service", default="", help="service (route) name")
    p.add_argument("--key-file", default=None, metavar="FILE",
                   help=f"file holding the service key (first line); or set ${AUTH_KEY_ENV}")
    p.add_argument("--key", default="", help="service key (deprecated: other local users can read a command line)")
    p.add_argument("--ssl", action="store_true", help="TLS")
    p.add_argument("--ca", default=None, help="PEM CA file to trust (self-signed servers)")
    p.add_argument("--input-name", default=None, help="input key (default: images, or text with --text)")
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
    if bool(args.files) == bool(args.text):
        raise ValueError("give image FILEs or --text SENTENCE (not both, not neither)")
    if args.text and any(not t.strip() for t in args.text):
        raise ValueError("--text: a sentence is empty")
    input_name = args.input_name or ("text" if args.text else "images")
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
    if args.text:
        try:
            out = client.predict({input_name: [t.encode("utf-8") for t in args.text]},
                                 outputs=[args.output] if args.output else None, timeout=args.timeout)
        except grpc.RpcError as e:
            client.close()
            code = e.code().name if hasattr(e, "code") and e.code() is not None else "ERROR"
            details = e.details() if hasattr(e, "details") else str(e)
            raise ConnectionError(f"the service at {host}:{port} answered {code}: {details}") from None
        client.close()
        if len(out) != 1:
            print(f"{len(out)} outputs ({', '.join(sorted(out))}); choose one with --output")
            return 0
        (name, emb), = out.items()
        emb = np.asarray(emb)
        for t, row in zip(args.text, emb.reshape(len(args.text), -1)):
            head = " ".join(f"{x:.5f}" for x in row[:5])
            print(f"{t}\n  {name}: {row.size} values, L2 norm {float(np.linalg.norm(row.astype(np.float64))):.5f}, "
                  f"first [{head}{' ...' if row.size > 5 else ''}]")
        return 0
    labels: Optional[List[str]] = None
    for path in args.files:
        try:
            res = client.score_file(path, input_name=input_name, outputs=args.output, timeout=args.timeout)
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
