"""A model in a k25 run directory: written by `experiments.convert` (from an HF checkpoint), read back from any run.

The layout is the training runtime's (k25/train/checkpoint.py): `DIR/config.json` and orbax checkpoints under
`DIR/checkpoints/<step>/{state,data,meta}` whose `state` holds `params` and `buffers` pure dicts (a trained
run's state also holds the optimizer state; readers take only the model). So `--config.init_from=DIR` (which
reads the latest checkpoint's `state["params"]` / `state["buffers"]`, k25/train/init_from.py) and anything that
restores a run's model accept a converted directory like a trained one.

config.json carries what rebuilds the model: `model_config` ({"kind": "k2" | "k25", "config": the K2Config /
K25Config dict}), and the experiment-style fields the stages read (`stage`, `model` for the text LM stage;
`lm` + `vision` for the K2.5 stages).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx

from k25.model.config import K2Config
from k25.model.vision_config import K25Config, MoonViTConfig
from k25.train.checkpoint import Checkpointer
from k25.train.init_from import latest_params
from k25.train.state import split_model


def is_run_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def model_config(config: dict[str, Any]) -> K2Config | K25Config:
    """The model config of a run's config.json (converted or trained)."""
    if "model_config" in config:
        kind, d = config["model_config"]["kind"], config["model_config"]["config"]
        return K25Config.from_dict(d) if kind == "k25" else K2Config.from_dict(d)
    # the sft stage's model, and the rl stage's K2.5 policy (an rl run without `model`): init_from's (or
    # lm + vision / model), with the chat format's media ids
    k25_rl = config.get("stage") == "rl" and "model" not in config
    if config.get("stage") == "sft" or k25_rl:
        from k25.train.sft import source_model_config, with_chat_media_ids

        if k25_rl:
            tokenizer = (config.get("rl") or {}).get("chat_format", "byte")
        else:
            tokenizer = (config.get("data") or {}).get("tokenizer", "byte")
        if config.get("init_from"):
            return source_model_config(config["init_from"], tokenizer)
        from k25.data.chat import load_chat_format

        return with_chat_media_ids(_built_config(config), load_chat_format(tokenizer))
    return _built_config(config)


def _built_config(config: dict[str, Any]) -> K2Config | K25Config:
    """The model a stage builds from scratch out of its config fields."""
    if "lm" in config and "vision" in config:  # the K2.5 stages build K25Config this way
        vision = MoonViTConfig.from_dict(config["vision"])
        return K25Config(text_config=K2Config.from_dict(config["lm"]), vision_config=vision,
                         projection_hidden_size=vision.hidden_size).validate()
    if "model" in config:
        return K2Config.from_dict(config["model"])
    raise ValueError("config.json of the run holds no model config (model_config, model, lm + vision, or "
                     "init_from for the sft and rl stages); this run trains no K2 / K2.5 model.")


HF_FILES = "hf"  # the source HF directory's other files (tokenizer, chat template, generation config)
_WEIGHT_FILES = ("config.json", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tiktoken.model", "tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copy everything of an HF directory but its weights and config.json (tokenizer files, chat template,
    generation config, code) from `src` to `dst`; returns the names copied."""
    names = [n for n in sorted(os.listdir(src)) if os.path.isfile(os.path.join(src, n))
             and n not in _WEIGHT_FILES and not n.endswith(".safetensors")]
    if names:
        os.makedirs(dst, exist_ok=True)
    for n in names:
        shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
    return names


def write_model_run(model: nnx.Module, workdir: str, source: str | None = None) -> str:
    """Write `model` as a run directory (step 0); with `source` (the HF directory it came from) its tokenizer and
    other side files go to DIR/hf/ and `data.tokenizer` points there. Returns the checkpoint step directory."""
    cfg = model.cfg
    if is_run_dir(workdir) and os.listdir(os.path.join(workdir, "checkpoints")):
        raise FileExistsError(f"{workdir} already holds checkpoints; convert into a new directory.")
    os.makedirs(workdir, exist_ok=True)
    if isinstance(cfg, K25Config):
        config = {"stage": "k25", "lm": cfg.text_config.to_dict(), "vision": cfg.vision_config.to_dict(),
                  "model_config": {"kind": "k25", "config": cfg.to_dict()}}
    else:
        config = {"stage": "lm", "model": cfg.to_dict(), "model_config": {"kind": "k2", "config": cfg.to_dict()}}
    if source:
        config["converted_from"] = os.path.abspath(source)
        side = os.path.abspath(os.path.join(workdir, HF_FILES))
        if set(copy_side_files(source, side)) & set(_TOKENIZER_FILES):
            config["data"] = {"tokenizer": side}
    _, params, buffers = split_model(model)
    ckpt = Checkpointer(workdir, max_to_keep=1, async_save=False)
    try:
        ckpt.save(0, {"params": params, "buffers": buffers}, {}, {"step": 0, "source": config.get("converted_from")},
                  force=True)
        ckpt.wait()
    finally:
        ckpt.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f, indent=1, default=str)
    return os.path.join(ckpt.directory, "0")


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_model_run(workdir: str) -> nnx.Module:
    """The model of a run directory's latest checkpoint (what `--config.init_from` reads), on the default device."""
    from k25.hf.text import model_from_state

    with open(os.path.join(workdir, "config.json")) as f:
        cfg = model_config(json.load(f))
    saved = latest_params(workdir, "run directory")
    pure = jax.tree.map(np.asarray, _merge(saved["params"], saved["buffers"]))
    if isinstance(cfg, K25Config):
        from k25.model.k25 import K25Model

        return model_from_state(cfg, pure, model_cls=K25Model)
    return model_from_state(cfg, pure)


def load_model(path: str, **kw: Any) -> nnx.Module:
    """A k25 model from a run directory (converted or trained) or an HF checkpoint directory."""
    if is_run_dir(path):
        return read_model_run(path)
    from k25 import hf

    return hf.load(path, **kw)
