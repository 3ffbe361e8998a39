"""The C++ core validates every size it will read (issue: a forged operand or program must be
a clean error, never a read out of bounds). Cases that used to crash run in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import bfpaccel
from bfpaccel import _core


def run_py(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=e)


def test_bfptensor_fields_are_read_only():
    t = bfpaccel.quantize(np.ones((64, 8), np.float32), "msfp16", axis=0)
    with pytest.raises(AttributeError):
        t.elements = np.zeros((64, 10**7), np.int8)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        t.exponents = np.zeros((1, 1), np.int16)  # type: ignore[misc]
    with pytest.raises(ValueError):
        t.elements[0, 0] = 5  # the cached packed form must keep matching


def test_bfptensor_checks_its_parts():
    f = bfpaccel.get_format("msfp16")
    with pytest.raises(ValueError, match="exponents have shape"):
        bfpaccel.BfpTensor(f, 0, np.zeros((64, 8), np.int8), np.zeros((3, 8), np.int16))
    with pytest.raises(TypeError):
        bfpaccel.BfpTensor(f, 0, np.zeros((64, 8), np.float32), np.zeros((4, 8), np.int16))
    with pytest.raises(ValueError, match="axis"):
        bfpaccel.BfpTensor(f, 5, np.zeros((64, 8), np.int8), np.zeros((4, 8), np.int16))


@pytest.mark.parametrize("role,codes,exps", [
    ("cols", (64, 8), (1, 8)),          # 4 blocks of 16 rows, 1 exponent row
    ("cols", (64, 8), (4, 80)),
    ("rows", (8, 64), (8, 1)),
    ("convw", (16, 32, 3, 3), (16, 1, 3, 3)),
    ("convw", (16, 32, 3, 3), (16, 2, 3)),
])
def test_pack_operand_checks_exponent_shape(role, codes, exps):
    params = bfpaccel.get_format("msfp16").kernel_params()
    taps = codes[2] * codes[3] if role == "convw" else 1
    with pytest.raises(ValueError, match="exponents"):
        _core.pack_operand(np.zeros(codes, np.int8), np.zeros(exps, np.int16), params, role, taps, 1)


def test_forged_bfptensor_used_to_segfault():
    r = run_py("""
        import numpy as np, bfpaccel as B
        t = B.quantize(np.ones((64, 8), np.float32), "msfp16", axis=0)
        forged = object.__new__(B.BfpTensor)
        for k, v in dict(_format=t.format, _axis=0, _elements=np.zeros((64, 10**6), np.int8),
                         _exponents=t.exponents, _packed={}).items():
            object.__setattr__(forged, k, v)
        try:
            B.matmul(np.ones((1, 64), np.float32), forged, "msfp16")
        except ValueError as e:
            print("clean:", e)
    """)
    assert r.returncode == 0, r.stderr
    assert "clean:" in r.stdout


@pytest.mark.parametrize("n", [0, -1, 100000, 10**12])
def test_thread_counts_are_capped(n):
    with pytest.raises(ValueError, match="threads"):
        bfpaccel.set_num_threads(n)
    with pytest.raises(ValueError, match="threads"):
        _core.set_num_threads(n) if -2**31 <= n < 2**31 else bfpaccel.set_num_threads(n)
    assert 1 <= bfpaccel.get_num_threads() <= _core.max_threads()


def test_thread_count_from_environment_is_checked():
    r = run_py("import bfpaccel", env={"BFPACCEL_NUM_THREADS": "100000"})
    assert r.returncode != 0
    assert "BFPACCEL_NUM_THREADS" in r.stderr and "Segmentation" not in r.stderr


@pytest.mark.parametrize("stride,dil,pads", [((0, 1), (1, 1), (0, 0, 0, 0)), ((1, 1), (0, 1), (0, 0, 0, 0)),
                                             ((1, 1), (1, 1), (-1, 0, 0, 0))])
def test_conv2d_geometry_is_checked(stride, dil, pads):
    w = bfpaccel.quantize_conv_weight(np.ones((4, 16, 3, 3), np.float32), "msfp16")
    params = bfpaccel.get_format("msfp16").kernel_params()
    with pytest.raises(ValueError):
        _core.conv2d(np.ones((1, 16, 8, 8), np.float32), params, 0, bfpaccel.core._packed(w.tensor, "convw", 9, 1), 1,
                     stride, pads, dil, None)


def _program():
    p = _core.Program(1, bfpaccel.get_format("msfp16").kernel_params())
    return p, p.add_buffer(16), p.add_buffer(16)


def _window(**kw):
    g = dict(batch=1, channels=1, height=4, width=4, out_channels=1, kernel_h=1, kernel_w=1, stride_h=1, stride_w=1,
             dilation_h=1, dilation_w=1, groups=1, out_h=4, out_w=4)
    g.update(kw)
    return _core.ConvGeometry(**g)


U, B = _core.UnaryKind, _core.BinaryKind


@pytest.mark.parametrize("params", [
    _core.CopyParams(count=17),                                                  # copy: 17 floats from 16
    _core.CopyParams(count=-1),                                                  # copy: a negative size
    _core.UnaryParams(op=U.RELU, count=1000),                                    # unary past the end
    _core.UnaryParams(op=U(99), count=4),                                        # an unknown function
    _core.BinaryParams(op=B.ADD, shape=[16], a_strides=[2], b_strides=[1]),      # operand a read with stride 2
    _core.BinaryParams(op=B.ADD, shape=[4, 4], a_strides=[4], b_strides=[4, 1]),  # strides for one axis of two
    _core.BinaryParams(op=B(7), shape=[4], a_strides=[1], b_strides=[1]),        # an unknown binary op
    _core.BinaryParams(op=B.ADD, shape=[1] * 65, a_strides=[0] * 65, b_strides=[0] * 65),  # rank out of range
    _core.StridedParams(offset=1, shape=[16], strides=[1]),                      # offset 1 + 15 > 15
    _core.StridedParams(offset=-1, shape=[4], strides=[1]),                      # reads before the input
    _core.StridedParams(offset=0, shape=[4, 4], strides=[1, -8]),                # negative stride off the front
    _core.StridedParams(offset=2**62, shape=[1], strides=[1]),                   # offset out of range
    _core.AffineParams(outer=1, channels=16, inner=1),                           # affine without scale/shift
    _core.AffineParams(outer=1, channels=16, inner=1, scale=[1.0] * 16, shift=[0.0] * 15),
    _core.ReduceParams(op=_core.ReduceKind.SUM, outer=1, length=17, inner=1),    # reduce past the end
    _core.SoftmaxParams(outer=2, length=16, inner=1),                            # softmax past the end
    _core.ConcatParams(outer=1, inner=1, lengths=[16, 1]),                       # a length per input, not more
    _core.ConcatParams(outer=1, inner=2, lengths=[16]),                          # concat past the end
    _core.PadParams(in_shape=[16], out_shape=[32], begin=[0]),                   # output larger than its buffer
    _core.PadParams(in_shape=[4, 4], out_shape=[4, 4], begin=[0]),               # begin for one axis of two
    _core.PadParams(in_shape=[4], out_shape=[4], begin=[-2**62]),                # begin out of range
    _core.PoolParams(op=_core.PoolKind.MAX, window=_window(kernel_h=0)),         # pool with a zero window
    _core.PoolParams(op=_core.PoolKind.MAX, window=_window(stride_w=2**40)),     # stride beyond int
    _core.PoolParams(op=_core.PoolKind.AVERAGE, window=_window(out_h=5)),        # output past the end
    _core.PoolParams(op=_core.PoolKind(5), window=_window()),                    # an unknown pool kind
    None,                                                                        # no parameters: no kind
])
def test_program_validates_op_sizes(params):
    p, a, b = _program()
    ins = [a, a] if isinstance(params, _core.BinaryParams) else [a]
    with pytest.raises(ValueError):
        p.add_op(params, ins, [b], name="forged")


def test_program_takes_typed_parameters_only():
    p, a, b = _program()
    p.add_op(_core.UnaryParams(op=U.CLIP, count=16, lo=-1.0, hi=1.0), [a], [b], name="ok")
    with pytest.raises(TypeError):
        p.add_op([16], [a], [b], name="positional")  # the old integer lists are gone
    with pytest.raises(TypeError, match="unknown field"):
        _core.UnaryParams(op=U.RELU, n=16)
    with pytest.raises(TypeError, match="UnaryParams.count"):
        _core.UnaryParams(op=U.RELU, count="16")
    with pytest.raises(TypeError, match="UnaryParams.op"):
        _core.UnaryParams(op=0, count=16)  # sub-ops are the core's enums, not numbers
    assert _core.UnaryParams.kind == _core.OpKind.UNARY and p.num_ops == 1


@pytest.mark.parametrize("params", [(0,) + (0,) * 11, (16, 2) + (0,) * 10, (16,) + (0,) * 10 + (4,)])
def test_program_checks_its_format(params):
    with pytest.raises(ValueError):  # block 0, an unknown element kind, an unknown rounding
        _core.Program(1, params)
    with pytest.raises(ValueError):
        _core.fake_quantize(np.ones((1, 16, 1), np.float32), params, 0, np.empty((1, 16, 1), np.float32))
    with pytest.raises(TypeError):  # not the 12 numbers of Format.kernel_params()
        _core.Program(1, params[:11])
    with pytest.raises(ValueError, match="vector precision"):
        _core.Program(7, None)
    f = bfpaccel.core.fmt_params(bfpaccel.get_format("msfp16"))
    f.rounding = 9
    with pytest.raises(ValueError, match="rounding"):
        _core.Program(1, f)


def test_format_parameters_by_name_equal_the_tuple():
    from bfpaccel.formats import PRESETS, ROUNDING_MODES

    for name, fmt in PRESETS.items():
        if not fmt.is_block:
            continue
        for r in ROUNDING_MODES:
            f = fmt.with_rounding(r)
            named, positional = bfpaccel.core.fmt_params(f), _core.FmtParams(f.kernel_params())
            assert repr(named) == repr(positional), (name, r)


def test_program_validates_conv_geometry():
    p = _core.Program(1, bfpaccel.get_format("msfp16").kernel_params())
    x = p.add_buffer(1 * 8 * 8 * 16)
    y = p.add_buffer(1 * 8 * 8 * 4)
    w = bfpaccel.core._packed(bfpaccel.quantize_conv_weight(np.ones((4, 16, 3, 3), np.float32), "msfp16").tensor,
                              "convw", 9, 1)

    def conv(**kw):
        g = dict(batch=1, height=8, width=8, channels=16, out_channels=4, kernel_h=3, kernel_w=3, stride_h=1,
                 stride_w=1, pad_top=1, pad_left=1, pad_bottom=1, pad_right=1, dilation_h=1, dilation_w=1, groups=1,
                 out_h=8, out_w=8)
        g.update(kw)
        return _core.ConvParams(geometry=_core.ConvGeometry(**g))

    p.add_op(conv(), [x], [y], w=w, name="ok")
    bad_cases = [
        conv(height=64, width=64, out_h=64, out_w=64),  # input larger than its buffer
        conv(channels=32),                              # channels differ from the weight
        conv(stride_h=0),                               # zero stride
        conv(out_h=9),                                  # output size inconsistent
        conv(groups=2**40),                             # groups beyond int
        conv(pad_top=-1),                               # negative padding
    ]
    for params in bad_cases:
        with pytest.raises(ValueError):
            p.add_op(params, [x], [y], w=w, name="forged")
    with pytest.raises(ValueError, match="without weights"):
        p.add_op(conv(), [x], [y], name="forged")
    bad_act = conv()
    bad_act.activation = _core.Activation(7)
    with pytest.raises(ValueError, match="activation"):
        p.add_op(bad_act, [x], [y], w=w, name="forged")
    dw = conv(channels=4, out_channels=4, groups=4)
    dw.depthwise = True
    with pytest.raises(ValueError, match="depthwise"):  # a packed BFP weight is not a depthwise weight
        p.add_op(dw, [x], [y], w=w, name="forged")
