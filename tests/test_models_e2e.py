"""The seed workflow end to end for each zoo model, on generated JPEGs:
TF1 graph (JPEG bytes -> preprocess_array -> featurizer -> classifier) -> SavedModel ->
AccelOnnxConverter (tf2onnx, subprocess) -> bfpaccel.compile -> Session / Predictor.

* format="fp32" (vector precision fp32): the runtime matches onnxruntime on the same ONNX
  within 1e-4 relative;
* msfp16: the top-1 class matches float32 on the test images (SSD: the class of the
  confident anchors);
* the Predictor applies the preprocessing recorded by the converter, bit-exact with the TF
  graph's own (checked through the float ONNX input).

Each model is built and converted once per session (random seeded weights: nothing is
downloaded); conversions run one at a time in a subprocess.
"""

from __future__ import annotations

import io
import os
from typing import Dict, List

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
ort = pytest.importorskip("onnxruntime")

import bfpaccel  # noqa: E402
from bfpaccel.models.zoo import ZOO_MODELS, build_zoo_onnx  # noqa: E402

MODELS = ["resnet50", "resnet152", "vgg16", "densenet121", "ssdvgg"]


def _jpegs() -> List[bytes]:
    from PIL import Image

    rng = np.random.default_rng(7)
    out = []
    for h, w in [(240, 320), (300, 200)]:
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(128 + 100 * np.sin(xx / (9 + 7 * c) + yy / (13 + 5 * c) + c)) for c in range(3)], -1)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("zoo"))
    built: Dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = build_zoo_onnx(name, "random", cache, log=lambda m: None)
        return built[name]

    return get


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


@pytest.mark.parametrize("name", MODELS)
def test_seed_model_end_to_end(zoo, name):
    path = zoo(name)
    images = _jpegs()
    fp32 = bfpaccel.Predictor(bfpaccel.compile(path, format="fp32"))
    assert fp32.takes_images and fp32.input_aliases >= {"images", "Placeholder:0"}
    x = fp32.preprocess(images)
    size = 300 if name == "ssdvgg" else 224
    assert x.shape == (2, size, size, 3)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))
    got = fp32.predict(x)
    if name == "ssdvgg":
        assert len(got) == 12
        assert sum(int(np.prod(v.shape[1:-1])) for k, v in got.items() if k.endswith("Reshape_1:0")) == 8432
    for seed_name, onnx_name in fp32.output_map.items():
        assert _rel(got[seed_name], want[onnx_name]) < 1e-4, seed_name

    q = bfpaccel.Predictor(bfpaccel.compile(path, format="msfp16"))
    out = q.predict_images(images)
    if name == "ssdvgg":
        for k in [k for k in out if k.endswith("Reshape_1:0")]:
            ref = got[k].reshape(-1, 21)
            y = out[k].reshape(-1, 21)
            top2 = np.sort(ref, axis=1)[:, -2:]
            confident = (top2[:, 1] - top2[:, 0]) > 0.05 * np.abs(ref).max()
            assert (y.argmax(1) == ref.argmax(1))[confident].mean() > 0.95, k
    else:
        (k,) = list(out)
        assert k.startswith("classifier/") and k.endswith(":0")
        # Random weights give flat class scores, so two classes can sit closer than msfp16's
        # rounding: the BFP top-1 must be float32's top-1, or a class float32 itself scores
        # within twice the largest score error of it (the real-weights test, EfficientNet-Lite0
        # on ImageNet photos in test_real_model.py, asserts plain top-1 agreement).
        ref, y = got[k].reshape(2, -1), out[k].reshape(2, -1)
        tol = 2 * np.abs(y - ref).max(axis=1)
        top32, topq = ref.argmax(1), y.argmax(1)
        for i in range(2):
            assert topq[i] == top32[i] or ref[i, top32[i]] - ref[i, topq[i]] <= tol[i], (i, topq[i], top32[i])
        assert (topq == top32).sum() >= 1
        assert _rel(out[k], got[k]) < 0.05


def test_plan_file_roundtrip_and_names(zoo, tmp_path):
    path = zoo("resnet50")
    plan = bfpaccel.compile(path, format="msfp16")
    p = plan.save(tmp_path / "rn50.bfpplan")
    pred = bfpaccel.Predictor(str(p))
    assert pred.output_names == ["classifier/resnet_v1_50/predictions/Softmax:0"]
    assert pred.resolve_output("output_alias") == "classifier/resnet_v1_50/predictions/Softmax:0"
    with pytest.raises(KeyError, match="unknown output"):
        pred.resolve_output("nope:0")
    out = pred.predict_images(_jpegs()[:1])
    probs = out["classifier/resnet_v1_50/predictions/Softmax:0"][0]
    assert probs.shape == (1000,) and abs(float(probs.sum()) - 1) < 1e-2
    top = bfpaccel.top_k(probs, 5, bfpaccel.labels.imagenet_labels())
    assert len(top) == 5 and all(isinstance(t[2], str) for t in top)


def test_corrupt_jpeg_is_a_clear_error(zoo):
    pred = bfpaccel.Predictor(bfpaccel.compile(zoo("resnet50"), format="msfp16"))
    with pytest.raises(ValueError):
        pred.predict_images([b"\xff\xd8\xff\xe0 not really a jpeg"])
