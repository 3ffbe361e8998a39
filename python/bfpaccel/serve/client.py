"""``PredictionClient``: the seed's gRPC scoring client (``azureml.accel.PredictionClient``),
same signature, defaults and wire behaviour, without TensorFlow or azureml-core.

On the wire (SEED_API §3): unary ``/tensorflow.serving.PredictionService/Predict``; no
``model_spec`` and no ``output_filter``; ``score_file`` sends the file as DT_STRING shape [1]
under ``input_name``; the metadata ``authorization: Bearer <token>`` (``"Bearer "`` when there is
no token) and ``x-ms-aml-grpc-service-route: /api/v1/service/<service_name>`` are always sent;
per-attempt deadlines 10 s (``score_file``, ``score_tensors``) and 30 s (``score_numpy_arrays``);
up to 5 attempts with 1, 2, 4, 8 s sleeps, every error retried but INVALID_ARGUMENT; the channel
is recreated after each failure and after ``channel_shutdown_timeout`` idle.

What differs from the seed (each quirk's decision is in ``bfpaccel/serve/QUIRKS.md``): retries
are logged (logger ``bfpaccel.serve.client``) instead of printed; list/multi-output results work
(no ``tf.contrib``); a missing output raises ``KeyError`` naming the outputs there are;
``score_tensors`` takes any dtype; messages up to ``max_message_bytes`` (64 MiB, not 4);
keyword-only extras: custom CA, TLS target-name override, ``retry`` policy,
``consistent_batch_dim``; new methods ``score_image``, ``score_images``, ``predict``,
``get_model_metadata``, ``close``.

Example:
    >>> client = PredictionClient("127.0.0.1", 50051)  # doctest: +SKIP
    >>> probs = client.score_file("cat.jpg", outputs="classifier/resnet_v1_50/predictions/Softmax:0")  # doctest: +SKIP
    >>> probs.shape  # doctest: +SKIP
    (1000,)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import grpc
import numpy as np

from . import _protos as pb
from .codec import make_ndarray, make_tensor_proto, tf_dtype

__all__ = ["PredictionClient", "client_from_service", "RetryPolicy", "SEED_RETRY", "TRANSIENT_RETRY", "NO_RETRY",
           "DEFAULT_MAX_MESSAGE_BYTES"]

log = logging.getLogger("bfpaccel.serve.client")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
Image = Union[str, "os.PathLike[str]", bytes, bytearray]


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed call is retried.

    Args:
        attempts: calls in all (1: no retry).
        backoff: sleep before retry i (the last value repeats).
        retry_codes: codes that are retried; ``None`` means every code except
            ``never_retry`` (the seed's rule).
        never_retry: codes raised at once when ``retry_codes`` is None.

    Example:
        >>> RetryPolicy(attempts=3, backoff=(0.1,)).should_retry(grpc.StatusCode.UNAVAILABLE)
        True
    """

    attempts: int = 5
    backoff: Tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    retry_codes: Optional[FrozenSet[grpc.StatusCode]] = None
    never_retry: FrozenSet[grpc.StatusCode] = frozenset({grpc.StatusCode.INVALID_ARGUMENT})

    def should_retry(self, code: Optional[grpc.StatusCode]) -> bool:
        """True when an error with this code is retried."""
        if self.retry_codes is not None:
            return code in self.retry_codes
        return code not in self.never_retry

    def sleep_before(self, retry: int) -> float:
        """Seconds to sleep before retry number ``retry`` (0-based)."""
        if not self.backoff:
            return 0.0
        return float(self.backoff[min(retry, len(self.backoff) - 1)])


#: The seed's policy: 5 attempts, sleeps 1, 2, 4, 8 s, everything but INVALID_ARGUMENT retried.
SEED_RETRY = RetryPolicy()
#: Only transient failures retried (same attempts and sleeps).
TRANSIENT_RETRY = RetryPolicy(retry_codes=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                                     grpc.StatusCode.ABORTED}))
#: One attempt.
NO_RETRY = RetryPolicy(attempts=1, backoff=())
_POLICIES = {"seed": SEED_RETRY, "transient": TRANSIENT_RETRY, "none": NO_RETRY}


class _Stub:
    """The two PredictionService methods as callables on a channel (what ``*_pb2_grpc`` would make)."""

    def __init__(self, channel: grpc.Channel) -> None:
        ser = lambda m: m.SerializeToString()  # noqa: E731
        self.Predict = channel.unary_unary(pb.PREDICT_METHOD, request_serializer=ser,
                                           response_deserializer=pb.PredictResponse.FromString)
        self.GetModelMetadata = channel.unary_unary(pb.GET_MODEL_METADATA_METHOD, request_serializer=ser,
                                                    response_deserializer=pb.GetModelMetadataResponse.FromString)


def _read(image: Image) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    with open(image, "rb") as f:
        return f.read()


class PredictionClient:
    """Scoring client of a bfpaccel (or seed-compatible TF-Serving) gRPC service.

    Args:
        address: host name or IP (``None`` raises ``ValueError("address")``, as the seed).
        port: default 443 with ``use_ssl``, else 80 (the AML front end); the edge box uses 50051.
        use_ssl: TLS (system roots unless ``root_certificates``).
        access_token: service key; sent as ``authorization: Bearer <token>`` on every call.
        service_name: the route: ``x-ms-aml-grpc-service-route: /api/v1/service/<name>``.
        channel_shutdown_timeout: recreate the channel after this much idle time.
        max_message_bytes: largest request/response (the seed had gRPC's 4 MiB).
        root_certificates: PEM bytes or a path of the CA(s) to trust (self-signed servers).
        target_name_override: TLS name to check instead of ``address`` (e.g. a cert for "localhost").
        retry: ``"seed"`` (default), ``"transient"``, ``"none"`` or a :class:`RetryPolicy`.
        consistent_batch_dim: opt-in fix of the seed's return shapes: ``score_file`` and
            ``score_tensors`` strip the batch dimension from every returned array, lists too
            (default False: a single output is stripped, a list keeps it, as in the seed).

    Example:
        >>> c = PredictionClient("127.0.0.1", 50051, service_name="resnet50")  # doctest: +SKIP
        >>> c.score_image("cat.jpg")["classifier/resnet_v1_50/predictions/Softmax:0"].shape  # doctest: +SKIP
        (1000,)
    """

    def __init__(self, address: str, port: Optional[int] = None, use_ssl: bool = False, access_token: str = "",
                 service_name: str = "", channel_shutdown_timeout: timedelta = timedelta(minutes=2), *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 root_certificates: Optional[Union[bytes, str, "os.PathLike[str]"]] = None,
                 target_name_override: Optional[str] = None, retry: Union[str, RetryPolicy] = "seed",
                 consistent_batch_dim: bool = False) -> None:
        if address is None:
            raise ValueError("address")
        if port is None:
            port = 443 if use_ssl else 80
        self._host = f"{address}:{port}"
        self._use_ssl = bool(use_ssl)
        self._channel_shutdown_timeout = channel_shutdown_timeout
        self._access_token = access_token or ""
        self._service_name = service_name or ""
        # always sent, also empty (seed wire behaviour, SEED_API 3.4)
        self._metadata: Tuple[Tuple[str, str], ...] = (
            ("authorization", "Bearer " + self._access_token),
            ("x-ms-aml-grpc-service-route", "/api/v1/service/" + self._service_name),
        )
        self._max_message_bytes = int(max_message_bytes)
        if root_certificates is not None and not isinstance(root_certificates, bytes):
            with open(root_certificates, "rb") as f:
                root_certificates = f.read()
        self._root_certificates: Optional[bytes] = root_certificates
        self._target_name_override = target_name_override
        if isinstance(retry, str):
            if retry not in _POLICIES:
                raise ValueError(f"retry must be one of {sorted(_POLICIES)} or a RetryPolicy, not {retry!r}")
            retry = _POLICIES[retry]
        self.retry: RetryPolicy = retry
        self.consistent_batch_dim = bool(consistent_batch_dim)
        self._channel: Optional[grpc.Channel] = None
        self._stub: Optional[_Stub] = None
        self._last_use: Optional[datetime] = None
        self._sleep = time.sleep  # test seam

    # -- seams kept from the seed ------------------------------------------------------------------
    @staticmethod
    def _get_datetime_now() -> datetime:
        return datetime.now()

    def _channel_func(self) -> grpc.Channel:
        opts: List[Tuple[str, Any]] = [("grpc.max_send_message_length", self._max_message_bytes),
                                       ("grpc.max_receive_message_length", self._max_message_bytes)]
        if self._use_ssl:
            if self._target_name_override:
                opts.append(("grpc.ssl_target_name_override", self._target_name_override))
            creds = grpc.ssl_channel_credentials(root_certificates=self._root_certificates)
            return grpc.secure_channel(self._host, creds, options=opts)
        return grpc.insecure_channel(self._host, options=opts)

    def _get_grpc_stub(self) -> _Stub:
        now = self._get_datetime_now()
        if (self._stub is None or self._last_use is None
                or now - self._last_use > self._channel_shutdown_timeout):
            self._reinitialize_channel()
        self._last_use = now
        assert self._stub is not None
        return self._stub

    def _reinitialize_channel(self) -> None:
        self.close()
        self._channel = self._channel_func()
        self._stub = _Stub(self._channel)

    def close(self) -> None:
        """Closes the channel (a later call opens a new one)."""
        if self._channel is not None:
            try:
                self._channel.close()
            except Exception:  # closing a broken channel must not mask the real error
                pass
        self._channel = None
        self._stub = None

    def __enter__(self) -> "PredictionClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, request: Any, timeout: float) -> Any:
        policy = self.retry
        for attempt in range(max(1, policy.attempts)):
            try:
                stub = self._get_grpc_stub()
                return getattr(stub, method)(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                if attempt + 1 >= policy.attempts or not policy.should_retry(code):
                    raise
                wait = policy.sleep_before(attempt)
                log.warning("Retrying %s (attempt %d of %d, in %.1f s): %s", method, attempt + 2,
                            policy.attempts, wait, _describe(e))
                self._sleep(wait)
                self._reinitialize_channel()
        raise AssertionError("unreachable")  # pragma: no cover

    def _predict(self, request: Any, timeout: float) -> Any:
        return self._call("Predict", request, timeout)

    # -- results -----------------------------------------------------------------------------------
    @staticmethod
    def _default_keys(response: Any) -> List[str]:
        # The server answers every output under its tensor name *and* its alias; with no
        # outputs asked for, the seed's "one output" path must still see one: keep tensor names.
        keys = list(response.outputs)
        named = [k for k in keys if ":" in k]
        return named or keys

    @staticmethod
    def _get(response: Any, name: str) -> np.ndarray:
        if name not in response.outputs:
            raise KeyError(f"output {name!r} is not in the response; it has {sorted(response.outputs)}")
        return make_ndarray(response.outputs[name])

    def _shape_result(self, response: Any, outputs: Optional[Union[str, Sequence[str]]], strip: bool) -> Any:
        if isinstance(outputs, str):
            arr = self._get(response, outputs)
            return arr[0] if strip else arr
        strip_all = strip and self.consistent_batch_dim
        if outputs is None:
            keys = self._default_keys(response)
            if len(keys) == 1:
                arr = self._get(response, keys[0])
                return arr[0] if strip else arr
        else:
            keys = list(outputs)
        arrs = [self._get(response, k) for k in keys]
        return [a[0] for a in arrs] if strip_all else arrs

    # -- the seed's methods ------------------------------------------------------------------------
    def score_file(self, path: str, input_name: str = "images", outputs: Optional[Union[str, Sequence[str]]] = None,
                   timeout: float = 10.0) -> Any:
        """Scores one image file (sent as encoded bytes, DT_STRING shape [1]).

        Returns (seed shapes): ``outputs`` a str: that ndarray without the batch dimension; a
        list: a list of ndarrays *with* it (``consistent_batch_dim=True``: without); None: the
        one output without the batch dimension, or a list of all with it.

        Example:
            >>> client.score_file("cat.jpg", outputs="classifier/resnet_v1_50/predictions/Softmax:0")  # doctest: +SKIP
        """
        with open(path, "rb") as f:
            data = f.read()
        return self.score_tensors({input_name: (data, [1], pb.DT_STRING)}, outputs, timeout)

    def score_numpy_arrays(self, input_map: Mapping[str, np.ndarray],
                           outputs: Optional[Union[str, Sequence[str]]] = None) -> Any:
        """Scores numpy inputs (packed ``tensor_content``, dtype from numpy); 30 s per attempt.

        The batch dimension is kept on every returned array (seed behaviour).

        Example:
            >>> client.score_numpy_arrays({"input:0": np.zeros((1, 224, 224, 3), np.float32)})  # doctest: +SKIP
        """
        request = pb.PredictRequest()
        for name, arr in input_map.items():
            request.inputs[name].CopyFrom(make_tensor_proto(np.asarray(arr)))
        return self._shape_result(self._predict(request, 30.0), outputs, strip=False)

    def score_tensors(self, input_map: Mapping[str, Tuple[Any, Sequence[int], int]],
                      outputs: Optional[Union[str, Sequence[str]]] = None, timeout: float = 10.0) -> Any:
        """Scores raw tensors: ``input_map`` maps a name to ``(data, shape, dtype)``.

        ``dtype`` is a ``DataType`` number (``bfpaccel.serve.DT_STRING``...) or a numpy dtype.
        For DT_STRING ``data`` is bytes (or a list of bytes); for other dtypes an array/list, or
        raw little-endian bytes packed into ``tensor_content`` (the seed crashed on non-strings).
        Results are shaped as in :meth:`score_file`.

        Example:
            >>> client.score_tensors({"images": (jpeg, [1], DT_STRING)}, "output_alias")  # doctest: +SKIP
        """
        request = pb.PredictRequest()
        for name, (data, shape, dtype) in input_map.items():
            tp = request.inputs[name]
            dt = dtype if isinstance(dtype, int) else None
            if dt == pb.DT_STRING:
                tp.dtype = pb.DT_STRING
                if isinstance(data, (bytes, bytearray, str)):
                    tp.string_val.append(data.encode() if isinstance(data, str) else bytes(data))
                else:
                    tp.string_val.extend(d.encode() if isinstance(d, str) else bytes(d) for d in data)
                for d in shape:
                    tp.tensor_shape.dim.add().size = int(d)
            elif isinstance(data, (bytes, bytearray)):
                tp.dtype = dt if dt is not None else tf_dtype(dtype)
                tp.tensor_content = bytes(data)
                for d in shape:
                    tp.tensor_shape.dim.add().size = int(d)
            else:
                tp.CopyFrom(make_tensor_proto(data, dtype=dtype, shape=list(shape)))
        return self._shape_result(self._predict(request, timeout), outputs, strip=True)

    # -- extras --------------------------------------------------------------------------------------
    def predict(self, inputs: Mapping[str, Any], outputs: Optional[Sequence[str]] = None,
                timeout: float = 30.0) -> Dict[str, np.ndarray]:
        """One Predict call: ``inputs`` name -> ndarray, bytes or list of bytes; returns every
        output (or those in ``outputs``, sent as ``output_filter``) as a dict, batch kept.

        Example:
            >>> client.predict({"images": [jpeg1, jpeg2]})  # doctest: +SKIP
        """
        request = pb.PredictRequest()
        for name, v in inputs.items():
            request.inputs[name].CopyFrom(v if isinstance(v, pb.TensorProto) else make_tensor_proto(v))
        if outputs:
            request.output_filter.extend(outputs)
        response = self._predict(request, timeout)
        return {k: make_ndarray(v) for k, v in response.outputs.items()}

    def score_image(self, image: Image, input_name: str = "images", outputs: Optional[Sequence[str]] = None,
                    timeout: float = 10.0) -> Dict[str, np.ndarray]:
        """Scores one image (a path or encoded bytes); returns output name -> array without the
        batch dimension (every name the server answers, tensor names and aliases).

        Example:
            >>> client.score_image("cat.jpg")["output_alias"].shape  # doctest: +SKIP
            (1000,)
        """
        res = self.score_images([image], input_name, outputs, timeout)
        return {k: v[0] for k, v in res.items()}

    def score_images(self, images: Sequence[Image], input_name: str = "images",
                     outputs: Optional[Sequence[str]] = None, timeout: float = 10.0) -> Dict[str, np.ndarray]:
        """Scores a batch of images in one request (DT_STRING shape [N]); arrays keep the batch.

        Example:
            >>> client.score_images(["a.jpg", "b.png"])["output_alias"].shape  # doctest: +SKIP
            (2, 1000)
        """
        data = [_read(i) for i in images]
        if not data:
            raise ValueError("no images given")
        tp = pb.TensorProto(dtype=pb.DT_STRING)
        tp.string_val.extend(data)
        tp.tensor_shape.dim.add().size = len(data)
        return self.predict({input_name: tp}, outputs, timeout)

    def get_model_metadata(self, timeout: float = 10.0) -> Dict[str, Any]:
        """The served model's signature: ``{"name", "version", "inputs", "outputs"}``, where
        inputs/outputs map a key to ``{"name", "dtype", "shape"}`` (-1 / None: any size).

        Example:
            >>> client.get_model_metadata()["inputs"]["images"]["dtype"]  # doctest: +SKIP
            'DT_STRING'
        """
        request = pb.GetModelMetadataRequest()
        request.metadata_field.append("signature_def")
        response = self._call("GetModelMetadata", request, timeout)
        sdm = pb.SignatureDefMap.FromString(response.metadata["signature_def"].value)
        sig = sdm.signature_def["serving_default"]

        def conv(m: Any) -> Dict[str, Any]:
            return {k: {"name": v.name, "dtype": pb.DataTypeName.get(v.dtype, str(v.dtype)),
                        "shape": None if v.tensor_shape.unknown_rank else [d.size for d in v.tensor_shape.dim]}
                    for k, v in m.items()}

        return {"name": response.model_spec.name, "version": response.model_spec.version.value,
                "inputs": conv(sig.inputs), "outputs": conv(sig.outputs)}


def _describe(e: grpc.RpcError) -> str:
    try:
        return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
    except Exception:
        return str(e)


def client_from_service(service: Any, **kwargs: Any) -> PredictionClient:
    """A client for a deployed service (duck-typed: ``scoring_uri``, ``get_keys()``,
    ``auth_enabled``, ``name``), as ``azureml.accel.client_from_service``.

    TLS is on for an ``https`` URI; the key is ``get_keys()[0]`` when auth is enabled.  A port
    in the URI is used (the seed appended 80/443 to it a second time); otherwise 443/80.
    Extra keyword arguments go to :class:`PredictionClient`.

    Example:
        >>> client = client_from_service(service)  # doctest: +SKIP
    """
    uri = urlparse(service.scoring_uri)
    use_ssl = uri.scheme == "https"
    key = service.get_keys()[0] if getattr(service, "auth_enabled", False) else ""
    host = uri.hostname or uri.netloc
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = uri.port or (443 if use_ssl else 80)
    return PredictionClient(host, port, use_ssl, key, getattr(service, "name", "") or "", **kwargs)
