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


@pytest.mark.parametrize("kind,ip", [
    (10, [17]),                              # copy: 17 floats from a 16-float buffer
    (2, [1000]),                             # unary past the end
    (1, [1, 16, 2, 1]),                      # binary: operand a read with stride 2
    (8, [1, 1, 16, 1]),                      # strided: offset 1 + 15 > 15
    (8, [1, -1, 4, 1]),                      # strided: reads before the input
    (8, [2, 0, 4, 4, 1, -8]),                # strided: negative stride walks off the front
    (3, [1, 16, 1]),                         # affine without scale/shift
    (5, [1, 17, 1]),                         # reduce past the end
    (6, [2, 16, 1]),                         # softmax past the end
    (9, [1, 16, 32, 0]),                     # pad: output larger than its buffer
    (1, [2**40, 2**40]),                     # rank out of range
    (4, [1, 4, 4, 1, 0, 1, 1, 1, 0, 0, 0, 0, 4, 4, 0, 1, 1]),  # pool with a zero window
    (99, [0]),                               # unknown kind
])
def test_program_validates_op_sizes(kind, ip):
    p, a, b = _program()
    ins = [a, a] if kind == 1 else [a]
    with pytest.raises(ValueError):
        p.add_op(kind, 0, ins, [b], ip, [], name="forged")


def test_program_validates_conv_geometry():
    p = _core.Program(1, bfpaccel.get_format("msfp16").kernel_params())
    x = p.add_buffer(1 * 8 * 8 * 16)
    y = p.add_buffer(1 * 8 * 8 * 4)
    w = bfpaccel.core._packed(bfpaccel.quantize_conv_weight(np.ones((4, 16, 3, 3), np.float32), "msfp16").tensor,
                              "convw", 9, 1)
    good = [1, 8, 8, 16, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 8, 8]
    p.add_op(0, 0, [x], [y], good, [], w=w, name="ok")
    bad_cases = [
        [1, 64, 64, 16, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 64, 64],  # input larger than its buffer
        [1, 8, 8, 32, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 8, 8],      # channels differ from the weight
        [1, 8, 8, 16, 4, 3, 3, 0, 1, 1, 1, 1, 1, 1, 1, 1, 8, 8],      # zero stride
        [1, 8, 8, 16, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 9, 8],      # output size inconsistent
    ]
    for ip in bad_cases:
        with pytest.raises(ValueError):
            p.add_op(0, 0, [x], [y], ip, [], w=w, name="forged")
