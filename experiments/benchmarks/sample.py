"""Sampler throughput and fidelity: KV-cached decode vs recomputation, continuous vs static batching, cache bytes,
bf16 logprob gap. Model: the train bench's moe_25m (`--hidden` ... `--vocab`, float32 weights); `--batch` is the
number of slots and `--seq_len` the prompt length.

`decode_speedup_vs_recompute` (target >= 10): `--batch` greedy requests with `--seq_len`-token prompts, each
generating `--new_tokens` tokens. Cached: the median wall time of `Sampler.generate` on all of them at once
(prefill included; `--cache_dtype`). Recompute: the same greedy tokens produced without a cache, one full forward
over every sequence's whole prefix per new token, the prefix padded to a multiple of `--recompute_pad` (one
compile per width). Running all new_tokens forwards at K2 widths takes hours on a CPU, so the baseline is timed per
width instead: the median seconds of one recompute step (forward + argmax) at each width w, times the number of
steps whose prefix pads to w, summed:

    recompute_s = sum_w steps(w) * median_step_s(w)       (every step of the baseline is one such call)

which is exactly the baseline's running time minus its host loop overhead (which would only slow it further).
The first `--check_steps` recompute steps are also run for real and their tokens compared with the sampler's
(`recompute_tokens_match`: fraction equal; bf16 cache rounding may flip near ties).

`continuous_over_static` (target >= 1.5): requests/s of `--mixed_requests` requests on `--mixed_slots` slots,
prompt lengths uniform in [8, `--seq_len`], max_new_tokens drawn from short [`--short`] with probability 3/4 and
long [`--long`] otherwise (no stop ids, so lengths are exact), with `scheduling="continuous"` over
`scheduling="static"` (a batch is admitted only when every slot is free). Runs alternate; medians over
`--repeats`, after one compiling warm-up each.

`kv_bytes_per_token_k2_full`: 61 * (512 + 64) * 2 bytes, the compressed bf16 cache of k2_full
(`k25.infer.kv_bytes_per_token`), beside `per_head_kv_bytes_per_token_k2_full` (K and V of all 64 heads).

`logprob_gap_bf16_max` / `_mean`: `--gap_requests` requests sampled at temperature 1 by a Sampler holding the
weights in bfloat16 with bf16 compute and a bf16 cache; the gap is |sampler logprob - trainer logprob| per
sampled token, the trainer being the float32 training forward's log_softmax at the same tokens.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks._timing import machine, median_seconds
from experiments.benchmarks.muon import add_model_flags, moe_25m
from k25.infer import Request, Sampler, kv_bytes_per_token
from k25.model.config import k2_full
from k25.model.decoder import K2Model


def _range(s: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in s.split(","))
    return lo, hi


def wall(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def prompts(rng: np.random.Generator, n: int, length: int | tuple[int, int], vocab: int) -> list[list[int]]:
    lengths = [length] * n if isinstance(length, int) else rng.integers(length[0], length[1] + 1, n)
    return [rng.integers(0, vocab, int(m)).tolist() for m in lengths]


# ------------------------------------------------------------------------------------ cached vs recompute
def recompute_step_fn(model: K2Model):
    """One no-cache greedy step: full forward over (n, w) prefixes, argmax after each sequence's last token."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, buf, lengths):
        logits = nnx.merge(graphdef, state)(buf).logits
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(last, -1).astype(jnp.int32)

    return step, state


def decode_vs_recompute(model: K2Model, a: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    ps = prompts(rng, a.batch, a.seq_len, model.cfg.vocab_size)
    reqs = [Request(p, max_new_tokens=a.new_tokens, temperature=0.0) for p in ps]
    max_len = a.seq_len + a.new_tokens
    sampler = Sampler(model, max_slots=a.batch, max_len=max_len, cache_dtype=a.cache_dtype)
    out = sampler.generate(reqs)  # compiles every prefill bucket and decode window
    cached_s = statistics.median(wall(sampler.generate, reqs) for _ in range(a.repeats))

    step, state = recompute_step_fn(model)
    pad = a.recompute_pad
    widths = [-(-(a.seq_len + t) // pad) * pad for t in range(a.new_tokens)]
    step_s = {}
    for w in sorted(set(widths)):
        buf = np.zeros((a.batch, w), np.int32)
        for i, c in enumerate(out):
            seq = (c.prompt_ids + c.token_ids)[:w]
            buf[i, : len(seq)] = seq
        lengths = np.full((a.batch,), min(w, a.seq_len + a.new_tokens - 1), np.int32)
        step_s[w] = median_seconds(step, state, buf, lengths, repeats=a.recompute_repeats)
    recompute_s = sum(step_s[w] for w in widths)

    # the baseline for real over its first steps: the same tokens as the sampler's
    check = min(a.check_steps, a.new_tokens)
    buf = np.zeros((a.batch, -(-(a.seq_len + check) // pad) * pad), np.int32)  # a width timed above: no compile
    buf[:, : a.seq_len] = np.asarray(ps)
    matches = []
    for t in range(check):
        nxt = np.asarray(step(state, buf, np.full((a.batch,), a.seq_len + t, np.int32)))
        matches += [int(nxt[i]) == out[i].token_ids[t] for i in range(a.batch)]
        buf[:, a.seq_len + t] = nxt
    tokens = a.batch * a.new_tokens
    return {"slots": a.batch, "prompt_len": a.seq_len, "new_tokens": a.new_tokens,
            "cache_dtype": str(jnp.dtype(a.cache_dtype)), "cached_s": cached_s,
            "cached_tokens_per_s": tokens / cached_s, "recompute_s": recompute_s,
            "recompute_tokens_per_s": tokens / recompute_s,
            "recompute_step_s_by_width": {str(k): v for k, v in step_s.items()},
            "recompute_steps_by_width": {str(k): widths.count(k) for k in step_s},
            "recompute_tokens_match": float(np.mean(matches)) if matches else float("nan"),
            "decode_speedup_vs_recompute": recompute_s / cached_s}


# --------------------------------------------------------------------------------- continuous vs static
def continuous_vs_static(model: K2Model, a: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    n = a.mixed_requests
    ps = prompts(rng, n, (8, a.seq_len), model.cfg.vocab_size)
    long = rng.random(n) < 0.25
    lengths = np.where(long, rng.integers(a.long[0], a.long[1] + 1, n), rng.integers(a.short[0], a.short[1] + 1, n))
    reqs = [Request(p, max_new_tokens=int(m), temperature=1.0, seed=i) for i, (p, m) in enumerate(zip(ps, lengths))]
    max_len = a.seq_len + int(lengths.max())
    samplers = {s: Sampler(model, max_slots=a.mixed_slots, max_len=max_len, cache_dtype=a.cache_dtype, scheduling=s)
                for s in ("continuous", "static")}
    results = {s: sp.generate(reqs) for s, sp in samplers.items()}  # warm-up: compiles
    same = all(x.token_ids == y.token_ids for x, y in zip(results["continuous"], results["static"]))
    times: dict[str, list[float]] = {s: [] for s in samplers}
    for _ in range(a.repeats):
        for s, sp in samplers.items():
            times[s].append(wall(sp.generate, reqs))
    rps = {s: n / statistics.median(t) for s, t in times.items()}
    return {"requests": n, "slots": a.mixed_slots, "new_tokens_total": int(lengths.sum()),
            "max_new_tokens_range": [int(lengths.min()), int(lengths.max())],
            "continuous_requests_per_s": rps["continuous"], "static_requests_per_s": rps["static"],
            "same_tokens_both_policies": same, "continuous_over_static": rps["continuous"] / rps["static"]}


# --------------------------------------------------------------------------------------- bf16 logprob gap
def bf16_model(model: K2Model) -> K2Model:
    """The same weights held in bfloat16, computing in bfloat16."""
    cfg = model.cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    low = nnx.eval_shape(lambda: K2Model(cfg, rngs=nnx.Rngs(0)))
    state = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                         nnx.state(model, nnx.Param))
    nnx.update(low, state, nnx.state(model, nnx.Not(nnx.Param)))
    return low


def logprob_gap(model: K2Model, a: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    ps = prompts(rng, a.gap_requests, (8, a.seq_len), model.cfg.vocab_size)
    reqs = [Request(p, max_new_tokens=a.gap_new_tokens, temperature=1.0, seed=i) for i, p in enumerate(ps)]
    sampler = Sampler(bf16_model(model), max_slots=min(a.gap_requests, a.batch),
                      max_len=a.seq_len + a.gap_new_tokens, cache_dtype=jnp.bfloat16)
    out = sampler.generate(reqs)
    width = a.seq_len + a.gap_new_tokens
    buf = np.zeros((len(out), width), np.int32)
    for i, c in enumerate(out):
        buf[i, : len(c.prompt_ids) + len(c.token_ids)] = c.prompt_ids + c.token_ids
    logp = np.asarray(jax.jit(lambda m, x: jax.nn.log_softmax(m(x).logits))(model, buf))
    gaps, entropy = [], []
    for i, c in enumerate(out):
        n = len(c.prompt_ids)
        pos = np.arange(n - 1, n - 1 + len(c.token_ids))
        gaps.append(np.abs(np.asarray(c.logprobs) - logp[i, pos, c.token_ids]))
        entropy.append(-(np.exp(logp[i, pos]) * logp[i, pos]).sum(-1))
    gaps, entropy = np.concatenate(gaps), np.concatenate(entropy)
    return {"tokens": int(gaps.size), "logprob_gap_bf16_max": float(gaps.max()),
            "logprob_gap_bf16_mean": float(gaps.mean()), "trainer_entropy_mean_nats": float(entropy.mean())}


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser("sample")
    add_model_flags(p)
    p.set_defaults(batch=32, seq_len=64)
    p.add_argument("--new_tokens", type=int, default=512)
    p.add_argument("--cache_dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--recompute_pad", type=int, default=128, help="recompute prefixes padded to a multiple of this")
    p.add_argument("--recompute_repeats", type=int, default=3)
    p.add_argument("--check_steps", type=int, default=4)
    p.add_argument("--mixed_requests", type=int, default=48)
    p.add_argument("--mixed_slots", type=int, default=16)
    p.add_argument("--short", type=_range, default=(8, 48), help="lo,hi max_new_tokens of short requests")
    p.add_argument("--long", type=_range, default=(192, 256), help="lo,hi max_new_tokens of long requests")
    p.add_argument("--gap_requests", type=int, default=8)
    p.add_argument("--gap_new_tokens", type=int, default=64)
    p.add_argument("--parts", default="decode,batching,gap", help="comma-separated subset of decode,batching,gap")
    a = p.parse_args(argv)
    a.cache_dtype = jnp.dtype(a.cache_dtype)
    parts = set(a.parts.split(","))

    model = K2Model(moe_25m(a.hidden, a.layers, a.heads, a.experts, a.topk, a.vocab).replace(attention_chunk=128),
                    rngs=nnx.Rngs(0))
    kv = kv_bytes_per_token(k2_full(), jnp.bfloat16)
    out: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(a).items()},
                           "kv_bytes_per_token_k2_full": kv["compressed"],
                           "per_head_kv_bytes_per_token_k2_full": kv["per_head"],
                           "kv_compression_k2_full": kv["per_head"] / kv["compressed"],
                           "targets": {"decode_speedup_vs_recompute": 10, "continuous_over_static": 1.5}}
    if "decode" in parts:
        out["decode"] = decode_vs_recompute(model, a)
        out["decode_speedup_vs_recompute"] = out["decode"]["decode_speedup_vs_recompute"]
    if "batching" in parts:
        out["batching"] = continuous_vs_static(model, a)
        out["continuous_over_static"] = out["batching"]["continuous_over_static"]
    if "gap" in parts:
        out["gap"] = logprob_gap(model, a)
        out["logprob_gap_bf16_max"] = out["gap"]["logprob_gap_bf16_max"]
        out["logprob_gap_bf16_mean"] = out["gap"]["logprob_gap_bf16_mean"]
    for k, v in list(out.items()):
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
    return out
