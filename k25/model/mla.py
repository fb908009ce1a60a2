"""Multi-head Latent Attention (DeepSeek-V2/V3, Kimi K2).

Queries go through an optional low-rank bottleneck (q_lora_rank > 0) with RMSNorm; keys and
values are decompressed from one kv_lora_rank latent (RMSNorm'd) and a single rope key that
all heads share. The forward also returns the maximum pre-softmax logit of each head, which
QK-Clip needs; it is one extra reduction over the logits already computed. With `attention_chunk` > 0
the queries are processed in blocks whose probabilities the backward recomputes (`_blocked_attention`),
so the (b, h, s, s) logits are never all live.

Query column layout (per head h, width qk_head_dim): [q_nope (qk_nope_head_dim) | q_rope].
kv_b column layout (per head h, width qk_nope+v): [k_nope | v]. QK-Clip relies on these.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from k25.model.config import K2Config
from k25.model.layers import Linear, RMSNorm
from k25.model.remat import MLA_UP, tag
from k25.model.rope import apply_rope, softmax_scale

NEG_INF = -1e30


def attention_mask(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """(batch, 1, q, k) bool: causal within a row and only inside the same document (segment id)."""
    s = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((s, s), bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same_doc)[:, None]


class MLA(nnx.Module):
    def __init__(self, cfg: K2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        H = cfg.num_attention_heads
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, std=cfg.initializer_range, rngs=rngs)
        nkw = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        if cfg.q_lora_rank > 0:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, ("embed", "q_lora"), **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, **nkw)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, ("q_lora", "heads_q"), **kw)
        else:
            self.q_proj = Linear(cfg.hidden_size, H * cfg.qk_head_dim, ("embed", "heads_q"), **kw)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                         ("embed", "kv_lora"), **kw)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, **nkw)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                ("kv_lora", "heads_q"), **kw)
        self.o_proj = Linear(H * cfg.v_head_dim, cfg.hidden_size, ("heads_q", "embed"), **kw)
        self.scale = softmax_scale(cfg.qk_head_dim, cfg.rope_scaling)

    def query(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.cfg.q_lora_rank > 0:
            return tag(self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))), MLA_UP)
        return self.q_proj(x)

    def queries(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x (b, s, d) -> (q_nope (b, s, h, dn), q_rope (b, s, h, dr) rotated)."""
        cfg = self.cfg
        b, s, _ = x.shape
        dn = cfg.qk_nope_head_dim
        q = self.query(x).reshape(b, s, cfg.num_attention_heads, cfg.qk_head_dim)
        return q[..., :dn], apply_rope(q[..., dn:], cos, sin)

    def latent(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """What one token contributes to every head's keys and values, and all the sampler caches
        (k25/infer): (RMSNorm'd kv latent (b, s, kv_lora_rank), rotated shared rope key (b, s, dr))."""
        ckv = self.kv_a_proj_with_mqa(x)
        kv_latent, k_rope = ckv[..., : self.cfg.kv_lora_rank], ckv[..., self.cfg.kv_lora_rank:]
        return self.kv_a_layernorm(kv_latent), apply_rope(k_rope[:, :, None, :], cos, sin)[:, :, 0]

    def expand(self, latent: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Normed latent (b, s, c) -> (k_nope (b, s, h, dn), v (b, s, h, dv)) through kv_b_proj."""
        cfg = self.cfg
        b, s, _ = latent.shape
        kv = tag(self.kv_b_proj(latent), MLA_UP).reshape(b, s, cfg.num_attention_heads,
                                                         cfg.qk_nope_head_dim + cfg.v_head_dim)
        return kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]

    def __call__(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, mask: jnp.ndarray
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x (b, s, d); cos/sin (b, s, rope/2); mask (b, 1, s, s) -> (out (b, s, d), max_logit (heads,))."""
        b, s, _ = x.shape
        q_nope, q_rope = self.queries(x, cos, sin)
        latent, k_rope = self.latent(x, cos, sin)
        k_nope, v = self.expand(latent)
        out, max_logit = attention(q_nope, q_rope, k_nope, k_rope[:, :, None, :], v, mask, self.scale,
                                   self.cfg.attention_chunk)
        return self.o_proj(out.reshape(b, s, -1)), jax.lax.stop_gradient(max_logit)


def _heads_first(a: jnp.ndarray) -> jnp.ndarray:
    """(b, s, h, d) <-> (b, h, s, d)."""
    return jnp.swapaxes(a, 1, 2)


def attention(q_nope: jnp.ndarray, q_rope: jnp.ndarray, k_nope: jnp.ndarray, k_rope: jnp.ndarray, v: jnp.ndarray,
              mask: jnp.ndarray, scale: float, chunk: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Masked softmax attention, over blocks of `chunk` query rows (0 or >= s: one block).

    q_nope/q_rope (b, s, h, .) (rope part already rotated); k_nope (b, s, h, dn); k_rope (b, s, 1, dr), the
    rope key all heads share; v (b, s, h, dv); mask (b, 1, s, s) -> (out (b, s, h, dv), max masked logit per
    head (h,); the caller stops its gradient). The rope key is broadcast over the heads and joined to k_nope, and
    the heads move in front of the sequence, so every product is a plain (b, h)-batched matmul (with the
    (b, s, h, d)-layout einsums XLA:CPU transposed score-sized tensors in the backward; heads-first took the
    moe_25m step's forward+backward from 7.0 to 6.0 s). A sequence that `chunk`
    does not divide (e.g. a decoding buffer) gets fully masked padding query rows, dropped from the output.
    """
    s = q_nope.shape[1]
    chunk = s if chunk <= 0 or chunk >= s else chunk
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:3], k_rope.shape[-1]))], axis=-1)
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    pad = -s % chunk
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)))  # False: padded rows see no key
    q, k, v = _heads_first(q), _heads_first(k), _heads_first(v)
    if chunk == s:  # one block: plain autodiff keeps its probabilities, which is the fastest on a small s
        out, max_logit, _ = _attend(q, k, v, mask, scale)
    else:
        out, max_logit = _blocked_attention(q, k, v, mask, scale, chunk)
    return _heads_first(out)[:, :s], max_logit


def _attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray, scale: float
            ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """One block: q (b, h, c, d), k (b, h, s, d), v (b, h, s, dv), mask (b, 1, c, s) ->
    (out (b, h, c, dv), max masked logit per head (h,), float32 probabilities (b, h, c, s))."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    masked = jnp.where(mask, logits * scale, NEG_INF)
    probs = jax.nn.softmax(masked, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)
    return out, jnp.max(masked, axis=(0, 2, 3)), probs


def _blocks(a: jnp.ndarray, axis: int, chunk: int) -> jnp.ndarray:
    """Split `axis` into (n, chunk) with the n blocks leading."""
    n = a.shape[axis] // chunk
    return jnp.moveaxis(a.reshape(a.shape[:axis] + (n, chunk) + a.shape[axis + 1:]), axis, 0)


def _unblock(a: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Inverse of `_blocks`."""
    a = jnp.moveaxis(a, 0, axis)
    return a.reshape(a.shape[:axis] + (-1,) + a.shape[axis + 2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked_attention(q, k, v, mask, scale, chunk):
    """Heads-first attention over query blocks with a hand-written backward.

    The backward keeps only q, k, v and the mask and recomputes each block's probabilities (the
    flash-attention backward without the online softmax: a block sees every key), so at most one block's
    (b, h, chunk, s) scores are live. A custom VJP rather than `jax.checkpoint`, because an enclosing
    layer-remat policy that saves "anything except names" (`selective`) re-saved a checkpointed block
    map's scores (the K2 plan showed f32[48, 8, 64, 512, 4096] per stage); and its products are written in
    the two matmul forms XLA:CPU runs fast, with explicit transposes where autodiff would contract a
    non-minor axis.
    """
    return _blocked_attention_fwd(q, k, v, mask, scale, chunk)[0]


def _blocked_attention_fwd(q, k, v, mask, scale, chunk):
    outs, maxes = jax.lax.map(lambda xs: _attend(xs[0], k, v, xs[1], scale)[:2],
                              (_blocks(q, 2, chunk), _blocks(mask, 2, chunk)))
    return (_unblock(outs, 2), jnp.max(maxes, axis=0)), (q, k, v, mask)


def _blocked_attention_bwd(scale, chunk, res, cts):
    q, k, v, mask = res
    d_out = cts[0]  # the max logit's cotangent is dropped: QK-Clip statistics are not differentiated
    f32 = jnp.float32
    k32 = k.astype(f32)
    transpose = lambda a: jnp.swapaxes(a, -1, -2)  # noqa: E731

    def block(acc, xs):
        dk, dv = acc
        qb, m, do = xs
        p = _attend(qb, k, v, m, scale)[2]
        dv = dv + jnp.einsum("bhkq,bhqd->bhkd", transpose(p.astype(v.dtype)), do, preferred_element_type=f32)
        dp = jnp.einsum("bhqd,bhkd->bhqk", do, v, preferred_element_type=f32)
        ds = jnp.where(m, p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)), 0.0) * scale
        dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k32)
        dk = dk + jnp.einsum("bhkq,bhqd->bhkd", transpose(ds), qb.astype(f32))
        return (dk, dv), dq.astype(q.dtype)

    acc = (jnp.zeros_like(k, f32), jnp.zeros_like(v, f32))
    xs = (_blocks(q, 2, chunk), _blocks(mask, 2, chunk), _blocks(d_out, 2, chunk))
    (dk, dv), dq = jax.lax.scan(block, acc, xs)
    return _unblock(dq, 2), dk.astype(k.dtype), dv.astype(v.dtype), None


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)
