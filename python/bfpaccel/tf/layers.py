"""Keras layers on the BFP datapath: ``BfpConv2D`` and ``BfpDense``.

Drop-in for ``keras.layers.Conv2D`` / ``keras.layers.Dense`` (channels-last, the same weights
``kernel`` / ``bias``): the forward pass computes what the compiled plan computes for the
float layer (:func:`bfpaccel.tf.bfp_conv2d` / :func:`bfpaccel.tf.bfp_matmul`, ReLU fused into
the epilogue, softmax as the plan's vector op), the backward pass is straight-through, so
``model.fit`` trains on the accelerator's numbers. :func:`float_keras_model` gives the float
twin (``Conv2D`` / ``Dense`` with the same weights) that ``bfpaccel.convert.convert_keras``
exports and ``bfpaccel.compile`` turns back into the same numbers.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import keras

from ..formats import Format
from . import _numerics as nm
from ._ops import bfp_conv2d, bfp_matmul, vector_softmax

__all__ = ["BfpConv2D", "BfpDense", "float_keras_model"]

FormatLike = Union[str, Format, None]
_ACTIVATIONS = (None, "linear", "relu", "softmax")


def _check_act(activation: Any) -> Optional[str]:
    if activation is None or activation == "linear":
        return None
    if activation in ("relu", "softmax"):
        return activation
    raise ValueError(f"activation must be None, 'linear', 'relu' (fused into the matrix op) or 'softmax' "
                     f"(the plan's vector op), got {activation!r}")


def _format_config(fmt: FormatLike) -> Any:
    if fmt is None or isinstance(fmt, str):
        return fmt
    return {"block_size": fmt.block_size, "exp_bits": fmt.exp_field_bits, "element": fmt.element,
            "rounding": fmt.rounding, "name": fmt.name}


def _format_from_config(v: Any) -> FormatLike:
    if isinstance(v, dict):
        return Format(int(v["block_size"]), int(v["exp_bits"]), v["element"], v["rounding"], name=v.get("name"))
    return v


class _BfpLayer(keras.layers.Layer):
    def __init__(self, format: FormatLike, weight_format: FormatLike, rounding: Optional[str],
                 vector_precision: Optional[str], seed: int, activation: Any, use_bias: bool,
                 kernel_initializer: Any, bias_initializer: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        fa, _ = nm.resolve_formats(format, weight_format, rounding)  # fail early on bad formats
        self.format = format
        self.weight_format = weight_format
        self.rounding = rounding
        self.vector_precision = nm.check_vector_precision(vector_precision, fa)
        self.seed = int(seed)
        self.activation = _check_act(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def _common(self) -> Dict[str, Any]:
        return dict(format=self.format, weight_format=self.weight_format, rounding=self.rounding,
                    vector_precision=self.vector_precision, seed=self.seed)

    def _finish(self, y: Any) -> Any:
        if self.activation == "softmax":
            if self.format is None or nm.resolve_formats(self.format)[0] is None:
                import tensorflow as tf

                return tf.nn.softmax(y)
            return vector_softmax(y, self.vector_precision)
        return y

    def get_config(self) -> Dict[str, Any]:
        cfg = super().get_config()
        cfg.update(format=_format_config(self.format), weight_format=_format_config(self.weight_format),
                   rounding=self.rounding, vector_precision=self.vector_precision, seed=self.seed,
                   activation=self.activation, use_bias=self.use_bias,
                   kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
                   bias_initializer=keras.initializers.serialize(self.bias_initializer))
        return cfg

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> Any:
        config = dict(config)
        config["format"] = _format_from_config(config.get("format"))
        config["weight_format"] = _format_from_config(config.get("weight_format"))
        return cls(**config)


class BfpConv2D(_BfpLayer):
    """``keras.layers.Conv2D`` (channels-last, groups 1) computed on the BFP datapath.

    Args are Conv2D's (``filters``, ``kernel_size``, ``strides``, ``padding`` "valid"/"same",
    ``dilation_rate``, ``activation`` None/"relu", ``use_bias``, initializers) plus the plan's:
    ``format`` (default ``"msfp16"``; ``None``/``"fp32"`` = the float layer),
    ``weight_format``, ``rounding``, ``vector_precision`` (default ``fp16``), ``seed``.

    Example:
        >>> layer = BfpConv2D(8, 3, padding="same", activation="relu")  # doctest: +SKIP
        >>> layer(np.zeros((1, 16, 16, 4), np.float32)).shape  # doctest: +SKIP
        (1, 16, 16, 8)
    """

    def __init__(self, filters: int, kernel_size: Any, strides: Any = 1, padding: str = "valid",
                 dilation_rate: Any = 1, activation: Any = None, use_bias: bool = True,
                 kernel_initializer: Any = "glorot_uniform", bias_initializer: Any = "zeros",
                 format: FormatLike = "msfp16", weight_format: FormatLike = None, rounding: Optional[str] = None,
                 vector_precision: Optional[str] = None, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(format, weight_format, rounding, vector_precision, seed, activation, use_bias,
                         kernel_initializer, bias_initializer, **kwargs)
        if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
            raise ValueError(f"filters must be a positive int, got {filters!r}")
        if self.activation == "softmax":
            raise ValueError("BfpConv2D takes activation None or 'relu'")
        self.filters = filters
        self.kernel_size = nm._pair(kernel_size, "kernel_size")
        self.strides = nm._pair(strides, "strides")
        self.dilation_rate = nm._pair(dilation_rate, "dilation_rate")
        p = str(padding).lower()
        if p not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        self.padding = p

    def build(self, input_shape: Tuple[Any, ...]) -> None:
        cin = input_shape[-1]
        if cin is None:
            raise ValueError("BfpConv2D needs the number of input channels (last axis) to be known")
        self.kernel = self.add_weight(name="kernel", shape=(*self.kernel_size, int(cin), self.filters),
                                      initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer=self.bias_initializer) \
            if self.use_bias else None

    def call(self, x: Any) -> Any:
        return bfp_conv2d(x, self.kernel, self.strides, self.padding.upper(), bias=self.bias,
                          activation=self.activation, dilations=self.dilation_rate, **self._common())

    def compute_output_shape(self, input_shape: Tuple[Any, ...]) -> Tuple[Any, ...]:
        n, h, w, _ = input_shape
        out: List[Optional[int]] = []
        for size, k, s, d in zip((h, w), self.kernel_size, self.strides, self.dilation_rate):
            if size is None:
                out.append(None)
            elif self.padding == "same":
                out.append(-(-size // s))
            else:
                out.append((size - d * (k - 1) - 1) // s + 1)
        return (n, out[0], out[1], self.filters)

    def get_config(self) -> Dict[str, Any]:
        cfg = super().get_config()
        cfg.update(filters=self.filters, kernel_size=self.kernel_size, strides=self.strides, padding=self.padding,
                   dilation_rate=self.dilation_rate)
        return cfg


class BfpDense(_BfpLayer):
    """``keras.layers.Dense`` computed on the BFP datapath (a ``MatMul`` with a constant weight
    in the plan). ``activation``: None, "relu" (fused) or "softmax" (the plan's vector op).
    ``format=None``/``"fp32"``: the float layer.

    Example:
        >>> BfpDense(10, activation="softmax")(np.zeros((2, 64), np.float32)).shape  # doctest: +SKIP
        (2, 10)
    """

    def __init__(self, units: int, activation: Any = None, use_bias: bool = True,
                 kernel_initializer: Any = "glorot_uniform", bias_initializer: Any = "zeros",
                 format: FormatLike = "msfp16", weight_format: FormatLike = None, rounding: Optional[str] = None,
                 vector_precision: Optional[str] = None, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(format, weight_format, rounding, vector_precision, seed, activation, use_bias,
                         kernel_initializer, bias_initializer, **kwargs)
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"units must be a positive int, got {units!r}")
        self.units = units

    def build(self, input_shape: Tuple[Any, ...]) -> None:
        k = input_shape[-1]
        if k is None:
            raise ValueError("BfpDense needs the size of the input's last axis to be known")
        self.kernel = self.add_weight(name="kernel", shape=(int(k), self.units), initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer=self.bias_initializer) \
            if self.use_bias else None

    def call(self, x: Any) -> Any:
        act = "relu" if self.activation == "relu" else None
        return self._finish(bfp_matmul(x, self.kernel, bias=self.bias, activation=act, **self._common()))

    def compute_output_shape(self, input_shape: Tuple[Any, ...]) -> Tuple[Any, ...]:
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self) -> Dict[str, Any]:
        cfg = super().get_config()
        cfg.update(units=self.units)
        return cfg


def float_keras_model(model: Any) -> Any:
    """The float twin of a functional or Sequential Keras ``model``: every ``BfpConv2D`` /
    ``BfpDense`` becomes ``keras.layers.Conv2D`` / ``Dense`` with the same weights (other layers
    are cloned). Export it with ``bfpaccel.convert.convert_keras`` and compile with the layers'
    format: the plan computes what ``model`` computes.

    Example:
        >>> twin = float_keras_model(model)  # doctest: +SKIP
        >>> bfpaccel.convert.convert_keras(twin, "model.onnx")  # doctest: +SKIP
    """

    def clone(layer: Any) -> Any:
        if isinstance(layer, BfpConv2D):
            return keras.layers.Conv2D(layer.filters, layer.kernel_size, strides=layer.strides, padding=layer.padding,
                                       dilation_rate=layer.dilation_rate, activation=layer.activation,
                                       use_bias=layer.use_bias, name=layer.name)
        if isinstance(layer, BfpDense):
            return keras.layers.Dense(layer.units, activation=layer.activation, use_bias=layer.use_bias,
                                      name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    twin = keras.models.clone_model(model, clone_function=clone)
    for src, dst in zip(model.layers, twin.layers):
        dst.set_weights(src.get_weights())
    return twin
