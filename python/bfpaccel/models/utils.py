"""``preprocess_array``: the seed models' JPEG preprocessing as a TensorFlow (TF1 graph) op.

Bit-exact twin of ``bfpaccel.preprocess.preprocess_jpeg`` (numpy, no TensorFlow), which the
server uses; see that module for the steps and the seed quirks kept here on purpose.
"""

from __future__ import annotations

from typing import Any

from ..preprocess import IMAGENET_MEAN_RGB

__all__ = ["preprocess_array", "PREPROCESS_COLLECTION"]

#: Graph collection where ``preprocess_array`` records its arguments (one JSON string per
#: call). Collections are saved in the SavedModel's MetaGraphDef, so the converter
#: (``bfpaccel.convert``) can cut the graph at the float tensor and hand the same
#: preprocessing to the runtime and the server.
PREPROCESS_COLLECTION = "bfpaccel_preprocess"


def preprocess_array(
    in_images: Any,
    order: str = "RGB",
    scaling_factor: float = 1.0,
    output_height: int = 224,
    output_width: int = 224,
    preserve_aspect_ratio: bool = True,
) -> Any:
    """Map a 1-D ``tf.string`` tensor of encoded images (JPEG/PNG/GIF, sizes may differ) to
    float32 ``[N, h, w, 3]``, as the seed's ``azureml.accel.models.utils.preprocess_array``.
    Needs graph mode (``tf.compat.v1.disable_eager_execution()`` under TF2).

    In aspect mode (the default) the output is ``min(output_height, 256)`` square: the seed
    ignores ``output_width`` there (kept for parity; ``bfpaccel.preprocess`` documents it).

    Example:
        >>> import tensorflow.compat.v1 as tf  # doctest: +SKIP
        >>> tf.disable_eager_execution()  # doctest: +SKIP
        >>> x = tf.placeholder(tf.string, [None]); y = preprocess_array(x)  # doctest: +SKIP
    """
    if order not in ("RGB", "BGR"):
        raise ValueError(f"order must be 'RGB' or 'BGR', got {order!r}")
    import tensorflow.compat.v1 as tf

    if preserve_aspect_ratio:
        crop_h = min(int(output_height), 256)
        crop_w = min(crop_h, 256)  # seed quirk: output_width is ignored in aspect mode
    else:
        crop_h, crop_w = int(output_height), int(output_width)
    mean = tf.constant(IMAGENET_MEAN_RGB, dtype=tf.float32)

    def legacy_resize(image, size):  # TF1 resize_bilinear: align_corners=False, half_pixel_centers=False
        return tf.raw_ops.ResizeBilinear(images=image[None], size=size, align_corners=False,
                                         half_pixel_centers=False)[0]

    def one(data):
        image = tf.cast(tf.image.decode_png(data, channels=3), tf.float32)
        if preserve_aspect_ratio:
            shape = tf.shape(image)
            h = tf.cast(shape[0], tf.float32)
            w = tf.cast(shape[1], tf.float32)
            scale = tf.cond(h > w, lambda: 256.0 / w, lambda: 256.0 / h)
            new_h = tf.cast(h * scale, tf.int32)
            new_w = tf.cast(w * scale, tf.int32)
            image = legacy_resize(image, tf.stack([new_h, new_w]))
            top = tf.cast((new_h - crop_h) / 2, tf.int32)
            left = tf.cast((new_w - crop_w) / 2, tf.int32)
            image = tf.slice(image, tf.stack([top, left, 0]), [crop_h, crop_w, 3])
        else:
            image = legacy_resize(image, tf.constant([crop_h, crop_w], tf.int32))
        image = image - mean
        if order == "BGR":
            image = tf.reverse(image, axis=[-1])
        return image * tf.constant(scaling_factor, tf.float32)

    out = tf.map_fn(one, in_images, fn_output_signature=tf.float32, name="map_normalize_jpeg")
    out.set_shape([None, crop_h, crop_w, 3])
    _record(tf, in_images, out, order, scaling_factor, output_height, output_width, preserve_aspect_ratio)
    return out


def _record(tf: Any, in_images: Any, out: Any, order: str, scaling_factor: float, output_height: int,
            output_width: int, preserve_aspect_ratio: bool) -> None:
    """Add the call's arguments to the graph collection ``PREPROCESS_COLLECTION`` (adds no node)."""
    import json

    if tf.executing_eagerly():
        return
    record = {
        "kind": "image",
        "order": order,
        "scaling_factor": float(scaling_factor),
        "output_height": int(output_height),
        "output_width": int(output_width),
        "preserve_aspect_ratio": bool(preserve_aspect_ratio),
        "string_input": getattr(in_images, "name", None),
        "float_output": out.name,
    }
    tf.add_to_collection(PREPROCESS_COLLECTION, json.dumps(record, sort_keys=True))
