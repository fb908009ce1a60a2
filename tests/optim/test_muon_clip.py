"""MuonClip: the Muon/AdamW split, per-matrix Newton-Schulz with consistent RMS, and QK-Clip on a real K2 model."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util
from optax.contrib import MuonDimensionNumbers, MuonState
from tolerance import assert_close_at_scale

from k25.model.config import tiny
from k25.model.decoder import K2Model
from k25.optim.muon_clip import ADAMW, MUON, adamw, label_params, muon_clip, ns_flops, qk_clip

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # optax's default quintic (Keller Jordan / Moonlight)


def ns_reference(g: np.ndarray, steps: int = 5, eps: float = 1e-8) -> np.ndarray:
    """Float64 numpy quintic Newton-Schulz, written independently of optax (same coefficients)."""
    a, b, c = NS_COEFFS
    x = np.asarray(g, np.float64)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (np.linalg.norm(x) + eps)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if transposed else x


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def model_and_params(cfg, seed: int = 0):
    model = K2Model(cfg, rngs=nnx.Rngs(seed))
    return model, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def forward(model, pure, ids):
    """Run `model` with its params replaced by the pure dict `pure` (traceable: the state copy is made here)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(params, pure)
    return nnx.merge(graphdef, params, rest)(ids)


def random_like(tree, seed: int):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)])


# ------------------------------------------------------------------------------------------- labels
def test_labels_on_tiny_model():
    _, params = model_and_params(tiny())
    labels = flat(label_params(params))
    adamw_paths = {k for k, v in labels.items() if v == ADAMW}
    expected_adamw = {"embed_tokens/embedding", "lm_head/kernel", "norm/scale"} | {
        k for k in labels if k.endswith("/scale")}
    assert adamw_paths == expected_adamw
    muon_paths = {k for k, v in labels.items() if v == MUON}
    for must in ("moe_layers/mlp/router", "moe_layers/mlp/experts/gate_proj", "moe_layers/mlp/experts/down_proj",
                 "moe_layers/self_attn/q_b_proj/kernel", "dense_layers/mlp/gate_proj/kernel",
                 "moe_layers/mlp/shared_experts/up_proj/kernel", "dense_layers/self_attn/kv_a_proj_with_mqa/kernel"):
        assert must in muon_paths
    assert muon_paths | adamw_paths == set(labels)
    # stacked norm scales are 2-D but logically vectors; every muon leaf is a (batched) matrix
    assert flat(params)["moe_layers/input_layernorm/scale"].ndim == 2
    assert all(flat(params)[k].ndim >= 3 for k in muon_paths)


def test_labels_tied_embeddings_and_no_dense():
    _, params = model_and_params(tiny(tie_word_embeddings=True, first_k_dense_replace=0, q_lora_rank=0))
    labels = flat(label_params(params))
    assert "lm_head/kernel" not in labels
    assert labels["embed_tokens/embedding"] == ADAMW
    assert labels["moe_layers/self_attn/q_proj/kernel"] == MUON


def test_labels_on_k25_shaped_tree():
    """Vision tower / language_model prefixes: suffix rules still apply; tables and biases stay on AdamW."""
    z = jnp.zeros
    tree = {
        "vision_tower": {"patch_embed": {"position_embeddings": z((4, 4, 8)), "proj": {"kernel": z((12, 8)),
                                                                                      "bias": z((8,))}},
                         "layers": {"attn": {"q_proj": {"kernel": z((2, 8, 8)), "bias": z((2, 8))}},
                                    "norm1": {"scale": z((2, 8)), "bias": z((2, 8))}}},
        "language_model": {"embed_tokens": {"embedding": z((16, 8))}, "lm_head": {"kernel": z((8, 16))},
                           "moe_layers": {"mlp": {"router": z((2, 8, 4))}}},
    }
    labels = flat(label_params(tree))
    assert {k for k, v in labels.items() if v == MUON} == {
        "vision_tower/patch_embed/proj/kernel", "vision_tower/layers/attn/q_proj/kernel",
        "language_model/moe_layers/mlp/router"}


def test_expert_bias_is_refused():
    model, _ = model_and_params(tiny())
    everything = nnx.to_pure_dict(nnx.state(model))  # includes the ExpertBias variable
    with pytest.raises(ValueError, match="ExpertBias"):
        label_params(everything)


# ------------------------------------------------------------------------------------- Muon branch
def test_per_expert_newton_schulz_with_consistent_rms():
    L, E = 2, 3
    params = {
        "moe_layers": {"mlp": {"experts": {"gate_proj": jnp.zeros((L, E, 8, 5)), "up_proj": jnp.zeros((L, E, 4, 6))},
                               "router": jnp.zeros((L, 8, 3))}},
        "norm": {"scale": jnp.ones((8,))},
    }
    grads = random_like(params, 1)
    lr, beta = 0.5, 0.95
    opt = muon_clip(params, learning_rate=lr, weight_decay=0.0, muon_momentum=beta)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    # step 1 of optax's bias-corrected Nesterov momentum is a scalar multiple of the gradient
    mu_hat_scale = 1.0 + beta / (1.0 + beta)
    optax_ns = jax.jit(optax.contrib._muon.orthogonalize_via_newton_schulz, static_argnums=2)
    for name, u, g in [("gate", updates["moe_layers"]["mlp"]["experts"]["gate_proj"],
                        grads["moe_layers"]["mlp"]["experts"]["gate_proj"]),
                       ("up", updates["moe_layers"]["mlp"]["experts"]["up_proj"],
                        grads["moe_layers"]["mlp"]["experts"]["up_proj"])]:
        A, B = g.shape[-2:]
        rms = 0.2 * math.sqrt(max(A, B))
        for li in range(L):
            for e in range(E):
                mu_hat = mu_hat_scale * g[li, e]
                want = -lr * rms * ns_reference(np.asarray(mu_hat))
                np.testing.assert_allclose(u[li, e], want, rtol=2e-4, atol=2e-6, err_msg=f"{name}[{li},{e}]")
                lib = -lr * rms * optax_ns(mu_hat, jnp.asarray(NS_COEFFS), 5)
                np.testing.assert_allclose(u[li, e], lib, rtol=1e-5, atol=1e-7)
    router_u, router_g = updates["moe_layers"]["mlp"]["router"], grads["moe_layers"]["mlp"]["router"]
    for li in range(L):
        want = -lr * 0.2 * math.sqrt(8) * ns_reference(mu_hat_scale * np.asarray(router_g[li]))
        np.testing.assert_allclose(router_u[li], want, rtol=2e-4, atol=2e-6)
        # the orthogonalised update has RMS 0.2 * lr (up to NS's inexact singular values)
        assert 0.5 * 0.2 * lr < float(jnp.sqrt(jnp.mean(router_u[li] ** 2))) < 1.5 * 0.2 * lr


def test_decoupled_weight_decay_on_muon_leaves():
    params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
    grads = random_like(params, 3)
    no_wd = muon_clip(params, learning_rate=0.1, weight_decay=0.0)
    wd = muon_clip(params, learning_rate=0.1, weight_decay=0.3)
    u0, _ = no_wd.update(grads, no_wd.init(params), params)
    u1, _ = wd.update(grads, wd.init(params), params)
    np.testing.assert_allclose(u1["w"]["kernel"], u0["w"]["kernel"] - 0.1 * 0.3 * params["w"]["kernel"], rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("mu_dtype", [None, jnp.bfloat16], ids=["mu_f32", "mu_bf16"])
def test_branches_match_optax_adamw_and_optax_muon(mu_dtype):
    """Three steps on the tiny model: AdamW leaves == optax.adamw, Muon leaves == optax.contrib.muon(consistent_rms),
    also with the Muon momentum stored in bfloat16 (`muon_mu_dtype`, against optax's own `mu_dtype`)."""
    _, params = model_and_params(tiny())
    labels = flat(label_params(params))
    sched = optax.linear_schedule(1e-2, 5e-3, 10)
    kw = {"weight_decay": 0.1, "eps": 1e-8}
    opt = muon_clip(params, learning_rate=sched, muon_mu_dtype=mu_dtype, **kw)
    state = opt.init(params)
    mus = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, MuonState))
           if isinstance(x, MuonState)]
    assert mus and {m.dtype for s in mus for m in jax.tree.leaves(s.mu)} == {jnp.dtype(mu_dtype or jnp.float32)}

    fp = flat(params)
    adam_p = {k: jnp.asarray(v) for k, v in fp.items() if labels[k] == ADAMW}
    muon_p = {k: jnp.asarray(v) for k, v in fp.items() if labels[k] == MUON}
    ref_adam = optax.adamw(sched, b1=0.9, b2=0.95, nesterov=False, **kw)
    dims = {k: MuonDimensionNumbers(v.ndim - 2, v.ndim - 1) for k, v in muon_p.items()}
    ref_muon = optax.contrib.muon(sched, ns_steps=5, beta=0.95, nesterov=True, consistent_rms=0.2,
                                  muon_weight_dimension_numbers=dims, mu_dtype=mu_dtype, **kw)
    s_adam, s_muon = ref_adam.init(adam_p), ref_muon.init(muon_p)

    step, adam_step, muon_step = jax.jit(opt.update), jax.jit(ref_adam.update), jax.jit(ref_muon.update)
    for i in range(3):
        grads = random_like(params, 10 + i)
        fg = flat(grads)
        updates, state = step(grads, state, params)
        ua, s_adam = adam_step({k: jnp.asarray(fg[k]) for k in adam_p}, s_adam, adam_p)
        um, s_muon = muon_step({k: jnp.asarray(fg[k]) for k in muon_p}, s_muon, muon_p)
        fu = flat(updates)
        for k in adam_p:
            assert_close_at_scale(fu[k], ua[k], rtol=1e-6, err_msg=k)
        for k in muon_p:
            assert_close_at_scale(fu[k], um[k], rtol=1e-5, err_msg=k)
        params = optax.apply_updates(params, updates)
        adam_p = optax.apply_updates(adam_p, ua)
        muon_p = optax.apply_updates(muon_p, um)


def test_adamw_baseline_is_optax_adamw():
    params = {"a": jnp.ones((3, 2)), "b": jnp.ones((2,))}
    grads = random_like(params, 5)
    ours = adamw(params, learning_rate=1e-3, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8)
    ref = optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    chex.assert_trees_all_close(ours.update(grads, ours.init(params), params)[0],
                                ref.update(grads, ref.init(params), params)[0])


def test_ns_flops():
    sds = jax.ShapeDtypeStruct
    shapes = {"moe_layers": {"mlp": {"experts": {"gate_proj": sds((2, 3, 8, 5), jnp.float32)}},
                             "input_layernorm": {"scale": sds((2, 8), jnp.float32)}},
              "embed_tokens": {"embedding": sds((10, 8), jnp.float32)}, "norm": {"scale": sds((8,), jnp.float32)}}
    # m=5, n=8: per iteration 4*m^2*n + 2*m^3 = 800 + 250, times 6 matrices, times 5 steps
    assert ns_flops(shapes, ns_steps=5) == 6 * 5 * 1050
    assert ns_flops(shapes, ns_steps=1) == 6 * 1050
    # against XLA's own count for one matrix (which also counts the elementwise terms)
    x = jnp.ones((64, 96))
    f = jax.jit(lambda x: optax.contrib._muon.orthogonalize_via_newton_schulz(x, jnp.asarray(NS_COEFFS), 5))
    cost = f.lower(x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and cost.get("flops"):
        ours = ns_flops({"w": {"kernel": sds((64, 96), jnp.float32)}}, 5)
        assert 0.9 * cost["flops"] <= ours <= cost["flops"]


# ----------------------------------------------------------------------------------------- QK-Clip
def _attn_params(cfg, rng: np.random.Generator) -> dict:
    H, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    D, dc = cfg.hidden_size, cfg.kv_lora_rank

    def stack(L):
        attn = {"kv_a_proj_with_mqa": {"kernel": rng.normal(size=(L, D, dc + dr))},
                "kv_b_proj": {"kernel": rng.normal(size=(L, dc, H * (dn + dv)))},
                "o_proj": {"kernel": rng.normal(size=(L, H * dv, D))}}
        if cfg.q_lora_rank > 0:
            attn["q_a_proj"] = {"kernel": rng.normal(size=(L, D, cfg.q_lora_rank))}
            attn["q_b_proj"] = {"kernel": rng.normal(size=(L, cfg.q_lora_rank, H * (dn + dr)))}
        else:
            attn["q_proj"] = {"kernel": rng.normal(size=(L, D, H * (dn + dr)))}
        attn = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), attn)
        return {"self_attn": attn, "input_layernorm": {"scale": jnp.ones((L, D))}}

    p = {"embed_tokens": {"embedding": jnp.asarray(rng.normal(size=(7, D)), jnp.float32)}}
    if cfg.first_k_dense_replace:
        p["dense_layers"] = stack(cfg.first_k_dense_replace)
    if cfg.num_moe_layers:
        p["moe_layers"] = stack(cfg.num_moe_layers)
    return p


def _qk_clip_reference(params, ml, cfg, tau):
    """Per-head loops over numpy copies: the QK-Clip formula written out."""
    H, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    out = jax.tree.map(lambda x: np.array(x, np.float64), params)
    q_name = "q_b_proj" if cfg.q_lora_rank > 0 else "q_proj"
    for i in range(cfg.num_hidden_layers):
        stack, li = ("dense_layers", i) if i < cfg.first_k_dense_replace else ("moe_layers",
                                                                              i - cfg.first_k_dense_replace)
        q = out[stack]["self_attn"][q_name]["kernel"]
        kv = out[stack]["self_attn"]["kv_b_proj"]["kernel"]
        for h in range(H):
            S = float(ml[i, h])
            if S <= tau:
                continue
            g = tau / S
            q[li, :, h * (dn + dr): h * (dn + dr) + dn] *= math.sqrt(g)
            q[li, :, h * (dn + dr) + dn: (h + 1) * (dn + dr)] *= g
            kv[li, :, h * (dn + dv): h * (dn + dv) + dn] *= math.sqrt(g)
    return out


SMALL = {"hidden_size": 8, "num_attention_heads": 3, "qk_nope_head_dim": 4, "qk_rope_head_dim": 2, "v_head_dim": 3,
         "kv_lora_rank": 5, "num_hidden_layers": 3}


@pytest.mark.parametrize("q_lora_rank", [0, 6])
@pytest.mark.parametrize("first_k_dense_replace", [0, 1, 3])
def test_qk_clip_matches_formula(q_lora_rank, first_k_dense_replace):
    cfg = tiny(**SMALL, q_lora_rank=q_lora_rank, first_k_dense_replace=first_k_dense_replace)
    rng = np.random.default_rng(q_lora_rank + 10 * first_k_dense_replace)
    params = _attn_params(cfg, rng)
    tau = 10.0
    ml = jnp.asarray([[3.0, 25.0, 10.0], [40.0, 9.9, 11.0], [-2.0, 1.0, 100.0]], jnp.float32)  # 10.0 == tau: kept
    before = jax.tree.map(np.asarray, params)
    new, n = jax.jit(qk_clip, static_argnames=("cfg",))(params, ml, cfg=cfg, tau=tau)
    assert n.dtype == jnp.int32 and int(n) == 4  # 25, 40, 11, 100
    want = _qk_clip_reference(params, np.asarray(ml), cfg, tau)
    chex.assert_trees_all_close(new, want, rtol=1e-6, atol=0)
    chex.assert_trees_all_equal(params, before)  # the input is not modified
    q_name = "q_b_proj" if q_lora_rank else "q_proj"
    H, dn, dv = 3, 4, 3
    for stack in ("dense_layers", "moe_layers"):
        if stack not in params:
            assert stack not in new
            continue
        a, b = params[stack], new[stack]
        # untouched leaves: everything outside q and kv_b, e.g. the shared rope key and o_proj
        for path in (("self_attn", "kv_a_proj_with_mqa", "kernel"), ("self_attn", "o_proj", "kernel"),
                     ("input_layernorm", "scale")):
            np.testing.assert_array_equal(_get(a, path), _get(b, path))
        kv0, kv1 = a["self_attn"]["kv_b_proj"]["kernel"], b["self_attn"]["kv_b_proj"]["kernel"]
        for h in range(H):  # V columns exactly untouched
            sl = slice(h * (dn + dv) + dn, (h + 1) * (dn + dv))
            np.testing.assert_array_equal(kv0[..., sl], kv1[..., sl])
        assert q_name in b["self_attn"]
    np.testing.assert_array_equal(new["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])
    # unclipped heads: bitwise unchanged (layer 0 / head 0 has S=3 < tau)
    stack0 = "dense_layers" if first_k_dense_replace else "moe_layers"
    q0, q1 = params[stack0]["self_attn"][q_name]["kernel"], new[stack0]["self_attn"][q_name]["kernel"]
    np.testing.assert_array_equal(q0[0, :, :6], q1[0, :, :6])


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def test_qk_clip_nothing_above_tau_is_identity():
    cfg = tiny(**SMALL, first_k_dense_replace=1)
    params = _attn_params(cfg, np.random.default_rng(0))
    new, n = qk_clip(params, jnp.full((3, 3), 5.0), cfg, tau=100.0)
    assert int(n) == 0
    chex.assert_trees_all_equal(new, params)
    with pytest.raises(ValueError, match="max_attn_logits"):
        qk_clip(params, jnp.zeros((2, 3)), cfg)


def _scale_last_layer(params, cfg, factors):
    """Multiply head h's query columns and k_nope columns of the *last* layer by factors[h] (V untouched)."""
    H, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    stack = "moe_layers" if cfg.num_moe_layers else "dense_layers"
    q_name = "q_b_proj" if cfg.q_lora_rank > 0 else "q_proj"
    f = jnp.asarray(factors, jnp.float32)
    q_cols = jnp.repeat(f, dn + dr)
    kv_cols = jnp.concatenate([jnp.broadcast_to(f[:, None], (H, dn)), jnp.ones((H, dv))], -1).reshape(-1)
    new = jax.tree.map(lambda x: x, params)
    attn = new[stack]["self_attn"]
    attn[q_name]["kernel"] = attn[q_name]["kernel"].at[-1].multiply(q_cols)
    attn["kv_b_proj"]["kernel"] = attn["kv_b_proj"]["kernel"].at[-1].multiply(kv_cols)
    return new


@pytest.mark.parametrize("overrides", [
    {},  # 1 dense + 3 MoE layers, low-rank q
    {"q_lora_rank": 0, "num_hidden_layers": 2, "first_k_dense_replace": 0},  # MoE only, plain q_proj
    {"num_hidden_layers": 1, "first_k_dense_replace": 1},  # dense only
], ids=["dense+moe", "moe-only-q_proj", "dense-only"])
def test_qk_clip_on_real_model_brings_max_logit_to_tau(overrides):
    """Only the last layer is blown up, so clipping cannot change the input of any clipped layer."""
    cfg = tiny(**overrides)
    model, params = model_and_params(cfg, seed=1)
    params = _scale_last_layer(params, cfg, [1.0, 8.0, 20.0, 40.0])
    ids = jax.random.randint(jax.random.key(2), (2, 24), 0, cfg.vocab_size)
    ml = np.asarray(forward(model, params, ids).max_attn_logits)
    tau = 0.5 * float(ml[-1].max())
    clipped = ml > tau
    assert clipped[-1].any() and not clipped[-1].all() and not clipped[:-1].any(), ml

    new, n = jax.jit(qk_clip, static_argnames=("cfg",))(params, jnp.asarray(ml), cfg=cfg, tau=tau)
    assert int(n) == int(clipped.sum())
    ml2 = np.asarray(forward(model, new, ids).max_attn_logits)
    np.testing.assert_allclose(ml2[clipped], tau, rtol=1e-4)
    np.testing.assert_allclose(ml2[~clipped], ml[~clipped], rtol=1e-6, atol=1e-7)
    assert (ml2 <= tau * (1 + 1e-4)).all()


# --------------------------------------------------------------------------------------- training
def test_muon_clip_trains_tiny_model_and_state_structure():
    cfg = tiny()
    model, params = model_and_params(cfg)
    ids = jax.random.randint(jax.random.key(3), (4, 32), 0, cfg.vocab_size)
    opt = muon_clip(params, learning_rate=1e-2)
    state = opt.init(params)

    def loss_fn(p):
        out = forward(model, p, ids)
        logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
        loss = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()
        return loss, out.max_attn_logits

    @jax.jit
    def step(p, s):
        (loss, ml), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, s = opt.update(g, s, p)
        p = optax.apply_updates(p, updates)
        p, n_clipped = qk_clip(p, ml, cfg, tau=100.0)
        return p, s, loss, n_clipped

    losses = []
    for _ in range(6):
        params, state, loss, n_clipped = step(params, state)
        losses.append(float(loss))
        assert int(n_clipped) == 0
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(np.isfinite(losses))

    # state: PartitionState with a Muon branch holding momentum for exactly the matrices, an AdamW branch the rest
    labels = flat(label_params(params))
    muon_state = state.inner_states[MUON].inner_state[0]
    assert isinstance(muon_state, MuonState)
    assert int(muon_state.count) == 6
    mu = traverse_util.flatten_dict(muon_state.mu, sep="/")
    leaves = {k: v for k, v in mu.items() if not isinstance(v, optax.MaskedNode)}
    assert set(leaves) == {k for k, v in labels.items() if v == MUON}
    for k, v in leaves.items():
        assert v.shape == flat(params)[k].shape and v.dtype == jnp.float32
    adam_state = state.inner_states[ADAMW].inner_state[0]
    assert isinstance(adam_state, optax.ScaleByAdamState)
    adam_mu = traverse_util.flatten_dict(adam_state.mu, sep="/")
    assert {k for k, v in adam_mu.items() if not isinstance(v, optax.MaskedNode)} == {
        k for k, v in labels.items() if v == ADAMW}
