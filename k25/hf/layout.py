"""Kimi-K2.5 tensor names: the original Moonshot layout on disk <-> transformers' in-memory names.

The released Kimi-K2.5 checkpoint, and what transformers 5.23's `save_pretrained` writes, use the original
layout: `language_model.model.layers.N.*`, `vision_tower.encoder.blocks.N.{wqkv,wo,norm0,norm1,mlp.fc0,
mlp.fc1}`, a fused `wqkv` whose q/k rows are in the interleaved (complex) RoPE order, and
`mm_projector.proj.{0,2}`. transformers renames and converts them on load and back on save; the rules here
are its own, in its order: the `"kimi_k25"` entry of `transformers/conversion_mapping.py` (renames, then
`WeightConverter(wqkv -> q/k/v, [Chunk(dim=0), PermuteForRope(subconfig_key="vision_config",
permute_layer_names=["q_proj", "k_proj"])])`, with `PermuteForRope` in `transformers/core_model_loading.py`).

`save_pretrained` applies the reversed renames, which gives three names that differ from the release:
`language_model.model.blocks.N` (the `blocks -> layers` rule reversed), `vision_tower.encoder.patch_embed.*`
(`vision_tower.encoder -> model.vision_tower` reversed) and `model.mm_projector.pre_norm.*` (never renamed).
Both spellings load (transformers adds the missing `model.` prefix itself, and so does `K25Names`);
`saved_name(..., layout="transformers")` writes what `save_pretrained` writes, `layout="released"` the
release's spelling.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

import numpy as np

# (pattern, replacement), applied one after the other to every key, as transformers does.
LOAD_RENAMES: tuple[tuple[str, object], ...] = (
    (r"language_model\.model", "model.language_model"),
    (r"language_model\.lm_head", "lm_head"),
    (r"vision_tower\.encoder\.blocks\.(\d+)\.norm([01])",
     lambda m: f"vision_tower.encoder.blocks.{m.group(1)}.norm{int(m.group(2)) + 1}"),
    (r"vision_tower\.encoder\.blocks\.(\d+)\.mlp\.fc([01])",
     lambda m: f"vision_tower.encoder.blocks.{m.group(1)}.mlp.fc{int(m.group(2)) + 1}"),
    (r"vision_tower\.encoder\.blocks\.(\d+)\.wo", r"vision_tower.encoder.blocks.\1.attn.proj"),
    (r"vision_tower\.encoder", "model.vision_tower"),
    (r"mm_projector\.proj\.0", "model.mm_projector.in_proj"),
    (r"mm_projector\.proj\.2", "model.mm_projector.out_proj"),
    (r"blocks", "layers"),
    (r"vision_tower\.patch_embed\.pos_emb\.weight", "model.vision_tower.patch_embed.pos_emb.position_embeddings"),
    (r"^(vision_tower|mm_projector)\.", r"model.\1."),  # the base-model prefix transformers adds when missing
)
QKV = ("q_proj", "k_proj", "v_proj")


def loaded_name(key: str) -> str:
    """transformers' in-memory name for an on-disk K2.5 key (fused `wqkv` keys keep `wqkv`)."""
    for pattern, repl in LOAD_RENAMES:
        key = re.sub(pattern, repl, key, count=1)
    return key


def permute_for_rope(w: np.ndarray, num_heads: int, inverse: bool = False) -> np.ndarray:
    """transformers' `PermuteForRope`: per head, rows (half, 2) -> (2, half) (interleaved -> rotate-half);
    `inverse` goes back. Works on (rows, in) weights and (rows,) biases."""
    dim0 = w.shape[0]
    half = dim0 // num_heads // 2
    head = (2, half) if inverse else (half, 2)
    x = w.reshape(num_heads, *head, *w.shape[1:])
    return np.swapaxes(x, 1, 2).reshape(w.shape)


def _qkv_part(w: np.ndarray, part: int, num_heads: int) -> np.ndarray:
    x = np.split(w, 3, axis=0)[part]
    return permute_for_rope(x, num_heads) if part < 2 else x


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int) -> np.ndarray:
    """The on-disk `wqkv` from in-memory q/k/v (the inverse of the load conversion)."""
    return np.concatenate([permute_for_rope(q, num_heads, inverse=True),
                           permute_for_rope(k, num_heads, inverse=True), v], axis=0)


class K25Names:
    """A tensor view (keys / `in` / get / sources) with transformers' in-memory K2.5 names over either layout."""

    def __init__(self, base, vision_heads: int):
        self.base = base
        self._map: dict[str, tuple[str, object]] = {}
        for key in base.keys():
            name = loaded_name(key)
            if ".wqkv." in name:
                entries = [(name.replace("wqkv", "attn." + p),
                            functools.partial(_qkv_part, part=i, num_heads=vision_heads)) for i, p in enumerate(QKV)]
            else:
                entries = [(name, None)]
            for n, fn in entries:
                if n in self._map:
                    raise ValueError(f"checkpoint tensors {self._map[n][0]!r} and {key!r} both map to {n!r}: the "
                                     "directory mixes two layouts.")
                self._map[n] = (key, fn)

    def keys(self) -> Iterator[str]:
        return iter(self._map)

    def __contains__(self, name: str) -> bool:
        return name in self._map

    def sources(self, name: str) -> tuple[str, ...]:
        return self.base.sources(self._map[name][0])

    def get(self, name: str) -> np.ndarray:
        if name not in self._map:
            raise KeyError(f"tensor {name!r} not found in the checkpoint.")
        key, fn = self._map[name]
        x = self.base.get(key)
        return fn(x) if fn is not None else x


_SAVE_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^model\.language_model\.layers\.", "language_model.model.blocks."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.layers\.(\d+)\.norm1\.", r"vision_tower.encoder.blocks.\1.norm0."),
    (r"^model\.vision_tower\.layers\.(\d+)\.norm2\.", r"vision_tower.encoder.blocks.\1.norm1."),
    (r"^model\.vision_tower\.layers\.(\d+)\.mlp\.fc1\.", r"vision_tower.encoder.blocks.\1.mlp.fc0."),
    (r"^model\.vision_tower\.layers\.(\d+)\.mlp\.fc2\.", r"vision_tower.encoder.blocks.\1.mlp.fc1."),
    (r"^model\.vision_tower\.layers\.(\d+)\.attn\.proj\.", r"vision_tower.encoder.blocks.\1.wo."),
    (r"^model\.vision_tower\.layers\.(\d+)\.attn\.qkv\.", r"vision_tower.encoder.blocks.\1.wqkv."),
    (r"^model\.vision_tower\.patch_embed\.pos_emb\.position_embeddings$", "vision_tower.patch_embed.pos_emb.weight"),
    (r"^model\.vision_tower\.", "vision_tower.encoder."),
    (r"^model\.mm_projector\.in_proj\.", "mm_projector.proj.0."),
    (r"^model\.mm_projector\.out_proj\.", "mm_projector.proj.2."),
)
_RELEASED = (("language_model.model.blocks.", "language_model.model.layers."),
             ("vision_tower.encoder.patch_embed.", "vision_tower.patch_embed."),
             ("model.mm_projector.pre_norm.", "mm_projector.pre_norm."))
LAYOUTS = ("transformers", "released")


def saved_name(name: str, layout: str = "transformers") -> str:
    """On-disk name of an in-memory K2.5 name (`attn.qkv` stands for the fused q/k/v)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; choose one of {LAYOUTS}.")
    for pattern, repl in _SAVE_RENAMES:
        new = re.sub(pattern, repl, name, count=1)
        if new != name:
            name = new
            break
    if layout == "released":
        for a, b in _RELEASED:
            if name.startswith(a):
                name = b + name[len(a):]
    return name


def to_saved_layout(tensors, vision_heads: int, layout: str = "transformers"):
    """(in-memory name, array) pairs -> (on-disk name, array) pairs, q/k/v fused into `wqkv`."""
    pending: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in tensors:
        m = re.match(r"^(model\.vision_tower\.layers\.\d+\.attn\.)(q_proj|k_proj|v_proj)\.(weight|bias)$", name)
        if m is None:
            yield saved_name(name, layout), arr
            continue
        fused = f"{m.group(1)}qkv.{m.group(3)}"
        parts = pending.setdefault(fused, {})
        parts[m.group(2)] = arr
        if len(parts) == 3:
            yield saved_name(fused, layout), fuse_qkv(*(parts[p] for p in QKV), vision_heads)
            del pending[fused]
    if pending:
        raise ValueError(f"incomplete q/k/v sets: {sorted(pending)}")
