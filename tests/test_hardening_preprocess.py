"""Image preprocessing against hostile input (issue 9, defect 1): decompression bombs are
refused from the header before anything is decoded, the seed's upscaling resize computes only
its crop window (bit-identical to resize-then-crop, and to the TensorFlow op), and the limits
are configurable.  The bombs run in a subprocess under an address-space cap."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from bfpaccel.preprocess import (DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_RESIZE_PIXELS, IMAGENET_MEAN_RGB,
                                 ImageTooLargeError, decode_image, image_size, preprocess_image,
                                 resize_bilinear_legacy)


# -- bombs: tiny files whose headers declare huge images -------------------------------------------

def png(w: int, h: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def png_declaring(w: int, h: int) -> bytes:
    """A 16x16 PNG whose IHDR says w x h (CRC fixed): Pillow opens it, decoding would fail late."""
    data = bytearray(png(16, 16))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def gif_declaring(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("P", (16, 16)).save(buf, "GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", w, h)
    return bytes(data)


def jpeg_declaring(w: int, h: int) -> bytes:
    """The issue's reproduction: a 16x16 JPEG whose SOF0 says w x h."""
    j = bytearray(simplejpeg.encode_jpeg(np.zeros((16, 16, 3), np.uint8)))
    i = j.find(b"\xff\xc0")
    j[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(j)


#: name -> (bytes, the limit that refuses it by default)
BOMBS = {
    "jpeg-65500x65500": (jpeg_declaring(65500, 65500), "max_pixels"),
    "jpeg-60000x1": (jpeg_declaring(60000, 1), "max_resize_pixels"),
    "png-600x1": (png(600, 1), "max_resize_pixels"),
    "png-1x600-rgb": (png(1, 600, "RGB"), "max_resize_pixels"),
    "png-ihdr-65535x65535": (png_declaring(65535, 65535), "max_pixels"),
    "png-ihdr-9000x9000": (png_declaring(9000, 9000), "max_pixels"),
    "gif-65535x65535": (gif_declaring(65535, 65535), "max_pixels"),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bombs_are_refused_from_the_header(name):
    data, limit = BOMBS[name]
    assert len(data) < 2000
    with pytest.raises(ImageTooLargeError, match=limit) as ei:
        preprocess_image(data)
    assert isinstance(ei.value, ValueError) and ei.value.limit_name == limit
    if limit == "max_pixels":
        with pytest.raises(ImageTooLargeError):
            decode_image(data)
        with pytest.raises(ImageTooLargeError):
            image_size(data, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)


_BOMB_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys, time
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, os.path.dirname(sys.argv[1]))
    import numpy as np
    import test_hardening_preprocess as t
    from bfpaccel.preprocess import ImageTooLargeError, preprocess_image
    from bfpaccel.runtime.predictor import _preprocessor

    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

    cap = status("VmPeak:") + int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    hwm0 = status("VmHWM:")
    out = {}
    nchw = _preprocessor({"kind": "image-nchw"})
    for name, (data, limit) in t.BOMBS.items():
        for how, fn in (("preprocess_image", preprocess_image), ("efficientnet", nchw)):
            t0 = time.perf_counter()
            try:
                fn(data)
                res = "accepted"
            except ImageTooLargeError as e:
                res = e.limit_name
            except MemoryError:
                res = "MemoryError"
            out[f"{name}/{how}"] = [res, time.perf_counter() - t0]
    # with the resize limit off, the thin images still cost no more than their crop window
    for name in ("png-600x1", "png-1x600-rgb"):
        t0 = time.perf_counter()
        y = preprocess_image(t.BOMBS[name][0], max_resize_pixels=None)
        out[f"{name}/unlimited"] = [list(y.shape), time.perf_counter() - t0]
    out["rss_growth"] = status("VmHWM:") - hwm0
    print(json.dumps(out))
""")


def test_bombs_under_a_memory_cap_end_quickly():
    """Each bomb ends in ImageTooLargeError within 0.5 s in a process capped at its start-up
    address space + 512 MiB (the seed's code needed 3.7-12 GB for these)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _BOMB_SCRIPT, os.path.abspath(__file__), str(512 << 20)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for name, (_, limit) in BOMBS.items():
        for how in ("preprocess_image", "efficientnet"):
            res, dt = out[f"{name}/{how}"]
            assert res == limit and dt < 0.5, (name, how, res, dt)
    assert out["png-600x1/unlimited"][0] == [224, 224, 3] and out["png-600x1/unlimited"][1] < 0.5
    assert out["png-1x600-rgb/unlimited"][0] == [224, 224, 3]
    assert out["rss_growth"] < 64 << 20, out["rss_growth"]


def test_limits_are_configurable_and_checked():
    small = png(64, 48, "RGB")
    assert preprocess_image(small).shape == (224, 224, 3)
    with pytest.raises(ImageTooLargeError, match="max_pixels=1000"):
        preprocess_image(small, max_pixels=1000)
    assert decode_image(small, max_pixels=64 * 48).shape == (48, 64, 3)  # the limit itself is allowed
    with pytest.raises(ImageTooLargeError, match="max_resize_pixels=1000"):
        preprocess_image(small, max_resize_pixels=1000)
    # the upscaled size counts, not the file's: 200x1 -> 51200x256 = 13.1 Mi (under the default 16 Mi)
    assert 256 * 51200 <= DEFAULT_MAX_RESIZE_PIXELS < 256 * 153600
    assert preprocess_image(png(200, 1)).shape == (224, 224, 3)
    with pytest.raises(ImageTooLargeError, match="max_resize_pixels"):
        preprocess_image(np.zeros((1, 600, 3), np.uint8))  # decoded arrays go through the resize check too
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="max_pixels"):
            decode_image(small, max_pixels=bad)
        with pytest.raises(ValueError, match="max_resize_pixels"):
            preprocess_image(small, max_resize_pixels=bad)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "P-trns", "RGB", "RGBA", "1", "GIF"])
def test_strip_decode_equals_whole_image_convert(mode, monkeypatch):
    """PNG/GIF are converted to RGB in strips (bounded memory); the pixels are the same."""
    import bfpaccel.preprocess as pp

    rgb = np.random.default_rng(5).integers(0, 256, (37, 23, 3), dtype=np.uint8)
    im = Image.fromarray(rgb).convert(mode.split("-")[0] if mode != "GIF" else "P")
    buf = io.BytesIO()
    if mode == "P-trns":
        im.save(buf, "PNG", transparency=3)
    else:
        im.save(buf, "GIF" if mode == "GIF" else "PNG")
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as ref:
        want = np.asarray(ref.convert("RGB"))
    assert np.array_equal(decode_image(data), want)
    monkeypatch.setattr(pp, "_STRIP_PIXELS", 50)  # 2 rows at a time
    got = decode_image(data)
    assert got.flags.writeable and np.array_equal(got, want)


# -- the crop-window resize is bit-identical to resize-then-crop -----------------------------------

def _seed_resize(img, out_h, out_w):
    """The seed-compatible resize as it was: float32 copies at the full output size."""
    img = np.asarray(img, dtype=np.float32)
    in_h, in_w = img.shape[:2]

    def weights(out_size, in_size):
        scale = np.float32(in_size) / np.float32(out_size)
        src = np.arange(out_size, dtype=np.float32) * scale
        lower_f = np.floor(src)
        lower = np.maximum(lower_f.astype(np.int64), 0)
        upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
        return lower, upper, (src - lower_f).astype(np.float32)

    y0, y1, ly = weights(out_h, in_h)
    x0, x1, lx = weights(out_w, in_w)
    lx = lx[None, :, None]
    tl, tr, bl, br = img[y0][:, x0], img[y0][:, x1], img[y1][:, x0], img[y1][:, x1]
    top = tl + (tr - tl) * lx
    bottom = bl + (br - bl) * lx
    return (top + (bottom - top) * ly[:, None, None]).astype(np.float32)


def _seed_preprocess(rgb, output_height=224, output_width=224, preserve_aspect_ratio=True, seed_compatible=True):
    img = rgb.astype(np.float32)
    h, w = img.shape[:2]
    if preserve_aspect_ratio:
        short = 256 if seed_compatible else max(256, output_height, output_width)
        scale = np.float32(short) / np.float32(w) if h > w else np.float32(short) / np.float32(h)
        new_h, new_w = int(np.float32(h) * scale), int(np.float32(w) * scale)
        img = _seed_resize(img, new_h, new_w)
        ch = min(output_height, 256) if seed_compatible else output_height
        cw = min(ch, 256) if seed_compatible else output_width
        top, left = int((new_h - ch) / 2), int((new_w - cw) / 2)
        img = img[top:top + ch, left:left + cw]
    else:
        img = _seed_resize(img, output_height, output_width)
    return np.ascontiguousarray(img - IMAGENET_MEAN_RGB, dtype=np.float32)


SIZES = [(1, 1), (1, 40), (40, 1), (3, 130), (130, 3), (2, 2), (17, 301), (255, 257), (256, 256), (300, 400),
         (400, 300), (224, 224), (1000, 37), (513, 511)]


@pytest.mark.parametrize("h,w", SIZES)
def test_window_resize_is_bit_identical_to_resize_then_crop(h, w):
    rgb = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    for kw in ({}, {"output_height": 300, "output_width": 300}, {"output_height": 100, "output_width": 40},
               {"output_height": 224, "output_width": 300, "seed_compatible": False},
               {"preserve_aspect_ratio": False, "output_height": 300, "output_width": 50}):
        got = preprocess_image(rgb, max_resize_pixels=None, **kw)
        want = _seed_preprocess(rgb, **kw)
        assert got.shape == want.shape and np.array_equal(got.view(np.uint32), want.view(np.uint32)), (h, w, kw)


def test_resize_window_argument():
    x = np.random.default_rng(3).random((7, 5, 3)).astype(np.float32)
    full = resize_bilinear_legacy(x, 40, 31)
    assert np.array_equal(full, _seed_resize(x, 40, 31))
    assert np.array_equal(resize_bilinear_legacy(x, 40, 31, (3, 4, 20, 9)), full[3:23, 4:13])
    assert np.array_equal(resize_bilinear_legacy(x.astype(np.float64), 40, 31), full)
    with pytest.raises(ValueError, match="window"):
        resize_bilinear_legacy(x, 40, 31, (30, 0, 20, 9))


def test_thin_images_match_tensorflow():
    """The TF op really builds the 51200 x 256 intermediate for a 200 x 1 image; the window
    computes the same 224 x 224 bits."""
    tf = pytest.importorskip("tensorflow.compat.v1", reason="TensorFlow is an optional extra")
    from bfpaccel.models.utils import preprocess_array
    from bfpaccel.preprocess import preprocess_jpeg

    rng = np.random.default_rng(7)
    imgs = []
    for w, h in ((200, 1), (1, 150), (300, 2)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        imgs.append(buf.getvalue())
    imgs.append(simplejpeg.encode_jpeg(rng.integers(0, 256, (8, 500, 3), dtype=np.uint8)))
    graph = tf.Graph()
    with graph.as_default():
        ph = tf.placeholder(tf.string, [None])
        cases = [{}, {"order": "BGR", "scaling_factor": 0.017, "output_height": 300, "output_width": 300}]
        outs = [preprocess_array(ph, **c) for c in cases]
    with tf.Session(graph=graph) as sess:
        for data in imgs:
            for c, o in zip(cases, outs):
                want = sess.run(o, {ph: [data]})
                got = preprocess_jpeg([data], **c)
                assert got.shape == want.shape and np.array_equal(got, want), c


def test_efficientnet_front_with_limits_is_unchanged():
    from bfpaccel.models.efficientnet import preprocess_efficientnet
    from bfpaccel.runtime.predictor import _preprocessor

    fn = _preprocessor({"kind": "image-nchw"})
    for data in (png(64, 48, "RGB"), simplejpeg.encode_jpeg(np.full((300, 200, 3), 90, np.uint8)), png(1, 40)):
        assert np.array_equal(fn(data), preprocess_efficientnet(data))
    with pytest.raises(ImageTooLargeError, match="max_resize_pixels"):
        fn(png(1, 600))
    with pytest.raises(ImageTooLargeError, match="max_pixels=100"):
        _preprocessor({"kind": "image-nchw"}, max_pixels=100)(png(64, 48, "RGB"))
