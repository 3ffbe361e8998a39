"""Runnable end-to-end examples (each is ``python -m bfpaccel.examples.<name> --help``).

- ``transfer_learning``: a frozen block-floating-point featurizer (EfficientNet-Lite0 with its
  ImageNet weights, compiled to a plan) and a new classifier head trained on the plan's own
  features -- once with ``bfpaccel.torch.BfpLinear``, once with ``bfpaccel.tf.BfpDense`` --
  then registered, compiled, deployed as a local gRPC service and scored with
  ``PredictionClient``: the served accuracy equals the training-time accuracy.

Nothing here is imported by ``import bfpaccel``.
"""
