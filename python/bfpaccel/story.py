"""The seed's whole story in one command (``bfpaccel demo``, after the kernel check).

What the Azure ML notebook did with an FPGA, locally: build the TF graph (JPEG bytes ->
``preprocess_array`` -> ``QuantizedResnet50`` -> default classifier), save it, register it,
convert it (tf2onnx), package it (compile the BFP plan), deploy it (a gRPC server process),
score a JPEG with ``PredictionClient.score_file``, print the top-5 labels, time the plan
against onnxruntime float32 / int8 on the same ONNX (in-process and through the server), and
clean up in the seed's order.  Needs the ``tf`` extra (TensorFlow, tf2onnx) and onnxruntime.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Callable, Dict, Optional

import numpy as np

OUT = "classifier/resnet_v1_50/predictions/Softmax:0"


def _sample_jpeg(path: str) -> str:
    from PIL import Image as PILImage

    yy, xx = np.mgrid[0:300, 0:400]
    img = np.stack([128 + 100 * np.sin(xx / (13 + 5 * c) + yy / (19 + 4 * c) + c) for c in range(3)], -1)
    PILImage.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
    return path


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def run_story(image: Optional[str] = None, fmt: str = "msfp16", runs: int = 10, threads: Optional[int] = None,
              workdir: Optional[str] = None, log: Callable[[str], None] = print) -> int:
    """Runs the story; returns 0 on success.  ``image``: a JPEG/PNG to score (default: a
    generated picture -- the weights are random anyway, see below)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow.compat.v1 as tf

        tf.get_logger().setLevel("ERROR")
    except ImportError:
        log("the seed story needs TensorFlow: pip install 'bfpaccel[tf]' (skipped)")
        return 0
    import bfpaccel
    from bfpaccel import models
    from bfpaccel.baselines import ort_int8_model, ort_session
    from bfpaccel.convert import AccelOnnxConverter
    from bfpaccel.deploy import AccelContainerImage, Image, LocalTarget, LocalWebservice, Webservice
    from bfpaccel.registry import Model, Registry

    if threads:
        bfpaccel.set_num_threads(threads)
    own = workdir is None
    work = workdir or tempfile.mkdtemp(prefix="bfpaccel-story-")
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()

    def step(msg: str) -> None:
        log(f"[{time.perf_counter() - t0:6.1f} s] {msg}")

    step("1. TF graph: Placeholder (JPEG bytes) -> preprocess_array -> QuantizedResnet50 -> classifier "
         "(random seeded weights: no ImageNet weights ship with any package; see README)")
    saved = os.path.join(work, "resnet50_saved")
    graph = tf.Graph()
    with graph.as_default():
        in_images = tf.placeholder(tf.string)
        model = models.QuantizedResnet50(os.path.join(work, "store"), is_frozen=True, weights="random")
        out = model.get_default_classifier(model.import_graph_def(models.preprocess_array(in_images)))
        with tf.Session(graph=graph) as sess:
            sess.run(tf.global_variables_initializer())
            model.restore_weights(sess)
            tf.saved_model.simple_save(sess, saved, inputs={"images": in_images}, outputs={"output_alias": out})
    reg = Registry(os.path.join(work, "registry"))
    registered = Model.register(reg, saved, "resnet50")
    step(f"2. registered {registered.id}; converting with tf2onnx (subprocess)")
    op = AccelOnnxConverter.convert_tf_model(reg, registered, in_images.name, out.name)
    if op.wait_for_completion() != "Succeeded":
        raise RuntimeError(f"conversion failed: {op.error}")
    converted = op.result
    step(f"3. converted model {converted.id} (parent {converted.parent_id}); image with a {fmt} plan")
    img = Image.create(reg, "resnet50-image", [converted],
                       AccelContainerImage.image_configuration(properties={"format": fmt}))
    img.wait_for_creation()
    path = image or _sample_jpeg(os.path.join(work, "sample.jpg"))
    onnx_path = converted.path
    if os.path.isdir(onnx_path):
        onnx_path = next(os.path.join(d, f) for d, _, fs in os.walk(onnx_path) for f in fs if f.endswith(".onnx"))
    step("4. latency on this machine, batch 1, same ONNX and input (medians; before the server starts, "
         "so nothing else competes for the cores)")
    pred = bfpaccel.Predictor(img.plan_path, num_threads=threads)
    x = pred.preprocess([open(path, "rb").read()])
    nt = threads or bfpaccel.get_num_threads()
    s32 = ort_session(onnx_path, nt)
    name = s32.get_inputs()[0].name
    q8 = os.path.join(work, "resnet50.int8.onnx")
    ort_int8_model(onnx_path, q8, [x])
    s8 = ort_session(q8, nt)
    rows: Dict[str, float] = {}
    rows["onnxruntime float32"] = _median_ms(lambda: s32.run(None, {name: x}), runs)
    time.sleep(1.0)
    rows["onnxruntime int8 (static QDQ, U8S8)"] = _median_ms(lambda: s8.run(None, {name: x}), runs)
    time.sleep(1.0)
    rows[f"bfpaccel {fmt} plan, in-process"] = _median_ms(lambda: pred.predict(x), runs)
    svc = Webservice.deploy_from_image(reg, "resnet50-svc", img, LocalWebservice.deploy_configuration(),
                                       LocalTarget())
    try:
        svc.wait_for_deployment(timeout=300)
        step(f"5. deployed: {svc.scoring_uri} ({svc.state}); scoring with PredictionClient.score_file")
        client = bfpaccel.client_from_service(svc)
        probs = client.score_file(path, input_name=in_images.name, outputs=out.name)
        labels = bfpaccel.labels.imagenet_labels()
        log(f"\n   top-5 for {path}:")
        for rank, (i, p, label) in enumerate(bfpaccel.top_k(probs, 5, labels), 1):
            log(f"     {rank}. {label:<30s} {p:.4f}")
        time.sleep(1.0)
        rows[f"bfpaccel {fmt} via gRPC (JPEG in, client->server->client)"] = _median_ms(
            lambda: client.score_file(path, input_name=in_images.name, outputs=out.name), runs)
        base = rows["onnxruntime float32"]
        log(f"\n   {'backend':<58s} {'p50 ms':>8s} {'vs ort fp32':>12s}")
        for k, v in rows.items():
            log(f"   {k:<58s} {v:8.1f} {base / v:11.2f}x")
        log(f"   ({nt} threads, kernel {bfpaccel.get_kernel()}; the gRPC row adds JPEG decoding and the seed's "
            "preprocessing in the server to the plan)\n")
    finally:
        svc.delete()
    step("6. clean up in the seed's order: service, image, converted model, model")
    img.delete()
    converted.delete()
    registered.delete()
    if own:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    step("done")
    return 0
