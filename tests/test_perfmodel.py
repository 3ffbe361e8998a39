"""Tests of bfpaccel.perfmodel: the Brainwave-style NPU cycle model.

Every expected cycle count below is worked out by hand in the comments, from the model of
docs/perfmodel.md:

  per input vector  = ceil(ceil(K/nd) * ceil(N/nd) / tiles) * ceil(nd/lanes)
  compute           = groups * M * per input vector
  vector (a chain)  = ceil(ops / chain_ops) * ceil(max elements / mfu_ops_per_cycle)
  weight load       = ceil(weight bytes / (dram GB/s * 1e9) * clock Hz)   (streamed layers only)
  layer             = max(compute, weight load, vector) + pipeline_fill_cycles

No TensorFlow: the small models are written with onnx.helper and compiled with bfpaccel.compile.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import bfpaccel  # noqa: E402
from bfpaccel.perfmodel import (  # noqa: E402
    BUILTIN_MODELS,
    NpuConfig,
    NpuConfigError,
    estimate,
    gemm_cycles,
    list_npus,
    load_npu,
    peak_macs_per_cycle,
    peak_tops,
)
from bfpaccel.perfmodel.cli import add_estimate_parser  # noqa: E402

#: A toy NPU small enough to count by hand: 2 tiles x 4 lanes x native 8 = 64 MACs/cycle.
TOY = dict(name="toy", clock_mhz=100, native_dim=8, lanes=4, tiles=2, weight_bits=8, mrf_bytes=None,
           dram_gbps=None, mfu_ops_per_cycle=16, mfu_chain_ops=2, pipeline_fill_cycles=5)


def toy(**kw):
    return load_npu({**TOY, **kw})


def _model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "m", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _dense_model(K=20, N=10):
    rng = np.random.default_rng(0)
    inits = {"B": rng.standard_normal((K, N)).astype(np.float32), "C": rng.standard_normal(N).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="fc"),
             helper.make_node("Relu", ["y"], ["z"], name="relu")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, N])], inits)


def _conv_model(nhwc=False, group=1, cin=3, cout=5, k=3, stride=2, pad=1, hw=6, pool=False):
    rng = np.random.default_rng(1)
    inits = {"W": rng.standard_normal((cout, cin // group, k, k)).astype(np.float32),
             "b": rng.standard_normal(cout).astype(np.float32)}
    nodes = []
    x = "x"
    if nhwc:  # tf2onnx style: NHWC graph input, Transpose to NCHW in front of the conv
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw"))
        x = "x_nchw"
    nodes.append(helper.make_node("Conv", [x, "W", "b"], ["c"], name="conv", kernel_shape=[k, k],
                                  strides=[stride, stride], pads=[pad] * 4, group=group))
    nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
    out = "r"
    if pool:
        nodes.append(helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[1, 1]))
        out = "p"
    shape = [1, hw, hw, cin] if nhwc else [1, cin, hw, hw]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)


# ------------------------------------------------------------------ published figures
def test_brainwave_s10_reproduces_the_published_peak():
    npu = load_npu("brainwave-s10")
    # ISCA 2018: "as many as 96,000 MACs can be deployed on a Stratix 10 280 FPGA";
    # BW_S10 = 6 tiles x 40 lanes x native dimension 400
    assert (npu.tiles, npu.lanes, npu.native_dim) == (6, 40, 400)
    assert peak_macs_per_cycle(npu) == 96_000
    # 2 ops/MAC x 96,000 MACs x 250 MHz = 48.0e12 = the 48 TFLOPS peak of BW_S10
    assert peak_tops(npu) == pytest.approx(2 * 96_000 * 250e6 / 1e12) == pytest.approx(48.0)
    # ISCA 2018 measured up to 35.9 effective TFLOPS at batch 1 (large GRU): below the peak, 75% of it
    assert 35.9 / peak_tops(npu) == pytest.approx(0.748, abs=1e-3)
    assert npu.sources["peak_macs"].startswith("'as many as 96,000 MACs")


def test_one_native_tile_takes_native_dim_over_lanes_cycles():
    # one 400x400 tile on one tile engine: 400 rows / 40 dot-product lanes = 10 cycles
    assert gemm_cycles(1, 400, 400, "brainwave-s10") == 10
    # six tiles' worth of matrix (K=1200, N=800: 3x2 native tiles) still takes 10 cycles per vector
    assert gemm_cycles(1, 1200, 800, "brainwave-s10") == 10
    # seven native tiles need a second round: 20 cycles
    assert gemm_cycles(1, 1400, 800, "brainwave-s10") == 20


# ------------------------------------------------------------------ hand-counted layers
def test_small_gemm_cycles_by_hand():
    e = estimate(bfpaccel.compile(_dense_model(), format="msfp16"), toy(), batch=3)
    (fc,) = e.layers
    # M = 3 rows, K = 20, N = 10 on nd=8, lanes=4, tiles=2:
    #   native tiles = ceil(20/8) * ceil(10/8) = 3 * 2 = 6; rounds = ceil(6/2) = 3; ceil(8/4) = 2 cycles each
    #   -> 6 cycles per vector, x 3 vectors = 18 compute cycles
    assert (fc["m"], fc["k"], fc["n"]) == (3, 20, 10)
    assert fc["compute_cycles"] == 18
    # MFU chain: bias + Relu = 2 ops (one pass, chain_ops=2) over 3*10 = 30 elements at 16/cycle -> 2
    assert fc["fused"] == ["relu"] and fc["vector_cycles"] == 2
    # layer = max(18, 0, 2) + 5 fill = 23 cycles at 100 MHz = 0.23 us
    assert fc["cycles"] == 23 and fc["bound"] == "compute"
    assert e.total_cycles == 23 and e.total_ms == pytest.approx(23 / 100e6 * 1e3)
    assert fc["macs"] == 3 * 20 * 10 == 600
    # utilisation = 600 MACs / (23 cycles * 64 MACs/cycle)
    assert fc["utilisation"] == pytest.approx(600 / (23 * 64))
    assert e.utilization == pytest.approx(600 / (23 * 64))


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc_transpose"])
def test_small_conv_cycles_by_hand(nhwc):
    e = estimate(bfpaccel.compile(_conv_model(nhwc=nhwc), format="msfp16"), toy())
    (conv,) = e.layers
    # input 3x6x6, 3x3 kernel, stride 2, pad 1 -> output 5 x 3 x 3: M = 9 pixels, K = 3*3*3 = 27, N = 5
    assert conv["output_shape"] == [1, 5, 3, 3]
    assert (conv["m"], conv["k"], conv["n"]) == (9, 27, 5)
    # native tiles = ceil(27/8) * ceil(5/8) = 4 * 1 = 4; rounds = ceil(4/2) = 2; x 2 cycles = 4 per pixel
    # -> 9 * 4 = 36 compute cycles
    assert conv["compute_cycles"] == 36
    # chain bias + Relu over 45 elements: 1 pass x ceil(45/16) = 3 cycles
    assert conv["vector_cycles"] == 3
    assert conv["cycles"] == 36 + 5 and conv["bound"] == "compute"
    assert conv["macs"] == 9 * 27 * 5
    if nhwc:
        assert e.ignored_ops.get("Transpose") == 1


def test_weight_streaming_bound_by_hand():
    # 5 x 27 weights at 8 bits = 135 bytes > MRF of 100 bytes: streamed from DRAM every inference
    # at 0.1 GB/s: 135 B / 1e8 B/s = 1.35 us = 135 cycles at 100 MHz
    e = estimate(bfpaccel.compile(_conv_model(), format="msfp16"), toy(mrf_bytes=100, dram_gbps=0.1))
    (conv,) = e.layers
    assert conv["weight_bytes"] == 135 and conv["resident"] is False
    assert conv["weight_cycles"] == 135
    assert conv["bound"] == "weight_bandwidth" and conv["cycles"] == 135 + 5
    assert e.bound_counts == {"compute": 0, "weight_bandwidth": 1, "vector": 0}
    # enough MRF: resident, back to compute bound
    e2 = estimate(bfpaccel.compile(_conv_model(), format="msfp16"), toy(mrf_bytes=135, dram_gbps=0.1))
    assert e2.layers[0]["resident"] is True and e2.layers[0]["bound"] == "compute"


def test_streaming_without_dram_bandwidth_names_the_figure():
    with pytest.raises(NpuConfigError, match="dram_gbps"):
        estimate(bfpaccel.compile(_conv_model(), format="msfp16"), toy(mrf_bytes=100))


def test_vector_bound_layers_by_hand():
    # a slow MFU (1 element/cycle): bias+Relu over 45 elements = 45 cycles > 36 compute
    e = estimate(bfpaccel.compile(_conv_model(pool=True), format="msfp16"), toy(mfu_ops_per_cycle=1))
    conv, pool = e.layers
    assert conv["vector_cycles"] == 45 and conv["bound"] == "vector" and conv["cycles"] == 45 + 5
    # the pool is its own vector layer: output 5x2x2 = 20 elements x 4-tap window = 80 element-ops
    assert pool["kind"] == "vector" and pool["vector_ops"] == 80
    assert pool["cycles"] == 80 + 5 and pool["bound"] == "vector" and pool["utilisation"] == 0.0


def test_depthwise_is_a_degenerate_low_utilisation_gemm_or_runs_on_the_mfus():
    m = bfpaccel.compile(_conv_model(group=4, cin=4, cout=4, stride=1), format="msfp16")
    # on the MVM: 4 groups of K = 1*3*3 = 9, N = 1, M = 36 pixels: ceil(9/8)*ceil(1/8) = 2 native
    # tiles -> 1 round x 2 cycles; compute = 4 groups * 36 * 2 = 288 cycles for 4*36*9 = 1296 MACs
    # on the MFUs (1 element/cycle): 1296 multiply-adds = 1296 cycles > 288 -> stays on the MVM
    (dw,) = estimate(m, toy(mfu_ops_per_cycle=1)).layers
    assert dw["kind"] == "depthwise" and (dw["k"], dw["n"], dw["groups"]) == (9, 1, 4)
    assert dw["mapped"] == "mvm" and dw["compute_cycles"] == 288 and dw["macs"] == 1296
    # chain bias + Relu over 144 elements at 1/cycle = 144; layer = 288 + 5; 1296 / (293 * 64) = 6.9%
    assert dw["cycles"] == 293 and dw["utilisation"] == pytest.approx(1296 / (293 * 64))
    # with the toy's 16-wide MFU: 1296 / 16 = 81 cycles of taps < 288 -> mapped to the MFUs,
    # plus the bias + Relu chain ceil(144/16) = 9 -> 90 vector cycles, layer 95, vector bound
    (dw,) = estimate(m, toy()).layers
    assert dw["mapped"] == "mfu" and dw["compute_cycles"] == 0 and dw["vector_cycles"] == 81 + 9
    assert dw["cycles"] == 95 and dw["bound"] == "vector"


def test_batch_scales_the_vectors():
    m = bfpaccel.compile(_dense_model(), format="msfp16")
    e1, e4 = estimate(m, toy(), batch=1), estimate(m, toy(), batch=4)
    assert e4.layers[0]["m"] == 4 * e1.layers[0]["m"] and e4.batch == 4
    assert e4.layers[0]["compute_cycles"] == 4 * e1.layers[0]["compute_cycles"]
    with pytest.raises(ValueError, match="batch"):
        estimate(m, toy(), batch=0)


# ------------------------------------------------------------------ monotonicity
def test_monotone_in_gemm_size_lanes_tiles_and_clock():
    npu = load_npu("brainwave-s10")
    sizes = [1, 64, 399, 400, 401, 800, 2048, 4096]
    for K in (64, 576, 4608):
        c = [gemm_cycles(7, K, n, npu) for n in sizes]
        assert c == sorted(c), f"cycles must not drop as N grows (K={K}): {c}"
        c = [gemm_cycles(7, k, 512, npu) for k in sizes]
        assert c == sorted(c)
    base = estimate("resnet50", npu).total_ms
    more_lanes = estimate("resnet50", load_npu(npu, lanes=80)).total_ms
    more_tiles = estimate("resnet50", load_npu(npu, tiles=12)).total_ms
    faster = estimate("resnet50", load_npu(npu, clock_mhz=500)).total_ms
    assert more_lanes < base and more_tiles <= base
    assert faster == pytest.approx(base / 2)
    for lanes in (10, 20, 40, 100, 200, 400):
        assert estimate("resnet50", load_npu(npu, lanes=lanes)).total_cycles <= \
            estimate("resnet50", load_npu(npu, lanes=max(1, lanes // 2))).total_cycles


def test_native_dim_raises_peak_but_not_always_speed():
    # a bigger native dimension raises the peak, but a small layer pads more: the reason
    # Brainwave specialises the native dimension per model at synthesis time (docs/perfmodel.md)
    small = [gemm_cycles(1, 64, 64, load_npu("brainwave-s10", native_dim=nd)) for nd in (80, 400)]
    assert small == [2, 10]
    assert peak_tops(load_npu("brainwave-s10", native_dim=80)) < peak_tops("brainwave-s10")
    big = [gemm_cycles(1, 4800, 4800, load_npu("brainwave-s10", native_dim=nd)) for nd in (80, 400)]
    assert big[1] < big[0]


# ------------------------------------------------------------------ the zoo
def test_builtin_zoo_models_have_the_known_mac_counts():
    e = estimate("resnet50")
    assert 3.85e9 < e.total_macs < 3.87e9  # ResNet-50: 3.86 GMAC at 224x224 (1000-class head)
    assert len([r for r in e.layers if r["kind"] == "conv"]) == 54  # 53 convs + the 1x1 logits conv
    assert 15.4e9 < estimate("vgg16").total_macs < 15.5e9  # VGG-16: 15.47 GMAC
    assert 2.8e9 < estimate("densenet121").total_macs < 2.9e9  # DenseNet-121: 2.83 GMAC
    assert estimate("resnet152").total_macs > 11e9
    ssd = estimate("ssdvgg")
    assert ssd.input_shapes == {"input:0": [1, 3, 300, 300]}
    grids = sorted({r["output_shape"][-1] for r in ssd.layers if r["name"].endswith(("conv_loc", "conv_cls"))})
    assert grids == [1, 3, 5, 10, 19, 37]  # the seed's SSD grids


def test_resnet50_estimate_on_brainwave_s10():
    e = estimate("resnet50", "brainwave-s10")
    assert 1.0 < e.total_ms < 5.0
    assert 0 < e.utilization < 0.5
    assert e.bound_counts["compute"] > e.bound_counts["vector"] > 0
    assert sum(e.bound_counts.values()) == len(e.layers)
    text = e.table(top=5)
    assert "resnet_v1_50/conv1" in text and "assumption:" in text
    d = json.loads(json.dumps(e.to_json()))
    assert d["total_ms"] == pytest.approx(e.total_ms) and d["peak_tops"] == pytest.approx(48.0)
    assert {"name", "kind", "macs", "cycles", "bound", "utilisation"} <= set(d["layers"][0])


def test_builtin_resnet50_matches_the_converted_zoo_model(tmp_path):
    """The built-in ResNet-50 description equals the zoo graph converted the seed's way."""
    pytest.importorskip("tensorflow", reason="building the zoo model needs the tf extra")
    pytest.importorskip("tf2onnx", reason="converting the zoo model needs the tf extra")
    from bfpaccel.models.zoo import build_zoo_onnx

    path = build_zoo_onnx("resnet50", "random", str(tmp_path), log=lambda m: None)
    real, builtin = estimate(path), estimate("resnet50")
    assert [(r["m"], r["k"], r["n"]) for r in real.layers if r["macs"]] == \
        [(r["m"], r["k"], r["n"]) for r in builtin.layers if r["macs"]]
    assert real.total_cycles == builtin.total_cycles


def test_plan_file_and_onnx_path(tmp_path):
    m = _conv_model()
    onnx_path = tmp_path / "c.onnx"
    onnx.save(m, str(onnx_path))
    plan_path = str(tmp_path / "c.bfpplan")
    bfpaccel.compile(m, format="msfp16").save(plan_path)
    a, b = estimate(str(onnx_path), toy()), estimate(plan_path, toy())
    assert a.total_cycles == b.total_cycles == 41
    with pytest.raises(ValueError, match="unknown model"):
        estimate("resnet9000", toy())


def test_dynamic_spatial_dims_need_an_input_shape():
    m = _conv_model()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "h"
    p = bfpaccel.compile(m, format="msfp16")
    with pytest.raises(ValueError, match="input_shape"):
        estimate(p, toy())
    assert estimate(p, toy(), input_shape=[1, 3, 6, 6]).total_cycles == 41


# ------------------------------------------------------------------ configurations and errors
def test_npu_configurations_load_and_errors_are_actionable(tmp_path):
    assert {"brainwave-s10", "brainwave-a10"} <= set(list_npus())
    with pytest.raises(NpuConfigError, match="unknown NPU 'tpu'.*brainwave-a10, brainwave-s10"):
        load_npu("tpu")
    a10 = load_npu("brainwave-a10")
    with pytest.raises(NpuConfigError, match="clock_mhz, native_dim, lanes, tiles, weight_bits"):
        estimate("resnet50", a10)
    filled = load_npu("brainwave-a10", clock_mhz=200, native_dim=128, lanes=16, tiles=4, weight_bits=4.04)
    assert filled.sources["tiles"] == "set by the user" and estimate("resnet50", filled).total_ms > 0
    y = tmp_path / "npu.yaml"
    y.write_text("name: mine\nclock_mhz: 100\nnative_dim: 8\nlanes: 4\ntiles: 2\nweight_bits: 8\n")
    with pytest.raises(NpuConfigError, match="missing mrf_bytes, dram_gbps"):
        load_npu(str(y))
    y.write_text("\n".join(f"{k}: {'null' if v is None else v}" for k, v in TOY.items()) + "\n")
    assert load_npu(str(y)) == load_npu(TOY).__class__(**{**vars(load_npu(TOY)), "path": str(y)})
    with pytest.raises(NpuConfigError, match="lanes must be a whole number"):
        load_npu(TOY, lanes="four")
    with pytest.raises(NpuConfigError, match="tiles must be positive"):
        load_npu(TOY, tiles=0)
    with pytest.raises(NpuConfigError, match="unknown NPU figure"):
        load_npu(TOY, warp_drive=1)
    assert isinstance(load_npu(load_npu(TOY)), NpuConfig)


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    import argparse

    p = argparse.ArgumentParser()
    add_estimate_parser(p.add_subparsers())
    out = tmp_path / "e.json"
    args = p.parse_args(["estimate", "--model", "resnet50", "--top", "3", "--json", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "resnet50 on brainwave-s10" in text and json.loads(out.read_text())["model"] == "resnet50"
    args = p.parse_args(["estimate", "--model", "resnet50", "--npu", "brainwave-a10"])
    assert args.func(args) == 2
    assert "--set clock_mhz=..." in capsys.readouterr().err
    args = p.parse_args(["estimate", "--model", "resnet50", "--npu", "brainwave-a10", "--set", "clock_mhz=200",
                         "--set", "native_dim=128", "--set", "lanes=16", "--set", "tiles=4", "--set", "weight_bits=4"])
    assert args.func(args) == 0
    args = p.parse_args(["estimate", "--list-npus"])
    assert args.func(args) == 0 and "48.0 peak TOPS" in capsys.readouterr().out


def test_builtin_names_cover_the_zoo():
    from bfpaccel.models.zoo import ZOO_MODELS

    assert set(ZOO_MODELS) <= set(BUILTIN_MODELS)  # and the recurrent layers gru2816, lstm1024


def test_docstring_examples():
    import doctest

    import bfpaccel.perfmodel
    import bfpaccel.perfmodel.model

    for mod in (bfpaccel.perfmodel, bfpaccel.perfmodel.model):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0
