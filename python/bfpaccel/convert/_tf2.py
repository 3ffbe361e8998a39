"""TF2 models (Keras, ``tf.saved_model.save``) to ONNX, in this process, through
tf2onnx's ``from_keras`` / ``from_function``. These carry no string front: the ONNX input is
the model's float input and the metadata records ``"kind": "tensor"``."""

from __future__ import annotations

import json
import os
from typing import Any, List, Optional

from ._meta import CONVERTER_KEY, OUTPUTS_KEY, PREPROCESS_KEY

__all__ = ["convert_keras", "convert_saved_model"]


def _finish(model: Any, path: str, source: str, opset: int, optimize: bool, extra: Optional[dict] = None) -> str:
    import onnx
    import tf2onnx

    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    pre = {"kind": "tensor", "input": inp.name, "input_alias": None, "onnx_input": inp.name, "shape": dims}
    if extra:
        pre.update(extra)
    outs = [{"name": o.name, "alias": None, "onnx_output": o.name} for o in model.graph.output]
    meta = {PREPROCESS_KEY: json.dumps(pre), OUTPUTS_KEY: json.dumps(outs),
            CONVERTER_KEY: json.dumps({"tool": f"tf2onnx {tf2onnx.__version__}", "opset": opset,
                                       "optimize": optimize, "source": source})}
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save(model, path)
    onnx.checker.check_model(path)
    return path


def convert_keras(model: Any, path: str, *, opset: int = 15, optimize: bool = True,
                  input_signature: Optional[List[Any]] = None) -> str:
    """A Keras model (functional or Sequential) -> ONNX file at ``path``; returns ``path``.
    ``bfpaccel.tf.BfpConv2D`` / ``BfpDense`` layers are exported as their float layers
    (``bfpaccel.tf.float_keras_model``), whose compiled plan computes what they compute.
    Runs in this process (tf2onnx's memory adds up here: for big models prefer a SavedModel
    and ``convert_saved_model``, or ``AccelOnnxConverter``).

    Example:
        >>> import keras  # doctest: +SKIP
        >>> m = keras.applications.MobileNetV2(weights=None)  # doctest: +SKIP
        >>> convert_keras(m, "/tmp/mnv2.onnx")  # doctest: +SKIP
        '/tmp/mnv2.onnx'
    """
    import tensorflow as tf
    import tf2onnx

    model = _float_twin(model)
    if input_signature is None:
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise ValueError("the Keras model has no known inputs: build it (call it once) or pass input_signature")
        input_signature = [tf.TensorSpec(t.shape, t.dtype, name=(getattr(t, "name", None) or f"input_{i}").split(":")[0])
                           for i, t in enumerate(inputs)]
    optimizers: Optional[dict] = None if optimize else {}
    try:
        # from_keras keeps the Keras output names; it fails on Keras-3 Sequential models.
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=input_signature, opset=opset,
                                              optimizers=optimizers)
    except (KeyError, AttributeError, TypeError):
        fn = tf.function(lambda *xs: model(*xs, training=False))
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=input_signature, opset=opset)
    return _finish(proto, path, f"keras:{getattr(model, 'name', 'model')}", opset, optimize)


def _float_twin(model: Any) -> Any:
    """A model with ``bfpaccel.tf`` BFP layers -> its float twin (tf2onnx cannot convert their
    ``PyFunc``s; the twin's plan computes the same numbers); any other model as it is."""

    def bfp_layers(m: Any) -> List[Any]:
        out: List[Any] = []
        for layer in getattr(m, "layers", []):
            if type(layer).__module__ == "bfpaccel.tf.layers":
                out.append(layer)
            out.extend(bfp_layers(layer))
        return out

    found = bfp_layers(model)
    if not found:
        return model
    from ..tf.layers import float_keras_model

    try:
        return float_keras_model(model)
    except Exception as exc:
        names = ", ".join(layer.name for layer in found[:3])
        raise ValueError(f"the model has BFP layers ({names}) that tf2onnx cannot convert, and its float twin "
                         f"could not be built ({type(exc).__name__}: {exc}); build the twin with Conv2D/Dense "
                         "layers holding the same weights and convert that") from exc


def convert_saved_model(saved_model_dir: str, path: str, *, signature: str = "serving_default",
                        opset: int = 15, optimize: bool = True) -> str:
    """A TF2 SavedModel (``tf.saved_model.save`` / ``model.export``) -> ONNX at ``path``;
    returns ``path``. For the seed's TF1 ``simple_save`` models with a JPEG front use
    ``AccelOnnxConverter.convert_tf_model`` (it cuts the string front off).

    Example:
        >>> convert_saved_model("exported_model", "/tmp/model.onnx")  # doctest: +SKIP
        '/tmp/model.onnx'
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model_dir)
    if signature not in loaded.signatures:
        raise ValueError(f"SavedModel {saved_model_dir!r} has no signature {signature!r}; "
                         f"it has {sorted(loaded.signatures)}")
    fn = loaded.signatures[signature]
    specs = [s for s in fn.structured_input_signature[1].values()]
    if any(s.dtype == tf.string for s in specs):
        raise ValueError(f"signature {signature!r} takes strings: ONNX cannot hold image decoding; export the "
                         "model with a float image input, or use AccelOnnxConverter for simple_save models")
    proto, _ = _from_concrete(fn, opset)
    return _finish(proto, path, os.path.abspath(saved_model_dir), opset, optimize)


def _from_concrete(fn: Any, opset: int) -> Any:
    import tensorflow as tf
    import tf2onnx

    specs = fn.structured_input_signature[1]
    names = sorted(specs)
    sig = [tf.TensorSpec(specs[n].shape, specs[n].dtype, name=n) for n in names]

    def call(*xs):
        return fn(**dict(zip(names, xs)))

    return tf2onnx.convert.from_function(tf.function(call, input_signature=sig), input_signature=sig, opset=opset)
