"""Decoupled Encoder Process: multimodal step time against text-only, vision balance, and peak memory.

    python -m experiments.bench dep [--batch 16 --seq 256 --vision_fraction 0.5 --repeats 5 --mesh 1,8,1]

`multimodal_efficiency` = text-only step time / multimodal step time, same batch shape (equal total
tokens), where `vision_fraction` of the tokens are image tokens. A "step" here is the gradient computation
(`value_and_grad`); the optimizer update is the same for both and is left out, which makes the ratio
stricter, not looser. The multimodal step is DEP (`dep_value_and_grad`); the end-to-end path with the
conventional row-local layout is timed alongside (`multimodal_efficiency_without_dep`).

The config matches the published model's vision-to-LLM FLOP ratio per LLM token (weight FLOPs, 6N rule):

    r = (merge_area * N_vit + N_proj) / N_llm

N_vit: MoonViT-3D parameters less the position table (added, not multiplied); one LLM vision token is
merge_area (2x2) patches through the ViT. N_proj: projector parameters (once per token). N_llm: activated
K2 parameters (`count_params`) less the input embedding table (a gather). K2.5 (MoonViT-3D 417M, projector
54M, K2 32.86B activated): r = 0.0537. The small config keeps a fixed small K2 and grid-searches the ViT's
width, depth and MLP width for the closest r. With DEP the ViT does forward twice and backward once (8N
instead of 6N per weight), so the FLOP bound on the efficiency is 1 / (1 + f * r * 8/6), f = vision_fraction
(reported as `flop_bound_efficiency`). Weight-free attention FLOPs are not in r: the small ViT's dense
masked attention over a device's whole pack costs relatively more than at full width.

The vision packs are split into attention bins of `bin_size` patches (`k25.parallel.dep_plan`), for both
multimodal variants.

`balance` = max / mean vision patches per device, with DEP (greedy over all devices) and without (each
device encodes the images of its own batch rows). `peak_bytes` = compiled `memory_analysis()` temp bytes
per device of the gradient computation.
"""

from __future__ import annotations

from experiments.benchmarks._devices import emulate_cpu_devices

emulate_cpu_devices(8)

import argparse
import functools
import itertools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.benchmarks._timing import machine
from k25.model.config import K2Config, k2_full, tiny
from k25.model.k25 import K25Model
from k25.model.moonvit import MoonViT
from k25.model.params import count_params
from k25.model.projector import Projector
from k25.model.vision_config import K25Config, MoonViTConfig
from k25.parallel.dep import dep_value_and_grad, end_to_end_value_and_grad
from k25.parallel.mesh import make_mesh, state_shardings
from k25.train.multimodal import device_put_batch, multimodal_lm_loss, prepare_batch
from k25.train.state import ModelDef, split_model

IMG, VID = 4000, 4001  # placeholder ids past the small vocab (handled like the real K2.5 ids)


def flop_ratio(cfg: K25Config) -> dict[str, float]:
    """The per-token vision/LLM weight-FLOP ratio r of the module docstring, with its parts."""

    def n(make) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(nnx.eval_shape(make), nnx.Param)))

    v = cfg.vision_config
    n_vit = n(lambda: MoonViT(v, rngs=nnx.Rngs(0))) - v.pos_emb_height * v.pos_emb_width * v.hidden_size
    n_proj = n(lambda: Projector(cfg, rngs=nnx.Rngs(0)))
    t = cfg.text_config
    n_llm = count_params(t)["active_params"] - (0 if t.tie_word_embeddings else t.vocab_size * t.hidden_size)
    return {"ratio": (v.merge_area * n_vit + n_proj) / n_llm, "vit_params": n_vit, "projector_params": n_proj,
            "llm_params": n_llm}


def small_text() -> K2Config:
    return tiny(vocab_size=2048, hidden_size=256, intermediate_size=768, moe_intermediate_size=256,
                num_hidden_layers=4, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                q_lora_rank=128, kv_lora_rank=64)


def matched_config(text: K2Config, target: float) -> K25Config:
    """The small K2.5 whose r is closest to `target` over a grid of ViT widths, depths and MLP widths."""
    best, best_err = None, math.inf
    for width, layers, mlp in itertools.product((16, 24, 32, 48), (1, 2, 3, 4), (1, 2, 3, 4)):
        vis = MoonViTConfig(pos_emb_height=16, pos_emb_width=16, num_attention_heads=2, num_hidden_layers=layers,
                            hidden_size=width, intermediate_size=mlp * width, dtype="float32")
        cfg = K25Config(text_config=text, vision_config=vis, projection_hidden_size=width, image_token_id=IMG,
                        video_token_id=VID)
        err = abs(flop_ratio(cfg)["ratio"] / target - 1)
        if err < best_err:
            best, best_err = cfg, err
    return best.validate()


def synthetic_batch(cfg: K25Config, batch: int, seq: int, fraction: float, max_side: int, seed: int) -> dict:
    """Rows of packed text with images of random sizes; rows differ in how much image they hold
    (per-row share drawn from U(0, 2f)), about `fraction` of all tokens are image tokens."""
    rng = np.random.default_rng(seed)
    merge = cfg.vision_config.merge_area
    ids = rng.integers(0, cfg.text_config.vocab_size, (batch, seq)).astype(np.int32)
    share = rng.uniform(0, 2 * fraction, batch)
    share = np.clip(share * fraction / share.mean(), 0, 0.95)
    grids = []
    for r in range(batch):
        budget, pos = int(share[r] * seq), 1
        while budget >= 1:
            h, w = (2 * int(rng.integers(1, max_side // 2 + 1)) for _ in range(2))
            tokens = h * w // merge
            if tokens > budget:
                h, w, tokens = 2, 2, 1
            grids.append((1, h, w))
            ids[r, pos:pos + tokens] = IMG
            pos, budget = pos + tokens + 1, budget - tokens - 1
    n = sum(h * w for _, h, w in grids)
    vocab = cfg.text_config.vocab_size
    return {"input_ids": ids, "targets": rng.integers(0, vocab, (batch, seq)).astype(np.int32),
            "loss_mask": (ids != IMG).astype(np.int32),
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "segment_ids": np.ones((batch, seq), np.int32),
            "pixel_values": rng.standard_normal((n, cfg.vision_config.patch_dim)).astype(np.float32),
            "image_grid_thw": np.asarray(grids, np.int64)}


def interleaved_medians(calls: dict[str, tuple[Callable, tuple]], repeats: int) -> dict[str, float]:
    """Median seconds of each call, timed round-robin (A B C A B C ...) after one warm-up each, so that load
    from other processes on a shared machine falls on every variant alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, (fn, args) in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def text_only_value_and_grad(model_def: ModelDef, params: dict, buffers: dict, batch: dict) -> Any:
    """The baseline: the same K2 backbone and loss on a batch of text tokens only."""

    def loss(lm_params: dict):
        lm = model_def.merge({**params, "language_model": lm_params}, buffers).language_model
        return multimodal_lm_loss(lm, lm.embed(batch["input_ids"]), batch)

    return jax.value_and_grad(loss, has_aux=True)(params["language_model"])


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser("dep")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vision_fraction", type=float, default=0.5, help="share of all tokens that are image tokens")
    p.add_argument("--max_side", type=int, default=16, help="largest image side in patches")
    p.add_argument("--bin_size", type=int, default=512, help="patches per attention bin (0: one bin per device)")
    p.add_argument("--mesh", default="1,8,1", help="pp,dp,ep")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    published = flop_ratio(K25Config(text_config=k2_full()))
    cfg = matched_config(small_text(), published["ratio"])
    mesh = make_mesh(dict(zip(("pp", "dp", "ep"), map(int, a.mesh.split(",")))))
    model = K25Model(cfg, rngs=nnx.Rngs(0))
    model_def, params, buffers = split_model(model)
    params = jax.device_put(params, state_shardings(nnx.state(model, nnx.Param), mesh))
    buffers = jax.device_put(buffers, NamedSharding(mesh, P()))
    raw = synthetic_batch(cfg, a.batch, a.seq, a.vision_fraction, a.max_side, seed=0)
    text = {k: v for k, v in raw.items() if k not in ("pixel_values", "image_grid_thw")}
    text["input_ids"] = np.where(raw["input_ids"] == IMG, 7, raw["input_ids"]).astype(np.int32)

    calls: dict[str, tuple[Callable, tuple]] = {}
    peaks: dict[str, int] = {}
    balance: dict[str, float] = {}

    def add(name: str, fn: Callable, batch: dict[str, Any]) -> None:
        jitted = jax.jit(lambda p, b, x: fn(model_def, p, b, x))
        batch = device_put_batch(batch, mesh)
        with jax.set_mesh(mesh):
            peaks[name] = int(jitted.lower(params, buffers, batch).compile().memory_analysis().temp_size_in_bytes)
        calls[name] = (jitted, (params, buffers, batch))

    add("text_only", text_only_value_and_grad, text)
    for name, dep, grad_fn in (("with_dep", True, dep_value_and_grad),
                               ("without_dep", False, end_to_end_value_and_grad)):
        batch, (plan,) = prepare_batch(raw, cfg, mesh, dep=dep, bin_size=a.bin_size or None)
        balance[name] = plan.balance
        add(name, functools.partial(_planned, grad_fn, mesh), batch)
    with jax.set_mesh(mesh):
        times = interleaved_medians(calls, a.repeats)
    f = float((raw["input_ids"] == IMG).mean())
    small = flop_ratio(cfg)
    return {
        "machine": machine(), "args": vars(a), "mesh": dict(mesh.shape),
        "multimodal_efficiency": times["text_only"] / times["with_dep"],
        "multimodal_efficiency_without_dep": times["text_only"] / times["without_dep"],
        "target_multimodal_efficiency": 0.90, "flop_bound_efficiency": 1 / (1 + f * small["ratio"] * 8 / 6),
        "step_s": times, "balance": balance, "peak_bytes": peaks,
        "flop_ratio": {"published": published, "bench": small}, "vision_token_fraction": f,
        "images": int(raw["image_grid_thw"].shape[0]), "vision_patches": int(raw["pixel_values"].shape[0]),
        "vision_config": {k: getattr(cfg.vision_config, k) for k in ("hidden_size", "num_hidden_layers",
                                                                       "intermediate_size")},
        "tokens": a.batch * a.seq,
    }


def _planned(grad_fn: Callable, mesh: Any, model_def: ModelDef, params: dict, buffers: dict, batch: dict) -> Any:
    return grad_fn(model_def, params, buffers, batch, multimodal_lm_loss, mesh)
