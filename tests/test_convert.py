"""bfpaccel.convert: the seed's AccelOnnxConverter, locally (TF1 graph with the JPEG front ->
ONNX cut at the preprocessing output, in a subprocess), and the TF2 Keras path.

Needs the ``tf`` extra plus tf2onnx, onnx and onnxruntime; skipped without them."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import simplejpeg

tf = pytest.importorskip("tensorflow.compat.v1", reason="TensorFlow is an optional extra: pip install .[tf]")
pytest.importorskip("tf2onnx", reason="conversion needs tf2onnx")
ort = pytest.importorskip("onnxruntime", reason="the parity checks run the ONNX with onnxruntime")

from bfpaccel.convert import AccelOnnxConverter, convert_keras, read_onnx_metadata  # noqa: E402
from bfpaccel.models.utils import preprocess_array  # noqa: E402
from bfpaccel.preprocess import preprocess_jpeg  # noqa: E402

OUT = "classifier/net/predictions/Softmax:0"
CUT = "map_normalize_jpeg/TensorArrayV2Stack/TensorListStack:0"


def _jpegs(n: int = 3):
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        h, w = (200 + 40 * i, 260 - 30 * i)
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([x * 255 / w, y * 255 / h, rng.integers(0, 255, (h, w))], -1)
        out.append(simplejpeg.encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=90))
    return out


def _seed_graph(order: str = "RGB", scaling: float = 1.0):
    """The seed's shape of graph: string placeholder -> preprocess_array -> is_training ->
    a few convs with batch norm driven by tf.cond(is_training) -> classifier softmax."""
    rng = np.random.default_rng(0)
    x = tf.placeholder(tf.string)
    im = preprocess_array(x, order, scaling)
    is_training = tf.placeholder_with_default(False, (), "is_training")
    y = im
    cin = 3
    with tf.variable_scope("net"):
        for i, cout in enumerate((8, 16)):
            w = tf.Variable(rng.normal(0, 0.05, (3, 3, cin, cout)).astype(np.float32), name=f"conv{i}")
            y = tf.nn.conv2d(y, w, [1, 2, 2, 1], "SAME")
            mean = tf.Variable(rng.normal(0, 0.1, cout).astype(np.float32), name=f"mean{i}")
            batch_mean = tf.reduce_mean(y, [0, 1, 2])
            m = tf.cond(is_training, lambda: batch_mean, lambda: tf.identity(mean))
            y = tf.nn.relu(tf.nn.batch_normalization(y, m, tf.constant(np.ones(cout, np.float32) * 2), 0.1, 1.2, 1e-3))
            cin = cout
        feat = tf.reduce_mean(y, [1, 2])
    with tf.variable_scope("classifier/net"):
        w = tf.Variable(rng.normal(0, 0.3, (cin, 10)).astype(np.float32), name="fc")
        out = tf.nn.softmax(tf.matmul(feat, w), name="predictions/Softmax")
    assert out.name == OUT
    return x, im, out


@pytest.fixture(scope="module")
def seed_model(tmp_path_factory):
    """SavedModel (simple_save, as the seed's notebooks) + a frozen .pb of the same graph,
    + TF's own outputs on three JPEGs."""
    root = tmp_path_factory.mktemp("convert")
    jpegs = _jpegs()
    graph = tf.Graph()
    with graph.as_default():
        x, im, out = _seed_graph()
        assert im.name == CUT
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            expected = sess.run(out, {x: jpegs})
            sm = str(root / "seed_saved_model")
            tf.saved_model.simple_save(sess, sm, inputs={"images": x}, outputs={"output_alias": out})
            frozen = tf.graph_util.convert_variables_to_constants(sess, graph.as_graph_def(), [out.op.name])
    pb = root / "seed_frozen.pb"
    pb.write_bytes(frozen.SerializeToString())
    return {"root": root, "saved_model": sm, "pb": str(pb), "jpegs": jpegs, "expected": expected}


@pytest.fixture(scope="module")
def converted(seed_model):
    op = AccelOnnxConverter.convert_tf_model(None, seed_model["saved_model"], "images", "output_alias",
                                             output_path=str(seed_model["root"] / "seed.onnx"), timeout=300)
    assert op.get_status() in ("InProgress", "Succeeded")
    op.wait_for_completion()
    assert op.state == "Succeeded", op.error
    return op


def test_saved_model_converts_and_matches_tf(seed_model, converted):
    assert converted.get_status() == "Succeeded"
    assert converted.result == str(seed_model["root"] / "seed.onnx")
    assert os.path.isfile(converted.log_path)
    sess = ort.InferenceSession(converted.result, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [CUT]
    assert [o.name for o in sess.get_outputs()] == [OUT]  # ONNX output names = the seed's TF names
    got = sess.run(None, {CUT: preprocess_jpeg(seed_model["jpegs"])})[0]
    np.testing.assert_allclose(got, seed_model["expected"], rtol=0, atol=1e-5)


def test_metadata_records_front_and_outputs(converted):
    meta = read_onnx_metadata(converted.result)
    assert meta["preprocess"] == {
        "kind": "image", "order": "RGB", "scaling_factor": 1.0, "output_height": 224, "output_width": 224,
        "preserve_aspect_ratio": True, "string_input": "Placeholder:0", "input_alias": "images", "onnx_input": CUT,
    }
    assert meta["outputs"] == [{"name": OUT, "alias": "output_alias", "onnx_output": OUT}]
    assert meta["converter"]["opset"] == 15
    assert converted.details["peak_rss_mb"] > 0


def test_frozen_pb_with_registry_seam(seed_model):
    class Registry:
        def __init__(self):
            self.registered = []

        def model_path(self, model):
            assert model == "seed:1"
            return seed_model["pb"]

        def register_converted(self, model, onnx_path, metadata):
            self.registered.append((model, onnx_path, metadata))
            return {"id": "seed.1.accelonnx:1", "path": onnx_path}

    reg = Registry()
    op = AccelOnnxConverter.convert_tf_model(reg, "seed:1", "Placeholder:0", [OUT], timeout=300)
    assert op.wait_for_completion() == "Succeeded", op.error
    assert op.result["id"] == "seed.1.accelonnx:1"
    (model, path, metadata), = reg.registered
    pre = json.loads(metadata["bfpaccel.preprocess"])
    assert pre["kind"] == "image" and pre["input_alias"] is None  # a frozen .pb has no signature aliases
    got = ort.InferenceSession(path).run(None, {pre["onnx_input"]: preprocess_jpeg(seed_model["jpegs"])})[0]
    np.testing.assert_allclose(got, seed_model["expected"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("inp, outs, pattern", [
    ("Placeholdr:0", OUT, r"input tensor 'Placeholdr:0'.*Close names: 'Placeholder:0'"),
    ("image", OUT, r"input tensor 'image' is not in the graph.*'images'"),
    ("images", "classifier/net/predictions/Softmx:0", r"output tensor .*Softmx.*Close names: .*Softmax:0"),
    ("images", "output_alias, nope:0", r"output tensor 'nope:0'"),
    ("images", " , ", r"output_tensors is empty"),
    ("images,Placeholder:0", OUT, r"one tensor name"),
])
def test_bad_names_raise_before_starting(seed_model, inp, outs, pattern):
    t = time.perf_counter()
    with pytest.raises(ValueError, match=pattern):
        AccelOnnxConverter.convert_tf_model(None, seed_model["saved_model"], inp, outs,
                                            output_path=str(seed_model["root"] / "never.onnx"))
    assert time.perf_counter() - t < 5
    assert not os.path.exists(seed_model["root"] / "never.onnx.log")


def test_missing_source_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no registry"):
        AccelOnnxConverter.convert_tf_model(None, "resnet50:1", "images", "output_alias")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without saved_model.pb"):
        AccelOnnxConverter.convert_tf_model(None, str(tmp_path / "empty"), "images", "output_alias")


def test_timeout_kills_the_worker(seed_model):
    t = time.perf_counter()
    op = AccelOnnxConverter.convert_tf_model(None, seed_model["saved_model"], "images", "output_alias",
                                             output_path=str(seed_model["root"] / "slow.onnx"), timeout=1.0,
                                             _test_env={"sleep_for_test": 60})
    assert op.wait_for_completion() == "TimedOut"
    assert time.perf_counter() - t < 20
    assert op.get_status() == "Failed"
    assert "timed out after 1 s" in op.error
    with pytest.raises(ValueError, match="not successful"):
        op.result
    # wait_for_completion's own timeout kills too
    op2 = AccelOnnxConverter.convert_tf_model(None, seed_model["saved_model"], "images", "output_alias",
                                              output_path=str(seed_model["root"] / "slow2.onnx"),
                                              _test_env={"sleep_for_test": 60})
    assert op2.wait_for_completion(timeout=0.5) == "TimedOut"
    assert op2._proc.poll() is not None


def test_failing_conversion_reports_log_tail(seed_model):
    # The node exists (passes the fast check) but has no output 3: TF fails inside the worker.
    op = AccelOnnxConverter.convert_tf_model(None, seed_model["saved_model"], "images",
                                             "classifier/net/predictions/Softmax:3",
                                             output_path=str(seed_model["root"] / "bad.onnx"), timeout=300)
    assert op.wait_for_completion() == "Failed"
    assert op.get_status() == "Failed"
    assert "exit status 1" in op.error and "BFPACCEL_CONVERT_ERROR" in op.error and "Softmax:3" in op.error
    assert not os.path.exists(seed_model["root"] / "bad.onnx")


def test_keras_tf2_path(tmp_path):
    import keras

    inp = keras.Input((16, 16, 3), name="x")
    y = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    y = keras.layers.GlobalAveragePooling2D()(y)
    out = keras.layers.Dense(5, activation="softmax")(y)
    model = keras.Model(inp, out)
    path = convert_keras(model, str(tmp_path / "k.onnx"))
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    sess = ort.InferenceSession(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, model.predict(x, verbose=0), atol=1e-5)
    assert read_onnx_metadata(path)["preprocess"]["kind"] == "tensor"
