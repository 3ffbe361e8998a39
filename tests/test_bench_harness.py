"""``bfpaccel bench`` (bfpaccel.bench): the harness on a tiny ONNX model, its JSON and PNG,
unavailable backends, bad arguments, ``--compare`` and bench/refresh_readme.py.  No TensorFlow."""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import bfpaccel  # noqa: E402
from bfpaccel.bench import (BenchArgumentError, check_model, compare_rows, format_markdown, format_table,  # noqa: E402
                            latency_stats, parse_backends, parse_batches, run_benchmark)
from bfpaccel.bench.backends import (CudaBackend, Unavailable, ort_cuda_session,  # noqa: E402
                                     tensorflow_gpu_reason, torch_cuda_reason, torch_module_from_onnx)
from bfpaccel.bench.cli import add_bench_parser  # noqa: E402
from bfpaccel.bench.harness import _sample_shape  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["--runs", "2", "--warmup", "1", "--pause", "0", "--block", "1", "--no-progress", "--quiet"]


def _tiny_onnx(path: Path, nhwc_image_front: bool = False) -> str:
    """Two convolutions + GlobalAveragePool + Gemm + Softmax; NCHW [N,3,32,32], or NHWC
    [N,224,224,3] with the seed's image-front metadata (so the server takes JPEGs)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    def w(*s: int) -> np.ndarray:
        return (rng.standard_normal(s) * 0.2).astype(np.float32)

    inits = {"w1": w(8, 3, 3, 3), "b1": w(8), "w2": w(16, 8, 3, 3), "b2": w(16), "fc": w(16, 10), "fcb": w(10)}
    nodes = []
    x = "x"
    if nhwc_image_front:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]))
        x = "xt"
    stride = [4, 4] if nhwc_image_front else [1, 1]
    nodes += [
        helper.make_node("Conv", [x, "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=stride),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["fl"]),
        helper.make_node("Gemm", ["fl", "fc", "fcb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    shape: List[Any] = ["N", 224, 224, 3] if nhwc_image_front else ["N", 3, 32, 32]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    if nhwc_image_front:
        helper.set_model_props(m, {"bfpaccel.preprocess": json.dumps({
            "kind": "image", "order": "RGB", "scaling_factor": 1.0, "output_height": 224, "output_width": 224,
            "preserve_aspect_ratio": True, "string_input": "Placeholder:0", "input_alias": "images",
            "onnx_input": "x"})})
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return str(path)


def _cli(argv: List[str]) -> Tuple[int, str, str]:
    p = argparse.ArgumentParser(prog="bfpaccel")
    sub = p.add_subparsers(dest="command")
    add_bench_parser(sub)
    args = p.parse_args(["bench", *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = args.func(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _tiny_onnx(tmp_path_factory.mktemp("bench") / "tiny.onnx")


@pytest.fixture(scope="module")
def full_run(tiny: str, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """One CLI run over every backend kind, shared by the tests below."""
    d = tmp_path_factory.mktemp("bench-run")
    js, png = d / "out.json", d / "out.png"
    backends = "bfp:msfp16,bfp:msfp12,onnxruntime,onnxruntime-int8,tensorflow,cuda,serving"
    argv = ["--model", tiny, "--backends", backends, "--batch", "1,2", "--threads", "1", *FAST, "--json", str(js)]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(png)]
    rc, out, err = _cli(argv)
    return {"rc": rc, "out": out, "err": err, "json": js, "png": png,
            "result": json.loads(js.read_text()) if js.exists() else None}


# ----- one run, its JSON, table and PNG -----------------------------------------------
def test_run_succeeds_and_prints_a_table(full_run: Dict[str, Any]) -> None:
    assert full_run["rc"] == 0, full_run["err"]
    out = full_run["out"]
    assert "batch 1" in out and "batch 2" in out
    assert "onnxruntime fp32" in out and "bfpaccel msfp16" in out
    assert "unavailable: TensorFlow runs the zoo models only" in out
    assert "kernel share" in out  # the column (and its note)
    row = next(line for line in out.splitlines() if line.startswith("bfpaccel msfp16"))
    assert row.rstrip().endswith("%")  # a BFP row shows its kernel share
    row = next(line for line in out.splitlines() if line.startswith("onnxruntime fp32"))
    assert row.rstrip().endswith("-")  # other rows: "-"


def _gpu_runtime_here() -> bool:
    """Whether the ``cuda`` backend can run here (onnxruntime's CUDA provider, or PyTorch on a GPU
    with onnx2torch); TensorFlow's GPU rung runs zoo models only, never the tiny ONNX."""
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers() or torch_cuda_reason() is None


def test_json_schema(full_run: Dict[str, Any]) -> None:
    r = full_run["result"]
    assert r["schema"] == "bfpaccel.bench/1"
    assert r["model"]["input_name"] == "x" and r["model"]["input_shape"] == ["N", 3, 32, 32]
    assert r["settings"]["batches"] == [1, 2] and r["settings"]["runs"] == 2 and r["settings"]["threads"] == 1
    env = r["env"]
    assert env["cpu"]["model"] and isinstance(env["cpu"]["flags"], list)
    assert env["threads"] == 1 and env["kernel"] == bfpaccel.get_kernel()
    assert env["libraries"]["bfpaccel"] == bfpaccel.__version__ and "onnxruntime" in env["libraries"]
    assert env["date"].endswith("+00:00")
    names = ["bfp:msfp16", "bfp:msfp12", "onnxruntime", "onnxruntime-int8", "tensorflow", "cuda", "serving"]
    assert [(e["name"], e["batch"]) for e in r["backends"]] == [(n, b) for b in (1, 2) for n in names]
    for e in r["backends"]:
        assert {"name", "label", "kind", "batch", "status", "reason", "latency_ms", "samples_ms",
                "throughput_per_s", "ratio_vs_onnxruntime", "output_rel_err", "kernel_share", "setup_s",
                "info"} <= set(e)
        if e["name"].startswith("bfp:"):
            # one profile after the timed runs: the GEMM kernel's share, and the options it ran with
            assert 0.0 < e["kernel_share"] <= 1.0, e
            prof = e["profile"]
            assert prof["kernel_share"] == e["kernel_share"] and prof["input_shapes"] == {"x": [e["batch"], 3, 32, 32]}
            assert prof["kernel"] == e["info"]["kernel"] == bfpaccel.get_kernel()
            assert prof["threads"] == e["info"]["threads"] == 1
            assert prof["kind_counts"]["conv"] == 2 and prof["kind_counts"]["dense"] == 1
            assert prof["kernel_ms"] <= prof["total_ms"] and prof["top_ops"]
        else:
            assert e["kernel_share"] is None and "profile" not in e
        if e["name"] == "tensorflow" or (e["name"] == "cuda" and not _gpu_runtime_here()):
            assert e["status"] == "unavailable" and e["reason"] and e["latency_ms"] is None
            continue
        assert e["status"] == "ok", e
        lat = e["latency_ms"]
        assert lat["n"] == 2 and len(e["samples_ms"]) == 2
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert e["throughput_per_s"] == pytest.approx(e["batch"] * 1e3 / lat["p50"], rel=1e-3)
        ref = next(x for x in r["backends"] if x["name"] == "onnxruntime" and x["batch"] == e["batch"])
        assert e["ratio_vs_onnxruntime"] == pytest.approx(ref["latency_ms"]["p50"] / lat["p50"], rel=1e-3)
    by = {(e["name"], e["batch"]): e for e in r["backends"]}
    assert by[("onnxruntime", 1)]["ratio_vs_onnxruntime"] == 1.0
    assert by[("onnxruntime", 1)]["output_rel_err"] == 0.0
    # every backend ran the same model on the same input: outputs agree with float32
    assert by[("bfp:msfp16", 1)]["output_rel_err"] < 0.05
    assert by[("onnxruntime-int8", 1)]["output_rel_err"] < 0.2
    # the served plan is the bfp:msfp16 plan: the same bits over gRPC
    assert by[("serving", 2)]["output_rel_err"] == pytest.approx(by[("bfp:msfp16", 2)]["output_rel_err"])
    assert by[("serving", 1)]["info"]["format"] == "msfp16"
    if not _gpu_runtime_here():
        assert "CUDAExecutionProvider" in by[("cuda", 1)]["reason"]
    else:  # the GPU row ran the same model on the same input
        assert by[("cuda", 1)]["output_rel_err"] < 0.01


def test_png_is_written(full_run: Dict[str, Any]) -> None:
    pytest.importorskip("matplotlib")
    data = full_run["png"].read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    from PIL import Image

    with Image.open(full_run["png"]) as im:
        im.verify()


def test_markdown_table(full_run: Dict[str, Any]) -> None:
    md = format_markdown(full_run["result"])
    assert "| batch 1 | p50 ms |" in md and "| bfpaccel msfp16 |" in md and "| tensorflow fp32 | unavailable:" in md
    assert "| out rel err | kernel share |" in md
    assert next(line for line in md.splitlines() if line.startswith("| bfpaccel msfp16 |")).endswith("% |")
    assert next(line for line in md.splitlines() if line.startswith("| onnxruntime fp32 |")).endswith("| - |")


def _strip_share(r: Dict[str, Any]) -> Dict[str, Any]:
    """The result as bench wrote it before the kernel share existed."""
    old = copy.deepcopy(r)
    for e in old["backends"]:
        e.pop("kernel_share", None)
        e.pop("profile", None)
        e["info"].pop("threads", None)
    old["settings"].pop("kernel", None)
    old["settings"].pop("kernel_share", None)
    return old


def test_old_results_without_kernel_share(full_run: Dict[str, Any], tmp_path: Path) -> None:
    old = _strip_share(full_run["result"])
    md = format_markdown(old)  # the table an old result always had: no new column
    assert "kernel share" not in md and "| batch 1 | p50 ms |" in md
    assert "kernel share" in format_table(old)  # the text table has the column, "-" throughout
    assert next(line for line in format_table(old).splitlines()
                if line.startswith("bfpaccel msfp16")).rstrip().endswith("-")
    pa, pb = tmp_path / "old.json", tmp_path / "new.json"
    pa.write_text(json.dumps(old))
    pb.write_text(json.dumps(full_run["result"]))
    rc, out, err = _cli(["--compare", str(pa), str(pb)])
    assert rc == 0, err
    assert "share A" in out and "share B" in out
    row = next(line for line in out.splitlines() if line.startswith("bfpaccel msfp16"))
    assert row.split()[-2] == "-" and row.split()[-1].endswith("%")
    rows = compare_rows(old, full_run["result"])
    assert all(r["kernel_share_a"] is None for r in rows)
    rc, out, err = _cli(["--compare", str(pa), str(pa)])  # two old results: as before, no share columns
    assert rc == 0 and "share A" not in out


def test_kernel_option_is_the_sessions_not_the_process(tiny: str) -> None:
    default = bfpaccel.get_kernel()
    threads = bfpaccel.get_num_threads()
    r = run_benchmark(tiny, "bfp:msfp16,serving", batches="1", runs=1, warmup=0, pause_s=0, threads=1,
                      kernel="scalar", progress=False, log=lambda m: None)
    assert bfpaccel.get_kernel() == default and bfpaccel.get_num_threads() == threads
    assert r["env"]["kernel"] == "scalar" and r["settings"]["kernel"] == "scalar"
    bfp = r["backends"][0]
    assert bfp["status"] == "ok" and bfp["info"]["kernel"] == "scalar" and bfp["profile"]["kernel"] == "scalar"
    assert r["backends"][1]["status"] == "ok"
    assert r["backends"][1]["output_rel_err"] == pytest.approx(bfp["output_rel_err"])  # same bits on any kernel
    assert "--kernel scalar" in format_markdown(r)


# ----- unavailable backends -----------------------------------------------------------
def test_tensorflow_and_cuda_unavailable_do_not_stop_the_run(tiny: str) -> None:
    had_tf = "tensorflow" in sys.modules
    r = run_benchmark(tiny, "tensorflow,cuda,onnxruntime", batches="1", runs=1, warmup=0, pause_s=0,
                      progress=False, log=lambda m: None)
    st = {e["name"]: e for e in r["backends"]}
    assert st["tensorflow"]["status"] == "unavailable"
    assert "zoo models only" in st["tensorflow"]["reason"]
    assert st["onnxruntime"]["status"] == "ok"
    if st["cuda"]["status"] == "unavailable":
        assert st["cuda"]["reason"]
    if not had_tf:
        assert "tensorflow" not in sys.modules  # a PATH.onnx never imports TensorFlow


def _ort_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(_ort_has_cuda(), reason="this machine has onnxruntime CUDA: the unavailable path does not apply")
def test_cuda_session_is_built_and_reports_the_fallback(tiny: str) -> None:
    # the real session options and provider list, down to onnxruntime's own fallback to the CPU
    with pytest.raises(Unavailable, match="could not start CUDAExecutionProvider: the session fell back to "
                                          "CPUExecutionProvider"):
        ort_cuda_session(tiny, threads=1, require_listed=False)
    with pytest.raises(Unavailable, match="has no CUDAExecutionProvider .*onnxruntime-gpu"):
        ort_cuda_session(tiny, threads=1)


@pytest.mark.skipif(_ort_has_cuda(), reason="this machine has onnxruntime CUDA")
def test_cuda_backend_reason_names_every_runtime(tiny: str) -> None:
    from bfpaccel.bench.backends import BenchContext

    ctx = BenchContext(onnx_path=tiny, model=tiny, zoo_name=None, input_name="x", output_names=["prob"], threads=1,
                       workdir=str(Path(tiny).parent), log=lambda m: None)
    had_tf = "tensorflow" in sys.modules
    tf_reason = tensorflow_gpu_reason()
    if tf_reason is None:
        pytest.skip("TensorFlow has a GPU here")
    torch_reason = torch_cuda_reason()
    if torch_reason is None:  # PyTorch sees a GPU and onnx2torch is there: the last rung runs
        backend = CudaBackend()
        backend.prepare(ctx)
        assert backend.label == "cuda (torch)" and backend.info["runtime"] == "torch"
        backend.close()
        return
    with pytest.raises(Unavailable) as ei:
        CudaBackend().prepare(ctx)
    msg = str(ei.value)
    assert "CUDAExecutionProvider" in msg and tf_reason in msg and torch_reason in msg
    if not had_tf and "tensorflow-cpu" in tf_reason:
        assert "tensorflow" not in sys.modules  # the CPU wheel is recognised without importing it


def _onnx2torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip without PyTorch or onnx2torch; where torchvision cannot be imported, stand in for it.
    (PyPI's torchvision wheel is built for PyPI's CUDA torch and does not load beside the CPU torch
    CI installs; onnx2torch imports it for its NonMaxSuppression/RoiAlign converters alone, which
    the graphs here do not have: the stand-in's functions raise if they were ever called.)"""
    pytest.importorskip("torch")
    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("onnx2torch is not installed")
    try:
        import torchvision  # noqa: F401
    except Exception:
        def absent(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("torchvision cannot be imported here")

        tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        ops.nms = ops.roi_align = ops.box_convert = absent  # type: ignore[attr-defined]
        tv.ops = ops  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.setitem(sys.modules, "torchvision.ops", ops)


def test_torch_cuda_reason_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnx2torch" else real(n, *a))
    if real("torch") is None:
        assert torch_cuda_reason() == "PyTorch is not installed"
        return
    assert "onnx2torch is not" in (torch_cuda_reason() or "")
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch" else real(n, *a))
    assert torch_cuda_reason() == "PyTorch is not installed"


def _has_cuda_torch() -> bool:
    return importlib.util.find_spec("torch") is not None and __import__("torch").cuda.is_available()


@pytest.mark.skipif(_has_cuda_torch(), reason="PyTorch sees a GPU here: the unavailable path does not apply")
def test_torch_cuda_reason_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _onnx2torch(monkeypatch)
    import torch

    reason = torch_cuda_reason()
    assert reason is not None and torch.__version__ in reason
    assert ("built without CUDA" in reason) == (torch.version.cuda is None)


def test_cuda_backend_torch_rung_runs_the_onnx(tiny: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the whole onnx2torch rung, up to the device: on PyTorch's CPU device, through the harness
    _onnx2torch(monkeypatch)
    import onnxruntime as ort
    import torch

    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    module = torch_module_from_onnx(tiny, "cpu")
    with torch.inference_mode():
        got = module(torch.from_numpy(x)).numpy()
    want = ort.InferenceSession(tiny, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

    from bfpaccel.bench import backends

    monkeypatch.setattr(backends, "onnxruntime_cuda_reason", lambda: "no CUDAExecutionProvider (test)")
    monkeypatch.setattr(backends, "tensorflow_gpu_reason", lambda: "no TensorFlow GPU (test)")
    monkeypatch.setattr(backends, "torch_cuda_reason", lambda: None)
    monkeypatch.setattr(backends._TorchCuda, "device", "cpu")
    benchmark = torch.backends.cudnn.benchmark
    r = run_benchmark(tiny, "onnxruntime,cuda", batches="1,2", runs=2, warmup=1, pause_s=0, threads=1,
                      progress=False, log=lambda m: None)
    assert torch.backends.cudnn.benchmark == benchmark  # restored by close()
    for e in r["backends"]:
        assert e["status"] == "ok", e
        if e["name"] == "cuda":
            assert e["label"] == "cuda (torch)" and e["info"]["runtime"] == "torch" and e["info"]["device"] == "cpu"
            assert e["info"]["torch"] == torch.__version__ and e["info"]["onnx2torch"]
            assert e["output_rel_err"] < 1e-4  # the same model as onnxruntime's, same input


def test_torch_module_from_onnx_reports_an_unconvertible_graph(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _onnx2torch(monkeypatch)
    import onnx
    from onnx import TensorProto, helper

    def save(node: Any, name: str, *opsets: Any) -> str:
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *opsets])
        model.ir_version = 8  # what onnxruntime releases older than this onnx still load
        onnx.save(model, str(tmp_path / name))
        return str(tmp_path / name)

    # an op onnxruntime runs and onnx2torch has no converter for
    with pytest.raises(Unavailable, match="onnx2torch cannot convert hardmax.onnx: .*Hardmax"):
        torch_module_from_onnx(save(helper.make_node("Hardmax", ["x"], ["y"]), "hardmax.onnx"), "cpu")
    # an op onnxruntime cannot load
    custom = save(helper.make_node("NoSuchOp", ["x"], ["y"], domain="example.custom"), "custom.onnx",
                  helper.make_opsetid("example.custom", 1))
    with pytest.raises(Unavailable, match="onnxruntime cannot load custom.onnx for its basic rewrites"):
        torch_module_from_onnx(custom, "cpu")


def test_torch_rung_takes_torchscript_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # PyTorch's TorchScript exporter stands for duplicate initializers (the folded biases of
    # freshly initialised BatchNorms are all zeros) with Identity nodes, which onnx2torch cannot take
    # as Conv weights; the basic rewrites turn them into initializers
    _onnx2torch(monkeypatch)
    import onnx
    import onnxruntime as ort
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
                              torch.nn.Conv2d(8, 8, 1, bias=False), torch.nn.BatchNorm2d(8)).eval()
    path = str(tmp_path / "ts.onnx")
    with torch.no_grad():
        torch.onnx.export(net, (torch.zeros(1, 3, 8, 8),), path, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], do_constant_folding=True)
    assert "Identity" in [n.op_type for n in onnx.load(path).graph.node]
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with torch.inference_mode():
        got = torch_module_from_onnx(path, "cpu")(torch.from_numpy(x)).numpy()
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class _FakeEstimate:
    def __init__(self, batch: int) -> None:
        self.total_ms = 1.5 * batch
        self.layers = [object(), object()]
        self.utilization = 0.25

    def to_json(self) -> Dict[str, Any]:
        return {"total_ms": self.total_ms, "layers": [{"x": 1}], "npu": "brainwave-s10"}


def test_fpga_model_estimate_is_marked(tiny: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: List[Tuple[Any, str, int]] = []

    def estimate(model: Any, npu: str = "brainwave-s10", batch: int = 1, input_shape: Any = None) -> _FakeEstimate:
        calls.append((model, npu, batch))
        return _FakeEstimate(batch)

    fake = types.ModuleType("bfpaccel.perfmodel")
    fake.estimate = estimate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bfpaccel.perfmodel", fake)
    monkeypatch.setattr(bfpaccel, "perfmodel", fake, raising=False)
    r = run_benchmark(tiny, "bfp:msfp16,onnxruntime,fpga-model", batches="1,4", runs=1, warmup=0, pause_s=0,
                      progress=False, log=lambda m: None)
    est = [e for e in r["backends"] if e["name"] == "fpga-model"]
    assert [e["status"] for e in est] == ["estimate", "estimate"] and est[0]["kind"] == "estimate"
    assert [e["latency_ms"]["p50"] for e in est] == [1.5, 6.0]
    assert est[1]["throughput_per_s"] == pytest.approx(4 * 1e3 / 6.0, rel=1e-3)
    assert est[0]["info"]["utilization"] == 0.25 and est[0]["info"]["layers"] == 2
    assert "layers" not in est[0]["info"]["estimate"]
    assert [c[1:] for c in calls] == [("brainwave-s10", 1), ("brainwave-s10", 4)]
    assert isinstance(calls[0][0], bfpaccel.Plan)  # the bfp:msfp16 plan, not compiled twice
    table = format_table(r)
    assert "fpga-model brainwave-s10 (estimate)" in table and "x*" in table and "not a measurement" in table


def test_fpga_model_missing_module_is_unavailable(tiny: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bfpaccel.perfmodel", None)  # import of it fails
    monkeypatch.delattr(bfpaccel, "perfmodel", raising=False)
    r = run_benchmark(tiny, "fpga-model,onnxruntime", batches="1", runs=1, warmup=0, pause_s=0, progress=False,
                      log=lambda m: None)
    e = r["backends"][0]
    assert e["status"] == "unavailable" and "bfpaccel.perfmodel" in e["reason"]
    assert r["backends"][1]["status"] == "ok"


def test_serving_jpeg_needs_an_image_front_and_works_with_one(tmp_path: Path) -> None:
    pytest.importorskip("grpc")
    pytest.importorskip("PIL")
    nhwc = _tiny_onnx(tmp_path / "front.onnx", nhwc_image_front=True)
    r = run_benchmark(nhwc, "onnxruntime,serving:jpeg,serving:msfp12", batches="2", runs=1, warmup=0, pause_s=0,
                      threads=1, progress=False, log=lambda m: None)
    st = {e["name"]: e for e in r["backends"]}
    assert st["serving:jpeg"]["status"] == "ok" and "JPEG" in st["serving:jpeg"]["info"]["input"]
    assert st["serving:jpeg"]["output_rel_err"] is None  # another input: not compared
    assert st["serving:msfp12"]["status"] == "ok" and st["serving:msfp12"]["output_rel_err"] < 0.2


def test_serving_jpeg_without_image_front_is_unavailable(tiny: str) -> None:
    pytest.importorskip("grpc")
    r = run_benchmark(tiny, "serving:jpeg", batches="1", runs=1, warmup=0, pause_s=0, progress=False,
                      log=lambda m: None)
    assert r["backends"][0]["status"] == "unavailable" and "image front" in r["backends"][0]["reason"]


# ----- arguments ----------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--backends", "onnxruntime,foo"], "unknown backend 'foo'"),
    (["--backends", "bfp:nosuchformat"], "unknown format 'nosuchformat'"),
    (["--backends", "onnxruntime,onnxruntime"], "given twice"),
    (["--batch", "0"], "batch size must be >= 1, got 0"),
    (["--batch", "1,x"], "whole numbers"),
    (["--runs", "0"], "--runs must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--kernel", "nosuchkernel"], "--kernel: unknown kernel 'nosuchkernel'; this build has scalar"),
    (["--model", "/no/such/model.onnx"], "does not exist"),
    (["--model", "alexnet"], "unknown model 'alexnet'"),
    (["--json", "/no/such/dir/out.json"], "does not exist"),
])
def test_bad_arguments_exit_2(tiny: str, argv: List[str], message: str) -> None:
    base = ["--model", tiny, "--backends", "onnxruntime", *FAST]
    rc, out, err = _cli(base + argv)
    assert rc == 2
    assert message in err and err.startswith("bfpaccel bench: error:")
    assert out == ""


def test_fixed_batch_model_rejects_other_batches() -> None:
    with pytest.raises(BenchArgumentError, match="fixed batch of 1"):
        _sample_shape("x", [1, 3, 8, 8], (1, 8))
    assert _sample_shape("x", ["N", 3, 8, 8], (1, 8)) == (3, 8, 8)
    with pytest.raises(BenchArgumentError, match="only the batch dimension may be symbolic"):
        _sample_shape("x", ["N", 3, "H", "W"], (1,))


def test_parsers_and_stats() -> None:
    assert parse_batches("1, 8,8") == (1, 8)
    assert [b.name for b in parse_backends("bfp,ort,serving")] == ["bfp:msfp16", "onnxruntime", "serving"]
    assert parse_backends("bfp:msfp12,serving")[1].fmt == "msfp12"  # type: ignore[attr-defined]
    assert parse_backends("fpga-model:brainwave-a10")[0].npu == "brainwave-a10"  # type: ignore[attr-defined]
    assert check_model("QuantizedResnet50") == "resnet50"
    s = latency_stats([4.0, 1.0, 3.0, 2.0])
    assert s["p50"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["mean"] == 2.5 and s["n"] == 4


# ----- --compare ----------------------------------------------------------------------
def test_compare_two_results(full_run: Dict[str, Any], tmp_path: Path) -> None:
    a = full_run["result"]
    b = copy.deepcopy(a)
    for e in b["backends"]:
        if e["name"] == "bfp:msfp16" and e["latency_ms"]:
            e["latency_ms"]["p50"] *= 0.5
        if e["name"] == "onnxruntime-int8" and e["latency_ms"]:
            e["latency_ms"]["p50"] *= 2.0
    other = "scalar" if a["env"].get("kernel") != "scalar" else "avx2"  # a kernel unlike run A's
    b["env"]["kernel"] = other
    b["backends"] = [e for e in b["backends"] if e["name"] != "serving"]
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    rows = {(r["name"], r["batch"]): r for r in compare_rows(a, b)}
    assert rows[("bfp:msfp16", 1)]["verdict"] == "faster" and rows[("bfp:msfp16", 1)]["change"] == pytest.approx(-0.5)
    assert rows[("onnxruntime-int8", 1)]["verdict"] == "slower"
    assert rows[("onnxruntime", 1)]["verdict"] == "same"
    assert rows[("serving", 1)]["status_b"] == "absent"
    rc, out, err = _cli(["--compare", str(pa), str(pb)])
    assert rc == 0, err
    assert "kernel: " in out and f"-> {other}" in out and "faster" in out and "slower" in out and "absent" in out
    assert "-50.0%" in out


def test_compare_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    rc, _, err = _cli(["--compare", str(bad), str(bad)])
    assert rc == 2 and "not a bfpaccel bench result" in err
    rc, _, err = _cli(["--compare", str(tmp_path / "none.json"), str(bad)])
    assert rc == 2 and "does not exist" in err


# ----- bench/refresh_readme.py --------------------------------------------------------
def _refresh_module() -> Any:
    path = REPO / "bench" / "refresh_readme.py"
    assert path.is_file(), path
    spec = importlib.util.spec_from_file_location("refresh_readme", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_refresh_readme_on_a_copy(full_run: Dict[str, Any], tmp_path: Path) -> None:
    mod = _refresh_module()
    readme = tmp_path / "README.md"
    original = (REPO / "bench" / "README.md").read_text()
    readme.write_text(original)
    with contextlib.redirect_stdout(io.StringIO()):
        assert mod.main([str(full_run["json"]), "--readme", str(readme), "--image", "latest.png"]) == 0
    new = readme.read_text()
    i, j = new.index(mod.BEGIN), new.index(mod.END)
    assert new[:i] == original[:original.index(mod.BEGIN)]  # the rest of the file is untouched
    assert new[j:] == original[original.index(mod.END):]
    section = new[i:j]
    assert "| batch 1 | p50 ms |" in section and "| bfpaccel msfp16 |" in section and "(latest.png)" in section
    with contextlib.redirect_stdout(io.StringIO()):  # idempotent; --check agrees
        assert mod.main([str(full_run["json"]), "--readme", str(readme), "--image", "latest.png", "--check"]) == 0
    with contextlib.redirect_stderr(io.StringIO()):
        assert mod.main([str(full_run["json"]), "--readme", str(readme), "--check"]) == 1
    nomark = tmp_path / "plain.md"
    nomark.write_text("# no markers\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert mod.main([str(full_run["json"]), "--readme", str(nomark)]) == 2
    assert "bench:begin" in err.getvalue() and nomark.read_text() == "# no markers\n"
