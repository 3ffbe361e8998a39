"""bfpaccel.accuracy: the per-format accuracy report (agreement with float32, logit error,
true accuracy on labelled images, SSD detection matching) and the `accuracy` CLI handler.

A tiny classifier ONNX (built with onnx.helper, with the converter's metadata) and generated
JPEGs keep it fast; the BFP side is the real bfpaccel.compile/Session."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import simplejpeg

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from bfpaccel import accuracy  # noqa: E402

H = W = 32
CLASSES = 10


def _tiny_classifier(path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.normal(0, 0.05, (16, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(0, 0.5, (16, CLASSES)).astype(np.float32), "fc")
    perm = helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2])
    conv = helper.make_node("Conv", ["xt", "w"], ["c"], pads=[1, 1, 1, 1])
    relu = helper.make_node("Relu", ["c"], ["r"])
    gap = helper.make_node("GlobalAveragePool", ["r"], ["g"])
    flat = helper.make_node("Flatten", ["g"], ["f"])
    mm = helper.make_node("MatMul", ["f", "fc"], ["logits"])
    graph = helper.make_graph([perm, conv, relu, gap, flat, mm], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", H, W, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
                              [w, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    pre = {"kind": "image", "order": "RGB", "scaling_factor": 1.0, "output_height": H, "output_width": W,
           "preserve_aspect_ratio": False, "string_input": "Placeholder:0", "input_alias": "images", "onnx_input": "x"}
    helper.set_model_props(model, {"bfpaccel.preprocess": json.dumps(pre),
                                   "bfpaccel.outputs": json.dumps([{"name": "logits", "alias": None,
                                                                    "onnx_output": "logits"}])})
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("acc")
    model = _tiny_classifier(root / "tiny.onnx")
    imgs = root / "images"
    imgs.mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):
        img = rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)
        name = f"imagenet_{i:02d}_{i % 3}.jpg" if i < 4 else f"photo{i}.jpg"  # 4 labelled, 2 not
        (imgs / name).write_bytes(simplejpeg.encode_jpeg(img, quality=90))
    return model, str(imgs)


def _ort_runner(noise):
    """Seam for the report machinery: onnxruntime plus a known perturbation."""
    def factory(onnx_path, fmt, weight_format, vector_precision, num_threads):
        run, _, _, _ = accuracy._onnxruntime_runner(onnx_path, num_threads)
        return lambda x: {k: v + noise * np.abs(v).max() for k, v in run(x).items()}
    return factory


def test_report_machinery_with_exact_and_perturbed_runner(setup):
    model, imgs = setup
    r = accuracy.accuracy_report(model, ["same"], imgs, progress=False, log=lambda m: None,
                                 _bfp_runner_factory=_ort_runner(0.0), batch_size=4)
    assert r["num_images"] == 6 and r["labelled_images"] == 4 and r["task"] == "classification"
    d = r["formats"]["same"]
    assert d["top1_agreement"] == 1.0 and d["top5_agreement"] == 1.0
    assert d["rel_err_max"] == 0.0
    assert d["top1"] == r["float32"]["top1"] and d["labelled_images"] == 4
    r2 = accuracy.accuracy_report(model, ["noisy"], imgs, progress=False, log=lambda m: None,
                                  _bfp_runner_factory=_ort_runner(0.5))
    assert r2["formats"]["noisy"]["rel_err_mean"] > 0.1  # a uniform shift: argmax unchanged
    assert r2["formats"]["noisy"]["top1_agreement"] == 1.0
    table = accuracy.format_report(r2)
    assert "noisy" in table and "top1 agree" in table and "top5" in table


def test_detection_matching():
    a = np.array([[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]])
    b = np.array([[0.12, 0.1, 0.5, 0.52], [0.0, 0.0, 0.2, 0.2]])
    iou = accuracy._iou(a, b)
    assert iou.shape == (2, 2) and iou[0, 0] > 0.9 and iou[1, 1] == 0
    assert accuracy._matched((np.array([3, 4]), None, a), (np.array([3, 4]), None, b)) == 1
    assert accuracy._matched((np.array([3, 4]), None, a), (np.array([5, 4]), None, b)) == 0


def test_bad_inputs_are_clear(setup, tmp_path):
    model, imgs = setup
    with pytest.raises(ValueError, match="unknown model 'resnet51'"):
        accuracy.resolve_model("resnet51", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        accuracy.load_images(str(tmp_path / "nope"))
    assert accuracy.load_images(imgs)[0][1] == 0


def test_cli_real_bfp_path(setup, tmp_path, capsys):
    model, imgs = setup
    parser = argparse.ArgumentParser()
    accuracy.add_accuracy_parser(parser.add_subparsers())
    out = tmp_path / "r.json"
    args = parser.parse_args(["accuracy", "--model", model, "--images", imgs, "--formats", "msfp16,mxfp4_e2m1",
                              "--json", str(out), "--no-progress"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "msfp16" in text and "mxfp4_e2m1" in text
    r = json.loads(out.read_text())
    assert r["formats"]["msfp16"]["rel_err_max"] < 0.05
    assert r["formats"]["msfp16"]["top1_agreement"] >= 0.8
    assert r["formats"]["mxfp4_e2m1"]["rel_err_mean"] >= r["formats"]["msfp16"]["rel_err_mean"]


def test_cli_rejects_unknown_format(setup, capsys):
    model, imgs = setup
    parser = argparse.ArgumentParser()
    accuracy.add_accuracy_parser(parser.add_subparsers())
    args = parser.parse_args(["accuracy", "--model", model, "--images", imgs, "--formats", "msfp99"])
    assert args.func(args) == 1
    assert "msfp99" in capsys.readouterr().err
