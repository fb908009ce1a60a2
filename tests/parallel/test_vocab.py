"""`K2Config.shard_vocab`: the embedding table and LM head stored vocab-sharded over the mesh give the same
loss and gradients as the replicated twin, plain and through the 1F1B pipeline, and the table is never gathered.

Tolerances: the model computes in float32 (conftest sets matmul precision to highest). The embedding
lookup is exact either way (a psum of one row and zeros), the logits are the same dot products, so the
forward differs only in the order of the log-sum-exp's sum over the vocab (split into shards, then
all-reduced) and the loss's sum over tokens: a few float32 ulps. In the backward the hidden states'
gradient through the head is summed over vocab shards and then across them, the expert all-to-all and
the data ranks' sums are unchanged: rtol 1e-5 with an absolute floor of 16 ulps of each leaf's largest
entry (tests/tolerance.py), what the other sharded-vs-replicated tests use for float32 sums.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tolerance import assert_close_at_scale

from k25.model.config import tiny
from k25.model.decoder import K2Model
from k25.parallel.mesh import batch_sharding, make_mesh, state_shardings
from k25.parallel.vocab import cross_entropy, lookup
from k25.train.pipelined_lm import PipelineSettings, pipelined_decoder_loss
from k25.train.pretrain import lm_loss, token_loss_sum

MESH = {"pp": 2, "dp": 2, "ep": 2}


def _batch(b: int, s: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (b, s + 1), dtype=np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
            "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
            "segment_ids": np.ones((b, s), np.int32), "loss_mask": (rng.random((b, s)) < 0.9).astype(np.int32)}


def _loss_and_grads(shard_vocab: bool, pipelined: bool, head_chunks: int = 1) -> tuple[float, dict, dict]:
    """Loss (mean over tokens), gradients by name, and the stored spec of each vocab-sized leaf."""
    cfg = tiny(num_hidden_layers=5, shard_vocab=shard_vocab)  # 1 dense + 4 MoE layers
    mesh = make_mesh(MESH)
    model = K2Model(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    for state in (params, rest):
        nnx.replace_by_pure_dict(state, jax.device_put(nnx.to_pure_dict(state), state_shardings(state, mesh)))
    batch = jax.device_put(_batch(16, 16, cfg.vocab_size), batch_sharding(mesh))
    settings = PipelineSettings(stages=2, virtual=2, microbatches=2, schedule="1f1b", head_chunks=head_chunks)

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        total, aux = (pipelined_decoder_loss(m, batch, settings, token_loss_sum) if pipelined
                      else lm_loss(m, batch))
        return total / aux["num_tokens"]

    with jax.set_mesh(mesh):
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
    flat = {jax.tree_util.keystr(k): np.asarray(g) for k, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    specs = {jax.tree_util.keystr(k): a.sharding.spec for k, a in jax.tree_util.tree_flatten_with_path(params)[0]
             if cfg.vocab_size in a.shape}
    return float(value), flat, specs


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "1f1b"])
def test_vocab_sharded_equals_replicated(pipelined):
    loss0, g0, specs0 = _loss_and_grads(False, pipelined)
    loss1, g1, specs1 = _loss_and_grads(True, pipelined)
    assert all(s == P(None, None) for s in specs0.values()), specs0
    assert set(specs1.values()) == {P(None, ("pp", "dp", "ep")), P(("pp", "dp", "ep"), None)}, specs1
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    assert set(g1) == set(g0)
    for name, g in g0.items():
        assert_close_at_scale(g1[name], g, rtol=1e-5, err_msg=name)


def test_head_chunks_equal_the_whole_sequence():
    """`pipeline.head_chunks`: the vocab-sharded loss head over a microbatch's sequence in 4 pieces, each
    recomputed in its backward, gives the whole sequence's loss and gradients. The pieces' logits are the same
    dot products; only the loss's sum over tokens and the head's gradient sum are split in four partial sums
    (float32 reassociation): the tolerance of the sharded-vs-replicated test above."""
    loss0, g0, _ = _loss_and_grads(True, True)
    loss1, g1, _ = _loss_and_grads(True, True, head_chunks=4)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    assert set(g1) == set(g0)
    for name, g in g0.items():
        assert_close_at_scale(g1[name], g, rtol=1e-5, err_msg=name)


def test_cross_entropy_is_optax():
    """The masked-sum label pick is optax's loss and gradient, bit for bit, on unsharded logits."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, 5, 37)) * 4, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 37, (3, 5)), jnp.int32)
    ours, ref = (jax.value_and_grad(lambda x, f=f: f(x, labels).sum())(logits)
                 for f in (cross_entropy, optax.softmax_cross_entropy_with_integer_labels))
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])


def test_lookup_does_not_gather_the_table():
    """The compiled lookup gathers 1/pp of the table over the data axes, and its backward reduce-scatters
    each device's slice of the gradient: no collective produces the whole table or every rank's tokens."""
    cfg = tiny(shard_vocab=True)
    mesh = make_mesh(MESH)
    table = jax.device_put(jnp.ones((cfg.vocab_size, cfg.hidden_size)),
                           NamedSharding(mesh, P(("pp", "dp", "ep"), None)))
    ids = jax.device_put(jnp.arange(128, dtype=jnp.int32).reshape(16, 8) * 3, batch_sharding(mesh))
    loss = jax.value_and_grad(lambda t, i: (lookup(t, i, jnp.float32) ** 2).sum())
    with jax.set_mesh(mesh):
        hlo = jax.jit(loss).lower(table, ids).compile().as_text()
    ops = [ln.split("=", 1)[1].strip() for ln in hlo.splitlines()
           if re.search(r"= \S+ (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)\(", ln)]
    v, d = cfg.vocab_size, cfg.hidden_size
    assert f"f32[{v // 2},{d}]" in " ".join(o for o in ops if "all-gather(" in o), ops  # 1/pp of the table
    assert [o for o in ops if "reduce-scatter(" in o], ops  # the gradient, summed into its owner's shard
    for o in ops:
        rows = int(re.match(r"\w+\[(\d+)", o).group(1)) if re.match(r"\w+\[\d+", o) else 0
        # the stage's slice, the device's shard, or the device's own tokens: never the table or all ranks' tokens
        assert rows in (v // 2, v // 8) or rows <= 16 // 4, o
