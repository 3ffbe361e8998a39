"""bfpaccel.torch: forward bit for bit with the C++ core and the compiled plan, straight-through
gradients, torch.compile / torch.export, quantize_model, ONNX export -> bfpaccel.compile."""

from __future__ import annotations

import doctest
import importlib.util
import subprocess
import sys
import zlib

import numpy as np
import pytest

import bfpaccel
from bfpaccel import ROUNDING_MODES, get_format

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import bfpaccel.torch as bt  # noqa: E402

BLOCK_FORMATS = [f for f in bfpaccel.list_formats() if get_format(f).is_block]
DETERMINISTIC = [r for r in ROUNDING_MODES if r != "stochastic"]


needs_onnxscript = pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None,
                                      reason="ONNX export needs onnxscript (the torch extra)")


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(k.encode()) if isinstance(k, str) else k for k in key])


def _t(a) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _vp_round(y: np.ndarray, vp: str) -> np.ndarray:
    """The vector unit's rounding (IEEE RNE to fp16 / bf16), from the reference's fake_quantize."""
    return y if vp == "fp32" else bfpaccel.reference.fake_quantize(y, vp)


def _quantized_linear_weight(w: np.ndarray, fmt, seed: int) -> bfpaccel.BfpTensor:
    """W [N, K] quantized along K (as bfpaccel.compile does a dense weight), as a [K, N] operand."""
    q = bfpaccel.quantize(w, fmt, axis=1, seed=seed)
    return bfpaccel.BfpTensor(q.format, 0, q.elements.T, q.exponents.T)


# ----------------------------------------------------------------------------- packaging
def test_import_bfpaccel_does_not_import_torch():
    code = ("import sys, bfpaccel, bfpaccel.runtime, bfpaccel.core; "
            "assert 'torch' not in sys.modules and 'onnxscript' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_torch_a_clear_import_error():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import bfpaccel.torch\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "bfpaccel.torch needs PyTorch" in out and "bfpaccel[torch]" in out


@pytest.mark.parametrize("mod", ["bfpaccel.torch", "bfpaccel.torch.functional", "bfpaccel.torch.nn",
                                 "bfpaccel.torch._ops"])
def test_docstring_examples(mod):
    import importlib

    res = doctest.testmod(importlib.import_module(mod), optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0


# ----------------------------------------------------------------------------- forward, bit for bit
@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("rounding", ROUNDING_MODES)
def test_matmul_bit_exact(fmt, rounding):
    rng = _rng(fmt, rounding, 1)
    f = get_format(fmt, rounding=rounding)
    B = f.block_size
    K = int(rng.integers(1, 3)) * B + int(rng.integers(1, B)) if B > 1 else 5  # not a multiple of the block
    x = rng.standard_normal((2, 3, K)).astype(np.float32) * np.float32(4.0)
    x[0, 0, :3] = 0.0
    w = rng.standard_normal((K, 7)).astype(np.float32)
    y = bt.bfp_matmul(_t(x), _t(w), fmt, rounding=rounding, seed=11)
    ref = bfpaccel.matmul(x.reshape(-1, K), w, f, seed=11).reshape(2, 3, 7)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 7)
    np.testing.assert_array_equal(y.numpy(), ref)
    # another weight format with the same block
    other = "msfp12" if B == 16 else ("mxfp6_e2m3" if B == 32 else fmt)
    y2 = bt.bfp_matmul(_t(x), _t(w), fmt, weight_format=other, rounding=rounding, seed=11)
    ref2 = bfpaccel.matmul(x.reshape(-1, K), w, f, get_format(other, rounding=rounding), seed=11)
    np.testing.assert_array_equal(y2.numpy().reshape(-1, 7), ref2)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("rounding", ROUNDING_MODES)
def test_linear_bit_exact(fmt, rounding):
    rng = _rng(fmt, rounding, 2)
    f = get_format(fmt, rounding=rounding)
    K, N = f.block_size + 3, 9
    x = rng.standard_normal((4, K)).astype(np.float32) * np.float32(3.0)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    acc = bfpaccel.matmul(x, _quantized_linear_weight(w, f, 5), f, seed=5)
    if rounding != "stochastic":  # the same as quantizing W^T along K
        np.testing.assert_array_equal(acc, bfpaccel.matmul(x, w.T.copy(), f, seed=5))
    for vp in bt.VECTOR_PRECISIONS:
        y = bt.bfp_linear(_t(x), _t(w), _t(b), fmt, rounding=rounding, vector_precision=vp, seed=5)
        np.testing.assert_array_equal(y.numpy(), _vp_round((acc + b).astype(np.float32), vp), err_msg=vp)
    # no bias: the accumulator as it is, whatever the vector precision
    np.testing.assert_array_equal(bt.bfp_linear(_t(x), _t(w), None, fmt, rounding=rounding, seed=5).numpy(), acc)
    # the module: the same numbers; N-d and 1-D inputs
    layer = bt.BfpLinear(K, N, format=fmt, rounding=rounding, seed=5)
    with torch.no_grad():
        layer.weight.copy_(_t(w))
        layer.bias.copy_(_t(b))
    ref = _vp_round((acc + b).astype(np.float32), "fp16")
    np.testing.assert_array_equal(layer(_t(x)).detach().numpy(), ref)
    if rounding != "stochastic":  # (stochastic bits are indexed on the flattened input)
        np.testing.assert_array_equal(layer(_t(x).reshape(2, 2, K)).detach().numpy().reshape(4, N), ref)
        np.testing.assert_array_equal(layer(_t(x[1])).detach().numpy(), ref[1])


CONV_CASES = [
    # (C, O, k, stride, padding, dilation, groups, H, W)
    (5, 4, (3, 3), 1, 1, 1, 1, 7, 6),
    (19, 6, (3, 2), (2, 1), (1, 0, 2, 1), (1, 2), 1, 9, 8),
    (8, 6, (1, 1), 1, 0, 1, 2, 5, 5),
    (6, 6, (3, 3), 2, 1, 1, 6, 8, 7),  # depthwise
    (34, 4, (2, 2), 1, "same", 2, 1, 6, 5),  # even kernel: one more at the bottom / right
    (20, 3, (3, 3), 3, "valid", 1, 1, 10, 11),
]


def _np_pads(padding, k, dil):
    return bt.functional.conv_padding(padding, k, [dil, dil] if isinstance(dil, int) else dil, [1, 1])


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("rounding", ROUNDING_MODES)
def test_conv2d_bit_exact(fmt, rounding):
    rng = _rng(fmt, rounding, 3)
    f = get_format(fmt, rounding=rounding)
    for C, O, k, stride, padding, dil, groups, H, W in CONV_CASES:
        x = rng.standard_normal((2, C, H, W)).astype(np.float32) * np.float32(2.0)
        w = rng.standard_normal((O, C // groups) + k).astype(np.float32)
        b = rng.standard_normal(O).astype(np.float32)
        pads = _np_pads(padding, k, dil)
        ref = bfpaccel.conv2d(x, w, f, bias=b, stride=stride, padding=pads, dilation=dil, groups=groups, seed=3)
        case = f"case {(C, O, k, stride, padding, dil, groups)}"
        for vp in ("fp32", "fp16"):
            y = bt.bfp_conv2d(_t(x), _t(w), _t(b), stride, padding, dil, groups, fmt, rounding=rounding,
                              vector_precision=vp, seed=3)
            np.testing.assert_array_equal(y.numpy(), _vp_round(ref, vp), err_msg=f"{case} {vp}")
        y = bt.bfp_conv2d(_t(x), _t(w), None, stride, padding, dil, groups, fmt, rounding=rounding, seed=3)
        ref0 = bfpaccel.conv2d(x, w, f, stride=stride, padding=pads, dilation=dil, groups=groups, seed=3)
        np.testing.assert_array_equal(y.numpy(), ref0, err_msg=case)
        conv = bt.BfpConv2d(C, O, k, stride, padding, dil, groups, format=fmt, rounding=rounding, seed=3)
        with torch.no_grad():
            conv.weight.copy_(_t(w))
            conv.bias.copy_(_t(b))
        np.testing.assert_array_equal(conv(_t(x)).detach().numpy(), _vp_round(ref, "fp16"), err_msg=case)
        if rounding != "stochastic":  # an unbatched CHW image
            np.testing.assert_array_equal(conv(_t(x[1])).detach().numpy(), _vp_round(ref, "fp16")[1])


def test_other_dtypes_compute_from_float32():
    rng = _rng("dtypes")
    x = rng.standard_normal((3, 40))
    w = rng.standard_normal((40, 5))
    y64 = bt.bfp_matmul(torch.from_numpy(x), torch.from_numpy(w), "msfp14")
    assert y64.dtype == torch.float64
    np.testing.assert_array_equal(y64.numpy(), bfpaccel.matmul(x.astype(np.float32), w.astype(np.float32),
                                                               "msfp14").astype(np.float64))
    y16 = bt.bfp_matmul(torch.from_numpy(x).to(torch.bfloat16), torch.from_numpy(w), "msfp14")
    assert y16.dtype == torch.bfloat16


def test_empty_batch_and_backward():
    layer = bt.BfpLinear(20, 3)
    x = torch.zeros(0, 20, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 20) and torch.all(layer.weight.grad == 0)


def test_nan_and_inf_propagate_as_in_the_core():
    x = torch.ones(2, 16)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    y = bt.bfp_matmul(x, torch.ones(16, 2))
    np.testing.assert_array_equal(y.numpy(), bfpaccel.matmul(x.numpy(), np.ones((16, 2), np.float32), "msfp16"))
    assert torch.isnan(y).all()


# ----------------------------------------------------------------------------- straight-through gradients
def _deq(a: "torch.Tensor", fmt, axis: int, seed: int, rounding: str) -> "torch.Tensor":
    """Dequantized BFP values from the numpy API (independent of the torch ops), in float64."""
    f = get_format(fmt, rounding=rounding)
    return torch.from_numpy(bfpaccel.fake_quantize(a.detach().float().numpy(), f, axis=axis, seed=seed)).double()


@pytest.mark.parametrize("fmt,rounding", [("msfp16", "nearest_even"), ("msfp12", "stochastic"),
                                          ("mxfp4_e2m1", "toward_zero"), ("mxint8", "nearest_away")])
def test_ste_gradients_linear_and_matmul(fmt, rounding):
    rng = _rng(fmt, rounding, 4)
    x = torch.from_numpy(rng.standard_normal((2, 3, 37))).requires_grad_()
    w = torch.from_numpy(rng.standard_normal((6, 37))).requires_grad_()
    b = torch.from_numpy(rng.standard_normal(6)).requires_grad_()
    g = torch.from_numpy(rng.standard_normal((2, 3, 6)))
    y = bt.bfp_linear(x, w, b, fmt, rounding=rounding, seed=9)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
    # the float op on the dequantized operands, in double precision
    xq = _deq(x, fmt, -1, 9, rounding).requires_grad_()
    wq = _deq(w, fmt, 1, 9, rounding).requires_grad_()
    bf = b.detach().clone().requires_grad_()
    rx, rw, rb = torch.autograd.grad(F.linear(xq, wq, bf), (xq, wq, bf), g)
    for got, want in ((gx, rx), (gw, rw), (gb, rb)):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert not torch.equal(gx, torch.autograd.grad(F.linear(x, w, b), x, g)[0])  # it is not the float gradient
    # matmul: x [..., K] @ w [K, N]
    wk = w.detach().t().contiguous().requires_grad_()
    y = bt.bfp_matmul(x, wk, fmt, rounding=rounding, seed=9)
    gx, gw = torch.autograd.grad(y, (x, wk), g)
    xq = _deq(x, fmt, -1, 9, rounding).requires_grad_()
    wq = _deq(wk, fmt, 0, 9, rounding).requires_grad_()
    rx, rw = torch.autograd.grad(xq @ wq, (xq, wq), g)
    torch.testing.assert_close(gx, rx, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gw, rw, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("fmt,rounding", [("msfp16", "nearest_even"), ("mxfp8_e4m3", "stochastic")])
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"case{i}" for i in range(len(CONV_CASES))])
def test_ste_gradients_conv2d(fmt, rounding, case):
    C, O, k, stride, padding, dil, groups, H, W = case
    rng = _rng(fmt, rounding, 5)
    x = torch.from_numpy(rng.standard_normal((2, C, H, W))).requires_grad_()
    w = torch.from_numpy(rng.standard_normal((O, C // groups) + k)).requires_grad_()
    b = torch.from_numpy(rng.standard_normal(O)).requires_grad_()
    y = bt.bfp_conv2d(x, w, b, stride, padding, dil, groups, fmt, rounding=rounding, seed=4)
    g = torch.from_numpy(rng.standard_normal(tuple(y.shape)))
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
    N = x.shape[0]
    xq = _deq(x.reshape(N, groups, C // groups, H, W), fmt, 2, 4, rounding).reshape(x.shape).requires_grad_()
    wq = _deq(w, fmt, 1, 4, rounding).requires_grad_()
    bf = b.detach().clone().requires_grad_()
    t, l, bo, r = _np_pads(padding, k, dil)
    ref = F.conv2d(F.pad(xq, (l, r, t, bo)), wq, bf, stride, 0, dil, groups)
    rx, rw, rb = torch.autograd.grad(ref, (xq, wq, bf), g)
    for got, want in ((gx, rx), (gw, rw), (gb, rb)):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_backward_uses_the_operands_the_forward_multiplied():
    """Stochastic rounding: the STE's dequantized operands are the forward's own (same bits)."""
    rng = _rng("same-operands")
    x = _t(rng.standard_normal((5, 40)))
    w = _t(rng.standard_normal((7, 40)))
    kw = dict(rounding="stochastic", seed=123)
    # x @ I = x_q and I @ W^T = W_q^T exactly (one non-zero product per output)
    assert torch.equal(bt.bfp_matmul(x, torch.eye(40), "msfp13", **kw), bt.fake_quantize(x, "msfp13", -1, **kw))
    assert torch.equal(bt.bfp_linear(torch.eye(40), w, None, "msfp13", **kw),
                       bt.fake_quantize(w, "msfp13", 1, **kw).t())
    assert not torch.equal(bt.fake_quantize(x, "msfp13", -1, **kw), bt.fake_quantize(x, "msfp13", -1))
    xc = _t(rng.standard_normal((2, 40, 3, 4)))
    eye = torch.eye(20).reshape(20, 20, 1, 1).repeat(2, 1, 1, 1)
    assert torch.equal(bt.bfp_conv2d(xc, eye, None, groups=2, format="msfp13", **kw),
                       bt.fake_quantize(xc.reshape(2, 2, 20, 3, 4), "msfp13", 2, **kw).reshape(xc.shape))


def test_fake_quantize_straight_through():
    x = torch.randn(3, 20, requires_grad=True)
    y = bt.fake_quantize(x, "mxfp4_e2m1", 1)
    np.testing.assert_array_equal(y.detach().numpy(), bfpaccel.fake_quantize(x.detach().numpy(), "mxfp4_e2m1", 1))
    g = torch.randn(3, 20)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, g)


@pytest.mark.parametrize("op", ["matmul", "linear", "conv2d", "fake_quantize"])
def test_opcheck(op):
    enc = bt.encode_format(get_format("msfp16"))
    x = torch.randn(3, 20, requires_grad=True)
    if op == "matmul":
        args = (x, torch.randn(20, 4, requires_grad=True), enc, enc, 0)
    elif op == "linear":
        args = (x, torch.randn(4, 20, requires_grad=True), torch.randn(4, requires_grad=True), enc, enc, "fp16", 0)
    elif op == "conv2d":
        args = (torch.randn(2, 6, 7, 7, requires_grad=True), torch.randn(4, 3, 3, 3, requires_grad=True),
                torch.randn(4, requires_grad=True), [2, 1], [1, 0, 2, 1], [1, 1], 2, enc, enc, "fp16", 0)
    else:
        args = (x, enc, 1, 0)
    torch.library.opcheck(getattr(torch.ops.bfpaccel, op).default, args)


# ----------------------------------------------------------------------------- training, compile, export
class SmallCNN(nn.Module):
    def __init__(self, bias: bool = True, pool: str = "max"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
        self.fc = nn.Linear(24 * 2 * 2, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def test_training_step_changes_weights_and_learns():
    torch.manual_seed(0)
    model = bt.quantize_model(SmallCNN(), "msfp12")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 3, 8, 8)
    target = torch.randint(0, 10, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = model.state_dict()
    for k in before:
        assert not torch.equal(before[k], after[k]), k
        assert torch.isfinite(after[k]).all()
    assert losses[-1] < 0.3 * losses[0], losses  # it fits the batch


def test_torch_compile_matches_eager_bit_for_bit():
    torch.manual_seed(1)
    model = bt.quantize_model(SmallCNN(), "mxint8")
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)  # symbolic shapes through the fake impls
    y = model(x)
    yc = compiled(x)
    assert torch.equal(y, yc)
    x2 = torch.randn(7, 3, 8, 8)  # another batch size, the same graph
    assert torch.equal(compiled(x2), model(x2))
    # backward through the compiled graph: the same straight-through gradients
    y.sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled(x).sum().backward()
    for p, ge in zip(model.parameters(), eager):
        torch.testing.assert_close(p.grad, ge, rtol=1e-5, atol=1e-6)


def test_torch_export_keeps_single_nodes():
    torch.manual_seed(2)
    model = bt.quantize_model(SmallCNN(), "msfp16").eval()
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("bfpaccel.conv2d.default") == 2
    assert targets.count("bfpaccel.linear.default") == 1
    assert not any("convolution" in t or "aten.linear" in t or "aten.addmm" in t for t in targets), targets
    assert torch.equal(ep.module()(x), model(x))


# ----------------------------------------------------------------------------- quantize_model
def test_quantize_model_drop_in_and_overrides():
    torch.manual_seed(3)
    net = SmallCNN()
    q = bt.quantize_model(net, "msfp16", overrides={"conv2": "msfp12", "fc": None})
    assert type(net.conv1) is nn.Conv2d  # not inplace: the original is untouched
    assert isinstance(q.conv1, bt.BfpConv2d) and q.conv1.format.name == "msfp16"
    assert isinstance(q.conv2, bt.BfpConv2d) and q.conv2.format.name == "msfp12"
    assert type(q.fc) is nn.Linear
    assert list(q.state_dict()) == list(net.state_dict())
    for k, v in net.state_dict().items():
        assert torch.equal(v, q.state_dict()[k])
    assert q.conv1.weight is not net.conv1.weight
    assert bt.bfp_layers(q) == {"conv1": (bt.encode_format(get_format("msfp16")),) * 2 + ("fp16", 0),
                                "conv2": (bt.encode_format(get_format("msfp12")),) * 2 + ("fp16", 0)}
    # a dict override; an already quantized layer re-configured or made float again
    q2 = bt.quantize_model(q, None, overrides={"conv1": None, "fc": {"format": "mxint8", "rounding": "toward_zero",
                                                                     "vector_precision": "bf16"}})
    assert type(q2.conv1) is nn.Conv2d and isinstance(q2.conv2, bt.BfpConv2d)
    assert q2.fc.format == get_format("mxint8", rounding="toward_zero") and q2.fc.vector_precision == "bf16"
    # inplace: the same module and the same Parameter objects (an optimizer keeps working)
    w = net.fc.weight
    out = bt.quantize_model(net, "msfp13", inplace=True)
    assert out is net and isinstance(net.fc, bt.BfpLinear) and net.fc.weight is w
    # the root module itself
    lin = nn.Linear(8, 2)
    assert isinstance(bt.quantize_model(lin), bt.BfpLinear)


def test_quantize_model_errors_and_sharing():
    net = SmallCNN()
    with pytest.raises(KeyError, match="did you mean 'conv1'"):
        bt.quantize_model(net, overrides={"conv_1": None})
    with pytest.raises(ValueError, match="layer 'fc'.*plain IEEE"):
        bt.quantize_model(net, overrides={"fc": "fp16"})
    with pytest.raises(ValueError, match="unknown format"):
        bt.quantize_model(net, "msfp99")
    with pytest.raises(ValueError, match="unknown keys"):
        bt.quantize_model(net, overrides={"fc": {"fmt": "msfp12"}})
    with pytest.raises(ValueError, match="block sizes differ"):
        bt.quantize_model(net, "msfp16", weight_format="mxint8")
    with pytest.raises(TypeError):
        bt.quantize_model("not a module")
    refl = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding_mode"):
        bt.quantize_model(refl, inplace=True)
    assert type(refl[0]) is nn.Conv2d  # checked before anything changed
    assert type(bt.quantize_model(refl, overrides={"0": None})[0]) is nn.Conv2d
    shared = nn.Linear(4, 4)
    seq = nn.Sequential(shared, nn.ReLU(), shared)
    q = bt.quantize_model(seq)
    assert isinstance(q[0], bt.BfpLinear) and q[0] is q[2]
    # MultiheadAttention reads out_proj's weight without calling it: not swapped
    mha = nn.MultiheadAttention(8, 2)
    assert type(bt.quantize_model(mha).out_proj) is type(mha.out_proj)


def test_modules_are_drop_in():
    torch.manual_seed(5)
    ref = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    torch.manual_seed(5)
    q = bt.BfpConv2d(4, 6, 3, stride=2, padding=1, groups=2, format="mxfp6_e3m2")
    assert torch.equal(ref.weight, q.weight) and torch.equal(ref.bias, q.bias)
    assert list(q.state_dict()) == list(ref.state_dict())
    q.load_state_dict(ref.state_dict())
    assert "mxfp6_e3m2" in repr(q)
    torch.manual_seed(6)
    ref_l = nn.Linear(10, 3, bias=False)
    torch.manual_seed(6)
    q_l = bt.BfpLinear(10, 3, bias=False)
    assert torch.equal(ref_l.weight, q_l.weight) and q_l.bias is None
    assert isinstance(q_l, nn.Linear) and isinstance(q, nn.Conv2d)
    back = q.to_float()
    assert type(back) is nn.Conv2d and back.weight is q.weight


def test_argument_errors():
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="plain IEEE"):
        bt.bfp_matmul(x, torch.randn(16, 2), "fp32")
    with pytest.raises(ValueError, match="unknown rounding"):
        bt.bfp_matmul(x, torch.randn(16, 2), rounding="up")
    with pytest.raises(ValueError, match="K mismatch"):
        bt.bfp_matmul(x, torch.randn(15, 2))
    with pytest.raises(TypeError, match="floating-point"):
        bt.bfp_matmul(x, torch.ones(16, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        bt.bfp_matmul(x.numpy(), torch.randn(16, 2))
    with pytest.raises(ValueError, match="seed"):
        bt.bfp_linear(x, torch.randn(3, 16), seed=-1)
    with pytest.raises(ValueError, match="vector_precision"):
        bt.bfp_linear(x, torch.randn(3, 16), vector_precision="fp8")
    with pytest.raises(ValueError, match="in_features=15"):
        bt.BfpLinear(15, 3)(x)
    with pytest.raises(ValueError, match="bias"):
        bt.bfp_linear(x, torch.randn(3, 16), torch.randn(4))
    xc = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="channels"):
        bt.bfp_conv2d(xc, torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="divisible by groups"):
        bt.bfp_conv2d(xc, torch.randn(3, 2, 3, 3), groups=2)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        bt.bfp_conv2d(xc, torch.randn(2, 4, 3, 3), dilation=3)
    with pytest.raises(ValueError, match="stride 1"):
        bt.bfp_conv2d(xc, torch.randn(2, 4, 3, 3), stride=2, padding="same")
    with pytest.raises(ValueError, match="padding"):
        bt.bfp_conv2d(xc, torch.randn(2, 4, 3, 3), padding=(1, 2, 3))
    with pytest.raises(ValueError, match="4-D NCHW"):
        bt.bfp_conv2d(torch.randn(4, 5), torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="padding_mode"):
        bt.BfpConv2d(4, 2, 3, padding_mode="circular")
    with pytest.raises(ValueError, match="0-d"):
        bt.fake_quantize(torch.tensor(1.0))


# ----------------------------------------------------------------------------- ONNX -> bfpaccel.compile
def _plan_output(onnx_model, x: "torch.Tensor", **compile_kw) -> np.ndarray:
    plan = bfpaccel.compile(onnx_model, **compile_kw)
    return bfpaccel.Session(plan).run(None, {"x": x.numpy()})["y"]


@needs_onnxscript
@pytest.mark.parametrize("fmt", ["msfp16", "mxfp8_e4m3"])
def test_onnx_export_compiles_to_the_same_numbers(fmt):
    torch.manual_seed(7)
    q = bt.quantize_model(SmallCNN(), fmt).eval()
    x = torch.randn(3, 3, 8, 8) * 2
    with torch.no_grad():
        want = q(x).numpy()
    model = bt.export_onnx(q, (x,), input_names=["x"], output_names=["y"])
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 2 and ops.count("Gemm") == 1
    got = _plan_output(model, x, format=fmt)
    np.testing.assert_array_equal(got, want)
    # the recorded settings; to_plan compiles with them
    assert bt.plan_options(model)["format"] == get_format(fmt)
    plan = bt.to_plan(q, (x,), input_names=["x"], output_names=["y"])
    np.testing.assert_array_equal(bfpaccel.Session(plan).run(None, {"x": x.numpy()})["y"], want)


@needs_onnxscript
def test_onnx_export_other_settings_and_nd_linear(tmp_path):
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 5))
    q = bt.quantize_model(net, "mxfp6_e2m3", rounding="nearest_away", vector_precision="bf16").eval()
    x = torch.randn(2, 3, 20)  # N-d input: Flatten -> Gemm -> Reshape
    path = tmp_path / "m.onnx"
    model = bt.export_onnx(q, (x,), path, input_names=["x"], output_names=["y"])
    assert path.is_file()
    opts = bt.plan_options(model)
    assert opts["vector_precision"] == "bf16" and opts["format"].rounding == "nearest_away"
    with torch.no_grad():
        np.testing.assert_array_equal(_plan_output(str(path), x, **opts), q(x).numpy())


@needs_onnxscript
def test_onnx_export_refuses_what_one_plan_cannot_reproduce():
    net = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(bt.MixedFormatsError, match="different settings"):
        bt.export_onnx(bt.quantize_model(net, "msfp16", overrides={"fc": "msfp12"}), (x,))
    with pytest.raises(bt.MixedFormatsError, match="float matrix op"):
        bt.export_onnx(bt.quantize_model(net, "msfp16", overrides={"fc": None}), (x,))
    model = bt.export_onnx(bt.quantize_model(net, "msfp16", overrides={"fc": None}), (x,), strict=False)
    assert [n.op_type for n in model.graph.node].count("Gemm") == 1

    with pytest.raises(bt.MixedFormatsError, match="stochastic rounding of a convolution"):
        bt.export_onnx(bt.quantize_model(net, "msfp16", rounding="stochastic"), (x,))

    class FQ(nn.Module):
        def forward(self, x):
            return bt.fake_quantize(x)

    with pytest.raises(Exception, match="no ONNX form"):
        bt.export_onnx(FQ().eval(), (torch.randn(2, 16),))


@needs_onnxscript
def test_onnx_stochastic_dense_layers_match_the_plan():
    """Dense layers draw stochastic bits by the same element indices as the plan."""
    torch.manual_seed(10)
    net = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 6))
    q = bt.quantize_model(net, "msfp13", rounding="stochastic", seed=77).eval()
    x = torch.randn(5, 40)
    plan = bt.to_plan(q, (x,), input_names=["x"], output_names=["y"])
    assert plan.format.rounding == "stochastic" and plan.seed == 77
    with torch.no_grad():
        np.testing.assert_array_equal(bfpaccel.Session(plan).run(None, {"x": x.numpy()})["y"], q(x).numpy())


@needs_onnxscript
def test_onnx_vector_ops_in_float32_differ_by_the_fp16_rounding():
    """Where torch runs a vector op in float32 on values that are not fp16 already, the plan
    (vector_precision fp16) rounds that op's output to fp16: a ReLU right after a bias-free
    convolution and an average pool.  Each differs by at most that rounding (half an fp16 ulp,
    relative 2**-11, for normal values); the whole model then differs wherever such a value
    makes the next layer's BFP quantization round differently."""
    torch.manual_seed(9)

    class Head(nn.Module):
        def __init__(self, pool: bool):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.pool = pool

        def forward(self, x):
            y = F.relu(self.conv(x))
            return F.avg_pool2d(y, 2) if self.pool else y

    x = torch.randn(2, 3, 8, 8)
    for pool in (False, True):
        q = bt.quantize_model(Head(pool), "msfp16").eval()
        with torch.no_grad():
            want = q(x).numpy()
        got = _plan_output(bt.export_onnx(q, (x,), input_names=["x"], output_names=["y"]), x, format="msfp16")
        np.testing.assert_array_equal(got, bfpaccel.fake_quantize(got, "fp16"))  # the plan's values are fp16
        err = np.abs(got.astype(np.float64) - want)
        # half an fp16 ulp per rounded vector op (ReLU; then the pool's own): relative 2**-11 each
        bound = np.abs(want) * 2.0 ** (-10 if pool else -11) + 2.0**-24
        assert (err <= bound).all(), float((err - bound).max())
        assert (err > 0).any()  # not exact: the rounding is real
