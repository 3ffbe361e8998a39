"""The numpy preprocessing twin (bfpaccel.preprocess): decoding, the legacy bilinear kernel,
the seed's crop rules and errors. Parity with the TensorFlow op is in test_preprocess_tf.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from bfpaccel.preprocess import IMAGENET_MEAN_RGB, decode_image, preprocess_image, preprocess_jpeg, resize_bilinear_legacy


def _png(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def test_decode_png_grey_rgba_palette_gif():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    assert np.array_equal(decode_image(_png(rgb, "RGB")), rgb)
    grey = decode_image(_png(rgb[..., 0], "L"))
    assert np.array_equal(grey, np.repeat(rgb[..., :1], 3, axis=2))  # replicated, like TF
    rgba = np.dstack([rgb, np.full((2, 3), 7, np.uint8)])
    assert np.array_equal(decode_image(_png(rgba, "RGBA")), rgb)  # alpha dropped, not composited
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "GIF")
    assert decode_image(buf.getvalue()).shape == (2, 3, 3)


def test_decode_jpeg_uses_fast_idct_and_fancy_upsampling():
    img = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    data = simplejpeg.encode_jpeg(img, quality=90, colorsubsampling="420")
    expected = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
    assert np.array_equal(decode_image(data), expected)
    slow = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False)
    assert not np.array_equal(expected, slow)  # the decoder setting matters, so the test can fail


@pytest.mark.parametrize("bad", [b"BM\x00\x00notbmp", b"", b"\xff\xd8\xff\x00broken", b"\x89PNG\r\n\x1a\ncut"])
def test_decode_rejects_bad_bytes(bad):
    with pytest.raises(ValueError):
        decode_image(bad)


def test_decode_rejects_non_bytes():
    with pytest.raises(TypeError):
        decode_image(np.zeros(3))


def test_resize_legacy_by_hand():
    # 2x2 -> 4x4 with src = dst * 0.5: rows/cols 0, .5, 1, 1.5 (upper clamped to 1)
    img = np.array([[0, 10], [20, 30]], np.float32)[..., None]
    out = resize_bilinear_legacy(img, 4, 4)[..., 0]
    assert out[0].tolist() == [0.0, 5.0, 10.0, 10.0]
    assert out[1].tolist() == [10.0, 15.0, 20.0, 20.0]
    assert out[3].tolist() == [20.0, 25.0, 30.0, 30.0]
    # identity size is exact
    x = np.random.default_rng(1).random((5, 7, 3)).astype(np.float32)
    assert np.array_equal(resize_bilinear_legacy(x, 5, 7), x)


def test_aspect_crop_and_seed_quirks():
    img = np.full((300, 400, 3), 200, np.uint8)
    out = preprocess_image(img)
    assert out.shape == (224, 224, 3)
    assert np.allclose(out[0, 0], 200 - IMAGENET_MEAN_RGB)
    # the seed ignores output_width and clamps at 256 in aspect mode
    assert preprocess_image(img, output_height=224, output_width=300).shape == (224, 224, 3)
    assert preprocess_image(img, output_height=300, output_width=300).shape == (256, 256, 3)
    # the fixed behaviour honours both
    fixed = preprocess_image(img, output_height=224, output_width=300, seed_compatible=False)
    assert fixed.shape == (224, 300, 3)
    assert preprocess_image(img, output_height=300, output_width=320, seed_compatible=False).shape == (300, 320, 3)
    # no aspect: straight resize
    assert preprocess_image(img, preserve_aspect_ratio=False, output_height=100, output_width=50).shape == (100, 50, 3)


def test_order_and_scaling():
    img = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb = preprocess_image(img, preserve_aspect_ratio=False, output_height=64, output_width=64)
    bgr = preprocess_image(img, order="BGR", scaling_factor=0.5, preserve_aspect_ratio=False, output_height=64,
                           output_width=64)
    assert np.array_equal(bgr, (rgb[..., ::-1] * np.float32(0.5)).astype(np.float32))
    with pytest.raises(ValueError, match="order"):
        preprocess_image(img, order="RGBA")
    with pytest.raises(ValueError, match="output_height"):
        preprocess_image(img, output_height=0)


def test_batch_of_mixed_sizes_and_formats():
    a = simplejpeg.encode_jpeg(np.zeros((40, 90, 3), np.uint8))
    b = _png(np.zeros((120, 30, 3), np.uint8), "RGB")
    out = preprocess_jpeg([a, b])
    assert out.shape == (2, 224, 224, 3) and out.dtype == np.float32
    assert preprocess_jpeg(a).shape == (1, 224, 224, 3)
    with pytest.raises(ValueError):
        preprocess_jpeg([])
