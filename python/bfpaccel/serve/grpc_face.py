"""Request plumbing shared by the gRPC protocol faces (TF Serving, KServe v2).

:class:`GrpcFace` runs one call: it checks the ``authorization`` metadata against the core's
keys, calls the face's handler, maps :class:`~bfpaccel.serve.core.ServingError` (and a
``MemoryError``, and any bug) onto a gRPC status, counts the call in the core's metrics under
the face's ``protocol`` label and writes one JSON line to the access log
(``bfpaccel.serve.access``, at INFO).

A handler has the signature ``fn(request, context, md, info)``: ``md`` holds the call's
metadata (lower-case keys, text values only) and ``info`` is a dict the handler fills for the
log and the metrics: ``route`` (the model name), ``images`` (encoded images decoded) and
``batch`` (rows run).

Example:
    >>> class EchoFace(GrpcFace):  # doctest: +SKIP
    ...     protocol = "echo-grpc"
    ...     def echo(self, request, context):
    ...         return self._call("Echo", lambda r, c, md, info: r, request, context)
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Dict

import grpc
from google.protobuf.message import DecodeError

from .core import Code, ServingCore, ServingError, invalid

__all__ = ["GrpcFace", "Handler", "parse_request"]

log = logging.getLogger("bfpaccel.serve")
access_log = logging.getLogger("bfpaccel.serve.access")

#: ``fn(request, context, metadata, info) -> response`` (see the module docstring).
Handler = Callable[[Any, grpc.ServicerContext, Dict[str, str], Dict[str, Any]], Any]


def parse_request(req_cls: Any, request: Any) -> Any:
    """The request message of a call registered without a request deserializer: ``request``
    is the call's bytes (a message passes through).  Bytes that do not parse as ``req_cls``
    raise ``ServingError(INVALID_ARGUMENT)`` -- a deserializer given to gRPC that raises is
    answered INTERNAL by gRPC itself, never counted or logged by the face, so parsing happens
    here, inside :meth:`GrpcFace._call`."""
    if not isinstance(request, (bytes, bytearray, memoryview)):
        return request
    try:
        return req_cls.FromString(bytes(request))
    except (DecodeError, RecursionError) as e:
        raise invalid(f"the request is not a valid {req_cls.DESCRIPTOR.full_name} message: {e}") from None


class GrpcFace:
    """Base of a gRPC protocol face on a :class:`ServingCore`: ``protocol`` names it in the
    metrics and the access log (``tfs-grpc``, ``v2-grpc``)."""

    protocol = "grpc"

    def __init__(self, core: ServingCore) -> None:
        self.core = core

    def _call(self, method: str, fn: Handler, request: Any, context: grpc.ServicerContext, *,
              auth: bool = True) -> Any:
        """Runs ``fn`` for one call of ``method``; answers the call's status (aborting the
        context on an error) and returns the response.  ``auth=False`` skips the key check
        (liveness and readiness probes)."""
        t0 = time.perf_counter()
        md = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
        info: Dict[str, Any] = {"route": "", "images": 0}
        code, message, response = Code.OK, "", None
        try:
            if auth:
                self.core.check_auth(md.get("authorization"))
            response = fn(request, context, md, info)
        except ServingError as e:
            code, message = e.code, e.message
        except MemoryError:
            log.warning("%s ran out of memory", method)
            code, message = Code.RESOURCE_EXHAUSTED, "the server ran out of memory for this request"
        except Exception as e:  # the server never dies on input; a bug is logged and answered INTERNAL
            log.exception("%s failed", method)
            code, message = Code.INTERNAL, f"internal error: {type(e).__name__}: {e}"
        dt = time.perf_counter() - t0
        self.core.metrics.observe(method, info["route"], code.grpc_name, dt, info["images"], self.protocol)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(json.dumps({
                "ts": round(time.time(), 3), "protocol": self.protocol, "method": method, "route": info["route"],
                "peer": context.peer(), "code": code.grpc_name, "ms": round(dt * 1000, 3),
                "images": info["images"], "batch": info.get("batch", 0), **({"error": message} if message else {})}))
        if code is not Code.OK:
            context.abort(getattr(grpc.StatusCode, code.grpc_name), message)
        return response

    def _parsed(self, req_cls: Any, fn: Handler) -> Handler:
        """``fn`` with the call's bytes parsed as ``req_cls`` first (:func:`parse_request`:
        INVALID_ARGUMENT when they do not parse)."""
        def run(request: Any, context: grpc.ServicerContext, md: Dict[str, str], info: Dict[str, Any]) -> Any:
            return fn(parse_request(req_cls, request), context, md, info)
        return run
