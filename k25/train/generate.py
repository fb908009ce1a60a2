"""Greedy decoding without a KV cache: enough for short-answer evals of small models.

Prompts are right-padded into one (n, prompt_len + max_new) buffer; causal attention means the
padding after a prompt never influences it, so each step reads the logits at the prompt's current
end and writes the next token there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def greedy_decode(logits_fn: Callable[[jnp.ndarray], jnp.ndarray], prompts: Sequence[Sequence[int]], max_new: int,
                  pad_id: int, eos_id: int) -> list[list[int]]:
    """Continuations (without eos) of each prompt; `logits_fn(ids (n, L)) -> (n, L, vocab)`."""
    n = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(lengths.max()) + max_new
    buf = np.full((n, width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p

    @jax.jit
    def run(buf, lengths):
        def body(t, carry):
            buf, done = carry
            pos = lengths + t
            logits = logits_fn(buf)
            nxt = jnp.argmax(jnp.take_along_axis(logits, (pos - 1)[:, None, None], axis=1)[:, 0], -1)
            nxt = jnp.where(done, pad_id, nxt).astype(buf.dtype)
            buf = buf.at[jnp.arange(n), pos].set(nxt)
            return buf, done | (nxt == eos_id)

        buf, _ = jax.lax.fori_loop(0, max_new, body, (buf, jnp.zeros((n,), bool)))
        return buf

    out = np.asarray(run(jnp.asarray(buf), jnp.asarray(lengths)))
    result = []
    for i in range(n):
        gen = out[i, lengths[i]:].tolist()
        if eos_id in gen:
            gen = gen[: gen.index(eos_id)]
        result.append([t for t in gen if t != pad_id])
    return result
