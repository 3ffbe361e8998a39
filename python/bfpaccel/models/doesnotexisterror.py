"""``DoesNotExistError``: raised for a model part that does not exist, as in the seed
(``azureml.accel.models.doesnotexisterror``), e.g. the default classifier of SSD-VGG."""

from __future__ import annotations

__all__ = ["DoesNotExistError"]


class DoesNotExistError(ValueError):
    """A model part that this model does not have (a ``ValueError``, as in the seed).

    Example:
        >>> raise DoesNotExistError("SsdVgg has no default classifier")
        Traceback (most recent call last):
        ...
        bfpaccel.models.doesnotexisterror.DoesNotExistError: SsdVgg has no default classifier
    """
