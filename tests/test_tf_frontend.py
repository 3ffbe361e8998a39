"""bfpaccel.tf: TensorFlow ops and Keras layers that compute what the compiled BFP plan computes,
and the Quantized* zoo graphs built from them.

Every forward check is bit for bit against ``bfpaccel.compile`` + ``bfpaccel.Session`` of the
float op (one-op ONNX graphs written here, or the converter's ONNX of a whole TF graph); the
backward checks compare with the float op's gradients at the dequantized operands. The
ResNet-50 checks build the network once (random weights) on a real ImageNet photo (foolbox's
JPEGs, or a generated JPEG when foolbox is not installed)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="TensorFlow is an optional extra: pip install .[tf]")
pytest.importorskip("tf2onnx", reason="the export checks convert with tf2onnx")
onnx = pytest.importorskip("onnx")
tf1 = tf.compat.v1

import bfpaccel  # noqa: E402
import bfpaccel.tf as btf  # noqa: E402
from bfpaccel import core, models  # noqa: E402
from bfpaccel.convert import AccelOnnxConverter  # noqa: E402
from conftest import assert_bits_equal  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FEATURE = "brainwave_target_node_1_Version_0.1:0"
SOFTMAX = "classifier/resnet_v1_50/predictions/Softmax:0"
rng = np.random.default_rng(2024)


def _r(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------- one-op plans
def _nhwc_graph(core_nodes, inputs, inits, out="y", nchw_in=("x",), nchw_out=True):
    """A graph over NHWC inputs the way tf2onnx writes one: Transpose to NCHW around the op."""
    nodes = [helper.make_node("Transpose", [n], [n + "_nchw"], perm=[0, 3, 1, 2]) for n in nchw_in]
    nodes += core_nodes
    if nchw_out:
        nodes.append(helper.make_node("Transpose", [out + "_nchw"], [out], perm=[0, 2, 3, 1]))
    vis = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs]
    g = helper.make_graph(nodes, "g", vis, [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])


def _run_plan(model, feeds, fmt="msfp16", vp=None, out="y"):
    plan = bfpaccel.compile(model.SerializeToString(), fmt, vector_precision=vp)
    return bfpaccel.Session(plan).run(None, feeds)[out]


def _conv_model(w, b, strides, pads, dil, residual, relu):
    ins = ["x_nchw", "w"] + (["b"] if b is not None else [])
    nodes = [helper.make_node("Conv", ins, ["c"], strides=list(strides), pads=list(pads), dilations=list(dil))]
    cur = "c"
    if residual:
        nodes.append(helper.make_node("Add", [cur, "r_nchw"], ["s"]))
        cur = "s"
    nodes.append(helper.make_node("Relu" if relu else "Identity", [cur], ["y_nchw"]))
    inits = {"w": w.transpose(3, 2, 0, 1).copy()}
    if b is not None:
        inits["b"] = b
    return _nhwc_graph(nodes, ["x"] + (["r"] if residual else []), inits,
                       nchw_in=("x", "r") if residual else ("x",))


CONV_CASES = [
    # strides, padding (TF), ONNX pads (t, l, b, r), dilations, bias, residual, relu
    ((1, 1), "SAME", (1, 1, 1, 1), (1, 1), True, False, True),
    ((2, 1), "SAME", (1, 1, 1, 1), (1, 1), True, True, True),
    ((2, 2), "VALID", (0, 0, 0, 0), (1, 1), False, False, False),  # raw accumulators, unrounded
    ((1, 1), [[0, 0], [2, 0], [1, 3], [0, 0]], (2, 1, 0, 3), (1, 1), True, False, False),
    ((1, 1), "SAME", (2, 2, 2, 2), (2, 2), True, False, True),
]


@pytest.mark.parametrize("strides,padding,pads,dil,bias,residual,relu", CONV_CASES)
def test_conv2d_matches_plan(strides, padding, pads, dil, bias, residual, relu):
    x, w = _r(2, 9, 10, 40), _r(3, 3, 40, 24, scale=0.2)
    b = _r(24) if bias else None
    y = btf.bfp_conv2d(x, w, strides, padding, bias=b, activation="relu" if relu else None, dilations=dil)
    res = _r(*y.shape) if residual else None
    if residual:
        y = btf.bfp_conv2d(x, w, strides, padding, bias=b, residual=res, activation="relu" if relu else None,
                           dilations=dil)
    feeds = {"x": x} if not residual else {"x": x, "r": res}
    ref = _run_plan(_conv_model(w, b, strides, pads, dil, residual, relu), feeds)
    assert_bits_equal(y.numpy(), ref, "bfp_conv2d")


@pytest.mark.parametrize("fmt,vp", [("msfp12", "fp16"), ("mxfp8_e4m3", "bf16"), ("msfp16", "fp32")])
def test_conv2d_formats_and_vector_precisions(fmt, vp):
    x, w, b = _r(1, 6, 6, 32), _r(3, 3, 32, 16, scale=0.2), _r(16)
    y = btf.bfp_conv2d(x, w, 1, "SAME", fmt, bias=b, activation="relu", vector_precision=vp)
    ref = _run_plan(_conv_model(w, b, (1, 1), (1, 1, 1, 1), (1, 1), False, True), {"x": x}, fmt, vp)
    assert_bits_equal(y.numpy(), ref, f"{fmt}/{vp}")


def test_conv2d_float_format_is_the_float_op():
    x, w, b = _r(1, 6, 6, 8), _r(3, 3, 8, 4), _r(4)
    for fmt in (None, "fp32"):
        y = btf.bfp_conv2d(x, w, 1, "SAME", fmt, bias=b, activation="relu")
        ref = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b))
        np.testing.assert_array_equal(y.numpy(), ref.numpy())


def test_matmul_matches_plan():
    for shape in ((5, 100), (2, 3, 100)):
        x, w, b = _r(*shape), _r(100, 30, scale=0.1), _r(30)
        y = btf.bfp_matmul(x, w, bias=b, activation="relu")
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
                 helper.make_node("Relu", ["a"], ["y"])]
        m = _nhwc_graph(nodes, ["x"], {"w": w, "b": b}, nchw_in=(), nchw_out=False)
        assert_bits_equal(y.numpy(), _run_plan(m, {"x": x}), f"bfp_matmul {shape}")
    # no bias: the float32 accumulators, as bfpaccel.matmul gives them
    x, w = _r(4, 64), _r(64, 8)
    np.testing.assert_array_equal(btf.bfp_matmul(x, w).numpy(), bfpaccel.matmul(x, w, "msfp16"))


def test_fold_batch_norm_matches_the_compiler():
    x, w, b = _r(1, 7, 7, 32), _r(3, 3, 32, 16, scale=0.2), _r(16)
    gamma, beta, mean = 1 + _r(16, scale=0.1), _r(16, scale=0.1), _r(16, scale=0.1)
    var = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    w2, b2 = btf.fold_batch_norm(w, b, gamma, beta, mean, var, 1.001e-5)
    y = btf.bfp_conv2d(x, w2, 1, "SAME", bias=b2, activation="relu")
    nodes = [helper.make_node("Conv", ["x_nchw", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["n"], epsilon=1.001e-5),
             helper.make_node("Relu", ["n"], ["y_nchw"])]
    m = _nhwc_graph(nodes, ["x"], {"w": w.transpose(3, 2, 0, 1).copy(), "b": b, "g": gamma, "be": beta, "m": mean,
                                   "v": var})
    assert_bits_equal(y.numpy(), _run_plan(m, {"x": x}), "folded conv")


def _vector_model(op_nodes, inits=None, nchw=True):
    return _nhwc_graph(op_nodes, ["x"], inits or {}, nchw_in=("x",) if nchw else (), nchw_out=nchw)


@pytest.mark.parametrize("vp", ["fp16", "bf16"])
def test_vector_ops_match_plan(vp):
    x = _r(2, 7, 9, 24, scale=3.0)
    cases = {
        "spatial_mean": (btf.vector_spatial_mean(x, vp),
                         _nhwc_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[1, 2], keepdims=1)],
                                     ["x"], {}, nchw_in=(), nchw_out=False)),
        "avg_pool valid": (btf.vector_avg_pool(x, 2, 2, "VALID", vp),
                           _vector_model([helper.make_node("AveragePool", ["x_nchw"], ["y_nchw"], kernel_shape=[2, 2],
                                                           strides=[2, 2])])),
        "avg_pool same": (btf.vector_avg_pool(x, 3, 2, "SAME", vp),
                          _vector_model([helper.make_node("AveragePool", ["x_nchw"], ["y_nchw"], kernel_shape=[3, 3],
                                                          strides=[2, 2], pads=[1, 1, 1, 1],
                                                          count_include_pad=0)])),
        "max_pool": (btf.vector_max_pool(x, 3, 2, "VALID", vp),
                     _vector_model([helper.make_node("MaxPool", ["x_nchw"], ["y_nchw"], kernel_shape=[3, 3],
                                                     strides=[2, 2])])),
        "relu": (btf.vector_relu(x, vp), _vector_model([helper.make_node("Relu", ["x"], ["y"])], nchw=False)),
        "round": (btf.round_to_vector_precision(x, vp),
                  _vector_model([helper.make_node("Add", ["x", "zero"], ["y"])], {"zero": np.zeros(1, np.float32)},
                                nchw=False)),
    }
    for name, (got, model) in cases.items():
        assert_bits_equal(got.numpy(), _run_plan(model, {"x": x}, vp=vp), name)
    a, b = _r(2, 5, 33), _r(33)
    m = _nhwc_graph([helper.make_node("Add", ["x", "b"], ["y"])], ["x"], {"b": b}, nchw_in=(), nchw_out=False)
    assert_bits_equal(btf.vector_add(a, b, vp).numpy(), _run_plan(m, {"x": a}, vp=vp), "add")
    logits = _r(3, 1000, scale=4.0)
    m = _nhwc_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], ["x"], {}, nchw_in=(), nchw_out=False)
    assert_bits_equal(btf.vector_softmax(logits, vp).numpy(), _run_plan(m, {"x": logits}, vp=vp), "softmax")
    gamma, beta, mean = 1 + _r(24, scale=0.1), _r(24), _r(24)
    var = rng.uniform(0.5, 2.0, 24).astype(np.float32)
    m = _vector_model([helper.make_node("BatchNormalization", ["x_nchw", "g", "b", "m", "v"], ["y_nchw"],
                                        epsilon=1e-3)], {"g": gamma, "b": beta, "m": mean, "v": var})
    assert_bits_equal(btf.vector_batch_norm(x, gamma, beta, mean, var, 1e-3, vp).numpy(),
                      _run_plan(m, {"x": x}, vp=vp), "batch norm (affine)")


def test_round_is_the_runtimes_rounding():
    x = np.array([1.0, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 65519.0, 65520.0, 1e-7, -0.0, np.nan, np.inf], np.float32)
    got = btf.round_to_vector_precision(x, "fp16").numpy()
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    assert_bits_equal(got, want, "fp16 rounding")
    assert btf.round_to_vector_precision(x, "fp32") is not None
    np.testing.assert_array_equal(btf.round_to_vector_precision(x, "fp32").numpy(), x)


# ----------------------------------------------------------------------------- gradients
def test_conv_gradients_are_straight_through():
    x, w, b = _r(2, 8, 8, 32), _r(3, 3, 32, 16, scale=0.2), _r(16)
    up = _r(2, 4, 4, 16)
    xt, wt, bt = tf.constant(x), tf.Variable(w), tf.Variable(b)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = btf.bfp_conv2d(xt, wt, 2, "SAME", bias=bt, activation="relu")
        loss = tf.reduce_sum(y * up)
    gx, gw, gb = tape.gradient(loss, [xt, wt, bt])
    # the float convolution at the dequantized operands, masked by the BFP output's ReLU
    xd = tf.constant(core.fake_quantize(x, "msfp16", axis=-1))
    wd = tf.Variable(core.fake_quantize(w, "msfp16", axis=2))
    dz = up * (y.numpy() > 0)
    with tf.GradientTape() as tape:
        tape.watch(xd)
        z = tf.nn.conv2d(xd, wd, 2, "SAME")
        ref_loss = tf.reduce_sum(z * dz)
    rx, rw = tape.gradient(ref_loss, [xd, wd])
    np.testing.assert_allclose(gx.numpy(), rx.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw.numpy(), rw.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb.numpy(), dz.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(xd.numpy(), x)  # the operands really were quantized


def test_matmul_and_vector_gradients_in_graph_mode():
    g = tf.Graph()
    with g.as_default():
        x = tf1.placeholder(tf.float32, [None, 48])
        w = tf1.get_variable("w", initializer=_r(48, 10, scale=0.2))
        b = tf1.get_variable("b", initializer=_r(10))
        h = btf.bfp_matmul(x, w, bias=b, activation="relu")
        y = btf.vector_softmax(h)
        r = btf.round_to_vector_precision(x * 3.0)
        gw, gb = tf1.gradients(tf.reduce_sum(y * y), [w, b])
        gr = tf1.gradients(tf.reduce_sum(r), x)[0]
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            xv = _r(4, 48)
            hv, yv, gwv, gbv, grv = sess.run([h, y, gw, gb, gr], {x: xv})
    # reference: the float softmax at the BFP logits, the ReLU mask of the BFP result, the float
    # product's gradient at the dequantized input
    with tf.GradientTape() as tape:
        ht = tf.constant(hv)
        tape.watch(ht)
        sm = tf.nn.softmax(ht)
    dz = tape.gradient(sm, ht, output_gradients=tf.constant(2 * yv)).numpy() * (hv > 0)
    xd = core.fake_quantize(xv, "msfp16", axis=-1)
    np.testing.assert_allclose(gwv, xd.T @ dz, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gbv, dz.sum(0), rtol=1e-4, atol=1e-6)
    assert np.abs(gwv).max() > 0
    np.testing.assert_array_equal(grv, np.full_like(xv, 3.0))  # rounding passes the gradient unchanged


# ----------------------------------------------------------------------------- errors
def test_bad_arguments_are_clear():
    x, w = tf.ones([1, 4, 4, 16]), tf.ones([3, 3, 16, 4])
    with pytest.raises(ValueError, match="block format or fp32"):
        btf.bfp_conv2d(x, w, format="fp16")
    with pytest.raises(ValueError, match="activation"):
        btf.bfp_conv2d(x, w, activation="tanh")
    with pytest.raises(ValueError, match="padding"):
        btf.bfp_conv2d(x, w, padding="FULL")
    with pytest.raises(ValueError, match="channels"):
        btf.bfp_conv2d(x, tf.ones([3, 3, 8, 4]))
    with pytest.raises(ValueError, match="K mismatch"):
        btf.bfp_matmul(tf.ones([2, 5]), tf.ones([6, 3]))
    with pytest.raises(ValueError, match="vector_precision"):
        btf.bfp_matmul(tf.ones([2, 5]), tf.ones([5, 3]), vector_precision="fp8")
    with pytest.raises(ValueError, match="block size"):
        btf.bfp_matmul(tf.ones([2, 5]), tf.ones([5, 3]), "msfp16", weight_format="mxint8")
    with pytest.raises(TypeError, match="float"):
        btf.bfp_matmul(tf.ones([2, 5], tf.int32), tf.ones([5, 3]))
    with pytest.raises(ValueError, match="Quantized"):
        models.Resnet50("/tmp/unused", weights="random", format="msfp16")
    with pytest.raises(ValueError):
        models.QuantizedResnet50("/tmp/unused", weights="random", format="nope")


def test_import_does_not_load_tensorflow():
    code = ("import sys, bfpaccel, bfpaccel.tf, bfpaccel.models; "
            "m = bfpaccel.models.QuantizedResnet50('/tmp/unused', weights='random'); "
            "assert m.format.name == 'msfp16' and m.vector_precision == 'fp16'; "
            "assert 'tensorflow' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ----------------------------------------------------------------------------- export
def test_small_graph_converts_to_the_same_numbers(tmp_path):
    """Every export rewrite (conv with fold and residual, batch norm, pools, add, relu, L2 norm,
    dense, softmax) through AccelOnnxConverter: the plan equals the TF graph bit for bit."""
    saved = str(tmp_path / "saved")
    g = tf.Graph()
    with g.as_default():
        x = tf1.placeholder(tf.float32, [None, 12, 12, 16], name="images")

        def var(name, shape, scale=0.2):
            return tf1.get_variable(name, initializer=_r(*shape, scale=scale))

        g1, b1, m1 = var("g1", [32], 0.1) + 1.0, var("b1", [32], 0.1), var("m1", [32], 0.1)
        v1 = tf1.get_variable("v1", initializer=rng.uniform(0.5, 1.5, 32).astype(np.float32))
        w2, c2 = btf.fold_batch_norm(var("w1", [3, 3, 16, 32]), var("c1", [32]), g1, b1, m1, v1, 1e-3)
        y = btf.bfp_conv2d(x, w2, 1, "SAME", bias=c2, activation="relu")
        y = btf.bfp_conv2d(y, var("w2", [1, 1, 32, 32]), 1, "VALID", bias=var("c2", [32]),
                           residual=y, activation="relu")
        y = btf.vector_max_pool(y, 2, 2, "VALID")
        z = btf.vector_batch_norm(y, g1, b1, m1, v1, 1e-3)
        z = btf.vector_relu(btf.vector_add(z, y))
        z = btf.vector_l2_normalize(z, var("gamma", [32], 1.0) + 5.0)
        z = btf.bfp_conv2d(z, var("w3", [3, 3, 32, 16]), 1, [[0, 0], [2, 0], [1, 1], [0, 0]])  # explicit pads
        z = btf.vector_avg_pool(z, 2, 2, "VALID")
        f = tf.reshape(btf.vector_spatial_mean(z), [-1, 16])
        out = tf.identity(btf.vector_softmax(btf.bfp_matmul(f, var("w4", [16, 10]), bias=var("c4", [10]))),
                          name="probs")
        assert btf.has_bfp_ops(g.as_graph_def())
        with tf1.Session(graph=g) as sess:
            sess.run(tf1.global_variables_initializer())
            xv = _r(2, 12, 12, 16)
            want = sess.run(out, {x: xv})
            tf1.saved_model.simple_save(sess, saved, inputs={"images": x}, outputs={"probs": out})
    op = AccelOnnxConverter.convert_tf_model(None, saved, "images", "probs:0", optimize=False)
    assert op.wait_for_completion() == "Succeeded", op.error
    assert "bfp_ops" in op.details["metadata"]["bfpaccel.converter"]
    model = onnx.load(op.result)
    assert not [n for n in model.graph.node if n.domain or n.op_type.startswith("PyFunc")]
    plan = bfpaccel.compile(op.result, "msfp16")
    got = bfpaccel.Session(plan).run(None, {plan.graph.inputs[0].name: xv})
    assert_bits_equal(next(iter(got.values())), want, "converted small graph")


# ----------------------------------------------------------------------------- the zoo
def _photo() -> bytes:
    try:
        from bfpaccel.labels import foolbox_imagenet_photos

        return open(foolbox_imagenet_photos()[0][0], "rb").read()
    except (ImportError, FileNotFoundError):
        from bfpaccel.serve.testing import make_image

        return make_image("jpeg", (320, 240), seed=3)


@pytest.fixture(scope="module")
def qrn50(tmp_path_factory):
    """The seed's notebook graph with QuantizedResnet50 (random weights) run on one photo,
    saved and converted: (front float image, features, probabilities, ONNX path, photo)."""
    d = tmp_path_factory.mktemp("qrn50")
    saved = str(d / "saved")
    jpeg = _photo()
    g = tf.Graph()
    with g.as_default():
        in_images = tf1.placeholder(tf.string)
        image_tensors = models.preprocess_array(in_images)
        model = models.QuantizedResnet50(str(d / "store"), is_frozen=True, weights="random")
        features = model.import_graph_def(image_tensors)
        probs = model.get_default_classifier(features)
        assert (in_images.name, features.name, probs.name) == ("Placeholder:0", FEATURE, SOFTMAX)
        assert g.get_tensor_by_name("is_training:0").shape.as_list() == []
        assert g.get_tensor_by_name("resnet_v1_50/pool5:0") is not None
        assert not g.get_collection(tf1.GraphKeys.TRAINABLE_VARIABLES)  # is_frozen
        with tf1.Session(graph=g) as sess:
            sess.run(tf1.global_variables_initializer())
            model.restore_weights(sess)
            front, feat, p = sess.run([image_tensors, features, probs], {in_images: [jpeg]})
            tf1.saved_model.simple_save(sess, saved, inputs={"images": in_images},
                                        outputs={"output_alias": probs, "features": features})
    op = AccelOnnxConverter.convert_tf_model(None, saved, in_images.name, f"{FEATURE},{SOFTMAX}",
                                             output_path=str(d / "qrn50.onnx"), optimize=False)
    assert op.wait_for_completion() == "Succeeded", op.error
    shutil.rmtree(saved, ignore_errors=True)
    return front, feat, p, op.result, jpeg


def test_quantized_resnet50_is_the_compiled_plan_bit_for_bit(qrn50):
    front, feat, probs, onnx_path, jpeg = qrn50
    assert feat.shape == (1, 1, 1, 2048) and probs.shape == (1, 1000)
    plan = bfpaccel.compile(onnx_path, "msfp16")
    got = bfpaccel.Session(plan).run(None, {plan.graph.inputs[0].name: front})
    assert_bits_equal(got[FEATURE], feat, "features")
    assert_bits_equal(got[SOFTMAX], probs, "probabilities")
    # the server's path: JPEG bytes -> bfpaccel.preprocess -> the plan
    served = bfpaccel.Predictor(plan).predict_images([jpeg])
    assert_bits_equal(served[SOFTMAX], probs, "served probabilities")
    # the quantization is real: the float graph is far from it, the fp32 plan of it close
    fp32 = bfpaccel.Session(bfpaccel.compile(onnx_path, "fp32")).run(None, {plan.graph.inputs[0].name: front})
    rel = np.abs(fp32[FEATURE] - feat).max() / np.abs(fp32[FEATURE]).max()
    assert 1e-4 < rel < 0.1


def test_quantized_resnet50_float_format_is_the_float_graph(tmp_path, qrn50):
    front = qrn50[0]
    outs = []
    for cls, kw in ((models.Resnet50, {}), (models.QuantizedResnet50, {"format": None})):
        g = tf.Graph()
        with g.as_default():
            x = tf1.placeholder(tf.float32, [None, 224, 224, 3])
            m = cls(str(tmp_path), weights="random", **kw)
            f = m.import_graph_def(x)
            assert not btf.has_bfp_ops(g.as_graph_def())
            with tf1.Session(graph=g) as sess:
                m.restore_weights(sess)
                outs.append(sess.run(f, {x: front}))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_quantized_resnet50_finetunes_through_the_straight_through_estimator(tmp_path, qrn50):
    """Two SGD steps on one image: every backbone variable gets a gradient (through the BFP
    convolutions, the folded batch norms, the residual epilogues, the mean and the softmax),
    the weights move and the loss goes down."""
    front = qrn50[0]
    g = tf.Graph()
    with g.as_default():
        x = tf1.placeholder(tf.float32, [None, 224, 224, 3])
        model = models.QuantizedResnet50(str(tmp_path), weights="random")
        probs = model.get_default_classifier(model.import_graph_def(x))
        loss = -tf.math.log(probs[0, 7] + 1e-9)
        every = g.get_collection(tf1.GraphKeys.TRAINABLE_VARIABLES)
        assert len(every) == 53 * 6  # conv weights + biases, BN gamma/beta/moving mean/moving variance
        grads = tf1.gradients(loss, every)
        # as in the float graph (TF's inference batch norm), the moving statistics get no gradient
        moving = [v.name.split("/")[-1].startswith("moving_") for v in every]
        assert [gr is None for gr in grads] == moving
        train_vars = [v for v, m in zip(every, moving) if not m]
        grads = [gr for gr, m in zip(grads, moving) if not m]
        step = tf1.train.GradientDescentOptimizer(0.05).apply_gradients(zip(grads, train_vars))
        (w,) = [v for v in train_vars if v.name == "resnet_v1_50/block1/unit_1/bottleneck_v1/conv2/weights:0"]
        with tf1.Session(graph=g) as sess:
            model.restore_weights(sess)
            w0, l0 = sess.run([w, loss], {x: front})
            gv = sess.run(grads[:6], {x: front})
            assert all(np.isfinite(a).all() and np.abs(a).max() > 0 for a in gv)
            for _ in range(2):
                sess.run(step, {x: front})
            w2, l2 = sess.run([w, loss], {x: front})
    assert not np.array_equal(w0, w2)
    assert l2 < l0, (l0, l2)


# ----------------------------------------------------------------------------- Keras
def test_keras_layers_train_and_export_to_the_same_numbers(tmp_path):
    keras = pytest.importorskip("keras")
    from bfpaccel.convert import convert_keras

    model = keras.Sequential([
        keras.Input((12, 12, 3)),
        btf.BfpConv2D(8, 3, padding="same", activation="relu", name="c1"),
        keras.layers.MaxPooling2D(2, 1),  # exact: its input is at the vector precision
        btf.BfpConv2D(16, 3, strides=2, name="c2"),
        keras.layers.Flatten(),
        btf.BfpDense(10, activation="softmax", name="d"),
    ])
    x = _r(8, 12, 12, 3)
    yl = rng.integers(0, 10, 8)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    before = [v.numpy().copy() for v in model.trainable_variables]
    hist = model.fit(x, yl, batch_size=4, epochs=2, verbose=0)
    assert np.isfinite(hist.history["loss"]).all()
    after = [v.numpy() for v in model.trainable_variables]
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))
    # eager call == predict (tf.function) == the compiled plan of the float twin
    pred = model.predict(x, verbose=0)
    np.testing.assert_array_equal(model(x).numpy(), pred)
    twin = btf.float_keras_model(model)
    assert [type(layer).__name__ for layer in twin.layers] == ["Conv2D", "MaxPooling2D", "Conv2D", "Flatten", "Dense"]
    for a, b in zip(twin.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    path = convert_keras(model, str(tmp_path / "k.onnx"), optimize=False)  # exports the float twin itself
    plan = bfpaccel.compile(path, "msfp16")
    got = bfpaccel.Session(plan).run(None, {plan.graph.inputs[0].name: x})
    assert_bits_equal(next(iter(got.values())), pred, "Keras model vs the plan of its float twin")
    # the layers serialise
    cfg = model.layers[0].get_config()
    clone = btf.BfpConv2D.from_config(cfg)
    assert (clone.filters, clone.padding, clone.activation, clone.format) == (8, "same", "relu", "msfp16")
    with pytest.raises(ValueError, match="activation"):
        btf.BfpDense(3, activation="gelu")
    fmt = bfpaccel.get_format("msfp16", rounding="toward_zero")
    layer = btf.BfpDense(3, format=fmt)
    assert btf.BfpDense.from_config(layer.get_config()).format == fmt


@pytest.mark.parametrize("module", ["bfpaccel.tf._numerics", "bfpaccel.tf._ops"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_tf_front_end_is_documented():
    for name in ("bfp_conv2d", "bfp_matmul", "BfpConv2D", "BfpDense", "float_graph_def", "float_keras_model",
                 "vector_softmax", "fold_batch_norm"):
        assert getattr(btf, name).__doc__, name
