"""MuonClip's cost over AdamW: one training step timed through `Trainer`; Newton-Schulz FLOPs counted at K2 scale.

`muonclip_over_adamw` (timed, target <= 1.5): median seconds of one jitted `Trainer.step` with
`config.optim.name = "muon_clip"` over the same step with `"adamw"`. Both trainers are built from one config
that differs only in `optim.name` (so both steps include QK-Clip, the bias balancing update and the metrics; the
ratio isolates the optimizer update), both get the same device batch, and their steps are timed alternately
(one MuonClip step, one AdamW step, per round; `--repeats` rounds after one warm-up step each) so that load
from other processes on the machine hits both alike. Default model: a ~26M-parameter float32 K2 MoE (`moe_25m`
below: hidden 512, 4 layers of which 1 dense, 8 MLA heads, 16 routed experts top-4 + 1 shared, byte-tokenizer
vocabulary 272) at 32 x 256 = 8192 tokens per step; the output gives its exact total/active parameters.

`ns_flop_share_k2_full` (counted, not timed): Newton-Schulz FLOPs of one Muon step over the k2_full parameter
shapes (`ns_flops`, Muon-labelled leaves only, from `nnx.eval_shape`: nothing is allocated) divided by the model
FLOPs of one k2_full training step,

    model_flops_per_step = tokens_per_step * model_flops_per_token(cfg, seq_len)
                         = tokens_per_step * [6 * (active_params - vocab * hidden)
                                              + 6 * L * H * (qk_head_dim + v_head_dim) * seq_len]

(per sequence the attention term is 12 * L * H * (qk_head_dim + v_head_dim)/2 * seq_len**2; see
`k25.model.params.model_flops_per_token`). seq_len = 4096 is the joint pre-training context of the K2.5 report
(seed 001, Table 3). The seeds give no batch size, so tokens_per_step defaults to the Kimi K2 report's
67M tokens per batch, taken as 16384 sequences x 4096 = 67,108,864; the output says so
(`k2_full_tokens_per_step_source`). The same share is also given for the timed config (`ns_flop_share`), which
is what the measured ratio should be compared with: if the NS matmuls ran at the model's FLOP rate, the ratio
would be about 1 + ns_flop_share (+ the small elementwise cost of either optimizer).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import jax
import ml_collections
from flax import nnx

from experiments import tiny_lm
from experiments.benchmarks._timing import machine
from experiments.common import model_config_dict
from k25.model.config import K2Config, k2_full, tiny
from k25.model.params import count_params, model_flops_per_token
from k25.optim.muon_clip import MUON, label_params, ns_flops

K2_SEQ_LEN = 4096  # K2.5 report (seed 001, Table 3): joint pre-training at 4096 context
K2_TOKENS_PER_STEP = 16384 * 4096  # ASSUMED: the Kimi K2 report's "67M tokens" per batch; not in the seeds


# ------------------------------------------------------------------------------------------ configs
def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the ~25M MoE model (defaults give it) and its batch; small values make a seconds-long test."""
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4, help="decoder layers; the first is dense SwiGLU")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--vocab", type=int, default=272, help="272 = the byte tokenizer's vocabulary")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=256)


def moe_25m(hidden: int = 512, layers: int = 4, heads: int = 8, experts: int = 16, topk: int = 4,
            vocab: int = 272) -> K2Config:
    """The benchmark MoE: every width follows `hidden` (defaults: 25,933,824 total / 11,778,048 active params).

    intermediate 3*hidden (dense layer), expert width hidden/2, q rank hidden/2, kv rank hidden/4,
    head dims 64 (nope) + 32 (rope) / 64 (v), one shared expert, group-limited routing (4 groups, top 2).
    The layer scans are unrolled (`unroll_layers`): at 4 layers that is what one would run, and it spares
    the CPU step the scan's stacked-residual copies.
    """
    groups = 4 if experts % 4 == 0 and experts // 4 >= 2 and 2 * (experts // 4) >= topk else 1
    return tiny(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                moe_intermediate_size=max(hidden // 2, 8), num_hidden_layers=layers, first_k_dense_replace=1,
                num_attention_heads=heads, q_lora_rank=max(hidden // 2, 8), kv_lora_rank=max(hidden // 4, 8),
                qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=experts,
                num_experts_per_tok=topk, n_group=groups, topk_group=min(2, groups), dtype="float32",
                param_dtype="float32", unroll_layers=True)


def train_config(model: K2Config, batch: int, seq_len: int, optim: str = "muon_clip") -> ml_collections.ConfigDict:
    """tiny_lm's run config (byte tokenizer, synthetic data) with this model and batch, one device, no evals."""
    c = tiny_lm.get_config()
    c.model = model_config_dict(model)
    c.batch_size, c.seq_len = batch, seq_len
    c.total_steps = 10_000  # only shapes the LR schedule; the bench runs a handful of steps
    c.optim.name = optim
    c.eval_examples, c.eval_at_start, c.progress_bar = 0, False, False
    c.mesh.devices = 1
    return c


# ------------------------------------------------------------------------------------------- timing
class StepTimer:
    """One Trainer, its state and one fixed device batch; `time_step()` runs one step and returns its seconds.

    The jitted step donates its state, so each step feeds the state the previous one returned.
    """

    def __init__(self, config: ml_collections.ConfigDict, host_batch: dict | None = None):
        from k25.train.loop import Trainer

        self.trainer = Trainer(config, "")
        if host_batch is None:
            host_batch = next(self.trainer.stage.train_iterator(config.seed, 0, 1))
        self.host_batch = host_batch
        self.batch = self.trainer.global_batch(host_batch)
        self.state = self.trainer.init_state()
        self.metrics: dict[str, Any] = {}

    def time_step(self) -> float:
        jax.block_until_ready(self.state)
        t = time.perf_counter()
        self.state, self.metrics = self.trainer.step(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))
        return time.perf_counter() - t


def median_step_seconds(timers: dict[str, StepTimer], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median step seconds of each timer, stepping them in alternation (round-robin) after `warmup` steps each."""
    for timer in timers.values():
        for _ in range(warmup):
            timer.time_step()  # compiles
    times: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(repeats):
        for k, timer in timers.items():
            times[k].append(timer.time_step())
    return {k: statistics.median(v) for k, v in times.items()}


# ------------------------------------------------------------------------------------------ counting
def param_shapes(cfg: K2Config) -> dict:
    """The pure param dict of a K2Model as jax.ShapeDtypeStruct leaves (what the optimizer sees), unallocated."""
    from k25.model.decoder import K2Model

    abstract = nnx.eval_shape(lambda: K2Model(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def muon_param_share(shapes: dict) -> float:
    """Fraction of all parameters (elements) in Muon-labelled leaves."""
    sizes = [math.prod(x.shape) for x in jax.tree.leaves(shapes)]
    labels = jax.tree.leaves(label_params(shapes))
    return sum(s for s, lab in zip(sizes, labels, strict=True) if lab == MUON) / sum(sizes)


def ns_share(cfg: K2Config, tokens_per_step: int, seq_len: int, ns_steps: int) -> dict[str, Any]:
    """NS FLOPs per optimizer step against model FLOPs per step (formula in the module docstring)."""
    shapes = param_shapes(cfg)
    ns = ns_flops(shapes, ns_steps)
    model = tokens_per_step * model_flops_per_token(cfg, seq_len)
    return {"ns_flops_per_step": ns, "model_flops_per_step": model, "ns_flop_share": ns / model,
            "muon_param_share": muon_param_share(shapes), **count_params(cfg)}


# ---------------------------------------------------------------------------------------------- run
def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser("muon")
    add_model_flags(p)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per optimizer (median)")
    p.add_argument("--k2_tokens_per_step", type=int, default=K2_TOKENS_PER_STEP,
                   help="k2_full tokens per batch (default: ASSUMED 67M from the Kimi K2 report)")
    p.add_argument("--k2_seq_len", type=int, default=K2_SEQ_LEN)
    a = p.parse_args(argv)

    model = moe_25m(a.hidden, a.layers, a.heads, a.experts, a.topk, a.vocab)
    muon_cfg = train_config(model, a.batch, a.seq_len, "muon_clip")
    adam_cfg = train_config(model, a.batch, a.seq_len, "adamw")
    muon = StepTimer(muon_cfg)
    adam = StepTimer(adam_cfg, host_batch=muon.host_batch)  # the very same batch
    med = median_step_seconds({"muon_clip": muon, "adamw": adam}, a.repeats)
    small = ns_share(model, a.batch * a.seq_len, a.seq_len, muon_cfg.optim.ns_steps)

    k2 = k2_full()
    big = ns_share(k2, a.k2_tokens_per_step, a.k2_seq_len, muon_cfg.optim.ns_steps)
    assumed = a.k2_tokens_per_step == K2_TOKENS_PER_STEP
    return {
        "machine": machine(),
        "args": vars(a),
        "muonclip_over_adamw": med["muon_clip"] / med["adamw"],
        "target_muonclip_over_adamw": 1.5,
        "muonclip_step_s": med["muon_clip"],
        "adamw_step_s": med["adamw"],
        "tokens_per_step": a.batch * a.seq_len,
        "total_params": small["total_params"],
        "active_params": small["active_params"],
        "muon_param_share": small["muon_param_share"],
        "ns_flops_per_step": small["ns_flops_per_step"],
        "model_flops_per_step": small["model_flops_per_step"],
        "ns_flop_share": small["ns_flop_share"],
        "ns_flop_share_k2_full": big["ns_flop_share"],
        "k2_full_ns_flops_per_step": big["ns_flops_per_step"],
        "k2_full_model_flops_per_step": big["model_flops_per_step"],
        "k2_full_muon_param_share": big["muon_param_share"],
        "k2_full_total_params": big["total_params"],
        "k2_full_active_params": big["active_params"],
        "k2_full_seq_len": a.k2_seq_len,
        "k2_full_tokens_per_step": a.k2_tokens_per_step,
        "k2_full_tokens_per_step_source": (
            "ASSUMED (not in the seeds): the Kimi K2 report's 67M tokens per batch, taken as 16384 x 4096"
            if assumed else "--k2_tokens_per_step"),
        "ns_steps": muon_cfg.optim.ns_steps,
    }
