"""Weight sources for the model zoo: deterministic seeded synthetic weights, Keras-applications
``.h5`` ImageNet files, and the local TF-checkpoint store.  numpy + h5py; TensorFlow is imported
only inside the functions that read checkpoints or Keras-3 ``.weights.h5`` files.

A weight is described by a :class:`WeightSpec`: its TF variable name (TF-slim style, e.g.
``resnet_v1_50/block1/unit_1/bottleneck_v1/conv1/BatchNorm/gamma``), its shape, a *kind* that
picks the synthetic distribution, and where Keras applications keep it (layer name, index in
``layer.weights``), or ``None`` where Keras has no such model (SSD-VGG).
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "WeightSpec",
    "random_array",
    "random_arrays",
    "read_keras_h5",
    "arrays_from_keras_layers",
    "find_checkpoint_files",
    "read_checkpoint",
]


class WeightSpec(NamedTuple):
    """One weight of an architecture: TF name, shape, synthetic kind, Keras source."""

    name: str
    shape: Tuple[int, ...]
    kind: str
    keras: Optional[Tuple[str, int]] = None


def _seed(name: str) -> int:
    # Stable across runs, machines and Python hash randomisation.
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def random_array(spec: WeightSpec, input_std: float = 1.0) -> np.ndarray:
    """The deterministic synthetic value of one weight, seeded by its name.

    Kinds (He-style scales so that activations keep their magnitude through 152 layers with
    inference-mode batch norm):
    ``conv`` He normal ``sqrt(2/fan_in)`` (followed by ReLU); ``conv_in`` the same divided by
    ``input_std`` (first layer: preprocessed pixels have a std of about 60, or 1 with
    DenseNet's 0.017 scaling); ``linear`` ``sqrt(1/fan_in)`` (no ReLU after: heads, logits);
    ``bias``/``beta``/``mean`` small normals; ``gamma`` about 1; ``gamma_last`` about 0.2
    (last BN of a residual branch, so each block adds a little to its shortcut);
    ``var`` uniform in [0.9, 1.1]; ``l2scale`` 20 (SSD conv4_3 normalisation, as Caffe SSD).

    Example:
        >>> s = WeightSpec("a/weights", (3, 3, 8, 16), "conv")
        >>> bool((random_array(s) == random_array(s)).all())
        True
    """
    rng = np.random.default_rng(_seed(spec.name))
    shape = tuple(spec.shape)
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    kind = spec.kind
    if kind in ("conv", "conv_in", "linear"):
        std = np.sqrt((1.0 if kind == "linear" else 2.0) / fan_in)
        if kind == "conv_in":
            std /= input_std
        out = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    elif kind in ("bias", "beta", "mean"):
        out = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    elif kind == "gamma":
        out = 1.0 + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
    elif kind == "gamma_last":
        out = 0.2 * (1.0 + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05))
    elif kind == "var":
        out = rng.uniform(0.9, 1.1, shape).astype(np.float32)
    elif kind == "l2scale":
        out = np.full(shape, 20.0, np.float32)
    else:
        raise ValueError(f"unknown weight kind {kind!r} for {spec.name}")
    return np.ascontiguousarray(out, dtype=np.float32)


def random_arrays(specs: Sequence[WeightSpec], input_std: float = 1.0) -> Dict[str, np.ndarray]:
    """``{name: random_array(spec)}`` for every spec.

    Example:
        >>> sorted(random_arrays([WeightSpec("b", (4,), "bias")]))
        ['b']
    """
    return {s.name: random_array(s, input_std) for s in specs}


def _decode(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def read_keras_h5(path: str, keras_app: Optional[str] = None) -> Dict[str, List[np.ndarray]]:
    """Read a Keras weights file into ``{layer_name: [arrays in layer.weights order]}``.

    Two layouts are understood:

    * the legacy HDF5 layout of the published Keras-applications ImageNet files
      (``resnet50_weights_tf_dim_ordering_tf_kernels.h5`` ...) and of ``model.save("m.h5")``:
      a ``layer_names`` attribute (at the root or in ``model_weights``), one group per layer with
      a ``weight_names`` attribute. Read with h5py only.
    * the Keras-3 ``.weights.h5`` layout (``model.save_weights``), whose groups are named after
      object paths, not layer names: the file is loaded into ``keras.applications.<keras_app>``
      built with ``weights=None`` and the weights are read back by layer name.

    Example:
        >>> read_keras_h5("resnet50_weights_tf_dim_ordering_tf_kernels.h5")  # doctest: +SKIP
    """
    import h5py

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Keras weights file {path!r} does not exist")
    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in group.attrs:
            out: Dict[str, List[np.ndarray]] = {}
            for lname in (_decode(n) for n in group.attrs["layer_names"]):
                g = group[lname]
                names = [_decode(n) for n in g.attrs.get("weight_names", [])]
                out[lname] = [np.asarray(g[n], dtype=np.float32) for n in names]
            return out
    if keras_app is None:
        raise ValueError(f"{path!r} is a Keras-3 .weights.h5 file and this model has no "
                         "keras.applications twin to load it into")
    import keras

    model = getattr(keras.applications, keras_app)(weights=None)
    model.load_weights(path)
    return {layer.name: [np.asarray(v.numpy(), dtype=np.float32) for v in layer.weights] for layer in model.layers}


def arrays_from_keras_layers(specs: Sequence[WeightSpec], layers: Dict[str, List[np.ndarray]],
                             source: str = "the .h5 file") -> Dict[str, np.ndarray]:
    """Map Keras layer weights onto TF variable names (reshaping FC kernels into the
    equivalent 1x1 / 7x7 conv kernels; Keras ``Flatten`` is NHWC so a plain reshape is exact).

    Example:
        >>> spec = WeightSpec("m/logits/weights", (1, 1, 2, 3), "linear", ("predictions", 0))
        >>> arrays_from_keras_layers([spec], {"predictions": [np.ones((2, 3), np.float32)]})["m/logits/weights"].shape
        (1, 1, 2, 3)
    """
    out: Dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.keras is None:
            raise ValueError(f"{spec.name} has no Keras-applications counterpart; this model cannot "
                             "load Keras .h5 weights (use weights='random' or a checkpoint)")
        lname, idx = spec.keras
        if lname not in layers or idx >= len(layers[lname]):
            raise KeyError(f"{source} has no weight {idx} in layer {lname!r} (needed for {spec.name}); "
                           "is it the Keras-applications file of this architecture?")
        arr = layers[lname][idx]
        if arr.size != int(np.prod(spec.shape)):
            raise ValueError(f"{source}: layer {lname!r} weight {idx} has shape {arr.shape}, "
                             f"{spec.name} needs {spec.shape}")
        out[spec.name] = np.ascontiguousarray(arr.reshape(spec.shape), dtype=np.float32)
    return out


def find_checkpoint_files(directory: str) -> bool:
    """True when ``directory`` holds a TF checkpoint (a ``checkpoint`` state file or an
    ``*.index`` file). TF-free, so model constructors stay fast.

    Example:
        >>> find_checkpoint_files("/nonexistent")
        False
    """
    if not os.path.isdir(directory):
        return False
    return any(n == "checkpoint" or n.endswith(".index") for n in os.listdir(directory))


def latest_checkpoint(directory: str) -> str:
    """``tf.compat.v1.train.latest_checkpoint(directory)``, falling back to the single
    ``*.index`` prefix when there is no ``checkpoint`` state file; raises when there is none."""
    import tensorflow.compat.v1 as tf

    path = tf.train.latest_checkpoint(directory)
    if path is None and os.path.isdir(directory):
        prefixes = sorted(n[: -len(".index")] for n in os.listdir(directory) if n.endswith(".index"))
        if len(prefixes) == 1:
            path = os.path.join(directory, prefixes[0])
    if path is None:
        raise FileNotFoundError(f"no TF checkpoint in {directory!r}")
    return path


def read_checkpoint(directory: str, names: Sequence[str]) -> Dict[str, np.ndarray]:
    """Read the named variables of the latest checkpoint in ``directory`` as float32 arrays.

    Example:
        >>> read_checkpoint("store/rn50/1.1.3", ["resnet_v1_50/conv1/weights"])  # doctest: +SKIP
    """
    import tensorflow as tf

    reader = tf.train.load_checkpoint(latest_checkpoint(directory))
    missing = [n for n in names if not reader.has_tensor(n)]
    if missing:
        raise KeyError(f"checkpoint in {directory!r} lacks {len(missing)} variables, e.g. {missing[:3]}")
    return {n: np.asarray(reader.get_tensor(n), dtype=np.float32) for n in names}
