"""Image preprocessing of the seed models, in numpy: bit-exact with the TensorFlow graph op
``bfpaccel.models.utils.preprocess_array`` (the seed's ``azureml.accel.models.utils``), so the
TF-free serving path feeds a model exactly what the TF graph would.

Steps per image (SEED_API §2.7):

1. Decode to 8-bit RGB the way ``tf.image.decode_png(bytes, channels=3)`` does: it also
   decodes JPEG and GIF (first frame); grey is replicated to three channels, alpha dropped.
   JPEG goes through libjpeg-turbo with the *fast integer IDCT* (JDCT_IFAST) and *fancy
   upsampling*: ``simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True,
   fastupsample=False)`` reproduces it bit for bit, where Pillow/OpenCV (ISLOW IDCT) differ by
   up to 6-7 levels. PNG and GIF are decoded with Pillow.
2. float32; with ``preserve_aspect_ratio`` (default) scale the shorter side to 256 with TF1's
   legacy bilinear kernel and centre-crop; otherwise resize straight to the output size.
3. Subtract the ImageNet channel means (R 123.68, G 116.779, B 103.939), optionally reverse to
   BGR, multiply by ``scaling_factor``.

Seed quirks, reproduced by default (``seed_compatible=True``) because a model converted with
the seed graph was fed exactly this: in aspect mode the crop is ``min(output_height, 256)``
square -- ``output_width`` is ignored and sizes above 256 are clamped. With
``seed_compatible=False`` the crop is ``output_height x output_width`` taken from an image
whose shorter side was scaled to ``max(256, output_height, output_width)``.
"""

from __future__ import annotations

import io
from typing import Sequence, Union

import numpy as np

__all__ = ["decode_image", "resize_bilinear_legacy", "preprocess_image", "preprocess_jpeg", "IMAGENET_MEAN_RGB"]

#: Channel means subtracted by the seed models, RGB order.
IMAGENET_MEAN_RGB = np.array([123.68, 116.779, 103.939], dtype=np.float32)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_GIF_MAGIC = (b"GIF87a", b"GIF89a")


def decode_image(data: bytes) -> np.ndarray:
    """Encoded JPEG/PNG/GIF bytes -> uint8 ``[H, W, 3]`` RGB, as ``tf.image.decode_png(channels=3)``.

    Example:
        >>> from PIL import Image; import io
        >>> buf = io.BytesIO(); Image.new("L", (3, 2), 7).save(buf, "PNG")
        >>> decode_image(buf.getvalue()).shape
        (2, 3, 3)
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected encoded image bytes, got {type(data).__name__}")
    data = bytes(data)
    if data.startswith(_JPEG_MAGIC):
        import simplejpeg

        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
        except ValueError as exc:
            raise ValueError(f"cannot decode JPEG: {exc}") from None
    if data.startswith(_PNG_MAGIC) or data[:6] in _GIF_MAGIC:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im.seek(0)  # GIF: the first frame, as TensorFlow
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    raise ValueError("16-bit PNGs are not supported (TensorFlow's 8-bit decode would rescale them)")
                return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        except (OSError, SyntaxError) as exc:
            raise ValueError(f"cannot decode image: {exc}") from None
    raise ValueError("unsupported image format: expected JPEG, PNG or GIF bytes (as TensorFlow's decode_png)")


def resize_bilinear_legacy(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False), float32:
    source = dst * in/out, lower = floor, upper = min(ceil, in - 1), float32 lerps, no antialias."""
    img = np.asarray(img, dtype=np.float32)
    in_h, in_w = img.shape[:2]

    def weights(out_size: int, in_size: int):
        scale = np.float32(in_size) / np.float32(out_size)
        src = np.arange(out_size, dtype=np.float32) * scale
        lower_f = np.floor(src)
        lower = np.maximum(lower_f.astype(np.int64), 0)
        upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
        return lower, upper, (src - lower_f).astype(np.float32)

    y0, y1, ly = weights(out_h, in_h)
    x0, x1, lx = weights(out_w, in_w)
    lx = lx[None, :, None]
    top_left, top_right = img[y0][:, x0], img[y0][:, x1]
    bottom_left, bottom_right = img[y1][:, x0], img[y1][:, x1]
    top = top_left + (top_right - top_left) * lx
    bottom = bottom_left + (bottom_right - bottom_left) * lx
    return (top + (bottom - top) * ly[:, None, None]).astype(np.float32)


def preprocess_image(
    image: Union[bytes, np.ndarray],
    order: str = "RGB",
    scaling_factor: float = 1.0,
    output_height: int = 224,
    output_width: int = 224,
    preserve_aspect_ratio: bool = True,
    seed_compatible: bool = True,
) -> np.ndarray:
    """One image (encoded bytes, or uint8/float ``[H, W, 3]`` RGB) -> float32 ``[h, w, 3]``,
    exactly as the seed's TF graph preprocesses it (see the module docstring for the quirks).

    Example:
        >>> preprocess_image(np.full((300, 400, 3), 128, np.uint8)).shape
        (224, 224, 3)
    """
    if order not in ("RGB", "BGR"):
        raise ValueError(f"order must be 'RGB' or 'BGR', got {order!r}")
    for name, v in (("output_height", output_height), ("output_width", output_width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    rgb = decode_image(image) if isinstance(image, (bytes, bytearray, memoryview)) else np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise ValueError(f"expected an [H, W, 3] RGB image, got shape {rgb.shape}")
    img = rgb.astype(np.float32)
    h, w = img.shape[:2]
    if preserve_aspect_ratio:
        short = 256 if seed_compatible else max(256, int(output_height), int(output_width))
        scale = np.float32(short) / np.float32(w) if h > w else np.float32(short) / np.float32(h)
        new_h, new_w = int(np.float32(h) * scale), int(np.float32(w) * scale)  # trunc, as tf.cast
        img = resize_bilinear_legacy(img, new_h, new_w)
        if seed_compatible:
            ch = min(int(output_height), 256)
            cw = min(ch, 256)  # the seed ignores output_width here
        else:
            ch, cw = int(output_height), int(output_width)
        top, left = int((new_h - ch) / 2), int((new_w - cw) / 2)
        img = img[top : top + ch, left : left + cw]
    else:
        img = resize_bilinear_legacy(img, int(output_height), int(output_width))
    img = img - IMAGENET_MEAN_RGB
    if order == "BGR":
        img = img[..., ::-1]
    return np.ascontiguousarray(img * np.float32(scaling_factor), dtype=np.float32)


def preprocess_jpeg(
    images: Union[bytes, Sequence[bytes]],
    order: str = "RGB",
    scaling_factor: float = 1.0,
    output_height: int = 224,
    output_width: int = 224,
    preserve_aspect_ratio: bool = True,
    seed_compatible: bool = True,
) -> np.ndarray:
    """A batch of encoded images (JPEG, PNG or GIF bytes; sizes may differ) -> float32
    ``[N, h, w, 3]``, the numpy twin of ``bfpaccel.models.utils.preprocess_array``.

    Example:
        >>> import simplejpeg
        >>> jpg = simplejpeg.encode_jpeg(np.zeros((64, 80, 3), np.uint8))
        >>> preprocess_jpeg([jpg, jpg]).shape
        (2, 224, 224, 3)
    """
    if isinstance(images, (bytes, bytearray, memoryview)):
        images = [bytes(images)]
    out = [
        preprocess_image(b, order, scaling_factor, output_height, output_width, preserve_aspect_ratio, seed_compatible)
        for b in images
    ]
    if not out:
        raise ValueError("no images given")
    return np.stack(out)
