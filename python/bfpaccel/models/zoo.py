"""The seed workflow for the five zoo models, from a TF1 graph to a converted ONNX file.

``build_zoo_onnx("resnet50")`` does what the Azure notebooks did before deploying: build the
graph with the seed's preprocessing, featurizer and classifier, save it, convert it.  The BFP
plan is then one ``bfpaccel.compile`` away.  Needs the ``tf`` extra (TensorFlow, tf2onnx).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Tuple

__all__ = ["ZOO_MODELS", "build_zoo_onnx"]

#: Zoo model name -> (class name in bfpaccel.models, preprocess_array arguments).
ZOO_MODELS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "resnet50": ("Resnet50", {}),
    "resnet152": ("Resnet152", {}),
    "vgg16": ("Vgg16", {}),
    "densenet121": ("Densenet121", {"scaling_factor": 0.017}),
    "ssdvgg": ("SsdVgg", {"output_height": 300, "output_width": 300, "preserve_aspect_ratio": False}),
}

def build_zoo_onnx(name: str, weights: str = "random", cache: str = ".", log: Callable[[str], None] = print) -> str:
    """The seed workflow for zoo model ``name``, up to ONNX: a TF1 graph ``Placeholder`` (JPEG
    bytes) -> ``preprocess_array`` -> the quantized featurizer -> the default classifier,
    ``simple_save`` with ``images`` / ``output_alias`` (SSD: ``out_0..out_11``), then
    ``AccelOnnxConverter.convert_tf_model``.  Returns the ONNX path in ``cache`` (reused when
    present: ``{name}-{weights tag}.onnx``).  ``weights``: ``"random"`` (seeded, reproducible),
    ``"store"`` (checkpoints under ``{cache}/store``) or a Keras ``.h5`` file.
    """
    cls_name, pre_args = ZOO_MODELS[name]
    tag = "random" if weights == "random" else os.path.splitext(os.path.basename(weights))[0]
    onnx_path = os.path.join(cache, f"{name}-{tag}.onnx")
    if os.path.isfile(onnx_path):
        return onnx_path
    import shutil

    import tensorflow.compat.v1 as tf

    from .. import models
    from ..convert import AccelOnnxConverter

    # graph mode inside the Graph context below; eager stays enabled for the caller
    saved = os.path.join(cache, f"{name}-{tag}.saved_model")
    shutil.rmtree(saved, ignore_errors=True)
    log(f"building {cls_name} ({'random' if weights == 'random' else weights} weights) as the seed does")
    graph = tf.Graph()
    with graph.as_default():
        in_images = tf.placeholder(tf.string)
        image_tensors = models.preprocess_array(in_images, **pre_args)
        model = getattr(models, cls_name)(os.path.join(cache, "store"), is_frozen=True,
                                          weights=None if weights == "store" else weights)
        features = model.import_graph_def(image_tensors)
        if name == "ssdvgg":
            outputs = {f"out_{i}": t for i, t in enumerate(features)}
        else:
            outputs = {"output_alias": model.get_default_classifier(features)}
        with tf.Session(graph=graph) as sess:
            sess.run(tf.global_variables_initializer())
            model.restore_weights(sess)
            tf.saved_model.simple_save(sess, saved, inputs={"images": in_images}, outputs=outputs)
    out_names = [t.name for t in outputs.values()]
    del graph
    log(f"converting to ONNX (subprocess, log {onnx_path}.log)")
    # no tf2onnx graph optimisers: 3-4x less memory (VGG-16 peaks near 10 GB with them), and
    # bfpaccel.compile / onnxruntime remove the leftover transposes themselves
    op = AccelOnnxConverter.convert_tf_model(None, saved, "images", out_names, output_path=onnx_path, optimize=False)
    if op.wait_for_completion() != "Succeeded":
        raise RuntimeError(f"converting {name} failed: {op.error}")
    shutil.rmtree(saved, ignore_errors=True)
    return onnx_path
