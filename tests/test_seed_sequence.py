"""The seed's whole sequence, end to end, as its notebooks run it -- locally:

build the TF graph (JPEG bytes -> preprocess_array -> QuantizedResnet50 -> classifier), save it,
register it, convert it (AccelOnnxConverter with the registry: `<name>.<ver>.accelonnx` with
parent_id), package it (AccelContainerImage / Image.create: compiled BFP plan), deploy it
(Webservice.deploy_from_image on the local target: a gRPC server subprocess, auth on), score a
JPEG with PredictionClient.score_file through client_from_service, top-5 labels, clean up in
the seed's order (out-of-order deletes refused).  The serving process never loads TensorFlow.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

import bfpaccel  # noqa: E402
from bfpaccel import models  # noqa: E402
from bfpaccel.convert import AccelOnnxConverter  # noqa: E402
from bfpaccel.deploy import AccelContainerImage, Image, LocalTarget, LocalWebservice, Webservice  # noqa: E402
from bfpaccel.registry import InUseError, Model, Registry  # noqa: E402

OUT = "classifier/resnet_v1_50/predictions/Softmax:0"


def _jpeg(path: str) -> str:
    from PIL import Image as PILImage

    yy, xx = np.mgrid[0:260, 0:340]
    img = np.stack([128 + 90 * np.sin(xx / (11 + 4 * c) + yy / (17 + 3 * c)) for c in range(3)], -1)
    PILImage.fromarray(img.astype(np.uint8)).save(path, format="JPEG", quality=92)
    return path


def test_register_convert_image_deploy_score_cleanup(tmp_path):
    # 1-7: the notebook's graph and SavedModel
    saved = str(tmp_path / "resnet50_saved")
    graph = tf.Graph()
    with graph.as_default():
        in_images = tf.compat.v1.placeholder(tf.string)
        image_tensors = models.preprocess_array(in_images)
        model = models.QuantizedResnet50(str(tmp_path / "store"), is_frozen=True, weights="random")
        features = model.import_graph_def(image_tensors)
        out = model.get_default_classifier(features)
        assert in_images.name == "Placeholder:0" and out.name == OUT
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            model.restore_weights(sess)
            tf.compat.v1.saved_model.simple_save(sess, saved, inputs={"images": in_images},
                                                 outputs={"output_alias": out})
    # 8: register
    reg = Registry(str(tmp_path / "registry"))
    registered = Model.register(reg, saved, "resnet50-seed", tags={"arch": "resnet50"})
    assert registered.id == "resnet50-seed:1"
    # 9: convert (output names as one comma-joined string, as the notebooks require)
    op = AccelOnnxConverter.convert_tf_model(reg, registered, in_images.name, OUT)
    assert op.wait_for_completion(show_output=False) == "Succeeded", op.error
    converted = op.result
    assert converted.parent_id == registered.id and converted.name.endswith(".accelonnx")
    # 10: image (compiles the BFP plan)
    image = Image.create(reg, "resnet50-image", [converted], AccelContainerImage.image_configuration())
    image.wait_for_creation(show_output=False)
    assert os.path.isfile(os.path.join(os.path.dirname(image.plan_path), "Dockerfile"))
    # 12: deploy locally with auth
    svc = Webservice.deploy_from_image(reg, "resnet50-svc", image,
                                       LocalWebservice.deploy_configuration(auth_enabled=True), LocalTarget())
    try:
        assert svc.wait_for_deployment(timeout=180) == "Healthy", svc.get_logs()
        with open(f"/proc/{svc.pid}/maps") as f:
            assert "tensorflow" not in f.read()  # the serving side runs without TensorFlow
        # 13-14: the seed's client, as the notebook calls it
        client = bfpaccel.client_from_service(svc)
        jpeg = _jpeg(str(tmp_path / "cat.jpg"))
        probs = client.score_file(jpeg, input_name=in_images.name, outputs=OUT)
        assert probs.shape == (1000,) and abs(float(probs.sum()) - 1) < 1e-2
        # the same numbers as the plan in-process
        local = bfpaccel.Predictor(image.plan_path).predict_images([open(jpeg, "rb").read()])[OUT][0]
        np.testing.assert_array_equal(probs, local)
        # 15: top-5 labels
        top5 = bfpaccel.top_k(probs, 5, bfpaccel.labels.imagenet_labels())
        assert len(top5) == 5 and top5[0][0] == int(np.argmax(probs))
        # 16: clean up in the seed's order; out of order is refused
        with pytest.raises(InUseError):
            image.delete()
        with pytest.raises(InUseError):
            registered.delete()
    finally:
        svc.delete()
    image.delete()
    with pytest.raises(InUseError):
        registered.delete()
    converted.delete()
    registered.delete()
    assert Model.list(reg) == []
