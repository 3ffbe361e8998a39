"""Request senders of ``bfpaccel loadtest``: one class per serving protocol.

A sender holds the connection(s) to one server; :meth:`Sender.prepare` builds the request
for a payload once and returns a callable that sends it once and returns a status code:
``"OK"`` on success, else the gRPC code name (``"UNAVAILABLE"``), ``"HTTP_<status>"``,
``"CONNECTION_ERROR"`` or ``"TIMEOUT"``.  The callable never raises and may be called from many
threads at once.  Adding a protocol is one class registered in :data:`SENDERS` with
:func:`register`; the load generator and the CLI read that table.

=========== ======================================================================================
protocol    request
=========== ======================================================================================
tfs-grpc    TF Serving gRPC ``PredictionService/Predict`` (:class:`PredictionClient`, the seed's
            request: DT_STRING [1] under the input name; an array as a float TensorProto)
tfs-rest    TF Serving REST ``POST /v1/models/NAME:predict``: ``{"instances": [{"b64": ...}]}``,
            an array as ``{"inputs": {INPUT: [...]}}`` (``requests``)
v2-rest     KServe v2 REST ``POST /v2/models/NAME/infer``, binary tensor data
            (``tritonclient.http``): BYTES [1], an array as FP32
v2-grpc     KServe v2 gRPC ``GRPCInferenceService/ModelInfer`` (``tritonclient.grpc``)
=========== ======================================================================================

Example:
    >>> target = Target("127.0.0.1", 8501, model_name="resnet50")  # doctest: +SKIP
    >>> with make_sender("tfs-rest", target) as s:  # doctest: +SKIP
    ...     send = s.prepare(Payload(image=open("cat.jpg", "rb").read()))
    ...     send()
    'OK'
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, ClassVar, Dict, List, Optional, Protocol, Type, TypeVar, Union, runtime_checkable

import numpy as np

__all__ = ["Target", "Payload", "Sender", "RequestFn", "SENDERS", "register", "make_sender", "OK",
           "TfsGrpcSender", "TfsRestSender", "V2RestSender", "V2GrpcSender"]

#: The status code of a successful request.
OK = "OK"
#: One request: sends it, returns ``"OK"`` or an error code; never raises.
RequestFn = Callable[[], str]


@dataclass(frozen=True)
class Target:
    """Where and how to send requests (one server).

    Args:
        host: host name or IP.
        port: TCP port of the protocol's face.
        use_ssl: TLS (https for the REST faces).
        access_token: service key, sent as ``authorization: Bearer <key>``.
        service_name: the AML route (TF Serving gRPC); the default model name of the other faces.
        model_name: model name (REST URL, v2 requests; with tfs-grpc sent as ``model_spec.name``
            when given).
        root_certificates: PEM bytes or a path of the CA(s) to trust.
        target_name_override: TLS name to check instead of ``host`` (gRPC protocols only).
        timeout: deadline of one request in seconds.

    Example:
        >>> Target("127.0.0.1", 8500, model_name="tiny").model
        'tiny'
    """

    host: str
    port: int
    use_ssl: bool = False
    access_token: str = ""
    service_name: str = ""
    model_name: str = ""
    root_certificates: Optional[Union[bytes, str]] = None
    target_name_override: Optional[str] = None
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("the target needs a host")
        if not 0 < int(self.port) <= 65535:
            raise ValueError(f"invalid port {self.port}: ports run from 1 to 65535")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 s, not {self.timeout}")

    @property
    def model(self) -> str:
        """The model name of URL-routed protocols: ``model_name``, else ``service_name``."""
        return self.model_name or self.service_name

    @property
    def hostport(self) -> str:
        """``host:port`` (IPv6 literals in brackets)."""
        h = self.host
        if ":" in h and not h.startswith("["):
            h = f"[{h}]"
        return f"{h}:{int(self.port)}"

    def ca_pem(self) -> Optional[bytes]:
        """The CA certificates as PEM bytes (read from the path when a path was given)."""
        rc = self.root_certificates
        if rc is None or isinstance(rc, bytes):
            return rc
        with open(rc, "rb") as f:
            return f.read()

    def auth_headers(self) -> Dict[str, str]:
        """``{"authorization": "Bearer <key>"}`` when there is a key, else ``{}``."""
        return {"authorization": "Bearer " + self.access_token} if self.access_token else {}


@dataclass(frozen=True)
class Payload:
    """What one request carries: an encoded image (sent as one bytes element) or a float array.

    Args:
        image: encoded image bytes (JPEG/PNG...), batch of one.
        array: a numeric array, batch dimension included, sent as float32.
        input_name: the model input it is sent under.

    Example:
        >>> Payload(array=np.zeros((1, 4), np.float32)).kind
        'array'
    """

    image: Optional[bytes] = None
    array: Optional[np.ndarray] = None
    input_name: str = "images"

    def __post_init__(self) -> None:
        if (self.image is None) == (self.array is None):
            raise ValueError("a payload is an encoded image or an array: give exactly one")
        if self.image is not None and not isinstance(self.image, (bytes, bytearray)):
            raise TypeError(f"image must be bytes, not {type(self.image).__name__}")
        if self.array is not None:
            a = np.asarray(self.array)
            if a.dtype.kind not in "biuf" or a.ndim < 1 or a.size == 0:
                raise ValueError(f"the array must be a non-empty numeric array with a batch dimension "
                                 f"(got dtype {a.dtype}, shape {a.shape})")
            object.__setattr__(self, "array", np.ascontiguousarray(a, dtype=np.float32))
        if not self.input_name:
            raise ValueError("the payload needs an input name")

    @property
    def kind(self) -> str:
        """``"image"`` or ``"array"``."""
        return "image" if self.image is not None else "array"

    def describe(self) -> Dict[str, Any]:
        """JSON-ready description (size or shape, never the data)."""
        if self.image is not None:
            return {"kind": "image", "bytes": len(self.image), "input_name": self.input_name}
        assert self.array is not None
        return {"kind": "array", "shape": list(self.array.shape), "dtype": "float32", "input_name": self.input_name}


@runtime_checkable
class Sender(Protocol):
    """A protocol's request sender (see the module docstring).

    Example:
        >>> isinstance(TfsGrpcSender(Target("127.0.0.1", 1)), Sender)
        True
    """

    protocol: ClassVar[str]

    def prepare(self, payload: Payload) -> RequestFn:
        """Builds the request once; returns a thread-safe callable that sends it once."""
        ...

    def close(self) -> None:
        """Closes every connection the sender opened."""
        ...


#: protocol name -> sender class (the CLI's ``--protocol`` choices).
SENDERS: Dict[str, Type["_SenderBase"]] = {}
_S = TypeVar("_S", bound=Type["_SenderBase"])


def register(protocol: str) -> Callable[[_S], _S]:
    """Class decorator: registers a sender class under ``protocol`` in :data:`SENDERS`.

    Example:
        >>> "tfs-grpc" in SENDERS
        True
    """
    def deco(cls: _S) -> _S:
        if protocol in SENDERS:
            raise ValueError(f"protocol {protocol!r} is already registered")
        cls.protocol = protocol
        SENDERS[protocol] = cls
        return cls
    return deco


def make_sender(protocol: str, target: Target) -> "_SenderBase":
    """The sender of ``protocol`` for ``target``.

    Example:
        >>> make_sender("tfs-grpc", Target("127.0.0.1", 50051)).protocol
        'tfs-grpc'
    """
    cls = SENDERS.get(protocol)
    if cls is None:
        raise ValueError(f"unknown protocol {protocol!r}: use one of {', '.join(sorted(SENDERS))}")
    return cls(target)


class _SenderBase:
    """Shared plumbing: per-thread clients (for client libraries that are not thread-safe)."""

    protocol: ClassVar[str] = ""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: List[Any] = []

    def _thread_client(self, make: Callable[[], Any]) -> Any:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = make()
            with self._lock:
                self._opened.append(c)
        return c

    def prepare(self, payload: Payload) -> RequestFn:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for c in opened:
            try:
                c.close()
            except Exception:  # closing a broken connection must not hide the results
                pass

    def __enter__(self) -> "_SenderBase":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _network_error_code(e: BaseException) -> str:
    """Code of a transport error raised by an HTTP client library."""
    seen = set()
    while e is not None and id(e) not in seen:  # walk the cause chain (requests wraps urllib3 wraps socket)
        seen.add(id(e))
        name = type(e).__name__.lower()
        if isinstance(e, (socket.timeout, TimeoutError)) or "timeout" in name:
            return "TIMEOUT"
        if isinstance(e, ssl.SSLError) or name.startswith("ssl"):
            return "SSL_ERROR"
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return "CONNECTION_ERROR"


def _missing(protocol: str, package: str, exc: ImportError) -> ImportError:
    return ImportError(f"--protocol {protocol} needs the {package} package ({exc}): "
                       f"pip install 'bfpaccel[loadtest]'")


@register("tfs-grpc")
class TfsGrpcSender(_SenderBase):
    """TF Serving gRPC Predict through :class:`~bfpaccel.serve.client.PredictionClient` (one
    channel, no retries; the seed's metadata: bearer key and service route).

    Example:
        >>> s = TfsGrpcSender(Target("127.0.0.1", 50051))
        >>> send = s.prepare(Payload(image=b"jpeg")); s.close()
    """

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        from .client import NO_RETRY, PredictionClient

        # the channel is re-created only after a day idle: never while threads share it
        self._client = PredictionClient(target.host, target.port, target.use_ssl, target.access_token,
                                        target.service_name, channel_shutdown_timeout=timedelta(days=1),
                                        retry=NO_RETRY, root_certificates=target.root_certificates,
                                        target_name_override=target.target_name_override)
        self._opened.append(self._client)

    def build_request(self, payload: Payload) -> Any:
        """The PredictRequest of a payload (what :meth:`prepare` sends)."""
        from . import _protos as pb
        from .codec import make_tensor_proto

        req = pb.PredictRequest()
        if self.target.model_name:
            req.model_spec.name = self.target.model_name
        tp = req.inputs[payload.input_name]
        if payload.image is not None:
            tp.dtype = pb.DT_STRING
            tp.tensor_shape.dim.add().size = 1
            tp.string_val.append(bytes(payload.image))
        else:
            tp.CopyFrom(make_tensor_proto(payload.array))
        return req

    def prepare(self, payload: Payload) -> RequestFn:
        import grpc

        req, client, timeout = self.build_request(payload), self._client, self.target.timeout

        def send() -> str:
            try:
                client._predict(req, timeout)
                return OK
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                return code.name if code is not None else "UNKNOWN"
        return send


@register("tfs-rest")
class TfsRestSender(_SenderBase):
    """TF Serving REST predict with ``requests`` (one keep-alive session per thread).

    An image is sent in the row format ``{"instances": [{"b64": "<base64>"}]}``; an array in
    the columnar format ``{"inputs": {"<input name>": [[...]]}}``.  A 200 answer is ``"OK"``,
    any other status ``"HTTP_<status>"``.

    Example:
        >>> s = TfsRestSender(Target("127.0.0.1", 8501, model_name="tiny"))
        >>> s.url
        'http://127.0.0.1:8501/v1/models/tiny:predict'
    """

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        if not target.model:
            raise ValueError("--protocol tfs-rest needs a model name (--model, or --service)")
        if target.target_name_override:
            raise ValueError("target_name_override applies to the gRPC protocols only")
        try:
            import requests  # noqa: F401
        except ImportError as e:
            raise _missing(self.protocol, "requests", e) from None
        from urllib.parse import quote

        scheme = "https" if target.use_ssl else "http"
        self.url = f"{scheme}://{target.hostport}/v1/models/{quote(target.model, safe='')}:predict"
        pem = target.ca_pem() if target.use_ssl else None
        self._ssl_context = ssl.create_default_context(cadata=pem.decode("ascii")) if pem else None

    @staticmethod
    def build_body(payload: Payload) -> bytes:
        """The JSON body of a payload."""
        if payload.image is not None:
            doc: Dict[str, Any] = {"instances": [{"b64": base64.b64encode(payload.image).decode("ascii")}]}
        else:
            assert payload.array is not None
            doc = {"inputs": {payload.input_name: payload.array.tolist()}}
        return json.dumps(doc, separators=(",", ":")).encode()

    def _session(self) -> Any:
        import requests
        from requests.adapters import HTTPAdapter

        s = requests.Session()
        if self._ssl_context is not None:
            ctx = self._ssl_context

            class _Adapter(HTTPAdapter):
                def init_poolmanager(self, *a: Any, **kw: Any) -> None:
                    kw["ssl_context"] = ctx
                    super().init_poolmanager(*a, **kw)

            s.mount("https://", _Adapter())
        return s

    def prepare(self, payload: Payload) -> RequestFn:
        body = self.build_body(payload)
        headers = {"Content-Type": "application/json", **self.target.auth_headers()}
        url, timeout = self.url, self.target.timeout

        def send() -> str:
            session = self._thread_client(self._session)
            try:
                r = session.post(url, data=body, headers=headers, timeout=timeout)
                r.content  # read the whole answer: the connection goes back to the pool
            except Exception as e:  # requests' errors: connection refused, reset, timeout, TLS
                return _network_error_code(e)
            return OK if r.status_code == 200 else f"HTTP_{r.status_code}"
        return send


def _v2_inputs(module: Any, payload: Payload, binary: bool) -> List[Any]:
    """The tritonclient ``InferInput`` list of a payload (BYTES [1] or FP32)."""
    if payload.image is not None:
        inp = module.InferInput(payload.input_name, [1], "BYTES")
        data = np.array([bytes(payload.image)], dtype=np.object_)
    else:
        assert payload.array is not None
        data = payload.array
        inp = module.InferInput(payload.input_name, list(data.shape), "FP32")
    if binary:
        inp.set_data_from_numpy(data, binary_data=True)
    else:
        inp.set_data_from_numpy(data)
    return [inp]


def _triton_status(e: Any, http: bool) -> str:
    status = str(e.status() or "") if hasattr(e, "status") else ""
    if status.startswith("StatusCode."):
        return status[len("StatusCode."):]
    if http and status.isdigit():
        return f"HTTP_{status}"
    return status or "UNKNOWN"


@register("v2-rest")
class V2RestSender(_SenderBase):
    """KServe v2 REST inference with ``tritonclient.http`` (binary tensor data; one client per
    thread: that client is not thread-safe).

    Example:
        >>> s = V2RestSender(Target("127.0.0.1", 8000, model_name="tiny"))  # doctest: +SKIP
    """

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        if not target.model:
            raise ValueError("--protocol v2-rest needs a model name (--model, or --service)")
        if target.target_name_override:
            raise ValueError("target_name_override applies to the gRPC protocols only")
        try:
            import tritonclient.http  # noqa: F401
        except ImportError as e:
            raise _missing(self.protocol, "tritonclient (with geventhttpclient)", e) from None
        self._pem = target.ca_pem() if target.use_ssl else None

    def _client(self) -> Any:
        import tritonclient.http as th

        kw: Dict[str, Any] = {}
        if self.target.use_ssl:
            kw["ssl"] = True
            if self._pem:
                import gevent.ssl

                pem = self._pem.decode("ascii")
                kw["ssl_context_factory"] = lambda *a, **k: gevent.ssl.create_default_context(cadata=pem)
        t = self.target.timeout
        return th.InferenceServerClient(self.target.hostport, connection_timeout=t, network_timeout=t, **kw)

    def prepare(self, payload: Payload) -> RequestFn:
        import tritonclient.http as th
        from tritonclient.utils import InferenceServerException

        inputs = _v2_inputs(th, payload, binary=True)
        model, headers = self.target.model, self.target.auth_headers() or None

        def send() -> str:
            try:
                client = self._thread_client(self._client)
                client.infer(model, inputs, headers=headers)
                return OK
            except InferenceServerException as e:
                return _triton_status(e, http=True)
            except Exception as e:  # transport errors of geventhttpclient
                return _network_error_code(e)
        return send


@register("v2-grpc")
class V2GrpcSender(_SenderBase):
    """KServe v2 gRPC ``ModelInfer`` with ``tritonclient.grpc`` (one shared channel).

    Example:
        >>> s = V2GrpcSender(Target("127.0.0.1", 8001, model_name="tiny"))  # doctest: +SKIP
    """

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        if not target.model:
            raise ValueError("--protocol v2-grpc needs a model name (--model, or --service)")
        try:
            import grpc
            import tritonclient.grpc as tg
        except ImportError as e:
            raise _missing(self.protocol, "tritonclient", e) from None
        kw: Dict[str, Any] = {}
        if target.use_ssl:
            kw["ssl"] = True
            kw["creds"] = grpc.ssl_channel_credentials(root_certificates=target.ca_pem())
            if target.target_name_override:
                big = 2 ** 31 - 1  # the library's own limits, which channel_args replaces
                kw["channel_args"] = [("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big),
                                      ("grpc.ssl_target_name_override", target.target_name_override)]
        self._client = tg.InferenceServerClient(target.hostport, **kw)
        self._opened.append(self._client)

    def prepare(self, payload: Payload) -> RequestFn:
        import tritonclient.grpc as tg
        from tritonclient.utils import InferenceServerException

        inputs = _v2_inputs(tg, payload, binary=False)
        client, model, timeout = self._client, self.target.model, self.target.timeout
        headers = self.target.auth_headers() or None

        def send() -> str:
            try:
                client.infer(model, inputs, client_timeout=timeout, headers=headers)
                return OK
            except InferenceServerException as e:
                return _triton_status(e, http=False)
            except Exception as e:  # a transport error tritonclient did not wrap
                return _network_error_code(e)
        return send
