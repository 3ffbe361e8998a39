"""User mistakes on the command line are one line on stderr and exit status 2, never a
traceback (issue 9 defect 7), and keys stay off command lines (defect 3)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import pytest

from bfpaccel.serve import cli as serve_cli

BFPACCEL = [sys.executable, "-m", "bfpaccel"]


def _run(args, env=None, timeout=120):
    e = dict(os.environ)
    e.pop("BFPACCEL_AUTH_KEY", None)
    e.update(env or {})
    t = time.monotonic()
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=e)
    return r, time.monotonic() - t


def _user_error(r, *words, one_line=True):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip() and "warning" not in line]
    if one_line:
        assert len(lines) == 1, r.stderr
    for w in words:
        assert w.lower() in lines[-1].lower(), r.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def image(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(b"\xff\xd8\xff\xd9")
    return str(p)


def test_registry_show_huge_version(tmp_path):
    r, _ = _run(BFPACCEL + ["registry", "show", "x:99999999999999999999999", "--registry", str(tmp_path / "r")])
    _user_error(r, "bad id")


def test_registry_register_bad_name(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"x")
    r, _ = _run(BFPACCEL + ["registry", "register", str(p), "--name", "ok\n", "--registry", str(tmp_path / "r")])
    _user_error(r, "invalid model name")


def test_registry_register_symlinked_file(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "saved_model.pb").write_bytes(b"g")
    os.symlink("/etc/passwd", d / "weights.bin")
    r, _ = _run(BFPACCEL + ["registry", "register", str(d), "--name", "m", "--registry", str(tmp_path / "r")])
    _user_error(r, "symbolic link")


@pytest.mark.parametrize("cmd", [BFPACCEL + ["serve"], [sys.executable, "-m", "bfpaccel.serve"]])
def test_serve_unknown_model(tmp_path, cmd):
    r, _ = _run(cmd + ["--model", "nosuch:1", "--registry", str(tmp_path / "r")])
    _user_error(r, "not found")


def test_serve_malformed_plan(tmp_path):
    p = tmp_path / "bad.bfpplan"
    p.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    r, _ = _run(BFPACCEL + ["serve", "--plan", str(p), "--port", "0"])
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "bfpplan" in r.stderr


@pytest.mark.parametrize("argv,word", [
    (["serve", "--plan", "p.bfpplan", "--port", "-5"], "port"),
    (["serve", "--plan", "p.bfpplan", "--port", "65536"], "port"),
    (["serve", "--plan", "p.bfpplan", "--metrics-port", "70000"], "port"),
    (["deploy", "local", "--name", "s", "--image", "i", "--port", "99999"], "port"),
    (["loadtest", "--address", "127.0.0.1", "--port", "-1", "--image", "x.jpg"], "port"),
])
def test_port_ranges(argv, word):
    r, _ = _run(BFPACCEL + argv)
    _user_error(r, word, one_line=False)  # argparse: usage line + the error


def test_predict_bad_port_in_address(image):
    r, _ = _run(BFPACCEL + ["predict", "--address", "127.0.0.1:-5", image])
    _user_error(r, "port")
    r, _ = _run(BFPACCEL + ["predict", "--address", "127.0.0.1:70000", image])
    _user_error(r, "port")


def test_predict_dead_address_fails_fast(image):
    r, took = _run(BFPACCEL + ["predict", "--address", f"127.0.0.1:{_closed_port()}", image])
    _user_error(r, "cannot connect")
    assert took < 10, took


def test_predict_missing_image(tmp_path):
    r, _ = _run(BFPACCEL + ["predict", "--address", "127.0.0.1:1", str(tmp_path / "none.jpg")])
    _user_error(r, "not found")


def test_estimate_builtin_model_needs_only_the_base_install():
    r, _ = _run(BFPACCEL + ["estimate", "--model", "resnet50"])
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "yaml" not in r.stderr


# ---------------------------------------------------------------------- keys off the command line
def _serve_ns(**kw):
    ns = argparse.Namespace(auth_key=[], auth_key_file=[])
    ns.__dict__.update(kw)
    return ns


def test_server_keys_from_file_env_and_flag(tmp_path, monkeypatch, capsys):
    kf = tmp_path / "keys"
    kf.write_text("k1\n\n  k2  \n")
    os.chmod(kf, 0o600)
    monkeypatch.delenv("BFPACCEL_AUTH_KEY", raising=False)
    assert serve_cli._server_keys(_serve_ns(auth_key_file=[str(kf)])) == ["k1", "k2"]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("BFPACCEL_AUTH_KEY", "k3\nk1")
    assert serve_cli._server_keys(_serve_ns(auth_key_file=[str(kf)])) == ["k1", "k2", "k3"]
    assert capsys.readouterr().err == ""
    # --auth-key still works, with a warning that the command line is visible to other users
    assert serve_cli._server_keys(_serve_ns(auth_key=["k4"])) == ["k3", "k1", "k4"]
    assert "every local user" in capsys.readouterr().err
    # a key file other users can read is used, with a warning
    os.chmod(kf, 0o644)
    serve_cli._server_keys(_serve_ns(auth_key_file=[str(kf)]))
    assert "chmod 600" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no key"):
        serve_cli._server_keys(_serve_ns(auth_key_file=[str(empty)]))


def test_client_key_sources(tmp_path, monkeypatch, capsys):
    kf = tmp_path / "key"
    kf.write_text("secret\n")
    os.chmod(kf, 0o600)
    monkeypatch.setenv("BFPACCEL_AUTH_KEY", "from-env")
    assert serve_cli._client_key(argparse.Namespace(key_file=str(kf), key="")) == "secret"
    assert serve_cli._client_key(argparse.Namespace(key_file=None, key="")) == "from-env"
    assert capsys.readouterr().err == ""
    assert serve_cli._client_key(argparse.Namespace(key_file=None, key="flag")) == "flag"
    assert "--key-file" in capsys.readouterr().err
