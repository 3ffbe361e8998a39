"""``azureml.accel`` names for code ported from the seed: ``from bfpaccel.accel import
PredictionClient, client_from_service`` (and ``bfpaccel.accel.client``, the 1.0.33 module path
the notebooks kept using).

Example:
    >>> from bfpaccel.accel.client import PredictionClient  # doctest: +SKIP
"""

from ..serve.client import PredictionClient, client_from_service

__all__ = ["PredictionClient", "client_from_service"]
