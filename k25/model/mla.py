"""Multi-head Latent Attention (DeepSeek-V2/V3, Kimi K2).

Queries go through an optional low-rank bottleneck (q_lora_rank > 0) with RMSNorm; keys and
values are decompressed from one kv_lora_rank latent (RMSNorm'd) and a single rope key that
all heads share. The forward also returns the maximum pre-softmax logit of each head, which
QK-Clip needs; it is one extra reduction over the logits already computed. With
`attention_chunk` > 0 the queries are processed in blocks that the backward recomputes, so the
(b, h, s, s) logits are never all kept (see `attend_chunked`).

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

    def __call__(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, mask: jnp.ndarray
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x (b, s, d); cos/sin (b, s, rope/2); mask (b, 1, s, s) -> (out (b, s, d), max_logit (heads,))."""
        cfg = self.cfg
        b, s, _ = x.shape
        H, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q = self.query(x).reshape(b, s, H, dn + dr)
        q_nope, q_rope = q[..., :dn], q[..., dn:]
        ckv = self.kv_a_proj_with_mqa(x)
        kv_latent, k_rope = ckv[..., : cfg.kv_lora_rank], ckv[..., cfg.kv_lora_rank:]
        kv = tag(self.kv_b_proj(self.kv_a_layernorm(kv_latent)), MLA_UP).reshape(b, s, H, dn + dv)
        k_nope, v = kv[..., :dn], kv[..., dn:]
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope[:, :, None, :], cos, sin)  # (b, s, 1, dr): shared by all heads

        chunk = cfg.attention_chunk
        if 0 < chunk < s:
            out, max_logit = attend_chunked(q_nope, q_rope, k_nope, k_rope, v, mask, self.scale, chunk)
        else:
            out, max_logit = attend(q_nope, q_rope, k_nope, k_rope, v, mask, self.scale)
        return self.o_proj(out.reshape(b, s, H * dv)), jax.lax.stop_gradient(max_logit)


def attend(q_nope: jnp.ndarray, q_rope: jnp.ndarray, k_nope: jnp.ndarray, k_rope: jnp.ndarray, v: jnp.ndarray,
           mask: jnp.ndarray, scale: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Attention of a block of c query rows against all s keys.

    q_nope/q_rope (b, c, h, .) (rope part already rotated); k_nope (b, s, h, dn); k_rope (b, s, 1, dr);
    v (b, s, h, dv); mask (b, 1, c, s) -> (out (b, c, h, dv), max masked logit per head (h,)).
    Logits are float32; probabilities are cast to v's (compute) dtype for the value product. The shared
    rope key is broadcast over the heads and joined to k_nope, and the heads move in front of the
    sequence, so both products are plain (b, h)-batched matmuls: XLA:CPU ran the (b, s, h, d)-layout
    einsums' backward at a few GFLOP/s.
    """
    heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  (b, s, h, d) -> (b, h, s, d)
    q = heads_first(jnp.concatenate([q_nope, q_rope], axis=-1))
    k = heads_first(jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:3], k_rope.shape[-1]))], -1))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    masked = jnp.where(mask, logits * scale, NEG_INF)
    max_logit = jnp.max(masked, axis=(0, 2, 3))
    probs = jax.nn.softmax(masked, axis=-1).astype(v.dtype)
    return heads_first(jnp.einsum("bhqk,bhkd->bhqd", probs, heads_first(v))), max_logit


def attend_chunked(q_nope: jnp.ndarray, q_rope: jnp.ndarray, k_nope: jnp.ndarray, k_rope: jnp.ndarray,
                   v: jnp.ndarray, mask: jnp.ndarray, scale: float, chunk: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`attend` over blocks of `chunk` query rows (same shapes in and out, with c = s).

    Only one block's (b, h, chunk, s) logits are live at a time, and the hand-written backward keeps only
    q, k, v and the mask, recomputing each block's probabilities (the flash-attention backward without the
    online softmax: a block sees every key). A custom VJP rather than `jax.checkpoint`, because an enclosing
    layer-remat policy that saves "anything except names" (`selective`) would otherwise save every block's
    scores again (the K2 plan showed f32[48, 8, 64, 512, 4096] per stage). Rows are independent, so outputs
    match `attend`; the max logit is the max over blocks and gets no gradient. A sequence that `chunk` does
    not divide (e.g. a decoding buffer) gets fully masked padding query rows, dropped from the output.
    """
    s = q_nope.shape[1]
    pad = -s % chunk
    if pad:
        q_nope, q_rope = (jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))) for q in (q_nope, q_rope))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)))  # False: padded rows see no key
    out, max_logit = _chunked(q_nope, q_rope, k_nope, k_rope, v, mask, scale, chunk)
    return out[:, :s], max_logit


def _blocks(a: jnp.ndarray, axis: int, chunk: int) -> jnp.ndarray:
    """Split `axis` into (n, chunk) with the n blocks leading."""
    n = a.shape[axis] // chunk
    return jnp.moveaxis(a.reshape(a.shape[:axis] + (n, chunk) + a.shape[axis + 1:]), axis, 0)


def _unblock(a: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Inverse of `_blocks`."""
    a = jnp.moveaxis(a, 0, axis)
    return a.reshape(a.shape[:axis] + (-1,) + a.shape[axis + 2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _chunked(q_nope, q_rope, k_nope, k_rope, v, mask, scale, chunk):
    return _chunked_fwd(q_nope, q_rope, k_nope, k_rope, v, mask, scale, chunk)[0]


def _chunked_fwd(q_nope, q_rope, k_nope, k_rope, v, mask, scale, chunk):
    outs, maxes = jax.lax.map(lambda xs: attend(xs[0], xs[1], k_nope, k_rope, v, xs[2], scale),
                              (_blocks(q_nope, 1, chunk), _blocks(q_rope, 1, chunk), _blocks(mask, 2, chunk)))
    return (_unblock(outs, 1), jnp.max(maxes, axis=0)), (q_nope, q_rope, k_nope, k_rope, v, mask)


def _chunked_bwd(scale, chunk, res, cts):
    q_nope, q_rope, k_nope, k_rope, v, mask = res
    d_out = cts[0]  # the max logit's cotangent is dropped: QK-Clip statistics are not differentiated
    f32 = jnp.float32

    def block(acc, xs):
        dk_nope, dk_rope, dv = acc
        qn, qr, m, do = xs
        logits = (jnp.einsum("bqhd,bkhd->bhqk", qn, k_nope, preferred_element_type=f32)
                  + jnp.einsum("bqhd,bkd->bhqk", qr, k_rope[:, :, 0], preferred_element_type=f32))
        p = jax.nn.softmax(jnp.where(m, logits * scale, NEG_INF), axis=-1)
        dv = dv + jnp.einsum("bhqk,bqhd->bkhd", p.astype(v.dtype), do, preferred_element_type=f32)
        dp = jnp.einsum("bqhd,bkhd->bhqk", do, v, preferred_element_type=f32)
        ds = jnp.where(m, p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)), 0.0) * scale
        dqn = jnp.einsum("bhqk,bkhd->bqhd", ds, k_nope.astype(f32))
        dqr = jnp.einsum("bhqk,bkd->bqhd", ds, k_rope[:, :, 0].astype(f32))
        dk_nope = dk_nope + jnp.einsum("bhqk,bqhd->bkhd", ds, qn.astype(f32))
        dk_rope = dk_rope + jnp.einsum("bhqk,bqhd->bkd", ds, qr.astype(f32))[:, :, None]
        return (dk_nope, dk_rope, dv), (dqn.astype(qn.dtype), dqr.astype(qr.dtype))

    acc = tuple(jnp.zeros_like(a, f32) for a in (k_nope, k_rope, v))
    xs = (_blocks(q_nope, 1, chunk), _blocks(q_rope, 1, chunk), _blocks(mask, 2, chunk), _blocks(d_out, 1, chunk))
    (dk_nope, dk_rope, dv), (dqn, dqr) = jax.lax.scan(block, acc, xs)
    return (_unblock(dqn, 1), _unblock(dqr, 1), dk_nope.astype(k_nope.dtype), dk_rope.astype(k_rope.dtype),
            dv.astype(v.dtype), None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
