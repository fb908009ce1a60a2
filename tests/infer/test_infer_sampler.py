"""The continuous-batching Sampler: TITO logprobs vs the training forward, seeds, stops, async, weights, sharding."""

import asyncio
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k25.infer import Completion, Request, Sampler, Token
from k25.infer.sampling import filtered_logits, sample_token
from k25.model.config import tiny
from k25.model.decoder import K2Model
from k25.parallel.mesh import make_mesh

TOL = 1e-4


def tiny_model(seed: int = 0) -> K2Model:
    cfg = tiny(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
               num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
               v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
               initializer_range=0.2, moe_block_size=8)
    return K2Model(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(model, max_slots=3, max_len=64, cache_dtype=jnp.float32)


@pytest.fixture(scope="module")
def mixed(model, sampler):
    reqs = mixed_requests(model.cfg.vocab_size)  # 7 requests on 3 slots: slots are freed and refilled
    return reqs, sampler.generate(reqs)


WIDTH = 64  # sequences are right-padded to one width: the causal forward is unchanged, and compiles once
_log_softmax = jax.jit(lambda m, x: jax.nn.log_softmax(m(x).logits))


def train_logp(model, ids: list[int]) -> np.ndarray:
    """log_softmax of the training forward (what the RL loss computes), (len(ids), vocab)."""
    buf = np.zeros((1, WIDTH), np.int32)
    buf[0, : len(ids)] = ids
    return np.asarray(_log_softmax(model, buf)[0, : len(ids)])


def trainer_logprobs(model, c: Completion) -> np.ndarray:
    """The training forward's logprob of each sampled token."""
    logp = train_logp(model, c.prompt_ids + c.token_ids)
    n = len(c.prompt_ids)
    return logp[np.arange(n - 1, n - 1 + len(c.token_ids)), c.token_ids]


def mixed_requests(vocab: int) -> list[Request]:
    rng = np.random.default_rng(0)
    lengths = [3, 17, 9, 30, 5, 12, 21]
    settings = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_p=0.9),
                dict(temperature=1.2, top_k=5), dict(temperature=1.0, top_p=0.5, top_k=10), dict(temperature=0.0),
                dict(temperature=0.7)]
    return [Request(rng.integers(0, vocab, n).tolist(), max_new_tokens=int(m), seed=i, **s)
            for i, (n, m, s) in enumerate(zip(lengths, [20, 7, 25, 12, 30, 3, 16], settings))]


def test_logprobs_equal_trainer_with_slots_reused(model, mixed):
    reqs, out = mixed
    assert [c.prompt_ids for c in out] == [list(r.prompt_ids) for r in reqs]
    for r, c in zip(reqs, out):
        assert c.finish_reason == "length" and len(c.token_ids) == r.max_new_tokens == len(c.logprobs)
        np.testing.assert_allclose(c.logprobs, trainer_logprobs(model, c), atol=TOL, rtol=0)
        if r.temperature == 0:  # greedy: every token is the argmax of the training forward
            n = len(c.prompt_ids)
            assert c.token_ids == np.argmax(train_logp(model, c.prompt_ids + c.token_ids)[n - 1:-1], -1).tolist()


def test_seed_determinism_independent_of_batch(model, sampler):
    reqs = mixed_requests(model.cfg.vocab_size)
    probe = Request(reqs[3].prompt_ids, max_new_tokens=12, temperature=1.0, seed=123)
    alone = sampler.generate([probe])[0]
    crowded = sampler.generate(reqs[:4] + [probe] + reqs[4:])[4]  # another slot, other neighbours
    assert alone.token_ids == crowded.token_ids
    np.testing.assert_allclose(alone.logprobs, crowded.logprobs, atol=1e-6, rtol=0)
    other = sampler.generate([Request(probe.prompt_ids, 12, temperature=1.0, seed=124)])[0]
    assert other.token_ids != alone.token_ids


def test_stop_ids_and_length(sampler):
    base = sampler.generate([Request([1, 2, 3], max_new_tokens=10, temperature=0.0)])[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 10
    stop = base.token_ids[4]
    first = base.token_ids.index(stop)
    c = sampler.generate([Request([1, 2, 3], max_new_tokens=10, temperature=0.0, stop_ids=(stop, 999))])[0]
    assert c.finish_reason == "stop" and c.token_ids == base.token_ids[: first + 1]
    assert c.logprobs == base.logprobs[: first + 1]


def test_top_logprobs(model, sampler):
    c = sampler.generate([Request([5, 6, 7, 8], max_new_tokens=4, temperature=1.0, top_logprobs=3)])[0]
    logp = train_logp(model, c.prompt_ids + c.token_ids)
    for t, top in enumerate(c.top_logprobs):
        ref = np.argsort(-logp[3 + t])[:3]
        assert [i for i, _ in top] == ref.tolist()
        np.testing.assert_allclose([v for _, v in top], logp[3 + t, ref], atol=TOL)
    assert sampler.generate([Request([5], max_new_tokens=2)])[0].top_logprobs == []


def test_async_submit_shares_the_batch(sampler, mixed):
    reqs, want = mixed

    async def run():
        return await asyncio.wait_for(asyncio.gather(*(sampler.submit(r) for r in reqs)), timeout=300)

    got = asyncio.run(run())
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)


def test_streamed_tokens_equal_generate_for_concurrent_requests(sampler, mixed):
    reqs, want = mixed
    reqs = reqs + [Request([5, 6, 7, 8], max_new_tokens=4, temperature=1.0, top_logprobs=3, seed=9)]
    want = want + sampler.generate(reqs[-1:])

    async def follow(r):
        items = [item async for item in sampler.stream(r)]
        return items[:-1], items[-1]

    async def run():
        return await asyncio.wait_for(asyncio.gather(*(follow(r) for r in reqs)), timeout=300)

    for (tokens, done), ref in zip(asyncio.run(run()), want):
        assert all(isinstance(t, Token) for t in tokens) and isinstance(done, Completion)
        assert [t.id for t in tokens] == done.token_ids == ref.token_ids
        assert [t.logprob for t in tokens] == done.logprobs
        np.testing.assert_allclose(done.logprobs, ref.logprobs, atol=1e-6)
        assert done.finish_reason == ref.finish_reason
        assert [t.top_logprobs for t in tokens] == (done.top_logprobs or [[]] * len(tokens))
    assert len(tokens[0].top_logprobs) == 3
    assert [[i for i, _ in top] for top in done.top_logprobs] == [[i for i, _ in top] for top in ref.top_logprobs]
    np.testing.assert_allclose([[v for _, v in top] for top in done.top_logprobs],
                               [[v for _, v in top] for top in ref.top_logprobs], atol=1e-6)


def _slot_of(sampler, request):
    return next((a for a in sampler._slots if a is not None and a.pending.request is request), None)


def test_stream_yields_tokens_while_the_request_decodes(sampler):
    r = Request([2, 7, 1, 8], max_new_tokens=12, temperature=0.0)

    async def run():
        active, tokens = [], []
        async for item in sampler.stream(r):
            if isinstance(item, Token):
                active.append(_slot_of(sampler, r) is not None)
                tokens.append(item.id)
            else:
                return active, tokens, item

    active, tokens, done = asyncio.run(asyncio.wait_for(run(), timeout=300))
    assert tokens == done.token_ids and len(tokens) == 12
    assert active[0] and sum(active) >= 6  # the first tokens arrive while the request still holds its slot


def test_abandoned_stream_or_submit_frees_its_slot(sampler):
    long = Request([3, 1, 4], max_new_tokens=50, temperature=1.0, seed=1)

    async def idle():
        while sampler._has_work():
            await asyncio.sleep(0.01)

    async def run():
        it = sampler.stream(long)
        assert isinstance(await it.__anext__(), Token)
        held = _slot_of(sampler, long)
        await it.aclose()  # a client that went away
        await asyncio.wait_for(idle(), 60)
        task = asyncio.ensure_future(sampler.submit(long))
        while _slot_of(sampler, long) is None:
            await asyncio.sleep(0.001)
        submitted = _slot_of(sampler, long)
        task.cancel()
        await asyncio.wait_for(idle(), 60)
        return held, submitted

    held, submitted = asyncio.run(run())
    assert held is not None and len(held.tokens) < 50 and len(submitted.tokens) < 50
    assert all(a is None for a in sampler._slots) and not sampler._queue
    assert len(sampler.generate([long])[0].token_ids) == 50  # still serving


def test_bad_requests_name_the_field(sampler):
    with pytest.raises(ValueError, match="max_len=64"):
        sampler.generate([Request(list(range(60)), max_new_tokens=8)])
    for bad, field in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                       (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(top_logprobs=21), "top_logprobs")]:
        kw = dict(max_new_tokens=2) | bad
        with pytest.raises(ValueError, match=field):
            sampler.generate([Request([1, 2], **kw)])
    with pytest.raises(ValueError, match="vocabulary"):
        sampler.generate([Request([1, 9999], max_new_tokens=2)])
    with pytest.raises(ValueError, match="empty"):
        sampler.generate([Request([], max_new_tokens=2)])
    assert sampler.generate([Request([1, 2], max_new_tokens=2)])[0].finish_reason == "length"  # still serving


@dataclasses.dataclass
class TrainStateLike:
    params: dict
    buffers: dict


def test_update_weights_without_recompiling(model):
    s = Sampler(model, max_slots=3, max_len=64, cache_dtype=jnp.float32)  # the fixture's shapes: compiled once
    req = Request([3, 1, 4, 1, 5], max_new_tokens=6, temperature=0.0)
    before = s.generate([req])[0]
    compiled = s._decode_fn._cache_size(), s._prefill_fn._cache_size()
    other = tiny_model(seed=1)
    s.update_weights(other)
    after = s.generate([req])[0]
    assert (s._decode_fn._cache_size(), s._prefill_fn._cache_size()) == compiled
    assert after.logprobs != before.logprobs
    np.testing.assert_allclose(after.logprobs, trainer_logprobs(other, after), atol=TOL)
    _, params, buffers = nnx.split(model, nnx.Param, ...)
    s.update_weights(TrainStateLike(nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)))  # what RL pushes
    assert s.generate([req])[0].logprobs == before.logprobs
    s.update_weights(nnx.to_pure_dict(nnx.state(other)))  # a pure dict of the whole state
    assert s.generate([req])[0].logprobs == after.logprobs
    with pytest.raises(ValueError, match="embed_tokens.embedding"):
        s.update_weights({"embed_tokens": {"embedding": np.zeros((3, 3), np.float32)}})


def test_sampling_filters_match_reference():
    """Empirical frequencies of temperature/top-k/top-p sampling against the distribution computed in numpy."""
    logits = jnp.asarray(np.random.default_rng(0).normal(0, 2, 12), jnp.float32)
    temperature, top_p, top_k = 0.8, 0.85, 6
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z)[:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    keep = (np.cumsum(p) - p) < top_p
    ref = np.zeros(12)
    ref[order[keep]] = p[keep] / p[keep].sum()
    n = 20000
    seeds = jnp.zeros((n, 2), jnp.uint32).at[:, 0].set(jnp.arange(n, dtype=jnp.uint32))
    draw = jax.jit(jax.vmap(sample_token, in_axes=(None, None, None, None, 0, None)))
    tokens = np.asarray(draw(logits, temperature, top_p, top_k, seeds, 0)[0])
    freq = np.bincount(tokens, minlength=12) / n
    assert np.all(np.abs(freq - ref) <= 4 * np.sqrt(ref * (1 - ref) / n) + 1e-9), (freq, ref)
    ids, vals = filtered_logits(logits, 1.0, 1.0, 0)
    assert np.isfinite(np.asarray(vals)).all() and sorted(np.asarray(ids).tolist()) == list(range(12))
    greedy = sample_token(logits, 0.0, 1.0, 0, seeds[0], 0)[0]
    assert int(greedy) == int(np.argmax(np.asarray(logits)))


@pytest.mark.slow
def test_sharded_decode_equals_one_device(model):
    reqs = mixed_requests(model.cfg.vocab_size)[:5] + [Request([9, 8, 7], max_new_tokens=9, temperature=1.0, seed=5)]
    one = Sampler(model, max_slots=8, max_len=64, cache_dtype=jnp.float32).generate(reqs)
    mesh = make_mesh({"pp": 1, "dp": 2, "ep": 4})
    sharded = Sampler(model, max_slots=8, max_len=64, cache_dtype=jnp.float32, mesh=mesh)
    assert sharded.cache["moe_layers"]["latent"].sharding.spec[1] == ("dp", "ep")
    many = sharded.generate(reqs)
    for a, b in zip(one, many):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_suppressed_ids_are_never_sampled_and_logprobs_are_renormalised(model):
    """`suppress_ids` (a K2.5 policy's media placeholders in RL): the ids never come out, even where they are
    the greedy choice or carry most of the probability, and each token's logprob is the training forward's
    log_softmax renormalised over the other ids, as the RL loss computes it (`suppress_logits`)."""
    from k25.infer.sampling import suppress_logits

    reqs = mixed_requests(model.cfg.vocab_size)
    plain = Sampler(model, max_slots=3, max_len=64, cache_dtype=jnp.float32).generate(reqs)
    # ban what the plain sampler picked most often: greedy requests must now take other tokens
    counts = np.bincount(np.concatenate([c.token_ids for c in plain]), minlength=model.cfg.vocab_size)
    banned = tuple(int(t) for t in np.argsort(counts)[::-1][:3])
    s = Sampler(model, max_slots=3, max_len=64, cache_dtype=jnp.float32, suppress_ids=banned)
    out = s.generate(reqs)
    assert not set(banned) & {t for c in out for t in c.token_ids}
    assert any(a.token_ids != b.token_ids for a, b in zip(out, plain))
    for c in out:
        logp = np.asarray(jax.nn.log_softmax(suppress_logits(
            jnp.asarray(train_logp(model, c.prompt_ids + c.token_ids)), banned)))
        n = len(c.prompt_ids)
        want = logp[np.arange(n - 1, n - 1 + len(c.token_ids)), c.token_ids]
        np.testing.assert_allclose(c.logprobs, want, atol=TOL)
    with pytest.raises(ValueError, match="suppress_ids"):
        Sampler(model, max_slots=1, max_len=8, suppress_ids=[model.cfg.vocab_size])
