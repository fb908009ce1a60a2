"""A packed row gives every document the same loss as that document alone: attention never crosses documents."""

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from k25.model.config import tiny
from k25.model.decoder import K2Model


def test_packed_row_equals_documents_alone():
    cfg = tiny(num_hidden_layers=2)
    model = nnx.jit(lambda: K2Model(cfg, rngs=nnx.Rngs(0)))()
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, cfg.vocab_size, n) for n in (7, 12, 5)]
    row = np.concatenate(docs)
    seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])
    pos = np.concatenate([np.arange(len(d)) for d in docs])
    pad = 4
    row, seg, pos = (np.pad(a, (0, pad)) for a in (row, seg, pos))  # padding: segment 0

    def per_token_ce(ids, segs, positions):
        out = model(jnp.asarray(ids)[None], positions=jnp.asarray(positions)[None], segment_ids=jnp.asarray(segs)[None])
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[0, :-1], jnp.asarray(ids)[1:])
        return np.asarray(ce)

    packed = per_token_ce(row, seg, pos)
    start = 0
    for d in docs:
        alone = per_token_ce(d, np.ones(len(d), np.int32), np.arange(len(d)))
        np.testing.assert_allclose(packed[start:start + len(d) - 1], alone, rtol=1e-5, atol=1e-5)
        start += len(d)
    # and the packed row differs from one without segment ids, so the mask is doing the work
    unmasked = per_token_ce(row, np.ones_like(seg), np.arange(len(row)))
    assert np.abs(unmasked[7:18] - packed[7:18]).max() > 1e-3
