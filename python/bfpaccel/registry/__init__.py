"""The local model registry (the seed's workspace + ``Model``, SEED_API §7 and §8 steps 8-9, 16).

- ``Registry(path)``: a workspace directory: SQLite (WAL) + a content-addressed file store.
  It is also the converter's ``ConversionRegistry`` (``model_path``, ``register_converted``).
- ``Model.register(registry, path, name, tags=, description=, properties=)``: copy a file or
  directory in, next version, id ``"name:version"``; ``Model(registry, name, version=None)``,
  ``Model.list(registry, name=, tags=)``, ``.path``, ``.download()``, ``.delete()``.
- Errors: ``RegistryError`` > ``NotFoundError`` / ``InUseError`` / ``CorruptedError``.

No TensorFlow, no onnx: stdlib only.
"""

from ._model import Model
from ._store import (
    CorruptedError,
    InUseError,
    NotFoundError,
    Registry,
    RegistryError,
    converted_name,
    parse_id,
)

__all__ = [
    "Registry",
    "Model",
    "RegistryError",
    "NotFoundError",
    "InUseError",
    "CorruptedError",
    "converted_name",
    "parse_id",
]
