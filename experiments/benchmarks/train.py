"""Training throughput: tokens/s and model-FLOP utilisation against this machine's measured float32 matmul rate.

For each config (`--configs`, default both):
* `tiny_lm`: the quickstart (experiments/tiny_lm.py: 4-layer hidden-128 K2 MoE, batch 16 x 128);
* `moe_25m`: the ~26M-parameter MoE of the muon bench (`experiments.benchmarks.muon.moe_25m`), 32 x 256 = 8192
  tokens per step;
the median seconds of one full jitted `Trainer.step` (MuonClip, as configured, float32) over `--repeats` steps on
one fixed batch after a compiling warm-up step gives

    tokens_per_s = batch * seq_len / step_s
    model_flops_per_s = batch * seq_len * model_flops_per_token(cfg, seq_len) / step_s
    mfu_vs_cpu_matmul_peak = model_flops_per_s / matmul_peak_flops_per_s

with model_flops_per_token = 6 * (active_params - vocab * hidden) + 6 * L * H * (qk_head_dim + v_head_dim) * seq_len
(`k25.model.params.model_flops_per_token`: 6 FLOPs per activated matmul weight per token for forward + backward,
the embedding lookup excluded, plus the score and value matmuls of attention over the full seq_len^2; the
optimizer's own work, including Newton-Schulz, is not model FLOPs). The peak is measured in the same run: the
median time of a jitted `--matmul_n`^3 float32 matmul (2 n^3 FLOPs) over `--matmul_repeats` runs. The headline
`tokens_per_s` / `mfu_vs_cpu_matmul_peak` are moe_25m's (target MFU >= 0.3); both configs' figures are under
their names.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp

from experiments import tiny_lm
from experiments.benchmarks._timing import machine, median_seconds
from experiments.benchmarks.muon import StepTimer, add_model_flags, median_step_seconds, moe_25m, train_config
from k25.model.config import K2Config
from k25.model.params import count_params, model_flops_per_token
from k25.train.pretrain import model_config

CONFIGS = ("tiny_lm", "moe_25m")


def matmul_peak_flops_per_s(n: int, repeats: int) -> tuple[float, float]:
    """(FLOP/s, median seconds) of a jitted float32 n x n @ n x n matmul."""
    ka, kb = jax.random.split(jax.random.key(0))
    x = jax.random.normal(ka, (n, n), jnp.float32)
    y = jax.random.normal(kb, (n, n), jnp.float32)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    s = median_seconds(f, x, y, repeats=repeats)
    return 2 * n ** 3 / s, s


def measure(name: str, config, repeats: int, peak: float) -> dict[str, Any]:
    cfg: K2Config = model_config(config)
    timer = StepTimer(config)
    step_s = median_step_seconds({name: timer}, repeats)[name]
    tokens = config.batch_size * config.seq_len
    per_token = model_flops_per_token(cfg, config.seq_len)
    flops_per_s = tokens * per_token / step_s
    return {**count_params(cfg), "batch": config.batch_size, "seq_len": config.seq_len,
            "tokens_per_step": tokens, "optimizer": config.optim.name, "step_s": step_s,
            "tokens_per_s": tokens / step_s, "model_flops_per_token": per_token,
            "model_flops_per_s": flops_per_s, "mfu_vs_cpu_matmul_peak": flops_per_s / peak,
            "loss": float(timer.metrics["loss"])}


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser("train")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    add_model_flags(p)  # moe_25m's model and batch
    p.add_argument("--tiny_batch", type=int, default=None, help="tiny_lm batch (default: its config's 16)")
    p.add_argument("--tiny_seq_len", type=int, default=None, help="tiny_lm seq_len (default: its config's 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per config (median)")
    p.add_argument("--matmul_n", type=int, default=2048)
    p.add_argument("--matmul_repeats", type=int, default=9)
    a = p.parse_args(argv)
    names = [n for n in a.configs.split(",") if n]
    bad = sorted(set(names) - set(CONFIGS))
    if bad:
        raise SystemExit(f"train bench: unknown config(s) {bad}; choose from {CONFIGS}")

    peak, matmul_s = matmul_peak_flops_per_s(a.matmul_n, a.matmul_repeats)
    out: dict[str, Any] = {"machine": machine(), "args": vars(a), "matmul_peak_flops_per_s": peak,
                           "matmul_s": matmul_s, "target_mfu_vs_cpu_matmul_peak": 0.3}
    for name in names:
        if name == "tiny_lm":
            c = tiny_lm.get_config()
            c.batch_size = a.tiny_batch or c.batch_size
            c.seq_len = a.tiny_seq_len or c.seq_len
            c.eval_examples, c.eval_at_start, c.progress_bar = 0, False, False
            c.mesh.devices = 1
        else:
            c = train_config(moe_25m(a.hidden, a.layers, a.heads, a.experts, a.topk, a.vocab), a.batch, a.seq_len)
        out[name] = measure(name, c, a.repeats, peak)
    # measure the peak again after the steps, and keep the faster: a busy machine only ever lowers it
    peak2, matmul_s2 = matmul_peak_flops_per_s(a.matmul_n, a.matmul_repeats)
    if peak2 > peak:
        out.update(matmul_peak_flops_per_s=peak2, matmul_s=matmul_s2)
        for name in names:
            out[name]["mfu_vs_cpu_matmul_peak"] = out[name]["model_flops_per_s"] / peak2
    headline = "moe_25m" if "moe_25m" in names else names[0]
    out["headline_config"] = headline
    out["tokens_per_s"] = out[headline]["tokens_per_s"]
    out["mfu_vs_cpu_matmul_peak"] = out[headline]["mfu_vs_cpu_matmul_peak"]
    return out
