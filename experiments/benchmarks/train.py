"""Training throughput: tokens/s and model-FLOP utilisation against this machine's measured matmul rate and, on an
accelerator, against the chip's published bf16 peak.

For each config (`--configs`, default tiny_lm and moe_25m):
* `tiny_lm`: the quickstart (experiments/tiny_lm.py: 4-layer hidden-128 K2 MoE, batch 16 x 128);
* `moe_25m`: the ~26M-parameter MoE of the muon bench (`experiments.benchmarks.muon.moe_25m`), 32 x 256 = 8192
  tokens per step;
* `moe_1b`: the same family at hidden 2048, 26 layers, 16 heads, 16 experts top-4 (1.03B active / 2.92B total
  parameters), `--big_batch` x `--big_seq_len` = 2 x 2048 tokens per step, layers scanned, attention over
  `--big_attention_chunk` = 512 query rows at a time, recomputation `--big_remat` (none): the "~1B-active MoE"
  that an accelerator measures (far too slow for a CPU). Its defaults are sized by `--compile_only` on XLA:CPU
  to fit an 80 GB chip: 62.5 GB compiled peak; at 4 x 2048 tokens it is 86.8 GB (146 GB with one 2048 x 2048
  attention block); with `--big_remat=full` it is 50.1 GB at either batch (the activations no longer set it);
* `k2_stage`: one pipeline stage of the K2 layout at reduced depth (experiments/k2_full.py:stage: full-width
  layers, 24 experts per ep rank, every memory setting of the layout) on 8 devices, pp2 x dp2 x ep2, 32 x 4096
  tokens per step: what an 8-accelerator host measures to check the layout's compiled memory figures against
  a real allocator (on a CPU only with `--compile_only` and 8 emulated devices:
  `XLA_FLAGS=--xla_force_host_platform_device_count=8`);
the median seconds of one full jitted `Trainer.step` (MuonClip, as configured) over `--repeats` steps on one fixed
batch after a compiling warm-up step gives

    tokens_per_s = batch * seq_len / step_s
    model_flops_per_s = batch * seq_len * model_flops_per_token(cfg, seq_len) / step_s
    mfu_vs_cpu_matmul_peak = model_flops_per_s / (devices * matmul_peak_flops_per_s)

(`devices`: the config's mesh, 8 for k2_stage, else 1) with
model_flops_per_token = 6 * (active_params - vocab * hidden) + 6 * L * H * (qk_head_dim + v_head_dim) * seq_len
(`k25.model.params.model_flops_per_token`: 6 FLOPs per activated matmul weight per token for forward + backward,
the embedding lookup excluded, plus the score and value matmuls of attention over the full seq_len^2; the
optimizer's own work, including Newton-Schulz, is not model FLOPs). The peak is measured in the same run: the
median time of a jitted `--matmul_n`^3 matmul (2 n^3 FLOPs) in `--dtype` over `--matmul_repeats` runs, on the
default device (the key keeps its CPU name). The headline `tokens_per_s` / `mfu_vs_cpu_matmul_peak` are
moe_25m's (target MFU >= 0.3 on the CPU); every config's figures are under its name.

On an accelerator run `--dtype=bfloat16` (compute in bf16 over float32 parameters, as k2_full does; default
float32, the CPU figures). `mfu_vs_chip_bf16_peak = model_flops_per_s / (devices * chip_bf16_peak_flops_per_s)` uses the
chip's dense bf16 peak from `--peak_flops` or, when that is 0, the datasheet table in `_chips.py` matched on the
device kind; it is null where neither gives one (a CPU). `peak_bytes_in_use` is the device allocator's
high-water mark after the config's steps, the largest over the local devices (cumulative over the configs run
before it; null on a CPU).

`--compiled_memory` also compiles each config's step ahead of time from abstract shapes, as
`experiments.run --dry_run --compile` does, and reports XLA's memory analysis: `compiled_peak_bytes` = arguments +
temporaries (the plan's `peak_bytes_per_device`, the figure the K2 layout's 80 GB budget is checked with). On an
accelerator it stands next to the allocator's measured `peak_bytes_in_use`, which tests that method on real
hardware. `--compile_only` reports only those figures, allocating and timing nothing: how a CPU gets moe_1b's
compiled figure for the same comparison. A config that runs out of device memory is reported with an `error` and
the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from experiments import k2_full, tiny_lm
from experiments.benchmarks._chips import bf16_peak_flops
from experiments.benchmarks._timing import machine, median_seconds
from experiments.benchmarks.muon import StepTimer, add_model_flags, median_step_seconds, moe_25m, train_config
from k25.model.config import K2Config
from k25.model.params import count_params, model_flops_per_token
from k25.train.loop import plan
from k25.train.pretrain import model_config

CONFIGS = ("tiny_lm", "moe_25m", "moe_1b", "k2_stage")
DEFAULT_CONFIGS = ("tiny_lm", "moe_25m")
# what to change when a config runs out of device memory
OOM_HINT = {"tiny_lm": "try a smaller --tiny_batch", "moe_25m": "try a smaller --batch",
            "moe_1b": "try a smaller --big_batch or --big_remat=full",
            "k2_stage": "it needs devices with more memory, or a smaller STAGE in experiments/k2_full.py"}


def moe_1b(remat: str = "none", attention_chunk: int = 512) -> K2Config:
    """The ~1B-active MoE: moe_25m's family at hidden 2048, 26 layers (1 dense), 16 heads, 16 experts top-4."""
    return dataclasses.replace(moe_25m(hidden=2048, layers=26, heads=16, experts=16, topk=4), unroll_layers=False,
                               remat=remat, attention_chunk=attention_chunk)


def matmul_peak_flops_per_s(n: int, repeats: int, dtype: str = "float32") -> tuple[float, float]:
    """(FLOP/s, median seconds) of a jitted n x n @ n x n matmul in `dtype` (float32 at HIGHEST precision)."""
    ka, kb = jax.random.split(jax.random.key(0))
    x = jax.random.normal(ka, (n, n), dtype)
    y = jax.random.normal(kb, (n, n), dtype)
    precision = jax.lax.Precision.HIGHEST if dtype == "float32" else None
    f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))
    s = median_seconds(f, x, y, repeats=repeats)
    return 2 * n ** 3 / s, s


def peak_bytes_in_use() -> int | None:
    """The largest allocator high-water mark over the local devices, where the backend reports one (not XLA:CPU)."""
    peaks = [s["peak_bytes_in_use"] for s in (d.memory_stats() for d in jax.local_devices())
             if s and "peak_bytes_in_use" in s]
    return int(max(peaks)) if peaks else None


def devices_of(config) -> int:
    """The devices a config's mesh spans (pp x dp x ep)."""
    return int(config.mesh.pp * config.mesh.dp * config.mesh.ep)


def compiled_memory(config) -> dict[str, int | None]:
    """XLA's memory analysis of the config's train step, compiled from abstract shapes (nothing allocated)."""
    p = plan(config, compile=True)
    return {"compiled_peak_bytes": p.get("peak_bytes_per_device"),
            "compiled_argument_bytes": p.get("argument_bytes_per_device"),
            "compiled_temp_bytes": p.get("temp_bytes_per_device")}


def out_of_memory(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def measure(name: str, config, repeats: int, peak: float, chip_peak: float | None) -> dict[str, Any]:
    cfg: K2Config = model_config(config)
    timer = StepTimer(config)
    step_s = median_step_seconds({name: timer}, repeats)[name]
    tokens = config.batch_size * config.seq_len
    per_token = model_flops_per_token(cfg, config.seq_len)
    flops_per_s = tokens * per_token / step_s
    n = devices_of(config)
    out = {**count_params(cfg), "batch": config.batch_size, "seq_len": config.seq_len, "dtype": cfg.dtype,
           "devices": n, "tokens_per_step": tokens, "optimizer": config.optim.name, "step_s": step_s,
           "tokens_per_s": tokens / step_s, "model_flops_per_token": per_token,
           "model_flops_per_s": flops_per_s, "mfu_vs_cpu_matmul_peak": flops_per_s / (n * peak),
           "mfu_vs_chip_bf16_peak": flops_per_s / (n * chip_peak) if chip_peak else None,
           "loss": float(timer.metrics["loss"])}
    del timer  # free this config's state before the next one's
    out["peak_bytes_in_use"] = peak_bytes_in_use()
    return out


def bench_config(name: str, a: argparse.Namespace) -> ml_collections.ConfigDict:
    """The run config of one bench config, at the command line's sizes and dtype."""
    if name == "tiny_lm":
        c = tiny_lm.get_config()
        c.batch_size = a.tiny_batch or c.batch_size
        c.seq_len = a.tiny_seq_len or c.seq_len
        c.eval_examples, c.eval_at_start, c.progress_bar = 0, False, False
        c.mesh.devices = 1
    elif name == "moe_1b":
        c = train_config(moe_1b(a.big_remat, a.big_attention_chunk), a.big_batch, a.big_seq_len)
    elif name == "k2_stage":
        c = k2_full.get_config("stage")
        c.progress_bar = False
    else:
        c = train_config(moe_25m(a.hidden, a.layers, a.heads, a.experts, a.topk, a.vocab), a.batch, a.seq_len)
    c.model.dtype = a.dtype
    return c


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser("train")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    add_model_flags(p)  # moe_25m's model and batch
    p.add_argument("--tiny_batch", type=int, default=None, help="tiny_lm batch (default: its config's 16)")
    p.add_argument("--tiny_seq_len", type=int, default=None, help="tiny_lm seq_len (default: its config's 128)")
    p.add_argument("--big_batch", type=int, default=2, help="moe_1b batch")
    p.add_argument("--big_seq_len", type=int, default=2048, help="moe_1b seq_len")
    p.add_argument("--big_remat", default="none", choices=("none", "selective", "full"), help="moe_1b's recomputation")
    p.add_argument("--big_attention_chunk", type=int, default=512,
                   help="moe_1b's query rows per attention block (0: one seq_len x seq_len block)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype of every config and of the matmul peak (bfloat16 on an accelerator)")
    p.add_argument("--peak_flops", type=float, default=0.0,
                   help="the chip's dense bf16 FLOP/s for mfu_vs_chip_bf16_peak (0: the _chips.py table)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per config (median)")
    p.add_argument("--matmul_n", type=int, default=2048)
    p.add_argument("--matmul_repeats", type=int, default=9)
    p.add_argument("--compiled_memory", action="store_true",
                   help="also report each step's compiled memory analysis (compiled_peak_bytes), compiled once more")
    p.add_argument("--compile_only", action="store_true",
                   help="report only the compiled memory figures; nothing is allocated or timed")
    return p.parse_args(argv)


def run(argv: list[str]) -> dict:
    a = parse_args(argv)
    names = [n for n in a.configs.split(",") if n]
    bad = sorted(set(names) - set(CONFIGS))
    if bad:
        raise SystemExit(f"train bench: unknown config(s) {bad}; choose from {CONFIGS}")
    if a.peak_flops < 0:
        raise SystemExit(f"train bench: --peak_flops must be >= 0 (0 looks the chip up), got {a.peak_flops}")

    host = machine()
    configs = {name: bench_config(name, a) for name in names}
    short = {name: devices_of(c) for name, c in configs.items() if devices_of(c) > jax.device_count()}
    if short:
        raise SystemExit(f"train bench: {short} need that many devices (their mesh), jax sees {jax.device_count()}; "
                         "on a CPU emulate them with XLA_FLAGS=--xla_force_host_platform_device_count=N "
                         "(compiled figures only: add --compile_only)")
    if a.compile_only:
        return {"machine": host, "args": vars(a),
                **{name: {**count_params(model_config(c)), "batch": c.batch_size, "seq_len": c.seq_len,
                          "dtype": a.dtype, **compiled_memory(c)} for name, c in configs.items()}}

    kind = host["device"]
    chip_peak = a.peak_flops or bf16_peak_flops(kind)
    peak, matmul_s = matmul_peak_flops_per_s(a.matmul_n, a.matmul_repeats, a.dtype)
    out: dict[str, Any] = {"machine": host, "args": vars(a), "matmul_peak_flops_per_s": peak,
                           "matmul_s": matmul_s, "target_mfu_vs_cpu_matmul_peak": 0.3,
                           "chip_bf16_peak_flops_per_s": chip_peak,
                           "chip_peak_source": "--peak_flops" if a.peak_flops else
                           (f"datasheet table ({kind})" if chip_peak else None)}
    for name, c in configs.items():
        try:
            out[name] = measure(name, c, a.repeats, peak, chip_peak)
        except jax.errors.JaxRuntimeError as e:
            if not out_of_memory(e):
                raise
            out[name] = {"error": f"out of device memory ({str(e).splitlines()[0][:300]}); {OOM_HINT[name]}",
                         "peak_bytes_in_use": peak_bytes_in_use()}
        if a.compiled_memory:
            out[name].update(compiled_memory(c))
    timed = [name for name in names if "error" not in out[name]]
    if not timed:
        raise SystemExit(f"train bench: no config fit in device memory: {[out[n]['error'] for n in names]}")
    # measure the peak again after the steps, and keep the faster: a busy machine only ever lowers it
    peak2, matmul_s2 = matmul_peak_flops_per_s(a.matmul_n, a.matmul_repeats, a.dtype)
    if peak2 > peak:
        out.update(matmul_peak_flops_per_s=peak2, matmul_s=matmul_s2)
        for name in timed:
            out[name]["mfu_vs_cpu_matmul_peak"] = out[name]["model_flops_per_s"] / (out[name]["devices"] * peak2)
    headline = "moe_25m" if "moe_25m" in timed else timed[0]
    out["headline_config"] = headline
    out["tokens_per_s"] = out[headline]["tokens_per_s"]
    out["mfu_vs_cpu_matmul_peak"] = out[headline]["mfu_vs_cpu_matmul_peak"]
    out["mfu_vs_chip_bf16_peak"] = out[headline]["mfu_vs_chip_bf16_peak"]
    return out
