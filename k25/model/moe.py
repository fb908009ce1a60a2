"""Sigmoid-routed, dropless mixture of experts with aux-loss-free balancing (DeepSeek-V3 / Kimi K2).

Routing: scores = sigmoid(x W_r). The correction bias b is added only to choose experts
(group-limited: keep the topk_group groups whose two best biased scores sum highest, then
the top-k experts inside them); the combine weights are the *unbiased* scores of the chosen
experts, optionally renormalised, times routed_scaling_factor.

Expert compute is dropless: the (token, expert) assignments are sorted by expert and run as
one grouped GEMM (`jax.lax.ragged_dot`, or a blocked form on CPU: see grouped_gemm.py). Under expert
parallelism, `ep_capacity_factor` > 0 instead bounds each rank pair's all-to-all buffer and drops what
overflows it (k25/parallel/expert.py).
`moe_looped_reference` is a plain per-token loop kept only for tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k25.model.config import K2Config
from k25.model.grouped_gemm import grouped_swiglu
from k25.model.layers import SwiGLU, param
from k25.parallel.expert import ambient_ep, expert_parallel_moe


class ExpertBias(nnx.Variable):
    """The routing correction bias: not a gradient-trained parameter, updated by the balancing rule."""


def route(logits: jnp.ndarray, bias: jnp.ndarray, cfg: K2Config) -> tuple[jnp.ndarray, jnp.ndarray]:
    """logits (T, E) float32 -> (weights (T, k) float32, expert indices (T, k) int32)."""
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores + bias.astype(jnp.float32)
    T, E = choice.shape
    if cfg.n_group > 1:
        grouped = choice.reshape(T, cfg.n_group, E // cfg.n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # (T, G)
        _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)
        keep = jnp.zeros((T, cfg.n_group), bool).at[jnp.arange(T)[:, None], top_groups].set(True)
        keep = jnp.repeat(keep, E // cfg.n_group, axis=1)
        choice = jnp.where(keep, choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx.astype(jnp.int32)


def expert_counts(idx: jnp.ndarray, num_experts: int) -> jnp.ndarray:
    """How many (token, slot) assignments each expert received: (E,) float32."""
    return jnp.zeros((num_experts,), jnp.float32).at[idx.reshape(-1)].add(1.0)


def dispatch_compute_combine(x: jnp.ndarray, weights: jnp.ndarray, idx: jnp.ndarray, w_gate: jnp.ndarray,
                             w_up: jnp.ndarray, w_down: jnp.ndarray, impl: str = "auto", block: int = 128
                             ) -> jnp.ndarray:
    """Dropless routed-expert output for x (T, D) with top-k (weights, idx) (T, k)."""
    T, k = idx.shape
    E = w_gate.shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    # every index is in range by construction: "promise_in_bounds" spares XLA the masks (and their
    # backward selects) that out-of-range handling adds to each gather and scatter
    inb = "promise_in_bounds"
    y = grouped_swiglu(x.at[token].get(mode=inb), group_sizes, w_gate, w_up, w_down, impl, block)
    y = y * weights.reshape(-1).at[order].get(mode=inb)[:, None].astype(y.dtype)
    return jnp.zeros_like(x).at[token].add(y, mode=inb)


class Experts(nnx.Module):
    """n_routed_experts SwiGLU experts stored stacked (E, in, out) for the grouped GEMM."""

    def __init__(self, cfg: K2Config, *, rngs: nnx.Rngs):
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        std, pdt = cfg.initializer_range, cfg.weight_dtype
        self.gate_proj = param(rngs, (E, D, F), ("exp", "embed", "exp_mlp"), pdt, std)
        self.up_proj = param(rngs, (E, D, F), ("exp", "embed", "exp_mlp"), pdt, std)
        self.down_proj = param(rngs, (E, F, D), ("exp", "exp_mlp", "embed"), pdt, std)


class MoE(nnx.Module):
    def __init__(self, cfg: K2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.router = param(rngs, (cfg.hidden_size, cfg.n_routed_experts), ("embed", None), cfg.weight_dtype,
                            cfg.initializer_range)
        self.bias = ExpertBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32), out_sharding=(None,),
                               eager_sharding=False)
        self.experts = Experts(cfg, rngs=rngs)
        if cfg.n_shared_experts > 0:
            self.shared_experts = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
                                         dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                                         std=cfg.initializer_range, rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x (b, s, d) -> (out (b, s, d), per-expert assignment counts (E,))."""
        out, counts, _ = self.forward(x)
        return out, counts

    def forward(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """`__call__` plus the number of routed assignments dropped by the expert-parallel exchange's
        capacity (int32 scalar; always 0 when dropless or without expert parallelism)."""
        cfg = self.cfg
        shape = x.shape
        xt = x.reshape(-1, shape[-1])
        logits = jnp.dot(xt.astype(jnp.float32), self.router[...].astype(jnp.float32))
        weights, idx = route(logits, self.bias[...], cfg)
        e = self.experts
        w = (e.gate_proj[...], e.up_proj[...], e.down_proj[...])
        if ambient_ep() > 1:  # experts sharded over the `jax.set_mesh` mesh's `ep` axis: k25/parallel/expert.py
            out, counts, dropped = expert_parallel_moe(xt, weights, idx, *w, cfg.grouped_gemm, cfg.moe_block_size,
                                                       cfg.ep_capacity_factor, exchange=cfg.ep_exchange)
        else:
            out = dispatch_compute_combine(xt, weights, idx, *w, cfg.grouped_gemm, cfg.moe_block_size)
            counts, dropped = expert_counts(idx, cfg.n_routed_experts), jnp.zeros((), jnp.int32)
        if cfg.n_shared_experts > 0:
            out = out + self.shared_experts(xt)
        return out.reshape(shape), jax.lax.stop_gradient(counts), jax.lax.stop_gradient(dropped)


def balance_bias_update(bias: jnp.ndarray, counts: jnp.ndarray, rate: float) -> jnp.ndarray:
    """Aux-loss-free balancing: bias_e += rate * sign(mean_load - load_e). Works on stacked (L, E) arrays."""
    counts = counts.astype(jnp.float32)
    mean = counts.mean(-1, keepdims=True)
    return bias + rate * jnp.sign(mean - counts)


def moe_looped_reference(x: np.ndarray, router: np.ndarray, bias: np.ndarray, w_gate: np.ndarray,
                         w_up: np.ndarray, w_down: np.ndarray, cfg: K2Config) -> np.ndarray:
    """Token-by-token numpy MoE (routed part only), independent of the vectorised path. Tests only."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    E = router.shape[1]
    per_group = E // cfg.n_group
    for t in range(x.shape[0]):
        scores = 1.0 / (1.0 + np.exp(-(x[t] @ router)))
        choice = scores + bias
        allowed = np.ones(E, bool)
        if cfg.n_group > 1:
            gs = [np.sort(choice[g * per_group:(g + 1) * per_group])[-2:].sum() for g in range(cfg.n_group)]
            best = np.argsort(gs)[::-1][: cfg.topk_group]
            allowed[:] = False
            for g in best:
                allowed[g * per_group:(g + 1) * per_group] = True
        cand = np.where(allowed, choice, -np.inf)
        chosen = np.argsort(cand)[::-1][: cfg.num_experts_per_tok]
        w = scores[chosen]
        if cfg.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        w = w * cfg.routed_scaling_factor
        for e, we in zip(chosen, w):
            h = x[t] @ w_gate[e]
            u = x[t] @ w_up[e]
            out[t] += we * ((h / (1 + np.exp(-h))) * u) @ w_down[e]
    return out
