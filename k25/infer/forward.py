"""Prefill and one decode step of `K2Model` through the compressed cache (k25/infer/cache.py).

Both walk the model's own layer stacks (the same `DecoderLayer` modules, weights, norms, dense SwiGLU and
`MoE`, so expert parallelism applies unchanged under an ambient `ep` mesh) and differ from the training
forward only in attention: prefill uses the training attention on the prompt and stores its latents;
decode reads the cache with the absorbed projections (k25/infer/attention.py). The cache is carried through
the layer scan and updated in place (`dynamic_update_slice` / scatter), so a donated cache is never copied.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from k25.infer.attention import decode_attention, prefill_attention
from k25.infer.cache import stack_depths
from k25.model.decoder import DecoderLayer, K2Model
from k25.model.mla import attention_mask
from k25.model.rope import rope_cos_sin

Cache = dict[str, dict[str, jnp.ndarray]]
LayerFn = Callable[[DecoderLayer, jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray],
                   tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]]


def _ffn(layer: DecoderLayer, h: jnp.ndarray) -> jnp.ndarray:
    out = layer.mlp(layer.post_attention_layernorm(h))
    return h + (out[0] if layer.is_moe else out)


def _scan_stacks(model: K2Model, h: jnp.ndarray, cache: Cache, layer_fn: LayerFn) -> tuple[jnp.ndarray, Cache]:
    """Run every layer stack in order; layer_fn(layer, i, h, latent_stack, rope_stack) -> (h, latent, rope)."""
    new_cache = {}
    for name, n in stack_depths(model.cfg).items():
        graphdef, state = nnx.split(getattr(model, name))

        def body(carry, xs, graphdef=graphdef):
            layer_state, i = xs
            return layer_fn(nnx.merge(graphdef, layer_state), i, *carry), None

        carry = (h, cache[name]["latent"], cache[name]["k_rope"])
        (h, lat, rope), _ = jax.lax.scan(body, carry, (state, jnp.arange(n)), unroll=model.cfg.unroll_layers)
        new_cache[name] = {"latent": lat, "k_rope": rope}
    return h, new_cache


def _rope(model: K2Model, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    cfg = model.cfg
    return rope_cos_sin(positions, cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)


def prefill(model: K2Model, embeds: jnp.ndarray, length: jnp.ndarray, slot: jnp.ndarray, cache: Cache
            ) -> tuple[jnp.ndarray, Cache]:
    """One prompt into one slot from position 0.

    embeds (1, s, d) (the prompt right-padded to its bucket s); length: real prompt tokens; slot: cache row.
    Returns (float32 logits (1, vocab) after the last real token, updated cache). Padding sits after the
    prompt, so causality keeps it out of the real tokens; its cache entries lie past `length` and are
    masked until decode overwrites them.
    """
    s = embeds.shape[1]
    cos, sin = _rope(model, jnp.arange(s, dtype=jnp.int32)[None])
    mask = attention_mask(jnp.ones((1, s), jnp.int32))

    def layer_fn(layer, i, h, lat, rope):
        a, latent, k_rope = prefill_attention(layer.self_attn, layer.input_layernorm(h), cos, sin, mask)
        lat = jax.lax.dynamic_update_slice(lat, latent[None].astype(lat.dtype), (i, slot, 0, 0))
        rope = jax.lax.dynamic_update_slice(rope, k_rope[None].astype(rope.dtype), (i, slot, 0, 0))
        return _ffn(layer, h + a), lat, rope

    h, cache = _scan_stacks(model, embeds.astype(model.cfg.compute_dtype), cache, layer_fn)
    last = jax.lax.dynamic_slice_in_dim(h, length - 1, 1, axis=1)[:, 0]
    return model.logits(model.norm(last)), cache


def decode(model: K2Model, tokens: jnp.ndarray, positions: jnp.ndarray, cache: Cache, window: int
           ) -> tuple[jnp.ndarray, Cache]:
    """One token per slot: tokens (S,) at positions (S,) -> (float32 logits (S, vocab), updated cache).

    Each slot attends to its cached positions 0..position (the current token is written first); `window`
    (static, > every position) bounds the cache prefix read, so short sequences do not pay for max_len.
    """
    S = tokens.shape[0]
    rows = jnp.arange(S)
    cos, sin = _rope(model, positions[:, None])
    valid = jnp.arange(window)[None, :] <= positions[:, None]

    def layer_fn(layer, i, h, lat, rope):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q_nope, q_rope = attn.queries(x, cos, sin)
        latent, k_rope = attn.latent(x, cos, sin)
        lat = lat.at[i, rows, positions].set(latent[:, 0].astype(lat.dtype))
        rope = rope.at[i, rows, positions].set(k_rope[:, 0].astype(rope.dtype))
        lat_w = jax.lax.dynamic_index_in_dim(lat, i, keepdims=False)[:, :window]
        rope_w = jax.lax.dynamic_index_in_dim(rope, i, keepdims=False)[:, :window]
        a = decode_attention(attn, q_nope[:, 0], q_rope[:, 0], lat_w, rope_w, valid)
        return _ffn(layer, h + a[:, None]), lat, rope

    h, cache = _scan_stacks(model, model.embed(tokens[:, None]), cache, layer_fn)
    return model.logits(model.norm(h[:, 0])), cache
