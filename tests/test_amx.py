"""The AMX kernel ("amx" on CPUs with AMX, "amx-emu" on its scalar tile emulation) bit for bit
against the reference: shapes that leave partial 16-row / 16-column tiles, blocks of 16 and 32,
tiles the bf16 tile path must route to the exact fallback, convs, and the OS refusing AMX."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import bfpaccel
from bfpaccel import reference as ref
from conftest import KERNELS, assert_bits_equal

f32 = np.float32
SEED = 99
AMX_KERNELS = [k for k in KERNELS if k in ("amx", "amx-emu")]
# int8-unit formats the tile path serves (blocks of 16 and 32), and one it leaves to VNNI (128)
SERVED = ["msfp16", "msfp12", "mxint8", "mxfp6_e2m3", "mxfp4_e2m1"]

pytestmark = pytest.mark.skipif(not AMX_KERNELS, reason="no AMX kernel in this build / on this CPU")


@pytest.fixture(params=AMX_KERNELS)
def amx_kernel(request):
    bfpaccel.set_kernel(request.param)
    try:
        yield request.param
    finally:
        bfpaccel.set_kernel(None)


def _check_matmul(a, b, fmt, what=""):
    expected = ref.matmul(a, b, fmt, seed=SEED)
    assert_bits_equal(bfpaccel.matmul(a, b, fmt, seed=SEED), expected, f"float operands {what}")
    qa = bfpaccel.quantize(a, fmt, axis=1, seed=SEED)
    qb = bfpaccel.quantize(b, fmt, axis=0, seed=SEED)
    assert_bits_equal(bfpaccel.matmul(qa, qb), expected, f"pre-quantized {what}")
    assert_bits_equal(bfpaccel.matmul(a, qb, fmt, seed=SEED), expected, f"float a, packed b {what}")


@pytest.mark.parametrize("fmt", SERVED + ["msfp8"])
# N > 128 runs on the tiles; N <= 128 (and M < 16) on the VNNI part of the AMX panels
@pytest.mark.parametrize("M,K,N", [(16, 16, 160), (17, 40, 150), (31, 100, 133), (33, 64, 129), (50, 96, 170),
                                   (64, 256, 192), (5, 64, 140), (15, 33, 17), (20, 8, 9), (48, 20, 250),
                                   (40, 64, 100), (300, 48, 64)])
def test_shapes(amx_kernel, fmt, M, K, N):
    rng = np.random.default_rng(M * 1000 + K * 10 + N)
    a = rng.normal(size=(M, K)).astype(f32)
    b = rng.normal(size=(K, N)).astype(f32)
    _check_matmul(a, b, fmt, f"{M}x{K}x{N}")


@pytest.mark.parametrize("fmt", ["msfp16", "mxint8"])
@pytest.mark.parametrize("ea,eb", [(-60, -60), (-63, -63), (-64, -64), (-66, -60), (-126, 0), (-127, 0),
                                   (-129, 30), (-135, 60), (-100, -30), (60, 60), (62, 50), (64, 64), (100, 20)])
def test_exponent_range_boundaries(amx_kernel, fmt, ea, eb):
    """Operands around 2^ea and 2^eb: products and block sums around the edges of the normal
    fp32 range (the tile unit flushes denormals) and of overflow. Rows 0-15 and 16-31 get
    different scales, so one row tile may run on the tiles and the other on the exact path."""
    rng = np.random.default_rng(abs(ea) * 7 + abs(eb))
    M, K, N = 40, 64, 160
    a = rng.normal(size=(M, K)) * 2.0 ** ea
    a[16:32] *= 2.0**12
    b = rng.normal(size=(K, N)) * 2.0 ** eb
    b[:, :8] *= 2.0**-6
    with np.errstate(over="ignore", under="ignore"):
        _check_matmul(a.astype(f32), b.astype(f32), fmt, f"2^{ea} x 2^{eb}")


@pytest.mark.parametrize("fmt", ["msfp16", "mxint8"])
def test_mixed_tile_routing(amx_kernel, fmt):
    """Per-row exponent sweeps: every (row tile, panel) pair lands somewhere else relative to
    the bf16 path's range; NaN and Inf blocks among them."""
    rng = np.random.default_rng(3)
    M, K, N = 80, 96, 150
    a = rng.normal(size=(M, K)) * 2.0 ** np.linspace(-150, 100, M)[:, None]
    b = rng.normal(size=(K, N)) * 2.0 ** np.linspace(-40, 25, N)[None, :]
    with np.errstate(over="ignore", under="ignore"):
        a, b = a.astype(f32), b.astype(f32)
    a[3, 5] = np.nan
    a[40, 70] = np.inf
    b[10, 33] = -np.inf
    b[90, 69] = np.nan
    _check_matmul(a, b, fmt)


def test_denormal_operand_values(amx_kernel):
    """Operand values below 2^-126 (flushed by the tile unit) whose products are normal."""
    rng = np.random.default_rng(4)
    a = (rng.normal(size=(144, 48)) * 2.0**-128).astype(f32)
    b = (rng.normal(size=(48, 160)) * 2.0**60).astype(f32)
    _check_matmul(a, b, "msfp16")
    _check_matmul(b.T.copy(), a.T.copy(), "msfp16", "transposed roles")


def test_threads_and_repeats_identical(amx_kernel, restore_threads):
    rng = np.random.default_rng(5)
    a = rng.normal(size=(200, 512)).astype(f32)
    qb = bfpaccel.quantize(rng.normal(size=(512, 300)).astype(f32), "msfp16", axis=0)
    outs = []
    for n in (1, 2, 3, 1):
        bfpaccel.set_num_threads(n)
        outs.append(bfpaccel.matmul(a, qb, "msfp16"))
    for o in outs[1:]:
        assert_bits_equal(o, outs[0])
    expected = ref.matmul_quantized(*ref.quantize_blocks(a, "msfp16", axis=1), "msfp16", qb.elements, qb.exponents,
                                    "msfp16")
    assert_bits_equal(outs[0], expected)


def test_tile_configuration_reloaded_after_other_amx_code(amx_kernel, restore_threads):
    """Other AMX code on the same thread (oneDNN inside PyTorch or onnxruntime) loads its own tile
    configuration between our calls: the next GEMM must load ours again, not compute with the
    stale one (garbage on the hardware, without a fault)."""
    from bfpaccel import _core

    rng = np.random.default_rng(8)
    a = rng.normal(size=(64, 256)).astype(f32)
    b = rng.normal(size=(256, 192)).astype(f32)
    want = ref.matmul(a, b, "msfp16")
    bfpaccel.set_num_threads(1)  # the calling thread runs the tiles
    assert_bits_equal(bfpaccel.matmul(a, b, "msfp16"), want, "before")
    assert _core._amx_load_foreign_config(amx_kernel)
    assert_bits_equal(bfpaccel.matmul(a, b, "msfp16"), want, "after another tile configuration")


@pytest.mark.parametrize("threads", [1, 3])
def test_tiles_released_after_each_call(amx_kernel, restore_threads, threads):
    """No thread keeps tile state once a GEMM has returned (TILERELEASE, as oneDNN does after a
    primitive): a thread with its tiles in use carries their 8 KB through every context switch and
    signal frame for the rest of the process. The next call configures them again."""
    from bfpaccel import _core

    rng = np.random.default_rng(9)
    a = rng.normal(size=(96, 256)).astype(f32)
    b = rng.normal(size=(256, 320)).astype(f32)  # 10 panels: the tile path, several items a thread
    want = ref.matmul(a, b, "msfp16")
    bfpaccel.set_num_threads(threads)
    for what in ("first call", "second call"):
        assert_bits_equal(bfpaccel.matmul(a, b, "msfp16"), want, what)
        assert not _core._amx_tiles_in_use(amx_kernel, threads), f"tile state left in use after the {what}"
    # the hook itself sees a configured thread (so the checks above can fail); on one thread the
    # caller runs the tiles and leaves them released, whoever configured them before
    assert _core._amx_load_foreign_config(amx_kernel)
    assert _core._amx_tiles_in_use(amx_kernel, 1)
    bfpaccel.set_num_threads(1)
    assert_bits_equal(bfpaccel.matmul(a, b, "msfp16"), want, "after another configuration")
    assert not _core._amx_tiles_in_use(amx_kernel, 1)


CONVS = {
    "3x3_s2_p1": ((1, 32, 17, 15), (140, 32, 3, 3), {"stride": 2, "padding": 1}),
    "3x3_p1_C64": ((2, 64, 9, 9), (170, 64, 3, 3), {"padding": 1}),
    "1x1_C48": ((1, 48, 7, 9), (133, 48, 1, 1), {}),
    "5x5_s2_p2_groups2": ((1, 64, 13, 11), (272, 32, 5, 5), {"stride": 2, "padding": 2, "groups": 2}),
    "3x3_dil2": ((1, 32, 12, 12), (136, 32, 3, 3), {"dilation": 2, "padding": 2}),
    "3x3_p1_narrow": ((1, 32, 10, 10), (40, 32, 3, 3), {"padding": 1}),
    # wide output rows: row tiles loaded straight from the converted pixels (stride 1 and 2),
    # tiles across output rows gathered, short last tiles
    "3x3_p1_OW37_batch2": ((2, 32, 5, 37), (136, 32, 3, 3), {"padding": 1}),
    "3x3_p1_OW32": ((1, 48, 4, 32), (130, 48, 3, 3), {"padding": 1}),
    "3x3_s2_p1_OW18": ((1, 32, 7, 36), (140, 32, 3, 3), {"stride": 2, "padding": 1}),
    "3x3_s2_p0_OW17": ((1, 32, 7, 35), (140, 32, 3, 3), {"stride": 2}),
    "3x3_dil2_OW20": ((1, 32, 8, 24), (136, 32, 3, 3), {"dilation": 2, "padding": 2}),
    "3x3_groups2_OW21": ((1, 64, 5, 21), (272, 32, 3, 3), {"padding": 1, "groups": 2}),
    "1x1_OW40": ((1, 64, 3, 40), (150, 64, 1, 1), {}),
    "1x1_s2_OW20": ((1, 64, 4, 40), (150, 64, 1, 1), {"stride": 2}),
    "2x2_OW19_C64": ((1, 64, 4, 20), (140, 64, 2, 2), {}),
}


@pytest.mark.parametrize("case", list(CONVS))
@pytest.mark.parametrize("fmt", ["msfp16", "mxint8", "mxfp4_e2m1"])
def test_conv2d(amx_kernel, fmt, case):
    xs, ws, kw = CONVS[case]
    rng = np.random.default_rng(len(case))
    x = rng.normal(size=xs).astype(f32)
    w = (rng.normal(size=ws) * 0.1).astype(f32)
    expected = ref.conv2d(x, w, fmt, seed=SEED, **kw)
    assert_bits_equal(bfpaccel.conv2d(x, w, fmt, seed=SEED, **kw), expected, "float weight")
    cw = bfpaccel.quantize_conv_weight(w, fmt, kw.get("groups", 1), seed=SEED)
    assert_bits_equal(bfpaccel.conv2d(x, cw, fmt, seed=SEED, **kw), expected, "pre-quantized weight")


def test_conv2d_tiny_activations(amx_kernel):
    """Activations near 2^-120 against normal weights: the exact fallback inside a conv."""
    rng = np.random.default_rng(6)
    x = (rng.normal(size=(1, 32, 10, 10)) * 2.0 ** np.linspace(-135, -100, 10)[None, None, :, None]).astype(f32)
    w = (rng.normal(size=(140, 32, 3, 3)) * 2.0**-8).astype(f32)
    expected = ref.conv2d(x, w, "msfp16", seed=SEED, padding=1)
    assert_bits_equal(bfpaccel.conv2d(x, w, "msfp16", seed=SEED, padding=1), expected)


@pytest.mark.parametrize("kw", [{"padding": 1}, {"padding": 1, "stride": 2}])
def test_conv2d_wide_rows_exact_fallback(amx_kernel, kw):
    """Output rows of 33/17 pixels, some input rows near 2^-120 or with NaN: tiles loaded straight
    from the pixels next to tiles routed to the exact fallback; NaN propagation."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1, 32, 6, 33)).astype(f32)
    x[:, :, 2, :] *= f32(2.0**-125)
    x[:, 3, 4, 5] = np.nan
    w = (rng.normal(size=(140, 32, 3, 3)) * 2.0**-6).astype(f32)
    expected = ref.conv2d(x, w, "msfp16", seed=SEED, **kw)
    assert_bits_equal(bfpaccel.conv2d(x, w, "msfp16", seed=SEED, **kw), expected)


_REFUSE = r"""
import ctypes, ctypes.util, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
class StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(8192)
st = StackT(ctypes.cast(buf, ctypes.c_void_p), 0, 8192)
assert libc.sigaltstack(ctypes.byref(st), None) == 0, ctypes.get_errno()
import numpy as np, bfpaccel
ks = bfpaccel.available_kernels()
a = np.ones((64, 64), np.float32)
out = bfpaccel.matmul(a, a, "msfp16")
assert float(out[0, 0]) == 64.0
print(" ".join(ks), bfpaccel.get_kernel())
"""


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(k in flags for k in ("amx_tile", "amx_int8", "amx_bf16"))


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _cpu_has_amx(), reason="needs an AMX CPU (Linux)")
def test_os_refusal_falls_back():
    """A thread with an 8 KiB sigaltstack makes Linux refuse the AMX state: no "amx" kernel,
    the default is the next one, and nothing crashes."""
    env = dict(os.environ)
    env.pop("BFPACCEL_KERNEL", None)
    r = subprocess.run([sys.executable, "-c", _REFUSE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    kernels, default = r.stdout.split()[:-1], r.stdout.split()[-1]
    assert "amx" not in kernels
    assert default == kernels[-1] != "amx"
