"""Load and save HF-format checkpoints (config.json + safetensors) of DeepseekV3 / Kimi-K2 / Kimi-K2.5 models.

`load(path)` builds a `K2Model` (or, with a `vision_config`, a `K25Model`) from a directory as released or as
transformers' `save_pretrained` writes it: the original K2.5 layout or transformers' in-memory names
(`layout.py`), block-FP8 or compressed-tensors INT4 weights dequantized on load (`quant.py`), and with
`mesh=` streamed onto the mesh one tensor at a time (`plan.py`). `save(model, path)` writes what
`save_pretrained` writes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from k25.hf.files import SAFETENSORS_INDEX, SINGLE_FILE, Reader, write_safetensors
from k25.hf.layout import K25Names
from k25.hf.plan import Placement, abstract_state, assemble, check_plan, place_on_mesh
from k25.hf.quant import Dequantized, quantization_config
from k25.hf.text import (
    config_from_hf,
    config_to_hf,
    model_from_state,
    text_params_from_hf,
    text_params_to_hf,
    text_plan,
)
from k25.model.decoder import K2Model
from k25.parallel.mesh import AXES, state_shardings

_NO_MESH = Mesh(np.empty((), dtype=object), ())

__all__ = ["SAFETENSORS_INDEX", "SINGLE_FILE", "Placement", "Reader", "abstract_state", "config_from_hf",
           "config_to_hf", "load", "load_plan", "model_from_state", "save", "text_params_from_hf",
           "text_params_to_hf", "write_safetensors"]


def read_config(path: str) -> dict[str, Any]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json; point at an HF checkpoint directory.")
    with open(cfg_path) as f:
        return json.load(f)


def _skipped(hf: dict[str, Any], tied: bool) -> Callable[[str], bool]:
    """Tensors k25 does not use, as transformers skips them too: multi-token-prediction layers
    (`num_nextn_predict_layers`, e.g. DeepSeek-V3's layer 61) and a stored lm_head when embeddings are tied."""
    text = hf.get("text_config", hf)
    n, extra = int(text.get("num_hidden_layers", 0)), int(text.get("num_nextn_predict_layers") or 0)

    def ignore(key: str) -> bool:
        if tied and key in ("lm_head.weight", "language_model.lm_head.weight"):
            return True
        m = re.search(r"layers\.(\d+)\.", key)
        return bool(extra and m and n <= int(m.group(1)) < n + extra)

    return ignore


def load_plan(path: str, on_read: Callable | None = None, **config_overrides: Any):
    """(config, model class, plan, tensor view, ignore) for a checkpoint directory, nothing read but headers."""
    hf = read_config(path)
    view = Dequantized(Reader(path, on_read=on_read), quantization_config(hf))
    if "vision_config" in hf:
        from k25.hf_vision import k25_config_from_hf, k25_plan
        from k25.model.k25 import K25Model

        cfg = k25_config_from_hf(hf, **config_overrides)
        view = K25Names(view, cfg.vision_config.num_attention_heads)
        plan = k25_plan(hf, view, cfg)
        return cfg, K25Model, plan, view, _skipped(hf, cfg.text_config.tie_word_embeddings)
    config_overrides.setdefault("dtype", "float32")
    cfg = config_from_hf(hf, **config_overrides)
    plan = text_plan(view.get, view.__contains__, cfg, rope_interleave=hf.get("rope_interleave", True))
    return cfg, K2Model, plan, view, _skipped(hf, cfg.tie_word_embeddings)


def load(path: str, *, mesh: Mesh | None = None, progress: bool = False, on_read: Callable | None = None,
         **config_overrides: Any) -> nnx.Module:
    """Build a k25 model from an HF-format checkpoint directory.

    DeepseekV3 / Kimi-K2 directories give a `K2Model`; Kimi-K2.5 directories (a `vision_config` in
    config.json) give the multimodal `K25Model`. Quantized weights are dequantized to the model's weight
    dtype. With `mesh` (default: the mesh set by `jax.set_mesh`, if any), every parameter is created in its
    sharding on that mesh (k25.parallel.mesh rules) and filled one checkpoint tensor at a time, so host memory
    holds one tensor, not the model. `progress` shows a bar over the tensors; `on_read(key, array)` sees every
    array read from disk. Extra keyword arguments override config fields (e.g. `param_dtype="bfloat16"`).
    """
    if mesh is None and not jax.sharding.get_mesh().empty:
        mesh = jax.sharding.get_mesh()
    if mesh is not None and set(mesh.axis_names) != set(AXES):
        raise ValueError(f"mesh axes {mesh.axis_names}: k25 shards parameters over {AXES} "
                         "(k25.parallel.mesh.make_mesh builds one).")
    cfg, model_cls, plan, view, ignore = load_plan(path, on_read=on_read, **config_overrides)
    with jax.set_mesh(_NO_MESH):  # the model's logical axis names are not mesh axes (see k25/train/loop.py)
        graphdef, state = abstract_state(model_cls, cfg)
    abstract = nnx.to_pure_dict(state)
    check_plan(plan, abstract, view, ignore)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc="tensors", unit="t", dynamic_ncols=True)
    tick = None if bar is None else (lambda name: bar.update(1))
    try:
        if mesh is None:
            pure = jax.tree.map(jnp.asarray, assemble(plan, abstract, progress=tick))
        else:
            pure = place_on_mesh(plan, abstract, state_shardings(state, mesh), progress=tick)
    finally:
        if bar is not None:
            bar.close()
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def save(model: nnx.Module, path: str, max_shard_bytes: int = 5 << 30, layout: str = "transformers",
         progress: bool = False) -> None:
    """Write `model` as an HF checkpoint directory (config.json + safetensors) that transformers loads.

    K2.5 models are written in the original layout `save_pretrained` writes (`layout="transformers"`) or
    with the release's spelling of its three differing names (`layout="released"`, see k25/hf/layout.py).
    Weights are written unquantized in the model's weight dtype. `progress` shows a bar over the tensors.
    """
    if hasattr(model, "vision_tower"):
        from k25.hf_vision import k25_config_to_hf, k25_tensors

        tensors, dtype, config = k25_tensors(model, layout), model.cfg.text_config.param_dtype, k25_config_to_hf(
            model.cfg)
    else:
        tensors = text_params_to_hf(nnx.to_pure_dict(nnx.state(model)), model.cfg)
        dtype, config = model.cfg.param_dtype, config_to_hf(model.cfg)
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, desc="tensors", unit="t", dynamic_ncols=True)
    os.makedirs(path, exist_ok=True)
    write_safetensors(tensors, path, max_shard_bytes, dtype=dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
