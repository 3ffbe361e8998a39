"""ServerConfig: the server's options declared once -- the flags it generates are the flags
`bfpaccel serve` parses, argv round trips, secrets stay off command lines, bad values fail
with the flag's name, and serve() gets only the keywords it takes."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bfpaccel.serve import cli as serve_cli
from bfpaccel.serve.config import (
    AUTH_KEY_ENV,
    MIB,
    ServerConfig,
    add_server_arguments,
    environment_variables,
    parse_version_policy,
    serve_keyword_flags,
    server_options,
)


@pytest.fixture(scope="module")
def serve_parser():
    """The `bfpaccel serve` sub-parser of the real command line."""
    from bfpaccel.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def _flags(parser):
    return {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}


# ---------------------------------------------------------------------- flags generated = flags parsed
def test_serve_flags_are_the_declared_options(serve_parser):
    declared = {opt.flag for _, opt in server_options()}
    assert _flags(serve_parser) == declared
    # python -m bfpaccel.serve builds the same parser
    p = argparse.ArgumentParser()
    serve_cli._serve_args(p)
    assert _flags(p) == declared
    # every flag that existed before the declaration is still there
    assert {"--plan", "--model", "--registry", "--format", "--name", "--host", "--port", "--tls-cert", "--tls-key",
            "--auth-key-file", "--auth-key", "--workers", "--queue-size", "--max-message-mb", "--metrics-port",
            "--threads", "--kernel", "--grace", "--no-warmup", "--warmup-delay", "--simulated-latency-ms",
            "--max-image-pixels", "--max-resize-pixels", "--quiet"} <= declared
    # and the new ones carry the agreed names
    assert {"--http-port", "--max-body-mb", "--max-connections", "--max-header-bytes", "--batching",
            "--max-batch-size", "--batch-timeout-ms", "--preferred-batch-sizes", "--model-root", "--model-name",
            "--version-policy", "--version-label", "--poll-seconds", "--synthetic-warmup"} <= declared


# one command-line example per field: (argv, expected field value), none of them the default
EXAMPLES = {
    "plan": (["--plan", "a=x.bfpplan", "--plan", "y.bfpplan"], ("a=x.bfpplan", "y.bfpplan")),
    "model": (["--model", "rn50:2"], ("rn50:2",)),
    "registry": (["--registry", "/r"], "/r"),
    "format": (["--format", "msfp12"], "msfp12"),
    "name": (["--name", "svc"], "svc"),
    "model_root": (["--model-root", "/mnt/models"], "/mnt/models"),
    "model_name": (["--model-root", "/m", "--model-name", "rn50"], "rn50"),
    "version_policy": (["--version-policy", "specific:3,1"], "specific:1,3"),
    "version_labels": (["--version-label", "stable=3", "--version-label", "canary=4"], (("stable", 3), ("canary", 4))),
    "poll_seconds": (["--poll-seconds", "2.5"], 2.5),
    "warmup_file": (["--warmup-file", "w.tfrecord"], "w.tfrecord"),
    "synthetic_warmup": (["--synthetic-warmup", "3"], 3),
    "warmup": (["--no-warmup"], False),
    "warmup_delay_s": (["--warmup-delay", "1.5"], 1.5),
    "host": (["--host", "0.0.0.0"], "0.0.0.0"),
    "port": (["--port", "8500"], 8500),
    "http_port": (["--http-port", "8501"], 8501),
    "metrics_port": (["--metrics-port", "9090"], 9090),
    "tls_cert": (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "c.pem"),
    "tls_key": (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "k.pem"),
    "auth_key_files": (["--auth-key-file", "k1", "--auth-key-file", "k2"], ("k1", "k2")),
    "auth_keys": (["--auth-key", "secret"], ("secret",)),
    "reflection": (["--no-reflection"], False),
    "health": (["--no-health"], False),
    "max_message_bytes": (["--max-message-mb", "0.5"], MIB // 2),
    "max_body_bytes": (["--max-body-mb", "8"], 8 * MIB),
    "max_header_bytes": (["--max-header-bytes", "4096"], 4096),
    "max_connections": (["--max-connections", "16"], 16),
    "body_timeout_s": (["--body-timeout-s", "2.5"], 2.5),
    "max_image_pixels": (["--max-image-pixels", "0"], None),
    "max_resize_pixels": (["--max-resize-pixels", "1000"], 1000),
    "max_batch": (["--max-request-batch", "4"], 4),
    "workers": (["--workers", "3"], 3),
    "queue_size": (["--queue-size", "0"], 0),
    "num_threads": (["--threads", "2"], 2),
    "kernel": (["--kernel", "scalar"], "scalar"),
    "batching": (["--batching"], True),
    "max_batch_size": (["--max-batch-size", "16"], 16),
    "batch_timeout_ms": (["--batch-timeout-ms", "0.5"], 0.5),
    "preferred_batch_sizes": (["--preferred-batch-sizes", "8,4"], (4, 8)),
    "simulated_latency_ms": (["--simulated-latency-ms", "700"], 700.0),
    "grace": (["--grace", "5"], 5.0),
    "quiet": (["--quiet"], True),
}


def test_every_flag_sets_its_field(serve_parser):
    assert set(EXAMPLES) == {f.name for f in dataclasses.fields(ServerConfig)}
    defaults = ServerConfig()
    for name, (argv, want) in EXAMPLES.items():
        cfg = ServerConfig.from_args(serve_parser.parse_args(argv))
        assert getattr(cfg, name) == want, name
        assert getattr(defaults, name) != want, name  # the example really changes the option
    # nothing given: every field at its default
    assert ServerConfig.from_args(serve_parser.parse_args([])) == defaults


def test_the_new_options_have_the_agreed_defaults():
    c = ServerConfig()
    assert (c.http_port, c.max_connections, c.batching, c.max_batch_size, c.batch_timeout_ms,
            c.preferred_batch_sizes, c.model_root, c.model_name, c.version_policy, c.version_labels,
            c.poll_seconds) == (None, 256, False, 8, 2.0, (), None, None, "latest:1", (), 0.0)


def test_declared_defaults_equal_the_servers():
    from bfpaccel import preprocess
    from bfpaccel.serve import server

    assert ServerConfig().max_message_bytes == server.DEFAULT_MAX_MESSAGE_BYTES
    assert ServerConfig().max_image_pixels == preprocess.DEFAULT_MAX_IMAGE_PIXELS
    assert ServerConfig().max_resize_pixels == preprocess.DEFAULT_MAX_RESIZE_PIXELS
    params = inspect.signature(server.serve).parameters
    # options the config spells out where serve() takes None for "the usual"
    spelled_out = {"version_policy": "latest:1", "version_labels": {}, "preferred_batch_sizes": ()}
    compared = 0
    for key, value in ServerConfig.serve_defaults().items():
        if key not in params or key == "auth_keys":
            continue
        if key in spelled_out:
            assert (value, params[key].default) == (spelled_out[key], None), key
        else:
            assert params[key].default == value, key
        compared += 1
    assert compared >= 30


# ---------------------------------------------------------------------- argv round trip
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12)
_port = st.integers(0, 65535)
_finite = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
_label = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,8}\Z")

FIELDS = {
    "plan": st.lists(_text, max_size=3).map(tuple),
    "model": st.lists(_text, max_size=2).map(tuple),
    "registry": st.none() | _text,
    "format": _text,
    "name": st.none() | _text.filter(lambda s: "/" not in s),
    "model_root": st.none() | _text,
    "model_name": st.none() | _text.filter(lambda s: "/" not in s),
    "version_policy": st.sampled_from(["latest", "latest:3", "all", "specific:2,1", "specific:7"]),
    "version_labels": st.dictionaries(_label, st.integers(1, 2 ** 63 - 1), max_size=3).map(lambda d: tuple(d.items())),
    "poll_seconds": _finite,
    "warmup_file": st.none() | _text,
    "synthetic_warmup": st.integers(0, 10_000),
    "warmup": st.booleans(),
    "warmup_delay_s": _finite,
    "host": _text,
    "port": _port,
    "http_port": st.none() | _port,
    "metrics_port": st.none() | _port,
    "tls_cert": st.none() | _text,
    "tls_key": st.none() | _text,
    "auth_key_files": st.lists(_text, max_size=2).map(tuple),
    "auth_keys": st.just(()),  # secret: never on a command line (tested below)
    "reflection": st.booleans(),
    "health": st.booleans(),
    "max_message_bytes": st.integers(1, 2 ** 31 - 1),
    "max_body_bytes": st.none() | st.integers(1, 2 ** 53),
    "max_header_bytes": st.integers(1024, 16 * MIB),
    "max_connections": st.integers(1, 1_000_000),
    "body_timeout_s": st.floats(1e-3, 1e6, allow_nan=False, allow_infinity=False),
    "max_image_pixels": st.none() | st.integers(1, 2 ** 40),
    "max_resize_pixels": st.none() | st.integers(1, 2 ** 40),
    "max_batch": st.integers(1, 1_000_000),
    "workers": st.integers(1, 4096),
    "queue_size": st.integers(0, 1_000_000),
    "num_threads": st.none() | st.integers(1, 4096),
    "kernel": st.none() | _text,
    "batching": st.booleans(),
    "max_batch_size": st.integers(1, 64),
    "batch_timeout_ms": _finite,
    "preferred_batch_sizes": st.sets(st.integers(1, 64), max_size=4).map(tuple),
    "simulated_latency_ms": _finite,
    "grace": _finite,
    "quiet": st.booleans(),
}


@st.composite
def configs(draw):
    kw = {name: draw(s) for name, s in FIELDS.items()}
    # the cross-field rules: TLS files in pairs, distinct ports, a model name under a root,
    # preferred sizes within the batch size, labels on served versions
    if (kw["tls_cert"] is None) != (kw["tls_key"] is None):
        kw["tls_key"] = kw["tls_cert"]
    if kw["http_port"] and kw["http_port"] == kw["port"]:
        kw["http_port"] = None
    if kw["metrics_port"] and kw["metrics_port"] in (kw["port"], kw["http_port"]):
        kw["metrics_port"] = None
    if kw["model_name"] is not None and kw["model_root"] is None:
        kw["model_root"] = "/mnt/models"
    kw["preferred_batch_sizes"] = tuple(n for n in kw["preferred_batch_sizes"] if n <= kw["max_batch_size"])
    if kw["version_policy"].startswith("specific"):
        kw["version_labels"] = ()
    return ServerConfig(**kw)


def test_strategies_cover_every_field():
    assert set(FIELDS) == {f.name for f in dataclasses.fields(ServerConfig)}


@settings(max_examples=300, deadline=None)
@given(cfg=configs())
def test_argv_round_trip(serve_parser, cfg):
    argv = cfg.to_argv()
    assert ServerConfig.from_args(serve_parser.parse_args(argv)) == cfg
    # spelling every option out (defaults too) reads back the same
    names = [f.name for f in dataclasses.fields(cfg) if f.name != "auth_keys"]
    full = cfg.to_argv(always=names)
    assert ServerConfig.from_args(serve_parser.parse_args(full)) == cfg
    assert len(full) >= len(argv)


def test_to_argv_spells_values_for_a_command_line():
    cfg = ServerConfig(plan=("-odd.bfpplan",), kernel="-x", max_message_bytes=12345, max_image_pixels=None,
                       warmup=False, batching=True, preferred_batch_sizes=(8, 2))
    argv = cfg.to_argv()
    assert "--plan=-odd.bfpplan" in argv and "--kernel=-x" in argv  # not mistaken for a flag
    assert argv[argv.index("--max-image-pixels") + 1] == "0"  # no limit
    assert "--no-warmup" in argv and "--batching" in argv
    assert argv[argv.index("--preferred-batch-sizes") + 1] == "2,8"
    p = argparse.ArgumentParser()
    add_server_arguments(p)
    assert ServerConfig.from_args(p.parse_args(argv)).max_message_bytes == 12345  # MiB text, exact bytes
    assert ServerConfig().to_argv() == []
    assert ServerConfig().to_argv(always=["port", "workers"]) == ["--port", "50051", "--workers", "2"]
    with pytest.raises(ValueError, match="no such options"):
        ServerConfig().to_argv(always=["prot"])


# ---------------------------------------------------------------------- secrets
def test_keys_never_reach_a_command_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="--auth-key puts a secret on the command line"):
        ServerConfig(auth_keys=("k1",)).to_argv()
    kf = tmp_path / "keys"
    kf.write_text("k1\nk2\n")
    os.chmod(kf, 0o600)
    cfg = ServerConfig(auth_key_files=(str(kf),))
    assert cfg.to_argv() == ["--auth-key-file", str(kf)]
    # the keys come from the file and the environment when the server starts, not from argv
    kw = cfg.serve_kwargs(environ={AUTH_KEY_ENV: "k3\n"})
    assert kw["auth_keys"] == ["k1", "k2", "k3"]
    assert ServerConfig().serve_kwargs(environ={})["auth_keys"] is None
    assert capsys.readouterr().err == ""
    # a config built where $BFPACCEL_AUTH_KEY is set does not carry it into a deployment's argv
    p = argparse.ArgumentParser()
    add_server_arguments(p)
    os.environ[AUTH_KEY_ENV] = "leak"
    try:
        assert "leak" not in " ".join(ServerConfig.from_args(p.parse_args(["--workers", "3"])).to_argv())
    finally:
        del os.environ[AUTH_KEY_ENV]
    secret = [n for n, o in server_options() if o.secret]
    assert secret == ["auth_keys"]


def test_per_deployment_options_and_environment():
    per = {n for n, o in server_options(per_deployment=True)}
    assert {"plan", "model", "host", "port", "http_port", "metrics_port", "tls_cert", "tls_key", "auth_key_files",
            "auth_keys", "model_root", "model_name"} <= per
    assert not per & {"workers", "num_threads", "batching", "max_batch_size", "version_policy", "grace"}
    p = argparse.ArgumentParser()
    add_server_arguments(p, per_deployment=False)
    assert "--threads" in _flags(p) and "--batching" in _flags(p)
    assert not _flags(p) & {"--port", "--plan", "--auth-key", "--auth-key-file", "--tls-cert", "--model-root"}
    assert environment_variables() == {"BFPACCEL_REGISTRY": "--registry", AUTH_KEY_ENV: "--auth-key",
                                       "BFPACCEL_NUM_THREADS": "--threads", "BFPACCEL_KERNEL": "--kernel"}
    assert ServerConfig().registry_path({"BFPACCEL_REGISTRY": "/r"}) == "/r"
    assert ServerConfig(registry="/x").registry_path({"BFPACCEL_REGISTRY": "/r"}) == "/x"
    assert ServerConfig().registry_path({}) == "bfpaccel-registry"


# ---------------------------------------------------------------------- bad values
@pytest.mark.parametrize("argv,message", [
    (["--port", "70000"], "ports run from 0 to 65535"),
    (["--http-port", "-1"], "ports run from 0 to 65535"),
    (["--workers", "0"], "must be >= 1"),
    (["--workers", "two"], "invalid integer"),
    (["--queue-size", "-1"], "must be >= 0"),
    (["--threads", "0"], "must be >= 1"),
    (["--max-message-mb", "0"], "positive number of MiB"),
    (["--max-message-mb", "nan"], "positive number of MiB"),
    (["--max-message-mb", "4096"], "must be <= 2147483647"),
    (["--max-header-bytes", "10"], "must be >= 1024"),
    (["--body-timeout-s", "0"], "must be > 0"),
    (["--body-timeout-s", "nan"], "finite number"),
    (["--batch-timeout-ms", "-1"], "must be >= 0"),
    (["--batch-timeout-ms", "inf"], "finite number"),
    (["--poll-seconds", "-0.5"], "must be >= 0"),
    (["--preferred-batch-sizes", "4,,8"], "comma-separated integers"),
    (["--preferred-batch-sizes", "0,8"], "must be >= 1"),
    (["--preferred-batch-sizes", "4,4"], "twice"),
    (["--version-policy", "latest:0"], "latest:N needs N >= 1"),
    (["--version-policy", "newest"], "use latest:N, all or specific"),
    (["--version-policy", "specific:1,1"], "listed twice"),
    (["--version-label", "stable"], "use LABEL=VERSION"),
    (["--version-label", "stable=0"], "integer >= 1"),
    (["--version-label", "bad label=1"], "invalid label"),
    (["--name", "a/b"], "must not contain '/'"),
    (["--synthetic-warmup", "-1"], "must be >= 0"),
])
def test_bad_flag_values_are_usage_errors(serve_parser, capsys, argv, message):
    with pytest.raises(SystemExit) as ei:
        serve_parser.parse_args(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}" in err and message in err, err


@pytest.mark.parametrize("argv,message", [
    (["--tls-cert", "c.pem"], "--tls-cert and --tls-key: give both"),
    (["--port", "8500", "--http-port", "8500"], "--port and --http-port are both 8500"),
    (["--http-port", "9000", "--metrics-port", "9000"], "--http-port and --metrics-port"),
    (["--model-name", "rn50"], "give --model-root DIR too"),
    (["--preferred-batch-sizes", "4,16"], "[16] over --max-batch-size 8"),
    (["--version-policy", "specific:1,2", "--version-label", "stable=3"], "version 3 is not served"),
    (["--version-label", "a=1", "--version-label", "a=2"], "label 'a' is given twice"),
])
def test_inconsistent_options_name_their_flags(serve_parser, argv, message):
    with pytest.raises(ValueError) as ei:
        ServerConfig.from_args(serve_parser.parse_args(argv))
    assert message in str(ei.value)


def test_python_values_are_checked():
    for kw, message in [({"port": "80"}, "--port: invalid port '80'"), ({"workers": True}, "--workers: must be an"),
                        ({"plan": "x.bfpplan"}, "--plan: must be a sequence"), ({"host": ""}, "--host: must be a"),
                        ({"grace": math.nan}, "--grace: must be a finite"), ({"kernel": "a\x00b"}, "NUL"),
                        ({"version_labels": {"x": 1.5}}, "integer >= 1"), ({"batching": "yes"}, "True or False")]:
        with pytest.raises(ValueError, match=message):
            ServerConfig(**kw)
    # values are normalized: lists to tuples, policies and sizes to one spelling, 0 pixels to None
    c = ServerConfig(plan=["a"], version_policy="latest", preferred_batch_sizes=[8, 2], version_labels={"s": 1},
                     max_resize_pixels=0, grace=5)
    assert (c.plan, c.version_policy, c.preferred_batch_sizes, c.version_labels, c.max_resize_pixels, c.grace) \
        == (("a",), "latest:1", (2, 8), (("s", 1),), None, 5.0)
    assert hash(c) == hash(dataclasses.replace(c))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.port = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="--workers"):
        dataclasses.replace(c, workers=0)


def test_version_policy_parser():
    assert parse_version_policy("latest") == ("latest", (1,))
    assert parse_version_policy(" specific:10,2 ") == ("specific", (2, 10))
    for bad in ("", "latest:", "latest:x", "all:1", "specific", "specific:", "specific:-1"):
        with pytest.raises(ValueError):
            parse_version_policy(bad)


def test_check_files(tmp_path):
    ServerConfig().check_files()
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(FileNotFoundError, match="--tls-key .*no such file"):
        ServerConfig(tls_cert=str(cert), tls_key=str(tmp_path / "none.pem")).check_files()
    with pytest.raises(FileNotFoundError, match="--model-root .*no such folder"):
        ServerConfig(model_root=str(cert)).check_files()
    ServerConfig(model_root=str(tmp_path), tls_cert=str(cert), tls_key=str(cert)).check_files()


# ---------------------------------------------------------------------- serve() keywords
def test_serve_kwargs_are_serve_keywords():
    from bfpaccel.serve.server import serve

    kw = ServerConfig(workers=3, num_threads=2, version_labels={"stable": 2}).serve_kwargs(environ={})
    assert kw["workers"] == 3 and kw["num_threads"] == 2 and kw["version_labels"] == {"stable": 2}
    assert not set(kw) & {"plan", "model", "registry", "format", "name", "grace", "quiet"}  # the CLI's own
    params = inspect.signature(serve).parameters
    accepted = serve_cli.keywords_serve_accepts(serve, kw)
    assert set(accepted) == set(kw) & set(params)
    assert serve_keyword_flags()["num_threads"] == "--threads"


def test_keywords_serve_accepts_drops_only_defaults():
    def old_serve(plans, port=50051, workers=2, *, block=True):
        """A serve() from before the new options."""

    kw = ServerConfig(workers=4).serve_kwargs(environ={})
    assert serve_cli.keywords_serve_accepts(old_serve, kw) == {"port": 50051, "workers": 4}
    # an option the user set that this serve() cannot honour is an error, not silently dropped
    with pytest.raises(ValueError, match="--batching is not supported by this server version"):
        serve_cli.keywords_serve_accepts(old_serve, ServerConfig(batching=True).serve_kwargs(environ={}))
    with pytest.raises(ValueError, match="--http-port is not supported"):
        serve_cli.keywords_serve_accepts(old_serve, ServerConfig(http_port=8080).serve_kwargs(environ={}))

    def open_serve(plans, **options):
        """A serve() taking any keyword."""

    assert serve_cli.keywords_serve_accepts(open_serve, kw) == kw


def test_image_limits_helper_reads_the_config(serve_parser):
    assert serve_cli._image_limits(serve_parser.parse_args([])) == {}
    args = serve_parser.parse_args(["--max-image-pixels", "1000", "--max-resize-pixels", "-3"])
    assert serve_cli._image_limits(args) == {"max_image_pixels": 1000, "max_resize_pixels": None}


def test_help_lists_every_visible_option(serve_parser):
    text = serve_parser.format_help()
    for _, opt in server_options():
        assert (opt.flag in text) != opt.hidden, opt.flag


def test_docstring_examples():
    import doctest

    import bfpaccel.serve.config as config

    result = doctest.testmod(config, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0
