"""Serving: a TF-Serving-compatible gRPC PredictionService for plans, its client, a load test.

TensorFlow is never imported here: the wire messages come from ``protos/`` via a private
descriptor pool (``bfpaccel.serve._protos``).

Example:
    >>> from bfpaccel.serve import serve, PredictionClient  # doctest: +SKIP
    >>> h = serve("tiny.bfpplan", port=0)  # doctest: +SKIP
    >>> PredictionClient("127.0.0.1", h.port).score_file("cat.jpg").shape  # doctest: +SKIP
"""

from . import _protos
from ._protos import DT_BOOL, DT_DOUBLE, DT_FLOAT, DT_INT32, DT_INT64, DT_STRING, DT_UINT8  # type: ignore[attr-defined]
from .cli import add_predict_parser, add_serve_parser, run_predict, run_serve
from .client import NO_RETRY, SEED_RETRY, TRANSIENT_RETRY, PredictionClient, RetryPolicy, client_from_service
from .codec import CodecError, make_ndarray, make_tensor_proto
from .loadtest import add_loadtest_parser, run_loadtest
from .server import ROUTE_HEADER, ServerHandle, serve

__all__ = [
    "serve", "ServerHandle", "ROUTE_HEADER", "PredictionClient", "client_from_service", "RetryPolicy",
    "SEED_RETRY", "TRANSIENT_RETRY", "NO_RETRY", "make_tensor_proto", "make_ndarray", "CodecError",
    "add_serve_parser", "run_serve", "add_predict_parser", "run_predict", "add_loadtest_parser", "run_loadtest",
    "DT_FLOAT", "DT_DOUBLE", "DT_INT32", "DT_INT64", "DT_UINT8", "DT_BOOL", "DT_STRING",
]
