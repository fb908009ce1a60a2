"""Every benchmark runs end to end at a tiny size and prints the keys its issue asks for (figures not checked)."""

import json
import math
import subprocess
import sys

import jax
import pytest

from experiments.bench import available

MODEL = ["--hidden", "64", "--layers", "2", "--heads", "2", "--experts", "8", "--topk", "2",
         "--batch", "2", "--seq_len", "16"]
CASES = {
    "moe": (["--tokens", "256", "--experts", "8", "--topk", "2", "--hidden", "32", "--width", "16",
             "--repeats", "2"], ["speedup_vs_dense"]),
    "muon": (MODEL + ["--repeats", "2"], ["muonclip_over_adamw", "ns_flop_share_k2_full", "ns_flop_share"]),
    # --peak_flops stands in for a chip's bf16 peak, which a CPU does not have
    "train": (MODEL + ["--configs", "moe_25m", "--repeats", "2", "--matmul_n", "256", "--matmul_repeats", "3",
                       "--peak_flops", "1e12"],
              ["tokens_per_s", "mfu_vs_cpu_matmul_peak", "mfu_vs_chip_bf16_peak"]),
    "pipeline": (["--stages", "2", "--virtual", "2", "--microbatches", "4", "--repeats", "1"],
                 ["bubble_fraction", "bubble_theory", "a2a_bytes_per_step"]),
    "dep": (["--batch", "8", "--seq", "64", "--max_side", "6", "--bin_size", "64", "--repeats", "1"],
            ["multimodal_efficiency"]),
    "sample": (["--hidden", "32", "--layers", "2", "--heads", "2", "--experts", "4", "--topk", "2", "--batch", "2",
                "--seq_len", "8", "--new_tokens", "8", "--repeats", "1", "--recompute_pad", "16",
                "--recompute_repeats", "1", "--check_steps", "2", "--mixed_requests", "4", "--mixed_slots", "2",
                "--short", "2,3", "--long", "5,6", "--gap_requests", "2", "--gap_new_tokens", "4"],
               ["decode_speedup_vs_recompute", "continuous_over_static", "kv_bytes_per_token_k2_full",
                "logprob_gap_bf16_max", "logprob_gap_bf16_mean"]),
}


def test_every_benchmark_has_a_smoke_case():
    missing = sorted(set(available()) - set(CASES))
    assert not missing, f"add a smoke case for {missing}"


# Each smoke case is a subprocess that compiles its models from scratch (10-60 s): the slow tier, except the
# cheapest, which keeps the bench CLI itself in the fast tier.
FAST = {"moe"}


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CASES)])
def test_benchmark_prints_its_figures(name):
    args, keys = CASES[name]
    out = subprocess.run([sys.executable, "-m", "experiments.bench", name, *args], capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    for k in keys:
        assert math.isfinite(result[k]) and result[k] > 0, (k, result[k])


def test_chip_peaks_and_the_1b_active_moe():
    from experiments.benchmarks._chips import bf16_peak_flops
    from experiments.benchmarks.train import moe_1b
    from k25.model.params import count_params

    assert bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert bf16_peak_flops("NVIDIA H100 PCIe") == 756e12  # not the SXM figure
    assert bf16_peak_flops("NVIDIA H200") == 989.4e12
    assert bf16_peak_flops("TPU v5 lite") == 197e12 and bf16_peak_flops("TPU v5p") == 459e12
    assert bf16_peak_flops("cpu") is None
    counts = count_params(moe_1b())
    assert 1.0e9 <= counts["active_params"] <= 1.1e9 < counts["total_params"], counts


@pytest.mark.slow
def test_train_bench_compiled_memory_and_a_config_out_of_memory(monkeypatch):
    """`--compile_only` gives the compiled figures of the step that `--compiled_memory` times; a config that runs
    out of device memory is reported with an error while the others keep their figures."""
    from experiments.benchmarks import train

    args = MODEL + ["--configs", "moe_25m,tiny_lm", "--tiny_batch", "2", "--tiny_seq_len", "16"]
    only = train.run(args + ["--compile_only"])
    assert "step_s" not in only["moe_25m"] and "matmul_peak_flops_per_s" not in only

    real = train.measure

    def measure(name, *a, **kw):
        if name == "tiny_lm":
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes.")
        return real(name, *a, **kw)

    monkeypatch.setattr(train, "measure", measure)
    timed = train.run(args + ["--compiled_memory", "--repeats", "1", "--matmul_n", "128", "--matmul_repeats", "1"])
    assert "--tiny_batch" in timed["tiny_lm"]["error"] and timed["headline_config"] == "moe_25m"
    assert timed["moe_25m"]["step_s"] > 0
    for name in ("moe_25m", "tiny_lm"):
        keys = ("compiled_peak_bytes", "compiled_argument_bytes", "compiled_temp_bytes")
        assert {k: timed[name][k] for k in keys} == {k: only[name][k] for k in keys}, name
        m = only[name]
        # the donated state is an argument: at least the f32 parameters and their momentum
        assert m["compiled_peak_bytes"] == m["compiled_argument_bytes"] + m["compiled_temp_bytes"]
        assert m["compiled_argument_bytes"] >= 4 * 2 * m["total_params"], m


def test_k2_stage_is_one_layout_stage_at_reduced_depth(monkeypatch):
    """`--configs=k2_stage` is experiments/k2_full.py:stage: the layout's memory settings and per-device shapes
    (24 experts per ep rank, one MoE layer per chunk, 4096-token sequences, one per data rank and microbatch) on 8
    devices; with fewer devices the bench stops before building anything and says how to emulate them."""
    from experiments import k2_full
    from experiments.benchmarks import train

    args = ["--configs", "k2_stage", "--compile_only", "--dtype", "bfloat16"]
    c = train.bench_config("k2_stage", train.parse_args(args))
    layout = k2_full.get_config("layout")
    assert train.devices_of(c) == 8 and train.devices_of(layout) == 512
    assert c.model.n_routed_experts // c.mesh.ep == layout.model.n_routed_experts // layout.mesh.ep == 24
    chunks = c.mesh.pp * c.pipeline.virtual_stages
    assert c.model.num_hidden_layers - c.model.first_k_dense_replace - chunks >= 1  # MoE layers before the pipeline
    assert layout.model.num_hidden_layers - 1 - layout.mesh.pp * layout.pipeline.virtual_stages == 12
    data_ranks = c.mesh.dp * c.mesh.ep
    assert c.batch_size == data_ranks * c.pipeline.microbatches * c.optim.accum_steps and c.seq_len == 4096
    for field in ("fp8_activations", "remat_offload", "shard_vocab", "remat", "attention_chunk",
                  "ep_capacity_factor", "dtype"):
        assert c.model[field] == layout.model[field], field
    assert c.optim.muon_mu_dtype == layout.optim.muon_mu_dtype and c.pipeline.head_chunks == 4
    assert train.devices_of(train.bench_config("moe_25m", train.parse_args([]))) == 1

    monkeypatch.setattr(jax, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match=r"\{'k2_stage': 8\} need that many devices.*device_count=N"):
        train.run(args)

