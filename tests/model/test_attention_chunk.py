"""Query-chunked MLA (`attention_chunk`) is the same function as one (s, s) block, with less backward memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from k25.model.config import tiny
from k25.model.decoder import K2Model
from k25.model.mla import MLA, attention_mask
from k25.model.rope import rope_cos_sin


def packed_inputs(b: int, s: int, seed: int = 0):
    """Random hidden states and a packed-document layout: several documents per row, positions restart."""
    rng = np.random.default_rng(seed)
    cfg = tiny()
    x = jnp.asarray(rng.normal(size=(b, s, cfg.hidden_size)), jnp.float32)
    seg = np.zeros((b, s), np.int32)
    pos = np.zeros((b, s), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, s), size=3, replace=False))
        for i, (lo, hi) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, s])):
            seg[r, lo:hi] = i + 1
            pos[r, lo:hi] = np.arange(hi - lo)
    cos, sin = rope_cos_sin(jnp.asarray(pos), cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    return x, cos, sin, attention_mask(jnp.asarray(seg))


def split(chunk: int):
    """(graphdef, params) of a tiny MLA; the params are the same for every chunk (same seed)."""
    return nnx.split(MLA(tiny(attention_chunk=chunk), rngs=nnx.Rngs(0)))


def loss_fn(graphdef):
    def loss(state, x, cos, sin, mask):
        out, max_logit = nnx.merge(graphdef, state)(x, cos, sin, mask)
        w = jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))  # weights every output element
        return jnp.sum(out * w) + jnp.sum(max_logit), (out, max_logit)

    return loss


@pytest.mark.parametrize("chunk", [8, 16, 32])
def test_chunked_equals_unchunked_forward_and_grads(chunk):
    x, cos, sin, mask = packed_inputs(2, 64)
    assert not bool(mask.all()) and bool(mask[0, 0, -1, 0]) is False  # several documents in the mask
    gd_ref, state = split(0)
    gd_chunk, state_c = split(chunk)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_c)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    grad = lambda gd: jax.jit(jax.grad(loss_fn(gd), argnums=(0, 1), has_aux=True))  # noqa: E731
    (g_state_ref, g_x_ref), (out_ref, max_ref) = grad(gd_ref)(state, x, cos, sin, mask)
    (g_state, g_x), (out, max_logit) = grad(gd_chunk)(state, x, cos, sin, mask)

    np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(max_logit), np.asarray(max_ref), atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_x), np.asarray(g_x_ref), atol=1e-5, rtol=1e-5)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(g_state_ref))
    flat = dict(jax.tree_util.tree_leaves_with_path(g_state))
    assert flat.keys() == flat_ref.keys() and len(flat) == 7  # q_a, q_a norm, q_b, kv_a, kv_a norm, kv_b, o
    for path, g in flat.items():
        assert float(jnp.abs(flat_ref[path]).max()) > 0, path  # every parameter gets a gradient
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_ref[path]), atol=1e-5, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_max_logit_is_unchanged_and_gets_no_gradient():
    x, cos, sin, mask = packed_inputs(2, 64, seed=1)
    gd_ref, state = split(0)
    gd_chunk, _ = split(16)
    ref = nnx.merge(gd_ref, state)(x, cos, sin, mask)[1]
    got = nnx.merge(gd_chunk, state)(x, cos, sin, mask)[1]
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6)

    def only_max(state):
        return jnp.sum(nnx.merge(gd_chunk, state)(x, cos, sin, mask)[1])

    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(jax.grad(only_max)(state)))


def test_chunk_not_dividing_sequence_pads_and_negative_chunk_raises():
    x, cos, sin, mask = packed_inputs(1, 60)
    gd_ref, state = split(0)
    gd, _ = split(16)  # 60 = 3 * 16 + 12: the last block gets 4 fully masked padding rows
    ref, ref_max = nnx.merge(gd_ref, state)(x, cos, sin, mask)
    out, max_logit = nnx.merge(gd, state)(x, cos, sin, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(max_logit), np.asarray(ref_max), rtol=1e-6)
    with pytest.raises(ValueError, match="attention_chunk"):
        tiny(attention_chunk=-1)


def test_chunk_at_least_sequence_is_one_block():
    x, cos, sin, mask = packed_inputs(1, 48)
    gd_ref, state = split(0)
    ref = nnx.merge(gd_ref, state)(x, cos, sin, mask)[0]
    for chunk in (48, 100):  # >= s: a single block, no divisibility needed
        gd, _ = split(chunk)
        np.testing.assert_array_equal(np.asarray(nnx.merge(gd, state)(x, cos, sin, mask)[0]), np.asarray(ref))


@pytest.mark.parametrize("remat", ["none", "selective"])
def test_chunked_backward_keeps_less_memory(remat):
    """b=1, 4 heads, s=512: one block of 64 rows live instead of the (4, 512, 512) logits and probabilities,
    also inside a layer-remat policy that saves "anything except names" (which re-saved a checkpointed
    block map's scores)."""
    from k25.model.remat import remat_wrapper

    x, cos, sin, mask = packed_inputs(1, 512)
    temps = {}
    wrap = remat_wrapper(remat) or (lambda f: f)
    for chunk in (0, 64):
        gd, state = split(chunk)
        fn = jax.jit(jax.grad(wrap(loss_fn(gd)), argnums=(0, 1), has_aux=True))
        temps[chunk] = fn.lower(state, x, cos, sin, mask).compile().memory_analysis().temp_size_in_bytes
    print("temp bytes:", temps)
    assert temps[64] < 0.5 * temps[0], temps


@pytest.mark.parametrize("remat", ["selective", "full"])
def test_whole_model_under_layer_remat(remat):
    """Chunk blocks nest inside the layer scan's remat: same loss and gradients as unchunked."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 64)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1, 2, 3, 4]], 16, axis=1).repeat(2, axis=0), jnp.int32)
    grads = {}
    for chunk in (0, 16):
        model = K2Model(tiny(num_hidden_layers=2, remat=remat, attention_chunk=chunk), rngs=nnx.Rngs(0))
        gd, state = nnx.split(model)

        def loss(state, gd=gd):
            logits = nnx.merge(gd, state)(ids, segment_ids=seg).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        grads[chunk] = jax.jit(jax.value_and_grad(loss))(state)
    np.testing.assert_allclose(float(grads[16][0]), float(grads[0][0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads[0][1]), jax.tree.leaves(grads[16][1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
