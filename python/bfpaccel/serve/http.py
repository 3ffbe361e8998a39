"""The HTTP faces of the server on one port: TensorFlow Serving's REST API (``/v1/...``), the
KServe v2 / Open Inference Protocol REST API (``/v2/...``) and Prometheus ``/metrics``.

Both REST faces run on the :class:`~bfpaccel.serve.core.ServingCore` the gRPC faces use (same
models, versions, workers, queue, auth and metrics), as an ASGI application (starlette routing)
on uvicorn, in a background thread with its own event loop.  Model calls block, so they run
in a thread pool (at most ``max_connections`` at once), never on the event loop; decoding and
encoding JSON run there too.

TensorFlow Serving REST (as TF Serving documents it):

* ``GET /v1/models/<m>[/versions/<v>|/labels/<l>]``: model status
  (``{"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": ...}]}``).
* ``GET .../metadata``: ``{"model_spec": ..., "metadata": {"signature_def": <SignatureDefMap>}}``.
* ``POST /v1/models/<m>[/versions/<v>|/labels/<l>]:predict`` with ``{"instances": [...]}``
  (row format, answered ``{"predictions": ...}``) or ``{"inputs": ...}`` (columnar, answered
  ``{"outputs": ...}``); encoded images as ``{"b64": "..."}``.  Each output tensor is
  answered once, under its tensor name (a model with one output answers a plain list).
  Integer inputs (token ids, attention masks) are JSON integers, kept integer (a float there is
  a 400); a model of several inputs takes them by name (``{"instances": [{"input_ids": [...],
  "attention_mask": [...]}]}``).  A plan with a text front takes sentences as strings
  (``{"instances": ["a sentence", ...]}``) and answers their embeddings.
  ``:classify`` and ``:regress`` answer 501.

KServe v2 REST:

* ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready`` (200 or 503),
  ``/v2/models/<m>[/versions/<v>]`` (metadata: inputs and outputs with datatype and shape, -1
  for a free dimension), ``.../ready`` (200, 503 while loading, 404 for an unknown model).
* ``POST /v2/models/<m>[/versions/<v>]/infer``: JSON tensors or the binary tensor data
  extension (``Inference-Header-Content-Length``), requested outputs (names or aliases) and
  ``binary_data``; a request ``parameters.timeout`` (microseconds, as Triton) bounds the wait
  for a worker.

Errors are ``{"error": "..."}`` with the HTTP status of the core's :class:`Code`: 400 (bad
JSON, datatype, shape, input or output name), 401 (auth on, key missing or wrong), 404
(unknown model, version, label or URL), 405, 408 (head or body not sent within
``body_timeout_s``), 413 (body over ``max_body_bytes``), 429 (queue
full), 431 (head over ``max_header_bytes``), 501, 503 (loading, shutting down, or over
``max_connections``), 504 (deadline passed).
A request head over ``max_header_bytes`` is answered 431 (JSON); a head that trickles in so that
the HTTP parser would hold more than that unparsed is refused by the HTTP layer (a plain-text 400).
Bodies are read as a stream and refused at ``max_body_bytes`` (at once when Content-Length
says so); ``Content-Encoding: gzip``/``deflate`` bodies are inflated up to the same limit.
A client has ``body_timeout_s`` to send a request head (from connecting, or from the previous
response on a kept-alive connection) and then as long again for the whole body; one that
stalls or trickles either is answered 408 and the connection is closed, so a slow client holds
a connection (and a request slot) for a bounded time.  Idle kept-alive connections close after
5 s.
Auth (``Authorization: Bearer <key>``) guards every route except ``/v2/health/*`` and
``/metrics``, which load balancers and Prometheus call without keys.

Every request is counted in the core's metrics (protocol ``tfs-rest`` / ``v2-rest``) and
logged as a JSON line to the ``bfpaccel.serve.access`` logger.

Example:
    >>> h = serve("tiny.bfpplan", port=0, http_port=0)  # doctest: +SKIP
    >>> requests.post(f"http://127.0.0.1:{h.http_port}/v1/models/tiny:predict",
    ...               json={"instances": [{"b64": b64_jpeg}]}).json()["predictions"]  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import _protos as pb
from . import wire
from .core import (Code, ServingCore, ServingError, VersionState, check_array, check_dtype, decode_texts,
                   element_limit, invalid, typed_feed)
from .tfs_grpc import SIGNATURES, signature_def

try:
    import anyio
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError as _e:  # the HTTP port is an optional feature
    raise ImportError(f"the HTTP port (http_port= / --http-port) needs uvicorn and starlette: "
                      f"pip install 'bfpaccel[serve]' ({_e})") from _e

__all__ = ["HttpServer", "SERVER_NAME", "V2_EXTENSIONS"]

log = logging.getLogger("bfpaccel.serve")
access_log = logging.getLogger("bfpaccel.serve.access")

#: The ``name`` of ``GET /v2``.
SERVER_NAME = "bfpaccel"
#: The v2 protocol extensions this server offers (``GET /v2``).
V2_EXTENSIONS = ("binary_tensor_data",)
#: The v2 ``platform`` of a model.
V2_PLATFORM = "bfpaccel_plan"

_UNNAMED = "<unnamed>"  # the key of a TF REST value given without an input name
_JSON = "application/json"
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class _Reply:
    """What a handler answers: status, body and headers (built off the event loop)."""

    status: int = 200
    body: bytes = b""
    media_type: Optional[str] = _JSON
    headers: Dict[str, str] = field(default_factory=dict)
    code: Code = Code.OK


def _json_reply(doc: Any, status: int = 200) -> _Reply:
    return _Reply(status, json.dumps(doc, allow_nan=True).encode())


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _dims(shape: Optional[Tuple[Optional[int], ...]]) -> List[int]:
    """A shape as the v2 protocol writes it: -1 for a free dimension (unknown rank: ``[-1]``)."""
    if shape is None:
        return [-1]
    return [-1 if d is None else int(d) for d in shape]


def _inflate(body: bytearray, encoding: str, limit: int) -> bytearray:
    """A gzip/deflate body inflated to at most ``limit`` bytes (TOO_LARGE beyond)."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "x-gzip", "deflate"):
        raise invalid(f"Content-Encoding {encoding!r} is not supported; send identity, gzip or deflate")
    d = zlib.decompressobj(zlib.MAX_WBITS | 16 if "gzip" in enc else zlib.MAX_WBITS)
    try:
        out = d.decompress(bytes(body), limit + 1)
    except zlib.error as e:
        raise invalid(f"the {enc} body could not be inflated: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ServingError(Code.TOO_LARGE, f"the inflated request body is over this server's limit of {limit} "
                           "bytes (max_body_bytes / --max-body-mb)")
    if not d.eof:
        raise invalid(f"the {enc} body is truncated")
    return bytearray(out)


class _ReadTimeout(Exception):
    """The request body did not arrive within ``body_timeout_s`` (answered 408, connection closed)."""


def _head_deadline_protocol(http: "HttpServer") -> type:
    """uvicorn's h11 protocol with a deadline on the request head: a connection that has not
    sent a complete head ``http.body_timeout_s`` after connecting (or after its previous
    response) is answered 408 and closed.  uvicorn arms no timer before the first head, and
    its keep-alive timer stops at the first byte of the next one, so without this a client
    that connects and trickles (or never sends) a head holds the connection forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = _error_body(f"the request head was not complete within {http.body_timeout_s:g} s "
                       "(body_timeout_s / --body-timeout-s)")
    reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
             + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)

    class HeadDeadlineProtocol(H11Protocol):  # type: ignore[misc]
        _head_timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = None if self.transport.is_closing() else \
                self.loop.call_later(http.body_timeout_s, self._head_deadline_passed)

        def _head_deadline_passed(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered (its body has its own deadline)
            self.transport.write(reply)
            self.transport.close()
            http.core.metrics.observe("HTTP", "", Code.DEADLINE_EXCEEDED.grpc_name, 0.0, 0, "http")

    return HeadDeadlineProtocol


class _TempPem:
    """PEM bytes or a path as a file uvicorn can read; bytes go to a 0600 file in a 0700
    folder, removed by :meth:`cleanup`."""

    def __init__(self) -> None:
        self._dir: Optional[str] = None

    def path(self, value: Union[bytes, PathLike], name: str) -> str:
        if not isinstance(value, (bytes, bytearray)):
            return os.fspath(value)
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="bfpaccel-tls-")
        p = os.path.join(self._dir, name)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(value))
        return p

    def cleanup(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


Handler = Callable[[Mapping[str, Any], Mapping[str, str], bytearray, Dict[str, Any]], _Reply]


class HttpServer:
    """TF Serving REST, KServe v2 REST and ``/metrics`` for a :class:`ServingCore`, on uvicorn
    in a background thread.  Listening when the constructor returns.

    Args:
        core: the serving core (models, workers, auth, metrics).
        host: interface to bind ("0.0.0.0" / "::" for every interface).
        port: TCP port (0: a free one; see :attr:`port`).
        tls_cert, tls_key: PEM certificate chain and private key, as bytes or paths (HTTPS).
        max_body_bytes: largest request body (after inflating); over it: 413.
        max_connections: concurrent connections (and requests); a request beyond: 503.
        max_header_bytes: largest request head (request line and headers).
        body_timeout_s: seconds a client has to send a request head, and then its whole
            body; later: 408 and the connection closed (> 0).

    Example:
        >>> srv = HttpServer(core, "127.0.0.1", 0)  # doctest: +SKIP
        >>> srv.port > 0, srv.url  # doctest: +SKIP
        (True, 'http://127.0.0.1:41234')
        >>> srv.stop(grace=5)  # doctest: +SKIP
    """

    def __init__(self, core: ServingCore, host: str = "127.0.0.1", port: int = 0,
                 tls_cert: Optional[Union[bytes, PathLike]] = None, tls_key: Optional[Union[bytes, PathLike]] = None,
                 max_body_bytes: int = 64 * 1024 * 1024, max_connections: int = 256,
                 max_header_bytes: int = 64 * 1024, body_timeout_s: float = 30.0) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        if max_body_bytes < 1 or max_connections < 1 or max_header_bytes < 256:
            raise ValueError("max_body_bytes and max_connections must be >= 1, max_header_bytes >= 256")
        if isinstance(body_timeout_s, bool) or not isinstance(body_timeout_s, (int, float)) \
                or not 0 < body_timeout_s < float("inf"):
            raise ValueError(f"body_timeout_s must be a finite number of seconds > 0, got {body_timeout_s!r}")
        self.core = core
        self.host = host
        self.max_body_bytes = int(max_body_bytes)
        self.max_connections = int(max_connections)
        self.max_header_bytes = int(max_header_bytes)
        self.body_timeout_s = float(body_timeout_s)
        self.tls = tls_cert is not None
        self._limiter: Any = None  # an anyio.CapacityLimiter, made on the server's loop
        self._stopped = False
        self._error: Optional[BaseException] = None
        self.app = self._build_app()
        self._sock = self._bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        pem = _TempPem()
        try:
            config = uvicorn.Config(
                # h11 with a deadline on each request head (uvicorn itself waits for a head forever)
                self._asgi, host=host, port=self.port, http=_head_deadline_protocol(self), interface="asgi3",
                lifespan="off",
                log_config=None, log_level="warning", access_log=False, proxy_headers=False, server_header=False,
                # the app answers over max_connections itself (a JSON 503); uvicorn's own plain-text
                # 503 is a backstop beyond that
                limit_concurrency=self.max_connections + max(64, self.max_connections),
                h11_max_incomplete_event_size=self.max_header_bytes, timeout_keep_alive=5,
                headers=[("server", SERVER_NAME)],
                ssl_certfile=pem.path(tls_cert, "cert.pem") if tls_cert is not None else None,
                ssl_keyfile=pem.path(tls_key, "key.pem") if tls_key is not None else None)
            config.load()  # reads the certificate now (errors surface here), then the files can go
        except BaseException:
            self._sock.close()
            raise
        finally:
            pem.cleanup()
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="bfpaccel-http", daemon=True)
        self._thread.start()
        t_end = time.monotonic() + 30.0
        while not self._server.started and self._thread.is_alive() and time.monotonic() < t_end:
            time.sleep(0.005)
        if not self._server.started:
            self.stop(0)
            raise RuntimeError(f"the HTTP server on {host}:{self.port} did not start: {self._error!r}")
        log.info("serving HTTP (TF Serving REST /v1, KServe v2 /v2, /metrics) on %s", self.url)

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8501``."""
        h = self.host if ":" not in self.host else f"[{self.host}]"
        return f"{'https' if self.tls else 'http'}://{h}:{self.port}"

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        if not infos:
            raise OSError(f"cannot resolve {host!r}")
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(addr)
        except OSError as e:
            sock.close()
            raise OSError(f"could not bind the HTTP port {host}:{port}: {e}") from None
        sock.set_inheritable(False)
        return sock

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: B902 - uvicorn reports a failed start with SystemExit
            self._error = e
            log.error("the HTTP server stopped with an error: %r", e)
        finally:
            try:  # requests still running past the grace period were cancelled: let them unwind
                pending = asyncio.all_tasks(loop)
                if pending:
                    loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    async def _serve(self) -> None:
        self._limiter = anyio.CapacityLimiter(self.max_connections)
        await self._server.serve(sockets=[self._sock])

    def stop(self, grace: Optional[float] = 10.0) -> None:
        """Stops taking connections, lets requests in flight finish (up to ``grace`` s; ``None``:
        no limit), then stops the server thread."""
        if self._stopped:
            return
        self._stopped = True
        self._server.config.timeout_graceful_shutdown = None if grace is None else max(0.0, float(grace))
        self._server.should_exit = True
        self._thread.join(None if grace is None else max(0.0, float(grace)) + 5.0)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(2.0)
        try:
            self._sock.close()
        except OSError:
            pass

    # -- the ASGI app ------------------------------------------------------------------------
    def _build_app(self) -> Any:
        tf_, v2 = "tfs-rest", "v2-rest"

        def route(path: str, protocol: str, method: str, fn: Handler, http_method: str = "GET", *,
                  auth: bool = True, body: bool = False) -> Route:
            async def endpoint(request: Request) -> Response:
                return await self._dispatch(request, protocol, method, fn, auth=auth, body=body)
            return Route(path, endpoint, methods=[http_method])

        spec = "/v1/models/{model}"
        routes = []
        for suffix in ("", "/versions/{version:int}", "/labels/{label}"):
            routes += [
                route(spec + suffix, tf_, "GetModelStatus", self._tf_status),
                route(spec + suffix + "/metadata", tf_, "GetModelMetadata", self._tf_metadata),
                route(spec + suffix + ":{verb}", tf_, "Predict", self._tf_predict, "POST", body=True),
            ]
        routes += [
            route("/v2", v2, "ServerMetadata", self._v2_server_metadata),
            route("/v2/health/live", v2, "ServerLive", self._v2_live, auth=False),
            route("/v2/health/ready", v2, "ServerReady", self._v2_ready, auth=False),
        ]
        for suffix in ("", "/versions/{version}"):
            routes += [
                route("/v2/models/{model}" + suffix, v2, "ModelMetadata", self._v2_model_metadata),
                route("/v2/models/{model}" + suffix + "/ready", v2, "ModelReady", self._v2_model_ready),
                route("/v2/models/{model}" + suffix + "/infer", v2, "ModelInfer", self._v2_infer, "POST", body=True),
            ]
        routes.append(Route("/metrics", self._metrics, methods=["GET"]))

        async def http_error(request: Request, exc: Exception) -> Response:
            status = getattr(exc, "status_code", 500)
            if status == 404:
                msg = (f"no route {request.url.path!r}: TF Serving REST is under /v1/models/<model>, "
                       "KServe v2 under /v2, metrics at /metrics")
            elif status == 405:
                msg = f"method {request.method} is not allowed on {request.url.path!r}"
            else:
                msg = str(getattr(exc, "detail", "")) or "error"
            return Response(_error_body(msg), status, headers=dict(getattr(exc, "headers", None) or {}),
                            media_type=_JSON)

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    async def _metrics(self, request: Request) -> Response:
        return Response(self.core.metrics.render().encode(), 200, media_type=_PROMETHEUS)

    async def _asgi(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        """The app uvicorn runs: the connection and head limits (JSON errors), then the routes."""
        if scope.get("type") == "http":
            status, msg = 0, ""
            if self._over_limit():
                status, msg = 503, (f"the server is at its limit of {self.max_connections} concurrent HTTP "
                                    "connections (max_connections / --max-connections); retry later")
            else:
                head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 16
                head += sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or ())
                if head > self.max_header_bytes:
                    status, msg = 431, (f"the request head is {head} bytes, over this server's limit of "
                                        f"{self.max_header_bytes} (max_header_bytes / --max-header-bytes)")
            if status:
                body = _error_body(msg)
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", _JSON.encode()), (b"content-length", str(len(body)).encode()),
                                        (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                self.core.metrics.observe("HTTP", "", Code.UNAVAILABLE.grpc_name if status == 503
                                          else Code.INVALID_ARGUMENT.grpc_name, 0.0, 0, "http")
                return
        await self.app(scope, receive, send)

    def _over_limit(self) -> bool:
        state = getattr(self._server, "server_state", None)
        if state is None:
            return False
        return len(state.connections) > self.max_connections or len(state.tasks) > self.max_connections

    async def _read_body(self, request: Request) -> bytearray:
        """The body, refused (TOO_LARGE) as soon as it passes ``max_body_bytes``: at once when
        Content-Length says so, else while streaming -- never buffered past the limit; and
        :class:`_ReadTimeout` when it is not complete within ``body_timeout_s``."""
        limit = self.max_body_bytes
        too_large = ServingError(Code.TOO_LARGE, f"the request body is over this server's limit of {limit} bytes "
                                 "(max_body_bytes / --max-body-mb)")
        cl = request.headers.get("content-length")
        if cl is not None and cl.strip().isdigit() and int(cl) > limit:
            raise too_large
        buf = bytearray()
        try:
            with anyio.fail_after(self.body_timeout_s):
                async for chunk in request.stream():
                    if len(buf) + len(chunk) > limit:
                        raise too_large
                    buf += chunk
        except TimeoutError:
            raise _ReadTimeout(f"the request body was not complete within {self.body_timeout_s:g} s "
                               f"({len(buf)} bytes arrived; body_timeout_s / --body-timeout-s)") from None
        return buf

    async def _dispatch(self, request: Request, protocol: str, method: str, fn: Handler, *, auth: bool,
                        body: bool) -> Response:
        t0 = time.perf_counter()
        params = dict(request.path_params)
        info: Dict[str, Any] = {"route": "", "images": 0}  # the model's name once resolved (bounded labels)
        headers = request.headers
        reply: Optional[_Reply] = None
        code, message = Code.OK, ""
        extra: Dict[str, str] = {}
        try:
            if auth:
                self.core.check_auth(headers.get("authorization"))
            data = await self._read_body(request) if body else bytearray()
            if self._limiter is None:  # only before the loop has started (never in practice)
                self._limiter = anyio.CapacityLimiter(self.max_connections)
            reply = await anyio.to_thread.run_sync(self._guarded, fn, params, headers, data, info,
                                                   limiter=self._limiter)
            code = reply.code
        except ServingError as e:
            code, message = e.code, e.message
        except wire.WireError as e:
            code, message = Code.INVALID_ARGUMENT, str(e)
        except ClientDisconnect:
            code, message = Code.INVALID_ARGUMENT, "the client closed the connection before the body was complete"
        except _ReadTimeout as e:  # a stalled or trickled body: 408, and the connection closes
            code, message = Code.DEADLINE_EXCEEDED, str(e)
            reply = _Reply(408, _error_body(message), headers={"connection": "close"}, code=code)
        except MemoryError:
            log.warning("%s ran out of memory", method)
            code, message = Code.RESOURCE_EXHAUSTED, "the server ran out of memory for this request"
        except Exception as e:  # the server never dies on input; a bug is logged and answered 500
            log.exception("%s failed", method)
            code, message = Code.INTERNAL, f"internal error: {type(e).__name__}: {e}"
        if reply is None:
            if code is Code.UNAUTHENTICATED:
                extra["www-authenticate"] = "Bearer"
            reply = _Reply(code.http_status, _error_body(message), headers=extra, code=code)
        dt = time.perf_counter() - t0
        self.core.metrics.observe(method, info["route"], code.grpc_name, dt, info["images"], protocol)
        if access_log.isEnabledFor(logging.INFO):
            client = request.client
            access_log.info(json.dumps({
                "ts": round(time.time(), 3), "protocol": protocol, "method": method, "route": info["route"],
                "peer": f"{client.host}:{client.port}" if client else "", "code": code.grpc_name,
                "status": reply.status, "ms": round(dt * 1000, 3), "images": info["images"],
                "batch": info.get("batch", 0), **({"error": message} if message else {})}))
        return Response(reply.body, reply.status, headers=reply.headers, media_type=reply.media_type)

    def _guarded(self, fn: Handler, params: Mapping[str, Any], headers: Mapping[str, str], data: bytearray,
                 info: Dict[str, Any]) -> _Reply:
        """Runs a handler in a pool thread (model calls and JSON coding stay off the event loop)."""
        if data:
            data = _inflate(data, headers.get("content-encoding", ""), self.max_body_bytes)
        return fn(params, headers, data, info)

    # -- TensorFlow Serving REST -------------------------------------------------------------
    def _tf_resolve(self, params: Mapping[str, Any], info: Dict[str, Any]) -> Any:
        mv = self.core.resolve(params["model"], params.get("version"), params.get("label"))
        info["route"] = mv.name
        return mv

    def _tf_status(self, params: Mapping[str, Any], headers: Mapping[str, str], data: bytearray,
                   info: Dict[str, Any]) -> _Reply:
        name = params["model"]
        entry = self.core.models.get(name)
        if entry is None:
            hint = ""
            if ":" in name and name.rsplit(":", 1)[0] in self.core.models:
                hint = f" (:{name.rsplit(':', 1)[1]} takes POST)"
            raise ServingError(Code.NOT_FOUND, f"no model {name!r} here{hint}; this server serves "
                               f"{sorted(self.core.models)}")
        info["route"] = name
        versions = sorted(list(entry.versions.values()), key=lambda v: v.version)
        if params.get("version") is not None:
            versions = [v for v in versions if v.version == params["version"]]
        elif params.get("label") is not None:
            label = params["label"]
            if label not in entry.labels:
                raise ServingError(Code.NOT_FOUND, f"model {name!r} has no version label {label!r}"
                                   + (f"; labels: {sorted(entry.labels)}" if entry.labels else ""))
            versions = [v for v in versions if v.version == entry.labels[label]]
        if not versions:
            raise ServingError(Code.NOT_FOUND, f"model {name!r} has no version {params.get('version')}")
        return _json_reply({"model_version_status": [
            {"version": str(v.version), "state": v.state.name,
             "status": {"error_code": "UNKNOWN" if v.error else "OK", "error_message": v.error or ""}}
            for v in versions]})

    def _tf_metadata(self, params: Mapping[str, Any], headers: Mapping[str, str], data: bytearray,
                     info: Dict[str, Any]) -> _Reply:
        from google.protobuf import json_format

        mv = self._tf_resolve(params, info)
        sdm = pb.SignatureDefMap()
        sdm.signature_def["serving_default"].CopyFrom(signature_def(mv))
        return _json_reply({"model_spec": {"name": mv.name, "signature_name": "", "version": str(mv.version)},
                            "metadata": {"signature_def": json_format.MessageToDict(
                                sdm, preserving_proto_field_name=True)}})

    def _tf_predict(self, params: Mapping[str, Any], headers: Mapping[str, str], data: bytearray,
                    info: Dict[str, Any]) -> _Reply:
        verb = params["verb"]
        if verb in ("classify", "regress"):
            raise ServingError(Code.UNIMPLEMENTED, f":{verb} is not implemented; this server supports :predict")
        if verb != "predict":
            raise ServingError(Code.NOT_FOUND, f"unknown verb :{verb}; TF Serving's REST API has :predict, "
                               ":classify and :regress")
        mv = self._tf_resolve(params, info)
        p = mv.first
        image_keys = sorted(k for k in p.input_aliases if mv.input_kind(k) == "images")
        hints = {k: "BYTES" for k in image_keys}
        if p.text_front is not None:
            hints[p.text_front.input_alias] = "BYTES"
        for name in p.input_names:
            hints[name] = mv.tensor_spec(name).dtype
        core = self.core
        max_el = self._max_elements(mv)
        single = len(p.input_names) == 1
        fronted = p.takes_images or p.text_front is not None
        # an unnamed value is the model's one input (images or sentences when the value is text)
        default = _UNNAMED if fronted else (p.input_name if single else None)
        req = wire.parse_tf_rest_request(data, default_input=default, input_dtypes=hints, max_elements=max_el,
                                         max_bytes=self.max_body_bytes,
                                         default_numeric=hints[p.input_name] if single else "FP32")
        if req.signature_name is not None and req.signature_name not in SIGNATURES:
            raise invalid(f"unknown signature_name {req.signature_name!r}; this model has 'serving_default'")
        tensors = dict(req.inputs)
        if _UNNAMED in tensors:
            t = tensors.pop(_UNNAMED)
            if t.is_bytes and image_keys:
                key = (p.preprocess_spec or {}).get("input_alias") or image_keys[0]
            elif t.is_bytes and p.text_front is not None:
                key = p.text_front.input_alias
            elif single:
                key = p.input_name
            else:
                raise invalid(f"the request gives an unnamed numeric value; this model takes {p.input_names}: name "
                              "them ({\"input_ids\": ...})")
            t.name = key
            tensors[key] = t
        kind, key, run = self._prepare(mv, tensors, info)
        names = [n for _, n in mv.resolve_outputs([], kind)] if kind == "text" else list(p.output_names)
        result = core.infer(mv, key=key, outputs=names, **run)
        return _Reply(body=wire.encode_tf_rest_response({n: result[n] for n in names}, row_format=req.row_format))

    def _max_elements(self, mv: Any) -> int:
        """Most elements one tensor of the request may have (the largest over the plan's inputs)."""
        core = self.core
        shapes = [mv.tensor_spec(n).shape for n in mv.first.input_names] or [None]
        return max(element_limit(sh, core.max_batch, core.max_input_elements) for sh in shapes)

    def _prepare(self, mv: Any, tensors: Mapping[str, wire.WireTensor], info: Dict[str, Any]
                 ) -> Tuple[str, str, Dict[str, Any]]:
        """A request's decoded tensors -> ``(kind, key, keyword arguments of core.infer)``:
        encoded images, sentences, the float input ``x`` or every input as ``feeds``; each
        checked against the model (names, datatypes, shapes, batch and element limits)."""
        core = self.core
        p = mv.first
        n_plan = len(p.input_names)
        if not tensors or (len(tensors) > 1 and len(tensors) > n_plan):
            raise invalid(f"the request has {len(tensors)} inputs {sorted(tensors)}; this model takes "
                          + (f"one, named one of {sorted(p.input_aliases)}" if n_plan == 1 else
                             f"{p.input_names} together, or one of {sorted(p.input_aliases)}"))
        kinds = {k: mv.input_kind(k) for k in tensors}  # INVALID_ARGUMENT for an unknown input name
        alone = [k for k, kind in kinds.items() if kind != "tensor"]
        if alone and len(tensors) > 1:
            raise invalid(f"the request has inputs {sorted(tensors)}; {alone[0]!r} ({kinds[alone[0]]}) goes alone")
        key, t = next(iter(tensors.items()))
        kind = kinds[key]
        if kind in ("images", "text"):
            noun = "images" if kind == "images" else "sentences"
            if not t.is_bytes:
                raise invalid(f"input {key!r} takes " + ("encoded images" if kind == "images" else "sentences")
                              + f" (BYTES), got {t.datatype}")
            if len(t.shape) > 1 and not (len(t.shape) == 2 and t.shape[1] == 1 and kind == "text"):
                raise invalid(f"input {key!r}: a batch of {noun} has shape [N], got {list(t.shape)}")
            values = [bytes(b) for b in t.data]  # type: ignore[union-attr]
            if kind == "text":
                texts = decode_texts(key, values, core.max_batch)
                info["batch"] = len(texts)
                return kind, key, {"texts": texts}
            if not values:
                raise invalid(f"input {key!r} holds no images")
            if len(values) > core.max_batch:
                raise invalid(f"input {key!r}: {len(values)} images in one request; the limit is {core.max_batch}")
            info["images"] = info["batch"] = len(values)
            return kind, key, {"images": values}
        feeds: Dict[str, np.ndarray] = {}
        for k, tk in tensors.items():
            spec = mv.tensor_spec(k)
            declared = p.plan.input_dtypes.get(k, "float32")
            if tk.is_bytes or (tk.datatype == "BOOL" and spec.dtype != "BOOL"):
                what = "FP32 preferred" if spec.dtype == "FP32" else spec.dtype
                dims = None if spec.shape is None else ["N" if d is None else d for d in spec.shape]
                raise invalid(f"input {k!r} takes a numeric tensor ({what}) of shape {dims}, got {tk.datatype}")
            check_dtype(k, np.asarray(tk.data).dtype, declared, tk.datatype)
            check_array(k, tk.shape, spec.shape, core.max_batch,
                        element_limit(spec.shape, core.max_batch, core.max_input_elements))
            feeds[k] = typed_feed(k, np.asarray(tk.data), declared)
        first = feeds[key]
        info["batch"] = int(first.shape[0]) if first.ndim else 1
        if n_plan == 1 and key == p.input_name:
            return kind, key, {"x": first}
        mv.check_feeds(feeds)
        return kind, key, {"feeds": feeds}

    # -- KServe v2 REST ----------------------------------------------------------------------
    def _v2_resolve(self, params: Mapping[str, Any], info: Dict[str, Any], check_ready: bool = True) -> Any:
        v = params.get("version")
        version: Optional[int] = None
        if v is not None and v != "":
            if not str(v).isdigit():
                raise ServingError(Code.NOT_FOUND, f"model {params['model']!r} has no version {v!r} "
                                   "(versions are integers)")
            version = int(v)
        mv = self.core.resolve(params["model"], version, check_ready=check_ready)
        info["route"] = mv.name
        return mv

    def _v2_server_metadata(self, params: Mapping[str, Any], headers: Mapping[str, str], data: bytearray,
                            info: Dict[str, Any]) -> _Reply:
        from .. import __version__

        return _json_reply({"name": SERVER_NAME, "version": __version__, "extensions": list(V2_EXTENSIONS)})

    def _v2_live(self, params: Mapping[str, Any], headers: Mapping[str, str], data: bytearray,
                 info: Dict[str, Any]) -> _Reply:
        ok = self.core.is_live()
        return _Reply(200 if ok else 503, media_type=None, code=Code.OK if ok else Code.UNAVAILABLE)

    def _v2_ready(self, params: Mapping[str, Any], headers: Mapping[str, str], data: bytearray,
                  info: Dict[str, Any]) -> _Reply:
        ok = self.core.is_ready()
        return _Reply(200 if ok else 503, media_type=None, code=Code.OK if ok else Code.UNAVAILABLE)

    def _v2_model_ready(self, params: Mapping[str, Any], headers: Mapping[str, str], data: bytearray,
                        info: Dict[str, Any]) -> _Reply:
        mv = self._v2_resolve(params, info, check_ready=False)  # NOT_FOUND for an unknown model/version
        ok = self.core.model_ready(mv.name, mv.version if params.get("version") else None)
        return _Reply(200 if ok else 503, media_type=None, code=Code.OK if ok else Code.UNAVAILABLE)

    def _v2_model_metadata(self, params: Mapping[str, Any], headers: Mapping[str, str], data: bytearray,
                           info: Dict[str, Any]) -> _Reply:
        mv = self._v2_resolve(params, info)
        if params.get("version"):
            versions = [str(mv.version)]
        else:
            entry = self.core.models[mv.name]
            versions = [str(v.version) for v in sorted(list(entry.versions.values()), key=lambda v: v.version)
                        if v.state is VersionState.AVAILABLE]
        return _json_reply({
            "name": mv.name, "versions": versions, "platform": V2_PLATFORM,
            "inputs": [{"name": s.name, "datatype": s.dtype, "shape": _dims(s.shape)} for s in mv.inputs()],
            "outputs": [{"name": s.name, "datatype": s.dtype, "shape": _dims(s.shape)} for s in mv.outputs()]})

    def _v2_infer(self, params: Mapping[str, Any], headers: Mapping[str, str], data: bytearray,
                  info: Dict[str, Any]) -> _Reply:
        mv = self._v2_resolve(params, info)
        core = self.core
        max_el = self._max_elements(mv)
        req = wire.parse_v2_json_request(data, headers.get(wire.INFERENCE_HEADER_CONTENT_LENGTH),
                                         max_elements=max_el, max_bytes=self.max_body_bytes)
        timeout_s = None
        if "timeout" in req.parameters:
            t_us = req.parameters["timeout"]
            if isinstance(t_us, bool) or not isinstance(t_us, int) or t_us < 0:
                raise invalid(f"parameter 'timeout' must be a non-negative integer (microseconds), got {t_us!r}")
            timeout_s = t_us / 1e6 if t_us else None
        try:  # the outputs are checked first (the kind of request decides the text embedding's)
            kind = mv.input_kind(next(iter(req.inputs)))
        except ServingError:
            kind = "tensor"
        if req.outputs or kind == "text":
            pairs = mv.resolve_outputs(req.output_names or [], kind)
        else:
            pairs = [(n, n) for n in mv.first.output_names]
        kind, key, run = self._prepare(mv, req.inputs, info)
        wanted = list(dict.fromkeys(n for _, n in pairs))
        result = core.infer(mv, key=key, outputs=wanted, timeout_s=timeout_s, **run)
        outs = {k: result[n] for k, n in pairs}
        body, hlen = wire.encode_v2_json_response(mv.name, outs, model_version=str(mv.version), request_id=req.id,
                                                  binary=req.binary_outputs(outs))
        if hlen is None:
            return _Reply(body=body)
        return _Reply(body=body, media_type="application/octet-stream",
                      headers={wire.INFERENCE_HEADER_CONTENT_LENGTH: str(hlen)})
