"""Module path alias of ``azureml.accel.client`` (seed 1.0.33): ``PredictionClient``, ``client_from_service``."""

from ..serve.client import PredictionClient, client_from_service

__all__ = ["PredictionClient", "client_from_service"]
