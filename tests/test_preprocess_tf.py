"""Parity: the numpy twin (bfpaccel.preprocess) equals the TensorFlow graph op
(bfpaccel.models.utils.preprocess_array) bit for bit, on generated JPEG/PNG/GIF images.
TensorFlow is an optional extra (`pip install .[tf]`); CI installs it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

tf = pytest.importorskip("tensorflow.compat.v1", reason="TensorFlow is an optional extra: pip install .[tf]")

from bfpaccel.models.utils import preprocess_array  # noqa: E402
from bfpaccel.preprocess import preprocess_jpeg  # noqa: E402


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w) + rng.integers(0, 60, (h, w))], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encoded():
    out = []
    for i, (h, w, sub) in enumerate([(300, 400, "420"), (400, 300, "422"), (100, 80, "444"), (224, 224, "420"),
                                     (500, 256, "444"), (37, 53, "420")]):
        out.append((f"jpeg{sub}-{h}x{w}", simplejpeg.encode_jpeg(_smooth(h, w, i), quality=85, colorsubsampling=sub)))
    for mode, (h, w) in (("RGB", (150, 210)), ("L", (150, 210)), ("RGBA", (120, 90)), ("P", (90, 130))):
        buf = io.BytesIO()
        Image.fromarray(_smooth(h, w, 9)).convert(mode).save(buf, "PNG")
        out.append((f"png-{mode}", buf.getvalue()))
    buf = io.BytesIO()
    Image.fromarray(_smooth(90, 130, 10)).convert("P").save(buf, "GIF")
    out.append(("gif", buf.getvalue()))
    return out


CASES = [
    {},
    {"order": "BGR", "scaling_factor": 0.017},
    {"preserve_aspect_ratio": False, "output_height": 300, "output_width": 300},
    {"output_height": 224, "output_width": 300},  # seed quirk: width ignored
    {"output_height": 300, "output_width": 300},  # seed quirk: clamped to 256
]


@pytest.fixture(scope="module")
def tf_outputs():
    graph = tf.Graph()
    with graph.as_default():
        ph = tf.placeholder(tf.string, [None])
        outs = [preprocess_array(ph, **c) for c in CASES]
    sess = tf.Session(graph=graph)
    yield sess, ph, outs
    sess.close()


@pytest.mark.parametrize("name,data", _encoded(), ids=[n for n, _ in _encoded()])
def test_numpy_twin_is_bit_exact_with_tf(tf_outputs, name, data):
    sess, ph, outs = tf_outputs
    for case, out in zip(CASES, outs):
        expected = sess.run(out, {ph: [data]})
        got = preprocess_jpeg([data], **case)
        assert got.shape == expected.shape, (name, case)
        assert np.array_equal(got, expected), (name, case, float(np.abs(got - expected).max()))


def test_mixed_batch_and_static_shape(tf_outputs):
    sess, ph, outs = tf_outputs
    imgs = [d for _, d in _encoded()[:3]]
    assert outs[0].shape.as_list() == [None, 224, 224, 3]
    got = sess.run(outs[0], {ph: imgs})
    assert np.array_equal(got, preprocess_jpeg(imgs))


def test_bad_order_raises():
    with pytest.raises(ValueError, match="order"):
        preprocess_array(None, order="RGBX")
