"""DeepseekV3 / Kimi-K2 text weights: config.json <-> K2Config, and HF tensor names <-> k25 leaves.

Layout notes:
  * torch Linear weights are (out, in); k25 kernels are (in, out): every matrix is transposed.
  * k25 stacks layers of one kind on a leading axis; HF numbers layers 0..N-1.
  * Experts are read either per expert (`experts.{e}.gate_proj.weight`, the released layout and
    what transformers writes) or fused (`experts.gate_up_proj`, transformers' in-memory layout).
  * k25 applies RoPE to interleaved pairs (DeepSeek's `rope_interleave=True`). A checkpoint with
    `rope_interleave: false` rotates (i, i+d/2) pairs instead; its rope rows are permuted on load so
    the two agree exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k25.hf.plan import Placement, abstract_state, assemble
from k25.model.config import K2Config, RopeScaling
from k25.model.decoder import K2Model


# ------------------------------------------------------------------------------------------- config
def config_from_hf(hf: dict[str, Any], **overrides: Any) -> K2Config:
    """K2Config from a DeepseekV3 / Kimi-K2 config.json dict (released `rope_scaling` or transformers-5 form)."""
    if "text_config" in hf:  # Kimi-K2.5: the language model's config is nested
        hf = hf["text_config"]
    if hf.get("attention_bias"):
        raise ValueError("config.json: attention_bias=true is not supported by k25 (K2 has no attention biases).")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in ("default", "yarn"):
        raise ValueError(f"config.json: rope type {rtype!r} is not supported; k25 implements 'default' and 'yarn'.")
    if rtype == "yarn":
        factor = rope.get("factor")
        orig = rope["original_max_position_embeddings"]
        if factor is None:
            factor = hf["max_position_embeddings"] / orig
        scaling = RopeScaling(type="yarn", factor=float(factor), original_max_position_embeddings=int(orig),
                              beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                              mscale=float(rope.get("mscale") or 0.0),
                              mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
                              truncate=bool(rope.get("truncate", True)))
        if rope.get("attention_factor") is not None:
            raise ValueError("config.json: rope attention_factor overrides are not supported; remove it to use "
                             "YaRN's mscale-derived factor.")
    else:
        scaling = RopeScaling()
    kw = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        first_k_dense_replace=hf.get("first_k_dense_replace", 0), num_attention_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts") or 0,
        num_experts_per_tok=hf["num_experts_per_tok"], n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1, norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), rope_theta=float(theta),
        rope_scaling=scaling, max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=hf.get("initializer_range", 0.02),
    )
    kw.update(overrides)
    return K2Config(**kw).validate()


def config_to_hf(cfg: K2Config) -> dict[str, Any]:
    """The released DeepseekV3 config.json form (`rope_scaling` + `rope_theta`)."""
    rs = cfg.rope_scaling
    rope_scaling = None
    if rs.is_yarn:
        rope_scaling = dict(type="yarn", rope_type="yarn", factor=rs.factor,
                            original_max_position_embeddings=rs.original_max_position_embeddings,
                            beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, mscale=rs.mscale,
                            mscale_all_dim=rs.mscale_all_dim)
        if not rs.truncate:
            rope_scaling["truncate"] = False
    return dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        first_k_dense_replace=cfg.first_k_dense_replace, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank or None,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor, scoring_func="sigmoid",
        topk_method="noaux_tc", rope_theta=cfg.rope_theta, rope_scaling=rope_scaling, rope_interleave=True,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range, hidden_act="silu",
        attention_bias=False, num_nextn_predict_layers=0, torch_dtype=str(cfg.weight_dtype),
    )


# ---------------------------------------------------------------------------------- tensor layout
def _rope_perm(dr: int) -> np.ndarray:
    """Index map taking a rotate-half rope layout to k25's interleaved one: new[2i]=old[i], new[2i+1]=old[i+dr/2]."""
    half = dr // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)


def _permute_q_rope(w: np.ndarray, cfg: K2Config, inverse: bool = False) -> np.ndarray:
    """Permute the q_rope output rows of a torch (out, in) query weight."""
    H, dn, dr = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    perm = _rope_perm(dr)
    if inverse:
        perm = np.argsort(perm)
    w = w.reshape(H, dn + dr, -1)
    w = np.concatenate([w[:, :dn], w[:, dn:][:, perm]], axis=1)
    return w.reshape(H * (dn + dr), -1)


def _permute_k_rope(w: np.ndarray, cfg: K2Config, inverse: bool = False) -> np.ndarray:
    """Permute the rope-key rows (the last qk_rope_head_dim outputs) of kv_a_proj_with_mqa."""
    perm = _rope_perm(cfg.qk_rope_head_dim)
    if inverse:
        perm = np.argsort(perm)
    r = cfg.kv_lora_rank
    return np.concatenate([w[:r], w[r:][perm]], axis=0)


def _layer_keys(cfg: K2Config, moe: bool) -> list[tuple[str, tuple[str, ...], bool]]:
    """(HF suffix inside `layers.{i}.`, k25 path inside the stack, is a torch Linear weight to transpose)."""
    attn = [("self_attn.kv_a_proj_with_mqa.weight", ("self_attn", "kv_a_proj_with_mqa", "kernel"), True),
            ("self_attn.kv_a_layernorm.weight", ("self_attn", "kv_a_layernorm", "scale"), False),
            ("self_attn.kv_b_proj.weight", ("self_attn", "kv_b_proj", "kernel"), True),
            ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), True),
            ("input_layernorm.weight", ("input_layernorm", "scale"), False),
            ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), False)]
    if cfg.q_lora_rank > 0:
        attn += [("self_attn.q_a_proj.weight", ("self_attn", "q_a_proj", "kernel"), True),
                 ("self_attn.q_a_layernorm.weight", ("self_attn", "q_a_layernorm", "scale"), False),
                 ("self_attn.q_b_proj.weight", ("self_attn", "q_b_proj", "kernel"), True)]
    else:
        attn += [("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), True)]
    if not moe:
        return attn + [(f"mlp.{n}.weight", ("mlp", n, "kernel"), True) for n in ("gate_proj", "up_proj", "down_proj")]
    keys = attn + [("mlp.gate.weight", ("mlp", "router"), True),
                   ("mlp.gate.e_score_correction_bias", ("mlp", "bias"), False)]
    if cfg.n_shared_experts > 0:
        keys += [(f"mlp.shared_experts.{n}.weight", ("mlp", "shared_experts", n, "kernel"), True)
                 for n in ("gate_proj", "up_proj", "down_proj")]
    return keys


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _fetch(get: Callable[[str], np.ndarray], key: str, transpose: bool, cfg: K2Config, rope_interleave: bool
           ) -> np.ndarray:
    w = get(key)
    if not rope_interleave:
        if key.endswith(("q_b_proj.weight", "q_proj.weight")):
            w = _permute_q_rope(w, cfg)
        elif key.endswith("kv_a_proj_with_mqa.weight"):
            w = _permute_k_rope(w, cfg)
    return w.T if transpose else w


def _fused(get: Callable[[str], np.ndarray], key: str, rows: slice | None) -> np.ndarray:
    w = get(key)
    return (w if rows is None else w[:, rows]).transpose(0, 2, 1)


def text_plan(get: Callable[[str], np.ndarray], has: Callable[[str], bool], cfg: K2Config, prefix: str = "model.",
              lm_head_key: str = "lm_head.weight", rope_interleave: bool = True,
              root: tuple[str, ...] = ()) -> list[Placement]:
    """Where every HF tensor of a K2Model goes (`root` prefixes the k25 paths, e.g. ("language_model",))."""
    plan: list[Placement] = []

    def add(path: tuple[str, ...], index: tuple[int, ...], key: str, fetch: Callable[[], np.ndarray]) -> None:
        plan.append(Placement((*root, *path), index, key, fetch))

    def one(path, index, key, transpose):
        add(path, index, key, functools.partial(_fetch, get, key, transpose, cfg, rope_interleave))

    k = cfg.first_k_dense_replace
    F = cfg.moe_intermediate_size
    for name, layer_ids, moe in (("dense_layers", range(k), False),
                                 ("moe_layers", range(k, cfg.num_hidden_layers), True)):
        for j, i in enumerate(layer_ids):
            for suffix, path, transpose in _layer_keys(cfg, moe):
                one((name, *path), (j,), f"{prefix}layers.{i}.{suffix}", transpose)
            if not moe:
                continue
            base = f"{prefix}layers.{i}.mlp.experts."
            ex = (name, "mlp", "experts")
            if has(base + "gate_up_proj"):  # transformers' in-memory fused layout: (E, 2F, D) and (E, D, F)
                for n, rows in (("gate_proj", slice(0, F)), ("up_proj", slice(F, 2 * F))):
                    add((*ex, n), (j,), base + "gate_up_proj", functools.partial(_fused, get, base + "gate_up_proj",
                                                                                  rows))
                add((*ex, "down_proj"), (j,), base + "down_proj", functools.partial(_fused, get, base + "down_proj",
                                                                                    None))
            else:  # per expert: the released layout and what save_pretrained writes
                for e in range(cfg.n_routed_experts):
                    for n in ("gate_proj", "up_proj", "down_proj"):
                        one((*ex, n), (j, e), f"{base}{e}.{n}.weight", True)
    one(("embed_tokens", "embedding"), (), f"{prefix}embed_tokens.weight", False)
    one(("norm", "scale"), (), f"{prefix}norm.weight", False)
    if not cfg.tie_word_embeddings:
        one(("lm_head", "kernel"), (), lm_head_key, True)
    return plan


def text_params_from_hf(get: Callable[[str], np.ndarray], has: Callable[[str], bool], cfg: K2Config,
                        prefix: str = "model.", lm_head_key: str = "lm_head.weight",
                        rope_interleave: bool = True) -> dict:
    """k25 pure state dict (numpy params + expert biases) of a K2Model from HF tensors reached through `get`."""
    plan = text_plan(get, has, cfg, prefix, lm_head_key, rope_interleave)
    _, state = abstract_state(K2Model, cfg)
    return assemble(plan, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32),
                                       nnx.to_pure_dict(state)))


def text_params_to_hf(state: dict, cfg: K2Config, prefix: str = "model.",
                      lm_head_key: str = "lm_head.weight") -> Iterator[tuple[str, np.ndarray]]:
    """Inverse of `text_params_from_hf`: (HF key, torch-layout array) pairs, experts per expert."""
    def get(path: tuple[str, ...]) -> np.ndarray:
        node = state
        for p in path:
            node = node[p]
        return np.asarray(node)

    k = cfg.first_k_dense_replace
    for name, layer_ids, moe in (("dense_layers", range(k), False),
                                 ("moe_layers", range(k, cfg.num_hidden_layers), True)):
        if not len(layer_ids):
            continue
        for suffix, path, transpose in _layer_keys(cfg, moe):
            arr = get((name, *path))
            for j, i in enumerate(layer_ids):
                yield f"{prefix}layers.{i}.{suffix}", (arr[j].T if transpose else arr[j])
        if moe:
            ex = {n: get((name, "mlp", "experts", n)) for n in ("gate_proj", "up_proj", "down_proj")}
            for j, i in enumerate(layer_ids):
                for e in range(cfg.n_routed_experts):
                    for n, arr in ex.items():
                        yield f"{prefix}layers.{i}.mlp.experts.{e}.{n}.weight", arr[j, e].T
    yield f"{prefix}embed_tokens.weight", get(("embed_tokens", "embedding"))
    yield f"{prefix}norm.weight", get(("norm", "scale"))
    if not cfg.tie_word_embeddings:
        yield lm_head_key, get(("lm_head", "kernel")).T


def model_from_state(cfg: Any, pure: dict, model_cls: Callable = K2Model) -> nnx.Module:
    """Merge a pure state dict into a model of `cfg`, checking every shape first."""
    graphdef, state = abstract_state(model_cls, cfg)
    expected = nnx.to_pure_dict(state)
    flat_exp = dict(jax.tree_util.tree_leaves_with_path(expected))
    flat_got = dict(jax.tree_util.tree_leaves_with_path(pure))
    missing = sorted(jax.tree_util.keystr(p) for p in set(flat_exp) - set(flat_got))
    extra = sorted(jax.tree_util.keystr(p) for p in set(flat_got) - set(flat_exp))
    if missing or extra:
        raise ValueError(f"checkpoint does not match the config: missing {missing[:8]}, unexpected {extra[:8]}.")
    for p, leaf in flat_exp.items():
        if tuple(flat_got[p].shape) != tuple(leaf.shape):
            raise ValueError(f"checkpoint tensor {jax.tree_util.keystr(p)} has shape {flat_got[p].shape}, "
                             f"the config implies {leaf.shape}; check config.json against the weights.")
    cast = jax.tree.map(lambda a, e: jnp.asarray(a, e.dtype), pure, expected)
    nnx.replace_by_pure_dict(state, cast)
    return nnx.merge(graphdef, state)
