"""CLI argument handling of the model commands (no network, no model builds)."""

from __future__ import annotations

from bfpaccel.cli import main


def test_fetch_weights_rejects_models_without_public_weights(capsys):
    assert main(["fetch-weights", "--model", "ssdvgg"]) == 2
    assert "SSD-VGG has none" in capsys.readouterr().err


def test_classify_missing_image_is_a_clear_error(capsys, tmp_path):
    assert main(["classify", "--model", "resnet50", str(tmp_path / "nope.jpg")]) == 2
    assert "image not found" in capsys.readouterr().err


def test_classify_unknown_model(capsys, tmp_path):
    img = tmp_path / "x.jpg"
    img.write_bytes(b"\xff\xd8")
    assert main(["classify", "--model", "alexnet", str(img), "--cache-dir", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
