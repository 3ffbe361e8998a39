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

Limits (untrusted input; both checked from the image *header*, before anything is decoded):

- ``max_pixels`` (default :data:`DEFAULT_MAX_IMAGE_PIXELS` = 8192 x 8192 = 64 Mi pixels, i.e.
  192 MiB of decoded RGB): the declared width x height of an encoded image.
- ``max_resize_pixels`` (default :data:`DEFAULT_MAX_RESIZE_PIXELS` = 16 Mi pixels): the full
  size the seed's resize would produce before its centre crop (in aspect mode the shorter side
  goes to 256, so a 600 x 1 image becomes 153600 x 256 = 39 Mi pixels). The default admits
  aspect ratios up to 256:1.

Both raise :class:`ImageTooLargeError` (a ``ValueError``) naming the limit; ``None`` disables a
limit.  The resize itself never materialises the upscaled image: only the output (crop) window
is computed, gathered straight from the uint8 pixels, bit-identical to computing the whole
upscaled image and cropping it.  Peak memory per image is therefore about the decoded image
(3 bytes/pixel for JPEG; 4-7 bytes/pixel for PNG/GIF: Pillow's decode plus the RGB result) plus
a few float32 arrays of the output size.
"""

from __future__ import annotations

import io
import struct
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["decode_image", "image_size", "resize_bilinear_legacy", "preprocess_image", "preprocess_jpeg",
           "IMAGENET_MEAN_RGB", "ImageTooLargeError", "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_RESIZE_PIXELS"]

#: Channel means subtracted by the seed models, RGB order.
IMAGENET_MEAN_RGB = np.array([123.68, 116.779, 103.939], dtype=np.float32)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_GIF_MAGIC = (b"GIF87a", b"GIF89a")


#: Default limit on an encoded image's declared width x height (8192 x 8192: 192 MiB as RGB).
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
#: Default limit on the full (pre-crop) size of the seed's resize (aspect ratios up to 256:1).
DEFAULT_MAX_RESIZE_PIXELS = 16 * 1024 * 1024


#: PNG/GIF pixels converted to RGB at a time
_STRIP_PIXELS = 1 << 22


class ImageTooLargeError(ValueError):
    """An image over a size limit (``max_pixels`` or ``max_resize_pixels``); raised before the
    pixels are decoded or the resize is computed.

    Attributes: ``limit_name`` (``"max_pixels"`` / ``"max_resize_pixels"``), ``limit``,
    ``pixels`` (the count that went over), ``size`` (``(width, height)`` of the image).
    """

    def __init__(self, message: str, limit_name: str, limit: int, pixels: int, size: Tuple[int, int]):
        super().__init__(message)
        self.limit_name = limit_name
        self.limit = limit
        self.pixels = pixels
        self.size = size


def _check_limit(name: str, limit: Optional[int]) -> Optional[int]:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"{name} must be a positive int or None, got {limit!r}")
    return int(limit)


def _check_pixels(h: int, w: int, max_pixels: Optional[int]) -> None:
    if max_pixels is not None and h * w > max_pixels:
        raise ImageTooLargeError(f"image is {w}x{h} = {h * w} pixels, over the limit max_pixels={max_pixels} "
                                 "(checked from the header; nothing was decoded)", "max_pixels", max_pixels,
                                 h * w, (w, h))


def _open(data: Union[bytes, bytearray, memoryview], max_pixels: Optional[int]
          ) -> Tuple[int, int, Callable[[], np.ndarray]]:
    """Reads only the header: ``(height, width, decode)``; the declared size is checked against
    ``max_pixels`` here, and ``decode()`` returns uint8 ``[H, W, 3]`` (maybe read-only)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected encoded image bytes, got {type(data).__name__}")
    max_pixels = _check_limit("max_pixels", max_pixels)
    data = bytes(data)
    if data.startswith(_JPEG_MAGIC):
        import simplejpeg

        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as exc:
            raise ValueError(f"cannot decode JPEG: {exc}") from None
        h, w = int(h), int(w)
        _check_pixels(h, w, max_pixels)

        def decode_jpeg() -> np.ndarray:
            try:
                return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
            except ValueError as exc:
                raise ValueError(f"cannot decode JPEG: {exc}") from None

        return h, w, decode_jpeg
    if data.startswith(_PNG_MAGIC) or data[:6] in _GIF_MAGIC:
        from PIL import Image

        fmt = "PNG" if data.startswith(_PNG_MAGIC) else "GIF"
        # the declared size straight from the header (PNG's IHDR, GIF's logical screen), so that
        # the limit is reported as ours rather than as Pillow's decompression-bomb error
        if fmt == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            _check_pixels(h, w, max_pixels)
        elif fmt == "GIF" and len(data) >= 10:
            w, h = struct.unpack("<HH", data[6:10])
            _check_pixels(h, w, max_pixels)
        try:
            im = Image.open(io.BytesIO(data), formats=[fmt])  # the header only
            im.seek(0)  # GIF: the first frame, as TensorFlow (its size may widen the canvas)
        except Image.DecompressionBombError as exc:  # only reachable with max_pixels above Pillow's own limit
            raise ImageTooLargeError(f"image is over Pillow's decompression-bomb limit ({exc}); max_pixels="
                                     f"{max_pixels}", "max_pixels", max_pixels or 0, 0, (0, 0)) from None
        except (MemoryError, ImageTooLargeError):
            raise
        except Exception as exc:  # Pillow raises OSError, SyntaxError, EOFError, ... on bad bytes
            raise ValueError(f"cannot decode image: {exc}") from None
        w, h = (int(v) for v in im.size)
        try:
            _check_pixels(h, w, max_pixels)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                raise ValueError("16-bit PNGs are not supported (TensorFlow's 8-bit decode would rescale them)")
        except BaseException:
            im.close()
            raise

        def decode_pillow() -> np.ndarray:
            # converted to RGB in strips of ~4 Mi pixels straight into the output: the peak is the
            # decoded image (1-4 bytes/pixel in Pillow) + the 3 bytes/pixel result, not the ~14
            # bytes/pixel of a whole-image convert + tobytes (the conversions are per pixel, so
            # the result is the same)
            try:
                with im:
                    im.load()
                    w, h = im.size
                    out = np.empty((h, w, 3), np.uint8)
                    step = max(1, _STRIP_PIXELS // max(w, 1))
                    for y in range(0, h, step):
                        part = im.crop((0, y, w, min(h, y + step))) if (step < h or im.mode != "RGB") else im
                        if part.mode != "RGB":
                            part = part.convert("RGB")
                        out[y: y + step] = np.asarray(part, dtype=np.uint8)
                        del part
                    return out
            except MemoryError:
                raise
            except Exception as exc:
                raise ValueError(f"cannot decode image: {exc}") from None

        return h, w, decode_pillow
    raise ValueError("unsupported image format: expected JPEG, PNG or GIF bytes (as TensorFlow's decode_png)")


def image_size(data: bytes, max_pixels: Optional[int] = None) -> Tuple[int, int]:
    """``(height, width)`` of encoded JPEG/PNG/GIF bytes, from the header alone (nothing is
    decoded); raises :class:`ImageTooLargeError` over ``max_pixels`` (``None``: no check).

    Example:
        >>> from PIL import Image; import io
        >>> buf = io.BytesIO(); Image.new("L", (3, 2), 7).save(buf, "PNG")
        >>> image_size(buf.getvalue())
        (2, 3)
    """
    h, w, _ = _open(data, max_pixels)
    return h, w


def decode_image(data: bytes, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded JPEG/PNG/GIF bytes -> uint8 ``[H, W, 3]`` RGB, as ``tf.image.decode_png(channels=3)``.

    The declared size is read from the header first: over ``max_pixels`` (``None``: no limit)
    raises :class:`ImageTooLargeError` without decoding.

    Example:
        >>> from PIL import Image; import io
        >>> buf = io.BytesIO(); Image.new("L", (3, 2), 7).save(buf, "PNG")
        >>> decode_image(buf.getvalue()).shape
        (2, 3, 3)
    """
    arr = _open(data, max_pixels)[2]()
    return arr if arr.flags.writeable else arr.copy()  # simplejpeg's and ours are writable already


def _resize_geometry(h: int, w: int, output_height: int, output_width: int, preserve_aspect_ratio: bool,
                     seed_compatible: bool) -> Tuple[int, int, range, range]:
    """The seed's resize of an ``h x w`` image: ``(new_h, new_w, rows, cols)`` -- the full resize
    size and the rows/columns of it that the crop keeps (Python slice semantics)."""
    if preserve_aspect_ratio:
        short = 256 if seed_compatible else max(256, int(output_height), int(output_width))
        scale = np.float32(short) / np.float32(w) if h > w else np.float32(short) / np.float32(h)
        new_h, new_w = int(np.float32(h) * scale), int(np.float32(w) * scale)  # trunc, as tf.cast
        if seed_compatible:
            ch = min(int(output_height), 256)
            cw = min(ch, 256)  # the seed ignores output_width here
        else:
            ch, cw = int(output_height), int(output_width)
        top, left = int((new_h - ch) / 2), int((new_w - cw) / 2)
        return new_h, new_w, range(new_h)[top: top + ch], range(new_w)[left: left + cw]
    oh, ow = int(output_height), int(output_width)
    return oh, ow, range(oh), range(ow)


def _check_resize(h: int, w: int, new_h: int, new_w: int, max_resize_pixels: Optional[int]) -> None:
    if max_resize_pixels is not None and new_h * new_w > max_resize_pixels:
        raise ImageTooLargeError(
            f"image of {w}x{h} pixels would be resized to {new_w}x{new_h} = {new_h * new_w} pixels before the "
            f"crop, over the limit max_resize_pixels={max_resize_pixels} (aspect ratio too extreme)",
            "max_resize_pixels", max_resize_pixels, new_h * new_w, (w, h))


def resize_bilinear_legacy(img: np.ndarray, out_h: int, out_w: int,
                           window: Optional[Tuple[int, int, int, int]] = None) -> np.ndarray:
    """TF1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False), float32:
    source = dst * in/out, lower = floor, upper = min(ceil, in - 1), float32 lerps, no antialias.

    ``window=(top, left, height, width)`` computes only that part of the ``out_h x out_w``
    result (bit-identical to slicing the full result); the pixels are gathered from ``img`` in
    its own dtype and converted to float32 at the window's size, so an upscale never builds
    float32 arrays of the full output."""
    img = np.asarray(img)
    in_h, in_w = img.shape[:2]
    top, left, height, width = window if window is not None else (0, 0, out_h, out_w)
    if not (0 <= top and 0 <= left and height >= 0 and width >= 0 and top + height <= out_h
            and left + width <= out_w):
        raise ValueError(f"window {window} is not inside the {out_h}x{out_w} output")

    def weights(out_size: int, in_size: int, start: int, count: int):
        scale = np.float32(in_size) / np.float32(out_size)
        src = np.arange(start, start + count, dtype=np.int64).astype(np.float32) * scale
        lower_f = np.floor(src)
        lower = np.maximum(lower_f.astype(np.int64), 0)
        upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
        return lower, upper, (src - lower_f).astype(np.float32)

    y0, y1, ly = weights(out_h, in_h, top, height)
    x0, x1, lx = weights(out_w, in_w, left, width)
    lx = lx[None, :, None]

    def at(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return img[ys[:, None], xs[None, :]].astype(np.float32)

    top_left, top_right = at(y0, x0), at(y0, x1)
    top_ = top_left + (top_right - top_left) * lx
    del top_left, top_right
    bottom_left, bottom_right = at(y1, x0), at(y1, x1)
    bottom = bottom_left + (bottom_right - bottom_left) * lx
    del bottom_left, bottom_right
    return (top_ + (bottom - top_) * ly[:, None, None]).astype(np.float32)


def preprocess_image(
    image: Union[bytes, np.ndarray],
    order: str = "RGB",
    scaling_factor: float = 1.0,
    output_height: int = 224,
    output_width: int = 224,
    preserve_aspect_ratio: bool = True,
    seed_compatible: bool = True,
    *,
    max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    max_resize_pixels: Optional[int] = DEFAULT_MAX_RESIZE_PIXELS,
) -> np.ndarray:
    """One image (encoded bytes, or uint8/float ``[H, W, 3]`` RGB) -> float32 ``[h, w, 3]``,
    exactly as the seed's TF graph preprocesses it (see the module docstring for the quirks).

    ``max_pixels`` bounds an encoded image's declared size and ``max_resize_pixels`` the full
    size of the resize before the crop; both are checked from the header before decoding and
    raise :class:`ImageTooLargeError` (``None``: no limit).

    Example:
        >>> preprocess_image(np.full((300, 400, 3), 128, np.uint8)).shape
        (224, 224, 3)
    """
    if order not in ("RGB", "BGR"):
        raise ValueError(f"order must be 'RGB' or 'BGR', got {order!r}")
    for name, v in (("output_height", output_height), ("output_width", output_width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    max_resize_pixels = _check_limit("max_resize_pixels", max_resize_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        h, w, decode = _open(image, max_pixels)
        if min(h, w) >= 1:  # a zero size is the decoder's error to report
            new_h, new_w, _, _ = _resize_geometry(h, w, output_height, output_width, preserve_aspect_ratio,
                                                  seed_compatible)
            _check_resize(h, w, new_h, new_w, max_resize_pixels)
        rgb = decode()
    else:
        rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise ValueError(f"expected an [H, W, 3] RGB image, got shape {rgb.shape}")
    h, w = (int(v) for v in rgb.shape[:2])
    new_h, new_w, rows, cols = _resize_geometry(h, w, output_height, output_width, preserve_aspect_ratio,
                                                seed_compatible)
    _check_resize(h, w, new_h, new_w, max_resize_pixels)
    # only the kept window of the resize is computed (bit-identical to resize-then-crop)
    img = resize_bilinear_legacy(rgb, new_h, new_w, (rows.start, cols.start, len(rows), len(cols)))
    del rgb
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
    *,
    max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    max_resize_pixels: Optional[int] = DEFAULT_MAX_RESIZE_PIXELS,
) -> np.ndarray:
    """A batch of encoded images (JPEG, PNG or GIF bytes; sizes may differ) -> float32
    ``[N, h, w, 3]``, the numpy twin of ``bfpaccel.models.utils.preprocess_array``
    (limits as :func:`preprocess_image`).

    Example:
        >>> import simplejpeg
        >>> jpg = simplejpeg.encode_jpeg(np.zeros((64, 80, 3), np.uint8))
        >>> preprocess_jpeg([jpg, jpg]).shape
        (2, 224, 224, 3)
    """
    if isinstance(images, (bytes, bytearray, memoryview)):
        images = [bytes(images)]
    out = [
        preprocess_image(b, order, scaling_factor, output_height, output_width, preserve_aspect_ratio, seed_compatible,
                         max_pixels=max_pixels, max_resize_pixels=max_resize_pixels)
        for b in images
    ]
    if not out:
        raise ValueError("no images given")
    return np.stack(out)
