"""Vision tower + projector weights between transformers' Kimi-K2.5 layout and k25's param pure dicts.

The HF side uses transformers' in-memory `Kimi_K25ForConditionalGeneration` names (keys
`model.vision_tower.*`, `model.mm_projector.*`; q/k already permuted to the rotate-half RoPE layout
transformers converts the original `wqkv` checkpoints to); `k25.hf.layout` maps the on-disk layouts to
them. The k25 side is the `vision_tower` / `mm_projector` subtrees of `nnx.state(K25Model).to_pure_dict()`:
dense kernels (in, out), blocks stacked on a leading layer axis, the patch conv flattened to a (C*p*p, D)
kernel in (c, kh, kw) order.

`k25_plan` / `save_k25` (called by `k25.hf.load` / `save` for directories with a `vision_config`) read and
write whole K2.5 checkpoints, text weights via `k25.hf.text`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from k25.hf.layout import to_saved_layout
from k25.hf.plan import Placement, assemble
from k25.hf.text import config_from_hf, config_to_hf, text_params_to_hf, text_plan
from k25.model.config import K2Config
from k25.model.vision_config import K25Config, MoonViTConfig

VISION = "vision_tower."
PROJECTOR = "mm_projector."
_DENSE = {"attn": ("q_proj", "k_proj", "v_proj", "proj"), "mlp": ("fc1", "fc2")}
_NORMS = ("norm1", "norm2")


def to_numpy(x: Any) -> np.ndarray:
    """numpy view of a torch tensor (bfloat16 kept as ml_dtypes.bfloat16) or any array-like."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import ml_dtypes
            import torch

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


# The released Kimi-K2.5 config.json spells its vision_config for Moonshot's own modeling code: these keys
# name the fields transformers' Kimi_K25VisionConfig (and MoonViTConfig) call otherwise.
RELEASED_VISION_KEYS = {"vt_hidden_size": "hidden_size", "vt_intermediate_size": "intermediate_size",
                        "vt_num_attention_heads": "num_attention_heads", "vt_num_hidden_layers": "num_hidden_layers",
                        "init_pos_emb_height": "pos_emb_height", "init_pos_emb_width": "pos_emb_width",
                        "init_pos_emb_time": "pos_emb_time"}
# ... and these describe the one architecture MoonViT-3D implements; another value is another model
RELEASED_VISION_KINDS = {"merge_type": "sd2_tpool", "pos_emb_type": "divided_fixed",
                         "video_attn_type": "spatial_temporal", "mm_projector_type": "patchmerger"}


def _released_vision(d: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' vision_config spelling of a released one (unchanged if it already is)."""
    d = dict(d)
    for key, want in RELEASED_VISION_KINDS.items():
        if d.get(key, want) != want:
            raise ValueError(f"config.json: vision_config.{key}={d[key]!r}; k25's MoonViT-3D is {key}={want!r}.")
    for old, new in RELEASED_VISION_KEYS.items():
        if old in d:
            d.setdefault(new, d[old])
    return d


def vision_config_from_hf(d: Mapping[str, Any], **overrides: Any) -> MoonViTConfig:
    """MoonViTConfig from an HF `vision_config` dict (transformers' `to_dict()` or the released spelling)."""
    d = _released_vision(d)
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"vision rope_parameters.rope_type={rope.get('rope_type')!r}: only 'axial' exists.")
    kw = {name: d[name] for name in ("patch_size", "pos_emb_height", "pos_emb_width", "pos_emb_time",
                                     "num_attention_heads", "num_hidden_layers", "hidden_size",
                                     "intermediate_size", "hidden_act") if name in d}
    if "merge_kernel_size" in d:
        kw["merge_kernel_size"] = tuple(d["merge_kernel_size"])
    if "rope_theta" in rope:
        kw["rope_theta"] = float(rope["rope_theta"])
    return MoonViTConfig(**{**kw, **overrides}).validate()


def vision_config_to_hf(cfg: MoonViTConfig) -> dict[str, Any]:
    """The HF `vision_config` dict for a MoonViTConfig."""
    keys = ("patch_size", "pos_emb_height", "pos_emb_width", "pos_emb_time", "num_attention_heads",
            "num_hidden_layers", "hidden_size", "intermediate_size", "hidden_act")
    out: dict[str, Any] = {k: getattr(cfg, k) for k in keys}
    out["merge_kernel_size"] = list(cfg.merge_kernel_size)
    out["rope_parameters"] = {"rope_type": "axial", "rope_theta": cfg.rope_theta}
    out["model_type"] = "kimi_k25_vision"
    return out


def _check_shapes(tree: dict, want: dict, path: str = "") -> None:
    for k, v in want.items():
        if isinstance(v, dict):
            _check_shapes(tree[k], v, f"{path}{k}.")
        elif tuple(tree[k].shape) != tuple(v):
            raise ValueError(f"{path}{k}: HF tensor has shape {tuple(tree[k].shape)} but the config expects "
                             f"{tuple(v)}; the checkpoint and K25Config disagree.")


def expected_shapes(cfg: K25Config) -> dict[str, Any]:
    """Shapes of the k25 vision_tower / mm_projector subtrees for cfg (for validation)."""
    v = cfg.vision_config
    d, f, n, m = v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.hidden_size * v.merge_area

    def dense(i, o, stack=()):
        return {"kernel": (*stack, i, o), "bias": (*stack, o)}

    def norm(dim, stack=()):
        return {"scale": (*stack, dim), "bias": (*stack, dim)}

    layers = {"norm1": norm(d, (n,)), "norm2": norm(d, (n,)),
              "attn": {k: dense(d, d, (n,)) for k in _DENSE["attn"]},
              "mlp": {"fc1": dense(d, f, (n,)), "fc2": dense(f, d, (n,))}}
    return {"vision_tower": {"patch_embed": {"proj": dense(v.patch_dim, d),
                                             "position_embeddings": (v.pos_emb_height, v.pos_emb_width, d)},
                             "layers": layers, "final_layernorm": norm(d)},
            "mm_projector": {"pre_norm": norm(cfg.projection_hidden_size), "in_proj": dense(m, m),
                             "out_proj": dense(m, cfg.text_config.hidden_size)}}


def vision_plan(get: Callable[[str], np.ndarray], cfg: K25Config, prefix: str = "model.") -> list[Placement]:
    """Where every HF vision tower / projector tensor (transformers' in-memory names) goes in a K25Model."""
    v = cfg.vision_config
    vt, pj = prefix + VISION, prefix + PROJECTOR
    plan: list[Placement] = []

    def add(path: tuple[str, ...], index: tuple[int, ...], key: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        plan.append(Placement(path, index, key, functools.partial(_apply, get, key, fn)))

    def linear(path, index, key):
        add((*path, "kernel"), index, key + ".weight", np.transpose)
        add((*path, "bias"), index, key + ".bias", None)

    def norm(path, index, key):
        add((*path, "scale"), index, key + ".weight", None)
        add((*path, "bias"), index, key + ".bias", None)

    tower = ("vision_tower",)
    add((*tower, "patch_embed", "proj", "kernel"), (), vt + "patch_embed.proj.weight", _conv_kernel)
    add((*tower, "patch_embed", "proj", "bias"), (), vt + "patch_embed.proj.bias", None)
    add((*tower, "patch_embed", "position_embeddings"), (), vt + "patch_embed.pos_emb.position_embeddings", None)
    for i in range(v.num_hidden_layers):
        lp = f"{vt}layers.{i}."
        for k in _NORMS:
            norm((*tower, "layers", k), (i,), lp + k)
        for group, names in _DENSE.items():
            for k in names:
                linear((*tower, "layers", group, k), (i,), f"{lp}{group}.{k}")
    norm((*tower, "final_layernorm"), (), vt + "final_layernorm")
    norm(("mm_projector", "pre_norm"), (), pj + "pre_norm")
    linear(("mm_projector", "in_proj"), (), pj + "in_proj")
    linear(("mm_projector", "out_proj"), (), pj + "out_proj")
    return plan


def _apply(get: Callable[[str], np.ndarray], key: str, fn: Callable | None) -> np.ndarray:
    x = get(key)
    return x if fn is None else fn(x)


def _conv_kernel(conv: np.ndarray) -> np.ndarray:
    return conv.reshape(conv.shape[0], -1).T


def vision_params_from_hf(state_dict: Mapping[str, Any], cfg: K25Config, prefix: str = "model."
                          ) -> dict[str, Any]:
    """{"vision_tower": ..., "mm_projector": ...} pure dict of numpy arrays from an HF Kimi-K2.5 state dict.

    Every HF key under the two prefixes must be consumed: a leftover one means a layout change, so it raises.
    """
    v = cfg.vision_config
    vt, pj = prefix + VISION, prefix + PROJECTOR
    plan = vision_plan(lambda k: to_numpy(state_dict[k]), cfg, prefix)
    lacking = [p.name for p in plan if p.name not in state_dict]
    if lacking:
        raise KeyError(f"HF state dict lacks {lacking[0]!r}: not a transformers Kimi-K2.5 layout with prefix "
                       f"{prefix!r}, or num_hidden_layers={v.num_hidden_layers} is wrong.")
    used = set(vision_hf_keys(cfg, prefix))
    extra = sorted(k for k in state_dict if k.startswith((vt, pj)) and k not in used)
    if extra:
        raise ValueError(f"HF vision/projector keys not consumed: {extra[:5]} (of {len(extra)}); "
                         "num_hidden_layers may be too small.")
    out = assemble(plan, _abstract_shapes(expected_shapes(cfg)))
    _check_shapes(out, expected_shapes(cfg))
    return out


def _abstract_shapes(shapes: dict) -> dict:
    return {k: _abstract_shapes(v) if isinstance(v, dict) else jax.ShapeDtypeStruct(v, np.float32)
            for k, v in shapes.items()}


def vision_hf_keys(cfg: K25Config, prefix: str = "model.") -> list[str]:
    """Every HF key of the vision tower and projector for cfg."""
    vt, pj = prefix + VISION, prefix + PROJECTOR
    keys = [vt + "patch_embed.proj.weight", vt + "patch_embed.proj.bias",
            vt + "patch_embed.pos_emb.position_embeddings"]
    for i in range(cfg.vision_config.num_hidden_layers):
        names = list(_NORMS) + [f"{g}.{k}" for g, ks in _DENSE.items() for k in ks]
        keys += [f"{vt}layers.{i}.{n}.{w}" for n in names for w in ("weight", "bias")]
    keys += [f"{vt}final_layernorm.{w}" for w in ("weight", "bias")]
    keys += [f"{pj}{n}.{w}" for n in ("pre_norm", "in_proj", "out_proj") for w in ("weight", "bias")]
    return keys


def vision_params_to_hf(params: Mapping[str, Any], cfg: K25Config, prefix: str = "model.", check: bool = True
                        ) -> dict[str, np.ndarray]:
    """HF Kimi-K2.5 state-dict entries (numpy, torch layouts) for the vision tower and projector subtrees."""
    if check:
        _check_shapes({k: params[k] for k in ("vision_tower", "mm_projector")}, expected_shapes(cfg))
    v = cfg.vision_config
    vt, pj = prefix + VISION, prefix + PROJECTOR
    tower, proj = params["vision_tower"], params["mm_projector"]
    out: dict[str, np.ndarray] = {}

    def linear(key: str, p: Mapping[str, Any]) -> None:
        out[key + ".weight"] = np.asarray(p["kernel"]).T
        out[key + ".bias"] = np.asarray(p["bias"])

    def norm(key: str, p: Mapping[str, Any]) -> None:
        out[key + ".weight"] = np.asarray(p["scale"])
        out[key + ".bias"] = np.asarray(p["bias"])

    pe = tower["patch_embed"]
    kernel = np.asarray(pe["proj"]["kernel"])
    out[vt + "patch_embed.proj.weight"] = kernel.T.reshape(-1, v.num_channels, v.patch_size, v.patch_size)
    out[vt + "patch_embed.proj.bias"] = np.asarray(pe["proj"]["bias"])
    out[vt + "patch_embed.pos_emb.position_embeddings"] = np.asarray(pe["position_embeddings"])
    layers = tower["layers"]
    for i in range(v.num_hidden_layers):
        lp = f"{vt}layers.{i}."
        for k in _NORMS:
            norm(lp + k, {n: np.asarray(a)[i] for n, a in layers[k].items()})
        for group, names in _DENSE.items():
            for k in names:
                linear(f"{lp}{group}.{k}", {n: np.asarray(a)[i] for n, a in layers[group][k].items()})
    norm(vt + "final_layernorm", tower["final_layernorm"])
    norm(pj + "pre_norm", proj["pre_norm"])
    linear(pj + "in_proj", proj["in_proj"])
    linear(pj + "out_proj", proj["out_proj"])
    return out


# ------------------------------------------------------------------------------- whole checkpoints
def k25_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> K25Config:
    """K25Config from a Kimi-K2.5 config.json dict; overrides go to the tower owning the field (dtypes to both).

    Like transformers, the top-level `tie_word_embeddings` (default True) decides whether lm_head is tied.
    """
    text_fields = {f.name for f in dataclasses.fields(K2Config)}
    vision_fields = {f.name for f in dataclasses.fields(MoonViTConfig)}
    unknown = sorted(set(overrides) - text_fields - vision_fields)
    if unknown:
        raise ValueError(f"unknown config override(s) {unknown}; use K2Config or MoonViTConfig field names.")
    text_kw = {"dtype": "float32", "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True))}
    text_kw.update({k: v for k, v in overrides.items() if k in text_fields})
    vision_kw = {"dtype": "float32", **{k: v for k, v in overrides.items() if k in vision_fields}}
    vision = vision_config_from_hf(hf["vision_config"], **vision_kw)
    released = hf["vision_config"]  # the release keeps the projector's fields there, and one media token
    defaults = K25Config()
    tokens = {k: hf.get(k, getattr(defaults, k)) for k in ("image_token_id", "video_token_id",
                                                           "vision_start_token_id", "vision_end_token_id")}
    if "image_token_id" not in hf and "media_placeholder_token_id" in hf:
        tokens["image_token_id"] = hf["media_placeholder_token_id"]
    return K25Config(
        text_config=config_from_hf(dict(hf["text_config"]), **text_kw), vision_config=vision,
        projection_hidden_size=hf.get("projection_hidden_size") or released.get("mm_hidden_size") or vision.hidden_size,
        projection_layer_norm_eps=hf.get("projection_layer_norm_eps", released.get(
            "projector_ln_eps", defaults.projection_layer_norm_eps)), **tokens).validate()


def k25_config_to_hf(cfg: K25Config) -> dict[str, Any]:
    """The config.json transformers' Kimi_K25ForConditionalGeneration reads."""
    return {"architectures": ["Kimi_K25ForConditionalGeneration"], "model_type": "kimi_k25",
            "text_config": config_to_hf(cfg.text_config), "vision_config": vision_config_to_hf(cfg.vision_config),
            "projection_hidden_size": cfg.projection_hidden_size,
            "projection_layer_norm_eps": cfg.projection_layer_norm_eps, "image_token_id": cfg.image_token_id,
            "video_token_id": cfg.video_token_id, "vision_start_token_id": cfg.vision_start_token_id,
            "vision_end_token_id": cfg.vision_end_token_id, "tie_word_embeddings": cfg.text_config.tie_word_embeddings}


def k25_plan(hf: Mapping[str, Any], view, cfg: K25Config) -> list[Placement]:
    """The plan for a K2.5 checkpoint; `view` shows transformers' in-memory names (`k25.hf.layout.K25Names`
    over either on-disk layout)."""
    text = text_plan(view.get, view.__contains__, cfg.text_config, prefix="model.language_model.",
                     rope_interleave=hf["text_config"].get("rope_interleave", True), root=("language_model",))
    return text + vision_plan(view.get, cfg)


def k25_tensors(model: nnx.Module, layout: str = "transformers") -> Iterator[tuple[str, np.ndarray]]:
    """(on-disk name, torch-layout array) pairs of a K25Model in the layout `save_pretrained` writes."""
    cfg: K25Config = model.cfg
    state = nnx.to_pure_dict(nnx.state(model))
    text = text_params_to_hf(state["language_model"], cfg.text_config, prefix="model.language_model.")
    tensors = itertools.chain(text, vision_params_to_hf(state, cfg).items())
    return to_saved_layout(tensors, cfg.vision_config.num_attention_heads, layout)
