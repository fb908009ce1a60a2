"""Losses of the ViT training stage: SigLIP's pairwise sigmoid loss and the caption cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def siglip_logits(image_emb: jnp.ndarray, text_emb: jnp.ndarray, log_temperature: jnp.ndarray,
                  bias: jnp.ndarray) -> jnp.ndarray:
    """(n_images, n_texts) logits exp(t') * <x_i, y_j> + b of L2-normalised embeddings."""
    sims = jnp.dot(image_emb.astype(jnp.float32), text_emb.astype(jnp.float32).T)
    return sims * jnp.exp(log_temperature) + bias


def siglip_loss(image_emb: jnp.ndarray, text_emb: jnp.ndarray, log_temperature: jnp.ndarray,
                bias: jnp.ndarray) -> jnp.ndarray:
    """Per-image SigLIP loss (n,): -sum_j log sigmoid(z_ij * logit_ij), z = +1 on the diagonal, -1 elsewhere.

    The SigLIP paper's batch loss is the mean of these rows (1/|B| sum_i sum_j); returning rows lets the
    runtime sum them and divide by the example count, so gradient accumulation stays exact in form.
    """
    logits = siglip_logits(image_emb, text_emb, log_temperature, bias)
    n = logits.shape[0]
    z = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(z * logits), axis=1)


def caption_cross_entropy(logits: jnp.ndarray, text_ids: jnp.ndarray, loss_mask: jnp.ndarray
                          ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(summed CE, token count) of predicting text_ids[:, 1:] from logits[:, :-1] where loss_mask[:, 1:].

    `logits` (b, s, vocab) are next-token logits aligned with text_ids (b, s); `loss_mask` marks the
    tokens to be predicted (the answer and eos), so prompts are conditioned on but not trained on.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], text_ids[:, 1:])
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(mask)
