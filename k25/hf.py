"""Load and save HF-format checkpoints (config.json + safetensors) of DeepseekV3 / Kimi-K2 models.

`load(path)` builds a `K2Model` from a directory transformers wrote (or a released checkpoint);
`save(model, path)` writes a directory `DeepseekV3ForCausalLM.from_pretrained` loads.

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

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k25.model.config import K2Config, RopeScaling
from k25.model.decoder import K2Model

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# ------------------------------------------------------------------------------------------- config
def config_from_hf(hf: dict[str, Any], **overrides: Any) -> K2Config:
    """K2Config from a DeepseekV3 / Kimi-K2 config.json dict (released `rope_scaling` or transformers-5 form)."""
    if "text_config" in hf:  # Kimi-K2.5: the language model's config is nested
        hf = hf["text_config"]
    if hf.get("attention_bias"):
        raise ValueError("config.json: attention_bias=true is not supported by k25 (K2 has no attention biases).")
    if hf.get("quantization_config"):
        raise ValueError("config.json: quantization_config is set; k25 loads unquantized (bf16/fp32) weights. "
                         "Dequantize the checkpoint first.")
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


# ------------------------------------------------------------------------------------- safetensors
class _Reader:
    """Lazy access to the tensors of a checkpoint directory (single file or sharded with an index)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index = os.path.join(path, SAFETENSORS_INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{path}: no *.safetensors files and no {SAFETENSORS_INDEX}.")
            weight_map = {}
            for fn in files:
                with safe_open(os.path.join(path, fn), "np") as f:
                    weight_map.update({k: fn for k in f.keys()})
        self.path, self.weight_map, self._open = path, weight_map, safe_open

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> np.ndarray:
        if key not in self.weight_map:
            raise KeyError(f"{self.path}: tensor {key!r} not found in the checkpoint.")
        with self._open(os.path.join(self.path, self.weight_map[key]), "np") as f:
            return np.asarray(f.get_tensor(key), np.float32)


def text_params_from_hf(get: Callable[[str], np.ndarray], has: Callable[[str], bool], cfg: K2Config,
                        prefix: str = "model.", lm_head_key: str = "lm_head.weight",
                        rope_interleave: bool = True) -> dict:
    """k25 pure state dict (params + expert biases) of a K2Model from HF tensors reached through `get`."""
    out: dict = {}

    def fetch(key: str, transpose: bool) -> np.ndarray:
        w = get(key)
        if not rope_interleave:
            if key.endswith(("q_b_proj.weight", "q_proj.weight")):
                w = _permute_q_rope(w, cfg)
            elif key.endswith("kv_a_proj_with_mqa.weight"):
                w = _permute_k_rope(w, cfg)
        return w.T if transpose else w

    def stack(layer_ids: list[int], moe: bool, name: str) -> None:
        for suffix, path, transpose in _layer_keys(cfg, moe):
            _set(out, (name, *path), np.stack([fetch(f"{prefix}layers.{i}.{suffix}", transpose) for i in layer_ids]))
        if moe:
            F = cfg.moe_intermediate_size
            gates, ups, downs = [], [], []
            for i in layer_ids:
                base = f"{prefix}layers.{i}.mlp.experts."
                if has(base + "gate_up_proj"):  # fused: (E, 2F, D) and (E, D, F)
                    gu = get(base + "gate_up_proj")
                    gates.append(gu[:, :F].transpose(0, 2, 1))
                    ups.append(gu[:, F:].transpose(0, 2, 1))
                    downs.append(get(base + "down_proj").transpose(0, 2, 1))
                else:
                    E = range(cfg.n_routed_experts)
                    gates.append(np.stack([get(f"{base}{e}.gate_proj.weight").T for e in E]))
                    ups.append(np.stack([get(f"{base}{e}.up_proj.weight").T for e in E]))
                    downs.append(np.stack([get(f"{base}{e}.down_proj.weight").T for e in E]))
            for n, arrs in (("gate_proj", gates), ("up_proj", ups), ("down_proj", downs)):
                _set(out, (name, "mlp", "experts", n), np.stack(arrs))

    k = cfg.first_k_dense_replace
    if k:
        stack(list(range(k)), False, "dense_layers")
    if cfg.num_moe_layers:
        stack(list(range(k, cfg.num_hidden_layers)), True, "moe_layers")
    _set(out, ("embed_tokens", "embedding"), get(f"{prefix}embed_tokens.weight"))
    _set(out, ("norm", "scale"), get(f"{prefix}norm.weight"))
    if not cfg.tie_word_embeddings:
        _set(out, ("lm_head", "kernel"), get(lm_head_key).T)
    return out


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


# ------------------------------------------------------------------------------------- model glue
def abstract_model(cfg: K2Config) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and abstract state of a K2Model, without allocating weights."""
    return nnx.split(nnx.eval_shape(lambda: K2Model(cfg, rngs=nnx.Rngs(0))))


def model_from_state(cfg: K2Config, pure: dict, model_cls: Callable = K2Model) -> nnx.Module:
    """Merge a pure state dict into a model of `cfg`, checking every shape first."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0))))
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


def load(path: str, **config_overrides: Any) -> nnx.Module:
    """Build a k25 model from an HF-format checkpoint directory.

    DeepseekV3 / Kimi-K2 directories give a `K2Model`; Kimi-K2.5 directories (a `vision_config`
    in config.json) give the multimodal `K25Model`. Extra keyword arguments override config
    fields (e.g. `dtype="bfloat16"`).
    """
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    reader = _Reader(path)
    if "vision_config" in hf:
        from k25.hf_vision import load_k25

        return load_k25(hf, reader.get, reader.__contains__, **config_overrides)
    config_overrides.setdefault("dtype", "float32")
    cfg = config_from_hf(hf, **config_overrides)
    pure = text_params_from_hf(reader.get, reader.__contains__, cfg, rope_interleave=hf.get("rope_interleave", True))
    return model_from_state(cfg, pure)


def write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], path: str, max_shard_bytes: int = 5 << 30,
                      dtype: str = "float32") -> None:
    """Write tensors to `path`, one file if it fits in max_shard_bytes, else shards plus an index."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    total = 0
    np_dtype = jnp.dtype(dtype)
    for key, arr in tensors:
        arr = np.ascontiguousarray(np.asarray(arr).astype(np_dtype))
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
        total += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in shard})
    with open(os.path.join(path, SAFETENSORS_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save(model: nnx.Module, path: str, max_shard_bytes: int = 5 << 30) -> None:
    """Write `model` as an HF checkpoint directory (config.json + safetensors) transformers can load."""
    if hasattr(model, "vision_tower"):
        from k25.hf_vision import save_k25

        save_k25(model, path, max_shard_bytes=max_shard_bytes)
        return
    cfg: K2Config = model.cfg
    state = nnx.to_pure_dict(nnx.state(model))
    os.makedirs(path, exist_ok=True)
    write_safetensors(text_params_to_hf(state, cfg), path, max_shard_bytes, dtype=cfg.param_dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2)
