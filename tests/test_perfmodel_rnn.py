"""bfpaccel.perfmodel on recurrent layers (LSTM / GRU): serial time steps, each a matrix-vector
product per weight on the MVM and the gate arithmetic as an MFU chain. Expected cycles are
worked out by hand from docs/perfmodel.md#recurrent-layers:

  step   = max(MVM, MFU chain) + pipeline fill
  MVM    = sum over the step's products of ceil(ceil(K/nd) * ceil(N/nd) / tiles) * ceil(nd/lanes) (per batch row)
  chain  = ceil(11 / chain_ops) * ceil(B * gates * H / mfu_ops_per_cycle)
  layer  = directions * T * step
"""

from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")

import bfpaccel  # noqa: E402
from bfpaccel.models.rnn import rnn_onnx  # noqa: E402
from bfpaccel.perfmodel import BUILTIN_MODELS, estimate, load_npu  # noqa: E402

#: 2 tiles x 4 lanes x native 8; MFU chain of 3 ops at 4 elements per cycle
TOY = dict(name="toy", clock_mhz=100, native_dim=8, lanes=4, tiles=2, weight_bits=8, mrf_bytes=None,
           dram_gbps=None, mfu_ops_per_cycle=4, mfu_chain_ops=3, pipeline_fill_cycles=0)


def _plan(cell: str, H: int, I: int, T: int, **kw):
    return bfpaccel.compile(rnn_onnx(cell, H, I, T, **kw), format="msfp16")


def test_gru_steps_by_hand() -> None:
    # GRU H=8, I=16, T=5, linear_before_reset=1, batch 1:
    #   x W^T: K=16, N=24 -> ceil(2*3/2)=3 blocks-steps * ceil(8/4)=2 -> 6 cycles
    #   h R^T: K=8,  N=24 -> ceil(1*3/2)=2 * 2 -> 4 cycles          MVM = 10
    #   chain: ceil(11/3)=4 passes * ceil(24/4)=6 -> 24 cycles      step = max(10, 24) = 24
    e = estimate(_plan("GRU", 8, 16, 5), load_npu(TOY), batch=1)
    (layer,) = [r for r in e.layers if r["kind"] == "recurrent"]
    assert layer["compute_cycles"] == 5 * 10 and layer["vector_cycles"] == 5 * 24
    assert layer["cycles"] == 5 * 24 and layer["bound"] == "vector"
    assert layer["macs"] == 5 * 24 * (16 + 8)


def test_gru_without_linear_before_reset_has_three_products_in_series() -> None:
    # the h gate's product waits for r: h R_zr^T (K=8, N=16: ceil(1*2/2)=1*2 = 2) then
    # (r*h) R_h^T (K=8, N=8: 1*2 = 2) after x W^T (6): MVM = 10 again, batch 4 -> 4 rows each
    e = estimate(_plan("GRU", 8, 16, 5, linear_before_reset=False), load_npu(TOY), batch=4)
    (layer,) = [r for r in e.layers if r["kind"] == "recurrent"]
    assert layer["compute_cycles"] == 5 * 4 * 10
    # chain over B * 3H = 96 elements: 4 passes * 24 = 96 cycles; step = max(40, 96)
    assert layer["cycles"] == 5 * 96


def test_lstm_compute_bound_and_fill() -> None:
    # LSTM H=32, I=32, T=3 on TOY with fill 7: x W^T and h R^T are K=32, N=128:
    # ceil(4*16/2)=32 * 2 = 64 cycles each -> MVM 128; chain 4 * ceil(128/4)=128 -> tie: compute
    e = estimate(_plan("LSTM", 32, 32, 3), load_npu({**TOY, "pipeline_fill_cycles": 7}), batch=1)
    (layer,) = [r for r in e.layers if r["kind"] == "recurrent"]
    assert layer["cycles"] == 3 * (128 + 7) and layer["bound"] == "compute"


def test_deepbench_gru_2816_on_brainwave_s10() -> None:
    # 750 steps, 2 products K=2816, N=8448 on BW_S10 (nd 400, lanes 40, tiles 6):
    # ceil(8 * 22 / 6) = 30 * ceil(400/40) = 10 -> 300 cycles each, 600 a step: 450,000 cycles;
    # 2 * 750 * 3 * 2816 * 5632 = 71.4 G operations (DeepBench's "71B OPs/serve")
    e = estimate("gru2816", "brainwave-s10", batch=1)
    assert e.total_cycles == 450_000
    assert round(2 * e.total_macs / 1e9, 1) == 71.4
    assert 39 < e.effective_tops < 40


def test_builtin_rnn_models_listed() -> None:
    assert {"gru2816", "lstm1024"} <= set(BUILTIN_MODELS)


def test_g2p_decoder_step_estimate() -> None:
    """A GRU followed by a Reshape and a dense layer (the g2p decoder's shape) is walked through."""
    g2p = pytest.importorskip("bfpaccel.models.g2p")
    try:
        ck = g2p.load_checkpoint()
    except ImportError:
        pytest.skip("g2p-en is not installed")
    e = estimate(bfpaccel.compile(g2p.decoder_onnx(ck)), "brainwave-s10")
    assert [r["kind"] for r in e.layers] == ["recurrent", "dense"]


def test_bench_gru_row(tmp_path) -> None:
    """`bfpaccel bench --model gru`: one GRU layer on the BFP runtime beside onnxruntime fp32 and
    the NPU estimate, batch 1; the outputs agree."""
    pytest.importorskip("onnxruntime")
    from bfpaccel.bench.harness import run_benchmark

    r = run_benchmark("gru", "bfp:msfp16,onnxruntime,fpga-model", batches="1", runs=1, warmup=0, pause_s=0,
                      threads=1, cache_dir=str(tmp_path), progress=False, log=lambda m: None)
    rows = {e["name"]: e for e in r["backends"]}
    assert [rows[k]["status"] for k in ("bfp:msfp16", "onnxruntime", "fpga-model")] == ["ok", "ok", "estimate"], rows
    assert rows["bfp:msfp16"]["output_rel_err"] < 0.05
    assert rows["fpga-model"]["latency_ms"]["p50"] > 0 and rows["bfp:msfp16"]["ratio_vs_onnxruntime"] > 0
