"""Per-slot token sampling: temperature, top-k, top-p, a key per (seed, token index), temperature-1 logprobs.

Every slot samples with its own key `fold_in(fold_in(fold_in(key(0), seed_lo), seed_hi), index)` where
`index` is the position of the token in its completion, so a request's tokens depend only on its seed and
its own logits, never on which other requests share the batch or which slot it runs in.

The returned logprob is log_softmax(logits) at the sampled token, the full temperature-1 distribution before
any top-k/top-p filtering: what the trainer computes for the same token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TOP_LOGPROBS = 20  # most alternatives returned per token (OpenAI's limit)


def token_key(seed: jnp.ndarray, index: jnp.ndarray) -> jax.Array:
    """seed (2,) uint32 (low, high words of a 64-bit seed), index int32 -> the key of that token."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), seed[0]), seed[1])
    return jax.random.fold_in(key, index)


def filtered_logits(logits: jnp.ndarray, temperature: jnp.ndarray, top_p: jnp.ndarray, top_k: jnp.ndarray
                    ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """logits (V,) -> (candidate token ids sorted by logit (V,), their tempered logits, -inf where filtered).

    top_k <= 0 keeps every token; top_p keeps the smallest prefix of the sorted tokens whose probability
    (after temperature) reaches top_p (the most likely token is always kept).
    """
    v = logits.shape[-1]
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    vals, ids = jax.lax.top_k(scaled, v)
    rank = jnp.arange(v)
    keep = rank < jnp.where(top_k > 0, top_k, v)
    probs = jax.nn.softmax(jnp.where(keep, vals, -jnp.inf))
    keep = keep & ((jnp.cumsum(probs) - probs) < top_p)
    return ids, jnp.where(keep, vals, -jnp.inf)


SUPPRESSED_LOGIT = -1e9  # finite, so 0 * logp stays 0 in an entropy; exp() of it is exactly 0 in float32


def suppress_logits(logits: jnp.ndarray, ids: tuple[int, ...]) -> jnp.ndarray:
    """logits (..., V) with `ids` never sampled: their logits set to SUPPRESSED_LOGIT, so log_softmax is the
    distribution renormalised over the other tokens. The sampler and the RL trainer both call this, so the
    logprob a rollout records is the one the trainer computes (input-only ids such as media placeholders)."""
    if not ids:
        return logits
    return logits.at[..., jnp.asarray(ids)].set(SUPPRESSED_LOGIT)


def sample_token(logits: jnp.ndarray, temperature: jnp.ndarray, top_p: jnp.ndarray, top_k: jnp.ndarray,
                 seed: jnp.ndarray, index: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """One slot: logits (V,) -> (token, its temperature-1 logprob, top ids (K,), top logprobs (K,)).

    temperature 0 is greedy (argmax of the logits).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    ids, vals = filtered_logits(logits, temperature, top_p, top_k)
    sampled = ids[jax.random.categorical(token_key(seed, index), vals)]
    token = jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)
    top_lp, top_ids = jax.lax.top_k(logp, min(TOP_LOGPROBS, logits.shape[-1]))
    return token, logp[token], top_ids.astype(jnp.int32), top_lp


def sample(logits: jnp.ndarray, temperature: jnp.ndarray, top_p: jnp.ndarray, top_k: jnp.ndarray,
           seeds: jnp.ndarray, index: jnp.ndarray):
    """`sample_token` for every slot: logits (S, V), per-slot parameters (S,), seeds (S, 2)."""
    return jax.vmap(sample_token)(logits, temperature, top_p, top_k, seeds, index)
