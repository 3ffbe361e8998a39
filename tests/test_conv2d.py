"""bfpaccel.conv2d (C++ convolution) against reference.conv2d, bit for bit.

Blocks run along input channels at each kernel tap (tap-major K order, channels inner) and
never cross a group (docs/numerics.md#blocking-axes).  Spatial sizes stay small: the reference is slow.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

import numpy as np
import pytest

import bfpaccel
from bfpaccel import reference as ref
from conftest import assert_bits_equal

f32 = np.float32
SEED = 31337

FORMATS = ["msfp16", "msfp12", "mxint8", "mxfp4_e2m1", "msfp8", "mxfp8_e4m3"]

# name: (x shape NCHW, w shape OIHW, conv kwargs)
CASES: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Dict[str, Any]]] = {
    "1x1": ((1, 16, 5, 5), (8, 16, 1, 1), {}),
    "3x3_pad1": ((1, 16, 6, 6), (4, 16, 3, 3), {"padding": 1}),
    "7x7_stride2_pad3_C3": ((1, 3, 12, 12), (4, 3, 7, 7), {"stride": 2, "padding": 3}),
    "3x3_dilation2": ((1, 8, 9, 9), (4, 8, 3, 3), {"dilation": 2, "padding": 2}),
    "dilation_pair": ((1, 8, 9, 9), (3, 8, 3, 2), {"dilation": (2, 3)}),
    "groups2": ((1, 8, 6, 6), (6, 4, 3, 3), {"groups": 2, "padding": 1}),
    "groups4_Cg10": ((1, 40, 5, 5), (8, 10, 3, 3), {"groups": 4, "padding": 1}),
    "groups2_Cg20": ((1, 40, 5, 5), (4, 20, 3, 3), {"groups": 2}),
    "depthwise": ((1, 12, 6, 6), (12, 1, 3, 3), {"groups": 12, "padding": 1}),
    "depthwise_multiplier2": ((1, 6, 5, 5), (12, 1, 3, 3), {"groups": 6, "stride": 2}),
    "padding_pair": ((1, 16, 6, 7), (4, 16, 3, 3), {"padding": (1, 2)}),
    "padding_asymmetric": ((1, 16, 6, 7), (4, 16, 3, 2), {"padding": (0, 1, 2, 3)}),
    "stride_pair": ((1, 16, 9, 8), (4, 16, 3, 3), {"stride": (2, 1), "padding": 1}),
    "batch2_bias": ((2, 16, 6, 6), (5, 16, 3, 3), {"padding": 1, "bias": True}),
    "C20": ((1, 20, 6, 6), (4, 20, 3, 3), {"padding": 1}),
    "C1": ((1, 1, 7, 7), (3, 1, 3, 3), {}),
    "C40": ((1, 40, 5, 5), (3, 40, 3, 3), {"padding": 1}),
    "C130": ((1, 130, 4, 4), (2, 130, 3, 3), {"padding": 1}),
    "output_1x1": ((1, 16, 3, 3), (2, 16, 3, 3), {}),
    "mixed_everything": ((2, 12, 11, 10), (6, 4, 3, 2), {"groups": 3, "stride": (2, 3), "padding": (1, 0, 2, 1),
                                                         "dilation": (1, 2), "bias": True}),
}

SPECIAL_DATA = ["nan_in_w", "nan_in_x", "inf_in_x", "zeros", "dynamic_range"]


@functools.lru_cache(maxsize=None)
def case_data(name: str, data: str = "normal"):
    xs, ws, kw = CASES[name]
    rng = np.random.default_rng(100 * list(CASES).index(name) + (["normal"] + SPECIAL_DATA).index(data))
    x = rng.normal(size=xs).astype(f32)
    w = rng.normal(size=ws).astype(f32)
    kwargs = dict(kw)
    if kwargs.pop("bias", False):
        kwargs["bias"] = rng.normal(size=ws[0]).astype(f32)
    if data == "nan_in_w":
        w[min(1, ws[0] - 1), 0, ws[2] // 2, ws[3] // 2] = np.nan
    elif data == "nan_in_x":
        x[0, xs[1] - 1, xs[2] // 2, xs[3] // 2] = np.nan  # one pixel, last channel block
    elif data == "inf_in_x":
        x[0, 0, 0, 0] = np.inf
        x[-1, xs[1] // 2, -1, -1] = -np.inf
    elif data == "zeros":
        x[:] = 0
        w[:] = 0
    elif data == "dynamic_range":
        x *= (10.0 ** rng.uniform(-20, 20, size=xs)).astype(f32)
        w *= (10.0 ** rng.uniform(-15, 15, size=ws)).astype(f32)
    for arr in (x, w):
        arr.setflags(write=False)
    return x, w, kwargs


@functools.lru_cache(maxsize=None)
def reference_conv(name: str, fmt: str, data: str = "normal", rounding: str = "nearest_even") -> np.ndarray:
    x, w, kwargs = case_data(name, data)
    return ref.conv2d(x, w, bfpaccel.get_format(fmt, rounding=rounding), seed=SEED, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_conv2d_matches_reference(kernel, fmt, case):
    x, w, kwargs = case_data(case)
    out = bfpaccel.conv2d(x, w, fmt, seed=SEED, **kwargs)
    assert out.dtype == np.float32
    assert_bits_equal(out, reference_conv(case, fmt), f"conv2d {case} {fmt}")


@pytest.mark.parametrize("data", SPECIAL_DATA)
@pytest.mark.parametrize("case", ["3x3_pad1", "groups4_Cg10", "depthwise", "batch2_bias", "C40"])
@pytest.mark.parametrize("fmt", ["msfp16", "mxfp4_e2m1", "msfp8", "mxfp8_e4m3"])
def test_conv2d_special_data(kernel, fmt, case, data):
    x, w, kwargs = case_data(case, data)
    out = bfpaccel.conv2d(x, w, fmt, seed=SEED, **kwargs)
    expected = reference_conv(case, fmt, data)
    assert_bits_equal(out, expected, f"conv2d {case} {fmt} {data}")
    if data.startswith(("nan", "inf")):
        assert np.isnan(expected).any()  # the case does exercise poisoned blocks
    if data == "zeros":
        bias = kwargs.get("bias")
        assert_bits_equal(out, np.broadcast_to(np.zeros(1, f32) if bias is None else bias.reshape(1, -1, 1, 1),
                                               out.shape).astype(f32))


@pytest.mark.parametrize("case", ["3x3_pad1", "7x7_stride2_pad3_C3", "groups4_Cg10", "mixed_everything"])
@pytest.mark.parametrize("rounding", ["nearest_away", "toward_zero", "stochastic"])
def test_conv2d_other_roundings(kernel, rounding, case):
    x, w, kwargs = case_data(case)
    f = bfpaccel.get_format("msfp12", rounding=rounding)
    out = bfpaccel.conv2d(x, w, f, seed=SEED, **kwargs)
    assert_bits_equal(out, reference_conv(case, "msfp12", "normal", rounding))


@pytest.mark.parametrize("case", ["1x1", "3x3_pad1", "7x7_stride2_pad3_C3", "groups2", "depthwise", "C130",
                                  "mixed_everything"])
@pytest.mark.parametrize("fmt", ["msfp16", "mxfp4_e2m1", "msfp8", "mxfp8_e4m3"])
def test_prequantized_weight(kernel, fmt, case):
    x, w, kwargs = case_data(case)
    groups = kwargs.get("groups", 1)
    cw = bfpaccel.quantize_conv_weight(w, fmt, groups, seed=SEED)
    assert isinstance(cw, bfpaccel.ConvWeight)
    assert cw.shape == w.shape and cw.groups == groups and cw.format == bfpaccel.get_format(fmt)
    assert_bits_equal(cw.dequantize(), ref.fake_quantize(w, fmt, axis=1, seed=SEED))
    expected = reference_conv(case, fmt)
    assert_bits_equal(bfpaccel.conv2d(x, cw, fmt, seed=SEED, **kwargs), expected)
    assert_bits_equal(bfpaccel.conv2d(x, cw, fmt, seed=SEED, **kwargs), expected)  # packed form cached
    assert_bits_equal(bfpaccel.conv2d(x, cw, seed=SEED, **kwargs), expected)  # fmt from the weight


@pytest.mark.parametrize("fmt,fmt_w", [("mxint8", "mxfp4_e2m1"), ("msfp16", "msfp12"), ("mxfp8_e4m3", "mxfp6_e2m3")])
def test_conv2d_weight_format(kernel, fmt, fmt_w):
    x, w, kwargs = case_data("groups2")
    expected = ref.conv2d(x, w, fmt, fmt_w=fmt_w, seed=SEED, **kwargs)
    assert_bits_equal(bfpaccel.conv2d(x, w, fmt, fmt_w=fmt_w, seed=SEED, **kwargs), expected)
    cw = bfpaccel.quantize_conv_weight(w, fmt_w, kwargs["groups"], seed=SEED)
    assert_bits_equal(bfpaccel.conv2d(x, cw, fmt, seed=SEED, **kwargs), expected)


def test_conv2d_threads(kernel, restore_threads):
    x, w, kwargs = case_data("batch2_bias")
    expected = reference_conv("batch2_bias", "mxint8")
    for n in (1, 2, 3):
        bfpaccel.set_num_threads(n)
        assert_bits_equal(bfpaccel.conv2d(x, w, "mxint8", seed=SEED, **kwargs), expected, f"{n} threads")


def test_conv2d_hand_computed(kernel):
    # all ones, 16 channels, 3x3, padding 1: the centre sees 9 taps * 16 channels = 144,
    # a corner 4 taps * 16 = 64, an edge 6 * 16 = 96; plus bias 0.5
    x = np.ones((1, 16, 5, 5), f32)
    w = np.ones((4, 16, 3, 3), f32)
    y = bfpaccel.conv2d(x, w, "msfp16", bias=np.full(4, 0.5, f32), padding=1)
    assert y.shape == (1, 4, 5, 5)
    assert y[0, 0, 2, 2] == 144.5 and y[0, 3, 0, 0] == 64.5 and y[0, 1, 0, 2] == 96.5


def test_conv2d_int_and_float64_inputs(kernel):
    x, w, kwargs = case_data("3x3_pad1")
    xi = np.round(x * 10).astype(np.int32)
    w64 = w.astype(np.float64) * 1.1
    expected = ref.conv2d(xi.astype(f32), w64.astype(f32), "msfp16", **kwargs)
    assert_bits_equal(bfpaccel.conv2d(xi, w64, "msfp16", **kwargs), expected)


def test_conv2d_non_contiguous_input(kernel):
    x, w, kwargs = case_data("3x3_pad1")
    big = np.zeros((1, 16, 12, 6), f32)
    big[:, :, ::2, :] = x
    view = big[:, :, ::2, :]
    assert not view.flags.c_contiguous
    assert_bits_equal(bfpaccel.conv2d(view, w, "msfp16", seed=SEED, **kwargs), reference_conv("3x3_pad1", "msfp16"))


# ----------------------------------------------------------------------------- errors
def _xw():
    return np.ones((1, 8, 6, 6), f32), np.ones((4, 8, 3, 3), f32)


def test_wrong_rank_raises():
    x, w = _xw()
    with pytest.raises(ValueError, match="4-D"):
        bfpaccel.conv2d(x[0], w, "msfp16")
    with pytest.raises(ValueError, match="4-D"):
        bfpaccel.conv2d(x, w[0], "msfp16")
    with pytest.raises(ValueError, match="4-D"):
        bfpaccel.quantize_conv_weight(w[0], "msfp16")


def test_channel_mismatch_raises():
    x, w = _xw()
    with pytest.raises(ValueError, match="channels"):
        bfpaccel.conv2d(np.ones((1, 9, 6, 6), f32), w, "msfp16")
    with pytest.raises(ValueError, match="channels"):
        bfpaccel.conv2d(x, np.ones((4, 8, 3, 3), f32), "msfp16", groups=2)  # needs C/groups = 4


def test_negative_padding_raises():
    x, w = _xw()
    for p in (-1, (1, -1), (0, 0, 0, -2)):
        with pytest.raises(ValueError, match="padding"):
            bfpaccel.conv2d(x, w, "msfp16", padding=p)
    with pytest.raises(ValueError, match="padding"):
        bfpaccel.conv2d(x, w, "msfp16", padding=(1, 1, 1))


@pytest.mark.parametrize("bad", [0, -1, (1, 0), (2, 2, 2)])
def test_bad_stride_or_dilation_raises(bad):
    x, w = _xw()
    with pytest.raises(ValueError, match="stride"):
        bfpaccel.conv2d(x, w, "msfp16", stride=bad)
    with pytest.raises(ValueError, match="dilation"):
        bfpaccel.conv2d(x, w, "msfp16", dilation=bad)


def test_groups_not_dividing_raises():
    x, w = _xw()
    with pytest.raises(ValueError):
        bfpaccel.conv2d(x, np.ones((6, 2, 3, 3), f32), "msfp16", groups=4)  # O=6 not divisible by 4
    with pytest.raises(ValueError):
        bfpaccel.quantize_conv_weight(np.ones((6, 2, 3, 3), f32), "msfp16", groups=4)
    with pytest.raises(ValueError):
        bfpaccel.conv2d(x, np.ones((3, 3, 3, 3), f32), "msfp16", groups=3)  # C=8 is not 3 * 3
    for g in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="groups"):
            bfpaccel.conv2d(x, w, "msfp16", groups=g)


def test_conv_weight_with_other_block_raises():
    x, w = _xw()
    cw = bfpaccel.quantize_conv_weight(w, "msfp16")  # block 16
    with pytest.raises(ValueError, match="block"):
        bfpaccel.conv2d(x, cw, "mxint8")  # block 32


def test_conv_weight_with_other_groups_raises():
    x = np.ones((1, 8, 6, 6), f32)
    cw = bfpaccel.quantize_conv_weight(np.ones((4, 4, 3, 3), f32), "msfp16", groups=2)
    with pytest.raises(ValueError, match="groups"):
        bfpaccel.conv2d(x, cw, "msfp16", groups=1)
    cw1 = bfpaccel.quantize_conv_weight(np.ones((4, 8, 3, 3), f32), "msfp16")
    with pytest.raises(ValueError, match="groups"):
        bfpaccel.conv2d(x, cw1, "msfp16", groups=2)


def test_conv_weight_with_conflicting_fmt_w_raises():
    x, w = _xw()
    cw = bfpaccel.quantize_conv_weight(w, "msfp16")
    with pytest.raises(ValueError):
        bfpaccel.conv2d(x, cw, "msfp16", fmt_w="msfp12")


def test_input_smaller_than_kernel_raises():
    w = np.ones((4, 8, 3, 3), f32)
    with pytest.raises(ValueError, match="smaller"):
        bfpaccel.conv2d(np.ones((1, 8, 2, 6), f32), w, "msfp16")
    with pytest.raises(ValueError, match="smaller"):
        bfpaccel.conv2d(np.ones((1, 8, 5, 5), f32), w, "msfp16", dilation=3)  # dilated kernel 7x7
    # padding that makes it fit is fine
    assert bfpaccel.conv2d(np.ones((1, 8, 2, 6), f32), w, "msfp16", padding=(1, 0)).shape == (1, 4, 2, 4)


def test_bad_bias_or_format_raises():
    x, w = _xw()
    with pytest.raises(ValueError, match="bias"):
        bfpaccel.conv2d(x, w, "msfp16", bias=np.ones(3, f32))
    with pytest.raises(ValueError):
        bfpaccel.conv2d(x, w, "fp16")
    with pytest.raises(ValueError):
        bfpaccel.conv2d(x, w)  # float weight needs a format
    with pytest.raises(TypeError):
        bfpaccel.conv2d(x.astype(np.complex64), w, "msfp16")
