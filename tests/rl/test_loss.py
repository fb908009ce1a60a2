"""Eq. 1 and its baselines against a hand-written per-token reference (plain Python loops, analytic gradients)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k25.rl.loss import PolicyLossConfig, group_advantages, policy_loss


def ref_loss(logp, old, adv, mask, *, alpha, beta, tau, correction="k25", window="ratio", tau_on_masked=True,
             normalization="token", eps_low=0.2, eps_high=0.2, tis_cap=2.0, ice_lo=0.5, ice_hi=5.0, prox=None,
             num_tokens=None):
    """Loss value and d loss / d logp, token by token, written from the equations (no jax)."""
    B, T = len(logp), len(logp[0])
    prox = logp if prox is None else prox
    terms = [[0.0] * T for _ in range(B)]
    grads = [[0.0] * T for _ in range(B)]
    masked = 0
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            a = adv[b] if np.ndim(adv) == 1 else adv[b][t]
            lr = logp[b][t] - old[b][t]
            ratio = math.exp(lr)
            pen, dpen = tau * lr * lr, 2 * tau * lr
            if correction == "k25":
                lo, hi = (alpha, beta) if window == "ratio" else (math.exp(alpha), math.exp(beta))
                inside = lo <= ratio <= hi
                val = (ratio if inside else min(max(ratio, lo), hi)) * a
                g = ratio * a if inside else 0.0
                if not inside:
                    masked += 1
                    if not tau_on_masked:
                        dpen = 0.0
            elif correction == "ppo":
                c = min(max(ratio, 1 - eps_low), 1 + eps_high)
                val = min(ratio * a, c * a)
                g = ratio * a if ratio * a <= c * a else 0.0
                masked += ratio * a > c * a
            elif correction in ("tis", "icepop"):
                r = math.exp(logp[b][t] - prox[b][t])
                k = math.exp(prox[b][t] - old[b][t])
                c = min(max(r, 1 - eps_low), 1 + eps_high)
                sur, dsur = (r * a, r * a) if r * a <= c * a else (c * a, 0.0)
                if correction == "tis":
                    w = min(k, tis_cap)
                    masked += (r * a > c * a) or k > tis_cap
                else:
                    w = k if ice_lo <= k <= ice_hi else 0.0
                    masked += (r * a > c * a) or not (ice_lo <= k <= ice_hi)
                val, g = w * sur, w * dsur
            else:
                r = math.exp(logp[b][t] - prox[b][t])
                val, g = r * a, r * a
            terms[b][t] = val - pen
            grads[b][t] = g - dpen
    n = sum(sum(1 for t in range(T) if mask[b][t]) for b in range(B))
    if normalization == "token":
        d = num_tokens if num_tokens is not None else max(n, 1)
        obj = sum(map(sum, terms)) / d
        dobj = [[g / d for g in row] for row in grads]
    else:
        seqs = [b for b in range(B) if any(mask[b])]
        obj, dobj = 0.0, [[0.0] * T for _ in range(B)]
        for b in seqs:
            L = sum(1 for t in range(T) if mask[b][t])
            obj += sum(terms[b]) / L / len(seqs)
            for t in range(T):
                dobj[b][t] = grads[b][t] / L / len(seqs)
    return -obj, -np.array(dobj), masked / max(n, 1)


def make_batch(seed=0, B=4, T=7):
    """log-ratios spread over [-1.2, 1.2] so some tokens fall outside [0.5, 2] on each side, both advantage
    signs, ragged masks with a fully-masked padding tail."""
    rng = np.random.default_rng(seed)
    old = rng.uniform(-3.0, -0.1, size=(B, T))
    lr = rng.uniform(-1.2, 1.2, size=(B, T))
    logp = old + lr
    mask = np.ones((B, T), np.float32)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    adv = np.array([0.75, -0.5, 1.25, -1.0])[:B]
    return logp, old, adv, mask


def run(logp, old, adv, mask, **kw):
    f = lambda lp: policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), **kw)
    (loss, stats), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    return float(loss), np.asarray(grad), {k: float(v) for k, v in stats.items()}


def _ref_kw(kw):
    m = dict(kw)
    for a, b in [("ppo_eps_low", "eps_low"), ("ppo_eps_high", "eps_high"), ("icepop_low", "ice_lo"),
                 ("icepop_high", "ice_hi"), ("prox_logp", "prox")]:
        if a in m:
            m[b] = m.pop(a)
    return m


K25_CASES = [
    dict(alpha=0.5, beta=2.0, tau=0.0),
    dict(alpha=0.5, beta=2.0, tau=0.1),
    dict(alpha=0.5, beta=2.0, tau=0.1, tau_on_masked=False),
    dict(alpha=-0.4, beta=0.6, tau=0.05, window="log_ratio"),
    dict(alpha=0.5, beta=2.0, tau=0.1, normalization="sequence"),
    dict(alpha=0.5, beta=2.0, tau=0.1, num_tokens=40.0),
]


@pytest.mark.parametrize("kw", K25_CASES)
def test_eq1_value_and_gradient_match_reference(kw):
    logp, old, adv, mask = make_batch()
    loss, grad, stats = run(logp, old, adv, mask, **kw)
    rloss, rgrad, rmasked = ref_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), **kw)
    np.testing.assert_allclose(loss, rloss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, rgrad, rtol=1e-5, atol=1e-6)
    assert stats["masked_fraction"] == pytest.approx(rmasked)
    # the batch really exercises both sides of the window and both advantage signs
    assert 0.1 < rmasked < 0.9


def test_eq1_token_cases_by_hand():
    """Four single tokens checked against the formula written out: inside the window; above it with A > 0;
    above it with A < 0; below it with A > 0. Eq. 1 zeroes the last three whatever the sign; PPO keeps the
    two whose pessimistic min is the unclipped term."""
    old = np.log(np.full((4, 1), 0.25))
    ratios = np.array([1.5, 3.0, 3.0, 0.25])
    logp = old + np.log(ratios)[:, None]
    adv = np.array([1.0, 1.0, -2.0, 1.0])
    mask = np.ones((4, 1))
    tau = 0.1
    lr = np.log(ratios)
    loss, grad, stats = run(logp, old, adv, mask, alpha=0.5, beta=2.0, tau=tau)
    dobj = np.array([1.5 * 1.0, 0.0, 0.0, 0.0]) - 2 * tau * lr  # tau's gradient stays on masked tokens
    np.testing.assert_allclose(grad[:, 0], -dobj / 4, rtol=1e-6)
    value = np.array([1.5 * 1, 2.0 * 1, 2.0 * -2, 0.5 * 1]) - tau * lr**2  # Clip(ratio, 0.5, 2) * A
    assert loss == pytest.approx(-value.sum() / 4, rel=1e-6)
    assert stats["masked_fraction"] == pytest.approx(0.75)
    _, grad, _ = run(logp, old, adv, mask, alpha=0.5, beta=2.0, tau=tau, tau_on_masked=False)
    np.testing.assert_allclose(grad[:, 0], -np.array([1.5 - 2 * tau * lr[0], 0, 0, 0]) / 4, rtol=1e-6)
    _, gppo, stats = run(logp, old, adv, mask, alpha=0.5, beta=2.0, tau=0.0, correction="ppo")
    np.testing.assert_allclose(gppo[:, 0], -np.array([0.0, 0.0, 3.0 * -2.0, 0.25 * 1.0]) / 4, rtol=1e-6)
    assert stats["masked_fraction"] == pytest.approx(0.5)


def test_one_over_n_normalisation():
    """N counts response tokens: padding adds nothing, and microbatches given the batch N sum to the batch."""
    logp, old, adv, mask = make_batch(seed=3)
    kw = dict(alpha=0.5, beta=2.0, tau=0.1)
    loss, grad, stats = run(logp, old, adv, mask, **kw)
    assert stats["num_tokens"] == mask.sum()
    pad = lambda x, v: np.concatenate([x, np.full((x.shape[0], 5), v)], axis=1)
    loss_p, grad_p, _ = run(pad(logp, -np.inf), pad(old, -1.0), adv, pad(mask, 0.0), **kw)
    assert loss_p == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(grad_p[:, :7], grad, rtol=1e-6)
    assert np.all(np.isfinite(grad_p)) and np.all(grad_p[:, 7:] == 0)
    n = float(mask.sum())
    l1, g1, _ = run(logp[:2], old[:2], adv[:2], mask[:2], num_tokens=n, **kw)
    l2, g2, _ = run(logp[2:], old[2:], adv[2:], mask[2:], num_tokens=n, **kw)
    assert l1 + l2 == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(np.concatenate([g1, g2]), grad, rtol=1e-5)
    # doubling every token doubles N: the loss is a per-token mean, not a sum
    l_dup, _, _ = run(np.concatenate([logp, logp]), np.concatenate([old, old]), np.concatenate([adv, adv]),
                      np.concatenate([mask, mask]), **kw)
    assert l_dup == pytest.approx(loss, rel=1e-5)


def test_per_token_advantages_equal_broadcast():
    logp, old, adv, mask = make_batch()
    kw = dict(alpha=0.5, beta=2.0, tau=0.1)
    a = run(logp, old, adv, mask, **kw)
    b = run(logp, old, np.repeat(adv[:, None], logp.shape[1], axis=1), mask, **kw)
    assert a[0] == pytest.approx(b[0])
    np.testing.assert_allclose(a[1], b[1])


BASELINES = [
    dict(correction="ppo"),
    dict(correction="ppo", ppo_eps_low=0.1, ppo_eps_high=0.3),
    dict(correction="tis", tis_cap=1.5),
    dict(correction="icepop", icepop_low=0.6, icepop_high=1.8),
    dict(correction="none"),
]


@pytest.mark.parametrize("kw", BASELINES)
@pytest.mark.parametrize("explicit_prox", [False, True])
def test_baselines_match_reference(kw, explicit_prox):
    logp, old, adv, mask = make_batch(seed=1)
    kw = dict(kw, alpha=0.5, beta=2.0, tau=0.05)
    if explicit_prox:  # trainer's old-parameter logprobs differ from both the sampler's and the current ones
        kw["prox_logp"] = old + np.random.default_rng(7).uniform(-0.6, 0.6, size=old.shape)
    loss, grad, stats = run(logp, old, adv, mask, **kw)
    rloss, rgrad, rmasked = ref_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(),
                                     **_ref_kw({k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                                for k, v in kw.items()}))
    np.testing.assert_allclose(loss, rloss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, rgrad, rtol=1e-5, atol=1e-6)
    assert stats["masked_fraction"] == pytest.approx(rmasked)


def test_modes_differ_where_they_should():
    """With one step per batch (prox = current), TIS caps the weight and IcePop zeroes it; Eq. 1 zeroes it
    outside its window; 'none' ignores the sampler entirely."""
    logp, old, adv, mask = make_batch(seed=2)
    _, g_k25, _ = run(logp, old, adv, mask, alpha=0.5, beta=2.0, tau=0.0)
    _, g_ice, _ = run(logp, old, adv, mask, alpha=0.5, beta=2.0, tau=0.0, correction="icepop", icepop_low=0.5,
                      icepop_high=2.0)
    _, g_tis, _ = run(logp, old, adv, mask, alpha=0.5, beta=2.0, tau=0.0, correction="tis", tis_cap=2.0)
    _, g_none, _ = run(logp, old, adv, mask, alpha=0.5, beta=2.0, tau=0.0, correction="none")
    np.testing.assert_allclose(g_ice, g_k25, rtol=1e-6)  # same mask when prox == current
    ratio = np.exp(logp - old)
    n = mask.sum()
    np.testing.assert_allclose(g_tis, -np.minimum(ratio, 2.0) * adv[:, None] * mask / n, rtol=1e-5)
    np.testing.assert_allclose(g_none, -adv[:, None] * mask / n, rtol=1e-5)


def test_stats_and_on_policy_start():
    logp, old, adv, mask = make_batch()
    _, grad, stats = run(old, old, adv, mask, alpha=0.5, beta=2.0, tau=0.3)
    assert stats["masked_fraction"] == 0.0 and stats["mean_abs_log_ratio"] == 0.0 and stats["mean_ratio"] == 1.0
    np.testing.assert_allclose(grad, -adv[:, None] * mask / mask.sum(), rtol=1e-6)  # plain policy gradient
    _, _, stats = run(logp, old, adv, mask, alpha=0.5, beta=2.0, tau=0.3)
    on = mask > 0
    assert stats["mean_abs_log_ratio"] == pytest.approx(np.abs(logp - old)[on].mean(), rel=1e-5)
    assert stats["max_abs_log_ratio"] == pytest.approx(np.abs(logp - old)[on].max(), rel=1e-5)


def test_jit_and_config():
    logp, old, adv, mask = make_batch()
    cfg = PolicyLossConfig.from_mapping({"alpha": 0.5, "beta": 2.0, "tau": 0.1})
    f = jax.jit(lambda lp: policy_loss(lp, old, adv, mask, **cfg.kwargs())[0])
    assert float(f(jnp.asarray(logp))) == pytest.approx(run(logp, old, adv, mask, **cfg.kwargs())[0], rel=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(alpha=-0.5, beta=2.0, tau=0.0), "window='log_ratio'"),
    (dict(alpha=0.5, beta=2.0, tau=0.0, window="log_ratio"), "alpha < 0 < beta"),
    (dict(alpha=0.5, beta=2.0, tau=-1.0), "tau"),
    (dict(alpha=0.5, beta=2.0, tau=0.0, correction="grpo"), "correction"),
])
def test_bad_settings_name_the_field(kw, match):
    logp, old, adv, mask = make_batch()
    with pytest.raises(ValueError, match=match):
        policy_loss(logp, old, adv, mask, **kw)
    with pytest.raises(ValueError, match="unknown field"):
        PolicyLossConfig.from_mapping({"alpha": 0.5, "betta": 2.0})


def test_bad_shapes_name_the_array():
    logp, old, adv, mask = make_batch()
    kw = dict(alpha=0.5, beta=2.0, tau=0.0)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:3], mask, **kw)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(logp, old, adv, mask[:, :3], **kw)
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(logp, old.T, adv, mask, **kw)


def test_group_advantages_against_loops():
    rewards = [1.0, 0.0, 1.0, 1.0, 0.2, 0.2, 0.8, 3.0]
    groups = [7, 7, 7, 7, 2, 2, 2, 9]  # three prompts, one of them with a single response
    adv = group_advantages(rewards, groups)
    for i, (r, g) in enumerate(zip(rewards, groups)):
        same = [rr for rr, gg in zip(rewards, groups) if gg == g]
        assert adv[i] == pytest.approx(r - sum(same) / len(same))
    std = group_advantages(rewards, groups, std_normalize=True, eps=0.0 + 1e-9)
    for i, (r, g) in enumerate(zip(rewards, groups)):
        same = np.array([rr for rr, gg in zip(rewards, groups) if gg == g])
        s = same.std()
        want = 0.0 if s == 0 else (r - same.mean()) / s
        assert std[i] == pytest.approx(want, abs=1e-5)
    assert group_advantages([1.0, 1.0], [0, 0]).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages([1.0, 0.0], [0])
