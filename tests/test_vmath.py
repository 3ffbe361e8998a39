"""The vector unit's own float32 exp / erf / tanh (bfpaccel.vmath, csrc/ops/vmath.h).

* accuracy: within a few float32 ulp of the exact function (float64) over the whole float32
  range -- random bit patterns, dense grids, the overflow / underflow edges, subnormals;
* special values: +-0, +-inf, NaN (kept, made quiet), the saturation of erf and tanh;
* the C++ core equals the numpy functions bit for bit on every available kernel (portable,
  AVX2, AVX-512, their emulations) and vector precision, for Exp, Erf, Tanh, Sigmoid, Gelu and
  Softmax (contiguous rows and strided).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import bfpaccel
from bfpaccel import reference, vmath

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

F32 = np.float32
RNG = np.random.default_rng(7)


def _inputs() -> np.ndarray:
    bits = RNG.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32)
    sub = RNG.integers(1, 2**23, 20_000, dtype=np.uint64).astype(np.uint32)  # subnormals, both signs
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 1.1754942e-38, 1.1754944e-38,
                      88.72283, 88.722839, 88.7229, 89.0, 89.5, -87.33655, -103.2789, -103.97208, -104.0, -150.0,
                      0.875, -0.875, 0.87499994, 0.625, 0.62499994, 3.9, 3.92, 4.0, 9.0, 10.0, 3.4e38, -3.4e38,
                      0.5, 1.0, -1.0, 2.0], F32)
    return np.concatenate([bits.view(F32), sub.view(F32), (sub | np.uint32(0x80000000)).view(F32),
                           np.linspace(-110, 95, 200_001, dtype=F32), np.linspace(-6, 6, 100_001, dtype=F32),
                           edges])


X = _inputs()


def _ulp_error(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units of the float32 spacing at exact (exact finite in float32)."""
    spacing = np.spacing(np.abs(exact).astype(F32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / np.maximum(spacing, 2.0**-149)


def _check_accuracy(fn, exact_fn, max_ulp: float, x: np.ndarray = X) -> None:
    x = x[np.isfinite(x)]
    with np.errstate(all="ignore"):
        exact = exact_fn(x.astype(np.float64))
        got = fn(x)
    assert got.dtype == F32
    fin = np.abs(exact) <= float(np.finfo(F32).max)
    err = _ulp_error(got[fin], exact[fin])
    worst = int(np.argmax(err))
    assert err[worst] <= max_ulp, f"{err[worst]:.2f} ulp at x={x[fin][worst]!r}"
    # results beyond float32's range overflow to inf (exp) and nowhere else
    big = ~fin
    assert np.all(np.isinf(got[big]) | (np.abs(got[big]) == np.finfo(F32).max))


def test_exp_accuracy():
    _check_accuracy(vmath.exp, np.exp, 1.0)
    # overflow exactly where the float32 result does
    last = F32(88.72283172607422)  # the largest float32 below ln(FLT_MAX) = 88.7228391...
    x = np.array([last, np.nextafter(last, F32(100)), 89.0, 1e30], F32)
    assert np.isfinite(vmath.exp(x[:1])).all() and np.isinf(vmath.exp(x[1:])).all()


def test_erf_accuracy():
    erf64 = np.vectorize(math.erf, otypes=[np.float64])
    x = X[np.isfinite(X)]
    sample = np.concatenate([x[:: 7], np.linspace(-5, 5, 50_001, dtype=F32)])
    _check_accuracy(vmath.erf, erf64, 3.0, sample)


def test_tanh_accuracy():
    _check_accuracy(vmath.tanh, np.tanh, 2.0)


def test_sigmoid_and_gelu_follow_their_formulas():
    x = np.linspace(-30, 30, 10_001, dtype=F32)
    one = F32(1)
    with np.errstate(all="ignore"):
        assert np.array_equal(vmath.sigmoid(x), (one / (one + vmath.exp(-x))).astype(F32))
        assert np.array_equal(vmath.swish(x), (x / (one + vmath.exp(-x))).astype(F32))
        g = ((F32(0.5) * x) * (one + vmath.erf(x / np.sqrt(F32(2))))).astype(F32)
    assert np.array_equal(vmath.gelu(x), g)
    exact = 0.5 * x.astype(np.float64) * (1 + np.vectorize(math.erf)(x.astype(np.float64) / math.sqrt(2)))
    # absolute error: 1 + erf(x / sqrt 2) cancels for negative x in the operator's formula itself
    assert np.max(np.abs(vmath.gelu(x) - exact) / np.maximum(1.0, np.abs(x))) < 4e-7


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, F32).view(np.uint32)


def test_special_values():
    pz, nz, inf = F32(0.0), F32(-0.0), F32(np.inf)
    assert _bits(vmath.exp(np.array([pz, nz, -inf, inf], F32))).tolist() == _bits(np.array([1, 1, 0, inf], F32)).tolist()
    assert _bits(vmath.erf(np.array([pz, nz, inf, -inf, 4.0, 100.0], F32))).tolist() == \
        _bits(np.array([0.0, -0.0, 1, -1, 1, 1], F32)).tolist()
    assert _bits(vmath.tanh(np.array([pz, nz, inf, -inf, 10.0, -1e30], F32))).tolist() == \
        _bits(np.array([0.0, -0.0, 1, -1, 1, -1], F32)).tolist()
    # subnormals: exp underflows gradually; erf and tanh of a tiny x keep its sign and magnitude
    t = np.array([1e-45, -1e-45, 3e-39, -3e-39], F32)
    assert np.array_equal(vmath.tanh(t), t)
    assert np.all(np.sign(vmath.erf(t)) == np.sign(t)) and np.all(np.abs(vmath.erf(t)) >= np.abs(t))
    e = vmath.exp(np.linspace(-104, -87, 20_001, dtype=F32))
    assert np.all(np.diff(e.astype(np.float64)) >= 0) and e[0] == 0 and e[-1] > 0
    # NaN in: the same NaN out, made quiet (sign and payload kept)
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFA00005], np.uint32).view(F32)
    for fn in (vmath.exp, vmath.erf, vmath.tanh, vmath.sigmoid, vmath.swish):
        assert _bits(fn(nans)).tolist() == (nans.view(np.uint32) | np.uint32(0x00400000)).tolist(), fn.__name__


def test_monotone_on_grids():
    x = np.linspace(-12, 12, 400_001, dtype=F32)
    for fn in (vmath.exp, vmath.erf, vmath.tanh):
        y = fn(x).astype(np.float64)
        assert np.all(np.diff(y) >= 0), fn.__name__


# ----------------------------------------------------------------------------- the core, bit for bit
def _model(node, n: int, opset: int):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


UNARY = {"Exp": vmath.exp, "Erf": vmath.erf, "Tanh": vmath.tanh, "Sigmoid": vmath.sigmoid, "Gelu": vmath.gelu}


@pytest.mark.parametrize("vp", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("op", sorted(UNARY))
def test_core_equals_numpy_every_kernel(op, vp, tmp_path):
    x = X[::3]
    path = str(tmp_path / "m.onnx")
    onnx.save(_model(helper.make_node(op, ["x"], ["y"]), x.size, 20), path)
    plan = bfpaccel.compile(path, format="fp32", vector_precision=vp)
    want = reference._round_ieee(UNARY[op](x), vp) if vp != "fp32" else UNARY[op](x)
    nan = np.isnan(want)  # fp32: the same NaN bits; fp16 / bf16: a NaN (its payload is the rounding's)
    for k in bfpaccel.available_kernels():
        got = bfpaccel.Session(plan, kernel=k).run(None, {"x": x[None]})["y"].ravel()
        bad = np.flatnonzero((_bits(got) != _bits(want)) & (~nan | (vp == "fp32") | ~np.isnan(got)))
        assert bad.size == 0, f"{op} {vp} kernel {k}: x={x[bad[:3]]} got={got[bad[:3]]}"


def _softmax_ref(x: np.ndarray, axis: int, vp: str) -> np.ndarray:
    """max, e = exp(x - max), the lane sum of e, round(e / sum) -- along axis."""
    y = vmath.softmax(x, axis)
    return reference._round_ieee(y, vp) if vp != "fp32" else y


def test_lane_sum_order():
    e = RNG.standard_normal((5, 37)).astype(F32) ** 2
    want = []
    for row in e:
        part = [F32(0)] * 16
        for i, v in enumerate(row):
            part[i % 16] = F32(part[i % 16] + v)
        w = 8
        while w >= 1:
            part = [F32(part[j] + part[j + w]) for j in range(w)]
            w //= 2
        want.append(part[0])
    assert np.array_equal(vmath.lane_sum(e), np.array(want, F32))
    assert np.allclose(vmath.softmax(e).sum(-1), 1, atol=1e-6)


@pytest.mark.parametrize("vp", ["fp32", "fp16"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_core_equals_numpy_every_kernel(axis, vp, tmp_path):
    x = (RNG.standard_normal((3, 37, 129)) * 6).astype(F32)
    x[2, 1, 7] = np.nan  # ignored by the maximum, NaN in its row
    x[0, 0, :5] = -np.inf  # masked keys
    x[1, 2, 3] = 80.0
    g = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=axis)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 9
    path = str(tmp_path / "s.onnx")
    onnx.save(m, path)
    plan = bfpaccel.compile(path, format="fp32", vector_precision=vp)
    want = _bits(_softmax_ref(x, axis, vp))
    for k in bfpaccel.available_kernels():
        got = bfpaccel.Session(plan, kernel=k).run(None, {"x": x})["y"]
        assert np.array_equal(_bits(got), want) or np.array_equal(np.isnan(got), np.isnan(want.view(F32))) and \
            np.array_equal(_bits(got)[~np.isnan(got)], want[~np.isnan(got)]), f"softmax axis {axis} {vp} kernel {k}"
