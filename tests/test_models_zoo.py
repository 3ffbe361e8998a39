"""The model zoo (bfpaccel.models): the seed's ten featurizer classes as TF1 graphs with the
seed's tensor names and shapes, seeded synthetic weights, the local checkpoint store, Keras
``.h5`` ImageNet weights, the Keras 3 / SavedModel path, and the numpy SSD decoding.

Every architecture is built once per module (random weights, batch 2; VGG-16 runs one forward
pass). No weights are downloaded: Keras files are written by the tests themselves."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, NamedTuple

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="TensorFlow is an optional extra: pip install .[tf]")
tf1 = tf.compat.v1

import bfpaccel.models as zoo  # noqa: E402
from bfpaccel.models import ssdvgg_utils  # noqa: E402
from bfpaccel.models._weights import WeightSpec, random_array  # noqa: E402

# Keras internals (saving .h5 files) trip numpy 2's __array__(copy=) deprecation; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

FEATURE = "brainwave_target_node_1_Version_0.1:0"
BATCH = 2


class Built(NamedTuple):
    model: Any
    graph: Any
    sess: Any
    x: Any
    outputs: list
    head: Any
    values: list  # outputs (+ head) on INPUT
    input: np.ndarray


def _input(size: int, std: float) -> np.ndarray:
    return (np.random.default_rng(123).standard_normal((BATCH, size, size, 3)) * std).astype(np.float32)


def _build(cls, base: str, weights: Any = "random", run: bool = True) -> Built:
    graph = tf.Graph()
    size = cls._input_size
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, size, size, 3], name="Placeholder")
        model = cls(base, weights=weights) if weights is not None else cls(base)
        out = model.import_graph_def(x)
        outputs = out if isinstance(out, list) else [out]
        head = model.get_default_classifier(out) if not isinstance(out, list) else None
    sess = tf1.Session(graph=graph)
    model.restore_weights(sess)
    inp = _input(size, model._input_std)
    values = sess.run(outputs + ([head] if head is not None else []), {x: inp}) if run else []
    return Built(model, graph, sess, x, outputs, head, values, inp)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("zoo_store"))


def _fixture(cls):
    @pytest.fixture(scope="module")
    def fx(base):
        built = _build(cls, base)
        yield built
        built.sess.close()
    return fx


rn50 = _fixture(zoo.Resnet50)
rn152 = _fixture(zoo.Resnet152)
vgg = _fixture(zoo.Vgg16)
dn121 = _fixture(zoo.Densenet121)
ssd = _fixture(zoo.SsdVgg)

CATALOGUE = [
    # class, folder, version, save_name, prefix, quantized
    (zoo.Resnet50, "rn50", "1.1.3", "resnet50", "resnet_v1_50/", False),
    (zoo.QuantizedResnet50, "msfprn50", "1.1.2", "resnet50", "resnet_v1_50/", True),
    (zoo.Resnet152, "rn152", "1.1.2", "resnet152", "resnet_v1_152/", False),
    (zoo.QuantizedResnet152, "msfprn152", "1.1.3", "resnet152", "resnet_v1_152/", True),
    (zoo.Vgg16, "vgg16", "1.1.3", "vgg16", "vgg_16/", False),
    (zoo.QuantizedVgg16, "msfpvgg16", "1.1.2", "vgg16", "vgg_16/", True),
    (zoo.Densenet121, "dn121", "1.1.4", "densenet121", "densenet121", False),
    (zoo.QuantizedDensenet121, "msfpdn121", "1.1.4", "densenet121", "densenet121", True),
    (zoo.SsdVgg, "vggssd", "1.1.3", "ssd_vgg", "ssd_300_vgg/", False),
    (zoo.QuantizedSsdVgg, "msfpvggssd", "1.1.3", "ssd_vgg", "ssd_300_vgg/", True),
]

CLASSIFIERS = [
    # fixture, feature dims, head input (in the classifier scope), head output
    ("rn50", 2048, "resnet_v1_50/pool5:0", "classifier/resnet_v1_50/predictions/Softmax:0"),
    ("rn152", 2048, "resnet_v1_152/pool5:0", "classifier/resnet_v1_152/predictions/Softmax:0"),
    ("vgg", 4096, "vgg_16/fc7/Relu:0", "classifier/vgg_16/fc8/squeezed:0"),
    ("dn121", 1024, "densenet121/final_block/global_avg_pool/Mean:0",
     "classifier/densenet121/predictions/Softmax:0"),
]


# ----- package surface -------------------------------------------------------------------
def test_import_is_tensorflow_free():
    code = "import sys, bfpaccel, bfpaccel.models; assert 'tensorflow' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("cls,folder,version,save_name,prefix,quantized", CATALOGUE,
                         ids=[c[0].__name__ for c in CATALOGUE])
def test_catalogue(tmp_path, cls, folder, version, save_name, prefix, quantized):
    m = cls(str(tmp_path), weights="random")
    assert m.version == m.model_version == version
    assert m.model_ref == save_name
    assert m.model_path == os.path.join(str(tmp_path), folder, version)
    assert m._prefix == prefix
    assert m.quantized is quantized
    assert m.input_tensor_list == ["InputImage:0"] and m.output_tensor_list == [FEATURE]
    size = 300 if "Ssd" in cls.__name__ else 224
    assert m.get_input_dims(0) == (None, size, size, 3)
    with pytest.raises(IndexError):
        m.get_input_dims(1)
    assert isinstance(zoo.DoesNotExistError("x"), ValueError)


@pytest.mark.parametrize("module", ["bfpaccel.models", "bfpaccel.models.accel_model", "bfpaccel.models._resnet",
                                    "bfpaccel.models._vgg16", "bfpaccel.models._densenet121",
                                    "bfpaccel.models._ssdvgg", "bfpaccel.models.ssdvgg_utils",
                                    "bfpaccel.models._weights", "bfpaccel.models.doesnotexisterror"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# ----- the classifier backbones ---------------------------------------------------------
@pytest.mark.parametrize("name,dims,head_in,head_out", CLASSIFIERS, ids=[c[0] for c in CLASSIFIERS])
def test_classifier_graph(request, name, dims, head_in, head_out):
    b: Built = request.getfixturevalue(name)
    g = b.graph
    feat = g.get_tensor_by_name(FEATURE)
    assert b.outputs[0] is feat and feat.shape.as_list() == [None, 1, 1, dims]
    assert b.model.output_tensor_list == [FEATURE] and b.model.input_tensor_list == ["Placeholder:0"]
    assert b.model.get_output_dims(0) == (None, 1, 1, dims)
    assert g.get_tensor_by_name("is_training:0").shape.as_list() == []
    assert g.get_tensor_by_name(f"classifier/{head_in}") is not None
    assert b.head.name == head_out and g.get_tensor_by_name(head_out) is b.head
    assert g.get_tensor_by_name(head_in) is not None  # the backbone's own tensor of that name
    feat_v, head_v = b.values
    assert feat_v.shape == (BATCH, 1, 1, dims) and head_v.shape == (BATCH, 1000)
    assert np.isfinite(feat_v).all() and np.isfinite(head_v).all()
    assert feat_v.std() > 1e-3 and np.abs(feat_v).max() < 1e3  # neither vanished nor exploded
    if name != "vgg":  # VGG's default classifier returns logits, as the seed
        np.testing.assert_allclose(head_v.sum(axis=1), 1.0, rtol=1e-5)
        assert head_v.max() < 0.5 and head_v.max() > 2e-3  # not one-hot, not uniform
    assert not np.allclose(head_v[0], head_v[1])  # the two inputs are told apart
    prefix = b.model._prefix
    names = [v.name for v in g.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)]
    assert names and all(n.startswith(prefix) for n in names)


def test_variable_names_follow_tf_slim(rn50, vgg, dn121):
    have = {v.name for v in rn50.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)}
    for n in ("resnet_v1_50/conv1/weights:0", "resnet_v1_50/conv1/BatchNorm/moving_variance:0",
              "resnet_v1_50/block1/unit_1/bottleneck_v1/shortcut/weights:0",
              "resnet_v1_50/block4/unit_3/bottleneck_v1/conv3/BatchNorm/gamma:0"):
        assert n in have
    have = {v.name: v for v in vgg.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)}
    assert have["vgg_16/fc6/weights:0"].shape.as_list() == [7, 7, 512, 4096]
    assert have["vgg_16/fc7/weights:0"].shape.as_list() == [1, 1, 4096, 4096]
    have = {v.name for v in dn121.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)}
    assert "densenet121/dense_block4/conv_block16/x2/Conv/weights:0" in have
    assert "densenet121/final_block/BatchNorm/beta:0" in have


def test_second_classifier_scope_is_uniquified(rn50):
    with rn50.graph.as_default():
        out = rn50.model.get_default_classifier(rn50.outputs[0])
        own = rn50.model.get_default_classifier(rn50.outputs[0], prefix="head")
    assert out.name == "classifier_1/resnet_v1_50/predictions/Softmax:0"  # seed behaviour
    assert own.name == "head/resnet_v1_50/predictions/Softmax:0"
    np.testing.assert_array_equal(rn50.sess.run(out, {rn50.x: rn50.input}), rn50.values[1])


def test_random_weights_are_deterministic(rn50, base):
    # Same numbers on every run and machine: pinned values of numpy default_rng(seed from the name).
    w = random_array(WeightSpec("resnet_v1_50/conv1/weights", (7, 7, 3, 64), "conv_in"), 60.0)
    np.testing.assert_allclose(w.ravel()[:3], [-0.0008961552521213889, 0.0015586260706186295,
                                               -0.0009770748438313603], rtol=1e-6)
    np.testing.assert_allclose(float(w.astype(np.float64).sum()), 0.08733147778636852, rtol=1e-5)
    again = _build(zoo.Resnet50, base)
    try:
        np.testing.assert_array_equal(again.values[0], rn50.values[0])
        np.testing.assert_array_equal(again.values[1], rn50.values[1])
    finally:
        again.sess.close()


def test_is_frozen_and_per_instance_lists(tmp_path):
    graph = tf.Graph()
    with graph.as_default():
        mine = tf1.get_variable("user_head/w", [3], trainable=True)
        x = tf1.placeholder(tf.float32, [None, 224, 224, 3])
        frozen = zoo.Vgg16(str(tmp_path), is_frozen=True, weights="random")
        other = zoo.Vgg16(str(tmp_path), weights="random")
        frozen.import_graph_def(x)
        trainable = graph.get_collection(tf1.GraphKeys.TRAINABLE_VARIABLES)
        assert trainable == [mine]  # the seed re-added a list object here
        assert len(graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)) == 1 + 30
    assert frozen.input_tensor_list == [x.name]
    assert other.input_tensor_list == ["InputImage:0"]  # the seed shared one class-level list


def test_input_validation(tmp_path):
    m = zoo.Resnet50(str(tmp_path), weights="random")
    with tf.Graph().as_default():
        with pytest.raises(ValueError, match="height 200"):
            m.import_graph_def(tf1.placeholder(tf.float32, [None, 200, 224, 3]))
        with pytest.raises(ValueError, match="rank 3"):
            m.import_graph_def(tf1.placeholder(tf.float32, [224, 224, 3]))
        with pytest.raises(ValueError, match="dtype uint8"):
            m.import_graph_def(tf1.placeholder(tf.uint8, [None, 224, 224, 3]))
        with pytest.raises(ValueError, match="channels 1"):
            m.import_graph_def(tf1.placeholder(tf.float32, [None, 224, 224, 1]))
    with pytest.raises(TypeError):
        m.import_graph_def(np.zeros((1, 224, 224, 3), np.float32))
    with pytest.raises(RuntimeError, match="import_graph_def"):
        m.restore_weights(object())
    with pytest.raises(ValueError, match="'random'"):
        zoo.Resnet50(str(tmp_path), weights="imagenet")
    with pytest.raises(ValueError, match="Keras"):
        zoo.SsdVgg(str(tmp_path), weights="x.h5")
    with pytest.raises(FileNotFoundError):
        zoo.Resnet50(str(tmp_path), weights=str(tmp_path / "missing.h5"))


# ----- the local store ----------------------------------------------------------------------
def test_missing_weights_error_names_files_and_options(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        zoo.Resnet50(str(tmp_path))
    msg = str(e.value)
    for part in (os.path.join(str(tmp_path), "rn50", "1.1.3"), "resnet50.index", "checkpoint",
                 "resnet50_classifier.pb", "custom_weights_directory", "weights='random'", ".h5", "downloaded"):
        assert part in msg, part
    with pytest.raises(FileNotFoundError, match="vggssd"):
        zoo.SsdVgg(str(tmp_path))


def test_store_round_trip(rn50, tmp_path):
    store = str(tmp_path / "store")
    model_dir = os.path.join(store, "rn50", "1.1.3")
    prefix = rn50.model.save_weights(os.path.join(model_dir, "resnet50"), rn50.sess)
    assert prefix == os.path.join(model_dir, "resnet50")
    rn50.model.save_classifier(os.path.join(model_dir, "resnet50_classifier.pb"))
    assert sorted(os.listdir(model_dir))[:2] == ["checkpoint", "resnet50.data-00000-of-00001"]
    loaded = _build(zoo.Resnet50, store, weights=None)  # the constructor finds the store
    try:
        assert loaded.model._weights_source == "store"
        np.testing.assert_array_equal(loaded.values[0], rn50.values[0])
        np.testing.assert_array_equal(loaded.values[1], rn50.values[1])
    finally:
        loaded.sess.close()
    # custom_weights_directory: the checkpoint (and classifier) come from there
    custom = zoo.Resnet50(str(tmp_path / "elsewhere"), custom_weights_directory=model_dir)
    w = custom.weight_arrays()
    ref = rn50.model.weight_arrays()
    assert w.keys() == ref.keys()
    for k in ("resnet_v1_50/conv1/weights", "resnet_v1_50/logits/weights", "resnet_v1_50/logits/biases"):
        np.testing.assert_array_equal(w[k], ref[k])


def test_ssd_store_has_no_classifier(ssd):
    with pytest.raises(zoo.DoesNotExistError):
        ssd.model.get_default_classifier(ssd.outputs[0])


# ----- SSD -------------------------------------------------------------------------------------
GRIDS = [(37, 4), (19, 6), (10, 6), (5, 6), (3, 4), (1, 4)]


def test_ssd_outputs(ssd):
    names = [f"ssd_300_vgg/block{k}_box/Reshape_1:0" for k in (4, 7, 8, 9, 10, 11)]
    names += [f"ssd_300_vgg/block{k}_box/Reshape:0" for k in (4, 7, 8, 9, 10, 11)]
    assert [t.name for t in ssd.outputs] == names == ssd.model.output_tensor_list
    for i, t in enumerate(ssd.outputs):
        assert ssd.graph.get_tensor_by_name(names[i]) is t
        g, a = GRIDS[i % 6]
        shape = [None, g, g, a, 21 if i < 6 else 4]
        assert t.shape.as_list() == shape and ssd.model.get_output_dims(i) == tuple(shape)
        assert ssd.values[i].shape == (BATCH,) + tuple(shape[1:]) and np.isfinite(ssd.values[i]).all()
    assert sum(g * g * a for g, a in GRIDS) == 8432
    conv6 = ssd.graph.get_operation_by_name("ssd_300_vgg/conv6/Conv2D")
    assert list(conv6.get_attr("dilations")) == [1, 6, 6, 1]  # no SpaceToBatch
    assert not [op for op in ssd.graph.get_operations() if op.type.startswith("SpaceToBatch")]
    dets = ssdvgg_utils.postprocess(ssd.values, select_threshold=0.2)
    assert isinstance(dets, list) and len(dets) == BATCH
    classes, scores, bboxes = dets[0]
    assert bboxes.shape == (classes.size, 4) and (scores > 0.2).all()


# ----- ssdvgg_utils on hand-built outputs -------------------------------------------------
def _zero_outputs(batch: bool = True) -> list:
    lead = (1,) if batch else ()
    outs = [np.zeros(lead + (g, g, a, 21), np.float32) for g, a in GRIDS]
    return outs + [np.zeros(lead + (g, g, a, 4), np.float32) for g, a in GRIDS]


def test_anchors_and_decoding():
    anchors = ssdvgg_utils.compute_anchors()
    assert [a[0].shape[:2] for a in anchors] == [(g, g) for g, _ in GRIDS]
    assert [a[2].size for a in anchors] == [a for _, a in GRIDS]
    y, x, h, w = anchors[0]
    assert np.isclose(y[0, 0, 0], 0.5 * 8 / 300) and np.isclose(x[0, 1, 0], 1.5 * 8 / 300)
    assert np.isclose(h[0], 21 / 300) and np.isclose(h[1], np.sqrt(21 * 45) / 300)
    assert np.isclose(h[2], 21 / 300 / np.sqrt(2)) and np.isclose(w[2], 21 / 300 * np.sqrt(2))
    # zero offsets decode to the anchor box itself
    boxes = ssdvgg_utils.decode_layer_boxes(np.zeros((37, 37, 4, 4), np.float32), anchors[0])
    np.testing.assert_allclose(boxes[3, 5, 2], [y[3, 5, 0] - h[2] / 2, x[3, 5, 0] - w[2] / 2,
                                                y[3, 5, 0] + h[2] / 2, x[3, 5, 0] + w[2] / 2], rtol=1e-6)
    # dx = 1 shifts the centre by 0.1 * anchor width; dw = 1 scales the width by exp(0.2)
    loc = np.zeros((1, 1, 4, 4), np.float32)
    loc[0, 0, 0] = [1.0, 0.0, 1.0, 0.0]
    b = ssdvgg_utils.decode_layer_boxes(loc, anchors[5])[0, 0, 0]
    wa = anchors[5][3][0]
    assert np.isclose((b[1] + b[3]) / 2, 0.5 + 0.1 * wa) and np.isclose(b[3] - b[1], wa * np.exp(0.2))


def test_postprocess_threshold_nms_and_ranks():
    outs = _zero_outputs()
    assert ssdvgg_utils.postprocess(outs)[0].size == 0
    # layer 5 (1x1 grid): anchors 0 and 1 overlap with IoU (261^2 / (261*315)) ~ 0.83
    outs[5][0, 0, 0, 0, 3] = 10.0
    outs[5][0, 0, 0, 1, 3] = 8.0
    classes, scores, bboxes = ssdvgg_utils.postprocess(outs)
    assert classes.tolist() == [3] and scores[0] > 0.99  # NMS removed the duplicate
    np.testing.assert_allclose(bboxes[0], [0.065, 0.065, 0.935, 0.935], atol=1e-6)
    assert ssdvgg_utils.postprocess(outs, nms_threshold=0.9)[0].tolist() == [3, 3]  # honoured
    outs[5][0, 0, 0, 1] = 0.0
    outs[5][0, 0, 0, 1, 7] = 8.0
    assert ssdvgg_utils.postprocess(outs)[0].tolist() == [3, 7]  # NMS is per class
    # select_threshold honoured: a score of exactly 0.6 (logit ln 30 against 20 zeros)
    outs = _zero_outputs()
    outs[4][0, 1, 2, 0, 5] = np.log(30.0)
    np.testing.assert_allclose(ssdvgg_utils.postprocess(outs, select_threshold=0.5)[1], [0.6], rtol=1e-5)
    assert ssdvgg_utils.postprocess(outs, select_threshold=0.7)[0].size == 0
    # 4-D input (no batch dimension) gives the same; a batch of two gives a list
    flat = [o[0] for o in outs]
    for a, b in zip(ssdvgg_utils.postprocess(flat, select_threshold=0.5),
                    ssdvgg_utils.postprocess(outs, select_threshold=0.5)):
        np.testing.assert_array_equal(a, b)
    two = [np.concatenate([o, np.zeros_like(o)]) for o in outs]
    res = ssdvgg_utils.postprocess(two)
    assert len(res) == 2 and res[0][0].tolist() == [5] and res[1][0].size == 0
    with pytest.raises(ValueError, match="12"):
        ssdvgg_utils.postprocess(outs[:6])
    with pytest.raises(ValueError, match="grid"):
        ssdvgg_utils.postprocess(outs[6:] + outs[:6])


# ----- Keras: .h5 ImageNet files, keras_model, SavedModel ------------------------------------
@pytest.fixture(scope="module")
def keras_rn50(rn50, tmp_path_factory):
    """keras.applications.ResNet50 holding rn50's random weights, saved as a legacy .h5
    (the layout of the published ImageNet files) and as a Keras 3 .weights.h5."""
    keras = pytest.importorskip("keras")
    arrays = rn50.model.weight_arrays()
    body, head = rn50.model._all_specs()
    km = keras.applications.ResNet50(weights=None)
    by_layer: dict = {}
    for s in list(body) + list(head):
        by_layer.setdefault(s.keras[0], {})[s.keras[1]] = s
    for layer in km.layers:
        for i, v in enumerate(layer.weights):
            v.assign(arrays[by_layer[layer.name][i].name].reshape(tuple(v.shape)))
    d = tmp_path_factory.mktemp("keras")
    legacy, new = str(d / "resnet50_imagenet.h5"), str(d / "resnet50.weights.h5")
    km.save(legacy)
    km.save_weights(new)
    feat = keras.Model(km.input, km.get_layer("avg_pool").output)
    return km.predict(rn50.input, verbose=0), feat.predict(rn50.input, verbose=0), legacy, new


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_keras_h5_weights(rn50, keras_rn50, base):
    probs, feat, legacy, new = keras_rn50
    built = _build(zoo.Resnet50, base, weights=legacy)
    try:
        assert _rel(built.values[0].reshape(BATCH, -1), feat) < 1e-4
        assert _rel(built.values[1], probs) < 1e-4
    finally:
        built.sess.close()
    ref = rn50.model.weight_arrays()
    for path in (legacy, new):
        got = zoo.Resnet50(base, weights=path).weight_arrays()
        assert got.keys() == ref.keys()
        assert all(np.array_equal(got[k], ref[k]) for k in ref), path


def test_keras_model_and_saved_model(rn50, tmp_path):
    km = rn50.model.keras_model()
    assert km.input.shape == (None, 224, 224, 3) and km.output.shape == (None, 1000)
    assert _rel(np.asarray(km.predict(rn50.input, verbose=0)), rn50.values[1]) < 1e-4
    feat = rn50.model.keras_model(include_classifier=False)
    assert _rel(np.asarray(feat.predict(rn50.input, verbose=0)), rn50.values[0]) < 1e-4
    path = rn50.model.export_saved_model(str(tmp_path / "sm"))
    sig = tf.saved_model.load(path).signatures["serving_default"]
    (out,) = sig(images=tf.constant(rn50.input)).values()
    assert _rel(out.numpy(), rn50.values[1]) < 1e-4
