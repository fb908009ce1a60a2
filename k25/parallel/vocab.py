"""Vocab-parallel token embedding and loss head (`K2Config.shard_vocab`).

K2's embedding table and LM head are 2 x f32[163840, 7168] (9.4 GB). Replicated, every device stores both
and, in the loss head, a full f32 copy of the head's gradient. With `shard_vocab` their vocab dimension is
stored over every mesh axis (`VOCAB_SHARD` in k25.parallel.mesh.LOGICAL_RULES), 1/N of each per device, and
the two places that read them work on vocab slices instead of gathering the tables:

* lookup (`lookup`): the tokens differ between data ranks but are the same on every pipeline stage, so the
  table is gathered over the data axes only (1/pp of it per device) and each stage looks up the rows it owns
  for its tokens, zeros elsewhere; a psum over `pp` assembles the embeddings (exact: one term is non-zero).
* loss head (`project`): the hidden states are gathered over the data axes instead of the weights, each data
  rank computes the logits of all those tokens for its vocab slice, and the log-sum-exp and the label's
  logit (`cross_entropy`) are reductions over the sharded vocab. No device holds the full head, its full
  gradient or full-vocab logits; the head's gradient is complete per slice, with no cross-device sum.

Without an ambient mesh, or on a mesh where those axes have size 1, everything is the plain computation.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from k25.parallel.mesh import BATCH_AXES, LOGICAL_RULES, VOCAB_SHARD


def is_sharded(variable: Any) -> bool:
    """Whether a parameter is tagged with the vocab-sharded logical axis."""
    return VOCAB_SHARD in tuple(variable.get_metadata().get("out_sharding") or ())


def _axes(table_rows: int | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(replicated-token axes, data axes): the automatic axes of the ambient mesh that shard the vocab,
    split by whether the tokens are the same on all their ranks (`pp`) or split over them (dp/ep)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), ()
    rule = LOGICAL_RULES[VOCAB_SHARD]
    axes = tuple(a for a in (rule if isinstance(rule, tuple) else (rule,))
                 if a in mesh.axis_names and a not in mesh.manual_axes and mesh.shape[a] > 1)
    if table_rows is not None and table_rows % math.prod(mesh.shape[a] for a in axes):
        return (), ()  # stored replicated (k25.parallel.mesh.storage_spec): nothing to split
    return tuple(a for a in axes if a not in BATCH_AXES), tuple(a for a in axes if a in BATCH_AXES)


def lookup(table: jax.Array, ids: jax.Array, dtype: Any) -> jax.Array:
    """`table[ids]` in `dtype` for a vocab-sharded table, gathering it only over the data axes.

    One shard_map manual over the vocab's axes: the all_gather over the data axes (whose transpose, in the
    backward, is a reduce-scatter of each device's (vocab/pp, d) gradient slice) and the masked local
    lookup of the device's own tokens, summed over the stages. When the rows do not split over the data
    ranks, the table is constrained to the stage split and XLA partitions the rest; without stage axes
    (pp = 1) the lookup is left to XLA (it may gather the table)."""
    stage_axes, data_axes = _axes(table.shape[0])
    if not stage_axes:
        return jnp.take(table, ids, axis=0).astype(dtype)
    mesh = jax.sharding.get_abstract_mesh()
    split = bool(data_axes) and ids.ndim > 0 and ids.shape[0] % math.prod(mesh.shape[a] for a in data_axes) == 0
    if not split:
        table, data_axes = jax.lax.with_sharding_constraint(table, P(stage_axes, None)), ()

    def local(t: jax.Array, ids: jax.Array) -> jax.Array:
        if data_axes:
            t = jax.lax.all_gather(t, data_axes, axis=0, tiled=True)
        k = ids - jax.lax.axis_index(stage_axes) * t.shape[0]
        hit = (k >= 0) & (k < t.shape[0])
        rows = jnp.take(t, jnp.clip(k, 0, t.shape[0] - 1), axis=0).astype(dtype)
        return jax.lax.psum(jnp.where(hit[..., None], rows, jnp.zeros((), dtype)), stage_axes)

    tokens = P(data_axes or None)
    return jax.shard_map(local, in_specs=(P(stage_axes + data_axes, None), tokens), out_specs=tokens,
                         axis_names=set(stage_axes + data_axes))(table, ids)


def project(h: jax.Array, weight_t: jax.Array, dtype: Any) -> jax.Array:
    """float32 logits h @ weight_t (weight_t (d, vocab), vocab-sharded), vocab-parallel over the data axes."""
    stage_axes, data_axes = _axes(weight_t.shape[-1])
    axes = stage_axes + data_axes
    if axes:  # every token on every rank of the vocab's axes, each rank its vocab slice
        h = jax.lax.with_sharding_constraint(h, P())
    out = jnp.dot(h.astype(dtype), weight_t.astype(dtype)).astype(jnp.float32)
    if axes:
        out = jax.lax.with_sharding_constraint(out, P(*([None] * (out.ndim - 1)), axes))
    return out


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-token softmax cross-entropy with integer labels, as optax computes it (log-sum-exp minus the
    label's logit), but picking the label's logit with a masked sum: a reduction over the vocab, which a
    vocab-sharded `logits` turns into a local sum and an all-reduce instead of a gather of the logits.
    The masked sum adds one value to zeros, so it is exact."""
    vocab = jax.lax.broadcasted_iota(labels.dtype, logits.shape, logits.ndim - 1)
    label_logits = jnp.sum(jnp.where(vocab == labels[..., None], logits, 0.0), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - label_logits
