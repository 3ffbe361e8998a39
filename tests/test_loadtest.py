"""``bfpaccel loadtest`` end to end against a real tiny server on loopback: closed, fixed and
Poisson runs and a short p99-bound search through the CLI, the JSON document, the server-side
queue/compute split from the metrics endpoint, the charts, and the usage errors.  Timing is
never asserted: only structure and sanity (durations are ~1 s per run or step)."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import bfpaccel
from bfpaccel.cli import main
from bfpaccel.serve.promscrape import NOT_EXPORTED

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LEGACY_KEYS = {"requests", "ok", "errors", "duration_s", "qps", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "concurrency"}
STEP_KEYS = {"mode", "target_qps", "offered_qps", "achieved_qps", "schedule_s", "elapsed_s", "scheduled", "sent", "ok",
             "dropped", "max_inflight", "concurrency", "seed", "errors", "error_count", "latency_ms",
             "service_latency_ms", "send_lag_ms", "server", "passed", "reason"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    pytest.importorskip("onnx")
    from bfpaccel.serve import serve
    from bfpaccel.serve.testing import build_tiny_plan, make_image

    d = tmp_path_factory.mktemp("loadtest")
    plan = build_tiny_plan(str(d / "tiny.bfpplan"))
    (d / "a.jpg").write_bytes(make_image("jpeg"))
    np.save(d / "x.npy", np.random.default_rng(0).random((1, 224, 224, 3), dtype=np.float32))
    has_http = all(importlib.util.find_spec(m) for m in ("uvicorn", "starlette"))  # the serve extra
    h = serve({"tiny": plan}, port=0, metrics_port=0, http_port=0 if has_http else None)
    yield SimpleNamespace(port=h.port, http_port=h.http_port, metrics=f"http://127.0.0.1:{h.metrics_port}/metrics",
                          dir=d)
    h.stop(1)


def _base(live):
    return ["loadtest", "--address", f"127.0.0.1:{live.port}", "--image", str(live.dir / "a.jpg")]


def _check_latency(lat):
    assert lat["n"] > 0
    assert 0 <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]


def _check_server(server, ok):
    assert set(server) == {"bfpaccel_queue_seconds", "bfpaccel_compute_seconds", "bfpaccel_request_latency_seconds"}
    req = server["bfpaccel_request_latency_seconds"]
    assert req["exported"] and req["count"] >= ok and req["mean_ms"] > 0
    for name in ("bfpaccel_queue_seconds", "bfpaccel_compute_seconds"):  # added to the server separately
        d = server[name]
        assert (d["exported"] and d["count"] >= ok and d["mean_ms"] >= 0) or d["note"] == NOT_EXPORTED


def _check_doc(doc, mode):
    assert doc["format"] == "bfpaccel-loadtest/1" and doc["bfpaccel_version"] == bfpaccel.__version__
    assert doc["host"]["cpu_model"] and doc["host"]["logical_cpus"] >= 1
    assert doc["config"]["mode"] == mode and doc["config"]["protocol"] == "tfs-grpc"
    assert doc["config"]["payload"]["kind"] in ("image", "array")
    for st in doc["steps"]:
        assert set(st) == STEP_KEYS
        assert st["scheduled"] == st["sent"] + st["dropped"] and st["sent"] == st["ok"] + st["error_count"]
        assert st["errors"] == {} and st["ok"] > 0 and st["achieved_qps"] > 0
        _check_latency(st["latency_ms"])
        _check_latency(st["service_latency_ms"])


def test_fixed_and_poisson_runs(live, tmp_path, capsys):
    out = tmp_path / "fixed.json"
    assert main(_base(live) + ["--mode", "fixed", "--rate", "20", "--duration", "1", "--json", str(out),
                               "--metrics-url", live.metrics]) == 0
    text = capsys.readouterr().out
    assert "fixed arrivals at 20 QPS" in text and "latency from schedule" in text and "latency from send" in text
    assert "server (metrics delta)" in text
    doc = json.loads(out.read_text())
    _check_doc(doc, "fixed")
    (st,) = doc["steps"]
    assert st["scheduled"] == 20 and st["target_qps"] == 20.0 and st["max_inflight"] == 256 and st["seed"] is None
    # from the schedule >= from the send, request by request; so for every percentile
    for q in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
        assert st["latency_ms"][q] >= st["service_latency_ms"][q] - 1e-9
    _check_server(st["server"], st["ok"])
    assert doc["config"]["metrics_url"] == live.metrics and "key" not in json.dumps(doc["config"])

    out = tmp_path / "poisson.json"
    assert main(_base(live) + ["--mode", "poisson", "--rate", "25", "--duration", "1", "--seed", "5",
                               "--max-inflight", "8", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    _check_doc(doc, "poisson")
    (st,) = doc["steps"]
    assert st["seed"] == 5 and st["max_inflight"] == 8 and st["server"] is None
    from bfpaccel.serve.loadgen import make_schedule

    assert st["scheduled"] == make_schedule("poisson", 25.0, 1.0, seed=5).size  # the seeded schedule was sent


def test_short_search_with_reports(live, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "search.json", tmp_path / "search.png"
    rc = main(_base(live) + ["--search-p99-ms", "60000", "--start-rate", "4", "--duration", "1", "--max-steps", "3",
                             "--min-queries", "4", "--metrics-url", live.metrics, "--json", str(out),
                             "--png", str(png)])
    cap = capsys.readouterr()
    assert rc == 0
    doc = json.loads(out.read_text())
    _check_doc(doc, "poisson")
    # a bound of a minute: every step passes, so the rate doubles each step until --max-steps
    assert [s["target_qps"] for s in doc["steps"]] == [4.0, 8.0, 16.0]
    assert all(s["passed"] and s["reason"] == "ok" for s in doc["steps"])
    for s in doc["steps"]:
        assert s["scheduled"] >= 4
        _check_server(s["server"], s["ok"])
    srch = doc["search"]
    assert srch["best_qps"] == 16.0 and srch["best_step"] == 2 and srch["bound_ms"] == 60000.0
    assert srch["best_offered_qps"] == doc["steps"][2]["offered_qps"] > 0
    assert srch["steps_run"] == 3 and not srch["converged"] and "max-steps" in srch["note"]
    assert doc["config"]["search"]["p99_bound_ms"] == 60000.0 and doc["config"]["min_queries"] == 4
    assert "highest rate with p99 under 60000 ms: 16.00 QPS target" in cap.out
    assert cap.err.count("step ") == 3  # progress, one line per step
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000


def test_closed_mode_reports_and_legacy_json(live, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "closed.json", tmp_path / "closed.png"
    assert main(_base(live) + ["--concurrency", "2", "--duration", "0.5", "--json", str(out), "--png", str(png),
                               "--metrics-url", live.metrics]) == 0
    text = capsys.readouterr().out
    assert "requests in" in text and "with 2 clients" in text and "server (metrics delta)" in text
    doc = json.loads(out.read_text())
    _check_doc(doc, "closed")
    (st,) = doc["steps"]
    assert st["concurrency"] == 2 and st["target_qps"] is None and st["dropped"] == 0
    assert st["latency_ms"] == st["service_latency_ms"]
    _check_server(st["server"], st["ok"])
    assert png.read_bytes()[:8] == PNG_MAGIC
    # the bare --json of earlier versions: the same one-line summary dict
    assert main(_base(live) + ["--concurrency", "1", "--duration", "0.3", "--json"]) == 0
    legacy = json.loads(capsys.readouterr().out)
    assert set(legacy) == LEGACY_KEYS and legacy["ok"] > 0
    # '-': the full document on stdout
    assert main(_base(live) + ["--mode", "fixed", "--rate", "10", "--duration", "0.3", "--json", "-"]) == 0
    _check_doc(json.loads(capsys.readouterr().out), "fixed")


def test_array_payload_and_failures(live, tmp_path, capsys):
    base = ["loadtest", "--address", f"127.0.0.1:{live.port}", "--array", str(live.dir / "x.npy"), "--input-name", "x"]
    out = tmp_path / "a.json"
    assert main(base + ["--mode", "fixed", "--rate", "10", "--duration", "0.5", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    _check_doc(doc, "fixed")
    assert doc["config"]["payload"] == {"kind": "array", "shape": [1, 224, 224, 3], "dtype": "float32",
                                        "input_name": "x"}
    capsys.readouterr()
    # every request refused: exit status 1, errors by code
    assert main(_base(live) + ["--input-name", "nope", "--mode", "fixed", "--rate", "10", "--duration", "0.3",
                               "--json", str(out)]) == 1
    (st,) = json.loads(out.read_text())["steps"]
    assert st["ok"] == 0 and st["errors"] == {"INVALID_ARGUMENT": st["sent"]} and st["latency_ms"]["p99_ms"] is None
    # a search where nothing passes: exit status 1
    assert main(_base(live) + ["--input-name", "nope", "--search-p99-ms", "100", "--start-rate", "5",
                               "--min-rate", "5", "--min-queries", "1", "--duration", "0.3"]) == 1
    assert "no rate tried kept p99 under 100 ms" in capsys.readouterr().out


@pytest.mark.parametrize("protocol", ["tfs-grpc", "tfs-rest", "v2-rest", "v2-grpc"])
def test_every_protocol_against_the_server(live, protocol, tmp_path):
    """Each sender end to end against the server's own face: closed and fixed-rate runs all
    succeed; an unknown model is an error counted by the face's code."""
    from bfpaccel.serve import loadtest
    from bfpaccel.serve.loadgen import run_open
    from bfpaccel.serve.senders import Payload, Target, make_sender

    pytest.importorskip("requests" if protocol == "tfs-rest" else "tritonclient" if "v2" in protocol else "grpc")
    rest = protocol.endswith("rest")
    if rest and live.http_port is None:
        pytest.skip("the server's HTTP port needs the serve extra (uvicorn, starlette)")
    port = live.http_port if rest else live.port
    img = str(live.dir / "a.jpg")
    r = loadtest.run("127.0.0.1", port, img, concurrency=2, duration=0.5, protocol=protocol, model_name="tiny")
    assert r.ok > 0 and r.errors == {} and r.p50_ms <= r.p99_ms
    arr = np.load(live.dir / "x.npy")
    with make_sender(protocol, Target("127.0.0.1", port, model_name="tiny")) as s:
        st = run_open(s.prepare(Payload(array=arr, input_name="x")), 8.0, 0.5, arrivals="fixed", warmup_requests=1)
    assert st.scheduled == 4 and st.ok == 4 and st.errors == {}
    bad = loadtest.run("127.0.0.1", port, img, concurrency=1, duration=0.3, protocol=protocol, model_name="nope")
    assert bad.ok == 0 and set(bad.errors) == {"HTTP_404" if rest else "NOT_FOUND"}


@pytest.mark.parametrize("extra, message", [
    (["--mode", "poisson"], "--mode poisson needs --rate"),
    (["--rate", "5"], "--rate applies to the open-loop modes"),
    (["--mode", "fixed", "--rate", "5", "--concurrency", "2"], "--concurrency applies to --mode closed"),
    (["--mode", "closed", "--search-p99-ms", "10"], "--search-p99-ms runs open-loop steps"),
    (["--metrics-url", "ftp://x/metrics"], "must start with http://"),
    (["--protocol", "tfs-rest"], "needs a model name"),
    (["--search-p99-ms", "10", "--growth", "1"], "growth must be > 1"),
    (["--json", "/nonexistent-folder/x.json"], "does not exist"),
])
def test_usage_errors(extra, message, tmp_path, capsys):
    img = tmp_path / "a.jpg"
    img.write_bytes(b"\xff\xd8x")
    if "tfs-rest" in extra:
        pytest.importorskip("requests")
    assert main(["loadtest", "--address", "127.0.0.1:1", "--image", str(img)] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("bfpaccel: error:") and message in err and "Traceback" not in err


def test_unreachable_metrics_and_missing_matplotlib(tmp_path, capsys, monkeypatch):
    img = tmp_path / "a.jpg"
    img.write_bytes(b"\xff\xd8x")
    base = ["loadtest", "--address", "127.0.0.1:1", "--image", str(img), "--mode", "fixed", "--rate", "1"]
    assert main(base + ["--metrics-url", "http://127.0.0.1:1/metrics"]) == 2
    assert "cannot read metrics from http://127.0.0.1:1/metrics" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert main(base + ["--png", str(tmp_path / "x.png")]) == 2
    assert "--png needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit):
        main(base + ["--max-error-rate", "2"])
    assert "fraction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--protocol", "soap"])


def test_help_names_modes_and_protocols(capsys):
    with pytest.raises(SystemExit):
        main(["loadtest", "--help"])
    out = capsys.readouterr().out
    for word in ("--mode", "poisson", "--rate", "--max-inflight", "--search-p99-ms", "--protocol", "tfs-rest",
                 "v2-grpc", "--metrics-url", "--json", "--png", "coordinated omission", "dropped"):
        assert word in out, word


def test_plots_of_steps(tmp_path):
    pytest.importorskip("matplotlib")
    from bfpaccel.serve.loadgen import run_open
    from bfpaccel.serve.loadplot import plot_step

    seq = iter(range(10 ** 6))
    st = run_open(lambda: "OK" if next(seq) % 4 else "UNAVAILABLE", 200.0, 0.2, max_inflight=4, warmup_requests=0)
    plot_step(st, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC
    none_ok = run_open(lambda: "UNAVAILABLE", 50.0, 0.1, warmup_requests=0)
    plot_step(none_ok, str(tmp_path / "n.png"))
    assert (tmp_path / "n.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(OSError, match="does not exist"):
        plot_step(st, str(tmp_path / "no" / "dir.png"))
